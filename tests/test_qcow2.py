"""qcow2 internal snapshots as images: the VM state ``savevm`` leaves in a disk.

Guests with a qcow2 disk, made by real QEMU at test time, take three snapshots: ``savevm`` of
the paused guest, ``savevm`` of the running guest, and QMP ``snapshot-save`` (a job). The
truth for each is QEMU's own memory: ``pmemsave`` of the paused guest right before (the first
and third), and, for every snapshot, ``pmemsave`` of a fresh QEMU after ``loadvm``. Disks of
qcow2 v2 (``compat=0.10``) and of v3 with extended L2 entries and 16 KiB clusters. A snapshot
converted by ramfs restores in QEMU with the disk reverted to it.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import jsonschema
import pytest

import qemu_images as qi
from mountutil import mounted
from ramfs.format.qcow2 import L1E_OFFSET_MASK, L2E_OFFSET_MASK, parse_header, parse_snapshots
from ramfs.image import open_image
from ramfs.image.files import FileSource
from ramfs.image.qcow2 import snapshots_with_state

MiB = 1 << 20
SCHEMA = json.loads((Path(__file__).resolve().parent.parent / "docs" / "info.schema.json").read_text())
RAM = 64 * MiB
pytestmark = pytest.mark.qemu

DISKS = {"v2": ["-o", "compat=0.10"], "v3-extl2-16k": ["-o", "compat=1.1,extended_l2=on,cluster_size=16k"]}


def _args(disk: Path, blob: Path | None = None) -> qi.MachineArgs:
    args = ["-accel", "kvm", "-accel", "tcg", "-machine", "pc", "-cpu", "qemu64,kvmclock=off", "-m", "64M",
            "-nodefaults", "-no-user-config", "-display", "none",
            "-drive", f"file={disk},if=none,id=d0,format=qcow2,node-name=n0", "-device", "virtio-blk-pci,drive=d0"]
    if blob is not None:
        args += ["-device", f"loader,file={blob},addr=0x1000000,force-raw=on"]
    return qi.MachineArgs(tuple(args), RAM)


@dataclass
class Disk:
    path: Path
    paused: dict[str, Path]  # snapshot -> pmemsave of the paused guest just before it
    loaded: dict[str, Path]  # snapshot -> pmemsave after loadvm in a fresh QEMU


def _job_done(q, job: str) -> None:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        jobs = {j["id"]: j for j in q.qmp.execute("query-jobs")}
        if jobs.get(job, {}).get("status") == "concluded":
            assert "error" not in jobs[job], jobs[job].get("error")
            q.qmp.execute("job-dismiss", {"id": job})
            return
        time.sleep(0.05)
    raise AssertionError(f"{job} did not finish")


@pytest.fixture(scope="module", params=sorted(DISKS))
def disk(request, tmp_path_factory):
    d = tmp_path_factory.mktemp(f"qcow2-{request.param}")
    path = d / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", *DISKS[request.param], str(path), "64M"], check=True)
    blob = d / "blob.bin"
    blob.write_bytes(random.Random(7).randbytes(MiB))
    paused, loaded = {}, {}
    with qi._scratch_dir() as scratch, qi._start(_args(path, blob), scratch, "g") as q:
        time.sleep(0.5)
        q.qmp.execute("stop")
        paused["paused"] = q.pmemsave(RAM, d / "paused.bin")
        assert "Error" not in q.qmp.hmp("savevm paused")
        q.qmp.execute("cont")
        time.sleep(0.3)
        assert "Error" not in q.qmp.hmp("savevm running")  # the guest runs until QEMU stops it
        time.sleep(0.2)
        q.qmp.execute("stop")
        paused["job"] = q.pmemsave(RAM, d / "job-paused.bin")
        q.qmp.execute("snapshot-save", {"job-id": "save", "tag": "job", "vmstate": "n0", "devices": ["n0"]})
        _job_done(q, "save")
    for name in ("paused", "running", "job"):
        fresh = qi.MachineArgs(_args(path).args + ("-S",), RAM)  # paused: loadvm keeps it so
        with qi._scratch_dir() as scratch, qi._start(fresh, scratch, "l") as q:
            out = q.qmp.hmp(f"loadvm {name}")
            assert "Error" not in out, out
            loaded[name] = q.pmemsave(RAM, d / f"{name}-loaded.bin")
    return Disk(path, paused, loaded)


def test_every_snapshot_reads_as_qemu_has_it(disk):
    names = [s.name for s in snapshots_with_state(disk.path)]
    assert names == ["paused", "running", "job"]
    for name in names:
        with open_image(disk.path, snapshot=name, use_cache=False) as img:
            got = bytes(img.read("pc.ram", 0, RAM))
        assert got == disk.loaded[name].read_bytes(), f"{name}: not what loadvm restores"
        if name in disk.paused:
            assert got == disk.paused[name].read_bytes(), f"{name}: not the memory it was taken of"


def test_a_converted_snapshot_restores_with_its_disk(disk, tmp_path):
    out = tmp_path / "running.save"
    r = subprocess.run([sys.executable, "-m", "ramfs.cli", "convert", "-q", "--snapshot", "running", str(disk.path),
                        str(out)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    copy = tmp_path / "disk.qcow2"
    shutil.copy(disk.path, copy)
    subprocess.run(["qemu-img", "snapshot", "-a", "running", str(copy)], check=True)
    dump = tmp_path / "restored.bin"
    qi.restore_and_dump(out, _args(copy), capabilities=("mapped-ram",), out_path=dump)
    assert dump.read_bytes() == disk.loaded["running"].read_bytes()


def test_a_mount_shows_the_snapshots(disk, tmp_path):
    with mounted(disk.path, tmp_path / "one"):
        assert sorted(p.name for p in (tmp_path / "one" / "snapshots").iterdir()) == ["job", "paused", "running"]
        pc_ram = tmp_path / "one" / "snapshots" / "job" / "ram" / "pc.ram"
        assert pc_ram.read_bytes() == disk.loaded["job"].read_bytes()
    saves = tmp_path / "saves"
    saves.mkdir()
    shutil.copy(disk.path, saves / "vm.qcow2")
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(saves / "plain.qcow2"), "16M"], check=True)
    with mounted(saves, tmp_path / "dir"):
        # A disk without VM state is not an image; one with snapshots shows them.
        assert sorted(p.name for p in (tmp_path / "dir").iterdir()) == ["convert", "vm.qcow2"]
        pc = tmp_path / "dir" / "vm.qcow2" / "snapshots" / "paused" / "ram" / "pc.ram"
        assert pc.read_bytes() == disk.paused["paused"].read_bytes()


def _ramfs(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "ramfs.cli", *args], capture_output=True, text=True, timeout=300)


def test_info_lists_the_snapshots_as_qemu_img_does(disk):
    listing = json.loads(_ramfs("info", "--json", str(disk.path)).stdout)
    jsonschema.validate(listing, SCHEMA)
    theirs = json.loads(subprocess.run(["qemu-img", "info", "--output=json", "-U", str(disk.path)],
                                       capture_output=True, text=True, check=True).stdout)
    assert [(s["id"], s["name"], s["date_sec"], s["date_nsec"], s["vm_clock_nsec"], s["vm_state_size"])
            for s in listing["snapshots"]] == \
        [(s["id"], s["name"], s["date-sec"], s["date-nsec"], s["vm-clock-sec"] * 10**9 + s["vm-clock-nsec"],
          s["vm-state-size"])
         for s in theirs["snapshots"]]
    assert listing["qcow2"]["virtual_size"] == theirs["virtual-size"]
    assert listing["qcow2"]["cluster_size"] == theirs["cluster-size"]
    for s in listing["snapshots"]:
        assert s["error"] is None
        assert s["image"]["qcow2_snapshot"]["name"] == s["name"]
        assert [b["idstr"] for b in s["image"]["blocks"]][0] == "pc.ram"
    text = _ramfs("info", str(disk.path)).stdout
    for s in listing["snapshots"]:
        assert f"snapshot {s['name']} (id {s['id']}; --snapshot {s['name']}):" in text
    # --no-cache holds for the whole disk too: every snapshot described, nothing written.
    cache = disk.path.parent / "no-cache-here"
    r = subprocess.run([sys.executable, "-m", "ramfs.cli", "info", "--json", "--no-cache", str(disk.path)],
                       capture_output=True, text=True, timeout=300, env={**os.environ, "RAMFS_CACHE_DIR": str(cache)})
    assert r.returncode == 0 and json.loads(r.stdout)["snapshots"] == listing["snapshots"], r.stderr
    assert not cache.exists()
    one = json.loads(_ramfs("info", "--json", "--snapshot", "job", str(disk.path)).stdout)
    jsonschema.validate(one, SCHEMA)
    assert one["qcow2_snapshot"]["name"] == "job" and one["path"] == f"{disk.path}@job"


def test_check_validates_every_snapshot_and_the_tables(disk, tmp_path):
    r = _ramfs("check", str(disk.path))
    assert r.returncode == 0 and r.stdout.strip() == f"{disk.path}: OK", r.stdout + r.stderr
    with FileSource(str(disk.path)) as f:
        h = parse_header(f)
        snap = next(s for s in parse_snapshots(f, h) if s.name == "running")
        first = snap.vm_state_offset(h) >> h.cluster_bits
        l1 = int.from_bytes(f.read_at(snap.l1_table_offset + (first >> h.l2_bits) * 8, 8), "big")
        l2_off = l1 & L1E_OFFSET_MASK
        width = 16 if h.extended_l2 else 8
        at = l2_off + (first & ((1 << h.l2_bits) - 1)) * width
        entry = f.read_at(at, 8)
    host = int.from_bytes(entry, "big") & L2E_OFFSET_MASK
    assert host
    cases = {  # what a damaged or crafted table does -> what check must say
        "onto the L1 table": (at, (snap.l1_table_offset | (int.from_bytes(entry, "big") & ~L2E_OFFSET_MASK))
                              .to_bytes(8, "big"), "overlaps its L1 table"),
        "twice the same cluster": (at + width, entry, "overlaps VM state cluster"),
        "past the end": (at, ((disk.path.stat().st_size + (1 << 30)) & L2E_OFFSET_MASK
                              | int.from_bytes(entry, "big") & ~L2E_OFFSET_MASK).to_bytes(8, "big"),
                         "lies past the end of the file"),
    }
    for what, (offset, data, says) in cases.items():
        bad = tmp_path / f"{what.replace(' ', '-')}.qcow2"
        shutil.copy(disk.path, bad)
        with open(bad, "r+b") as f:
            f.seek(offset)
            f.write(data)
        r = _ramfs("check", str(bad))
        assert r.returncode == 1, (what, r.stdout, r.stderr)
        assert "snapshot 'running':" in r.stdout and says in r.stdout, (what, r.stdout)
        assert "Traceback" not in r.stderr


def test_a_disk_without_a_snapshot_name_says_what_to_do(disk, tmp_path):
    r = _ramfs("convert", str(disk.path), str(tmp_path / "out.save"))
    assert r.returncode == 2
    assert "qcow2 disk" in r.stderr and "--snapshot" in r.stderr and "paused, running, job" in r.stderr


def _renamed(tmp_path: Path, name: bytes) -> Path:
    """The v2 fuzz seed (real QEMU output, tests/data/qcow2) with snapshot 2 renamed in place."""
    from fuzz.qcow2 import qcow2_blob, qcow2_file
    b = qcow2_blob(qcow2_file("v2"))
    field = b.find(name="snapshot1.name")[0]
    assert b.get(field) == b"s2" and len(name) == field.size
    b.overwrite(field.off, name)
    path = tmp_path / "disk.qcow2"
    path.write_bytes(bytes(b.buf))
    return path


def test_two_snapshots_of_one_name_have_their_own_index(tmp_path):
    path = _renamed(tmp_path, b"s1")
    cache = tmp_path / "cache"
    with open_image(path, snapshot="s1", cache=cache) as first:
        assert first.path.endswith("@s1#1")
    with open_image(path, snapshot="2", cache=cache) as second:
        assert second.path.endswith("@s1#2")
        assert not second.index_from_cache  # not the index of snapshot 1
    with open_image(path, snapshot="2", cache=cache) as again:
        assert again.index_from_cache


@pytest.mark.parametrize("name", [b"\0/", b"..", b"/."])
def test_a_snapshot_name_is_not_a_path(tmp_path, name):
    path = _renamed(tmp_path, name)
    with open_image(path, snapshot="2", cache=tmp_path / "cache") as img:
        assert img.path.startswith(f"{path}@") and img.path.count("/") == str(path).count("/")
        assert img.blocks
