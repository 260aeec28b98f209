"""qcow2 internal snapshots: where a snapshot's VM state (the migration stream of ``savevm``)
lives in the file.

Source: QEMU 10.0 docs/interop/qcow2.txt and block/qcow2.h, block/qcow2-snapshot.c
(``qcow2_read_snapshots``), block/qcow2.c (``qcow2_vm_state_offset``, ``qcow2_load_vmstate``).
All integers big-endian.

``savevm`` writes the VM state through the *current* L1 table into the guest-invisible area
after the virtual disk: virtual offset ``l1_vm_state_index << (cluster_bits + l2_bits)``,
``l1_vm_state_index = ceil(disk size / bytes one L2 table maps)``; the snapshot keeps a copy
of that L1 table, so the state is found through the snapshot's own L1 table, at the offset
computed from the disk size the snapshot recorded. Each virtual cluster is a host cluster
(``L2 entry & L2E_OFFSET_MASK``), all zeros, or unallocated (zeros: a VM state has no
backing file). Refused: encryption, external data files, compressed clusters in the VM state.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

from ramfs.errors import FormatError, TruncatedError, UnsupportedError
from ramfs.format.source import Source

QCOW_MAGIC = b"QFI\xfb"
# QCowHeader (docs/interop/qcow2.txt "Header"): v2 is the first 72 bytes.
_HEADER_V2 = struct.Struct(">4sIQIIQIIQQIIQ")
_HEADER_V3 = struct.Struct(">QQQII")  # incompatible, compatible, autoclear features, refcount_order, header_length
QCOW2_INCOMPAT_DIRTY = 1 << 0
QCOW2_INCOMPAT_CORRUPT = 1 << 1
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
QCOW2_INCOMPAT_COMPRESSION = 1 << 3
QCOW2_INCOMPAT_EXTL2 = 1 << 4
QCOW2_INCOMPAT_KNOWN = (QCOW2_INCOMPAT_DIRTY | QCOW2_INCOMPAT_CORRUPT | QCOW2_INCOMPAT_DATA_FILE
                        | QCOW2_INCOMPAT_COMPRESSION | QCOW2_INCOMPAT_EXTL2)
QCOW_CRYPT_NONE = 0
# QCowSnapshotHeader: l1_table_offset, l1_size, id_str_size, name_size, date_sec, date_nsec,
# vm_clock_nsec, vm_state_size, extra_data_size (then extra data, id, name, pad to 8).
_SNAPSHOT = struct.Struct(">QIHHIIQII")
QCOW_MAX_SNAPSHOTS = 65536  # qcow2.h
QCOW_MAX_SNAPSHOTS_SIZE = 1024 * QCOW_MAX_SNAPSHOTS  # qcow2.h: the whole table, names included
QCOW_MAX_SNAPSHOT_EXTRA_DATA = 1024
L1E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
L2E_OFFSET_MASK = 0x00FFFFFFFFFFFE00
QCOW_OFLAG_COMPRESSED = 1 << 62
QCOW_OFLAG_ZERO = 1 << 0  # v3: the cluster reads as zeros
MIN_CLUSTER_BITS, MAX_CLUSTER_BITS = 9, 21
# Bounds for hostile files: QEMU's own (qcow2.h QCOW_MAX_L1_SIZE is 32 MiB of entries).
QCOW_MAX_L1_SIZE = 0x2000000 // 8


@dataclass(frozen=True)
class Qcow2Header:
    version: int
    cluster_bits: int
    size: int  # virtual disk size
    crypt_method: int
    l1_size: int
    l1_table_offset: int
    nb_snapshots: int
    snapshots_offset: int
    incompatible_features: int
    header_length: int

    @property
    def cluster_size(self) -> int:
        return 1 << self.cluster_bits

    @property
    def extended_l2(self) -> bool:
        return bool(self.incompatible_features & QCOW2_INCOMPAT_EXTL2)

    @property
    def l2_bits(self) -> int:
        """log2 of the entries of one L2 table (16-byte entries with extended L2)."""
        return self.cluster_bits - (4 if self.extended_l2 else 3)


@dataclass(frozen=True)
class Snapshot:
    index: int
    id: str
    name: str
    l1_table_offset: int
    l1_size: int
    date_sec: int
    date_nsec: int
    vm_clock_nsec: int
    vm_state_size: int  # bytes of VM state (0: a disk-only snapshot)
    disk_size: int | None  # the disk size recorded with the snapshot (extra data), if any
    icount: int | None

    def vm_state_offset(self, header: Qcow2Header) -> int:
        """Virtual offset of the VM state (qcow2_vm_state_offset with the snapshot's size)."""
        size = self.disk_size if self.disk_size is not None else header.size
        span = 1 << (header.cluster_bits + header.l2_bits)  # bytes one L2 table maps
        return -(-size // span) * span


def is_qcow2(head: bytes) -> bool:
    return head[:4] == QCOW_MAGIC


def parse_header(src: Source) -> Qcow2Header:
    raw = src.read_at(0, _HEADER_V2.size)
    if len(raw) < _HEADER_V2.size:
        raise TruncatedError(f"qcow2 header: {len(raw)} of {_HEADER_V2.size} bytes", 0)
    (magic, version, _backing_off, _backing_size, cluster_bits, size, crypt, l1_size, l1_off,
     _rc_off, _rc_clusters, nb_snapshots, snapshots_offset) = _HEADER_V2.unpack(raw)
    if magic != QCOW_MAGIC:
        raise FormatError("not a qcow2 file (no QFI\\xfb magic)", 0)
    if version not in (2, 3):
        raise UnsupportedError(f"qcow2 version {version} (ramfs reads 2 and 3)", 4)
    incompat, header_length = 0, 72
    if version == 3:
        ext = src.read_at(72, _HEADER_V3.size)
        if len(ext) < _HEADER_V3.size:
            raise TruncatedError("qcow2 version 3 header", 72)
        incompat, _compat, _autoclear, _rc_order, header_length = _HEADER_V3.unpack(ext)
    if not MIN_CLUSTER_BITS <= cluster_bits <= MAX_CLUSTER_BITS:
        raise FormatError(f"qcow2 cluster_bits {cluster_bits} out of range", 20)
    if incompat & ~QCOW2_INCOMPAT_KNOWN:
        raise UnsupportedError(f"qcow2 incompatible features {incompat:#x} that ramfs does not know", 72)
    if incompat & QCOW2_INCOMPAT_DATA_FILE:
        raise UnsupportedError("qcow2 with an external data file: its clusters are in another file", 72)
    if crypt != QCOW_CRYPT_NONE:
        raise UnsupportedError("encrypted qcow2: ramfs does not decrypt", 32)
    if nb_snapshots > QCOW_MAX_SNAPSHOTS:
        raise FormatError(f"qcow2 says {nb_snapshots} snapshots (QEMU allows {QCOW_MAX_SNAPSHOTS})", 60)
    return Qcow2Header(version, cluster_bits, size, crypt, l1_size, l1_off, nb_snapshots, snapshots_offset,
                       incompat, header_length)


def parse_snapshots(src: Source, h: Qcow2Header) -> list[Snapshot]:
    """The snapshot table (qcow2_read_snapshots), bounded as QEMU bounds it."""
    return read_snapshot_table(src, h)[0]


_WINDOW = 64 << 10


def read_snapshot_table(src: Source, h: Qcow2Header) -> tuple[list[Snapshot], int]:
    """The snapshots and the offset just past the table's last entry."""
    if h.nb_snapshots and h.snapshots_offset % h.cluster_size:
        raise FormatError(f"qcow2 snapshot table offset {h.snapshots_offset:#x} is not cluster aligned", 64)
    out = []
    pos = h.snapshots_offset
    # The table is read through a window, in as few preads as its size allows.
    win_at, win = pos, src.read_at(pos, _WINDOW)

    def read(at: int, n: int) -> bytes:
        nonlocal win_at, win
        if not (win_at <= at and at + n <= win_at + len(win)):
            win_at, win = at, src.read_at(at, max(n, _WINDOW))
        return win[at - win_at:at - win_at + n]

    for i in range(h.nb_snapshots):
        if pos - h.snapshots_offset > QCOW_MAX_SNAPSHOTS_SIZE:
            raise FormatError(f"qcow2 snapshot table over {QCOW_MAX_SNAPSHOTS_SIZE} bytes (at snapshot {i})",
                              h.snapshots_offset)
        raw = read(pos, _SNAPSHOT.size)
        if len(raw) < _SNAPSHOT.size:
            raise TruncatedError(f"qcow2 snapshot {i}: the table ends inside its header", pos)
        l1_off, l1_size, id_size, name_size, dsec, dnsec, clock, vm_size, extra_size = _SNAPSHOT.unpack(raw)
        if extra_size > QCOW_MAX_SNAPSHOT_EXTRA_DATA:
            raise FormatError(f"qcow2 snapshot {i}: {extra_size} bytes of extra data", pos + 36)
        if l1_size > QCOW_MAX_L1_SIZE:
            raise FormatError(f"qcow2 snapshot {i}: L1 table of {l1_size} entries", pos + 8)
        body = read(pos + _SNAPSHOT.size, extra_size + id_size + name_size)
        if len(body) < extra_size + id_size + name_size:
            raise TruncatedError(f"qcow2 snapshot {i}: the table ends inside its names", pos)
        extra = body[:extra_size]
        large = int.from_bytes(extra[0:8], "big") if extra_size >= 8 else None
        disk_size = int.from_bytes(extra[8:16], "big") if extra_size >= 16 else None
        icount = int.from_bytes(extra[16:24], "big") if extra_size >= 24 else None
        sid = body[extra_size:extra_size + id_size].decode("utf-8", "surrogateescape")
        name = body[extra_size + id_size:].decode("utf-8", "surrogateescape")
        out.append(Snapshot(i, sid, name, l1_off, l1_size, dsec, dnsec, clock,
                            large if large is not None else vm_size, disk_size,
                            icount if icount != (1 << 64) - 1 else None))
        pos += _SNAPSHOT.size + extra_size + id_size + name_size
        pos += -pos % 8
    return out, pos
