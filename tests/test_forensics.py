"""Third-party forensic tools on the mounted phys/ views of a Linux guest made at test time.

The guest is ``qemu_images.build_linux()`` (q35, Debian 12's kernel and busybox, one vCPU idle
in ``sleep``; built with real QEMU under TCG and cached), saved by QEMU into libvirt sparse
(mapped-ram) and raw (sequential) images (``qemu_images.build_linux_libvirt()``). Its kernel
release comes from the bzImage's setup header, its machine type from QEMU, and the vCPU's
halted state and the physical address of its rip from a QEMU that restored the guest. It is
mounted from both images, and:

* Volatility 3 ``banners.Banners`` (needs no symbols) must find on ``phys/core.elf`` exactly the
  kernel banners that are in ``ram/pc.ram``, at their guest-physical addresses (Volatility
  stacks its Elf64Layer on the core and addresses by ``p_paddr``);
* Volatility's raw FileLayer on ``phys/memory`` must find them at the same addresses. The
  full CLI run on the raw 4 GiB file takes 1.5 to 3 minutes (Volatility scans every byte twice,
  for Linux and for Windows banners, holes included), so by default the same scanner runs
  through Volatility's API over the populated ranges only (``maps/@phys/memory``); set
  ``RAMFS_FORENSICS_FULL=1`` to also run the CLI on the whole file;
* ``readelf -a`` must accept the core without a warning and list one PT_LOAD per RAM range
  (QEMU's layout) and the CORE/QEMU notes;
* ``gdb`` must read the registers of the core as cpus.json has them, and memory by address;
* cpus.json must describe a 64-bit kernel: long mode, CPL 0, rip in the kernel text mapping,
  halted as QEMU says it is, and a page-table walk from cr3 through phys/memory must land where
  QEMU's ``gva2gpa`` does, on the ``sti; hlt`` of the idle loop when the vCPU is halted.

Volatility runs offline, with its cache in ``${RAMFS_TEST_CACHE:-~/.cache/ramfs-tests}/
volatility3`` (never the user's own). Each tool is skipped when it is not installed.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shutil
import struct
import subprocess
import sys
from pathlib import Path

import pytest

import qemu_images as qi
from fixture_data import cache_root
from mountutil import mounted

pytestmark = pytest.mark.qemu

IMAGES = ["sparse", "raw"]  # attributes of qemu_images.LinuxLibvirtImages
KERNEL_TEXT = (0xFFFFFFFF80000000, 0xFFFFFFFFC0000000)  # __START_KERNEL_map .. MODULES_VADDR
VOL_TIMEOUT = 600
FULL = os.environ.get("RAMFS_FORENSICS_FULL", "") not in ("", "0")

# volatility3/framework/plugins/banners.py (Banners.locate_banners), applied to pc.ram below
# so that the expected result does not come from the tool under test.
BANNER_RE = re.compile(rb"(Linux version|Darwin Kernel Version) [0-9]+\.[0-9]+\.[0-9]+")
BANNER_CHARS = frozenset(b" #()+,;/-.0123456789:@ABCDEFGHIJKLMNOPQRSTUVWXYZ_abcdefghijklmnopqrstuvwxyz~")


# --------------------------------------------------------------------------- the mounted guest

@pytest.fixture(scope="module")
def built() -> qi.LinuxLibvirtImages:
    return qi.build_linux_libvirt()


@dataclasses.dataclass(frozen=True)
class QemuView:
    """What a QEMU that restored the guest says about its vCPU."""
    halted: bool
    rip: int
    rip_gpa: int  # HMP gva2gpa of rip: QEMU's own page walk


@pytest.fixture(scope="module")
def qemu_view(built) -> QemuView:
    g = built.guest
    with qi._scratch_dir() as scratch, qi._start(g.machine_args(), scratch, "forensics", incoming=True) as q:
        q.load(g.sequential)
        regs = q.qmp.hmp("info registers")
        rip = int(re.search(r"\bRIP=([0-9a-f]+)", regs).group(1), 16)
        gpa = re.search(r"gpa: 0x([0-9a-f]+)", q.qmp.hmp(f"gva2gpa {rip:#x}"))
        assert gpa, f"QEMU cannot translate rip {rip:#x}"
        return QemuView(halted=re.search(r"\bHLT=([01])", regs).group(1) == "1", rip=rip,
                        rip_gpa=int(gpa.group(1), 16))


class Guest:
    def __init__(self, name: str, mp: Path, built: qi.LinuxLibvirtImages):
        self.name = name
        self.mp = mp
        self.built = built
        self.kernel_release = qi.bzimage_release(built.guest.kernel)
        self.machine = built.guest.info["machine_type"].removesuffix("-machine")  # as QEMU resolved it
        self.vcpus = qi.machine_vcpus(built.guest.machine_args())
        self.core = mp / "phys" / "core.elf"
        self.memory = mp / "phys" / "memory"
        self.cpus = json.loads((mp / "cpus.json").read_text())
        self.image = json.loads((mp / "image.json").read_text())
        self.populated = [tuple(map(int, ln.split()))
                          for ln in (mp / "maps" / "@phys" / "memory").read_text().splitlines()]
        self.banners = self._banners_in_pc_ram()

    def gpa_of(self, idstr: str, offset: int) -> int:
        """The guest-physical address of a block offset, from image.json's phys map."""
        index = next(i for i, b in enumerate(self.image["blocks"]) if b["idstr"] == idstr)
        for r in self.image["phys"]["ranges"]:
            if r["block"] == index and r["block_offset"] <= offset < r["block_offset"] + r["length"]:
                return r["gpa"] + offset - r["block_offset"]
        raise AssertionError(f"{idstr}+{offset:#x} is not mapped")

    def _banners_in_pc_ram(self) -> list[tuple[int, str]]:
        data = (self.mp / "ram" / "pc.ram").read_bytes()
        out = []
        for m in BANNER_RE.finditer(data):
            text = data[m.start():m.start() + 0xFFF]
            nul = text.find(b"\0")
            if nul <= 0:
                continue
            text = text[:nul].strip()
            if all(c in BANNER_CHARS for c in text):
                out.append((self.gpa_of("pc.ram", m.start()), text.decode("latin-1")))
        return out


@pytest.fixture(scope="module", params=IMAGES, ids=lambda n: f"libvirt-{n}")
def guest(request, tmp_path_factory, built):
    src = getattr(built, request.param)
    base = tmp_path_factory.mktemp("forensics")
    # conftest's isolated cache is function-scoped; this mount outlives one test.
    env = dict(os.environ, RAMFS_CACHE_DIR=str(tmp_path_factory.getbasetemp() / "ramfs-cache"))
    with mounted(src, base / "mp", env=env):
        yield Guest(request.param, base / "mp", built)


def test_the_guest_has_the_expected_kernel_banner(guest):
    """The premise of the Volatility tests: the banner is in pc.ram, below 4 GiB."""
    assert guest.image["phys"]["machine"] == guest.machine
    assert any(text.startswith(f"Linux version {guest.kernel_release} ") for _, text in guest.banners)
    assert all(gpa < guest.image["phys"]["below_4g"] for gpa, _ in guest.banners)


# --------------------------------------------------------------------------- Volatility 3

def vol_env() -> dict:
    # volatility3.framework.constants creates its default cache directory (XDG_CACHE_HOME or
    # ~/.cache) at import time, before --cache-path is parsed: point both at the test cache.
    root = cache_root()
    root.mkdir(parents=True, exist_ok=True)
    return dict(os.environ, XDG_CACHE_HOME=str(root))


def run_vol(path: Path, *plugin: str, timeout: float = VOL_TIMEOUT) -> subprocess.CompletedProcess:
    pytest.importorskip("volatility3")
    cmd = [sys.executable, "-c", "import sys; from volatility3.cli import main; sys.argv[0] = 'vol'; main()",
           "-q", "--offline", "--cache-path", str(cache_root() / "volatility3"), "-r", "json",
           "-f", str(path), *plugin]
    p = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=vol_env())
    assert p.returncode == 0, (p.returncode, p.stderr[-4000:])
    return p


def vol_banners(path: Path, timeout: float = VOL_TIMEOUT) -> list[tuple[int, str]]:
    rows = json.loads(run_vol(path, "banners.Banners", timeout=timeout).stdout)
    return [(r["Offset"], r["Banner"]) for r in rows]


def test_volatility_finds_the_banners_in_core_elf(guest):
    assert vol_banners(guest.core) == guest.banners


# Volatility's own raw layer and the Banners plugin's regex, restricted to the given sections.
RAW_SCAN = r"""
import json, sys
from pathlib import Path
from volatility3.framework import contexts
from volatility3.framework.layers import physical, scanners
path, sections = sys.argv[1], json.load(sys.stdin)
ctx = contexts.Context()
ctx.config["raw.location"] = Path(path).as_uri()
layer = physical.FileLayer(ctx, "raw", "raw")
ctx.add_layer(layer)
scanner = scanners.RegExScanner(rb"(Linux version|Darwin Kernel Version) [0-9]+\.[0-9]+\.[0-9]+")
hits = [(o, layer.read(o, 0xFFF, pad=True).split(b"\0")[0].strip().decode("latin-1"))
        for o in layer.scan(ctx, scanner, sections=sections)]
print(json.dumps({"maximum_address": layer.maximum_address, "hits": hits}))
"""


def test_volatility_raw_layer_on_phys_memory(guest):
    pytest.importorskip("volatility3")
    sections = [(a, b - a) for a, b in guest.populated]
    p = subprocess.run([sys.executable, "-c", RAW_SCAN, str(guest.memory)], input=json.dumps(sections),
                       capture_output=True, text=True, timeout=VOL_TIMEOUT, env=vol_env())
    assert p.returncode == 0, p.stderr[-4000:]
    out = json.loads(p.stdout)
    assert out["maximum_address"] == guest.memory.stat().st_size - 1
    want = {gpa: text for gpa, text in guest.banners}
    got = {o: text for o, text in out["hits"] if o in want}  # the plugin's charset filter aside
    assert got == want


@pytest.mark.skipif(not FULL, reason="the whole 4 GiB through the CLI takes minutes; RAMFS_FORENSICS_FULL=1")
def test_volatility_cli_on_phys_memory(guest):
    assert vol_banners(guest.memory, timeout=1800) == guest.banners


# --------------------------------------------------------------------------- readelf

def test_readelf_accepts_core_elf(guest):
    if shutil.which("readelf") is None:
        pytest.skip("readelf (binutils) not installed")
    p = subprocess.run(["readelf", "-a", "-W", str(guest.core)], capture_output=True, text=True,
                       timeout=120, env=dict(os.environ, LC_ALL="C"))
    assert p.returncode == 0 and p.stderr == "", p.stderr
    out = p.stdout
    assert re.search(r"Type:\s+CORE \(Core file\)", out)
    assert re.search(r"Machine:\s+Advanced Micro Devices X86-64", out)
    assert re.search(r"Class:\s+ELF64", out)
    # LOAD  Offset VirtAddr PhysAddr FileSiz MemSiz Flags Align (one line each with -W)
    loads = [tuple(int(x, 16) for x in m.groups())
             for m in re.finditer(r"^\s*LOAD\s+0x([0-9a-f]+) 0x([0-9a-f]+) 0x([0-9a-f]+) "
                                  r"0x([0-9a-f]+) 0x([0-9a-f]+)", out, re.M)]
    # QEMU's layout: one PT_LOAD per guest-physical RAM range, zero pages included.
    ranges = sorted((r["gpa"], r["length"]) for r in guest.image["phys"]["ranges"])
    assert [(vaddr, filesz) for _, vaddr, _, filesz, _ in loads] == ranges
    assert all(any(v <= a and b <= v + n for _, v, _, n, _ in loads) for a, b in guest.populated)
    assert all(vaddr == paddr and filesz == memsz for _, vaddr, paddr, filesz, memsz in loads)
    assert loads[-1][0] + loads[-1][3] == guest.core.stat().st_size
    assert len(re.findall(r"^\s*NOTE\s", out, re.M)) == 1
    assert len(re.findall(r"^\s*CORE\s+0x00000150\s+NT_PRSTATUS", out, re.M)) == len(guest.cpus)
    assert len(re.findall(r"^\s*QEMU\s+0x000001b8\s+Unknown note type: \(0x00000000\)", out, re.M)) == len(guest.cpus)
    vmcoreinfo = [n for n, _, _ in elf_notes(guest.built.guest.dump_head.read_bytes()) if n == b"VMCOREINFO"]
    assert len(re.findall(r"^\s*VMCOREINFO\s+0x[0-9a-f]+\s", out, re.M)) == len(vmcoreinfo)


# --------------------------------------------------------------------------- gdb

def test_gdb_reads_registers_and_memory(guest):
    if shutil.which("gdb") is None:
        pytest.skip("gdb not installed")
    cpu = guest.cpus[0]
    gpa, banner = guest.banners[0]
    p = subprocess.run(["gdb", "-nx", "-batch", "-ex", "set print elements 0", "-ex", "info registers",
                        "-ex", "info registers fs_base gs_base",
                        "-ex", f"x/s {gpa:#x}", "-c", str(guest.core)],
                       capture_output=True, text=True, timeout=120,
                       env=dict(os.environ, LC_ALL="C", DEBUGINFOD_URLS=""))
    assert p.returncode == 0, p.stderr
    regs = {m.group(1): int(m.group(2), 16)
            for m in re.finditer(r"^(\w+)\s+0x([0-9a-f]+)\s", p.stdout, re.M)}
    want = {k: cpu[k] for k in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp", "r8", "r9",
                                "r10", "r11", "r12", "r13", "r14", "r15", "rip")}
    want.update(eflags=cpu["rflags"], cs=cpu["cs"]["selector"], ss=cpu["ss"]["selector"],
                ds=cpu["ds"]["selector"], es=cpu["es"]["selector"], fs=cpu["fs"]["selector"],
                gs=cpu["gs"]["selector"], fs_base=cpu["fs"]["base"], gs_base=cpu["gs"]["base"])
    assert {k: regs.get(k) for k in want} == want
    # Memory by address: p_vaddr = p_paddr = guest-physical address.
    assert f'{gpa:#x}:\t"{banner}' in p.stdout


# --------------------------------------------------------------------------- cpus.json and the notes

EFER_LME, EFER_LMA = 1 << 8, 1 << 10
CR0_PE, CR0_PG = 1 << 0, 1 << 31
CR4_PAE = 1 << 5
DESC_L = 1 << 21  # QEMU's segment flags: the 64-bit code segment bit


def test_cpus_json_is_a_64_bit_kernel(guest, qemu_view):
    assert len(guest.cpus) == guest.vcpus  # -smp of the guest
    cpu = guest.cpus[0]
    assert cpu["efer"] & EFER_LME and cpu["efer"] & EFER_LMA
    assert cpu["cr0"] & CR0_PE and cpu["cr0"] & CR0_PG and cpu["cr4"] & CR4_PAE
    assert cpu["cs"]["flags"] & DESC_L and cpu["cs"]["selector"] & 3 == 0 and cpu["hflags"] & 3 == 0
    assert KERNEL_TEXT[0] <= cpu["rip"] < KERNEL_TEXT[1], hex(cpu["rip"])
    assert cpu["rsp"] >= 0xFFFF800000000000, hex(cpu["rsp"])
    assert cpu["rip"] == qemu_view.rip
    assert cpu["halted"] is qemu_view.halted
    # Walk the guest's page tables from cr3 through phys/memory to rip: the same address as
    # QEMU's walk. A vCPU halted in the idle loop halted with "sti; hlt": find those two
    # instructions just before it.
    with open(guest.memory, "rb") as mem:
        pa = translate(mem, cpu["cr3"], cpu["rip"])
        assert pa == qemu_view.rip_gpa, (hex(pa), hex(qemu_view.rip_gpa))
        assert any(a <= pa < b for a, b in guest.populated)
        if qemu_view.halted:
            mem.seek(pa - 2)
            assert mem.read(2) == b"\xfb\xf4", hex(pa)


def translate(mem, cr3: int, va: int) -> int:
    """4-level x86-64 page walk (4 KiB, 2 MiB and 1 GiB pages) over guest-physical memory."""
    addr_mask = 0x000FFFFFFFFFF000
    table = cr3 & addr_mask
    for shift in (39, 30, 21, 12):
        mem.seek(table + ((va >> shift) & 0x1FF) * 8)
        entry, = struct.unpack("<Q", mem.read(8))
        assert entry & 1, f"{va:#x} not present at level {shift}"
        if shift == 12 or (shift in (30, 21) and entry & 0x80):
            size = 1 << shift
            return (entry & addr_mask & ~(size - 1)) | (va & (size - 1))
        table = entry & addr_mask
    raise AssertionError("unreachable")


def elf_notes(head: bytes) -> list[tuple[bytes, int, bytes]]:
    """(name, type, desc) of each note of an ELF core's first program header (PT_NOTE)."""
    phoff, = struct.unpack_from("<Q", head, 32)
    p_type, _, off, _, _, size, _, _ = struct.unpack_from("<IIQQQQQQ", head, phoff)
    assert p_type == 4
    notes = []
    pos = off
    while pos < off + size:
        namesz, descsz, ntype = struct.unpack_from("<III", head, pos)
        name = head[pos + 12:pos + 12 + namesz].rstrip(b"\0")
        dpos = pos + 12 + (namesz + 3) // 4 * 4
        notes.append((name, ntype, head[dpos:dpos + descsz]))
        pos = dpos + (descsz + 3) // 4 * 4
    return notes


def test_core_notes_carry_cpus_json(guest):
    """NT_PRSTATUS (pid, user_regs) and QEMU's CPU state note agree with cpus.json; the notes
    are those of QEMU's own dump of the guest (CPU notes, then the kernel's VMCOREINFO)."""
    with open(guest.core, "rb") as f:
        head = f.read(1 << 16)
    notes = elf_notes(head)
    theirs = [(n, t) for n, t, _ in elf_notes(guest.built.guest.dump_head.read_bytes())]
    assert theirs[:2 * len(guest.cpus)] == [(b"CORE", 1), (b"QEMU", 0)] * len(guest.cpus)
    assert [(n, t) for n, t, _ in notes] == theirs
    for i, cpu in enumerate(guest.cpus):
        prstatus, qemu = notes[2 * i][2], notes[2 * i + 1][2]
        assert struct.unpack_from("<I", prstatus, 32)[0] == i + 1  # pr_pid
        rip, = struct.unpack_from("<Q", prstatus, 112 + 16 * 8)
        assert rip == cpu["rip"]
        version, qsize = struct.unpack_from("<II", qemu, 0)
        assert (version, qsize) == (1, len(qemu))
        assert struct.unpack_from("<Q", qemu, 8 + 16 * 8)[0] == cpu["rip"]
        segs = {name: struct.unpack_from("<IIIIQ", qemu, 8 + 18 * 8 + 24 * k)
                for k, name in enumerate(("cs", "ds", "es", "fs", "gs", "ss", "ldt", "tr", "gdt", "idt"))}
        for name, (sel, limit, flags, _, base) in segs.items():
            s = cpu[name]
            assert (sel, limit, flags, base) == (s["selector"], s["limit"], s["flags"], s["base"]), name
        crs = struct.unpack_from("<5Q", qemu, 8 + 18 * 8 + 24 * 10)
        assert crs == tuple(cpu.get(f"cr{k}", 0) for k in range(5))  # no cr1 in cpus.json
        kernel_gs_base, = struct.unpack_from("<Q", qemu, 8 + 18 * 8 + 24 * 10 + 40)
        assert kernel_gs_base == cpu["kernelgsbase"]
