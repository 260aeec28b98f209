"""Any image as a classic sequential save image, produced lazily, readable at any offset.

The way back from mapped-ram: QEMU before 9.0 and libvirt before 11.2 restore only the
sequential stream. :class:`SequentialExport` lays one out without writing anything:

* for a libvirt image, its header (format 0 = raw, version 2) and data area (XML, cookie) as
  they are;
* ``QEVM``, the configuration without the ``mapped-ram`` capability, the RAM START section
  with the plain block list (``qemu_savevm_state_setup``/``ram_save_setup`` without
  mapped-ram);
* one PART section holding a PAGE record for every populated page, block by block: the first
  record of a block names it, the others say CONTINUE (``save_page_header``), then EOS;
* the SWITCHOVER_START command if the source had one, the END section (EOS);
* the other iterable sections' pieces (ppc64 ``spapr/htab``, s390x ``s390-storage_attributes``)
  as the source has them, each kind after RAM's START, PART or END;
* the device state and QEMU_VM_EOF as the source has them, and the VM description with the
  capability taken out of its ``configuration`` object.

Pages that read as zeros are not sent: a restore starts from zeroed RAM, exactly as a
mapped-ram restore leaves clear-bit pages alone. Every record of a block after its first has
the same size, so an offset maps to a page by arithmetic (a rank over the block's populated
runs), and no read needs anything before it.
"""

from __future__ import annotations

import bisect
import json
import struct
import threading
from array import array
from collections.abc import Iterator
from dataclasses import dataclass

from ramfs.errors import FormatError, UnsupportedError
from ramfs.format import encode
from ramfs.format.libvirt import LIBVIRT_HEADER_SIZE, SaveFormat
from ramfs.format.qemu import (CAP_MAPPED_RAM, RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_PAGE,
                               SUBSECTION_CAPABILITIES, MigCmd, SectionType)
from ramfs.image.model import SPAN_PAGES, Image, RamBlock

_BE64 = struct.Struct(">Q")


@dataclass
class _Bytes:
    start: int
    data: bytes

    @property
    def end(self) -> int:
        return self.start + len(self.data)


@dataclass
class _Stream:
    """Bytes copied from the image's stream (device state)."""
    start: int
    length: int
    offset: int  # in image.data

    @property
    def end(self) -> int:
        return self.start + self.length


class _Records:
    """The PAGE records of one block's populated pages."""

    def __init__(self, start: int, block: RamBlock, ps: int):
        self.start = start
        self.block = block
        self.ps = ps
        self.name = encode.block_record(block.idstr, 0)[:-8]  # u8 length + idstr
        n = block.populated_pages
        self.count = n
        self.first = 8 + len(self.name) + ps  # the record that names the block
        self.rec = 8 + ps
        self.end = start + (self.first + (n - 1) * self.rec if n else 0)
        self._spans: tuple[array[int], array[int]] | None = None
        self._span_runs: tuple[int, array[int], array[int]] | None = None
        self._lock = threading.Lock()

    def _span_table(self) -> tuple[array[int], array[int]]:
        """The first page of each span of the block that holds data and the count of
        populated pages before it (spans of 32768 pages, counted by popcount), built on the
        first read. A record number maps to a span by bisection, then to a page through that
        span's runs only: memory and time per span, not per run, whatever the guest's
        fragmentation (one page in two in use is a run per page)."""
        table = self._spans
        if table is None:
            with self._lock:
                if self._spans is None:
                    firsts, cum = array("q"), array("q")
                    n = 0
                    for a, _b, k in self.block.populated_spans():
                        firsts.append(a)
                        cum.append(n)
                        n += k
                    if n != self.count:
                        raise FormatError(f"block {self.block.idstr!r}: {n} populated pages in its spans, "
                                          f"{self.count} counted (the image changed?)")
                    self._spans = (firsts, cum)
                table = self._spans
        return table

    def _runs_of_span(self, i: int, first: int) -> tuple[array[int], array[int]]:
        """Run starts and page counts before each, within span ``i`` (the last one kept:
        reads come in order)."""
        held = self._span_runs
        if held is not None and held[0] == i:
            return held[1], held[2]
        ps = self.ps
        starts, cum = array("q"), array("q")
        n = 0
        lo = first * ps
        for a, b in self.block.populated_ranges(lo, lo + SPAN_PAGES * ps):
            starts.append(a // ps)
            cum.append(n)
            n += (b - a) // ps
        self._span_runs = (i, starts, cum)
        return starts, cum

    def _locate(self, k: int) -> tuple[int, int]:
        """Record ``k``'s page, and the record number where its run of consecutive pages ends."""
        firsts, scum = self._span_table()
        i = bisect.bisect_right(scum, k) - 1
        starts, cum = self._runs_of_span(i, firsts[i])
        local = k - scum[i]
        j = bisect.bisect_right(cum, local) - 1
        span_count = (scum[i + 1] if i + 1 < len(scum) else self.count) - scum[i]
        return starts[j] + local - cum[j], scum[i] + (cum[j + 1] if j + 1 < len(cum) else span_count)

    def page(self, k: int) -> int:
        return self._locate(k)[0]

    def record_start(self, k: int) -> int:
        return self.start + (0 if k == 0 else self.first + (k - 1) * self.rec)

    def header(self, k: int) -> bytes:
        addr = self.page(k) * self.ps
        if k == 0:
            return _BE64.pack(addr | RAM_SAVE_FLAG_PAGE) + self.name
        return _BE64.pack(addr | RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE)

    def index_at(self, pos: int) -> int:
        """The record holding export offset ``pos``."""
        return 0 if pos < self.start + self.first else 1 + (pos - self.start - self.first) // self.rec

    def read(self, image: Image, offset: int, size: int, nowait: bool = False) -> bytes:
        """Bytes ``[offset, offset+size)`` of this segment (absolute export offsets)."""
        end = min(offset + size, self.end)
        if offset >= end:
            return b""
        k, k_end = self.index_at(offset), self.index_at(end - 1) + 1
        base = self.record_start(k)
        out = bytearray(self.record_start(k_end) - base)
        view = memoryview(out)
        ps, rec = self.ps, self.rec
        pos = 0
        # A record costs a few hundred ns of Python at most: the records of one populated run
        # are built together (one image read for the payloads, one struct call for all the
        # headers, written with a strided slice), which is what lets an export be read at the
        # speed of the disk instead of the interpreter.
        while k < k_end:
            page, run_stop = self._locate(k)
            m = min(run_stop, k_end) - k
            payload = memoryview(image.read(self.block, page * ps, m * ps, nowait))
            if k == 0:
                h = self.header(0)
                view[pos:pos + len(h)] = h
                view[pos + len(h):pos + len(h) + ps] = payload[:ps]
                pos += len(h) + ps
                payload = payload[ps:]
                k, page, m = 1, page + 1, m - 1
            if m:
                flags = RAM_SAVE_FLAG_PAGE | RAM_SAVE_FLAG_CONTINUE  # below the page bits: + == |
                heads = struct.pack(f">{m}Q", *range(page * ps + flags, (page + m) * ps + flags, ps))
                region = view[pos:pos + m * rec]
                if rec % 8 == 0:
                    region.cast("Q")[::rec // 8] = memoryview(heads).cast("Q")
                else:
                    for i in range(m):
                        region[i * rec:i * rec + 8] = heads[i * 8:i * 8 + 8]
                for i in range(m):
                    region[i * rec + 8:(i + 1) * rec] = payload[i * ps:(i + 1) * ps]
                pos += m * rec
                k += m
        return bytes(view[offset - base:end - base])


class SequentialExport:
    """The bytes of ``image`` as a sequential save image (see the module docstring)."""

    def __init__(self, image: Image):
        lay = image.layout
        if lay.configuration is None:
            raise UnsupportedError("the stream has no configuration section: cannot say which "
                                   "capabilities the export drops")
        if lay.device_offset is None or lay.eof_offset is None:
            raise UnsupportedError("the image's device state could not be delimited")
        self.image = image
        ps = lay.page_size
        segs: list[_Bytes | _Records | _Stream] = []
        pos = 0

        def add_bytes(data: bytes) -> None:
            nonlocal pos
            if data:
                segs.append(_Bytes(pos, data))
                pos += len(data)

        meta = image.libvirt
        if meta is not None:
            h = meta.header
            raw = image.source.read_at(0, h.stream_offset)
            add_bytes(encode.libvirt_header(h, raw, format=SaveFormat.RAW, complete=True) + raw[LIBVIRT_HEADER_SIZE:])
        conf = lay.configuration
        caps = tuple(c for c in conf.capabilities if c != CAP_MAPPED_RAM)
        sid = lay.ram_section_id
        foot = encode.footer(sid) if lay.footers else b""
        head = bytearray(encode.file_header() + encode.configuration(conf, caps))
        head += encode.section_start(sid) + encode.mem_size(lay.mem_size_total)
        for rec in lay.blocks:
            head += encode.block_record(rec.idstr, rec.used_length)
            if rec.postcopy_page_size is not None:
                head += _BE64.pack(rec.postcopy_page_size)
            if rec.ignore_shared_addr is not None:
                head += _BE64.pack(rec.ignore_shared_addr)
        head += encode.eos() + foot
        add_bytes(bytes(head))

        def add_pieces(kind: int) -> None:
            # The other iterable sections (spapr/htab, s390-storage_attributes) verbatim, each
            # kind after RAM's, in their order (see ramfs.convert.core._write_stream_tail).
            nonlocal pos
            for p in lay.pieces(kind):
                segs.append(_Stream(pos, p.length, p.offset))
                pos += p.length

        add_pieces(SectionType.SECTION_START)
        add_bytes(encode.section_part_end(SectionType.SECTION_PART, sid))
        self.records: list[_Records] = []
        for blk in image.blocks:
            r = _Records(pos, blk, ps)
            if r.count:
                segs.append(r)
                self.records.append(r)
                pos = r.end
        add_bytes(encode.eos() + foot)
        add_pieces(SectionType.SECTION_PART)
        tail = bytearray()
        if lay.switchover_start:
            tail += encode.command(MigCmd.SWITCHOVER_START)
        tail += encode.section_part_end(SectionType.SECTION_END, sid) + encode.eos() + foot
        add_bytes(bytes(tail))
        add_pieces(SectionType.SECTION_END)
        dev_end = lay.eof_offset + 1
        segs.append(_Stream(pos, dev_end - lay.device_offset, lay.device_offset))
        pos += dev_end - lay.device_offset
        if lay.vmdesc is not None:
            vmdesc = lay.vmdesc if CAP_MAPPED_RAM not in conf.capabilities else vmdesc_without(lay.vmdesc, caps)
            add_bytes(encode.vmdesc_section(vmdesc))
        self.segments = segs
        self._starts = [s.start for s in segs]
        self.size = pos

    @property
    def pages(self) -> int:
        return sum(r.count for r in self.records)

    def has_data(self, offset: int, size: int) -> bool:
        return True  # a stream: every byte is a header or payload byte

    def populated_ranges(self) -> Iterator[tuple[int, int]]:
        yield 0, self.size

    def read(self, offset: int, size: int, nowait: bool = False) -> bytes:
        """``nowait``: only from the page cache, else :class:`~ramfs.image.files.WouldBlock`
        (the mount serves such reads on its event loop and retries the others in a thread)."""
        if offset < 0 or size < 0:
            raise ValueError("negative offset or size")
        end = min(offset + size, self.size)
        parts: list[bytes | bytearray] = []
        i = max(0, bisect.bisect_right(self._starts, offset) - 1)
        pos = offset
        while pos < end and i < len(self.segments):
            s = self.segments[i]
            stop = min(end, s.end)
            if pos < stop:
                if isinstance(s, _Bytes):
                    parts.append(s.data[pos - s.start:stop - s.start])
                elif isinstance(s, _Stream):
                    buf = bytearray(stop - pos)
                    assert self.image.data is not None  # an export is made of an image opened to read
                    self.image.data.readinto_at(memoryview(buf), s.offset + pos - s.start, nowait)
                    parts.append(buf)
                else:
                    parts.append(s.read(self.image, pos, stop - pos, nowait))
                pos = stop
            i += 1
        return bytes(parts[0]) if len(parts) == 1 else b"".join(parts)


def vmdesc_without(vmdesc: bytes, caps: tuple[str, ...]) -> bytes:
    """The VM description with the configuration's capabilities subsection describing
    ``caps`` (the mapped-ram capability gone), or without it when none remain; re-serialised
    the way QEMU's JSON writer separates items (``", "``, ``": "``)."""
    try:
        desc = json.loads(vmdesc)
    except (ValueError, UnicodeDecodeError, RecursionError):
        return vmdesc  # QEMU ignores its content; a broken one is carried over as it is
    conf = desc.get("configuration") if isinstance(desc, dict) else None
    if not isinstance(conf, dict) or not isinstance(conf.get("subsections"), list):
        return vmdesc
    subs = []
    for sub in conf["subsections"]:
        if isinstance(sub, dict) and sub.get("vmsd_name") == SUBSECTION_CAPABILITIES:
            if not caps:
                continue
            sub = dict(sub, fields=[{"name": "caps_count", "type": "uint32", "size": 4},
                                    {"name": "capabilities", "type": "capability",
                                     "size": sum(1 + len(c.encode()) for c in caps)}])
        subs.append(sub)
    if subs:
        conf["subsections"] = subs
    else:
        del conf["subsections"]
    return json.dumps(desc, separators=(", ", ": ")).encode()
