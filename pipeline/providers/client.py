"""What both vendors' providers share: one API-host call, key scrubbing, poll/credits/download.

A subclass supplies only its wire: the auth header and the pure build/parse functions
of its vendor module. Everything that touches the rate budget, the request counters,
the timeouts, the caps, the result checks or the key lives here once.

What a vendor sends back is made safe here before anyone else sees it:

- bodies are read with caps and bounded memory (:mod:`pipeline.providers.http`);
- results are checked (:func:`pipeline.resultcheck.check_result_image`): a sync
  submit's image, an inline poll image and every download. A billed result that is
  not an acceptable image raises (or, from a poll, reports) ``ResultNotImageError``;
- result URLs go through :class:`pipeline.netguard.UrlGuard`;
- every vendor string in an error or a returned value (messages, codes, request
  ids) is scrubbed of the key and of URL query strings, and clipped.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import IO, Any, ClassVar, TypeVar

import aiohttp
import anyio

from pipeline.config import NetworkConfig, ProviderConfig, TimeoutConfig
from pipeline.errors import (
    PermanentError,
    ResultNotImageError,
    RetryableError,
    TransportError,
    VendorError,
)
from pipeline.netguard import UrlGuard
from pipeline.providers.base import (
    BEFORE_BILLABLE_SEND,
    AcquireSlot,
    CreditBalance,
    RequestStats,
    ResultSink,
    Submitted,
    TaskState,
)
from pipeline.providers.http import (
    RESPONSE_TOO_LARGE,
    BodyScope,
    HttpRequest,
    HttpResponse,
    ResponseTooLarge,
    Spool,
    api_timeout,
    contains_secret,
    download_to,
    join_url,
    redact_error,
    safe_url,
    scrub,
    send,
)
from pipeline.resultcheck import check_result_image_async

__all__ = ["UNSAFE_ID", "VendorClient", "VendorWire"]

# A vendor id (task id) that carries the API key: refused, so the key never reaches
# the journal, results.jsonl or a log line through it.
UNSAFE_ID = "UNSAFE_TASK_ID"
_MALFORMED = "MALFORMED_RESPONSE"
_MAX_ID = 512
_MIN_SECRET = 8  # keys shorter than this are not looked for inside vendor ids
_T = TypeVar("_T")


# A vendor module's parsers: (HTTP status, headers, body) -> what the answer means.
_Parser = Callable[[int, Mapping[str, str], bytes], _T]


@dataclass(frozen=True)
class VendorWire:
    """The pure functions of a vendor module that :class:`VendorClient` calls: the auth
    header for a key, the poll and credit requests and their parsers, and the envelope
    check (``(error, doc)``, ``error`` ``None`` on success)."""

    auth_headers: Callable[[str], Mapping[str, str]]
    build_poll: Callable[[str], HttpRequest]
    parse_poll: _Parser[TaskState]
    build_credits: Callable[[], HttpRequest]
    parse_credits: _Parser[CreditBalance]
    envelope_error: _Parser[tuple[VendorError | None, dict[str, Any] | None]]


class VendorClient:
    """Base of the providers. One attempt per call; never sleeps, never loops.

    ``acquire`` (the shared rate budget) is awaited before every call to the API host;
    storage PUTs and result downloads skip it. The session must carry no default
    headers (PUTs go to storage hosts; downloads use their own pinned session).
    ``network`` holds the caps and the result-host allow list (defaults if omitted).
    """

    vendor: str
    wire: ClassVar[VendorWire]

    def __init__(
        self,
        session: aiohttp.ClientSession,
        config: ProviderConfig,
        api_key: str,
        timeouts: TimeoutConfig,
        stats: RequestStats,
        acquire: AcquireSlot,
        *,
        network: NetworkConfig | None = None,
    ) -> None:
        self._session = session
        self._config = config
        self._api_key = api_key
        self._timeouts = timeouts
        self._stats = stats
        self._acquire = acquire
        self._network = network or NetworkConfig()
        self._guard = UrlGuard(
            config.base_url,
            self._network.allow_result_hosts,
            vendor=self.vendor,
            connect_seconds=timeouts.connect_seconds,
        )

    def __repr__(self) -> str:  # never show the key
        return f"{type(self).__name__}(base_url={self._config.base_url!r})"

    # -- the vendor's wire (pure functions of its module) ---------------------------

    def _unread_error(self, status: int, headers: Mapping[str, str]) -> VendorError:
        """The error a non-2xx answer means when its body was too large to read."""
        err, _ = self.wire.envelope_error(status, headers, b"")
        assert err is not None  # a non-2xx is never a success
        return err

    # -- scrubbing -----------------------------------------------------------------

    def _scrub(self, text: str | None, limit: int = 128) -> str | None:
        return None if text is None else scrub(text, self._api_key, limit)

    @contextmanager
    def _scrubbed(self) -> Iterator[None]:
        try:
            yield
        except VendorError as err:
            redact_error(err, self._api_key)
            raise

    def _safe_id(self, value: str | None, what: str) -> str | None:
        """A vendor id we will store and send back: refused if it carries the key
        (any form) or is absurdly long; ids are never altered (polls need them)."""
        if value is None:
            return None
        # A key of a few characters turns up inside random ids by chance: refusing
        # those would give up tasks already billed, to hide a key that short.
        echoes = len(self._api_key) >= _MIN_SECRET and contains_secret(value, self._api_key)
        if echoes or len(value) > _MAX_ID or not value.isprintable():
            raise PermanentError(
                f"the vendor's {what} is unusable (it echoes the API key, holds control "
                f"characters or is over {_MAX_ID} characters); it is not stored. The task may have been created "
                "and billed: check the vendor's console before resubmitting",
                code=UNSAFE_ID,
                vendor=self.vendor,
            )
        return value

    def _scrub_submitted(self, out: Submitted) -> Submitted:
        return replace(
            out,
            task_id=self._safe_id(out.task_id, "task id"),
            request_id=self._scrub(out.request_id),
        )

    # -- shared ----------------------------------------------------------------------

    def _too_large(self, kind: str, exc: ResponseTooLarge, *, sync: bool) -> VendorError:
        """What an answer over ``max_response_bytes`` means for this call."""
        limit = exc.limit
        if not 200 <= exc.status < 300:
            err = self._unread_error(exc.status, exc.headers)
            err.message = f"HTTP {exc.status}, answer larger than {limit} bytes (not read)"
            err.args = (err.message,)
            return err
        if kind == "submit" and sync:
            return ResultNotImageError(
                f"the vendor answered the sync request with more than {limit} bytes: the "
                "result was billed but is unusable (network.max_response_bytes)",
                vendor=self.vendor,
                http_status=exc.status,
            )
        if kind == "submit":
            return TransportError(
                f"the vendor answered the task creation with more than {limit} bytes; "
                "the task may exist (outcome unknown)",
                code=RESPONSE_TOO_LARGE,
                vendor=self.vendor,
                http_status=exc.status,
                maybe_sent=True,
            )
        return RetryableError(
            f"{kind}: answer larger than {limit} bytes (network.max_response_bytes)",
            code=RESPONSE_TOO_LARGE,
            vendor=self.vendor,
            http_status=exc.status,
        )

    async def _send_api(
        self, kind: str, request: HttpRequest, scope: BodyScope, *, sync: bool = False
    ) -> HttpResponse:
        try:
            return await send(
                self._session,
                request,
                join_url(self._config.base_url, request.target),
                vendor=self.vendor,
                client_timeout=api_timeout(self._timeouts),
                extra_headers={
                    "Accept": "application/json",
                    **self.wire.auth_headers(self._api_key),
                },
                max_bytes=self._network.max_response_bytes,
                scope=scope,
            )
        except ResponseTooLarge as exc:
            raise self._too_large(kind, exc, sync=sync) from None

    async def _call(
        self, kind: str, request: HttpRequest, *, scope: BodyScope | None = None
    ) -> HttpResponse:
        """Wait for the rate budget, then send once (not for billable submits: those
        go through :meth:`_billable`). ``scope`` keeps a large body counted until the
        caller is done with it."""
        await self._acquire(kind)
        self._stats.count(self.vendor, kind)
        if scope is not None:
            return await self._send_api(kind, request, scope)
        async with BodyScope() as own:
            return await self._send_api(kind, request, own)

    async def _billable(
        self,
        request: HttpRequest,
        parse: Callable[[HttpResponse], Submitted],
        *,
        sync: bool,
    ) -> Submitted:
        """The request that creates a billable task or runs a billable sync job.

        Shielded from cancellation once the budget has let it go: its answer (bounded
        by the request timeout), its parsing and, for a sync result, the image check
        must reach the engine, which journals it in a shielded scope entered with no
        checkpoint in between. The budget wait before it stays cancellable, so Ctrl-C
        never waits out a rate limit.

        Outcomes beyond the parser's: a 2xx answer that cannot be read as the
        vendor's success or error (not JSON, no task id) is an unknown outcome:
        ``TransportError(maybe_sent=True, code=MALFORMED_RESPONSE)``; a sync result
        that is not an acceptable image is ``ResultNotImageError`` (billed).
        """
        await self._acquire("submit")
        # The caller's checkpoint ("submitting", see pipeline.lifecycle) is made durable
        # here: after the budget wait, right before the billable request goes out.
        hook = BEFORE_BILLABLE_SEND.get()
        if hook is not None:
            with anyio.CancelScope(shield=True):
                await hook()
        self._stats.count(self.vendor, "submit")
        with anyio.CancelScope(shield=True), self._scrubbed():
            async with BodyScope() as scope:
                resp = await self._send_api("submit", request, scope, sync=sync)
                status = resp.status
                try:
                    out = parse(resp)
                except RetryableError as exc:
                    if exc.code != _MALFORMED or not 200 <= status < 300:
                        raise
                    raise TransportError(
                        f"unreadable answer to a billable request (outcome unknown): {exc.message}",
                        code=_MALFORMED,
                        vendor=self.vendor,
                        http_status=status,
                        request_id=exc.request_id,
                        maybe_sent=True,
                    ) from None
                del resp  # the raw body: only the decoded image stays in memory
                if out.image is not None:
                    await self._check_image(out.image)
                out = self._scrub_submitted(out)
        return out

    async def _check_image(
        self, data: bytes | str | IO[bytes], where: str = "", *, size: int | None = None
    ) -> str:
        try:
            return await check_result_image_async(
                data,
                max_bytes=max(self._network.max_response_bytes, self._network.max_download_bytes),
                max_pixels=self._network.max_result_pixels,
                vendor=self.vendor,
                size=size,
            )
        except ResultNotImageError as exc:
            if where:
                exc.message = f"{where}: {exc.message}"
                exc.args = (exc.message,)
            raise

    async def poll(self, operation: str, task_id: str) -> TaskState:
        with self._scrubbed():
            async with BodyScope() as scope:
                resp = await self._call("poll", self.wire.build_poll(task_id), scope=scope)
                state = self.wire.parse_poll(resp.status, resp.headers, resp.body)
                del resp
                if state.image is not None:
                    # A task that succeeded with an inline result was billed: one that
                    # is not an image fails as RESULT_NOT_IMAGE, never resubmitted.
                    try:
                        await self._check_image(state.image, "inline result")
                    except ResultNotImageError as exc:
                        state = TaskState(state="failed", error=exc, poll_after=state.poll_after)
        if state.error is not None:
            redact_error(state.error, self._api_key)
        return state

    async def download(self, url: str) -> bytes:
        """The result at ``url``, checked (``ResultNotImageError`` if it is not an
        acceptable image) while it is still in a temporary file, then read into
        memory. The caller holds the bytes: prefer :meth:`download_to`."""
        where = f"download {safe_url(url)}"
        with self._scrubbed():
            spool = Spool(where, self.vendor)
            try:
                await self._stream(url, spool)
                await self._check_image(spool.file(), where)
                async with BodyScope() as scope:
                    await scope.hold()
                    return await spool.getvalue()
            finally:
                spool.close()

    async def _stream(self, url: str, sink: ResultSink) -> int:
        return await download_to(
            url,
            sink,
            vendor=self.vendor,
            timeouts=self._timeouts,
            stats=self._stats,
            guard=self._guard,
            max_bytes=self._network.max_download_bytes,
        )

    async def download_to(
        self, url: str, sink: ResultSink, *, check_path: str | None = None
    ) -> str:
        """Stream the result at ``url`` into ``sink``, check it, return its format
        (``"jpg"`` | ``"png"`` | ``"webp"``).

        ``check_path`` is the file the sink writes (read back for the check after
        ``sink.flush()``, if it has one); without it, the stream is also spooled to a
        private temporary file for the check. Raises ``ResultNotImageError`` when the
        result is not an acceptable image (the caller discards the sink), the
        network's ``TransportError``, the classified HTTP errors of a download, and
        whatever ``sink.write`` raises, unchanged.
        """
        where = f"download {safe_url(url)}"
        with self._scrubbed():
            if check_path is not None:
                size = await self._stream(url, sink)
                flush = getattr(sink, "flush", None)
                if callable(flush):
                    flushed = flush()
                    if inspect.isawaitable(flushed):
                        await flushed
                return await self._check_image(os.fspath(check_path), where, size=size)
            spool = Spool(where, self.vendor)
            try:
                await self._stream(url, _Tee(sink, spool))
                return await self._check_image(spool.file(), where)
            finally:
                spool.close()

    async def credits(self) -> CreditBalance:
        with self._scrubbed():
            resp = await self._call("credits", self.wire.build_credits())
            balance = self.wire.parse_credits(resp.status, resp.headers, resp.body)
        # Pool names come from the vendor and reach the report: scrubbed like the rest.
        pools: dict[str, float] = {}
        for name, amount in balance.pools.items():
            key = scrub(name, self._api_key, 80)
            pools[key] = pools.get(key, 0.0) + amount
        return replace(balance, pools=pools)


class _Tee:
    """Writes every chunk to the caller's sink and to the check spool."""

    def __init__(self, sink: ResultSink, spool: Spool) -> None:
        self._sink = sink
        self._spool = spool

    async def write(self, data: bytes) -> None:
        result = self._sink.write(data)
        if inspect.isawaitable(result):
            await result
        self._spool.write(data)
