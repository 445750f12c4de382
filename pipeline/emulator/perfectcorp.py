"""The Perfect Corp YouCam API (AI Smile) as the emulator serves it.

The vendor is described in docs/vendors.md, the Perfect Corp sections.

Routes (``Authorization: Bearer <key>`` on every one, JSON bodies)::

    POST /s2s/v2.0/file/ai-smile          file record + presigned PUT (also POST /s2s/v2.0/file)
    POST /s2s/v2.0/task/ai-smile          {src_file_id | src_file_url, expression_type} -> task_id
    GET  /s2s/v2.0/task/ai-smile/{id}     running | success (data.results.url) | error
    POST /s2s/v2.0/task/delete            {task_id}
    GET  /s2s/v1.0/client/credit          {"status":200,"results":[…]}
    GET  /s2s/v1.0/client/credit/history, GET /s2s/v2.0/credit/feature-cost

Success is ``{"status":200,"data":{…}}``; errors are ``{"status":…,"error":…,
"error_code":…}`` (no code on 429 and on some 401s: docs/vendors.md, "Perfect Corp:
response envelope"). Engine failures are HTTP 200 with a lower-case code in ``data.error``
(docs/vendors.md, "Perfect Corp: polling and task states" and "Perfect Corp: engine error
codes"). One unit is held at create and debited when the task succeeds, polled or not ("1
unit is used"; "consumed units may still be charged" for a task that expires unpolled
after finishing: docs/vendors.md, "Perfect Corp: polling and task states" and "Perfect
Corp: polling window").
"""

from __future__ import annotations

import asyncio
import base64
import functools
import hashlib
import heapq
import itertools
import secrets
import time
import uuid
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import unquote, urlsplit

import aiohttp
from aiohttp import web

from pipeline.emulator.gate import Kind, Reject, Shared, VendorAPI, base_url, digest
from pipeline.emulator.images import inspect_image, render_smile
from pipeline.emulator.ledger import Hold, Ledger
from pipeline.emulator.stats import request_fingerprint
from pipeline.emulator.storage import UploadSlot

__all__ = ["PerfectCorpAPI"]

MB = 1024 * 1024
UNIT_POOL = "units"
# 1 unit per successful task (AI Smile V1.0; docs/vendors.md, "Perfect Corp: units and prices")
PRICE = 1.0

FEATURE_UPLOAD_PATH = "/s2s/v2.0/file/ai-smile"
# Release v1.14 (docs/vendors.md, "Perfect Corp: upload path")
UNIVERSAL_UPLOAD_PATH = "/s2s/v2.0/file"
TASK_PATH = "/s2s/v2.0/task/ai-smile"

# jpg/jpeg/png/heic, < 10 MB; the vendor's own examples write image/jpg (docs/vendors.md,
# "Perfect Corp: upload" and "Perfect Corp: image limits").
_IMAGE_TYPES = frozenset({"image/jpeg", "image/jpg", "image/png", "image/heic", "image/heif"})
# Universal path only (docs/vendors.md, "Perfect Corp: upload")
_VIDEO_TYPES = frozenset({"video/mp4", "video/quicktime"})
_IMAGE_MAX_BYTES = 10 * MB  # exclusive ("< 10MB")
_VIDEO_MAX_BYTES = 100 * MB

# The two documented values; anything else in the body is "Unexpected" (docs/vendors.md,
# "Perfect Corp: create task").
_EXPRESSIONS = frozenset({"smile_with_teeth_visible", "closed_mouth_smile"})
_TASK_FIELDS = frozenset({"src_file_id", "src_file_url", "expression_type"})

# Engine codes the emulator produces (lower case) and their details (docs/vendors.md,
# "Perfect Corp: engine error codes").
_ENGINE_MESSAGES = {
    "error_no_face": "No face was detected in the provided image.",
    "error_inference": "The inference process failed due to a workflow issue, execution error, "
    "encoding error, or missing output image.",
    "error_decode_image": "The source image could not be decoded.",
    "error_exceed_max_image_size": "The image's long side exceeds 4096 pixels.",
    "error_download_image": "The source image could not be downloaded.",
}

# Error text (docs/vendors.md, "Perfect Corp: create task")
_CREATE_FAILED = "The operation could not be completed"

# ``fatal_error`` codes: (status, message, kinds they hit; None = every request).
_FATAL: dict[str, tuple[int, str, frozenset[Kind] | None]] = {
    "InvalidApiKey": (401, "This API key is not recognized.", None),
    "InactiveApiKey": (401, "This API key is inactive.", None),
    "ExpiredApiKey": (401, "This API key has expired.", None),
    "CreditInsufficiency": (400, "Insufficient unit to run", frozenset({"submit"})),
}


def ok(data: Any = None, **top: Any) -> web.Response:
    body: dict[str, Any] = {"status": 200}
    if data is not None:
        body["data"] = data
    body.update(top)
    return web.json_response(body)


def failure(
    status: int, message: str, code: str | None = None, *, reason: str = ""
) -> web.Response:
    """An error body (docs/vendors.md, "Perfect Corp: response envelope").

    ``reason`` goes to an ``X-Emulator-Reason`` header for humans.
    """
    body: dict[str, Any] = {"status": status, "error": message}
    if code is not None:
        body["error_code"] = code
    response = web.json_response(body, status=status)
    if reason:
        response.headers["X-Emulator-Reason"] = reason
    return response


def error(status: int, message: str, code: str | None = None, *, reason: str = "") -> Reject:
    return Reject(failure(status, message, code, reason=reason))


def _invalid(reason: str, message: str = _CREATE_FAILED) -> Reject:
    return error(400, message, "InvalidParameters", reason=reason)


async def _json_object(request: web.Request, message: str) -> dict[str, Any]:
    try:
        body = await request.json()
    except (ValueError, UnicodeDecodeError):
        raise _invalid("the body is not JSON", message) from None
    if not isinstance(body, dict):
        raise _invalid("the body must be a JSON object", message)
    return body


def _file_id() -> str:
    """A file id shaped like the vendor's: it contains ``/`` and ``+``.

    (docs/vendors.md, "Perfect Corp: upload")
    """

    def part(n: int) -> str:
        return base64.b64encode(secrets.token_bytes(n)).decode().rstrip("=")

    return f"{part(30)}/u/{part(9)}+{part(12)}"


@dataclass(frozen=True)
class _Source:
    """What a task will work on: bytes (kept as a blob), or nothing (draw a stand-in)."""

    data: bytes | None
    blob_id: str | None
    note: str = ""
    download_failed: bool = False


@dataclass
class _File:
    id: str
    key: str
    content_type: str
    file_name: str
    size: int
    slot: UploadSlot


@dataclass
class _Task:
    """An AI Smile task; its outcome is decided at create, shown from ``completes_at``."""

    id: str
    key: str
    expression_type: str
    source_blob: str | None  # None: render a stand-in (foreign URL not fetched, HEIC)
    note: str
    outcome: str  # "success" or an engine code
    hold: Hold
    created: float
    completes_at: float
    last_polled: float
    input_digest: str = ""  # sha256 of the source (or its URL): a charge is booked to it
    terminal_seen: bool = False
    settled: bool = False
    gone: bool = False  # expired unpolled or deleted: InvalidTaskId from now on
    result_blob: str | None = None
    rendering: asyncio.Task[str] | None = None  # the result's blob id, once rendered
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class PerfectCorpAPI(VendorAPI):
    """The Perfect Corp endpoints, file records, tasks and unit accounts."""

    name = "perfectcorp"

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.files: dict[str, _File] = {}
        self.tasks: dict[str, _Task] = {}
        self.ledgers: dict[str, Ledger] = {}
        self.history: dict[str, list[dict[str, Any]]] = {}
        self._due: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def reset(self) -> None:
        super().reset()
        self.files.clear()
        self.tasks.clear()
        self.ledgers.clear()
        self.history.clear()
        self._due.clear()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(FEATURE_UPLOAD_PATH, self.endpoint("upload", self.create_file)),
            web.post(UNIVERSAL_UPLOAD_PATH, self.endpoint("upload", self.create_file)),
            web.post(TASK_PATH, self.endpoint("submit", self.create_task)),
            web.get(TASK_PATH + "/{task_id:.+}", self.endpoint("poll", self.poll)),
            web.post("/s2s/v2.0/task/delete", self.endpoint("other", self.delete_task)),
            web.get("/s2s/v1.0/client/credit", self.endpoint("credits", self.credit)),
            web.get(
                "/s2s/v1.0/client/credit/history", self.endpoint("credits", self.credit_history)
            ),
            web.get("/s2s/v2.0/credit/feature-cost", self.endpoint("credits", self.feature_cost)),
            web.route("*", "/s2s/{tail:.*}", self.endpoint("other", self.not_found)),
        ]

    # --- gate wording --------------------------------------------------------------

    def authenticate(self, request: web.Request) -> str:
        # "Authorization: Bearer <API_KEY>", one space; a missing prefix is a 401
        # (docs/vendors.md, "Perfect Corp: transport and authentication").
        scheme, _, key = request.headers.get("Authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not key or key != key.strip():
            raise error(401, "Invalid API key", reason="expected 'Authorization: Bearer <API_KEY>'")
        allowed = self.scenario.perfectcorp_api_keys
        if allowed is not None and key not in allowed:
            raise error(401, "This API key is not recognized.", "InvalidApiKey")
        return key

    def rate_limited(self) -> web.Response:
        # No error_code, no Retry-After (docs/vendors.md, "Perfect Corp: rate limits")
        return failure(429, "Too many requests")

    def transient(self, kind: Kind) -> web.Response:
        options: list[tuple[int, str, str | None]] = [
            (500, "Internal Server Error", None),
            (503, "Service Unavailable", None),
            (429, "Too many requests", None),
        ]
        # TaskTimeout, "resubmit" (docs/vendors.md, "Perfect Corp: error codes")
        if kind == "submit":
            options.append((500, "Task execution timed out", "TaskTimeout"))
        status, message, code = self.shared.faults.pick(options)
        return failure(status, message, code, reason="transient_error_rate")

    def fatal(self, code: str, kind: Kind) -> web.Response | None:
        status, message, kinds = _FATAL[code]
        if kinds is not None and kind not in kinds:
            return None
        return failure(status, message, code, reason="fatal_error")

    def decorate(self, response: web.StreamResponse) -> None:
        # Seen live; log it (docs/vendors.md, "Perfect Corp: transport and authentication")
        response.headers["x-request-id"] = str(uuid.uuid4())

    # --- accounts and tasks ---------------------------------------------------------

    def _ledger(self, key: str) -> Ledger:
        ledger = self.ledgers.get(key)
        if ledger is None:
            ledger = self.ledgers[key] = Ledger({UNIT_POOL: self.scenario.perfectcorp_units})
        return ledger

    def settle_due(self) -> None:
        """Bill tasks that reached their end; a task that lapsed before it finished never does."""
        now = self.shared.clock()
        window = self.scenario.unpolled_window_seconds
        while self._due and self._due[0][0] <= now:
            task = self.tasks.get(heapq.heappop(self._due)[2])
            if task is None or task.settled:
                continue
            task.settled = True
            ledger = self._ledger(task.key)
            if task.last_polled + window < task.completes_at:  # lapsed while running
                ledger.release(task.hold)
            elif task.outcome == "success":
                self.stats.count_charge(ledger.debit(task.hold), task.input_digest)
                self._record_charge(task, ledger)
            else:
                ledger.release(task.hold)
                self.stats.task_failures += 1

    def _record_charge(self, task: _Task, ledger: Ledger) -> None:
        self.history.setdefault(task.key, []).append(
            {
                "id": 10**16 + next(self._seq),
                "timestamp": int(time.time() * 1000),
                "action": "run_task",
                "target_id": task.id,
                "info": {
                    "credits": [{"id": _credit_id(task.key), "amount": -1, "amount_dec": -PRICE}]
                },
            }
        )

    def _task(self, task_id: str, key: str) -> _Task:
        task = self.tasks.get(task_id)
        if task is None or task.key != key or task.gone:
            raise error(
                400, "Invalid task ID", "InvalidTaskId", reason="unknown, deleted or expired task"
            )
        if self._lapsed(task, self.shared.clock()):
            # Left unpolled too long, the task is gone (docs/vendors.md, "Perfect Corp: polling
            # window").
            self._expire(task)
            raise error(
                400,
                "Invalid task ID",
                "InvalidTaskId",
                reason="task left unpolled past the polling window",
            )
        return task

    def _lapsed(self, task: _Task, now: float) -> bool:
        """Left unpolled past the window before its result was seen.

        (docs/vendors.md, "Perfect Corp: polling window")
        """
        return (
            not task.terminal_seen
            and not task.gone
            and now - task.last_polled > self.scenario.unpolled_window_seconds
        )

    def _expire(self, task: _Task) -> None:
        task.gone = True
        self.stats.expired += 1
        self._drop_result(task)

    def _drop_result(self, task: _Task) -> None:
        """Free a gone task's result, rendered ahead or still rendering."""
        job, task.rendering = task.rendering, None
        if job is not None and not job.done():
            job.cancel()
        elif job is not None and not job.cancelled() and job.exception() is None:
            self.shared.blobs.delete(job.result())
        if task.result_blob is not None:
            self.shared.blobs.delete(task.result_blob)

    def expire_lapsed(self) -> None:
        """Mark every task the window has already claimed as gone (and count it).

        The same rule a poll applies, applied to all tasks at once so ``expired`` in
        the stats is exact even for tasks nobody polls again. It changes no outcome:
        a lapsed task stays lapsed until a poll, which would find it gone anyway.
        """
        now = self.shared.clock()
        for task in self.tasks.values():
            if self._lapsed(task, now):
                self._expire(task)

    # --- handlers -------------------------------------------------------------------

    async def create_file(self, request: web.Request, key: str) -> web.StreamResponse:
        """Upload step 1: one file record and one presigned PUT per requested file.

        (docs/vendors.md, "Perfect Corp: upload")
        """
        body = await _json_object(request, "Invalid parameter value")
        files = body.get("files")
        if not isinstance(files, list) or not files:
            raise _invalid("'files' must be a non-empty list", "Invalid parameter value")
        universal = request.path == UNIVERSAL_UPLOAD_PATH
        specs = [self._file_spec(item, universal) for item in files]
        out = []
        for content_type, file_name, size in specs:
            slot = UploadSlot(content_type=content_type, size=size)
            record = _File(_file_id(), key, content_type, file_name, size, slot)
            self.files[record.id] = record
            link = self.shared.links.upload(
                "perfectcorp", slot, self.scenario.upload_url_ttl_seconds
            )
            self.stats.uploads += 1
            out.append(
                {
                    "content_type": content_type,
                    "file_name": file_name,
                    "file_id": record.id,
                    "requests": [
                        {
                            "method": "PUT",
                            "url": self.shared.links.url(base_url(request), link),
                            # Send exactly these (upload step 2); the PUT checks both.
                            "headers": {"Content-Type": content_type, "Content-Length": str(size)},
                        }
                    ],
                }
            )
        return ok({"files": out})

    @staticmethod
    def _file_spec(item: object, universal: bool) -> tuple[str, str, int]:
        message = "Invalid parameter value"
        if not isinstance(item, dict):
            raise _invalid("each entry of 'files' must be an object", message)
        content_type, file_name, size = (
            item.get(k) for k in ("content_type", "file_name", "file_size")
        )
        if not isinstance(content_type, str) or not isinstance(file_name, str) or not file_name:
            raise _invalid("content_type, file_name and file_size are all required", message)
        if isinstance(size, str) and size.isdigit():
            size = int(size)
        if not isinstance(size, int) or isinstance(size, bool) or size <= 0:
            raise _invalid("file_size must be a positive integer (bytes)", message)
        kind = content_type.lower()
        if kind in _IMAGE_TYPES:
            if size >= _IMAGE_MAX_BYTES:
                raise _invalid(f"file_size {size}: images must be under 10 MB", message)
        elif universal and kind in _VIDEO_TYPES:
            if size > _VIDEO_MAX_BYTES:
                raise _invalid(f"file_size {size}: videos must be at most 100 MB", message)
        else:
            raise _invalid(f"content_type {content_type!r} is not supported", message)
        return content_type, file_name, size

    async def create_task(self, request: web.Request, key: str) -> web.StreamResponse:
        """Exactly one source, a documented ``expression_type``, nothing else.

        (docs/vendors.md, "Perfect Corp: create task")
        """
        body = await _json_object(request, _CREATE_FAILED)
        unexpected = sorted(set(body) - _TASK_FIELDS)
        if unexpected:  # unknown fields are BadRequest (same section)
            raise error(
                400,
                _CREATE_FAILED,
                "BadRequest",
                reason=f"Unexpected request parameter: {', '.join(unexpected)}",
            )
        file_id, url = body.get("src_file_id"), body.get("src_file_url")
        if (file_id is None) == (url is None):
            raise _invalid("send exactly one of src_file_id and src_file_url")
        expression_type = body.get("expression_type")
        if expression_type not in _EXPRESSIONS:
            raise _invalid(f"expression_type must be one of {sorted(_EXPRESSIONS)}")
        assert isinstance(expression_type, str)
        if file_id is not None:
            source = await self._uploaded(file_id, key)
        elif isinstance(url, str) and urlsplit(url).scheme in ("http", "https"):
            source = await self._from_url(url)
        else:
            raise _invalid("src_file_url must be an http(s) URL")
        # Inputs are counted by their bytes; a stand-in source by its URL.
        input_digest = digest(source.data if source.data is not None else str(url).encode())
        hold = self._ledger(key).hold(PRICE, (UNIT_POOL,))
        if hold is None:  # "observed when units run out" (same section)
            raise error(400, "Insufficient unit to run", "CreditInsufficiency")
        outcome = await self._outcome(source, input_digest)
        now = self.shared.clock()
        task = _Task(
            id=secrets.token_urlsafe(48),  # 64 URL-safe chars, like the vendor's example
            key=key,
            expression_type=expression_type,
            source_blob=source.blob_id,
            note=source.note,
            outcome=outcome,
            hold=hold,
            created=now,
            completes_at=now + self.scenario.task_seconds,
            last_polled=now,
            input_digest=input_digest,
        )
        self.tasks[task.id] = task
        heapq.heappush(self._due, (task.completes_at, next(self._seq), task.id))
        if outcome == "success":
            task.rendering = self.render_ahead(functools.partial(self._render, task))
        self.stats.count_submit(
            input_digest,
            request_fingerprint(TASK_PATH, {"expression_type": expression_type}, [input_digest]),
        )
        return self.lose_response(request) or ok({"task_id": task.id})

    async def _uploaded(self, file_id: object, key: str) -> _Source:
        """The bytes behind ``src_file_id``.

        "If this step is skipped ... 404 or 500" (docs/vendors.md, "Perfect Corp: upload").
        """
        record = self.files.get(file_id) if isinstance(file_id, str) else None
        if record is None or record.key != key:
            raise error(
                404, "File not found", "unknown_internal_error", reason="unknown src_file_id"
            )
        if record.slot.blob_id is None:
            raise error(
                500,
                "unknown_internal_error",
                "unknown_internal_error",
                reason="the file's bytes were never PUT",
            )
        blob_id = record.slot.blob_id
        return _Source(await self.shared.blobs.get(blob_id), blob_id)

    async def _from_url(self, url: str) -> _Source:
        """The bytes behind ``src_file_url``: our own storage, a fetch, or a stand-in.

        The emulator runs offline by default (``fetch_src_urls: false``): a foreign URL,
        such as the vendor sample's, is accepted and rendered on a drawn stand-in.
        """
        parts = urlsplit(url)
        segments = parts.path.split("/")
        if parts.path.startswith("/_storage/") and len(segments) == 5:
            link = self.shared.links.get(segments[4].removesuffix(".jpg"))
            if link is not None and link.blob_id is not None:
                if self.shared.clock() > link.expires_at:
                    return _Source(None, None, download_failed=True)
                return _Source(await self.shared.blobs.get(link.blob_id), link.blob_id)
        if not self.scenario.fetch_src_urls:
            return _Source(None, None, note="src_file_url not fetched: stand-in image")
        try:
            timeout = aiohttp.ClientTimeout(total=10)
            async with (
                aiohttp.ClientSession(timeout=timeout) as session,
                session.get(url) as response,
            ):
                response.raise_for_status()
                data = await response.content.read(_IMAGE_MAX_BYTES)
        except (aiohttp.ClientError, TimeoutError, ValueError):
            return _Source(None, None, download_failed=True)
        return _Source(data, await self.shared.blobs.put(data))

    async def _outcome(self, source: _Source, input_digest: str) -> str:
        """How the engine will end this task.

        (docs/vendors.md, "Perfect Corp: engine error codes")
        """
        if source.download_failed:
            return "error_download_image"
        if source.data is not None:
            info = await asyncio.to_thread(inspect_image, source.data)
            if info.format not in ("JPEG", "PNG", "HEIF") or not (
                info.decodes or info.format == "HEIF"
            ):
                return "error_decode_image"
            # Long side <= 4096 (docs/vendors.md, "Perfect Corp: image limits")
            if info.long_side > 4096:
                return "error_exceed_max_image_size"
        faults = self.shared.faults
        if faults.permanent(input_digest, self.scenario.permanent_error_rate):
            return "error_no_face"
        if faults.chance(self.scenario.task_failure_rate):
            return "error_inference"
        return "success"

    async def poll(self, request: web.Request, key: str) -> web.StreamResponse:
        """Running → success (fresh URL each poll) | error, all HTTP 200.

        (docs/vendors.md, "Perfect Corp: polling and task states")
        """
        self.stats.polls += 1
        # Ids may arrive encoded (docs/vendors.md, "Perfect Corp: polling and task states").
        task = self._task(unquote(request.match_info["task_id"]), key)
        now = self.shared.clock()
        task.last_polled = now
        data: dict[str, Any]
        if now < task.completes_at:
            data = {"task_status": "running", "error": None}
        elif task.outcome == "success":
            data = {
                "task_status": "success",
                "error": None,
                "results": {"url": await self._result_url(request, task)},
            }
            task.terminal_seen = True
        else:
            data = {
                "task_status": "error",
                "error": task.outcome,
                "error_message": _ENGINE_MESSAGES[task.outcome],
            }
            task.terminal_seen = True
        if self.scenario.polling_interval_ms is not None:
            data["polling_interval"] = self.scenario.polling_interval_ms
        return ok(data)

    async def _render(self, task: _Task) -> str:
        """Render the task's result (:meth:`VendorAPI.render_ahead`); its blob id."""
        source = await self.shared.blobs.get(task.source_blob) if task.source_blob else None
        rendered = await asyncio.to_thread(render_smile, source, task.expression_type, task.note)
        return await self.shared.blobs.put(rendered)

    async def _result_url(self, request: web.Request, task: _Task) -> str:
        async with task.lock:
            if task.result_blob is None:
                if task.rendering is None:
                    task.rendering = self.render_ahead(functools.partial(self._render, task))
                task.result_blob = await asyncio.shield(task.rendering)
        # "A re-poll gives a fresh one", valid result_url_ttl_seconds (2 h) (docs/vendors.md,
        # "Perfect Corp: result URLs").
        link = self.shared.links.result(
            "perfectcorp", task.result_blob, self.scenario.result_url_ttl_seconds
        )
        return self.shared.links.url(base_url(request), link)

    async def delete_task(self, request: web.Request, key: str) -> web.StreamResponse:
        """Delete a finished task; a running one is ``OperationInvalid``.

        (docs/vendors.md, "Perfect Corp: task lifetimes")
        """
        body = await _json_object(request, _CREATE_FAILED)
        task_id = body.get("task_id")
        if not isinstance(task_id, str) or not task_id:
            raise _invalid("task_id is required")
        task = self._task(task_id, key)
        if self.shared.clock() < task.completes_at:
            raise error(400, _CREATE_FAILED, "OperationInvalid", reason="the task is not finished")
        task.gone = True
        self._drop_result(task)
        return web.json_response({"status": 200})

    async def credit(self, request: web.Request, key: str) -> web.StreamResponse:
        """The list is in ``results``; ``amount`` is deprecated, ``expiry`` in ms.

        (docs/vendors.md, "Perfect Corp: units and prices")
        """
        balance = self._ledger(key).balances[UNIT_POOL]
        expiry_ms = int((self.shared.started_epoch + 365 * 86400) * 1000)
        entry = {
            "id": _credit_id(key),
            "type": "ApiSubsToken",
            "amount": int(balance),
            "amount_dec": round(balance, 2),
            "expiry": expiry_ms,
        }
        return web.json_response({"status": 200, "results": [entry]})

    async def credit_history(self, request: web.Request, key: str) -> web.StreamResponse:
        """``result.history[]`` newest first, paged by ``starting_token``.

        (docs/vendors.md, "Perfect Corp: units and prices")
        """
        page_size = _page_param(request, "page_size", 1, 30, default=30)
        start = _page_param(request, "starting_token", 0, 10**9, default=0)
        entries = list(reversed(self.history.get(key, [])))
        page = entries[start : start + page_size]
        next_token = str(start + page_size) if start + page_size < len(entries) else None
        return web.json_response(
            {"status": 200, "result": {"history": page, "next_token": next_token}}
        )

    async def feature_cost(self, request: web.Request, key: str) -> web.StreamResponse:
        """What each feature costs; only AI Smile here.

        (docs/vendors.md, "Perfect Corp: units and prices")
        """
        _page_param(request, "page_size", 1, 20, default=20)
        sku = {
            "description": "AI Smile",
            "amount": PRICE,
            "unit": "result_image",
            "proc_unit": 1,
            "run_task_url": TASK_PATH,
        }
        return web.json_response({"status": 200, "result": {"skus": [sku], "next_token": None}})

    async def not_found(self, request: web.Request, key: str) -> web.StreamResponse:
        return failure(404, "Not Found", reason=f"no API at {request.method} {request.path}")


def _credit_id(key: str) -> int:
    """A stable credit-batch id above 2**53, as the vendor's are.

    (docs/vendors.md, "Perfect Corp: transport and authentication")
    """
    return 10**16 + int(hashlib.sha256(key.encode()).hexdigest()[:12], 16) % 10**15


def _page_param(request: web.Request, name: str, low: int, high: int, *, default: int) -> int:
    raw = request.query.get(name)
    if raw is None or raw == "":
        return default
    if not raw.isdigit() or not low <= int(raw) <= high:
        raise _invalid(f"{name} must be {low}..{high}", "Invalid parameter value")
    return int(raw)
