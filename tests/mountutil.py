"""Real FUSE mounts for tests: the daemon runs in a child process (one mount per process is a
pyfuse3 rule), the test waits for the mount, and always unmounts in ``finally``. A daemon that
logged a traceback fails the test."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

MOUNT_TIMEOUT = 60.0


def ramfs_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "ramfs.cli", *args]


def wait_mounted(mp: Path, proc: subprocess.Popen | None, log: Path | None, timeout=MOUNT_TIMEOUT):
    deadline = time.monotonic() + timeout
    while not os.path.ismount(mp):
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"ramfs exited with {proc.returncode} before mounting:\n"
                                 f"{log.read_text() if log else ''}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{mp} not mounted after {timeout}s")
        time.sleep(0.05)


def force_unmount(mp: Path) -> None:
    if os.path.ismount(mp):
        if subprocess.run(["fusermount3", "-u", str(mp)], capture_output=True).returncode != 0:
            subprocess.run(["fusermount3", "-u", "-z", str(mp)], capture_output=True)


@contextlib.contextmanager
def mounted(source: Path, mp: Path, *extra: str, env: dict | None = None):
    """Mount ``source`` on ``mp`` with ``ramfs mount -f``; yields the daemon's Popen."""
    mp.mkdir(parents=True, exist_ok=True)
    log = mp.parent / f"{mp.name}.log"
    with open(log, "w") as logf:
        proc = subprocess.Popen(ramfs_cmd("mount", "-f", str(source), str(mp), *extra),
                                stdout=logf, stderr=subprocess.STDOUT, env=env)
    try:
        wait_mounted(mp, proc, log)
        yield proc
    finally:
        force_unmount(mp)
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError(f"ramfs daemon did not exit after unmount:\n{log.read_text()}") from None
        text = log.read_text()
        assert "Traceback" not in text, text
        assert proc.returncode == 0, (proc.returncode, text)
        assert not os.path.ismount(mp)
