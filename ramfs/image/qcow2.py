"""The VM state of a qcow2 internal snapshot as a byte source (offset 0 = the stream's first
byte), for the same reader as a save file (ramfs.image.model).

The snapshot's L1 and L2 tables are read once, when the source is opened, into a map of the
VM state's clusters (an array of host offsets; ~8 bytes per cluster, so 1 MiB for a 8 GiB state
in 64 KiB clusters): a read then costs one ``pread`` per contiguous run of host clusters, and
nothing else. The qcow2 file is only read, never locked or written; the map is taken from the
file as it is at open, so a disk being written by a running QEMU is read consistently only for
snapshots, whose clusters QEMU never changes while they exist (docs/formats.md §8).
"""

from __future__ import annotations

import errno
import os
from array import array
from collections.abc import Iterator
from typing import Self

from ramfs.errors import FormatError, ImageIOError, TruncatedError, UnsupportedError
from ramfs.format.qcow2 import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO,
                                Qcow2Header, Snapshot, l2_entry, parse_header, parse_snapshots)
from ramfs.image.files import FileSource, WouldBlock

ZERO = -1  # the cluster reads as zeros (unallocated, or QCOW_OFLAG_ZERO)
SUBCLUSTERS = 32  # extended L2: 32 subclusters per cluster, bitmap allocated | zero << 32


class VmstateSource:
    """One snapshot's VM state, read through its own L1/L2 tables."""

    def __init__(self, file: FileSource, snapshot_name: str):
        self.file = file
        self.header: Qcow2Header = parse_header(file)
        snaps = parse_snapshots(file, self.header)
        found = [s for s in snaps if s.name == snapshot_name] or [s for s in snaps if s.id == snapshot_name]
        if not found:
            names = ", ".join(s.name for s in snaps if s.vm_state_size) or "none"
            raise FormatError(f"{file.path}: no snapshot {snapshot_name!r} (snapshots with VM state: {names})")
        self.snapshot: Snapshot = found[0]
        if not self.snapshot.vm_state_size:
            raise UnsupportedError(f"{file.path}: snapshot {snapshot_name!r} has no VM state (a disk-only snapshot)")
        self.path = f"{file.path}@{self.snapshot.name}"
        self.stat = file.stat
        self.size = self.snapshot.vm_state_size
        self.fd = file.fd
        self._cbits = self.header.cluster_bits
        self._csize = 1 << self._cbits
        self._base = self.snapshot.vm_state_offset(self.header)
        self._hosts = array("q")  # per cluster of the state: host offset or ZERO
        self._bitmaps: dict[int, int] = {}  # extended L2: cluster index -> subcluster bitmap
        self._build_map()

    def _build_map(self) -> None:
        h, s, f = self.header, self.snapshot, self.file
        if self._base % self._csize:
            raise FormatError("qcow2 VM state offset not cluster aligned")
        first = self._base >> self._cbits
        count = -(-self.size // self._csize)
        l2_entries = 1 << h.l2_bits
        l1_raw = f.read_at(s.l1_table_offset, s.l1_size * 8)
        if len(l1_raw) < s.l1_size * 8:
            raise TruncatedError(f"qcow2 snapshot {s.name!r}: its L1 table runs past the end of the file",
                                 s.l1_table_offset)
        cached_l2: tuple[int, bytes] | None = None
        for k in range(count):
            vc = first + k
            l1i, l2i = vc >> h.l2_bits, vc & (l2_entries - 1)
            if l1i >= s.l1_size:
                self._hosts.append(ZERO)
                continue
            l2_off = int.from_bytes(l1_raw[l1i * 8:l1i * 8 + 8], "big") & L1E_OFFSET_MASK
            if not l2_off:
                self._hosts.append(ZERO)
                continue
            if cached_l2 is None or cached_l2[0] != l2_off:
                raw = f.read_at(l2_off, self._csize)
                if len(raw) < self._csize:
                    raise TruncatedError("qcow2 L2 table runs past the end of the file", l2_off)
                cached_l2 = (l2_off, raw)
            entry, bitmap = l2_entry(cached_l2[1], l2i, h.extended_l2)
            if entry & QCOW_OFLAG_COMPRESSED:
                raise UnsupportedError(f"qcow2 snapshot {s.name!r}: compressed clusters in the VM state")
            host = entry & L2E_OFFSET_MASK
            if h.extended_l2:
                if bitmap & 0xFFFFFFFF and not host:
                    raise FormatError("qcow2 extended L2 entry with allocated subclusters and no cluster")
                self._hosts.append(host if bitmap & 0xFFFFFFFF else ZERO)
                if bitmap & 0xFFFFFFFF != 0xFFFFFFFF and bitmap & 0xFFFFFFFF:
                    self._bitmaps[k] = bitmap
            elif entry & QCOW_OFLAG_ZERO or not host:
                self._hosts.append(ZERO)
            else:
                if host % self._csize:
                    raise FormatError(f"qcow2 L2 entry points to an unaligned cluster {host:#x}")
                self._hosts.append(host)

    # -- reads ---------------------------------------------------------------------------
    def _runs(self, offset: int, size: int) -> Iterator[tuple[int | None, int]]:
        """``(host offset or None, length)`` covering ``[offset, offset+size)`` of the state."""
        end = min(offset + size, self.size)
        pos = offset
        sub = self._csize // 32
        while pos < end:
            k = pos >> self._cbits
            within = pos & (self._csize - 1)
            n = min(end - pos, self._csize - within)
            host = self._hosts[k]
            bitmap = self._bitmaps.get(k)
            if bitmap is not None:  # extended L2: subcluster by subcluster
                n = min(n, sub - within % sub)
                allocated = bitmap >> (within // sub) & 1
                yield (host + within if allocated else None), n
            else:
                yield (None if host == ZERO else host + within), n
            pos += n

    def read_at(self, offset: int, size: int) -> bytes:
        if size <= 0 or offset >= self.size:
            return b""
        buf = bytearray(min(size, self.size - offset))
        self.readinto_at(memoryview(buf), offset)
        return bytes(buf)

    def readinto_at(self, buf: memoryview, offset: int, nowait: bool = False) -> None:
        if offset + len(buf) > self.size:
            raise ImageIOError(f"{self.path} ends at {self.size:#x}, inside data the index points to", errno.EIO)
        pos = 0
        run_host, run_start, run_len = None, 0, 0
        for host, n in self._runs(offset, len(buf)):
            if host is not None and run_host is not None and run_host + run_len == host:
                run_len += n  # contiguous on the host: one pread
            else:
                if run_len:
                    self._fill(buf[run_start:run_start + run_len], run_host, nowait)
                run_host, run_start, run_len = host, pos, n
            pos += n
        if run_len:
            self._fill(buf[run_start:run_start + run_len], run_host, nowait)

    def _fill(self, view: memoryview, host: int | None, nowait: bool) -> None:
        if host is None:
            view[:] = bytes(len(view))
        else:
            self.file.readinto_at(view, host, nowait)

    def readv_at(self, buffers: list[memoryview], offset: int, nowait: bool = False) -> bool:
        for b in buffers:
            mv = memoryview(b)
            self.readinto_at(mv, offset, nowait)
            offset += len(mv)
        return True

    def data_ranges(self, start: int, end: int) -> Iterator[tuple[int, int]]:
        pos: int = start
        a: int | None = None
        for host, n in self._runs(start, end - start):
            if host is not None and a is None:
                a = pos
            elif host is None and a is not None:
                yield a, pos
                a = None
            pos += n
        if a is not None:
            yield a, pos

    def close(self) -> None:
        self.file.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def snapshots_with_state(path: str | os.PathLike[str]) -> list[Snapshot]:
    """The snapshots of a qcow2 file that have VM state (what a mount shows)."""
    with FileSource(os.fspath(path)) as f:
        h = parse_header(f)
        return [s for s in parse_snapshots(f, h) if s.vm_state_size]


__all__ = ["VmstateSource", "WouldBlock", "snapshots_with_state"]
