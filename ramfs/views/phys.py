"""Guest-physical memory as one view: offset = guest-physical address (``phys/memory``).

Where each RAM block sits comes from :func:`ramfs.image.phys.phys_map` (QEMU's layout rules);
this view reads through it: placed ranges from the image, everything else as zeros.
"""

from __future__ import annotations

import bisect
from collections.abc import Iterator

from ramfs.image.model import Image
from ramfs.image.phys import PhysMap, PhysRange


class PhysView:
    """Reads by guest-physical address; unmapped addresses read as zeros."""

    def __init__(self, image: Image, pmap: PhysMap):
        self.image = image
        self.map = pmap
        self.size = pmap.size
        self._starts = [r.gpa for r in pmap.ranges]

    def _pieces(self, gpa: int, size: int) -> Iterator[tuple[int, int, PhysRange | None]]:
        """``(gpa, length, range or None)`` covering ``[gpa, gpa+size)``."""
        end = min(gpa + size, self.size)
        pos = gpa
        i = max(0, bisect.bisect_right(self._starts, pos) - 1)
        ranges = self.map.ranges
        while pos < end:
            while i < len(ranges) and ranges[i].gpa + ranges[i].length <= pos:
                i += 1
            if i >= len(ranges):
                yield pos, end - pos, None
                return
            r = ranges[i]
            if pos < r.gpa:
                n = min(end, r.gpa) - pos
                yield pos, n, None
            else:
                n = min(end, r.gpa + r.length) - pos
                yield pos, n, r
            pos += n

    def read(self, gpa: int, size: int, nowait: bool = False) -> bytes:
        """``nowait`` as for :meth:`Image.read`: only from the page cache, else WouldBlock."""
        if gpa >= self.size or size <= 0:
            return b""
        parts: list[bytes | bytearray] = []
        for pos, n, r in self._pieces(gpa, size):
            if r is None:
                parts.append(bytes(n))
            else:
                parts.append(self.image.read(self.image.blocks[r.block], r.block_offset + pos - r.gpa, n, nowait))
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)

    def has_data(self, gpa: int, size: int) -> bool:
        for pos, n, r in self._pieces(gpa, size):
            if r is not None and self.image.blocks[r.block].has_data(r.block_offset + pos - r.gpa, n):
                return True
        return False

    def populated_ranges(self, start: int = 0, end: int | None = None) -> Iterator[tuple[int, int]]:
        """Guest-physical ``(start, end)`` ranges that hold data, in address order (within
        ``[start, end)`` when given)."""
        end = self.size if end is None else end
        for r in self.map.ranges:
            if r.gpa + r.length <= start or r.gpa >= end:
                continue
            blk = self.image.blocks[r.block]
            lo = r.block_offset + max(0, start - r.gpa)
            hi = r.block_offset + min(r.length, end - r.gpa)
            for a, b in blk.populated_ranges(lo, hi):
                a, b = max(a, lo), min(b, hi)
                if a < b:
                    yield r.gpa + a - r.block_offset, r.gpa + b - r.block_offset
