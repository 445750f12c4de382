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

A sync answer has no task id: what keeps a rerun from paying for it again is the
journal knowing it was answered. Should the journal refuse even the row that says so
(the result bytes are far more than these blocks hold), a ``paid_lost`` line (key and
the run that was billed, no task id) says it here: :func:`read_paid_lost` gives them to
the next run, which records those items as paid for and lost (``RESULT_LOST``) instead
of sending them again. :func:`read_rescued` skips such lines.

Anything at :data:`RESCUE_NAME` that is not a regular file (a symlink, a FIFO, a
folder) is refused with a one-line error, the way the journal and the lock file are:
it is never followed, and never opened in a way that could block.
"""

from __future__ import annotations

import contextlib
import errno
import json
import logging
import os
import stat
import threading
from dataclasses import dataclass
from pathlib import Path

from pipeline.errors import JournalError

__all__ = [
    "RESCUE_BYTES",
    "RESCUE_NAME",
    "PaidLost",
    "RescueLog",
    "Rescued",
    "read_paid_lost",
    "read_rescued",
]

log = logging.getLogger("pipeline")

RESCUE_NAME = ".pipeline-rescue"
RESCUE_BYTES = 64 * 1024  # about 600 task ids: far more than can be in flight at once


@dataclass(frozen=True)
class Rescued:
    """One task id the journal could not record."""

    key: str
    task_id: str


@dataclass(frozen=True)
class PaidLost:
    """One sync answer the vendor billed in run ``run_id`` that neither the journal nor
    (its bytes being too many) this file could keep: paid for and lost."""

    key: str
    run_id: int


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
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)
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
        return self._write({"key": key, "task_id": task_id}, key, task_id)

    def add_paid_lost(self, key: str, run_id: int) -> bool:
        """Write durably that ``key``'s send was answered and billed in ``run_id`` but
        its result could not be kept anywhere; False if it could not be written."""
        return self._write({"key": key, "paid_lost": True, "run": run_id}, key, "")

    def _write(self, doc: dict[str, object], key: str, kept_as: str) -> bool:
        line = (json.dumps(doc, sort_keys=True) + "\n").encode()
        with self._lock:
            if self._kept.get(key) == kept_as:
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
            self._kept[key] = kept_as
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
    was never durable. ``paid_lost`` lines (no task id) are :func:`read_paid_lost`'s.
    Raises :class:`pipeline.errors.JournalError` (exit 2, before anything is sent)
    when something that is not a regular file is planted at the path.
    """
    out = []
    for doc in _records(output_dir):
        task_id = doc.get("task_id")
        if "key" in doc and isinstance(task_id, str) and task_id:
            out.append(Rescued(str(doc["key"]), task_id))
    return out


def read_paid_lost(output_dir: Path) -> list[PaidLost]:
    """The sync answers a previous run was billed for and could record only here."""
    out = []
    for doc in _records(output_dir):
        run = doc.get("run")
        if doc.get("paid_lost") is True and "key" in doc and isinstance(run, int):
            out.append(PaidLost(str(doc["key"]), run))
    return out


def _records(output_dir: Path) -> list[dict[str, object]]:
    path = output_dir / RESCUE_NAME
    data = _read_regular(path)
    out = []
    for raw in data.split(b"\0", 1)[0].splitlines():
        try:
            doc = json.loads(raw)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def _read_regular(path: Path) -> bytes:
    """The file's first bytes, b"" if there is none. Opened without following a link
    and with ``O_NONBLOCK`` (a planted FIFO opens at once instead of blocking the run
    forever), then refused by ``fstat`` unless a regular file: the same refusals, in
    the same words, as the journal's and the lock file's (pipeline.outputs
    check_no_symlink, pipeline.lock)."""
    flags = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        return b""
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise JournalError(
                f"{path}: is a symbolic link; refusing to follow it (remove it and rerun)"
            ) from None
        if exc.errno in (errno.ENXIO, errno.EISDIR):  # a socket; a folder (some systems)
            raise _not_regular(path, exc.errno) from None
        raise JournalError(
            f"{path}: cannot read the rescue file ({exc.strerror}); fix its permissions "
            "and rerun (it may hold task ids a rerun must not pay for again)"
        ) from None
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise _not_regular(path, errno.EISDIR if stat.S_ISDIR(mode) else errno.EINVAL)
        os.set_blocking(fd, True)
        chunks = []
        left = RESCUE_BYTES + 1
        while left > 0:
            chunk = os.read(fd, left)
            if not chunk:
                break
            chunks.append(chunk)
            left -= len(chunk)
        return b"".join(chunks)
    except OSError as exc:
        raise JournalError(
            f"{path}: cannot read the rescue file ({exc.strerror}); rerun once it is readable"
        ) from None
    finally:
        os.close(fd)


def _not_regular(path: Path, err: int) -> JournalError:
    if err == errno.EISDIR:
        return JournalError(
            f"{path}: a folder is in the way where a file should be; move it aside and rerun"
        )
    return JournalError(
        f"{path}: is not a regular file (a FIFO, socket or device?); move it aside and rerun"
    )
