"""Task ids the journal could not take: kept where a full disk still has room.

A vendor's task id is what stops a rerun from paying for the same work again. When
the disk fills mid-run, the journal may be unable to record one: its reserve was given
back once and taken by other writes, and SQLite needs new pages for every commit. The
task id would then be lost and the item left ``submitting``, which a rerun sends again
(a second payment).

So each run preallocates a small file beside the journal (:data:`RESCUE_NAME`,
:data:`RESCUE_BYTES`, with ``posix_fallocate``: its blocks are the run's before the
disk can fill). A task id the journal refused for lack of space is written into those
blocks (``pwrite`` and ``fsync``: no new space needed) as one JSON line. The next run
applies the lines to the journal (the item moves from ``submitting`` to ``submitted``
with its task id, so it is polled, not sent) before anything is sent, then empties the
file.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = ["RESCUE_BYTES", "RESCUE_NAME", "RescueLog", "Rescued", "read_rescued"]

log = logging.getLogger("pipeline")

RESCUE_NAME = ".pipeline-rescue"
RESCUE_BYTES = 64 * 1024  # about 600 task ids: far more than can be in flight at once


@dataclass(frozen=True)
class Rescued:
    """One task id the journal could not record."""

    key: str
    task_id: str


class RescueLog:
    """The run's preallocated rescue file. :meth:`open` it at the start of a run (after
    :func:`read_rescued` has been applied), :meth:`add` when the journal is full,
    :meth:`close` at the end. Thread-safe."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / RESCUE_NAME
        self._fd: int | None = None
        self._offset = 0
        self._lock = threading.Lock()
        self._kept: dict[str, str] = {}  # key -> task id already written

    def open(self) -> None:
        """Create the file empty and allocate its blocks (best effort: a disk already
        full allocates nothing, and :meth:`add` then finds no room)."""
        with contextlib.suppress(FileNotFoundError):
            os.unlink(self.path)
        try:
            fd = os.open(
                self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
            )
        except OSError as exc:
            log.debug("no rescue file (%s): task ids rely on the journal alone", exc)
            return
        try:
            os.posix_fallocate(fd, 0, RESCUE_BYTES)
        except OSError as exc:
            log.debug("the rescue file could not be allocated (%s)", exc)
        self._fd, self._offset = fd, 0

    def add(self, key: str, task_id: str) -> bool:
        """Write one task id durably into the allocated blocks; False if it did not
        fit or could not be written."""
        line = (json.dumps({"key": key, "task_id": task_id}, sort_keys=True) + "\n").encode()
        with self._lock:
            if self._kept.get(key) == task_id:
                return True  # kept already (each later change of the item carries it)
            if self._fd is None or self._offset + len(line) > RESCUE_BYTES:
                return False
            try:
                written = os.pwrite(self._fd, line, self._offset)
                os.fsync(self._fd)
            except OSError as exc:
                log.debug("rescue write failed: %s", exc)
                return False
            if written != len(line):
                return False
            self._offset += written
            self._kept[key] = task_id
        return True

    def holds(self, key: str) -> bool:
        """Whether a task id of ``key`` is kept in the file already."""
        with self._lock:
            return key in self._kept

    def close(self) -> None:
        """Close the file; an unused one is removed (nothing to apply next time)."""
        with self._lock:
            fd, self._fd = self._fd, None
            if fd is None:
                return
            os.close(fd)
            if not self._offset:
                with contextlib.suppress(OSError):
                    os.unlink(self.path)


def read_rescued(output_dir: Path) -> list[Rescued]:
    """The task ids a previous run put in its rescue file (none if there is no file).

    Lines are read up to the first NUL byte (the allocated, never written rest); a
    line cut by a crash mid-write, or anything unreadable, is skipped: that task id
    was never durable.
    """
    path = output_dir / RESCUE_NAME
    try:
        with open(path, "rb", opener=_nofollow) as fh:
            data = fh.read(RESCUE_BYTES + 1)
    except OSError:
        return []
    out = []
    for raw in data.split(b"\0", 1)[0].splitlines():
        try:
            doc = json.loads(raw)
            out.append(Rescued(str(doc["key"]), str(doc["task_id"])))
        except (ValueError, KeyError, TypeError):
            continue
    return out


def _nofollow(path: str, flags: int) -> int:
    return os.open(path, flags | os.O_NOFOLLOW | os.O_CLOEXEC)
