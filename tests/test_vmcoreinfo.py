"""The guest's VMCOREINFO note in core.elf, against QEMU's own ``dump-guest-memory``.

A Linux guest with ``-device vmcoreinfo`` publishes the guest-physical address of its
VMCOREINFO ELF note through fw_cfg; QEMU keeps that in the device state and appends the note,
read from guest memory, to the PT_NOTE of its ELF dumps. The real guest is Debian 12's kernel
booted by ``qemu_images.build_linux`` (cached); QEMU's dumps are the ground truth.
"""

from __future__ import annotations

import shutil
import struct
import subprocess
import sys
import time

import pytest
import qemu_images as qi
from fixture_data import fixture_path
from mountutil import mounted
from test_phys import elf_loads, elf_notes

from ramfs.format.vmstate import FW_CFG_VMCOREINFO_FORMAT_ELF, VmcoreinfoState
from ramfs.image import open_image
from ramfs.views.elfcore import (
    MAX_GUEST_NOTE_SIZE,
    ElfCore,
    cpus_of,
    guest_note,
    vmcoreinfo_of,
)
from ramfs.image.phys import phys_map
from ramfs.views.phys import PhysView

MiB = 1 << 20
VMCOREINFO = (b"VMCOREINFO", 0)


def phdrs(core: bytes) -> list[tuple[int, int, int, int]]:
    """(p_type, p_offset, p_paddr, p_filesz) of every program header."""
    phoff, = struct.unpack_from("<Q", core, 32)
    phnum, = struct.unpack_from("<H", core, 56)
    out = []
    for i in range(phnum):
        p_type, _, off, _, paddr, filesz, _, _ = struct.unpack_from("<IIQQQQQQ", core, phoff + 56 * i)
        out.append((p_type, off, paddr, filesz))
    return out


def note_segment(core: bytes) -> bytes:
    (_, off, _, size), = [p for p in phdrs(core) if p[0] == 4]
    return core[off:off + size]


def assert_consistent(core: ElfCore) -> None:
    """PT_NOTE right after the program headers, the PT_LOADs' data right after it, in order."""
    head = core.read(0, len(core.header))
    table = phdrs(head)
    phnum, = struct.unpack_from("<H", head, 56)
    (_, note_off, _, note_size), = [p for p in table if p[0] == 4]
    assert note_off == 64 + 56 * phnum and note_off + note_size == len(core.header)
    pos = len(core.header)
    for _, off, _, size in (p for p in table if p[0] == 1):
        assert off == pos
        pos += size
    assert pos == core.size


def test_guest_note_is_validated_as_dump_guest_memory_does():
    """dump.c dump_init: every case where QEMU warns and dumps without the note, and the note
    it appends (padded, with vmcoreinfo_update_phys_base's NUL after the desc)."""
    text = b"OSRELEASE=6.1.0\nPAGESIZE=4096\n"  # 30 bytes: 2 bytes of padding
    name = b"VMCOREINFO\0"
    raw = struct.pack("<III", len(name), len(text), 0) + name + b"\xee" + text + b"\xee\xee"
    memory = {0x5000: raw + b"\xdd" * 64}

    def read(gpa, n):
        for base, data in memory.items():
            if base <= gpa < base + len(data):
                return data[gpa - base:gpa - base + n]
        return b""  # past the end of memory: QEMU reads zeros there

    def state(**kw):
        args = {"offset": 0, "has_vmcoreinfo": True, "host_format": 0,
                "guest_format": FW_CFG_VMCOREINFO_FORMAT_ELF, "size": 4096, "paddr": 0x5000}
        return VmcoreinfoState(**(args | kw))

    note, why = guest_note(state(), read)
    assert why is None and len(note) == 12 + 12 + 32
    assert note == raw[:24] + text + b"\0\xee"  # the first padding byte is the NUL QEMU puts there
    assert guest_note(state(size=len(note)), read)[0] == note  # size == the padded note: fits
    assert guest_note(None, read) == (None, "no vmcoreinfo device")
    assert guest_note(state(has_vmcoreinfo=False), read) == (None, "guest note is not present")
    assert guest_note(state(size=11), read) == (None, "guest note size is invalid: 11")
    too_big = MAX_GUEST_NOTE_SIZE + 1
    assert guest_note(state(size=too_big), read) == (None, f"guest note size is invalid: {too_big}")
    assert guest_note(state(guest_format=0), read) == (None, "guest note format is unsupported: 0")
    assert guest_note(state(guest_format=2), read) == (None, "guest note format is unsupported: 2")
    assert guest_note(state(size=len(note) - 1), read) == (None, "Invalid guest note header")
    memory[0x9000] = struct.pack("<III", 4, MAX_GUEST_NOTE_SIZE + 1, 0)
    assert guest_note(state(paddr=0x9000, size=MAX_GUEST_NOTE_SIZE), read) == (None, "Invalid guest note header")
    # Another name: appended as it is (no NUL: phys_base is only looked for in VMCOREINFO).
    other = struct.pack("<III", 4, 5, 7) + b"XEN\0" + b"abcde\xee\xee\xee"
    memory[0x9000] = other
    assert guest_note(state(paddr=0x9000), read) == (other, None)
    # A note whose header lies past the end of memory reads as zeros: an empty note.
    assert guest_note(state(paddr=1 << 40), read) == (bytes(12), None)


@pytest.mark.parametrize("name", ["firmware/q35-sequential.img", "firmware/pc-mapped-ram.img"])
def test_guest_note_goes_after_the_cpu_notes_and_moves_the_loads(name):
    """With a note (here planted in the view at 16 MiB): PT_NOTE grows by exactly the padded
    note, after the CPU notes, and every PT_LOAD moves with it and still reads its range."""
    desc = b"OSRELEASE=ramfs-test\nNUMBER(phys_base)=0\n"
    note = struct.pack("<III", 11, len(desc), 0) + b"VMCOREINFO\0\0" + desc + bytes(-len(desc) % 4)
    paddr = 16 * MiB

    class Planted(PhysView):
        def read(self, gpa, size, nowait=False):
            data = bytearray(super().read(gpa, size, nowait))
            lo, hi = max(gpa, paddr), min(gpa + len(data), paddr + len(note))
            if lo < hi:
                data[lo - gpa:hi - gpa] = note[lo - paddr:hi - paddr]
            return bytes(data)

    with open_image(fixture_path(name)) as img:
        view = Planted(img, phys_map(img))
        plain = ElfCore(view, cpus_of(img))
        assert plain.guest_note is None and plain.guest_note_skipped == "no vmcoreinfo device"
        info = VmcoreinfoState(offset=0, has_vmcoreinfo=True, host_format=1, guest_format=1, size=4096, paddr=paddr)
        core = ElfCore(view, cpus_of(img), info)
        assert core.guest_note == note
        head = core.read(0, len(core.header))
        assert note_segment(head) == note_segment(plain.header) + note
        assert elf_notes(head)[VMCOREINFO] == desc
        assert core.size == plain.size + len(note)
        assert_consistent(core)
        assert_consistent(plain)
        for paddr_, off, n in elf_loads(head):
            for k in (0, paddr - paddr_ if paddr_ <= paddr < paddr_ + n else n // 2, n - 4096):
                assert core.read(off + k, 4096) == view.read(paddr_ + k, 4096)


@pytest.mark.parametrize("name", ["firmware/q35-sequential.img", "firmware/pc-mapped-ram.img"])
def test_guest_without_the_device_gets_no_guest_note(name):
    with open_image(fixture_path(name)) as img:
        assert vmcoreinfo_of(img) is None
        core = ElfCore(PhysView(img, phys_map(img)), cpus_of(img))
        assert core.guest_note is None
        assert set(elf_notes(core.header)) == {(b"CORE", 1), (b"QEMU", 0)}


@pytest.mark.qemu
def test_firmware_guest_with_the_device_but_no_note_gets_none(tmp_path, request):
    """-device vmcoreinfo, but SeaBIOS never writes etc/vmcoreinfo: QEMU warns "guest note is
    not present" and dumps no guest note; neither does core.elf, and the PT_NOTEs are equal."""
    args = qi.MachineArgs(("-accel", "tcg", "-machine", "q35", "-m", "64M", "-nodefaults", "-no-user-config",
                           "-display", "none", "-device", "vmcoreinfo"), 64 * MiB)
    dump, seq = tmp_path / "qemu.elf", tmp_path / "seq.img"
    request.addfinalizer(lambda: dump.unlink(missing_ok=True))
    with qi._scratch_dir() as scratch, qi._booted_guest(args, scratch) as g:
        time.sleep(0.5)
        g.qmp.execute("stop")
        qi.dump_guest_memory(g, dump)
        g.save(seq)
        log = g.log_path
        assert "guest note is not present" in log.read_text(errors="replace")
    head = qi.elf_dump_head(dump)
    assert VMCOREINFO not in elf_notes(head)
    with open_image(seq) as img:
        info = vmcoreinfo_of(img)
        assert info == VmcoreinfoState(offset=0, has_vmcoreinfo=False, host_format=FW_CFG_VMCOREINFO_FORMAT_ELF,
                                       guest_format=0, size=0, paddr=0)  # as vmcoreinfo_reset_hold left it
        core = ElfCore(PhysView(img, phys_map(img)), cpus_of(img))
        assert core.guest_note is None and core.guest_note_skipped == "guest note is not present"
        assert note_segment(core.header) == note_segment(head)


@pytest.mark.qemu
def test_core_has_the_linux_guests_vmcoreinfo_note_as_qemu_dumps_it(tmp_path, request):
    """A Debian 12 kernel that published its VMCOREINFO note, saved sequential and mapped-ram:
    core.elf's PT_NOTE equals QEMU's dump of the original guest byte for byte (CPU notes, then
    the VMCOREINFO note), and its PT_LOADs equal those of QEMU's dump of a QEMU that restored
    the image (addresses, sizes, every byte)."""
    g = qi.build_linux(qi.LINUX_Q35_VMCOREINFO)
    original = g.dump_head.read_bytes()  # QEMU's dump of the guest before it was saved
    want = elf_notes(original)
    assert set(want) == {(b"CORE", 1), (b"QEMU", 0), VMCOREINFO}
    release = g.info["packages"]["kernel"].removeprefix("boot/vmlinuz-")
    assert want[VMCOREINFO].startswith(b"OSRELEASE=%s\n" % release.encode())
    dump = tmp_path / "qemu.elf"
    request.addfinalizer(lambda: dump.unlink(missing_ok=True))  # as big as the guest's RAM
    for image, capabilities in ((g.sequential, ()), (g.mapped_ram, ("mapped-ram",))):
        qi.dump_restored(g, image, capabilities, dump)
        truth = qi.elf_dump_head(dump)
        assert note_segment(truth) == note_segment(original), image.name
        with open_image(image) as img, open(dump, "rb") as theirs:
            info = vmcoreinfo_of(img)
            assert info.has_vmcoreinfo and info.guest_format == FW_CFG_VMCOREINFO_FORMAT_ELF
            view = PhysView(img, phys_map(img))
            core = ElfCore(view, cpus_of(img))
            ours = core.read(0, len(core.header))
            assert elf_notes(ours)[VMCOREINFO] == want[VMCOREINFO]
            assert note_segment(ours) == note_segment(original), image.name
            assert ours.endswith(core.guest_note) and len(core.guest_note) <= info.size
            assert core.guest_note[:len(core.guest_note) - 4] == view.read(info.paddr, len(core.guest_note) - 4)
            assert ours[18:20] == truth[18:20]  # e_machine: EM_X86_64, the kernel runs in long mode
            assert_consistent(core)
            our_loads, their_loads = elf_loads(ours), elf_loads(truth)
            assert [(p, n) for p, _, n in our_loads] == [(p, n) for p, _, n in their_loads]
            for (paddr, off, n), (_, toff, _) in zip(our_loads, their_loads):
                for k in range(0, n, 64 * MiB):
                    m = min(64 * MiB, n - k)
                    theirs.seek(toff + k)
                    assert core.read(off + k, m) == theirs.read(m), f"{image.name}: {paddr + k:#x}+{m:#x}"
        dump.unlink()


@pytest.mark.qemu
def test_ramfs_core_and_the_mount_carry_the_note(tmp_path):
    """``ramfs core`` and the mount's phys/core.elf build their core the default way: the note
    is found from the image alone."""
    g = qi.build_linux(qi.LINUX_Q35_VMCOREINFO)
    want = note_segment(g.dump_head.read_bytes())
    out = tmp_path / "core.elf"
    r = subprocess.run([sys.executable, "-m", "ramfs.cli", "core", "-q", str(g.mapped_ram), str(out)],
                       capture_output=True, text=True, check=False)
    assert r.returncode == 0, r.stderr
    with open(out, "rb") as f:
        assert note_segment(f.read(1 * MiB)) == want
    if shutil.which("readelf"):
        r = subprocess.run(["readelf", "-n", str(out)], capture_output=True, text=True, check=False)
        assert r.returncode == 0 and not r.stderr, r.stderr
        assert "VMCOREINFO" in r.stdout
    mp = tmp_path / "mp"
    with mounted(g.sequential, mp), open(mp / "phys" / "core.elf", "rb") as f:
        assert note_segment(f.read(1 * MiB)) == want
