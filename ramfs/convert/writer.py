"""Writes a mapped-ram image: fixed regions per RAM block, pages put at their slots.

The layout is decided up front from the block list, exactly as QEMU's ``ram_save_setup`` with
``mapped-ram`` decides it, so pages can be written as they arrive, in any order, by several
writers (``jobs``), like multifd channels. Zero pages are never written: they stay holes with
their bit clear. A page that turns to zero after having been written (a later record wins) has
its slot punched back into a hole. Bitmaps are written last, as QEMU does.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import mmap
import os
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass

from ramfs.errors import ImageIOError
from ramfs.format import encode
from ramfs.format.qemu import RamBlockRecord, RamSetup, bitmap_size

BATCH_BYTES = 1 << 20  # one pwritev per run of up to 1 MiB of consecutive pages
STRIPE_PAGES = 256  # a page always goes to the same writer: per-page order is kept

_FALLOC_FL_KEEP_SIZE = 0x01
_FALLOC_FL_PUNCH_HOLE = 0x02
_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong]
_libc.sync_file_range.argtypes = [ctypes.c_int, ctypes.c_longlong, ctypes.c_longlong, ctypes.c_uint]
_SYNC_FILE_RANGE_WRITE = 2
# Start writeback every this many bytes written: the final fsync then finds little left to
# do, and the disk writes while the parser works (instead of after it, as with a plain
# write-then-fsync, where the kernel starts writing only at its dirty_background threshold).
WRITEBACK_BYTES = 32 << 20


def start_writeback(fd: int) -> None:
    """Ask the kernel to start writing the file's dirty pages, without waiting for them."""
    _libc.sync_file_range(fd, 0, 0, _SYNC_FILE_RANGE_WRITE)


def punch_hole(fd: int, offset: int, length: int) -> None:
    """Deallocate a range (reads give zeros); falls back to writing zeros."""
    if _libc.fallocate(fd, _FALLOC_FL_PUNCH_HOLE | _FALLOC_FL_KEEP_SIZE, offset, length) != 0:
        os.pwrite(fd, bytes(length), offset)


@dataclass(frozen=True)
class BlockLayout:
    record: RamBlockRecord
    header_offset: int
    bitmap_offset: int
    pages_offset: int
    end: int  # where the next block record (or the closing EOS) goes


def plan_blocks(blocks: tuple[RamBlockRecord, ...], first_record_offset: int, page_size: int) -> list[BlockLayout]:
    """Place every block like ``ram_save_setup``: record, header, bitmap, 1 MiB-aligned pages."""
    out = []
    pos = first_record_offset
    for rec in blocks:
        header = pos + len(encode.block_record(rec.idstr, rec.used_length))
        bitmap, pages, end = encode.mapped_ram_region(header, rec.used_length, page_size)
        out.append(BlockLayout(rec, header, bitmap, pages, end))
        pos = end
    return out


Payload = bytes | memoryview
_Item = tuple[int, list[Payload] | None, int | None]  # offset, buffers to write or None, length to punch


class _Writer(threading.Thread):
    """One writer thread: a FIFO of (offset, buffers, None) to write or (offset, None, length)
    to punch; None ends it."""

    def __init__(self, fd: int, direct_fd: int | None, errors: list[OSError]):
        super().__init__(daemon=True)
        self.fd = fd
        self.direct_fd = direct_fd
        self.q: queue.Queue[_Item | None] = queue.Queue(maxsize=16)
        self.errors = errors
        self._aligned: mmap.mmap | None = None
        self.dirty = 0

    def run(self) -> None:
        while True:
            item = self.q.get()
            if item is None:
                return
            if self.errors:
                continue  # drain after a failure
            try:
                _write_item(self, item)
            except OSError as e:
                self.errors.append(e)


def _write_item(w: _Writer, item: _Item) -> None:
    offset, bufs, punch = item
    if punch:
        punch_hole(w.fd, offset, punch)
        return
    assert bufs is not None
    total = sum(len(b) for b in bufs)
    if w.direct_fd is not None:
        # O_DIRECT needs an aligned buffer: slots are page-aligned and 1 MiB regions aligned.
        if w._aligned is None:
            w._aligned = mmap.mmap(-1, BATCH_BYTES)
        pos = 0
        for b in bufs:
            w._aligned[pos:pos + len(b)] = b
            pos += len(b)
        _pwrite_all(w.direct_fd, memoryview(w._aligned)[:total], offset)
    else:
        done = os.pwritev(w.fd, bufs, offset)
        if done != total:
            _pwrite_all(w.fd, memoryview(b"".join(bufs))[done:], offset + done)
        w.dirty += total
        if w.dirty >= WRITEBACK_BYTES:
            w.dirty = 0
            start_writeback(w.fd)


def _pwrite_all(fd: int, data: memoryview, offset: int) -> None:
    while len(data):
        n = os.pwrite(fd, data, offset)
        if n <= 0:
            raise OSError(errno.EIO, "short write")
        data = data[n:]
        offset += n


class MappedRamWriter:
    """Collects pages and writes them to ``fd`` at their slots (see the module docstring).

    The parser's record sink (:class:`ramfs.format.qemu.RecordSink`): at :meth:`start`,
    ``plan`` places the blocks (and writes what precedes the pages); then records arrive
    in stream order; :meth:`finish` (or :meth:`abort`) ends it.
    """

    def __init__(self, fd: int, plan: Callable[[RamSetup], list[BlockLayout]], *, jobs: int = 1,
                 direct_fd: int | None = None):
        self.fd = fd
        self._plan = plan
        self._jobs = max(1, jobs)
        self._direct_fd = direct_fd
        self.layout: list[BlockLayout] = []
        self.ps = 0
        self.bitmaps: list[bytearray] = []
        self.errors: list[OSError] = []
        self.writers: list[_Writer] = []
        self._zero = b""
        self._batch_block = -1
        self._batch_start = 0
        self._batch: list[Payload] = []
        self.pages_written = 0
        self.zero_pages = 0

    def start(self, ram: RamSetup) -> None:
        """The block list is known: place the blocks, start the writer threads."""
        self.layout = self._plan(ram)
        self.ps = ram.page_size
        self._zero = bytes(ram.page_size)
        self.bitmaps = [bytearray(bitmap_size(b.record.used_length // ram.page_size))
                        for b in self.layout]
        self.writers = [_Writer(self.fd, self._direct_fd, self.errors) for _ in range(self._jobs)]
        for w in self.writers:
            w.start()

    def pages(self, block: int, first: int, count: int, buf: bytes, pos: int, stride: int,
              offset: int) -> None:
        """PAGE records for consecutive pages, payload ``n`` at ``buf[pos + n * stride:]``.

        A payload of zeros is a zero page (found by ``bytes.startswith``, a memcmp). A run's
        payloads are kept as views of the window (immutable ``bytes``, alive until written):
        no copy per page; a single record's is copied, so that a batch never holds on to
        one window per page.
        """
        ps = self.ps
        zero = self._zero
        if type(buf) is not bytes:  # a window that could change: keep copies only
            buf = bytes(buf[pos:pos + (count - 1) * stride + ps])
            pos = 0
        if count == 1:
            if buf.startswith(zero, pos):
                self._zero_page(block, first)
            else:
                self._data(block, first, buf[pos:pos + ps])
            return
        view = memoryview(buf)
        for n in range(count):
            o = pos + n * stride
            if buf.startswith(zero, o):
                self._zero_page(block, first + n)
            else:
                self._data(block, first + n, view[o:o + ps])

    def zeros(self, block: int, first: int, count: int) -> None:
        """ZERO records for consecutive pages."""
        for page in range(first, first + count):
            self._zero_page(block, page)

    def _zero_page(self, block: int, page: int) -> None:
        """A page that reads as zeros: its bit cleared, its slot punched if it had data."""
        self.zero_pages += 1
        bm = self.bitmaps[block]
        bit = 1 << (page & 7)
        if bm[page >> 3] & bit:
            bm[page >> 3] &= ~bit
            self._flush()
            self._send(block, page, None)

    def _data(self, block: int, page: int, payload: Payload) -> None:
        """A page with data: its bit set, its payload joined to the batch (a run of
        consecutive pages, up to BATCH_BYTES, never across a stripe) or starting a new one."""
        self.bitmaps[block][page >> 3] |= 1 << (page & 7)
        self.pages_written += 1
        batch = self._batch
        if (block == self._batch_block and page == self._batch_start + len(batch)
                and len(batch) * self.ps < BATCH_BYTES and page % STRIPE_PAGES != 0):
            batch.append(payload)
            return
        self._flush()
        self._batch_block, self._batch_start, self._batch = block, page, [payload]

    def _flush(self) -> None:
        if self._batch:
            self._send(self._batch_block, self._batch_start, self._batch)
            self._batch = []
            self._batch_block = -1

    def _send(self, block: int, page: int, bufs: list[Payload] | None) -> None:
        if self.errors:
            raise _io_error(self.errors[0])
        off = self.layout[block].pages_offset + page * self.ps
        item = (off, bufs, None) if bufs is not None else (off, None, self.ps)
        self.writers[(page // STRIPE_PAGES + block) % len(self.writers)].q.put(item)

    def finish(self) -> None:
        """Wait for every page write, then write the bitmaps."""
        self._flush()
        for w in self.writers:
            w.q.put(None)
        for w in self.writers:
            w.join()
        if self.errors:
            raise _io_error(self.errors[0])
        for blk, bm in zip(self.layout, self.bitmaps):
            _pwrite_all(self.fd, memoryview(bytes(bm)), blk.bitmap_offset)

    def abort(self) -> None:
        self._batch = []
        for w in self.writers:
            self.errors.append(OSError(errno.ECANCELED, "aborted"))
            w.q.put(None)
        for w in self.writers:
            w.join(timeout=10)


def _io_error(e: OSError) -> ImageIOError:
    return ImageIOError(f"writing the converted image failed: {e.strerror or e}", e.errno)
