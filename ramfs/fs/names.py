"""How RAM block idstrs become paths under ``ram/`` and ``maps/``, reversibly.

QEMU idstrs look like paths (``/rom@etc/acpi/tables``, ``0000:00:02.0/vga.vram``), so each
``/`` becomes a directory and a leading ``/`` is dropped. A component that is not a safe
file name is escaped with ``%``:

==================  ==========================================
``%``               ``%25`` (so that ``%`` never appears unescaped)
NUL byte            ``%00``
``.`` / ``..``      ``%2E`` / ``%2E%2E``
empty component     ``%`` (from ``//``, a trailing ``/``, or a second leading ``/``)
over 255 bytes      cut into pieces of at most 253 bytes; every piece but the last ends in
                    ``%+`` and the next piece is a subdirectory
==================  ==========================================

When a block's file name is also a directory that another block's path needs (blocks ``a``
and ``a/b``), the file gets the suffix ``%@``. ``%+`` and ``%@`` cannot come from escaping.

Only the first leading ``/`` is dropped; ``unescape`` restores it when ``leading_slash`` is
recorded, which the tree does per block (``image.json`` also lists the exact idstrs). The
rule is total and reversible: ``unescape(escape(s)) == s`` for every idstr.
"""

from __future__ import annotations

NAME_MAX = 255
_PIECE = NAME_MAX - 2  # room for the "%+" continuation mark


def _escape_component(comp: bytes) -> bytes:
    if comp == b"":
        return b"%"
    if comp in (b".", b".."):
        return b"%2E" * len(comp)
    return comp.replace(b"%", b"%25").replace(b"\0", b"%00")


def _split_long(comp: bytes) -> list[bytes]:
    if len(comp) <= NAME_MAX:
        return [comp]
    pieces = []
    while len(comp) > NAME_MAX:
        cut = _PIECE
        # Never cut inside a %XX escape.
        pct = comp.rfind(b"%", cut - 2, cut)
        if pct != -1:
            cut = pct
        pieces.append(comp[:cut] + b"%+")
        comp = comp[cut:]
    pieces.append(comp)
    return pieces


def escape(idstr: str) -> tuple[list[bytes], bool]:
    """Path components (bytes) for an idstr, and whether a leading ``/`` was dropped."""
    raw = idstr.encode("utf-8", "surrogateescape")
    leading = raw.startswith(b"/")
    if leading:
        raw = raw[1:]
    out: list[bytes] = []
    for comp in raw.split(b"/"):
        out.extend(_split_long(_escape_component(comp)))
    return out, leading


COLLISION_MARK = b"%@"


def unescape(components: list[bytes], leading_slash: bool) -> str:
    if components and components[-1].endswith(COLLISION_MARK):
        components = components[:-1] + [components[-1][: -len(COLLISION_MARK)]]
    parts: list[bytes] = []
    joined = b""
    for comp in components:
        if comp.endswith(b"%+"):
            joined += comp[:-2]
            continue
        comp = joined + comp
        joined = b""
        if comp == b"%":
            parts.append(b"")
        else:
            parts.append(comp.replace(b"%2E", b".").replace(b"%00", b"\0").replace(b"%25", b"%"))
    raw = (b"/" if leading_slash else b"") + b"/".join(parts)
    return raw.decode("utf-8", "surrogateescape")
