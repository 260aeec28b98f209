"""Writing the formats: the byte encodings a converter emits (records in, bytes out).

Each function mirrors the QEMU 10.0 / libvirt 11.3 writer named in its docstring, so that a
converted image is what QEMU itself would have written for the same guest state.
"""

from __future__ import annotations

import json
import struct

from ramfs.format.libvirt import LIBVIRT_HEADER_SIZE, LibvirtHeader, QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL, SaveFormat
from ramfs.format.qemu import (CAP_MAPPED_RAM, MAPPED_RAM_FILE_OFFSET_ALIGNMENT, MAPPED_RAM_HDR_VERSION,
                               MAPPED_RAM_HEADER, QEMU_VM_FILE_MAGIC, QEMU_VM_FILE_VERSION, RAM_SAVE_FLAG_EOS,
                               RAM_SAVE_FLAG_MEM_SIZE, RAM_SECTION_IDSTR, RAM_SECTION_VERSION,
                               SUBSECTION_CAPABILITIES, SUBSECTION_TARGET_PAGE_BITS, SUBSECTION_UUID,
                               VALIDATED_CAPABILITIES, Configuration, MigCmd, SectionType, bitmap_size)

_BE32 = struct.Struct(">I")
_BE64 = struct.Struct(">Q")


def libvirt_header(h: LibvirtHeader, raw: bytes, *, format: SaveFormat, complete: bool) -> bytes:
    """The 92-byte header with a new format code and magic; everything else as in ``raw``
    (byte order, version, data_len, cookieOffset, was_running and the unused words)."""
    order = "<" if h.byteorder == "little" else ">"
    out = bytearray(raw[:LIBVIRT_HEADER_SIZE])
    out[:16] = QEMU_SAVE_MAGIC if complete else QEMU_SAVE_PARTIAL
    if h.version == 1:
        # A version-1 header has no format word (libvirt never decompresses v1): say version
        # 2 with no cookie. The fields before it sit at the same offsets in both versions.
        struct.pack_into(order + "I", out, 16, 2)
        struct.pack_into(order + "I", out, 32, 0)
    struct.pack_into(order + "I", out, 28, int(format))
    return bytes(out)


def _name(s: str) -> bytes:
    raw = s.encode("utf-8", "surrogateescape")
    if not 0 < len(raw) < 256:
        raise ValueError(f"name {s!r} does not fit a u8 length")
    return bytes([len(raw)]) + raw


def file_header() -> bytes:
    """``qemu_savevm_state_header``: magic and version."""
    return _BE32.pack(QEMU_VM_FILE_MAGIC) + _BE32.pack(QEMU_VM_FILE_VERSION)


def with_capability(caps: tuple[str, ...], cap: str) -> tuple[str, ...]:
    """Add a validated capability keeping QEMU's ``MigrationCapability`` enum order."""
    wanted = set(caps) | {cap}
    known = [c for c in VALIDATED_CAPABILITIES if c in wanted]
    return tuple(known + [c for c in caps if c not in VALIDATED_CAPABILITIES])


def configuration(conf: Configuration, capabilities: tuple[str, ...]) -> bytes:
    """``vmstate_configuration`` with its subsections in QEMU's order."""
    machine = conf.machine.encode("utf-8", "surrogateescape")
    out = bytearray([SectionType.CONFIGURATION]) + _BE32.pack(len(machine)) + machine
    if conf.target_page_bits is not None:
        out += bytes([SectionType.SUBSECTION]) + _name(SUBSECTION_TARGET_PAGE_BITS) + _BE32.pack(1)
        out += _BE32.pack(conf.target_page_bits)
    if capabilities:
        out += bytes([SectionType.SUBSECTION]) + _name(SUBSECTION_CAPABILITIES) + _BE32.pack(1)
        out += _BE32.pack(len(capabilities)) + b"".join(_name(c) for c in capabilities)
    if conf.uuid is not None:
        out += bytes([SectionType.SUBSECTION]) + _name(SUBSECTION_UUID) + _BE32.pack(1) + conf.uuid
    return bytes(out)


def section_start(section_id: int, idstr: str = RAM_SECTION_IDSTR, instance: int = 0,
                  version: int = RAM_SECTION_VERSION) -> bytes:
    """``save_section_header`` for START (and FULL)."""
    return (bytes([SectionType.SECTION_START]) + _BE32.pack(section_id) + _name(idstr)
            + _BE32.pack(instance) + _BE32.pack(version))


def section_part_end(kind: SectionType, section_id: int) -> bytes:
    return bytes([kind]) + _BE32.pack(section_id)


def footer(section_id: int) -> bytes:
    """``save_section_footer``."""
    return bytes([SectionType.SECTION_FOOTER]) + _BE32.pack(section_id)


def eos() -> bytes:
    return _BE64.pack(RAM_SAVE_FLAG_EOS)


def mem_size(total: int) -> bytes:
    return _BE64.pack(total | RAM_SAVE_FLAG_MEM_SIZE)


def command(cmd: MigCmd, payload: bytes = b"") -> bytes:
    """``qemu_savevm_command_send``."""
    return bytes([SectionType.COMMAND]) + struct.pack(">HH", int(cmd), len(payload)) + payload


def block_record(idstr: str, used_length: int) -> bytes:
    return _name(idstr) + _BE64.pack(used_length)


def mapped_ram_header(page_size: int, bitmap_offset: int, pages_offset: int) -> bytes:
    """``mapped_ram_setup_ramblock``: version 1, page size, absolute offsets."""
    return MAPPED_RAM_HEADER.pack(MAPPED_RAM_HDR_VERSION, page_size, bitmap_offset, pages_offset)


def mapped_ram_region(header_offset: int, used_length: int, page_size: int) -> tuple[int, int, int]:
    """``(bitmap_offset, pages_offset, next_offset)`` for a block whose header sits at
    ``header_offset``: the bitmap follows the header, the pages start at the next 1 MiB
    boundary (absolute, for O_DIRECT), and the next record starts right after the pages."""
    bitmap_offset = header_offset + MAPPED_RAM_HEADER.size
    end = bitmap_offset + bitmap_size(used_length // page_size)
    align = MAPPED_RAM_FILE_OFFSET_ALIGNMENT
    pages_offset = (end + align - 1) // align * align
    return bitmap_offset, pages_offset, pages_offset + used_length


def vmdesc_with_mapped_ram(vmdesc: bytes) -> bytes:
    """The VM description as QEMU writes it when ``mapped-ram`` is on: the configuration
    object gains the capabilities subsection (QEMU's JSON writer uses ", " and ": ")."""
    desc = json.loads(vmdesc)
    conf = desc.get("configuration")
    if not isinstance(conf, dict):
        return vmdesc
    subs = [s for s in conf.get("subsections", []) if s.get("vmsd_name") != SUBSECTION_CAPABILITIES]
    caps = {"vmsd_name": SUBSECTION_CAPABILITIES, "version": 1, "fields": [
        {"name": "caps_count", "type": "uint32", "size": 4},
        {"name": "capabilities", "type": "capability", "size": 1 + len(CAP_MAPPED_RAM)}]}
    order = [SUBSECTION_TARGET_PAGE_BITS, SUBSECTION_CAPABILITIES, SUBSECTION_UUID]
    subs.append(caps)
    subs.sort(key=lambda s: order.index(s["vmsd_name"]) if s.get("vmsd_name") in order else len(order))
    conf["subsections"] = subs
    return json.dumps(desc, separators=(", ", ": ")).encode()


def vmdesc_section(json_bytes: bytes) -> bytes:
    return bytes([SectionType.VMDESCRIPTION]) + _BE32.pack(len(json_bytes)) + json_bytes
