"""The way back: every image reads as a classic sequential save image (export/sequential.img)."""

from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import qemu_images
from fixture_data import MANIFEST, entry, fixture_path
from mountutil import mounted
from qemu_images import SMALL_PC, SMALL_Q35, first_difference
from ramfs.views.export import SequentialExport
from ramfs.format.libvirt import SaveFormat, parse_header
from ramfs.image import open_image

IMAGES = [e["decompressed_path"] for e in MANIFEST if e["kind"] == "image"]
MAPPED = [e["decompressed_path"] for e in MANIFEST if e["kind"] == "image" and e["qemu_encoding"] == "mapped-ram"]
MACHINE = {"pc-i440fx-10.0": SMALL_PC, "pc-q35-10.0": SMALL_Q35}
MIB = 1 << 20


def stream_offset(path: Path) -> int:
    head = path.read_bytes()[:92]
    try:
        return parse_header(head).stream_offset
    except Exception:  # noqa: BLE001 - a bare QEMU stream
        return 0


@pytest.mark.parametrize("name", IMAGES)
def test_export_reads_anywhere_and_reopens_as_the_same_guest(name, tmp_path):
    src = fixture_path(name)
    with open_image(src) as img:
        ex = SequentialExport(img)
        whole = ex.read(0, ex.size)
        assert len(whole) == ex.size and ex.read(ex.size, 10) == b""
        rng = random.Random(name)
        for _ in range(300):  # any offset, any size, without reading from the start
            off = rng.randrange(ex.size)
            n = rng.choice([1, 8, 9, 4095, 4096, 4104, 65536, MIB + 3])
            assert ex.read(off, n) == whole[off:off + n], (off, n)
        out = tmp_path / "export.img"
        out.write_bytes(whole)
        with open_image(out, use_cache=False) as back:
            assert back.encoding == "sequential" and not back.warnings
            assert "mapped-ram" not in back.layout.capabilities
            assert back.layout.switchover_start == img.layout.switchover_start
            for blk in img.blocks:
                b = back.block(blk.idstr)
                assert b.used_length == blk.used_length
                assert list(b.populated_ranges()) == list(blk.populated_ranges())
                assert back.read(b, 0, b.used_length) == img.read(blk, 0, blk.used_length)
            desc = back.layout.vmdesc_json()
            if desc is not None:
                conf = json.dumps(desc.get("configuration", {}))
                assert "mapped-ram" not in conf
            if img.libvirt is not None:
                h = back.libvirt.header
                assert (h.format, h.version, h.complete) == (SaveFormat.RAW, 2, True)
                assert back.domain_xml == img.domain_xml


@pytest.mark.parametrize("name", ["libvirt/fw-pc-sparse.img", "firmware/q35-sequential.img"])
def test_export_nowait_reads_come_from_the_page_cache_only(name):
    """The mount serves export reads on its event loop when the image's bytes are cached
    (nowait). ``nowait`` must reach the image reads: over an O_DIRECT source (which never
    has bytes in the page cache, so refuses every nowait read) a record read raises
    WouldBlock. (Evicting a buffered file does not prove it: RWF_NOWAIT starts readahead, and
    a fast disk can finish it before the kernel checks.) Cached, nowait reads give the same
    bytes as normal ones, for records, device state and headers."""
    import tempfile

    from ramfs.image.files import WouldBlock
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:  # O_DIRECT needs a disk file system
        copy = Path(d) / "img"
        shutil.copyfile(fixture_path(name), copy)
        with open_image(copy, use_cache=False, direct_io=True) as img:
            ex = SequentialExport(img)
            records = ex.records[0]
            mid = (records.start + records.end) // 2
            with pytest.raises(WouldBlock):
                ex.read(mid, 65536, nowait=True)
            assert ex.read(0, 64, nowait=True) == ex.read(0, 64)  # fixed bytes: no I/O at all
        with open_image(copy, use_cache=False) as img:
            ex = SequentialExport(img)
            whole = ex.read(0, ex.size)  # now all cached
            rng = random.Random(name)
            for off in [0, mid, ex.size - 100] + [rng.randrange(ex.size) for _ in range(200)]:
                n = rng.choice([1, 4104, 131072, MIB])
                assert ex.read(off, n, nowait=True) == whole[off:off + n], (off, n)


def test_export_through_the_mount_equals_the_library(tmp_path):
    name = "libvirt/fw-pc-sparse.img"
    mp = tmp_path / "mp"
    with mounted(fixture_path(name), mp):
        f = mp / "export" / "sequential.img"
        with open_image(fixture_path(name)) as img:
            ex = SequentialExport(img)
            assert f.stat().st_size == ex.size  # exact before the first read
            with open(f, "rb") as fh:
                rng = random.Random(7)
                for _ in range(100):
                    off, n = rng.randrange(ex.size), rng.choice([1, 4104, 200000])
                    fh.seek(off)
                    assert fh.read(n) == ex.read(off, n)
        shutil.copy(f, tmp_path / "copy.img")  # plain cp
    with open_image(tmp_path / "copy.img") as back:
        assert back.encoding == "sequential"


def _export(src: Path, out: Path, way: str, tmp_path: Path) -> None:
    if way == "cli":
        r = _cli("export", "-q", str(src), str(out))
        assert r.returncode == 0, r.stderr
    else:  # plain cp out of a mount
        mp = tmp_path / "mp"
        with mounted(src, mp):
            shutil.copyfile(mp / "export" / "sequential.img", out)


@pytest.mark.qemu
@pytest.mark.parametrize("way", ["mount-cp", "cli"])
@pytest.mark.parametrize("name", MAPPED)
def test_exported_mapped_ram_fixture_restores_without_mapped_ram(name, way, tmp_path):
    """QEMU 10, -incoming defer, no mapped-ram capability, migrate-incoming file:PATH,offset=N:
    guest memory equals the fixture's ground truth byte for byte."""
    e = entry(name)
    out = tmp_path / "export.img"
    _export(fixture_path(name), out, way, tmp_path)
    dump = tmp_path / "dump.bin"
    qemu_images.restore_and_dump(out, MACHINE[e["machine"]], capabilities=(), offset=stream_offset(out),
                                 out_path=dump)
    difference = first_difference(dump, fixture_path(e["ground_truth"]))
    assert difference is None, f"QEMU restored the export of {name} with different RAM: {difference}"


@pytest.mark.qemu
def test_exported_linux_guest_restores_without_mapped_ram(tmp_path):
    """A Linux guest's libvirt sparse save (written by QEMU at test time), exported through
    the mount: QEMU without mapped-ram restores it to the guest's memory."""
    lv = qemu_images.build_linux_libvirt()
    out = tmp_path / "linux-export.img"
    _export(lv.sparse, out, "mount-cp", tmp_path)
    dump = tmp_path / "linux.bin"
    qemu_images.restore_and_dump(out, lv.guest.machine_args(), capabilities=(), offset=stream_offset(out),
                                 out_path=dump)
    difference = first_difference(dump, lv.pmemsave)
    assert difference is None, f"QEMU restored the Linux export with different RAM: {difference}"


def _cli(*args):
    import subprocess
    import sys
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, text=True, timeout=300)


DECOMPRESS = {"gzip": ["gzip", "-dc"], "bzip2": ["bzip2", "-dc"], "xz": ["xz", "-dc"], "lzop": ["lzop", "-dc"],
              "zstd": ["zstd", "-dcq"]}


def test_cli_export_raw_and_every_libvirt_compression(tmp_path):
    import subprocess
    src = fixture_path("libvirt/fw-pc-sparse.img")
    raw = tmp_path / "raw.save"
    r = _cli("export", "-q", str(src), str(raw))
    assert r.returncode == 0, r.stderr
    with open_image(src) as img:
        ex = SequentialExport(img)
        assert raw.read_bytes() == ex.read(0, ex.size)  # the CLI writes what the mount shows
        prefix = img.libvirt.header.stream_offset
    stream = raw.read_bytes()[prefix:]
    for fmt, cmd in DECOMPRESS.items():
        out = tmp_path / f"{fmt}.save"
        r = _cli("export", "-q", "--format", fmt, str(src), str(out))
        assert r.returncode == 0, r.stderr
        data = out.read_bytes()
        h = parse_header(data[:92])
        assert h.format == SaveFormat[fmt.upper()] and h.version == 2 and h.complete
        assert data[92:prefix] == raw.read_bytes()[92:prefix]  # the XML area as it was
        plain = subprocess.run(cmd, input=data[prefix:], capture_output=True, check=True).stdout
        assert plain == stream, fmt
        with open_image(out) as back, open_image(raw) as ref:
            for blk in ref.blocks:
                assert back.read(blk.idstr, 0, blk.used_length) == ref.read(blk, 0, blk.used_length)
    # never overwrites; a bare stream cannot be "compressed like libvirt"
    assert _cli("export", str(src), str(raw)).returncode == 2
    bare = _cli("export", "--format", "gzip", str(fixture_path("firmware/pc-mapped-ram.img")), str(tmp_path / "x"))
    assert bare.returncode == 2 and "libvirt" in bare.stderr and not (tmp_path / "x").exists()


@pytest.mark.qemu
def test_round_trip_sequential_convert_dir_export_restores(tmp_path):
    """sequential -> cp into convert/ (mapped-ram) -> cp of export/sequential.img -> QEMU
    restores it (no mapped-ram) to the source's ground truth."""
    name = "firmware/q35-sequential.img"
    backing = tmp_path / "saves"
    backing.mkdir()
    mp = tmp_path / "mp"
    with mounted(backing, mp):
        shutil.copy(fixture_path(name), mp / "convert" / "vm.save")  # copies, then chmods the result
        with open_image(backing / "vm.save") as conv:
            assert conv.encoding == "mapped-ram"
        shutil.copy(mp / "vm.save" / "export" / "sequential.img", tmp_path / "back.img")
    dump = tmp_path / "dump.bin"
    qemu_images.restore_and_dump(tmp_path / "back.img", SMALL_Q35, capabilities=(), offset=0, out_path=dump)
    assert first_difference(dump, fixture_path(entry(name)["ground_truth"])) is None
