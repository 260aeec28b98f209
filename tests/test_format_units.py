"""Byte-level tests of the pure parsers: headers built field by field, bitmaps, cursors."""

import random
import struct

import pytest

from ramfs.errors import FormatError, IncompleteImageError, TruncatedError
from ramfs.format.libvirt import (LIBVIRT_HEADER_SIZE, QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL, SaveFormat,
                                  parse_header, parse_metadata)
from ramfs.format.qemu import bits_beyond, bitmap_size, populated_count, set_runs
from ramfs.format.source import BytesSource, Cursor, ForwardSource


def lv_header(magic=QEMU_SAVE_MAGIC, version=2, data_len=100, was_running=0, fmt=0, cookie=0, order="<"):
    return struct.pack(order + "16s5I14I", magic, version, data_len, was_running, fmt, cookie, *([0] * 14))


def test_header_size_is_libvirts():
    assert LIBVIRT_HEADER_SIZE == 92


@pytest.mark.parametrize("code,name", [(0, "raw"), (1, "gzip"), (2, "bzip2"), (3, "xz"), (4, "lzop"),
                                       (5, "zstd"), (6, "sparse")])
def test_format_codes(code, name):
    h = parse_header(lv_header(fmt=code))
    assert h.format.label == name and int(h.format) == code


def test_unknown_format_code_rejected():
    with pytest.raises(FormatError, match="format code 7"):
        parse_header(lv_header(fmt=7))


def test_big_endian_header_is_swapped_like_libvirt():
    h = parse_header(lv_header(order=">", data_len=0x1234, was_running=1, fmt=6, cookie=0x10))
    assert (h.byteorder, h.version, h.data_len, h.was_running, h.format, h.cookie_offset) == \
        ("big", 2, 0x1234, True, SaveFormat.SPARSE, 0x10)
    assert h.stream_offset == 92 + 0x1234


def test_version_3_rejected_in_both_orders():
    with pytest.raises(FormatError, match="version"):
        parse_header(lv_header(version=3))


def test_version_1_reads_as_raw_without_cookie():
    # v1: magic, version, xml_len, was_running, unused[16]; the format word is unused.
    raw = struct.pack("<16s3I16I", QEMU_SAVE_MAGIC, 1, 10, 1, *([7] + [0] * 15))
    h = parse_header(raw)
    assert h.version == 1 and h.format == SaveFormat.RAW and h.cookie_offset == 0 and h.was_running


def test_partial_magic_is_incomplete():
    with pytest.raises(IncompleteImageError, match="incomplete save image"):
        parse_header(lv_header(magic=QEMU_SAVE_PARTIAL))
    assert not parse_header(lv_header(magic=QEMU_SAVE_PARTIAL), allow_partial=True).complete


def test_wrong_magic_and_short_header():
    with pytest.raises(FormatError, match="magic"):
        parse_header(b"LibvirtQemudXXXX" + bytes(76))
    with pytest.raises(TruncatedError):
        parse_header(lv_header()[:50])


def test_data_len_zero_and_cookie_past_data_rejected():
    with pytest.raises(FormatError, match="data_len 0"):
        parse_header(lv_header(data_len=0))
    with pytest.raises(FormatError, match="cookieOffset"):
        parse_header(lv_header(data_len=10, cookie=11))


def test_metadata_xml_and_cookie():
    xml, cookie = b"<domain/>\0", b"<cookie/>\n\0"
    data = xml + cookie + bytes(64)
    raw = lv_header(data_len=len(data), cookie=len(xml)) + data + b"QEVM"
    m = parse_metadata(BytesSource(raw))
    assert m.domain_xml == "<domain/>" and m.cookie_xml == "<cookie/>\n"


def test_metadata_without_nul_is_an_error():
    data = b"<domain>" * 4
    with pytest.raises(FormatError, match="NUL"):
        parse_metadata(BytesSource(lv_header(data_len=len(data)) + data + b"QEVM"))


def test_metadata_truncated_before_stream():
    with pytest.raises(TruncatedError):
        parse_metadata(BytesSource(lv_header(data_len=1000) + b"<d/>\0"))


# --- bitmaps ------------------------------------------------------------------------------

def naive_runs(bits, first, last):
    out, i = [], first
    while i < last:
        if bits[i]:
            j = i
            while j < last and bits[j]:
                j += 1
            out.append((i, j))
            i = j
        else:
            i += 1
    return out


def to_bitmap(bits):
    raw = bytearray(bitmap_size(len(bits)))
    for i, b in enumerate(bits):
        if b:
            raw[i // 8] |= 1 << (i % 8)
    return bytes(raw)


@pytest.mark.parametrize("seed", range(40))
def test_set_runs_matches_naive(seed):
    rng = random.Random(seed)
    n = rng.randrange(1, 700)
    density = rng.choice([0.0, 0.02, 0.5, 0.97, 1.0])
    bits = [rng.random() < density for _ in range(n)]
    bm = to_bitmap(bits)
    for _ in range(20):
        a = rng.randrange(0, n)
        b = rng.randrange(a, n + 1)
        assert list(set_runs(bm, a, b)) == naive_runs(bits, a, b)
    assert populated_count(bm, n) == sum(bits)
    assert bits_beyond(bm, n) == 0


def test_bits_beyond_the_block_are_counted_not_used():
    bits = [True] * 70
    bm = bytearray(to_bitmap(bits))
    bm[-1] |= 0x80  # bit 127: past page 69
    bm[8] |= 0x80  # bit 71
    assert bits_beyond(bytes(bm), 70) == 2
    assert populated_count(bytes(bm), 70) == 70
    assert list(set_runs(bytes(bm), 0, 70)) == [(0, 70)]


# --- cursor and sources -----------------------------------------------------------------

def test_cursor_reports_truncation_offset():
    c = Cursor(BytesSource(b"\x00\x00\x00\x05abc"), 0)
    assert c.be32("x") == 5
    with pytest.raises(TruncatedError) as e:
        c.read(5, "name")
    assert e.value.offset == 4


def test_cursor_small_chunks_cross_boundaries():
    data = bytes(range(256)) * 10
    c = Cursor(BytesSource(data), 3, chunk=7)
    out = b"".join(c.read(5, "x") for _ in range(100))
    assert out == data[3:503]


def test_forward_source_tees_and_bounds_memory():
    chunks = [bytes([i]) * 1000 for i in range(50)]
    it = iter(chunks)
    seen = {}
    src = ForwardSource(lambda n: next(it, b""), tee=lambda off, d: seen.__setitem__(off, d), keep=100)
    assert src.read_at(0, 10) == bytes(10)
    assert src.read_at(30000, 5) == bytes([30]) * 5
    with pytest.raises(FormatError):
        src.read_at(0, 1)  # dropped long ago
    assert src.drain() == 50000
    assert b"".join(seen[k] for k in sorted(seen)) == b"".join(chunks)


@pytest.mark.parametrize("seed", range(4))
def test_sparse_bitmap_equals_the_dense_one(seed, tmp_path):
    """Big bitmaps are read only where the file has data (ramfs.image.bitmap): runs, counts
    and bits past the end must equal those of the whole bitmap read densely."""
    import random

    from ramfs.format.qemu import MappedRamHeader, RamBlockRecord, bits_beyond, populated_count, set_runs
    from ramfs.image.bitmap import CHUNK, SPARSE_FROM, DenseBitmap, SparseBitmap, load_bitmap
    from ramfs.image.files import FileSource
    rng = random.Random(seed)
    pages = (SPARSE_FROM * 8) * 3 + rng.randrange(0, 64 * 8)  # a bitmap of ~3 MiB
    size = (pages + 63) // 64 * 8
    start = 4096 + rng.randrange(0, 3) * 8
    path = tmp_path / "bm"
    with open(path, "wb") as f:
        f.truncate(start + size + 4096)  # a sparse file: the bitmap is a hole but where written
        for _ in range(rng.choice([0, 1, 5, 40])):
            at = rng.randrange(size)
            n = min(size - at, rng.choice([1, 8, 100, CHUNK + 3]))
            f.seek(start + at)
            f.write(bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(n)))
        # bits past the last page, in the last byte(s)
        if rng.random() < 0.5:
            f.seek(start + size - 1)
            f.write(b"\x80")
    hdr = MappedRamHeader(offset=0, version=1, page_size=4096, bitmap_offset=start, pages_offset=1 << 20)
    rec = RamBlockRecord(index=0, idstr="pc.ram", used_length=pages * 4096, offset=0, mapped=hdr)
    with FileSource(path) as src:
        dense = src.read_at(start, size)
        sparse = load_bitmap(src, rec)
    assert isinstance(sparse, SparseBitmap)
    assert sum(len(c) for c in sparse.chunks.values()) <= max(1, len(dense) - dense.count(0)) * CHUNK
    assert bool(sparse) == bool(populated_count(dense, pages) + bits_beyond(dense, pages))
    assert sparse.populated_count(pages) == populated_count(dense, pages)
    assert sparse.bits_beyond(pages) == bits_beyond(dense, pages)
    for first, last in [(0, pages)] + [tuple(sorted(rng.sample(range(pages + 1), 2))) for _ in range(5)]:
        assert list(sparse.set_runs(first, last)) == list(set_runs(dense, first, last))
    # Both kinds answer the same interface alike (ramfs.image.bitmap.Bitmap).
    whole = DenseBitmap(dense)
    assert bool(whole) and whole.populated_count(pages) == sparse.populated_count(pages)
    assert whole.bits_beyond(pages) == sparse.bits_beyond(pages)
    assert list(whole.set_runs(0, pages)) == list(sparse.set_runs(0, pages))
    for bm in (whole, sparse):  # the pieces hold every set bit, in order
        got = [(base + a, base + b) for base, bits in bm.pieces() for a, b in set_runs(bits, 0, len(bits) * 8)]
        assert got == sorted(got)
        assert sum(b - a for a, b in got) == populated_count(dense, pages) + bits_beyond(dense, pages)
    assert not DenseBitmap(b"") and list(DenseBitmap(b"").pieces()) == []
    assert DenseBitmap(b"").populated_count(pages) == DenseBitmap(b"").bits_beyond(pages) == 0


def test_merge_ranges():
    from ramfs.ranges import merge_ranges
    assert list(merge_ranges([])) == []
    assert list(merge_ranges([(1, 2)])) == [(1, 2)]
    assert list(merge_ranges([(0, 2), (2, 3), (5, 6), (5, 9), (6, 7), (10, 11)])) == [(0, 3), (5, 9), (10, 11)]
    assert list(merge_ranges(iter([(0, 10), (1, 2), (3, 12)]))) == [(0, 12)]
