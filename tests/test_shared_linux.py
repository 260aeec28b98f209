"""Cross-checks on the Linux-guest fixtures of ../shared (not shipped: 40 MB).

A 128 MiB q35 guest running Linux, saved three ways from one paused state: libvirt raw,
libvirt sparse and a bare sequential stream. They share one memory dump as ground truth, and
the guest filled 5120 tmpfs pages that each name themselves.
"""

from __future__ import annotations

import hashlib
import re

import pytest

from fixture_data import shared_fixture_path, shared_fixtures_dir
from ramfs.image import open_image

pytestmark = [pytest.mark.shared,
              pytest.mark.skipif(shared_fixtures_dir() is None, reason="../shared/fixtures not present")]

IMAGES = ["linux/linux-q35-raw.img", "linux/linux-q35-sparse.img", "linux/linux-q35-sequential.img"]
FILL = re.compile(rb"RAMFS-LINUX-FILL-PAGE-(\d{8})-")


def sha(img, blk):
    h = hashlib.sha256()
    for off in range(0, blk.used_length, 4 << 20):
        h.update(img.read(blk, off, 4 << 20))
    return h.hexdigest()


@pytest.fixture(scope="module")
def truth():
    path = shared_fixture_path("linux/linux-q35-pmemsave.bin")
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", IMAGES)
def test_linux_pc_ram_equals_dump(name, truth):
    with open_image(shared_fixture_path(name)) as img:
        assert img.layout.machine == "pc-q35-10.0"
        assert sha(img, img.block("pc.ram")) == truth


def test_linux_encodings_agree_on_every_block():
    digests = []
    for name in IMAGES:
        with open_image(shared_fixture_path(name)) as img:
            digests.append({b.idstr: sha(img, b) for b in img.blocks})
    assert digests[0] == digests[1] == digests[2]


def test_all_tmpfs_fill_pages_are_readable():
    """Every one of the 5120 self-naming pages is found whole, at a page boundary."""
    with open_image(shared_fixture_path("linux/linux-q35-sparse.img")) as img:
        blk = img.block("pc.ram")
        found = set()
        for off in range(0, blk.used_length, 4 << 20):
            data = bytes(img.read(blk, off, 4 << 20))
            for p in range(0, len(data), 4096):
                m = FILL.match(data, p)
                if m:
                    unit = m.group(0)
                    assert data[p:p + 4096] == (unit * (4096 // len(unit) + 1))[:4096]
                    found.add(int(m.group(1)))
        assert found == set(range(5120))
