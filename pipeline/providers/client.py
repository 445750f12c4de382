"""What both vendors' providers share: one API-host call, key scrubbing, poll/credits/download.

A subclass supplies only its wire: the auth header and the pure build/parse functions
of its vendor module. Everything that touches the rate budget, the request counters,
the timeouts or the key lives here once.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager

import aiohttp
import anyio

from pipeline.config import ProviderConfig, TimeoutConfig
from pipeline.errors import VendorError
from pipeline.providers.base import AcquireSlot, CreditBalance, RequestStats, TaskState
from pipeline.providers.http import (
    HttpRequest,
    HttpResponse,
    api_timeout,
    download,
    join_url,
    redact_error,
    send,
)

__all__ = ["VendorClient"]


class VendorClient:
    """Base of the providers. One attempt per call; never sleeps, never loops.

    ``acquire`` (the shared rate budget) is awaited before every call to the API host;
    storage PUTs and result downloads skip it. The session must carry no default
    headers: downloads and PUTs go to storage hosts.
    """

    vendor: str

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: ProviderConfig,
        api_key: str,
        timeouts: TimeoutConfig,
        stats: RequestStats,
        acquire: AcquireSlot,
    ) -> None:
        self._session = session
        self._config = config
        self._api_key = api_key
        self._timeouts = timeouts
        self._stats = stats
        self._acquire = acquire

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(base_url={self._config.base_url!r})"

    # -- the vendor's wire (pure functions of its module) ---------------------------

    def _auth_headers(self) -> Mapping[str, str]:
        raise NotImplementedError

    def _build_poll(self, task_id: str) -> HttpRequest:
        raise NotImplementedError

    def _parse_poll(self, resp: HttpResponse) -> TaskState:
        raise NotImplementedError

    def _build_credits(self) -> HttpRequest:
        raise NotImplementedError

    def _parse_credits(self, resp: HttpResponse) -> CreditBalance:
        raise NotImplementedError

    # -- shared ----------------------------------------------------------------------

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        try:
            yield
        except VendorError as err:
            redact_error(err, self._api_key)
            raise

    async def _call(self, kind: str, request: HttpRequest) -> HttpResponse:
        """Wait for the rate budget, then send once.

        A ``submit`` (the request that creates a billable task or runs a billable sync
        job) is shielded from cancellation once the budget has let it go: its answer
        (bounded by the request timeout) must reach the engine, which journals it in a
        shielded scope entered with no checkpoint in between. The budget wait before it
        stays cancellable, so Ctrl-C never waits out a rate limit.
        """
        await self._acquire(kind)
        self._stats.count(self.vendor, kind)
        sending = send(
            self._session,
            request,
            join_url(self._config.base_url, request.target),
            vendor=self.vendor,
            client_timeout=api_timeout(self._timeouts),
            extra_headers={"Accept": "application/json", **self._auth_headers()},
        )
        if kind != "submit":
            return await sending
        with anyio.CancelScope(shield=True):
            response = await sending
        return response

    async def poll(self, operation: str, task_id: str) -> TaskState:
        with self._scrubbed():
            state = self._parse_poll(await self._call("poll", self._build_poll(task_id)))
        if state.error is not None:
            redact_error(state.error, self._api_key)
        return state

    async def download(self, url: str) -> bytes:
        with self._scrubbed():
            return await download(
                self._session, url, vendor=self.vendor, timeouts=self._timeouts, stats=self._stats
            )

    async def credits(self) -> CreditBalance:
        with self._scrubbed():
            return self._parse_credits(await self._call("credits", self._build_credits()))
