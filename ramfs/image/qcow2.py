"""The VM state of a qcow2 internal snapshot as a byte source (offset 0 = the stream's first
byte), for the same reader as a save file (ramfs.image.model).

The snapshot's L1 and L2 tables are read once, when the source is opened, into a map of the
VM state's clusters (extents: runs of clusters contiguous in the file, or of zeros; 16 bytes
each, and a state QEMU wrote in one go is one or a few of them): a read then costs one
``pread`` per contiguous run of host clusters, and nothing else. The tables are checked as
the map is built (alignment, bounds, overlaps), so a damaged file is refused at open. The
qcow2 file is only read, never locked or written; the map is taken from the file as it is
at open, so a disk being written by a running QEMU is read consistently only for
snapshots, whose clusters QEMU never changes while they exist (docs/formats.md §8).
"""

from __future__ import annotations

import errno
import os
import struct
from array import array
from bisect import bisect_right
from collections.abc import Iterator
from typing import Self

from ramfs.errors import FormatError, ImageIOError, NotAnImageError, RamfsError, TruncatedError, UnsupportedError
from ramfs.format.qcow2 import (L1E_OFFSET_MASK, L2E_OFFSET_MASK, QCOW_MAX_L1_SIZE, QCOW_OFLAG_COMPRESSED,
                                QCOW_OFLAG_ZERO, Qcow2Header, Snapshot, parse_header, parse_snapshots,
                                read_snapshot_table)
from ramfs.image.files import FileSource, WouldBlock

ZERO = -1  # the cluster reads as zeros (unallocated, or QCOW_OFLAG_ZERO)
SUBCLUSTERS = 32  # extended L2: 32 subclusters per cluster, bitmap allocated | zero << 32
ALL_ALLOCATED = 0xFFFFFFFF
# Bounds for hostile files: the L1 table is read this many bytes at a time (so a huge one in a
# hole costs nothing), and a map of more extents than this is refused (16 MiB of map; a 64 GiB
# state in 64 KiB clusters, not one of them next to the previous one, has 1M).
_L1_CHUNK = 64 << 10
MAX_EXTENTS = 1 << 20
# _check_overlaps tags each range: room for every extent and every metadata range (the header,
# the snapshot table, the L1 table, and at most one L2 table per L1 entry).
_TAG_BITS = (MAX_EXTENTS + QCOW_MAX_L1_SIZE + 3).bit_length()


class VmstateSource:
    """One snapshot's VM state, read through its own L1/L2 tables.

    The map is a list of extents, ``_starts[i]`` (first cluster of the state, sorted) to
    ``_starts[i + 1]``: from ``_hosts[i]`` on contiguously in the file, or zeros (``ZERO``);
    an extended L2 cluster with a partial subcluster bitmap is an extent of its own, its
    bitmap in ``_bitmaps``. It is built from the tables once and checked as QEMU would have
    them: tables and clusters aligned and inside the file, no data cluster used twice or
    lying on the header, the L1 table, an L2 table or the snapshot table.
    """

    def __init__(self, file: FileSource, snapshot_name: str | int):
        """``snapshot_name``: a snapshot's name, else its id; an ``int`` is its index in the
        snapshot table (names and ids need not be unique)."""
        self.file = file
        try:
            self._open(snapshot_name)
        except BaseException:
            file.close()  # ours from the call on: the caller has nothing to close
            raise

    def _open(self, snapshot_name: str | int) -> None:
        file = self.file
        self.header: Qcow2Header = parse_header(file)
        snaps, self._table_end = read_snapshot_table(file, self.header)
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
        # The image's name, and its cache key (ramfs.image.cache.image_key resolves it as a path):
        # a NUL, '/' or '..' in a snapshot name must not break or move it, and two snapshots
        # of one name must not share a cached index.
        self.path = f"{file.path}@{_escape(self.snapshot.name)}"
        if sum(sn.name == self.snapshot.name for sn in snaps) > 1:
            self.path += f"#{_escape(self.snapshot.id)}"
        self.stat = file.stat
        self.size = self.snapshot.vm_state_size
        self.fd = file.fd
        self._cbits = self.header.cluster_bits
        self._csize = 1 << self._cbits
        self._base = self.snapshot.vm_state_offset(self.header)
        self._starts = array("q")  # extents: first cluster index of the state
        self._hosts = array("q")  # ... and its host offset, or ZERO
        self._bitmaps: dict[int, int] = {}  # extended L2: cluster index -> partial subcluster bitmap
        self._build_map()

    def _extent(self, k: int, host: int, alone: bool = False) -> None:
        """Cluster ``k`` of the state is at ``host`` (or ZERO): a new extent unless it continues
        the last one; ``alone``: an extent of its own (a cluster read subcluster by subcluster)."""
        if self._starts and not alone and self._starts[-1] not in self._bitmaps:
            last_k, last_h = self._starts[-1], self._hosts[-1]
            if host == ZERO and last_h == ZERO:
                return
            if host != ZERO and last_h != ZERO and host == last_h + ((k - last_k) << self._cbits):
                return
        if len(self._starts) >= MAX_EXTENTS:
            raise UnsupportedError(f"qcow2 snapshot {self.snapshot.name!r}: its VM state is in more than "
                                   f"{MAX_EXTENTS} pieces")
        self._starts.append(k)
        self._hosts.append(host)

    def _build_map(self) -> None:
        h, s, f = self.header, self.snapshot, self.file
        cs, cbits = self._csize, self._cbits
        what = f"qcow2 snapshot {s.name!r}"
        if s.l1_table_offset % cs:
            raise FormatError(f"{what}: its L1 table offset {s.l1_table_offset:#x} is not cluster aligned")
        first = self._base >> cbits
        count = -(-self.size // cs)
        l2_bits = h.l2_bits
        l2_entries = 1 << l2_bits
        entry_size = 16 if h.extended_l2 else 8
        l1_first, l1_end = first >> l2_bits, ((first + count - 1) >> l2_bits) + 1
        if l1_end > s.l1_size:
            # QEMU grows the L1 table before it writes the state: it always maps all of it.
            raise FormatError(f"{what}: its VM state ({self.size:#x} bytes at virtual offset {self._base:#x}) "
                              f"runs past what its L1 table of {s.l1_size} entries maps")
        # Host ranges of the metadata, to refuse overlaps: (start, end, what).
        meta: list[tuple[int, int, str]] = [(0, cs, "the header"),
                                            (s.l1_table_offset, s.l1_table_offset + 8 * s.l1_size, "its L1 table")]
        if h.nb_snapshots:
            meta.append((h.snapshots_offset, self._table_end, "the snapshot table"))
        seen_l2: set[int] = set()
        zero_chunk = bytes(_L1_CHUNK)
        for chunk_start in range(l1_first, l1_end, _L1_CHUNK // 8):
            n = min(_L1_CHUNK // 8, l1_end - chunk_start)
            raw = f.read_at(s.l1_table_offset + 8 * chunk_start, 8 * n)
            if len(raw) < 8 * n:
                raise TruncatedError(f"{what}: its L1 table runs past the end of the file", s.l1_table_offset)
            if raw == zero_chunk[:8 * n]:  # a stretch of unallocated L2 tables: zeros
                self._extent(max(0, (chunk_start << l2_bits) - first), ZERO)
                continue
            for j, l1e in enumerate(struct.unpack(f">{n}Q", raw)):
                l1i = chunk_start + j
                lo = max(first, l1i << l2_bits)  # the state's clusters this L2 table maps
                hi = min(first + count, (l1i + 1) << l2_bits)
                l2_off = l1e & L1E_OFFSET_MASK
                if not l2_off:
                    self._extent(lo - first, ZERO)
                    continue
                if l2_off % cs:
                    raise FormatError(f"{what}: L1 entry {l1i} points to an unaligned L2 table {l2_off:#x}")
                if l2_off in seen_l2:
                    raise FormatError(f"{what}: L2 table {l2_off:#x} is used twice by its L1 table")
                seen_l2.add(l2_off)
                meta.append((l2_off, l2_off + cs, f"L2 table {l2_off:#x}"))
                a = (lo & (l2_entries - 1)) * entry_size
                z = (((hi - 1) & (l2_entries - 1)) + 1) * entry_size
                if l2_off + cs > f.size:
                    raise TruncatedError(f"{what}: L2 table {l2_off:#x} runs past the end of the file", l2_off)
                l2 = f.read_at(l2_off + a, z - a)
                if len(l2) < z - a:
                    raise TruncatedError(f"{what}: L2 table {l2_off:#x} runs past the end of the file", l2_off)
                if l2.count(0) == len(l2):  # no cluster allocated there
                    self._extent(lo - first, ZERO)
                    continue
                self._map_l2(l2, lo - first, hi - first)
        self._check_overlaps(meta, count)

    def _check_overlaps(self, meta: list[tuple[int, int, str]], count: int) -> None:
        """No two of the metadata ranges and the data extents share a byte of the file (in a
        file QEMU wrote, the refcounts keep them apart). Ranges are packed as ``(start << 64 |
        end) << 21 | tag`` ints to sort (one small int per extent; the tag says which range it
        is, for the message only)."""
        starts, hosts, cbits = self._starts, self._hosts, self._cbits
        packed = [(a << 64 | z) << _TAG_BITS | i for i, (a, z, _) in enumerate(meta)]
        for i, k in enumerate(starts):
            if hosts[i] != ZERO:
                k_end = starts[i + 1] if i + 1 < len(starts) else count
                packed.append((hosts[i] << 64 | (hosts[i] + ((k_end - k) << cbits))) << _TAG_BITS
                              | (len(meta) + i))
        packed.sort()
        mask = (1 << 64) - 1
        for x, y in zip(packed, packed[1:]):
            x_start, x_end = x >> (64 + _TAG_BITS), (x >> _TAG_BITS) & mask
            y_start = y >> (64 + _TAG_BITS)
            if y_start < x_end:
                raise FormatError(f"qcow2 snapshot {self.snapshot.name!r}: {self._name(y, meta)} ({y_start:#x}) "
                                  f"overlaps {self._name(x, meta)} ({x_start:#x})", y_start)

    def _name(self, packed: int, meta: list[tuple[int, int, str]]) -> str:
        tag = packed & ((1 << _TAG_BITS) - 1)
        if tag < len(meta):
            return meta[tag][2]
        return f"VM state cluster {self._starts[tag - len(meta)]}"

    def _map_l2(self, l2: bytes, lo: int, hi: int) -> None:
        """Clusters ``lo`` to ``hi`` of the state from their L2 entries ``l2``."""
        h, f = self.header, self.file
        cs = self._csize
        what = f"qcow2 snapshot {self.snapshot.name!r}"
        ext = h.extended_l2
        values = struct.unpack(f">{len(l2) // 8}Q", l2)
        step = 2 if ext else 1
        for i, k in enumerate(range(lo, hi)):
            entry = values[i * step]
            if entry & QCOW_OFLAG_COMPRESSED:
                raise UnsupportedError(f"{what}: compressed clusters in the VM state")
            host = entry & L2E_OFFSET_MASK
            need = min(cs, self.size - (k << self._cbits))  # bytes of this cluster the state uses
            bitmap = ALL_ALLOCATED
            if ext:
                # docs/interop/qcow2.txt "Extended L2 Entries"; QEMU calls these corrupt too.
                bitmap = values[i * step + 1] & ALL_ALLOCATED
                if bitmap & values[i * step + 1] >> 32:
                    raise FormatError(f"{what}: the extended L2 entry of cluster {k} has subclusters both "
                                      f"allocated and zero ({values[i * step + 1]:#x})")
                if not bitmap:
                    self._extent(k, ZERO)
                    continue
                if not host:
                    raise FormatError(f"{what}: the extended L2 entry of cluster {k} has allocated subclusters "
                                      "and no cluster")
                if bitmap != ALL_ALLOCATED:
                    need = min(need, bitmap.bit_length() * (cs // SUBCLUSTERS))
            elif entry & QCOW_OFLAG_ZERO:
                if h.version < 3:  # reserved in version 2; QEMU calls it corruption
                    raise FormatError(f"{what}: a zero cluster (L2 entry {entry:#x}) in a version 2 image")
                self._extent(k, ZERO)
                continue
            elif not host:
                self._extent(k, ZERO)
                continue
            if host % cs:
                raise FormatError(f"{what}: an L2 entry points to an unaligned cluster {host:#x}")
            if host + need > f.size:
                raise TruncatedError(f"{what}: cluster {k} of its VM state ({host:#x}) lies past the end of "
                                     "the file", host)
            if bitmap != ALL_ALLOCATED:
                self._bitmaps[k] = bitmap
                self._extent(k, host, alone=True)
            else:
                self._extent(k, host)

    # -- reads ---------------------------------------------------------------------------
    def _runs(self, offset: int, size: int) -> Iterator[tuple[int | None, int]]:
        """``(host offset or None, length)`` covering ``[offset, offset+size)`` of the state."""
        end = min(offset + size, self.size)
        pos = offset
        cbits, csize = self._cbits, self._csize
        sub = csize // SUBCLUSTERS
        starts, hosts = self._starts, self._hosts
        i = bisect_right(starts, pos >> cbits) - 1
        while pos < end:
            k = pos >> cbits
            while i + 1 < len(starts) and starts[i + 1] <= k:
                i += 1
            ext_end = (starts[i + 1] << cbits) if i + 1 < len(starts) else end
            host = hosts[i]
            within = pos - (starts[i] << cbits)  # from the extent's start
            n = min(end, ext_end) - pos
            bitmap = self._bitmaps.get(k)
            if bitmap is not None:  # extended L2: subcluster by subcluster
                n = min(n, sub - within % sub)
                yield (host + within if bitmap >> (within // sub) & 1 else None), n
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


def _escape(name: str) -> str:
    return name.replace("%", "%25").replace("/", "%2F").replace("\0", "%00").replace("#", "%23")


def needs_snapshot_error(path: str) -> NotAnImageError:
    """What to say when a qcow2 disk is named where a save image (or ``--snapshot``) is wanted."""
    try:
        names = ", ".join(sn.name for sn in snapshots_with_state(path)) or "none"
    except RamfsError as e:
        names = f"unreadable: {e}"
    return NotAnImageError(f"{path} is a qcow2 disk: name one of its snapshots with VM state "
                           f"(--snapshot NAME; snapshots with VM state: {names})")


def disk_snapshots(path: str | os.PathLike[str], fd: int | None = None) -> tuple[Qcow2Header, list[Snapshot], int]:
    """A qcow2 file's header, its whole snapshot table and its size (``fd``: the file already
    open, taken over and closed)."""
    with FileSource(os.fspath(path), fd) as f:
        h = parse_header(f)
        return h, parse_snapshots(f, h), f.size


def snapshots_with_state(path: str | os.PathLike[str], fd: int | None = None) -> list[Snapshot]:
    """The snapshots of a qcow2 file that have VM state (what a mount shows)."""
    return [s for s in disk_snapshots(path, fd)[1] if s.vm_state_size]


__all__ = ["VmstateSource", "WouldBlock", "disk_snapshots", "needs_snapshot_error", "snapshots_with_state"]
