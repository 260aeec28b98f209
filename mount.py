#!/usr/bin/env python3
"""``python mount.py IMAGE|DIR MOUNTPOINT [options]``: the same as ``ramfs mount``."""

import sys

from ramfs.cli import main

if __name__ == "__main__":
    sys.exit(main(["mount", *sys.argv[1:]]))
