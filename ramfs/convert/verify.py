"""The check a conversion passes before its result gets its final name."""

from __future__ import annotations

from typing import TYPE_CHECKING

from ramfs.errors import FormatError
from ramfs.image import open_image

if TYPE_CHECKING:
    from ramfs.convert.core import ConvertResult


def verify_output(path: str, result: ConvertResult) -> None:
    """Re-read the output through the reader: structure, mapped-ram, populated page count."""
    with open_image(path, use_cache=False) as img:
        if not result.already_sparse:
            if img.encoding != "mapped-ram":
                raise FormatError("internal: the converted image is not mapped-ram")
            got = tuple(b.populated_pages for b in img.blocks)
            if got != result.populated:
                raise FormatError(f"internal: converted image has {got} populated pages per block, "
                                  f"the conversion set {result.populated}")
        # The source's own quirks (a save without VM description, say) carry over; anything
        # else the reader finds in the output is ours.
        new = [w for w in img.warnings if w not in result.source_warnings]
        if new:
            raise FormatError(f"converted image has problems: {'; '.join(new)}")
