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

from ramfs.errors import FormatError, ImageIOError, NotAnImageError, RamfsError, TruncatedError, UnsupportedError
from ramfs.format.qcow2 import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_OFLAG_COMPRESSED, QCOW_OFLAG_ZERO,
                                Qcow2Header, Snapshot, l2_entry, parse_header, parse_snapshots,
                                snapshot_table_size)
from ramfs.image.files import FileSource, WouldBlock

ZERO = -1  # the cluster reads as zeros (unallocated, or QCOW_OFLAG_ZERO)
SUBCLUSTERS = 32  # extended L2: 32 subclusters per cluster, bitmap allocated | zero << 32


class VmstateSource:
    """One snapshot's VM state, read through its own L1/L2 tables."""

    def __init__(self, file: FileSource, snapshot_name: str | int):
        """``snapshot_name``: a snapshot's name, else its id; an ``int`` is its index in the
        snapshot table (names and ids need not be unique)."""
        self.file = file
        self.header: Qcow2Header = parse_header(file)
        snaps = parse_snapshots(file, self.header)
        self._table_size = snapshot_table_size(self.header, snaps)
        if isinstance(snapshot_name, int):
            found = snaps[snapshot_name:snapshot_name + 1] if snapshot_name >= 0 else []
        else:
            found = [s for s in snaps if s.name == snapshot_name] or [s for s in snaps if s.id == snapshot_name]
        if not found:
            names = ", ".join(s.name for s in snaps if s.vm_state_size) or "none"
            raise FormatError(f"{file.path}: no snapshot {snapshot_name!r} (snapshots with VM state: {names})")
        self.snapshot: Snapshot = found[0]
        if not self.snapshot.vm_state_size:
            raise UnsupportedError(f"{file.path}: snapshot {self.snapshot.name!r} has no VM state "
                                   f"(a disk-only snapshot)")
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
        """Read the snapshot's L1 and the L2 tables of its VM state into ``_hosts``, checking
        what QEMU's own checks (qcow2_read_snapshots, qcow2_validate_table, qcow2_get_host_offset,
        qcow2-refcount.c's check_refcounts_l2) would find corrupt: unaligned or out-of-file
        tables and clusters, subclusters both allocated and zero, and clusters that overlap
        the header, the snapshot table, the L1 and L2 tables or each other, which only a
        damaged or crafted file has and which would make one cluster's bytes appear twice."""
        h, s, f = self.header, self.snapshot, self.file
        name = f"qcow2 snapshot {s.name!r}"
        csize = self._csize
        if self._base % csize:
            raise FormatError(f"{name}: VM state offset not cluster aligned")
        if s.l1_table_offset % csize or not s.l1_table_offset:
            raise FormatError(f"{name}: L1 table offset {s.l1_table_offset:#x} is not a cluster "
                              f"other than the header's", s.l1_table_offset)
        first = self._base >> self._cbits
        count = -(-self.size // csize)
        l2_entries = 1 << h.l2_bits
        l1_raw = f.read_at(s.l1_table_offset, s.l1_size * 8)
        if len(l1_raw) < s.l1_size * 8:
            raise TruncatedError(f"{name}: its L1 table runs past the end of the file", s.l1_table_offset)
        used = _Clusters(f.size, self._cbits)
        used.claim(0, csize, "the qcow2 header")
        used.claim(h.snapshots_offset, self._table_size, "the snapshot table")
        used.claim(s.l1_table_offset, s.l1_size * 8, f"the L1 table of {s.name!r}")
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
                if l2_off % csize:
                    raise FormatError(f"{name}: L2 table offset {l2_off:#x} not cluster aligned", l2_off)
                raw = f.read_at(l2_off, csize)
                if len(raw) < csize:
                    raise TruncatedError(f"{name}: an L2 table runs past the end of the file", l2_off)
                used.claim(l2_off, csize, "an L2 table")
                cached_l2 = (l2_off, raw)
            entry, bitmap = l2_entry(cached_l2[1], l2i, h.extended_l2)
            if entry & QCOW_OFLAG_COMPRESSED:
                raise UnsupportedError(f"{name}: compressed clusters in the VM state (QEMU never "
                                       f"writes them there)")
            host = entry & L2E_OFFSET_MASK
            if h.extended_l2:
                alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
                if alloc & zero:
                    raise FormatError(f"{name}: extended L2 entry {l2i} marks subclusters both "
                                      f"allocated and zero", l2_off)
                if alloc and not host:
                    raise FormatError(f"{name}: extended L2 entry {l2i} has allocated subclusters "
                                      f"and no cluster", l2_off)
                if not alloc:
                    self._hosts.append(ZERO)
                    continue
                if alloc != 0xFFFFFFFF:
                    self._bitmaps[k] = bitmap
            elif entry & QCOW_OFLAG_ZERO or not host:
                self._hosts.append(ZERO)
                continue
            if host % csize:
                raise FormatError(f"{name}: L2 entry {l2i} points to an unaligned cluster {host:#x}", l2_off)
            if host >= f.size:
                raise FormatError(f"{name}: L2 entry {l2i} points past the end of the file "
                                  f"({host:#x} >= {f.size:#x})", l2_off)
            used.claim(host, csize, "a cluster of the VM state")
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


class _Clusters:
    """Which host clusters a snapshot's VM state map uses: one bit per cluster of the file,
    so memory follows the file's size over the cluster size (a 100 GiB file of 64 KiB
    clusters: 200 KiB), never the number of entries read."""

    def __init__(self, file_size: int, cluster_bits: int):
        self._bits = cluster_bits
        self._map = bytearray(((file_size >> cluster_bits) + 1 + 7) // 8)
        self._what: dict[int, str] = {}  # cluster -> what claimed it, for metadata only

    def claim(self, offset: int, size: int, what: str) -> None:
        if size <= 0:
            return
        lo, hi = offset >> self._bits, (offset + size - 1) >> self._bits
        for c in range(lo, hi + 1):
            if c >> 3 >= len(self._map):
                return  # past the end of the file: the read of it says so
            bit = 1 << (c & 7)
            if self._map[c >> 3] & bit:
                other = self._what.get(c, "a cluster of the VM state")
                raise FormatError(f"qcow2: {what} overlaps {other} at {c << self._bits:#x} "
                                  f"(a damaged or crafted file)", c << self._bits)
            self._map[c >> 3] |= bit
            if what != "a cluster of the VM state":
                self._what[c] = what


def needs_snapshot_error(path: str) -> NotAnImageError:
    """What to say when a qcow2 disk is named where a save image (or ``--snapshot``) is wanted."""
    try:
        names = ", ".join(sn.name for sn in snapshots_with_state(path)) or "none"
    except RamfsError as e:
        names = f"unreadable: {e}"
    return NotAnImageError(f"{path} is a qcow2 disk: name one of its snapshots with VM state "
                           f"(--snapshot NAME; snapshots with VM state: {names})")


def snapshots_with_state(path: str | os.PathLike[str]) -> list[Snapshot]:
    """The snapshots of a qcow2 file that have VM state (what a mount shows)."""
    with FileSource(os.fspath(path)) as f:
        h = parse_header(f)
        return [s for s in parse_snapshots(f, h) if s.vm_state_size]


__all__ = ["VmstateSource", "WouldBlock", "needs_snapshot_error", "snapshots_with_state"]
