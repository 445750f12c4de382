"""Which files a block of code opened: an audit hook (PEP 578), not a timer.

``sys.audit`` raises an ``open`` event for every ``open()``, ``io.open`` and
``os.open``, before the file is touched. :func:`watch_opens` records the events for
the paths it is given, so a test can assert that a FIFO or a 1.5 GB file was never
opened, whatever the machine's speed. Hooks can't be removed: this one is installed
once, on import, and does nothing while no path is watched.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_WATCHED: set[str] = set()
_OPENED: list[str] = []


def _hook(event: str, args: tuple[object, ...]) -> None:
    if event != "open" or not _WATCHED:
        return
    target = args[0] if args else None
    if isinstance(target, (str, bytes, os.PathLike)):
        try:
            name = os.path.abspath(os.fsdecode(target))
        except (TypeError, ValueError):  # pragma: no cover - defensive
            return
        if name in _WATCHED:
            _OPENED.append(name)


sys.addaudithook(_hook)


@contextmanager
def watch_opens(*paths: Path) -> Iterator[list[str]]:
    """Yield the list of ``paths`` opened inside the block (absolute, in order)."""
    watched = {os.path.abspath(p) for p in paths}
    _WATCHED.update(watched)
    opened: list[str] = []
    start = len(_OPENED)
    try:
        yield opened
    finally:
        opened.extend(p for p in _OPENED[start:] if p in watched)
        _WATCHED.difference_update(watched)
        del _OPENED[start:]
