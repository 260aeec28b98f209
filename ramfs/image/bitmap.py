"""Mapped-ram bitmaps (:class:`Bitmap`): held whole when small (:class:`DenseBitmap`), read
only where the file holds data when big (:class:`SparseBitmap`).

QEMU writes a block's bitmap in full (``ram_save_file_bmap``), so for real guests it is as
big as it says: 32 KiB per GiB of RAM. A file may also *claim* a huge block and leave the
bitmap a hole: a sparse file is free, and its bitmap then reads as zeros. Reading such a
bitmap into memory (64 MiB for a 2 TiB claim, 1 GiB at QEMU's 2^52-byte limit) would let a
few hundred bytes of hostile file allocate without bound. Above :data:`SPARSE_FROM`, only the
file's data ranges (``SEEK_DATA``/``SEEK_HOLE``) are read, and only chunks with a set bit are
kept: memory follows what the file stores, never what it claims.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Iterator

from ramfs.errors import TruncatedError
from ramfs.format.qemu import RamBlockRecord, bitmap_size, bits_beyond, populated_count, read_bitmap, set_runs
from ramfs.image.files import FileSource
from ramfs.ranges import merge_ranges

SPARSE_FROM = 1 << 20  # bitmap bytes: blocks above 32 GiB of 4 KiB pages
CHUNK = 1 << 16  # bytes per kept piece: 2 GiB of guest RAM in 4 KiB pages


class Bitmap(ABC):
    """A mapped-ram block's bitmap, one bit per page (LSB first within little-endian
    words, as ``ram_save_file_bmap`` writes it), however it is kept in memory."""

    @abstractmethod
    def __bool__(self) -> bool:
        """False when no bit can be set (a block with no bitmap, or nothing stored)."""

    @abstractmethod
    def pieces(self) -> Iterator[tuple[int, bytes]]:
        """``(first_bit, bytes)`` pieces, ascending, that hold every set bit."""

    @abstractmethod
    def set_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """``(start, stop)`` runs of set bits within ``[first, last)``, as
        :func:`ramfs.format.qemu.set_runs`."""

    @abstractmethod
    def populated_count(self, num_pages: int) -> int:
        """Set bits among the first ``num_pages``."""

    @abstractmethod
    def bits_beyond(self, num_pages: int) -> int:
        """Set bits past the first ``num_pages`` (QEMU ignores them)."""


class DenseBitmap(Bitmap):
    """A bitmap held whole (empty for a block that stores nothing)."""

    def __init__(self, data: bytes):
        self.data = data

    def __bool__(self) -> bool:
        return bool(self.data)

    def pieces(self) -> Iterator[tuple[int, bytes]]:
        if self.data:
            yield 0, self.data

    def set_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        return set_runs(self.data, first, last)

    def populated_count(self, num_pages: int) -> int:
        return populated_count(self.data, num_pages) if self.data else 0

    def bits_beyond(self, num_pages: int) -> int:
        return bits_beyond(self.data, num_pages) if self.data else 0


class SparseBitmap(Bitmap):
    """A bitmap of ``size`` bytes kept as its non-zero ``CHUNK``-byte pieces."""

    def __init__(self, size: int, chunks: dict[int, bytes]):
        self.size = size
        self.chunks = chunks
        self._order = sorted(chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def pieces(self) -> Iterator[tuple[int, bytes]]:
        for no in self._order:
            yield no * CHUNK * 8, self.chunks[no]

    def set_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        """Runs merged across pieces."""
        yield from merge_ranges(self._piece_runs(first, last))

    def _piece_runs(self, first: int, last: int) -> Iterator[tuple[int, int]]:
        for base, bits in self.pieces():
            if base >= last:
                break
            lo, hi = max(first, base), min(last, base + len(bits) * 8)
            if lo < hi:
                for a, b in set_runs(bits, lo - base, hi - base):
                    yield a + base, b + base

    def populated_count(self, num_pages: int) -> int:
        bits = CHUNK * 8
        return sum(populated_count(c, max(0, min(len(c) * 8, num_pages - no * bits)))
                   for no, c in self.chunks.items())

    def bits_beyond(self, num_pages: int) -> int:
        bits = CHUNK * 8
        total = 0
        for no, c in self.chunks.items():
            local = num_pages - no * bits
            if local <= 0:
                total += populated_count(c, len(c) * 8)
            elif local < len(c) * 8:
                total += bits_beyond(c, local)
        return total


def load_bitmap(src: FileSource, block: RamBlockRecord) -> Bitmap:
    """A block's bitmap: a :class:`DenseBitmap` when small, else a :class:`SparseBitmap` of
    the file's data (when ``src`` can tell where that is: ``data_ranges``)."""
    hdr = block.mapped
    ranges = getattr(src, "data_ranges", None)
    if hdr is None or not hdr.stored or ranges is None:
        return DenseBitmap(read_bitmap(src, block))
    n = bitmap_size(block.used_length // hdr.page_size)
    if n <= SPARSE_FROM:
        return DenseBitmap(read_bitmap(src, block))
    start = hdr.bitmap_offset
    if src.size < start + n:
        raise TruncatedError(f"bitmap of {block.idstr!r} needs {n} bytes, file has "
                             f"{max(0, src.size - start)}", start)
    chunks: dict[int, bytes] = {}
    for a, b in ranges(start, start + n):
        no = (a - start) // CHUNK
        while no * CHUNK < b - start:
            if no not in chunks:
                data = src.read_at(start + no * CHUNK, min(CHUNK, n - no * CHUNK))
                if data.count(0) != len(data):
                    chunks[no] = data
            no += 1
    return SparseBitmap(n, chunks)
