"""aarch64 ``virt`` guests: cpus.json, phys/memory and core.elf against QEMU's own view.

A two-vCPU cortex-a57 guest made by qemu-system-aarch64 at test time runs a few instructions
(loaded into RAM, the PC set there by QEMU's loader) that put known values in
x0..x30, sp, V0..V31, FPCR, FPSR and NZCV, then loop; the second vCPU stays powered off.
QEMU's ``dump-guest-memory`` of the paused guest is the truth for the core (EM_AARCH64, a
prstatus and an FP/SIMD note per vCPU, one PT_LOAD for the RAM at 1 GiB) and memory; the
values the program set are the truth for cpus.json.
"""

from __future__ import annotations

import json
import shutil
import struct
import time
from pathlib import Path

import pytest

import qemu_images as qi
from ramfs.image import open_image
from ramfs.views.elfcore import ElfCore, cpus_of
from ramfs.image.phys import Placement
from ramfs.views.phys import PhysView
from test_phys import elf_loads

MiB = 1 << 20
RAM_BASE = 0x40000000
PROG = RAM_BASE + 0x200000  # past the device tree QEMU puts at the start of RAM
pytestmark = [pytest.mark.qemu,
              pytest.mark.skipif(shutil.which("qemu-system-aarch64") is None,
                                 reason="qemu-system-aarch64 missing: make deps-test installs it")]


def _x(n: int) -> int:
    return 0x1111_0000_0000_0000 * (n % 15 + 1) + 0x0101_0101 * n + 0xA5


FPCR, FPSR, NZCV = 0x0340_0000, 0x0800_0013, 0x6000_0000  # AHP|RMode=RZ(?)/DN bits; QC|IDC..; ZC
SP = RAM_BASE + 0x80000


def _mov64(rd: int, value: int) -> list[int]:
    """MOVZ then three MOVK: any 64-bit value into Xd."""
    out = [0xD2800000 | ((value & 0xFFFF) << 5) | rd]
    for hw in (1, 2, 3):
        out.append(0xF2800000 | (hw << 21) | (((value >> (16 * hw)) & 0xFFFF) << 5) | rd)
    return out


def program() -> bytes:
    # FP/SIMD instructions trap at EL1 until CPACR_EL1.FPEN allows them.
    code: list[int] = _mov64(0, 3 << 20) + [0xD5181040, 0xD5033FDF]  # MSR CPACR_EL1, X0; ISB
    for v in range(32):  # V<v> = (x(v+40), x(v+80)) through x0 and x1
        code += _mov64(0, _x(v + 40)) + _mov64(1, _x(v + 80))
        code += [0x9E670000 | (0 << 5) | v,  # FMOV Dv, X0
                 0x9EAF0000 | (1 << 5) | v]  # FMOV Vv.D[1], X1
    code += _mov64(0, FPCR) + [0xD51B4400]  # MSR FPCR, X0
    code += _mov64(0, FPSR) + [0xD51B4420]  # MSR FPSR, X0
    code += _mov64(0, NZCV) + [0xD51B4200]  # MSR NZCV, X0
    code += _mov64(0, SP) + [0x91000000 | (0 << 5) | 31]  # MOV SP, X0
    for r in range(31):
        code += _mov64(r, _x(r))
    code += [0x14000000]  # B .
    return struct.pack(f"<{len(code)}I", *code)


def _qemu(args: list[str], scratch: Path, name: str, incoming: bool = False) -> qi.QemuProcess:
    sock = scratch / f"{name}.qmp"
    argv = [shutil.which("qemu-system-aarch64"), "-machine", "virt", "-cpu", "cortex-a57", "-smp", "2",
            "-m", "256M", "-accel", "tcg", "-nodefaults", "-no-user-config", "-display", "none",
            "-qmp", f"unix:{sock},server=on,wait=off", *args] + (["-S", "-incoming", "defer"] if incoming else [])
    return qi.QemuProcess(argv, sock, scratch / f"{name}.log")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    d = tmp_path_factory.mktemp("aarch64")
    prog = d / "prog.bin"
    prog.write_bytes(program())
    dump, dump2, seq, mapped = d / "qemu.elf", d / "qemu2.elf", d / "seq.img", d / "mapped.img"
    with qi._scratch_dir() as scratch:
        with _qemu(["-device", f"loader,file={prog},addr={PROG:#x},cpu-num=0,force-raw=on"], scratch, "g") as q:
            time.sleep(1.0)  # the program ends in its loop at once
            q.qmp.execute("stop")
            q.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump}"})
            q.save(seq)
        with _qemu([], scratch, "again", incoming=True) as q:
            q.load(seq)
            q.qmp.execute("dump-guest-memory", {"paging": False, "protocol": f"file:{dump2}"})
            q.save(mapped, ("mapped-ram",))
    yield {"seq": (seq, dump), "mapped": (mapped, dump2)}
    for p in (dump, dump2):
        p.unlink(missing_ok=True)


def _notes(core: bytes) -> bytes:
    phoff, = struct.unpack_from("<Q", core, 32)
    phnum, = struct.unpack_from("<H", core, 56)
    for i in range(phnum):
        p_type, _, off, _, _, size, _, _ = struct.unpack_from("<IIQQQQQQ", core, phoff + 56 * i)
        if p_type == 4:
            return core[off:off + size]
    raise AssertionError("no PT_NOTE")


@pytest.mark.parametrize("which", ["seq", "mapped"])
def test_core_and_phys_equal_qemus_dump(saved, which):
    image, truth = saved[which]
    with open(truth, "rb") as f:
        head = f.read(1 << 20)
    with open_image(image) as img, open(truth, "rb") as theirs:
        pmap = Placement().map(img)
        assert pmap.warnings == ()
        assert dict(pmap.omitted)["virt.flash0"].startswith("pflash")
        view = PhysView(img, pmap)
        core = ElfCore(view, cpus_of(img))
        ours = core.read(0, len(core.header))
        assert ours[18:20] == head[18:20] == struct.pack("<H", 183)  # EM_AARCH64
        assert _notes(ours) == _notes(head)  # both vCPUs' prstatus and FP/SIMD notes, byte for byte
        loads, their_loads = elf_loads(ours), elf_loads(head)
        assert [(p, n) for p, _, n in loads] == [(p, n) for p, _, n in their_loads] == [(RAM_BASE, 256 * MiB)]
        (_, off, n), (_, toff, _) = loads[0], their_loads[0]
        for k in range(0, n, 64 * MiB):
            theirs.seek(toff + k)
            want = theirs.read(64 * MiB)
            assert core.read(off + k, 64 * MiB) == want and view.read(RAM_BASE + k, 64 * MiB) == want, hex(k)
        assert view.read(PROG, len(program())) == program()


def test_cpus_json_decodes_aarch64_registers(saved, tmp_path):
    from mountutil import mounted
    with mounted(saved["seq"][0], tmp_path / "mp"):
        cpus = json.loads((tmp_path / "mp" / "cpus.json").read_text())
    assert [c["target"] for c in cpus] == ["aarch64", "aarch64"]
    c0, c1 = cpus
    assert all(c0[f"x{r}"] == _x(r) for r in range(31))
    assert c0["sp"] == SP and c0["aarch64_state"] and c0["el"] == 1
    loop = PROG + len(program()) - 4
    assert c0["pc"] == loop
    assert c0["pstate"] >> 28 == NZCV >> 28
    assert c0["fpcr"] == FPCR and c0["fpsr"] == FPSR
    assert c0["v"][7] == f"{_x(87):016x}{_x(47):016x}"
    assert c0["system_registers"]["CPACR_EL1"] == 3 << 20 and c0["system_registers"]["SCTLR_EL1"]
    assert not any(k in c0 for k in ("rax", "rip", "cr3"))  # no x86 names on aarch64 values
    assert c1["halted"] is not None and c1["x0"] == 0
