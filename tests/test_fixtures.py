"""Every real QEMU 10.0 / libvirt 11.3 fixture: facts, block contents, XML, CLI, caches."""

from __future__ import annotations

import hashlib
import json
import mmap
import os
import random
import subprocess
import sys
import xml.etree.ElementTree as ET
from collections import defaultdict

import jsonschema
import pytest

from conftest import REPO
from fixture_data import MANIFEST, fixture_path
from ramfs.image import open_image

SCHEMA = json.loads((REPO / "docs" / "info.schema.json").read_text())
IMAGES = [e for e in MANIFEST if e["kind"] == "image"]
IDS = [e["decompressed_path"] for e in IMAGES]


def block_digest(img, block, chunk=1 << 20):
    h = hashlib.sha256()
    for off in range(0, block.used_length, chunk):
        h.update(img.read(block, off, chunk))
    return h.hexdigest()


def file_digest(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while data := f.read(1 << 20):
            h.update(data)
    return h.hexdigest()


@pytest.fixture(scope="module")
def digests():
    """sha256 of every block of every image, computed once per module."""
    out = {}
    for e in IMAGES:
        with open_image(fixture_path(e["decompressed_path"])) as img:
            out[e["decompressed_path"]] = {b.idstr: block_digest(img, b) for b in img.blocks}
    return out


@pytest.mark.parametrize("entry", IMAGES, ids=IDS)
def test_facts_match_manifest(entry):
    with open_image(fixture_path(entry["decompressed_path"])) as img:
        assert img.container == entry["container"]
        assert img.layout.machine == entry["machine"]
        assert img.encoding == ("mapped-ram" if entry["qemu_encoding"].startswith("mapped-ram") else "sequential")
        if entry["container"] == "libvirt":
            h, want = img.libvirt.header, entry["libvirt_header"]
            assert int(h.format) == entry["libvirt_format"]["code"]
            assert (h.version, h.data_len, h.cookie_offset, h.stream_offset) == (
                want["version"], want["data_len"], want["cookieOffset"], want["qemu_stream_offset"])
            assert h.was_running == entry["was_running"]
            assert len(img.domain_xml.encode()) == want["domain_xml_len"]  # NUL not counted
            assert len(img.cookie_xml.encode()) == want["cookie_len"]
            assert img.layout.base == want["qemu_stream_offset"] or h.format.compressed
        else:
            assert img.libvirt is None and img.layout.base == 0
        layout = entry.get("ram_layout")
        if layout and "blocks" in layout:
            got = [(b.idstr, b.used_length) for b in img.layout.blocks]
            assert got == [(b["idstr"], b["used_length"]) for b in layout["blocks"]]
            for b, w in zip(img.layout.blocks, layout["blocks"]):
                if "pages_offset" in w:
                    assert (b.mapped.bitmap_offset, b.mapped.pages_offset, b.mapped.version) == (
                        w["bitmap_offset"], w["pages_offset"], w["header_version"])
        assert img.layout.vmdesc is not None and img.layout.switchover_start
        devices = img.devices()
        assert devices and devices[-1].name == "globalstate"
        assert not img.warnings


@pytest.mark.parametrize("entry", [e for e in IMAGES if e.get("ground_truth")],
                         ids=[e["decompressed_path"] for e in IMAGES if e.get("ground_truth")])
def test_pc_ram_equals_qemu_memory_dump(entry, digests):
    truth = fixture_path(entry["ground_truth"])
    assert digests[entry["decompressed_path"]]["pc.ram"] == file_digest(truth)


def test_every_block_agrees_across_encodings(digests):
    """Sequential, mapped-ram, multifd, direct-io and every libvirt format: same blocks."""
    groups = defaultdict(list)
    for e in IMAGES:
        if e.get("ground_truth"):
            groups[e["ground_truth"]].append(e["decompressed_path"])
    assert len(groups) == 3
    for truth, members in groups.items():
        assert len(members) >= 4, truth
        ref = digests[members[0]]
        assert len(ref) == 6
        for m in members[1:]:
            assert digests[m] == ref, (truth, m)
        # The blobs loaded at known addresses, and pc.bios is SeaBIOS.
        with open_image(fixture_path(members[0])) as img:
            blob = img.read("pc.ram", 0x1000000, 1 << 20)
            assert hashlib.sha256(blob).hexdigest() == \
                "08b2a8da54e3e185f025ac53633deae5a583c8880a72a21e169a1da022baa003"
            marker = img.read("pc.ram", 0x2000000, 65536)
            assert marker == (b"RAMFS-FIXTURE-MARKER-" * 3121)[:65536]
            seabios = "/usr/share/seabios/bios-256k.bin"
            if os.path.exists(seabios):
                assert img.read("pc.bios", 0, 1 << 18) == open(seabios, "rb").read()


def test_raw_paused_differs_only_where_the_readme_says(digests):
    entry = next(e for e in IMAGES if e["decompressed_path"].endswith("raw-paused.img"))
    truth = fixture_path("libvirt/fw-pc-pmemsave.bin").read_bytes()
    with open_image(fixture_path(entry["decompressed_path"])) as img:
        ram = img.read("pc.ram", 0, len(truth))
    diffs = [i for i in range(0, len(truth), 4096) if ram[i:i + 4096] != truth[i:i + 4096]]
    ranges = [tuple(int(x, 16) if isinstance(x, str) else x for x in r) for r in entry["ground_truth_diff_ranges"]]
    assert diffs
    for page in diffs:
        for i in range(page, page + 4096):
            if ram[i] != truth[i]:
                assert any(lo <= i <= hi for lo, hi in ranges), hex(i)


def test_random_reads_match_the_memory_dump():
    """Read oracle: random ranges of 1 byte to several MiB, page edges, the end, past the end."""
    rng = random.Random(7)
    for name in ("firmware/q35-sequential.img", "firmware/q35-mapped-ram-multifd.img", "libvirt/fw-pc-gzip.img"):
        truth_name = "libvirt/fw-pc-pmemsave.bin" if name.startswith("libvirt") else "firmware/q35-pmemsave.bin"
        with open(fixture_path(truth_name), "rb") as f, \
                mmap.mmap(f.fileno(), 0, prot=mmap.PROT_READ) as truth, \
                open_image(fixture_path(name)) as img:
            blk = img.block("pc.ram")
            n = blk.used_length
            cases = [(0, 1), (4095, 2), (n - 1, 1), (n - 4096, 4096), (n - 10, 100), (n, 10), (n + 5, 1),
                     (0x1000000 - 3, 1 << 20), (0, 0)]
            cases += [(rng.randrange(n), rng.choice([1, 17, 4096, 65536, 131072, 3 << 20]))
                      for _ in range(300)]
            for off, size in cases:
                assert bytes(img.read(blk, off, size)) == truth[off:off + size], (name, off, size)


def test_runs_cover_blocks_exactly():
    """The run iterator tiles any range with no gap or overlap, and zeros cost no file offset."""
    with open_image(fixture_path("firmware/pc-mapped-ram.img")) as mr, \
            open_image(fixture_path("firmware/pc-sequential.img")) as seq:
        for img in (mr, seq):
            blk = img.block("pc.ram")
            rng = random.Random(3)
            for _ in range(200):
                off = rng.randrange(blk.used_length)
                size = rng.randrange(1, 4 << 20)
                runs = list(blk.runs(off, size))
                assert sum(r[1] for r in runs) == min(size, blk.used_length - off)
                assert all(r[1] > 0 for r in runs)
            populated = sum(b - a for a, b in blk.populated_ranges())
            assert populated == blk.populated_pages * blk.page_size


def xml_facts(text):
    root = ET.fromstring(text)
    devices = root.find("devices")
    return {
        "name": root.findtext("name"),
        "uuid": root.findtext("uuid"),
        "memory": (root.find("memory").get("unit"), root.findtext("memory")),
        "machine": root.find("os/type").get("machine"),
        "devices": {child.tag for child in devices} if devices is not None else set(),
    }


@pytest.mark.parametrize("entry", [e for e in IMAGES if e["container"] == "libvirt"],
                         ids=[e["decompressed_path"] for e in IMAGES if e["container"] == "libvirt"])
def test_domain_xml_agrees_with_virsh_dumpxml(entry):
    dumped = fixture_path(entry["decompressed_path"].replace(".img", ".xml")).read_text()
    with open_image(fixture_path(entry["decompressed_path"])) as img:
        stored = xml_facts(img.domain_xml)
        assert img.cookie_xml.startswith("<cookie>") and "<cpu" in img.cookie_xml
    want = xml_facts(dumped)
    for key in ("name", "uuid", "memory", "machine"):
        assert stored[key] == want[key], key
    # virsh adds defaults (pci-root controller, keyboard, audio); it never drops a device.
    assert stored["devices"] and stored["devices"] <= want["devices"]
    assert stored["uuid"] == entry["libvirt_uuid"]


@pytest.mark.parametrize("entry", IMAGES, ids=IDS)
def test_cli_info_and_check(entry):
    path = str(fixture_path(entry["decompressed_path"]))
    run = [sys.executable, "-m", "ramfs.cli"]
    r = subprocess.run(run + ["check", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and r.stdout.strip().endswith("OK"), r.stdout + r.stderr
    r = subprocess.run(run + ["info", "--json", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    facts = json.loads(r.stdout)
    jsonschema.validate(facts, SCHEMA)
    assert facts["machine"] == entry["machine"]
    assert [b["idstr"] for b in facts["blocks"]][0] == "pc.ram"
    assert facts["blocks"][0]["populated_pages"] > 300
    r = subprocess.run(run + ["info", path], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0 and "pc.ram" in r.stdout and entry["machine"] in r.stdout
