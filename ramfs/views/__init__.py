"""Views: a save image seen as one more file, produced on read.

A view is what the mount serves as a large read-only file and what ``ramfs phys``/``core``/
``export`` write out: its ``size``, ``read(offset, size, nowait=False)`` (``nowait``: from the
page cache only, else :class:`~ramfs.image.files.WouldBlock`, so the FUSE loop can serve cached
bytes without a thread hop), ``has_data(offset, size)`` (False: the range reads as zeros, no
I/O) and ``populated_ranges()`` (what holds data, for ``st_blocks``, ``maps/`` and sparse
copies). Every view implements :class:`View`; the tree adds one with
:meth:`ramfs.fs.tree.Tree.view`. A new view is one module here and one line in
``Tree.fill_image_dir``.

* :class:`BlockView` (here): one RAM block, ``ram/<idstr>``;
* :class:`ramfs.views.phys.PhysView`: guest-physical memory, ``phys/memory``;
* :class:`ramfs.views.elfcore.ElfCore`: an ELF core like QEMU's dump, ``phys/core.elf``;
* :class:`ramfs.views.export.SequentialExport`: a classic sequential save image,
  ``export/sequential.img``.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable
from collections.abc import Iterator

from ramfs.image.model import Image, RamBlock


@runtime_checkable
class View(Protocol):
    size: int

    # bytearray: a RAM block's bytes as Image.read returns them, not copied again.
    def read(self, offset: int, size: int, nowait: bool = False) -> bytes | bytearray: ...

    def has_data(self, offset: int, size: int) -> bool: ...

    def populated_ranges(self) -> Iterator[tuple[int, int]]: ...


class BlockView:
    """One RAM block of an image: offsets are block offsets."""

    def __init__(self, image: Image, block: RamBlock):
        self.image = image
        self.block = block
        self.size = block.used_length

    def read(self, offset: int, size: int, nowait: bool = False) -> bytearray:
        return self.image.read(self.block, offset, size, nowait)

    def has_data(self, offset: int, size: int) -> bool:
        return self.block.has_data(offset, size)

    def populated_ranges(self) -> Iterator[tuple[int, int]]:
        return self.block.populated_ranges()


class FileView:
    """A regular file held open, as it is (a published conversion in ``convert/``)."""

    def __init__(self, fd: int, label: str):
        from ramfs.image.files import FileSource

        self.source = FileSource(label, fd)  # takes the descriptor over
        self.size = self.source.size

    def read(self, offset: int, size: int, nowait: bool = False) -> bytes:
        if not nowait:
            return self.source.read_at(offset, size)
        buf = bytearray(max(0, min(size, self.size - offset)))
        self.source.readinto_at(memoryview(buf), offset, nowait=True)
        return bytes(buf)

    def has_data(self, offset: int, size: int) -> bool:
        return any(True for _ in self.source.data_ranges(offset, min(offset + size, self.size)))

    def populated_ranges(self) -> Iterator[tuple[int, int]]:
        return self.source.data_ranges(0, self.size)

    def close(self) -> None:
        self.source.close()


__all__ = ["BlockView", "FileView", "View"]
