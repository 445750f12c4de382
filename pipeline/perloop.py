"""One object per running event loop, made on first use.

anyio's semaphores and limiters belong to the event loop they were first used in. The
pipeline runs one loop; the tests run many, one after another. A module-level gate is
therefore kept per loop, and forgotten with its loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

__all__ = ["PerLoop"]

_T = TypeVar("_T")


class PerLoop(Generic[_T]):
    """``get()`` returns the running loop's object, calling ``make`` the first time."""

    def __init__(self, make: Callable[[], _T]) -> None:
        self._make = make
        self._by_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, _T] = (
            weakref.WeakKeyDictionary()
        )

    def get(self) -> _T:
        loop = asyncio.get_running_loop()
        obj = self._by_loop.get(loop)
        if obj is None:
            obj = self._by_loop[loop] = self._make()
        return obj
