"""Installed by ramfs into Volatility 3's plugin directory: reading a QEMU/libvirt save image
(``vol -f vm.save ...``) through ramfs. The layer and its stacker are in ramfs.volatility."""

from ramfs.volatility import SaveImageLayer, SaveImageStacker  # noqa: F401  (registers them)
