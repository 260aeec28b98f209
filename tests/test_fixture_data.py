"""The packed fixtures in tests/data: complete, verified on extraction, sparse, race-free."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import fixture_data as fd
from fixture_data import DATA_DIR, MANIFEST, entries, fixture_path

ARCHIVED = [e for e in MANIFEST if fd.is_archived(e)]
PLAIN = [e for e in MANIFEST if not fd.is_archived(e)]
MAPPED_RAM = entries("image", qemu_encoding=lambda v: bool(v) and v.startswith("mapped-ram"))


def sha256_file(p: Path) -> str:
    h = hashlib.sha256()
    with open(p, "rb") as f:
        for b in iter(lambda: f.read(1 << 20), b""):
            h.update(b)
    return h.hexdigest()


def test_manifest_covers_firmware_and_libvirt():
    paths = {e["decompressed_path"] for e in MANIFEST}
    assert {p.split("/")[0] for p in paths} == {"firmware", "libvirt"}
    assert len(entries("image")) == 18
    assert len(entries("ground-truth")) == 3
    assert {e["kind"] for e in ARCHIVED} == {"image", "ground-truth"}
    assert {e["kind"] for e in PLAIN} == {"xml", "info"}
    for e in MANIFEST:
        assert len(e["sha256"]) == 64 and e["logical_size"] > 0
        if e["kind"] == "image" and e.get("ground_truth"):
            assert fd.entry(e["ground_truth"])["kind"] == "ground-truth"
        if e["kind"] == "xml":
            assert fd.entry(e["image"])["kind"] == "image"


def test_entries_filters():
    sparse = entries("image", libvirt_format="sparse")
    assert [e["decompressed_path"] for e in sparse] == [
        "libvirt/fw-pc-sparse-parallel4.img", "libvirt/fw-pc-sparse.img"]
    assert [e["decompressed_path"] for e in entries(was_running=True)] == [
        "libvirt/fw-pc-raw-running.img"]
    assert len(entries(("xml", "info"))) == len(PLAIN)
    assert len(MAPPED_RAM) == 8
    assert entries("image", machine_alias="q35", qemu_encoding="sequential")[0][
        "decompressed_path"] == "firmware/q35-sequential.img"
    with pytest.raises(KeyError):
        fd.entry("linux/linux-q35-raw.img")


@pytest.mark.parametrize("e", PLAIN, ids=lambda e: e["decompressed_path"])
def test_plain_files_match_manifest(e):
    p = fixture_path(e["decompressed_path"])
    assert p == DATA_DIR / e["decompressed_path"]
    assert p.stat().st_size == e["logical_size"]
    assert sha256_file(p) == e["sha256"]


def test_fresh_extraction_verifies_every_file(tmp_path):
    got = fd.extract_archives(tmp_path)
    # The extraction hashed every member while writing it and checked it against the manifest.
    assert got == {e["decompressed_path"]: e["sha256"] for e in ARCHIVED}
    # ...and what landed on disk is exactly that.
    for e in ARCHIVED:
        p = tmp_path / e["decompressed_path"]
        assert p.stat().st_size == e["logical_size"]
        assert sha256_file(p) == e["sha256"], e["decompressed_path"]


def test_extraction_rejects_a_wrong_manifest(tmp_path):
    bad = [dict(e) for e in MANIFEST]
    # The archive is sorted by name: break its first members, so the test stays quick.
    victim = next(e for e in bad if e["decompressed_path"] == "firmware/pc-mapped-ram.img")
    victim["sha256"] = "0" * 64
    with pytest.raises(fd.FixtureError, match="pc-mapped-ram.img: sha256"):
        fd.extract_archives(tmp_path, manifest=bad)
    missing = [e for e in MANIFEST if e["decompressed_path"] != "firmware/pc-mapped-ram-multifd.img"]
    with pytest.raises(fd.FixtureError, match="unexpected member 'firmware/pc-mapped-ram-multifd"):
        fd.extract_archives(tmp_path / "x", manifest=missing)


@pytest.mark.parametrize("e", ARCHIVED, ids=lambda e: e["decompressed_path"])
def test_cached_fixture_matches_manifest(e):
    p = fixture_path(e["decompressed_path"])
    assert p.parent.parent.name == f"fixtures-{fd.archive_key()}"
    assert p.stat().st_size == e["logical_size"]
    stamp = json.loads((p.parent.parent / fd.STAMP).read_text())
    assert stamp[e["decompressed_path"]] == e["sha256"]


@pytest.mark.parametrize("e", MAPPED_RAM, ids=lambda e: e["decompressed_path"])
def test_mapped_ram_images_are_sparse(e):
    st = fixture_path(e["decompressed_path"]).stat()
    assert st.st_size > 64 << 20
    # ~331 data pages + device state: about 1.7 MB allocated of 73 MB.
    assert st.st_blocks * 512 < st.st_size // 10, (st.st_blocks * 512, st.st_size)


def test_concurrent_first_use_extracts_once(tmp_path):
    cache = tmp_path / "cache"
    code = ("import sys; sys.path.insert(0, sys.argv[1]); import fixture_data as fd; "
            "print(fd.fixture_path('firmware/q35-mapped-ram.img'))")
    env = dict(os.environ, RAMFS_TEST_CACHE=str(cache))
    procs = [subprocess.Popen([sys.executable, "-c", code, str(Path(fd.__file__).parent)],
                              env=env, stdout=subprocess.PIPE, text=True) for _ in range(3)]
    outs = [p.communicate(timeout=300)[0].strip() for p in procs]
    assert [p.returncode for p in procs] == [0, 0, 0]
    final = cache / f"fixtures-{fd.archive_key()}"
    assert set(outs) == {str(final / "firmware/q35-mapped-ram.img")}
    assert sorted(x.name for x in cache.iterdir()) == [final.name, final.name + ".lock"]
    assert fd._cache_ok(final)
