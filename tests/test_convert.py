"""``ramfs convert``: sequential save images -> mapped-ram ("sparse"), proven by real QEMU 10.

A reader and a writer of ours that share a bug would agree with each other, so the oracle
here is always QEMU:

* every converted image is restored by a fresh ``qemu-system-x86_64 -S -incoming defer``
  with capability ``mapped-ram`` (once also with ``multifd``, 4 channels), and its
  ``pmemsave`` must equal the ground truth byte for byte;
* the converted file is compared with the mapped-ram image *QEMU itself* wrote from the same
  guest state (shipped fixtures, libvirt's own ``sparse`` images, images made at test time):
  everything up to the end of the RAM pages must be byte-identical, and so must the VM
  description; only the device state may differ (a few timer bytes).

Conversions run through the CLI (``python -m ramfs.cli convert``), as a user would.
Conversions and QEMU images are shared per module so that the file runs in about a minute.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

import qemu_images
from conftest import REPO, patch, sparse_copy
from fixture_data import entries, entry, fixture_path
from qemu_images import LARGE_PC, SMALL_PC, SMALL_Q35, first_difference
from ramfs.image import open_image

MIB = 1 << 20
LIBVIRT_HEADER = 92
SAVE_MAGIC = b"LibvirtQemudSave"
PART_MAGIC = b"LibvirtQemudPart"
SPARSE_FORMAT = 6

MAPPED_RAM = ("mapped-ram",)
MAPPED_RAM_MULTIFD = ("mapped-ram", "multifd")

SEQUENTIAL = [e["decompressed_path"] for e in entries("image", qemu_encoding="sequential")]
LIBVIRT_SEQUENTIAL = [p for p in SEQUENTIAL if entry(p)["container"] == "libvirt"]
RECIPE_FOR_MACHINE = {"pc-i440fx-10.0": SMALL_PC, "pc-q35-10.0": SMALL_Q35}
GENERATED = {"SMALL_PC": SMALL_PC, "SMALL_Q35": SMALL_Q35, "LARGE_PC": LARGE_PC}

# The mapped-ram image QEMU (or libvirt through QEMU) wrote from the same guest state as
# each sequential fixture: the converted image must be identical to it but for device state.
QEMU_OWN_MAPPED_RAM = {
    "firmware/pc-sequential.img": "firmware/pc-mapped-ram.img",
    "firmware/q35-sequential.img": "firmware/q35-mapped-ram.img",
    **{p: "libvirt/fw-pc-sparse.img" for p in LIBVIRT_SEQUENTIAL if p != "libvirt/fw-pc-raw-paused.img"},
}



# ------------------------------------------------------------------------ helpers

def cli_convert(src, dst, *options, cache_dir: Path) -> subprocess.CompletedProcess:
    """``python -m ramfs.cli convert SRC DST [options]`` in a subprocess."""
    env = dict(os.environ, RAMFS_CACHE_DIR=str(cache_dir))
    return subprocess.run([sys.executable, "-m", "ramfs.cli", "convert", os.fspath(src), os.fspath(dst),
                           *options], cwd=REPO, env=env, capture_output=True, text=True, timeout=600)


def assert_ok(proc: subprocess.CompletedProcess, dst: Path) -> None:
    assert proc.returncode == 0, f"convert failed ({proc.returncode}): {proc.stderr.strip()}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert dst.is_file()


def assert_clean_failure(proc: subprocess.CompletedProcess) -> str:
    """Non-zero exit, exactly one line on stderr, no traceback; returns that line."""
    assert proc.returncode != 0, f"convert succeeded but should have failed: {proc.stdout}"
    assert "Traceback" not in proc.stderr, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got: {proc.stderr!r}"
    assert lines[0].startswith("ramfs: error: "), lines[0]
    return lines[0]


def libvirt_header(path: Path) -> dict | None:
    """The 92-byte libvirt header parsed here, independently of ramfs (None: bare stream)."""
    with open(path, "rb") as f:
        raw = f.read(LIBVIRT_HEADER)
    if raw[:16] not in (SAVE_MAGIC, PART_MAGIC):
        return None
    order = "<"
    if struct.unpack_from("<I", raw, 16)[0] > 2:  # qemuSaveImageReadHeader's byte-order rule
        order = ">"
    version, data_len, was_running, fmt, cookie = struct.unpack_from(order + "5I", raw, 16)
    return {"raw": raw, "magic": raw[:16], "order": order, "version": version, "data_len": data_len,
            "was_running": was_running, "format": fmt, "cookieOffset": cookie}


def stream_offset(path: Path) -> int:
    """Where the QEMU stream starts: 92 + data_len for libvirt images, 0 for bare ones."""
    h = libvirt_header(path)
    return 0 if h is None else LIBVIRT_HEADER + h["data_len"]


def files_identical(a: Path, b: Path) -> bool:
    if a.stat().st_size != b.stat().st_size:
        return False
    with open(a, "rb") as fa, open(b, "rb") as fb:
        while True:
            x, y = fa.read(8 * MIB), fb.read(8 * MIB)
            if x != y:
                return False
            if not x:
                return True


def assert_restores_to(image: Path, machine, truth: Path, dump: Path, *, capabilities=MAPPED_RAM,
                       multifd_channels: int | None = None) -> None:
    """Restore ``image`` in real QEMU and require pmemsave == ``truth`` byte for byte."""
    try:
        qemu_images.restore_and_dump(image, machine, capabilities=capabilities, offset=stream_offset(image),
                                     multifd_channels=multifd_channels, out_path=dump)
        difference = first_difference(dump, truth)
        assert difference is None, f"QEMU restored {image.name} with different RAM: {difference}"
    finally:
        dump.unlink(missing_ok=True)


def block_digests(path: Path) -> dict[str, tuple[int, str]]:
    """{idstr: (used_length, sha256 of the content)} as ramfs reads the image."""
    out = {}
    with open_image(path) as img:
        for blk in img.blocks:
            h = hashlib.sha256()
            for off in range(0, blk.used_length, 8 * MIB):
                h.update(img.read(blk, off, 8 * MIB))
            out[blk.idstr] = (blk.used_length, h.hexdigest())
    return out


def stream_facts(path: Path) -> dict:
    """Split points of a mapped-ram image (from ramfs's parse; the bytes are what is compared)."""
    with open_image(path, reads=False, use_cache=False) as img:
        lay = img.layout
        assert lay.mapped_ram, f"{path} is not mapped-ram"
        last = lay.blocks[-1]
        return {
            "regions_end": last.mapped.pages_offset + last.used_length,
            "device_offset": lay.device_offset,
            "vmdesc_offset": lay.vmdesc_offset,
            "vmdesc": lay.vmdesc,
            "ram_section_id": lay.ram_section_id,
            "footers": lay.footers,
        }


def compare_with_qemu_mapped_ram(converted: Path, reference: Path, *, ignore: tuple[int, int] | None = None) -> dict:
    """Require ``converted`` to equal QEMU's own mapped-ram ``reference`` of the same state.

    * bytes [0, end of the last block's pages): identical (file header, configuration, block
      list, mapped-ram headers, bitmaps, every page slot; libvirt header and data area too).
      ``ignore`` is a byte range of the reference that is replaced by the converted bytes
      first (the libvirt ``was_running`` word when the source differs from the reference);
    * the RAM section framing after that (EOS, PART, SWITCHOVER_START, END, footers):
      identical, except that QEMU writes one empty PART per save iteration, a number that
      depends on wall-clock timing (ram_save_iterate's time limit), while the converter always
      writes one; so repeated empty PARTs of the reference are collapsed to one first;
    * device state: same length, and the VM description (vmdesc JSON) byte-identical; only
      device-state values may differ (timers: a handful of bytes);
    * file size: equal, up to the reference's extra empty PARTs.

    Returns the numbers for the report.
    """
    conv = stream_facts(converted)
    ref = stream_facts(reference)
    assert conv["regions_end"] == ref["regions_end"], "RAM regions end at different offsets"
    end = ref["regions_end"]
    with open(converted, "rb") as fa, open(reference, "rb") as fb:
        pos = 0
        while pos < end:
            x, y = fa.read(min(8 * MIB, end - pos)), bytearray(fb.read(min(8 * MIB, end - pos)))
            if ignore is not None and pos < ignore[1] and ignore[0] < pos + len(y):
                lo, hi = max(ignore[0], pos) - pos, min(ignore[1], pos + len(y)) - pos
                y[lo:hi] = x[lo:hi]
            if x != y:
                diffs = [i for i, (u, v) in enumerate(zip(x, y, strict=False)) if u != v]
                pytest.fail(f"{converted.name} differs from QEMU's {reference.name} before the device "
                            f"state: {len(diffs)} bytes in [{pos:#x}, +{len(y):#x}), first at "
                            f"{pos + diffs[0] if diffs else pos + min(len(x), len(y)):#x}")
            if not x:
                pytest.fail(f"{converted.name} and {reference.name} end at {pos:#x}, inside the RAM regions")
            pos += len(x)
        a = fa.read()  # from end on: RAM framing and device state (small)
        b = fb.read()
    base = end  # a[i] is byte base + i of the file

    sid = ref["ram_section_id"]
    part = bytes([0x02]) + struct.pack(">IQ", sid, 0x10) + (b"\x7e" + struct.pack(">I", sid) if ref["footers"] else b"")
    ref_framing = b[:ref["device_offset"] - base]
    conv_framing = a[:conv["device_offset"] - base]
    collapsed = re.sub(b"(?:" + re.escape(part) + b")+", lambda _: part, ref_framing)
    extra_parts = (len(ref_framing) - len(collapsed)) // len(part)
    assert conv_framing == collapsed, (f"RAM section framing differs: converted {conv_framing.hex()} "
                                       f"vs QEMU {ref_framing.hex()}")

    conv_tail, ref_tail = a[conv["device_offset"] - base:], b[ref["device_offset"] - base:]
    assert len(conv_tail) == len(ref_tail), "device state has a different length"
    assert conv["vmdesc"] == ref["vmdesc"], "VM description (vmdesc JSON) differs from QEMU's"
    assert conv["vmdesc_offset"] - conv["device_offset"] == ref["vmdesc_offset"] - ref["device_offset"]
    differing = [i for i, (x, y) in enumerate(zip(conv_tail, ref_tail, strict=True)) if x != y]
    # Device state values (timers) may differ; nothing after the vmdesc section header can.
    assert len(differing) <= 64, f"{len(differing)} device-state bytes differ from QEMU's"
    assert all(i < conv["vmdesc_offset"] - conv["device_offset"] for i in differing)
    size, ref_size = converted.stat().st_size, reference.stat().st_size
    assert size == ref_size - extra_parts * len(part)
    stats = {"tail_bytes": len(conv_tail), "tail_bytes_differing": len(differing),
             "qemu_extra_empty_parts": extra_parts, "size": size, "reference_size": ref_size}
    print(f"{converted.name} vs QEMU's {reference.name}: {stats}")
    return stats


def assert_device_state_copied(converted: Path, source: Path) -> None:
    """The device sections (first device section up to the vmdesc) are the source's, verbatim.

    Only for uncompressed sources. Together with the comparison with QEMU's own image this
    pins down every byte of the converted file except the few device-state values QEMU itself
    changes when it saves the same state again.
    """
    spans = []
    for path in (converted, source):
        with open_image(path, reads=False, use_cache=False) as img:
            lay = img.layout
            assert lay.vmdesc_offset is not None
            with open(path, "rb") as f:
                f.seek(lay.device_offset)
                spans.append(f.read(lay.vmdesc_offset - lay.device_offset))
    assert spans[0] == spans[1], "device state differs from the source's"


def fs_type(path: Path) -> str:
    return subprocess.run(["stat", "-f", "-c", "%T", os.fspath(path)], capture_output=True, text=True,
                          check=True).stdout.strip()


# ----------------------------------------------------------------------- fixtures

@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.getbasetemp() / "ramfs-cache"


class Conversions:
    """Each source converted once per module, through the CLI."""

    def __init__(self, root: Path, cache: Path):
        self.root = root
        self.cache = cache
        self._done: dict[str, Path] = {}

    def get(self, key: str, src: Path) -> Path:
        if key not in self._done:
            dst = self.root / (key.replace("/", "_") + ".converted")
            proc = cli_convert(src, dst, cache_dir=self.cache)
            assert_ok(proc, dst)
            self._done[key] = dst
        return self._done[key]

    def fixture(self, name: str) -> Path:
        return self.get(name, fixture_path(name))


@pytest.fixture(scope="module")
def conversions(tmp_path_factory, cache_dir) -> Conversions:
    return Conversions(tmp_path_factory.mktemp("converted"), cache_dir)


@pytest.fixture(scope="module", params=sorted(GENERATED))
def generated(request):
    """(name, GuestImages) of an image set made by real QEMU (cached across runs)."""
    return request.param, qemu_images.build(GENERATED[request.param])


@pytest.fixture(scope="module")
def large_pc():
    return qemu_images.build(LARGE_PC)


@pytest.fixture
def disk_dir():
    """A directory on a disk file system (O_DIRECT needs one; tmpfs would hide page-cache bugs)."""
    d = Path(tempfile.mkdtemp(prefix="ramfs-convert-", dir="/var/tmp"))
    try:
        if fs_type(d) in ("tmpfs", "ramfs"):
            pytest.skip("/var/tmp is not on a disk file system")
        yield d
    finally:
        shutil.rmtree(d, ignore_errors=True)


@contextlib.contextmanager
def small_tmpfs(size: str):
    d = Path(tempfile.mkdtemp(prefix="ramfs-enospc-"))
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", os.fspath(d)], check=True,
                       capture_output=True)
    except (subprocess.CalledProcessError, FileNotFoundError) as e:
        d.rmdir()
        pytest.skip(f"cannot mount a tmpfs (needs root): {e}")
    try:
        yield d
    finally:
        subprocess.run(["umount", os.fspath(d)], check=True)
        d.rmdir()


# ------------------------------------------- 1. shipped sequential fixtures, restored by QEMU

def test_every_sequential_fixture_is_covered():
    assert len(SEQUENTIAL) == 10
    assert {p.split("/")[0] for p in SEQUENTIAL} == {"firmware", "libvirt"}
    assert {entry(p)["libvirt_format"]["name"] for p in LIBVIRT_SEQUENTIAL} == {
        "raw", "gzip", "bzip2", "xz", "lzop", "zstd"}


@pytest.mark.qemu
@pytest.mark.parametrize("name", SEQUENTIAL)
def test_converted_fixture_restores_to_ground_truth(name, conversions, tmp_path):
    e = entry(name)
    out = conversions.fixture(name)
    machine = RECIPE_FOR_MACHINE[e["machine"]]
    if e["ground_truth"]:
        truth = fixture_path(e["ground_truth"])
    else:
        # libvirt/fw-pc-raw-paused.img has no dump of its own: QEMU restoring the source is
        # the ground truth.
        truth = tmp_path / "source.bin"
        qemu_images.restore_and_dump(fixture_path(name), machine, capabilities=(),
                                     offset=stream_offset(fixture_path(name)), out_path=truth)
    assert_restores_to(out, machine, truth, tmp_path / "converted.bin")


@pytest.mark.qemu
def test_converted_fixture_restores_with_multifd(conversions, tmp_path):
    """As libvirt restores format 6 with --parallel-channels 4: mapped-ram + multifd, 4 channels."""
    name = "libvirt/fw-pc-zstd.img"
    out = conversions.fixture(name)
    assert_restores_to(out, SMALL_PC, fixture_path(entry(name)["ground_truth"]), tmp_path / "mf.bin",
                       capabilities=MAPPED_RAM_MULTIFD, multifd_channels=4)


@pytest.mark.parametrize("name", LIBVIRT_SEQUENTIAL)
def test_libvirt_header_of_converted_image(name, conversions):
    src_path = fixture_path(name)
    out = conversions.fixture(name)
    src, got = libvirt_header(src_path), libvirt_header(out)
    assert got is not None
    assert got["magic"] == SAVE_MAGIC
    assert got["order"] == src["order"] == "<"
    assert got["version"] == 2
    assert got["format"] == SPARSE_FORMAT
    for field in ("data_len", "cookieOffset", "was_running"):
        assert got[field] == src[field], field
    assert got["raw"][36:92] == src["raw"][36:92], "unused words changed"
    n = src["data_len"]
    with open(src_path, "rb") as fs, open(out, "rb") as fo:
        fs.seek(LIBVIRT_HEADER)
        fo.seek(LIBVIRT_HEADER)
        assert fo.read(n) == fs.read(n), "XML/cookie/padding area differs from the source"
        fo.seek(LIBVIRT_HEADER + n)
        assert fo.read(4) == b"QEVM"


@pytest.mark.qemu
def test_big_endian_libvirt_header_keeps_its_byte_order(tmp_path, cache_dir):
    """A header written by a big-endian host (libvirt byte-swaps it on read) stays big-endian."""
    src = sparse_copy(fixture_path("libvirt/fw-pc-gzip.img"), tmp_path / "be.img")
    raw = src.read_bytes()[:LIBVIRT_HEADER]
    patch(src, 16, struct.pack(">5I", *struct.unpack_from("<5I", raw, 16)))
    out = tmp_path / "be-sparse.img"
    assert_ok(cli_convert(src, out, cache_dir=cache_dir), out)
    h = libvirt_header(out)
    assert h["order"] == ">"
    assert (h["magic"], h["version"], h["format"], h["data_len"], h["cookieOffset"]) == (
        SAVE_MAGIC, 2, SPARSE_FORMAT, 67335, 1431)
    assert out.read_bytes()[16:20] == b"\x00\x00\x00\x02"
    assert_restores_to(out, SMALL_PC, fixture_path("libvirt/fw-pc-pmemsave.bin"), tmp_path / "be.bin")


@pytest.mark.parametrize("name", sorted(QEMU_OWN_MAPPED_RAM))
def test_converted_fixture_equals_qemus_own_mapped_ram(name, conversions):
    """The shipped mapped-ram images (bare: QEMU; libvirt: virsh save --image-format sparse)
    hold the same guest state as the sequential ones: the conversion must produce them."""
    reference = fixture_path(QEMU_OWN_MAPPED_RAM[name])
    ignore = None
    if entry(name)["was_running"] != entry(QEMU_OWN_MAPPED_RAM[name])["was_running"]:
        ignore = (24, 28)  # libvirt header was_running: kept from the source, as it must be
    compare_with_qemu_mapped_ram(conversions.fixture(name), reference, ignore=ignore)
    if not entry(name).get("libvirt_format") or entry(name)["libvirt_format"]["name"] == "raw":
        assert_device_state_copied(conversions.fixture(name), fixture_path(name))


# ------------------------------------------------- 2. a Linux guest made at test time

@pytest.fixture(scope="module")
def linux():
    """A Linux guest's libvirt raw image, bare stream and libvirt sparse image (written by
    QEMU itself at the libvirt offset), with its memory as QEMU restored it."""
    return qemu_images.build_linux_libvirt()


@pytest.mark.qemu
@pytest.mark.parametrize("which", ["raw", "sequential"])
def test_converted_linux_guest_restores_to_ground_truth(which, linux, conversions, tmp_path):
    src = linux.raw if which == "raw" else linux.guest.sequential
    out = conversions.get(f"linux-{which}", src)
    assert_restores_to(out, linux.guest.machine_args(), linux.pmemsave, tmp_path / "linux.bin")


@pytest.mark.qemu
def test_converted_linux_raw_equals_qemus_sparse(linux, conversions):
    """ramfs's conversion of the libvirt raw image equals the libvirt sparse image QEMU
    wrote of the same guest (same layout, same pages), and carries the device state over."""
    out = conversions.get("linux-raw", linux.raw)
    compare_with_qemu_mapped_ram(out, linux.sparse)
    assert_device_state_copied(out, linux.raw)


# ---------------------------------------------------- 3. images made by QEMU at test time

@pytest.mark.qemu
def test_generated_image_restores_to_ground_truth(generated, conversions, tmp_path):
    name, images = generated
    out = conversions.get(name, images.sequential)
    assert_restores_to(out, images.recipe, images.pmemsave, tmp_path / "dump.bin")


@pytest.mark.qemu
def test_generated_image_restores_with_multifd(large_pc, conversions, tmp_path):
    out = conversions.get("LARGE_PC", large_pc.sequential)
    assert_restores_to(out, LARGE_PC, large_pc.pmemsave, tmp_path / "dump.bin",
                       capabilities=MAPPED_RAM_MULTIFD, multifd_channels=4)


@pytest.mark.qemu
def test_generated_image_equals_qemus_own_mapped_ram(generated, conversions):
    name, images = generated
    out = conversions.get(name, images.sequential)
    compare_with_qemu_mapped_ram(out, images.mapped_ram)
    assert_device_state_copied(out, images.sequential)


@pytest.mark.qemu
def test_oracle_catches_a_lost_page(conversions, tmp_path):
    """The restore check is not vacuous: clear one populated bit in a converted image's
    bitmap and QEMU's RAM no longer equals the ground truth."""
    images = qemu_images.build(SMALL_PC)
    damaged = sparse_copy(conversions.get("SMALL_PC", images.sequential), tmp_path / "damaged.img")
    with open_image(damaged, reads=False, use_cache=False) as img:
        bitmap = img.layout.blocks[0].mapped.bitmap_offset
        assert img.layout.blocks[0].idstr == "pc.ram"
    page = SMALL_PC.blobs[0].addr // 4096
    with open(damaged, "r+b") as f:
        f.seek(bitmap + page // 8)
        byte = f.read(1)[0]
        assert byte & (1 << page % 8)
        f.seek(bitmap + page // 8)
        f.write(bytes([byte & ~(1 << page % 8)]))
    with pytest.raises(AssertionError, match="QEMU restored damaged.img with different RAM"):
        assert_restores_to(damaged, SMALL_PC, images.pmemsave, tmp_path / "dump.bin")


# ------------------------------------------------------------ later records win (QEMU decides)

PAGE_FLAG_ZERO, PAGE_FLAG_PAGE, PAGE_FLAG_CONTINUE, PAGE_FLAG_EOS = 0x02, 0x08, 0x20, 0x10


def _page_of(tag: str) -> bytes:
    return (f"RAMFS-SPLICED-{tag}-".encode() * 300)[:4096]


def _records(ops: list[tuple[int, bytes | None]], block: bytes = b"pc.ram") -> bytes:
    """Sequential page records (``None``: ZERO record); the first names the block."""
    out = bytearray()
    for i, (addr, data) in enumerate(ops):
        flags = PAGE_FLAG_ZERO if data is None else PAGE_FLAG_PAGE
        if i:
            out += struct.pack(">Q", addr | flags | PAGE_FLAG_CONTINUE)
        else:
            out += struct.pack(">Q", addr | flags) + bytes([len(block)]) + block
        out += b"\0" if data is None else data
    return bytes(out)


def _splice_before_ram_end_eos(src: Path, dst: Path, records: bytes) -> None:
    """Insert raw page records just before the EOS that closes the RAM END section."""
    with open_image(src, reads=False, use_cache=False) as img:
        lay = img.layout
    eos = lay.ram_end_offset - (5 if lay.footers else 0) - 8
    data = src.read_bytes()
    assert data[eos:eos + 8] == struct.pack(">Q", PAGE_FLAG_EOS)
    dst.write_bytes(data[:eos] + records + data[eos:])


@pytest.mark.qemu
def test_later_page_records_win_like_in_qemu(tmp_path, cache_dir):
    """A stream where pages come more than once (QEMU resends pages dirtied during a live
    save): data then ZERO, zero then data, data twice, data-ZERO-data, PAGE-ZERO on a zero
    page. QEMU loading the stream itself is the oracle."""
    images = qemu_images.build(SMALL_PC)
    truth = images.pmemsave.read_bytes()
    rnd = SMALL_PC.blobs[0].addr  # 1 MiB of random data
    pat = SMALL_PC.blobs[1].addr  # 64 KiB of pattern pages
    zero_a, zero_b = 8 * MIB, 10 * MIB + 3 * 4096
    for addr in (zero_a, zero_b):
        assert truth[addr:addr + 4096] == bytes(4096)
    ops = [
        (rnd, None),                                    # data -> zero (slot must become a hole)
        (rnd + 2 * 4096, _page_of("C")),                # data -> other data
        (zero_a, _page_of("B")),                        # zero -> data
        (zero_b, _page_of("D")), (zero_b, None),        # zero -> data -> zero
        (pat, _page_of("E1")), (pat, _page_of("E2")),   # data -> data -> data
        (rnd + 20 * 4096, None), (rnd + 20 * 4096, _page_of("F")),  # data -> zero -> data
    ]
    expected = bytearray(truth)
    for addr, data in ops:
        expected[addr:addr + 4096] = bytes(4096) if data is None else data
    spliced = tmp_path / "spliced.img"
    _splice_before_ram_end_eos(images.sequential, spliced, _records(ops))
    (tmp_path / "expected.bin").write_bytes(expected)

    # QEMU applies the records as described (so the expectation is QEMU's, not ours) ...
    assert_restores_to(spliced, SMALL_PC, tmp_path / "expected.bin", tmp_path / "src.bin", capabilities=())
    # ... and the converted image restores to the same RAM.
    out = tmp_path / "spliced-sparse.img"
    assert_ok(cli_convert(spliced, out, cache_dir=cache_dir), out)
    assert_restores_to(out, SMALL_PC, tmp_path / "expected.bin", tmp_path / "conv.bin")
    # Pages that ended up zero are holes with their bit clear, not zero-filled slots.
    with open_image(out, reads=False, use_cache=False) as img:
        blk = img.layout.blocks[0]
        bitmap_at, pages_at = blk.mapped.bitmap_offset, blk.mapped.pages_offset
    with open(out, "rb") as f:
        f.seek(bitmap_at)
        bitmap = f.read(blk.used_length // 4096 // 8)
        for addr in (rnd, zero_b):
            page = addr // 4096
            assert not bitmap[page // 8] & (1 << page % 8), f"bit of zero page {addr:#x} is set"
        for addr in (rnd + 2 * 4096, zero_a, pat, rnd + 20 * 4096):
            page = addr // 4096
            assert bitmap[page // 8] & (1 << page % 8), f"bit of data page {addr:#x} is clear"
        # A clear bit's slot may legally hold stale data for QEMU, but the converter promises holes.
        f.seek(pages_at + rnd)
        assert f.read(4096) == bytes(4096)
    for options in (("--jobs", "4"), ("--jobs", "3")):
        again = tmp_path / ("again-" + options[1] + ".img")
        assert_ok(cli_convert(spliced, again, *options, cache_dir=cache_dir), again)
        assert files_identical(again, out), f"{options} differs from --jobs 1"


@pytest.mark.qemu
def test_live_saved_stream_restores_like_its_source(tmp_path, cache_dir):
    """A real QEMU live save (guest running, so dirtied pages are sent again)."""
    src = qemu_images.save_running_guest(SMALL_PC, tmp_path / "live.img")
    from ramfs.format.qemu import parse_stream
    from ramfs.format.source import ForwardSource
    seen: dict = {}

    class Count:  # a qemu.RecordSink counting the records of each page
        def start(self, ram):
            pass

        def pages(self, block, first, count, buf, pos, stride, offset):
            self.zeros(block, first, count)

        def zeros(self, block, first, count):
            for p in range(first, first + count):
                seen[block, p] = seen.get((block, p), 0) + 1

    with open(src, "rb") as f:
        parse_stream(ForwardSource(f.read), sink=Count())
    repeated = sum(1 for n in seen.values() if n > 1)
    assert repeated, "the live save sent no page twice; the test would prove nothing"
    truth = qemu_images.restore_and_dump(src, SMALL_PC, out_path=tmp_path / "src.bin")
    out = tmp_path / "live-sparse.img"
    assert_ok(cli_convert(src, out, "--jobs", "2", cache_dir=cache_dir), out)
    assert_restores_to(out, SMALL_PC, truth, tmp_path / "conv.bin")


def _firmware_guest(machine: str, *extra: str) -> qemu_images.MachineArgs:
    """The 64 MiB firmware guest of qemu_images, with migration-relevant options added."""
    return qemu_images.MachineArgs(args=(
        "-accel", "kvm", "-accel", "tcg", "-cpu", "qemu64,kvmclock=off", "-machine", machine,
        "-m", "64M", "-smp", "1", "-nodefaults", "-no-user-config", "-display", "none", *extra),
        ram_bytes=64 * MIB)


@pytest.mark.qemu
@pytest.mark.parametrize("guest", [
    # QEMU writes no VM description (QEMU_VM_VMDESCRIPTION) after the device state; QEMU
    # restores such a stream, so the converter must handle it.
    pytest.param(_firmware_guest("pc,suppress-vmdesc=on"), id="suppress-vmdesc"),
    # No section footers (QEMU 2.3-era stream shape); the restoring QEMU must agree.
    pytest.param(_firmware_guest("pc", "-global", "migration.send-section-footer=off"), id="no-section-footers"),
])
def test_other_stream_shapes_qemu_writes(guest, tmp_path, cache_dir):
    src = qemu_images.save_stopped_guest(guest, tmp_path / "src.img", tmp_path / "truth.bin")
    out = tmp_path / "converted.img"
    assert_ok(cli_convert(src, out, cache_dir=cache_dir), out)
    assert_restores_to(out, guest, tmp_path / "truth.bin", tmp_path / "dump.bin")


@pytest.mark.qemu
def test_version1_libvirt_header_is_refused_or_converted_correctly(tmp_path, cache_dir):
    """Version 1 headers (very old libvirt) have no format field and no cookie. Converting one
    must either fail cleanly or give a version 2 sparse image that restores."""
    src = sparse_copy(fixture_path("libvirt/fw-pc-raw.img"), tmp_path / "v1.img")
    patch(src, 16, struct.pack("<I", 1))
    patch(src, 28, struct.pack("<II", 0, 0))
    out = tmp_path / "v1-sparse.img"
    proc = cli_convert(src, out, cache_dir=cache_dir)
    if proc.returncode != 0:
        assert_clean_failure(proc)
        assert _names(tmp_path) == ["v1.img"]
        return
    h = libvirt_header(out)
    assert (h["magic"], h["version"], h["format"]) == (SAVE_MAGIC, 2, SPARSE_FORMAT)
    assert_restores_to(out, SMALL_PC, fixture_path("libvirt/fw-pc-pmemsave.bin"), tmp_path / "dump.bin")


@pytest.mark.parametrize("name", ["firmware/pc-mapped-ram.img", "libvirt/fw-pc-sparse.img"])
def test_mapped_ram_input_is_stored_as_it_is(name, tmp_path, cache_dir):
    src = fixture_path(name)
    out = tmp_path / "copy.img"
    assert_ok(cli_convert(src, out, cache_dir=cache_dir), out)
    assert files_identical(out, src)
    assert out.stat().st_blocks * 512 < 4 * MIB, "holes were filled"


# ------------------------------------------------------ 4. --jobs and --direct-io: same bytes

@pytest.mark.parametrize("options", [("--jobs", "4"), ("--direct-io",), ("--jobs", "4", "--direct-io")],
                         ids=["jobs4", "direct-io", "jobs4-direct-io"])
@pytest.mark.parametrize("source", [pytest.param("LARGE_PC", marks=pytest.mark.qemu), "libvirt/fw-pc-xz.img"])
def test_jobs_and_direct_io_give_identical_output(source, options, conversions, disk_dir, request):
    if source == "LARGE_PC":
        src = request.getfixturevalue("large_pc").sequential
        baseline = conversions.get("LARGE_PC", src)
    else:
        src = fixture_path(source)
        baseline = conversions.fixture(source)
    out = disk_dir / "out.img"
    assert_ok(cli_convert(src, out, *options, cache_dir=conversions.cache), out)
    assert files_identical(out, baseline), f"{' '.join(options)} output differs from --jobs 1"
    # Zero pages stay holes whichever way the pages were written.
    assert out.stat().st_blocks * 512 <= baseline.stat().st_blocks * 512 + 4 * MIB
    assert sorted(os.listdir(disk_dir)) == ["out.img"]


# ------------------------------------------------------ 5. ramfs reads the same blocks back

@pytest.mark.parametrize("name", SEQUENTIAL)
def test_converted_fixture_has_the_source_blocks(name, conversions):
    out = conversions.fixture(name)
    assert block_digests(out) == block_digests(fixture_path(name))
    with open_image(out) as img, open_image(fixture_path(name)) as src:
        assert img.encoding == "mapped-ram"
        assert img.container == src.container
        assert img.layout.machine == src.layout.machine
        assert img.domain_xml == src.domain_xml
        assert img.cookie_xml == src.cookie_xml
        assert not img.warnings


@pytest.mark.qemu
def test_converted_large_image_has_the_source_blocks(large_pc, conversions):
    out = conversions.get("LARGE_PC", large_pc.sequential)
    assert block_digests(out) == block_digests(large_pc.sequential)


# ------------------------------------------------------------------------ 6. failures

def _names(directory: Path) -> list[str]:
    return sorted(os.listdir(directory))


def _truncated(tmp_path: Path, name: str, fraction: float) -> Path:
    src = fixture_path(name)
    out = tmp_path / ("cut-" + Path(name).name)
    with open(src, "rb") as f:
        out.write_bytes(f.read(int(src.stat().st_size * fraction)))
    return out


def test_garbage_input_fails_cleanly(tmp_path, cache_dir):
    src = tmp_path / "garbage.bin"
    src.write_bytes(os.urandom(256 * 1024))
    dst_dir = tmp_path / "out"
    dst_dir.mkdir()
    line = assert_clean_failure(cli_convert(src, dst_dir / "x.img", cache_dir=cache_dir))
    assert "not a save image" in line
    assert _names(dst_dir) == []


@pytest.mark.parametrize("name", ["firmware/pc-sequential.img", "libvirt/fw-pc-raw.img", "libvirt/fw-pc-xz.img"])
def test_truncated_image_fails_cleanly(name, tmp_path, cache_dir):
    """Cut in the middle of the page records (half of the file: inside pc.ram's pages)."""
    src = _truncated(tmp_path, name, 0.5)
    dst_dir = tmp_path / "out"
    dst_dir.mkdir()
    assert_clean_failure(cli_convert(src, dst_dir / "x.img", cache_dir=cache_dir))
    assert _names(dst_dir) == []


def test_truncated_image_fails_cleanly_with_jobs(tmp_path, cache_dir):
    src = _truncated(tmp_path, "libvirt/fw-pc-raw.img", 0.8)
    dst_dir = tmp_path / "out"
    dst_dir.mkdir()
    assert_clean_failure(cli_convert(src, dst_dir / "x.img", "--jobs", "4", cache_dir=cache_dir))
    assert _names(dst_dir) == []


def test_existing_destination_is_not_touched(tmp_path, cache_dir):
    dst = tmp_path / "exists.img"
    dst.write_bytes(b"precious\n")
    before = dst.stat()
    names = _names(tmp_path)
    line = assert_clean_failure(cli_convert(fixture_path("firmware/pc-sequential.img"), dst, cache_dir=cache_dir))
    assert "exists" in line
    after = dst.stat()
    assert dst.read_bytes() == b"precious\n"
    assert (after.st_ino, after.st_size, after.st_mtime_ns) == (before.st_ino, before.st_size, before.st_mtime_ns)
    assert _names(tmp_path) == names


def test_existing_destination_symlink_is_not_followed(tmp_path, cache_dir):
    target = tmp_path / "target"
    (tmp_path / "link.img").symlink_to(target)  # dangling: still "exists"
    assert_clean_failure(cli_convert(fixture_path("firmware/pc-sequential.img"), tmp_path / "link.img",
                                     cache_dir=cache_dir))
    assert not target.exists()
    assert _names(tmp_path) == ["link.img"]


def test_part_magic_source_fails_cleanly(tmp_path, cache_dir):
    src = sparse_copy(fixture_path("libvirt/fw-pc-raw.img"), tmp_path / "part.img")
    patch(src, 0, PART_MAGIC)
    dst_dir = tmp_path / "out"
    dst_dir.mkdir()
    line = assert_clean_failure(cli_convert(src, dst_dir / "x.img", cache_dir=cache_dir))
    assert "LibvirtQemudPart" in line or "incomplete" in line
    assert _names(dst_dir) == []


@pytest.mark.parametrize("options", [(), ("--jobs", "4"), ("--direct-io",)], ids=["jobs1", "jobs4", "direct-io"])
def test_disk_full_fails_cleanly(options, cache_dir):
    """The 64 MiB firmware guest has about 1.6 MiB of non-zero pages: more than a 1 MiB tmpfs.
    (It fits in 2 MiB: a 2 MiB tmpfs is used for the 512 MiB guest below.)"""
    with small_tmpfs("1m") as d:
        proc = cli_convert(fixture_path("libvirt/fw-pc-zstd.img"), d / "x.img", *options, cache_dir=cache_dir)
        line = assert_clean_failure(proc)
        assert "No space left on device" in line
        assert _names(d) == []
        st = os.statvfs(d)
        assert st.f_bfree == st.f_blocks, "space still allocated after the failure"


def test_disk_full_at_the_end_fails_cleanly(cache_dir):
    """Space runs out at the very last allocations (device state, bitmaps, header), after
    every page was written: the error path of the final steps."""
    src = fixture_path("libvirt/fw-pc-raw.img")
    with small_tmpfs("64m") as d:
        assert_ok(cli_convert(src, d / "probe.img", cache_dir=cache_dir), d / "probe.img")
        need = (d / "probe.img").stat().st_blocks * 512
    for short in (4096, 8192, 64 * 1024):
        with small_tmpfs(f"{(need - short) // 1024}k") as d:
            line = assert_clean_failure(cli_convert(src, d / "x.img", cache_dir=cache_dir))
            assert "No space left on device" in line, (short, line)
            assert _names(d) == [], short
            st = os.statvfs(d)
            assert st.f_bfree == st.f_blocks, short


@pytest.mark.qemu
@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_interrupted_conversion_leaves_nothing(signum, large_pc, disk_dir, cache_dir):
    """Ctrl-C, or SIGTERM from ``timeout``/systemd/a job runner, in the middle of a conversion:
    the partly written temporary file (as large as the output) must not stay behind."""
    env = dict(os.environ, RAMFS_CACHE_DIR=str(cache_dir))
    proc = subprocess.Popen([sys.executable, "-m", "ramfs.cli", "convert", os.fspath(large_pc.sequential),
                             os.fspath(disk_dir / "x.img")], cwd=REPO, env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        deadline = time.monotonic() + 30
        while not _names(disk_dir) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.002)
        time.sleep(0.05)  # well inside the pages (the whole conversion takes about a second)
        assert proc.poll() is None, "the conversion ended before it could be interrupted"
        proc.send_signal(signum)
        rc = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc != 0
    assert "Traceback" not in proc.stderr.read()
    assert _names(disk_dir) == [], f"left behind after {signal.Signals(signum).name}: {_names(disk_dir)}"


@pytest.mark.qemu
def test_disk_full_fails_cleanly_large(large_pc, cache_dir):
    with small_tmpfs("2m") as d:
        line = assert_clean_failure(cli_convert(large_pc.sequential, d / "x.img", "--jobs", "4", cache_dir=cache_dir))
        assert "No space left on device" in line
        assert _names(d) == []
