"""Hostile RAM block names through a real mount: every name stays inside ram/ and maps/,
reads back to its idstr by the documented rule, and its pages are where they should be."""

from __future__ import annotations

import os
import struct
from pathlib import Path

from fixture_data import fixture_path
from mountutil import mounted
from ramfs.format import encode
from ramfs.format.qemu import MigCmd, SectionType
from ramfs.fs.names import unescape
from ramfs.image import open_image

PS = 4096
EVIL = ["..", ".", "../../../../etc/x", "/", "a//b/", "line\nbreak", "%2E%2E", "%" * 200,
        "x" * 255, "/" + "y" * 254, "tab\there", "ok/../../up", "é/ü"]


def build_stream(names: list[str]) -> bytes:
    """A QEMU stream (as QEMU 10 frames it) with one page of data per block, named ``names``."""
    out = bytearray(encode.file_header())
    machine = b"pc-i440fx-10.0"
    out += bytes([SectionType.CONFIGURATION]) + struct.pack(">I", len(machine)) + machine
    sid = 1
    out += encode.section_start(sid) + encode.mem_size(len(names) * 2 * PS)
    for n in names:
        out += encode.block_record(n, 2 * PS)
    out += encode.eos() + encode.footer(sid)
    out += encode.section_part_end(SectionType.SECTION_PART, sid)
    for i, n in enumerate(names):
        raw = n.encode()
        out += struct.pack(">Q", PS | 0x08) + bytes([len(raw)]) + raw + bytes([i + 1]) * PS
    out += encode.eos() + encode.footer(sid)
    out += encode.command(MigCmd.SWITCHOVER_START)
    out += encode.section_part_end(SectionType.SECTION_END, sid) + encode.eos() + encode.footer(sid)
    return bytes(out + b"\x00")  # QEMU_VM_EOF, no VM description


def walk_files(root: Path) -> dict[str, Path]:
    out = {}
    for dirpath, _, files in os.walk(root):
        for f in files:
            p = Path(dirpath) / f
            rel = p.relative_to(root)
            out[unescape([os.fsencode(c) for c in rel.parts], True)] = p
    return out


def test_hostile_block_names(tmp_path):
    img = tmp_path / "evil.save"
    img.write_bytes(build_stream(EVIL))
    with open_image(img) as opened:
        assert [b.idstr for b in opened.blocks] == EVIL
    mp = tmp_path / "mp"
    outside_before = set(os.listdir(tmp_path))
    with mounted(img, mp):
        files = walk_files(mp / "ram")
        # Every idstr is found, by the reversible rule (leading "/" may or may not have been there).
        for i, name in enumerate(EVIL):
            key = name if name.startswith("/") else "/" + name
            path = files.get(key) or files.get(name)
            assert path is not None, (name, sorted(files))
            assert str(path.resolve()).startswith(str(mp / "ram"))
            data = path.read_bytes()
            assert len(data) == 2 * PS and data[:PS] == bytes(PS) and data[PS:] == bytes([i + 1]) * PS
        maps = {k: v for k, v in walk_files(mp / "maps").items()
                if v.relative_to(mp / "maps").parts[0] != "@phys"}  # the guest-physical map
        assert len(maps) == len(files) == len(EVIL)
        for comp in (p for p in mp.rglob("*")):
            assert len(os.fsencode(comp.name)) <= 255 and comp.name not in (".", "..")
    assert set(os.listdir(tmp_path)) - outside_before <= {"mp", "mp.log"}
    assert os.listdir(mp) == []  # nothing was written through or beside the mount


def test_names_from_a_real_image_are_plain(tmp_path):
    mp = tmp_path / "mp"
    with mounted(fixture_path("firmware/q35-mapped-ram.img"), mp):
        assert sorted(str(p.relative_to(mp / "ram")) for p in (mp / "ram").rglob("*") if p.is_file()) == [
            "pc.bios", "pc.ram", "pc.rom", "rom@etc/acpi/rsdp", "rom@etc/acpi/tables", "rom@etc/table-loader"]
