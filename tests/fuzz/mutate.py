"""Structure-aware mutations of a :class:`fuzz.seeds.Case`, plus plain byte damage.

Each operator takes the case and a ``random.Random`` and edits the case in place; it returns
a short label for the log (or ``None`` when it found nothing to work on). Operators know the
roles of the fields laid out by :mod:`fuzz.seeds`: they set a field to the boundary values of
its meaning (0, 1, the maximum, 2^32-1, 2^52, 2^60, past the end of the file, the offset of
another structure...), rewrite names (NUL, ``/``, ``..``, another block's name, 255 bytes),
damage bitmaps, cut the data at every structural boundary, remove, duplicate, swap or move
whole records and sections, and break the JSON and XML texts in the ways their parsers
dislike (deep nesting, huge numbers, bad UTF-8, entity expansion). *Repair* operators put a
consistency back (MEM_SIZE, data_len, the vmdesc length) so that damage further in is reached.
"""

from __future__ import annotations

import struct

from fuzz.blob import Blob, Field
from fuzz.seeds import MIB, Case, mapped

U64 = (1 << 64) - 1
INTERESTING = [0, 1, 2, 3, 4, 7, 8, 0x10, 0x20, 0x7F, 0x80, 0xFF, 0x100, 0xFFF, 0x1000, 0x1001, 0x7FFF,
               0x8000, 0xFFFF, 0x10000, 0x100000, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF, 0x100000000,
               1 << 40, 1 << 52, (1 << 52) + 0x1000, 1 << 60, 1 << 63, U64, U64 - 1]


def _width(f: Field) -> int:
    return struct.calcsize(f.fmt) * 8


def _pick(rng, items):
    return items[rng.randrange(len(items))] if items else None


def _blob(case: Case, rng, *, prefix_weight: float = 0.25) -> Blob:
    if case.prefix is not None and rng.random() < prefix_weight:
        return case.prefix
    if case.far and rng.random() < 0.25:
        return _pick(rng, case.far)[1]
    return case.stream


def _ps(case: Case) -> int:
    for f in case.stream.find(role="pagebits"):
        v = case.stream.get(f)
        if 8 <= v <= 16:
            return 1 << v
    return 4096


def _values(case: Case, b: Blob, f: Field, rng) -> list[int]:
    orig = b.get(f)
    bits = _width(f)
    top = (1 << bits) - 1
    ps = _ps(case)
    vals = [0, 1, top, top - 1, orig + 1, orig - 1, orig ^ (1 << rng.randrange(bits)), orig * 2, orig // 2,
            rng.getrandbits(bits), _pick(rng, INTERESTING)]
    role = f.role
    base = len(case.prefix) if case.prefix is not None and case.compress is None else 0
    end = base + len(case.stream)
    if role == "offset":
        others = [case.stream.get(g) for g in case.stream.find(role="offset")]
        vals += [end, end - 1, end + 1, end + ps, orig + ps, orig - ps, orig + 28, orig - 28, orig + MIB,
                 orig - MIB, (orig // ps + 1) * ps, orig | 1, orig + 1, 1 << 40, 1 << 60, base,
                 rng.randrange(0, end + 1) // ps * ps] + others
    elif role in ("used", "memsize"):
        flags = 4 if role == "memsize" else 0
        vals += [v | flags for v in (ps, 2 * ps, orig + ps, orig - ps, orig * 2, 1 << 30, 1 << 40, 1 << 52,
                                     (1 << 52) + ps, 1 << 60, (1 << 64) - ps)]
        vals += [orig | 1, orig & ~(ps - 1), orig | 0x10, orig | 0x8]
    elif role == "rechdr":
        flags = orig & (ps - 1)
        addr = orig - flags
        vals += [addr | (flags ^ (1 << rng.randrange(12))),
                 addr | rng.choice([0x1, 0x40, 0x80, 0x100, 0x200, 0x400, 0x800,
                                    0xA, 0x2A, 0x28, 0x22, 0x10, 0x30, 0x4]),
                 flags | (1 << 40), flags | (1 << 26), flags | (addr + ps), flags | ((1 << 63) & ~(ps - 1)),
                 orig ^ 0x20]
    elif role == "flags":
        vals += [0x10, 0x30, 0x200, 0x220, 0x2, 0x8, 0x4, 0x1, 0x40, 0x80, 0x100, 0x400, 0x800, 0x1010]
    elif role == "len":
        vals += [0, 1, 2, 0xFF, 0xFE, 0x100, 0xFFFFFFFF, 0x100000, orig + 5, orig - 5]
    elif role == "count":
        vals += [0, 1, 2, 63, 64, 65, 0xFFFFFFFF]
    elif role == "type":
        vals += list(range(0, 10)) + [0x7E, 0x7F, 0x80, 0xFF]
    elif role == "cmd":
        vals += list(range(0, 13)) + [0xFFFF]
    elif role == "version":
        vals += [0, 1, 2, 3, 4, 5, 0x100, 0x1000000, 0x2000000, 0x3000000]
    elif role == "pagebits":
        vals += [0, 7, 8, 9, 10, 12, 13, 16, 17, 31, 32, 63, 64]
    elif role == "pagesize":
        vals += [0, 1, 256, 512, 1024, 2048, 4096, 8192, 1 << 16, 1 << 21, 1 << 32, 1 << 63]
    elif role == "format":
        vals += list(range(0, 9)) + [0xFF, 0x1000000]
    elif role in ("datalen", "cookieoff"):
        area = len(case.prefix) - 92 if case.prefix is not None else 0
        vals += [area, area - 1, area + 1, 0x7FFFFFFF, 16 << 20, (16 << 20) + 1, 1431, 1430, 1432, area // 2]
    elif role == "id":
        vals += [0, 1, 2, 3, 0x28, 0xFFFFFFFF]
    elif role in ("fill", "bool", "nul"):
        vals += [0, 1, 0xFF, 0x10]
    elif role in ("addr", "pcsize"):
        vals += [0, 0x1000, 0x200000, 0x40000000, 1 << 32, 1 << 40, 1 << 41, 1 << 62, 0xC0000]
    return vals


# --- operators -------------------------------------------------------------------------------------

def op_int(case: Case, rng, **kw) -> str | None:
    b = _blob(case, rng)
    fields = b.find(kind="int")
    if not fields:
        return None
    f = _pick(rng, fields)
    v = _pick(rng, _values(case, b, f, rng))
    b.set_int(f, v)
    return f"int {f.name}={v & ((1 << _width(f)) - 1):#x}"


NAMES = [b"", b"\0", b"ram", b"pc.ram", b"pc.rom", b"../ram", b"a/../b", b"/x/y/z", b".", b"..", b"/", b"a" * 255,
         b"\xff\xfe", b"p\0c", b"configuration/capabilities", b"configuration/uuid", b"mapped-ram",
         b"x-ignore-shared", b"configuration/target-page-bits", b"xbzrle", b"\xc3\x28", b"timer", b" ",
         b"/rom@etc/acpi/rsdp", b"\n"]


def op_name(case: Case, rng, **kw) -> str | None:
    b = _blob(case, rng, prefix_weight=0.0)
    names = b.find(kind="name")
    if not names:
        return None
    f = _pick(rng, names)
    others = [b.get(g) for g in names if g is not f]
    mode = rng.randrange(4)
    if mode == 0:  # same length: poke a bad byte in
        raw = bytearray(b.get(f))
        if raw:
            raw[rng.randrange(len(raw))] = rng.choice(b"\0/.\xff \x80")
        b.overwrite(f.off, bytes(raw))
        return f"name-poke {f.name}"
    new = _pick(rng, NAMES + others) if mode < 3 else bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 40)))
    # The length byte (or be32 for the machine name) sits right before the name.
    lens = [g for g in b.find(kind="int") if g.end == f.off]
    b.splice(f.off, f.end, new)
    if lens and rng.random() < 0.9:
        b.set_int(lens[0], len(new))
    return f"name {f.name}={new[:20]!r}"


def op_bitmap(case: Case, rng, **kw) -> str | None:
    b = _blob(case, rng, prefix_weight=0.0)
    fields = b.find(kind="bitmap")
    if not fields:
        return None
    f = _pick(rng, fields)
    raw = bytearray(b.get(f))
    if not raw:
        return None
    mode = rng.randrange(5)
    if mode == 0:
        raw[:] = b"\xff" * len(raw)
    elif mode == 1:
        raw[:] = bytes(len(raw))
    elif mode == 2:
        for _ in range(rng.randrange(1, 8)):
            i = rng.randrange(len(raw) * 8)
            raw[i >> 3] ^= 1 << (i & 7)
    elif mode == 3:
        raw[-1] = 0xFF  # bits past the last page
    else:
        raw[rng.randrange(len(raw))] = rng.getrandbits(8)
    b.overwrite(f.off, bytes(raw))
    return f"bitmap {mode}"


def op_truncate(case: Case, rng, **kw) -> str | None:
    b = _blob(case, rng)
    if not b.fields:
        return None
    f = _pick(rng, b.fields)
    cut = max(0, min(len(b), rng.choice([f.off, f.end]) + rng.choice([0, 0, 0, 1, -1, 2, -2, 4, -4])))
    b.truncate(cut)
    if b is case.stream:
        case.far = []
    return f"truncate {f.name}@{cut}"


SPAN_ROLES = ("record", "section", "blockentry", "subsection", "footer", "device", "vmdesc")


def op_span(case: Case, rng, donors: list[Case] | None = None, **kw) -> str | None:
    b = _blob(case, rng, prefix_weight=0.0)
    spans = [f for f in b.find(kind="span") if f.role in SPAN_ROLES]
    if not spans:
        return None
    f = _pick(rng, spans)
    data = bytes(b.buf[f.off:f.end])
    mode = rng.randrange(5)
    if mode == 0:
        b.splice(f.off, f.end, b"")
        return f"remove {f.role}"
    if mode == 1:
        b.splice(f.end, f.end, data)
        return f"duplicate {f.role}"
    if mode == 2:  # swap with another unit of the same role
        same = [g for g in spans if g.role == f.role and (g.end <= f.off or g.off >= f.end)]
        g = _pick(rng, same)
        if g is None:
            return None
        a, c = (f, g) if f.off < g.off else (g, f)
        da, dc = bytes(b.buf[a.off:a.end]), bytes(b.buf[c.off:c.end])
        b.splice(c.off, c.end, da)
        b.splice(a.off, a.end, dc)
        return f"swap {f.role}"
    if mode == 3:  # move it before another unit
        g = _pick(rng, spans)
        if g is f or (g.off < f.end and g.end > f.off):
            return None
        b.splice(f.off, f.end, b"")
        at = g.off if g.off < f.off else g.off - len(data)
        b.splice(at, at, data)
        return f"move {f.role} before {g.role}"
    # a unit of the same role from another seed
    if not donors:
        return None
    d = _pick(rng, donors)
    dspans = [g for g in d.stream.find(kind="span") if g.role == f.role]
    g = _pick(rng, dspans)
    if g is None:
        return None
    b.splice(f.end, f.end, bytes(d.stream.buf[g.off:g.end]))
    return f"graft {f.role} from {d.name}"


def _deep(n: int, kind: str) -> bytes:
    if kind == "list":
        return b"[" * n + b"]" * n
    return b'{"a": ' * n + b"1" + b"}" * n


JSON_BAD = [
    lambda rng: _deep(rng.choice([100, 1000, 5000, 100000]), rng.choice(["list", "obj"])),
    lambda rng: b'{"page_size": ' + b"9" * rng.choice([100, 4300, 5000, 100000]) + b"}",
    lambda rng: b'{"page_size": 1e999, "devices": [1, "x", null, {"name": 5}]}',
    lambda rng: b'{"page_size": NaN, "devices": {"name": "x"}}',
    lambda rng: (b'{"page_size": "4096", "devices": '
                 b'[{"name": [], "instance_id": "0", "version": 1.5, "vmsd_name": {}}]}'),
    lambda rng: b"[]",
    lambda rng: b"null",
    lambda rng: b"",
    lambda rng: b"\xff\xfe\x00\x00",
    lambda rng: b'{"a": "\xc3\x28"}',
    lambda rng: b'{"a": "\\ud800"}',
    lambda rng: b"\xef\xbb\xbf{}",
    lambda rng: b'{"devices": [' + b'{"name": "d"}, ' * 2000 + b'{}]}',
    lambda rng: b'{"a": 1, "a": 2, "page_size": 4096, "devices": []}',
    lambda rng: b"\x00" * 64,
]


def op_json(case: Case, rng, **kw) -> str | None:
    b = case.far[-1][1] if case.far else case.stream
    fields = b.find(kind="json")
    if not fields:
        return None
    f = fields[-1]
    raw = b.get(f)
    mode = rng.randrange(4)
    if mode == 0:
        new = JSON_BAD[rng.randrange(len(JSON_BAD))](rng)
    elif mode == 1:
        new = raw[:rng.randrange(len(raw) + 1)]
    elif mode == 2:
        i = rng.randrange(len(raw) + 1)
        new = (raw[:i]
               + rng.choice([b"\0", b"\xff", b"]", b"{", b'"', b"\\", b"\x06\x00\x00\x00\x01", b"9" * 5000])
               + raw[i:])
    else:
        new = raw.replace(b'"page_size": 4096', rng.choice([b'"page_size": 8192', b'"page_size": "x"',
                                                            b'"page_size": null', b'"page_size": -1']))
        new = new.replace(b'"devices": [', rng.choice([b'"devices": [7, ', b'"devices": [[], ', b'"devices": [']), 1)
    lens = [g for g in b.find(role="len") if g.end == f.off]
    b.splice(f.off, f.end, new)
    if lens and rng.random() < 0.85:
        b.set_int(lens[0], len(new))
    return f"json {mode}"


def _json_nodes(x, out: list, depth: int = 0) -> list:
    if depth > 40:
        return out
    if isinstance(x, dict):
        out.append(x)
        for v in x.values():
            _json_nodes(v, out, depth + 1)
    elif isinstance(x, list):
        out.append(x)
        for v in x:
            _json_nodes(v, out, depth + 1)
    return out


JSON_VALUES = [0, 1, -1, 2, 7, 8, 255, 256, 4096, 65535, 1 << 31, (1 << 32) - 1, 1 << 32, 1 << 52, 1 << 63,
               1 << 64, 10 ** 30, 0.5, -0.0, True, None, "", "x", "uint64", "uint32 le", "struct", "buffer",
               "bool", "int8", "int64 le", "unused_buffer", [], {}, [{}], {"name": "x", "size": 1}]
JSON_KEYS = ["name", "size", "type", "array_len", "fields", "subsections", "struct", "instance_id",
             "version", "vmsd_name", "devices", "page_size", "section_id", "index"]


def op_json_tree(case: Case, rng, **kw) -> str | None:
    """Mutate the VM description as JSON (a size, a type, an array length, a field list...)
    and keep it valid JSON of the right length: the device-state decoder trusts its shape."""
    import json
    b = case.far[-1][1] if case.far else case.stream
    fields = b.find(kind="json")
    if not fields:
        return None
    f = fields[-1]
    try:
        doc = json.loads(b.get(f))
    except (ValueError, RecursionError):
        return None
    nodes = _json_nodes(doc, [])
    node = _pick(rng, nodes)
    if node is None:
        return None
    mode = rng.randrange(5)
    if isinstance(node, dict) and node:
        key = _pick(rng, list(node)) if mode < 4 else _pick(rng, JSON_KEYS)
        if mode == 0:
            del node[key]
        elif mode == 1 and isinstance(node[key], int) and not isinstance(node[key], bool):
            node[key] = node[key] + rng.choice([-1, 1, 8, -8, 1 << 20, -(1 << 20)])
        else:
            node[key] = _pick(rng, JSON_VALUES)
    elif isinstance(node, list) and node:
        i = rng.randrange(len(node))
        if mode == 0:
            del node[i]
        elif mode == 1:
            node.insert(i, json.loads(json.dumps(node[i])))
        elif mode == 2:
            j = rng.randrange(len(node))
            node[i], node[j] = node[j], node[i]
        else:
            node[i] = _pick(rng, JSON_VALUES)
    else:
        return None
    new = json.dumps(doc, separators=(", ", ": ")).encode()
    lens = [g for g in b.find(role="len") if g.end == f.off]
    b.splice(f.off, f.end, new)
    if lens:
        b.set_int(lens[0], len(new))
    return f"json-tree {mode}"


XML_BAD = [
    b'<?xml version="1.0"?><!DOCTYPE d [<!ENTITY a "aaaaaaaaaa"><!ENTITY b "&a;&a;&a;&a;&a;&a;&a;&a;&a;&a;">'
    b'<!ENTITY c "&b;&b;&b;&b;&b;&b;&b;&b;&b;&b;"><!ENTITY d "&c;&c;&c;&c;&c;&c;&c;&c;&c;&c;">'
    b'<!ENTITY e "&d;&d;&d;&d;&d;&d;&d;&d;&d;&d;"><!ENTITY f "&e;&e;&e;&e;&e;&e;&e;&e;&e;&e;">]>'
    b'<domain><name>&f;</name></domain>',
    b'<!DOCTYPE d [<!ENTITY x SYSTEM "file:///etc/passwd">]><domain><name>&x;</name></domain>',
    b"<domain>" + b"<a>" * 20000 + b"</a>" * 20000 + b"</domain>",
    b"<domain><name>\xff\xfe</name></domain>",
    b"<domain><name>ok</name>",
    b"not xml at all",
    b"",
    b"<domain type='kvm'><name>n</name><uuid>u</uuid><name>two</name></domain>",
    b"<?xml version='1.0' encoding='latin-1'?><domain><name>\xe9</name></domain>",
]


def op_xml(case: Case, rng, **kw) -> str | None:
    p = case.prefix
    if p is None:
        return None
    fields = p.find(kind="xml")
    if not fields:
        return None
    f = _pick(rng, fields)
    raw = p.get(f)
    mode = rng.randrange(3)
    if mode == 0:
        new = XML_BAD[rng.randrange(len(XML_BAD))]
    elif mode == 1:
        new = raw[:rng.randrange(len(raw) + 1)]
    else:
        i = rng.randrange(len(raw) + 1)
        new = raw[:i] + rng.choice([b"\0", b"\xff", b"<", b"&", b"]]>", b"\xc3"]) + raw[i:]
    p.splice(f.off, f.end, new)
    if rng.random() < 0.8:
        op_fix_libvirt(case, rng)
    return f"xml {mode}"


def op_nul(case: Case, rng, **kw) -> str | None:
    """Remove the NUL after an XML text (and maybe all the padding's zeros)."""
    p = case.prefix
    if p is None:
        return None
    nuls = p.find(role="nul")
    if not nuls:
        return None
    f = _pick(rng, nuls)
    p.set_int(f, rng.choice([0x20, 0x41, 0xFF]))
    if rng.random() < 0.5:
        for g in p.find(role="padding"):
            p.overwrite(g.off, b"x" * g.size)
    return f"nul {f.name}"


def op_bytes(case: Case, rng, **kw) -> str | None:
    b = _blob(case, rng, prefix_weight=0.15)
    n = len(b)
    if n == 0:
        return None
    # Most damage goes where the structure is (not into page payloads).
    hot = [f for f in b.fields if f.kind not in ("payload", "span", "bitmap", "json", "xml") and f.role != "padding"]
    if hot and rng.random() < 0.7:
        f = _pick(rng, hot)
        pos = min(n - 1, max(0, f.off + rng.randrange(-2, max(1, f.size) + 2)))
    else:
        pos = rng.randrange(n)
    mode = rng.randrange(8)
    if mode == 0:
        b.buf[pos] ^= 1 << rng.randrange(8)
    elif mode == 1:
        b.buf[pos] = rng.getrandbits(8)
    elif mode == 2:
        k = rng.choice([2, 4, 8])
        v = _pick(rng, INTERESTING) & ((1 << (8 * k)) - 1)
        b.overwrite(pos, v.to_bytes(k, rng.choice(["big", "little"])))
    elif mode == 3:
        b.splice(pos, pos, bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 17))))
    elif mode == 4:
        b.splice(pos, min(n, pos + rng.randrange(1, 65)), b"")
    elif mode == 5:
        k = rng.randrange(1, 257)
        src = rng.randrange(n)
        b.splice(pos, pos, bytes(b.buf[src:src + k]))
    elif mode == 6:
        k = rng.randrange(1, 65)
        b.overwrite(pos, bytes([rng.choice([0, 0xFF])]) * k)
    else:
        # A fake "00 06 len" vmdesc marker whose length reaches the end.
        blen = n - pos - 6
        if blen < 0:
            return None
        b.overwrite(pos, b"\x00\x06" + struct.pack(">I", blen))
    return f"bytes {mode}@{pos}"


def op_extend(case: Case, rng, **kw) -> str | None:
    """Append a hole (zeros) to the file."""
    if case.compress is not None and (rng.random() < 0.97 or not kw.get("heavy", True)):
        # Python's gzip reads zeros after a member one byte per call: big ones only rarely.
        case.extend = rng.choice([1, 7, 512, 4095, 4096])
    else:
        case.extend = rng.choice([1, 7, 4095, 4096, MIB, 64 * MIB, 65 * MIB, 1 << 32, 1 << 40]
                                 if case.compress is None else [MIB, 4 * MIB])
    return f"extend {case.extend:#x}"


def op_post(case: Case, rng, **kw) -> str | None:
    """Damage the compressed bytes themselves (formats 1-5)."""
    if case.compress is None:
        return None
    mode = rng.randrange(6)
    if mode == 0:
        case.post.append(("flip", rng.random(), rng.randrange(8)))
    elif mode == 1:
        case.post.append(("cut", rng.random()))
    elif mode == 2:
        case.post.append(("append", bytes(rng.getrandbits(8) for _ in range(rng.randrange(1, 64)))))
    elif mode == 3:
        case.post.append(("again",))  # a second frame/member holding the stream again
    elif mode == 4:
        case.post.append(("zeros", rng.choice([1, 8] if kw.get("heavy", True) else [1])))  # a frame of zeros
    else:
        if rng.random() > 0.05 or not kw.get("heavy", True):
            return None  # decompression bombs are slow by nature: rarely
        case.post.append(("zeros", rng.choice([72, 160])))
    return f"post {case.post[-1][0]}"


def op_fix_memsize(case: Case, rng, **kw) -> str | None:
    """Repair: MEM_SIZE = the sum of the used_length fields."""
    b = case.stream
    ms = b.find(role="memsize")
    if not ms:
        return None
    total = sum(b.get(f) for f in b.find(role="used")) & U64
    b.set_int(ms[0], (total & ~0xFFF) | 4 if rng.random() < 0.9 else total | 4)
    return "fix memsize"


def op_fix_libvirt(case: Case, rng, **kw) -> str | None:
    """Repair: data_len to the XML area's length (and cookieOffset to the cookie)."""
    p = case.prefix
    if p is None or len(p) < 92:
        return None
    dl = p.find(role="datalen")
    if dl:
        p.set_int(dl[0], len(p) - 92)
    ck = p.find(role="cookieoff")
    xmls = p.find(kind="xml")
    if ck and len(xmls) > 1 and p.get(ck[0]):
        p.set_int(ck[0], xmls[1].off - 92)
    return "fix libvirt"


def op_fix_vmdesc(case: Case, rng, **kw) -> str | None:
    b = case.far[-1][1] if case.far else case.stream
    fields = b.find(kind="json")
    if not fields:
        return None
    f = fields[-1]
    lens = [g for g in b.find(role="len") if g.end == f.off]
    if not lens:
        return None
    b.set_int(lens[0], len(b) - f.off)
    return "fix vmdesc"


def op_huge(case: Case, rng, **kw) -> str | None:
    """Replace a mapped-ram case by one whose last block is huge, its regions holes."""
    if not kw.get("heavy", True) or not (case.name.startswith("mapped") or case.name == "lv-sparse-mapped"):
        return None
    base = len(case.prefix) if case.prefix is not None else 0
    blocks = rng.choice([("/rom@etc/acpi/rsdp", "pc.ram"), ("pc.ram",), ("pc.bios", "pc.ram")])
    pattern = None
    if rng.random() < 0.4:
        # A written bitmap with many runs (up to 1 MiB of it: a 32 GiB block).
        size = 1 << rng.choice([28, 30, 31, 32, 32, 33, 33, 34])
        pattern = rng.choice([b"\x01\x00", b"\x55", b"\x0f\xf0", b"\x01" + bytes(7), b"\xfe\xff\x7f\x00", b"\xff\x00"])
    else:
        size = 1 << rng.choice([30, 34, 36, 38, 40, 41, 42])
    s, far = mapped(base=base, blocks=blocks, huge=size, pages=8, align=rng.choice([None, MIB]),
                    huge_bitmap=pattern)
    case.stream, case.far = s, far
    return f"huge {size:#x}" + (f" bitmap {pattern.hex()}" if pattern else "")


MAGICS = [b"LibvirtQemudPart", b"LibvirtQemudSave", b"LibvirtQemudSavf", b"libvirtqemudsave", bytes(16),
          b"QEVM" + bytes(12), b"QEVM\x00\x00\x00\x03" + bytes(8)]


def op_magic(case: Case, rng, **kw) -> str | None:
    """The libvirt magic: unfinished (LibvirtQemudPart), off by one letter, or a bare QEVM."""
    p = case.prefix
    if p is None:
        return None
    f = p.find(role="magic")
    if not f:
        return None
    new = _pick(rng, MAGICS)
    p.overwrite(f[0].off, new)
    return f"magic {new[:16]!r}"


def op_container(case: Case, rng, **kw) -> str | None:
    """Put the stream in another container: bare <-> libvirt, raw <-> compressed."""
    from fuzz.seeds import libvirt_prefix
    mode = rng.randrange(3)
    fmt = rng.choice([None, None, 1, 5, 2, 3])
    if mode == 0 and case.prefix is None:
        case.prefix = libvirt_prefix(fmt=fmt or rng.choice([0, 6]))
        case.compress = fmt
        return f"wrap libvirt fmt={fmt}"
    if mode == 1 and case.prefix is not None:
        case.prefix, case.compress, case.post = None, None, []
        return "unwrap"
    if case.prefix is not None:
        f = case.prefix.find(role="format")
        if f:
            case.prefix.set_int(f[0], fmt or rng.choice([0, 6]))
        case.compress, case.post = fmt, []
        return f"compress fmt={fmt}"
    return None


OPS = [  # (weight, operator)
    (30, op_int), (8, op_name), (5, op_bitmap), (10, op_truncate), (10, op_span), (4, op_json),
    (3, op_xml), (1, op_nul), (20, op_bytes), (2, op_extend), (3, op_post), (4, op_fix_memsize),
    (2, op_fix_libvirt), (2, op_fix_vmdesc), (0.15, op_huge), (1, op_magic), (1, op_container),
    (6, op_json_tree),
]
_TOTAL = sum(w for w, _ in OPS)


# --- qcow2 disks (fuzz.qcow2 maps them) ---------------------------------------------------------

QCOW2_L1E_MASK = 0x00FFFFFFFFFFFE00
QCOW2_COMPRESSED, QCOW2_COPIED = 1 << 62, 1 << 63


def _qcs(b: Blob) -> int:
    """The cluster size the header says now (64 KiB when it says nonsense)."""
    f = b.find(name="cluster_bits")
    bits = b.get(f[0]) if f else 16
    return 1 << bits if 9 <= bits <= 21 else 1 << 16


def _qclusters(b: Blob, what: str | None = None) -> list[int]:
    return [f.off for f in b.find(role="qcluster") if what is None or f.name == what]


def _qstructures(b: Blob) -> list[int]:
    """Offsets of the file's structures: where a bad pointer hurts most."""
    out = _qclusters(b)
    for f in b.find(role="qoffset"):
        out.append(b.get(f))
    return out


def _qvalues(b: Blob, f: Field, rng) -> list[int]:
    orig = b.get(f)
    cs = _qcs(b)
    end = len(b)
    role = f.role
    vals = [0, 1, orig + 1, orig - 1, orig ^ (1 << rng.randrange(_width(f))), (1 << _width(f)) - 1]
    if role == "qoffset":
        vals += [cs, end, end - cs, (end + cs - 1) // cs * cs, end + cs, orig + 512, orig + cs // 2, orig + cs,
                 orig - cs, 1 << 56, (1 << 56) - cs, 1 << 62 | orig, 1 << 63 | orig, 72, 104]
        vals += _qstructures(b)
    elif role == "l1size":
        vals += [2, 3, 0x400000, 0x400001, 0x3FFFFFFF, end // 8, end // 8 + 1, orig * 2, orig + 32]
    elif role == "qcount":
        vals += [2, 3, 4, 5, 0xFFFF, 0x10000, 0x10001, 0x7FFFFFFF]
    elif role == "qlen":
        vals += [7, 8, 16, 23, 24, 0xFF, 0x100, 0xFFFF, 1024, 1025, 72, 100, 104, 112, cs, cs + 1, orig + 8, orig - 8,
                 0xFFFFFFFF]
    elif role == "cbits":
        vals += [8, 9, 10, 12, 13, 14, 15, 16, 17, 20, 21, 22, 31, 32, 63]
    elif role == "qsize":
        vals += [512, cs, orig + cs, orig - cs, orig * 2, orig // 2, orig + (1 << 30), 1 << 40, 1 << 55, 1 << 56,
                 1 << 62, (1 << 63) - 1]
    elif role == "crypt":
        vals += [2, 3]
    elif role == "qversion":
        vals += [2, 3, 4]
    elif role == "qfeatures":
        vals += [orig ^ (1 << k) for k in range(6)] + [1 << 63 | orig, 0x1F]
    elif role == "rcorder":
        vals += list(range(8)) + [64]
    elif role == "ctype":
        vals += [0, 1, 2, 0xFF]
    elif role == "exttype":
        vals += [0, 0xE2792ACA, 0x6803F857, 0x23852875, 0x0537BE77, 0x44415441, 0x12345678]
    elif role == "vmsize":
        vals += [orig + cs, orig - cs, orig * 2, orig // 2, 0xFFFFFFFF, 1 << 32, 1 << 40, 1 << 56, 1 << 63, end,
                 end * 2, orig + 4096, orig - 4096]
    elif role == "qtime":
        vals += [1 << 63, 999999999, 1000000000, 0xFFFFFFFF]
    return vals


def op_qint(case: Case, rng, **kw) -> str | None:
    """A header, extension or snapshot-table field set to a value that means something to qcow2."""
    b = case.stream
    fields = [f for f in b.find(kind="int") if f.role not in ("l1e", "l2e", "l2bitmap")]
    f = _pick(rng, fields)
    if f is None:
        return None
    v = _pick(rng, _qvalues(b, f, rng))
    b.set_int(f, v)
    return f"qint {f.name}={v & ((1 << _width(f)) - 1):#x}"


def op_qentry(case: Case, rng, **kw) -> str | None:
    """An L1 or L2 entry pointed elsewhere (past EOF, unaligned, at the header, at other tables or
    at another data cluster), or its flags changed (compressed, zero, copied, reserved bits)."""
    b = case.stream
    entries = b.find(role="l2e") + b.find(role="l1e")
    used = [f for f in entries if b.get(f)]
    f = _pick(rng, used if used and rng.random() < 0.85 else entries)
    if f is None:
        return None
    e = b.get(f)
    cs = _qcs(b)
    host, flags = e & QCOW2_L1E_MASK, e & ~QCOW2_L1E_MASK
    end = len(b)
    mode = rng.randrange(4)
    if mode == 0:
        target = _pick(rng, _qclusters(b) + [0, end, end - cs, (end + cs - 1) // cs * cs, end + cs, 1 << 55])
        v = flags | (target & QCOW2_L1E_MASK)
    elif mode == 1:
        v = flags | ((host + rng.choice([0x200, cs // 2, cs, -cs, 0x1000])) & QCOW2_L1E_MASK)
    elif mode == 2:
        v = e ^ rng.choice([QCOW2_COMPRESSED, 1, QCOW2_COPIED, 1 << rng.randrange(56, 62), 1 << rng.randrange(1, 9)])
    else:
        v = rng.choice([0, 1, QCOW2_COPIED, QCOW2_COMPRESSED | rng.getrandbits(62), U64, QCOW2_COPIED | 1,
                        e | 1 << 62 | 1])
    b.set_int(f, v)
    return f"qentry {f.name}={v & U64:#x}"


def op_qbitmap(case: Case, rng, **kw) -> str | None:
    """An extended L2 entry's subcluster bitmap: allocated and zero bits, alone and together."""
    b = case.stream
    f = _pick(rng, [g for g in b.find(role="l2bitmap") if b.get(g)] or b.find(role="l2bitmap"))
    if f is None:
        return None
    orig = b.get(f)
    alloc, zero = orig & 0xFFFFFFFF, orig >> 32
    bit = 1 << rng.randrange(32)
    v = rng.choice([0xFFFFFFFF, 0xFFFFFFFF << 32, 0, alloc | (zero | bit) << 32, (alloc ^ bit) | zero << 32,
                    0x0000FFFF, 0xFFFF0000, 0x0000FFFF << 32 | 0xFFFF0000, U64, rng.getrandbits(64),
                    orig ^ (1 << rng.randrange(64))])
    b.set_int(f, v)
    return f"qbitmap {f.name}={v:#x}"


def op_qsnapshot(case: Case, rng, **kw) -> str | None:
    """Which snapshot is opened (another, by id, a disk-only one, none of them), or two with one name."""
    b = case.stream
    names = [bytes(b.get(f)) for f in b.find(role="snapname")]
    ids = [bytes(b.get(f)) for f in b.find(role="snapid")]
    if rng.random() < 0.7 or len(names) < 2:
        pick = _pick(rng, names + ids + [b"disk-only", b"nonexistent", b"", b"\xff"])
        case.snapshot = (pick or b"").decode("utf-8", "surrogateescape")
        return f"qsnapshot open {case.snapshot!r}"
    fs = b.find(role="snapname")
    a, c = rng.sample(fs, 2)
    if a.size == c.size:
        b.overwrite(a.off, bytes(b.get(c)))
        return f"qsnapshot rename {a.name} like {c.name}"
    return None


def op_qtruncate(case: Case, rng, **kw) -> str | None:
    """The file cut at a cluster boundary or inside a structure (a cluster cut short)."""
    b = case.stream
    spans = b.find(role="qcluster") + b.find(role="qsnapshot")
    f = _pick(rng, spans)
    if f is None:
        return None
    cut = rng.choice([f.off, f.end, f.off + f.size // 2, f.end - 1, f.off + 1, f.off + 8, f.end - 8])
    cut = max(0, min(len(b), cut))
    b.truncate(cut)
    return f"qtruncate {f.name}@{cut:#x}"


def op_qcopy(case: Case, rng, **kw) -> str | None:
    """One cluster's bytes over another's (an L2 table over VM state, the header over an L2 table...)."""
    b = case.stream
    spans = b.find(role="qcluster")
    if len(spans) < 2:
        return None
    src, dst = rng.sample(spans, 2)
    b.overwrite(dst.off, bytes(b.buf[src.off:src.off + dst.size]))
    return f"qcopy {src.name}@{src.off:#x} over {dst.name}@{dst.off:#x}"


def _qdata_entries(b: Blob) -> list[Field]:
    return [f for f in b.find(role="l2e") if b.get(f) & QCOW2_L1E_MASK and not b.get(f) & QCOW2_COMPRESSED
            and (b.get(f) & QCOW2_L1E_MASK) + _qcs(b) <= len(b)]


def _qbitmap_of(b: Blob, f: Field) -> Field | None:
    g = [x for x in b.find(role="l2bitmap") if x.off == f.off + 8]
    return g[0] if g else None


def op_qmove(case: Case, rng, **kw) -> str | None:
    """Valid rearrangements that keep every byte of the VM state: a data cluster moved to the end of
    the file, two data clusters swapped (contents and pointers), or, with extended L2, the
    subclusters that hold only zeros marked unallocated or zero. The map must follow them."""
    b = case.stream
    cs = _qcs(b)
    data = _qdata_entries(b)
    if not data:
        return None
    mode = rng.randrange(3)
    f = _pick(rng, data)
    e = b.get(f)
    host = e & QCOW2_L1E_MASK
    if mode == 0:
        pad = -len(b) % cs
        new = len(b) + pad
        b.buf += bytes(pad) + bytes(b.buf[host:host + cs])
        b.set_int(f, (e & ~QCOW2_L1E_MASK) | new)
        return f"qmove {f.name} to {new:#x}"
    if mode == 1:
        g = _pick(rng, [x for x in data if b.get(x) & QCOW2_L1E_MASK != host])
        if g is None:
            return None
        e2 = b.get(g)
        h2 = e2 & QCOW2_L1E_MASK
        ca, cb = bytes(b.buf[host:host + cs]), bytes(b.buf[h2:h2 + cs])
        b.overwrite(host, cb)
        b.overwrite(h2, ca)
        b.set_int(f, (e & ~QCOW2_L1E_MASK) | h2)
        b.set_int(g, (e2 & ~QCOW2_L1E_MASK) | host)
        return f"qswap {f.name} {g.name}"
    bm = _qbitmap_of(b, f)
    if bm is None:
        return None
    alloc = b.get(bm) & 0xFFFFFFFF
    sub = cs // 32
    zero_bits = rng.random() < 0.5
    for k in range(32):
        piece = b.buf[host + k * sub:host + (k + 1) * sub]
        if alloc >> k & 1 and piece.count(0) == len(piece):
            alloc &= ~(1 << k)
    zeros = (~alloc & 0xFFFFFFFF) if zero_bits else 0
    b.set_int(bm, zeros << 32 | alloc)
    return f"qsubclusters {f.name} alloc={alloc:#x}"


QOPS = [  # (weight, operator) for a qcow2 case
    (25, op_qint), (25, op_qentry), (6, op_qbitmap), (8, op_qsnapshot), (8, op_qtruncate), (3, op_qcopy),
    (8, op_qmove), (12, op_bytes), (2, op_extend), (3, op_int),
]
_QTOTAL = sum(w for w, _ in QOPS)


def mutate(case: Case, rng, donors: list[Case], heavy: bool = True) -> Case:
    """A mutated copy: 1 to 6 stacked operators.

    ``heavy=False`` leaves out what is slow by nature (decompression bombs, huge sparse
    blocks, long zero tails after gzip): for the short run of the test-suite.
    """
    c = case.copy()
    n = 1
    while n < 6 and rng.random() < 0.45:
        n += 1
    done = 0
    tries = 0
    ops, total = (QOPS, _QTOTAL) if c.snapshot is not None else (OPS, _TOTAL)
    while done < n and tries < 4 * n:
        tries += 1
        x = rng.random() * total
        for w, op in ops:  # noqa: B007 (op is the one picked: used after the loop)
            x -= w
            if x < 0:
                break
        label = op(c, rng, donors, heavy=heavy) if op is op_span else op(c, rng, heavy=heavy)
        if label:
            c.ops.append(label)
            done += 1
    return c
