"""Files as byte sources: ``os.pread`` with OS errors turned into ramfs errors."""

from __future__ import annotations

import errno
import os

from ramfs.errors import ImageIOError


class FileSource:
    """A read-only file read with ``pread``: no shared seek position, safe across threads."""

    def __init__(self, path: str | os.PathLike, fd: int | None = None):
        self.path = os.fspath(path)
        try:
            self.fd = fd if fd is not None else os.open(self.path, os.O_RDONLY | os.O_CLOEXEC)
            st = os.fstat(self.fd)
        except OSError as e:
            raise ImageIOError(f"cannot open {self.path}: {e.strerror}", e.errno) from None
        self.size = st.st_size
        self.stat = st

    def read_at(self, offset: int, size: int) -> bytes:
        if size <= 0 or offset >= self.size:
            return b""
        try:
            return os.pread(self.fd, min(size, self.size - offset), offset)
        except OSError as e:
            raise ImageIOError(f"read of {size} bytes at {offset:#x} in {self.path} failed: "
                               f"{e.strerror}", e.errno) from None

    def readinto_at(self, buf: memoryview, offset: int) -> None:
        """Fill ``buf`` from ``offset`` exactly; a short read means the file shrank."""
        want = len(buf)
        done = 0
        try:
            while done < want:
                n = os.preadv(self.fd, [buf[done:]], offset + done)
                if n == 0:
                    raise ImageIOError(f"{self.path} ends at {offset + done:#x}, inside data the "
                                       f"index points to (was the image changed?)", errno.EIO)
                done += n
        except OSError as e:
            raise ImageIOError(f"read of {want} bytes at {offset:#x} in {self.path} failed: "
                               f"{e.strerror}", e.errno) from None

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
