"""QEMU's migration stream as written to a file: header, configuration, sections, RAM.

Sources (QEMU 10.0): migration/savevm.c (``qemu_savevm_state_header``,
``vmstate_configuration``, ``save_section_header``, ``save_section_footer``,
``qemu_savevm_command_send``, ``qemu_loadvm_state_main``), migration/ram.c
(``ram_save_setup``, ``save_page_header``, ``ram_load_precopy``, ``parse_ramblocks``,
``parse_ramblock_mapped_ram``), hw/ppc/spapr.c (``htab_save_setup``, ``htab_save_iterate``,
``htab_save_complete``, ``htab_load``), hw/s390x/s390-stattrib.c (``cmma_save``,
``cmma_load``). docs/formats.md tells the same in prose.

:func:`parse_stream` walks the whole stream once. It never copies page payloads: for a
sequential stream it reports the page records to a :class:`RecordSink` (the page index, or
a converter's writer), runs of consecutive records in one call, each with the file offset
of its payloads and the window holding them; for mapped-ram it reads the per-block headers
and jumps over the page regions.
"""

from __future__ import annotations

import enum
import functools
import json
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Protocol

from ramfs.errors import FormatError, TruncatedError, UnsupportedError
from ramfs.format.source import Cursor, Source, decode_name

# --- file header (savevm.h) ------------------------------------------------------------
QEMU_VM_FILE_MAGIC = 0x5145564D  # "QEVM"
QEMU_VM_FILE_VERSION_COMPAT = 0x00000002  # rejected by QEMU: "SaveVM v2 format is obsolete"
QEMU_VM_FILE_VERSION = 0x00000003
QEMU_VM_FILE_MAGIC_BYTES = b"QEVM"


class SectionType(enum.IntEnum):
    """Top-level record types (savevm.h ``QEMU_VM_*``)."""

    EOF = 0x00
    SECTION_START = 0x01
    SECTION_PART = 0x02
    SECTION_END = 0x03
    SECTION_FULL = 0x04
    SUBSECTION = 0x05
    VMDESCRIPTION = 0x06
    CONFIGURATION = 0x07
    COMMAND = 0x08
    SECTION_FOOTER = 0x7E


class MigCmd(enum.IntEnum):
    """``enum qemu_vm_cmd`` (savevm.c); lengths from ``mig_cmd_args`` (-1: variable)."""

    INVALID = 0
    OPEN_RETURN_PATH = 1
    PING = 2
    POSTCOPY_ADVISE = 3
    POSTCOPY_LISTEN = 4
    POSTCOPY_RUN = 5
    POSTCOPY_RAM_DISCARD = 6
    PACKAGED = 7
    ENABLE_COLO = 8
    POSTCOPY_RESUME = 9
    RECV_BITMAP = 10
    SWITCHOVER_START = 11


MIG_CMD_LEN = {
    MigCmd.OPEN_RETURN_PATH: (0,), MigCmd.PING: (4,), MigCmd.POSTCOPY_ADVISE: (0, 16),
    MigCmd.POSTCOPY_LISTEN: (0,), MigCmd.POSTCOPY_RUN: (0,), MigCmd.POSTCOPY_RAM_DISCARD: None,
    MigCmd.PACKAGED: (4,), MigCmd.ENABLE_COLO: (0,), MigCmd.POSTCOPY_RESUME: (0,),
    MigCmd.RECV_BITMAP: None, MigCmd.SWITCHOVER_START: (0,),
}

# --- configuration section (savevm.c vmstate_configuration) -----------------------------
SUBSECTION_TARGET_PAGE_BITS = "configuration/target-page-bits"
SUBSECTION_CAPABILITIES = "configuration/capabilities"
SUBSECTION_UUID = "configuration/uuid"
CAP_X_IGNORE_SHARED = "x-ignore-shared"
CAP_MAPPED_RAM = "mapped-ram"
# The capabilities QEMU 10.0 validates and therefore lists in the stream, in
# MigrationCapability enum order (options.c should_validate_capability).
VALIDATED_CAPABILITIES = (CAP_X_IGNORE_SHARED, CAP_MAPPED_RAM)
DEFAULT_TARGET_PAGE_BITS = 12  # x86 (target/i386/cpu-param.h); the subsection is then absent
MAX_MACHINE_NAME = 256  # machine type names are short; bounds a hostile length field
MAX_CAPABILITIES = 64

# --- RAM section (ram.c) -----------------------------------------------------------------
RAM_SECTION_IDSTR = "ram"
RAM_SECTION_VERSION = 4  # ram_mig_init: register_savevm_live("ram", 0, 4, ...)
RAM_SAVE_FLAG_FULL = 0x01  # obsolete; rejected
RAM_SAVE_FLAG_ZERO = 0x02
RAM_SAVE_FLAG_MEM_SIZE = 0x04
RAM_SAVE_FLAG_PAGE = 0x08
RAM_SAVE_FLAG_EOS = 0x10
RAM_SAVE_FLAG_CONTINUE = 0x20
RAM_SAVE_FLAG_XBZRLE = 0x40
RAM_SAVE_FLAG_HOOK = 0x80  # RDMA
RAM_SAVE_FLAG_COMPRESS_PAGE = 0x100  # removed in QEMU 9.1
RAM_SAVE_FLAG_MULTIFD_FLUSH = 0x200

# x86-64 physical addresses have at most 52 bits; a block claiming more is not a real guest's
# and would only make readers size things after a hostile number.
MAX_USED_LENGTH = 1 << 52

# --- mapped-ram (ram.c struct MappedRamHeader, mapped_ram_setup_ramblock) ----------------
MAPPED_RAM_HDR_VERSION = 1
MAPPED_RAM_FILE_OFFSET_ALIGNMENT = 0x100000
MAPPED_RAM_HEADER = struct.Struct(">IQQQ")  # QEMU_PACKED: version, page_size, bitmap, pages
assert MAPPED_RAM_HEADER.size == 28

# The vmdesc JSON is ~100 KiB for a typical guest (a few MiB for huge ones); refuse to hold
# absurd ones in memory. Streams keep at most this much of their tail.
MAX_VMDESC_BYTES = 16 << 20

# --- iterable sections besides RAM -----------------------------------------------------
# They interleave with RAM (START ram, START x, PART ram, PART x, ..., END ram, END x) and
# nothing gives their length up front: each is delimited by walking its own format the way
# its loader reads it. Their bytes are device state, kept verbatim, never interpreted.
#
# ppc64 pseries: the hashed page table (hw/ppc/spapr.c spapr_machine_init:
# register_savevm_live("spapr/htab", VMSTATE_INSTANCE_ID_ANY, 1, &savevm_htab_handlers)).
SPAPR_HTAB_IDSTR = "spapr/htab"
SPAPR_HTAB_VERSION = 1  # htab_load: "bad version" for any other
# The be32 that opens every htab section (htab_save_setup, htab_save_iterate,
# htab_save_complete): -1 no hash table (radix guest), non-zero the table's size as a shift
# (spapr_reallocate_hpt), 0 chunks follow.
HTAB_NO_HPT = 0xFFFFFFFF
HTAB_SHIFT_MIN, HTAB_SHIFT_MAX = 18, 46  # spapr_hpt_shift_for_ramsize: architected sizes
HASH_PTE_SIZE_64 = 16  # target/ppc/mmu-hash64.h
HTAB_CHUNK = struct.Struct(">IHH")  # htab_save_chunk: index, n_valid, n_invalid, HPTEs;
# htab_save_end_marker writes index 0 with no entries.
# s390x: CMMA storage attributes (hw/s390x/s390-stattrib.c s390_stattrib_realize:
# register_savevm_live(TYPE_S390_STATTRIB, 0, 0, &savevm_s390_stattrib_handlers)).
S390_STATTRIB_IDSTR = "s390-storage_attributes"
S390_STATTRIB_VERSION = 0
# cmma_save / cmma_load: be64 words whose bits below the page size are one flag.
STATTR_FLAG_EOS = 0x01  # ends the section's data
STATTR_FLAG_MORE = 0x02  # (gfn << page bits) | MORE, be64 count, count attribute bytes
STATTR_FLAG_ERROR = 0x04  # cmma_load fails: "Storage attributes data is incomplete"
STATTR_FLAG_DONE = 0x08  # after the last value (cmma_save with final)
# A real stream has a few pieces per iteration of the migration loop; more than this is not
# a save QEMU wrote, and the layout holds one record per piece.
MAX_ITERABLE_PIECES = 1 << 20
# A stream of unknown length (a compressed image being converted) cannot be read back, so
# the pieces' bytes are kept in memory while parsing, up to this much.
MAX_KEPT_SECTION_BYTES = 256 << 20
_STEP = 1 << 20  # payloads are stepped over this much at a time (bounded reads)

_BE64 = struct.Struct(">Q")


@dataclass(frozen=True)
class Configuration:
    offset: int
    machine: str
    target_page_bits: int | None
    capabilities: tuple[str, ...]
    uuid: bytes | None
    end: int

    @property
    def page_bits(self) -> int:
        return self.target_page_bits or DEFAULT_TARGET_PAGE_BITS


@dataclass(frozen=True)
class MappedRamHeader:
    offset: int  # where the 28 bytes sit in the file
    version: int
    page_size: int
    bitmap_offset: int  # absolute file offsets (they include a libvirt prefix)
    pages_offset: int

    @property
    def stored(self) -> bool:
        """Post-10.0 writers give ignored (shared) blocks 0/0 offsets and no region."""
        return not (self.bitmap_offset == 0 and self.pages_offset == 0)


@dataclass(frozen=True)
class RamBlockRecord:
    index: int
    idstr: str
    used_length: int
    offset: int  # of the idstr length byte
    postcopy_page_size: int | None = None
    ignore_shared_addr: int | None = None
    mapped: MappedRamHeader | None = None


@dataclass(frozen=True)
class Command:
    offset: int
    cmd: int
    length: int

    @property
    def name(self) -> str:
        try:
            return MigCmd(self.cmd).name
        except ValueError:
            return f"cmd{self.cmd}"


@dataclass(frozen=True, slots=True)
class SectionPiece:
    """One START, PART or END section of an iterable section other than RAM."""

    kind: int  # SectionType.SECTION_START, _PART or _END
    offset: int  # of the section type byte
    length: int  # through its footer


@dataclass(frozen=True)
class IterableSection:
    """An iterable section besides RAM (``spapr/htab``, ``s390-storage_attributes``): where
    its pieces are, in stream order. ramfs carries them over verbatim."""

    section_id: int
    idstr: str
    instance_id: int
    version: int
    pieces: tuple[SectionPiece, ...]

    @property
    def size(self) -> int:
        return sum(p.length for p in self.pieces)


@dataclass(frozen=True)
class StreamLayout:
    """Everything about one QEMU stream except page contents."""

    base: int  # file offset of "QEVM"
    end: int  # file offset just past the stream (end of file)
    configuration: Configuration | None
    page_size: int
    ram_section_id: int
    ram_start_offset: int  # the START section header
    mem_size_total: int
    blocks: tuple[RamBlockRecord, ...]
    mapped_ram: bool
    footers: bool
    ram_parts: int
    commands: tuple[Command, ...]
    ram_end_offset: int  # just past the RAM END section (and its footer)
    device_offset: int  # first device (FULL) section, or the EOF byte
    eof_offset: int | None  # the QEMU_VM_EOF byte, when located
    vmdesc_offset: int | None  # the QEMU_VM_VMDESCRIPTION byte
    vmdesc: bytes | None  # the JSON text
    warnings: tuple[str, ...] = field(default=())
    # Zero bytes between ``end`` and the end of the file: a stream written to a block device
    # or a preallocated volume (``migrate "exec:dd of=/dev/vg/lv"``, Proxmox VE's vmstate
    # volumes) is followed by whatever the device held, zeros when it was fresh.
    padding: int = 0
    # Iterable sections other than RAM, in the order of their START sections.
    iterables: tuple[IterableSection, ...] = ()

    def pieces(self, kind: int) -> list[SectionPiece]:
        """The other iterable sections' pieces of one kind, in stream order."""
        return sorted((p for s in self.iterables for p in s.pieces if p.kind == kind), key=lambda p: p.offset)

    @property
    def capabilities(self) -> tuple[str, ...]:
        return self.configuration.capabilities if self.configuration else ()

    @property
    def machine(self) -> str | None:
        return self.configuration.machine if self.configuration else None

    @property
    def switchover_start(self) -> bool:
        return any(c.cmd == MigCmd.SWITCHOVER_START for c in self.commands)

    def vmdesc_json(self) -> dict[str, Any] | None:
        if self.vmdesc is None:
            return None
        try:
            data = json.loads(self.vmdesc)
        except (ValueError, UnicodeDecodeError, RecursionError) as e:
            raise FormatError(f"vmdesc is not valid JSON: {e}", self.vmdesc_offset) from None
        if not isinstance(data, dict):
            raise FormatError("vmdesc JSON is not an object", self.vmdesc_offset)
        return data


@dataclass(frozen=True)
class RamSetup:
    """What the RAM START section tells before the first page record (for a sink to plan)."""

    configuration: Configuration | None
    capabilities: tuple[str, ...]
    ram_section_id: int
    page_size: int
    blocks: tuple[RamBlockRecord, ...]


class RecordSink(Protocol):
    """Where :func:`parse_stream` reports page records, in stream order (the last record of
    a page wins: QEMU sends a page again when the guest dirtied it).

    Records for consecutive pages that follow one another in the stream come as one call of
    ``count`` records (a run, checked K headers at a time); any other record is a run of one.
    """

    def start(self, ram: RamSetup) -> None:
        """Once, when the block list is known, before any record (mapped-ram streams too)."""

    def pages(self, block: int, first: int, count: int, buf: bytes, pos: int, stride: int,
              offset: int) -> None:
        """PAGE records for pages ``first .. first + count - 1`` of ``block``: payload ``n``
        is ``buf[pos + n * stride:][:page_size]`` (``buf`` is the parser's window, immutable
        ``bytes``), at file offset ``offset + n * stride``. ``stride`` is 0 when ``count``
        is 1."""

    def zeros(self, block: int, first: int, count: int) -> None:
        """ZERO records for pages ``first .. first + count - 1`` of ``block``."""


class _NoSink:
    """For a parse that only wants the layout."""

    def start(self, ram: RamSetup) -> None:
        pass

    def pages(self, block: int, first: int, count: int, buf: bytes, pos: int, stride: int,
              offset: int) -> None:
        pass

    def zeros(self, block: int, first: int, count: int) -> None:
        pass


# Runs of CONTINUE records for consecutive pages are what QEMU writes for most of a guest
# (ram_find_and_save_block walks the dirty bitmap in order). The parser checks such a run
# K records at a time with one struct unpack of the K headers (an arithmetic progression of
# addr|flags values is a run) instead of a Python iteration per record: the per-record loop
# costs ~1.5 us, i.e. ~0.4 GB/s on half-zero images.
_RUN_ZERO = 64
_RUN_PAGE = 16
_run_structs: dict[int, struct.Struct] = {}


def _run_struct(ps: int) -> struct.Struct:
    st = _run_structs.get(ps)
    if st is None:
        st = _run_structs[ps] = struct.Struct(">" + f"Q{ps}x" * _RUN_PAGE)
    return st


_ZERO_RUN_STRUCT = struct.Struct(">" + "Qx" * _RUN_ZERO)
_ZERO_FILLS = bytes(_RUN_ZERO)


def is_qemu_magic(head: bytes) -> bool:
    return head[:4] == QEMU_VM_FILE_MAGIC_BYTES


class _Iterable:
    """A non-RAM iterable section while it is parsed."""

    __slots__ = ("section_id", "idstr", "instance_id", "version", "walk", "pieces", "ended", "slots")

    def __init__(self, section_id: int, idstr: str, instance_id: int, version: int, walk: str):
        self.section_id, self.idstr, self.instance_id, self.version = section_id, idstr, instance_id, version
        self.walk = walk  # the _Parser method that walks one piece's body
        self.pieces: list[SectionPiece] = []
        self.ended = False
        self.slots: int | None = None  # spapr/htab: hash table entries, once the size is known


# idstr -> (version, walker): the iterable sections whose format ramfs knows. In QEMU 10.0
# the others are "dirty-bitmap" (only with the dirty-bitmaps capability) and VFIO devices;
# slirp, s390-skeys and todclock only have save_state, so they are FULL sections.
_ITERABLE_FORMATS = {
    SPAPR_HTAB_IDSTR: (SPAPR_HTAB_VERSION, "walk_htab"),
    S390_STATTRIB_IDSTR: (S390_STATTRIB_VERSION, "walk_stattrib"),
}


class _Parser:
    def __init__(self, source: Source, base: int, end: int | None, sink: RecordSink | None = None):
        self.src = source
        self.sink: RecordSink = _NoSink() if sink is None else sink
        # The sink's entry points, looked up once: the record loop calls them directly.
        self._pages = self.sink.pages
        self._zeros = self.sink.zeros
        self._page_unpack = _run_struct(1 << DEFAULT_TARGET_PAGE_BITS).unpack_from  # per page size
        self.tail_data: bytes | bytearray | None = None  # streams: the bytes from the device state to the end
        self.padding = 0  # zeros after the stream (see StreamLayout.padding)
        self.cur = Cursor(source, base, end)
        self.base = base
        self.warnings: list[str] = []
        self.footers: bool | None = None
        self.page_size = 1 << DEFAULT_TARGET_PAGE_BITS
        self.capabilities: tuple[str, ...] = ()
        self.blocks: list[RamBlockRecord] = []
        self.by_name: dict[bytes, int] = {}
        self.lengths: list[int] = []
        self.current_block: int | None = None  # CONTINUE carries across sections
        self.postcopy_advised = False
        self.mapped = False
        self.iterables: dict[int, _Iterable] = {}  # section id -> state, other than RAM
        self.n_pieces = 0
        # A stream of unknown length keeps the other iterable sections' bytes (see
        # MAX_KEPT_SECTION_BYTES); ``_kept_pos`` is how far they are kept.
        self.kept: bytearray | None = bytearray() if self.cur.end is None else None
        self._kept_pos = 0

    # -- framing -------------------------------------------------------------------
    def header(self) -> None:
        cur = self.cur
        magic = cur.be32("stream magic")
        if magic != QEMU_VM_FILE_MAGIC:
            raise FormatError(f"not a QEMU migration stream: magic {magic:#010x}", self.base)
        version = cur.be32("stream version")
        if version == QEMU_VM_FILE_VERSION_COMPAT:
            raise UnsupportedError("QEMU stream version 2 is obsolete (QEMU >= 1.3 writes 3)", self.base + 4)
        if version != QEMU_VM_FILE_VERSION:
            raise FormatError(f"unknown QEMU stream version {version}", self.base + 4)

    def configuration(self) -> Configuration | None:
        cur = self.cur
        if cur.peek_u8() != SectionType.CONFIGURATION:
            return None
        start = cur.pos
        cur.u8("configuration marker")
        n = cur.be32("machine name length")
        if not 0 < n <= MAX_MACHINE_NAME:
            raise FormatError(f"machine name length {n} is out of range", start + 1)
        machine = decode_name(cur.read(n, "machine name"), "machine name", start + 5)
        page_bits = None
        caps: tuple[str, ...] = ()
        uuid = None
        seen: set[str] = set()
        while cur.peek_u8() == SectionType.SUBSECTION:
            sub_off = cur.pos
            cur.u8("subsection marker")
            name = cur.name("subsection name")
            if name in seen:
                raise FormatError(f"configuration subsection {name!r} appears twice", sub_off)
            seen.add(name)
            version = cur.be32("subsection version")
            if version != 1:
                raise UnsupportedError(f"configuration subsection {name!r} version {version} (expected 1)", sub_off)
            if name == SUBSECTION_TARGET_PAGE_BITS:
                page_bits = cur.be32("target page bits")
                if not 8 <= page_bits <= 16:
                    raise FormatError(f"target-page-bits {page_bits} is out of range (8..16)", cur.pos - 4)
            elif name == SUBSECTION_CAPABILITIES:
                count = cur.be32("capability count")
                if count > MAX_CAPABILITIES:
                    raise FormatError(f"capability count {count} is implausible", cur.pos - 4)
                caps = tuple(cur.name("capability name") for _ in range(count))
            elif name == SUBSECTION_UUID:
                uuid = cur.read(16, "uuid")
            else:
                # vmstate_subsection_load fails with -ENOENT on an unknown name.
                raise FormatError(f"unknown configuration subsection {name!r}", sub_off)
        conf = Configuration(offset=start, machine=machine, target_page_bits=page_bits,
                             capabilities=caps, uuid=uuid, end=cur.pos)
        self.page_size = 1 << conf.page_bits
        self.capabilities = caps
        self.mapped = CAP_MAPPED_RAM in caps
        for cap in caps:
            if cap not in VALIDATED_CAPABILITIES:
                self.warnings.append(f"configuration lists capability {cap!r}, unknown to QEMU 10.0")
        return conf

    def footer(self, section_id: int, what: str) -> None:
        cur = self.cur
        start = cur.pos
        has = cur.peek_u8() == SectionType.SECTION_FOOTER
        if self.footers is None:
            self.footers = has
        elif has != self.footers:
            raise FormatError(f"section footer {'present' if has else 'missing'} after {what}, "
                              f"unlike earlier sections", start)
        if has:
            cur.u8("footer marker")
            fid = cur.be32("footer section id")
            if fid != section_id:
                raise FormatError(f"footer of {what} names section {fid}, expected {section_id}", start)

    def command(self, start: int) -> Command:
        cur = self.cur
        cmd = cur.be16("command")
        length = cur.be16("command length")
        if cmd == 0 or cmd > max(MigCmd):
            raise FormatError(f"unknown migration command {cmd}", start)
        allowed = MIG_CMD_LEN[MigCmd(cmd)]
        if allowed is not None and length not in allowed:
            raise FormatError(f"command {MigCmd(cmd).name} has length {length}, expected {allowed}", start)
        cur.skip(length, f"command {MigCmd(cmd).name}")
        if cmd == MigCmd.POSTCOPY_ADVISE:
            self.postcopy_advised = True
        if cmd in (MigCmd.PACKAGED, MigCmd.POSTCOPY_LISTEN, MigCmd.POSTCOPY_RUN):
            raise UnsupportedError(f"postcopy command {MigCmd(cmd).name} in a save file", start)
        return Command(start, cmd, length)

    # -- RAM setup (START payload) ---------------------------------------------------
    def ram_setup(self) -> int:
        cur = self.cur
        start = cur.pos
        v = cur.be64("RAM MEM_SIZE record")
        ps = self.page_size
        flags = v & (ps - 1)
        if flags != RAM_SAVE_FLAG_MEM_SIZE:
            raise FormatError(f"RAM section starts with flags {flags:#x}, expected MEM_SIZE", start)
        total = v & ~(ps - 1)
        seen = 0
        while seen < total:
            self.block(len(self.blocks))
            seen += self.blocks[-1].used_length
            if seen > total:
                raise FormatError(f"RAM block lengths add up past MEM_SIZE {total:#x}", self.blocks[-1].offset)
        if not self.blocks:
            raise FormatError("RAM section lists no blocks (MEM_SIZE 0)", start)
        return total

    def block(self, index: int) -> None:
        cur = self.cur
        start = cur.pos
        n = cur.u8("RAM block idstr length")
        if n == 0:
            raise FormatError("RAM block with an empty idstr", start)
        raw = cur.read(n, "RAM block idstr")
        idstr = decode_name(raw, "RAM block idstr", start)
        if raw in self.by_name:
            raise FormatError(f"RAM block {idstr!r} is listed twice", start)
        used = cur.be64(f"used_length of {idstr!r}")
        ps = self.page_size
        if used == 0 or used % ps:
            raise FormatError(f"RAM block {idstr!r} used_length {used:#x} is not a non-zero "
                              f"multiple of the page size {ps}", start + 1 + n)
        if used > MAX_USED_LENGTH:
            raise FormatError(f"RAM block {idstr!r} used_length {used:#x} is implausibly large "
                              f"(over 2^52 bytes)", start + 1 + n)
        pc_size = None
        if self.postcopy_advised and not self.mapped:
            # ram_save_setup writes the block page size only for hugepage-backed blocks under
            # postcopy. It starts with a zero byte where an idstr length would be non-zero.
            buf, i = cur.window(8)
            if len(buf) - i >= 8:
                cand = _BE64.unpack_from(buf, i)[0]
                if cand >= ps and cand & (cand - 1) == 0 and cand <= 1 << 40 and buf[i] == 0:
                    pc_size = cur.be64("postcopy page size")
        addr = cur.be64(f"x-ignore-shared addr of {idstr!r}") if CAP_X_IGNORE_SHARED in self.capabilities else None
        mapped = self.mapped_header(idstr, used) if self.mapped else None
        self.by_name[raw] = index
        self.lengths.append(used)
        self.blocks.append(RamBlockRecord(index=index, idstr=idstr, used_length=used, offset=start,
                                          postcopy_page_size=pc_size, ignore_shared_addr=addr,
                                          mapped=mapped))

    def mapped_header(self, idstr: str, used: int) -> MappedRamHeader:
        cur = self.cur
        at = cur.pos
        version, page_size, bitmap_off, pages_off = MAPPED_RAM_HEADER.unpack(
            cur.read(MAPPED_RAM_HEADER.size, f"mapped-ram header of {idstr!r}"))
        hdr = MappedRamHeader(offset=at, version=version, page_size=page_size,
                              bitmap_offset=bitmap_off, pages_offset=pages_off)
        if version > MAPPED_RAM_HDR_VERSION:
            raise UnsupportedError(f"mapped-ram header version {version} of {idstr!r} (expected <= 1)", at)
        if page_size != self.page_size:
            raise FormatError(f"mapped-ram page_size {page_size} of {idstr!r} differs from the "
                              f"target page size {self.page_size}", at + 4)
        if not hdr.stored:
            return hdr  # no region follows: the stream continues after the header
        num_pages = used // page_size
        bitmap_len = bitmap_size(num_pages)
        header_end = at + MAPPED_RAM_HEADER.size
        if bitmap_off < header_end:
            raise FormatError(f"bitmap of {idstr!r} at {bitmap_off:#x} overlaps its header", at + 12)
        if bitmap_off + bitmap_len > pages_off:
            raise FormatError(f"bitmap of {idstr!r} ({bitmap_off:#x}+{bitmap_len:#x}) overlaps its "
                              f"pages at {pages_off:#x}", at + 12)
        if pages_off % page_size:
            raise FormatError(f"pages of {idstr!r} at {pages_off:#x} are not page-aligned", at + 20)
        if pages_off % MAPPED_RAM_FILE_OFFSET_ALIGNMENT:
            self.warnings.append(f"pages of {idstr!r} at {pages_off:#x} are not 1 MiB aligned "
                                 f"(QEMU aligns them for O_DIRECT)")
        if bitmap_off != header_end:
            self.warnings.append(f"bitmap of {idstr!r} at {bitmap_off:#x} does not follow its header "
                                 f"at {header_end:#x}")
        region_end = pages_off + used
        if cur.end is not None and region_end > cur.end:
            raise TruncatedError(f"pages of {idstr!r} end at {region_end:#x}, past the end of the "
                                 f"file at {cur.end:#x}", at + 20)
        # parse_ramblock_mapped_ram: the stream continues exactly at the end of the region.
        cur.seek(region_end)
        return hdr

    # -- page records (PART/END payloads) --------------------------------------------
    def records(self) -> None:
        """Consume page records up to and including EOS."""
        if self.mapped:
            self._mapped_records()
        else:
            self._sequential_records()

    def _mapped_records(self) -> None:
        """After a mapped-ram block list only EOS may come: the pages are in the regions."""
        cur = self.cur
        rec = cur.pos
        buf, i = cur.window(8)
        if len(buf) - i < 8:
            raise TruncatedError("data ends inside a RAM page record header", rec)
        flags = _BE64.unpack_from(buf, i)[0] & (self.page_size - 1)
        if flags & ~RAM_SAVE_FLAG_CONTINUE != RAM_SAVE_FLAG_EOS:
            raise FormatError(f"RAM record with flags {flags:#x} in a mapped-ram stream "
                              f"(only EOS may appear after the block list)", rec)
        cur.pos = rec + 8

    def _sequential_records(self) -> None:
        """The record loop: ZERO and PAGE records go to the sink, runs of them at once (see
        :meth:`_run`); anything else is :meth:`_control`'s."""
        cur = self.cur
        ps = self.page_size
        mask = ps - 1
        # One record at most, or one run of page records (so that runs do not stop at a
        # window's edge); the window holds less only at the end of the data.
        need = max(8 + 1 + 255 + ps, _RUN_PAGE * (8 + ps))
        lengths = self.lengths
        pages = self._pages
        zeros = self._zeros
        run = self._run
        self._page_unpack = _run_struct(ps).unpack_from
        unpack = _BE64.unpack_from
        block = self.current_block
        skip_runs = 0
        buf, i = cur.window(need)
        base = cur.buf_start
        end = len(buf)
        try:
            while True:
                if end - i < need:
                    cur.pos = base + i
                    buf, i = cur.window(need)
                    base = cur.buf_start
                    end = len(buf)
                if end - i < 8:
                    raise TruncatedError("data ends inside a RAM page record header", base + i)
                v = unpack(buf, i)[0]
                flags = v & mask
                kind = flags & ~RAM_SAVE_FLAG_CONTINUE
                if kind != RAM_SAVE_FLAG_ZERO and kind != RAM_SAVE_FLAG_PAGE:
                    eos = self._control(kind, flags, base + i)
                    i += 8
                    if eos:
                        break
                    continue
                rec = base + i
                if flags & RAM_SAVE_FLAG_CONTINUE:
                    if block is None:
                        raise FormatError("RAM page record with CONTINUE but no block before it", rec)
                    if skip_runs:
                        skip_runs -= 1
                    else:
                        n = run(buf, i, end, base, v, kind, block)
                        if n:
                            i += n
                            continue
                        skip_runs = 8  # not a run here: parse a few records one by one
                    i += 8
                else:
                    block, i = self._block_of(buf, i + 8, end, rec)
                addr = v - flags
                if addr >= lengths[block]:
                    raise FormatError(f"RAM page offset {addr:#x} is past the end of block "
                                      f"{self.blocks[block].idstr!r} ({lengths[block]:#x})", rec)
                if kind == RAM_SAVE_FLAG_ZERO:
                    if i >= end:
                        raise TruncatedError("data ends inside a ZERO page record", base + i)
                    if buf[i] != 0:
                        raise FormatError(f"ZERO page record with fill byte {buf[i]:#x} (must be 0)", base + i)
                    i += 1
                    zeros(block, addr // ps, 1)
                else:
                    if end - i < ps:
                        raise TruncatedError(f"data ends inside the payload of page {addr:#x} of "
                                             f"{self.blocks[block].idstr!r}", base + i)
                    pages(block, addr // ps, 1, buf, i, 0, base + i)
                    i += ps
        finally:
            self.current_block = block
        cur.pos = base + i

    def _run(self, buf: bytes, j: int, end: int, base: int, v: int, kind: int, block: int) -> int:
        """Is the CONTINUE record at ``buf[j]`` (header ``v``) the first of K records of its
        kind for consecutive pages (see _RUN_ZERO)? Then they go to the sink at once and
        their length in bytes is returned; else 0, and they are parsed one by one."""
        ps = self.page_size
        if kind == RAM_SAVE_FLAG_ZERO:
            k, stride = _RUN_ZERO, 9
            if not (end - j >= k * 9 and _ZERO_RUN_STRUCT.unpack_from(buf, j) == tuple(range(v, v + k * ps, ps))
                    and buf[j + 8 : j + 9 * k : 9] == _ZERO_FILLS):
                return 0
        else:
            k, stride = _RUN_PAGE, 8 + ps
            if not (end - j >= k * stride and self._page_unpack(buf, j) == tuple(range(v, v + k * ps, ps))):
                return 0
        addr = v & ~(ps - 1)
        if addr + (k - 1) * ps >= self.lengths[block]:
            return 0  # the record by record path says which one is past the end
        if kind == RAM_SAVE_FLAG_ZERO:
            self._zeros(block, addr // ps, k)
        else:
            self._pages(block, addr // ps, k, buf, j + 8, stride, base + j + 8)
        return k * stride

    def _block_of(self, buf: bytes, i: int, end: int, rec: int) -> tuple[int, int]:
        """The block a record without CONTINUE names (``u8 len, idstr`` at ``buf[i]``), and
        where its payload starts."""
        n = buf[i] if i < end else -1
        if n < 0 or end - i < 1 + n:
            raise TruncatedError("data ends inside a RAM page record idstr", rec + 8)
        name = buf[i + 1 : i + 1 + n]
        block = self.by_name.get(name)
        if block is None:
            raise FormatError(f"RAM page record names unknown block {name!r}", rec)
        return block, i + 1 + n

    def _control(self, kind: int, flags: int, rec: int) -> bool:
        """A record other than ZERO or PAGE (8 bytes, nothing follows): True for EOS."""
        if kind == RAM_SAVE_FLAG_EOS:
            return True
        if kind == RAM_SAVE_FLAG_MULTIFD_FLUSH:
            return False  # a multifd sync point; carries nothing in a file
        if kind in (RAM_SAVE_FLAG_XBZRLE, RAM_SAVE_FLAG_HOOK, RAM_SAVE_FLAG_COMPRESS_PAGE):
            name = {RAM_SAVE_FLAG_XBZRLE: "XBZRLE", RAM_SAVE_FLAG_HOOK: "HOOK (RDMA)",
                    RAM_SAVE_FLAG_COMPRESS_PAGE: "COMPRESS_PAGE"}[kind]
            raise UnsupportedError(f"RAM record uses {name} encoding, which ramfs does not "
                                   f"support (save without that capability)", rec)
        raise FormatError(f"RAM record with unknown flag combination {flags:#x}", rec)

    # -- whole stream ------------------------------------------------------------------
    def parse(self) -> StreamLayout:
        self.header()
        conf = self.configuration()
        cur = self.cur
        ram_id = None
        ram_start = None
        total = 0
        parts = 0
        commands: list[Command] = []
        ram_end = None
        device_offset = None
        eof = None
        if CAP_X_IGNORE_SHARED in self.capabilities and self.mapped:
            self.warnings.append("mapped-ram with x-ignore-shared: QEMU 10.0.2 cannot restore "
                                 "such images (fixed after 10.0)")
        while True:
            start = cur.pos
            if ram_end is not None and cur.at_end():
                # RAM is whole but the device state is gone: a forensic reader still wants RAM.
                self.warnings.append(f"stream ends at {start:#x}, right after RAM: no device state")
                device_offset = start
                break
            t = cur.u8("section type")
            if t in (SectionType.SECTION_START, SectionType.SECTION_FULL):
                sid = cur.be32("section id")
                idstr = cur.name("section idstr")
                instance = cur.be32("instance id")
                version = cur.be32("section version")
                if t == SectionType.SECTION_FULL:
                    if ram_id is None:
                        raise FormatError(f"device section {idstr!r} before any RAM section", start)
                    if ram_end is None:
                        raise UnsupportedError(
                            f"device section {idstr!r} comes before the end of RAM (virtio-mem "
                            f"early setup?): its length cannot be known", start)
                    device_offset = start
                    break
                if sid in self.iterables or sid == ram_id:
                    raise FormatError(f"second START section with id {sid}", start)
                if idstr != RAM_SECTION_IDSTR:
                    if ram_id is None:
                        raise FormatError(f"iterable section {idstr!r} before the RAM section", start)
                    self.iterable_start(start, sid, idstr, instance, version)
                    continue
                if ram_id is not None:
                    raise FormatError("second RAM START section", start)
                if version != RAM_SECTION_VERSION:
                    raise UnsupportedError(f"RAM section version {version} (expected 4)", start)
                ram_id, ram_start = sid, start
                total = self.ram_setup()
                self.sink.start(RamSetup(configuration=conf, capabilities=self.capabilities,
                                         ram_section_id=sid, page_size=self.page_size,
                                         blocks=tuple(self.blocks)))
                self.records()
                self.footer(sid, "RAM START")
            elif t in (SectionType.SECTION_PART, SectionType.SECTION_END):
                sid = cur.be32("section id")
                if sid in self.iterables:
                    self.iterable_part(start, t, self.iterables[sid])
                    continue
                if ram_id is None or sid != ram_id:
                    raise FormatError(f"section {'PART' if t == 2 else 'END'} for unknown section id "
                                      f"{sid}", start)
                if ram_end is not None:
                    raise FormatError("RAM section continues after its END", start)
                self.records()
                self.footer(sid, "RAM PART" if t == SectionType.SECTION_PART else "RAM END")
                if t == SectionType.SECTION_PART:
                    parts += 1
                else:
                    ram_end = cur.pos
            elif t == SectionType.COMMAND:
                commands.append(self.command(start))
            elif t == SectionType.EOF:
                if ram_id is None:
                    raise FormatError("stream ends (QEMU_VM_EOF) without a RAM section", start)
                if ram_end is None:
                    raise FormatError("stream ends (QEMU_VM_EOF) before the RAM END section", start)
                device_offset = eof = start
                break
            elif t == SectionType.SECTION_FOOTER:
                raise FormatError("section footer where a section should start", start)
            else:
                raise FormatError(f"unknown section type {t:#x}", start)
        # Every way out of the loop has seen the RAM section start and end.
        assert ram_id is not None and ram_start is not None and ram_end is not None and device_offset is not None
        if device_offset == cur.pos and eof is None and cur.at_end():
            return self.layout(conf, ram_id, ram_start, total, parts, commands, ram_end, device_offset,
                               None, None, None, cur.pos)
        vmdesc_offset, vmdesc, end = self.tail(device_offset, eof)
        if vmdesc_offset is not None:
            eof = vmdesc_offset - 1
        elif eof is None:
            self.warnings.append("the end of the device state could not be located "
                                 "(no VM description after it)")
        return self.layout(conf, ram_id, ram_start, total, parts, commands, ram_end, device_offset,
                           eof, vmdesc_offset, vmdesc, end)

    def layout(self, conf: Configuration | None, ram_id: int, ram_start: int, total: int, parts: int,
               commands: list[Command], ram_end: int, device_offset: int, eof: int | None,
               vmdesc_offset: int | None, vmdesc: bytes | None, end: int) -> StreamLayout:
        return StreamLayout(
            base=self.base, end=end, configuration=conf, page_size=self.page_size,
            ram_section_id=ram_id, ram_start_offset=ram_start, mem_size_total=total,
            blocks=tuple(self.blocks), mapped_ram=self.mapped, footers=bool(self.footers),
            ram_parts=parts, commands=tuple(commands), ram_end_offset=ram_end,
            device_offset=device_offset, eof_offset=eof, vmdesc_offset=vmdesc_offset,
            vmdesc=vmdesc, warnings=tuple(self.warnings), padding=self.padding,
            iterables=tuple(IterableSection(it.section_id, it.idstr, it.instance_id, it.version,
                                            tuple(it.pieces)) for it in self.iterables.values()))

    # -- iterable sections besides RAM ---------------------------------------------------
    def iterable_start(self, start: int, sid: int, idstr: str, instance: int, version: int) -> None:
        walk = _ITERABLE_FORMATS.get(idstr)
        if walk is None:
            raise UnsupportedError(f"iterable section {idstr!r} besides RAM: ramfs does not know its "
                                   f"format, so it cannot delimit it", start)
        want, method = walk
        if version != want:
            raise UnsupportedError(f"iterable section {idstr!r} version {version} (ramfs knows {want})", start)
        it = _Iterable(sid, idstr, instance, version, method)
        self.iterables[sid] = it
        self.iterable_piece(start, SectionType.SECTION_START, it)

    def iterable_part(self, start: int, kind: int, it: _Iterable) -> None:
        if it.ended:
            raise FormatError(f"section {it.idstr!r} continues after its END", start)
        self.iterable_piece(start, kind, it)
        it.ended = kind == SectionType.SECTION_END

    def iterable_piece(self, start: int, kind: int, it: _Iterable) -> None:
        """Walk the body of one piece (its header already read) and its footer."""
        self.n_pieces += 1
        if self.n_pieces > MAX_ITERABLE_PIECES:
            raise UnsupportedError(f"more than {MAX_ITERABLE_PIECES} pieces of iterable sections", start)
        self._kept_pos = start
        what = f"{it.idstr!r} {SectionType(kind).name.removeprefix('SECTION_')}"
        getattr(self, it.walk)(it, what)
        self.footer(it.section_id, what)
        self._keep()
        it.pieces.append(SectionPiece(int(kind), start, self.cur.pos - start))

    def _advance(self, n: int, what: str) -> None:
        """Step over ``n`` payload bytes (kept when the stream cannot be read back), never
        asking the source for more than ``_STEP`` at a time."""
        cur = self.cur
        if self.kept is None:
            cur.skip(n, what)
            return
        while n > 0:
            step = min(n, _STEP)
            cur.skip(step, what)
            n -= step
            self._keep()

    def _keep(self) -> None:
        """Keep the bytes up to the cursor, for a stream that cannot be read back (each step
        is at most a record or ``_STEP``, well within ForwardSource's window)."""
        kept = self.kept
        if kept is None:
            return
        pos = self.cur.pos
        n = pos - self._kept_pos
        if n <= 0:
            return
        if len(kept) + n > MAX_KEPT_SECTION_BYTES:
            raise UnsupportedError(f"iterable sections besides RAM hold over {MAX_KEPT_SECTION_BYTES >> 20} MiB: "
                                   f"too much to carry over from a stream that cannot be read back "
                                   f"(decompress the image first)", self._kept_pos)
        data = self.src.read_at(self._kept_pos, n)
        if len(data) != n:
            raise TruncatedError("data ends inside an iterable section", self._kept_pos + len(data))
        kept += data
        self._kept_pos = pos

    def walk_htab(self, it: _Iterable, what: str) -> None:
        """hw/ppc/spapr.c ``htab_load``: a be32 header, then (when it is 0) chunks up to the
        end marker."""
        cur = self.cur
        at = cur.pos
        hdr = cur.be32(f"{what} header")
        if hdr == HTAB_NO_HPT:
            it.slots = None  # spapr_free_hpt
            return
        if hdr:
            if not HTAB_SHIFT_MIN <= hdr <= HTAB_SHIFT_MAX:
                raise FormatError(f"{what}: hash table shift {hdr} is out of range "
                                  f"({HTAB_SHIFT_MIN}..{HTAB_SHIFT_MAX})", at)
            it.slots = (1 << hdr) // HASH_PTE_SIZE_64
            return
        if it.slots is None:
            raise FormatError(f"{what}: hash table entries but no hash table size before them", at)
        while True:
            rec = cur.pos
            index, n_valid, n_invalid = HTAB_CHUNK.unpack(cur.read(HTAB_CHUNK.size, f"{what} chunk header"))
            if index == 0 and n_valid == 0 and n_invalid == 0:
                return
            if index + n_valid + n_invalid > it.slots:
                raise FormatError(f"{what}: chunk of entries {index}+{n_valid}+{n_invalid} past the "
                                  f"{it.slots} entries of the hash table", rec)
            self._advance(n_valid * HASH_PTE_SIZE_64, f"{what} hash table entries")
            self._keep()

    def walk_stattrib(self, it: _Iterable, what: str) -> None:
        """hw/s390x/s390-stattrib.c ``cmma_load``: flagged be64 words up to EOS."""
        cur = self.cur
        mask = self.page_size - 1
        guest_pages = sum(self.lengths) // self.page_size
        while True:
            rec = cur.pos
            word = cur.be64(f"{what} record")
            flags = word & mask
            if flags == STATTR_FLAG_EOS:
                return
            if flags == STATTR_FLAG_DONE:
                continue
            if flags == STATTR_FLAG_MORE:
                gfn = word // self.page_size
                count = cur.be64(f"{what} count")
                if gfn + count > guest_pages:
                    raise FormatError(f"{what}: attributes of pages {gfn}+{count}, past the "
                                      f"{guest_pages} pages of the guest", rec)
                self._advance(count, f"{what} attribute values")
                self._keep()
            elif flags == STATTR_FLAG_ERROR:
                raise FormatError(f"{what}: ERROR record (QEMU could not read the attributes when "
                                  f"saving; it refuses to load this stream)", rec)
            else:
                raise FormatError(f"{what}: record with unknown flags {flags:#x}", rec)

    def tail(self, device_offset: int, eof: int | None) -> tuple[int | None, bytes | None, int]:
        found = self._tail(device_offset, eof)
        if self.tail_data is not None:
            # The kept tail stops at its last non-zero byte; zeros up to the stream's end (the
            # EOF byte, a device state ending in zeros) belong to it all the same.
            missing = found[2] - (device_offset + len(self.tail_data))
            if missing > MAX_VMDESC_BYTES:
                self.tail_data = None  # too much to keep: as for any device state that large
            elif missing > 0:
                self.tail_data += bytes(missing)
        return found

    def _tail(self, device_offset: int, eof: int | None) -> tuple[int | None, bytes | None, int]:
        """Locate the VM description: the last thing in the stream, after QEMU_VM_EOF.

        Device sections cannot be walked without their vmstate layout, so the description is
        found from the end: ``0x00 (EOF) 0x06 be32 len`` followed by exactly ``len`` bytes
        that run to the end of the stream. The length must match to the byte; nothing is
        guessed. The stream ends at the end of the file, or at its last non-zero byte when
        only zeros follow (a device or volume larger than the stream): the description is
        JSON and ends with ``}``, so zeros after it cannot be part of it. Returns the
        description's offset and text, and where the stream ends; ``self.padding`` counts
        the zeros after it.
        """
        cur = self.cur
        if cur.end is not None:
            src: Source = self.src
            total = cur.end
            end = self._data_end(src, device_offset if eof is None else eof + 1, total)
            origin = 0
        else:
            # A stream of unknown length (decompressing): keep at most MAX_VMDESC_BYTES of
            # tail up to its last non-zero byte; zeros after it are counted, not kept.
            chunks = bytearray()
            zeros = 0  # zeros since the last non-zero byte, not in ``chunks``
            cur.seek(device_offset)
            while True:
                buf, i = cur.window(1 << 20)
                data = buf[i:]
                if not data:
                    break
                cur.pos += len(data)
                if data == _zeros(len(data)):
                    zeros += len(data)
                    continue
                kept = len(data.rstrip(b"\0"))
                if zeros:
                    chunks += bytes(min(zeros, MAX_VMDESC_BYTES + 8))
                chunks += data[:kept]
                zeros = len(data) - kept
                if len(chunks) > MAX_VMDESC_BYTES + 8:
                    del chunks[: len(chunks) - MAX_VMDESC_BYTES - 8]
            total = cur.pos
            end = total - zeros
            origin = end - len(chunks)
            if origin == device_offset:
                self.tail_data = chunks
            src = _OffsetBytes(chunks, origin)
        if eof is not None:
            # No device sections: the description (if any) follows the EOF byte directly.
            if end <= eof + 1:
                self.padding = total - (eof + 1)
                return None, None, eof + 1
            found = self._vmdesc_at(src, eof + 1, end)
            if found[0] is None:
                return (*found, total)  # what follows is not a description: said, not cut off
            self.padding = total - end
            return (*found, end)
        found = self._vmdesc_before(src, max(device_offset + 1, origin + 1), end)
        if found[0] is None:
            # Without a description the stream's end is unknown: zeros at the end of the
            # device state are not taken for padding.
            return None, None, total
        self.padding = total - end
        return (*found, end)

    @staticmethod
    def _data_end(src: Source, lo: int, end: int) -> int:
        """Just past the last non-zero byte of ``[lo, end)`` (``lo`` when all are zero).

        Holes are zeros without reading them, when the source knows where its data is
        (``data_ranges``: SEEK_DATA); what is data is read backwards in chunks that grow to
        16 MiB and compared whole with zeros (memcmp speed): one read when the file ends in
        data, and a volume's worth of written zeros at the speed of the disk.
        """
        ranges = getattr(src, "data_ranges", None)
        if ranges is not None:
            end = max((b for _, b in ranges(lo, end)), default=lo)
        pos = end
        step = 1 << 16
        while pos > lo:
            start = max(lo, pos - step)
            data = src.read_at(start, pos - start)
            if len(data) != pos - start:
                raise TruncatedError(f"read of {pos - start} bytes at {start:#x} returned {len(data)}", start)
            if data != _zeros(len(data)):
                return start + len(data.rstrip(b"\0"))
            pos = start
            step = min(step * 4, 16 << 20)
        return lo

    def _vmdesc_before(self, src: Source, lo: int, end: int) -> tuple[int | None, bytes | None]:
        """The ``0x00 0x06 be32 len`` marker whose ``len`` bytes end exactly at ``end``."""
        lo = max(lo, end - 5 - MAX_VMDESC_BYTES)
        pos = end
        step = 1 << 16
        while pos > lo:
            start = max(lo, pos - step)
            # Overlap by 5 bytes so a marker straddling two chunks is still seen whole.
            block = src.read_at(start - 1, pos - start + 1 + 5)
            j = len(block)
            while True:
                j = block.rfind(b"\x06", 0, j)
                if j < 1:
                    break
                p = start - 1 + j
                if block[j - 1] == 0 and p + 5 <= end and j + 5 <= len(block):
                    n = struct.unpack_from(">I", block, j + 1)[0]
                    if p + 5 + n == end:
                        return p, src.read_at(p + 5, n)
            pos = start
            step = min(step * 4, 16 << 20)
        return None, None

    def _vmdesc_at(self, src: Source, pos: int, end: int) -> tuple[int | None, bytes | None]:
        head = src.read_at(pos, 5)
        if len(head) < 5 or head[0] != SectionType.VMDESCRIPTION:
            self.warnings.append(f"unexpected data after QEMU_VM_EOF at {pos:#x}")
            return None, None
        n = struct.unpack_from(">I", head, 1)[0]
        if pos + 5 + n != end:
            self.warnings.append(f"VM description length {n} does not reach the end of the file")
            return None, None
        if n > MAX_VMDESC_BYTES:
            self.warnings.append(f"VM description of {n} bytes is too large to read")
            return None, None
        return pos, src.read_at(pos + 5, n)


@functools.lru_cache(maxsize=8)
def _zeros(n: int) -> bytes:
    # Calloc'd: untouched pages map the kernel's zero page, so the cache costs no memory.
    return bytes(n)


class _OffsetBytes:
    """A bytes tail that answers ``read_at`` with the file offsets it came from."""

    def __init__(self, data: bytes | bytearray, origin: int):
        self.data, self.origin = data, origin
        self.size = origin + len(data)

    def read_at(self, offset: int, size: int) -> bytes:
        i = offset - self.origin
        if i < 0:
            raise FormatError("internal: read before the retained stream tail", offset)
        part = self.data[i : i + size]
        return part if isinstance(part, bytes) else bytes(part)


def parse_configuration(source: Source, base: int = 0) -> Configuration | None:
    """Only the file header and configuration: enough to know the RAM encoding."""
    p = _Parser(source, base, source.size)
    p.header()
    return p.configuration()


def parse_stream(source: Source, base: int = 0, end: int | None = None,
                 sink: RecordSink | None = None) -> StreamLayout:
    """Walk a QEMU stream that starts at ``base``, reporting its page records to ``sink``;
    see the module docstring."""
    return parse_stream_with_tail(source, base, end, sink)[0]


def parse_stream_with_tail(source: Source, base: int = 0, end: int | None = None,
                           sink: RecordSink | None = None) -> tuple[StreamLayout, bytes | bytearray | None]:
    """:func:`parse_stream`, also returning, for a source of unknown length (a stream), the
    bytes from the first device section to the end, which can no longer be read back once
    consumed (None for a source of known size)."""
    kept = parse_stream_kept(source, base, end, sink)
    return kept.layout, kept.tail


@dataclass(frozen=True)
class KeptStream:
    """A parse of a stream that cannot be read back, with the bytes a copy needs."""

    layout: StreamLayout
    tail: bytes | bytearray | None  # from the first device section to the end
    sections: bytes | bytearray | None  # every piece of layout.iterables, in stream order

    @functools.cached_property
    def _starts(self) -> dict[int, int]:
        starts, pos = {}, 0
        for p in sorted((q for s in self.layout.iterables for q in s.pieces), key=lambda q: q.offset):
            starts[p.offset] = pos
            pos += p.length
        return starts

    def piece(self, piece: SectionPiece) -> bytes | bytearray:
        """The bytes of one piece (from ``sections``)."""
        at = self._starts.get(piece.offset)
        if self.sections is None or at is None:
            raise FormatError("internal: the bytes of this iterable section piece were not kept", piece.offset)
        return self.sections[at:at + piece.length]


def parse_stream_kept(source: Source, base: int = 0, end: int | None = None,
                      sink: RecordSink | None = None) -> KeptStream:
    """:func:`parse_stream_with_tail`, also keeping the bytes of the iterable sections
    besides RAM when the source has no known length (they cannot be read back either)."""
    p = _Parser(source, base, source.size if end is None else end, sink)
    layout = p.parse()
    return KeptStream(layout, p.tail_data, p.kept)


# --- bitmaps (ram.c ram_save_file_bmap: a raw dump of the host's unsigned long array) ------

def bitmap_size(num_pages: int) -> int:
    """``BITS_TO_LONGS(num_pages) * sizeof(unsigned long)`` on a 64-bit host."""
    return (num_pages + 63) // 64 * 8


def bits_beyond(bitmap: bytes | bytearray, num_pages: int) -> int:
    """How many bits are set past the last page (QEMU ignores them; check reports them)."""
    full, rem = divmod(num_pages, 8)
    count = 0
    if rem and full < len(bitmap):
        count += bin(bitmap[full] >> rem).count("1")
        full += 1
    tail = bitmap[full:]
    return count + int.from_bytes(tail, "little").bit_count() if tail else count


def count_bits(bitmap: bytes | bytearray, first: int, last: int) -> int:
    """Set bits in ``[first, last)`` (LSB-first within little-endian words), by popcount:
    no per-run work, so a fragmented span costs what a dense one does."""
    if last <= first:
        return 0
    x = int.from_bytes(memoryview(bitmap)[first >> 3:(last + 7) >> 3], "little") >> (first & 7)
    return (x & ((1 << (last - first)) - 1)).bit_count()


def populated_count(bitmap: bytes | bytearray, num_pages: int) -> int:
    """Set bits among the first ``num_pages`` (LSB-first within little-endian words)."""
    step = 8 << 20  # 1 MiB of bitmap at a time: no copy of a whole (possibly huge) bitmap
    return sum(count_bits(bitmap, i, min(i + step, num_pages)) for i in range(0, num_pages, step))


def set_runs(bitmap: bytes | bytearray, first: int, last: int) -> Iterator[tuple[int, int]]:
    """Yield ``(start, stop)`` page ranges of set bits within ``[first, last)``."""
    i = first
    while i < last:
        # Skip zero bytes quickly: most of a guest's RAM is often untouched.
        byte_i = i >> 3
        b = bitmap[byte_i] >> (i & 7)
        if b == 0:
            nxt = _next_nonzero_byte(bitmap, byte_i + 1, (last + 7) >> 3)
            i = nxt << 3
            continue
        # advance to the first set bit
        i += (b & -b).bit_length() - 1
        if i >= last:
            return
        start = i
        # find the end of this run of ones
        while i < last:
            byte_i = i >> 3
            b = (~bitmap[byte_i] & 0xFF) >> (i & 7)
            if b == 0:
                nxt = _next_non_ff_byte(bitmap, byte_i + 1, (last + 7) >> 3)
                i = nxt << 3
                continue
            i += (b & -b).bit_length() - 1
            break
        stop = min(i, last)
        yield start, stop
        i = stop


_NONZERO_BYTE = re.compile(rb"[^\x00]")
_NON_FF_BYTE = re.compile(rb"[^\xff]")


_SKIP_CHUNK = 1 << 16


def _next_byte_not(bitmap: bytes | bytearray, i: int, limit: int, fill: int, pattern: re.Pattern[bytes]) -> int:
    # Runs of ``fill`` are skipped by bytes.count over windows that double up to 64 KiB (a
    # memchr-speed C loop, ~10x faster than a regex over a long run: a terabyte block has a
    # 32 MiB bitmap), while the first small window keeps short gaps cheap (a bitmap with one
    # page set every 16 has 262144 of them). The regex then finds the byte in the window.
    # Nothing copies the bitmap.
    step = 64
    while i < limit:
        j = min(i + step, limit)
        if bitmap.count(fill, i, j) != j - i:
            m = pattern.search(bitmap, i, j)
            assert m is not None  # the window holds a byte other than ``fill``
            return m.start()
        i = j
        step = min(step * 2, _SKIP_CHUNK)
    return limit


def _next_nonzero_byte(bitmap: bytes | bytearray, i: int, limit: int) -> int:
    return _next_byte_not(bitmap, i, limit, 0, _NONZERO_BYTE)


def _next_non_ff_byte(bitmap: bytes | bytearray, i: int, limit: int) -> int:
    return _next_byte_not(bitmap, i, limit, 0xFF, _NON_FF_BYTE)


def read_bitmap(source: Source, block: RamBlockRecord) -> bytes:
    """The bitmap bytes of a mapped-ram block (empty if the block is not stored)."""
    hdr = block.mapped
    if hdr is None:
        raise FormatError(f"block {block.idstr!r} has no mapped-ram header")
    if not hdr.stored:
        return b""
    n = bitmap_size(block.used_length // hdr.page_size)
    data = source.read_at(hdr.bitmap_offset, n)
    if len(data) != n:
        raise TruncatedError(f"bitmap of {block.idstr!r} needs {n} bytes, file has {len(data)}",
                             hdr.bitmap_offset)
    return data
