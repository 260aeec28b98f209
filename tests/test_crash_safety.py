"""Conversions that are interrupted: the writer killed at random points, the daemon killed
and restarted, a read-only backing directory. Nothing appears under the final name, the
source is untouched, finished images survive."""

from __future__ import annotations

import hashlib
import os
import random
import signal
import subprocess
import time
from pathlib import Path

import pytest

from fixture_data import fixture_path
from mountutil import force_unmount, mounted, ramfs_cmd, wait_mounted
from ramfs.image import open_image

KILL_POINTS = int(os.environ.get("RAMFS_KILL_POINTS", "6"))  # `make stress` runs 50


def sha(path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def leftovers(backing: Path) -> list[str]:
    return [n for n in os.listdir(backing) if n.startswith(".ramfs-convert")]


def test_writer_killed_at_random_points(tmp_path):
    backing = tmp_path / "saves"
    backing.mkdir()
    src = fixture_path("libvirt/fw-pc-raw.img")
    before = sha(src)
    size = src.stat().st_size
    rng = random.Random(1234)
    mp = tmp_path / "mp"
    with mounted(backing, mp):
        for i in range(KILL_POINTS):
            cut = rng.randrange(1, size)
            name = f"k{i}.save"
            # dd writes `cut` bytes then waits on a pipe that never delivers more: kill -9 then.
            p = subprocess.Popen(["sh", "-c", f"(head -c {cut} {src}; sleep 60) | "
                                  f"dd of={mp}/convert/{name} bs=64k status=none"], start_new_session=True)
            deadline = time.monotonic() + 20
            while True:
                try:
                    if (mp / "convert" / name).stat().st_size >= min(cut, 1):
                        break
                except FileNotFoundError:
                    pass
                assert time.monotonic() < deadline, "writer never started"
                time.sleep(0.02)
            time.sleep(rng.random() * 0.2)
            os.killpg(p.pid, signal.SIGKILL)
            p.wait()
            deadline = time.monotonic() + 20
            while name in os.listdir(mp / "convert"):
                assert time.monotonic() < deadline, "killed conversion still listed"
                time.sleep(0.05)
            assert not (backing / name).exists()
        # A complete copy afterwards still works.
        r = subprocess.run(["cp", str(src), str(mp / "convert" / "ok.save")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
    assert sha(src) == before
    assert sorted(os.listdir(backing)) == ["ok.save"]


def test_daemon_killed_mid_conversion_and_restarted(tmp_path):
    backing = tmp_path / "saves"
    backing.mkdir()
    src = fixture_path("firmware/q35-sequential.img")
    mp = tmp_path / "mp"
    mp.mkdir()
    with mounted(backing, mp):
        r = subprocess.run(["cp", str(src), str(mp / "convert" / "done.save")], capture_output=True, text=True)
        assert r.returncode == 0
    done_sha = sha(backing / "done.save")
    log = tmp_path / "d.log"
    with open(log, "w") as lf:
        daemon = subprocess.Popen(ramfs_cmd("mount", "-f", str(backing), str(mp)), stdout=lf, stderr=subprocess.STDOUT)
    writer = None
    try:
        wait_mounted(mp, daemon, log)
        writer = subprocess.Popen(["sh", "-c", f"(head -c 900000 {src}; sleep 60) > {mp}/convert/half.save"],
                                  start_new_session=True)
        deadline = time.monotonic() + 20
        while not leftovers(backing):
            assert time.monotonic() < deadline
            time.sleep(0.02)
        time.sleep(0.3)
        daemon.kill()  # SIGKILL: no cleanup at all
        daemon.wait()
    finally:
        if writer is not None:
            os.killpg(writer.pid, signal.SIGKILL)
            writer.wait()
        force_unmount(mp)
    assert leftovers(backing), "the kill should have left a temporary behind"
    assert not (backing / "half.save").exists()
    with mounted(backing, mp):
        assert not leftovers(backing)  # cleaned at start
        assert sorted(os.listdir(mp)) == ["convert", "done.save"]
        assert sha(backing / "done.save") == done_sha
        with open_image(backing / "done.save") as img:
            assert img.encoding == "mapped-ram"


def test_read_only_backing_directory(tmp_path):
    backing = tmp_path / "ro"
    backing.mkdir()
    (backing / "img.save").write_bytes(fixture_path("firmware/pc-sequential.img").read_bytes())
    subprocess.run(["mount", "--bind", str(backing), str(backing)], check=True)
    subprocess.run(["mount", "-o", "remount,bind,ro", str(backing)], check=True)
    try:
        mp = tmp_path / "mp"
        with mounted(backing, mp):
            r = subprocess.run(["cp", str(fixture_path("firmware/q35-sequential.img")), str(mp / "convert" / "x.save")],
                               capture_output=True, text=True)
            assert r.returncode != 0 and "Read-only file system" in r.stderr, r.stderr
            # Reading still works.
            assert (mp / "img.save" / "ram" / "pc.ram").stat().st_size == 64 << 20
        assert os.listdir(backing) == ["img.save"]
    finally:
        subprocess.run(["umount", str(backing)], check=True)


@pytest.mark.parametrize("damage", ["truncate", "shrink-while-mounted"])
def test_broken_region_gives_eio_for_that_read_only(tmp_path, damage):
    backing = tmp_path / "saves"
    backing.mkdir()
    good = backing / "good.save"
    good.write_bytes(fixture_path("firmware/q35-sequential.img").read_bytes())
    bad = backing / "bad.save"
    data = fixture_path("firmware/pc-sequential.img").read_bytes()
    bad.write_bytes(data)
    mp = tmp_path / "mp"
    with mounted(backing, mp) as daemon:
        f = mp / "bad.save" / "ram" / "pc.ram"
        assert f.stat().st_size == 64 << 20  # opened while intact
        with open(bad, "r+b") as fh:  # now cut away the page data
            fh.truncate(300000)
        with open(f, "rb") as fh:
            with pytest.raises(OSError) as e:
                fh.read()
            assert e.value.errno == 5  # EIO
        # The daemon lives on and the other image reads fine.
        assert daemon.poll() is None
        assert (mp / "good.save" / "ram" / "pc.ram").read_bytes()[:16]
    log = (tmp_path / "mp.log").read_text()
    assert "ends at" in log and "Traceback" not in log
