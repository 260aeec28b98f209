"""Through a real kernel FUSE mount: every block of every fixture, directory mode, load, unmount."""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from conftest import sparse_copy
from fixture_data import MANIFEST, cache_dir, fixture_path
from mountutil import force_unmount, mounted, ramfs_cmd, wait_mounted
from ramfs.fs.names import escape
from ramfs.image import open_image

IMAGES = [e for e in MANIFEST if e["kind"] == "image"]


def file_sha(path, bs=1 << 20):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(bs):
            h.update(data)
    return h.hexdigest()


def block_path(root: Path, top: str, idstr: str) -> Path:
    comps, _ = escape(idstr)
    return root.joinpath(top, *[c.decode() for c in comps])


@pytest.fixture(scope="module")
def fixture_mounts(tmp_path_factory):
    """Directory-mode mounts of the extracted firmware/ and libvirt/ fixture folders."""
    base = tmp_path_factory.mktemp("mnt")
    root = cache_dir()
    with mounted(root / "firmware", base / "firmware"), mounted(root / "libvirt", base / "libvirt"):
        yield base


@pytest.mark.parametrize("entry", IMAGES, ids=[e["decompressed_path"] for e in IMAGES])
def test_every_block_file_through_the_mount(fixture_mounts, entry):
    folder, name = entry["decompressed_path"].split("/")
    d = fixture_mounts / folder / name
    with open_image(fixture_path(entry["decompressed_path"])) as img:
        for blk in img.blocks:
            f = block_path(d, "ram", blk.idstr)
            st = f.stat()
            assert st.st_size == blk.used_length
            assert st.st_blocks == blk.populated_pages * blk.page_size // 512
            assert st.st_blksize == 1 << 20 and st.st_mode & 0o777 == 0o444
            want = hashlib.sha256(img.read(blk, 0, blk.used_length)).hexdigest()
            assert file_sha(f) == want, blk.idstr
            maps = [tuple(map(int, ln.split())) for ln in block_path(d, "maps", blk.idstr).read_text().splitlines()]
            assert maps == list(blk.populated_ranges())
            assert sum(b - a for a, b in maps) == st.st_blocks * 512
        facts = json.loads((d / "image.json").read_text())
        assert [b["idstr"] for b in facts["blocks"]] == [b.idstr for b in img.blocks]
        devices = json.loads((d / "devices.json").read_text())
        assert devices["devices"][-1]["name"] == "globalstate"
        if img.libvirt:
            assert (d / "domain.xml").read_text() == img.domain_xml
            assert (d / "cookie.xml").read_text() == img.cookie_xml
        else:
            assert not (d / "domain.xml").exists()
    if entry.get("ground_truth"):
        assert file_sha(d / "ram" / "pc.ram") == file_sha(fixture_path(entry["ground_truth"]))


def test_mixed_unaligned_reads_match_ground_truth(fixture_mounts):
    rng = random.Random(11)
    truth = fixture_path("firmware/pc-pmemsave.bin").read_bytes()
    for name in ("pc-sequential.img", "pc-mapped-ram-directio.img"):
        with open(fixture_mounts / "firmware" / name / "ram" / "pc.ram", "rb", buffering=0) as f:
            fd = f.fileno()
            for _ in range(400):
                off = rng.randrange(len(truth) + 100)
                size = rng.choice([1, 3, 511, 4097, 65536 + 7, 1 << 20, (3 << 20) + 5])
                assert os.pread(fd, size, off) == truth[off:off + size], (name, off, size)


def test_directory_mode_shows_only_images(fixture_mounts):
    names = sorted(os.listdir(fixture_mounts / "firmware"))
    assert names == sorted(["convert"] + [e["decompressed_path"].split("/")[1] for e in IMAGES
                                          if e["decompressed_path"].startswith("firmware/")])
    assert "pc-pmemsave.bin" not in names


def test_sixteen_threads_random_reads(fixture_mounts):
    truth = fixture_path("libvirt/fw-pc-pmemsave.bin").read_bytes()
    files = [fixture_mounts / "libvirt" / n / "ram" / "pc.ram"
             for n in ("fw-pc-raw.img", "fw-pc-sparse.img", "fw-pc-zstd.img", "fw-pc-sparse-parallel4.img")]
    errors, counts = [], [0] * 16
    stop = time.monotonic() + 4

    def reader(i):
        rng = random.Random(i)
        fds = [os.open(f, os.O_RDONLY) for f in files]
        try:
            while time.monotonic() < stop:
                fd = rng.choice(fds)
                off = rng.randrange(len(truth))
                size = rng.choice([1, 100, 4096, 10000, 131072, 1 << 20])
                if os.pread(fd, size, off) != truth[off:off + size]:
                    errors.append((i, off, size))
                counts[i] += 1
        except OSError as e:
            errors.append((i, repr(e)))
        finally:
            for fd in fds:
                os.close(fd)

    threads = [threading.Thread(target=reader, args=(i,)) for i in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(counts) > 1000


# --- lifecycle -----------------------------------------------------------------------------------

def test_background_mount_and_umount(tmp_path):
    img = fixture_path("firmware/q35-mapped-ram.img")
    mp = tmp_path / "mp"
    mp.mkdir()
    r = subprocess.run([ramfs_cmd()[0], str(Path(__file__).parent.parent / "mount.py"), str(img), str(mp)],
                       capture_output=True, text=True, timeout=60)
    try:
        assert r.returncode == 0, r.stderr
        assert os.path.ismount(mp)
        line = next(ln for ln in open("/proc/mounts") if f" {mp} " in ln)
        assert line.split()[2] == "fuse.ramfs" and line.split()[0] == str(img.resolve())
        assert " ro," in f" {line.split()[3]},"
        assert subprocess.run(["grep", "-c", "RAMFS-FIXTURE-MARKER", str(mp / "ram" / "pc.ram")],
                              capture_output=True, text=True).stdout.strip() == "1"
        with pytest.raises(OSError):
            open(mp / "ram" / "pc.ram", "r+b")
        with pytest.raises(OSError):
            (mp / "new").write_text("x")
        r = subprocess.run(ramfs_cmd("umount", str(mp)), capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        assert not os.path.ismount(mp)
        daemons = subprocess.run(["pgrep", "-f", f"mount.py {img} {mp}"], capture_output=True, text=True)
        assert daemons.stdout.strip() == ""
    finally:
        force_unmount(mp)


def test_mount_errors_are_one_line(tmp_path, mutable):
    mp = tmp_path / "mp"
    mp.mkdir()
    bad = mutable(fixture_path("firmware/pc-sequential.img"))
    with open(bad, "r+b") as f:
        f.truncate(100000)
    for args in ([str(bad), str(mp)], [str(tmp_path / "missing.img"), str(mp)],
                 [str(fixture_path("firmware/pc-sequential.img")), str(tmp_path / "nodir")]):
        r = subprocess.run(ramfs_cmd("mount", *args), capture_output=True, text=True, timeout=60)
        assert r.returncode == 2, r
        assert "Traceback" not in r.stderr and len(r.stderr.strip().splitlines()) == 1
        assert r.stderr.startswith("ramfs: error:")
        assert not os.path.ismount(mp)
    r = subprocess.run(ramfs_cmd("mount", str(fixture_path("firmware/pc-sequential.img")), str(tmp_path / "nodir")),
                       capture_output=True, text=True, timeout=60)
    assert "does not exist (create it first: mkdir -p" in r.stderr  # what is wrong, what to do
    (tmp_path / "afile").write_text("x")
    r = subprocess.run(ramfs_cmd("mount", str(fixture_path("firmware/pc-sequential.img")), str(tmp_path / "afile")),
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and "is not a directory" in r.stderr


def test_a_non_empty_mountpoint_is_refused_unless_asked(tmp_path):
    mp = tmp_path / "busy"
    mp.mkdir()
    (mp / "notes.txt").write_text("still here")
    img = str(fixture_path("firmware/pc-sequential.img"))
    r = subprocess.run(ramfs_cmd("mount", img, str(mp)), capture_output=True, text=True, timeout=60)
    assert r.returncode == 2 and not os.path.ismount(mp)
    assert "is not empty" in r.stderr and "notes.txt" in r.stderr and "--nonempty" in r.stderr, r.stderr
    for extra in (["--nonempty"], ["-o", "nonempty"]):
        with mounted(fixture_path("firmware/pc-sequential.img"), mp, *extra):
            assert (mp / "ram" / "pc.ram").is_file() and not (mp / "notes.txt").exists()
        assert (mp / "notes.txt").read_text() == "still here"


def test_an_image_named_convert_is_said_not_shown(tmp_path):
    saves = tmp_path / "saves"
    saves.mkdir()
    shutil.copy(fixture_path("firmware/pc-sequential.img"), saves / "convert")
    shutil.copy(fixture_path("firmware/pc-sequential.img"), saves / "vm.save")
    mp = tmp_path / "mp"
    with mounted(saves, mp):
        assert sorted(p.name for p in mp.iterdir()) == ["convert", "vm.save"]
        assert (mp / "convert").is_dir() and not (mp / "convert" / "ram").exists()
    log = (tmp_path / "mp.log").read_text()
    assert f"{saves}/convert is not shown" in log and "rename the file" in log, log


def test_unmount_while_readers_are_active(tmp_path):
    img = fixture_path("libvirt/fw-pc-sparse.img")
    mp = tmp_path / "mp"
    mp.mkdir()
    log = tmp_path / "daemon.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(ramfs_cmd("mount", "-f", str(img), str(mp)), stdout=logf, stderr=subprocess.STDOUT)
    try:
        wait_mounted(mp, proc, log)
        stop = threading.Event()
        outcome = []

        def reader():
            try:
                with open(mp / "ram" / "pc.ram", "rb") as f:
                    while not stop.is_set():
                        f.seek(0)
                        while f.read(1 << 20):
                            pass
                outcome.append("done")
            except OSError as e:
                outcome.append(e.errno)

        threads = [threading.Thread(target=reader) for _ in range(4)]
        for t in threads:
            t.start()
        time.sleep(0.5)
        r = subprocess.run(ramfs_cmd("umount", "--timeout", "3", str(mp)), capture_output=True, text=True,
                           timeout=60)
        assert r.returncode == 0, r.stderr
        assert proc.wait(timeout=30) == 0
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not os.path.ismount(mp)
        assert len(outcome) == 4
        assert "Traceback" not in log.read_text()
    finally:
        force_unmount(mp)
        if proc.poll() is None:
            proc.kill()


def test_directory_mode_follows_the_backing_directory(tmp_path, mutable):
    backing = tmp_path / "saves"
    backing.mkdir()
    sparse_copy(fixture_path("firmware/pc-sequential.img"), backing / "a.save")
    sparse_copy(fixture_path("libvirt/fw-pc-sparse.img"), backing / "b.save")
    bad = backing / "broken.save"
    sparse_copy(fixture_path("firmware/q35-mapped-ram.img"), bad)
    with open(bad, "r+b") as f:
        f.truncate(5 << 20)
    (backing / "notes.txt").write_text("not an image")
    (backing / "sub").mkdir()
    os.symlink(fixture_path("firmware/q35-sequential.img"), backing / "link.save")
    mp = tmp_path / "mp"
    with mounted(backing, mp):
        assert sorted(os.listdir(mp)) == ["a.save", "b.save", "broken.save", "convert"]
        err = (mp / "broken.save" / "ERROR").read_text()
        assert "past the end of the file" in err or "ends" in err
        assert os.listdir(mp / "broken.save") == ["ERROR"]
        assert file_sha(mp / "a.save" / "ram" / "pc.ram") == file_sha(fixture_path("firmware/pc-pmemsave.bin"))
        # Added while mounted: appears without remounting.
        sparse_copy(fixture_path("firmware/q35-sequential.img"), backing / "c.save")
        deadline = time.monotonic() + 10
        while "c.save" not in os.listdir(mp):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        assert file_sha(mp / "c.save" / "ram" / "pc.ram") == file_sha(fixture_path("firmware/q35-pmemsave.bin"))
        os.unlink(backing / "a.save")
        deadline = time.monotonic() + 10
        while "a.save" in os.listdir(mp):
            assert time.monotonic() < deadline
            time.sleep(0.2)
        # The kernel drops its cached entry asynchronously (and at most 1 s later anyway).
        while (mp / "a.save").exists():
            assert time.monotonic() < deadline
            time.sleep(0.1)
        # The broken image did not take the others down.
        assert (mp / "b.save" / "domain.xml").read_text().startswith("<domain")


def test_direct_io_mount_leaves_the_page_cache_alone(tmp_path):
    """--direct-io: correct bytes, and the image's pages are not pulled into the host cache."""
    from pagecache import drop_cache, fs_type, resident_pages
    import tempfile
    assert fs_type("/var/tmp") not in ("tmpfs", "ramfs"), "need /var/tmp on a disk file system"
    scratch = Path(tempfile.mkdtemp(prefix="ramfs-dio-", dir="/var/tmp"))
    try:
        results = {}
        for mode in ("--direct-io", None):
            img = sparse_copy(fixture_path("libvirt/fw-pc-sparse.img"), scratch / f"img{bool(mode)}.save")
            drop_cache(img)
            assert resident_pages(img)[0] <= 2
            mp = tmp_path / f"mp{bool(mode)}"
            with mounted(img, mp, *([mode] if mode else [])):
                got = file_sha(mp / "ram" / "pc.ram")
                assert got == file_sha(fixture_path("libvirt/fw-pc-pmemsave.bin"))
                results[mode] = resident_pages(img)[0]
        # Control: a buffered mount caches the populated pages (about 340 of them) ...
        assert results[None] >= 300
        # ... a direct one leaves (almost) none: the header and metadata reads are O_DIRECT too.
        assert results["--direct-io"] <= 8, results
    finally:
        shutil.rmtree(scratch, ignore_errors=True)
