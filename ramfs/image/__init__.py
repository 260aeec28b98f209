"""The image model: files, indexes, caches and reads. Imports ``ramfs.format`` only."""

from ramfs.image.model import Image, RamBlock, domain_identity, open_image

__all__ = ["Image", "RamBlock", "domain_identity", "open_image"]
