"""Big mapped-ram bitmaps, read only where the file holds data.

QEMU writes a block's bitmap in full (``ram_save_file_bmap``), so for real guests it is as
big as it says: 32 KiB per GiB of RAM. A file may also *claim* a huge block and leave the
bitmap a hole: a sparse file is free, and its bitmap then reads as zeros. Reading such a
bitmap into memory (64 MiB for a 2 TiB claim, 1 GiB at QEMU's 2^52-byte limit) would let a
few hundred bytes of hostile file allocate without bound. Above :data:`SPARSE_FROM`, only the
file's data ranges (``SEEK_DATA``/``SEEK_HOLE``) are read, and only chunks with a set bit are
kept: memory follows what the file stores, never what it claims.
"""

from __future__ import annotations

from ramfs.errors import TruncatedError
from ramfs.format.qemu import RamBlockRecord, bitmap_size, bits_beyond, populated_count, read_bitmap, set_runs

SPARSE_FROM = 1 << 20  # bitmap bytes: blocks above 32 GiB of 4 KiB pages
CHUNK = 1 << 16  # bytes per kept piece: 2 GiB of guest RAM in 4 KiB pages


class SparseBitmap:
    """A bitmap of ``size`` bytes kept as its non-zero ``CHUNK``-byte pieces."""

    def __init__(self, size: int, chunks: dict[int, bytes]):
        self.size = size
        self.chunks = chunks
        self._order = sorted(chunks)

    def __bool__(self) -> bool:
        return bool(self.chunks)

    def set_runs(self, first: int, last: int):
        """As :func:`ramfs.format.qemu.set_runs`, runs merged across pieces."""
        bits = CHUNK * 8
        cur = None
        for no in self._order:
            base = no * bits
            if base >= last:
                break
            lo, hi = max(first, base), min(last, base + len(self.chunks[no]) * 8)
            if lo >= hi:
                continue
            for a, b in set_runs(self.chunks[no], lo - base, hi - base):
                a += base
                b += base
                if cur is not None and cur[1] == a:
                    cur = (cur[0], b)
                else:
                    if cur is not None:
                        yield cur
                    cur = (a, b)
        if cur is not None:
            yield cur

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


def load_bitmap(src, block: RamBlockRecord) -> bytes | SparseBitmap:
    """A block's bitmap: ``bytes`` when small, else a :class:`SparseBitmap` of its data."""
    hdr = block.mapped
    ranges = getattr(src, "data_ranges", None)
    if hdr is None or not hdr.stored or ranges is None:
        return read_bitmap(src, block)
    n = bitmap_size(block.used_length // hdr.page_size)
    if n <= SPARSE_FROM:
        return read_bitmap(src, block)
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
