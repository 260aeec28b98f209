"""Damaged and hostile images: each gives a specific ramfs error with a clear message.

Every case starts from a real QEMU/libvirt image and breaks one thing, found through the
layout the parser reports for the intact image.
"""

from __future__ import annotations

import struct
import subprocess
import sys
import tracemalloc

import pytest

from conftest import patch
from fixture_data import fixture_path
from ramfs.errors import (FormatError, IncompleteImageError, NotAnImageError, RamfsError, TruncatedError,
                          UnsupportedError)
from ramfs.format.qemu import RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO
from ramfs.image import open_image
from ramfs.image.describe import check

SEQ = "firmware/pc-sequential.img"
MAPPED = "firmware/pc-mapped-ram.img"
LV_RAW = "libvirt/fw-pc-raw.img"
LV_SPARSE = "libvirt/fw-pc-sparse.img"


def layout_of(name):
    with open_image(fixture_path(name), use_cache=False) as img:
        return img.layout


def first_record(path, flags_wanted):
    """Offset of the first page record (not the EOS) whose kind is ``flags_wanted``."""
    layout = layout_of(path) if isinstance(path, str) else None
    data = open(fixture_path(path) if isinstance(path, str) else path, "rb").read()
    # The PART section follows the START footer; walk records with our knowledge of sizes.
    pos = layout.ram_start_offset
    pos = data.index(b"\x02" + struct.pack(">I", layout.ram_section_id), pos)  # PART header
    pos += 5
    while True:
        v = struct.unpack_from(">Q", data, pos)[0]
        flags = v & 0xFFF
        rec = pos
        pos += 8
        if not flags & RAM_SAVE_FLAG_CONTINUE:
            pos += 1 + data[pos]
        kind = flags & ~RAM_SAVE_FLAG_CONTINUE
        if kind == flags_wanted:
            return rec, flags
        pos += 1 if kind == RAM_SAVE_FLAG_ZERO else 4096


def expect(path, exc, match):
    with pytest.raises(exc, match=match) as e:
        open_image(path, use_cache=False).close()
    return e.value


# --- truncation -------------------------------------------------------------------------

@pytest.mark.parametrize("name", [SEQ, LV_RAW, MAPPED, LV_SPARSE])
def test_truncation_at_many_offsets(name, mutable):
    src = fixture_path(name)
    layout = layout_of(name)
    size = src.stat().st_size
    cuts = sorted({0, 1, 3, 4, 7, 8, 20, 50, 91, 92, 200, layout.base, layout.base + 3, layout.base + 9,
                   layout.base + 30, layout.ram_start_offset + 2, layout.ram_start_offset + 40,
                   layout.ram_end_offset - 1, layout.ram_end_offset, layout.device_offset + 100,
                   (layout.vmdesc_offset or size) - 1, size - 1000, size - 1}
                  | {size * k // 37 for k in range(1, 37)})
    img = mutable(src)
    for cut in cuts:
        with open(img, "r+b") as f:
            f.truncate(cut)
        if cut < layout.ram_end_offset:
            with pytest.raises(RamfsError) as e:
                open_image(img, use_cache=False).close()
            assert str(e.value) and "Traceback" not in str(e.value)
            if cut > layout.base + 8:
                assert isinstance(e.value, TruncatedError), (cut, e.value)
        else:
            # RAM is whole: the image opens, and check says the tail is damaged.
            with open_image(img, use_cache=False) as ok:
                assert ok.layout.vmdesc is None
            assert check(str(img)), cut
        sparse_restore(src, img)


def sparse_restore(src, dst):
    from conftest import sparse_copy
    sparse_copy(src, dst)


# --- magic and header -------------------------------------------------------------------

def test_wrong_magic(mutable):
    img = mutable(fixture_path(SEQ))
    patch(img, 0, b"QEVX")
    expect(img, NotAnImageError, "not a save image")


def test_empty_and_tiny_files(tmp_path):
    for data in (b"", b"Q", b"QEVM", b"QEVM\0\0\0\3"):
        p = tmp_path / "tiny"
        p.write_bytes(data)
        with pytest.raises(RamfsError):
            open_image(p, use_cache=False)


def test_partial_magic_is_incomplete_and_check_lists_it(mutable):
    img = mutable(fixture_path(LV_RAW))
    patch(img, 0, b"LibvirtQemudPart")
    expect(img, IncompleteImageError, "incomplete save image")
    problems = check(str(img))
    assert any("incomplete" in p for p in problems)


def test_stream_version_2_is_obsolete(mutable):
    img = mutable(fixture_path(SEQ))
    patch(img, 4, struct.pack(">I", 2))
    expect(img, UnsupportedError, "obsolete")


def test_libvirt_header_pointing_past_the_stream(mutable):
    img = mutable(fixture_path(LV_RAW))
    patch(img, 20, struct.pack("<I", 0x7FFFFFF0))  # data_len
    expect(img, TruncatedError, "before the QEMU stream")


# --- RAM setup ----------------------------------------------------------------------------

def block_record_offset(name, idstr):
    return next(b.offset for b in layout_of(name).blocks if b.idstr == idstr)


def test_used_length_2_pow_60_rejected_without_allocating(mutable):
    img = mutable(fixture_path(SEQ))
    off = block_record_offset(SEQ, "pc.ram")
    patch(img, off + 7, struct.pack(">Q", 1 << 60))
    tracemalloc.start()
    try:
        expect(img, FormatError, "implausibly large")
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_huge_but_plausible_block_costs_only_what_the_image_holds(mutable):
    """A 1 PiB pc.ram claim with MEM_SIZE adjusted: the index stays small."""
    img = mutable(fixture_path(SEQ))
    layout = layout_of(SEQ)
    off = block_record_offset(SEQ, "pc.ram")
    big = 1 << 50
    patch(img, off + 7, struct.pack(">Q", big))
    total = layout.mem_size_total - (64 << 20) + big
    # MEM_SIZE record: be64 total|0x4 right after the START section header
    start_hdr = layout.ram_start_offset + 1 + 4 + 1 + 3 + 4 + 4
    patch(img, start_hdr, struct.pack(">Q", total | 0x4))
    tracemalloc.start()
    try:
        with open_image(img, use_cache=False) as opened:
            blk = opened.block("pc.ram")
            assert blk.used_length == big
            assert opened.read(blk, big - 4096, 8192) == bytes(4096)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 64 << 20


def test_mem_size_mismatch(mutable):
    img = mutable(fixture_path(SEQ))
    layout = layout_of(SEQ)
    start_hdr = layout.ram_start_offset + 1 + 4 + 1 + 3 + 4 + 4
    # Smaller than the sum, and not at a block boundary: the block list overshoots it.
    patch(img, start_hdr, struct.pack(">Q", (layout.mem_size_total - 0x10000) | 0x4))
    expect(img, FormatError, "add up past MEM_SIZE")


def test_idstr_with_nul(mutable):
    img = mutable(fixture_path(SEQ))
    off = block_record_offset(SEQ, "pc.ram")
    patch(img, off + 1, b"pc\0ram")
    expect(img, FormatError, "NUL")


@pytest.mark.parametrize("evil", [b"../ram", b"a/../b", b"/x/y/z"])
def test_idstr_with_slashes_and_dots_is_kept_exactly(mutable, evil):
    """Such names are legal in the stream; the format layer keeps them, the mount escapes them."""
    src = fixture_path(SEQ)
    data = bytearray(src.read_bytes())
    old = b"\x06pc.ram"
    assert len(evil) == 6
    n = data.count(old)
    data[:] = data.replace(old, b"\x06" + evil)
    img = mutable(src)
    img.write_bytes(bytes(data))
    with open_image(img, use_cache=False) as opened:
        assert opened.blocks[0].idstr == evil.decode()
        assert opened.blocks[0].populated_pages > 0
    assert n >= 2


def test_duplicate_block(mutable):
    img = mutable(fixture_path(SEQ))
    off = block_record_offset(SEQ, "pc.rom")
    patch(img, off + 1, b"pc.ram")
    expect(img, FormatError, "listed twice")


# --- page records ---------------------------------------------------------------------------

@pytest.mark.parametrize("bits,exc,match", [
    (0x400, FormatError, "unknown flag combination"),
    (0x001, FormatError, "unknown flag combination"),
    (0x040, UnsupportedError, "XBZRLE"),
    (0x080, UnsupportedError, "HOOK"),
    (0x100, UnsupportedError, "COMPRESS_PAGE"),
])
def test_unknown_or_unsupported_flags(mutable, bits, exc, match):
    img = mutable(fixture_path(SEQ))
    rec, flags = first_record(SEQ, RAM_SAVE_FLAG_PAGE)
    v = struct.unpack(">Q", fixture_path(SEQ).read_bytes()[rec:rec + 8])[0]
    patch(img, rec, struct.pack(">Q", (v & ~0xFFF) | bits | (flags & RAM_SAVE_FLAG_CONTINUE)))
    e = expect(img, exc, match)
    assert e.offset == rec


def test_zero_page_fill_byte(mutable):
    img = mutable(fixture_path(SEQ))
    rec, flags = first_record(SEQ, RAM_SAVE_FLAG_ZERO)
    fill = rec + 8 + (0 if flags & RAM_SAVE_FLAG_CONTINUE else 1 + 6)
    patch(img, fill, b"\x01")
    expect(img, FormatError, "fill byte")


def test_page_offset_past_block(mutable):
    img = mutable(fixture_path(SEQ))
    rec, flags = first_record(SEQ, RAM_SAVE_FLAG_PAGE)
    patch(img, rec, struct.pack(">Q", (1 << 40) | flags))
    expect(img, FormatError, "past the end of block")


def test_unknown_block_in_page_record(mutable):
    img = mutable(fixture_path(SEQ))
    rec, flags = first_record(SEQ, RAM_SAVE_FLAG_PAGE)
    assert not flags & RAM_SAVE_FLAG_CONTINUE
    patch(img, rec + 9, b"pc.rax")
    expect(img, FormatError, "unknown block")


def test_footer_id_mismatch(mutable):
    img = mutable(fixture_path(SEQ))
    layout = layout_of(SEQ)
    # The RAM END footer is the last 5 bytes before the device state.
    patch(img, layout.ram_end_offset - 4, struct.pack(">I", 99))
    expect(img, FormatError, "footer")


def test_unknown_section_type(mutable):
    img = mutable(fixture_path(SEQ))
    layout = layout_of(SEQ)
    cmd = layout.commands[0].offset
    patch(img, cmd, b"\x42")
    expect(img, FormatError, "unknown section type")


# --- mapped-ram -----------------------------------------------------------------------------

def mapped_header_offset(name, idstr):
    return next(b.mapped.offset for b in layout_of(name).blocks if b.idstr == idstr)


def test_bitmap_offset_past_eof(mutable):
    img = mutable(fixture_path(MAPPED))
    h = mapped_header_offset(MAPPED, "pc.ram")
    patch(img, h + 12, struct.pack(">Q", 1 << 40))
    expect(img, FormatError, "overlaps")


def test_pages_offset_past_eof(mutable):
    img = mutable(fixture_path(MAPPED))
    h = mapped_header_offset(MAPPED, "pc.ram")
    patch(img, h + 20, struct.pack(">Q", 1 << 40))
    expect(img, TruncatedError, "past the end of the file")


def test_overlapping_regions(mutable):
    img = mutable(fixture_path(MAPPED))
    h = mapped_header_offset(MAPPED, "/rom@etc/acpi/tables")
    patch(img, h + 20, struct.pack(">Q", 0x100000))  # into pc.ram's region, before its own bitmap
    expect(img, FormatError, "overlaps")


def test_unaligned_pages(mutable):
    img = mutable(fixture_path(MAPPED))
    h = mapped_header_offset(MAPPED, "pc.ram")
    patch(img, h + 20, struct.pack(">Q", 0x100800))
    expect(img, FormatError, "not page-aligned")


def test_mapped_header_version_and_page_size(mutable):
    img = mutable(fixture_path(MAPPED))
    h = mapped_header_offset(MAPPED, "pc.ram")
    patch(img, h, struct.pack(">I", 2))
    expect(img, UnsupportedError, "version 2")
    patch(img, h, struct.pack(">IQ", 1, 8192))
    expect(img, FormatError, "page_size 8192")


def test_bitmap_bits_beyond_block_are_reported(mutable):
    img = mutable(fixture_path(MAPPED))
    layout = layout_of(MAPPED)
    rsdp = next(b for b in layout.blocks if b.idstr == "/rom@etc/acpi/rsdp")
    patch(img, rsdp.mapped.bitmap_offset, b"\xff")  # 1 page, 8 bits set
    with open_image(img, use_cache=False) as opened:
        assert opened.block("/rom@etc/acpi/rsdp").populated_pages == 1
    assert any("past its 1 pages" in p for p in check(str(img)))


def test_page_record_in_mapped_ram_stream(mutable):
    img = mutable(fixture_path(MAPPED))
    layout = layout_of(MAPPED)
    # The PART section after START holds only EOS; turn that EOS into a PAGE record.
    last = layout.blocks[-1]
    after = last.mapped.pages_offset + last.used_length  # EOS + START footer, then PART
    data = fixture_path(MAPPED).read_bytes()[after:layout.ram_end_offset]
    part = data.index(b"\x02" + struct.pack(">I", layout.ram_section_id)) + after
    patch(img, part + 5, struct.pack(">Q", 0x28))
    expect(img, FormatError, "mapped-ram stream")


# --- the CLI never shows a traceback ------------------------------------------------------------

def test_cli_errors_are_one_line(mutable, tmp_path):
    bad = mutable(fixture_path(SEQ))
    rec, flags = first_record(SEQ, RAM_SAVE_FLAG_PAGE)
    patch(bad, rec, struct.pack(">Q", (1 << 40) | flags))
    notimg = tmp_path / "notimg"
    notimg.write_bytes(b"hello world" * 100)
    for path in (bad, notimg, tmp_path / "missing"):
        for cmd in ("info", "check"):
            r = subprocess.run([sys.executable, "-m", "ramfs.cli", cmd, str(path)],
                               capture_output=True, text=True, timeout=60)
            out = r.stdout + r.stderr
            assert r.returncode != 0, (cmd, path, out)
            assert "Traceback" not in out
            lines = [ln for ln in r.stderr.splitlines() if ln]
            if cmd == "info":
                assert r.returncode == 2 and len(lines) == 1 and lines[0].startswith("ramfs: error:")


# --- container and stream that do not belong together ------------------------------------------

def test_libvirt_format_that_does_not_match_the_stream_is_flagged(mutable):
    sparse = mutable(fixture_path(LV_SPARSE))
    patch(sparse, 28, struct.pack("<I", 0))  # says raw, holds mapped-ram
    with open_image(sparse, use_cache=False) as img:
        assert any("could not restore" in w for w in img.warnings)
    raw = mutable(fixture_path(LV_RAW))
    patch(raw, 28, struct.pack("<I", 6))  # says sparse, holds a sequential stream
    assert any("could not restore" in p for p in check(str(raw)))


def test_compressed_mapped_ram_is_refused(mutable, tmp_path):
    """QEMU needs a seekable file for mapped-ram; a gzip of one can only be crafted."""
    import gzip
    src = fixture_path(LV_SPARSE)
    out = tmp_path / "gz-mapped.img"
    layout = layout_of(LV_SPARSE)
    with open(src, "rb") as f, open(out, "wb") as o:
        head = bytearray(f.read(layout.base))
        head[28:32] = struct.pack("<I", 1)
        o.write(head)
        with gzip.GzipFile(fileobj=o, mode="wb", compresslevel=1) as gz:
            while data := f.read(1 << 20):
                gz.write(data)
    with pytest.raises(UnsupportedError, match="mapped-ram stream inside a gzip"):
        open_image(out)
    with pytest.raises(UnsupportedError, match="mapped-ram stream inside a gzip"):
        open_image(out, reads=False)


@pytest.mark.parametrize("name", ["libvirt/fw-pc-gzip.img", "libvirt/fw-pc-bzip2.img", "libvirt/fw-pc-xz.img",
                                  "libvirt/fw-pc-lzop.img", "libvirt/fw-pc-zstd.img"])
def test_compressed_images_cut_anywhere_fail_check(name, mutable):
    """Every compression, cut anywhere (the last byte included): check finds the damage."""
    src = fixture_path(name)
    size = src.stat().st_size
    img = mutable(src)
    assert check(str(img)) == []
    for cut in sorted({size - 1, size - 2, size - 7, size - 100, size // 2, size * 3 // 4}):
        with open(img, "r+b") as f:
            f.truncate(cut)
        assert check(str(img)), (name, cut)
        sparse_restore(src, img)
