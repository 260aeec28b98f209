"""The command line as users meet it: --version, info over several images (--json, --jsonl), ls."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import jsonschema

from conftest import REPO
from fixture_data import MANIFEST, fixture_path
from ramfs.image import open_image

SCHEMA = json.loads((REPO / "docs" / "info.schema.json").read_text())
IMAGES = [e["decompressed_path"] for e in MANIFEST if e["kind"] == "image"][:4]


def ramfs(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, text=True, timeout=300)


def test_version_names_every_layer():
    r = ramfs("--version")
    assert r.returncode == 0
    import pyfuse3
    lines = r.stdout.splitlines()
    assert re.fullmatch(r"ramfs \d+\.\d+\.\d+.*", lines[0])
    assert lines[1] == f"pyfuse3 {pyfuse3.__version__}"
    assert re.fullmatch(r"libfuse 3\.\d+\.\d+", lines[2]), lines[2]  # libfuse3 is what pyfuse3 links
    assert lines[3].startswith(f"Python {sys.version.split()[0]}")


def test_info_jsonl_one_valid_line_per_image_and_errors_in_line(tmp_path):
    junk = tmp_path / "junk.save"
    junk.write_bytes(b"not a save image at all")
    paths = [str(fixture_path(p)) for p in IMAGES]
    r = ramfs("info", "--jsonl", *paths[:2], str(junk), *paths[2:])
    assert r.returncode == 2  # one image could not be read
    lines = [json.loads(ln) for ln in r.stdout.splitlines()]
    assert len(lines) == len(paths) + 1
    good = [ln for ln in lines if "error" not in ln]
    assert [ln["path"] for ln in good] == paths
    for facts in good:
        jsonschema.validate(facts, SCHEMA)
    bad = lines[2]
    assert bad["path"] == str(junk) and "not a save image" in bad["error"]
    # --json of one image is the same document as its --jsonl line
    one = json.loads(ramfs("info", "--json", paths[0]).stdout)
    assert one == good[0]


def test_info_of_several_images_keeps_going_past_a_bad_one(tmp_path):
    junk = tmp_path / "junk.save"
    junk.write_bytes(b"")
    paths = [str(fixture_path(p)) for p in IMAGES[:2]]
    r = ramfs("info", paths[0], str(junk), paths[1])
    assert r.returncode == 2
    assert r.stdout.count("pc.ram") >= 2 and "Traceback" not in r.stderr
    assert r.stderr.count("ramfs: error:") == 1 and str(junk) in r.stderr


def test_ls_lists_every_block_with_its_populated_bytes():
    path = fixture_path(IMAGES[0])
    r = ramfs("ls", "--bytes", str(path))
    assert r.returncode == 0, r.stderr
    head, *rows = r.stdout.splitlines()
    assert head.split() == ["SIZE", "POPULATED", "%", "BLOCK"]
    with open_image(path) as img:
        want = [(b.used_length, b.populated_pages * b.page_size, b.idstr) for b in img.blocks]
    got = [(int(a), int(b), name) for a, b, _, name in (row.split(None, 3) for row in rows)]
    assert got == want
    human = ramfs("ls", str(path)).stdout
    assert "MiB" in human and "pc.ram" in human


def test_progress_bar_only_on_a_terminal_and_not_with_quiet(tmp_path):
    """Opening a sequential image builds its index: on a terminal ramfs shows a bar with the
    rate and an ETA; piped or with --quiet it prints nothing but the answer."""
    import os
    import shlex
    seq = next(fixture_path(e["decompressed_path"]) for e in MANIFEST
               if e["kind"] == "image" and e["qemu_encoding"] == "sequential")
    env = dict(os.environ, RAMFS_CACHE_DIR=str(tmp_path / "cache"))  # no cached index: a real scan

    def on_tty(*args):
        cmd = shlex.join([sys.executable, "-m", "ramfs.cli", *args])
        return subprocess.run(["script", "-qec", cmd, "/dev/null"], capture_output=True, text=True,
                              timeout=120, env=env).stdout

    shown = on_tty("ls", str(seq))
    assert "scanning [" in shown and "MB/s" in shown and "ETA" in shown and "pc.ram" in shown
    env["RAMFS_CACHE_DIR"] = str(tmp_path / "cache2")
    assert "scanning" not in on_tty("ls", "-q", str(seq))
    env["RAMFS_CACHE_DIR"] = str(tmp_path / "cache3")
    piped = subprocess.run([sys.executable, "-m", "ramfs.cli", "ls", str(seq)], capture_output=True, text=True,
                           env=env, timeout=120)
    assert "scanning" not in piped.stdout + piped.stderr


def test_the_progress_bar_ends_on_the_last_count():
    """Frames are throttled to five a second; the one left on the terminal is the last
    count (100 % for a finished scan), not whichever frame was drawn last."""
    import io

    from ramfs.progress import Progress

    out = io.StringIO()
    bar = Progress(1000, "indexing", enabled=True, stream=out)
    for done in range(0, 1001, 40):
        bar(done)
    assert "100.0%" not in out.getvalue()  # throttled: only the first frame so far
    bar.done()
    assert out.getvalue().rsplit("\r", 1)[-1].startswith("indexing [" + "#" * 30 + "] 100.0%")
    assert out.getvalue().endswith("\n")


def test_errors_name_the_file_they_are_about(tmp_path, mutable):
    """A truncation found deep in the parser knows an offset; the user also needs the file.
    A directory, a device and a missing file say what they are."""
    for src in ("firmware/pc-sequential.img", "firmware/pc-mapped-ram.img"):
        cut = mutable(fixture_path(src))
        with open(cut, "r+b") as f:
            f.truncate(1_000_000)
        for cmd in (["info"], ["ls"], ["export", "-q"], ["convert", "-q"]):
            extra = [str(tmp_path / f"out-{cmd[0]}")] if cmd[0] in ("export", "convert") else []
            r = ramfs(*cmd, str(cut), *extra)
            assert r.returncode == 2 and r.stderr.startswith(f"ramfs: error: {cut}: "), (cmd, r.stderr)
            assert len(r.stderr.splitlines()) == 1
    (tmp_path / "emptydir").mkdir()
    for path, says in ((tmp_path / "emptydir", "is a directory"), ("/dev/zero", "is a character device"),
                       (tmp_path / "missing.save", "No such file or directory")):
        r = ramfs("info", str(path))
        assert r.returncode == 2 and r.stderr.count(str(path)) == 1 and says in r.stderr, r.stderr
    # A bad option is about the option, not the file.
    r = ramfs("phys", "--below-4g", "2X", str(fixture_path("firmware/pc-sequential.img")), str(tmp_path / "p"))
    assert (r.returncode, r.stderr) == (2, "ramfs: error: not a size: '2X' (e.g. 2G, 3072M)\n")
