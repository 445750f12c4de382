"""Perfect Corp (YouCam API) provider: AI Smile, an async task that needs an upload first.

The wire format is described in the Perfect Corp sections of ``docs/vendors.md``; every
quirk below cites its section.

One submit is three requests (docs/vendors.md, "Perfect Corp: upload" and "Perfect
Corp: create task"):

1. ``POST /s2s/v2.0/file/ai-smile`` (or the universal ``/s2s/v2.0/file``:
   docs/vendors.md, "Perfect Corp: upload path") with the file's type, name and size →
   a ``file_id`` and a presigned storage URL;
2. ``PUT`` the bytes to that URL with *exactly* the headers it came with: no
   ``Authorization`` (S3 rejects a second auth mechanism) and nothing aiohttp would add;
3. ``POST /s2s/v2.0/task/ai-smile`` ``{"src_file_id", "expression_type"}`` → ``task_id``.

- Auth: ``Authorization: Bearer <key>``, one space, to the base URL only
  (docs/vendors.md, "Perfect Corp: transport and authentication").
- Envelopes: ``{"status":200,"data":{…}}`` or ``{"status":<http>,"error":"…",
  "error_code":"…"}``; ``error_code`` is absent on 429 and some 401s (docs/vendors.md,
  "Perfect Corp: response envelope").
- Engine failures arrive as HTTP 200 with ``data.task_status == "error"``
  (docs/vendors.md, "Perfect Corp: polling and task states").
- The ``x-request-id`` response header [unsure] is kept as the errors' ``request_id``.
- Ids may exceed 2^53 (docs/vendors.md, "Perfect Corp: transport and authentication"):
  they stay strings (Python's ``json`` keeps big ints exact).

Pure functions build and parse every step; :class:`PerfectCorpProvider` moves bytes.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Final
from urllib.parse import quote

from pipeline.errors import (
    FatalError,
    PermanentError,
    RetryableError,
    TransportError,
    VendorError,
)
from pipeline.netguard import RESULT_URL_REFUSED, ResolveError, guarded_session
from pipeline.providers.base import (
    CreditBalance,
    ExtraFiles,
    ImagePayload,
    Submitted,
    TaskState,
    VendorParams,
)
from pipeline.providers.classify import (
    classify_perfectcorp,
    classify_perfectcorp_engine,
    make_error,
)
from pipeline.providers.client import VendorClient, VendorWire
from pipeline.providers.envelope import Answer, as_int, as_text, unwrap, vendor_id
from pipeline.providers.http import (
    HttpRequest,
    ResponseTooLarge,
    api_timeout,
    as_float,
    body_excerpt,
    clip,
    header,
    parse_json_object,
    parse_retry_after,
    redirect_error,
    safe_url,
    send,
    transport_error,
)

__all__ = [
    "AI_SMILE",
    "CREDIT_PATH",
    "FEATURE_UPLOAD_PATH",
    "TASK_PATH",
    "UNIVERSAL_UPLOAD_PATH",
    "VENDOR",
    "PerfectCorpProvider",
    "UploadTarget",
    "auth_headers",
    "build_create_task",
    "build_credits",
    "build_poll",
    "build_put",
    "build_upload",
    "envelope_error",
    "parse_create_task",
    "parse_credits",
    "parse_envelope",
    "parse_poll",
    "parse_put",
    "parse_upload",
]

_log = logging.getLogger(__name__)

VENDOR: Final = "perfectcorp"
AI_SMILE: Final = "perfectcorp/ai-smile"

# docs/vendors.md, "Perfect Corp: upload path": the AI Smile page's feature path, and
# the universal one of release v1.14.
FEATURE_UPLOAD_PATH: Final = "/s2s/v2.0/file/ai-smile"
UNIVERSAL_UPLOAD_PATH: Final = "/s2s/v2.0/file"
# Create, and poll (+ "/{task_id}"): "Perfect Corp: create task", "Perfect Corp: polling
# and task states".
TASK_PATH: Final = "/s2s/v2.0/task/ai-smile"
CREDIT_PATH: Final = "/s2s/v1.0/client/credit"  # "Perfect Corp: units and prices"

_SCHEME: Final = re.compile(r"^[a-z][a-z0-9+.\-]*:", re.IGNORECASE)
_REQUEST_ID_HEADER: Final = "x-request-id"  # [unsure]: seen on responses; log it

# Step-2 failures of any kind mean "redo both steps" (docs/vendors.md, "Perfect Corp:
# upload").
_PUT_FAILED: Final = "UPLOAD_PUT_FAILED"
# The presigned upload URL points somewhere netguard refuses (loopback, private,
# metadata): nothing is sent, and every item would get the same answer.
_PUT_REFUSED: Final = "UPLOAD_URL_REFUSED"
# Request-level poll codes that mean the task itself is over (docs/vendors.md, "Perfect
# Corp: polling and task states" and "Perfect Corp: error codes").
# InvalidTaskId is S: resubmitting may double-charge ("Perfect Corp: polling window").
_POLL_INVALID_TASK: Final = "invalidtaskid"
_POLL_RESUBMIT: Final = frozenset({"tasktimeout", "unknown_internal_error"})  # R: resubmit


def auth_headers(api_key: str) -> dict[str, str]:
    """``Authorization: Bearer <key>``, exactly one space (docs/vendors.md, "Perfect
    Corp: transport and authentication"). Base URL only."""
    return {"Authorization": f"Bearer {api_key}"}


@dataclass(frozen=True)
class UploadTarget:
    """Step 1's answer: the ``file_id`` and the presigned request to make
    (docs/vendors.md, "Perfect Corp: upload")."""

    file_id: str
    url: str
    headers: Mapping[str, str]
    method: str = "PUT"


# ------------------------------------------------------------------------- builders


def build_upload(image: ImagePayload, path: str = FEATURE_UPLOAD_PATH) -> HttpRequest:
    """Step 1 (docs/vendors.md, "Perfect Corp: upload"): all three fields are required;
    ``file_size`` is in bytes."""
    body = {
        "files": [
            {
                "content_type": image.content_type,
                "file_name": image.filename,
                "file_size": len(image.data),
            }
        ]
    }
    return HttpRequest("POST", path, json=body)


def build_put(target: UploadTarget, image: ImagePayload) -> HttpRequest:
    """Step 2 (docs/vendors.md, "Perfect Corp: upload"): the raw bytes to the presigned
    URL with exactly its headers.

    Raises ``RetryableError`` if the signed ``Content-Length`` disagrees with the bytes
    (the URL was issued for another size: redo both steps).
    """
    length = header(target.headers, "Content-Length")
    if length is not None and length.strip() != str(len(image.data)):
        raise RetryableError(
            f"presigned upload expects {length.strip()} bytes, the image has {len(image.data)}",
            code="UPLOAD_SIZE_MISMATCH",
            vendor=VENDOR,
        )
    return HttpRequest(target.method, target.url, data=image.data, headers=dict(target.headers))


def build_create_task(file_id: str, expression_type: str) -> HttpRequest:
    """Step 3: ``src_file_id`` (never also ``src_file_url``) + ``expression_type``.

    No other field is sent: unknown fields are ``400 BadRequest`` [unsure]
    (docs/vendors.md, "Perfect Corp: create task").
    """
    return HttpRequest(
        "POST", TASK_PATH, json={"src_file_id": file_id, "expression_type": expression_type}
    )


def build_poll(task_id: str) -> HttpRequest:
    """``GET /s2s/v2.0/task/ai-smile/{task_id}`` with the id URL-encoded
    (docs/vendors.md, "Perfect Corp: polling and task states").

    Ids may contain ``/``, ``+`` and ``=``; ``safe=''`` encodes all of them.
    """
    return HttpRequest("GET", f"{TASK_PATH}/{quote(task_id, safe='')}")


def build_credits() -> HttpRequest:
    """``GET /s2s/v1.0/client/credit`` (docs/vendors.md, "Perfect Corp: units and
    prices")."""
    return HttpRequest("GET", CREDIT_PATH)


# -------------------------------------------------------------------------- parsers


def _request_id(headers: Mapping[str, str]) -> str | None:
    rid = header(headers, _REQUEST_ID_HEADER)
    return rid.strip() if rid and rid.strip() else None


def _malformed(what: str, status: int, request_id: str | None) -> RetryableError:
    return Answer(VENDOR, status, request_id).malformed(what)


def envelope_error(
    status: int, headers: Mapping[str, str], body: bytes
) -> tuple[VendorError | None, dict[str, Any] | None]:
    """Check the envelope (docs/vendors.md, "Perfect Corp: response envelope").

    Returns ``(error, doc)``; ``error`` is ``None`` on success.
    Success: HTTP 2xx, ``status`` absent or 2xx, and no top-level ``error_code`` or
    ``error``. Failures are classified by ``error_code`` per (docs/vendors.md, "Perfect
    Corp: error codes"), else by status.
    """
    rid = _request_id(headers)
    doc = parse_json_object(body)
    if 300 <= status < 400:
        return redirect_error(status, headers, vendor=VENDOR, request_id=rid), doc
    answer = Answer(VENDOR, status, rid, parse_retry_after(headers))
    if doc is None:
        # Other 5xx and network errors are R ("Perfect Corp: error codes"): an
        # unreadable 5xx is a transport fault.
        return answer.not_json(body, classify_perfectcorp(status, None), None), None

    body_status = as_int(doc.get("status"))
    error_code = as_text(doc.get("error_code"))
    error_text = as_text(doc.get("error"))
    ok_status = 200 <= status < 300 and (body_status is None or 200 <= body_status < 300)
    if ok_status and not error_code and not error_text:
        return None, doc

    # An HTTP 2xx whose body says otherwise is classified by the body's status.
    effective = status
    if 200 <= status < 300 and body_status is not None and 100 <= body_status <= 599:
        effective = body_status
    kind = classify_perfectcorp(effective, error_code)
    message = clip(error_text) if error_text else f"HTTP {status}"
    code = error_code or f"HTTP_{effective}"
    return answer.error(kind, message, code=code, rate_status=effective, rate_code=error_code), doc


def parse_envelope(status: int, headers: Mapping[str, str], body: bytes) -> dict[str, Any]:
    """The response document on success (docs/vendors.md, "Perfect Corp: response
    envelope"); raises the classified error otherwise."""
    return unwrap(envelope_error(status, headers, body))


def _data(doc: Mapping[str, Any]) -> Mapping[str, Any]:
    data = doc.get("data")
    return data if isinstance(data, dict) else {}


def parse_upload(status: int, headers: Mapping[str, str], body: bytes) -> UploadTarget:
    """Step 1's response → :class:`UploadTarget` from ``data.files[0]`` and its
    ``requests[0]`` (docs/vendors.md, "Perfect Corp: upload"). ``file_id`` may contain
    ``/`` and ``+``: kept verbatim."""
    doc = parse_envelope(status, headers, body)
    rid = _request_id(headers)
    files = _data(doc).get("files")
    first = files[0] if isinstance(files, list) and files else None
    if not isinstance(first, dict):
        raise _malformed("upload response has no data.files[0]", status, rid)
    file_id = vendor_id(first.get("file_id"))
    requests = first.get("requests")
    req = requests[0] if isinstance(requests, list) and requests else None
    if file_id is None or not isinstance(req, dict):
        raise _malformed("upload response lacks file_id or requests[0]", status, rid)
    url = as_text(req.get("url"))
    if not url.lower().startswith(("http://", "https://")):
        raise _malformed("upload response: requests[0].url is not an http(s) URL", status, rid)
    raw_headers = req.get("headers")
    put_headers: dict[str, str] = {}
    if isinstance(raw_headers, dict):
        # Header values may come as JSON numbers ("Content-Length": 547541).
        put_headers = {str(k): str(v) for k, v in raw_headers.items() if v is not None}
    method = as_text(req.get("method")).upper() or "PUT"
    return UploadTarget(file_id=file_id, url=url, headers=put_headers, method=method)


def parse_put(status: int, headers: Mapping[str, str], body: bytes, *, url: str) -> None:
    """Step 2's response: any non-2xx is ``RetryableError(UPLOAD_PUT_FAILED)``, because
    the remedy is always to redo both steps with a fresh URL (docs/vendors.md, "Perfect
    Corp: upload")."""
    if not 200 <= status < 300:
        raise RetryableError(
            f"PUT {safe_url(url)}: HTTP {status}: {body_excerpt(body)}",
            code=_PUT_FAILED,
            vendor=VENDOR,
            http_status=status,
        )


def parse_create_task(status: int, headers: Mapping[str, str], body: bytes) -> Submitted:
    """Step 3's response → ``Submitted(task_id)`` from ``data.task_id``
    (docs/vendors.md, "Perfect Corp: create task")."""
    doc = parse_envelope(status, headers, body)
    rid = _request_id(headers)
    task_id = vendor_id(_data(doc).get("task_id"))
    if task_id is None:
        raise _malformed("create-task response has no data.task_id", status, rid)
    return Submitted(task_id=task_id, request_id=rid)


def _result_url(data: Mapping[str, Any]) -> str | None:
    # data.results.url ("Perfect Corp: polling and task states"). Tolerate a list of
    # results and V1's singular `result`.
    # Any URL is handed over, http(s) or not (ftp:, file:, data:, javascript:): the
    # task succeeded and was billed, and the download refuses a bad URL
    # (RESULT_URL_REFUSED) with a reason, where "no result" would only re-poll.
    for key in ("results", "result"):
        value = data.get(key)
        if isinstance(value, list) and value:
            value = value[0]
        if isinstance(value, dict):
            url = as_text(value.get("url"))
            if _SCHEME.match(url):
                return url
    return None


def _poll_after(data: Mapping[str, Any]) -> float | None:
    # data.polling_interval, if present, is in milliseconds (V1 semantics):
    # docs/vendors.md, "Perfect Corp: polling interval".
    ms = as_float(data.get("polling_interval"))
    if ms is None or not ms > 0 or ms == float("inf"):
        return None
    return ms / 1000.0


def parse_poll(status: int, headers: Mapping[str, str], body: bytes) -> TaskState:
    """A poll response → ``TaskState``, or raises when the poll itself failed.

    Request-level errors (docs/vendors.md, "Perfect Corp: polling and task states" and
    "Perfect Corp: error codes"):

    - ``400 InvalidTaskId`` → ``failed`` with ``PermanentError(InvalidTaskId)``: bad id
      or expired unpolled; resubmitting may double-charge (docs/vendors.md, "Perfect
      Corp: polling window").
    - ``500 TaskTimeout`` and ``404/500 unknown_internal_error`` → ``failed`` with
      ``RetryableError``: the remedy is to resubmit (with a fresh upload), not re-poll.
    - other S codes → ``failed`` with ``PermanentError``.
    - 429 → raises ``RateLimitedError``; other 5xx / network / malformed → raises
      ``RetryableError``/``TransportError`` (re-poll the same id); F → raises.

    Task states (``data.task_status``, compared case-insensitively):

    - ``running`` (or any other non-terminal word) → ``running``;
    - ``success`` → ``succeeded`` with ``data.results.url`` (without one: ``succeeded``
      with neither a URL nor an image, a billed task asked again for its result);
    - ``error`` → ``failed``; ``data.error`` classified per (docs/vendors.md, "Perfect
      Corp: engine error codes") (case-insensitive; unknown → R).

    ``data.polling_interval`` (ms) becomes ``poll_after`` seconds (docs/vendors.md,
    "Perfect Corp: polling interval").
    """
    err, doc = envelope_error(status, headers, body)
    if err is not None:
        return _poll_failure(err)
    assert doc is not None
    rid = _request_id(headers)
    data = _data(doc)
    task_status = as_text(data.get("task_status")).lower()
    poll_after = _poll_after(data)
    if not task_status:
        raise _malformed("poll response has no data.task_status", status, rid)
    if task_status == "success":
        url = _result_url(data)
        if url is None:
            # Succeeded, so charged (docs/vendors.md, "Both vendors: billing"): a
            # succeeded task without its result, which the lifecycle polls again (a
            # re-poll hands out a fresh URL, "Perfect Corp: result URLs") and then
            # reports as paid and lost; never resubmitted, as for AILab.
            return TaskState(state="succeeded", poll_after=poll_after)
        return TaskState(state="succeeded", result_url=url, poll_after=poll_after)
    if task_status == "error":
        return TaskState(
            state="failed", error=_engine_error(data, status, rid), poll_after=poll_after
        )
    # "running", or a state word the docs do not list: keep polling. Treating an
    # unknown word as failure would resubmit tasks that may still succeed and be
    # charged (docs/vendors.md, "Perfect Corp: polling window"); the engine's per-task
    # deadline bounds the wait.
    return TaskState(state="running", poll_after=poll_after)


def _poll_failure(err: VendorError) -> TaskState:
    """A poll whose envelope is an error: InvalidTaskId (maybe billed), the resubmit
    codes and other S codes are task outcomes; anything else is raised."""
    norm = err.code.strip().lower()
    if norm == _POLL_INVALID_TASK:
        return TaskState(state="failed", error=err, maybe_billed=True)
    if norm in _POLL_RESUBMIT:
        return TaskState(state="failed", error=err)
    if err.kind == "permanent":
        return TaskState(state="failed", error=err)
    raise err


def _engine_error(data: Mapping[str, Any], status: int, rid: str | None) -> VendorError:
    """``data.error`` of a task in state ``error``, classified per (docs/vendors.md,
    "Perfect Corp: engine error codes")."""
    raw = as_text(data.get("error"))
    code = raw.lower() or "unknown_engine_error"
    detail = as_text(data.get("error_message"))
    return make_error(
        classify_perfectcorp_engine(code),
        clip(detail) if detail else f"task failed: {raw or 'no error code'}",
        code=code,
        vendor=VENDOR,
        http_status=status,
        request_id=rid,
    )


def parse_credits(status: int, headers: Mapping[str, str], body: bytes) -> CreditBalance:
    """``results`` (not ``data``: docs/vendors.md, "Perfect Corp: units and prices") →
    the sum of ``amount_dec`` over entries whose
    ``type`` starts with ``Api`` (as the vendor-org client does); ``amount`` is
    deprecated and used only when ``amount_dec`` is missing. Pools are keyed by type."""
    doc = parse_envelope(status, headers, body)
    rid = _request_id(headers)
    results = doc.get("results")
    if not isinstance(results, list):
        raise _malformed("credit response has no results array", status, rid)
    pools: dict[str, float] = {}
    for entry in results:
        if not isinstance(entry, dict):
            continue
        kind = as_text(entry.get("type"))
        if not kind.startswith("Api"):
            continue
        amount = as_float(entry.get("amount_dec"))
        if amount is None:
            amount = as_float(entry.get("amount"))
        if amount is None:
            raise _malformed(f"credit entry of type {kind} has no amount_dec", status, rid)
        pools[kind] = pools.get(kind, 0.0) + amount
    return CreditBalance(vendor=VENDOR, balance=sum(pools.values()), unit="units", pools=pools)


# ------------------------------------------------------------------------ the class


def _expression_type(operation: str, params: VendorParams, files: ExtraFiles) -> str:
    """The one parameter AI Smile takes; raises :class:`FatalError` for another
    operation and :class:`PermanentError` (``CLIENT_*`` codes, nothing sent) for a
    missing or unknown parameter."""
    if operation != AI_SMILE:
        raise FatalError(
            f"operation {operation!r} is not a Perfect Corp operation",
            code="UNSUPPORTED_OPERATION",
            vendor=VENDOR,
        )
    unknown = sorted(set(params) - {"expression_type"} - set(files))
    if unknown:
        raise PermanentError(
            f"{operation} does not take {', '.join(unknown)}",
            code="CLIENT_UNKNOWN_PARAMETER",
            vendor=VENDOR,
        )
    expression = params.get("expression_type")
    if not isinstance(expression, str) or not expression:
        raise PermanentError(
            f"{operation} needs expression_type",
            code="CLIENT_MISSING_PARAMETER",
            vendor=VENDOR,
        )
    return expression


class PerfectCorpProvider(VendorClient):
    """The :class:`~pipeline.providers.base.Provider` for Perfect Corp AI Smile.

    One attempt per call; never sleeps, never loops. ``acquire`` is awaited before
    every call to the API host (uploads, creates, polls, credit queries:
    docs/vendors.md, "Perfect Corp: rate limits"), never
    before the storage PUT or downloads. The session must carry no default headers.
    """

    vendor = VENDOR
    wire = VendorWire(
        auth_headers, build_poll, parse_poll, build_credits, parse_credits, envelope_error
    )
    # Set once the configured (or the feature) path answered 404 (docs/vendors.md,
    # "Perfect Corp: upload path"): the universal path is used from then on.
    _fallback_path: str | None = None

    @property
    def upload_path(self) -> str:
        """The upload path in use: configurable, by default the feature path; it
        switches to the universal one after a 404 and remembers."""
        return self._fallback_path or self._config.upload_path or FEATURE_UPLOAD_PATH

    async def _upload(self, image: ImagePayload) -> UploadTarget:
        path = self.upload_path
        resp = await self._call("upload", build_upload(image, path))
        if resp.status == 404 and path != UNIVERSAL_UPLOAD_PATH:
            # The feature path is gone (or never existed here): use the universal
            # file endpoint from now on.
            _log.warning(
                "perfectcorp: %s answered 404; using %s from now on", path, UNIVERSAL_UPLOAD_PATH
            )
            self._fallback_path = UNIVERSAL_UPLOAD_PATH
            resp = await self._call("upload", build_upload(image, UNIVERSAL_UPLOAD_PATH))
        return parse_upload(resp.status, resp.headers, resp.body)

    async def _put(self, target: UploadTarget, image: ImagePayload) -> None:
        """Step 2 through a pinned session: the presigned URL is vendor-supplied, so
        it is checked like a result URL (:mod:`pipeline.netguard`) and never
        redirected; no auth header travels with it."""
        request = build_put(target, image)
        try:
            checked = await self._guard.check(target.url)
        except PermanentError as exc:
            if exc.code != RESULT_URL_REFUSED:
                raise
            raise PermanentError(
                exc.message.replace("result URL refused", "upload URL refused"),
                code=_PUT_REFUSED,
                vendor=VENDOR,
            ) from None
        except (ResolveError, TimeoutError) as exc:
            raise transport_error(exc, f"PUT {safe_url(target.url)}", VENDOR) from exc
        self._stats.count(VENDOR, "put")
        async with guarded_session(api_timeout(self._timeouts)) as (session, resolver):
            resolver.pin(checked)
            # Step 2 of "Perfect Corp: upload": exactly the signed headers; no auth,
            # nothing added by aiohttp.
            resp = await send(
                session,
                request,
                target.url,
                vendor=VENDOR,
                client_timeout=api_timeout(self._timeouts),
                exact_headers=True,
                max_bytes=self._network.max_response_bytes,
            )
        parse_put(resp.status, resp.headers, resp.body, url=target.url)

    async def submit(
        self, operation: str, image: ImagePayload, params: VendorParams, files: ExtraFiles
    ) -> Submitted:
        expression = _expression_type(operation, params, files)
        with self._scrubbed():
            try:
                target = await self._upload(image)
                await self._put(target, image)
            except TransportError as exc:
                # Nothing billable was sent yet (the create is step 3): maybe_sent is
                # false whatever the network did. A failed PUT means redo both
                # (docs/vendors.md, "Perfect Corp: upload").
                raise TransportError(
                    exc.message,
                    code=exc.code if exc.code == "CONNECT_FAILED" else _PUT_FAILED,
                    vendor=VENDOR,
                    http_status=exc.http_status,
                    maybe_sent=False,
                ) from exc
            except ResponseTooLarge as exc:  # pragma: no cover - _call maps it
                raise RetryableError(exc.message, code=exc.code, vendor=VENDOR) from exc
        file_id = self._scrub(target.file_id)
        out = await self._billable(
            build_create_task(target.file_id, expression),
            lambda resp: parse_create_task(resp.status, resp.headers, resp.body),
            sync=False,
        )
        # Log every task id: a create retried after a timeout may duplicate
        # (docs/vendors.md, "Both vendors: no idempotency key").
        # Ids are scrubbed (no key, no URL query, clipped) before they are logged.
        _log.info(
            "perfectcorp %s: task_id=%s file_id=%s request_id=%s",
            operation,
            out.task_id,
            file_id,
            out.request_id,
        )
        return out
