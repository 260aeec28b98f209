"""Small seed images made from the real fixtures, with a field map of every structure.

The fixtures are too big to copy per case (1.8 MB sequential, 73 MB sparse mapped-ram), so
each seed keeps the real bytes where they matter and shrinks the rest structurally:

* a **sequential** stream keeps the real ``QEVM`` header, configuration, RAM START block
  list, a handful of the real page records of every block (the first record naming it, then
  real ZERO and PAGE records with CONTINUE), the real SWITCHOVER_START command, RAM END,
  footers, device sections and VM description;
* a **mapped-ram** stream is laid out again, QEMU's way, with small blocks whose bitmaps and
  pages are windows of the real ones, around the real configuration and device tail;
* **libvirt** variants put the real 92-byte header and the real domain/cookie XML (without
  most of the padding, ``data_len`` adjusted) in front, raw, sparse or compressed.

Synthetic variants add what the fixtures lack (target-page-bits and uuid subsections,
x-ignore-shared, a POSTCOPY_ADVISE with a hugepage block, 1 KiB pages, two PART sections,
MULTIFD_FLUSH records, no footers, a version-1 or big-endian libvirt header, a 16 TiB
sparse block), each laid out as QEMU or libvirt would write it. qcow2 disks with internal
snapshots are real QEMU files, mapped by :mod:`fuzz.qcow2`. Every seed is checked to open
without error before use (:func:`fuzz.harness.verify_seeds`).
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass, field
from functools import cache

from fuzz.blob import Blob
from fuzz.qcow2 import QCOW2_SEEDS, qcow2_blob, qcow2_file

from fixture_data import fixture_path

SEQ_PC = "firmware/pc-sequential.img"
SEQ_Q35 = "firmware/q35-sequential.img"
MAPPED_PC = "firmware/pc-mapped-ram.img"
LV_RAW = "libvirt/fw-pc-raw.img"

QEVM = 0x5145564D
EOS = 0x10
MEM_SIZE = 0x04
CONTINUE = 0x20
ZERO = 0x02
PAGE = 0x08
MULTIFD_FLUSH = 0x200
MIB = 1 << 20


@dataclass
class Case:
    """One image to write: a stream, optionally behind a libvirt prefix and compressed.

    ``far`` holds blobs at given offsets of the stream (after a hole): the tail of a huge
    sparse mapped-ram image. ``extend`` appends a hole. ``post`` holds edits of the bytes
    after compression (so a compressed case can also be damaged outside the stream).
    """

    name: str
    stream: Blob
    prefix: Blob | None = None
    compress: int | None = None
    far: list[tuple[int, Blob]] = field(default_factory=list)
    extend: int = 0
    post: list[tuple] = field(default_factory=list)
    ops: list[str] = field(default_factory=list)
    known_bug: str | None = None  # a valid seed that ramfs rejects today (see regressions/)
    snapshot: str | None = None  # a qcow2 disk (``stream`` is the whole file): the snapshot to open

    def copy(self) -> Case:
        return Case(self.name, self.stream.copy(), None if self.prefix is None else self.prefix.copy(),
                    self.compress, [(o, b.copy()) for o, b in self.far], self.extend, list(self.post),
                    list(self.ops), self.known_bug, self.snapshot)

    def blobs(self) -> list[Blob]:
        out = [self.stream] + [b for _, b in self.far]
        if self.prefix is not None:
            out.append(self.prefix)
        return out


# --- reading the real fixtures -------------------------------------------------------------

@dataclass
class Real:
    """What a seed needs from one fixture."""

    path: str
    data: bytes | None  # whole file for the small sequential ones
    layout: object
    device_sections: list[tuple[int, int]]  # (start, end) of each FULL section, heuristic
    vmdesc: bytes


def _pread(path, off, n) -> bytes:
    with open(path, "rb") as f:
        f.seek(off)
        return f.read(n)


@cache
def real(name: str) -> Real:
    from ramfs.image import open_image
    path = str(fixture_path(name))
    with open_image(path, use_cache=False) as img:
        layout = img.layout
    size = os.path.getsize(path)
    data = _pread(path, 0, size) if size < 8 * MIB else None
    tail = _pread(path, layout.device_offset, layout.eof_offset - layout.device_offset)
    return Real(path, data, layout, _device_sections(tail), layout.vmdesc)


def _device_sections(tail: bytes) -> list[tuple[int, int]]:
    """Split the device state into FULL sections by their footers (7e + own section id)."""
    out = []
    pos = 0
    while pos < len(tail) and tail[pos] == 0x04:
        sid = tail[pos + 1:pos + 5]
        j = pos
        while True:
            j = tail.find(b"\x7e" + sid, j + 1)
            if j < 0:
                return out + [(pos, len(tail))]
            nxt = j + 5
            if nxt == len(tail) or tail[nxt] == 0x04:
                break
        out.append((pos, nxt))
        pos = nxt
    if pos < len(tail):
        out.append((pos, len(tail)))
    return out


@dataclass
class Rec:
    off: int
    size: int
    flags: int
    addr: int
    block: bytes
    named: bool


@cache
def _real_records(name: str) -> tuple[Rec, ...]:
    return tuple(_walk_records(real(name)))


def real_records(r: Real) -> list[Rec]:
    name = next(k for k in (SEQ_PC, SEQ_Q35) if real(k) is r)
    return list(_real_records(name))


def _walk_records(r: Real) -> list[Rec]:
    """The page records of the real stream's PART sections (sequential fixtures)."""
    lay = r.layout
    d = r.data
    ps = lay.page_size
    pos = lay.ram_start_offset
    # START header, MEM_SIZE, the block list, EOS, footer: skip by re-walking the list.
    pos += 1 + 4 + 1 + 3 + 4 + 4 + 8
    for b in lay.blocks:
        pos += 1 + len(b.idstr.encode()) + 8
    pos += 8 + 5
    out: list[Rec] = []
    cur = None
    while d[pos] == 0x02:  # PART
        pos += 5
        while True:
            v = struct.unpack_from(">Q", d, pos)[0]
            flags = v & (ps - 1)
            kind = flags & ~CONTINUE
            start = pos
            pos += 8
            if kind == EOS:
                break
            named = not flags & CONTINUE
            if named:
                n = d[pos]
                cur = d[pos + 1:pos + 1 + n]
                pos += 1 + n
            pos += 1 if kind == ZERO else ps
            out.append(Rec(start, pos - start, flags, v - flags, cur, named))
        pos += 5  # footer
    return out


# --- building blocks -------------------------------------------------------------------------

def conf_section(b: Blob, machine: bytes, page_bits: int | None, caps: list[bytes],
                 uuid: bytes | None) -> None:
    """``vmstate_configuration`` (savevm.c), subsections in QEMU's order."""
    start = b.pos
    b.u8(0x07, "type", "conf")
    b.be32(len(machine), "len", "machine.len")
    b.add(machine, "name", "name", "machine")
    if page_bits is not None:
        s = b.pos
        b.u8(0x05, "type", "subsection")
        b.name(b"configuration/target-page-bits", "subsection")
        b.be32(1, "version", "subsection.version")
        b.be32(page_bits, "pagebits", "target-page-bits")
        b.span(s, "subsection")
    if caps:
        s = b.pos
        b.u8(0x05, "type", "subsection")
        b.name(b"configuration/capabilities", "subsection")
        b.be32(1, "version", "subsection.version")
        b.be32(len(caps), "count", "caps.count")
        for c in caps:
            b.name(c, "cap")
        b.span(s, "subsection")
    if uuid is not None:
        s = b.pos
        b.u8(0x05, "type", "subsection")
        b.name(b"configuration/uuid", "subsection")
        b.be32(1, "version", "subsection.version")
        b.add(uuid, "bytes", "uuid", "uuid")
        b.span(s, "subsection")
    b.span(start, "section", "configuration")


def file_header(b: Blob) -> None:
    b.be32(QEVM, "magic", "QEVM")
    b.be32(3, "version", "stream.version")


def start_header(b: Blob, t: int, sid: int, idstr: bytes, instance: int, version: int) -> None:
    b.u8(t, "type", "section.type")
    b.be32(sid, "id", "section.id")
    b.name(idstr, "section.idstr")
    b.be32(instance, "instance", "section.instance")
    b.be32(version, "version", "section.version")


def footer(b: Blob, sid: int, on: bool = True) -> None:
    if on:
        s = b.pos
        b.u8(0x7E, "type", "footer")
        b.be32(sid, "id", "footer.id")
        b.span(s, "footer")


def eos(b: Blob) -> None:
    b.be64(EOS, "flags", "eos")


def command(b: Blob, cmd: int, payload: bytes = b"") -> None:
    s = b.pos
    b.u8(0x08, "type", "command")
    b.be16(cmd, "cmd", "command.cmd")
    b.be16(len(payload), "len", "command.len")
    if payload:
        b.add(payload, "bytes", "payload", "command.payload")
    b.span(s, "section", "command")


SMALL_DEVICES = 3


def device_tail(b: Blob, r: Real, vmdesc: bytes, vmdesc_mode: str = "full", devices: bool = True,
                footers: bool = True) -> None:
    """The real device sections (unless ``devices`` is false), the EOF byte and the VM description.

    ``vmdesc_mode="small"`` keeps the first three devices, in the stream and in the description
    alike, so that the device state still decodes (vmstate.py) and the seed stays small.
    """
    lay = r.layout
    tail = (r.data[lay.device_offset:lay.eof_offset] if r.data is not None
            else _pread(r.path, lay.device_offset, lay.eof_offset - lay.device_offset))
    sections = r.device_sections if devices else []
    if vmdesc_mode == "small":
        sections = sections[:SMALL_DEVICES]
    for i, (a, z) in enumerate(sections):
        sec = tail[a:z]
        s = b.pos
        if sec[0] == 0x04 and i < 3:
            n = sec[5]
            start_header(b, 0x04, struct.unpack_from(">I", sec, 1)[0], sec[6:6 + n],
                         *struct.unpack_from(">II", sec, 6 + n))
            body = sec[6 + n + 8:]
            b.add(body[:-5], "bytes", "vmstate", "device.state")
            if footers:
                b.u8(0x7E, "type", "footer")
                b.be32(struct.unpack(">I", body[-4:])[0], "id", "footer.id")
        else:
            b.add(sec, "bytes", "vmstate", "device.section")
        b.span(s, "device", "device")
    b.u8(0x00, "type", "eof")
    s = b.pos
    b.u8(0x06, "type", "vmdesc")
    if vmdesc_mode == "small":
        d = json.loads(vmdesc)
        d["devices"] = d["devices"][:SMALL_DEVICES if devices else 0]
        vmdesc = json.dumps(d, separators=(", ", ": ")).encode()
    b.be32(len(vmdesc), "len", "vmdesc.len")
    b.add(vmdesc, "json", "json", "vmdesc")
    b.span(s, "vmdesc", "vmdesc")


# --- sequential ---------------------------------------------------------------------------------

def _pick_records(recs: list[Rec], per_kind: int = 2) -> list[list[Rec]]:
    """Per block, the first record that names it, then real ZERO and PAGE records with CONTINUE."""
    groups: dict[bytes, list[Rec]] = {}
    order: list[bytes] = []
    for r in recs:
        if r.named and r.block not in groups:
            groups[r.block] = [r]
            order.append(r.block)
    counts: dict[tuple[bytes, int], int] = {}
    for r in recs:
        if r.named or r.block not in groups:
            continue
        k = (r.block, r.flags & ~CONTINUE)
        if counts.get(k, 0) < per_kind:
            counts[k] = counts.get(k, 0) + 1
            groups[r.block].append(r)
    return [groups[b] for b in order]


def _emit_record(b: Blob, d: bytes, r: Rec, ps: int, real_ps: int) -> None:
    s = b.pos
    kind = r.flags & ~CONTINUE
    b.be64(r.addr | r.flags, "rechdr", "record")
    pos = r.off + 8
    if r.named:
        b.name(r.block, "record.idstr")
        pos += 1 + len(r.block)
    if kind == ZERO:
        b.u8(d[pos], "fill", "zero.fill")
    else:
        b.add(d[pos:pos + real_ps][:ps], "payload", "payload", "page")
    b.span(s, "record", "record")


def sequential(name: str = SEQ_PC, *, page_bits: int | None = None, caps: list[bytes] | None = None,
               uuid: bytes | None = None, noconf: bool = False, parts: int = 1, flush: bool = False,
               postcopy: bool = False, footers: bool = True, vmdesc: str = "small",
               per_kind: int = 2, devices: bool = True) -> Blob:
    r = real(name)
    lay = r.layout
    d = r.data
    real_ps = lay.page_size
    ps = 1 << page_bits if page_bits else real_ps
    caps = list(caps or [])
    ignore_shared = b"x-ignore-shared" in caps
    b = Blob()
    file_header(b)
    if not noconf:
        conf = lay.configuration
        conf_section(b, conf.machine.encode(), page_bits, caps, uuid)
    if postcopy:
        # qemu_savevm_send_postcopy_advise: remote page-size summary, target page size
        command(b, 3, struct.pack(">QQ", ps | 0x200000, ps))
    sid = lay.ram_section_id
    s = b.pos
    start_header(b, 0x01, sid, b"ram", 0, 4)
    b.be64(lay.mem_size_total | MEM_SIZE, "memsize", "MEM_SIZE")
    for i, blk in enumerate(lay.blocks):
        e = b.pos
        b.name(blk.idstr.encode(), "block.idstr")
        b.be64(blk.used_length, "used", "used_length")
        if postcopy and i == 0:
            b.be64(0x200000, "pcsize", "postcopy.page_size")
        if ignore_shared:
            b.be64(0x100000000 * i + 0xC0000, "addr", "ignore_shared.addr")
        b.span(e, "blockentry", "block")
    eos(b)
    footer(b, sid, footers)
    b.span(s, "section", "ram.start")
    groups = _pick_records(real_records(r), per_kind)
    flat = [x for g in groups for x in g]
    cuts = [0, len(flat)] if parts == 1 else [0, len(flat) // 2 + 1, len(flat)]
    for k in range(len(cuts) - 1):
        s = b.pos
        b.u8(0x02, "type", "section.type")
        b.be32(sid, "id", "section.id")
        for j, rec in enumerate(flat[cuts[k]:cuts[k + 1]]):
            if flush and j == 1:
                b.be64(MULTIFD_FLUSH, "flags", "multifd_flush")
            _emit_record(b, d, rec, ps, real_ps)
        eos(b)
        footer(b, sid, footers)
        b.span(s, "section", "ram.part")
    command(b, 11)  # SWITCHOVER_START, as QEMU 10 writes it
    s = b.pos
    b.u8(0x03, "type", "section.type")
    b.be32(sid, "id", "section.id")
    eos(b)
    footer(b, sid, footers)
    b.span(s, "section", "ram.end")
    device_tail(b, r, r.vmdesc, vmdesc, devices, footers)
    if not (page_bits or caps or uuid or noconf or postcopy or parts != 1 or flush or not footers):
        # The unchanged prefix must be byte for byte the fixture's.
        assert bytes(b.buf[:lay.ram_start_offset]) == d[:lay.ram_start_offset], name
    return b


# --- mapped-ram -------------------------------------------------------------------------------

def _bitmap_size(pages: int) -> int:
    return (pages + 63) // 64 * 8


def _window(bitmap: bytes, pages: int, want: int) -> int:
    """First page of a ``want``-page window of the real bitmap holding both set and clear bits."""
    if pages <= want:
        return 0
    bits = int.from_bytes(bitmap, "little")
    for start in range(0, pages - want + 1, 8):
        w = (bits >> start) & ((1 << want) - 1)
        if w and w != (1 << want) - 1:
            return start
    return 0


def _set_bits(bitmap: bytes, start: int, n: int) -> list[int]:
    bits = int.from_bytes(bitmap, "little") >> start
    return [i for i in range(n) if bits >> i & 1]


def mapped(*, base: int = 0, align: int | None = None, page_bits: int | None = None,
           blocks: tuple[str, ...] | None = None, pages: int = 12, ignore_shared: bool = False,
           unstored: tuple[str, ...] = (), vmdesc: str = "small", huge: int | None = None,
           huge_bitmap: bytes | None = None) -> tuple[Blob, list[tuple[int, Blob]]]:
    """A mapped-ram stream laid out as ``mapped_ram_setup_ramblock`` does, with small blocks.

    Offsets are absolute (``base`` is where the stream starts in the file). ``align`` is the
    pages alignment (QEMU: 1 MiB; the default, the page size, keeps seeds small and gets two
    warnings per block). ``huge`` turns the last block into one of that many bytes, whose
    bitmap and pages are holes: the returned ``far`` blobs go at their stream offsets.
    ``huge_bitmap`` then writes that block's whole bitmap, this pattern repeated.
    """
    r = real(MAPPED_PC)
    lay = r.layout
    real_ps = lay.page_size
    ps = 1 << page_bits if page_bits else real_ps
    align = align or ps
    picked = [blk for blk in lay.blocks if blocks is None or blk.idstr in blocks]
    plan = []
    for blk in picked:
        real_pages = blk.used_length // real_ps
        bm = _pread(r.path, blk.mapped.bitmap_offset, _bitmap_size(real_pages))
        n = min(real_pages, pages if blk.idstr == "pc.ram" else max(1, pages // 4))
        w = _window(bm, real_pages, n)
        plan.append((blk, n, w, _set_bits(bm, w, n)))
    caps = [b"x-ignore-shared", b"mapped-ram"] if ignore_shared else [b"mapped-ram"]
    b = Blob()
    far: list[tuple[int, Blob]] = []
    file_header(b)
    conf_section(b, lay.configuration.machine.encode(), page_bits, caps, None)
    sid = lay.ram_section_id
    start_header(b, 0x01, sid, b"ram", 0, 4)
    total = sum(n * ps for _, n, _, _ in plan) + ((huge - plan[-1][1] * ps) if huge else 0)
    b.be64(total | MEM_SIZE, "memsize", "MEM_SIZE")
    for i, (blk, n, w, setbits) in enumerate(plan):
        last_huge = huge is not None and i == len(plan) - 1
        used = huge if last_huge else n * ps
        e = b.pos
        b.name(blk.idstr.encode(), "block.idstr")
        b.be64(used, "used", "used_length")
        if ignore_shared:
            b.be64(0x100000000 * i + 0xC0000, "addr", "ignore_shared.addr")
        hdr = base + b.pos
        if blk.idstr in unstored:
            b.be32(1, "version", "mapped.version")
            b.be64(ps, "pagesize", "mapped.page_size")
            b.be64(0, "offset", "mapped.bitmap_offset")
            b.be64(0, "offset", "mapped.pages_offset")
            b.span(e, "blockentry", "block")
            continue
        bitmap_off = hdr + 28
        nbits = used // ps
        pages_off = (bitmap_off + _bitmap_size(nbits) + align - 1) // align * align
        b.be32(1, "version", "mapped.version")
        b.be64(ps, "pagesize", "mapped.page_size")
        b.be64(bitmap_off, "offset", "mapped.bitmap_offset")
        b.be64(pages_off, "offset", "mapped.pages_offset")
        bm = bytearray(_bitmap_size(n))
        for j in setbits:
            bm[j >> 3] |= 1 << (j & 7)
        if last_huge:
            if huge_bitmap:
                full = _bitmap_size(nbits)
                bm = (huge_bitmap * (full // len(huge_bitmap) + 1))[:full]
            b.add(bytes(bm), "bitmap", "bitmap", "bitmap")  # the rest of the bitmap is a hole
            tail = Blob()
            page_blob = Blob()
            for j in range(n):
                page_blob.add(_pread(r.path, blk.mapped.pages_offset + (w + j) * real_ps, real_ps)[:ps]
                              if j in setbits else bytes(ps), "payload", "payload", "page")
            far.append((pages_off - base, page_blob))
            _mapped_trailer(tail, r, sid, vmdesc)
            far.append((pages_off + used - base, tail))
            b.span(e, "blockentry", "block")
            return b, far
        b.add(bytes(bm), "bitmap", "bitmap", "bitmap")
        b.add(bytes(pages_off - base - b.pos), "bytes", "padding", "padding")
        for j in range(n):
            data = (_pread(r.path, blk.mapped.pages_offset + (w + j) * real_ps, real_ps)[:ps]
                    if j in setbits else bytes(ps))
            b.add(data, "payload", "payload", "page")
        b.span(e, "blockentry", "block")
    _mapped_trailer(b, r, sid, vmdesc)
    return b, far


def _mapped_trailer(b: Blob, r: Real, sid: int, vmdesc: str) -> None:
    """EOS and footer of START, the PART holding only EOS, SWITCHOVER_START, END, devices."""
    eos(b)
    footer(b, sid)
    s = b.pos
    b.u8(0x02, "type", "section.type")
    b.be32(sid, "id", "section.id")
    eos(b)
    footer(b, sid)
    b.span(s, "section", "ram.part")
    command(b, 11)
    s = b.pos
    b.u8(0x03, "type", "section.type")
    b.be32(sid, "id", "section.id")
    eos(b)
    footer(b, sid)
    b.span(s, "section", "ram.end")
    device_tail(b, r, r.vmdesc, vmdesc)


# --- libvirt -------------------------------------------------------------------------------------

def libvirt_prefix(*, fmt: int = 0, pad: int = 16, version: int = 2, order: str = "<",
                   cookie: bool = True, full_area: bool = False) -> Blob:
    """The real header and XML area of the libvirt fixture, the padding cut to ``pad`` bytes."""
    path = str(fixture_path(LV_RAW))
    head = _pread(path, 0, 92)
    _, _, data_len, was_running, _, cookie_off = struct.unpack_from("<16s5I", head)
    area = _pread(path, 92, data_len)
    xml = area[:cookie_off - 1] if cookie_off else area[:area.index(b"\0")]
    ck = area[cookie_off:area.index(b"\0", cookie_off)] if cookie_off else b""
    b = Blob()
    b.add(head[:16], "bytes", "magic", "libvirt.magic")
    body = Blob()
    body.add(xml, "xml", "xml", "domain.xml")
    body.u8(0, "nul", "xml.nul")
    if cookie and ck:
        cookie_at = body.pos
        body.add(ck, "xml", "xml", "cookie.xml")
        body.u8(0, "nul", "cookie.nul")
    else:
        cookie_at = 0
    if full_area:
        body.add(area[body.pos:], "bytes", "padding", "padding")
    else:
        body.add(bytes(pad), "bytes", "padding", "padding")
    if version == 1:
        cookie_at = 0
        fmt = 0
    b.int(order + "I", version, "version", "libvirt.version")
    b.int(order + "I", len(body), "datalen", "libvirt.data_len")
    b.int(order + "I", was_running, "bool", "libvirt.was_running")
    b.int(order + "I", fmt, "format", "libvirt.format")
    b.int(order + "I", cookie_at, "cookieoff", "libvirt.cookie_offset")
    for i in range(14):
        b.int(order + "I", 0, "unused", f"libvirt.unused{i}")
    assert len(b) == 92
    b.extend(body)
    if order == "<" and version == 2 and cookie and not full_area:
        assert bytes(b.buf[:16]) == head[:16] and bytes(b.buf[36:92]) == head[36:92]
    return b


# --- the seed set ---------------------------------------------------------------------------------

def build_seeds() -> list[Case]:
    seeds: list[Case] = []

    def add(name, stream, prefix=None, compress=None, far=(), known_bug=None):
        seeds.append(Case(name, stream, prefix, compress, list(far), known_bug=known_bug))

    add("seq-pc", sequential(SEQ_PC, vmdesc="full"))
    add("seq-q35", sequential(SEQ_Q35))
    add("seq-2parts-flush", sequential(SEQ_PC, parts=2, flush=True))
    add("seq-conf-full", sequential(SEQ_PC, page_bits=12, caps=[b"x-ignore-shared"],
                                    uuid=bytes(range(16))))
    add("seq-noconf-nofooter", sequential(SEQ_PC, noconf=True, footers=False))
    add("seq-postcopy", sequential(SEQ_PC, postcopy=True))
    add("seq-1k-pages", sequential(SEQ_Q35, page_bits=10, per_kind=1))
    # QEMU_VM_EOF right after RAM END, the VM description after it (no device section).
    add("seq-nodevices", sequential(SEQ_Q35, devices=False))
    add("mapped-small", mapped()[0])
    add("mapped-1k-pages", mapped(page_bits=10)[0])
    add("mapped-aligned", mapped(align=MIB, blocks=("pc.ram", "/rom@etc/acpi/rsdp"), pages=16)[0])
    add("mapped-shared-unstored", mapped(ignore_shared=True, unstored=("pc.rom", "pc.bios"))[0])
    s, far = mapped(blocks=("/rom@etc/acpi/rsdp", "pc.ram"), huge=1 << 36, pages=8)
    add("mapped-huge-sparse", s, far=far)
    lv = libvirt_prefix()
    add("lv-raw-seq", sequential(SEQ_PC), lv)
    add("lv-raw-seq-fullarea", sequential(SEQ_PC), libvirt_prefix(full_area=True))
    add("lv-v1-seq", sequential(SEQ_Q35), libvirt_prefix(version=1, cookie=False))
    add("lv-bigendian-seq", sequential(SEQ_PC), libvirt_prefix(order=">"))
    sp = libvirt_prefix(fmt=6)
    add("lv-sparse-mapped", mapped(base=len(sp))[0], sp)
    add("lv-gzip-seq", sequential(SEQ_PC), libvirt_prefix(fmt=1), compress=1)
    add("lv-zstd-seq", sequential(SEQ_Q35, parts=2), libvirt_prefix(fmt=5), compress=5)
    add("lv-bzip2-seq", sequential(SEQ_PC, per_kind=1), libvirt_prefix(fmt=2), compress=2)
    add("lv-xz-seq", sequential(SEQ_PC, per_kind=1), libvirt_prefix(fmt=3), compress=3)
    # Over 1 MiB decompressed: the parser meets a stream of unknown length (ForwardSource,
    # the retained tail), as with real compressed images.
    add("lv-zstd-seq-big", sequential(SEQ_PC, per_kind=300, vmdesc="full"), libvirt_prefix(fmt=5), compress=5)
    add("lv-gzip-seq-big", sequential(SEQ_Q35, per_kind=300), libvirt_prefix(fmt=1), compress=1)
    # qcow2 disks with internal snapshots (real QEMU files, tests/data/qcow2/), one seed per
    # snapshot with VM state; the disk-only snapshots are there for the mutators to pick.
    for disk, snap in QCOW2_SEEDS:
        seeds.append(Case(f"qcow2-{disk}@{snap}", qcow2_blob(qcow2_file(disk)), snapshot=snap))
    for c in seeds:
        c.ops = [f"seed:{c.name}"]
    return seeds
