"""An ELF64 core of guest-physical memory, in the layout of QEMU's ``dump-guest-memory``
(no paging): PT_NOTE with one NT_PRSTATUS and one QEMU CPU-state note per vCPU, then the
guest's own note (VMCOREINFO) when it published one through a ``vmcoreinfo`` device, then one
PT_LOAD per guest-physical RAM range, zero pages included (``p_paddr`` = ``p_vaddr`` =
guest-physical address), as QEMU writes it.

Why whole ranges: tools read a core's PT_LOADs as the only memory there is. A page missing
from them is "not in the dump" to Volatility (a task_struct with an all-zero page is skipped
without a word) and a fatal read error to crash, whereas an all-zero page is a fact about the
guest. The zero pages cost nothing: reads of them are answered with zeros, ``has_data`` says
so (``ramfs core`` leaves them as holes), and ``populated_ranges`` lists what holds data.

Served lazily: only the header and notes are built; a read past them goes to the image.
Sources: QEMU 10.0 dump/dump.c (``write_elf64_header``, ``write_elf64_load``, the guest note
in ``dump_init`` and ``write_elf64_notes``), target/i386/arch_dump.c
(``x86_64_write_elf64_note``, ``QEMUCPUState``), hw/misc/vmcoreinfo.c.
"""

from __future__ import annotations

import bisect
import enum
import logging
import struct
import weakref
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from ramfs.errors import RamfsError
from ramfs.views.phys import PhysView

if TYPE_CHECKING:
    from ramfs.format.vmstate import Aarch64CpuState, CpuState, DeviceState, VmcoreinfoState
    from ramfs.image.model import Image

log = logging.getLogger(__name__)

ELFCLASS64, ELFDATA2LSB, EV_CURRENT = 2, 1, 1
ET_CORE, EM_386, EM_X86_64, EM_AARCH64 = 4, 3, 62, 183
EFER_LMA = 1 << 10  # long mode active: QEMU's dump picks the x86_64 or the i386 layout by it
PT_LOAD, PT_NOTE = 1, 4
NT_PRSTATUS = 1
NT_PRFPREG = 2  # target/arm/arch_dump.c aarch64_write_elf64_prfpreg
QEMU_NOTE_TYPE = 0  # arch_dump.c: cpu_write_qemu_note, name "QEMU"
EHDR = struct.Struct("<16sHHIQQQIHHHHHH")
PHDR = struct.Struct("<IIQQQQQQ")
MAX_PHDRS = 0xFFFF - 2  # PN_XNUM would need a section header; not worth it here
MAX_LOADS = MAX_PHDRS - 1  # the PT_NOTE takes one
# dump.c: the guest note (the vmcoreinfo device's).
MAX_GUEST_NOTE_SIZE = 1 << 20
NHDR_SIZE = 12  # Elf64_Nhdr and Elf32_Nhdr alike: namesz, descsz, type (32 bits each)
FW_CFG_VMCOREINFO_FORMAT_ELF = 1  # as in ramfs.format.vmstate (imported lazily here)
VMCOREINFO_NOTE_NAME = b"VMCOREINFO\0"


class _Auto(enum.Enum):
    AUTO = enum.auto()


_AUTO = _Auto.AUTO  # ElfCore's vmcoreinfo: decode it from the image

# x86_64_user_regs_struct, in kernel order.
PRSTATUS_REGS = ("r15", "r14", "r13", "r12", "rbp", "rbx", "r11", "r10", "r9", "r8", "rax", "rcx",
                 "rdx", "rsi", "rdi", "orig_rax", "rip", "cs", "rflags", "rsp", "ss", "fs_base",
                 "gs_base", "ds", "es", "fs", "gs")
QEMU_GPRS = ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rsp", "rbp", "r8", "r9", "r10", "r11", "r12",
             "r13", "r14", "r15", "rip", "rflags")
QEMU_SEGMENTS = ("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt")


@dataclass(frozen=True)
class Cpu:
    """What the notes need of one vCPU; anything missing is written as 0."""

    regs: dict[str, int] = field(default_factory=dict)  # rax.., rip, rflags, cr0..cr4
    # name -> (selector, base, limit, flags)
    segments: dict[str, tuple[int, int, int, int]] = field(default_factory=dict)


def _note(name: bytes, ntype: int, desc: bytes) -> bytes:
    n = name + b"\0"

    def pad(b: bytes) -> bytes:
        return b + bytes(-len(b) % 4)

    return struct.pack("<III", len(n), len(desc), ntype) + pad(n) + pad(desc)


def prstatus(cpu: Cpu, index: int) -> bytes:
    r = dict(cpu.regs)
    for seg in ("cs", "ss", "ds", "es", "fs", "gs"):
        if seg in cpu.segments:
            r.setdefault(seg, cpu.segments[seg][0])
    if "fs" in cpu.segments:
        r.setdefault("fs_base", cpu.segments["fs"][1])
    if "gs" in cpu.segments:
        r.setdefault("gs_base", cpu.segments["gs"][1])
    regs = struct.pack("<27Q", *(r.get(k, 0) & 0xFFFFFFFFFFFFFFFF for k in PRSTATUS_REGS))
    return bytes(32) + struct.pack("<I", index + 1) + bytes(76) + regs + bytes(8)


def prstatus_i386(cpu: Cpu, index: int) -> bytes:
    """arch_dump.c x86_fill_elf_prstatus: the i386 ``elf_prstatus`` QEMU writes (in an ELF64
    note) when the first vCPU is not in long mode: 32-bit registers, 16-bit selectors."""
    r = cpu.regs
    sel = {s: cpu.segments.get(s, (0, 0, 0, 0))[0] & 0xFFFF for s in ("cs", "ss", "ds", "es", "fs", "gs")}

    def g(k: str) -> int:
        return r.get(k, 0) & 0xFFFFFFFF

    regs = struct.pack("<7I8H2I2H2I2H", g("rbx"), g("rcx"), g("rdx"), g("rsi"), g("rdi"), g("rbp"), g("rax"),
                       sel["ds"], 0, sel["es"], 0, sel["fs"], 0, sel["gs"], 0, 0, g("rip"), sel["cs"], 0,
                       g("rflags"), g("rsp"), sel["ss"], 0)
    return bytes(24) + struct.pack("<I", index + 1) + bytes(44) + regs + bytes(4)


@dataclass(frozen=True)
class Aarch64Cpu:
    """An aarch64 vCPU for the notes (its :class:`~ramfs.format.vmstate.Aarch64CpuState`)."""

    state: Aarch64CpuState


def prstatus_aarch64(cpu: Aarch64Cpu, index: int) -> bytes:
    """arch_dump.c ``aarch64_elf_prstatus``: pr_pid at 32, then x0..x30, sp, pc, pstate at
    112, pr_fpvalid 1. In AArch32 state QEMU first maps the banked AArch32 registers onto
    x0..x30 (aarch64_sync_32_to_64) and writes sp 0: here the xregs as migrated, sp 0 (a
    limit, docs/forensics.md)."""
    s = cpu.state
    x = [v or 0 for v in s.x] + [0] * (31 - len(s.x))
    sp = (s.sp or 0) if s.aarch64 else 0
    regs = struct.pack("<34Q", *(v & 0xFFFFFFFFFFFFFFFF for v in (*x[:31], sp, s.pc or 0, s.pstate or 0)))
    return bytes(32) + struct.pack("<I", index + 1) + bytes(76) + regs + struct.pack("<I", 1) + bytes(4)


def prfpreg_aarch64(cpu: Aarch64Cpu) -> bytes:
    """arch_dump.c ``aarch64_user_vfp_state``: V0..V31 (low, high), fpsr, fpcr, 8 bytes pad."""
    s = cpu.state
    halves = []
    for v in s.vregs:
        halves += list(v) if v is not None else [0, 0]
    halves += [0] * (64 - len(halves))
    return struct.pack("<64Q", *halves[:64]) + struct.pack("<II", s.fpsr or 0, s.fpcr or 0) + bytes(8)


def long_mode(cpus: list[Cpu]) -> bool:
    """dump.c decides by the first vCPU."""
    return bool(cpus and cpus[0].regs.get("efer", 0) & EFER_LMA)


def qemu_cpu_state(cpu: Cpu) -> bytes:
    body = struct.pack("<18Q", *(cpu.regs.get(k, 0) & 0xFFFFFFFFFFFFFFFF for k in QEMU_GPRS))
    for seg in QEMU_SEGMENTS:
        sel, base, limit, flags = cpu.segments.get(seg, (0, 0, 0, 0))
        body += struct.pack("<IIIIQ", sel, limit, flags, 0, base)
    body += struct.pack("<5Q", *(cpu.regs.get(f"cr{i}", 0) for i in range(5)))
    body += struct.pack("<Q", cpu.regs.get("kernel_gs_base", 0))
    return struct.pack("<II", 1, 8 + len(body)) + body


def _round4(n: int) -> int:
    return (n + 3) // 4 * 4


def guest_note(info: VmcoreinfoState | None, read: Callable[[int, int], bytes]
               ) -> tuple[bytes | None, str | None]:
    """The guest's note as ``dump-guest-memory`` appends it, or ``(None, why not)``.

    ``info`` is the vmcoreinfo device's state (:class:`~ramfs.format.vmstate.VmcoreinfoState`,
    None without the device); ``read(gpa, n)`` reads guest-physical memory. dump.c
    ``dump_init`` skips the note with a warning, and dumps without it, when the guest did not
    publish one (``has_vmcoreinfo`` false), when its size is under a note header or over 1 MiB,
    when its format is not ELF, or when the note header's name or desc size is over 1 MiB or the
    padded note does not fit in ``size``. Otherwise it writes the padded note
    (``ELF_NOTE_SIZE``: 12-byte header, name and desc each padded to 4 bytes) as it is in guest
    memory, except that ``vmcoreinfo_update_phys_base`` has put a NUL just past the desc of a
    note named VMCOREINFO (the text's terminator for its own parsing): the first padding byte
    when the desc size is not a multiple of 4.
    """
    if info is None:
        return None, "no vmcoreinfo device"
    if not info.has_vmcoreinfo:
        return None, "guest note is not present"
    if not NHDR_SIZE <= info.size <= MAX_GUEST_NOTE_SIZE:
        return None, f"guest note size is invalid: {info.size}"
    if info.guest_format != FW_CFG_VMCOREINFO_FORMAT_ELF:
        return None, f"guest note format is unsupported: {info.guest_format}"

    def read_padded(gpa: int, n: int) -> bytes:
        data = read(gpa, n)  # cpu_physical_memory_read: unassigned memory reads as zeros
        return data + bytes(n - len(data))

    namesz, descsz = struct.unpack("<II", read_padded(info.paddr, 8))
    size = NHDR_SIZE + _round4(namesz) + _round4(descsz)
    if namesz > MAX_GUEST_NOTE_SIZE or descsz > MAX_GUEST_NOTE_SIZE or size > info.size:
        return None, "Invalid guest note header"
    note = bytearray(read_padded(info.paddr, size))
    if namesz == len(VMCOREINFO_NOTE_NAME) and note[NHDR_SIZE:NHDR_SIZE + namesz] == VMCOREINFO_NOTE_NAME:
        end = NHDR_SIZE + _round4(namesz) + descsz
        if end < size:
            note[end] = 0
    return bytes(note), None


_parsed: weakref.WeakKeyDictionary[Image, DeviceState] = weakref.WeakKeyDictionary()


def _devices(image: Image) -> DeviceState:
    """``parse_devices`` of an image, decoded once per image (cpus_of and vmcoreinfo_of both
    need it; an image whose device state does not decode raises each time)."""
    from ramfs.format.vmstate import parse_devices
    try:
        hit = _parsed.get(image)
    except TypeError:  # not weakly referenceable
        hit = None
    if hit is None:
        assert image.data is not None  # callers return early without it
        hit = parse_devices(image.data, image.layout)
        try:
            _parsed[image] = hit
        except TypeError:
            pass
    return hit


def vmcoreinfo_of(image: Image) -> VmcoreinfoState | None:
    """The image's vmcoreinfo device state (present, paddr, size...), or None when it has no
    such device or its device state cannot be decoded."""
    from ramfs.format.vmstate import vmcoreinfo_state
    if image.data is None:
        return None
    try:
        return vmcoreinfo_state(_devices(image))
    except RamfsError:
        return None


class ElfCore:
    """The core file as ``size`` and ``read(offset, size)``.

    ``vmcoreinfo``: the vmcoreinfo device state for the guest note (see :func:`guest_note`);
    by default it is decoded from the view's image. ``guest_note`` is the note appended (None
    when there is none, ``guest_note_skipped`` says why).
    """

    def __init__(self, view: PhysView, cpus: Sequence[Cpu | Aarch64Cpu],
                 vmcoreinfo: VmcoreinfoState | None | _Auto = _AUTO):
        self.view = view
        self.vmcoreinfo = vmcoreinfo_of(view.image) if vmcoreinfo is _AUTO else vmcoreinfo
        self.guest_note, self.guest_note_skipped = guest_note(self.vmcoreinfo, view.read)
        if self.guest_note_skipped and self.vmcoreinfo is not None:
            # dump.c warns and dumps without the note; a guest that never wrote one is common.
            (log.info if not self.vmcoreinfo.has_vmcoreinfo else log.warning)(
                "%s: no guest note in core.elf: %s", getattr(view.image, "path", "image"),
                self.guest_note_skipped)
        segments = [(r.gpa, r.gpa + r.length) for r in view.map.ranges]  # in address order
        if len(segments) > MAX_LOADS:
            raise RamfsError(f"{len(segments)} guest-physical RAM ranges: more than an ELF core can list")
        if cpus and isinstance(cpus[0], Aarch64Cpu):
            # target/arm/arch_dump.c aarch64_write_elf64_note: per vCPU a prstatus and the
            # FP/SIMD registers, no QEMU CPU-state note.
            machine = EM_AARCH64
            arm = [c for c in cpus if isinstance(c, Aarch64Cpu)]  # all of them: one target
            notes = b"".join(_note(b"CORE", NT_PRSTATUS, prstatus_aarch64(c, i))
                             + _note(b"CORE", NT_PRFPREG, prfpreg_aarch64(c)) for i, c in enumerate(arm))
        else:
            x86 = [c for c in cpus if isinstance(c, Cpu)]  # all of them: one target
            lma = long_mode(x86)
            machine = EM_X86_64 if lma else EM_386
            status = prstatus if lma else prstatus_i386
            notes = b"".join(_note(b"CORE", NT_PRSTATUS, status(c, i))
                             + _note(b"QEMU", QEMU_NOTE_TYPE, qemu_cpu_state(c)) for i, c in enumerate(x86))
        notes += self.guest_note or b""  # write_elf64_notes: after every vCPU's notes
        phnum = 1 + len(segments)
        notes_off = EHDR.size + phnum * PHDR.size
        data_off = notes_off + len(notes)
        ehdr = EHDR.pack(b"\x7fELF" + bytes([ELFCLASS64, ELFDATA2LSB, EV_CURRENT]) + bytes(9),
                         ET_CORE, machine, EV_CURRENT, 0, EHDR.size, 0, 0, EHDR.size,
                         PHDR.size, phnum,
                         0, 0, 0)
        phdrs = [PHDR.pack(PT_NOTE, 0, notes_off, 0, 0, len(notes), len(notes), 0)]
        self._file_starts: list[int] = []
        self._segments = segments
        off = data_off
        for start, end in segments:
            # dump.c write_elf64_load: p_vaddr carries the (identity) simple mapping's address.
            phdrs.append(PHDR.pack(PT_LOAD, 0, off, start, start, end - start, end - start, 0))
            self._file_starts.append(off)
            off += end - start
        self.header = ehdr + b"".join(phdrs) + notes
        self.size = off
        self.segments = segments

    def _pieces(self, offset: int, end: int) -> Iterator[tuple[int, int, int]]:
        """``(file offset, length, guest-physical address)`` of the PT_LOAD data in [offset, end)."""
        i = max(0, bisect.bisect_right(self._file_starts, offset) - 1)
        while offset < end and i < len(self._segments):
            fstart = self._file_starts[i]
            gstart, gend = self._segments[i]
            seg_end = fstart + (gend - gstart)
            if offset < seg_end:
                offset = max(offset, fstart)
                n = min(end, seg_end) - offset
                yield offset, n, gstart + offset - fstart
                offset += n
            i += 1

    def has_data(self, offset: int, size: int) -> bool:
        """False when ``[offset, offset+size)`` reads as zeros without I/O (a hole)."""
        end = min(offset + size, self.size)
        if offset < len(self.header):
            return True
        return any(self.view.has_data(gpa, n) for _, n, gpa in self._pieces(offset, end))

    def populated_ranges(self) -> Iterator[tuple[int, int]]:
        """File ``(start, end)`` ranges that hold data: the header and notes, then the
        populated guest-physical ranges where their PT_LOADs put them."""
        yield 0, len(self.header)
        for (gstart, gend), fstart in zip(self._segments, self._file_starts):
            for a, b in self.view.populated_ranges(gstart, gend):
                yield fstart + a - gstart, fstart + b - gstart

    def read(self, offset: int, size: int, nowait: bool = False) -> bytes:
        """``nowait`` as for :meth:`Image.read`: only from the page cache, else WouldBlock."""
        if offset >= self.size or size <= 0:
            return b""
        end = min(offset + size, self.size)
        parts = []
        if offset < len(self.header):
            parts.append(self.header[offset:min(end, len(self.header))])
            offset = len(self.header)
        i = bisect.bisect_right(self._file_starts, offset) - 1
        while offset < end and i < len(self._segments):
            fstart = self._file_starts[i]
            gstart, gend = self._segments[i]
            seg_end = fstart + (gend - gstart)
            if offset >= seg_end:
                i += 1
                continue
            n = min(end, seg_end) - offset
            parts.append(self.view.read(gstart + offset - fstart, n, nowait))
            offset += n
            i += 1
        return parts[0] if len(parts) == 1 else b"".join(parts)


def cpus_of(image: Image) -> list[Cpu | Aarch64Cpu]:
    """The vCPUs of an image for the notes, decoded from its device state (vmdesc-driven).

    An image whose device state cannot be decoded still gets a core: one vCPU whose
    registers are all 0, so that the memory stays usable.
    """
    from ramfs.format.vmstate import Aarch64CpuState, CpuState, guest_cpus
    if image.data is None:
        return [Cpu()]
    try:
        target, states = guest_cpus(_devices(image))
    except RamfsError:
        return [Cpu()]
    if target == "aarch64":
        return [Aarch64Cpu(s) for s in states if isinstance(s, Aarch64CpuState)]
    return [cpu_from_state(s) for s in states if isinstance(s, CpuState)] or [Cpu()]


def cpu_from_state(s: CpuState) -> Cpu:
    regs = {k: v for k, v in (s.regs or {}).items() if v is not None}
    for name, attr in (("rip", "rip"), ("rflags", "rflags"), ("cr0", "cr0"), ("cr2", "cr2"),
                       ("cr3", "cr3"), ("cr4", "cr4"), ("kernel_gs_base", "kernelgsbase"), ("efer", "efer")):
        v = getattr(s, attr, None)
        if v is not None:
            regs[name] = v
    segments = {}
    for name in QEMU_SEGMENTS:
        seg = getattr(s, name, None)
        if seg is not None:
            segments[name] = (seg.selector or 0, seg.base or 0, seg.limit or 0, seg.flags or 0)
    return Cpu(regs=regs, segments=segments)
