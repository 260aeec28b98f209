"""The ``convert/`` directory: images copied in are converted as their bytes arrive.

A write stream becomes a ``read(n)`` stream for the converter through :class:`Assembler`:
in-order bytes are handed over in memory (bounded, with back-pressure on the writer), bytes
that arrive ahead of the current position wait in a sparse spool file, and at the end
(``flush``) any range never written reads as zeros, as it would in a file (``cp`` skips the
holes of sparse sources). Only a rewrite of bytes already consumed cannot be honoured.

The result is written under a hidden temporary name in the backing directory and linked to
its final name only when complete and checked; it never replaces an existing file.
"""

from __future__ import annotations

import bisect
import errno
import logging
import math
import os
import secrets
import threading
import time
from collections import deque
from dataclasses import dataclass, field

from ramfs import publish
from ramfs.convert.core import ConvertResult, convert_stream
from ramfs.convert.verify import verify_output
from ramfs.errors import RamfsError
from ramfs.fs import creds
from ramfs.fs.creds import Caller
from ramfs.ranges import merge_ranges

log = logging.getLogger("ramfs.convert")

TMP_PREFIX = ".ramfs-convert."
QUEUE_LIMIT = 32 << 20  # in-memory bytes between the writer and the converter
TAIL_KEEP = 8 << 20  # the last bytes written, to recognise a complete image at flush
# flush() is sent at every close() of a descriptor, including dup()ed ones and those of child
# processes sharing the file. When the bytes so far do not end like a complete image, the
# end of input is declared only after the writer has been quiet this long.
QUIET_SECONDS = 1.0



class ConversionFailed(RamfsError):
    def __init__(self, message: str, errno_: int):
        super().__init__(message)
        self.errno = errno_


@dataclass(frozen=True, slots=True)
class _Spooled:
    """Bytes ``[start, end)`` of the input, to be read from the spool file."""

    start: int
    end: int


@dataclass(frozen=True, slots=True)
class _Zeros:
    """Bytes ``[start, end)`` of the input never written: a hole, handed over as zeros."""

    start: int
    end: int


class Assembler:
    """Positioned writes in, an in-order byte stream out (see the module docstring)."""

    def __init__(self, spool_fd: int):
        self._cv = threading.Condition()
        self._queue: deque[bytes | _Spooled | _Zeros] = deque()  # the stream, in order
        self._queued = 0  # bytes in the queue's in-memory items
        self.expected = 0  # end of the contiguous prefix handed to the reader
        self._rpos = 0  # what the reader consumed
        # An unnamed file made with the writer's credentials (ConvertManager.start), owned
        # (closed) by the assembler.
        self._spool_fd = spool_fd
        self._ahead: list[tuple[int, int]] = []  # sorted, disjoint [start, end) spooled ranges
        self.size = 0  # highest offset written or set
        self._eof = False
        self.error: BaseException | None = None
        self.last_write = time.monotonic()
        self._waiting = False  # the reader wants bytes that have not arrived
        self._tail: deque[bytes] = deque()  # the bytes just before _tail_end, as written
        self._tail_len = 0
        self._tail_end = 0
        self._zero_filled: list[tuple[int, int]] = []  # gaps handed over as zeros
        self._zero_ok = (0, 0)

    # -- writer side (FUSE write handlers, in worker threads) ---------------------------
    def write(self, offset: int, data: bytes) -> None:
        end = offset + len(data)
        with self._cv:
            self._check()
            if self._eof:
                raise ConversionFailed("the file was already closed", errno.EBADF)
            if offset < self.expected:
                if self._in_zero_filled(offset, end) and data.count(0) == len(data):
                    return  # zeros into a gap already fed as zeros: nothing changes
                self.error = ConversionFailed(
                    f"rewrite of bytes {offset}..{end} that were already converted", errno.EINVAL)
                self._cv.notify_all()
                raise self.error
            self.size = max(self.size, end)
            self.last_write = time.monotonic()
            self._keep_tail(offset, data)
            if offset == self.expected:
                self._queue.append(data)
                self._queued += len(data)
                self.expected = end
                self._promote()
            else:
                self._spool(offset, data)
                self._fill_known_holes()
            self._cv.notify_all()
            while self._queued > QUEUE_LIMIT and self.error is None:
                self._cv.wait()
            self._check()

    def try_write(self, offset: int, data: bytes) -> bool:
        """Take an in-order write that needs neither waiting nor the spool, at once.

        The FUSE layer calls this on its event loop and hands every other write to a worker
        thread: a thread hop per 128 KiB request costs more than the append itself.
        """
        end = offset + len(data)
        with self._cv:
            if (self.error is not None or self._eof or offset != self.expected or self._ahead
                    or self._queued + len(data) > QUEUE_LIMIT):
                return False
            self.size = max(self.size, end)
            self.last_write = time.monotonic()
            self._keep_tail(offset, data)
            self._queue.append(data)
            self._queued += len(data)
            self.expected = end
            self._cv.notify_all()
            return True

    def _keep_tail(self, offset: int, data: bytes) -> None:
        # Chunks, not one bytearray trimmed at the front: that would copy the whole 8 MiB on
        # most appends (CPython reallocates a bytearray whose front was deleted).
        end = offset + len(data)
        if end < self._tail_end:
            return
        tail = self._tail
        if offset <= self._tail_end and self._tail_end - offset <= self._tail_len:
            cut = self._tail_end - offset  # bytes of the tail this write replaces
            while cut:
                last = tail[-1]
                if len(last) <= cut:
                    tail.pop()
                    cut -= len(last)
                    self._tail_len -= len(last)
                else:
                    tail[-1] = last[: len(last) - cut]
                    self._tail_len -= cut
                    cut = 0
        else:
            tail.clear()
            self._tail_len = 0
        tail.append(data)
        self._tail_len += len(data)
        self._tail_end = end
        while self._tail_len - len(tail[0]) >= TAIL_KEEP:
            self._tail_len -= len(tail.popleft())

    def zero_region(self, start: int, end: int) -> None:
        """Bytes in ``[start, end)`` are padding the format says is zeros (libvirt's XML
        area): a gap there is a hole ``cp`` skipped, so feed it as zeros instead of waiting
        (and spooling everything after it). Bytes still written there later must be zeros,
        or the conversion fails."""
        with self._cv:
            self._zero_ok = (start, end)
            self._fill_known_holes()
            self._cv.notify_all()

    def _fill_known_holes(self) -> None:
        a, b = self._zero_ok
        while self._ahead and a <= self.expected and self._ahead[0][0] <= b:
            gap_end = self._ahead[0][0]
            self._queue.append(_Zeros(self.expected, gap_end))
            self._zero_filled.append((self.expected, gap_end))
            self.expected = gap_end
            self._promote()

    def _in_zero_filled(self, start: int, end: int) -> bool:
        return any(a <= start and end <= b for a, b in self._zero_filled)

    def idle(self) -> bool:
        """The converter has consumed everything written and is waiting for more."""
        with self._cv:
            return self._waiting and not self._queue

    def looks_complete(self) -> bool:
        """The bytes end like a whole QEMU stream: ``00 06 be32(len) <len bytes of JSON>``."""
        with self._cv:
            if self._tail_end != self.size:
                return False
            t = b"".join(self._tail)[-TAIL_KEEP:]
            j = len(t)
            while True:
                j = t.rfind(b"\x06", 0, j)
                if j < 1:
                    return False
                if t[j - 1] == 0 and j + 5 <= len(t) and \
                        int.from_bytes(t[j + 1:j + 5], "big") == len(t) - j - 5 and t[j + 5:j + 6] == b"{":
                    return True

    def truncate(self, size: int) -> None:
        with self._cv:
            if size < self.expected:
                self.error = ConversionFailed("truncation below bytes already converted", errno.EINVAL)
                self._cv.notify_all()
                raise self.error
            self.size = size

    def close_input(self) -> None:
        with self._cv:
            self._eof = True
            self._cv.notify_all()

    def fail(self, exc: BaseException) -> None:
        with self._cv:
            if self.error is None:
                self.error = exc
            self._cv.notify_all()

    def _check(self) -> None:
        if self.error is not None:
            raise self.error

    def _spool(self, offset: int, data: bytes) -> None:
        view = memoryview(data)
        pos = offset
        while view:
            n = os.pwrite(self._spool_fd, view, pos)
            view = view[n:]
            pos += n
        # The new range merged with its neighbours: the ranges from the one before it (which
        # may reach it) up to the last one starting where it ends.
        ahead = self._ahead
        end = offset + len(data)
        i = max(0, bisect.bisect_left(ahead, (offset,)) - 1)
        j = bisect.bisect_right(ahead, (end, math.inf))
        near = ahead[i:j]
        bisect.insort(near, (offset, end))
        ahead[i:j] = merge_ranges(near)

    def _promote(self) -> None:
        """Spooled ranges that now continue the in-order prefix join the queue."""
        while self._ahead and self._ahead[0][0] <= self.expected:
            start, end = self._ahead.pop(0)
            if end > self.expected:
                self._queue.append(_Spooled(self.expected, end))
                self.expected = end

    # -- reader side (the converter thread) ---------------------------------------------
    def read(self, n: int) -> bytes:
        with self._cv:
            while True:
                self._check()
                if self._queue:
                    data = self._take(n)
                    self._rpos += len(data)
                    self._cv.notify_all()
                    return data
                if self._eof:
                    self._waiting = False
                    # Past the written prefix once the writer is done: holes read as zeros,
                    # spooled data follows them.
                    if self._rpos >= self.size:
                        return b""
                    nxt = self._ahead[0][0] if self._ahead else self.size
                    if nxt > self._rpos:
                        take = min(n, nxt - self._rpos)
                        self._rpos += take
                        self.expected = self._rpos
                        return bytes(take)
                    self._promote()
                    continue
                self._waiting = True
                self._cv.notify_all()
                self._cv.wait()
                self._waiting = False

    def _take(self, n: int) -> bytes:
        item = self._queue[0]
        if isinstance(item, (_Spooled, _Zeros)):
            take = min(n, item.end - item.start)
            if isinstance(item, _Zeros):
                data = bytes(take)
            else:
                data = os.pread(self._spool_fd, take, item.start)
                if len(data) < take:  # a hole at the end of the spool reads as zeros
                    data += bytes(take - len(data))
            if item.start + take == item.end:
                self._queue.popleft()
            else:
                self._queue[0] = type(item)(item.start + take, item.end)
            return data
        data = item[:n]
        if len(data) == len(item):
            self._queue.popleft()
        else:
            self._queue[0] = item[n:]
        self._queued -= len(data)
        return data

    @property
    def consumed(self) -> int:
        return self._rpos

    def close(self) -> None:
        if self._spool_fd >= 0:
            os.close(self._spool_fd)
            self._spool_fd = -1


@dataclass(eq=False)
class Conversion:
    """One file being copied into ``convert/``."""

    name: bytes
    final_path: str
    tmp_path: str
    assembler: Assembler
    caller: Caller | None = None  # whose file it is; None: the daemon's own (not root)
    fd: int = -1  # the temporary, until published or removed
    direct_fd: int | None = None
    started: float = field(default_factory=time.monotonic)
    thread: threading.Thread | None = None
    result: ConvertResult | None = None
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    published: bool = False
    published_fd: int = -1  # read-only, on the published image (what convert/ serves)
    ended: float | None = None
    node: object | None = None  # the file system's node for it
    # Set by the file system once the outcome is visible in the tree (the name removed or
    # turned into the finished image): STATUS must not say "failed" while convert/ still
    # shows the name, or a script that polls STATUS and then looks races the tree update.
    settled: bool = False

    @property
    def state(self) -> str:
        if not self.settled:
            return "converting"
        return "done" if self.published else "failed"


class ConvertManager:
    """Runs conversions into ``backing`` and publishes them (FUSE-independent).

    Every file of a conversion (temporary, spool, final name) is created as the caller, so
    the kernel and the backing directory decide who may convert, as if the caller wrote the
    file there itself (:mod:`ramfs.fs.creds`). Names are resolved relative to the
    directory's descriptor; the temporary is read back and linked through its descriptor.
    """

    def __init__(self, backing: str, dir_fd: int, *, jobs: int = 1, direct_io: bool = False):
        self.backing = backing
        self.dir_fd = dir_fd
        self.jobs = jobs
        self.direct_io = direct_io
        self.active: dict[bytes, Conversion] = {}
        self.finished: dict[bytes, Conversion] = {}
        self._lock = threading.Lock()

    def cleanup_stale(self) -> int:
        """Remove temporaries left by a daemon that died mid-conversion."""
        n = 0
        for entry in os.scandir(self.dir_fd):
            if entry.name.startswith(TMP_PREFIX) and entry.is_file(follow_symlinks=False):
                try:
                    os.unlink(entry.name, dir_fd=self.dir_fd)
                    n += 1
                except OSError as e:
                    log.warning("cannot remove stale %s/%s: %s", self.backing, entry.name, e.strerror)
        return n

    def start(self, name: bytes, caller: Caller | None = None, mode: int = 0o600) -> Conversion:
        """Create the temporary as ``caller`` (None: as this process) with ``mode`` (the
        mode the creator asked for, its umask applied). Raises ConversionFailed(EACCES, ...)
        when the caller may not create files in the backing directory."""
        fname = os.fsdecode(name)
        if caller is not None and not creds.can_act_as_others() and caller.uid not in (0, os.geteuid()):
            # Without root we can only create files as ourselves: a file of someone else's
            # could then appear under a name this caller chose.
            raise ConversionFailed(f"{fname}: this mount converts only for uid {os.geteuid()}", errno.EACCES)
        with self._lock:
            if name in self.active or publish.exists(self.dir_fd, fname):
                raise ConversionFailed(f"{fname} already exists", errno.EEXIST)
            token = secrets.token_hex(4)
            tmp = f"{TMP_PREFIX}{token}.{fname[:180]}.tmp"
            try:
                with creds.as_caller_if_root(caller):
                    fd = publish.create_temporary(self.dir_fd, tmp, readable=True)
                    try:
                        # Bytes that arrive ahead of the stream wait here: a file with no
                        # name, so nothing of it can outlive us or be opened by anyone.
                        spool = publish.create_temporary(self.dir_fd, tmp + ".spool", readable=True)
                        os.unlink(tmp + ".spool", dir_fd=self.dir_fd)
                    except OSError:
                        os.close(fd)
                        os.unlink(tmp, dir_fd=self.dir_fd)
                        raise
            except OSError as e:
                raise ConversionFailed(f"cannot create {fname} in {self.backing}: {e.strerror}",
                                       e.errno or errno.EIO) from None
            conv = Conversion(name, os.path.join(self.backing, fname), tmp,
                              Assembler(spool), caller=caller, fd=fd)
            try:
                if self.direct_io:
                    # For O_DIRECT page writes (the directory is the caller's to change).
                    conv.direct_fd = publish.reopen_direct(fd)
                # The mode asked for, only once our own descriptors are open (a 0400 copy
                # still has to be written), and before any byte is in.
                os.fchmod(fd, mode & 0o777)
            except OSError as e:
                self._discard(conv)
                raise ConversionFailed(f"cannot prepare {fname}: {e.strerror}", e.errno or errno.EIO) from None
            self.active[name] = conv
        conv.thread = threading.Thread(target=self._run, args=(conv,), name=f"convert {fname}", daemon=True)
        conv.thread.start()
        return conv

    def _run(self, conv: Conversion) -> None:
        # This thread and the writer threads it starts write as the caller: quotas and the
        # reserved blocks apply to them as to the caller's own writes.
        try:
            with creds.as_caller_if_root(conv.caller):
                conv.result = convert_stream(conv.assembler.read, conv.fd, jobs=self.jobs,
                                             direct_fd=conv.direct_fd, padding=conv.assembler.zero_region)
                if conv.assembler.read(1):
                    raise ConversionFailed("data continues after the end of the save image", errno.EINVAL)
        except BaseException as e:  # reported to the writer at flush
            conv.error = e
            conv.assembler.fail(e)
        finally:
            if conv.direct_fd is not None:
                os.close(conv.direct_fd)
                conv.direct_fd = None
            conv.done.set()

    def finish(self, conv: Conversion, *, last_close: bool = False) -> None:
        """Called at flush (or release, ``last_close``): finish the conversion. Blocks; raises
        on failure, and then nothing is kept."""
        a = conv.assembler
        t0 = time.monotonic()
        while not last_close and not conv.done.is_set():
            if a.idle() and (a.looks_complete() or time.monotonic() - a.last_write > QUIET_SECONDS):
                break
            conv.done.wait(0.02)
        t1 = time.monotonic()
        a.close_input()
        conv.done.wait()
        log.debug("%s: end of input after %.3f s, conversion done %.3f s later",
                  os.fsdecode(conv.name), t1 - t0, time.monotonic() - t1)
        fname = os.fsdecode(conv.name)
        try:
            if conv.error is not None:
                raise conv.error
            result = conv.result
            assert result is not None  # the conversion thread set it, or conv.error
            verify_output(f"/proc/self/fd/{conv.fd}", result)
            with creds.as_caller_if_root(conv.caller):
                try:
                    # The inode we wrote and checked, not whatever the temporary's name holds.
                    publish.publish(conv.fd, self.dir_fd, fname)
                except FileExistsError:
                    raise ConversionFailed(f"{conv.final_path} appeared meanwhile", errno.EEXIST) from None
                except OSError as e:
                    raise ConversionFailed(f"cannot create {conv.final_path}: {e.strerror}",
                                           e.errno or errno.EIO) from None
            conv.published_fd = os.open(f"/proc/self/fd/{conv.fd}", os.O_RDONLY | os.O_CLOEXEC)
            conv.published = True
            log.info("converted %s (%s, %d pages) in %.1f s", conv.final_path, result.source_format,
                     sum(result.populated), time.monotonic() - conv.started)
        except BaseException as e:
            conv.error = e
            log.warning("conversion of %s failed: %s", fname, e)
            raise
        finally:
            self._discard(conv)
            conv.ended = time.monotonic()
            with self._lock:
                self.active.pop(conv.name, None)
                self.finished[conv.name] = conv  # failures stay listed in STATUS too

    def _discard(self, conv: Conversion) -> None:
        """Remove the temporary's name and close what the conversion had open."""
        try:
            publish.remove_temporary(self.dir_fd, conv.tmp_path)
        except OSError as e:
            log.warning("cannot remove %s/%s: %s", self.backing, conv.tmp_path, e.strerror)
        if conv.fd >= 0:
            os.close(conv.fd)
            conv.fd = -1
        conv.assembler.close()

    def status_text(self) -> bytes:
        lines = []
        with self._lock:
            convs = list(self.active.values()) + list(self.finished.values())
        for c in convs:
            elapsed = (c.ended or time.monotonic()) - c.started
            why = f"\t{c.error}" if c.error is not None and not c.published else ""
            lines.append(f"{os.fsdecode(c.name)}\t{c.state}\t{c.assembler.consumed}\t{c.assembler.size}\t"
                         f"{elapsed:.1f}s{why}")
        return ("\n".join(lines) + "\n").encode() if lines else b""

