"""The page index of a sequential image, and its on-disk cache.

A sequential stream says where each page is only by walking it. One scan (which never reads
page payloads) records, per block, the file offset of each page's final payload; 0 means the
page reads as zeros (sent as ZERO last, or never sent). The last record wins, as in QEMU.

Memory follows what the image holds, not what it claims: offsets live in chunks of
``CHUNK_PAGES`` that are allocated only when a PAGE record lands in them, so a hostile
``used_length`` of 2^60 costs nothing and a 64 GiB guest with 1 GiB of data costs ~2 MiB.
"""

from __future__ import annotations

import dataclasses
import json
import os
import struct
import sys
from array import array
from pathlib import Path
from typing import Any

from ramfs.errors import CacheError
from ramfs.format.qemu import (Command, Configuration, IterableSection, MappedRamHeader, RamBlockRecord, RamSetup,
                               SectionPiece, StreamLayout)
from ramfs.image.cache import CACHE_FORMAT_VERSION, atomic_tmp

CHUNK_SHIFT = 15  # 32768 pages = 128 MiB of 4 KiB pages per chunk; 256 KiB of offsets
CHUNK_PAGES = 1 << CHUNK_SHIFT
CHUNK_MASK = CHUNK_PAGES - 1
_ZERO_CHUNK = bytes(8 * CHUNK_PAGES)

INDEX_MAGIC = b"RAMFSIDX"
_INDEX_HEAD = struct.Struct("<8sII")  # magic, format version, json length


class PageIndex:
    """Per block: page number -> payload file offset (0 = zeros)."""

    def __init__(self, num_blocks: int):
        self.chunks: list[dict[int, array[int]]] = [{} for _ in range(num_blocks)]
        # Per chunk, a bitmap of the pages with data (LSB-first, like mapped-ram's): lets
        # reads skip zero runs and maps/ list ranges without visiting every page.
        self.bits: list[dict[int, bytearray]] = [{} for _ in range(num_blocks)]

    def add_blocks(self, n: int) -> None:
        while len(self.chunks) < n:
            self.chunks.append({})
            self.bits.append({})

    # -- qemu.RecordSink: the parser fills the index ------------------------------------
    def start(self, ram: RamSetup) -> None:
        self.add_blocks(len(ram.blocks))

    def pages(self, block: int, first: int, count: int, buf: bytes, pos: int, stride: int,
              offset: int) -> None:
        """PAGE records: page ``first + n`` is at ``offset + n * stride`` (qemu.RecordSink)."""
        if count == 1:  # most calls on a fragmented guest: no loop, no array
            no = first >> CHUNK_SHIFT
            c = self.chunks[block].get(no)
            if c is None:
                c = self._new_chunk(block, no)
            i = first & CHUNK_MASK
            c[i] = offset
            self.bits[block][no][i >> 3] |= 1 << (i & 7)
        else:
            self._fill(block, first, count, offset, stride)

    def zeros(self, block: int, first: int, count: int) -> None:
        """ZERO records (qemu.RecordSink): the pages read as zeros again."""
        if count == 1:
            no = first >> CHUNK_SHIFT
            c = self.chunks[block].get(no)
            if c is not None:
                i = first & CHUNK_MASK
                c[i] = 0
                self.bits[block][no][i >> 3] &= ~(1 << (i & 7))
        else:
            self._fill(block, first, count, 0, 0)

    def _new_chunk(self, block: int, no: int) -> array[int]:
        c = self.chunks[block][no] = array("q", _ZERO_CHUNK)
        self.bits[block][no] = bytearray(CHUNK_PAGES // 8)
        return c

    def _fill(self, block: int, page: int, count: int, offset: int, stride: int) -> None:
        """``count`` consecutive pages from ``page``, payloads every ``stride`` bytes from
        ``offset`` (0: zero pages), chunk by chunk."""
        chunks = self.chunks[block]
        while count > 0:
            no = page >> CHUNK_SHIFT
            i = page & CHUNK_MASK
            k = min(count, CHUNK_PAGES - i)
            c = chunks.get(no)
            if c is None and offset:
                c = self._new_chunk(block, no)
            if c is not None:
                if offset:
                    c[i : i + k] = array("q", range(offset, offset + k * stride, stride))
                else:
                    c[i : i + k] = array("q", _ZERO_CHUNK[: 8 * k])
                _set_bits(self.bits[block][no], i, i + k, bool(offset))
            page += k
            count -= k
            if offset:
                offset += k * stride

    def chunk_bits(self, block: int, chunk_no: int) -> bytearray | None:
        return self.bits[block].get(chunk_no)

    def lookup(self, block: int, page: int) -> int:
        c = self.chunks[block].get(page >> CHUNK_SHIFT)
        return c[page & CHUNK_MASK] if c is not None else 0

    def chunk(self, block: int, chunk_no: int) -> array[int] | None:
        return self.chunks[block].get(chunk_no)

    def populated(self, block: int) -> int:
        return sum(int.from_bytes(b, "little").bit_count() for b in self.bits[block].values())

    def validate(self, layout: StreamLayout, data_size: int) -> None:
        """Reject a cache entry whose offsets could not come from this image."""
        if len(self.chunks) != len(layout.blocks):
            raise CacheError("index block count differs from the image")
        limit = data_size - layout.page_size
        for blk, chunks in zip(layout.blocks, self.chunks):
            pages = blk.used_length // layout.page_size
            for no, c in chunks.items():
                if no < 0 or no << CHUNK_SHIFT >= pages or len(c) != CHUNK_PAGES:
                    raise CacheError(f"index chunk {no} out of range for {blk.idstr!r}")
                if min(c) < 0 or max(c) > limit:
                    raise CacheError(f"index offsets out of range for {blk.idstr!r}")
                if CHUNK_PAGES - c.count(0) != int.from_bytes(self.bits[blk.index][no], "little").bit_count():
                    raise CacheError(f"index bitmap disagrees with offsets for {blk.idstr!r}")

    # -- persistence -----------------------------------------------------------------
    def save(self, path: Path, layout: StreamLayout, extra: dict[str, Any]) -> None:
        meta = {"layout": layout_to_json(layout), "extra": extra,
                "chunks": [sorted(ch) for ch in self.chunks]}
        blob = json.dumps(meta).encode()
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        tmp = atomic_tmp(path)
        try:
            # 0600: an index names the blocks and devices of someone's guest.
            with open(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600), "wb") as f:
                f.write(_INDEX_HEAD.pack(INDEX_MAGIC, CACHE_FORMAT_VERSION, len(blob)))
                f.write(blob)
                for ch, bits in zip(self.chunks, self.bits):
                    for no in sorted(ch):
                        c = ch[no]
                        if sys.byteorder != "little":
                            c = array("q", c)
                            c.byteswap()
                        c.tofile(f)
                        f.write(bits[no])
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise

    @classmethod
    def load(cls, path: Path) -> tuple[PageIndex, StreamLayout, dict[str, Any]]:
        try:
            with open(path, "rb") as f:
                head = f.read(_INDEX_HEAD.size)
                if len(head) != _INDEX_HEAD.size:
                    raise CacheError("index file is truncated")
                magic, version, n = _INDEX_HEAD.unpack(head)
                if magic != INDEX_MAGIC or version != CACHE_FORMAT_VERSION:
                    raise CacheError("index file has another format")
                meta = json.loads(f.read(n))
                layout = layout_from_json(meta["layout"])
                idx = cls(len(layout.blocks))
                for b, nos in enumerate(meta["chunks"]):
                    for no in nos:
                        c = array("q")
                        c.fromfile(f, CHUNK_PAGES)
                        if sys.byteorder != "little":
                            c.byteswap()
                        bits = bytearray(f.read(CHUNK_PAGES // 8))
                        if len(bits) != CHUNK_PAGES // 8:
                            raise CacheError("index file is truncated")
                        idx.chunks[b][int(no)] = c
                        idx.bits[b][int(no)] = bits
                return idx, layout, meta["extra"]
        except CacheError:
            raise
        except (OSError, EOFError, ValueError, KeyError, TypeError) as e:
            raise CacheError(f"index file {path} is unusable: {e}") from None


def _set_bits(bm: bytearray, start: int, stop: int, value: bool) -> None:
    """Set (or clear) bits ``[start, stop)`` of an LSB-first bitmap, whole bytes at once."""
    while start < stop and start & 7:
        if value:
            bm[start >> 3] |= 1 << (start & 7)
        else:
            bm[start >> 3] &= ~(1 << (start & 7))
        start += 1
    full = (stop - start) >> 3
    if full:
        bm[start >> 3 : (start >> 3) + full] = (b"\xff" if value else b"\x00") * full
        start += full << 3
    while start < stop:
        if value:
            bm[start >> 3] |= 1 << (start & 7)
        else:
            bm[start >> 3] &= ~(1 << (start & 7))
        start += 1


def layout_to_json(layout: StreamLayout) -> dict[str, Any]:
    d = dataclasses.asdict(layout)
    d["vmdesc"] = None if layout.vmdesc is None else layout.vmdesc.decode("utf-8", "surrogateescape")
    if layout.configuration is not None and layout.configuration.uuid is not None:
        d["configuration"]["uuid"] = layout.configuration.uuid.hex()
    return d


def layout_from_json(d: dict[str, Any]) -> StreamLayout:
    d = dict(d)
    conf = d.get("configuration")
    if conf is not None:
        conf = dict(conf)
        conf["capabilities"] = tuple(conf["capabilities"])
        if conf["uuid"] is not None:
            conf["uuid"] = bytes.fromhex(conf["uuid"])
        d["configuration"] = Configuration(**conf)
    blocks = []
    for b in d["blocks"]:
        b = dict(b)
        if b.get("mapped") is not None:
            b["mapped"] = MappedRamHeader(**b["mapped"])
        blocks.append(RamBlockRecord(**b))
    d["blocks"] = tuple(blocks)
    d["commands"] = tuple(Command(**c) for c in d["commands"])
    d["warnings"] = tuple(d["warnings"])
    d["iterables"] = tuple(IterableSection(**{**it, "pieces": tuple(SectionPiece(**p) for p in it["pieces"])})
                           for it in d.get("iterables", ()))
    if d["vmdesc"] is not None:
        d["vmdesc"] = d["vmdesc"].encode("utf-8", "surrogateescape")
    return StreamLayout(**d)
