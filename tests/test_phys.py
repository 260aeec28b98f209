"""Guest-physical memory and the ELF core, against QEMU's own view of the same guest."""

from __future__ import annotations

import random
import re
import struct

import pytest

import qemu_images as qi
from fixture_data import fixture_path
from mountutil import mounted
from ramfs.image import open_image
from ramfs.views.elfcore import ElfCore, cpus_of
from ramfs.image.phys import FOUR_GIB, below_4g_for, phys_map
from ramfs.views.phys import PhysView

MiB = 1 << 20


def qemu_ram_split(machine: str, ram_mib: int) -> tuple[int, int]:
    """(bytes of pc.ram below 4 GiB, above) from QEMU's own flat memory tree (info mtree -f)."""
    args = qi.MachineArgs(("-accel", "tcg", "-machine", machine, "-m", f"{ram_mib}M", "-nodefaults",
                           "-no-user-config", "-display", "none"), ram_mib * MiB)
    with qi._scratch_dir() as scratch, qi._start(args, scratch, "mtree", incoming=True) as q:
        text = q.qmp.hmp("info mtree -f")
    below, above = ram_mib * MiB, 0
    seen = set()  # the flat view lists each address space (memory, cpu-memory-0, ...)
    # e.g. "0000000100000000-000000011fffffff (prio 0, ram): pc.ram @00000000c0000000"
    for m in re.finditer(r"([0-9a-f]{16})-([0-9a-f]{16}) \(prio \d+, ram\): pc\.ram(?: @([0-9a-f]+))?", text):
        start, end = int(m.group(1), 16), int(m.group(2), 16) + 1
        if start >= FOUR_GIB and start not in seen:
            seen.add(start)
            above += end - start
            below = min(below, int(m.group(3) or "0", 16))
    return below, above


@pytest.mark.qemu
@pytest.mark.parametrize("machine,ram_mib", [("pc", 1024), ("pc", 3584), ("pc", 4096), ("q35", 1024),
                                             ("q35", 2816), ("q35", 4096)])
def test_ram_split_matches_qemu(machine, ram_mib):
    want_below, want_above = qemu_ram_split(machine, ram_mib)
    versioned = {"pc": "pc-i440fx-10.0", "q35": "pc-q35-10.0"}[machine]
    below = below_4g_for(versioned, ram_mib * MiB)
    assert (below, ram_mib * MiB - below) == (want_below, want_above)


@pytest.mark.parametrize("name,truth", [("firmware/pc-mapped-ram.img", "firmware/pc-pmemsave.bin"),
                                        ("firmware/q35-sequential.img", "firmware/q35-pmemsave.bin")])
def test_phys_memory_and_core_through_the_mount(name, truth, tmp_path):
    want = fixture_path(truth).read_bytes()
    bios = open("/usr/share/seabios/bios-256k.bin", "rb").read()
    mp = tmp_path / "mp"
    with mounted(fixture_path(name), mp):
        phys = mp / "phys" / "memory"
        assert phys.stat().st_size == FOUR_GIB
        with open(phys, "rb") as f:
            assert f.read(len(want)) == want
            f.seek(FOUR_GIB - len(bios))
            assert f.read() == bios
            f.seek(len(want))
            assert f.read(1 << 20) == bytes(1 << 20)  # unmapped: zeros
        ranges = [tuple(map(int, ln.split())) for ln in (mp / "maps" / "@phys" / "memory").read_text().splitlines()]
        assert ranges[-1][1] == FOUR_GIB
        core = (mp / "phys" / "core.elf").read_bytes()
    loads = elf_loads(core)
    # Whole RAM ranges (QEMU's layout): every populated range lies inside one PT_LOAD.
    assert all(any(p <= a and b <= p + n for p, _, n in loads) for a, b in ranges)
    assert sum(n for _, _, n in loads) > sum(b - a for a, b in ranges)
    for paddr, off, n in loads:
        data = core[off:off + n]
        if paddr < len(want):
            assert data == want[paddr:paddr + n]
        else:
            assert data == bios[paddr - (FOUR_GIB - len(bios)):][:n]


@pytest.mark.parametrize("name", ["firmware/pc-mapped-ram.img", "firmware/q35-sequential.img"])
def test_phys_and_core_nowait_reads_come_from_the_page_cache_only(name):
    """The mount tries phys/memory and core.elf reads on its event loop first (nowait): the
    flag reaches the image reads (an O_DIRECT source refuses every nowait read; see the
    export's test for why not an evicted file), and cached nowait reads give the same bytes."""
    import os
    import shutil
    import tempfile

    from ramfs.image.files import WouldBlock
    with tempfile.TemporaryDirectory(dir="/var/tmp") as d:  # O_DIRECT needs a disk file system
        copy = os.path.join(d, "img")
        shutil.copyfile(fixture_path(name), copy)
        with open_image(copy, use_cache=False, direct_io=True) as img:
            view = PhysView(img, phys_map(img))
            core = ElfCore(view, cpus_of(img))
            a, b = next(iter(view.populated_ranges()))
            with pytest.raises(WouldBlock):
                view.read(a, b - a, nowait=True)
            with pytest.raises(WouldBlock):
                core.read(len(core.header), 4096, nowait=True)
            assert core.read(0, 64, nowait=True) == core.read(0, 64)  # the header: no I/O
        with open_image(copy, use_cache=False) as img:
            view = PhysView(img, phys_map(img))
            core = ElfCore(view, cpus_of(img))
            rng = random.Random(name)
            for reader, size in ((view.read, view.size), (core.read, core.size)):
                for _ in range(100):
                    off, n = rng.randrange(size), rng.choice([1, 4096, 131072, 1 << 20])
                    want = reader(off, n)  # brings the bytes into the page cache
                    assert reader(off, n, nowait=True) == want, (off, n)


def elf_loads(core: bytes) -> list[tuple[int, int, int]]:
    assert core[:4] == b"\x7fELF" and core[4] == 2 and struct.unpack_from("<H", core, 16)[0] == 4
    phoff, = struct.unpack_from("<Q", core, 32)
    phnum, = struct.unpack_from("<H", core, 56)
    out = []
    for i in range(phnum):
        p_type, _, p_offset, p_vaddr, p_paddr, p_filesz, p_memsz, _ = struct.unpack_from("<IIQQQQQQ", core,
                                                                                           phoff + 56 * i)
        if p_type == 1:
            assert p_filesz == p_memsz and p_vaddr == p_paddr
            out.append((p_paddr, p_offset, p_filesz))
    return out


@pytest.mark.qemu
def test_core_matches_qemu_dump_guest_memory(tmp_path):
    """QEMU's dump-guest-memory (ELF, no paging) of the same paused guest is the ground truth."""
    g = qi.build(qi.SMALL_PC)
    dump = tmp_path / "qemu.elf"
    with qi._scratch_dir() as scratch, qi._start(qi.SMALL_PC, scratch, "dump", incoming=True) as q:
        q.load(g.sequential, (), 0)
        q.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
    theirs = dump.read_bytes()
    their_loads = elf_loads(theirs)
    with open_image(g.mapped_ram) as img:
        # The QEMU CPU-state note (registers, segments, control registers) is QEMU's own.
        ours = ElfCore(PhysView(img, phys_map(img)), cpus_of(img))
        assert elf_notes(ours.read(0, ours.size))[(b"QEMU", 0)] == elf_notes(theirs)[(b"QEMU", 0)]
        view = PhysView(img, phys_map(img))
        # Same physical ranges as QEMU's segments (QEMU dumps whole blocks, holes included).
        assert [(p, n) for p, _, n in their_loads] == [(r.gpa, r.length) for r in view.map.ranges]
        for paddr, off, n in their_loads:
            assert view.read(paddr, n) == theirs[off:off + n], hex(paddr)


def elf_notes(core: bytes) -> dict[tuple[bytes, int], bytes]:
    """``(name, type) -> desc`` of the PT_NOTE notes."""
    phoff, = struct.unpack_from("<Q", core, 32)
    phnum, = struct.unpack_from("<H", core, 56)
    out = {}
    for i in range(phnum):
        p_type, _, off, _, _, size, _, _ = struct.unpack_from("<IIQQQQQQ", core, phoff + 56 * i)
        if p_type != 4:
            continue
        pos = off
        while pos < off + size:
            namesz, descsz, ntype = struct.unpack_from("<III", core, pos)
            name = core[pos + 12:pos + 12 + namesz].rstrip(b"\0")
            dpos = pos + 12 + (namesz + 3) // 4 * 4
            out[(name, ntype)] = core[dpos:dpos + descsz]
            pos = dpos + (descsz + 3) // 4 * 4
    return out


def test_cli_phys_and_core_write_the_same_views(tmp_path):
    import subprocess
    import sys
    img = fixture_path("firmware/pc-sequential.img")
    out_phys, out_core = tmp_path / "mem", tmp_path / "core.elf"
    for cmd, out in (("phys", out_phys), ("core", out_core)):
        r = subprocess.run([sys.executable, "-m", "ramfs.cli", cmd, str(img), str(out)], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    want = fixture_path("firmware/pc-pmemsave.bin").read_bytes()
    assert out_phys.stat().st_size == FOUR_GIB
    assert out_phys.stat().st_blocks * 512 < 16 << 20  # sparse: holes stay holes
    with open(out_phys, "rb") as f:
        assert f.read(len(want)) == want
    with open_image(img) as opened:
        core = ElfCore(PhysView(opened, phys_map(opened)), cpus_of(opened))
        assert out_core.read_bytes() == core.read(0, core.size)
    r = subprocess.run([sys.executable, "-m", "ramfs.cli", "phys", str(img), str(out_phys)],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "already exists" in r.stderr
    # --below-4g moves the split: with 32 MiB below, the rest of pc.ram appears at 4 GiB.
    moved = tmp_path / "moved"
    r = subprocess.run([sys.executable, "-m", "ramfs.cli", "phys", "--below-4g", "32M", str(img), str(moved)],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    with open(moved, "rb") as f:
        f.seek(FOUR_GIB)
        assert f.read(32 << 20) == want[32 << 20:]


def _elf_head(path, size: int = 1 << 20) -> bytes:
    with open(path, "rb") as f:
        return f.read(size)  # ELF header, program headers and notes come first (QEMU and ours)




@pytest.mark.qemu
@pytest.mark.parametrize("machine,ram_mib", [("pc", 1024), ("pc", 4096), ("q35", 1024), ("q35", 4096)])
def test_phys_and_core_equal_dump_guest_memory_across_the_split(machine, ram_mib, tmp_path, request):
    """Firmware-only guests on both sides of the machine's below-4G split (pc: 3.5 GiB,
    q35: 2.75 GiB), saved sequential and mapped-ram from the same paused guest: every range
    of phys/memory equals QEMU's dump-guest-memory (ELF, no paging) byte for byte, core.elf
    has QEMU's PT_LOAD table, and the registers of both CPU notes equal QEMU's."""
    import time
    args = qi.MachineArgs(("-accel", "kvm", "-accel", "tcg", "-machine", machine, "-m", f"{ram_mib}M",
                           "-nodefaults", "-no-user-config", "-display", "none"), ram_mib * MiB)
    dump, seq, mapped = tmp_path / "qemu.elf", tmp_path / "seq.img", tmp_path / "mapped.img"
    dump2 = tmp_path / "qemu2.elf"
    # QEMU's dumps hold the whole RAM, zeros written out (up to 4.3 GB each): gone when the
    # test ends, pass or fail, or a few test runs fill the disk.
    request.addfinalizer(lambda: [p.unlink(missing_ok=True) for p in (dump, dump2)])
    with qi._scratch_dir() as scratch, qi._booted_guest(args, scratch) as g:
        time.sleep(0.5)  # SeaBIOS runs: memory and registers are not the power-on ones
        g.qmp.execute("stop")
        g.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
        g.save(seq)
    # QEMU will not migrate a guest twice ("paused due to previous migration"): a fresh one
    # restores the sequential save and writes the mapped-ram one. Its own dump is the truth
    # for that image: with KVM, loading the state re-patches a page of the option-ROM area
    # (0xe8000, kvmvapic), so the two paused guests differ there.
    with qi._scratch_dir() as scratch, qi._start(args, scratch, "again", incoming=True) as q:
        q.load(seq, (), 0)
        q.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump2}"})
        q.save(mapped, ("mapped-ram",))
    for image, truth in ((seq, dump), (mapped, dump2)):
        head = _elf_head(truth)
        their_loads = elf_loads(head)
        their_notes = elf_notes(head)
        above = [(p, n) for p, _, n in their_loads if p >= FOUR_GIB]
        assert bool(above) == (ram_mib == 4096)  # the guests straddle the split as meant
        with open_image(image) as img, open(truth, "rb") as theirs:
            view = PhysView(img, phys_map(img))
            assert [(p, n) for p, _, n in their_loads] == [(r.gpa, r.length) for r in view.map.ranges]
            for paddr, off, n in their_loads:
                for k in range(0, n, 64 * MiB):
                    m = min(64 * MiB, n - k)
                    theirs.seek(off + k)
                    same = view.read(paddr + k, m) == theirs.read(m)  # no 64 MiB diff on failure
                    assert same, f"{image.name}: guest-physical {paddr + k:#x}+{m:#x} differs from QEMU's dump"
            core = ElfCore(view, cpus_of(img))
            ours = core.read(0, min(core.size, 1 << 20))
            # PT_LOAD: QEMU's layout, whole RAM ranges, zeros included: the same table, and
            # each segment's bytes equal QEMU's (the zeros answered without I/O).
            our_loads = elf_loads(ours)
            assert [(p, n) for p, _, n in our_loads] == [(p, n) for p, _, n in their_loads]
            for (paddr, off, n), (_, toff, _) in zip(our_loads, their_loads):
                for k in range(0, n, 64 * MiB):
                    m = min(64 * MiB, n - k)
                    theirs.seek(toff + k)
                    assert core.read(off + k, m) == theirs.read(m), hex(paddr + k)
            # The file holds data only where the guest has: ramfs core leaves the rest holes.
            populated = sum(b - a for a, b in core.populated_ranges())
            assert populated < core.size // 4
            assert not core.has_data(our_loads[-1][1] + our_loads[-1][2] - 4096, 4096) or ram_mib < 4096
            notes = elf_notes(ours)
            assert notes[(b"QEMU", 0)] == their_notes[(b"QEMU", 0)]
            # NT_PRSTATUS whole: i386 layout here (SeaBIOS runs in 32-bit protected mode), as
            # QEMU writes it when the first vCPU is not in long mode (a long-mode guest gets the
            # x86_64 layout; the Linux guest's is checked against cpus.json in test_forensics).
            assert notes[(b"CORE", 1)] == their_notes[(b"CORE", 1)]
            assert ours[18:20] == head[18:20]  # e_machine: EM_386 for this guest, as QEMU's


def test_fragmented_guest_gets_a_core_with_whole_ranges_and_a_lazy_export(tmp_path):
    """A 16 GiB mapped-ram guest with a page in use every 16 (262144 populated ranges, as real
    guests have; kept from the fuzzer): core.elf has QEMU's layout (one PT_LOAD per RAM range,
    zeros included), whatever the fragmentation; the export lays out its records without walking
    the runs, and both read right."""
    import itertools

    from fuzz import harness
    from ramfs.views.export import SequentialExport
    from ramfs.views.elfcore import MAX_LOADS
    (name, case, _), = [r for r in harness.load_regressions() if r[0] == "mapped-bitmap-runs-quadratic"]
    path = tmp_path / "fragmented.img"
    harness.write_image(str(path), case)
    with open_image(path, use_cache=False) as img:
        pc = img.block("pc.ram")
        pmap = phys_map(img)
        view = PhysView(img, pmap)
        # Bounded range walks agree with the whole walk, clipped.
        whole = list(itertools.islice(pc.populated_ranges(), 2000))
        lo, hi = whole[100][0] + 4096, whole[1900][1] - 4096
        clipped = [(max(a, lo), min(b, hi)) for a, b in whole if b > lo and a < hi]
        assert list(pc.populated_ranges(lo, hi)) == clipped
        core = ElfCore(view, cpus_of(img))
        loads = elf_loads(core.read(0, len(core.header)))
        assert [(p, n) for p, _, n in loads] == sorted((r.gpa, r.length) for r in pmap.ranges)
        assert len(loads) < MAX_LOADS
        rng = random.Random(3)
        for paddr, off, n in loads:
            for _ in range(20):
                k = rng.randrange(n - 4096)
                assert core.read(off + k, 4096) == view.read(paddr + k, 4096)
        ex = SequentialExport(img)
        recs = ex.records[0]
        assert recs.count == pc.populated_pages == 262144 and recs._spans is None  # nothing walked yet
        # The last record: its header names the last populated page, its payload reads as the block.
        last_page = max(b for a, b in pc.populated_ranges()) // 4096 - 1
        rec = ex.read(recs.end - recs.rec, recs.rec)
        assert int.from_bytes(rec[:8], "big") & ~0xfff == last_page * 4096
        assert rec[8:] == img.read(pc, last_page * 4096, 4096)
