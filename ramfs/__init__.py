"""ramfs: read QEMU and libvirt VM save images as files."""

__version__ = "0.1.0"
