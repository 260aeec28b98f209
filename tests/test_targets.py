"""ppc64 ``pseries`` and s390x ``s390-ccw-virtio`` guests: their streams hold an iterable
section besides RAM (``spapr/htab``, ``s390-storage_attributes``) that ramfs delimits by its
own format and carries over verbatim.

Two tiers: streams built byte by byte (the sections' framing, truncated and corrupt ones),
then guests made by qemu-system-ppc64 and qemu-system-s390x at test time (firmware only, a
random blob loaded into RAM), saved with ``migrate`` after ``stop``. QEMU's ``pmemsave`` is the
truth for RAM; a fresh QEMU restoring ramfs's conversions and exports is the truth for them.
The guests and their saves are cached like the other QEMU images (qemu_images._build_cached).
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import random
import shutil
import struct
import subprocess
import sys
import time
from pathlib import Path

import jsonschema
import pytest

import qemu_images as qi
from ramfs.convert.core import convert_file, convert_stream
from ramfs.errors import FormatError, RamfsError, TruncatedError, UnsupportedError
from ramfs.format import encode as enc
from ramfs.format import qemu
from ramfs.format.qemu import (HTAB_CHUNK, RAM_SAVE_FLAG_PAGE, S390_STATTRIB_IDSTR,
                               SPAPR_HTAB_IDSTR, STATTR_FLAG_DONE, STATTR_FLAG_EOS, STATTR_FLAG_ERROR,
                               STATTR_FLAG_MORE, Configuration, SectionType, parse_stream, parse_stream_kept)
from ramfs.format.source import BytesSource, ForwardSource
from ramfs.image import open_image
from ramfs.image.phys import Placement
from ramfs.views.export import SequentialExport

MiB = 1 << 20
PS = 4096
RAM, HTAB, STATTR = 2, 7, 9  # section ids
PAGES = 64
VMDESC = b'{"page_size": 4096, "devices": []}'


# --- streams built byte by byte ------------------------------------------------------------

def _htab_body(chunks: list[tuple[int, int, int]] | None = None, header: int = 0) -> bytes:
    """htab_save_iterate/_complete: be32 header, chunks (index, n_valid, n_invalid, HPTEs), end marker."""
    out = struct.pack(">I", header)
    if header == 0:
        for index, n_valid, n_invalid in chunks or ():
            out += HTAB_CHUNK.pack(index, n_valid, n_invalid) + bytes([index & 0xFF | 1]) * (16 * n_valid)
        out += HTAB_CHUNK.pack(0, 0, 0)
    return out


def _stattr_body(records: list[tuple[int, int]] = (), done: bool = False) -> bytes:
    """cmma_save: (gfn << 12 | MORE, count, count bytes)..., DONE when final, EOS."""
    out = b"".join(struct.pack(">QQ", gfn * PS | STATTR_FLAG_MORE, n) + bytes([gfn & 0xFF]) * n for gfn, n in records)
    return out + (struct.pack(">Q", STATTR_FLAG_DONE) if done else b"") + struct.pack(">Q", STATTR_FLAG_EOS)


def _page(i: int) -> bytes:
    return bytes([i + 1]) * PS


def target_stream(htab: list[bytes] | None = None, stattr: list[bytes] | None = None,
                  start_htab: bytes | None = None, htab_version: int = 1) -> bytes:
    """RAM and two other iterable sections interleaved as QEMU's loops write them: START ram,
    START htab, START stattr, (PART ram, PART htab, PART stattr)..., END ram, END htab, END
    stattr; a page record in each RAM piece; then EOF."""
    htab = [_htab_body([(5, 2, 1)]), _htab_body([(5, 1, 0), (100, 3, 0)])] if htab is None else htab
    stattr = [_stattr_body([(0, 40)]), _stattr_body([(40, 24)], done=True)] if stattr is None else stattr
    conf = Configuration(offset=0, machine="pc-i440fx-10.0", target_page_bits=None, capabilities=(),
                         uuid=None, end=0)
    out = bytearray(enc.file_header() + enc.configuration(conf, ()))
    out += enc.section_start(RAM) + enc.mem_size(PAGES * PS) + enc.block_record("pc.ram", PAGES * PS)
    out += enc.eos() + enc.footer(RAM)
    out += enc.section_start(HTAB, SPAPR_HTAB_IDSTR, 0, htab_version)
    out += (struct.pack(">I", 18) if start_htab is None else start_htab) + enc.footer(HTAB)
    out += enc.section_start(STATTR, S390_STATTRIB_IDSTR, 0, 0) + _stattr_body() + enc.footer(STATTR)
    for i, (h, s) in enumerate(zip(htab, stattr)):
        last = i == len(htab) - 1
        kind = SectionType.SECTION_END if last else SectionType.SECTION_PART
        out += enc.section_part_end(kind, RAM) + struct.pack(">Q", i * PS | RAM_SAVE_FLAG_PAGE) + b"\x06pc.ram"
        out += _page(i) + enc.eos() + enc.footer(RAM)
        out += enc.section_part_end(kind, HTAB) + h + enc.footer(HTAB)
        out += enc.section_part_end(kind, STATTR) + s + enc.footer(STATTR)
    return bytes(out + bytes([SectionType.EOF]) + enc.vmdesc_section(VMDESC))


def _piece_bytes(data: bytes, layout) -> dict[str, list[tuple[int, bytes]]]:
    return {it.idstr: [(p.kind, data[p.offset:p.offset + p.length]) for p in it.pieces] for it in layout.iterables}


def test_iterable_sections_are_delimited_and_ram_reads_around_them():
    data = target_stream()
    lay = parse_stream(BytesSource(data))
    assert [(it.idstr, it.section_id, it.version) for it in lay.iterables] == \
        [(SPAPR_HTAB_IDSTR, HTAB, 1), (S390_STATTRIB_IDSTR, STATTR, 0)]
    pieces = _piece_bytes(data, lay)
    kinds = [SectionType.SECTION_START, SectionType.SECTION_PART, SectionType.SECTION_END]
    for name, sid in ((SPAPR_HTAB_IDSTR, HTAB), (S390_STATTRIB_IDSTR, STATTR)):
        assert [k for k, _ in pieces[name]] == kinds
        for (k, raw) in pieces[name]:
            assert raw[0] == k and struct.unpack_from(">I", raw, 1)[0] == sid
            assert raw[-5:] == enc.footer(sid)  # every piece runs through its footer
    assert lay.eof_offset == lay.device_offset == len(data) - 6 - len(VMDESC) and lay.ram_parts == 1
    # The same from a stream that cannot be read back: the pieces' bytes are kept.
    kept = parse_stream_kept(ForwardSource(io.BytesIO(data).read, keep=64), 0, None)
    assert kept.layout.iterables == lay.iterables
    for it in lay.iterables:
        for p in it.pieces:
            assert kept.piece(p) == data[p.offset:p.offset + p.length]


def test_radix_guest_htab_is_one_word_per_piece():
    data = target_stream(htab=[struct.pack(">i", -1)] * 2, start_htab=struct.pack(">i", -1))
    lay = parse_stream(BytesSource(data))
    assert [p.length for p in lay.iterables[0].pieces] == [1 + 4 + 1 + 10 + 8 + 4 + 5, 1 + 4 + 4 + 5, 1 + 4 + 4 + 5]


def _out_pieces(path: Path) -> dict[str, list[tuple[int, bytes]]]:
    data = path.read_bytes()
    return _piece_bytes(data, parse_stream(BytesSource(data)))


@pytest.mark.parametrize("seekable", [True, False])
def test_convert_and_export_carry_the_sections_verbatim(tmp_path, seekable):
    data = target_stream()
    src = tmp_path / "src.img"
    src.write_bytes(data)
    want = _piece_bytes(data, parse_stream(BytesSource(data)))
    out = tmp_path / "out.img"
    if seekable:
        convert_file(str(src), str(out))
    else:  # the way a compressed input goes: parsed as a stream, the pieces kept while parsing
        with open(out, "wb") as f:
            convert_stream(io.BytesIO(data).read, f.fileno())
    assert _out_pieces(out) == want
    with open_image(out, use_cache=False) as img:
        assert img.layout.mapped_ram
        assert img.read(img.blocks[0], 0, 2 * PS) == _page(0) + _page(1)
        # QEMU's order: every START after RAM's START, PARTs after RAM's PART, ENDs after its END.
        order = [p.kind for p in sorted((p for it in img.layout.iterables for p in it.pieces), key=lambda p: p.offset)]
        assert order == sorted(order)
        ex = SequentialExport(img)
        back = tmp_path / "back.img"
        back.write_bytes(ex.read(0, ex.size))
    assert _out_pieces(back) == want
    with open_image(back, use_cache=False) as img:
        assert img.read(img.blocks[0], 0, 2 * PS) == _page(0) + _page(1)


def test_index_cache_keeps_the_sections(tmp_path):
    src = tmp_path / "src.img"
    src.write_bytes(target_stream())
    with open_image(src, cache=tmp_path / "cache") as a:
        first = a.layout
    with open_image(src, cache=tmp_path / "cache") as b:
        assert b.index_from_cache and b.layout.iterables == first.iterables


def _expect(data: bytes, exc: type[Exception], match: str) -> None:
    with pytest.raises(exc, match=match):
        parse_stream(BytesSource(data))
    with pytest.raises(exc, match=match):  # the same from a stream that cannot be read back
        parse_stream_kept(ForwardSource(io.BytesIO(data).read, keep=1 << 16), 0, None)


@pytest.mark.parametrize("htab,stattr,start_htab,exc,match", [
    ([_htab_body([(5, 2, 1)]), _htab_body([(16383, 2, 0)])], None, None, FormatError, "past the 16384 entries"),
    ([_htab_body([(5, 2, 1)]), _htab_body([(0xFFFFFFF0, 0, 0x20)])], None, None, FormatError, "past the 16384"),
    (None, None, struct.pack(">I", 47), FormatError, "shift 47 is out of range"),
    (None, None, struct.pack(">I", 0) + HTAB_CHUNK.pack(0, 0, 0), FormatError, "no hash table size"),
    (None, [_stattr_body(), _stattr_body([(60, 5)])], None, FormatError, r"pages 60\+5, past the 64 pages"),
    (None, [_stattr_body(), struct.pack(">QQ", STATTR_FLAG_MORE, 1 << 62)], None, FormatError, "past the 64"),
    (None, [_stattr_body(), struct.pack(">Q", STATTR_FLAG_ERROR)], None, FormatError, "ERROR record"),
    (None, [_stattr_body(), struct.pack(">Q", 0x10)], None, FormatError, "unknown flags 0x10"),
])
def test_corrupt_sections_say_what_is_wrong(htab, stattr, start_htab, exc, match):
    _expect(target_stream(htab, stattr, start_htab), exc, match)


def test_unknown_iterable_section_and_version_stay_unsupported():
    data = target_stream()
    _expect(data.replace(b"\x0aspapr/htab", b"\x0adirty-bitm"), UnsupportedError,
            "'dirty-bitm' besides RAM: ramfs does not know its format")
    _expect(target_stream(htab_version=2), UnsupportedError, "'spapr/htab' version 2")


def test_section_after_its_end_is_refused():
    data = target_stream()
    lay = parse_stream(BytesSource(data))
    end = lay.iterables[0].pieces[-1]
    again = data[end.offset:end.offset + end.length]
    eof = lay.eof_offset
    _expect(data[:eof] + again + data[eof:], FormatError, "continues after its END")


def test_every_cut_inside_the_sections_is_a_ramfs_error():
    data = target_stream()
    lay = parse_stream(BytesSource(data))
    first = lay.iterables[0].pieces[0].offset
    for cut in range(first, lay.eof_offset):
        for src in (BytesSource(data[:cut]), ForwardSource(io.BytesIO(data[:cut]).read, keep=1 << 16)):
            try:
                layout = parse_stream(src, 0, None if isinstance(src, ForwardSource) else cut)
            except RamfsError:
                continue
            # Cut right after a whole RAM END: readable RAM, said to have no device state.
            assert any("no device state" in w for w in layout.warnings), cut


def test_hostile_lengths_are_bounded_before_any_read():
    # A stattr count of 2^62 and a stream of unknown length: refused from the header, never
    # read up to (no allocation, no endless read).
    data = target_stream(stattr=[_stattr_body(), struct.pack(">QQ", STATTR_FLAG_MORE, 1 << 62)])
    requested: list[int] = []
    f = io.BytesIO(data + bytes(8 << 20))

    def read(n: int) -> bytes:
        requested.append(n)
        return f.read(n)

    with pytest.raises(FormatError, match="past the 64 pages"):
        parse_stream_kept(ForwardSource(read), 0, None)
    assert max(requested) <= 2 * MiB


def test_too_many_pieces_is_refused(monkeypatch):
    # The bound made small so that the test builds a small stream; the check is the same.
    monkeypatch.setattr(qemu, "MAX_ITERABLE_PIECES", 50)
    data = target_stream()
    lay = parse_stream(BytesSource(data))
    part = next(p for p in lay.iterables[1].pieces if p.kind == SectionType.SECTION_PART)
    cut = part.offset + part.length
    many = data[:cut] + data[part.offset:cut] * 50 + data[cut:]
    with pytest.raises(UnsupportedError, match="more than"):
        parse_stream(BytesSource(many))


def test_stattr_payload_cut_is_truncation():
    data = target_stream(stattr=[_stattr_body(), _stattr_body([(10, 20)])])
    end = parse_stream(BytesSource(data)).iterables[1].pieces[-1]
    cut = end.offset + 5 + 16 + 5  # inside the 20 attribute values
    for src in (BytesSource(data[:cut]), ForwardSource(io.BytesIO(data[:cut]).read)):
        with pytest.raises(TruncatedError, match="attribute values"):
            parse_stream(src, 0, None if isinstance(src, ForwardSource) else cut)


# --- real guests -------------------------------------------------------------------------

GENERATOR_VERSION = 1
BLOB_ADDR = 64 * MiB  # far above what the firmware touches
BLOB_SIZE = 2 * MiB
RAM_BYTES = 256 * MiB


@dataclasses.dataclass(frozen=True)
class Target:
    name: str
    binary: str
    args: tuple[str, ...]
    block: str
    section: str
    run_seconds: float = 1.0


TARGETS = {
    "ppc64": Target("ppc64", "qemu-system-ppc64",
                    ("-machine", "pseries", "-m", "256M", "-accel", "tcg", "-nodefaults", "-no-user-config",
                     "-display", "none"),
                    "ppc_spapr.ram", SPAPR_HTAB_IDSTR),
    # With no boot device the s390-ccw firmware ends in a disabled wait (a panic); "none"
    # keeps the guest in the running state, so it stops and restores as "paused".
    "s390x": Target("s390x", "qemu-system-s390x",
                    ("-machine", "s390-ccw-virtio", "-m", "256M", "-accel", "tcg", "-nodefaults",
                     "-no-user-config", "-display", "none", "-action", "panic=none"),
                    "s390.ram", S390_STATTRIB_IDSTR),
}


def _blob() -> bytes:
    return random.Random(18).randbytes(BLOB_SIZE)


def _qemu(t: Target, scratch: Path, name: str, extra: tuple[str, ...] = (), incoming: bool = False) -> qi.QemuProcess:
    sock = scratch / f"{name}.qmp"
    argv = [shutil.which(t.binary) or t.binary, *t.args, *extra,
            "-qmp", f"unix:{sock},server=on,wait=off"] + (["-S", "-incoming", "defer"] if incoming else [])
    return qi.QemuProcess(argv, sock, scratch / f"{name}.log")


def _restore_dump(t: Target, image: Path, out: Path, capabilities: tuple[str, ...] = ()) -> Path:
    """Restore ``image`` in a fresh QEMU of the target and pmemsave its RAM (QEMU's truth)."""
    with qi._scratch_dir() as scratch, _qemu(t, scratch, "restore", incoming=True) as q:
        q.load(image, capabilities)
        q.pmemsave(RAM_BYTES, out)
    return out


def _same(a: Path, b: Path, what: str) -> None:
    diff = qi.first_difference(a, b)
    assert diff is None, f"{what}: {diff}"


def _build_into(t: Target, d: Path) -> None:
    blob = d / "blob.bin"
    blob.write_bytes(_blob())
    with qi._scratch_dir() as scratch:
        with _qemu(t, scratch, "guest", ("-device", f"loader,file={blob},addr={BLOB_ADDR:#x},force-raw=on")) as q:
            time.sleep(t.run_seconds)
            q.qmp.execute("stop")
            q.pmemsave(RAM_BYTES, d / "pmemsave.bin")
            q.save(d / "seq.img")
        with open(d / "pmemsave.bin", "rb") as f:
            f.seek(BLOB_ADDR)
            assert f.read(BLOB_SIZE) == _blob(), "the firmware overwrote the blob: move it"
        # A mapped-ram save of the same guest, from a QEMU that restored the sequential one.
        with _qemu(t, scratch, "resave", incoming=True) as q:
            q.load(d / "seq.img")
            q.pmemsave(RAM_BYTES, d / "check.bin")
            q.save(d / "mapped.img", qi.MAPPED_RAM_CAPABILITIES)
    _same(d / "check.bin", d / "pmemsave.bin", "RAM restored from seq.img")
    (d / "check.bin").unlink()
    blob.unlink()
    (d / qi.DONE_MARKER).write_text("done\n")


def built(t: Target) -> Path:
    """The guest's saves and ground truth, built once per recipe and QEMU version."""
    version = subprocess.run([t.binary, "--version"], capture_output=True, text=True, check=True).stdout
    key = hashlib.sha256(f"{t!r}\n{version}\n{GENERATOR_VERSION}".encode()).hexdigest()[:16]
    final = qi.cache_root() / f"target-{t.name}-{key}"
    files = ("seq.img", "mapped.img", "pmemsave.bin", qi.DONE_MARKER)
    qi._build_cached(final, lambda: all((final / f).is_file() for f in files), lambda d: _build_into(t, d))
    return final


def _params():
    return [pytest.param(t, id=name, marks=[
        pytest.mark.qemu,
        pytest.mark.skipif(shutil.which(t.binary) is None, reason=f"{t.binary} missing: make deps-test installs it")])
        for name, t in TARGETS.items()]


@pytest.fixture(scope="module", params=_params())
def guest(request):
    return request.param, built(request.param)


def _ramfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("which", ["seq.img", "mapped.img"])
def test_ram_equals_pmemsave(guest, which):
    t, d = guest
    with open_image(d / which, use_cache=False) as img, open(d / "pmemsave.bin", "rb") as truth:
        assert img.layout.mapped_ram == (which == "mapped.img")
        assert [b.idstr for b in img.blocks] == [t.block]
        assert [it.idstr for it in img.layout.iterables] == [t.section]
        blk = img.blocks[0]
        assert blk.used_length == RAM_BYTES
        for off in range(0, RAM_BYTES, 16 * MiB):
            assert img.read(blk, off, 16 * MiB) == truth.read(16 * MiB), hex(off)
        # No guest-physical layout is claimed for these machines: said, not guessed.
        pmap = Placement().map(img)
        assert pmap.ranges == () and "no known RAM layout" in dict(pmap.omitted)[t.block]
    check = _ramfs("check", str(d / which))
    assert check.returncode == 0, check.stdout + check.stderr
    info = _ramfs("info", "--json", str(d / which))
    assert info.returncode == 0 and "Traceback" not in info.stderr, info.stderr
    facts = json.loads(info.stdout)
    jsonschema.validate(facts, json.loads((Path(__file__).resolve().parent.parent / "docs" / "info.schema.json")
                                          .read_text()))
    assert [(it["idstr"], it["bytes"]) for it in facts["stream"]["iterables"]] == \
        [(it.idstr, it.size) for it in img.layout.iterables]


def test_convert_restores_in_qemu(guest, tmp_path):
    t, d = guest
    out = tmp_path / "converted.img"
    convert_file(str(d / "seq.img"), str(out))
    with open_image(d / "seq.img", use_cache=False) as a, open_image(out, use_cache=False) as b:
        assert b.layout.mapped_ram
        sa, sb = a.source, b.source
        pa = [sa.read_at(p.offset, p.length) for it in a.layout.iterables for p in it.pieces]
        pb = [sb.read_at(p.offset, p.length) for it in b.layout.iterables for p in it.pieces]
        assert pa == pb  # verbatim
    _same(_restore_dump(t, out, tmp_path / "restored.bin", qi.MAPPED_RAM_CAPABILITIES),
          d / "pmemsave.bin", "RAM restored from the conversion")


def test_export_of_mapped_ram_restores_in_qemu(guest, tmp_path):
    t, d = guest
    out = tmp_path / "exported.img"
    with open_image(d / "mapped.img", use_cache=False) as img, open(out, "wb") as f:
        ex = SequentialExport(img)
        for off in range(0, ex.size, 8 * MiB):
            f.write(ex.read(off, 8 * MiB))
    with open_image(out, use_cache=False) as back:
        assert not back.layout.mapped_ram and [it.idstr for it in back.layout.iterables] == [t.section]
    _same(_restore_dump(t, out, tmp_path / "restored.bin"), d / "pmemsave.bin", "RAM restored from the export")


def test_mount_shows_ram_and_says_what_it_cannot_decode(guest, tmp_path):
    from mountutil import mounted
    t, d = guest
    mp = tmp_path / "mp"
    with mounted(d / "seq.img", mp):
        _same(mp / "ram" / t.block, d / "pmemsave.bin", "ram/ of the mount")
        cpus = json.loads((mp / "cpus.json").read_text())
        assert "not decoded" in json.dumps(cpus)
        assert not (mp / "phys").exists()
        assert (mp / "export" / "sequential.img").stat().st_size > 0
        assert os.path.getsize(mp / "devices.json") > 0
