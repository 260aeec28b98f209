"""Measurement helpers: page cache, dd, mounts (ramfs and the passthrough), peak RSS."""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import mmap
import os
import random
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
PY = sys.executable
MIB = 1 << 20
GIB = 1 << 30
MOUNT_TIMEOUT = 120.0


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


# ------------------------------------------------------------------------------ page cache

def drop_caches(*paths) -> None:
    """Write back dirty data, then drop the page cache (everything when root, else the
    given files with POSIX_FADV_DONTNEED)."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("1\n")
        return
    except OSError:
        pass
    for p in paths:
        fd = os.open(p, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


def warm(path) -> None:
    """Read a file once so that it is in the page cache."""
    subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=4M", "status=none"], check=True)


def meminfo(field: str = "Cached") -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise KeyError(field)


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]


def resident_bytes(path) -> int:
    """Bytes of ``path`` in the page cache (mincore, like fincore)."""
    size = os.path.getsize(path)
    if not size:
        return 0
    npages = (size + mmap.PAGESIZE - 1) // mmap.PAGESIZE
    with open(path, "rb") as f:
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * npages)()
        if _libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
            raise OSError(ctypes.get_errno(), "mincore")
        del anchor
        return sum(memoryview(vec).cast("B").tolist()) * mmap.PAGESIZE  # bit 0 only is used
    finally:
        m.close()


# ------------------------------------------------------------------------------ processes

def vm_hwm(pid: int) -> int | None:
    """Peak resident set (VmHWM) of a running process, in bytes."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


# Runs the command as its child and reports the child's rusage. An intermediary is needed:
# a process forked from this (large) Python inherits its RSS high-water mark, and exec keeps
# it in ru_maxrss; the intermediary is a bare ``python -S`` of a few MiB, a floor well below
# anything ramfs uses.
_RUSAGE_HELPER = (
    "import json, os, sys\n"
    "pid = os.fork()\n"
    "if pid == 0:\n"
    "    os.execvp(sys.argv[2], sys.argv[2:])\n"
    "_, st, ru = os.wait4(pid, 0)\n"
    "with open(sys.argv[1], 'w') as f:\n"
    "    json.dump({'maxrss_kib': ru.ru_maxrss, 'own_kib': 0}, f)\n"
    "sys.exit(os.waitstatus_to_exitcode(st))\n")


def run_measured(argv, *, env=None, cwd=None) -> dict:
    """Run a command; wall time and its peak RSS (ru_maxrss of the process, see above)."""
    import json
    with tempfile.NamedTemporaryFile("r", suffix=".json") as tf:
        t0 = time.perf_counter()
        r = subprocess.run([PY, "-S", "-c", _RUSAGE_HELPER, tf.name, *map(str, argv)], env=env, cwd=cwd,
                           check=False, capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if r.returncode != 0:
            raise RuntimeError(f"{' '.join(map(str, argv))} failed ({r.returncode}): {r.stderr[-2000:]}")
        ru = json.load(tf)
    return {"seconds": wall, "maxrss": ru["maxrss_kib"] * 1024, "stdout": r.stdout, "stderr": r.stderr}


_DD_RE = re.compile(r"^(\d+) bytes .* copied, ([0-9.e+-]+) s", re.MULTILINE)


def dd(src, *, bs: int, offset: int = 0, count: int | None = None, direct: bool = False) -> dict:
    """dd ``src`` to /dev/null; bytes and seconds as dd reports them."""
    iflags = ["skip_bytes", "count_bytes"] + (["direct"] if direct else [])
    argv = ["dd", f"if={src}", "of=/dev/null", f"bs={bs}", "iflag=" + ",".join(iflags)]
    if offset:
        argv.append(f"skip={offset}")
    if count is not None:
        argv.append(f"count={count}")
    r = subprocess.run(argv, check=False, capture_output=True, text=True, env={**os.environ, "LC_ALL": "C"})
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(argv)}: {r.stderr.strip()}")
    m = _DD_RE.search(r.stderr)
    n, s = int(m.group(1)), float(m.group(2))
    if count is not None and n != count:
        raise RuntimeError(f"{' '.join(argv)}: read {n} bytes, wanted {count}")
    return {"bytes": n, "seconds": s, "gbps": n / s / 1e9}


def median(xs):
    return statistics.median(xs)


# ------------------------------------------------------------------------------ mounts

def _wait_mounted(mp: Path, proc: subprocess.Popen, logf: Path) -> None:
    deadline = time.monotonic() + MOUNT_TIMEOUT
    while not os.path.ismount(mp):
        if proc.poll() is not None:
            raise RuntimeError(f"mount of {mp} failed ({proc.returncode}):\n{logf.read_text()[-3000:]}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mp} not mounted after {MOUNT_TIMEOUT} s")
        time.sleep(0.01)


class Mount:
    """A FUSE daemon in the foreground (ramfs or the passthrough) on a fresh mountpoint."""

    def __init__(self, argv_before_mp: list[str], mp: Path, logf: Path, argv_after_mp=(), env=None):
        self.mp = mp
        mp.mkdir(parents=True, exist_ok=True)
        self.logf = logf
        t0 = time.perf_counter()
        with open(logf, "w") as lf:
            self.proc = subprocess.Popen([*argv_before_mp, str(mp), *argv_after_mp], stdout=lf,
                                         stderr=subprocess.STDOUT, env=env)
        try:
            _wait_mounted(mp, self.proc, logf)
        except BaseException:
            self._stop()
            raise
        self.mount_seconds = time.perf_counter() - t0
        self.hwm: int | None = None

    @property
    def pid(self) -> int:
        return self.proc.pid

    def peak_rss(self) -> int | None:
        return vm_hwm(self.pid)

    def _stop(self) -> None:
        def unmount(*opts) -> bool:
            return subprocess.run(["fusermount3", "-u", *opts, str(self.mp)], check=False,
                                  capture_output=True).returncode == 0

        if os.path.ismount(self.mp) and not unmount():
            time.sleep(0.5)  # a reader that just exited may still hold the file
            if not unmount():
                unmount("-z")
        try:
            self.proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.proc.kill()  # our own child, by pid
            self.proc.wait()

    def close(self) -> None:
        self.hwm = self.peak_rss()
        self._stop()
        text = self.logf.read_text()
        if "Traceback" in text:
            raise RuntimeError(f"daemon on {self.mp} logged a traceback:\n{text[-3000:]}")

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def ramfs_mount(source, mp: Path, *opts: str, env=None) -> Mount:
    return Mount([PY, "-m", "ramfs.cli", "mount", "-f", *opts, str(source)], mp,
                 mp.parent / f"{mp.name}.log", env=env)


def passthrough_mount(file, rwdir, mp: Path, *, writeback=False, direct_io=False) -> Mount:
    opts = (["--writeback"] if writeback else []) + (["--direct-io"] if direct_io else [])
    return Mount([PY, str(REPO / "bench" / "passthrough.py"), *opts, str(file), str(rwdir)], mp,
                 mp.parent / f"{mp.name}.log")


# ------------------------------------------------------------------------------ random reads

RANDOM_READER = r"""
import os, random, sys, time
path, lo, hi, n = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4])
limit, advice, seed = float(sys.argv[5]), sys.argv[6], int(sys.argv[7])
fd = os.open(path, os.O_RDONLY)
if advice == "random":
    os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
rng = random.Random(seed)
pages = (hi - lo) // 4096
offs = [lo + rng.randrange(pages) * 4096 for _ in range(n)]
done = 0
t0 = time.perf_counter()
for off in offs:
    if len(os.pread(fd, 4096, off)) != 4096:
        raise SystemExit("short read")
    done += 1
    if done % 256 == 0 and time.perf_counter() - t0 > limit:
        break
print(done, time.perf_counter() - t0)
"""


DIRECT_PAGE_READER = r"""
import mmap, os, random, sys, time
path, lo, pages = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
stride, n, limit = int(sys.argv[4]), int(sys.argv[5]), float(sys.argv[6])
fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
buf = memoryview(mmap.mmap(-1, 1 << 16))
rng = random.Random(1)
offs = [lo + rng.randrange(pages) * stride for _ in range(n)]
done = 0
t0 = time.perf_counter()
for off in offs:
    a = off & ~4095
    b = (off + 4096 + 4095) & ~4095  # the device blocks holding the page: 8 KiB if it straddles
    if os.preadv(fd, [buf[:b - a]], a) != b - a:
        raise SystemExit("short read")
    done += 1
    if done % 256 == 0 and time.perf_counter() - t0 > limit:
        break
print(done, time.perf_counter() - t0)
"""


def direct_page_reads(path, lo: int, pages: int, stride: int, *, n: int = 40000, limit: float = 3.0) -> dict:
    """O_DIRECT reads of the image itself, of the device blocks that hold page ``k`` at
    ``lo + k * stride``: the disk's cost of a random page read where the image puts pages."""
    r = subprocess.run([PY, "-c", DIRECT_PAGE_READER, str(path), str(lo), str(pages), str(stride), str(n), str(limit)],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"direct page reader on {path}: {r.stderr.strip()}")
    done, secs = r.stdout.split()
    return {"reads": int(done), "seconds": float(secs), "per_s": int(done) / float(secs)}


def random_reads(path, lo: int, hi: int, *, n: int = 40000, limit: float = 3.0, advice: str = "random",
                 seed: int = 1) -> dict:
    r = subprocess.run([PY, "-c", RANDOM_READER, str(path), str(lo), str(hi), str(n), str(limit), advice,
                        str(seed)],
                       check=False, capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"random reader on {path}: {r.stderr.strip()}")
    done, secs = r.stdout.split()
    return {"reads": int(done), "seconds": float(secs), "per_s": int(done) / float(secs)}


@contextlib.contextmanager
def workdir(root: Path, name: str):
    d = Path(tempfile.mkdtemp(prefix=name + "-", dir=root))
    try:
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def rng_seeded(seed=1):
    return random.Random(seed)
