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

log = logging.getLogger("ramfs")

# 1 MiB: every READ is then as large as FUSE allows (max_pages = 256 pages); larger windows
# only let more requests queue ahead (docs/performance.md has the rows measured).
DEFAULT_READAHEAD_KB = 1024


def _unescape(field: str) -> str:
    # /proc/self/mountinfo escapes space, tab, newline and backslash as \ooo (octal).
    out, i = [], 0
    while i < len(field):
        code = field[i + 1:i + 4]
        if field[i] == "\\" and len(code) == 3 and code.isdigit():
            out.append(chr(int(code, 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def mount_device(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """``MAJ:MIN`` of the last mount on ``mountpoint`` (the one on top), from mountinfo:
    not ``stat``, which on a FUSE mount not yet served would wait for ourselves."""
    found = None
    try:
        with open(mountinfo, encoding="utf-8", errors="surrogateescape") as f:
            for line in f:
                fields = line.split()
                if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                    found = fields[2]
    except OSError:
        return None
    return found


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
