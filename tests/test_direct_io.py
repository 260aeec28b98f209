"""DirectFileSource: O_DIRECT reads that match FileSource byte for byte and leave the host
page cache alone."""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import inspect
import mmap
import os
import random
import shutil
import subprocess
import tempfile
import threading
from pathlib import Path

import pytest

from pagecache import drop_cache, fs_type, resident_pages
from ramfs.errors import ImageIOError
from ramfs.image import files as files_mod
from ramfs.image.files import DIRECT_ALIGN, DIRECT_WINDOW, DirectFileSource, FileSource

ODD_SIZE = 3 * 1048576 + 1234
PAGE = mmap.PAGESIZE


@pytest.fixture(scope="module")
def disk_dir():
    """A scratch directory on a disk file system (``/var/tmp``; ``/tmp`` may be tmpfs)."""
    base = "/var/tmp"
    if not os.path.isdir(base) or fs_type(base) in ("tmpfs", "ramfs", "unknown"):
        pytest.skip(f"{base} is not on a disk file system ({fs_type(base)})")
    d = tempfile.mkdtemp(prefix="ramfs-direct-io-", dir=base)
    try:
        yield Path(d)
    finally:
        shutil.rmtree(d, ignore_errors=True)


def make_file(directory: Path, name: str, size: int, seed: int = 1) -> tuple[Path, bytes]:
    data = random.Random(seed).randbytes(size)
    p = directory / name
    with open(p, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    return p, data


@pytest.fixture(scope="module")
def odd_file(disk_dir):
    return make_file(disk_dir, "odd.bin", ODD_SIZE)


def edge_cases(size: int) -> list[tuple[int, int]]:
    a = DIRECT_ALIGN
    cases = [(0, 0), (0, 1), (0, size), (0, size + 12345), (1, size), (size - 1, 1),
             (size - 1, 100), (max(0, size - 10), 10), (max(0, size - 5000), 4999),
             (size, 1), (size, 0), (size + 1, 10), (size + 10 * a, a), (0, -1), (5, -7),
             (a - 1, 2), (a, a), (a - 1, a + 2), (a + 1, a - 2), (3 * a, 0),
             (1, DIRECT_WINDOW), (a - 1, DIRECT_WINDOW + 2), (7, 2 * DIRECT_WINDOW + 3)]
    tail_block = size & ~(a - 1)
    cases += [(tail_block, a), (tail_block - 1, 2), (tail_block, size - tail_block),
              (max(0, tail_block - a), 2 * a)]
    return [(max(0, o), s) for o, s in cases]


def random_cases(size: int, n: int, seed: int) -> list[tuple[int, int]]:
    rnd = random.Random(seed)
    out = []
    for _ in range(n):
        kind = rnd.random()
        if kind < 0.4:
            s = rnd.randint(1, 64)
        elif kind < 0.8:
            s = rnd.randint(1, 1 << 20)
        else:
            s = rnd.randint(1 << 20, 5 << 20)
        o = rnd.randint(0, size + 8192)
        if rnd.random() < 0.2:
            o &= ~(DIRECT_ALIGN - 1)
        out.append((o, s))
    return out


# -- byte equality -------------------------------------------------------------------------

def test_interface_matches_filesource(odd_file):
    path, data = odd_file
    with FileSource(path) as fs, DirectFileSource(path) as ds:
        assert ds.path == fs.path == os.fspath(path)
        assert ds.size == fs.size == len(data)
        assert (ds.stat.st_ino, ds.stat.st_size, ds.stat.st_mtime_ns) == \
               (fs.stat.st_ino, fs.stat.st_size, fs.stat.st_mtime_ns)
        for name in ("read_at", "readinto_at", "close", "__enter__", "__exit__"):
            assert callable(getattr(ds, name))
        flags = files_mod.os.O_DIRECT
        import fcntl
        assert fcntl.fcntl(ds.fd, fcntl.F_GETFL) & flags
    assert ds.fd == -1
    ds.close()  # idempotent


def test_read_at_matches_filesource(odd_file):
    path, data = odd_file
    cases = edge_cases(len(data)) + random_cases(len(data), 400, seed=7)
    with FileSource(path) as fs, DirectFileSource(path) as ds:
        for off, size in cases:
            want = fs.read_at(off, size)
            got = ds.read_at(off, size)
            assert type(got) is bytes
            assert got == want, (off, size)
            assert want == data[off : off + max(0, size)]


def test_read_at_sequential_and_overlapping(odd_file):
    """Cursor-like access: 1 MiB chunks that overlap the previous one, tiny header reads."""
    path, data = odd_file
    with DirectFileSource(path) as ds:
        pos = 3
        while pos < len(data):
            assert ds.read_at(pos, 1 << 20) == data[pos : pos + (1 << 20)]
            for k in range(0, 64, 8):
                assert ds.read_at(pos + k, 8) == data[pos + k : pos + k + 8]
            pos += (1 << 20) - 4093
        # Backwards, crossing window boundaries.
        for pos in range(len(data) - 1, 0, -(DIRECT_WINDOW // 3 + 17)):
            assert ds.read_at(pos - 5000, 5001) == data[pos - 5000 : pos + 1]


@pytest.mark.parametrize("size", [1, 100, DIRECT_ALIGN - 1, DIRECT_ALIGN, DIRECT_ALIGN + 1,
                                  2 * DIRECT_ALIGN, DIRECT_WINDOW, DIRECT_WINDOW + 1,
                                  DIRECT_WINDOW - 1])
def test_file_sizes(disk_dir, size):
    path, data = make_file(disk_dir, f"size-{size}.bin", size, seed=size)
    try:
        with FileSource(path) as fs, DirectFileSource(path) as ds:
            for off, n in edge_cases(size) + random_cases(size, 40, seed=size):
                assert ds.read_at(off, n) == fs.read_at(off, n), (off, n)
            buf = bytearray(size)
            ds.readinto_at(memoryview(buf), 0)
            assert buf == data
            with pytest.raises(ImageIOError) as ei:
                ds.readinto_at(memoryview(bytearray(size + 1)), 0)
            assert ei.value.errno == errno.EIO
    finally:
        path.unlink()


def test_empty_file(disk_dir):
    p = disk_dir / "empty.bin"
    p.write_bytes(b"")
    with DirectFileSource(p) as ds:
        assert ds.size == 0
        assert ds.read_at(0, 10) == b""
        ds.readinto_at(memoryview(bytearray()), 0)
        with pytest.raises(ImageIOError):
            ds.readinto_at(memoryview(bytearray(1)), 0)


def test_readinto_at_matches(odd_file):
    path, data = odd_file
    size = len(data)
    cases = [(o, s) for o, s in edge_cases(size) + random_cases(size, 300, seed=11)
             if s > 0 and o + s <= size]
    rnd = random.Random(3)
    with FileSource(path) as fs, DirectFileSource(path) as ds:
        for off, n in cases:
            # Destinations at arbitrary (unaligned) addresses inside a larger buffer.
            pad = rnd.randint(0, 4100)
            a = bytearray(b"\xaa" * (n + 2 * pad))
            b = bytearray(a)
            fs.readinto_at(memoryview(a)[pad : pad + n], off)
            ds.readinto_at(memoryview(b)[pad : pad + n], off)
            assert a == b, (off, n)
            assert b[pad : pad + n] == data[off : off + n]
            assert b[:pad] == b"\xaa" * pad and b[pad + n :] == b"\xaa" * pad
        # Also a plain bytearray and an mmap as destinations.
        whole = bytearray(size)
        ds.readinto_at(whole, 0)
        assert whole == data
        m = mmap.mmap(-1, 3 * PAGE)
        ds.readinto_at(memoryview(m), 12345)
        assert m[:] == data[12345 : 12345 + 3 * PAGE]
        m.close()


def test_readinto_at_past_eof_raises(odd_file):
    path, data = odd_file
    size = len(data)
    with FileSource(path) as fs, DirectFileSource(path) as ds:
        for off, n in [(size - 1, 2), (size, 1), (size + 4096, 1), (size - 5000, 5001), (0, size + 1),
                       (size & ~(DIRECT_ALIGN - 1), DIRECT_ALIGN)]:
            messages = []
            for src in (fs, ds):
                with pytest.raises(ImageIOError) as ei:
                    src.readinto_at(memoryview(bytearray(n)), off)
                assert ei.value.errno == errno.EIO
                messages.append(str(ei.value))
            assert messages[0] == messages[1]
            assert f"ends at {max(size, off):#x}" in messages[1]


def test_negative_offset(odd_file):
    path, _ = odd_file
    with DirectFileSource(path) as ds:
        with pytest.raises(ImageIOError):
            ds.read_at(-1, 10)
        with pytest.raises(ImageIOError):
            ds.readinto_at(memoryview(bytearray(10)), -1)


def test_buffers_bounded_and_reused(odd_file):
    path, data = odd_file
    with DirectFileSource(path) as ds:
        assert ds.read_at(1, len(data)) == data[1:]
        buf = ds._tls.buf
        assert len(buf) <= DIRECT_WINDOW
        # Steady state: the same buffer serves later reads of any size.
        for off, n in random_cases(len(data), 50, seed=5):
            ds.read_at(off, n)
            assert ds._tls.buf is buf
        # The buffer is page-aligned (O_DIRECT needs it for the address).
        addr = ctypes.addressof(ctypes.c_char.from_buffer(buf))
        assert addr % DIRECT_ALIGN == 0


class CountingPreadv:
    def __init__(self, monkeypatch):
        self.calls: list[tuple[int, int]] = []  # (offset, length)
        self.real = os.preadv
        monkeypatch.setattr(files_mod.os, "preadv", self)

    def __call__(self, fd, buffers, offset, *a):
        self.calls.append((offset, sum(len(b) for b in buffers)))
        return self.real(fd, buffers, offset, *a)


def test_io_sizes(odd_file, monkeypatch):
    """Random reads fetch only their own blocks; reads inside the held window cost no I/O;
    sequential reads read ahead up to the window limit."""
    path, data = odd_file
    a = DIRECT_ALIGN
    with DirectFileSource(path) as ds:
        io = CountingPreadv(monkeypatch)
        # Random small reads: one aligned request each, covering just the blocks touched.
        rnd = random.Random(2)
        for _ in range(50):
            off = rnd.randrange(0, len(data) - 10000)
            n = rnd.randint(1, 9000)
            io.calls.clear()
            assert ds.read_at(off, n) == data[off : off + n]
            lo, hi = off & ~(a - 1), (off + n + a - 1) & ~(a - 1)
            if io.calls:  # none when the previous window happened to hold it
                assert io.calls == [(lo, hi - lo)]
        # Inside the window just read: no I/O.
        io.calls.clear()
        ds.read_at(100 * a + 5, 3 * a)
        assert len(io.calls) == 1
        ds.read_at(100 * a + 7, 8)
        ds.read_at(101 * a, a)
        assert len(io.calls) == 1
        # Sequential 4 KiB reads: windows double up to the limit.
        io.calls.clear()
        buf = bytearray(4096)
        for off in range(0, len(data) - 4096, 4096):
            ds.readinto_at(memoryview(buf), off)
            assert buf == data[off : off + 4096]
        sizes = [n for _, n in io.calls]
        assert len(io.calls) <= 12, sizes           # 768 reads: 4 KiB, 8 KiB, ... doubling
        assert max(sizes) >= 1 << 20 and max(sizes) <= DIRECT_WINDOW
        assert sum(sizes) <= (len(data) + a - 1) & ~(a - 1)  # nothing read twice or past the end
        # A long sequential run reaches the window limit and stays there.
        big, _ = make_file(path.parent, "seq.bin", 5 * DIRECT_WINDOW, seed=8)
        with DirectFileSource(big) as ds2:
            io.calls.clear()
            for off in range(0, 5 * DIRECT_WINDOW, 65536):
                ds2.readinto_at(memoryview(bytearray(65536)), off)
            assert max(n for _, n in io.calls) == DIRECT_WINDOW
            assert len(io.calls) <= 12
        big.unlink()
        assert all(o % a == 0 and n % a == 0 for o, n in io.calls)


def test_fd_argument(odd_file):
    path, data = odd_file
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    with DirectFileSource(path, fd=fd) as ds:
        assert ds.fd == fd
        assert ds.read_at(777, 100000) == data[777:100777]
    with pytest.raises(OSError):
        os.fstat(fd)  # taken over and closed, as with FileSource


# -- threads -------------------------------------------------------------------------------

def test_concurrent_reads(odd_file):
    path, data = odd_file
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def worker(seed):
        try:
            start.wait()
            rnd = random.Random(seed)
            for off, n in random_cases(len(data), 150, seed=seed):
                if rnd.random() < 0.5:
                    assert ds.read_at(off, n) == data[off : off + n], (off, n)
                else:
                    n = max(1, min(n, len(data) - off))
                    if off + n > len(data):
                        continue
                    buf = bytearray(n)
                    ds.readinto_at(memoryview(buf), off)
                    assert buf == data[off : off + n], (off, n)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    with DirectFileSource(path) as ds:
        threads = [threading.Thread(target=worker, args=(100 + i,)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert not errors, errors[0]


# -- refusal -------------------------------------------------------------------------------

def test_tmpfs_refusal():
    """/dev/shm is tmpfs. Kernels before 6.6 refuse O_DIRECT there (EINVAL); newer ones
    accept it (tmpfs gained "trivial" direct I/O support), and then the data must be right."""
    if not os.path.isdir("/dev/shm") or fs_type("/dev/shm") != "tmpfs":
        pytest.skip("no tmpfs at /dev/shm")
    fd, name = tempfile.mkstemp(prefix="ramfs-direct-io-", dir="/dev/shm")
    data = random.Random(9).randbytes(10000)
    try:
        os.write(fd, data)
        os.close(fd)
        try:
            probe = os.open(name, os.O_RDONLY | os.O_DIRECT)
        except OSError as e:
            assert e.errno == errno.EINVAL
            with pytest.raises(ImageIOError) as ei:
                DirectFileSource(name)
            assert ei.value.errno == errno.EINVAL
            assert "does not support O_DIRECT (use it on a disk file system)" in str(ei.value)
        else:
            os.close(probe)
            with DirectFileSource(name) as ds:
                assert ds.read_at(3, 9000) == data[3:9003]
    finally:
        os.unlink(name)


def test_refusal_at_open_message(odd_file, monkeypatch):
    """What a file system without O_DIRECT does at open (tmpfs before Linux 6.6, ...)."""
    path, _ = odd_file
    real_fcntl = files_mod.fcntl.fcntl

    def fake_fcntl(fd, cmd, arg=0):
        # The file is opened without O_DIRECT (O_NOFOLLOW/O_NONBLOCK checks first), then
        # the flag is set: where the file system has no O_DIRECT, that is where it fails.
        if cmd == files_mod.fcntl.F_SETFL and arg & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument")
        return real_fcntl(fd, cmd, arg)

    monkeypatch.setattr(files_mod.fcntl, "fcntl", fake_fcntl)
    with pytest.raises(ImageIOError) as ei:
        DirectFileSource(path)
    assert ei.value.errno == errno.EINVAL
    assert str(ei.value) == (f"cannot open {path}: its file system does not support O_DIRECT "
                             f"(use it on a disk file system)")


def test_refusal_at_read_message(odd_file, monkeypatch):
    """Some file systems accept the flag at open and refuse the I/O: caught at open."""
    path, _ = odd_file

    def fake_preadv(fd, buffers, offset, *a):
        raise OSError(errno.EINVAL, "Invalid argument")

    monkeypatch.setattr(files_mod.os, "preadv", fake_preadv)
    before = set(os.listdir("/proc/self/fd"))
    with pytest.raises(ImageIOError) as ei:
        DirectFileSource(path)
    assert ei.value.errno == errno.EINVAL
    assert "does not support O_DIRECT" in str(ei.value)
    assert set(os.listdir("/proc/self/fd")) <= before  # the descriptor was closed


def test_missing_file(disk_dir):
    with pytest.raises(ImageIOError) as ei:
        DirectFileSource(disk_dir / "nope")
    assert ei.value.errno == errno.ENOENT


# -- the page cache --------------------------------------------------------------------------

def read_all(src, size, chunk=1 << 20) -> int:
    n = 0
    off = 0
    while off < size:
        n += len(src.read_at(off, chunk))
        off += chunk
    return n


def test_page_cache_untouched(disk_dir):
    path, data = make_file(disk_dir, "cache.bin", ODD_SIZE + 5 * 1048576, seed=42)
    drop_cache(path)
    res, total = resident_pages(path)
    if res > total // 100:
        pytest.skip(f"cannot drop this file's pages ({res}/{total} stay resident)")

    # O_DIRECT: nothing enters the cache, whether by read_at or readinto_at, from 8 threads.
    with DirectFileSource(path) as ds:
        assert read_all(ds, len(data), chunk=(1 << 20) + 7) == len(data)
        buf = bytearray(len(data) - 3)
        ds.readinto_at(memoryview(buf), 3)
        assert buf == data[3:]
        threads = [threading.Thread(target=read_all, args=(ds, len(data), 12345 + i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    res, total = resident_pages(path)
    assert res <= 2, f"{res} of {total} pages resident after O_DIRECT reads"

    # Control: the buffered FileSource does fill the cache, so the measurement can fail.
    with FileSource(path) as fs:
        assert read_all(fs, len(data)) == len(data)
    res, total = resident_pages(path)
    assert res >= total * 9 // 10, f"only {res} of {total} pages resident after buffered reads"

    # Pages already cached stay cached (O_DIRECT reads do not evict them) and the bytes agree.
    with DirectFileSource(path) as ds:
        assert ds.read_at(0, len(data)) == data
    res2, _ = resident_pages(path)
    assert res2 >= res - 2

    drop_cache(path)
    path.unlink()


def test_fincore_agrees(disk_dir):
    """Cross-check the mincore helper against util-linux fincore when it is installed."""
    fincore = shutil.which("fincore")
    if not fincore:
        pytest.skip("fincore not installed")
    path, data = make_file(disk_dir, "fincore.bin", 2 * 1048576 + 17, seed=4)

    def fincore_pages():
        out = subprocess.run([fincore, "--noheadings", "--raw", "-o", "PAGES", os.fspath(path)],
                             capture_output=True, text=True)
        if out.returncode != 0:
            pytest.skip(f"fincore failed: {out.stderr.strip()}")
        return int(out.stdout.split()[0])

    with FileSource(path) as fs:
        assert fs.read_at(0, len(data)) == data       # the whole file: readahead cannot race
    res, total = resident_pages(path)
    assert res == total == fincore_pages()
    # Dropping part of the file: how much goes depends on the folio sizes the file system
    # chose (a large folio straddling the range stays), so only compare the two tools.
    fd = os.open(path, os.O_RDONLY)
    os.posix_fadvise(fd, 1 << 20, 0, os.POSIX_FADV_DONTNEED)
    os.close(fd)
    res, _ = resident_pages(path)
    assert res == fincore_pages()
    drop_cache(path)
    res, _ = resident_pages(path)
    assert res == fincore_pages() == 0
    path.unlink()


# -- through the image model ------------------------------------------------------------------

def test_open_image_direct_io_matches():
    """If ``open_image`` offers ``direct_io``, an image read through it gives the same bytes."""
    from ramfs.image import model
    if "direct_io" not in inspect.signature(model.open_image).parameters:
        pytest.skip("open_image has no direct_io option")
    from fixture_data import MANIFEST, fixture_path
    wanted = ["firmware/pc-sequential.img", "firmware/pc-mapped-ram.img",
              "libvirt/fw-pc-raw.img", "libvirt/fw-pc-sparse.img"]
    images = [e for e in MANIFEST if e["kind"] == "image" and e["decompressed_path"] in wanted]
    if not images:
        pytest.skip("no fixture images")
    for e in images:
        p = fixture_path(e["decompressed_path"])
        try:
            direct = model.open_image(p, direct_io=True, use_cache=False)
        except ImageIOError as err:
            if err.errno == errno.EINVAL:
                pytest.skip(f"fixture cache is not on an O_DIRECT file system: {err}")
            raise
        with direct, model.open_image(p, use_cache=False) as plain:
            assert [b.idstr for b in direct.blocks] == [b.idstr for b in plain.blocks]
            for b_d, b_p in zip(direct.blocks, plain.blocks):
                for off in list(range(0, b_p.used_length, 1 << 20))[:8] + [max(0, b_p.used_length - 5000)]:
                    assert direct.read(b_d, off + 3, 70000) == plain.read(b_p, off + 3, 70000)


def test_sequential_readers_with_read_ahead(disk_dir):
    """Sequential readers (the read-ahead thread fills the next window meanwhile), several
    at once in threads, in steps that do and do not line up with windows; then close while
    a window may still be in flight."""
    import threading
    path, data = make_file(disk_dir, "ahead.bin", 10 * DIRECT_WINDOW + 777, seed=11)
    errors = []

    def reader(ds, start, step):
        try:
            pos = start
            while pos < len(data):
                got = ds.read_at(pos, step)
                assert got == data[pos:pos + step], (start, step, pos)
                pos += step
        except Exception as e:  # reported by the main thread
            errors.append(e)

    with DirectFileSource(path) as ds:
        reader(ds, 0, 1 << 20)
        assert ds._prefetcher is not None  # the read-ahead did run
        reader(ds, 12345, 300_001)
        threads = [threading.Thread(target=reader, args=(ds, s, st))
                   for s, st in ((0, 1 << 20), (len(data) // 3, 128 << 10), (7, 4 << 20))]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert not errors, errors
        ds.read_at(0, 4 << 20)
        ds.read_at(4 << 20, 4 << 20)  # sequential: a read-ahead starts; close must wait for it
    assert ds.fd == -1
