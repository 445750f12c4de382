"""One run at a time per output folder.

``fcntl.flock`` on ``.pipeline.lock`` in the output folder: the kernel releases it
when the holder dies (even by kill -9), so a stale lock can never block a cron job.
The file also holds the holder's pid, so a second run can name it.

The lock file is opened with ``O_NOFOLLOW`` and must be a regular file with one link:
a symlink (or hard link) planted as ``.pipeline.lock`` is refused with
:class:`LockFileError` rather than truncating whatever it points at.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import logging
import os
import stat
from pathlib import Path
from types import TracebackType
from typing import Self

from pipeline.errors import DiskFullError, LockHeldError, UsageError

__all__ = ["LOCK_NAME", "LockFileError", "OutputLock"]

LOCK_NAME = ".pipeline.lock"
log = logging.getLogger("pipeline")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LockFileError(UsageError, OSError):
    """The lock file cannot be used safely (a symlink, a hard link, not a regular
    file, or the folder cannot hold it). Exit 2: nothing was sent. ``errno`` is kept."""

    def __init__(self, err: int, message: str) -> None:
        OSError.__init__(self, err, message)
        self.message = message

    def __str__(self) -> str:
        return self.message


def _open_lock_file(path: Path) -> int:
    """Open (creating) the lock file without following a link; refuse anything odd."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise LockFileError(
            exc.errno or errno.EIO,
            f"{path.parent}: cannot create the output folder ({exc.strerror})",
        ) from None
    # O_NONBLOCK: a FIFO planted under the name must not hang the run while opening.
    flags = os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, 0o644)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise LockFileError(
                errno.ELOOP,
                f"{path}: the lock file is a symbolic link; refusing to follow it. Remove "
                "it (nothing in this folder should be a link) and rerun",
            ) from None
        raise LockFileError(
            exc.errno or errno.EIO, f"{path}: cannot create the lock file ({exc.strerror})"
        ) from None
    st = os.fstat(fd)
    problem = None
    if not stat.S_ISREG(st.st_mode):
        problem = "is not a regular file"
    elif st.st_nlink != 1:
        # A hard link shares its inode with a file elsewhere: truncating it would
        # change that file too.
        problem = f"has {st.st_nlink} hard links"
    if problem:
        os.close(fd)
        raise LockFileError(errno.EINVAL, f"{path}: the lock file {problem}; remove it and rerun")
    os.set_blocking(fd, True)
    return fd


class OutputLock:
    """Exclusive lock on an output folder; raises :class:`LockHeldError` if taken and
    :class:`LockFileError` if the lock file is a planted symlink or otherwise unsafe."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> Self:
        fd = _open_lock_file(self.path)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 64, 0).decode("ascii", "replace").strip() or "unknown"
            os.close(fd)
            raise LockHeldError(
                f"{self.path.parent}: another pipeline run (pid {holder}) is using this output "
                "folder; wait for it to finish or stop it"
            ) from None
        previous = os.pread(fd, 64, 0).decode("ascii", "replace").strip()
        if previous.isdigit() and int(previous) != os.getpid():
            state = "alive but not holding it" if _pid_alive(int(previous)) else "no longer running"
            log.warning(
                "taking over the lock of %s left by pid %s (%s)", self.path.parent, previous, state
            )
        os.ftruncate(fd, 0)
        try:
            os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
            os.fsync(fd)
        except OSError as exc:
            os.close(fd)
            if exc.errno == errno.ENOSPC:
                raise DiskFullError(
                    f"{self.path.parent}: the disk is full: cannot even write the lock "
                    f"{self.path.name}; free some space and rerun (nothing was sent)"
                ) from None
            raise
        self._fd = fd
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._fd is not None:
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, 0)
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None
