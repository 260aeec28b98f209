"""Device state decoded by the VM description (ramfs/format/vmstate.py).

* Every shipped image: the walk over the FULL sections ends exactly on the QEMU_VM_EOF byte,
  the sections are exactly the vmdesc's devices, every composite field is tiled by its
  children, and the x86 CPU state is decoded and plausible.
* Images of the same guest state (sequential, mapped-ram, libvirt raw/sparse/compressed)
  decode to identical device state except a few clock fields (``TIMERISH``).
* Real QEMU is the referee: the CPU state decoded from an image equals what a fresh
  ``-incoming defer`` QEMU that restored the same image prints in ``info registers``.
* A vmdesc that lies, a section shorter than described, a device list that does not match
  the stream: FormatError naming the device and the offset, never another exception.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import random
import re
import struct
import time
from pathlib import Path

import pytest
import qemu_images
from fixture_data import entries, fixture_path

from ramfs.errors import FormatError, TruncatedError
from ramfs.format.qemu import parse_stream
from ramfs.format.source import BytesSource
from ramfs.format.vmstate import (
    GPR_NAMES,
    INT_TYPES,
    SUBSECTION,
    CpuState,
    DeviceState,
    cpu_states,
    parse_devices,
)
from ramfs.image.model import open_image

IMAGES = [e["decompressed_path"] for e in entries("image")]
# Images holding the same guest state (one save each of one stopped guest, or re-saves of a
# restore of it). Their device states must be identical except TIMERISH.
SAME_STATE = [
    ("firmware/pc-sequential.img", "firmware/pc-mapped-ram.img"),
    ("firmware/pc-sequential.img", "firmware/pc-mapped-ram-multifd.img"),
    ("firmware/pc-sequential.img", "firmware/pc-mapped-ram-directio.img"),
    ("firmware/q35-sequential.img", "firmware/q35-mapped-ram.img"),
    ("firmware/q35-sequential.img", "firmware/q35-mapped-ram-multifd.img"),
    ("firmware/q35-sequential.img", "firmware/q35-mapped-ram-directio.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-sparse.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-sparse-parallel4.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-raw-running.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-gzip.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-bzip2.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-xz.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-lzop.img"),
    ("libvirt/fw-pc-raw.img", "libvirt/fw-pc-zstd.img"),
]

# The fields that legitimately differ between two saves of one paused guest: clocks that
# QEMU reads from the host at save time.
#  * kvmclock.clock: the KVM clock (ns), kvm_get_clock() in kvmclock_pre_save;
#  * mc146818rtc.cmos_data: the RTC's time and date registers (bytes 0 sec, 2 min, 4 hour,
#    6 weekday, 7 day, 8 month, 9 year, 0x32 century), refreshed from the host clock by
#    rtc_update_time in the RTC's pre_save. The rest of CMOS must be equal.
TIMERISH = {("kvmclock", "clock"), ("mc146818rtc", "cmos_data")}
RTC_TIME_BYTES = {0, 2, 4, 6, 7, 8, 9, 0x32}


@functools.cache
def decoded(path: str):
    """(layout, DeviceState, vmdesc, model devices) of a shipped image, decoded once."""
    with open_image(fixture_path(path)) as im:
        ds = parse_devices(im.data, im.layout)
        return im.layout, ds, im.layout.vmdesc_json(), im.devices()


def walk(fields):
    for f in fields:
        yield f
        yield from walk(f.children)


def masked_flat(ds: DeviceState) -> dict:
    out = {}
    for d in ds:
        for path, value in d.flat().items():
            key = (d.name, d.instance_id, path)
            if (d.name, path) == ("mc146818rtc", "cmos_data"):
                raw = bytearray(bytes.fromhex(value))
                for i in RTC_TIME_BYTES:
                    if i < len(raw):
                        raw[i] = 0
                value = raw.hex()
            out[key] = value
    return out


# ------------------------------------------------------------------ the walk itself

@pytest.mark.parametrize("path", IMAGES)
def test_walk_ends_exactly_at_eof(path):
    layout, ds, _desc, _ = decoded(path)
    assert ds.offset == layout.device_offset
    assert ds.end == layout.eof_offset
    assert ds.devices[0].offset == layout.device_offset
    assert ds.devices[-1].end == layout.eof_offset
    for a, b in zip(ds.devices, ds.devices[1:]):
        assert a.end == b.offset, (a.name, b.name)
    # the EOF byte is directly followed by the vmdesc record (0x06, be32 length)
    assert layout.vmdesc_offset == layout.eof_offset + 1


@pytest.mark.parametrize("path", IMAGES)
def test_device_list_equals_vmdesc(path):
    layout, ds, desc, model_devices = decoded(path)
    want = [(d["name"], d["instance_id"], d.get("version"), d.get("vmsd_name")) for d in desc["devices"]]
    got = [(d.name, d.instance_id, d.version, d.vmsd_name) for d in ds]
    assert got == want
    assert [(d.name, d.instance_id, d.version, d.vmsd_name) for d in model_devices] == want
    # section ids are distinct, and none is RAM's
    ids = [d.section_id for d in ds]
    assert len(set(ids)) == len(ids)
    assert layout.ram_section_id not in ids


@pytest.mark.parametrize("path", IMAGES)
def test_fields_tile_their_sections(path):
    """Every byte of every section belongs to exactly one field, in stream order."""
    layout, ds, _desc, _ = decoded(path)
    footer = 5 if layout.footers else 0
    for d in ds:
        assert d.fields_offset == d.offset + 1 + 4 + 1 + len(d.name.encode()) + 4 + 4
        pos = d.fields_offset
        for f in d.fields:
            assert f.offset == pos, (d.name, f.name)
            pos = f.end
        assert pos + footer == d.end, d.name
        for f in walk(d.fields):
            if not f.children:
                continue
            # a subsection's children start after 0x05, name, be32 version
            pos = f.offset + (1 + 1 + len(f.name.encode()) + 4 if f.type == SUBSECTION else 0)
            for c in f.children:
                assert c.offset == pos, (d.name, f.name, c.name)
                pos = c.end
            assert pos == f.end, (d.name, f.name)


@pytest.mark.parametrize("path", IMAGES)
def test_scalars_decode_and_raw_is_the_file(path):
    _layout, ds, _desc, _ = decoded(path)
    with open_image(fixture_path(path)) as im:
        src = im.data
        n = 0
        for d in ds:
            for f in walk(d.fields):
                assert f.raw == src.read_at(f.offset, len(f.raw))
                assert len(f.raw) == min(f.size, 4096)
                spec = INT_TYPES.get(f.type)
                if spec is not None and f.array_len is None:
                    width, signed, order = spec
                    assert f.size == width
                    assert f.value == int.from_bytes(f.raw, order, signed=signed)
                    n += 1
                if f.type == "bool":
                    assert f.value in (True, False)
        assert n > 500  # cpu, apic, piix4_pm... are mostly integers


def test_cpu_field_names():
    """The x86 'cpu' vmsd as QEMU 10.0 describes it (the names cpu_states relies on)."""
    _layout, ds, _desc, _ = decoded("firmware/pc-sequential.img")
    cpu = ds.find("cpu")
    assert cpu.vmsd_name == "cpu" and cpu.version == 12
    regs = cpu.field("env.regs")
    assert (regs.type, regs.array_len, regs.size) == ("uint64", 16, 128)
    segs = cpu.field("env.segs")
    assert (segs.type, segs.array_len) == ("struct", 6)
    assert [c.name for c in segs[1].children] == ["selector", "base", "limit", "flags"]
    for name in ("env.eip", "env.eflags", "env.cr[0]", "env.cr[2]", "env.cr[3]", "env.cr[4]",
                 "env.efer", "env.ldt", "env.tr", "env.gdt", "env.idt", "env.hflags", "env.a20_mask"):
        assert cpu.field(name) is not None, name
    # a field of a subsection is found through the section
    assert [s.name for s in cpu.subsections] == ["cpu/tsc_khz"]
    assert cpu.field("env.tsc_khz").value == cpu.subsections[0].get("env.tsc_khz").value
    # the fpregs are an array of structs holding an inline vmsd (VMSTATE_WITH_TMP)
    fp = cpu.field("env.fpregs")
    assert fp.array_len == 8 and fp[0].get("tmp").vmsd_name == "fpreg_tmp"
    assert [c.name for c in fp[0].get("tmp").children] == ["tmp_mant", "tmp_exp"]


@pytest.mark.parametrize("path", IMAGES)
def test_cpu_state_plausible(path):
    _layout, ds, _desc, _ = decoded(path)
    cpus = cpu_states(ds)
    assert [c.index for c in cpus] == [0]  # 1 vCPU
    c = cpus[0]
    assert all(c.regs[n] is not None for n in GPR_NAMES)
    assert c.rax == c.regs["rax"] and c.r15 == c.regs["r15"] == 0  # SeaBIOS never uses r8-r15
    assert c.rflags & 0x2  # reserved bit 1 is always set
    assert c.efer == 0 and not c.long_mode and c.cr4 == 0 and c.cr3 == 0  # no paging
    assert c.cpl == 0 and c.a20_mask == -1
    assert c.halted is not None and c.tsc and c.tsc_khz
    assert c.dr[6] & 0xFFFF0FF0 == 0xFFFF0FF0 and c.dr[7] & 0x400
    linear = c.cs.base + c.rip
    assert 0xE0000 <= linear < 0x100000  # SeaBIOS's code, in the F segment
    if c.cr0 & 1:  # SeaBIOS's 32-bit flat mode
        assert c.cr0 == 0x11
        assert (c.cs.selector, c.cs.base, c.cs.limit) == (8, 0, 0xFFFFFFFF)
        for seg in (c.ds, c.es, c.ss):
            assert (seg.selector, seg.base, seg.limit) == (0x10, 0, 0xFFFFFFFF)
        assert c.gdt.limit == 0x37 and 0xF0000 <= c.gdt.base < 0x100000
        assert not c.halted
    else:  # real mode: base = selector << 4
        assert path == "libvirt/fw-pc-raw-paused.img"
        for seg in (c.cs, c.ds, c.es, c.ss, c.fs, c.gs):
            assert seg.base == seg.selector << 4 and seg.limit == 0xFFFF
        assert c.halted and c.idt.limit == 0x3FF
    for seg in (c.cs, c.ss, c.ds, c.es, c.fs, c.gs, c.ldt, c.tr):
        assert seg.flags & (1 << 15)  # present


@pytest.mark.parametrize("a,b", SAME_STATE, ids=[f"{a}~{b.rsplit('/', 1)[1]}" for a, b in SAME_STATE])
def test_same_guest_state_decodes_identically(a, b):
    _, da, _, _ = decoded(a)
    _, db, _, _ = decoded(b)
    assert cpu_states(da) == cpu_states(db)
    fa, fb = masked_flat(da), masked_flat(db)
    assert fa.keys() == fb.keys()
    differ = {(k[0], k[2]) for k in fa if fa[k] != fb[k]}
    assert differ <= TIMERISH, sorted(differ - TIMERISH)


def test_timerish_fields_do_differ():
    """TIMERISH is not a blanket: the raw flat values really differ in exactly those."""
    _, da, _, _ = decoded("firmware/pc-sequential.img")
    _, db, _, _ = decoded("firmware/pc-mapped-ram.img")
    fa = {(d.name, p): v for d in da for p, v in d.flat().items()}
    fb = {(d.name, p): v for d in db for p, v in d.flat().items()}
    assert {k for k in fa if fa[k] != fb[k]} == {("kvmclock", "clock")}


def test_to_dict_is_json():
    _, ds, _, _ = decoded("firmware/q35-sequential.img")
    text = json.dumps(ds.to_dict())
    assert '"env.regs"' in text
    json.dumps(cpu_states(ds)[0].to_dict())


# ------------------------------------------------------------- QEMU as the referee

SEG_RE = re.compile(r"^(ES |CS |SS |DS |FS |GS |LDT|TR )=([0-9a-f]{4}) ([0-9a-f]+) ([0-9a-f]{8}) "
                    r"([0-9a-f]{8})", re.MULTILINE)
TABLE_RE = re.compile(r"^(GDT|IDT)=\s+([0-9a-f]+) ([0-9a-f]{8})", re.MULTILINE)
REG_RE = re.compile(r"\b([A-Z][A-Z0-9]*)\s*=\s*([0-9a-f]+)\b")
FPR_RE = re.compile(r"FPR(\d)=([0-9a-f]{16}) ([0-9a-f]{4})")
XMM_RE = re.compile(r"XMM(\d\d)=([0-9a-f]{16}) ([0-9a-f]{16})")


def parse_info_registers(text: str) -> dict:
    """HMP ``info registers`` (target/i386/cpu-dump.c x86_cpu_dump_state) of one vCPU."""
    out: dict = {}
    for m in SEG_RE.finditer(text):
        out[m.group(1).strip()] = tuple(int(g, 16) for g in m.groups()[1:])
    for m in TABLE_RE.finditer(text):
        out[m.group(1)] = (int(m.group(2), 16), int(m.group(3), 16))
    for m in FPR_RE.finditer(text):
        out[f"FPR{m.group(1)}"] = (int(m.group(2), 16), int(m.group(3), 16))
    for m in XMM_RE.finditer(text):
        out[f"XMM{m.group(1)}"] = (int(m.group(2), 16), int(m.group(3), 16))
    for line in text.splitlines():
        if SEG_RE.match(line) or TABLE_RE.match(line) or line.startswith(("FPR", "XMM")):
            continue
        for m in REG_RE.finditer(line):
            name = m.group(1)
            if name in ("DPL", "ST"):
                continue
            out[name] = int(m.group(2), 16)
    return out


def expected_registers(c: CpuState, ds: DeviceState, shown: dict) -> dict:
    """What x86_cpu_dump_state prints for the decoded state (same formats and masks)."""
    cs64 = bool(c.hflags & (1 << 15))  # HF_CS64_MASK: 64-bit register format
    lma = bool(c.hflags & (1 << 14))  # HF_LMA_MASK: 64-bit tables and CR2/CR3
    u32 = 0xFFFFFFFF
    exp: dict = {}
    if cs64:
        for n in GPR_NAMES:
            exp[n.upper()] = c.regs[n]
        exp["RIP"], exp["RFL"] = c.rip, c.rflags
    else:
        for n in ("rax", "rbx", "rcx", "rdx", "rsi", "rdi", "rbp", "rsp"):
            exp["E" + n[1:].upper()] = c.regs[n] & u32
        exp["EIP"], exp["EFL"] = c.rip & u32, c.rflags
    exp["CPL"] = c.hflags & 3
    exp["II"] = (c.hflags >> 3) & 1  # HF_INHIBIT_IRQ_SHIFT
    exp["A20"] = (c.a20_mask >> 20) & 1
    exp["SMM"] = (c.hflags >> 19) & 1  # HF_SMM_SHIFT
    exp["HLT"] = int(c.halted)
    for name, seg in c.segments().items():
        base = seg.base if cs64 else seg.base & u32
        exp[name.upper()] = (seg.selector, base, seg.limit, seg.flags & 0x00FFFF00)
    for name in ("gdt", "idt"):
        t = getattr(c, name)
        exp[name.upper()] = (t.base if lma else t.base & u32, t.limit)
    exp["CR0"], exp["CR4"] = c.cr0 & u32, c.cr4 & u32
    exp["CR2"] = c.cr2 if lma else c.cr2 & u32
    exp["CR3"] = c.cr3 if lma else c.cr3 & u32
    for i in (0, 1, 2, 3, 6, 7):
        exp[f"DR{i}"] = c.dr[i]
    exp["EFER"] = c.efer
    cpu = ds.find("cpu", c.index)
    exp["FCW"] = c.fpuc
    exp["FSW"] = cpu.value("env.fpus_vmstate")
    exp["FTW"] = cpu.value("env.fptag_vmstate")
    exp["MXCSR"] = c.mxcsr
    fp = cpu.field("env.fpregs")
    for i in range(8):
        tmp = fp[i].get("tmp")
        exp[f"FPR{i}"] = (tmp.get("tmp_mant").value, tmp.get("tmp_exp").value)
    xmm = cpu.field("env.xmm_regs[0]")
    for i in range(16 if cs64 else 8):
        if f"XMM{i:02d}" in shown:
            exp[f"XMM{i:02d}"] = (xmm[i].get("_q_ZMMReg[1]").value, xmm[i].get("_q_ZMMReg[0]").value)
    return exp


def registers_of_restored(image: Path, machine, capabilities=(), offset: int = 0) -> str:
    """``info registers`` of a fresh, never-started QEMU that restored ``image``."""
    with qemu_images._scratch_dir() as scratch, \
            qemu_images._start(machine, scratch, "regs", incoming=True) as qemu:
        qemu.load(Path(image), capabilities, offset)
        assert qemu.qmp.execute("query-status")["status"] == "paused"
        return qemu.qmp.hmp("info registers")


def check_against_qemu(image: Path, machine, capabilities=(), offset: int = 0) -> dict:
    with open_image(image) as im:
        ds = parse_devices(im.data, im.layout)
    (c,) = cpu_states(ds)
    text = registers_of_restored(image, machine, capabilities, offset)
    shown = parse_info_registers(text)
    exp = expected_registers(c, ds, shown)
    got = {k: shown.get(k) for k in exp}
    assert got == exp, text
    # everything QEMU printed was compared, except the code bytes
    assert set(shown) - set(exp) == set(), set(shown) - set(exp)
    return shown


@pytest.fixture(scope="module")
def small_pc():
    return qemu_images.build(qemu_images.SMALL_PC)


@pytest.mark.qemu
def test_registers_equal_qemu_info_registers_small_pc(small_pc):
    shown = check_against_qemu(small_pc.sequential, qemu_images.SMALL_PC)
    assert "EIP" in shown and shown["CR0"] & 1  # SeaBIOS 32-bit protected mode
    check_against_qemu(small_pc.mapped_ram, qemu_images.SMALL_PC, ("mapped-ram",))


RESTORABLE = [
    ("firmware/pc-sequential.img", "pc", ()),
    ("firmware/pc-mapped-ram.img", "pc", ("mapped-ram",)),
    ("firmware/q35-sequential.img", "q35", ()),
    ("firmware/q35-mapped-ram.img", "q35", ("mapped-ram",)),
    ("libvirt/fw-pc-raw.img", "pc", ()),
    ("libvirt/fw-pc-raw-paused.img", "pc", ()),  # real mode, halted
    ("libvirt/fw-pc-raw-running.img", "pc", ()),
    ("libvirt/fw-pc-sparse.img", "pc", ("mapped-ram",)),
]


@pytest.mark.qemu
@pytest.mark.parametrize("path,machine,caps", RESTORABLE, ids=[r[0] for r in RESTORABLE])
def test_registers_equal_qemu_info_registers_fixtures(path, machine, caps):
    recipe = qemu_images.SMALL_PC if machine == "pc" else qemu_images.SMALL_Q35
    e = next(x for x in entries("image") if x["decompressed_path"] == path)
    offset = (e.get("libvirt_header") or {}).get("qemu_stream_offset", 0)
    check_against_qemu(fixture_path(path), recipe, caps, offset)


@pytest.mark.qemu
def test_small_pc_encodings_decode_identically(small_pc):
    states = []
    for p in (small_pc.sequential, small_pc.mapped_ram, small_pc.mapped_ram_multifd):
        with open_image(p) as im:
            states.append(parse_devices(im.data, im.layout))
            assert states[-1].end == im.layout.eof_offset
    base = masked_flat(states[0])
    for other in states[1:]:
        assert cpu_states(other) == cpu_states(states[0])
        flat = masked_flat(other)
        assert flat.keys() == base.keys()
        differ = {(k[0], k[2]) for k in base if base[k] != flat[k]}
        assert differ <= TIMERISH, sorted(differ - TIMERISH)


@pytest.mark.qemu
def test_registers_equal_qemu_linux_long_mode():
    """A Linux guest made at test time (qemu_images.build_linux, TCG): 64-bit long mode,
    paging; its bare streams and its libvirt raw and sparse images."""
    lv = qemu_images.build_linux_libvirt()
    guest = lv.guest
    args = guest.machine_args()
    for image, caps, offset in ((guest.sequential, (), 0), (guest.mapped_ram, ("mapped-ram",), 0),
                                (lv.raw, (), lv.stream_offset), (lv.sparse, ("mapped-ram",), lv.stream_offset)):
        shown = check_against_qemu(image, args, caps, offset)
        assert "RIP" in shown and shown["EFER"] & (1 << 10)  # LMA
        assert shown["CR3"] and shown["CR4"] & (1 << 5)  # paging with PAE


# ------------------------------------------------------------------------ damage

SEQ = "firmware/pc-sequential.img"


@functools.cache
def seq_bytes() -> bytes:
    return fixture_path(SEQ).read_bytes()


def with_vmdesc(layout, desc: dict):
    return dataclasses.replace(layout, vmdesc=json.dumps(desc).encode())


def desc_copy() -> dict:
    _layout, _, desc, _ = decoded(SEQ)
    return copy.deepcopy(desc)


def device_desc(desc: dict, name: str) -> dict:
    return next(d for d in desc["devices"] if d["name"] == name)


def field_desc(fields: list, name: str) -> dict:
    return next(f for f in fields if f["name"] == name)


def expect_error(layout, match: str, exc=FormatError, source=None) -> FormatError:
    src = source if source is not None else BytesSource(seq_bytes())
    with pytest.raises(exc) as info:
        parse_devices(src, layout)
    msg = str(info.value)
    assert re.search(match, msg), msg
    assert info.value.offset is not None and "(at offset 0x" in msg
    return info.value


def test_vmdesc_scalar_size_lie():
    layout, ds, _, _ = decoded(SEQ)
    desc = desc_copy()
    field_desc(device_desc(desc, "cpu")["fields"], "env.eip")["size"] = 9
    e = expect_error(with_vmdesc(layout, desc), r"device 'cpu' instance 0.*env\.eip.*9 bytes")
    assert e.offset == ds.find("cpu").field("env.eip").offset


def test_vmdesc_buffer_size_lie_is_caught_at_the_footer():
    layout, ds, _, _ = decoded(SEQ)
    desc = desc_copy()
    f = field_desc(device_desc(desc, "mc146818rtc")["fields"], "cmos_data")
    for delta in (1, -1, 5):
        f["size"] = 128 + delta
        e = expect_error(with_vmdesc(layout, desc), r"device 'mc146818rtc' instance 0.*footer")
        assert e.offset == ds.find("mc146818rtc").end - 5 + delta


def test_vmdesc_struct_size_lie():
    layout, ds, _, _ = decoded(SEQ)
    desc = desc_copy()
    field_desc(device_desc(desc, "cpu")["fields"], "env.segs")["size"] = 24
    e = expect_error(with_vmdesc(layout, desc), r"device 'cpu'.*env\.segs.*20 bytes.*says 24")
    assert e.offset == ds.find("cpu").field("env.segs").offset


def test_vmdesc_member_size_lie_inside_a_struct():
    layout, _, _, _ = decoded(SEQ)
    desc = desc_copy()
    segs = field_desc(device_desc(desc, "cpu")["fields"], "env.segs")
    field_desc(segs["struct"]["fields"], "base")["type"] = "uint32"  # 8 bytes called a uint32
    expect_error(with_vmdesc(layout, desc), r"device 'cpu'.*uint32 field 'env\.segs\[0\]\.base'")


def test_vmdesc_huge_array_is_refused_before_allocating():
    layout, _, _, _ = decoded(SEQ)
    for n, size, typ in ((1 << 31, 8, "uint64"), (0xFFFFFFFF, 0, "buffer"), (1 << 20, 8, "struct")):
        desc = desc_copy()
        f = field_desc(device_desc(desc, "cpu")["fields"], "env.regs")
        f.update(array_len=n, size=size, type=typ)
        if typ == "struct":
            f["struct"] = {"fields": [{"name": "x", "type": "uint64", "size": 8}]}
        t = time.monotonic()
        expect_error(with_vmdesc(layout, desc), r"device 'cpu'.*(do not fit|more than|footer|not a subsection)")
        assert time.monotonic() - t < 2


def test_vmdesc_missing_and_extra_subsection():
    layout, ds, _, _ = decoded(SEQ)
    desc = desc_copy()
    del device_desc(desc, "cpu")["subsections"]
    e = expect_error(with_vmdesc(layout, desc), r"device 'cpu'.*0x05, not the section footer")
    assert e.offset == ds.find("cpu").subsections[0].offset
    desc = desc_copy()
    device_desc(desc, "apic")["subsections"] = [{"vmsd_name": "apic/nope", "version": 1, "fields": []}]
    expect_error(with_vmdesc(layout, desc), r"device 'apic'.*subsection 'apic/nope'.*0x7e")
    desc = desc_copy()
    device_desc(desc, "cpu")["subsections"][0]["vmsd_name"] = "cpu/other"
    expect_error(with_vmdesc(layout, desc), r"device 'cpu'.*'cpu/tsc_khz' where the vmdesc lists 'cpu/other'")


def test_device_list_that_does_not_match_the_stream():
    layout, ds, _, _ = decoded(SEQ)
    names = [d["name"] for d in desc_copy()["devices"]]
    # a device missing from the vmdesc
    desc = desc_copy()
    del desc["devices"][3]
    e = expect_error(with_vmdesc(layout, desc),
                     rf"device '{names[4]}'.*the stream has section '{names[3]}' instance 0")
    assert e.offset == ds.devices[3].offset
    # two devices swapped
    desc = desc_copy()
    desc["devices"][5], desc["devices"][6] = desc["devices"][6], desc["devices"][5]
    expect_error(with_vmdesc(layout, desc), rf"'{names[5]}'.*where the vmdesc lists device '{names[6]}'")
    # wrong instance id
    desc = desc_copy()
    second_dma = [(d["name"], d["instance_id"]) for d in desc["devices"]].index(("dma", 1))
    desc["devices"][second_dma]["instance_id"] = 7
    expect_error(with_vmdesc(layout, desc), r"'dma' instance 1 where the vmdesc lists device 'dma' instance 7")
    # one device too many in the vmdesc
    desc = desc_copy()
    desc["devices"].append(copy.deepcopy(desc["devices"][-1]))
    e = expect_error(with_vmdesc(layout, desc), r"QEMU_VM_EOF.*1 of 32 devices missing")
    assert e.offset == layout.eof_offset
    # the last device missing from the vmdesc
    desc = desc_copy()
    desc["devices"].pop()
    expect_error(with_vmdesc(layout, desc), r"another device section \('globalstate'\) after device 'acpi_build'")
    # a version that differs from the section header
    desc = desc_copy()
    device_desc(desc, "apic")["version"] = 2
    expect_error(with_vmdesc(layout, desc), r"device 'apic'.*version 3, the vmdesc says 2")


def test_section_shorter_than_described():
    """The cpu section loses 8 bytes (one register): the walk fails at cpu's footer."""
    layout, ds, _, _ = decoded(SEQ)
    cpu = ds.find("cpu")
    regs = cpu.field("env.regs")
    data = seq_bytes()
    cut = data[:regs.offset] + data[regs.offset + 8:]
    src = BytesSource(cut)
    layout2 = parse_stream(src)
    assert layout2.eof_offset == layout.eof_offset - 8  # found from the end: it cannot tell
    # the walk takes the subsection's first 8 bytes as cpu's last field, then expects the
    # subsection where the original file had it (the cut file is 8 bytes shorter before it)
    e = expect_error(layout2, r"device 'cpu' instance 0.*subsection 'cpu/tsc_khz'.*not a subsection",
                     source=src)
    assert e.offset == cpu.subsections[0].offset


def test_device_state_ending_inside_the_cpu_section():
    """The EOF byte claimed inside cpu's fields: a truncation error naming cpu."""
    layout, ds, _, _ = decoded(SEQ)
    cpu = ds.find("cpu")
    short = dataclasses.replace(layout, eof_offset=cpu.offset + 100)
    e = expect_error(short, r"device 'cpu' instance 0.*env\.regs.*do not fit in the \d+ bytes left "
                            r"before QEMU_VM_EOF")
    assert e.offset == cpu.field("env.regs").offset
    eip = cpu.field("env.eip")
    short = dataclasses.replace(layout, eof_offset=eip.offset + 3)
    e = expect_error(short, r"device 'cpu' instance 0.*env\.eip.*ends at QEMU_VM_EOF \(0x",
                     exc=TruncatedError)
    assert e.offset == eip.offset
    # claimed past the real EOF byte: the walk ends early and says where
    long = dataclasses.replace(layout, eof_offset=layout.eof_offset + 3)
    expect_error(long, rf"walk ends at {layout.eof_offset:#x} after device 'globalstate'")


def test_truncated_file_has_no_device_state():
    data = seq_bytes()
    _layout, ds, _, _ = decoded(SEQ)
    cpu = ds.find("cpu")
    src = BytesSource(data[:cpu.offset + 40])
    layout2 = parse_stream(src)
    assert layout2.vmdesc is None
    expect_error(layout2, r"no VM description", source=src)


def test_bad_vmdesc_json_shapes():
    layout, _, _, _ = decoded(SEQ)
    bad = [
        {"devices": {}},
        {"devices": [5]},
        {"devices": [{"name": "timer", "instance_id": 0}]},
        {"devices": [{"name": "timer", "instance_id": "0", "fields": []}]},
        {"devices": [{"name": "timer", "instance_id": 0, "fields": 5}]},
        {"devices": [{"name": "timer", "instance_id": 0, "fields": [{"name": "x", "type": "int64", "size": "8"}]}]},
        {"devices": [{"name": "timer", "instance_id": 0, "fields": [{"name": "x", "type": "int64", "size": True}]}]},
        {"devices": [{"name": "timer", "instance_id": 0,
                      "fields": [{"name": "x", "type": "struct", "size": 8, "struct": []}]}]},
        {"devices": [{"name": "timer", "instance_id": 0, "fields": [{"name": "x", "type": "int64", "size": -8}]}]},
        {"devices": [{"name": "timer", "instance_id": 0, "fields": [], "subsections": [7]}]},
    ]
    for desc in bad:
        with pytest.raises(FormatError):
            parse_devices(BytesSource(seq_bytes()), with_vmdesc(layout, desc))
    nested: dict = {"fields": []}
    for _ in range(200):
        nested = {"fields": [{"name": "s", "type": "struct", "size": 0, "struct": nested}]}
    desc = {"devices": [dict(nested, name="timer", instance_id=0)]}
    with pytest.raises(FormatError, match="nested"):
        parse_devices(BytesSource(seq_bytes()), with_vmdesc(layout, desc))
    deep = b'{"devices": ' + b"[" * 100000 + b"]" * 100000 + b"}"
    with pytest.raises(FormatError):
        parse_devices(BytesSource(seq_bytes()), dataclasses.replace(layout, vmdesc=deep))
    with pytest.raises(FormatError, match="no VM description"):
        parse_devices(BytesSource(seq_bytes()), dataclasses.replace(layout, vmdesc=None))


def test_random_damage_gives_format_errors_only():
    """Byte flips in the device state and random edits of the vmdesc: FormatError or a
    successful walk (a flipped value byte is still valid vmstate), nothing else."""
    layout, _ds, desc0, _ = decoded(SEQ)
    rng = random.Random(1234)
    data = seq_bytes()
    failures = 0
    for _ in range(150):
        buf = bytearray(data)
        for _ in range(rng.randint(1, 4)):
            buf[rng.randrange(layout.device_offset, layout.eof_offset + 1)] ^= 1 << rng.randrange(8)
        try:
            parse_devices(BytesSource(bytes(buf)), layout)
        except FormatError:
            failures += 1
    assert failures > 10  # framing bytes get hit

    ints = []

    def collect(node, path):
        if isinstance(node, dict):
            for k, v in node.items():
                collect(v, path + (k,))
        elif isinstance(node, list):
            for i, v in enumerate(node):
                collect(v, path + (i,))
        elif isinstance(node, (int, str)) and path[-1] in ("size", "array_len", "version",
                                                            "instance_id", "type", "name", "vmsd_name"):
            ints.append(path)

    collect(desc0["devices"], ())
    for _ in range(150):
        desc = copy.deepcopy(desc0)
        path = ints[rng.randrange(len(ints))]
        node = desc["devices"]
        for k in path[:-1]:
            node = node[k]
        old = node[path[-1]]
        node[path[-1]] = (rng.choice([0, 1, old + 1, old - 1, 1 << 40, -1]) if isinstance(old, int)
                          else rng.choice(["uint64", "struct", "buffer", old + "x", ""]))
        try:
            parse_devices(BytesSource(data), with_vmdesc(layout, desc))
        except FormatError:
            pass


# ------------------------------------------------------- a synthetic, fully known stream

def _be32(n: int) -> bytes:
    return n.to_bytes(4, "big")


def _section(sid: int, name: str, iid: int, version: int, payload: bytes, footer: bool) -> bytes:
    head = bytes([0x04]) + _be32(sid) + bytes([len(name)]) + name.encode() + _be32(iid) + _be32(version)
    return head + payload + (bytes([0x7E]) + _be32(sid) if footer else b"")


def _subsection(name: str, version: int, payload: bytes) -> bytes:
    return bytes([0x05, len(name)]) + name.encode() + _be32(version) + payload


SYNTH_DESC = {"page_size": 4096, "devices": [
    {"name": "dev-a", "instance_id": 0, "vmsd_name": "dev-a", "version": 2, "fields": [
        {"name": "i8", "type": "int8", "size": 1},
        {"name": "le", "type": "int32 le", "size": 4},
        {"name": "flag", "type": "bool", "size": 1},
        {"name": "f", "type": "float64", "size": 8},
        {"name": "t", "type": "timer", "size": 8},
        {"name": "big", "type": "buffer", "size": 5000},
        {"name": "arr", "type": "uint16", "array_len": 5000, "size": 2},
        {"name": "pts", "type": "struct", "array_len": 3, "size": 6, "struct": {
            "vmsd_name": "pt", "version": 1, "fields": [
                {"name": "x", "type": "uint16", "size": 2}, {"name": "y", "type": "uint32", "size": 4}]}},
        {"name": "tmp", "type": "tmp", "vmsd_name": "dev-a-tmp", "version": 0, "size": 3, "fields": [
            {"name": "a", "type": "uint8", "size": 1}, {"name": "b", "type": "uint16", "size": 2}]},
        {"name": "e", "type": "uint32 equal", "size": 4},
        {"name": "u", "type": "unused_buffer", "size": 2},
    ], "subsections": [
        {"vmsd_name": "dev-a/sub", "version": 3, "fields": [{"name": "s", "type": "uint64", "size": 8}],
         "subsections": [{"vmsd_name": "dev-a/sub/inner", "version": 1,
                          "fields": [{"name": "deep", "type": "uint8", "size": 1}]}]}]},
    # an old-style device (SaveStateHandler, no vmsd): one opaque "data" buffer
    {"name": "old", "instance_id": 3, "size": 7, "fields": [{"name": "data", "type": "buffer", "size": 7}]},
    # a put() with its own nested description that is not a plain vmsd: taken as opaque bytes
    {"name": "c", "instance_id": 0, "vmsd_name": "c", "version": 1, "fields": [
        {"name": "q", "type": "qtailq", "vmsd_name": "elem", "version": 1, "size": 6,
         "fields": [{"name": "x", "type": "uint8", "size": 1}]}]},
]}


def synthetic(footers: bool, desc: dict = SYNTH_DESC):
    big = bytes(range(256)) * 20
    a = (b"\xff" + (1).to_bytes(4, "little") + b"\x01" + struct.pack(">d", 1.5)
         + (-1).to_bytes(8, "big", signed=True) + big[:5000]
         + b"".join(i.to_bytes(2, "big") for i in range(5000))
         + b"".join(i.to_bytes(2, "big") + (i * 1000).to_bytes(4, "big") for i in range(3))
         + b"\x07\x01\x02" + _be32(0xDEADBEEF) + b"\0\0"
         + _subsection("dev-a/sub", 3, (1 << 63).to_bytes(8, "big") + _subsection("dev-a/sub/inner", 1, b"\x2a")))
    stream = (_section(7, "dev-a", 0, 2, a, footers) + _section(8, "old", 3, 1, b"OLDDATA", footers)
              + _section(9, "c", 0, 1, b"\x01\x05\x01\x06\x00\x00", footers))
    prefix = b"P" * 10  # the device state need not start at offset 0
    data = prefix + stream + b"\x00"
    layout, _, _, _ = decoded(SEQ)
    layout = dataclasses.replace(layout, device_offset=len(prefix), eof_offset=len(data) - 1,
                                 vmdesc_offset=len(data), footers=footers,
                                 vmdesc=json.dumps(desc).encode())
    return BytesSource(data + b"\x06" + _be32(0)), layout


@pytest.mark.parametrize("footers", [True, False])
def test_synthetic_stream(footers):
    src, layout = synthetic(footers)
    ds = parse_devices(src, layout)
    assert [(d.name, d.instance_id, d.section_id) for d in ds] == [("dev-a", 0, 7), ("old", 3, 8), ("c", 0, 9)]
    assert ds.end == layout.eof_offset and ds.devices[-1].end == layout.eof_offset
    a = ds.find("dev-a")
    assert a.value("i8") == -1 and a.value("le") == 1 and a.value("flag") is True
    assert a.value("f") == 1.5 and a.value("t") == -1 and a.value("e") == 0xDEADBEEF
    big = a.field("big")
    assert big.size == 5000 and len(big.raw) == 4096 and big.truncated and big.value is None
    arr = a.field("arr")
    assert arr.array_len == 5000 and arr.size == 10000 and arr.children == ()  # past the child limit
    assert arr.value == tuple(range(5000)) and len(arr.raw) == 4096
    pts = a.field("pts")
    assert [(p.get("x").value, p.get("y").value, p.index) for p in pts.children] == [
        (0, 0, 0), (1, 1000, 1), (2, 2000, 2)]
    assert pts[2].offset == pts.offset + 12 and pts[2].vmsd_name == "pt"
    tmp = a.field("tmp")
    assert tmp.vmsd_name == "dev-a-tmp" and [c.value for c in tmp.children] == [7, 0x0102]
    assert a.value("s") == 1 << 63 and a.value("deep") == 0x2A  # through nested subsections
    (sub,) = a.subsections
    assert sub.version == 3 and sub.children[-1].type == SUBSECTION and sub.children[-1].name == "dev-a/sub/inner"
    flat = a.flat()
    assert flat["pts[1].y"] == 1000 and flat["dev-a/sub/dev-a/sub/inner/deep"] == 0x2A
    assert flat["tmp.b"] == 0x0102 and flat["u"] == "0000"
    old = ds.find("old", 3)
    assert old.vmsd_name is None and old.fields[0].raw == b"OLDDATA"
    q = ds.find("c").field("q")
    assert q.children == () and q.raw == b"\x01\x05\x01\x06\x00\x00"
    json.dumps(ds.to_dict())
    assert cpu_states(ds) == []


def test_synthetic_stream_without_footers_detects_a_lie():
    desc = copy.deepcopy(SYNTH_DESC)
    desc["devices"][1]["fields"][0]["size"] = 6
    src, layout = synthetic(False, desc)
    with pytest.raises(FormatError, match=r"device 'old' instance 3.*neither a FULL section nor QEMU_VM_EOF"):
        parse_devices(src, layout)
    src, layout = synthetic(True, desc)
    with pytest.raises(FormatError, match=r"device 'old' instance 3.*not the section footer"):
        parse_devices(src, layout)


def test_synthetic_cpu_with_uncompressed_arrays_and_subsection_fields():
    """cpu_states maps by name: arrays written element by element ("index", as QEMU does
    for arrays it cannot compress), fields found in subsections, absent fields None."""
    seg = {"vmsd_name": "segment", "version": 1, "fields": [
        {"name": n, "type": t, "size": s} for n, t, s in
        (("selector", "uint32", 4), ("base", "uint64", 8), ("limit", "uint32", 4), ("flags", "uint32", 4))]}
    fields = [{"name": "env.regs", "index": i, "type": "uint64", "size": 8} for i in range(16)]
    fields += [{"name": "env.eip", "type": "uint64", "size": 8},
               {"name": "env.segs", "array_len": 6, "type": "struct", "size": 20, "struct": seg}]
    desc = {"devices": [
        {"name": "cpu_common", "instance_id": 1, "vmsd_name": "cpu_common", "version": 1,
         "fields": [{"name": "halted", "type": "uint32", "size": 4}]},
        {"name": "cpu", "instance_id": 1, "vmsd_name": "cpu", "version": 12, "fields": fields,
         "subsections": [{"vmsd_name": "cpu/efer", "version": 1,
                          "fields": [{"name": "env.efer", "type": "uint64", "size": 8}]}]}]}
    payload = b"".join((i * 0x1111).to_bytes(8, "big") for i in range(16)) + (0xFFF0).to_bytes(8, "big")
    for i in range(6):
        payload += _be32(i * 8) + (i << 4).to_bytes(8, "big") + _be32(0xFFFF) + _be32(0x9300)
    payload += _subsection("cpu/efer", 1, (0xD01).to_bytes(8, "big"))
    stream = _section(3, "cpu_common", 1, 1, _be32(1), True) + _section(4, "cpu", 1, 12, payload, True) + b"\0"
    layout, _, _, _ = decoded(SEQ)
    layout = dataclasses.replace(layout, device_offset=0, eof_offset=len(stream) - 1,
                                 vmdesc_offset=len(stream), vmdesc=json.dumps(desc).encode())
    (c,) = cpu_states(parse_devices(BytesSource(stream), layout))
    assert c.index == 1 and c.halted is True
    assert [c.regs[n] for n in GPR_NAMES] == [i * 0x1111 for i in range(16)]
    assert c.rsp == 4 * 0x1111 and c.r15 == 15 * 0x1111 and c.rip == 0xFFF0
    assert (c.ss.selector, c.ss.base, c.gs.selector) == (16, 0x20, 40)
    assert c.efer == 0xD01 and c.long_mode
    assert c.cr0 is None and c.ldt is None and c.gdt is None and c.dr is None and c.tsc_khz is None
    hash(c)
