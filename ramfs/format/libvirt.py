"""libvirt's save-image header (``virQEMUSaveHeader``) and its XML data area.

Source: libvirt 11.3 src/qemu/qemu_saveimage.h and qemu_saveimage.c
(``qemuSaveImageReadHeader``, ``virQEMUSaveDataWrite``). See docs/formats.md.
"""

from __future__ import annotations

import enum
import struct
from dataclasses import dataclass

from ramfs.errors import FormatError, IncompleteImageError, TruncatedError
from ramfs.format.source import Source

QEMU_SAVE_MAGIC = b"LibvirtQemudSave"  # qemu_saveimage.h
QEMU_SAVE_PARTIAL = b"LibvirtQemudPart"  # written first, replaced by virQEMUSaveDataFinish
QEMU_SAVE_VERSION = 2  # the only version libvirt 11.3 writes, sparse included

# magic[16], version, data_len, was_running, format, cookieOffset, unused[14]
_HEADER_FIELDS = "16s5I14I"
LIBVIRT_HEADER_SIZE = struct.calcsize("<" + _HEADER_FIELDS)  # 92 = sizeof(virQEMUSaveHeader)

# The data area holds XML + cookie + 64 KiB of padding. We refuse absurd sizes rather than
# allocate them: this bounds what a hostile header can make us read.
MAX_XML_BYTES = 16 << 20


class SaveFormat(enum.IntEnum):
    """``virQEMUSaveFormat`` (names from ``VIR_ENUM_IMPL(qemuSaveFormat, ...)``)."""

    RAW = 0
    GZIP = 1
    BZIP2 = 2
    XZ = 3
    LZOP = 4
    ZSTD = 5
    SPARSE = 6

    @property
    def label(self) -> str:
        return self.name.lower()

    @property
    def compressed(self) -> bool:
        return self not in (SaveFormat.RAW, SaveFormat.SPARSE)


@dataclass(frozen=True)
class LibvirtHeader:
    magic: bytes
    version: int
    data_len: int
    was_running: bool
    format: SaveFormat
    cookie_offset: int
    byteorder: str  # "little" or "big": as stored; libvirt swaps when version > 2

    @property
    def complete(self) -> bool:
        return self.magic == QEMU_SAVE_MAGIC

    @property
    def stream_offset(self) -> int:
        """Where the QEMU stream starts: 92 + data_len, never aligned (qemuProcessIncomingDefNew)."""
        return LIBVIRT_HEADER_SIZE + self.data_len

    @property
    def effective_format(self) -> SaveFormat:
        """libvirt decompresses only version-2 images, so a version-1 image is always raw."""
        return self.format if self.version == 2 else SaveFormat.RAW


@dataclass(frozen=True)
class LibvirtMetadata:
    header: LibvirtHeader
    domain_xml: str
    cookie_xml: str | None


def is_libvirt_magic(head: bytes) -> bool:
    return head[:16] in (QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL)


def parse_header(raw: bytes, *, allow_partial: bool = False) -> LibvirtHeader:
    """Decode the 92-byte header, applying libvirt's checks in its order."""
    if len(raw) < LIBVIRT_HEADER_SIZE:
        raise TruncatedError(
            f"libvirt header needs {LIBVIRT_HEADER_SIZE} bytes, file has {len(raw)}", 0)
    magic = raw[:16]
    if magic == QEMU_SAVE_PARTIAL and not allow_partial:
        raise IncompleteImageError(
            "incomplete save image: libvirt never finished writing it (magic LibvirtQemudPart)", 0)
    if magic not in (QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL):
        raise FormatError(f"not a libvirt save image: magic {magic!r}", 0)
    byteorder = "little"
    fields = struct.unpack_from("<" + _HEADER_FIELDS, raw)
    version = fields[1]
    if version > QEMU_SAVE_VERSION:
        # qemuSaveImageBswapHeader: an image from a host of the other byte order.
        byteorder = "big"
        fields = struct.unpack_from(">" + _HEADER_FIELDS, raw)
        version = fields[1]
        if version > QEMU_SAVE_VERSION:
            raise FormatError(f"libvirt save image version {fields[1]} is not supported (max 2)", 16)
    _, _, data_len, was_running, fmt, cookie_offset = fields[:6]
    if version == 1:
        # Version 1 (very old libvirt): xml_len, was_running, then unused words; no format,
        # no cookie. Read it as raw with no cookie.
        fmt, cookie_offset = 0, 0
    if fmt > max(SaveFormat):
        raise FormatError(f"unsupported save image format code {fmt} (known: 0..6)", 28)
    if data_len == 0:
        raise FormatError("libvirt header has data_len 0 (no domain XML)", 20)
    if cookie_offset > data_len:
        raise FormatError(f"cookieOffset {cookie_offset} lies beyond data_len {data_len}", 32)
    return LibvirtHeader(magic=magic, version=version, data_len=data_len,
                         was_running=bool(was_running), format=SaveFormat(fmt),
                         cookie_offset=cookie_offset, byteorder=byteorder)


def _c_string(source: Source, start: int, limit: int, what: str) -> str:
    """Read a NUL-terminated UTF-8 string of at most ``limit`` bytes at ``start``."""
    raw = source.read_at(start, min(limit, MAX_XML_BYTES))
    end = raw.find(b"\0")
    if end < 0:
        if len(raw) < min(limit, MAX_XML_BYTES):
            raise TruncatedError(f"file ends inside the {what}", start + len(raw))
        if limit > MAX_XML_BYTES:
            raise FormatError(f"{what} is not NUL-terminated within {MAX_XML_BYTES} bytes", start)
        raise FormatError(f"{what} is not NUL-terminated", start)
    try:
        return raw[:end].decode("utf-8")
    except UnicodeDecodeError as e:
        raise FormatError(f"{what} is not UTF-8: {e.reason}", start + e.start) from None


def parse_metadata(source: Source, *, allow_partial: bool = False) -> LibvirtMetadata:
    header = parse_header(source.read_at(0, LIBVIRT_HEADER_SIZE), allow_partial=allow_partial)
    size = source.size
    if size is not None and size < header.stream_offset:
        raise TruncatedError(
            f"file ends at {size}, before the QEMU stream at {header.stream_offset} (92 + data_len)", size)
    base = LIBVIRT_HEADER_SIZE
    if header.cookie_offset:
        xml = _c_string(source, base, header.cookie_offset, "domain XML")
        cookie = _c_string(source, base + header.cookie_offset,
                           header.data_len - header.cookie_offset, "cookie XML")
    else:
        xml = _c_string(source, base, header.data_len, "domain XML")
        cookie = None
    return LibvirtMetadata(header=header, domain_xml=xml, cookie_xml=cookie)


# -- the memory layout the domain XML records ------------------------------------------------
# libvirt's scaled units (virScaleInteger, conf/domain_conf.c virDomainParseMemory): the
# default for memory elements is KiB.
_UNITS = {"b": 1, "bytes": 1, "k": 1 << 10, "kib": 1 << 10, "kb": 1000, "m": 1 << 20, "mib": 1 << 20,
          "mb": 1000 ** 2, "g": 1 << 30, "gib": 1 << 30, "gb": 1000 ** 3, "t": 1 << 40, "tib": 1 << 40,
          "tb": 1000 ** 4, "p": 1 << 50, "pib": 1 << 50, "pb": 1000 ** 5, "e": 1 << 60, "eib": 1 << 60,
          "eb": 1000 ** 6}


@dataclass(frozen=True)
class NumaCell:
    """``<cpu><numa><cell id= memory=>``: guest NUMA node ``id``, backed by the memory
    backend libvirt names ``ram-node<id>`` (qemuBuildMemoryCellBackendProps) and given to
    ``-numa node,nodeid=<id>,memdev=ram-node<id>``."""

    id: int
    memory: int  # bytes

    @property
    def backend_id(self) -> str:
        return f"ram-node{self.id}"


@dataclass(frozen=True)
class MemoryDevice:
    """``<devices><memory model=...>``: a DIMM, NVDIMM, virtio-mem, ... with what the XML
    says of its place. libvirt names a dimm/nvdimm's alias after its slot
    (qemu_alias.c qemuDeviceMemoryGetAliasID: ``dimm<slot>``) and its backend ``mem<alias>``
    (qemuBuildMemoryBackendProps), which is the RAM block's idstr in the stream."""

    model: str
    alias: str | None
    size: int | None
    base: int | None  # guest-physical address: <address type='dimm' base=> or <target><address base=>
    slot: int | None

    @property
    def backend_id(self) -> str | None:
        alias = self.alias
        if alias is None and self.model in ("dimm", "nvdimm") and self.slot is not None:
            alias = f"{self.model}{self.slot}"
        return f"mem{alias}" if alias else None


@dataclass(frozen=True)
class DomainMemory:
    cells: tuple[NumaCell, ...]
    devices: tuple[MemoryDevice, ...]


def _scaled(value: str | None, unit: str | None) -> int | None:
    if value is None:
        return None
    try:
        return int(value, 0) * _UNITS[(unit or "KiB").lower()]
    except (ValueError, KeyError):
        return None


def _int(value: str | None) -> int | None:
    try:
        return int(value, 0) if value is not None else None
    except ValueError:
        return None


def domain_memory(xml: str) -> DomainMemory | None:
    """The NUMA cells and memory devices of a domain XML; None when it is not readable XML.

    Only what the XML states is returned (no defaults are guessed): a cell without an id or a
    size, or a device without an address, is kept with ``None`` where the XML is silent.
    """
    import xml.etree.ElementTree as ET  # the stdlib parser resolves no external entities

    try:
        root = ET.fromstring(xml)
    except ET.ParseError:
        return None
    cells = []
    for cell in root.findall("./cpu/numa/cell"):
        cid, mem = _int(cell.get("id")), _scaled(cell.get("memory"), cell.get("unit"))
        if cid is not None and mem is not None:
            cells.append(NumaCell(cid, mem))
    devices = []
    for m in root.findall("./devices/memory"):
        size = m.find("./target/size")
        addr = m.find("./address")
        base = slot = None
        if addr is not None and addr.get("type") == "dimm":
            base, slot = _int(addr.get("base")), _int(addr.get("slot"))
        taddr = m.find("./target/address")
        if base is None and taddr is not None:
            base = _int(taddr.get("base"))
        alias = m.find("./alias")
        devices.append(MemoryDevice(
            model=m.get("model") or "", alias=alias.get("name") if alias is not None else None,
            size=_scaled(size.text.strip() if size is not None and size.text else None,
                         size.get("unit") if size is not None else None),
            base=base, slot=slot))
    return DomainMemory(tuple(sorted(cells, key=lambda c: c.id)), tuple(devices))
