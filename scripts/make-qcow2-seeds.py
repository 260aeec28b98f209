"""Make the qcow2 fuzz seeds in tests/data/qcow2/ with real QEMU (run once; the files are committed).

    .venv/bin/python scripts/make-qcow2-seeds.py [--out tests/data/qcow2]

Each seed is a small qcow2 disk with internal snapshots holding VM state, as QEMU writes it:

* ``v2.qcow2.xz``: ``compat=0.10`` (qcow2 version 2), 64 KiB clusters; ``savevm s1`` of the
  paused guest, ``savevm s2`` of the running guest, and ``disk-only`` (``qemu-img snapshot -c``,
  no VM state);
* ``v3-extl2-16k.qcow2.xz``: ``compat=1.1,extended_l2=on,cluster_size=16k``; QMP
  ``snapshot-save`` (tag ``job``), then ``disk-only``;
* ``v3-512.qcow2.xz``: ``compat=1.1,cluster_size=512`` (the smallest clusters: many L2
  tables); ``savevm s``.

The guest is tiny so that the VM state is small: ``-machine pc -m 16M -nodefaults`` with a
64 KiB firmware that halts at the reset vector, three pages loaded into RAM with ``-device
loader`` and two disk writes (``qemu-io``) so that the snapshots share L2 tables with the
disk. The RAM is mostly zero pages (ZERO records), so a VM state is ~100 KB and a seed
compresses to a few KB. The fuzzer (tests/fuzz/seeds.py) maps every structure of these files.
"""

from __future__ import annotations

import argparse
import lzma
import random
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO / "tests"))

import qemu_images as qi  # noqa: E402

RAM = 16 << 20
DISK = "16M"


def tiny_firmware(path: Path) -> Path:
    """64 KiB (QEMU's smallest pc BIOS): ``hlt; jmp back`` at the reset vector (0xFFFF0)."""
    rom = bytearray(64 << 10)
    rom[0xFFF0:0xFFF3] = b"\xf4\xeb\xfd"
    path.write_bytes(bytes(rom))
    return path


def ram_blob(path: Path) -> Path:
    """A random page, a text page and a pattern page: PAGE records among the ZERO ones."""
    rng = random.Random(18)
    text = b"ramfs qcow2 fuzz seed: a page of guest RAM. " * 100
    pattern = bytes(i * 7 & 0xFF for i in range(4096))
    path.write_bytes(rng.randbytes(4096) + text[:4096] + pattern)
    return path


def machine(disk: Path, firmware: Path, blob: Path) -> qi.MachineArgs:
    args = ("-accel", "kvm", "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64,kvmclock=off", "-m", "16M",
            "-nodefaults", "-no-user-config", "-display", "none", "-S", "-bios", str(firmware),
            "-drive", f"file={disk},if=none,id=d0,format=qcow2,node-name=n0", "-device", "virtio-blk-pci,drive=d0",
            "-device", f"loader,file={blob},addr=0x100000,force-raw=on")
    return qi.MachineArgs(args, RAM)


def hmp(q: qi.QemuProcess, line: str) -> None:
    out = q.qmp.hmp(line)
    if "Error" in out:
        raise SystemExit(f"{line}: {out}")


def job(q: qi.QemuProcess, tag: str) -> None:
    q.qmp.execute("snapshot-save", {"job-id": "save", "tag": tag, "vmstate": "n0", "devices": ["n0"]})
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in q.qmp.execute("query-jobs")}
        if jobs.get("save", {}).get("status") == "concluded":
            if "error" in jobs["save"]:
                raise SystemExit(f"snapshot-save: {jobs['save']['error']}")
            q.qmp.execute("job-dismiss", {"id": "save"})
            return
        time.sleep(0.05)
    raise SystemExit("snapshot-save did not finish")


def make(work: Path, name: str, options: str, steps: list[str], firmware: Path, blob: Path) -> Path:
    disk = work / f"{name}.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", "-o", options, str(disk), DISK], check=True)
    for cmd in ("write -P 0x55 0 64k", "write -P 0xaa 1M 4k"):
        subprocess.run(["qemu-io", "-f", "qcow2", "-c", cmd, str(disk)], check=True, capture_output=True)
    with qi._scratch_dir() as scratch, qi._start(machine(disk, firmware, blob), scratch, name) as q:
        for step in steps:
            kind, _, arg = step.partition(" ")
            if kind == "savevm":
                hmp(q, f"savevm {arg}")
            elif kind == "job":
                job(q, arg)
            elif kind == "cont":
                q.qmp.execute("cont")
                time.sleep(0.2)
            elif kind == "stop":
                q.qmp.execute("stop")
    subprocess.run(["qemu-img", "snapshot", "-c", "disk-only", str(disk)], check=True)
    subprocess.run(["qemu-img", "check", "-q", str(disk)], check=True)
    return disk


SEEDS = {
    "v2": ("compat=0.10", ["savevm s1", "cont", "savevm s2"]),
    "v3-extl2-16k": ("compat=1.1,extended_l2=on,cluster_size=16k", ["job job", "cont", "stop"]),
    "v3-512": ("compat=1.1,cluster_size=512", ["cont", "savevm s"]),
}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=REPO / "tests" / "data" / "qcow2")
    args = ap.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="ramfs-qcow2-seeds-"))
    try:
        firmware, blob = tiny_firmware(work / "fw.bin"), ram_blob(work / "blob.bin")
        for name, (options, steps) in SEEDS.items():
            disk = make(work, name, options, steps, firmware, blob)
            data = disk.read_bytes()
            out = args.out / f"{name}.qcow2.xz"
            out.write_bytes(lzma.compress(data, preset=9 | lzma.PRESET_EXTREME))
            info = subprocess.run(["qemu-img", "snapshot", "-l", str(disk)], capture_output=True, text=True).stdout
            print(f"{out.name}: {len(data)} bytes, {out.stat().st_size} compressed\n{info}")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
