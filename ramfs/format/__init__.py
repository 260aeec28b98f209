"""Pure parsers for VM save images: bytes in, records out.

Nothing here opens files, spawns threads or knows about FUSE. Everything reads through a
``read_at(offset, size)`` source and returns frozen dataclasses.
"""

from ramfs.format.libvirt import (  # noqa: F401
    LIBVIRT_HEADER_SIZE, LibvirtHeader, LibvirtMetadata, SaveFormat, is_libvirt_magic,
    parse_header, parse_metadata)
from ramfs.format.qemu import (  # noqa: F401
    Configuration, MappedRamHeader, RamBlockRecord, StreamLayout, is_qemu_magic, parse_stream)
from ramfs.format.source import BytesSource, Cursor, ForwardSource, Source  # noqa: F401
