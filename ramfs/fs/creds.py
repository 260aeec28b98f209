"""Acting as the caller of a FUSE request, one thread at a time.

A root daemon that writes into ``convert/`` on someone's behalf must let the kernel decide
exactly as if that someone had written the file there: directory permissions, ACLs, quotas,
the reserved blocks of ext4. Linux keeps credentials per thread; the C library makes
``setuid``/``setgroups`` process-wide by signalling every thread, so the raw system calls
are used instead (as Samba and nfs-ganesha do): ``setfsuid``, ``setfsgid`` and
``setgroups`` change the calling thread only, and ``capset`` removes ``CAP_SYS_RESOURCE``
from its effective set (changing the fsuid away from 0 already removes the file-system
capabilities, see capabilities(7)). Threads started meanwhile inherit these credentials,
so a conversion's writer threads write as the caller too.
"""

from __future__ import annotations

import contextlib
import ctypes
import ctypes.util
import logging
import os
import platform
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

log = logging.getLogger("ramfs.fs")

# System call numbers (arch/x86/entry/syscalls/syscall_64.tbl; include/uapi/asm-generic/
# unistd.h for aarch64 and riscv64).
_SYSCALLS = {
    "x86_64": {"setgroups": 116, "setfsuid": 122, "setfsgid": 123, "capget": 125, "capset": 126},
    "aarch64": {"setgroups": 159, "setfsuid": 151, "setfsgid": 152, "capget": 90, "capset": 91},
    "riscv64": {"setgroups": 159, "setfsuid": 151, "setfsgid": 152, "capget": 90, "capset": 91},
}
_LINUX_CAPABILITY_VERSION_3 = 0x20080522  # include/uapi/linux/capability.h
CAP_SYS_RESOURCE = 24
NGROUPS_MAX = 65536

_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
_NR = _SYSCALLS.get(platform.machine())


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32),
                ("inheritable", ctypes.c_uint32)]


@dataclass(frozen=True)
class Caller:
    """Who sent a request: from the FUSE request context, groups from /proc."""

    uid: int
    gid: int
    groups: tuple[int, ...] = ()
    umask: int = 0o022
    pid: int = 0


def caller_of(ctx: Any) -> Caller:  # a pyfuse3.RequestContext
    """The caller of a pyfuse3 request. FUSE carries uid, gid, pid and umask, not the
    supplementary groups: they are read from /proc/PID/status (none if the process is gone,
    which can only deny more, never allow more)."""
    return Caller(ctx.uid, ctx.gid, _groups(ctx.pid), ctx.umask, ctx.pid)


def _groups(pid: int) -> tuple[int, ...]:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("Groups:"):
                    return tuple(int(g) for g in line.split()[1:])
    except (OSError, ValueError):
        pass
    return ()


def can_act_as_others() -> bool:
    """Whether this process may take another uid for a request (root on a known arch)."""
    return _NR is not None and os.geteuid() == 0


def _syscall(name: str, *args: object) -> int:
    assert _NR is not None
    r: int = _libc.syscall(_NR[name], *args)
    if r == -1:
        e = ctypes.get_errno()
        raise OSError(e, f"{name}: {os.strerror(e)}")
    return r


def _fsid(name: str, value: int) -> int:
    """setfsuid/setfsgid: returns the previous id; success is seen by asking again (-1 is
    never a valid id, so the call then only reports)."""
    assert _NR is not None
    prev: int = _libc.syscall(_NR[name], ctypes.c_uint(value))
    now = _libc.syscall(_NR[name], ctypes.c_uint(0xFFFFFFFF))
    if now != value:
        raise PermissionError(f"{name}({value}) refused")
    return prev


def _caps() -> tuple[_CapHeader, ctypes.Array[_CapData]]:
    hdr = _CapHeader(_LINUX_CAPABILITY_VERSION_3, 0)
    data = (_CapData * 2)()
    _syscall("capget", ctypes.byref(hdr), data)
    return hdr, data


@contextlib.contextmanager
def acting_as(caller: Caller) -> Iterator[None]:
    """File-system operations of this thread run as ``caller`` inside the block.

    Only for a root daemon (see :func:`can_act_as_others`); everything is restored on exit,
    because trio reuses its worker threads.
    """
    if not can_act_as_others():
        raise PermissionError("only root can act as another user")
    saved_groups = os.getgroups()  # this thread's (the process's: never changed elsewhere)
    hdr, caps = _caps()
    saved_effective = caps[0].effective
    groups = (ctypes.c_uint * max(1, len(caller.groups)))(*caller.groups[:NGROUPS_MAX])
    _syscall("setgroups", len(caller.groups), groups)
    prev_gid = prev_uid = None
    try:
        prev_gid = _fsid("setfsgid", caller.gid)
        prev_uid = _fsid("setfsuid", caller.uid)
        hdr, caps = _caps()
        caps[0].effective &= ~(1 << CAP_SYS_RESOURCE)
        _syscall("capset", ctypes.byref(hdr), caps)
        yield
    finally:
        if prev_uid is not None:
            _fsid("setfsuid", prev_uid)
        if prev_gid is not None:
            _fsid("setfsgid", prev_gid)
        hdr, caps = _caps()
        caps[0].effective = saved_effective
        _syscall("capset", ctypes.byref(hdr), caps)
        back = (ctypes.c_uint * max(1, len(saved_groups)))(*saved_groups)
        _syscall("setgroups", len(saved_groups), back)


@contextlib.contextmanager
def as_caller_if_root(caller: Caller | None) -> Iterator[None]:
    """:func:`acting_as` when there is a caller and we are root; else nothing changes."""
    if caller is None or not can_act_as_others():
        yield
        return
    with acting_as(caller):
        yield
