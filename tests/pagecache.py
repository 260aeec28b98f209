"""Page-cache residency of files, for tests that prove O_DIRECT keeps data out of it."""

from __future__ import annotations

import ctypes
import ctypes.util
import mmap
import os
import subprocess

PAGE = mmap.PAGESIZE


def fs_type(path) -> str:
    try:
        return subprocess.run(["stat", "-f", "-c", "%T", os.fspath(path)], capture_output=True,
                              text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.mincore.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.POINTER(ctypes.c_ubyte)]
_libc.mincore.restype = ctypes.c_int


def resident_pages(path) -> tuple[int, int]:
    """(pages of ``path`` in the page cache, pages in the file), with mincore(2)."""
    size = os.path.getsize(path)
    npages = (size + PAGE - 1) // PAGE
    with open(path, "rb") as f:
        # A private mapping: writable from Python's point of view (so ctypes can take its
        # address) without any page being touched; mincore reports the file's page cache.
        m = mmap.mmap(f.fileno(), size, access=mmap.ACCESS_COPY)
    try:
        anchor = ctypes.c_char.from_buffer(m)
        vec = (ctypes.c_ubyte * npages)()
        if _libc.mincore(ctypes.addressof(anchor), size, vec) != 0:
            e = ctypes.get_errno()
            raise OSError(e, os.strerror(e))
        del anchor
        return sum(v & 1 for v in vec), npages
    finally:
        m.close()


def drop_cache(path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
