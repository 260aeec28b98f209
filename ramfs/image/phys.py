"""Guest-physical memory: where each RAM block sits in the guest's address space.

x86 ``pc``/``q35`` machines map the main RAM block twice around the PCI hole: block offsets
``[0, below_4g)`` at the same guest-physical addresses, the rest at 4 GiB and up. The split
follows QEMU 10.0's rules for the machine type in the image (hw/i386/pc_piix.c ``pc_init1``,
hw/i386/pc_q35.c ``pc_q35_init``). The BIOS block sits just below 4 GiB. Blocks whose address
depends on device state QEMU does not describe (PCI BARs, option ROMs, fw_cfg blobs) are left
out, with the reason, rather than guessed.
"""

from __future__ import annotations

import bisect
import re
from dataclasses import dataclass
from typing import Iterator

from ramfs.errors import RamfsError
from ramfs.image.model import Image

GiB = 1 << 30
FOUR_GIB = 4 * GiB
# pc_piix.c: the default max-ram-below-4g, and the gigabyte-aligned split used since 1.7.
PIIX_MAX_RAM_BELOW_4G = 0xE0000000
PIIX_GIGABYTE_SPLIT = 0xC0000000
# pc_q35.c: "traditional" 2 GiB split once RAM reaches 0xb0000000, else all RAM is low.
Q35_SPLIT_THRESHOLD = 0xB0000000
Q35_SPLIT = 0x80000000
MAIN_RAM_IDS = ("pc.ram",)  # x86 default_ram_id; a memory-backend id replaces it
BIOS_IDS = ("pc.bios",)


@dataclass(frozen=True)
class PhysRange:
    gpa: int
    length: int
    block: int  # index into image.blocks
    block_offset: int


@dataclass(frozen=True)
class PhysMap:
    ranges: tuple[PhysRange, ...]
    omitted: tuple[tuple[str, str], ...]  # (idstr, why it is not placed)
    machine: str | None
    below_4g: int | None

    @property
    def size(self) -> int:
        return max((r.gpa + r.length for r in self.ranges), default=0)

    def as_json(self) -> dict:
        return {"machine": self.machine, "below_4g": self.below_4g,
                "ranges": [{"gpa": r.gpa, "length": r.length, "block_offset": r.block_offset,
                            "block": r.block} for r in self.ranges],
                "omitted": [{"idstr": i, "reason": why} for i, why in self.omitted]}


def _machine_kind(machine: str | None) -> tuple[str | None, tuple[int, int] | None]:
    if not machine:
        return None, None
    m = re.fullmatch(r"pc-(i440fx|q35)-(\d+)\.(\d+)", machine)
    if m:
        return ("pc" if m.group(1) == "i440fx" else "q35"), (int(m.group(2)), int(m.group(3)))
    m = re.fullmatch(r"pc-(\d+)\.(\d+)", machine)  # the oldest i440fx names: pc-0.x, pc-1.x
    if m:
        return "pc", (int(m.group(1)), int(m.group(2)))
    if machine in ("pc", "q35"):
        return machine, None
    return None, None


def below_4g_for(machine: str | None, ram_size: int) -> int | None:
    """How much of the main RAM block sits below 4 GiB, by QEMU's rules (None: unknown machine)."""
    kind, version = _machine_kind(machine)
    if kind == "pc":
        lowmem = PIIX_MAX_RAM_BELOW_4G
        if ram_size >= lowmem and (version is None or version >= (1, 7)):
            lowmem = min(lowmem, PIIX_GIGABYTE_SPLIT)  # gigabyte_align
        return min(ram_size, lowmem)
    if kind == "q35":
        lowmem = Q35_SPLIT if ram_size >= Q35_SPLIT_THRESHOLD else Q35_SPLIT_THRESHOLD
        return min(ram_size, lowmem)
    return None


def phys_map(image: Image, below_4g: int | None = None) -> PhysMap:
    machine = image.layout.machine
    ranges: list[PhysRange] = []
    omitted: list[tuple[str, str]] = []
    split_used = None
    main_ids = set(MAIN_RAM_IDS)
    if not any(b.idstr in main_ids for b in image.blocks):
        # -machine memory-backend=ID names the main RAM block after the backend: take the
        # largest block that is not a device's (no '/') and not firmware.
        candidates = [b for b in image.blocks if "/" not in b.idstr and b.idstr not in BIOS_IDS + ("pc.rom",)]
        if candidates:
            main_ids = {max(candidates, key=lambda b: b.used_length).idstr}
    for blk in image.blocks:
        if blk.idstr in main_ids:
            split = below_4g if below_4g is not None else below_4g_for(machine, blk.used_length)
            if split is None:
                omitted.append((blk.idstr, f"machine type {machine!r} has no known RAM layout"))
                continue
            split = min(split, blk.used_length)
            split_used = split
            if split:
                ranges.append(PhysRange(0, split, blk.index, 0))
            if blk.used_length > split:
                ranges.append(PhysRange(FOUR_GIB, blk.used_length - split, blk.index, split))
        elif blk.idstr in BIOS_IDS and _machine_kind(machine)[0] is not None:
            # The BIOS image is mapped so that it ends at 4 GiB (x86_bios_rom_init).
            ranges.append(PhysRange(FOUR_GIB - blk.used_length, blk.used_length, blk.index, 0))
        else:
            omitted.append((blk.idstr, "address set by the guest or a device (PCI BAR, PAM, "
                                       "fw_cfg); not described by the saved state"))
    ranges.sort(key=lambda r: r.gpa)
    for a, b in zip(ranges, ranges[1:]):
        if a.gpa + a.length > b.gpa:
            raise RamfsError(f"guest-physical ranges overlap at {b.gpa:#x} (is --below-4g right?)")
    return PhysMap(tuple(ranges), tuple(omitted), machine, split_used)


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
        parts = []
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
