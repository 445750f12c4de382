"""What every API-host request of either vendor goes through before its handler.

In order: count it; maybe drop the connection unanswered (``disconnect_rate``, before
any processing, so a dropped submit never creates a task); authenticate; apply the
rate limit per key and per IP; inject the scenario's fatal error; maybe answer a
retryable error (``transient_error_rate``). Then the handler runs; any error status it
answers is counted as ``rejected``. Each vendor supplies its own wording of these
answers (:class:`VendorAPI` subclasses).
"""

from __future__ import annotations

import abc
import asyncio
import hashlib
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import ClassVar, Literal

from aiohttp import web

from pipeline.emulator.faults import Faults
from pipeline.emulator.ratelimit import RateLimiter
from pipeline.emulator.scenario import Scenario
from pipeline.emulator.stats import VendorStats
from pipeline.emulator.storage import BlobStore, Links

__all__ = ["Kind", "Reject", "Shared", "VendorAPI", "digest", "drop_connection"]

Kind = Literal["submit", "poll", "upload", "credits", "other"]
Handler = Callable[[web.Request, str], Awaitable[web.StreamResponse]]
WebHandler = Callable[[web.Request], Awaitable[web.StreamResponse]]


class Reject(Exception):
    """Raised inside a handler to answer with ``response`` (a vendor error)."""

    def __init__(self, response: web.Response) -> None:
        super().__init__(response.status)
        self.response = response


@dataclass
class Shared:
    """State both vendors use: knobs, randomness, storage, the clock."""

    scenario: Scenario
    faults: Faults
    blobs: BlobStore
    links: Links
    clock: Callable[[], float] = time.monotonic
    started_epoch: float = field(default_factory=time.time)


def digest(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def base_url(request: web.Request) -> str:
    """Scheme and host the client used, so URLs work on any port and interface."""
    return f"{request.scheme}://{request.host}"


def drop_connection(request: web.Request) -> web.StreamResponse:
    """Close the connection without a byte of response (the client sees a disconnect)."""
    if request.transport is not None:
        request.transport.abort()
    return web.Response()  # never written: the transport is gone


class VendorAPI(abc.ABC):
    """Base of the two vendor emulators: the common request gate and counters."""

    name: ClassVar[Literal["ailab", "perfectcorp"]]

    def __init__(self, shared: Shared) -> None:
        self.shared = shared
        self.scenario = shared.scenario
        self.stats = VendorStats()
        self.limiter = self._new_limiter()
        self._rendering: set[asyncio.Task[str]] = set()

    def render_ahead(self, render: Callable[[], Awaitable[str]]) -> asyncio.Task[str]:
        """Start rendering a task's result (``render`` returns its blob id) now, while the
        task runs, as a vendor's servers do: the poll that finds the task done awaits
        it (shielded from that request's cancellation), and it is ready by then.

        Rendered at that poll instead, a wave of 64 tasks ending together queued 64
        renders behind one another, and a done poll waited up to 200 ms for an answer
        (bench/pace.py async at C=64, README "Performance").
        """
        job = asyncio.ensure_future(render())
        self._rendering.add(job)
        job.add_done_callback(self._rendered)
        return job

    def _rendered(self, job: asyncio.Task[str]) -> None:
        self._rendering.discard(job)
        if not job.cancelled():
            job.exception()  # retrieved: a poll that awaits it answers with it

    def _new_limiter(self) -> RateLimiter | None:
        spec = self.scenario.rate_limit
        if spec is None or self.name not in self.scenario.rate_limit_vendors:
            return None
        return RateLimiter(spec, per_ip=self.scenario.rate_limit_per_ip, clock=self.shared.clock)

    def reset(self) -> None:
        """Forget every counter, budget, account and task."""
        self.stats = VendorStats()
        self.limiter = self._new_limiter()
        self.cancel_renders()

    def cancel_renders(self) -> list[asyncio.Task[str]]:
        """Cancel the renders still running (a reset, or the emulator closing: they
        must not write into the blob store after it is emptied); the jobs, for the
        caller to await."""
        jobs = list(self._rendering)
        for job in jobs:
            job.cancel()
        return jobs

    # --- what each vendor words its own way ---------------------------------------

    @abc.abstractmethod
    def authenticate(self, request: web.Request) -> str:
        """The caller's API key; raises :class:`Reject` (401) if missing or unknown."""

    @abc.abstractmethod
    def rate_limited(self) -> web.Response:
        """The vendor's 429 for an exhausted budget."""

    @abc.abstractmethod
    def transient(self, kind: Kind) -> web.Response:
        """One of the vendor's retryable errors, for a request of ``kind``."""

    @abc.abstractmethod
    def fatal(self, code: str, kind: Kind) -> web.Response | None:
        """The vendor's answer carrying fatal ``code``, or ``None`` if it spares ``kind``."""

    @abc.abstractmethod
    def settle_due(self) -> None:
        """Bring tasks whose time has come to their end state (billing them)."""

    @abc.abstractmethod
    def decorate(self, response: web.StreamResponse) -> None:
        """Add the vendor's headers to every answer."""

    # --- the gate ------------------------------------------------------------------

    def endpoint(self, kind: Kind, handler: Handler) -> WebHandler:
        """Wrap ``handler(request, api_key)`` in the common gate."""

        async def gated(request: web.Request) -> web.StreamResponse:
            self.stats.requests += 1
            self.settle_due()
            if self.shared.faults.chance(self.scenario.disconnect_rate):
                self.stats.disconnects += 1
                return drop_connection(request)
            try:
                response = await self._admit_and_handle(request, kind, handler)
            except Reject as reject:
                response = reject.response
            if response.status >= 400:
                self.stats.rejected += 1
            self.decorate(response)
            return response

        return gated

    async def _admit_and_handle(
        self, request: web.Request, kind: Kind, handler: Handler
    ) -> web.StreamResponse:
        key = self.authenticate(request)
        if self.limiter is not None and not self.limiter.admit(key, request.remote):
            self.stats.rate_limited += 1
            answer = self.rate_limited()
            retry_after = self.scenario.rate_limit_retry_after_seconds
            if retry_after is not None:
                answer.headers["Retry-After"] = f"{retry_after:g}"
            return answer
        code = self.scenario.fatal_error
        if (
            code is not None
            and self.scenario.fatal_vendor() == self.name
            and self.stats.requests > self.scenario.fatal_after_requests
        ):
            fatal = self.fatal(code, kind)
            if fatal is not None:
                return fatal
        if self.shared.faults.chance(self.scenario.transient_error_rate):
            self.stats.transient_errors += 1
            return self.transient(kind)
        return await handler(request, key)

    def lose_response(self, request: web.Request) -> web.StreamResponse | None:
        """After a submit was fully processed: maybe drop its answer (``lost_response_rate``)."""
        if self.shared.faults.chance(self.scenario.lost_response_rate):
            self.stats.lost_responses += 1
            return drop_connection(request)
        return None
