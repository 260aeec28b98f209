"""qcow2 disks with internal snapshots, for the fuzzer: the field map of real QEMU files and an
independent reader of a snapshot's VM state (the judge's second way of reading it).

The seeds are real QEMU 10 output (tests/data/qcow2/, made by scripts/make-qcow2-seeds.py).
:func:`qcow2_blob` lays a :class:`fuzz.blob.Blob` map over one: the header and its extensions,
the snapshot table (every entry's fields, extra data, id and name), every L1 table and the L2
tables they reach (entries and, with extended L2, subcluster bitmaps), the refcount table, and
one span per cluster (what it holds: header, l1, l2, refcount, snapshots, vmstate, disk).

:func:`read_vmstate` reads a snapshot's VM state the way QEMU's qcow2 driver does
(docs/interop/qcow2.txt, block/qcow2-cluster.c), written apart from ramfs on purpose: when ramfs
opens a snapshot, the bytes it reads must be these.

This module does not import ramfs.
"""

from __future__ import annotations

import lzma
import struct
from functools import cache
from pathlib import Path

from fuzz.blob import Blob, Field

QCOW2_DIR = Path(__file__).resolve().parents[1] / "data" / "qcow2"
# (file, snapshot opened by the seed): every snapshot with VM state of every file.
QCOW2_SEEDS = [("v2", "s1"), ("v2", "s2"), ("v3-extl2-16k", "job"), ("v3-512", "s")]

L1E_MASK = 0x00FFFFFFFFFFFE00
L2E_MASK = 0x00FFFFFFFFFFFE00
COMPRESSED = 1 << 62
COPIED = 1 << 63
ZERO_FLAG = 1
EXTL2 = 1 << 4


@cache
def qcow2_file(name: str) -> bytes:
    return lzma.decompress((QCOW2_DIR / f"{name}.qcow2.xz").read_bytes())


def _f(fields: list[Field], off: int, fmt: str, role: str, name: str) -> None:
    fields.append(Field(off, struct.calcsize(fmt), "int", role, name, fmt))


def qcow2_blob(data: bytes) -> Blob:
    """The file with a map of its structures (see the module docstring)."""
    fl: list[Field] = []
    (_, version, _, _, cbits, _, _, l1_size, l1_off, rc_off, rc_clusters, nb_snap,
     snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", data)
    cs = 1 << cbits
    fl.append(Field(0, 4, "bytes", "qmagic", "qcow2.magic"))
    for off, fmt, role, name in [(4, ">I", "qversion", "version"), (8, ">Q", "qoffset", "backing_file_offset"),
                                 (16, ">I", "qlen", "backing_file_size"), (20, ">I", "cbits", "cluster_bits"),
                                 (24, ">Q", "qsize", "size"), (32, ">I", "crypt", "crypt_method"),
                                 (36, ">I", "l1size", "l1_size"), (40, ">Q", "qoffset", "l1_table_offset"),
                                 (48, ">Q", "qoffset", "refcount_table_offset"),
                                 (56, ">I", "qlen", "refcount_table_clusters"), (60, ">I", "qcount", "nb_snapshots"),
                                 (64, ">Q", "qoffset", "snapshots_offset")]:
        _f(fl, off, fmt, role, name)
    hlen = 72
    extl2 = False
    if version == 3:
        incompat = struct.unpack_from(">Q", data, 72)[0]
        extl2 = bool(incompat & EXTL2)
        hlen = struct.unpack_from(">I", data, 100)[0]
        for off, fmt, role, name in [(72, ">Q", "qfeatures", "incompatible_features"),
                                     (80, ">Q", "qfeatures", "compatible_features"),
                                     (88, ">Q", "qfeatures", "autoclear_features"),
                                     (96, ">I", "rcorder", "refcount_order"), (100, ">I", "qlen", "header_length")]:
            _f(fl, off, fmt, role, name)
        if hlen > 104:
            _f(fl, 104, ">B", "ctype", "compression_type")
    fl.append(Field(0, hlen, "span", "qheader", "header"))
    pos = hlen
    while pos + 8 <= cs:  # header extensions, up to the end mark
        etype, elen = struct.unpack_from(">II", data, pos)
        start = pos
        _f(fl, pos, ">I", "exttype", "ext.type")
        _f(fl, pos + 4, ">I", "qlen", "ext.len")
        pos += 8 + (elen + 7) // 8 * 8
        fl.append(Field(start, pos - start, "span", "qext", f"ext.{etype:#x}"))
        if etype == 0:
            break
    clusters: dict[int, str] = {0: "header"}
    for i in range(rc_clusters):
        clusters[rc_off + i * cs] = "refcount"
    for i in range(min(rc_clusters * cs // 8, 64)):
        entry_off = rc_off + 8 * i
        if struct.unpack_from(">Q", data, entry_off)[0]:
            _f(fl, entry_off, ">Q", "qoffset", "refcount_table.entry")
            clusters[struct.unpack_from(">Q", data, entry_off)[0]] = "refcount"
    # The snapshot table.
    l1s = [("active", l1_off, l1_size)]
    pos = snap_off
    for i in range(nb_snap):
        start = pos
        (sl1_off, sl1_size, id_size, name_size, _, _, _, _, extra) = struct.unpack_from(">QIHHIIQII", data, pos)
        for off, fmt, role, name in [(0, ">Q", "qoffset", "l1_table_offset"), (8, ">I", "l1size", "l1_size"),
                                     (12, ">H", "qlen", "id_str_size"), (14, ">H", "qlen", "name_size"),
                                     (16, ">I", "qtime", "date_sec"), (20, ">I", "qtime", "date_nsec"),
                                     (24, ">Q", "qtime", "vm_clock_nsec"), (32, ">I", "vmsize", "vm_state_size"),
                                     (36, ">I", "qlen", "extra_data_size")]:
            _f(fl, pos + off, fmt, role, f"snapshot{i}.{name}")
        pos += 40
        for off, name, role in [(0, "vm_state_size_large", "vmsize"), (8, "disk_size", "qsize"),
                                (16, "icount", "qtime")]:
            if off + 8 <= extra:
                _f(fl, pos + off, ">Q", role, f"snapshot{i}.{name}")
        pos += extra
        fl.append(Field(pos, id_size, "qname", "snapid", f"snapshot{i}.id"))
        fl.append(Field(pos + id_size, name_size, "qname", "snapname", f"snapshot{i}.name"))
        pos += id_size + name_size
        pos += -pos % 8
        fl.append(Field(start, pos - start, "span", "qsnapshot", f"snapshot{i}"))
        l1s.append((f"snapshot{i}", sl1_off, sl1_size))
    for c in range(snap_off // cs * cs, pos, cs):
        clusters[c] = "snapshots"
    # L1 tables and the L2 tables they reach.
    entry = 16 if extl2 else 8
    seen_l2: set[int] = set()
    for who, off, n in l1s:
        for c in range(off // cs * cs, off + 8 * n, cs):
            clusters[c] = "l1"
        for i in range(n):
            e = struct.unpack_from(">Q", data, off + 8 * i)[0]
            if not e and i:
                continue  # the zero entries are many; the first stands for them
            _f(fl, off + 8 * i, ">Q", "l1e", f"{who}.l1[{i}]")
            l2 = e & L1E_MASK
            if not l2 or l2 in seen_l2 or l2 + cs > len(data):
                continue
            seen_l2.add(l2)
            clusters[l2] = "l2"
            last = -1
            for j in range(cs // entry):
                v = struct.unpack_from(">Q", data, l2 + j * entry)[0]
                if v:
                    host = v & L2E_MASK
                    if host and host not in clusters:
                        clusters[host] = "data"
                    last = j
                if v or j == last + 1:  # the used entries and the first unused after each run
                    _f(fl, l2 + j * entry, ">Q", "l2e", f"l2@{l2:#x}[{j}]")
                    if extl2:
                        _f(fl, l2 + j * entry + 8, ">Q", "l2bitmap", f"l2@{l2:#x}[{j}].bitmap")
    for c, what in sorted(clusters.items()):
        if c < len(data):
            fl.append(Field(c, min(cs, len(data) - c), "span", "qcluster", what))
    return Blob(data, fl)


# --- a second reader: QEMU's rules, nothing shared with ramfs -------------------------------------

class Refused(Exception):
    """No reading to compare with: QEMU calls the image corrupt (``corrupt``), or it is something
    the reference does not read (compressed clusters, over its size limit, no such snapshot)."""

    def __init__(self, reason: str, corrupt: bool = True):
        super().__init__(reason)
        self.corrupt = corrupt


def _pread(f, off: int, n: int) -> bytes:
    f.seek(off)
    return f.read(n)


def read_vmstate(path: str, snapshot: str, limit: int = 4 << 20) -> bytes:
    """The VM state of ``snapshot`` (a name, else an id) as QEMU's loadvm reads it.

    Clusters past the end of the file read as zeros (file-posix pads short reads); raises
    :class:`Refused` where QEMU reports corruption, for compressed clusters and for what does
    not fit in ``limit`` bytes.
    """
    with open(path, "rb") as f:
        h = _pread(f, 0, 112)
        if len(h) < 72 or h[:4] != b"QFI\xfb":
            raise Refused("not qcow2", False)
        (_, version, _, _, cbits, size, crypt, _, _, _, _, nb, snap_off) = struct.unpack_from(">4sIQIIQIIQQIIQ", h)
        incompat = struct.unpack_from(">Q", h, 72)[0] if version == 3 and len(h) >= 80 else 0
        if version not in (2, 3) or not 9 <= cbits <= 21 or crypt or incompat & ~0x1B or incompat & 0x4:
            raise Refused("header")
        cs = 1 << cbits
        extl2 = bool(incompat & EXTL2)
        l2_bits = cbits - (4 if extl2 else 3)
        snaps = []
        pos = snap_off
        if nb > 65536:
            raise Refused("snapshot table too large")
        for _ in range(nb):
            raw = _pread(f, pos, 40)
            if len(raw) < 40:
                raise Refused("snapshot table", False)
            l1_off, l1_n, id_n, name_n, _, _, _, vm32, extra = struct.unpack(">QIHHIIQII", raw)
            body = _pread(f, pos + 40, extra + id_n + name_n)
            ex = body[:extra]
            vm = int.from_bytes(ex[:8], "big") if extra >= 8 else vm32
            disk = int.from_bytes(ex[8:16], "big") if extra >= 16 else size
            snaps.append((body[extra:extra + id_n], body[extra + id_n:extra + id_n + name_n], l1_off, l1_n, vm, disk))
            pos += 40 + extra + id_n + name_n
            pos += -pos % 8
        want = snapshot.encode("utf-8", "surrogateescape")
        found = [s for s in snaps if s[1] == want] or [s for s in snaps if s[0] == want]
        if not found:
            raise Refused("no such snapshot", False)
        _, _, l1_off, l1_n, vm, disk = found[0]
        if not vm or vm > limit:
            raise Refused("size", False)
        if l1_off % cs or l1_n > 0x2000000 // 8:
            raise Refused("snapshot L1 table offset invalid")  # qcow2_snapshot_goto
        span = 1 << (cbits + l2_bits)
        base = -(-disk // span) * span
        out = bytearray()
        sub = cs // 32
        for k in range(-(-vm // cs)):
            vc = (base >> cbits) + k
            l1i, l2i = vc >> l2_bits, vc & ((1 << l2_bits) - 1)
            n = min(cs, vm - k * cs)
            l2 = int.from_bytes(_pread(f, l1_off + 8 * l1i, 8), "big") & L1E_MASK if l1i < l1_n else 0
            if not l2:
                out += bytes(n)
                continue
            if l2 % cs:
                raise Refused("unaligned L2 table")
            raw = _pread(f, l2 + l2i * (16 if extl2 else 8), 16 if extl2 else 8).ljust(16, b"\0")
            e, bitmap = struct.unpack(">QQ", raw)
            host = e & L2E_MASK
            if e & COMPRESSED:
                raise Refused("compressed", False)
            if extl2:
                alloc, zero = bitmap & 0xFFFFFFFF, bitmap >> 32
                if alloc & zero or (alloc and not host):
                    raise Refused("invalid subclusters")
                if alloc and host % cs:
                    raise Refused("unaligned cluster")
                data = _pread(f, host, n).ljust(n, b"\0") if alloc else b""
                for s in range(0, n, sub):
                    out += data[s:s + sub] if alloc >> (s // sub) & 1 else bytes(min(sub, n - s))
                continue
            if e & ZERO_FLAG:
                if version < 3:
                    raise Refused("zero cluster in a v2 image")
                out += bytes(n)
            elif not host:
                out += bytes(n)
            elif host % cs:
                raise Refused("unaligned cluster")
            else:
                out += _pread(f, host, n).ljust(n, b"\0")
        return bytes(out)
