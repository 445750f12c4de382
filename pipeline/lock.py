"""One run at a time per output folder.

``fcntl.flock`` on ``.pipeline.lock`` in the output folder: the kernel releases it
when the holder dies (even by kill -9), so a stale lock can never block a cron job.
The file also holds the holder's pid, so a second run can name it.
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
from pathlib import Path
from types import TracebackType
from typing import Self

from pipeline.errors import LockHeldError

__all__ = ["LOCK_NAME", "OutputLock"]

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


class OutputLock:
    """Exclusive lock on an output folder; raises :class:`LockHeldError` if taken."""

    def __init__(self, output_dir: Path) -> None:
        self.path = output_dir / LOCK_NAME
        self._fd: int | None = None

    def __enter__(self) -> Self:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
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
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        os.fsync(fd)
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
