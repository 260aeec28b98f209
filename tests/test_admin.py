"""The standard ways admins mount: mount -t fuse.ramfs, an fstab line, umount and fusermount3."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from pathlib import Path

import pytest

from fixture_data import fixture_path
from ramfs.cli import split_mount_options

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="mount(8) of a FUSE file system needs root here")


def mounts_line(mp: Path) -> list[str] | None:
    for line in Path("/proc/mounts").read_text().splitlines():
        fields = line.split()
        if fields[1] == str(mp):
            return fields
    return None


def daemon_pids(mp: Path) -> list[int]:
    out = subprocess.run(["pgrep", "-f", f"ramfs .*{mp}"], capture_output=True, text=True).stdout
    return [int(p) for p in out.split() if int(p) != os.getpid()]


def wait_gone(mp: Path, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while (mounts_line(mp) or daemon_pids(mp)) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert mounts_line(mp) is None and not daemon_pids(mp), "the daemon outlived its mount"


@pytest.fixture
def entry_point():
    # mount.fuse3 runs "ramfs SOURCE MP -o OPTS" with the shell's default PATH (make venv
    # links the virtualenv's command there; a pip install puts it there itself).
    found = shutil.which("ramfs", path="/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin")
    assert found, "no ramfs on the default PATH: run `make venv` (scripts/link-entry.sh)"
    return found


def test_mount_t_fuse_ramfs_and_umount(entry_point, tmp_path):
    img = fixture_path("firmware/pc-mapped-ram.img")
    mp = tmp_path / "mp"
    mp.mkdir()
    r = subprocess.run(["mount", "-t", "fuse.ramfs", str(img), str(mp), "-o", "ro,direct_io,below_4g=1G"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        fields = mounts_line(mp)
        assert fields[0] == str(img) and fields[2] == "fuse.ramfs" and "ro" in fields[3].split(",")
        facts = json.loads((mp / "image.json").read_text())
        assert facts["path"] == str(img)
        # mount.fuse3 ran our entry point the libfuse way, ramfs's own options included
        # (their effect is tested with ramfs mount; split_mount_options maps them below).
        cmd = subprocess.run(["pgrep", "-af", f"ramfs .*{mp}"], capture_output=True, text=True).stdout
        assert f"{img} {mp} -o ro,direct_io,below_4g=1G" in cmd, cmd
    finally:
        r = subprocess.run(["umount", str(mp)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_gone(mp)


def test_fstab_line_and_fusermount3(entry_point, tmp_path):
    backing = tmp_path / "saves"
    backing.mkdir()
    shutil.copy(fixture_path("firmware/q35-sequential.img"), backing / "vm.save")
    mp = tmp_path / "mp"
    mp.mkdir()
    fstab = tmp_path / "fstab"
    fstab.write_text(f"# what the README shows\n{backing} {mp} fuse.ramfs "
                     f"noauto,nofail,x-systemd.automount,allow_other,jobs=2 0 0\n")
    r = subprocess.run(["mount", "-T", str(fstab), str(mp)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    try:
        fields = mounts_line(mp)
        assert fields[0] == str(backing) and fields[2] == "fuse.ramfs"
        assert "allow_other" in fields[3].split(",")
        assert (mp / "vm.save" / "ram" / "pc.ram").stat().st_size == 64 << 20
        assert (mp / "convert").stat().st_mode & 0o7777 == 0o1777  # allow_other: shared convert/
    finally:
        r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_gone(mp)


def test_mount_options_are_split_between_ramfs_and_fuse():
    fuse, own = split_mount_options(["ro,dev,suid,direct_io,below_4g=2G", "noauto,nofail,x-systemd.automount",
                                     "comment=x,jobs=4,allow_other,defaults,rw,max_read=131072"])
    assert fuse == ["ro", "dev", "suid", "max_read=131072"]
    assert own == {"direct_io": True, "below_4g": "2G", "jobs": "4", "allow_other": True}


def test_systemd_notify_ready_and_stopping(tmp_path):
    """--systemd with a real datagram NOTIFY_SOCKET: READY=1 only once the mount serves,
    STOPPING=1 when it stops (SIGTERM, as systemctl stop sends), journal-style log lines."""
    import signal
    import socket
    import sys
    img = fixture_path("firmware/pc-mapped-ram.img")
    mp = tmp_path / "mp"
    mp.mkdir()
    sock_path = tmp_path / "notify"
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(sock_path))
    sock.settimeout(60)
    env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
    proc = subprocess.Popen([sys.executable, "-m", "ramfs.cli", "mount", "--systemd", str(img), str(mp)],
                            env=env, stderr=subprocess.PIPE, text=True)
    try:
        msg = sock.recv(4096).decode()
        fields = dict(line.split("=", 1) for line in msg.splitlines())
        assert fields["READY"] == "1" and int(fields["MAINPID"]) == proc.pid
        assert proc.poll() is None  # still in the foreground: systemd watches this process
        assert mounts_line(mp)[2] == "fuse.ramfs"
        assert json.loads((mp / "image.json").read_text())["path"] == str(img)  # usable when READY
        proc.send_signal(signal.SIGTERM)
        assert sock.recv(4096).decode() == "STOPPING=1"
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        sock.close()
        subprocess.run(["fusermount3", "-uz", str(mp)], capture_output=True)
    err = proc.stderr.read()
    lines = err.splitlines()
    assert lines and all(ln.startswith(("<6>", "<4>", "<3>", "<7>")) for ln in lines), err
    assert not any(ln[3:5].isdigit() and ln[5:6] == "-" for ln in lines)  # no timestamps of ours
    assert any("mounted" in ln for ln in lines)
    wait_gone(mp)
