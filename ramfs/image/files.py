"""Files as byte sources: ``os.pread`` with OS errors turned into ramfs errors.

:class:`FileSource` reads through the page cache. :class:`DirectFileSource` has the same
interface but reads with ``O_DIRECT``, so inspecting a multi-GiB image neither fills the host
page cache nor evicts the pages that running VMs on the same host depend on.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import stat
import threading
from collections.abc import Callable, Iterator
from typing import Self

from ramfs.errors import ImageIOError

_KINDS = {stat.S_IFIFO: "a FIFO", stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device",
          stat.S_IFSOCK: "a socket", stat.S_IFDIR: "a directory", stat.S_IFLNK: "a symbolic link"}


def open_regular(path: str, *, dir_fd: int | None = None, follow: bool = True,
                 expect: os.stat_result | None = None, label: str | None = None) -> int:
    """Open a file to read as an image: a descriptor on a regular file, or ImageIOError.

    ``O_NONBLOCK`` so that a FIFO never blocks the open (it is then refused by its type);
    ``follow=False`` adds ``O_NOFOLLOW`` for entries of a directory someone else may write;
    ``expect``: the ``lstat`` a listing showed, which must be the file opened (same device
    and inode), so a name swapped between listing and opening is never read. Everything is
    read through the returned descriptor from then on: the path is not looked up again.
    """
    label = label or path
    flags = os.O_RDONLY | os.O_CLOEXEC | os.O_NONBLOCK | (0 if follow else os.O_NOFOLLOW)
    try:
        fd = os.open(path, flags, dir_fd=dir_fd)
    except OSError as e:
        if e.errno == errno.ELOOP and not follow:
            raise ImageIOError(f"{label} is a symbolic link: not followed", e.errno) from None
        raise ImageIOError(f"cannot open {label}: {e.strerror}", e.errno) from None
    try:
        st = os.fstat(fd)
        kind = stat.S_IFMT(st.st_mode)
        if kind != stat.S_IFREG:
            raise ImageIOError(f"{label} is {_KINDS.get(kind, 'not a regular file')}: ramfs reads "
                               "save images from regular files", errno.EINVAL)
        if expect is not None and (st.st_dev, st.st_ino) != (expect.st_dev, expect.st_ino):
            raise ImageIOError(f"{label} was replaced while it was opened: not read", errno.ESTALE)
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def _data_ranges(fd: int, start: int, end: int) -> Iterator[tuple[int, int]]:
    pos = start
    while pos < end:
        try:
            a = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError as e:
            if e.errno == errno.ENXIO:  # no data after pos
                return
            yield pos, end  # SEEK_DATA unsupported: assume data
            return
        if a >= end:
            return
        try:
            b = os.lseek(fd, a, os.SEEK_HOLE)
        except OSError:
            b = end
        yield a, min(b, end)
        pos = b


class WouldBlock(Exception):
    """A ``nowait`` read needs the disk (not a failure: the caller retries in a thread)."""


_RWF_NOWAIT: int | None = getattr(os, "RWF_NOWAIT", None)


class FileSource:
    """A read-only file read with ``pread``: no shared seek position, safe across threads."""

    def __init__(self, path: str | os.PathLike[str], fd: int | None = None):
        self.path = os.fspath(path)
        try:
            self.fd = fd if fd is not None else open_regular(self.path)
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

    def readinto_at(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        """Fill ``buf`` from ``offset`` exactly; a short read means the file shrank.

        With ``nowait``, only from the page cache (``RWF_NOWAIT``): raises
        :class:`WouldBlock` instead of waiting for the disk, so an event loop can serve a
        cached read at once and hand the rest to a worker thread.
        """
        want = len(buf)
        done = 0
        if nowait:
            if _RWF_NOWAIT is None:
                raise WouldBlock
            try:
                n = os.preadv(self.fd, [buf], offset, _RWF_NOWAIT)
            except OSError:  # EAGAIN, or EOPNOTSUPP on a file system without it
                raise WouldBlock from None
            if n != want:  # partly cached (or the file shrank): the thread sorts it out
                raise WouldBlock
            return
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

    def data_ranges(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """``(a, b)`` ranges of ``[start, end)`` that may hold data: holes of a sparse file
        are skipped (``SEEK_DATA``/``SEEK_HOLE``); without that support, the whole range."""
        yield from _data_ranges(self.fd, start, end)

    def readv_at(self, buffers: list[memoryview], offset: int, nowait: bool = False) -> bool:
        """Scatter the file's bytes from ``offset`` into ``buffers`` with one ``preadv``.

        Returns False, having read nothing useful, if that call came back short (the caller
        then reads another way); errors and ``nowait`` behave as in :meth:`readinto_at`.
        """
        want = sum(len(b) for b in buffers)
        flags = 0
        if nowait:
            if _RWF_NOWAIT is None:
                raise WouldBlock
            flags = _RWF_NOWAIT
        try:
            n = os.preadv(self.fd, buffers, offset, flags)
        except OSError as e:
            if nowait:
                raise WouldBlock from None
            raise ImageIOError(f"read of {want} bytes at {offset:#x} in {self.path} failed: "
                               f"{e.strerror}", e.errno) from None
        if n != want and nowait:
            raise WouldBlock
        return n == want

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


#: Offset, length and buffer-address alignment for ``O_DIRECT``. The real requirement is the
#: device's logical block size (512 or 4096 in practice, ``STATX_DIOALIGN`` on Linux >= 6.1,
#: which Python 3.11 cannot query); the page size is a multiple of it on every platform we
#: run on, and anonymous mmaps are page-aligned, so one constant serves all three.
DIRECT_ALIGN = max(4096, mmap.PAGESIZE)

#: Largest single ``O_DIRECT`` request, and so the largest per-thread bounce buffer.
DIRECT_WINDOW = 4 << 20

_MIN_BUFFER = 64 << 10


class _Bounce(threading.local):
    """One thread's aligned bounce buffer and the file range it currently holds."""

    def __init__(self) -> None:
        self.buf: mmap.mmap | None = None
        self.view: memoryview | None = None
        self.lo = 0     # file offset of view[0]
        self.hi = 0     # file offset just past the valid data (hi == lo: nothing held)


class _Window:
    """A window read ahead by the prefetch thread (the attributes of :class:`_Bounce`)."""

    def __init__(self, buf: mmap.mmap, lo: int):
        self.buf = buf
        self.view = memoryview(buf)
        self.lo = self.hi = lo
        self.done = threading.Event()
        self.failed = False


class DirectFileSource:
    """A read-only file read with ``O_DIRECT``: same interface as :class:`FileSource`.

    Every request is widened to aligned blocks and read with ``preadv`` into a page-aligned
    per-thread bounce buffer (an anonymous mmap, at most :data:`DIRECT_WINDOW` bytes, grown
    on demand and reused, so steady-state reads do not allocate), then the asked-for bytes
    are copied out. Requests larger than the window are read window by window. Nothing is
    shared between threads but the descriptor, which is only ``pread``: safe across threads.

    Each thread keeps the last window it read and serves reads (or their first part) that
    fall inside it without I/O: a header read followed by a read of the next few bytes costs
    one disk request, not two. A read that starts exactly where the held window ends is taken
    as sequential and reads ahead, doubling the window up to :data:`DIRECT_WINDOW`; any other
    read fetches only the blocks it covers. The image must therefore not change while it is
    open (ramfs assumes that everywhere: the index is keyed by the file's stat).

    ``fd``, as for :class:`FileSource`, is taken over (and closed by :meth:`close`); it gets
    ``O_DIRECT`` set on it. ``align`` overrides :data:`DIRECT_ALIGN` (a power of two, at
    least the page size) for devices with larger logical blocks.
    """

    def __init__(self, path: str | os.PathLike[str], fd: int | None = None, *, align: int | None = None):
        self.path = os.fspath(path)
        self.fd = -1
        a = DIRECT_ALIGN if align is None else int(align)
        if a < mmap.PAGESIZE or a & (a - 1) or a > DIRECT_WINDOW:
            raise ValueError(f"O_DIRECT alignment {a} must be a power of two between the page size "
                             f"and {DIRECT_WINDOW}")
        self.align = a
        self._mask = a - 1
        self._window = DIRECT_WINDOW
        o_direct = getattr(os, "O_DIRECT", 0)
        if not o_direct:
            raise ImageIOError(f"cannot open {self.path} with O_DIRECT: not available on this "
                               f"platform", errno.EINVAL)
        if fd is None:
            fd = open_regular(self.path)
        try:
            fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) | o_direct)
            self.fd = fd
            st = os.fstat(self.fd)
        except OSError as e:
            os.close(fd)
            self.fd = -1
            if e.errno == errno.EINVAL:
                raise ImageIOError(f"cannot open {self.path}: its file system does not support "
                                   f"O_DIRECT (use it on a disk file system)", e.errno) from None
            raise ImageIOError(f"cannot open {self.path}: {e.strerror}", e.errno) from None
        self.size = st.st_size
        self.stat = st
        self._tls = _Bounce()
        # Read-ahead for sequential readers: O_DIRECT has no kernel readahead, so a reader
        # alone would wait for the disk, then the disk for the reader. One window ahead is
        # read by a thread of our own while the reader consumes the current one.
        self._ahead: _Window | None = None
        self._ahead_lock = threading.Lock()
        self._spare: mmap.mmap | None = None
        self._prefetcher: threading.Thread | None = None
        self._prefetch_q: list[_Window] = []
        self._prefetch_cv = threading.Condition(self._ahead_lock)
        self._closed = False
        if self.size:
            # Some file systems accept the flag at open and refuse the I/O (or want larger
            # blocks): find out now, with one aligned block, not on the first real read.
            try:
                self._fill(0, min(self.size, a), self._bounce(a))
            except ImageIOError:
                self.close()
                raise

    # -- internals ------------------------------------------------------------------------
    def _bounce(self, need: int) -> _Bounce:
        """This thread's buffer, grown to hold ``need`` (aligned, <= window) bytes."""
        t = self._tls
        if t.buf is None or len(t.buf) < need:
            n = _MIN_BUFFER
            while n < need:
                n <<= 1
            n = min(max(n, need), self._window)
            t.view = None
            t.buf = mmap.mmap(-1, n)            # anonymous: page-aligned, zero-filled
            t.view = memoryview(t.buf)
            t.lo = t.hi = 0
        return t

    def _fill(self, lo: int, hi: int, t: _Bounce | _Window) -> None:
        """Read aligned ``[lo, align_up(hi))`` into ``t`` (shorter only at end of file)."""
        mask = self._mask
        need = ((hi + mask) & ~mask) - lo
        view = t.view
        assert view is not None  # a _Bounce from _bounce(), which gives it a buffer
        t.lo = t.hi = lo
        got = 0
        try:
            while got < need:
                n = os.preadv(self.fd, [view[got:need]], lo + got)
                got += n
                t.hi = lo + got
                # O_DIRECT returns whole blocks except at end of file, where it stops at the
                # last byte: an unaligned count (or none) means there is nothing more.
                if n == 0 or got & mask:
                    break
        except OSError as e:
            t.hi = t.lo
            if e.errno == errno.EINVAL:
                raise ImageIOError(f"O_DIRECT read of {need} bytes at {lo:#x} in {self.path} was "
                                   f"refused (EINVAL): its file system does not support O_DIRECT "
                                   f"with {self.align}-byte alignment (use it on a disk file "
                                   f"system)", e.errno) from None
            raise ImageIOError(f"read of {need} bytes at {lo:#x} in {self.path} failed: "
                               f"{e.strerror}", e.errno) from None

    def data_ranges(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        """As :meth:`FileSource.data_ranges`."""
        yield from _data_ranges(self.fd, start, end)

    # -- read-ahead -------------------------------------------------------------------------
    def _prefetch(self, lo: int) -> None:
        """Have window ``[lo, lo + DIRECT_WINDOW)`` read in the background (once)."""
        if lo >= self.size:
            return
        with self._ahead_lock:
            if self._closed or (self._ahead is not None and self._ahead.lo == lo):
                return
            if self._ahead is not None and not self._ahead.done.is_set():
                return  # one at a time: the disk is busy with the previous one
            buf = self._spare if self._spare is not None else mmap.mmap(-1, self._window)
            self._spare = None
            w = self._ahead = _Window(buf, lo)
            self._prefetch_q.append(w)
            if self._prefetcher is None:
                self._prefetcher = threading.Thread(target=self._prefetch_loop, daemon=True,
                                                    name="ramfs-direct-readahead")
                self._prefetcher.start()
            self._prefetch_cv.notify()

    def _prefetch_loop(self) -> None:
        while True:
            with self._ahead_lock:
                while not self._prefetch_q and not self._closed:
                    self._prefetch_cv.wait()
                if self._closed:
                    for w in self._prefetch_q:
                        w.failed = True
                        w.done.set()
                    return
                w = self._prefetch_q.pop(0)
            try:
                self._fill(w.lo, min(self.size, w.lo + self._window), w)
            except ImageIOError:
                w.failed = True  # the reader reads it again and reports the error itself
            w.done.set()

    def _take_ahead(self, t: _Bounce, pos: int) -> bool:
        """If the read-ahead window holds ``pos``, make it this thread's window."""
        with self._ahead_lock:
            w = self._ahead
            if w is None or not (w.lo <= pos < w.lo + self._window):
                return False
            self._ahead = None
        w.done.wait()
        if w.failed or not (w.lo <= pos < w.hi):
            with self._ahead_lock:
                self._spare = w.buf
            return False
        old = t.buf
        t.buf, t.view, t.lo, t.hi = w.buf, w.view, w.lo, w.hi
        if old is not None and len(old) == self._window:
            with self._ahead_lock:
                self._spare = old
        return True

    def _read(self, offset: int, size: int, sink: Callable[[int, memoryview], None]) -> int:
        """Pass the file's bytes ``[offset, offset+size)`` to ``sink(pos, view)`` piece by
        piece; return how many there were (fewer only at end of file)."""
        if offset < 0:
            raise ImageIOError(f"read of {size} bytes at negative offset {offset} in "
                               f"{self.path}", errno.EINVAL)
        mask = self._mask
        end = offset + size
        pos = offset
        t = self._tls
        while pos < end:
            if not (t.lo <= pos < t.hi):
                # Not in the window this thread holds: read the next one. Its start is
                # aligned; so is every later one, because a window ends on a block boundary
                # unless it ends at end of file.
                lo = pos & ~mask
                hi = min(end, lo + self._window)
                held = t.hi - t.lo
                sequential = held and lo == t.hi
                took = self._take_ahead(t, pos)
                if not took:
                    if sequential:
                        # Sequential: this read starts where the last window ended. Read
                        # ahead, doubling the window up to the limit (as the kernel's
                        # readahead does), so a stream of small reads becomes a few large
                        # requests.
                        hi = max(hi, min(lo + 2 * held, lo + self._window, self.size))
                    t = self._bounce(((hi + mask) & ~mask) - lo)
                    self._fill(lo, hi, t)
                    if pos >= t.hi:                     # end of file
                        break
                if (took or sequential) and t.hi - t.lo >= self._window // 2:
                    self._prefetch(t.hi)
            stop = min(end, t.hi)
            assert t.view is not None  # it holds [t.lo, t.hi), which is not empty here
            sink(pos - offset, t.view[pos - t.lo : stop - t.lo])
            pos = stop
        return pos - offset

    # -- FileSource interface ---------------------------------------------------------------
    def read_at(self, offset: int, size: int) -> bytes:
        if size <= 0 or offset >= self.size:
            return b""
        size = min(size, self.size - offset)
        parts: list[bytes] = []
        self._read(offset, size, lambda _at, v: parts.append(bytes(v)))
        return parts[0] if len(parts) == 1 else b"".join(parts)

    def readinto_at(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        """Fill ``buf`` from ``offset`` exactly; a short read means the file shrank."""
        if nowait:
            raise WouldBlock  # O_DIRECT always waits for the device
        buf = memoryview(buf).cast("B")
        want = len(buf)
        if not want:
            return

        def sink(at: int, v: memoryview) -> None:
            buf[at : at + len(v)] = v

        done = self._read(offset, want, sink)
        if done < want:
            raise ImageIOError(f"{self.path} ends at {offset + done:#x}, inside data the "
                               f"index points to (was the image changed?)", errno.EIO)

    def close(self) -> None:
        with self._ahead_lock:
            self._closed = True
            self._prefetch_cv.notify_all()
            prefetcher = self._prefetcher
        if prefetcher is not None:
            prefetcher.join()  # its preadv must finish before the descriptor is closed
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1
        # Drops every thread's buffer once no read is using it.
        self._tls = _Bounce()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
