"""Streams followed by zeros: a save written to a block device or a preallocated volume
(``migrate "exec:dd of=/dev/vg/lv"``, Proxmox VE's vmstate volumes) ends well before the
device does. QEMU loads such a stream; ramfs reads, checks and converts it, and says how many
bytes follow it. Anything but zeros after the stream stays an error.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

import qemu_images as qi
from ramfs.format.qemu import parse_stream_with_tail
from ramfs.format.source import ForwardSource
from ramfs.image import open_image

pytestmark = pytest.mark.qemu

MiB = 1 << 20


def _ramfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, text=True, timeout=300)


def _padded(src: Path, dst: Path, zeros: int) -> Path:
    """``src`` at the start of a zero-filled file ``zeros`` bytes longer, the way ``dd`` leaves
    a stream on a fresh volume: the first MiB of zeros written, the rest a hole."""
    with open(src, "rb") as f, open(dst, "wb") as out:
        while data := f.read(4 * MiB):
            out.write(data)
        out.write(bytes(min(zeros, MiB)))
        out.truncate(os.path.getsize(src) + zeros)
    return dst


@pytest.fixture(scope="module")
def guest():
    return qi.build(qi.SMALL_PC)


@pytest.mark.parametrize("kind", ["sequential", "mapped_ram"])
def test_a_padded_stream_checks_reads_and_says_how_much_follows(guest, tmp_path, kind):
    src = getattr(guest, kind)
    zeros = 24 * MiB + 123
    path = _padded(src, tmp_path / "on-a-volume.save", zeros)
    r = _ramfs("check", str(path))
    assert r.returncode == 0, r.stdout + r.stderr
    facts = json.loads(_ramfs("info", "--json", str(path)).stdout)
    assert facts["stream"]["padding"] == zeros
    assert facts["stream"]["end_offset"] == os.path.getsize(src)
    assert facts["warnings"] == []
    assert f"{zeros} bytes of zeros" in _ramfs("info", str(path)).stdout
    with open_image(path, use_cache=False) as img, open_image(src, use_cache=False) as orig:
        assert img.layout.vmdesc == orig.layout.vmdesc
        assert bytes(img.read("pc.ram", 0, guest.ram_bytes)) == guest.pmemsave.read_bytes()


def test_a_padded_stream_converts_to_an_image_qemu_restores(guest, tmp_path):
    path = _padded(guest.sequential, tmp_path / "on-a-volume.save", 8 * MiB)
    # QEMU itself loads the padded stream (the premise) ...
    qi.restore_and_dump(path, guest.recipe, out_path=tmp_path / "direct.bin")
    assert (tmp_path / "direct.bin").read_bytes() == guest.pmemsave.read_bytes()
    # ... and the conversion, which leaves the padding behind.
    out = tmp_path / "converted.save"
    r = _ramfs("convert", "-q", str(path), str(out))
    assert r.returncode == 0, r.stderr
    qi.restore_and_dump(out, guest.recipe, capabilities=("mapped-ram",), out_path=tmp_path / "restored.bin")
    assert (tmp_path / "restored.bin").read_bytes() == guest.pmemsave.read_bytes()
    # From a decompressor (no size known), the zeros are counted as they stream by.
    with open(path, "rb") as f, open(guest.sequential, "rb") as g:
        layout, tail = parse_stream_with_tail(ForwardSource(f.read), 0, None)
        plain, plain_tail = parse_stream_with_tail(ForwardSource(g.read), 0, None)
    assert layout.padding == 8 * MiB and plain.padding == 0
    assert (layout.end, layout.vmdesc_offset, layout.vmdesc) == (plain.end, plain.vmdesc_offset, plain.vmdesc)
    assert tail == plain_tail and tail is not None


def test_a_padded_stream_exports_without_the_padding(guest, tmp_path):
    path = _padded(guest.mapped_ram, tmp_path / "on-a-volume.save", 4 * MiB)
    out = tmp_path / "seq.save"
    r = _ramfs("export", "-q", str(path), str(out))
    assert r.returncode == 0, r.stderr
    with open_image(out, use_cache=False) as img:
        assert img.layout.padding == 0
        assert bytes(img.read("pc.ram", 0, guest.ram_bytes)) == guest.pmemsave.read_bytes()


@pytest.mark.parametrize("where", ["last byte", "first byte after the stream", "mid-padding"])
def test_anything_but_zeros_after_the_stream_stays_an_error(guest, tmp_path, where):
    size = os.path.getsize(guest.sequential)
    path = _padded(guest.sequential, tmp_path / "dirty.save", 8 * MiB)
    at = {"last byte": size + 8 * MiB - 1, "first byte after the stream": size,
          "mid-padding": size + 3 * MiB}[where]
    with open(path, "r+b") as f:
        f.seek(at)
        f.write(b"\x01")
    r = _ramfs("check", str(path))
    assert r.returncode == 1, r.stdout
    assert "end of the device state could not be located" in r.stdout + r.stderr


@pytest.mark.parametrize("zeros", [0, 3, 5 * MiB])
def test_a_stream_without_a_description_keeps_its_own_zeros(zeros):
    """No vmdesc: the stream ends at its EOF byte (a zero). From a decompressor, the device
    state handed on still holds it, and zeros after it are not taken for device state."""
    from streams import PS, sequential_stream

    data = sequential_stream([(0, 0, b"\x01" * PS)], [("pc.ram", 4 * PS)])
    padded = data + bytes(zeros)
    chunks = iter([padded[i:i + 4096] for i in range(0, len(padded), 4096)])
    layout, tail = parse_stream_with_tail(ForwardSource(lambda n: next(chunks, b"")), 0, None)
    assert layout.eof_offset == len(data) - 1 and layout.vmdesc is None
    assert (layout.end, layout.padding) == (len(data), zeros)
    assert tail == data[layout.device_offset:] == b"\x00"
