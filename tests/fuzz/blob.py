"""Byte strings that remember their structure: every field and structural unit is named.

A :class:`Blob` is built field by field (by :mod:`fuzz.seeds`, from real fixture images) and
keeps, for each field, its offset, size, encoding and *role*. The mutators pick fields by
role (an offset, a length, a count, a flags word, a name, a bitmap, a whole record...) and
set them to the values that break parsers; length-changing edits shift the fields after
them, so a mutated blob can be mutated again with an accurate map.

This module does not import ramfs.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, replace


@dataclass(frozen=True)
class Field:
    off: int
    size: int
    kind: str  # "int" | "bytes" | "name" | "bitmap" | "payload" | "json" | "xml" | "span"
    role: str  # what the value means: "len", "offset", "flags", "count", "magic", ...
    name: str = ""
    fmt: str = ""  # struct format of an "int" field (">Q", "<I", ...)

    @property
    def end(self) -> int:
        return self.off + self.size


class Blob:
    """A bytearray plus the list of fields laid out in it."""

    def __init__(self, buf: bytes | bytearray = b"", fields: list[Field] | None = None):
        self.buf = bytearray(buf)
        self.fields: list[Field] = list(fields or [])

    def copy(self) -> Blob:
        return Blob(self.buf, self.fields)

    def __len__(self) -> int:
        return len(self.buf)

    # -- building ------------------------------------------------------------------------
    @property
    def pos(self) -> int:
        return len(self.buf)

    def add(self, data: bytes, kind: str = "bytes", role: str = "data", name: str = "") -> Field:
        f = Field(self.pos, len(data), kind, role, name)
        self.buf += data
        self.fields.append(f)
        return f

    def int(self, fmt: str, value: int, role: str, name: str = "") -> Field:
        data = struct.pack(fmt, value)
        f = Field(self.pos, len(data), "int", role, name, fmt)
        self.buf += data
        self.fields.append(f)
        return f

    def u8(self, value: int, role: str, name: str = "") -> Field:
        return self.int(">B", value, role, name)

    def be16(self, value: int, role: str, name: str = "") -> Field:
        return self.int(">H", value, role, name)

    def be32(self, value: int, role: str, name: str = "") -> Field:
        return self.int(">I", value, role, name)

    def be64(self, value: int, role: str, name: str = "") -> Field:
        return self.int(">Q", value, role, name)

    def name(self, raw: bytes, name: str = "") -> None:
        """A QEMU ``u8 length + bytes`` string."""
        self.u8(len(raw), "len", name + ".len")
        self.add(raw, "name", "name", name)

    def span(self, start: int, role: str, name: str = "") -> Field:
        """Mark ``[start, pos)`` as one structural unit (a record, a section, a block entry)."""
        f = Field(start, self.pos - start, "span", role, name)
        self.fields.append(f)
        return f

    def extend(self, other: Blob) -> None:
        base = self.pos
        self.buf += other.buf
        self.fields.extend(replace(f, off=f.off + base) for f in other.fields)

    # -- reading and editing -------------------------------------------------------------
    def get(self, f: Field) -> int | bytes:
        if f.kind == "int":
            return struct.unpack_from(f.fmt, self.buf, f.off)[0]
        return bytes(self.buf[f.off:f.end])

    def set_int(self, f: Field, value: int) -> None:
        bits = struct.calcsize(f.fmt) * 8
        struct.pack_into(f.fmt, self.buf, f.off, value & ((1 << bits) - 1))

    def overwrite(self, off: int, data: bytes) -> None:
        """Same-length replacement (clipped at the end of the blob)."""
        data = data[: max(0, len(self.buf) - off)]
        self.buf[off:off + len(data)] = data

    def splice(self, start: int, stop: int, data: bytes) -> None:
        """Replace ``[start, stop)`` by ``data``; fields after it move, fields it cuts go."""
        delta = len(data) - (stop - start)
        self.buf[start:stop] = data
        kept = []
        for f in self.fields:
            if f.end <= start:
                kept.append(f)
            elif f.off >= stop:
                kept.append(replace(f, off=f.off + delta))
            elif f.kind == "span" and f.off <= start and f.end >= stop:
                kept.append(replace(f, size=f.size + delta))  # an edit inside a unit
            # else: the edit cut through this field; its map is gone
        self.fields = [f for f in kept if f.size >= 0 and f.end <= len(self.buf)]

    def truncate(self, n: int) -> None:
        del self.buf[n:]
        self.fields = [f for f in self.fields if f.end <= n]

    def find(self, role: str | None = None, kind: str | None = None, name: str | None = None) -> list[Field]:
        return [f for f in self.fields
                if (role is None or f.role == role) and (kind is None or f.kind == kind)
                and (name is None or f.name == name)]
