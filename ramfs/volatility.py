"""A Volatility 3 layer for VM save images: ``vol -f vm.save PLUGIN``, no mount, no root.

Volatility 3's own QEMU reader stops at QEMU 10 streams ("QEMU unknown section encountered")
and reads neither mapped-ram nor libvirt images. This module gives Volatility the same
guest-physical view as ``phys/memory`` (:class:`ramfs.image.phys.PhysView`): a stacker that
recognises a save image under Volatility's file layer (any container and encoding ramfs reads)
and puts a physical layer on it, on which Volatility's own automagic then finds the kernel.

How Volatility finds it: before it builds a layer stack, ``vol`` imports every module in its
plugin directories (volatility3/cli: ``framework.import_files(volatility3.plugins)``), and
the stacker collects every ``StackerLayerInterface`` subclass defined by then. The
``ramfs[volatility]`` install puts a one-line module there,
``volatility3/plugins/ramfs_saveimage.py`` (from ``ramfs/vol_plugin/``), which imports this one;
``vol -p DIR`` with a directory holding that module does the same without installing.

Addresses valid in the layer are the guest-physical RAM ranges (as the PT_LOADs of
``core.elf``); reads of anything else raise Volatility's ``InvalidAddressException`` unless
padded. What ramfs cannot place (``image.json`` → ``phys.omitted``) is not in the layer.
"""

from __future__ import annotations

import bisect
import logging
import threading
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from volatility3.framework import exceptions, interfaces
from volatility3.framework.configuration import requirements

from ramfs.errors import RamfsError
from ramfs.format.libvirt import QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL
from ramfs.format.qemu import QEMU_VM_FILE_MAGIC_BYTES

if TYPE_CHECKING:
    from ramfs.views.phys import PhysView

vollog = logging.getLogger(__name__)


def _is_save_image(head: bytes) -> bool:
    return head[:16] in (QEMU_SAVE_MAGIC, QEMU_SAVE_PARTIAL) or head[:4] == QEMU_VM_FILE_MAGIC_BYTES


class SaveImageLayer(interfaces.layers.DataLayerInterface):
    """Guest-physical memory of a save image (offset = guest-physical address)."""

    def __init__(self, context: interfaces.context.ContextInterface, config_path: str, name: str,
                 metadata: dict[str, Any] | None = None) -> None:
        super().__init__(context=context, config_path=config_path, name=name, metadata=metadata)
        self._path = self.config["location"]
        self._base = self.config["base_layer"]
        self._lock = threading.Lock()
        self._view: PhysView | None = None
        self._starts: list[int] = []
        self._ends: list[int] = []
        self._open()  # fail now, not on the first read

    def _open(self) -> PhysView:
        with self._lock:
            if self._view is None:
                from ramfs.image import open_image
                from ramfs.image.cache import CachePolicy
                from ramfs.image.phys import Placement
                from ramfs.views.phys import PhysView

                # Kept, as `ramfs index` keeps it: vol runs one plugin per process, and each
                # would otherwise decompress a compressed image again (ramfs cache clean removes it).
                img = open_image(self._path, cache=CachePolicy(keep=True))
                try:
                    view = PhysView(img, Placement().map(img))
                except BaseException:
                    img.close()
                    raise
                self._starts = [r.gpa for r in view.map.ranges]
                self._ends = [r.gpa + r.length for r in view.map.ranges]
                self._view = view
            return self._view

    @property
    def maximum_address(self) -> int:
        return self._open().size - 1

    @property
    def minimum_address(self) -> int:
        return 0

    @property
    def dependencies(self) -> list[str]:
        return [self._base]

    def is_valid(self, offset: int, length: int = 1) -> bool:
        """Inside one RAM range (a PT_LOAD of core.elf); the PCI hole is not memory."""
        if length <= 0:
            raise ValueError("Length must be positive")
        self._open()
        i = bisect.bisect_right(self._starts, offset) - 1
        return i >= 0 and offset + length <= self._ends[i]

    def read(self, offset: int, length: int, pad: bool = False) -> bytes:
        view = self._open()
        if not pad and not self.is_valid(offset, length):
            raise exceptions.InvalidAddressException(self.name, offset, "not guest RAM in this save image")
        try:
            data = view.read(offset, length)
        except RamfsError as e:
            raise exceptions.InvalidAddressException(self.name, offset, str(e)) from None
        return data + bytes(length - len(data))  # past the highest address, when padding

    def write(self, offset: int, data: bytes) -> None:
        raise exceptions.LayerException(self.name, "save images are read-only")

    def __getstate__(self) -> dict[str, Any]:
        # Volatility pickles layers for its worker processes: reopen there.
        state = self.__dict__.copy()
        state["_view"] = None
        state["_lock"] = None
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def destroy(self) -> None:
        if self._view is not None:
            self._view.image.close()
            self._view = None

    @classmethod
    def get_requirements(cls) -> list[interfaces.configuration.RequirementInterface]:
        return [requirements.StringRequirement(name="location", optional=False),
                requirements.TranslationLayerRequirement(name="base_layer", optional=False)]


class SaveImageStacker(interfaces.automagic.StackerLayerInterface):
    """Recognises a save image under Volatility's file layer (first: QEMU's own reader would
    otherwise try QEMU streams and fail on QEMU 10's sections)."""

    stack_order = 5

    @classmethod
    def stack(cls, context: interfaces.context.ContextInterface, layer_name: str,
              progress_callback: Callable[[float, str], None] | None = None
              ) -> interfaces.layers.DataLayerInterface | None:
        base = context.layers[layer_name]
        location = base.config.get("location") if hasattr(base, "config") else None
        if not isinstance(location, str) or not location.startswith("file:"):
            return None
        try:
            head = base.read(0, 16, pad=True)
        except exceptions.InvalidAddressException:
            return None
        if not _is_save_image(head):
            return None
        path = urllib.request.url2pathname(urllib.parse.urlparse(location).path)
        name = context.layers.free_layer_name("SaveImageLayer")
        config = interfaces.configuration.path_join
        context.config[config(name, "location")] = path
        context.config[config(name, "base_layer")] = layer_name
        try:
            layer = SaveImageLayer(context, name, name)
        except RamfsError as e:
            vollog.warning(f"ramfs: {path}: {e}")
            return None
        if not layer._starts:
            vollog.warning(f"ramfs: {path}: no RAM block has a known guest-physical address")
            return None
        return layer
