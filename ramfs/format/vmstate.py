"""Device state: QEMU's FULL sections, decoded by the VM description alone.

A QEMU stream's device (FULL) sections carry vmstate data with no length prefix; only code
that knows each device's ``VMStateDescription`` can walk them. But QEMU also writes that
knowledge into the file: the VM description ("vmdesc", the JSON after ``QEMU_VM_EOF``) lists,
for every FULL section in stream order, every field it wrote with its type and the number of
bytes it took (migration/vmstate.c ``vmstate_save_state_v``: ``"size"`` is
``qemu_file_transferred`` after the field minus before it), nested structs (``"struct"``),
inline vmsds (``"tmp"``, ``"vstruct"``: ``"fields"`` inside the field), compressed arrays
(``"array_len"``: the description covers element 0, all elements are alike) and the
subsections that were actually sent (``"subsections"``). So the device state is decoded here
*by description, not by code*: no device is known by name, except that :func:`cpu_states`
reads a few well-known x86 fields out of the result.

Stream layout (savevm.c ``vmstate_save``, ``save_section_header``, ``save_section_footer``;
vmstate.c ``vmstate_subsection_save``)::

    u8 0x04 (SECTION_FULL), be32 section_id, u8 len + idstr, be32 instance_id, be32 version_id
    fields, in vmdesc order (integers big-endian, except types ending in " le")
    per listed subsection: u8 0x05, u8 len + name, be32 version_id, its fields and subsections
    u8 0x7e (SECTION_FOOTER), be32 section_id        [when the stream has footers]
    ... next device ...
    u8 0x00 (QEMU_VM_EOF)

:func:`parse_devices` checks every byte of that framing and every struct's size against the
description, and requires the walk to end exactly on ``layout.eof_offset``: that proves
independently where the device state ends (``qemu.py`` finds the EOF byte by searching the
vmdesc backwards from the end of the file). Any disagreement is a :class:`FormatError` that
names the device and the file offset; lengths come from a file we do not trust, so arrays
are bounded by the bytes actually left before the EOF byte before anything is allocated.

Offsets are those of ``source``, which must be where the layout's offsets point: pass
``Image.data`` (the image file itself for a plain or mapped-ram image, the decompressed
stream of a compressed libvirt image).
"""

from __future__ import annotations

import math
import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal, overload

from ramfs.errors import FormatError, TruncatedError
from ramfs.format.qemu import SectionType, StreamLayout
from ramfs.format.source import Cursor, Source

# --- limits ------------------------------------------------------------------------------
RAW_LIMIT = 4096  # bytes of ``raw`` kept per field; ``size`` always tells the whole length
MAX_DEPTH = 32  # nesting of structs/subsections; QEMU's deepest are ~5
MAX_FIELDS = 1 << 20  # Field objects per walk: bounds memory whatever the vmdesc claims
ARRAY_CHILDREN_LIMIT = 4096  # scalar arrays longer than this get no per-element Field
ARRAY_DECODE_LIMIT = 1 << 20  # scalar arrays larger than this (bytes) are not decoded

# --- scalar types (vmstate-types.c VMStateInfo names) -------------------------------------
# type name -> (width in bytes, signed, byte order)
INT_TYPES: dict[str, tuple[int, bool, Literal["little", "big"]]] = {
    "int8": (1, True, "big"), "int16": (2, True, "big"), "int32": (4, True, "big"),
    "int64": (8, True, "big"),
    "uint8": (1, False, "big"), "uint16": (2, False, "big"), "uint32": (4, False, "big"),
    "uint64": (8, False, "big"),
    "int32 equal": (4, True, "big"), "int64 equal": (8, True, "big"),
    "uint8 equal": (1, False, "big"), "uint16 equal": (2, False, "big"),
    "uint32 equal": (4, False, "big"), "uint64 equal": (8, False, "big"),
    "int32 le": (4, True, "little"),
    "timer": (8, True, "big"),  # timer_put: be64 expire time in ns, -1 when not armed
}
BOOL_TYPES = frozenset({"bool"})
FLOAT_TYPES = frozenset({"float64"})  # be64 IEEE double
# Types whose "fields" (written by their put() with the vmdesc writer) describe the bytes.
INLINE_VMSD_TYPES = frozenset({"tmp", "vstruct"})
SUBSECTION = "subsection"  # Field.type of a subsection

_SECTION_FULL = SectionType.SECTION_FULL
_SUBSECTION = SectionType.SUBSECTION
_FOOTER = SectionType.SECTION_FOOTER
_EOF = SectionType.EOF


# --- results -------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class Field:
    """One vmdesc field entry as found in the stream.

    ``type`` is the vmdesc type (``uint64``, ``struct``, ``buffer``, ``tmp``...) or
    ``"subsection"``. ``size`` is the field's whole length in the stream (all elements of an
    array; a subsection with its header). ``raw`` holds its first ``RAW_LIMIT`` bytes.

    * Scalars: ``value`` is the decoded int (bool for ``bool``, float for ``float64``); other
      leaves (``buffer``, ``unused_buffer``, ``pci config``...) have ``value`` None.
    * Structs, inline vmsds and subsections: ``children`` are the members, then the
      subsections (``type == "subsection"``) in stream order.
    * Arrays (``array_len`` set): ``children`` are the elements, each with the array's name
      and type and its ``index``; for a scalar array ``value`` is the tuple of element
      values too (and stays the only per-element data past ``ARRAY_CHILDREN_LIMIT``).
    """

    name: str
    type: str
    offset: int
    size: int
    raw: bytes
    value: Any = None
    children: tuple[Field, ...] = ()
    array_len: int | None = None
    index: int | None = None
    version: int | None = None
    vmsd_name: str | None = None

    @property
    def end(self) -> int:
        return self.offset + self.size

    @property
    def truncated(self) -> bool:
        """True when ``raw`` holds only the first ``RAW_LIMIT`` bytes."""
        return len(self.raw) < self.size

    def get(self, name: str) -> Field | None:
        """The member called ``name``, looking into subsections too (their fields are the
        same object's, e.g. ``cpu/tsc_khz`` holds ``env.tsc_khz``); not into structs."""
        return find_field(self.children, name)

    def __getitem__(self, i: int) -> Field:
        """Element ``i`` of an array."""
        if self.array_len is None:
            raise TypeError(f"field {self.name!r} is not an array")
        return self.children[i]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {"name": self.name, "type": self.type, "offset": self.offset,
                             "size": self.size}
        for key in ("array_len", "index", "version", "vmsd_name"):
            v = getattr(self, key)
            if v is not None:
                d[key] = v
        if self.value is not None:
            d["value"] = list(self.value) if isinstance(self.value, tuple) else self.value
        if self.children:
            d["children"] = [c.to_dict() for c in self.children]
        elif self.value is None or self.array_len is not None:
            d["raw"] = self.raw.hex()
            if self.truncated:
                d["raw_truncated"] = True
        return d


@dataclass(frozen=True, slots=True)
class DeviceSection:
    """One FULL section: a device's whole state."""

    name: str  # the section idstr, e.g. "cpu", "0000:00:01.1/ide"
    instance_id: int
    version: int  # the section header's version_id
    section_id: int
    vmsd_name: str | None
    offset: int  # of the 0x04 byte
    fields_offset: int  # of the first payload byte
    end: int  # just past the footer: the next section's 0x04 or the EOF byte
    fields: tuple[Field, ...]  # members, then subsections (type "subsection")

    @property
    def size(self) -> int:
        return self.end - self.offset

    def field(self, name: str) -> Field | None:
        """The field called ``name``, searching subsections too (see :meth:`Field.get`)."""
        return find_field(self.fields, name)

    def value(self, name: str, default: Any = None) -> Any:
        f = self.field(name)
        return default if f is None or f.value is None else f.value

    @property
    def subsections(self) -> tuple[Field, ...]:
        return tuple(f for f in self.fields if f.type == SUBSECTION)

    def flat(self) -> dict[str, Any]:
        """``{path: value}`` of every leaf (see :func:`flatten`)."""
        return flatten(self.fields)

    def to_dict(self) -> dict[str, Any]:
        return {"name": self.name, "instance_id": self.instance_id, "version": self.version,
                "section_id": self.section_id, "vmsd_name": self.vmsd_name, "offset": self.offset,
                "end": self.end, "fields": [f.to_dict() for f in self.fields]}


@dataclass(frozen=True)
class DeviceState:
    """All FULL sections of a stream, walked from ``offset`` to the EOF byte at ``end``."""

    devices: tuple[DeviceSection, ...]
    offset: int  # layout.device_offset
    end: int  # the QEMU_VM_EOF byte (== layout.eof_offset, proven by the walk)

    def __iter__(self) -> Iterator[DeviceSection]:
        return iter(self.devices)

    def __len__(self) -> int:
        return len(self.devices)

    def find(self, name: str, instance_id: int = 0) -> DeviceSection | None:
        for d in self.devices:
            if d.name == name and d.instance_id == instance_id:
                return d
        return None

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "end": self.end,
                "devices": [d.to_dict() for d in self.devices]}


def find_field(fields: Iterable[Field], name: str) -> Field | None:
    subs: list[Field] = []
    for f in fields:
        if f.name == name and f.type != SUBSECTION:
            return f
        if f.type == SUBSECTION:
            subs.append(f)
    for s in subs:
        hit = find_field(s.children, name)
        if hit is not None:
            return hit
    return None


def flatten(fields: Iterable[Field], prefix: str = "") -> dict[str, Any]:
    """Leaf values by path: ``env.segs[1].selector``, ``cpu/tsc_khz/env.tsc_khz``.

    A leaf's value is its decoded value, or the hex of its raw bytes (with a trailing
    ``...`` when only the first ``RAW_LIMIT`` bytes were kept).
    """
    out: dict[str, Any] = {}
    for f in fields:
        _flatten_one(f, prefix, out)
    return out


def _flatten_one(f: Field, prefix: str, out: dict[str, Any]) -> None:
    if f.type == SUBSECTION:
        path = f"{prefix}{f.name}/"
        for c in f.children:
            _flatten_one(c, path, out)
        return
    path = prefix + f.name
    if f.index is not None and f.array_len is None:
        path += f"[{f.index}]"  # an element of a non-compressed array (vmdesc "index")
    if f.array_len is not None:
        if f.children:
            for c in f.children:
                _flatten_element(c, f"{path}[{c.index}]", out)
        else:
            out[path] = f.value if f.value is not None else _hex(f)
        return
    _flatten_element(f, path, out)


def _flatten_element(f: Field, path: str, out: dict[str, Any]) -> None:
    if f.children:
        for c in f.children:
            _flatten_one(c, path + ("." if c.type != SUBSECTION else "/"), out)
    elif f.value is not None:
        out[path] = f.value
    else:
        out[path] = _hex(f)


def _hex(f: Field) -> str:
    return f.raw.hex() + ("..." if f.truncated else "")


# --- the walk ------------------------------------------------------------------------------

def parse_devices(source: Source, layout: StreamLayout) -> DeviceState:
    """Decode every FULL section from ``layout.device_offset`` to ``layout.eof_offset``.

    Sections are matched in order with ``vmdesc["devices"]`` by idstr and instance id (and
    version, when the description gives one). Raises :class:`FormatError` (with the device
    and the offset) when the stream and the description disagree anywhere, and when the
    walk does not end exactly on the QEMU_VM_EOF byte.
    """
    desc = _load_vmdesc(layout)
    if layout.eof_offset is None:
        raise FormatError("the end of the device state (QEMU_VM_EOF) is not known, so the device "
                          "sections cannot be checked", layout.device_offset)
    devices = desc.get("devices")
    if not isinstance(devices, list):
        raise FormatError("vmdesc has no \"devices\" list", layout.vmdesc_offset)
    walker = _Walker(source, layout)
    out: list[DeviceSection] = []
    for i, dd in enumerate(devices):
        out.append(walker.device(dd, i, len(devices), out[-1] if out else None))
    walker.finish(out[-1] if out else None)
    return DeviceState(devices=tuple(out), offset=layout.device_offset, end=layout.eof_offset)


def _load_vmdesc(layout: StreamLayout) -> dict[str, Any]:
    if layout.vmdesc is None:
        raise FormatError("the stream has no VM description (vmdesc): its device sections "
                          "cannot be decoded", layout.eof_offset if layout.eof_offset is not None
                          else layout.device_offset)
    try:
        desc = layout.vmdesc_json()
    except RecursionError:
        raise FormatError("vmdesc JSON is nested too deeply", layout.vmdesc_offset) from None
    assert desc is not None
    return desc


def _label(name: Any, iid: Any) -> str:
    return f"{name!r} instance {iid}"


class _Walker:
    def __init__(self, source: Source, layout: StreamLayout):
        self.src = source
        assert layout.eof_offset is not None  # parse_devices has checked
        self.eof: int = layout.eof_offset
        self.start = layout.device_offset
        self.footers = layout.footers
        self.desc_off = layout.vmdesc_offset
        # The EOF byte is the last one the walk may read.
        self.cur = Cursor(source, self.start, self.eof + 1)
        self.budget = MAX_FIELDS

    # -- vmdesc validation ---------------------------------------------------------------
    def bad_desc(self, where: str, problem: str) -> FormatError:
        return FormatError(f"vmdesc: {where}: {problem}", self.desc_off)

    @overload
    def desc_int(self, d: dict[str, Any], key: str, where: str, *, required: Literal[True] = True,
                 minimum: int = 0, maximum: int = (1 << 63) - 1) -> int: ...

    @overload
    def desc_int(self, d: dict[str, Any], key: str, where: str, *, required: bool,
                 minimum: int = 0, maximum: int = (1 << 63) - 1) -> int | None: ...

    def desc_int(self, d: dict[str, Any], key: str, where: str, *, required: bool = True,
                 minimum: int = 0, maximum: int = (1 << 63) - 1) -> int | None:
        v = d.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, int) or isinstance(v, bool) or not minimum <= v <= maximum:
            raise self.bad_desc(where, f"{key!r} is {v!r}, not an integer in [{minimum}, {maximum}]")
        return v

    @overload
    def desc_str(self, d: dict[str, Any], key: str, where: str, *, required: Literal[True] = True) -> str: ...

    @overload
    def desc_str(self, d: dict[str, Any], key: str, where: str, *, required: bool) -> str | None: ...

    def desc_str(self, d: dict[str, Any], key: str, where: str, *, required: bool = True) -> str | None:
        v = d.get(key)
        if v is None and not required:
            return None
        if not isinstance(v, str):
            raise self.bad_desc(where, f"{key!r} is {v!r}, not a string")
        return v

    def desc_list(self, d: dict[str, Any], key: str, where: str) -> list[Any]:
        v = d.get(key, [])
        if not isinstance(v, list):
            raise self.bad_desc(where, f"{key!r} is not a list")
        return v

    # -- reading -------------------------------------------------------------------------
    def raw_at(self, start: int, n: int) -> bytes:
        """Bytes already walked over (a struct's first bytes), from the cursor's buffer."""
        if n <= 0:
            return b""
        cur = self.cur
        i = start - cur.buf_start
        if i >= 0 and i + n <= len(cur.buf):
            return bytes(cur.buf[i:i + n])
        data = self.src.read_at(start, n)
        if len(data) != n:
            raise TruncatedError(f"data ends inside bytes already walked ({n} at {start:#x})", start)
        return data

    def take(self, n: int, where: str) -> None:
        if n > self.budget:
            raise FormatError(f"{where}: more than {MAX_FIELDS} fields in the device state; "
                              f"refusing to decode it", self.cur.pos)
        self.budget -= n

    # -- sections ------------------------------------------------------------------------
    def device(self, dd: Any, i: int, count: int, prev: DeviceSection | None) -> DeviceSection:
        cur = self.cur
        start = cur.pos
        where = f"devices[{i}]"
        if not isinstance(dd, dict):
            raise self.bad_desc(where, "not an object")
        name = self.desc_str(dd, "name", where)
        iid = self.desc_int(dd, "instance_id", where, maximum=0xFFFFFFFF)
        label = _label(name, iid)
        try:
            version = self.desc_int(dd, "version", where, required=False, maximum=0xFFFFFFFF)
            vmsd_name = self.desc_str(dd, "vmsd_name", where, required=False)
            if "fields" not in dd:
                raise self.bad_desc(where, f"device {label} has no \"fields\"")
            t = cur.u8("section type")
            if t == _EOF:
                raise FormatError(f"the device state ends (QEMU_VM_EOF) where the vmdesc lists "
                                  f"device {label} ({count - i} of {count} devices missing from "
                                  f"the stream)", start)
            if t != _SECTION_FULL:
                after = f"after device {_label(prev.name, prev.instance_id)}" if prev else "at the start"
                raise FormatError(f"expected the FULL section of device {label} {after}, found "
                                  f"byte {t:#04x}", start)
            sid = cur.be32("section id")
            idstr = cur.name("section idstr")
            s_iid = cur.be32("instance id")
            s_version = cur.be32("version id")
            if idstr != name or s_iid != iid:
                raise FormatError(f"the stream has section {_label(idstr, s_iid)} where the vmdesc "
                                  f"lists device {label} (devices[{i}])", start)
            if version is not None and version != s_version:
                raise FormatError(f"section {label} has version {s_version}, the vmdesc says "
                                  f"{version}", start)
            fields_offset = cur.pos
            fields = self.body(dd, "", 0, where)
            self.footer(sid)
        except FormatError as e:
            raise _in_device(e, label, start, self.eof) from None
        return DeviceSection(name=name, instance_id=iid, version=s_version, section_id=sid,
                             vmsd_name=vmsd_name, offset=start, fields_offset=fields_offset,
                             end=cur.pos, fields=fields)

    def footer(self, sid: int) -> None:
        cur = self.cur
        pos = cur.pos
        if self.footers:
            b = cur.u8("section footer")
            if b != _FOOTER:
                raise FormatError(f"the fields end at {pos:#x} but the next byte is {b:#04x}, not "
                                  f"the section footer (0x7e): the stream and the vmdesc disagree "
                                  f"about this device's length", pos)
            fid = cur.be32("footer section id")
            if fid != sid:
                raise FormatError(f"the footer names section {fid}, expected {sid}", pos)
        else:
            nxt = cur.peek_u8()
            if nxt not in (_SECTION_FULL, _EOF):
                raise FormatError(f"the fields end at {pos:#x} but the next byte is "
                                  f"{'nothing' if nxt is None else hex(nxt)}, neither a FULL section "
                                  f"nor QEMU_VM_EOF", pos)

    def finish(self, last: DeviceSection | None) -> None:
        cur = self.cur
        pos = cur.pos
        after = f"after device {_label(last.name, last.instance_id)}" if last else "with no devices"
        b = cur.peek_u8()
        if b == _SECTION_FULL and pos < self.eof:
            extra = "?"
            try:
                cur.u8("section type")
                cur.be32("section id")
                extra = repr(cur.name("section idstr"))
            except FormatError:
                pass
            raise FormatError(f"the stream has another device section ({extra}) {after}, the "
                              f"last one the vmdesc lists", pos)
        if pos != self.eof or b != _EOF:
            raise FormatError(f"the device state walk ends at {pos:#x} {after}, but QEMU_VM_EOF "
                              f"is at {self.eof:#x}", pos)
        cur.u8("QEMU_VM_EOF")

    # -- vmstate payloads ----------------------------------------------------------------
    def body(self, desc: dict[str, Any], path: str, depth: int, where: str) -> tuple[Field, ...]:
        """A vmsd's fields then its subsections."""
        if depth > MAX_DEPTH:
            raise self.bad_desc(where, f"structs nested more than {MAX_DEPTH} deep")
        out: list[Field] = []
        for j, fd in enumerate(self.desc_list(desc, "fields", where)):
            out.append(self.field(fd, path, depth, f"{where}.fields[{j}]"))
        for j, sd in enumerate(self.desc_list(desc, "subsections", where)):
            out.append(self.subsection(sd, path, depth, f"{where}.subsections[{j}]"))
        return tuple(out)

    def subsection(self, sd: Any, path: str, depth: int, where: str) -> Field:
        cur = self.cur
        start = cur.pos
        if not isinstance(sd, dict):
            raise self.bad_desc(where, "not an object")
        name = self.desc_str(sd, "vmsd_name", where)
        version = self.desc_int(sd, "version", where, required=False, maximum=0xFFFFFFFF)
        b = cur.u8(f"subsection {name!r}")
        if b != _SUBSECTION:
            inside = f" (inside {path.rstrip('./')!r})" if path else ""
            raise FormatError(f"the vmdesc lists subsection {name!r} here{inside}, but the stream "
                              f"has byte {b:#04x}, not a subsection (0x05)", start)
        sname = cur.name("subsection name")
        if sname != name:
            raise FormatError(f"subsection {sname!r} where the vmdesc lists {name!r}", start)
        v = cur.be32(f"version of subsection {name!r}")
        if version is not None and v != version:
            raise FormatError(f"subsection {name!r} has version {v}, the vmdesc says {version}", start)
        self.take(1, where)
        children = self.body(sd, f"{path}{name}/", depth + 1, where)
        size = cur.pos - start
        return Field(name=name, type=SUBSECTION, offset=start, size=size,
                     raw=self.raw_at(start, min(size, RAW_LIMIT)), children=children,
                     version=v, vmsd_name=name)

    def field(self, fd: Any, path: str, depth: int, where: str) -> Field:
        if not isinstance(fd, dict):
            raise self.bad_desc(where, "not an object")
        name = self.desc_str(fd, "name", where)
        typ = self.desc_str(fd, "type", where)
        size = self.desc_int(fd, "size", where)
        n = self.desc_int(fd, "array_len", where, required=False, maximum=0xFFFFFFFF)
        index = self.desc_int(fd, "index", where, required=False, maximum=0xFFFFFFFF)
        full = f"{path}{name}"
        inner = self.inner_desc(fd, typ, where)
        if n is None:
            return self.element(name, typ, size, inner, full, depth, where, index)
        cur = self.cur
        start = cur.pos
        left = self.eof - start
        if size and n > left // size:
            raise FormatError(f"field {full!r}: {n} elements of {size} bytes do not fit in the "
                              f"{left} bytes left before QEMU_VM_EOF", start)
        if inner is not None:
            self.take(n, where)
            children = tuple(self.element(name, typ, size, inner, f"{full}[{k}]", depth, where, k)
                             for k in range(n))
            total = cur.pos - start
            return Field(name=name, type=typ, offset=start, size=total,
                         raw=self.raw_at(start, min(total, RAW_LIMIT)), children=children,
                         array_len=n)
        total = n * size
        self.check_width(typ, size, full, start)
        if size == 0:  # n elements of nothing (a hostile n cannot make us loop)
            data, values = b"", None
        elif total <= ARRAY_DECODE_LIMIT:  # so n <= ARRAY_DECODE_LIMIT
            data = cur.read(total, f"field {full!r}")
            values = tuple(_decode(typ, data[k * size:(k + 1) * size]) for k in range(n))
            if all(v is None for v in values):
                values = None
        else:
            data = cur.read(RAW_LIMIT, f"field {full!r}")
            cur.skip(total - RAW_LIMIT, f"field {full!r}")
            values = None
        children = ()
        if n <= ARRAY_CHILDREN_LIMIT and total <= ARRAY_DECODE_LIMIT:
            self.take(n, where)
            children = tuple(Field(name=name, type=typ, offset=start + k * size, size=size,
                                   raw=data[k * size:k * size + min(size, RAW_LIMIT)],
                                   value=None if values is None else values[k], index=k)
                             for k in range(n))
        return Field(name=name, type=typ, offset=start, size=total, raw=data[:RAW_LIMIT],
                     value=values, children=children, array_len=n)

    def inner_desc(self, fd: dict[str, Any], typ: str, where: str) -> dict[str, Any] | None:
        """The vmsd description of a composite field, or None for a leaf."""
        if "struct" in fd:
            s = fd["struct"]
            if not isinstance(s, dict):
                raise self.bad_desc(where, "\"struct\" is not an object")
            return s
        if typ in INLINE_VMSD_TYPES and "fields" in fd:
            return fd
        return None  # leaves, and put()s whose nested description is not a plain vmsd (qtailq...)

    def element(self, name: str, typ: str, size: int, inner: dict[str, Any] | None, full: str,
                depth: int, where: str, index: int | None) -> Field:
        cur = self.cur
        start = cur.pos
        self.take(1, where)
        if inner is not None:
            children = self.body(inner, full + ".", depth + 1, where + ".struct")
            used = cur.pos - start
            if used != size:
                raise FormatError(f"{typ} field {full!r} takes {used} bytes in the stream, the "
                                  f"vmdesc says {size}", start)
            return Field(name=name, type=typ, offset=start, size=size,
                         raw=self.raw_at(start, min(size, RAW_LIMIT)), children=children,
                         index=index, version=_opt_int(inner.get("version")),
                         vmsd_name=inner.get("vmsd_name") if isinstance(inner.get("vmsd_name"), str) else None)
        self.check_width(typ, size, full, start)
        if size <= RAW_LIMIT:
            raw = cur.read(size, f"field {full!r}")
        else:
            raw = cur.read(RAW_LIMIT, f"field {full!r}")
            cur.skip(size - RAW_LIMIT, f"field {full!r}")
        return Field(name=name, type=typ, offset=start, size=size, raw=raw,
                     value=_decode(typ, raw) if len(raw) == size else None, index=index)

    def check_width(self, typ: str, size: int, full: str, at: int) -> None:
        width = _width(typ)
        if width is not None and size != width:
            raise FormatError(f"the vmdesc gives {typ} field {full!r} {size} bytes; a {typ} "
                              f"takes {width}", at)


def _width(typ: str) -> int | None:
    if typ in INT_TYPES:
        return INT_TYPES[typ][0]
    if typ in BOOL_TYPES:
        return 1
    if typ in FLOAT_TYPES:
        return 8
    return None


def _decode(typ: str, raw: bytes) -> Any:
    spec = INT_TYPES.get(typ)
    if spec is not None:
        return int.from_bytes(raw, spec[2], signed=spec[1])
    if typ in BOOL_TYPES:
        return raw != b"\0"
    if typ in FLOAT_TYPES:
        v = struct.unpack(">d", raw)[0]
        return v if math.isfinite(v) else None
    return None


def _opt_int(v: Any) -> int | None:
    return v if isinstance(v, int) and not isinstance(v, bool) else None


def _in_device(e: FormatError, label: str, start: int, eof: int) -> FormatError:
    detail = e.detail
    if isinstance(e, TruncatedError) and e.offset is not None:
        detail += f"; the device state ends at QEMU_VM_EOF ({eof:#x})"
    return type(e)(f"device {label} (section at {start:#x}): {detail}", e.offset)


# --- x86 CPU state ---------------------------------------------------------------------------

GPR_NAMES = ("rax", "rcx", "rdx", "rbx", "rsp", "rbp", "rsi", "rdi",
             "r8", "r9", "r10", "r11", "r12", "r13", "r14", "r15")  # QEMU's R_EAX.. order
SEGMENT_NAMES = ("es", "cs", "ss", "ds", "fs", "gs")  # R_ES..R_GS: env.segs order
X86_CPU_VMSD = "cpu"  # target/i386/machine.c vmstate_x86_cpu
CPU_COMMON_VMSD = "cpu_common"  # hw/core/cpu-sysemu.c vmstate_cpu_common


@dataclass(frozen=True)
class Segment:
    """A segment cache (``SegmentCache``): also used for GDTR/IDTR (base, limit only)."""

    selector: int | None
    base: int | None
    limit: int | None
    flags: int | None


@dataclass(frozen=True)
class CpuState:
    """An x86 vCPU's architectural state, from the ``cpu`` (and ``cpu_common``) sections.

    General registers are in ``regs`` by name (``rax``...``r15``) and as attributes
    (``state.rax``). Anything the description does not contain is None.
    """

    index: int  # the section's instance_id (cpu_index)
    offset: int = field(compare=False)  # of its FULL section: where, not what
    regs: dict[str, int | None] = field(hash=False)
    rip: int | None
    rflags: int | None
    es: Segment | None
    cs: Segment | None
    ss: Segment | None
    ds: Segment | None
    fs: Segment | None
    gs: Segment | None
    ldt: Segment | None
    tr: Segment | None
    gdt: Segment | None
    idt: Segment | None
    cr0: int | None
    cr2: int | None
    cr3: int | None
    cr4: int | None
    efer: int | None
    dr: tuple[int, ...] | None
    hflags: int | None
    hflags2: int | None
    a20_mask: int | None
    fpuc: int | None
    mxcsr: int | None
    xcr0: int | None
    pat: int | None
    sysenter_cs: int | None
    sysenter_esp: int | None
    sysenter_eip: int | None
    star: int | None
    lstar: int | None
    cstar: int | None
    fmask: int | None
    kernelgsbase: int | None
    smbase: int | None
    mp_state: int | None
    tsc: int | None
    tsc_khz: int | None
    halted: bool | None  # cpu_common.halted
    interrupt_request: int | None  # cpu_common.interrupt_request

    def __getattr__(self, name: str) -> Any:
        if name in GPR_NAMES:
            return self.regs.get(name)
        raise AttributeError(name)

    @property
    def cpl(self) -> int | None:
        return None if self.hflags is None else self.hflags & 3

    @property
    def long_mode(self) -> bool | None:
        """EFER.LMA."""
        return None if self.efer is None else bool(self.efer & (1 << 10))

    def segments(self) -> dict[str, Segment | None]:
        return {n: getattr(self, n) for n in (*SEGMENT_NAMES, "ldt", "tr")}

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"index": self.index, "offset": self.offset}
        out.update(self.regs)
        for k in self.__dataclass_fields__:
            if k in ("index", "offset", "regs"):
                continue
            v = getattr(self, k)
            if isinstance(v, Segment):
                v = {"selector": v.selector, "base": v.base, "limit": v.limit, "flags": v.flags}
            elif isinstance(v, tuple):
                v = list(v)
            out[k] = v
        return out


def cpu_target(d: DeviceSection) -> str:
    """The QEMU target a ``cpu`` section comes from, by its fields: every target names its
    vmsd ``cpu`` (target/i386/machine.c, target/arm/machine.c, ...). ``x86``, ``aarch64`` (an
    ARM CPU that has AArch64: ``env.xregs``), ``arm`` (32-bit only) or ``unknown``."""
    names = {f.name for f in d.fields}
    if "env.segs" in names and "env.eip" in names:
        return "x86"
    if "env.xregs" in names:
        return "aarch64"
    if "env.regs" in names and "cpsr" in names:
        return "arm"
    return "unknown"


def cpu_states(devices: DeviceState | Iterable[DeviceSection]) -> list[CpuState]:
    """The x86 vCPUs (vmsd ``cpu``) of a decoded device state, by cpu index."""
    devs = list(devices)
    common = {d.instance_id: d for d in devs if d.vmsd_name == CPU_COMMON_VMSD}
    out = [_cpu(d, common.get(d.instance_id)) for d in devs
           if d.vmsd_name == X86_CPU_VMSD and cpu_target(d) == "x86"]
    return sorted(out, key=lambda c: c.index)


def guest_cpus(devices: DeviceState | Iterable[DeviceSection]
               ) -> tuple[str | None, Sequence[CpuState | Aarch64CpuState]]:
    """(target, vCPU states) of a decoded device state: :class:`CpuState` for x86,
    :class:`Aarch64CpuState` for aarch64, an empty list for a target whose registers are
    not decoded (never another target's names on its values); (None, []) without CPUs."""
    devs = list(devices)
    targets = {cpu_target(d) for d in devs if d.vmsd_name == X86_CPU_VMSD}
    if not targets:
        return None, []
    target = targets.pop() if len(targets) == 1 else "unknown"
    if target == "x86":
        return target, cpu_states(devs)
    if target == "aarch64":
        common = {d.instance_id: d for d in devs if d.vmsd_name == CPU_COMMON_VMSD}
        out = [_aarch64_cpu(d, common.get(d.instance_id)) for d in devs if d.vmsd_name == X86_CPU_VMSD]
        return target, sorted(out, key=lambda c: c.index)
    return target, []


# -- aarch64 (target/arm/machine.c vmstate_arm_cpu) ----------------------------------------
PSTATE_nRW = 1 << 4  # target/arm/cpu.h: set when the CPU is in AArch32 state (put_cpsr)
# banked_spsr[] slots of the AArch64 SPSRs (target/arm/cpu.h BANK_SVC, BANK_HYP, BANK_MON).
AARCH64_SPSR_BANKS = {"spsr_el1": 1, "spsr_el2": 6, "spsr_el3": 7}
# fpscr (vfp_get_fpscr) = the FPSR bits | the FPCR bits that have an A32 meaning
# (target/arm/cpu.h FPSCR_FPSR_MASK, FPSCR_FPCR_MASK).
FPSCR_FPSR_MASK = 0xF800009F
FPSCR_FPCR_MASK = 0x07FF9F00
# cpreg_vmstate_indexes hold KVM register ids (target/arm/kvm-consts.h, cpreg_to_kvm_id):
# AArch64 system registers are KVM_REG_ARM64 | KVM_REG_SIZE_U64 | KVM_REG_ARM64_SYSREG | op0..op2.
KVM_REG_ARM64_SYSREG_PREFIX = 0x6030_0000_0013_0000
SYSREG_NAMES = {
    (3, 0, 0, 0, 0): "MIDR_EL1", (3, 0, 0, 0, 5): "MPIDR_EL1", (3, 0, 1, 0, 0): "SCTLR_EL1",
    (3, 0, 1, 0, 1): "ACTLR_EL1", (3, 0, 1, 0, 2): "CPACR_EL1", (3, 0, 2, 0, 0): "TTBR0_EL1",
    (3, 0, 2, 0, 1): "TTBR1_EL1", (3, 0, 2, 0, 2): "TCR_EL1", (3, 0, 5, 1, 0): "AFSR0_EL1",
    (3, 0, 5, 1, 1): "AFSR1_EL1", (3, 0, 5, 2, 0): "ESR_EL1", (3, 0, 6, 0, 0): "FAR_EL1",
    (3, 0, 7, 4, 0): "PAR_EL1", (3, 0, 10, 2, 0): "MAIR_EL1", (3, 0, 10, 3, 0): "AMAIR_EL1",
    (3, 0, 12, 0, 0): "VBAR_EL1", (3, 0, 13, 0, 1): "CONTEXTIDR_EL1", (3, 0, 13, 0, 4): "TPIDR_EL1",
    (3, 0, 14, 1, 0): "CNTKCTL_EL1", (3, 3, 13, 0, 2): "TPIDR_EL0", (3, 3, 13, 0, 3): "TPIDRRO_EL0",
    (3, 3, 14, 0, 0): "CNTFRQ_EL0", (3, 3, 14, 2, 1): "CNTP_CTL_EL0", (3, 3, 14, 2, 2): "CNTP_CVAL_EL0",
    (3, 3, 14, 3, 1): "CNTV_CTL_EL0", (3, 3, 14, 3, 2): "CNTV_CVAL_EL0", (3, 0, 0, 4, 0): "ID_AA64PFR0_EL1",
    (3, 0, 0, 6, 1): "ID_AA64ISAR1_EL1", (2, 0, 0, 2, 2): "MDSCR_EL1", (3, 4, 1, 0, 0): "SCTLR_EL2",
    (3, 4, 1, 1, 0): "HCR_EL2", (3, 4, 2, 0, 0): "TTBR0_EL2", (3, 4, 2, 0, 2): "TCR_EL2",
    (3, 4, 2, 1, 0): "VTTBR_EL2", (3, 4, 2, 1, 2): "VTCR_EL2", (3, 4, 5, 2, 0): "ESR_EL2",
    (3, 4, 6, 0, 0): "FAR_EL2", (3, 4, 12, 0, 0): "VBAR_EL2", (3, 6, 1, 0, 0): "SCTLR_EL3",
    (3, 6, 1, 1, 0): "SCR_EL3", (3, 6, 2, 0, 0): "TTBR0_EL3", (3, 6, 2, 0, 2): "TCR_EL3",
    (3, 6, 12, 0, 0): "VBAR_EL3",
}


def sysreg_name(kvm_id: int) -> str:
    """A migrated coprocessor register's name: the architectural one for the AArch64 system
    registers listed here, ``S<op0>_<op1>_C<n>_C<m>_<op2>`` for the other AArch64 ones (the
    assembler's generic spelling), ``kvm:0x...`` for AArch32 coprocessor registers."""
    if kvm_id & ~0xFFFF == KVM_REG_ARM64_SYSREG_PREFIX:
        enc = ((kvm_id >> 14) & 3, (kvm_id >> 11) & 7, (kvm_id >> 7) & 15, (kvm_id >> 3) & 15, kvm_id & 7)
        return SYSREG_NAMES.get(enc, "S%d_%d_C%d_C%d_%d" % enc)
    return f"kvm:{kvm_id:#x}"


@dataclass(frozen=True)
class Aarch64CpuState:
    """An aarch64 vCPU's state as migrated (``cpu`` section of target/arm/machine.c)."""

    index: int
    offset: int = field(compare=False)
    aarch64: bool | None  # in AArch64 state (cpsr without PSTATE_nRW)
    x: tuple[int | None, ...]  # x0..x30
    sp: int | None  # the current stack pointer (env.xregs[31])
    pc: int | None
    pstate: int | None  # pstate_read() in AArch64 state, cpsr_read() in AArch32 state
    sp_el: tuple[int | None, ...]
    elr_el: tuple[int | None, ...]
    banked_spsr: tuple[int | None, ...]
    vregs: tuple[tuple[int, int] | None, ...]  # V0..V31 as (low, high) 64-bit halves
    fpscr: int | None
    sysregs: dict[str, int] = field(hash=False)
    halted: bool | None = None

    @property
    def el(self) -> int | None:
        return None if self.pstate is None or not self.aarch64 else (self.pstate >> 2) & 3

    @property
    def fpsr(self) -> int | None:
        return None if self.fpscr is None else self.fpscr & FPSCR_FPSR_MASK

    @property
    def fpcr(self) -> int | None:
        return None if self.fpscr is None else self.fpscr & FPSCR_FPCR_MASK

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"target": "aarch64", "index": self.index, "offset": self.offset,
                               "aarch64_state": self.aarch64}
        out.update({f"x{i}": v for i, v in enumerate(self.x)})
        out.update(sp=self.sp, pc=self.pc, pstate=self.pstate, el=self.el)
        out.update({f"sp_el{i}": v for i, v in enumerate(self.sp_el)})
        out.update({f"elr_el{i}": v for i, v in enumerate(self.elr_el) if i})
        out.update({k: self.banked_spsr[i] if i < len(self.banked_spsr) else None
                    for k, i in AARCH64_SPSR_BANKS.items()})
        out.update(fpsr=self.fpsr, fpcr=self.fpcr)
        out["v"] = [None if v is None else f"{v[1]:016x}{v[0]:016x}" for v in self.vregs]
        out["system_registers"] = dict(self.sysregs)
        out["halted"] = self.halted
        return out


def _aarch64_cpu(d: DeviceSection, common: DeviceSection | None) -> Aarch64CpuState:
    xregs = [_int_value(f) for f in _elements(d, "env.xregs")]
    xregs += [None] * (32 - len(xregs))
    cpsr_f = d.field("cpsr")
    cpsr = int.from_bytes(cpsr_f.raw[:4], "big") if cpsr_f is not None and len(cpsr_f.raw) >= 4 else None
    vregs: list[tuple[int, int] | None] = []
    for i in range(32):
        halves = [_int_value(f) for f in _elements(d, f"env.vfp.zregs[{i}].d")]
        lo, hi = halves if len(halves) == 2 else (None, None)
        vregs.append((lo, hi) if lo is not None and hi is not None else None)
    fpscr_f = d.field("fpscr")
    fpscr = int.from_bytes(fpscr_f.raw[:4], "big") if fpscr_f is not None and len(fpscr_f.raw) >= 4 else None
    idx = [_int_value(f) for f in _elements(d, "cpreg_vmstate_indexes")]
    vals = [_int_value(f) for f in _elements(d, "cpreg_vmstate_values")]
    sysregs = {sysreg_name(i): v for i, v in zip(idx, vals) if i is not None and v is not None}
    halted = None
    if common is not None:
        h = _int_value(common.field("halted"))
        halted = None if h is None else bool(h)
    return Aarch64CpuState(
        index=d.instance_id, offset=d.offset,
        aarch64=None if cpsr is None else not cpsr & PSTATE_nRW,
        x=tuple(xregs[:31]), sp=xregs[31], pc=_int_value(d.field("env.pc")), pstate=cpsr,
        sp_el=tuple(_int_value(f) for f in _elements(d, "env.sp_el")),
        elr_el=tuple(_int_value(f) for f in _elements(d, "env.elr_el")),
        banked_spsr=tuple(_int_value(f) for f in _elements(d, "env.banked_spsr")),
        vregs=tuple(vregs), fpscr=fpscr, sysregs=sysregs, halted=halted)


def _int_value(f: Field | None) -> int | None:
    if f is None or isinstance(f.value, bool) or not isinstance(f.value, int):
        return None
    return f.value


def _segment(f: Field | None) -> Segment | None:
    if f is None or not f.children:
        return None
    return Segment(selector=_int_value(f.get("selector")), base=_int_value(f.get("base")),
                   limit=_int_value(f.get("limit")), flags=_int_value(f.get("flags")))


def _elements(d: DeviceSection, name: str) -> list[Field]:
    """The elements of array ``name``: a compressed array's children, or the separate
    entries QEMU writes (with ``"index"``) for an array it cannot compress."""
    hits: list[Field] = []

    def look(fields: Iterable[Field]) -> None:
        for f in fields:
            if f.type == SUBSECTION:
                look(f.children)
            elif f.name == name:
                hits.append(f)

    look(d.fields)
    if len(hits) == 1 and hits[0].array_len is not None:
        return list(hits[0].children)
    indexed = [(f.index, f) for f in hits if f.index is not None]
    return [f for _, f in sorted(indexed, key=lambda p: p[0])]


def _cpu(d: DeviceSection, common: DeviceSection | None) -> CpuState:
    def num(*names: str) -> int | None:
        for n in names:
            v = _int_value(d.field(n))
            if v is not None:
                return v
        return None

    values = [_int_value(f) for f in _elements(d, "env.regs")]
    regs = {n: (values[i] if i < len(values) else None) for i, n in enumerate(GPR_NAMES)}
    segs: list[Segment | None] = [_segment(f) for f in _elements(d, "env.segs")[:len(SEGMENT_NAMES)]]
    segs += [None] * (len(SEGMENT_NAMES) - len(segs))
    drs = [_int_value(f) for f in _elements(d, "env.dr")]
    known_drs = [v for v in drs if v is not None]
    dr = tuple(known_drs) if drs and len(known_drs) == len(drs) else None
    halted = None
    irq = None
    if common is not None:
        h = _int_value(common.field("halted"))
        halted = None if h is None else bool(h)
        irq = _int_value(common.field("interrupt_request"))
    return CpuState(
        index=d.instance_id, offset=d.offset, regs=regs,
        rip=num("env.eip", "env.rip"), rflags=num("env.eflags", "env.rflags"),
        es=segs[0], cs=segs[1], ss=segs[2], ds=segs[3], fs=segs[4], gs=segs[5],
        ldt=_segment(d.field("env.ldt")), tr=_segment(d.field("env.tr")),
        gdt=_segment(d.field("env.gdt")), idt=_segment(d.field("env.idt")),
        cr0=num("env.cr[0]"), cr2=num("env.cr[2]"), cr3=num("env.cr[3]"), cr4=num("env.cr[4]"),
        efer=num("env.efer"), dr=dr, hflags=num("env.hflags"), hflags2=num("env.hflags2"),
        a20_mask=num("env.a20_mask"), fpuc=num("env.fpuc"), mxcsr=num("env.mxcsr"),
        xcr0=num("env.xcr0"), pat=num("env.pat"), sysenter_cs=num("env.sysenter_cs"),
        sysenter_esp=num("env.sysenter_esp"), sysenter_eip=num("env.sysenter_eip"),
        star=num("env.star"), lstar=num("env.lstar"), cstar=num("env.cstar"),
        fmask=num("env.fmask"), kernelgsbase=num("env.kernelgsbase"), smbase=num("env.smbase"),
        mp_state=num("env.mp_state"), tsc=num("env.tsc"), tsc_khz=num("env.tsc_khz"),
        halted=halted, interrupt_request=irq)


# --- the vmcoreinfo device ---------------------------------------------------------------------

VMCOREINFO_VMSD = "vmcoreinfo"  # hw/misc/vmcoreinfo.c vmstate_vmcoreinfo (-device or -object vmcoreinfo)
# include/standard-headers/linux/qemu_fw_cfg.h
FW_CFG_VMCOREINFO_FORMAT_NONE = 0
FW_CFG_VMCOREINFO_FORMAT_ELF = 1


@dataclass(frozen=True)
class VmcoreinfoState:
    """The ``vmcoreinfo`` device: whether and where the guest published its VMCOREINFO note.

    The guest writes the 16-byte ``FWCfgVMCoreInfo`` (``le16 host_format, le16 guest_format,
    le32 size, le64 paddr``) through fw_cfg ``etc/vmcoreinfo`` straight into the device's
    struct; ``has_vmcoreinfo`` is set when it wrote all 16 bytes at offset 0 with a format other
    than NONE (``fw_cfg_vmci_write``). The vmsd saves those struct members as host integers,
    big-endian in the stream, and dump.c reads them with ``le16_to_cpu``... So on a
    little-endian host, which is where x86 guests are dumped, the stream's integers are the
    values the guest wrote, and that is how they are decoded here (a big-endian host would
    write them byte-swapped; nothing in the stream says which host wrote it).
    """

    offset: int = field(compare=False)  # of its FULL section
    has_vmcoreinfo: bool
    host_format: int
    guest_format: int
    size: int  # bytes the guest reserved for the note
    paddr: int  # guest-physical address of the note

    def to_dict(self) -> dict[str, Any]:
        return {"offset": self.offset, "has_vmcoreinfo": self.has_vmcoreinfo,
                "host_format": self.host_format, "guest_format": self.guest_format,
                "size": self.size, "paddr": self.paddr}


def vmcoreinfo_state(devices: DeviceState | Iterable[DeviceSection]) -> VmcoreinfoState | None:
    """The ``vmcoreinfo`` device's state, or None when the guest has no such device (or its
    section lacks one of the five fields QEMU 2.11 and later write)."""
    for d in devices:
        if d.vmsd_name != VMCOREINFO_VMSD:
            continue
        has = d.field("has_vmcoreinfo")
        values = [_int_value(d.field(f"vmcoreinfo.{n}")) for n in ("host_format", "guest_format", "size", "paddr")]
        known = [v for v in values if v is not None]
        if has is None or not isinstance(has.value, bool) or len(known) != len(values):
            return None
        host_format, guest_format, size, paddr = known
        return VmcoreinfoState(offset=d.offset, has_vmcoreinfo=has.value, host_format=host_format,
                               guest_format=guest_format, size=size, paddr=paddr)
    return None


__all__ = [
    "FW_CFG_VMCOREINFO_FORMAT_ELF",
    "FW_CFG_VMCOREINFO_FORMAT_NONE",
    "GPR_NAMES",
    "RAW_LIMIT",
    "SEGMENT_NAMES",
    "Aarch64CpuState",
    "CpuState",
    "DeviceSection",
    "DeviceState",
    "Field",
    "Segment",
    "VmcoreinfoState",
    "cpu_states",
    "cpu_target",
    "find_field",
    "guest_cpus",
    "flatten",
    "parse_devices",
    "vmcoreinfo_state",
]
