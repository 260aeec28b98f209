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
    out = subprocess.run(["pgrep", "-f", f"ramfs.* {mp}"], capture_output=True, text=True).stdout
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
        # allow_other does not open convert/ to everyone: it mirrors the backing directory.
        st, bst = (mp / "convert").stat(), backing.stat()
        assert (st.st_mode, st.st_uid, st.st_gid) == (bst.st_mode, bst.st_uid, bst.st_gid)
    finally:
        r = subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    wait_gone(mp)


@pytest.mark.parametrize("opt", ["below_4g", "numa", "device", "jobs", "log", "run_as", "log="])
def test_value_options_without_a_value_are_refused(opt):
    from ramfs.errors import RamfsError
    with pytest.raises(RamfsError, match="needs a value"):
        split_mount_options([f"ro,{opt}"])


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


def _workers(mp: Path) -> dict[int, dict[str, str]]:
    """The daemon processes of a mount: pid -> /proc/PID/status fields."""
    out = {}
    for pid in daemon_pids(mp):
        try:
            text = Path(f"/proc/{pid}/status").read_text()
        except OSError:
            continue
        out[pid] = dict(line.split(":\t", 1) for line in text.splitlines() if ":\t" in line)
    return out


def test_user_drops_privileges_before_reading_images(tmp_path):
    """--user nobody: the image sits where nobody cannot read it (opened as root before the
    drop); the process that serves and parses runs with nobody's uids and no capabilities;
    the root half only waits and unmounts."""
    import sys
    secret = tmp_path / "root-only"
    secret.mkdir(mode=0o700)
    img = secret / "vm.save"
    shutil.copy(fixture_path("firmware/pc-mapped-ram.img"), img)
    img.chmod(0o600)
    top = Path(__import__("tempfile").mkdtemp(prefix="ramfs-user-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        mp = top / "mp"
        mp.mkdir()
        r = subprocess.run([sys.executable, "-m", "ramfs.cli", "mount", "--user", "nobody", str(img), str(mp)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        try:
            procs = _workers(mp)
            uids = {pid: st["Uid"].split() for pid, st in procs.items()}
            worker = [pid for pid, u in uids.items() if set(u) == {"65534"}]
            root = [pid for pid, u in uids.items() if set(u) == {"0"}]
            assert len(worker) == 1 and len(root) == 1, uids
            assert int(procs[worker[0]]["CapEff"], 16) == 0 and int(procs[worker[0]]["CapPrm"], 16) == 0
            assert int(procs[worker[0]]["PPid"]) == root[0]
            with open(mp / "ram" / "pc.ram", "rb") as f, open(img, "rb"):
                from ramfs.image import open_image
                with open_image(img) as direct:
                    assert f.read(1 << 20) == bytes(direct.read("pc.ram", 0, 1 << 20))
            # The tree mirrors the image (root's, 0600), not the user that reads it.
            st = (mp / "ram" / "pc.ram").stat()
            assert (st.st_uid, st.st_mode & 0o777) == (0, 0o400)
        finally:
            r = subprocess.run([sys.executable, "-m", "ramfs.cli", "umount", str(mp)], capture_output=True,
                               text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        wait_gone(mp)
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_user_in_directory_mode_converts_inside_the_backing_directory_only(tmp_path):
    """Directory mode with --user: convert/ writes as that user into the backing directory
    (which it owns); a hostile stream whose block names try to climb out ("../../x") is
    converted or refused, and nothing appears anywhere else."""
    import sys

    from streams import PS, sequential_stream
    top = Path(__import__("tempfile").mkdtemp(prefix="ramfs-user-", dir="/var/tmp"))
    try:
        top.chmod(0o755)
        backing = top / "saves"
        backing.mkdir()
        os.chown(backing, 65534, 65534)
        outside = top / "outside"
        outside.mkdir(mode=0o777)
        mp = top / "mp"
        mp.mkdir()
        hostile = sequential_stream([(0, 0, b"\x01" * PS), (1, 1, b"\x02" * PS)],
                                    [("../../outside/pwned", 4 * PS), ("/../../../x", 4 * PS)])
        r = subprocess.run([sys.executable, "-m", "ramfs.cli", "mount", "--user", "nobody", str(backing), str(mp)],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 0, r.stderr
        try:
            (mp / "convert" / "evil.save").write_bytes(hostile)
            assert {p.name for p in backing.iterdir()} == {"evil.save"}
            assert (backing / "evil.save").stat().st_uid == 65534
            listed = {p.name for p in (mp / "evil.save" / "ram").rglob("*")}
            assert "pwned" in listed and "x" in listed  # names kept, under ram/
        finally:
            subprocess.run([sys.executable, "-m", "ramfs.cli", "umount", str(mp)], capture_output=True, timeout=60)
        wait_gone(mp)
        assert list(outside.iterdir()) == []
        assert sorted(p.name for p in top.iterdir()) == ["mp", "outside", "saves"]
    finally:
        shutil.rmtree(top, ignore_errors=True)
