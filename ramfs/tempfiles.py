"""Temporary output files of the running command, so a signal handler can remove them.

Unwinding from a signal (raising in the main thread) can land inside a blocking call or a
lock; removing the registered files and exiting at once is the robust way out.
"""

from __future__ import annotations

import os

_active: set[str] = set()


def register(path: str) -> None:
    _active.add(path)


def unregister(path: str) -> None:
    _active.discard(path)


def remove_all() -> None:
    for path in list(_active):
        try:
            os.unlink(path)
        except OSError:
            pass
        _active.discard(path)
