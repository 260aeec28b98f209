"""Half-open ``(start, end)`` ranges of pages or bytes."""

from __future__ import annotations

from collections.abc import Iterable, Iterator


def merge_ranges(ranges: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    """The ranges (sorted by start) with those that overlap or touch merged into one."""
    it = iter(ranges)
    first = next(it, None)
    if first is None:
        return
    start, end = first
    for a, b in it:
        if a <= end:
            if b > end:
                end = b
        else:
            yield start, end
            start, end = a, b
    yield start, end
