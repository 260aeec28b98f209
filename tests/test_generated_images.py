"""Images made at test time by real QEMU 10: small pc/q35 guests and a 512 MiB one.

Each guest carries random and patterned blobs at known guest-physical addresses (loaded by
``-device loader``); QEMU's own ``pmemsave`` is the ground truth for ``pc.ram``.
"""

from __future__ import annotations

import hashlib

import pytest

import qemu_images as qi
from ramfs.image import open_image

pytestmark = pytest.mark.qemu

RECIPES = {"small-pc": qi.SMALL_PC, "small-q35": qi.SMALL_Q35, "large-pc": qi.LARGE_PC}


@pytest.fixture(scope="module", params=list(RECIPES), ids=list(RECIPES))
def guest(request):
    return qi.build(RECIPES[request.param])


def block_digests(path):
    out = {}
    with open_image(path) as img:
        for b in img.blocks:
            h = hashlib.sha256()
            for off in range(0, b.used_length, 4 << 20):
                h.update(img.read(b, off, 4 << 20))
            out[b.idstr] = (b.used_length, h.hexdigest())
    return out


def test_sequential_and_mapped_ram_agree_with_pmemsave(guest):
    seq = block_digests(guest.sequential)
    assert seq == block_digests(guest.mapped_ram)
    assert seq == block_digests(guest.mapped_ram_multifd)
    h = hashlib.sha256()
    with open(guest.pmemsave, "rb") as f:
        while data := f.read(4 << 20):
            h.update(data)
    assert seq["pc.ram"] == (guest.ram_bytes, h.hexdigest())


def test_blobs_are_where_the_guest_had_them(guest):
    for path in (guest.sequential, guest.mapped_ram):
        with open_image(path) as img:
            for blob in guest.recipe.blobs:
                assert bytes(img.read("pc.ram", blob.addr, blob.size)) == qi.blob_bytes(blob), (path, blob)


def test_populated_counts_agree(guest):
    with open_image(guest.sequential) as seq, open_image(guest.mapped_ram) as mr:
        assert [(b.idstr, b.populated_pages) for b in seq.blocks] == \
            [(b.idstr, b.populated_pages) for b in mr.blocks]
        blob_pages = sum(b.size for b in guest.recipe.blobs) // 4096
        assert seq.block("pc.ram").populated_pages >= blob_pages
        ranges = list(mr.block("pc.ram").populated_ranges())
        for blob in guest.recipe.blobs:
            if blob.kind == "pattern":  # every pattern page is non-zero, so it must be mapped
                assert any(a <= blob.addr and blob.addr + blob.size <= b for a, b in ranges)
