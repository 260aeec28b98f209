"""Conversion corner cases of the libvirt container (no QEMU needed; restores are in test_convert)."""

from __future__ import annotations

import struct

import pytest

from conftest import patch, sparse_copy
from fixture_data import fixture_path
from ramfs.convert import convert_file
from ramfs.format.libvirt import SaveFormat, parse_header
from ramfs.image import open_image


def test_version_1_header_becomes_version_2_sparse(mutable, tmp_path):
    src = mutable(fixture_path("libvirt/fw-pc-raw.img"))
    raw = bytearray(src.read_bytes()[:92])
    # v1: magic, version, xml_len, was_running, unused[16]; keep data_len as the XML length.
    struct.pack_into("<I", raw, 16, 1)
    struct.pack_into("<II", raw, 28, 0, 0)
    patch(src, 0, bytes(raw))
    dst = tmp_path / "out.save"
    convert_file(str(src), str(dst))
    h = parse_header(dst.read_bytes()[:92])
    assert (h.version, h.format, h.cookie_offset, h.complete) == (2, SaveFormat.SPARSE, 0, True)
    with open_image(dst) as out, open_image(fixture_path("libvirt/fw-pc-raw.img")) as orig:
        assert out.encoding == "mapped-ram" and not out.warnings
        assert out.read("pc.ram", 0, 64 << 20) == orig.read("pc.ram", 0, 64 << 20)


def test_raw_header_over_mapped_ram_is_fixed_to_sparse(tmp_path):
    src = sparse_copy(fixture_path("libvirt/fw-pc-sparse.img"), tmp_path / "mislabelled.save")
    patch(src, 28, struct.pack("<I", 0))
    dst = tmp_path / "out.save"
    r = convert_file(str(src), str(dst))
    assert r.already_sparse
    h = parse_header(dst.read_bytes()[:92])
    assert h.format == SaveFormat.SPARSE and h.complete
    data_src, data_dst = src.read_bytes(), dst.read_bytes()
    assert data_src[92:] == data_dst[92:]


def test_big_endian_header_keeps_its_byte_order(mutable, tmp_path):
    src = mutable(fixture_path("libvirt/fw-pc-gzip.img"))
    raw = bytearray(src.read_bytes()[:92])
    fields = struct.unpack_from("<5I", raw, 16)
    struct.pack_into(">5I", raw, 16, *fields)
    patch(src, 0, bytes(raw))
    dst = tmp_path / "out.save"
    convert_file(str(src), str(dst))
    h = parse_header(dst.read_bytes()[:92])
    assert h.byteorder == "big" and h.format == SaveFormat.SPARSE and h.data_len == fields[1]


@pytest.mark.parametrize("seed", range(4))
def test_runs_of_records_convert_like_single_records(seed, tmp_path):
    """The converter's run path (MappedRamWriter.pages/.zeros, count > 1): zero runs over
    written pages punch them, all-zero PAGE payloads stay holes, and the last record of a
    page wins."""
    import random

    from streams import PS, random_records, sequential_stream
    rng = random.Random(seed)
    blocks = [("pc.ram", 3000 * PS), ("vga.vram", 70 * PS)]
    recs = random_records(rng, blocks)
    # Some all-zero PAGE payloads inside runs (QEMU sends those as ZERO; a writer must cope).
    recs = [(b, p, bytes(PS) if d is not None and rng.random() < 0.05 else d) for b, p, d in recs]
    src = tmp_path / "seq.img"
    src.write_bytes(sequential_stream(recs, blocks))
    want = [dict() for _ in blocks]
    for b, p, d in recs:
        want[b][p] = d
    for jobs in (1, 3):
        dst = tmp_path / f"out{jobs}.img"
        convert_file(str(src), str(dst), jobs=jobs)
        with open_image(dst) as out, open_image(src) as orig:
            assert out.encoding == "mapped-ram"
            for b, (name, size) in enumerate(blocks):
                assert out.read(name, 0, size) == orig.read(name, 0, size)
                populated = {p for p, d in want[b].items() if d is not None and any(d)}
                got = {off // PS + i for off, end in out.block(name).populated_ranges()
                       for i in range((end - off) // PS)}
                assert got == populated
