"""The sequential page index on its own: random record sequences against a naive model."""

from __future__ import annotations

import random

import pytest

from ramfs.format.qemu import RamBlockRecord
from ramfs.image.index import CHUNK_PAGES, PageIndex
from ramfs.image.model import IndexedBlock

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
        idx.sink(0, p, off)  # the last record wins
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
