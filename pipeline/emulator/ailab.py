"""The AILabTools API as the emulator serves it (docs/vendors.md, the AILab sections).

Routes (header ``ailabapi-api-key`` on every one, multipart bodies)::

    POST /api/portrait/effects/emotion-editor      sync  -> data.image (base64)
    POST /api/portrait/editing/ai-face-swap        async -> task_id
    POST /api/portrait/effects/face-beauty-pro     sync (result, base64) or async (task_id)
    GET  /api/common/query-async-task-result?task_id=
    GET  /api/common/query-credits

Every answer is the superset envelope with HTTP status = ``error_code`` =
``error_detail.status_code`` (docs/vendors.md, "AILab: emulator behaviour"). Credits are
held at submit and debited only when the work succeeds: when a sync call returns, or when
an async task reaches ``task_status`` 2, polled or not (docs/vendors.md, "Both vendors:
billing").
"""

from __future__ import annotations

import asyncio
import base64
import functools
import heapq
import itertools
import secrets
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from pipeline.emulator.gate import Kind, Reject, Shared, VendorAPI, base_url, digest
from pipeline.emulator.images import (
    inspect_image,
    render_beauty,
    render_emotion,
    render_face_swap,
)
from pipeline.emulator.ledger import Hold, Ledger
from pipeline.emulator.stats import request_fingerprint
from pipeline.emulator.storage import Link

__all__ = ["AilabAPI"]

MB = 1024 * 1024
# Cap on a whole multipart body; above it: 413 ERROR_REQUEST_BODY_TOO_LARGE
# (docs/vendors.md, "AILab: emulator behaviour").
MAX_BODY_BYTES = 32 * MB


@dataclass(frozen=True)
class _Limits:
    """Input limits of one image field (docs/vendors.md, "AILab: image limits")."""

    max_bytes: int  # "no more than": inclusive
    max_side_exclusive: int = 4096  # "less than 4096x4096px"
    min_side_exclusive: int | None = None  # Face Beauty Pro: "larger than 48x48px"


@dataclass(frozen=True)
class _Api:
    """One billable API: its path, price (universal credits) and own pool.

    (docs/vendors.md, "The four operations" and "AILab: credits and prices")
    """

    path: str
    price: float
    pool: str


_LIMITS_5MB = _Limits(max_bytes=5 * MB)
_LIMITS_BEAUTY = _Limits(max_bytes=2 * MB, min_side_exclusive=48)

EMOTION = _Api("/api/portrait/effects/emotion-editor", 12, "portrait_expression_editing")
FACE_SWAP = _Api("/api/portrait/editing/ai-face-swap", 5, "portrait_ai_face_swap")
BEAUTY = _Api("/api/portrait/effects/face-beauty-pro", 15, "portrait_facial_beautification_pro")

# Current codes (V1.1.0) and the legacy V1.0 codes 0-3 (docs/vendors.md, "AILab: emotion
# editor" and "AILab: legacy expression codes").
_SERVICE_CHOICES = frozenset({10, 11, 12, 13, 14, 15, 16, 100})
_LEGACY_SERVICE_CHOICES = frozenset({0, 1, 2, 3})

# The six sliders and the 400 code the emulator uses for each out-of-range value
# (docs/vendors.md, "AILab: face beauty pro").
_SLIDERS = {
    "whitening": "ERROR_INVALID_SKIN_WHITENING_PARAMETER",
    "smoothing": "ERROR_INVALID_SMOOTHING_PARAMETER",
    "thinface": "ERROR_INVALID_FACE_SLIMMING_PARAMETER",
    "shrink_face": "ERROR_INVALID_PARAMETER",
    "enlarge_eye": "ERROR_INVALID_BIG_EYES_PARAMETER",
    "remove_eyebrow": "ERROR_INVALID_PARAMETER",
}
_FILTER_TYPES = range(1, 36)

# error_detail.code_message for the codes the emulator emits.
_CODE_MESSAGES = {
    "MISSING_PARAMETERS": "Missing parameters.",
    "PARAMETERS_CANNOT_EMPTY": "Parameters cannot be empty.",
    "ERROR_PARAMETERS": "Parameter error.",
    "ERROR_INVALID_PARAMETER": "Invalid parameter.",
    "UNSUPPORTED_PARAMETER_VALUES": "Unsupported parameter values.",
    "ERROR_INVALID_SKIN_WHITENING_PARAMETER": "Invalid skin whitening parameter.",
    "ERROR_INVALID_SMOOTHING_PARAMETER": "Invalid smoothing parameter.",
    "ERROR_INVALID_FACE_SLIMMING_PARAMETER": "Invalid face slimming parameter.",
    "ERROR_INVALID_BIG_EYES_PARAMETER": "Invalid big eyes parameter.",
    "ERROR_USER_NOT_EXISTS": "The user does not exist.",
    "ERROR_USER_LOCKED": "The user is locked.",
    "ERROR_AI_NOT_EXISTS": "The API does not exist or has been deactivated.",
    "ERROR_RESOURCE_NOT_FOUND": "Resource not found.",
    "ERROR_RESOURCE_RECLAIMED": "The resource has been reclaimed.",
    "FILE_SIZE_EXCEEDS_LIMIT": "File size exceeds the limit.",
    "FILE_RESOLUTION_EXCEEDS_LIMITS": "File resolution exceeds the limits.",
    "ERROR_REQUEST_BODY_TOO_LARGE": "Request body too large.",
    "UNSUPPORTED_FILE_TYPES": "Unsupported file types.",
    "FILE_DECODING_FAILURE": "File decoding failed.",
    "ERROR_LOW_RESOLUTION": "The resolution is too low.",
    "ERROR_NO_FACE_IN_FILE": "No face detected in the file.",
    "ERROR_NOT_ENOUGH_CREDITS": "Not enough credits.",
    "EXCEEDING_LIMITS": "Request or concurrency limits exceeded.",
    "PROCESSING_FAILURE": "Processing failure.",
    "AI_SERVICE_ERROR": "AI service error.",
    "ERROR_INSUFFICIENT_RESOURCES": "Insufficient resources.",
}

# Retryable answers for ``transient_error_rate``: the R codes at their 2026 statuses
# (docs/vendors.md, "AILab: error codes" and "AILab: decide by code, not by status").
_TRANSIENT = (
    (503, "ERROR_INSUFFICIENT_RESOURCES", "Insufficient resources, please try again later."),
    (502, "AI_SERVICE_ERROR", "AI service error, please try again later."),
    (500, "PROCESSING_FAILURE", "Processing failure, please try again later."),
    (429, "EXCEEDING_LIMITS", "Request or concurrency limits exceeded."),
)

# ``permanent_error_rate`` answers, by ``ailab_permanent_error`` (docs/vendors.md, "AILab:
# error codes").
_PERMANENT: dict[str, tuple[int, str]] = {
    "ERROR_NO_FACE_IN_FILE": (422, "pic not has face"),
    "ERROR_INVALID_PARAMETER": (400, "Invalid parameter."),
    "UNSUPPORTED_FILE_TYPES": (415, "Unsupported file types."),
}

# ``fatal_error`` codes: status and the request kinds they hit (the fault switches of
# docs/vendors.md, "AILab: emulator behaviour").
_FATAL: dict[str, tuple[int, frozenset[Kind] | None]] = {
    "ERROR_USER_LOCKED": (403, None),  # the account: every request
    "ERROR_USER_NOT_EXISTS": (401, None),
    "ERROR_AI_NOT_EXISTS": (404, frozenset({"submit", "poll"})),  # the API was retired
    "ERROR_NOT_ENOUGH_CREDITS": (429, frozenset({"submit"})),
}

_POOL_NAMES = {
    "common": "Universal credits",
    EMOTION.pool: "Change Facial Expressions",
    FACE_SWAP.pool: "AI Face Swap",
    BEAUTY.pool: "Face Beauty Pro",
}


def envelope(status: int = 200, code: str = "", message: str = "", **fields: Any) -> web.Response:
    """The superset envelope (docs/vendors.md, "AILab: response envelope") plus ``fields``."""
    body: dict[str, Any] = {
        "request_id": str(uuid.uuid4()),
        "log_id": secrets.token_hex(16).upper(),
        "error_code": 0 if status == 200 else status,
        "error_code_str": code,
        "error_msg": message,
        "error_detail": {
            "status_code": status,
            "code": code,
            "code_message": _CODE_MESSAGES.get(code, "") if code else "",
            "message": message,
        },
    }
    body.update(fields)
    return web.json_response(body, status=status)


def error(status: int, code: str, message: str) -> Reject:
    return Reject(envelope(status, code, message))


@dataclass
class _Part:
    filename: str | None
    data: bytes


async def _read_form(request: web.Request) -> dict[str, _Part]:
    """Fields of a multipart (or urlencoded) body by name; the first of a repeated name wins."""
    parts: dict[str, _Part] = {}
    if request.content_type == "multipart/form-data":
        total = 0
        try:
            reader = await request.multipart()
            while (part := await reader.next()) is not None:
                if not isinstance(part, BodyPartReader):  # nested multipart: not ours
                    await part.release()
                    continue
                chunks = []
                while chunk := await part.read_chunk():
                    total += len(chunk)
                    if total > MAX_BODY_BYTES:
                        raise error(
                            413,
                            "ERROR_REQUEST_BODY_TOO_LARGE",
                            f"request body over {MAX_BODY_BYTES} bytes",
                        )
                    chunks.append(chunk)
                if part.name and part.name not in parts:
                    parts[part.name] = _Part(part.filename, b"".join(chunks))
        except (ValueError, AssertionError, RuntimeError) as exc:
            raise error(400, "ERROR_PARAMETERS", f"malformed multipart body: {exc}") from None
    elif request.content_type == "application/x-www-form-urlencoded":
        for name, value in (await request.post()).items():
            if isinstance(value, str) and name not in parts:
                parts[name] = _Part(None, value.encode())
    return parts


def _text(parts: dict[str, _Part], name: str) -> str | None:
    """A scalar field as stripped text; ``None`` if absent or empty (optional = default)."""
    part = parts.get(name)
    if part is None:
        return None
    value = part.data.decode("utf-8", errors="replace").strip()
    return value or None


def _int(text: str) -> int | None:
    """Decimal text as int; ``None`` if not one.

    Scalars are sent as decimal text (docs/vendors.md, "AILab: transport and authentication").
    """
    try:
        return int(text, 10)
    except ValueError:
        return None


@dataclass
class _Task:
    """An async AILab task: queued, processing, then done at ``completes_at``."""

    id: str
    key: str
    api: _Api
    params: dict[str, int]
    input_blobs: list[str]
    hold: Hold
    created: float
    completes_at: float
    fails: bool
    input_digest: str = ""  # sha256 of the first image's bytes: what a charge is booked to
    settled: bool = False
    link: Link | None = None
    rendering: asyncio.Task[str] | None = None  # the result's blob id, once rendered
    lock: asyncio.Lock = field(default_factory=asyncio.Lock)


class AilabAPI(VendorAPI):
    """The AILab endpoints, their tasks and the accounts behind the keys."""

    name = "ailab"

    def __init__(self, shared: Shared) -> None:
        super().__init__(shared)
        self.tasks: dict[str, _Task] = {}
        self.ledgers: dict[str, Ledger] = {}
        self._due: list[tuple[float, int, str]] = []
        self._seq = itertools.count()

    def reset(self) -> None:
        super().reset()
        self.tasks.clear()
        self.ledgers.clear()
        self._due.clear()

    def routes(self) -> list[web.RouteDef]:
        return [
            web.post(EMOTION.path, self.endpoint("submit", self.emotion_editor)),
            web.post(FACE_SWAP.path, self.endpoint("submit", self.face_swap)),
            web.post(BEAUTY.path, self.endpoint("submit", self.face_beauty_pro)),
            web.get("/api/common/query-async-task-result", self.endpoint("poll", self.poll)),
            web.get("/api/common/query-credits", self.endpoint("credits", self.credits)),
            web.route("*", "/api/{tail:.*}", self.endpoint("other", self.not_found)),
        ]

    # --- gate wording --------------------------------------------------------------

    def authenticate(self, request: web.Request) -> str:
        # A missing or unknown key → 401 ERROR_USER_NOT_EXISTS (docs/vendors.md, "AILab:
        # emulator behaviour").
        key = request.headers.get("ailabapi-api-key", "").strip()
        allowed = self.scenario.ailab_api_keys
        if not key or (allowed is not None and key not in allowed):
            raise error(401, "ERROR_USER_NOT_EXISTS", "The API key is missing or not recognised.")
        return key

    def rate_limited(self) -> web.Response:
        # 429 EXCEEDING_LIMITS; no Retry-After header is documented (docs/vendors.md, "AILab:
        # rate limits" and "Both vendors: Retry-After").
        return envelope(429, "EXCEEDING_LIMITS", "Request or concurrency limits exceeded.")

    def transient(self, kind: Kind) -> web.Response:
        status, code, message = self.shared.faults.pick(_TRANSIENT)
        return envelope(status, code, message)

    def fatal(self, code: str, kind: Kind) -> web.Response | None:
        status, kinds = _FATAL[code]
        if kinds is not None and kind not in kinds:
            return None
        return envelope(status, code, _CODE_MESSAGES.get(code, code))

    def decorate(self, response: web.StreamResponse) -> None:
        """AILab identifies requests in the body (``request_id``, ``log_id``), not headers."""

    # --- accounts and tasks ---------------------------------------------------------

    def _ledger(self, key: str) -> Ledger:
        ledger = self.ledgers.get(key)
        if ledger is None:
            ledger = self.ledgers[key] = Ledger(self.scenario.ailab_credits)
        return ledger

    def _hold(self, key: str, api: _Api) -> Hold:
        # The API's own pool first, then common; empty → 429 (docs/vendors.md, "AILab:
        # emulator behaviour").
        hold = self._ledger(key).hold(api.price, (api.pool, "common"))
        if hold is None:
            raise error(429, "ERROR_NOT_ENOUGH_CREDITS", "Not enough credits, please recharge.")
        return hold

    def _charge(self, key: str, hold: Hold, input_digest: str) -> None:
        self.stats.count_charge(self._ledger(key).debit(hold), input_digest)

    def settle_due(self) -> None:
        """Bill tasks that reached their end (success debits; failure releases the hold)."""
        now = self.shared.clock()
        while self._due and self._due[0][0] <= now:
            task = self.tasks.get(heapq.heappop(self._due)[2])
            if task is None or task.settled:
                continue
            task.settled = True
            if task.fails:
                self._ledger(task.key).release(task.hold)
                self.stats.task_failures += 1
            else:
                self._charge(task.key, task.hold, task.input_digest)

    async def _image(self, parts: dict[str, _Part], name: str, limits: _Limits) -> bytes:
        """The bytes of image field ``name``, checked as the emulator's rules say.

        (docs/vendors.md, "AILab: image limits" and "AILab: emulator behaviour")
        """
        part = parts.get(name)
        if part is None:
            raise error(400, "MISSING_PARAMETERS", f"Missing parameter: {name}.")
        data = part.data
        if not data:
            raise error(400, "PARAMETERS_CANNOT_EMPTY", f"{name} is empty.")
        if len(data) > limits.max_bytes:
            raise error(
                413,
                "FILE_SIZE_EXCEEDS_LIMIT",
                f"{name}: {len(data)} bytes; the limit is {limits.max_bytes}.",
            )
        info = await asyncio.to_thread(inspect_image, data)
        if info.too_many_pixels:
            raise error(413, "FILE_RESOLUTION_EXCEEDS_LIMITS", f"{name}: too many pixels.")
        if info.format is None:
            raise error(
                422, "FILE_DECODING_FAILURE", f"{name}: the file could not be decoded as an image."
            )
        if info.format not in ("JPEG", "PNG"):
            raise error(
                415,
                "UNSUPPORTED_FILE_TYPES",
                f"{name}: {info.format} is not supported; use JPEG/JPG/PNG.",
            )
        side = limits.max_side_exclusive
        if info.width >= side or info.height >= side:
            raise error(
                413,
                "FILE_RESOLUTION_EXCEEDS_LIMITS",
                f"{name}: {info.width}x{info.height}; must be less than {side}x{side}.",
            )
        low = limits.min_side_exclusive
        if low is not None and (info.width <= low or info.height <= low):
            raise error(
                422,
                "ERROR_LOW_RESOLUTION",
                f"{name}: {info.width}x{info.height}; must be larger than {low}x{low}.",
            )
        if not info.decodes:
            raise error(422, "FILE_DECODING_FAILURE", f"{name}: the image data is damaged.")
        return data

    def _refuse_faceless(self, input_digest: str) -> None:
        # permanent_error_rate, fixed per input: the failure example of (docs/vendors.md, "AILab:
        # response envelope").
        if self.shared.faults.permanent(input_digest, self.scenario.permanent_error_rate):
            code = self.scenario.ailab_permanent_error
            status, message = _PERMANENT[code]
            raise error(status, code, message)

    async def _sync(
        self, key: str, hold: Hold, render: Callable[[], bytes], input_digest: str
    ) -> bytes:
        """Run a sync job: at least ``sync_seconds``; debit on success, release otherwise."""
        try:
            _, result = await asyncio.gather(
                asyncio.sleep(self.scenario.sync_seconds), asyncio.to_thread(render)
            )
        except Exception:
            self._ledger(key).release(hold)
            raise error(500, "PROCESSING_FAILURE", "Processing failed.") from None
        except BaseException:
            self._ledger(key).release(hold)
            raise
        self._charge(key, hold, input_digest)
        return result

    async def _start_task(
        self,
        key: str,
        api: _Api,
        params: dict[str, int],
        inputs: list[bytes],
        hold: Hold,
        input_digest: str,
    ) -> _Task:
        now = self.shared.clock()
        task = _Task(
            id=secrets.token_hex(20),
            key=key,
            api=api,
            params=params,
            input_blobs=[await self.shared.blobs.put(data) for data in inputs],
            hold=hold,
            created=now,
            completes_at=now + self.scenario.task_seconds,
            fails=self.shared.faults.chance(self.scenario.task_failure_rate),
            input_digest=input_digest,
        )
        self.tasks[task.id] = task
        heapq.heappush(self._due, (task.completes_at, next(self._seq), task.id))
        if not task.fails:
            task.rendering = self.render_ahead(functools.partial(self._render, task))
        return task

    async def _render(self, task: _Task) -> str:
        """Render the task's result from its inputs (then dropped); its blob id."""
        blobs = self.shared.blobs
        inputs = [await blobs.get(blob_id) for blob_id in task.input_blobs]
        if task.api is FACE_SWAP:
            data = await asyncio.to_thread(render_face_swap, inputs[0], inputs[1])
        else:
            data = await asyncio.to_thread(render_beauty, inputs[0], task.params)
        result_blob = await blobs.put(data)
        for blob_id in task.input_blobs:
            blobs.delete(blob_id)
        task.input_blobs = []
        return result_blob

    def _count(self, api: _Api, params: Mapping[str, object], digests: list[str]) -> None:
        self.stats.count_submit(digests[0], request_fingerprint(api.path, params, digests))

    # --- handlers -------------------------------------------------------------------

    async def emotion_editor(self, request: web.Request, key: str) -> web.StreamResponse:
        """Sync; ``data.image`` is the bare base64 of the result.

        (docs/vendors.md, "AILab: emotion editor")
        """
        parts = await _read_form(request)
        raw = _text(parts, "service_choice")
        if raw is None:  # required since V1.0.1
            raise error(400, "MISSING_PARAMETERS", "Missing parameter: service_choice.")
        choice = _int(raw)
        legacy_ok = self.scenario.legacy_service_choice == "accept"
        if choice is None or not (
            choice in _SERVICE_CHOICES or (legacy_ok and choice in _LEGACY_SERVICE_CHOICES)
        ):
            raise error(
                400, "UNSUPPORTED_PARAMETER_VALUES", f"service_choice={raw!r} is not supported."
            )
        image = await self._image(parts, "image_target", _LIMITS_5MB)
        image_digest = digest(image)
        self._refuse_faceless(image_digest)
        hold = self._hold(key, EMOTION)
        self._count(EMOTION, {"service_choice": choice}, [image_digest])
        result = await self._sync(key, hold, lambda: render_emotion(image, choice), image_digest)
        return self.lose_response(request) or envelope(
            data={"image": base64.b64encode(result).decode("ascii")}
        )

    async def face_swap(self, request: web.Request, key: str) -> web.StreamResponse:
        """Async; two required files, no ``task_type`` field.

        (docs/vendors.md, "AILab: face swap")
        """
        parts = await _read_form(request)
        for name in ("image_target", "image_template"):
            if name not in parts:
                raise error(400, "MISSING_PARAMETERS", f"Missing parameter: {name}.")
        target = await self._image(parts, "image_target", _LIMITS_5MB)
        template = await self._image(parts, "image_template", _LIMITS_5MB)
        digests = [digest(target), digest(template)]
        self._refuse_faceless(digests[0])
        hold = self._hold(key, FACE_SWAP)
        task = await self._start_task(key, FACE_SWAP, {}, [target, template], hold, digests[0])
        self._count(FACE_SWAP, {}, digests)
        return self.lose_response(request) or envelope(task_type="async", task_id=task.id)

    async def face_beauty_pro(self, request: web.Request, key: str) -> web.StreamResponse:
        """``task_type`` sync (default, top-level ``result``) or async (``task_id``).

        (docs/vendors.md, "AILab: face beauty pro")
        """
        parts = await _read_form(request)
        task_type = _text(parts, "task_type") or "sync"
        if task_type not in ("sync", "async"):
            raise error(
                400, "UNSUPPORTED_PARAMETER_VALUES", f"task_type={task_type!r} is not supported."
            )
        params: dict[str, int] = {}
        for name, code in _SLIDERS.items():
            raw = _text(parts, name)
            if raw is None:
                continue
            value = _int(raw)
            if value is None or not 0 <= value <= 100:
                raise error(400, code, f"{name}={raw!r}; must be an integer 0-100.")
            params[name] = value
        raw_filter = _text(parts, "filter_type")
        if raw_filter is not None:
            filter_type = _int(raw_filter)
            if filter_type is None or filter_type not in _FILTER_TYPES:
                raise error(
                    400,
                    "UNSUPPORTED_PARAMETER_VALUES",
                    f"filter_type={raw_filter!r} is not supported; use 1-35.",
                )
            params["filter_type"] = filter_type
        image = await self._image(parts, "image", _LIMITS_BEAUTY)
        image_digest = digest(image)
        self._refuse_faceless(image_digest)
        hold = self._hold(key, BEAUTY)
        self._count(BEAUTY, {**params, "task_type": task_type}, [image_digest])
        if task_type == "sync":
            result = await self._sync(key, hold, lambda: render_beauty(image, params), image_digest)
            return self.lose_response(request) or envelope(
                task_type="sync", result=base64.b64encode(result).decode("ascii")
            )
        task = await self._start_task(key, BEAUTY, params, [image], hold, image_digest)
        return self.lose_response(request) or envelope(task_type="async", task_id=task.id)

    async def poll(self, request: web.Request, key: str) -> web.StreamResponse:
        """``task_status`` 0 → 1 → 2 over ``task_seconds``; failures as the scenario says.

        (docs/vendors.md, "AILab: polling and task states" and "AILab: task failures at poll")
        """
        task_id = request.query.get("task_id", "").strip()
        if not task_id:
            raise error(400, "MISSING_PARAMETERS", "Missing parameter: task_id.")
        self.stats.polls += 1
        task = self.tasks.get(task_id)
        if task is None or task.key != key:
            raise error(404, "ERROR_RESOURCE_NOT_FOUND", f"Task {task_id} not found.")
        now = self.shared.clock()
        ttl = self.scenario.ailab_result_url_ttl_seconds
        if now > task.completes_at + ttl:  # (docs/vendors.md, "AILab: task lifetimes")
            raise error(410, "ERROR_RESOURCE_RECLAIMED", f"Task {task_id} has expired.")
        if task.fails and self.scenario.ailab_task_failure_style == "http422":
            # The third-party observation, an accepted task refused at its first poll
            # (docs/vendors.md, "AILab: task failures at poll").
            raise error(422, "ERROR_NO_FACE_IN_FILE", "No face detected.")
        if now < task.completes_at:
            queued = now - task.created < self.scenario.task_seconds / 2
            return envelope(task_status=0 if queued else 1)
        if task.fails:
            return envelope(task_status=3)  # the SDK's failure value, same section
        url = await self._result_url(request, task)
        if task.api is FACE_SWAP:  # (docs/vendors.md, "AILab: face swap")
            return envelope(task_status=2, data={"image": url})
        # (docs/vendors.md, "AILab: face beauty pro result field")
        if self.scenario.beauty_result_field == "result_url":
            return envelope(task_status=2, result_url=url)
        return envelope(task_status=2, data={"image": url})

    async def _result_url(self, request: web.Request, task: _Task) -> str:
        """The result (rendered while the task ran: :meth:`VendorAPI.render_ahead`); its
        URL is fixed and lives 24 h from completion.

        (docs/vendors.md, "AILab: task lifetimes")
        """
        async with task.lock:
            if task.link is None:
                if task.rendering is None:
                    task.rendering = self.render_ahead(functools.partial(self._render, task))
                result_blob = await asyncio.shield(task.rendering)
                ttl = self.scenario.ailab_result_url_ttl_seconds
                task.link = self.shared.links.result(
                    "ailab", result_blob, ttl, expires_at=task.completes_at + ttl
                )
        return self.shared.links.url(base_url(request), task.link)

    async def credits(self, request: web.Request, key: str) -> web.StreamResponse:
        """``data`` is an array of pools; every field present.

        (docs/vendors.md, "AILab: credits and prices")
        """
        ledger = self._ledger(key)
        first_buy = int(self.shared.started_epoch)
        pools = [
            {
                "unique_sign": pool,
                "name": _POOL_NAMES.get(pool, pool),
                "balance": float(balance),
                "total": float(ledger.initial.get(pool, 0.0)),
                "last_recharge_balance": float(ledger.initial.get(pool, 0.0)),
                "balance_warning": 100.0,
                "first_buy_time": first_buy,
                "last_update_time": int(ledger.last_update),
            }
            for pool, balance in ledger.balances.items()
        ]
        return envelope(data=pools)

    async def not_found(self, request: web.Request, key: str) -> web.StreamResponse:
        return envelope(404, "ERROR_AI_NOT_EXISTS", f"No API at {request.method} {request.path}.")
