"""Cross-checks on a Linux guest made at test time (``qemu_images.build_linux``).

A q35 guest running Debian 12's kernel and busybox from an initramfs, saved four ways from
one paused state: bare sequential and mapped-ram streams (QEMU's), and libvirt raw and
sparse images (``qemu_images.build_linux_libvirt``: libvirt's header and XML, the streams
written by QEMU). Their ground truth is the pmemsave of a QEMU that restored the guest, and
the kernel unpacked the initramfs into page-cache pages of its rootfs: every page of those
files must be found whole in pc.ram, at a page boundary.
"""

from __future__ import annotations

import hashlib

import pytest

import qemu_images as qi
from ramfs.image import open_image

pytestmark = pytest.mark.qemu

IMAGES = ["raw", "sparse", "sequential", "mapped_ram"]  # libvirt raw/sparse, bare streams


def sha(img, blk):
    h = hashlib.sha256()
    for off in range(0, blk.used_length, 4 << 20):
        h.update(img.read(blk, off, 4 << 20))
    return h.hexdigest()


@pytest.fixture(scope="module")
def built() -> qi.LinuxLibvirtImages:
    return qi.build_linux_libvirt()


def image_path(built: qi.LinuxLibvirtImages, name: str):
    return getattr(built, name) if name in ("raw", "sparse") else getattr(built.guest, name)


@pytest.fixture(scope="module")
def truth(built):
    return hashlib.sha256(built.pmemsave.read_bytes()).hexdigest()


@pytest.mark.parametrize("name", IMAGES)
def test_linux_pc_ram_equals_dump(name, built, truth):
    with open_image(image_path(built, name)) as img:
        assert img.layout.machine == built.guest.info["machine_type"].removesuffix("-machine")
        blk = img.block("pc.ram")
        assert blk.used_length == built.pmemsave.stat().st_size == built.guest.recipe.ram_bytes
        assert sha(img, blk) == truth


def test_linux_encodings_agree_on_every_block(built):
    digests = []
    for name in IMAGES:
        with open_image(image_path(built, name)) as img:
            digests.append({b.idstr: sha(img, b) for b in img.blocks})
    assert "pc.ram" in digests[0] and len(digests[0]) > 1
    assert all(d == digests[0] for d in digests[1:])


def initramfs_files(cpio: bytes) -> dict[str, bytes]:
    """The regular files of a "newc" cpio archive (the guest's initramfs)."""
    files, pos = {}, 0
    while True:
        assert cpio[pos:pos + 6] == b"070701", pos
        fields = [int(cpio[pos + 6 + 8 * i:pos + 14 + 8 * i], 16) for i in range(13)]
        mode, size, namesize = fields[1], fields[6], fields[11]
        name = cpio[pos + 110:pos + 110 + namesize - 1].decode()
        pos = (pos + 110 + namesize + 3) & ~3
        if name == "TRAILER!!!":
            return files
        if mode & 0o170000 == 0o100000:
            files[name] = cpio[pos:pos + size]
        pos = (pos + size + 3) & ~3


def test_all_initramfs_pages_are_readable(built):
    """Every page of the files the kernel unpacked from its initramfs (busybox, init, the
    fw_cfg module: page-cache pages that cannot be evicted, the tail of the last one zeroed)
    is found whole in pc.ram at a page boundary, read through the libvirt sparse image."""
    files = initramfs_files(built.guest.initrd.read_bytes())
    assert "bin/busybox" in files and "init" in files
    want: dict[bytes, tuple[str, int]] = {}
    for name, data in files.items():
        for i in range(0, len(data), 4096):
            page = data[i:i + 4096].ljust(4096, b"\0")
            if page != bytes(4096):
                want.setdefault(page, (name, i // 4096))
    assert len(want) > len(files["bin/busybox"]) // 8192  # distinct pages, most of busybox
    with open_image(built.sparse) as img:
        blk = img.block("pc.ram")
        found = set()
        for off in range(0, blk.used_length, 4 << 20):
            data = bytes(img.read(blk, off, 4 << 20))
            for p in range(0, len(data), 4096):
                where = want.get(data[p:p + 4096])
                if where:
                    found.add(where)
        assert sorted(set(want.values()) - found) == []
