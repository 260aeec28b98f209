"""Hand-made minimal reproducers of the bugs the fuzzer found, one per bug.

``scripts/fuzz.py --write-repros [NAME ...]`` writes them to tests/fuzz/regressions/ (``.bin``
and ``.json``, whose ``failures`` are what the harness sees today and whose ``bug`` says what
is wrong). They are smaller and easier to read than the fuzzer's own (minimized) inputs,
which are kept beside them.
"""

from __future__ import annotations

import gzip
import json
import lzma
import struct
from pathlib import Path

import zstandard

from fuzz import harness
from fuzz.blob import Blob
from fuzz.harness import Image
from fuzz.seeds import conf_section, eos, file_header, footer, start_header

def seq(idstr=b"pc.ram", machine=b"pc-i440fx-10.0", after_eof=b"", devices=True):
    b = Blob()
    file_header(b)
    conf_section(b, machine, None, [], None)
    start_header(b, 1, 2, b"ram", 0, 4)
    b.be64(4096 | 4, "memsize")
    b.name(idstr); b.be64(4096, "used")
    eos(b); footer(b, 2)
    b.u8(2, "type"); b.be32(2, "id")
    b.be64(0x08, "rechdr"); b.name(idstr); b.add(b"\xab" * 4096)   # one PAGE record
    eos(b); footer(b, 2)
    b.u8(3, "type"); b.be32(2, "id"); eos(b); footer(b, 2)
    if devices:  # one device section (QEMU's "timer"), as every real stream has some
        start_header(b, 4, 3, b"timer", 0, 2)
        b.add(bytes(8) + struct.pack(">Q", 0xD2FCF884)); footer(b, 3)
    b.u8(0, "type")  # QEMU_VM_EOF
    b.add(after_eof)
    return bytes(b.buf)

def vmdesc(js: bytes) -> bytes:
    return b"\x06" + struct.pack(">I", len(js)) + js

def mapped_huge(used: int, pattern: bytes | None):
    """A mapped-ram stream whose only block has `used` bytes; bitmap (pattern or hole) and pages are holes."""
    b = Blob()
    file_header(b)
    conf_section(b, b"pc-i440fx-10.0", None, [b"mapped-ram"], None)
    start_header(b, 1, 2, b"ram", 0, 4)
    b.be64(used | 4, "memsize")
    b.name(b"pc.ram"); b.be64(used, "used")
    hdr = len(b)
    bitmap_off = hdr + 28
    nbytes = (used // 4096 + 63) // 64 * 8
    pages_off = (bitmap_off + nbytes + (1 << 20) - 1) >> 20 << 20
    b.add(struct.pack(">IQQQ", 1, 4096, bitmap_off, pages_off))
    if pattern:
        b.add((pattern * (nbytes // len(pattern) + 1))[:nbytes])
    t = Blob()
    eos(t); footer(t, 2)
    t.u8(2, "type"); t.be32(2, "id"); eos(t); footer(t, 2)
    t.u8(3, "type"); t.be32(2, "id"); eos(t); footer(t, 2)
    t.u8(0, "type")
    tail = bytes(t.buf)
    end = pages_off + used
    return Image([(0, bytes(b.buf)), (end, tail)], end + len(tail))

def libvirt(fmt: int, body: bytes) -> bytes:
    xml = b"<domain type='kvm'><name>r</name></domain>\0"
    h = b"LibvirtQemudSave" + struct.pack("<5I", 2, len(xml), 0, fmt, 0) + bytes(56)
    return h + xml + body

def save(out: Path, name: str, img: Image, meta: dict) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{name}.bin").write_bytes(img.dense)
    with harness.Runner() as r:
        res = harness.replay(r, img, {"read_seed": 0})
    fails = []
    for f in res.failures:
        if all(x["signature"] != f.signature for x in fails):
            fails.append({"kind": f.kind, "step": f.step, "error": f.message, "signature": f.signature,
                          "traceback": f.detail.splitlines()[-12:]})
    info = {"status": "open", **meta, "failures": fails, "image": img.to_json(), "read_seed": 0}
    (out / f"{name}.json").write_text(json.dumps(info, indent=1) + "\n")
    print(name, img.size, [f["signature"] for f in fails])

def dense(d: bytes) -> Image:
    return Image([(0, d)], len(d))

ALL = ["tail", "json", "utf8", "bitmap-mem", "runs", "ztail", "gzip0", "gzloop", "devlist", "xz0"]


def write(out: Path, which: list[str] | None = None) -> None:
    which = which or ALL
    if "tail" in which:
        save(out, "tail-after-eof-unpack", dense(seq(after_eof=b"\x01", devices=False)), {
            "bug": "_Parser.tail returns a 2-tuple when bytes other than a VM description follow a QEMU_VM_EOF that directly follows RAM END: `return self._vmdesc_at(src, eof + 1, end), end` should be `return (*self._vmdesc_at(src, eof + 1, end), end)` (ramfs/format/qemu.py). open_image and check raise ValueError.",
            "layout": "QEVM, configuration, RAM START (pc.ram 4 KiB), PART (one PAGE), END, EOF, then one byte 0x01. Any stream with no device section and a VM description after EOF fails the same way."})
    if "json" in which:
        js = b"[" * 5000 + b"]" * 5000
        save(out, "vmdesc-deep-json", dense(seq(after_eof=vmdesc(js))), {
            "bug": "StreamLayout.vmdesc_json catches ValueError and UnicodeDecodeError, not the RecursionError that json.loads raises for a deeply nested VM description (5000 nested lists here); open_image (describe), check and `ramfs info` crash.",
            "layout": "a minimal stream whose vmdesc is '[' * 5000 + ']' * 5000"})
    if "utf8" in which:
        save(out, "idstr-not-utf8-cli-info", dense(seq(idstr=b"pc.r\xffm")), {
            "bug": "`ramfs info` (text) prints idstrs (and the machine name) kept with surrogateescape; a non-UTF-8 byte becomes a lone surrogate and print() raises UnicodeEncodeError on a UTF-8 stdout: a traceback instead of one line. info --json and check are fine (they escape).",
            "layout": "a minimal stream whose only block is named b'pc.r\\xffm'"})
    if "bitmap-mem" in which:
        save(out, "mapped-huge-block-bitmap-memory", mapped_huge(1 << 41, None), {
            "bug": "A mapped-ram block may claim up to 2^52 bytes as long as its region fits in the file, but a sparse file is free: a 2 TiB block in a 2 TiB sparse file (a few hundred bytes of data) makes open_image read its whole 64 MiB bitmap into memory (read_bitmap), copy it again in populated_count (bitmap[:full] + int.from_bytes) and again in set_runs' slices: 128+ MiB for a file holding 300 bytes; 2^44 bytes -> 1 GiB. Bound it (e.g. by the file's allocated blocks, or read bitmaps lazily/in chunks, count bits without copying).",
            "layout": "QEVM, configuration (mapped-ram), RAM START: pc.ram used_length 2^41, mapped-ram header; bitmap and pages are holes; EOS, footer, PART (EOS), END (EOS), EOF at pages_offset + 2^41"})
    if "runs" in which:
        save(out, "mapped-bitmap-runs-quadratic", mapped_huge(1 << 34, b"\x01\x00"), {
            "bug": "set_runs is quadratic: _next_nonzero_byte / _next_non_ff_byte slice bitmap[i:limit] (a copy of the rest of the bitmap) for every gap. populated_ranges() of a mapped-ram block with many runs (a 16 GiB block, 512 KiB bitmap with one page set every 16: 262144 runs, each copying ~256 KiB) takes 5-20 s; 1 MiB of such a bitmap (a 32 GiB guest) four times that. Real guests have such bitmaps. Search without copying (e.g. a memoryview, or bytes.find/re over the bitmap, or int.bit_length tricks per 8-byte word).",
            "layout": "QEVM, configuration (mapped-ram), RAM START: pc.ram 16 GiB, mapped-ram header, a 512 KiB bitmap (01 00 repeated); pages are a hole; the stream's end at pages_offset + 16 GiB"})
    if "ztail" in which:
        stream = seq()
        body = zstandard.ZstdCompressor(level=1).compress(stream) + zstandard.ZstdCompressor(level=19).compress(bytes(40 << 20))
        save(out, "zstd-long-tail-memory", dense(libvirt(5, body)), {
            "bug": "For a compressed image (formats 1-5), _Parser.tail keeps up to 2 x MAX_VMDESC_BYTES (128 MiB) of the stream after the device state in a bytearray, then copies it (bytes(chunks)) and keeps a third view (_OffsetBytes): a 40 MiB run of zeros after the stream (a second zstd frame, 1.4 KiB of file) made open_image and check hold ~150 MiB (72 MiB: ~260 MiB). Keep at most MAX_VMDESC_BYTES + 5 (a ring or a trimmed buffer, no copy), and consider a smaller MAX_VMDESC_BYTES (real ones are ~100 KiB).",
            "layout": "libvirt header (format 5, zstd), XML; zstd frame of a minimal stream (ending in QEMU_VM_EOF), then a zstd frame of 40 MiB of zeros"})
    if "gzip0" in which:
        stream = seq()
        d = libvirt(1, gzip.compress(stream, 1, mtime=0))
        save(out, "gzip-trailing-zeros-slow", Image([(0, d)], len(d) + (8 << 20)), {
            "bug": "Python's gzip module skips zero padding after a member one byte per call (gzip._GzipReader._read_eof), ~0.4 us a byte: a gzip image followed by 8 MiB of zeros (a hole here) takes ~3 s per open, 1 GiB ~7 minutes (gzip -dc, and so libvirt, skips them quickly). Decompressor could read the raw stream itself (zlib.decompressobj per member) and skip zero runs with a bytes search, or stop at the first all-zero block after a member.",
            "layout": "libvirt header (format 1, gzip), XML, a gzip member of a minimal stream, then an 8 MiB hole"})
    if "gzloop" in which:
        stream = seq()
        body = gzip.compress(stream, 1, mtime=0) + gzip.compress(bytes(2 << 20), 1, mtime=0) + bytes(7)
        save(out, "gzip-member-end-loop", dense(libvirt(1, body)), {
            "bug": "_GzipMembers._decompress (ramfs/image/decompress.py) loops for ever: when a member's output ends exactly at the max_length of a decompress() call, the next call finishes the member from unconsumed_tail; zlib then reports eof but leaves unconsumed_tail non-empty, so `if self._d.unconsumed_tail:` feeds it to the finished decompressor again and again (output empty, unused_data growing by the leftover each time: unbounded CPU and memory). Check `self._d.eof` first and continue from unused_data. Found by the fuzzer (a 72 MiB gzip member of zeros after the stream, then 7 zero bytes).",
            "layout": "libvirt header (format 1, gzip), XML; a gzip member of a minimal stream, a gzip member of 2 MiB of zeros, then 7 zero bytes"})
    if "devlist" in which:
        save(out, "vmdesc-devices-not-a-list", dense(seq(after_eof=vmdesc(b'{"page_size": 4096, "devices": 7}'))), {
            "bug": "Image.devices (ramfs/image/model.py) iterates vmdesc[\"devices\"] without checking that it is a list: a VM description whose \"devices\" is a number (valid JSON, an object) makes describe(), check() and `ramfs info` raise TypeError. Treat a non-list like a missing list (vmstate.parse_devices already raises FormatError for it). Found by the fuzzer's JSON-tree mutation.",
            "layout": "a minimal stream (one device section) whose vmdesc is {\"page_size\": 4096, \"devices\": 7}"})
    if "xz0" in which:
        d = libvirt(3, lzma.compress(seq(), preset=0))
        save(out, "xz-trailing-zeros-slow", Image([(0, d)], len(d) + (16 << 20)), {
            "bug": "xz images are read with lzma.LZMAFile's default FORMAT_AUTO, which also accepts legacy .lzma streams: after the .xz stream, zero padding (or a hole) is decoded as one empty .lzma stream per 13 zero bytes (props 0, dictionary 0, size 0), each a trip through Python's _compression loop: 16 MiB of zeros take seconds, 1 GiB minutes to hours; a length that is not a multiple of 13 then ends in 'corrupt xz data'. libvirt restores with `xz -dc`, which takes .xz only. Use format=lzma.FORMAT_XZ: trailing zeros then end the data at once. Found by the fuzzer (an xz image followed by a 1 TiB hole).",
            "layout": "libvirt header (format 3, xz), XML, an .xz stream of a minimal stream, then a 16 MiB hole"})
