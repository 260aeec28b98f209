"""The sequential page index on its own: random record sequences against a naive model."""

from __future__ import annotations

import random

import pytest

from ramfs.format.qemu import RamBlockRecord
from ramfs.image.index import CHUNK_PAGES, PageIndex
from ramfs.image.model import IndexedBlock
from streams import random_records, sequential_stream

PS = 4096


def naive_runs(pages, first, last):
    out = []
    for p in range(first, last):
        off = pages.get(p, 0)
        if off:
            out.append((p, p + 1, off))
        elif out and out[-1][2] is None and out[-1][1] == p:
            out[-1] = (out[-1][0], p + 1, None)
        else:
            out.append((p, p + 1, None))
    return out


@pytest.mark.parametrize("seed", range(12))
def test_index_matches_a_dict_model(seed, tmp_path):
    rng = random.Random(seed)
    num_pages = rng.choice([5, CHUNK_PAGES - 1, CHUNK_PAGES + 7, 3 * CHUNK_PAGES + 100])
    idx = PageIndex(1)
    model: dict[int, int] = {}
    hot = [rng.randrange(num_pages) for _ in range(40)]
    for _ in range(rng.choice([0, 50, 3000])):
        p = rng.choice(hot) if rng.random() < 0.3 else rng.randrange(num_pages)
        off = 0 if rng.random() < 0.3 else rng.randrange(1, 1 << 40) * 8
        # the last record wins
        if off:
            idx.pages(0, p, 1, b"", 0, 0, off)
        else:
            idx.zeros(0, p, 1)
        model[p] = off
    rec = RamBlockRecord(index=0, idstr="b", used_length=num_pages * PS, offset=0)
    blk = IndexedBlock(rec, PS, idx)
    assert blk.populated_pages == sum(1 for v in model.values() if v)
    for _ in range(30):
        a = rng.randrange(num_pages)
        b = rng.randrange(a + 1, num_pages + 1)
        assert list(blk.page_runs(a, b)) == naive_runs(model, a, b)
        assert blk.has_data(a * PS, (b - a) * PS) == any(model.get(p) for p in range(a, b))
    ranges = list(blk.populated_ranges())
    want, cur = [], None
    for p in sorted(k for k, v in model.items() if v):
        if cur and cur[1] == p * PS:
            cur = (cur[0], (p + 1) * PS)
        else:
            if cur:
                want.append(cur)
            cur = (p * PS, (p + 1) * PS)
    if cur:
        want.append(cur)
    assert ranges == want


# --- the parser's run fast path (qemu._RUN_ZERO/_RUN_PAGE) against record-by-record sinks ---

class RecordingSink:
    """A qemu.RecordSink keeping every call, and every page as ``(block, page, payload)``."""

    def __init__(self):
        self.calls: list[tuple] = []
        self.seen: list[tuple[int, int, bytes | None]] = []

    def start(self, ram) -> None:
        assert ram.page_size == PS and not self.seen

    def pages(self, block, first, count, buf, pos, stride, offset) -> None:
        assert (count == 1 and stride == 0) or stride == 8 + PS
        self.calls.append(("pages", block, first, count, offset, stride))
        for n in range(count):
            o = pos + n * stride
            self.seen.append((block, first + n, bytes(buf[o:o + PS])))

    def zeros(self, block, first, count) -> None:
        self.calls.append(("zeros", block, first, count))
        self.seen.extend((block, first + n, None) for n in range(count))


@pytest.mark.parametrize("seed", range(10))
def test_run_fast_path_equals_record_by_record(seed, monkeypatch):
    from ramfs.format import qemu
    from ramfs.format.source import BytesSource
    rng = random.Random(seed)
    blocks = [("pc.ram", (CHUNK_PAGES + 300) * PS), ("vga.vram", 70 * PS)]
    recs = random_records(rng, blocks)
    data = sequential_stream(recs, blocks)
    # The truth: the last record of each page wins.
    want = [dict() for _ in blocks]
    for b, p, payload in recs:
        want[b][p] = payload
    with_runs = PageIndex(len(blocks))
    qemu.parse_stream(BytesSource(data), sink=with_runs)
    seen = RecordingSink()
    qemu.parse_stream(BytesSource(data), sink=seen)
    by_page = PageIndex(len(blocks))
    with monkeypatch.context() as m:
        m.setattr(qemu._Parser, "_run", lambda self, *a: 0)  # never a run: record by record
        qemu.parse_stream(BytesSource(data), sink=by_page)
        one_by_one = RecordingSink()
        qemu.parse_stream(BytesSource(data), sink=one_by_one)
    assert all(c[3] == 1 for c in one_by_one.calls)
    for b, (_name, size) in enumerate(blocks):
        for p in range(size // PS):
            off = with_runs.lookup(b, p)
            assert off == by_page.lookup(b, p), (b, p)
            payload = want[b].get(p)
            assert (data[off:off + PS] if off else None) == payload, (b, p)
        assert with_runs.populated(b) == by_page.populated(b)
        assert with_runs.bits[b].keys() == by_page.bits[b].keys()
        for no in with_runs.bits[b]:
            assert with_runs.bits[b][no] == by_page.bits[b][no]
    # A sink gets the same pages in the same order either way, with their file offsets.
    assert seen.seen == one_by_one.seen == recs
    offsets = [c[4] + n * c[5] for c in seen.calls if c[0] == "pages" for n in range(c[3])]
    assert [data[o:o + PS] for o in offsets] == [p for _, _, p in recs if p is not None]


def test_run_fast_path_is_taken_and_checks_like_the_slow_one():
    from ramfs.errors import FormatError
    from ramfs.format.qemu import parse_stream
    from ramfs.format.source import BytesSource
    blocks = [("pc.ram", 512 * PS)]
    recs = [(0, p, None) for p in range(200)] + [(0, p, b"\x01" * PS) for p in range(200, 400)]
    data = sequential_stream(recs, blocks)
    sink = RecordingSink()
    parse_stream(BytesSource(data), sink=sink)
    runs = [c for c in sink.calls if c[3] > 1]
    assert sum(c[3] for c in runs if c[0] == "zeros") >= 128
    assert sum(c[3] for c in runs if c[0] == "pages") >= 128
    # A non-zero fill byte inside a zero run is still an error.
    bad = bytearray(data)
    first = data.index(b"\0\0\0\0\0\0\x50\x22")  # the record of page 5 (CONTINUE|ZERO)
    bad[first + 8] = 7
    with pytest.raises(FormatError, match="fill byte"):
        parse_stream(BytesSource(bytes(bad)), sink=RecordingSink())
    # A run reaching past the block's end is still an error (pages 90..99 of a 90-page block).
    data = sequential_stream([(0, p, None) for p in range(100)], [("pc.ram", 90 * PS)])
    with pytest.raises(FormatError, match="past the end of block"):
        parse_stream(BytesSource(data), sink=RecordingSink())


@pytest.mark.parametrize("seed", range(8))
def test_reads_of_a_sequential_image_equal_the_last_records(seed, tmp_path):
    """Image.read through IndexedBlock.plan (strided pieces for runs of records) against the
    records themselves, at random offsets and sizes, page-aligned or not."""
    from ramfs.image.model import open_image
    rng = random.Random(seed)
    blocks = [("pc.ram", (CHUNK_PAGES + 300) * PS), ("vga.vram", 70 * PS)]
    recs = random_records(rng, blocks)
    path = tmp_path / "seq.img"
    path.write_bytes(sequential_stream(recs, blocks))
    truth = [dict() for _ in blocks]
    for b, p, payload in recs:
        truth[b][p] = payload

    def want(b, off, size):
        out = bytearray()
        for p in range(off // PS, (off + size + PS - 1) // PS):
            out += truth[b].get(p) or bytes(PS)
        skip = off % PS
        return bytes(out[skip:skip + size])

    with open_image(path, use_cache=False) as img:
        for b, (name, length) in enumerate(blocks):
            touched = sorted(truth[b])
            for _ in range(40):
                if touched and rng.random() < 0.7:
                    off = max(0, rng.choice(touched) * PS + rng.randrange(-3 * PS, PS))
                else:
                    off = rng.randrange(length)
                size = min(length - off, rng.choice([1, 100, PS, 3 * PS + 5, 64 * PS, 300 * PS + 17, 600 * PS]))
                assert bytes(img.read(name, off, size)) == want(b, off, size), (name, off, size)
