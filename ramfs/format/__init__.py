"""Pure parsers for VM save images: bytes in, records out.

Nothing here opens files, spawns threads or knows about FUSE. Everything reads through a
``read_at(offset, size)`` source and returns frozen dataclasses.
"""

from ramfs.format.libvirt import (
    LIBVIRT_HEADER_SIZE, LibvirtHeader, LibvirtMetadata, SaveFormat, is_libvirt_magic,
    parse_header, parse_metadata)
from ramfs.format.qemu import (
    Configuration, MappedRamHeader, RamBlockRecord, StreamLayout, is_qemu_magic, parse_stream)
from ramfs.format.source import BytesSource, Cursor, ForwardSource, Source

__all__ = [
    "LIBVIRT_HEADER_SIZE", "BytesSource", "Configuration", "Cursor", "ForwardSource", "LibvirtHeader",
    "LibvirtMetadata", "MappedRamHeader", "RamBlockRecord", "SaveFormat", "Source", "StreamLayout",
    "is_libvirt_magic", "is_qemu_magic", "parse_header", "parse_metadata", "parse_stream",
]
