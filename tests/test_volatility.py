"""Volatility 3 reads save images through ramfs (ramfs/volatility.py): no mount, no root.

The layer must give Volatility the same guest-physical memory as phys/memory, for every
container and encoding (the fixtures of every kind), and Volatility's own plugins must find
what is in the guest at its guest-physical address: ``banners.Banners`` on the saves of a
Linux guest made by QEMU at test time, against the banners found in the guest's RAM by a
scan that does not use Volatility. (``linux.pslist`` needs the kernel's symbol table, too big
to make at test time: docs/forensics.md has that run.)
"""

from __future__ import annotations

import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO
from fixture_data import MANIFEST, fixture_path
from ramfs.image import open_image
from ramfs.image.phys import Placement
from ramfs.views.phys import PhysView

volatility3 = pytest.importorskip("volatility3")

PLUGIN_DIR = REPO / "ramfs" / "vol_plugin"
VOL = str(Path(sys.executable).parent / "vol")  # the volatility3 of this environment
IMAGES = [e["decompressed_path"] for e in MANIFEST if e["kind"] == "image"]
# volatility3/framework/plugins/banners.py, applied without Volatility.
BANNER_RE = re.compile(rb"(Linux version|Darwin Kernel Version) [0-9]+\.[0-9]+\.[0-9]+")
BANNER_CHARS = frozenset(b" #()+,;/-.0123456789:@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~")


def vol_env(tmp_path: Path) -> dict:
    # Volatility makes its cache directory at import: keep it out of the user's home.
    return dict(os.environ, XDG_CACHE_HOME=str(tmp_path / "cache"))


def _stack(path: Path):
    from volatility3.framework import contexts
    from volatility3.framework.layers import physical

    from ramfs.volatility import SaveImageStacker
    ctx = contexts.Context()
    ctx.config["base.location"] = path.as_uri()
    ctx.add_layer(physical.FileLayer(ctx, "base", "base"))
    return SaveImageStacker.stack(ctx, "base")


@pytest.mark.parametrize("name", IMAGES)
def test_the_layer_is_phys_memory_for_every_kind_of_image(name):
    path = fixture_path(name)
    layer = _stack(path)
    with open_image(path) as img:
        view = PhysView(img, Placement().map(img))
        assert layer is not None
        assert layer.maximum_address == view.size - 1
        rng = random.Random(name)
        for r in view.map.ranges:
            for gpa in [r.gpa, r.gpa + r.length - 4096] + [r.gpa + rng.randrange(r.length) for _ in range(20)]:
                n = min(4096, r.gpa + r.length - gpa)
                assert layer.is_valid(gpa, n)
                assert layer.read(gpa, n) == view.read(gpa, n), (name, hex(gpa))
        # Between RAM ranges (the PCI hole) there is no memory, as in core.elf.
        end_low = view.map.ranges[0].gpa + view.map.ranges[0].length
        assert not layer.is_valid(end_low, 4096)
        assert layer.read(end_low, 4096, pad=True) == bytes(4096)
        with pytest.raises(volatility3.framework.exceptions.InvalidAddressException):
            layer.read(end_low, 4096)


def test_other_files_are_left_to_volatility(tmp_path):
    raw = fixture_path("firmware/pc-pmemsave.bin")  # a raw memory dump: not ours
    assert _stack(raw) is None
    bad = tmp_path / "bad.save"
    bad.write_bytes(fixture_path("firmware/pc-sequential.img").read_bytes()[:5000])  # ours, damaged
    assert _stack(bad) is None


def banners_in_guest(path: Path) -> list[tuple[int, str]]:
    """The kernel banners in the guest's RAM, by guest-physical address, found without
    Volatility: the block read by ramfs, placed by the phys map (what the plugin must see)."""
    out = []
    with open_image(path) as img:
        pmap = Placement().map(img)
        for r in pmap.ranges:
            data = img.read(img.blocks[r.block], r.block_offset, r.length)
            for m in BANNER_RE.finditer(data):
                text = data[m.start():m.start() + 0xFFF]
                text = text[:text.find(b"\0")].strip() if b"\0" in text else b""
                if text and all(c in BANNER_CHARS for c in text):
                    out.append((r.gpa + m.start(), text.decode("latin-1")))
    return sorted(out)


def vol_banners(vol: list[str], path: Path, env: dict) -> list[tuple[int, str]]:
    r = subprocess.run([*vol, "-q", "--offline", "-r", "json", "-f", str(path), "banners.Banners"],
                       capture_output=True, text=True, timeout=600, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    import json
    return sorted((row["Offset"], row["Banner"]) for row in json.loads(r.stdout))


@pytest.mark.qemu
def test_vol_finds_the_linux_banners_at_their_guest_physical_addresses(tmp_path):
    import qemu_images as qi
    guest = qi.build_linux()
    vol = [VOL, "-p", str(PLUGIN_DIR)]
    for path in (guest.sequential, guest.mapped_ram):
        want = banners_in_guest(path)
        assert want and all("Linux version 6." in b for _, b in want)
        assert vol_banners(vol, path, vol_env(tmp_path)) == want, path.name
    # Without ramfs, Volatility reads the save file as raw memory: the same text at other
    # (file) offsets, which is what the layer is for.
    plain = vol_banners([VOL], guest.sequential, vol_env(tmp_path))
    assert plain and plain != banners_in_guest(guest.sequential)
