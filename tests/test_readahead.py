"""The mount's readahead: raised at mount time so that the kernel asks for reads as large as
FUSE allows (1 MiB) instead of its 128 KiB default; ``--readahead keep`` leaves the kernel's.
The kernel's own requests, as libfuse's debug log shows them, are the proof."""

from __future__ import annotations

import os
import re
import subprocess
import time
from pathlib import Path

import pytest

from fixture_data import fixture_path
from mountutil import mounted, ramfs_cmd
from ramfs.fs.readahead import mount_device

pytestmark = pytest.mark.skipif(os.geteuid() != 0, reason="needs root: /sys/class/bdi is root's")

IMAGE = "firmware/pc-mapped-ram.img"
MiB = 1 << 20


def _bdi_kb(mp: Path) -> int:
    dev = mount_device(str(mp))
    assert dev is not None
    return int(Path(f"/sys/class/bdi/{dev}/read_ahead_kb").read_text())


def _request_sizes(mp: Path, log: Path) -> list[int]:
    """Read ram/pc.ram sequentially with 4 MiB reads; the sizes of the READ requests the
    kernel sent for it (libfuse's debug log: ``outsize`` is 16 bytes of header + data)."""
    before = log.read_text().count("opcode: READ")
    subprocess.run(["dd", f"if={mp / 'ram' / 'pc.ram'}", "of=/dev/null", "bs=4M"], check=True, capture_output=True)
    # The daemon's stderr reaches the log a little after the reads return: wait until as
    # many bytes as the file holds have been logged (or 10 s, and let the caller say).
    size = (mp / "ram" / "pc.ram").stat().st_size
    deadline = time.monotonic() + 10
    while True:
        text = log.read_text()
        reads = re.findall(r"unique: (\d+), opcode: READ \(15\)", text)[before:]
        replies = dict(re.findall(r"unique: (\d+), success, outsize: (\d+)", text))
        sizes = [int(replies[u]) - 16 for u in reads if u in replies]
        if sum(sizes) >= size or time.monotonic() > deadline:
            return sizes
        time.sleep(0.05)


@pytest.mark.parametrize("option, kb", [([], 1024), (["--readahead", "4M"], 4096), (["-o", "readahead=2M"], 2048),
                                        (["--user", "nobody"], 1024)],
                         ids=["default", "--readahead", "-o", "--user"])
def test_the_mount_reads_in_the_largest_requests(tmp_path, option, kb):
    mp = tmp_path / "mnt"
    with mounted(fixture_path(IMAGE), mp, "--debug", *option):
        assert _bdi_kb(mp) == kb
        sizes = _request_sizes(mp, tmp_path / "mnt.log")
        size = (mp / "ram" / "pc.ram").stat().st_size
        assert max(sizes) == MiB  # FUSE's max_pages: 256 pages
        assert sum(sizes) == size and len(sizes) == size // MiB


def test_keep_leaves_the_kernel_default(tmp_path):
    mp = tmp_path / "mnt"
    with mounted(fixture_path(IMAGE), mp, "--debug", "--readahead", "keep"):
        assert _bdi_kb(mp) < 1024
        sizes = _request_sizes(mp, tmp_path / "mnt.log")
        assert max(sizes) == _bdi_kb(mp) * 1024 < MiB


@pytest.mark.parametrize("bad", ["1", "3G", "lots"])
def test_a_bad_readahead_says_what_is_accepted(tmp_path, bad):
    (tmp_path / "mnt").mkdir()
    r = subprocess.run(ramfs_cmd("mount", "--readahead", bad, str(fixture_path(IMAGE)), str(tmp_path / "mnt")),
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.count("\n") == 1 and ("between 4K and 1G" in r.stderr or "not a size" in r.stderr), r.stderr


def test_mountinfo_names_are_unescaped(tmp_path):
    info = tmp_path / "mountinfo"
    info.write_text("36 25 0:32 / /tmp/a\\040b rw - fuse.ramfs x rw\n"
                    "37 25 0:33 / /tmp/a rw - fuse.ramfs y rw\n"
                    "38 36 0:34 / /tmp/a\\040b rw - fuse.ramfs z rw\n")
    assert mount_device("/tmp/a b", str(info)) == "0:34"  # the mount on top
    assert mount_device("/tmp/a", str(info)) == "0:33"
    assert mount_device("/tmp/c", str(info)) is None
