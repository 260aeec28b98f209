"""The mount on top at a path, from /proc/self/mountinfo: not ``stat``, which on a FUSE mount
not yet served (or dead) would wait for it or fail."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass


@dataclass(frozen=True)
class MountEntry:
    device: str  # MAJ:MIN (a FUSE mount's bdi is /sys/class/bdi/MAJ:MIN)
    fstype: str  # e.g. fuse.ramfs, tmpfs


def _unescape(field: bytes) -> bytes:
    """A mountinfo field with its octal escapes (``\\040`` for a space) undone."""
    return re.sub(rb"\\([0-7]{3})", lambda m: bytes([int(m.group(1), 8) & 0xFF]), field)


def top_mount(mountpoint: str, mountinfo: str = "/proc/self/mountinfo") -> MountEntry | None:
    """The last mount listed on ``mountpoint`` (the one on top), or None if nothing is."""
    try:
        with open(mountinfo, "rb") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    target = os.fsencode(mountpoint)
    found = None
    for line in lines:
        head, sep, tail = line.partition(b" - ")
        fields = head.split(b" ")
        if not sep or len(fields) < 5 or not tail:
            continue
        if _unescape(fields[4]) == target:
            found = MountEntry(os.fsdecode(fields[2]), os.fsdecode(_unescape(tail.split(b" ")[0])))
    return found
