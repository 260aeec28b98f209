"""The cache as an admin meets it: ramfs cache list/clean/path, ramfs index, --cache-dir,
--no-cache, --rebuild-cache, --keep-cache, the size limit, permissions (issue #19)."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

import pytest

from fixture_data import fixture_path
from mountutil import mounted
from ramfs.cli import split_mount_options
from ramfs.image import open_image
from ramfs.image.cache import CachePolicy

MARKER = b"RAMFS-FIXTURE-MARKER"


def ramfs(*args: str, env: dict | None = None, umask: int | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, text=True, timeout=300,
                          env=env, preexec_fn=(lambda: os.umask(umask)) if umask is not None else None)


def listing(cache: Path) -> dict:
    r = ramfs("cache", "list", "--json", "--cache-dir", str(cache))
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def by_image(cache: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for e in listing(cache)["entries"]:
        out.setdefault(Path(e["image"]).name, []).append(e)
    return out


def files_under(d: Path) -> list[Path]:
    return sorted(p for p in d.rglob("*")) if d.exists() else []


@pytest.fixture
def images(tmp_path, mutable):
    """Copies (their own keys) of a sequential, a compressed and a mapped-ram image."""
    return {
        "seq": mutable(fixture_path("firmware/pc-sequential.img"), "seq.img"),
        "xz": mutable(fixture_path("libvirt/fw-pc-xz.img"), "xz.img"),
        "sparse": mutable(fixture_path("libvirt/fw-pc-sparse.img"), "sparse.img"),
    }


def test_list_shows_what_mounts_created(tmp_path, images):
    cache = tmp_path / "cache"
    with mounted(images["seq"], tmp_path / "m1", "--cache-dir", str(cache)):
        pass
    with mounted(images["xz"], tmp_path / "m2", "-o", f"cache_dir={cache}") as _:
        assert MARKER in (tmp_path / "m2" / "ram" / "pc.ram").read_bytes()
        during = by_image(cache)
        assert [e["kind"] for e in during["xz.img"]] == ["decompressed"]
        d = during["xz.img"][0]
        assert d["in_use"] and not d["keep"] and d["image_state"] == "ok"
        assert d["image"] == str(images["xz"].resolve())
        assert [e["kind"] for e in during["seq.img"]] == ["index"]
        # A clean while the mount reads the stream leaves it alone.
        r = ramfs("cache", "clean", "--cache-dir", str(cache))
        assert r.returncode == 0 and "in use by a mount, left alone" in r.stdout, r.stdout
        assert MARKER in (tmp_path / "m2" / "ram" / "pc.ram").read_bytes()
        assert "xz.img" in by_image(cache)
    after = by_image(cache)
    assert list(after) == []  # the clean took the index; the stream went at unmount
    with mounted(images["seq"], tmp_path / "m1", "--cache-dir", str(cache)):
        pass
    e = by_image(cache)["seq.img"][0]
    assert e["kind"] == "index" and e["image_state"] == "ok" and e["bytes"] > 0 and not e["in_use"]
    assert e["last_used"] >= e["created"] > 0
    text = ramfs("cache", "list", "--cache-dir", str(cache)).stdout
    assert "index" in text and str(images["seq"].resolve()) in text and "1 entry," in text
    # The image changes, then goes: the entry says so.
    os.utime(images["seq"], ns=(0, 10**9))
    assert by_image(cache)["seq.img"][0]["image_state"] == "changed"
    images["seq"].unlink()
    assert by_image(cache)["seq.img"][0]["image_state"] == "missing"


def test_decompressed_memory_is_removed_at_unmount_unless_kept(tmp_path, images):
    cache = tmp_path / "cache"
    mp = tmp_path / "mp"
    with mounted(images["xz"], mp, "--cache-dir", str(cache)):
        streams = list((cache / "data").glob("*.stream"))
        assert len(streams) == 1
        assert stat.S_IMODE(streams[0].stat().st_mode) == 0o600
        assert MARKER in (mp / "ram" / "pc.ram").read_bytes()
    assert list((cache / "data").iterdir()) == []
    with mounted(images["xz"], mp, "-o", f"keep_cache,cache_dir={cache}"):
        assert MARKER in (mp / "ram" / "pc.ram").read_bytes()
    kept = by_image(cache)["xz.img"]
    assert [e["kind"] for e in kept] == ["decompressed"] and kept[0]["keep"]
    # Kept: the next mount reads it without decompressing, and leaves it.
    with mounted(images["xz"], mp, "--cache-dir", str(cache)):
        assert MARKER in (mp / "ram" / "pc.ram").read_bytes()
    assert by_image(cache)["xz.img"][0]["key"] == kept[0]["key"]


def test_directory_mount_removes_decompressed_memory_at_unmount(tmp_path, images):
    cache = tmp_path / "cache"
    backing = tmp_path / "saves"
    backing.mkdir()
    for name in ("xz", "seq"):
        images[name].rename(backing / images[name].name)
    mp = tmp_path / "mp"
    with mounted(backing, mp, "--cache-dir", str(cache)):
        for name in ("xz.img", "seq.img"):
            assert MARKER in (mp / name / "ram" / "pc.ram").read_bytes()
        assert {e["kind"] for e in listing(cache)["entries"]} == {"index", "decompressed"}
    assert [e["kind"] for e in listing(cache)["entries"]] == ["index"]


def test_no_cache_writes_nothing(tmp_path, images):
    cache = tmp_path / "cache"
    cache.mkdir()
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    env = {**os.environ, "RAMFS_CACHE_DIR": str(tmp_path / "nowhere"), "TMPDIR": str(tmp)}
    for img in (images["seq"], images["xz"]):
        mp = tmp_path / f"mp-{img.stem}"
        with mounted(img, mp, "--no-cache", "--cache-max", "1M", env=env):
            assert MARKER in (mp / "ram" / "pc.ram").read_bytes()
            assert files_under(tmp) == []
        with mounted(img, mp, "--cache-dir", str(cache), "-o", "no_cache"):
            assert MARKER in (mp / "ram" / "pc.ram").read_bytes()
        for cmd in (["info"], ["ls"], ["phys"], ["export"]):
            out = [str(tmp_path / f"out-{cmd[0]}-{img.stem}")] if cmd[0] in ("phys", "export") else []
            r = ramfs(*cmd, "--no-cache", str(img), *out, env=env)
            assert r.returncode == 0, r.stderr
    assert files_under(cache) == []
    assert files_under(tmp) == []
    assert not (tmp_path / "nowhere").exists()
    r = ramfs("export", "--no-cache", "--keep-cache", str(images["xz"]), str(tmp_path / "out"))
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and "--no-cache" in r.stderr


def test_cache_files_are_0600_in_0700_directories(tmp_path, images):
    """Created so, whatever the umask (not chmod-ed afterwards), parents included."""
    cache = tmp_path / "a" / "b" / "cache"
    r = ramfs("index", "--cache-dir", str(cache), str(images["seq"]), str(images["xz"]), umask=0)
    assert r.returncode == 0, r.stderr
    made = [tmp_path / "a", tmp_path / "a" / "b", *[cache, *files_under(cache)]]
    assert len(made) >= 3 + 1 + 2 + 2 + 3
    for p in made:
        want = 0o700 if p.is_dir() else 0o600
        assert stat.S_IMODE(p.stat().st_mode) == want, (p, oct(p.stat().st_mode))
    assert (cache / "CACHEDIR.TAG").read_bytes().startswith(b"Signature: 8a477f597d28d172789f06886806bc55")


def test_index_builds_ahead_of_mounting(tmp_path, images):
    cache = tmp_path / "cache"
    junk = tmp_path / "junk.img"
    junk.write_bytes(b"not an image")
    r = ramfs("index", "--cache-dir", str(cache), str(images["seq"]), str(junk), str(images["xz"]),
              str(images["sparse"]))
    assert r.returncode == 2  # the junk; the others are built all the same
    assert r.stderr.count("\n") == 1 and "junk.img" in r.stderr and "not a save image" in r.stderr
    lines = r.stdout.splitlines()
    assert [ln.split(":")[0] for ln in lines] == [str(images[k]) for k in ("seq", "xz", "sparse")]
    assert "indexed, 383 populated pages" in lines[0]
    assert "decompressed (xz)" in lines[1] and "mapped-ram: nothing to build" in lines[2]
    kinds = {name: [e["kind"] for e in es] for name, es in by_image(cache).items()}
    assert kinds == {"seq.img": ["index"], "xz.img": ["decompressed"]}
    assert all(e["keep"] for e in listing(cache)["entries"])
    again = ramfs("index", "--cache-dir", str(cache), str(images["seq"]), str(images["xz"]))
    assert again.returncode == 0 and again.stdout.count("(already in the cache)") == 2
    with open_image(images["seq"], cache=cache) as img:
        assert img.index_from_cache
    with open_image(images["xz"], cache=cache) as img:
        assert img.index_from_cache
    mp = tmp_path / "mp"
    with mounted(images["xz"], mp, "--cache-dir", str(cache)):  # uses it; does not remove it
        assert MARKER in (mp / "ram" / "pc.ram").read_bytes()
    assert "xz.img" in by_image(cache)


def test_rebuild_cache_replaces_the_entries_of_the_images_named(tmp_path, images):
    cache = tmp_path / "cache"
    assert ramfs("index", "--cache-dir", str(cache), str(images["seq"]), str(images["xz"])).returncode == 0
    before = {e["key"]: Path(e["files"][0]).stat().st_ino for e in listing(cache)["entries"]}
    r = ramfs("index", "--rebuild-cache", "--cache-dir", str(cache), str(images["xz"]))
    assert r.returncode == 0 and "already" not in r.stdout
    after = {e["key"]: Path(e["files"][0]).stat().st_ino for e in listing(cache)["entries"]}
    assert before.keys() == after.keys()
    changed = [k for k in before if before[k] != after[k]]
    assert len(changed) == 1  # the stream of xz.img, not seq.img's index
    with open_image(images["xz"], cache=CachePolicy(cache, rebuild=True)) as img:
        assert not img.index_from_cache and MARKER in img.read("pc.ram", 0, img.block("pc.ram").used_length)
    mp = tmp_path / "mp"
    with mounted(images["seq"], mp, "--cache-dir", str(cache), "--rebuild-cache"):
        assert MARKER in (mp / "ram" / "pc.ram").read_bytes()


def compressed_copies(tmp_path, n: int) -> list[Path]:
    src = fixture_path("libvirt/fw-pc-gzip.img")
    out = []
    for i in range(n):
        p = tmp_path / f"vm{i}.img"
        p.write_bytes(src.read_bytes())
        out.append(p)
    return out


def age(cache: Path, image: Path, seconds_ago: float) -> None:
    """Make an entry look last used ``seconds_ago`` (its metadata's mtime)."""
    import time
    for e in listing(cache)["entries"]:
        if e["image"] == str(image.resolve()):
            meta = next(f for f in e["files"] if f.endswith(".json"))
            t = time.time() - seconds_ago
            os.utime(meta, (t, t))


def test_size_limit_evicts_least_recently_used_and_never_what_is_in_use(tmp_path):
    cache = tmp_path / "cache"
    vms = compressed_copies(tmp_path, 5)
    assert ramfs("index", "--cache-dir", str(cache), *map(str, vms[:3])).returncode == 0
    sizes = {e["image"]: e["bytes"] for e in listing(cache)["entries"]}
    assert len(sizes) == 3
    one = max(sizes.values())
    for i, ago in enumerate((300, 100, 200)):  # vm0 least recently used, then vm2, then vm1
        age(cache, vms[i], ago)
    # Room for three: adding vm3 evicts the least recently used, vm0.
    limit = str(3 * one + one // 2)
    r = ramfs("index", "--cache-dir", str(cache), "--cache-max", limit, str(vms[3]))
    assert r.returncode == 0, r.stderr
    assert sorted(by_image(cache)) == ["vm1.img", "vm2.img", "vm3.img"]
    # The same from the environment, and a mount's use counts as use: vm2 is read, so vm1 goes.
    age(cache, vms[3], 50)
    mp = tmp_path / "mp"
    with mounted(vms[2], mp, "--cache-dir", str(cache)):
        pass
    env = {**os.environ, "RAMFS_CACHE_MAX": limit}
    assert ramfs("index", "--cache-dir", str(cache), str(vms[4]), env=env).returncode == 0
    assert sorted(by_image(cache)) == ["vm2.img", "vm3.img", "vm4.img"]
    # An entry a reader holds is never evicted, even with a limit of 0; the new one stays too.
    with open_image(vms[2], cache=cache) as held:
        r = ramfs("index", "--cache-dir", str(cache), "--cache-max", "0", str(vms[0]))
        assert r.returncode == 0, r.stderr
        assert sorted(by_image(cache)) == ["vm0.img", "vm2.img"]
        assert MARKER in held.read("pc.ram", 0, held.block("pc.ram").used_length)
    text = ramfs("cache", "list", "--cache-dir", str(cache), "--cache-max", "3M").stdout
    assert "of at most 3 MiB (3M)" in text


def test_clean_removes_only_ramfs_files(tmp_path, images):
    cache = tmp_path / "cache"
    assert ramfs("index", "--cache-dir", str(cache), str(images["seq"]), str(images["xz"])).returncode == 0
    mine = [cache / "notes.txt", cache / "index" / "README", cache / "data" / "vm.stream",
            cache / "data" / "0123456789abcdef0123456789abcdeg.idx"]
    for p in mine:
        p.write_text("mine")
    (cache / "sub").mkdir()
    (cache / "sub" / "0123456789abcdef0123456789abcdef.idx").write_text("mine")
    dead = cache / "index" / ".0123456789abcdef0123456789abcdef.idx.tmp-999999999"  # no such pid
    live = cache / "data" / f".0123456789abcdef0123456789abcdef.stream.tmp-{os.getpid()}"
    orphan_meta = cache / "index" / "0123456789abcdef0123456789abcdef.json"
    for p in (dead, live, orphan_meta):
        p.write_text("{}")
    # --older-than: only what was last used before then.
    age(cache, images["seq"], 8 * 86400)
    r = ramfs("cache", "clean", "--older-than", "7d", "--cache-dir", str(cache))
    assert r.returncode == 0 and "removed 1 entry" in r.stdout, r.stdout
    assert sorted(by_image(cache)) == ["xz.img"]
    # --stale: only entries whose image is gone or changed.
    r = ramfs("cache", "clean", "--stale", "--cache-dir", str(cache))
    assert "removed 0 entries" in r.stdout and sorted(by_image(cache)) == ["xz.img"]
    images["xz"].unlink()
    r = ramfs("cache", "clean", "--stale", "-n", "--cache-dir", str(cache))
    assert "would remove: decompressed" in r.stdout and sorted(by_image(cache)) == ["xz.img"]
    r = ramfs("cache", "clean", "--stale", "--cache-dir", str(cache))
    assert "removed 1 entry" in r.stdout and listing(cache)["entries"] == []
    assert not dead.exists() and not orphan_meta.exists() and live.exists()
    for p in mine:
        assert p.read_text() == "mine", p
    assert (cache / "sub" / "0123456789abcdef0123456789abcdef.idx").exists()
    assert (cache / "CACHEDIR.TAG").exists()


def test_clean_refuses_a_directory_that_is_not_a_ramfs_cache(tmp_path):
    home = tmp_path / "home"
    (home / "index").mkdir(parents=True)
    keep = [home / "index" / "0123456789abcdef0123456789abcdef.idx", home / "index" / "thesis.tex"]
    for p in keep:
        p.write_text("mine")
    r = ramfs("cache", "clean", "--cache-dir", str(home))
    assert r.returncode == 2 and "does not look like a ramfs cache" in r.stderr and r.stderr.count("\n") == 1
    assert all(p.exists() for p in keep)
    # A cache from before the tag (index/ and data/ with only ramfs's names) is still ours.
    (home / "index" / "thesis.tex").unlink()
    r = ramfs("cache", "clean", "--cache-dir", str(home))
    assert r.returncode == 0, r.stderr
    assert not keep[0].exists()
    assert ramfs("cache", "clean", "--cache-dir", str(tmp_path / "none")).returncode == 0


def test_cache_path_and_where_it_comes_from(tmp_path):
    env = {**os.environ, "RAMFS_CACHE_DIR": str(tmp_path / "env")}
    assert ramfs("cache", "path", env=env).stdout == f"{tmp_path / 'env'}\n"
    assert ramfs("cache", "path", "--cache-dir", str(tmp_path / "x"), env=env).stdout == f"{tmp_path / 'x'}\n"
    assert ramfs("cache", "path", "--user", "ramfs").stdout == "/var/cache/ramfs/user-ramfs\n"
    env = {k: v for k, v in os.environ.items() if k != "RAMFS_CACHE_DIR"}
    env["XDG_CACHE_HOME"] = str(tmp_path / "xdg")
    assert ramfs("cache", "path", env=env).stdout == f"{tmp_path / 'xdg' / 'ramfs'}\n"
    r = ramfs("cache", "list", "--cache-dir", str(tmp_path / "nothing"))
    assert r.returncode == 0 and "no cache yet" in r.stdout
    assert not (tmp_path / "nothing").exists()


def test_cache_options_of_mount_o():
    fuse, own = split_mount_options(["ro,cache_dir=/srv/c,cache_max=20G,keep_cache,no_cache,rebuild_cache"])
    assert fuse == ["ro"]
    assert own == {"cache_dir": "/srv/c", "cache_max": "20G", "keep_cache": True, "no_cache": True,
                   "rebuild_cache": True}
    for bad in ("--cache-max=lots", "--cache-max=200%"):
        r = ramfs("phys", bad, "/nonexistent", "/nonexistent-out")
        assert r.returncode == 2 and "cache" not in r.stdout and r.stderr.count("\n") == 1, r.stderr
    r = ramfs("cache", "clean", "--older-than", "soon")
    assert r.returncode == 2 and "not an age" in r.stderr


def test_user_mount_caches_as_that_user_and_removes_the_copy_at_unmount(tmp_path, images):
    """--user nobody: the worker decompresses into /var/cache/ramfs/user-nobody (0700, nobody's),
    ramfs cache list --user shows the copy in use, and it is gone after the unmount."""
    import pwd
    nobody = pwd.getpwnam("nobody")
    mp = tmp_path / "mp"
    key = None
    with mounted(images["xz"], mp, "--user", "nobody"):
        assert MARKER in (mp / "ram" / "pc.ram").read_bytes()
        r = ramfs("cache", "list", "--json", "--user", "nobody")
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["cache_dir"] == "/var/cache/ramfs/user-nobody"
        mine = [e for e in doc["entries"] if e["image"] == str(images["xz"].resolve())]
        assert len(mine) == 1 and mine[0]["in_use"] and mine[0]["kind"] == "decompressed"
        key = mine[0]["key"]
        d = Path(doc["cache_dir"])
        st = d.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (nobody.pw_uid, 0o700)
        for f in mine[0]["files"]:
            fst = Path(f).stat()
            assert (fst.st_uid, stat.S_IMODE(fst.st_mode)) == (nobody.pw_uid, 0o600), f
    assert not list(Path("/var/cache/ramfs/user-nobody/data").glob(f"{key}.*"))
