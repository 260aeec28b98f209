"""Conversion of sequential save images to mapped-ram ("sparse"), for the CLI and ``convert/``.

Imports ``ramfs.format`` and ``ramfs.image`` (to verify results); nothing here knows FUSE.
"""

from ramfs.convert.core import ConvertResult, convert_file, convert_stream

__all__ = ["ConvertResult", "convert_file", "convert_stream"]
