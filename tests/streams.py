"""Small sequential streams built record by record, for parser, index and writer tests."""

from __future__ import annotations

import struct

from ramfs.format import encode as enc
from ramfs.format.qemu import (RAM_SAVE_FLAG_CONTINUE, RAM_SAVE_FLAG_PAGE, RAM_SAVE_FLAG_ZERO,
                               Configuration, SectionType)

PS = 4096


def sequential_stream(records, blocks):
    """A minimal sequential stream: ``records`` are (block, page, payload or None)."""
    conf = Configuration(offset=0, machine="pc-i440fx-10.0", target_page_bits=None, capabilities=(),
                         uuid=None, end=0)
    out = bytearray(enc.file_header() + enc.configuration(conf, ()))
    out += enc.section_start(2) + enc.mem_size(sum(n for _, n in blocks))
    out += b"".join(enc.block_record(name, n) for name, n in blocks)
    out += enc.eos() + enc.footer(2) + enc.section_part_end(SectionType.SECTION_PART, 2)
    prev = None
    for b, p, payload in records:
        flags = RAM_SAVE_FLAG_ZERO if payload is None else RAM_SAVE_FLAG_PAGE
        if b == prev:
            out += struct.pack(">Q", p * PS | flags | RAM_SAVE_FLAG_CONTINUE)
        else:
            out += struct.pack(">Q", p * PS | flags) + bytes([len(blocks[b][0])]) + blocks[b][0].encode()
        out += b"\0" if payload is None else payload
        prev = b
    out += enc.eos() + enc.footer(2) + enc.section_part_end(SectionType.SECTION_END, 2)
    out += enc.eos() + enc.footer(2) + bytes([SectionType.EOF])
    return bytes(out)


def random_records(rng, blocks):
    recs = []
    for _ in range(rng.randrange(1, 40)):
        b = rng.randrange(len(blocks))
        pages = blocks[b][1] // PS
        start = rng.randrange(pages)
        n = min(pages - start, rng.choice([1, 3, 15, 16, 17, 63, 64, 65, 200, 1000]))
        zero = rng.random() < 0.5
        step = 1 if rng.random() < 0.85 else rng.choice([2, -1])
        for k in range(n):
            p = start + k * step
            if not 0 <= p < pages:
                break
            recs.append((b, p, None if zero else bytes([rng.randrange(1, 256)]) * PS))
    return recs
