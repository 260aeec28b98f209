"""What the CLI does with what it does not own: outputs private to the caller (0600 from
creation), `ramfs umount` refuses anything but a ramfs mount, and names from an image (or any
printed path or message) cannot drive the terminal."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from fixture_data import fixture_path
from streams import PS, sequential_stream

from ramfs.cli import _show


def ramfs(*args: str, umask: int = -1) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, timeout=300,
                          umask=umask)


# --- 1. private outputs --------------------------------------------------------------------------

@pytest.mark.parametrize("command, image", [
    ("convert", "firmware/pc-sequential.img"),
    ("export", "firmware/pc-mapped-ram.img"),
    ("phys", "firmware/pc-mapped-ram.img"),
    ("core", "firmware/pc-mapped-ram.img"),
])
def test_outputs_are_created_0600_whatever_the_umask(tmp_path, command, image):
    out = tmp_path / f"{command}.out"
    r = ramfs(command, "-q", str(fixture_path(image)), str(out), umask=0o022)
    assert r.returncode == 0, r.stderr
    st = out.stat()
    assert st.st_mode & 0o777 == 0o600, oct(st.st_mode)
    assert st.st_uid == os.getuid()
    assert sorted(p.name for p in tmp_path.iterdir()) == [out.name]  # no temporary left


def test_convert_direct_io_reopens_the_temporary_not_its_name(tmp_path):
    out = tmp_path / "direct.save"
    r = ramfs("convert", "-q", "--direct-io", str(fixture_path("firmware/pc-sequential.img")), str(out),
              umask=0o022)
    if r.returncode != 0 and b"does not support O_DIRECT" in r.stderr:
        pytest.skip("no O_DIRECT on the test directory's file system")
    assert r.returncode == 0, r.stderr
    assert out.stat().st_mode & 0o777 == 0o600


def test_convert_direct_io_opens_proc_self_fd(tmp_path, monkeypatch):
    """The O_DIRECT descriptor is opened through /proc/self/fd/N of the first one, never by
    the temporary's name a second time."""
    from ramfs.convert import core

    opened: list[str] = []
    real_open = os.open

    def spy(path, flags, *a, **kw):
        if flags & (os.O_WRONLY | os.O_RDWR):
            opened.append(os.fspath(path))
        if flags & os.O_DIRECT:  # the file system of tmp_path may not have O_DIRECT: drop it
            flags &= ~os.O_DIRECT
        return real_open(path, flags, *a, **kw)

    monkeypatch.setattr(core.os, "open", spy)
    out = tmp_path / "direct.save"
    core.convert_file(str(fixture_path("firmware/pc-sequential.img")), str(out), direct_io=True)
    # for writing: the temporary created once by name, then reopened through its descriptor
    assert len(opened) == 2 and opened[0].endswith(".tmp"), opened
    assert opened[1].startswith("/proc/self/fd/"), opened
    assert out.stat().st_mode & 0o777 == 0o600


# --- 2. ramfs umount only unmounts ramfs ---------------------------------------------------------

@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a tmpfs needs root")
def test_umount_refuses_a_busy_tmpfs(tmp_path):
    mp = tmp_path / "not ramfs"  # a space: \040 in /proc/self/mountinfo
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(mp)], check=True, timeout=60)
    try:
        with open(mp / "busy", "w"):
            r = ramfs("umount", str(mp))
            assert r.returncode == 2, r
            err = r.stderr.decode()
            assert err.count("\n") == 1 and "Traceback" not in err, err
            assert "tmpfs" in err and "not a ramfs mount" in err and "not unmounted" in err, err
            assert os.path.ismount(mp)
        # nothing open any more: still refused
        r = ramfs("umount", str(mp))
        assert r.returncode == 2 and os.path.ismount(mp)
    finally:
        subprocess.run(["umount", str(mp)], timeout=60)
    assert not os.path.ismount(mp)


def test_umount_of_a_plain_directory_says_not_mounted(tmp_path):
    r = ramfs("umount", str(tmp_path))
    assert r.returncode == 2
    assert r.stderr.decode().strip() == f"ramfs: error: {tmp_path} is not mounted"


def test_mount_fstype_reads_mountinfo():
    from ramfs.fs.daemon import _mount_fstype
    from ramfs.fs.mountinfo import _unescape

    assert _unescape(rb"/a\040b\011c\134d") == b"/a b\tc\\d"
    assert _mount_fstype("/proc") == "proc"
    assert _mount_fstype("/proc/self") is None


# --- 3. names shown safely -----------------------------------------------------------------------

EVIL = "\x1b[31mred\x1b[0m\n"


@pytest.fixture
def evil_image(tmp_path) -> Path:
    stream = sequential_stream([(0, 0, b"\x55" * PS), (1, 1, b"\xaa" * PS)],
                               [("pc.ram", 4 * PS), (EVIL, 2 * PS)])
    path = tmp_path / "evil.img"
    path.write_bytes(stream)
    return path


@pytest.mark.parametrize("command", ["ls", "info"])
def test_control_characters_in_a_block_name_are_escaped(evil_image, command):
    r = ramfs(command, str(evil_image))
    assert r.returncode == 0, r.stderr
    out = r.stdout
    assert b"\x1b" not in out
    assert rb"\x1b[31mred\x1b[0m\n" in out
    line = next(ln for ln in out.split(b"\n") if b"red" in ln)
    assert line.endswith(rb"\x1b[0m\n") or rb"\x1b[0m\n " in line  # the newline stays inside the line


def test_info_json_keeps_the_exact_name(evil_image):
    r = ramfs("info", "--json", str(evil_image))
    assert r.returncode == 0, r.stderr
    assert EVIL in [b["idstr"] for b in json.loads(r.stdout)["blocks"]]


def test_paths_and_errors_are_escaped(tmp_path):
    bad = tmp_path / "x\x1b]0;pwned\x07\u202e.save"
    bad.write_bytes(b"not an image")
    for args in (("info", str(bad)), ("ls", str(bad)), ("check", str(bad)),
                 ("export", str(bad), str(tmp_path / "o\x1b"))):
        r = ramfs(*args)
        assert r.returncode != 0
        text = r.stdout + r.stderr
        assert b"\x1b" not in text and b"\x07" not in text and "\u202e".encode() not in text, (args, text)
        assert text.count(b"\n") == 1, (args, text)


def test_show_escapes_like_ls():
    assert _show("pc.ram") == "pc.ram"
    assert _show("\x1b\n\t\r\x00\x7f\x85") == r"\x1b\n\t\r\x00\x7f\x85"
    assert _show("a\u202eb\u2066c\u2069") == r"a\u202eb\u2066c\u2069"
    assert _show("back\\slash") == "back\\\\slash"  # a literal \x1b stays distinguishable
    assert _show(b"\xff\xfe".decode("utf-8", "surrogateescape")) == r"\xff\xfe"
    assert _show("été 日本") == "été 日本"
