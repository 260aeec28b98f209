"""Guest-physical memory: where each RAM block sits in the guest's address space.

x86 ``pc``/``q35`` machines map the machine's RAM twice around the PCI hole: RAM offsets
``[0, below_4g)`` at the same guest-physical addresses, the rest at 4 GiB and up. The RAM is
one block (``pc.ram`` or the ``-machine memory-backend``), or one memory backend per NUMA node
laid end to end in node order; the split follows QEMU 10.0's rules for the machine type in the
image and the total RAM size (hw/i386/pc_piix.c ``pc_init1``, hw/i386/pc_q35.c
``pc_q35_init``). The BIOS block sits just below 4 GiB, DIMMs where libvirt's domain XML
says they were plugged. Blocks whose address the save does not record (PCI BARs, option ROMs,
fw_cfg blobs, NUMA backends of a bare stream) are left out, with the reason, rather than
guessed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from ramfs.errors import RamfsError
from ramfs.image.model import Image, RamBlock

GiB = 1 << 30
FOUR_GIB = 4 * GiB
# pc_piix.c: the default max-ram-below-4g, and the gigabyte-aligned split used since 1.7.
PIIX_MAX_RAM_BELOW_4G = 0xE0000000
PIIX_GIGABYTE_SPLIT = 0xC0000000
# pc_q35.c: "traditional" 2 GiB split once RAM reaches 0xb0000000, else all RAM is low.
Q35_SPLIT_THRESHOLD = 0xB0000000
Q35_SPLIT = 0x80000000
MAIN_RAM_IDS = ("pc.ram", "mach-virt.ram")  # default_ram_id of x86 pc/q35 and arm virt
# hw/arm/virt.c base_memmap[VIRT_MEM]: the RAM of an arm virt machine starts at 1 GiB, whole.
ARM_VIRT_MEM_BASE = 0x40000000
ARM_VIRT_FLASH_IDS = ("virt.flash0", "virt.flash1")
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
    warnings: tuple[str, ...] = ()  # what could not be known (info and check print them)

    @property
    def size(self) -> int:
        return max((r.gpa + r.length for r in self.ranges), default=0)

    def as_json(self) -> dict[str, Any]:
        return {"machine": self.machine, "below_4g": self.below_4g,
                "ranges": [{"gpa": r.gpa, "length": r.length, "block_offset": r.block_offset,
                            "block": r.block} for r in self.ranges],
                "omitted": [{"idstr": i, "reason": why} for i, why in self.omitted],
                "warnings": list(self.warnings)}


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
    m = re.fullmatch(r"virt(?:-(\d+)\.(\d+))?", machine)  # hw/arm/virt.c (also riscv's "virt": see below)
    if m:
        return "virt", (int(m.group(1)), int(m.group(2))) if m.group(1) else None
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


@dataclass(frozen=True)
class Placement:
    """What the user says of a layout a save does not record: the RAM split below 4 GiB
    (``max-ram-below-4g``), the NUMA node backends in node order, memory devices' addresses."""

    below_4g: int | None = None
    numa: tuple[str, ...] | None = None
    devices: tuple[tuple[str, int], ...] = ()

    @classmethod
    def parse(cls, below_4g: int | None = None, numa: str | None = None,
              devices: list[str] | None = None) -> Placement:
        """From the command line: ``numa`` as ``ID:ID...`` (or commas), ``devices`` as
        ``ID@ADDR`` items (each may hold several, ``:``-separated, as -o options need)."""
        order = tuple(n for n in re.split(r"[:,]", numa) if n) if numa else None
        placed = []
        for item in devices or ():
            for spec in (x for x in item.split(":") if x):
                bid, at, addr = spec.rpartition("@")
                try:
                    gpa = int(addr, 0)
                except ValueError:
                    gpa = -1
                if not at or not bid or gpa < 0:
                    raise RamfsError(f"--device {spec!r}: expected ID@ADDR, e.g. memdimm0@0x100000000")
                placed.append((bid, gpa))
        return cls(below_4g, order, tuple(placed))

    def map(self, image: Image) -> PhysMap:
        return phys_map(image, self.below_4g, numa=self.numa, devices=dict(self.devices) or None)


# Firmware and device blocks that are never the machine's RAM.
NOT_RAM_IDS = BIOS_IDS + ("pc.rom",) + ARM_VIRT_FLASH_IDS
# Memory devices ramfs cannot place from the saved state alone (libvirt model names).
UNPLACEABLE_MODELS = {
    "virtio-mem": "virtio-mem: which of its blocks the guest has plugged is device state ramfs does not decode",
    "virtio-pmem": "virtio-pmem: its address is set by the PCI device, not recorded in the domain XML",
    "nvdimm": "NVDIMM: ramfs does not lay out its label area",
    "sgx-epc": "SGX EPC: not guest RAM that a dump holds",
}


def _layout_of(image: Image, numa: tuple[str, ...] | None, devices: dict[str, int] | None
               ) -> tuple[list[RamBlock], dict[str, int], dict[str, str], list[str]]:
    """(the blocks that make the machine's RAM in NUMA node order, where each memory device
    goes, why the others are left out, warnings), from the options, else the domain XML,
    else what the save says unambiguously. Never a guess: a block whose place cannot be
    known is left out with the reason, and the reason is a warning too."""
    from ramfs.format.libvirt import domain_memory

    by_id = {b.idstr: b for b in image.blocks}
    dom = domain_memory(image.domain_xml) if image.domain_xml else None
    placed: dict[str, int] = {}
    reasons: dict[str, str] = {}
    warnings: list[str] = []
    for dev in dom.devices if dom else ():
        bid = dev.backend_id
        if bid is None or bid not in by_id:
            continue
        if dev.model in UNPLACEABLE_MODELS:
            reasons[bid] = UNPLACEABLE_MODELS[dev.model]
        elif dev.base is not None:
            placed[bid] = dev.base
        else:
            reasons[bid] = f"memory device ({dev.model}) without an address in the domain XML"
    for bid, gpa in (devices or {}).items():
        if bid not in by_id:
            raise RamfsError(f"--device {bid}@{gpa:#x}: the image has no RAM block {bid!r}")
        placed[bid] = gpa
        reasons.pop(bid, None)
    if numa:
        missing = [n for n in numa if n not in by_id]
        if missing:
            raise RamfsError(f"--numa: the image has no RAM block {missing[0]!r}")
        return [by_id[n] for n in numa], placed, reasons, warnings
    if dom is not None and dom.cells:
        ids = [c.backend_id for c in dom.cells if c.memory]
        if all(i in by_id for i in ids):
            for c in dom.cells:
                blk = by_id[c.backend_id] if c.memory else None
                if blk is not None and blk.used_length != c.memory:
                    warnings.append(f"NUMA cell {c.id} of the domain XML has {c.memory} bytes, "
                                    f"block {c.backend_id} {blk.used_length}: no guest-physical layout")
                    for i in ids:
                        reasons[i] = "NUMA cells of the domain XML do not match the save's memory backends"
                    return [], placed, reasons, warnings
            return [by_id[i] for i in ids], placed, reasons, warnings
        # libvirt's legacy "-numa node,mem=" (no backends): the RAM is still one pc.ram.
    if any(b.idstr in MAIN_RAM_IDS for b in image.blocks):
        return [b for b in image.blocks if b.idstr in MAIN_RAM_IDS], placed, reasons, warnings
    # -machine memory-backend=ID (one backend) or -numa with memdevs (one per node): the
    # candidates are the blocks no device owns ('/' in the idstr), not firmware, not placed.
    candidates = [b for b in image.blocks if "/" not in b.idstr and b.idstr not in NOT_RAM_IDS
                  and b.idstr not in placed and b.idstr not in reasons]
    if len(candidates) == 1:
        return candidates, placed, reasons, warnings  # one backend: node order cannot matter
    if candidates:
        names = ", ".join(b.idstr for b in candidates)
        why = (f"one of {len(candidates)} memory backends ({names}): the save does not record which are "
               "NUMA nodes and in what order (libvirt's domain XML does; else give --numa "
               f"{':'.join(b.idstr for b in candidates)} in node order, --device ID@ADDR for DIMMs)")
        for b in candidates:
            reasons[b.idstr] = why
        warnings.append(f"guest RAM not placed: {why}")
    return [], placed, reasons, warnings


def phys_map(image: Image, below_4g: int | None = None, *, numa: tuple[str, ...] | None = None,
             devices: dict[str, int] | None = None) -> PhysMap:
    """Where each RAM block sits in guest-physical memory, by QEMU's rules for the machine.

    x86: the machine's RAM is one block (``pc.ram``, or the ``-machine memory-backend``) or
    one memory backend per NUMA node, laid end to end in node order
    (hw/core/numa.c numa_init_memdev_container) and that whole split around the PCI hole by
    the total RAM size (``below_4g_for``). DIMMs sit where they were plugged (the domain XML
    records it, or ``devices``). ``numa``: the node backends in node order, for saves
    without a domain XML.
    """
    machine = image.layout.machine
    kind = _machine_kind(machine)[0]
    ranges: list[PhysRange] = []
    omitted: list[tuple[str, str]] = []
    if kind == "virt" and any(b.idstr in ARM_VIRT_FLASH_IDS + ("mach-virt.ram",) for b in image.blocks) is False \
            and not any(b.idstr.startswith("ram-node") for b in image.blocks):
        kind = None  # riscv's or loongarch's "virt": another layout (not known here)
    if kind is None:
        why = f"machine type {machine!r} has no known RAM layout"
        return PhysMap((), tuple((b.idstr, why) for b in image.blocks), machine, None, ())
    main, placed, reasons, warnings = _layout_of(image, numa, devices)
    split_used = None
    main_ids = {b.idstr for b in main}
    if main and kind == "virt":
        # One contiguous RAM region at 1 GiB, node backends end to end (numa_init_memdev_container).
        base = ARM_VIRT_MEM_BASE
        for b in main:
            ranges.append(PhysRange(base, b.used_length, b.index, 0))
            base += b.used_length
    elif main:
        total = sum(b.used_length for b in main)
        split = below_4g if below_4g is not None else below_4g_for(machine, total)
        if split is None:
            for b in main:
                reasons[b.idstr] = f"machine type {machine!r} has no known RAM layout"
            main_ids = set()
        else:
            split = split_used = min(split, total)
            base = 0  # offset of this block in the machine's RAM (the backends end to end)
            for b in main:
                lo, hi = base, base + b.used_length
                if lo < split:
                    ranges.append(PhysRange(lo, min(hi, split) - lo, b.index, 0))
                if hi > split:
                    start = max(lo, split)
                    ranges.append(PhysRange(FOUR_GIB + start - split, hi - start, b.index, start - lo))
                base = hi
    for blk in image.blocks:
        if blk.idstr in main_ids:
            continue
        if blk.idstr in placed:
            ranges.append(PhysRange(placed[blk.idstr], blk.used_length, blk.index, 0))
        elif blk.idstr in BIOS_IDS and kind in ("pc", "q35"):
            # The BIOS image is mapped so that it ends at 4 GiB (x86_bios_rom_init).
            ranges.append(PhysRange(FOUR_GIB - blk.used_length, blk.used_length, blk.index, 0))
        elif blk.idstr in reasons:
            omitted.append((blk.idstr, reasons[blk.idstr]))
        elif blk.idstr in ARM_VIRT_FLASH_IDS and kind == "virt":
            omitted.append((blk.idstr, "pflash (a ROM device): not RAM, not in QEMU's dump-guest-memory"))
        elif blk.idstr == "pc.rom":
            omitted.append((blk.idstr, "option ROM area: routed by the chipset's PAM registers, not decoded"))
        elif "/" not in blk.idstr:
            omitted.append((blk.idstr, "a memory backend that is neither the machine's RAM nor a memory "
                                       "device with a known address (--device ID@ADDR places it)"))
        else:
            omitted.append((blk.idstr, "address set by the guest or a device (PCI BAR, option ROM, "
                                       "fw_cfg); not described by the saved state"))
    ranges.sort(key=lambda r: r.gpa)
    for prev, nxt in zip(ranges, ranges[1:]):
        if prev.gpa + prev.length > nxt.gpa:
            raise RamfsError(f"guest-physical ranges overlap at {nxt.gpa:#x} (is --below-4g right?)")
    return PhysMap(tuple(ranges), tuple(omitted), machine, split_used, tuple(warnings))
