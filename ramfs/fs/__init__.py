"""The FUSE layer: the tree a mount shows (``tree``), the pyfuse3 adapter (``ops``) and the
mount lifecycle (``daemon``). Errno mapping lives in ``ops`` only."""
