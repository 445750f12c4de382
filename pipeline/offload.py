"""Blocking work off the event loop, at the price the hot path can pay.

``anyio.to_thread.run_sync`` costs about 60 µs of CPU per call on the project's
machine (its capacity limiter, cancel scope and worker bookkeeping), and an item
made several such hops: profiled, they were a large share of a fast run's client CPU
(README "Performance"). :func:`run_sync` hands the call to one thread pool through
asyncio's ``run_in_executor`` (about 25 µs) and keeps anyio's default rule: the call
is never abandoned; a cancelled caller waits for the thread to finish, so a file
half-written or a commit half-made is never left behind by a cancellation.

Small work does not hop at all: :func:`run_small` runs inline when the bytes it
touches are few (:data:`INLINE_BYTES`), where the hop would cost more than the work.
Nothing that waits on the disk's flush (fsync) may run inline.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from typing import TypeVar

import anyio

__all__ = ["INLINE_BYTES", "run_journal", "run_small", "run_sync", "submit_journal"]

T = TypeVar("T")

# Checking or decoding this many bytes of image takes well under the cost of a hop.
INLINE_BYTES = 64 * 1024

# Threads are started on demand. Four keep several fsyncs in flight (result writes and
# journal commits), and the GIL, not the thread count, bounds the CPU-bound part. More
# cost CPU for nothing: with 16, a sync run at concurrency 64 spent 10-15% more CPU
# per item, mostly in the kernel handing the GIL between threads, and ran slower
# (README "Performance": bench/pace.py sync).
_POOL = ThreadPoolExecutor(max_workers=4, thread_name_prefix="pipeline-io")


# The journal's commits and reads have a thread of their own: queued behind four slow
# jobs in the pool above (auto-fixes of large images, reads from a share that hangs)
# they would wait, and with them the checkpoint written before every billable send.
# The journal does its work under one lock, so one thread is all it can use.
_JOURNAL = ThreadPoolExecutor(max_workers=1, thread_name_prefix="pipeline-journal")


async def _run_in(pool: ThreadPoolExecutor, fn: Callable[..., T], args: tuple[object, ...]) -> T:
    loop = asyncio.get_running_loop()
    future = loop.run_in_executor(pool, functools.partial(fn, *args))
    with anyio.CancelScope(shield=True):
        result = await future
    return result


async def run_sync(fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` in a worker thread; waits for it even when cancelled."""
    return await _run_in(_POOL, fn, args)


async def run_journal(fn: Callable[..., T], *args: object) -> T:
    """:func:`run_sync` on the journal's own thread (for :mod:`pipeline.journal`)."""
    return await _run_in(_JOURNAL, fn, args)


def submit_journal(fn: Callable[..., T], *args: object) -> Future[T]:
    """``fn(*args)`` on the journal's thread, without awaiting it: for the journal's
    group commit, which chains its commits by callbacks (:mod:`pipeline.journal`)."""
    return _JOURNAL.submit(fn, *args)


async def run_small(size: int, fn: Callable[..., T], *args: object) -> T:
    """``fn(*args)`` inline if it touches at most :data:`INLINE_BYTES` (``size``),
    else in a worker thread (:func:`run_sync`). Only for work that never waits on a
    flush to disk: reading and checking bytes, not storing them."""
    if size <= INLINE_BYTES:
        return fn(*args)
    return await run_sync(fn, *args)
