"""NUMA guests and DIMMs in phys/ and core.elf, against QEMU's own dump-guest-memory.

Guests with one memory backend per NUMA node (what libvirt makes of ``<numa>`` cells, and of
every domain with ``<maxMemory slots=...>``) and with cold- and hot-plugged DIMMs, made by
real QEMU (firmware only, KVM when there is one), with marker pages written by the loader
into each node (both sides of the split below 4 GiB) and into the cold DIMM. QEMU's dump of
the paused guest is the truth: every PT_LOAD (address, size, bytes) of ``core.elf`` and every
RAM range of ``phys/memory`` must equal it. The saves are wrapped in a libvirt header with a
domain XML as libvirt 11.3 writes it for such a domain (cells, DIMM slots and bases); the bare
streams, which record no node order, must place nothing they cannot know and say so.
"""

from __future__ import annotations

import json
import random
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

import qemu_images as qi
from mountutil import mounted
from ramfs.convert import convert_file
from ramfs.image import open_image
from ramfs.views.elfcore import ElfCore, cpus_of
from ramfs.image.phys import FOUR_GIB, Placement
from ramfs.views.phys import PhysView
from test_phys import elf_loads

MiB = 1 << 20
GiB = 1 << 30
pytestmark = pytest.mark.qemu


@dataclass(frozen=True)
class Guest:
    name: str
    machine: str
    nodes: tuple[int, ...]  # MiB per node (backends ram-node0, ram-node1, ...)
    markers: tuple[int, ...]  # guest-physical addresses of 64 KiB marker blobs
    cold_dimm: tuple[int, int] | None = None  # (MiB, addr)
    hot_dimm: int | None = None  # MiB, plugged while the guest runs

    @property
    def ram_mib(self) -> int:
        return sum(self.nodes)


GUESTS = [
    # q35, 3 GiB: the split is at 2 GiB, so node 1 crosses it (part of it above 4 GiB).
    Guest("q35-2node", "q35", (1536, 1536), (0x1000000, 0x70000000, 0x7ff00000, FOUR_GIB + 0x100000,
                                              FOUR_GIB + GiB - 0x100000)),
    # pc, node 1 the larger: the largest block is not the one at address 0.
    Guest("pc-uneven", "pc", (256, 768), (0x1000000, 0x10000000 + 0x100000, 0x3e000000)),
    # A memory-hotplug guest as libvirt makes it: one cell (ram-node0), a cold DIMM at 4 GiB
    # and one plugged while running (its address chosen by QEMU, recorded by libvirt).
    Guest("q35-dimms", "q35", (1024,), (0x1000000, FOUR_GIB + 0x200000), cold_dimm=(512, FOUR_GIB), hot_dimm=256),
]


def _args(g: Guest, blobs: list[tuple[int, Path]] = ()) -> qi.MachineArgs:
    args = ["-accel", "kvm", "-accel", "tcg", "-machine", g.machine, "-cpu", "qemu64,kvmclock=off",
            "-nodefaults", "-no-user-config", "-display", "none", "-smp", str(len(g.nodes))]
    if g.cold_dimm or g.hot_dimm:
        args += ["-m", f"{g.ram_mib}M,slots=4,maxmem={g.ram_mib + 2048}M"]
    else:
        args += ["-m", f"{g.ram_mib}M"]
    for i, mib in enumerate(g.nodes):
        args += ["-object", f"memory-backend-ram,id=ram-node{i},size={mib}M",
                 "-numa", f"node,nodeid={i},cpus={i},memdev=ram-node{i}"]
    if g.cold_dimm:
        mib, addr = g.cold_dimm
        args += ["-object", f"memory-backend-ram,id=memdimm0,size={mib}M",
                 "-device", f"pc-dimm,id=dimm0,memdev=memdimm0,slot=0,addr={addr:#x}"]
    for addr, path in blobs:
        args += ["-device", f"loader,file={path},addr={addr:#x},force-raw=on"]
    return qi.MachineArgs(tuple(args), g.ram_mib * MiB)


def _domain_xml(g: Guest, dimms: list[tuple[int, int, int]]) -> str:
    """What libvirt 11.3 writes into a save image for such a domain (the parts that matter
    here: the cells and the memory devices with their slots and bases)."""
    cells = "".join(f"<cell id='{i}' cpus='{i}' memory='{mib * 1024}' unit='KiB'/>" for i, mib in enumerate(g.nodes))
    mems = "".join(f"<memory model='dimm'><target><size unit='KiB'>{mib * 1024}</size><node>0</node></target>"
                   f"<address type='dimm' slot='{slot}' base='{base:#x}'/></memory>" for slot, mib, base in dimms)
    maxmem = f"<maxMemory slots='4' unit='KiB'>{(g.ram_mib + 2048) * 1024}</maxMemory>" if dimms else ""
    total = g.ram_mib + sum(m for _, m, _ in dimms)
    return (f"<domain type='kvm'><name>ramfs-test-{g.name}</name>{maxmem}<memory unit='KiB'>{total * 1024}</memory>"
            f"<vcpu placement='static'>{len(g.nodes)}</vcpu>"
            f"<os><type arch='x86_64' machine='{g.machine}'>hvm</type></os>"
            f"<cpu mode='custom' match='exact' check='none'><model fallback='forbid'>qemu64</model>"
            f"<numa>{cells}</numa></cpu>"
            f"<devices><emulator>/usr/bin/qemu-system-x86_64</emulator>{mems}</devices></domain>\n")


def _libvirt_wrap(stream: Path, xml: str, out: Path) -> None:
    """A libvirt raw (format 0) save image around a bare stream, as libvirt writes it."""
    with open(out, "wb") as f, open(stream, "rb") as src:
        f.write(qi.libvirt_save_header(xml, qi.LIBVIRT_FORMAT_RAW, cookie=None))
        while chunk := src.read(16 * MiB):
            f.write(chunk)


@dataclass
class Saved:
    guest: Guest
    dump: Path  # QEMU's dump-guest-memory of the paused guest: the truth
    bare: Path  # the sequential stream, as QEMU wrote it
    libvirt: Path  # the same in a libvirt raw image with the domain XML
    sparse: Path  # ramfs convert of that: libvirt sparse (mapped-ram)
    dimms: list[tuple[int, int, int]]  # (slot, MiB, base) as QEMU placed them

    @property
    def devices(self) -> dict[str, int]:
        return {f"memdimm{slot}": base for slot, _, base in self.dimms}


@pytest.fixture(scope="module", params=GUESTS, ids=lambda g: g.name)
def saved(request, tmp_path_factory):
    g: Guest = request.param
    d = tmp_path_factory.mktemp(g.name)
    blobs = []
    for i, addr in enumerate(g.markers):
        p = d / f"marker-{i}.bin"
        p.write_bytes(random.Random(addr).randbytes(64 * 1024))
        blobs.append((addr, p))
    dump, bare = d / "qemu.elf", d / "bare.img"
    with qi._scratch_dir() as scratch, qi._start(_args(g, blobs), scratch, "guest") as q:
        time.sleep(0.5)  # SeaBIOS runs
        if g.hot_dimm:
            q.qmp.execute("object-add", {"qom-type": "memory-backend-ram", "id": "memdimm1",
                                         "size": g.hot_dimm * MiB})
            q.qmp.execute("device_add", {"driver": "pc-dimm", "id": "dimm1", "memdev": "memdimm1", "slot": 1})
        q.qmp.execute("stop")
        dimms = [(m["data"]["slot"], m["data"]["size"] // MiB, m["data"]["addr"])
                 for m in q.qmp.execute("query-memory-devices") if m["type"] == "dimm"]
        q.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
        q.save(bare)
    lv, sparse = d / "libvirt.img", d / "sparse.img"
    _libvirt_wrap(bare, _domain_xml(g, sorted(dimms)), lv)
    convert_file(str(lv), str(sparse))
    yield Saved(g, dump, bare, lv, sparse, sorted(dimms))
    dump.unlink(missing_ok=True)  # as big as the guest's RAM


def _assert_equals_qemu(s: Saved, image: Path, placement: Placement | None = None) -> None:
    placement = placement if placement is not None else Placement()
    with open(s.dump, "rb") as f:
        head = f.read(1 << 20)
    theirs = elf_loads(head)
    with open_image(image, use_cache=False) as img, open(s.dump, "rb") as dump:
        pmap = placement.map(img)
        assert pmap.warnings == ()
        view = PhysView(img, pmap)
        core = ElfCore(view, cpus_of(img))
        ours = elf_loads(core.read(0, len(core.header)))
        assert [(p, n) for p, _, n in ours] == [(p, n) for p, _, n in theirs]
        for (paddr, off, n), (_, toff, _) in zip(ours, theirs):
            for k in range(0, n, 64 * MiB):
                m = min(64 * MiB, n - k)
                dump.seek(toff + k)
                want = dump.read(m)
                assert view.read(paddr + k, m) == want, f"phys/memory {paddr + k:#x}+{m:#x}"
                assert core.read(off + k, m) == want, f"core.elf PT_LOAD {paddr:#x} +{k:#x}"
        # Every marker is where the loader put it (so the comparison above compared data).
        for addr in s.guest.markers:
            assert view.read(addr, 64 * 1024) == random.Random(addr).randbytes(64 * 1024), hex(addr)


def test_libvirt_images_place_nodes_and_dimms_like_qemu(saved):
    """Raw and sparse libvirt images: the domain XML gives the node order and DIMM bases."""
    assert saved.guest.markers[-1] >= FOUR_GIB or saved.guest.machine == "pc"
    for image in (saved.libvirt, saved.sparse):
        _assert_equals_qemu(saved, image)


def test_bare_stream_places_nothing_it_cannot_know(saved):
    """A bare stream records no node order and no DIMM address: the backends are left out with
    the reason, info and check say so, and nothing is placed at a guessed address. Given the
    order and addresses (what the domain XML would say), it equals QEMU's dump."""
    with open_image(saved.bare, use_cache=False) as img:
        pmap = Placement().map(img)
        backends = {f"ram-node{i}" for i in range(len(saved.guest.nodes))} | set(saved.devices)
        placed = {img.blocks[r.block].idstr for r in pmap.ranges}
        if len(backends) == 1:  # one backend: its place cannot depend on an order
            assert backends <= placed
            return
        assert not placed & backends, placed
        reasons = dict(pmap.omitted)
        assert all("NUMA" in reasons[b] and "--numa" in reasons[b] for b in backends)
        assert pmap.warnings
    r = subprocess.run([sys.executable, "-m", "ramfs.cli", "check", str(saved.bare)], capture_output=True, text=True)
    assert r.returncode == 0 and "warning: guest RAM not placed" in r.stdout and r.stdout.rstrip().endswith("OK")
    info = json.loads(subprocess.run([sys.executable, "-m", "ramfs.cli", "info", "--json", str(saved.bare)],
                                     capture_output=True, text=True, check=True).stdout)
    assert any("NUMA" in w for w in info["warnings"])
    nodes = tuple(f"ram-node{i}" for i in range(len(saved.guest.nodes)))
    _assert_equals_qemu(saved, saved.bare, Placement(numa=nodes, devices=tuple(saved.devices.items())))


def test_mount_options_place_a_bare_stream(saved, tmp_path):
    """-o numa=...,device=... through a real mount: phys/memory equals QEMU's dump."""
    nodes = ":".join(f"ram-node{i}" for i in range(len(saved.guest.nodes)))
    opts = [f"numa={nodes}"] + [f"device={k}@{v:#x}" for k, v in saved.devices.items()]
    theirs = elf_loads(open(saved.dump, "rb").read(1 << 20))
    with mounted(saved.bare, tmp_path / "mp", "-o", ",".join(opts)) as _, open(saved.dump, "rb") as dump:
        facts = json.loads((tmp_path / "mp" / "image.json").read_text())
        assert facts["phys"]["warnings"] == []
        with open(tmp_path / "mp" / "phys" / "memory", "rb") as f:
            for addr in saved.guest.markers:
                (p, off, _), = [(p, o, n) for p, o, n in theirs if p <= addr < p + n]
                f.seek(addr)
                dump.seek(off + addr - p)
                assert f.read(64 * 1024) == dump.read(64 * 1024), hex(addr)
