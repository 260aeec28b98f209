"""The readahead of our own mount: the kernel's 128 KiB default caps FUSE reads.

The kernel reads a FUSE file ahead by its mount's backing device info (``bdi``), 128 KiB
unless raised, and never sends a READ larger than that readahead window, however large the
reader's ``read(2)`` (and never larger than ``max_pages``, which libfuse already negotiates
at 1 MiB from its ``max_write``). Raising ``/sys/class/bdi/MAJ:MIN/read_ahead_kb`` of the
mount makes sequential reads arrive as 1 MiB requests instead of 128 KiB ones (measured in
docs/performance.md).

Two things fix *when* it can be written. The INIT reply sets ``ra_pages = min(ra_pages,
max_readahead)`` with the ``max_readahead`` the kernel itself offered (128 KiB), so a value
written before INIT is lost: it is written after the INIT request has been answered. And
sysfs checks permission at ``open``: the file is opened right after the mount syscall, as
whoever mounted (root, with ``--user`` before the drop), and written later through that
descriptor by the process serving the mount. A mount that may not open it (not root) keeps
the kernel's value, and says so in the log.
"""

from __future__ import annotations

import logging
import os

from ramfs.fs.mountinfo import top_mount

log = logging.getLogger("ramfs")

# 1 MiB: every READ is then as large as FUSE allows (max_pages = 256 pages); larger windows
# only let more requests queue ahead (docs/performance.md has the rows measured).
DEFAULT_READAHEAD_KB = 1024


def mount_device(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """``MAJ:MIN`` of the mount on top at ``mountpoint``."""
    entry = top_mount(mountpoint, mountinfo)
    return entry.device if entry is not None else None


def open_readahead(mountpoint: str) -> int | None:
    """A descriptor for writing the mount's ``read_ahead_kb``, or None (said in the log)."""
    dev = mount_device(mountpoint)
    if dev is None:
        log.info("readahead: %s not found in /proc/self/mountinfo; the kernel's default stays", mountpoint)
        return None
    path = f"/sys/class/bdi/{dev}/read_ahead_kb"
    try:
        return os.open(path, os.O_WRONLY | os.O_CLOEXEC)
    except OSError as e:
        log.info("readahead: cannot open %s (%s); the kernel's default stays (as root, ramfs raises it)",
                 path, e.strerror)
        return None


def set_readahead(fd: int, kb: int) -> None:
    """Write ``kb`` through ``fd`` (from :func:`open_readahead`) and close it."""
    try:
        os.write(fd, f"{kb}\n".encode())
        log.info("readahead: %d KiB", kb)
    except OSError as e:
        log.warning("readahead: cannot set %d KiB: %s", kb, e.strerror)
    finally:
        os.close(fd)
