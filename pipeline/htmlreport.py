"""``report.html``: the run as a person reads it, self-contained and offline.

One static page beside ``report.json`` and ``results.jsonl``: inline CSS, no script,
no font, nothing fetched from anywhere else, so it works from ``file://`` and keeps
working when the output folder is moved (every link is relative). A
Content-Security-Policy forbids scripts altogether, as a second line behind the
escaping.

It shows, top to bottom: the outcome in words with the exit code and wall time;
counts for this run (and for the folder, when ``report["folder_totals"]`` is given);
spend per vendor against ``max_credits``; errors grouped by code, each with what the
code means, what to do and a few example inputs; items paid for but lost; auto-fix
changes; rate-budget waits and 429s; a before/after gallery of local thumbnails
(:mod:`pipeline.thumbnails`).

Size is bounded whatever the run's size: the page holds at most
:data:`GALLERY_PAGE_SIZE` gallery cards, :data:`EXAMPLES_PER_CODE` examples per code,
:data:`MAX_CODE_GROUPS` code groups and :data:`MAX_LISTED` rows per list; the rest of
the gallery (up to ``gallery_max`` items) is in static pages ``reports/gallery-N.html``.
``results.jsonl`` is read once, streamed, in bounded memory.

Every run's page and report are kept as ``reports/run-<id>.html`` and
``reports/run-<id>.json``, pruned to the last ``reports_keep`` runs.

Everything shown is escaped (input names are hostile: ``<script>`` in a file name
renders as text), control and bidi-override characters are shown as escapes, and URL
query strings (presigned URLs carry signatures) and API keys are removed from every
vendor-supplied text.
"""

from __future__ import annotations

import contextlib
import html
import json
import math
import os
import re
import shlex
from collections import Counter
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path, PurePosixPath
from typing import Any
from urllib.parse import quote

from pipeline.operations import OPERATIONS
from pipeline.outputs import atomic_write_text
from pipeline.providers.classify import (
    AILAB_FATAL_CODES,
    AILAB_LOST_TASK_CODES,
    AILAB_PERMANENT_CODES,
    AILAB_RATE_LIMIT_CODES,
    AILAB_RETRYABLE_CODES,
    PERFECTCORP_ENGINE_PERMANENT_CODES,
    PERFECTCORP_ENGINE_RETRYABLE_CODES,
    PERFECTCORP_FATAL_CODES,
    PERFECTCORP_PERMANENT_CODES,
    PERFECTCORP_RETRYABLE_CODES,
)
from pipeline.thumbnails import DEFAULT_SIZE, ThumbnailCache, card_requests
from pipeline.vendors import VENDORS

__all__ = [
    "EXAMPLES_PER_CODE",
    "GALLERY_MAX",
    "GALLERY_PAGE_SIZE",
    "MAX_CODE_GROUPS",
    "MAX_LISTED",
    "REPORTS_DIR",
    "REPORT_HTML_NAME",
    "CodeHelp",
    "Collector",
    "archive_report_json",
    "build_html_for",
    "explain_ailab_code",
    "explain_code",
    "explain_perfectcorp_code",
    "iter_results",
    "outcome_text",
    "prune_reports",
    "write_html_report",
]

REPORT_HTML_NAME = "report.html"
REPORTS_DIR = "reports"
GALLERY_PAGE_SIZE = 200
# One page: thumbnails cost the end of a first run time (about 1 ms each).
GALLERY_MAX = 200
EXAMPLES_PER_CODE = 5
MAX_CODE_GROUPS = 50
MAX_LISTED = 100
_MAX_TEXT = 400  # characters of one vendor message shown
_VARIANTS_PER_EXAMPLE = 4

_RUN_FILE = re.compile(r"^run-(\d+)\.(?:json|html)$")
_GALLERY_FILE = re.compile(r"^gallery-(\d+)\.html$")


# --------------------------------------------------------------------------------------
# What each error code means and what to do about it
# --------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CodeHelp:
    """What an error code means (in the vendor's or the pipeline's words) and what to do."""

    meaning: str
    todo: str


_RERUN = "A plain rerun of the manifest retries it."
_RETRY_FAILED = (
    "It fails the same way if sent again as it is: fix the input or the params, then "
    "rerun with --retry-failed."
)
_KEY = "Check the API key in the environment variable the config names, then rerun to resume."

# The pipeline's own codes (DESIGN: TASK_DEADLINE, RESULT_NOT_IMAGE, RESULT_LOST,
# VENDOR_UNREACHABLE, DISK_FULL, INTERRUPTED are fixed by name).
_PIPELINE_CODES: dict[str, CodeHelp] = {
    "RESULT_LOST": CodeHelp(
        "The vendor finished the task and billed it, but its result could no longer be "
        "downloaded: the result URL expired or the vendor dropped the task.",
        "Paid for and lost. It is never resubmitted on its own; rerun with --retry-failed "
        "to make it again (that pays again).",
    ),
    "RESULT_NOT_IMAGE": CodeHelp(
        "The vendor billed a result that is not an acceptable image (HTML, text, empty, "
        "truncated, a decompression bomb or too large).",
        "Paid for. Not resubmitted on its own; rerun with --retry-failed to pay for it once "
        "more, and tell the vendor if it keeps happening.",
    ),
    "TASK_DEADLINE": CodeHelp(
        "The vendor's task was still running past providers.<vendor>.task_deadline_seconds.",
        "Rerun: polling resumes with the same task id (nothing is paid twice). Raise "
        "task_deadline_seconds if the vendor is just slow.",
    ),
    "DISK_FULL": CodeHelp(
        "The disk holding the output folder is full; the run stopped.",
        "Free some space and rerun: results already paid for are kept in the journal and "
        "stored by the rerun.",
    ),
    "VENDOR_UNREACHABLE": CodeHelp(
        "The vendor's API host could not be reached (refused connections, DNS or TLS "
        "failure, or a server error on every request); the run stopped.",
        "Check the network, proxy settings (HTTPS_PROXY, SSL_CERT_FILE) and the config's "
        "base_url; rerun when the host answers again.",
    ),
    "INTERRUPTED": CodeHelp(
        "The run stopped (Ctrl-C, a signal, or a fatal error) before this item finished.",
        "Rerun the manifest to resume; every finished step is in the journal.",
    ),
    "NOT_SENT": CodeHelp(
        "Not sent: the run was stopping because of a fatal error when this item's turn came.",
        "Fix the fatal error shown at the top, then rerun; this item is sent then.",
    ),
    "STORE_FAILED": CodeHelp(
        "A result that was paid for could not be written to the output folder (permissions, "
        "a name the filesystem refuses, something planted where a folder should be).",
        "Fix the output folder and rerun: the result is stored from the vendor, not paid again.",
    ),
    "OUTCOME_UNKNOWN": CodeHelp(
        "A request's outcome is unknown (it timed out or the connection dropped after it "
        "was sent), so the vendor may have billed it; it is resent at most once.",
        "Rerun to retry. Items like this are counted in possibly_billed in report.json; "
        "compare with the vendor's usage page if the count matters.",
    ),
    "RESULT_URL_REFUSED": CodeHelp(
        "The vendor's result URL was refused: not http(s), or a host on a private, "
        "loopback or link-local address.",
        "If the host is legitimate, list it in the config's network.allow_result_hosts and "
        "rerun (the result is fetched again, not paid again).",
    ),
    "RESULT_URL_EXPIRED": CodeHelp(
        "The result URL had expired or was refused when it was downloaded.",
        "The pipeline asks the vendor for a fresh URL; if that failed too, rerun.",
    ),
    "INPUT_UNREADABLE": CodeHelp(
        "The input file could not be read (permissions, a file that vanished, an I/O error).",
        "Check the file and rerun with --retry-failed.",
    ),
    "MAX_CREDITS": CodeHelp(
        "The manifest's max_credits cap for this vendor was reached, so no more items were sent.",
        "Raise max_credits in the manifest, or rerun later to continue under the same cap.",
    ),
    "REPEATED_REJECTION": CodeHelp(
        "Many items in a row were refused with the same parameter or file-type code: that "
        "points at the request or its params, not the inputs, so the run stopped.",
        "Check the operation's params in the manifest (pipeline ops lists them), then rerun.",
    ),
    "PREFLIGHT_UNREADABLE": CodeHelp(
        "The input is not a decodable image (damaged, truncated, or not an image at all); "
        "checked locally, nothing was sent.",
        "Re-export the file or remove it from the inputs.",
    ),
    "PREFLIGHT_FORMAT": CodeHelp(
        "The input's format is not one the operation accepts; checked locally, nothing was sent.",
        "Set auto_fix: true in the manifest to convert it, or convert it to JPEG or PNG.",
    ),
    "PREFLIGHT_FILE_SIZE": CodeHelp(
        "The input is larger than the operation's byte limit; checked locally, nothing was sent.",
        "Set auto_fix: true in the manifest to re-compress it, or shrink the file.",
    ),
    "PREFLIGHT_DIMENSIONS": CodeHelp(
        "The input has more pixels than the operation allows; checked locally, nothing was sent.",
        "Set auto_fix: true in the manifest to shrink it, or resize it.",
    ),
    "PREFLIGHT_TOO_SMALL": CodeHelp(
        "The input has fewer pixels than the operation needs; checked locally, nothing was sent.",
        "Use a larger photo (auto_fix never enlarges images).",
    ),
    "TIMEOUT": CodeHelp(
        "A request to the vendor timed out.",
        _RERUN + " Raise timeouts.request_seconds if the vendor is slow.",
    ),
    "NETWORK_ERROR": CodeHelp(
        "The connection to the vendor failed (reset, refused or dropped).",
        _RERUN + " Check the network if it happens to many items.",
    ),
    "EMPTY_RESULT": CodeHelp(
        "The vendor's result download was empty.", "Rerun; the pipeline asks for the result again."
    ),
    "INVALID_RESULT_URL": CodeHelp(
        "The vendor gave a result URL that cannot be fetched (not http or https).",
        "Rerun; if it persists, tell the vendor.",
    ),
    "MALFORMED_RESPONSE": CodeHelp(
        "The vendor's answer was not in the documented shape.",
        _RERUN + " If it persists, the vendor changed its API: report it.",
    ),
    "MISSING_RESULT": CodeHelp("The vendor said the task succeeded but gave no result.", _RERUN),
    "NO_RESULT": CodeHelp("The vendor said the task succeeded but gave no result.", _RERUN),
    "NO_TASK_ID": CodeHelp(
        "The vendor accepted the request but returned neither a task id nor a result.", _RERUN
    ),
    "TASK_FAILED": CodeHelp("The vendor reported that the task failed.", _RERUN),
    "TASK_ID_REUSED": CodeHelp(
        "The vendor answered the send with a task id it had already given another photo "
        '(docs/vendors.md, "Task ids given twice"); the result was not fetched for this one.',
        "The send may have been billed: check the vendor console, then rerun with "
        "--retry-failed to send it again.",
    ),
    "UNKNOWN_TASK_STATUS": CodeHelp(
        "The vendor reported a task status outside the documented ones.", _RERUN
    ),
    "UPLOAD_PUT_FAILED": CodeHelp(
        "Uploading the photo to the vendor's storage failed "
        '(docs/vendors.md, "Perfect Corp: upload").',
        _RERUN,
    ),
    "UPLOAD_SIZE_MISMATCH": CodeHelp(
        "The vendor's upload slot did not match the file being uploaded.", _RERUN
    ),
    "UNSUPPORTED_OPERATION": CodeHelp(
        "The provider does not support this operation.",
        "Check the op name in the manifest (pipeline ops lists them).",
    ),
    "CLIENT_UNKNOWN_PARAMETER": CodeHelp(
        "A param the operation does not take.", "Fix the params in the manifest."
    ),
    "CLIENT_MISSING_PARAMETER": CodeHelp(
        "A param the operation needs is missing.", "Fix the params in the manifest."
    ),
    "CLIENT_INVALID_PARAMETER": CodeHelp(
        "A param value the operation does not accept.",
        "Fix the params in the manifest (pipeline ops lists ranges and names).",
    ),
}

# AILabTools codes seen with these operations, in the vendor's words where it has
# them (docs/vendors.md, "AILab: error codes"). Other codes fall back to their class.
_AILAB_CODES: dict[str, CodeHelp] = {
    "ERROR_NO_FACE_IN_FILE": CodeHelp(
        "No face was detected in the photo.",
        "Use a photo with one clear, front-facing face; this one fails again as it is.",
    ),
    "ERROR_FACE_COUNT_INVALID": CodeHelp(
        "The photo has no face, or more faces than the operation takes.",
        "Use a photo with exactly one face.",
    ),
    "ERROR_LOW_RESOLUTION": CodeHelp("The photo's resolution is too low.", "Use a larger photo."),
    "FILE_DECODING_FAILURE": CodeHelp(
        "The vendor could not decode the file.",
        "Check that the file opens locally; re-save it as JPEG or PNG.",
    ),
    "FILE_SIZE_EXCEEDS_LIMIT": CodeHelp(
        "The file is larger than the vendor's limit (5 MB; 2 MB for Face Beauty Pro).",
        "Set auto_fix: true in the manifest, or shrink the file.",
    ),
    "FILE_RESOLUTION_EXCEEDS_LIMITS": CodeHelp(
        "The photo is 4096 px or more on a side.",
        "Set auto_fix: true in the manifest, or resize the photo.",
    ),
    "ERROR_HIGH_RESOLUTION": CodeHelp(
        "The photo's resolution is too high.", "Set auto_fix: true, or resize the photo."
    ),
    "ERROR_REQUEST_BODY_TOO_LARGE": CodeHelp(
        "The request was larger than the vendor accepts.", "Set auto_fix: true, or shrink the file."
    ),
    "UNSUPPORTED_FILE_TYPES": CodeHelp(
        "The file type is not accepted (JPEG and PNG are).",
        "Set auto_fix: true in the manifest, or convert the file to JPEG.",
    ),
    "ERROR_UNSUPPORTED_GRAYSCALE_IMAGE": CodeHelp(
        "Grayscale photos are not accepted.", "Convert the photo to colour (RGB)."
    ),
    "UNSUPPORTED_PARAMETER_VALUES": CodeHelp(
        "A parameter value is not accepted (an enum value the API does not know).",
        "Check the params in the manifest (pipeline ops lists the names).",
    ),
    "ERROR_INVALID_PARAMETER": CodeHelp(
        "A parameter is invalid.", "Check the params in the manifest (pipeline ops)."
    ),
    "MISSING_PARAMETERS": CodeHelp(
        "A required parameter is missing.",
        "This points at the request, not the input: report it with the example below.",
    ),
    "ERROR_USER_NOT_EXISTS": CodeHelp("The API key is not recognised.", _KEY),
    "ERROR_APPLICATIONS_NOT_EXISTS": CodeHelp("The API key's application does not exist.", _KEY),
    "ERROR_USER_LOCKED": CodeHelp(
        "The AILabTools account is locked.", "Contact AILabTools support, then rerun to resume."
    ),
    "ERROR_ILLEGAL_OPERATION": CodeHelp(
        "The account is not allowed to do this.", "Check the account in the AILabTools console."
    ),
    "ERROR_AI_NOT_EXISTS": CodeHelp(
        "The API does not exist or has been deactivated for this account (retired API).",
        "Check the vendor's notices and the account's enabled APIs.",
    ),
    "ERROR_INVALID_RESPONSE_FORMAT": CodeHelp(
        "The vendor refused the response format the client asked for.",
        "A client bug: report it.",
    ),
    "ERROR_NOT_ENOUGH_CREDITS": CodeHelp(
        "The AILabTools account is out of credits.", "Buy credits, then rerun to resume."
    ),
    "ERROR_FACE_TRACE_LIMIT_EXCEEDED": CodeHelp(
        "An account quota was exceeded.", "Check the account's quotas, then rerun."
    ),
    "ERROR_DATABASE_LIMIT_EXCEEDED": CodeHelp(
        "An account quota was exceeded.", "Check the account's quotas, then rerun."
    ),
    "EXCEEDING_LIMITS": CodeHelp(
        "Request or concurrency limits exceeded "
        '(a rate limit; docs/vendors.md, "AILab: rate limits").',
        _RERUN + " Lower the manifest's concurrency if it keeps happening.",
    ),
    "ERROR_BATCH_TASK_LIMIT_EXCEEDED": CodeHelp(
        "Too many tasks at once (a rate limit).",
        _RERUN + " Lower the manifest's concurrency if it keeps happening.",
    ),
    "AI_SERVICE_FLOW_RESTRICTION": CodeHelp(
        "The vendor's service is throttling requests (a rate limit).",
        _RERUN + " Lower the manifest's concurrency if it keeps happening.",
    ),
    "PROCESSING_FAILURE": CodeHelp("The vendor failed to process the photo.", _RERUN),
    "ERROR_RESPONSE_BODY_TOO_LARGE": CodeHelp(
        "The vendor's result would be too large.", "Use a smaller input photo."
    ),
    "ERROR_RESOURCE_NOT_FOUND": CodeHelp(
        "The vendor no longer knows the task (unknown or expired task id).",
        "If it had not finished, rerun to send it again (failures are not billed).",
    ),
    "ERROR_RESOURCE_RECLAIMED": CodeHelp(
        "The vendor has deleted the task and its result (kept 24 h).",
        "If it had not finished, rerun to send it again (failures are not billed).",
    ),
}

# Perfect Corp request-level and engine codes, lower case (docs/vendors.md,
# "Perfect Corp: error codes" and "Perfect Corp: engine error codes"; codes compare
# case-insensitively).
_PERFECTCORP_CODES: dict[str, CodeHelp] = {
    "invalidparameters": CodeHelp(
        "Invalid parameter value.", "Check the params in the manifest (pipeline ops)."
    ),
    "badrequest": CodeHelp(
        "Unexpected request parameter.",
        "This points at the request, not the input: report it with the example below.",
    ),
    "invalidtaskid": CodeHelp(
        "The task id is unknown, or the task expired because it was not polled in time "
        "(the consumed units may still be charged).",
        "Rerun with --retry-failed to send it again (that may pay again).",
    ),
    "creditinsufficiency": CodeHelp(
        "The Perfect Corp account is out of units.", "Buy units, then rerun to resume."
    ),
    "invalidapikey": CodeHelp("The API key is not recognised.", _KEY),
    "inactiveapikey": CodeHelp("The API key is inactive.", _KEY),
    "expiredapikey": CodeHelp("The API key has expired.", _KEY),
    "invalidaccesstoken": CodeHelp("The access token is not valid.", _KEY),
    "tasktimeout": CodeHelp("The vendor's task execution timed out.", _RERUN),
    "unknown_internal_error": CodeHelp("An unexpected internal error occurred.", _RERUN),
    "error_no_face": CodeHelp(
        "No face was detected in the provided image.",
        "Use a photo with one clear face; this one fails again as it is.",
    ),
    "error_multiple_people": CodeHelp(
        "The photo shows more than one person.", "Use a single-person photo."
    ),
    "error_pose": CodeHelp(
        "The head is turned or tilted too far.", "Use a photo facing the camera more directly."
    ),
    "error_large_face_angle": CodeHelp(
        "The face angle is too large.", "Use a photo facing the camera more directly."
    ),
    "error_face_parsing": CodeHelp(
        "The face could not be analysed.", "Use a clearer, well-lit photo of the face."
    ),
    "error_decode_image": CodeHelp(
        "The source image could not be decoded.",
        "Check that the file opens locally; re-save it as JPEG or PNG.",
    ),
    "error_exceed_max_image_size": CodeHelp(
        "The image's long side exceeds 4096 pixels.", "Set auto_fix: true, or resize it."
    ),
    "exceed_max_filesize": CodeHelp(
        "The input file exceeds the maximum allowed size (10 MB).",
        "Set auto_fix: true, or shrink the file.",
    ),
    "invalid_parameter": CodeHelp(
        "One or more required parameters are missing, empty, or improperly formatted.",
        "Check the params in the manifest (pipeline ops).",
    ),
    "error_nsfw_content_detected": CodeHelp(
        "The vendor flagged the photo as inappropriate content.", "Leave this photo out."
    ),
    "exceed_nsfw_retry_limits": CodeHelp(
        "The vendor flagged the photo as inappropriate content too often.",
        "Leave this photo out.",
    ),
    "error_download_image": CodeHelp("The source image could not be downloaded.", _RERUN),
    "error_inference": CodeHelp(
        "The inference process failed due to a workflow issue, execution error, encoding "
        "error, or missing output image.",
        _RERUN,
    ),
    "error_upload": CodeHelp("The vendor could not store its result.", _RERUN),
}

_HTTP_MEANINGS = {
    400: "the request was refused as invalid",
    401: "the API key was refused",
    403: "access was refused",
    404: "the vendor did not find what was asked for",
    413: "the request was too large",
    415: "the file type is not accepted",
    422: "the vendor could not use the input",
    429: "too many requests (a rate limit)",
}


def _humanize(code: str) -> str:
    words = code.strip().lower().replace("-", "_").split("_")
    if words and words[0] == "error":
        words = words[1:]
    return " ".join(w for w in words if w) or code


def _by_kind(vendor_name: str, code: str, kind: str) -> CodeHelp:
    what = _humanize(code)
    if kind == "fatal":
        return CodeHelp(
            f"{vendor_name} stopped the run: {what}.",
            "Nothing more can succeed until this is fixed (key, credits or account); "
            "fix it, then rerun to resume.",
        )
    if kind == "retryable":
        return CodeHelp(f"A temporary {vendor_name} problem: {what}.", _RERUN)
    return CodeHelp(f"{vendor_name} refused this input or request: {what}.", _RETRY_FAILED)


# A vendor's classification sets, in the order they are tried, with the kind each means.
_KindSets = tuple[tuple[frozenset[str], str], ...]
_AILAB_KINDS: _KindSets = (
    (AILAB_FATAL_CODES, "fatal"),
    (AILAB_RATE_LIMIT_CODES, "retryable"),
    (AILAB_LOST_TASK_CODES, "retryable"),
    (AILAB_RETRYABLE_CODES, "retryable"),
    (AILAB_PERMANENT_CODES, "permanent"),
)
_PERFECTCORP_KINDS: _KindSets = (
    (PERFECTCORP_FATAL_CODES, "fatal"),
    (PERFECTCORP_RETRYABLE_CODES, "retryable"),
    (PERFECTCORP_ENGINE_RETRYABLE_CODES, "retryable"),
    (PERFECTCORP_PERMANENT_CODES, "permanent"),
    (PERFECTCORP_ENGINE_PERMANENT_CODES, "permanent"),
)


def _explain_vendor_code(
    code: str, vendor_name: str, table: Mapping[str, CodeHelp], kinds: _KindSets
) -> CodeHelp | None:
    """The vendor's own help for ``code`` (already in the vendor's case), else the
    generic help for the kind its classification gives, else ``None``."""
    if code in table:
        return table[code]
    for codes, kind in kinds:
        if code in codes:
            return _by_kind(vendor_name, code, kind)
    return None


def explain_ailab_code(code: str, vendor_name: str) -> CodeHelp | None:
    """AILabTools' help for ``code`` (upper case), or ``None`` (its registry hook)."""
    return _explain_vendor_code(code.strip().upper(), vendor_name, _AILAB_CODES, _AILAB_KINDS)


def explain_perfectcorp_code(code: str, vendor_name: str) -> CodeHelp | None:
    """Perfect Corp's help for ``code`` (lower case), or ``None`` (its registry hook)."""
    lower = code.strip().lower()
    return _explain_vendor_code(lower, vendor_name, _PERFECTCORP_CODES, _PERFECTCORP_KINDS)


def explain_code(code: str, vendor: str | None = None) -> CodeHelp:
    """What ``code`` means and what to do about it; a generic line for unknown codes.

    ``vendor`` (a name of :data:`pipeline.vendors.VENDORS`, from the operation) picks
    the vendor's table when the same spelling could mean different things; without it
    every vendor's is tried, in registry order. Pipeline codes (``RESULT_LOST``,
    ``INPUT_*``, ``PREFLIGHT_*``...) come first.
    """
    code = code.strip()
    upper = code.upper()
    if code in _PIPELINE_CODES:
        return _PIPELINE_CODES[code]
    if upper.startswith("INPUT_"):
        return CodeHelp(
            f"The input can't be used as given: {_humanize(upper.removeprefix('INPUT_'))} "
            "(a FIFO, socket or device, a broken or looping symlink, an unreadable file); "
            "nothing was sent.",
            "Fix or remove the file; it is met again (and counted as carried over) on reruns.",
        )
    if upper.startswith("PREFLIGHT_"):
        return CodeHelp(
            f"The input failed a local check: {_humanize(upper.removeprefix('PREFLIGHT_'))}; "
            "nothing was sent.",
            "Set auto_fix: true in the manifest, or fix the file.",
        )
    # The vendor's own help (pipeline.vendors, ``explain``); every vendor's, in
    # registry order, when the operation (so the vendor) is not known.
    if vendor is None:
        specs = list(VENDORS.values())
    else:
        specs = [VENDORS[vendor]] if vendor in VENDORS else []
    for spec in specs:
        found = spec.explain_code(code)
        if found is not None:
            return found
    match = re.fullmatch(r"HTTP_(\d{3})", upper)
    if match:
        status = int(match.group(1))
        meaning = _HTTP_MEANINGS.get(status) or (
            "a server error on the vendor's side" if status >= 500 else "an unexpected answer"
        )
        todo = (
            _RERUN
            if status >= 500 or status == 429
            else (_KEY if status in (401, 403) else _RETRY_FAILED)
        )
        return CodeHelp(f"The vendor answered HTTP {status} without a code: {meaning}.", todo)
    return CodeHelp(
        "A code this report has no description for; the message of each example says more.",
        "Read the examples' messages. Retryable failures are retried by a plain rerun; "
        "others need --retry-failed once fixed.",
    )


# --------------------------------------------------------------------------------------
# Escaping and scrubbing
# --------------------------------------------------------------------------------------

# Control characters, bidi overrides/isolates and lone surrogates (a file name that
# is not valid UTF-8 arrives as surrogate escapes): shown as visible escapes so they
# can neither break the page's encoding nor reorder what a reader sees.
_INVISIBLE = re.compile(
    "[\x00-\x08\x0b-\x1f\x7f-\x9f\u200e\u200f\u202a-\u202e\u2066-\u2069\ud800-\udfff]"
)
_URL_QUERY = re.compile(r"(\b[A-Za-z][A-Za-z0-9+.\-]*://[^\s?#'\"<>]*)[?#][^\s'\"<>]*")
_MIN_SECRET = 8


def _show_invisible(match: re.Match[str]) -> str:
    ch = match.group(0)
    n = ord(ch)
    if 0xDC80 <= n <= 0xDCFF:  # surrogateescape of an undecodable byte
        return f"\\x{n - 0xDC00:02x}"
    return f"\\u{n:04x}"


def _secrets_from_env() -> list[str]:
    # Defence in depth: messages are scrubbed where they are made, but an API key that
    # slipped through must still never reach the page.
    return [
        v
        for k, v in os.environ.items()
        if k.upper().endswith(("API_KEY", "_SECRET", "_TOKEN")) and len(v) >= _MIN_SECRET
    ]


class _Text:
    """The one place text becomes HTML: scrub, make visible, escape."""

    def __init__(self, secrets: Iterable[str]) -> None:
        self.secrets = sorted({s for s in secrets if len(s) >= _MIN_SECRET}, key=len, reverse=True)

    def clean(self, value: object, limit: int | None = None) -> str:
        text = value if isinstance(value, str) else str(value)
        for secret in self.secrets:
            if secret in text:
                text = text.replace(secret, "***")
        if "://" in text:  # nothing else can hold a URL's query
            text = _URL_QUERY.sub(r"\1?…", text)
        if limit is not None and len(text) > limit:
            text = text[: limit - 1] + "…"
        # Every character _INVISIBLE finds is one str.isprintable refuses (categories
        # Cc, Cf, Cs): most texts need no regex pass (a gallery card makes 10 of them).
        return text if text.isprintable() else _INVISIBLE.sub(_show_invisible, text)

    def __call__(self, value: object, limit: int | None = None) -> str:
        return html.escape(self.clean(value, limit), quote=True)


def _href(prefix: str, rel: str) -> str:
    """A relative URL (percent-encoded, so ``:``, ``?``, ``#`` in names stay literal)."""
    try:
        # Undecodable bytes of a file name (surrogate escapes) become those bytes again.
        raw = rel.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = rel.encode("utf-8", "surrogatepass")
    return prefix + quote(raw, safe="/")


def _safe_rel(rel: str) -> str | None:
    """``rel`` if it is a plain relative path inside the output folder, else None."""
    if not rel or "\0" in rel:
        return None
    if "\\" not in rel:
        # Already in the form the check below gives back (the usual case): no empty,
        # "." or ".." component, so neither absolute nor climbing out.
        parts = rel.split("/")
        if "" not in parts and "." not in parts and ".." not in parts:
            return rel
    path = PurePosixPath(rel.replace("\\", "/"))
    if path.is_absolute() or any(p in ("..", "") for p in path.parts) or not path.parts:
        return None
    if path.parts[0] == ".":
        return None
    return path.as_posix()


# --------------------------------------------------------------------------------------
# Collecting what the page shows from results.jsonl, streamed
# --------------------------------------------------------------------------------------


def _vendor_of(operation: object) -> str:
    if isinstance(operation, str) and "/" in operation:
        return operation.split("/", 1)[0]
    spec = OPERATIONS.get(str(operation))
    return spec.vendor if spec else ""


@dataclass
class _Example:
    """One example input of an error group, with the variants that failed on it."""

    input_rel: str
    message: str
    carried_over: bool
    variants: list[str] = field(default_factory=list)
    more_variants: int = 0


@dataclass
class _Group:
    count: int = 0
    carried_over: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    vendors: Counter[str] = field(default_factory=Counter)
    examples: dict[str, _Example] = field(default_factory=dict)  # by input_rel
    example_lines: int = 0  # lines covered by the examples


@dataclass
class _GalleryItem:
    key: str | None
    input_rel: str
    input_path: str | None
    operation: str
    variant: str
    status: str
    output_rel: str | None
    input_thumb: str | None = None
    result_thumb: str | None = None
    card: str | None = None  # its card, the prefix left as _PREFIX_MARK (see _card)


@dataclass
class _Collected:
    lines: int = 0
    statuses: Counter[str] = field(default_factory=Counter)
    carried_over: int = 0
    kinds: Counter[str] = field(default_factory=Counter)
    groups: dict[str, _Group] = field(default_factory=dict)
    lost: list[dict[str, Any]] = field(default_factory=list)
    lost_total: int = 0
    lost_spend: dict[tuple[str, str], float] = field(default_factory=dict)
    changed: list[tuple[str, str, str, list[str]]] = field(default_factory=list)
    changed_total: int = 0
    gallery_new: list[_GalleryItem] = field(default_factory=list)
    gallery_old: list[_GalleryItem] = field(default_factory=list)
    with_result: int = 0


def _output_rel(line: Mapping[str, Any], output_dir: Path, resolved: Path) -> str | None:
    rel = line.get("output_rel")
    if isinstance(rel, str) and rel:
        return _safe_rel(rel)
    out = line.get("output")
    if not isinstance(out, str) or not out:
        return None
    path = Path(out)
    if not path.is_absolute():
        return _safe_rel(path.as_posix())
    for base in (resolved, output_dir):
        try:
            return _safe_rel(path.relative_to(base).as_posix())
        except ValueError:
            continue
    return None


def _str(value: object) -> str:
    return value if isinstance(value, str) else ("" if value is None else str(value))


@dataclass(frozen=True)
class _Row:
    """The fields of one ``results.jsonl`` line that the sections read."""

    status: str
    carried: bool
    operation: str
    variant: str
    input_rel: str
    key: str
    input_path: str | None
    task_id: str

    @classmethod
    def of(cls, line: Mapping[str, Any]) -> _Row:
        input_path = line.get("input")
        return cls(
            status=_str(line.get("status")) or "unknown",
            carried=bool(line.get("carried_over")),
            operation=_str(line.get("operation")),
            variant=_str(line.get("variant")),
            input_rel=_str(line.get("input_rel") or input_path),
            key=_str(line.get("key")),
            input_path=input_path if isinstance(input_path, str) else None,
            task_id=_str(line.get("task_id")),
        )


class Collector:
    """What the page shows, gathered one ``results.jsonl`` line at a time.

    :meth:`line` takes a parsed line; :meth:`add` takes its fields as the report
    build has them, so the run's own report is gathered while ``results.jsonl`` is
    written instead of parsing the file again (10^6 ``json.loads`` on a rerun of
    10^6 items). Both gather the same thing for the same line. Memory is bounded:
    counters, and at most ``gallery_max`` gallery items and ``MAX_LISTED`` examples.
    """

    def __init__(self, output_dir: Path, gallery_max: int = GALLERY_MAX) -> None:
        self.output_dir = Path(output_dir)
        self.resolved = self.output_dir.resolve()
        self.gallery_max = max(0, gallery_max)
        self.got = _Collected()

    def line(self, line: Mapping[str, Any]) -> None:
        """A parsed ``results.jsonl`` line."""
        if not isinstance(line, Mapping):
            return
        row = _Row.of(line)
        error = line.get("error")
        changes = line.get("changes")
        rel = None
        if row.status in ("succeeded", "skipped") and not line.get("duplicate_of"):
            rel = _output_rel(line, self.output_dir, self.resolved)
        self._add(
            row,
            error if isinstance(error, Mapping) else None,
            changes if isinstance(changes, list) else None,
            bool(line.get("duplicate_of")),
            rel,
        )

    def add(
        self,
        *,
        status: str,
        carried: bool,
        operation: str,
        variant: str,
        input_rel: str,
        input_path: str,
        key: str,
        output_rel: str | None,
        error: Mapping[str, Any] | None,
        changes: list[Any] | None,
        duplicate_of: str | None,
        task_id: str | None,
    ) -> None:
        """A line by its fields (those the report build writes)."""
        done = status == "skipped" or status == "succeeded"
        rel = _safe_rel(output_rel) if done and output_rel and not duplicate_of else None
        if done and error is None and not changes:
            # The line of almost every item of a rerun: once the gallery is full (or
            # with no result to show), counted and no more.
            got = self.got
            target = got.gallery_new if status == "succeeded" else got.gallery_old
            if rel is None or len(target) >= self.gallery_max:
                got.lines += 1
                got.statuses[status] += 1
                got.carried_over += carried
                got.with_result += rel is not None
                return
        row = _Row(
            status=status or "unknown",
            carried=carried,
            operation=operation,
            variant=variant,
            input_rel=input_rel or input_path,
            key=key,
            input_path=input_path,
            task_id=task_id or "",
        )
        self._add(row, error, changes, bool(duplicate_of), rel)

    def _add(
        self,
        row: _Row,
        error: Mapping[str, Any] | None,
        changes: list[Any] | None,
        duplicate: bool,
        rel: str | None,
    ) -> None:
        got = self.got
        got.lines += 1
        got.statuses[row.status] += 1
        got.carried_over += row.carried
        if error is not None and row.status != "succeeded":
            _add_error(got, row, error)
        if changes:
            got.changed_total += 1
            if len(got.changed) < MAX_LISTED:
                entry = (row.input_rel, row.operation, row.variant, [_str(c) for c in changes])
                got.changed.append(entry)
        if row.status in ("succeeded", "skipped") and not duplicate:
            _add_result(got, row, rel, self.gallery_max)


def _collect(
    results: Iterable[Mapping[str, Any]], output_dir: Path, gallery_max: int
) -> _Collected:
    collector = Collector(output_dir, gallery_max)
    for line in results:
        collector.line(line)
    return collector.got


def _add_error(got: _Collected, row: _Row, error: Mapping[str, Any]) -> None:
    """Count a line that carries an error in its code's group (and as lost if its
    result was paid for and lost)."""
    code = _str(error.get("code")) or "UNKNOWN"
    kind = _str(error.get("kind")) or "permanent"
    message = _str(error.get("message"))
    if row.status == "failed" and not row.carried:
        got.kinds[kind] += 1  # this run's failures, for the outcome's advice
    group = got.groups.get(code)
    if group is None:
        group = got.groups[code] = _Group()
    group.count += 1
    group.carried_over += row.carried
    group.kinds[kind] += 1
    group.vendors[_vendor_of(row.operation)] += 1
    # Examples are distinct inputs: one bad file failing in every variant is one
    # example, not five.
    example = group.examples.get(row.input_rel)
    if example is None and len(group.examples) < EXAMPLES_PER_CODE:
        example = group.examples[row.input_rel] = _Example(row.input_rel, message, row.carried)
    if example is not None:
        group.example_lines += 1
        if len(example.variants) < _VARIANTS_PER_EXAMPLE:
            example.variants.append(f"{row.operation} {row.variant}".strip())
        else:
            example.more_variants += 1
    if code in ("RESULT_LOST", "RESULT_NOT_IMAGE"):
        _add_lost(got, row, code, message)


def _add_lost(got: _Collected, row: _Row, code: str, message: str) -> None:
    got.lost_total += 1
    spec = OPERATIONS.get(row.operation)
    if spec is not None:
        unit = (spec.vendor, spec.price_unit)
        got.lost_spend[unit] = got.lost_spend.get(unit, 0.0) + spec.price
    if len(got.lost) < MAX_LISTED:
        got.lost.append(
            {
                "input_rel": row.input_rel,
                "operation": row.operation,
                "variant": row.variant,
                "task_id": row.task_id,
                "code": code,
                "message": message,
            }
        )


def _add_result(got: _Collected, row: _Row, rel: str | None, gallery_max: int) -> None:
    """A line with a result on disk: counted, and shown in the gallery while it has room
    (this run's results first, then the ones carried over)."""
    if rel is None:
        return
    got.with_result += 1
    target = got.gallery_new if row.status == "succeeded" else got.gallery_old
    if len(target) < gallery_max:
        target.append(
            _GalleryItem(
                key=row.key or None,
                input_rel=row.input_rel,
                input_path=row.input_path,
                operation=row.operation,
                variant=row.variant,
                status=row.status,
                output_rel=rel,
            )
        )


def _attach_thumbnails(items: Sequence[_GalleryItem], output_dir: Path, size: int) -> None:
    cache = ThumbnailCache(output_dir, size)
    cards = [
        card_requests(
            Path(item.input_path) if item.input_path else None,
            output_dir,
            item.output_rel,
            item.key,
        )
        for item in items
    ]
    made = cache.ensure(req for pair in cards for req in pair if req is not None)
    for item, (wanted_input, wanted_result) in zip(items, cards, strict=True):
        item.input_thumb = made.get(wanted_input.cache_key) if wanted_input else None
        item.result_thumb = made.get(wanted_result.cache_key) if wanted_result else None


# --------------------------------------------------------------------------------------
# Words
# --------------------------------------------------------------------------------------


def _n(value: object) -> int:
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, int):
        return value
    if isinstance(value, float) and math.isfinite(value):
        return int(value)
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n:,} {word}" + ("" if n == 1 else "s")


def _were(n: int) -> str:
    return "was" if n == 1 else "were"


def _num(value: float) -> str:
    return f"{value:,.0f}" if float(value).is_integer() else f"{value:,.2f}"


def _duration(seconds: object) -> str:
    if not isinstance(seconds, int | float) or isinstance(seconds, bool):
        return "unknown"
    s = float(seconds)
    if not math.isfinite(s) or s < 0:
        return "unknown"
    if s < 60:
        return f"{s:.1f} s"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def _when(ts: object) -> str:
    if not isinstance(ts, int | float) or isinstance(ts, bool) or not math.isfinite(ts):
        return "unknown"
    try:
        return datetime.fromtimestamp(ts).astimezone().isoformat(sep=" ", timespec="seconds")
    except (OverflowError, OSError, ValueError):
        return "unknown"


def _counts(report: Mapping[str, Any], got: _Collected | None = None) -> dict[str, int]:
    raw = report.get("counts")
    counts = raw if isinstance(raw, Mapping) else {}
    out: dict[str, int] = {}
    for name in ("succeeded", "failed", "failed_earlier", "skipped", "interrupted", "total"):
        if name in counts:
            out[name] = _n(counts[name])
        elif got is not None:
            # Older reports lack the newer keys: derive them from the result lines.
            if name == "failed_earlier":
                out[name] = got.carried_over
            elif name == "total":
                out[name] = got.lines
            else:
                out[name] = got.statuses.get(name, 0)
        else:
            out[name] = 0
    return out


def outcome_text(
    report: Mapping[str, Any], kinds: Mapping[str, int] | None = None
) -> tuple[str, str]:
    """The run's outcome in words, and its class (``ok``, ``failed``, ``stopped``,
    ``interrupted``): "All 12 items succeeded", "3 items failed; rerun with ...",
    "Interrupted: rerun to resume". ``kinds`` counts this run's failures by kind."""
    counts = _counts(report)
    manifest = report.get("manifest")
    command = (
        f"pipeline run {shlex.quote(manifest)}" if isinstance(manifest, str) else "pipeline run"
    )
    failed, earlier = counts["failed"], counts["failed_earlier"]
    if report.get("interrupted") or report.get("exit_code") == 130:
        left = counts["interrupted"]
        extra = f" ({_plural(left, 'item')} not finished)" if left else ""
        return "interrupted", f"Interrupted: rerun to resume{extra}: {command}"
    aborted = report.get("aborted")
    if isinstance(aborted, Mapping) or report.get("exit_code") == 3:
        code = _str(aborted.get("code")) if isinstance(aborted, Mapping) else ""
        msg = _str(aborted.get("message")) if isinstance(aborted, Mapping) else ""
        why = f" ({code}: {msg})" if code or msg else ""
        return "stopped", f"Stopped early{why}; fix that, then rerun to resume: {command}"
    if failed:
        kinds = kinds or {}
        retryable = _n(kinds.get("retryable", 0))
        permanent = max(0, failed - retryable)
        head = f"{_plural(failed, 'item')} failed"
        if permanent and retryable:
            return "failed", (
                f"{head}; rerun with {command} to retry {retryable:,}, and add --retry-failed "
                f"for the other {permanent:,} once fixed (see Errors)"
            )
        if retryable:
            return "failed", f"{head}; rerun with {command} to retry them"
        return "failed", f"{head}; rerun with {command} --retry-failed once fixed (see Errors)"
    total = counts["total"]
    if total == 0:
        return "ok", "Nothing to do: no items in this run"
    done = counts["succeeded"] + counts["skipped"]
    if earlier:
        return "ok", (
            f"No new failures: {done:,} of {total:,} items done; {_plural(earlier, 'item')} "
            f"failed in earlier runs (rerun with {command} --retry-failed to retry them)"
        )
    if counts["skipped"] == total:
        return "ok", f"All {_plural(total, 'item')} {_were(total)} already done (nothing sent)"
    if counts["skipped"]:
        return "ok", (
            f"All {_plural(total, 'item')} succeeded ({counts['succeeded']:,} new, "
            f"{counts['skipped']:,} already done)"
        )
    return "ok", f"All {_plural(total, 'item')} succeeded"


# --------------------------------------------------------------------------------------
# HTML
# --------------------------------------------------------------------------------------

_CSS = """
:root{color-scheme:light dark;--fg:#1b1f24;--bg:#fff;--muted:#5b6570;--line:#d5dbe1;
--ok:#1a7f37;--bad:#c62828;--warn:#9a6700;--card:#f6f8fa}
@media (prefers-color-scheme:dark){:root{--fg:#e6edf3;--bg:#0d1117;--muted:#9aa5b1;
--line:#30363d;--ok:#3fb950;--bad:#f85149;--warn:#d29922;--card:#161b22}}
*{box-sizing:border-box}
body{margin:0 auto;max-width:1200px;padding:1rem 1.5rem 3rem;font:15px/1.45 system-ui,
-apple-system,"Segoe UI",Roboto,sans-serif;color:var(--fg);background:var(--bg)}
h1{font-size:1.5rem;margin:.5rem 0}h2{font-size:1.2rem;margin:2rem 0 .5rem;
border-bottom:1px solid var(--line);padding-bottom:.25rem}h3{font-size:1rem;margin:0}
.outcome{padding:.75rem 1rem;border-left:6px solid var(--ok);background:var(--card)}
.outcome.failed,.outcome.stopped{border-color:var(--bad)}
.outcome.interrupted{border-color:var(--warn)}
.meta{color:var(--muted);margin:.25rem 0}
nav a{margin-right:1rem}
table{border-collapse:collapse;margin:.5rem 0}
th,td{border:1px solid var(--line);padding:.25rem .6rem;text-align:left;vertical-align:top}
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums}
code,.mono{font-family:ui-monospace,SFMono-Regular,Menlo,Consolas,monospace;font-size:.9em;
overflow-wrap:anywhere}
.group{border:1px solid var(--line);border-radius:6px;padding:.6rem .9rem;margin:.6rem 0}
.group ul{margin:.3rem 0;padding-left:1.2rem}.group li{margin:.15rem 0}
.muted{color:var(--muted)}
.gallery{display:flex;flex-wrap:wrap;gap:12px}
.card{margin:0;width:340px;border:1px solid var(--line);border-radius:6px;padding:6px;
background:var(--card)}
.pair{display:flex;gap:6px}
.pair img,.pair .none{width:160px;height:160px;object-fit:contain;background:#8882;
display:flex;align-items:center;justify-content:center;color:var(--muted);font-size:.8em}
.card figcaption{font-size:.8em;overflow-wrap:anywhere;margin-top:4px}
.pages a,.pages strong{margin-right:.5rem}
meter{width:12rem}
"""

_CSP = (
    "default-src 'none'; img-src 'self' file: data:; style-src 'unsafe-inline'; "
    "script-src 'none'; base-uri 'none'; form-action 'none'"
)


def _head(t: _Text, title: str) -> str:
    return (
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">\n'
        f'<meta http-equiv="Content-Security-Policy" content="{_CSP}">\n'
        '<meta name="referrer" content="no-referrer">\n'
        '<meta name="viewport" content="width=device-width, initial-scale=1">\n'
        f"<title>{t(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
    )


def _table(
    t: _Text, header: Sequence[str], rows: Iterable[Sequence[object]], numeric: set[int]
) -> str:
    num = ' class="n"'
    parts = ["<table><thead><tr>"]
    for i, h in enumerate(header):
        parts.append(f"<th{num if i in numeric else ''}>{t(h)}</th>")
    parts.append("</tr></thead><tbody>")
    for row in rows:
        parts.append("<tr>")
        for i, cell in enumerate(row):
            text = f"{cell:,}" if isinstance(cell, int) and not isinstance(cell, bool) else cell
            parts.append(f"<td{num if i in numeric else ''}>{t(text, _MAX_TEXT)}</td>")
        parts.append("</tr>")
    parts.append("</tbody></table>")
    return "".join(parts)


_COUNT_LABELS = {
    "succeeded": "Succeeded",
    "failed": "Failed in this run",
    "failed_earlier": "Failed in earlier runs (not retried)",
    "skipped": "Skipped (already done)",
    "interrupted": "Not finished (interrupted)",
    "total": "Total",
}


def _section_counts(t: _Text, report: Mapping[str, Any], got: _Collected) -> str:
    counts = _counts(report, got)
    totals_raw = report.get("folder_totals")
    totals = totals_raw if isinstance(totals_raw, Mapping) else None
    header = ["", "This run"] + (["Folder (all items ever)"] if totals is not None else [])
    names = list(_COUNT_LABELS)
    if totals is not None:
        names += [k for k in totals if isinstance(k, str) and k not in _COUNT_LABELS]
    rows: list[list[object]] = []
    for name in names:
        label = _COUNT_LABELS.get(name, name.replace("_", " ").capitalize())
        row: list[object] = [label, counts.get(name, "")]
        if totals is not None:
            row.append(_n(totals[name]) if name in totals else "")
        rows.append(row)
    parts = [
        '<section id="counts"><h2>Counts</h2>',
        _table(t, header, rows, {1, 2}),
    ]
    dupes = _n(report.get("duplicates_skipped"))
    if dupes:
        parts.append(
            f'<p class="muted">{t(_plural(dupes, "input"))} had the same content as another '
            "input and share its result.</p>"
        )
    by_op = report.get("by_operation")
    if isinstance(by_op, Mapping) and by_op:
        cols = ["succeeded", "failed", "failed_earlier", "skipped", "interrupted", "total"]
        op_rows = []
        for op, c in by_op.items():
            c = c if isinstance(c, Mapping) else {}
            op_rows.append([str(op), *[_n(c.get(k, 0)) for k in cols]])
        parts.append("<h3>By operation</h3>")
        parts.append(
            _table(
                t,
                ["Operation", "Succeeded", "Failed", "Failed earlier", "Skipped",
                 "Not finished", "Total"],
                op_rows,
                {1, 2, 3, 4, 5, 6},
            )
        )  # fmt: skip
    parts.append("</section>")
    return "".join(parts)


def _section_spend(t: _Text, report: Mapping[str, Any]) -> str:
    spent_raw = report.get("credits_spent")
    spent = spent_raw if isinstance(spent_raw, Mapping) else {}
    caps_raw = report.get("max_credits")
    caps = caps_raw if isinstance(caps_raw, Mapping) else {}
    vendors = sorted({str(v) for v in spent} | {str(v) for v in caps})
    parts = ['<section id="spend"><h2>Spend</h2>']
    if not vendors:
        parts.append("<p>Nothing was spent in this run.</p></section>")
        return "".join(parts)
    parts.append(
        '<table><thead><tr><th>Vendor</th><th class="n">Spent this run</th>'
        '<th class="n">max_credits</th><th>Share of the cap</th></tr></thead><tbody>'
    )
    for vendor in vendors:
        entry = spent.get(vendor)
        spec = VENDORS.get(vendor)
        amount = 0.0
        unit: str = spec.price_unit if spec is not None else "credits"
        if isinstance(entry, Mapping):
            value = entry.get("amount", 0)
            amount = float(value) if isinstance(value, int | float) else 0.0
            unit = _str(entry.get("unit")) or unit
        elif isinstance(entry, int | float):
            amount = float(entry)
        cap = caps.get(vendor)
        if isinstance(cap, int | float) and not isinstance(cap, bool):
            share = amount / cap if cap > 0 else 1.0
            cap_text = f"{_num(float(cap))} {unit}"
            bar = (
                f'<meter min="0" max="1" value="{min(1.0, share):.4f}" high="0.9">'
                f"{share:.0%}</meter> {t(f'{share:.0%}')}"
            )
        else:
            cap_text, bar = "not set", '<span class="muted">no cap</span>'
        parts.append(
            f'<tr><td>{t(vendor)}</td><td class="n">{t(f"{_num(amount)} {unit}")}</td>'
            f'<td class="n">{t(cap_text)}</td><td>{bar}</td></tr>'
        )
    parts.append("</tbody></table>")
    possibly = report.get("possibly_billed")
    n_possibly = _n(possibly) if not isinstance(possibly, list) else len(possibly)
    if n_possibly:
        parts.append(
            f"<p>{t(_plural(n_possibly, 'send'))} had an unknown outcome and may have been "
            "billed too (possibly_billed in report.json).</p>"
        )
    parts.append(
        '<p class="muted">As the vendors bill: successes only, including results that '
        "were paid for and then lost.</p></section>"
    )
    return "".join(parts)


def _by_count(counter: Counter[str]) -> list[str]:
    """Most common first, ties by name: the same folder always gives the same page."""
    return [k for k, _ in sorted(counter.items(), key=lambda kv: (-kv[1], kv[0]))]


def _section_errors(t: _Text, got: _Collected) -> str:
    parts = ['<section id="errors"><h2>Errors by code</h2>']
    if not got.groups:
        parts.append("<p>No errors.</p></section>")
        return "".join(parts)
    groups = sorted(got.groups.items(), key=lambda kv: (-kv[1].count, kv[0]))
    for code, group in groups[:MAX_CODE_GROUPS]:
        vendors = [v for v in _by_count(group.vendors) if v]
        vendor = vendors[0] if len(vendors) == 1 else None
        helptext = explain_code(code, vendor)
        kinds = ", ".join(_by_count(group.kinds))
        carried = f", {group.carried_over:,} from earlier runs" if group.carried_over else ""
        parts.append(
            f'<div class="group" data-code="{t(code)}"><h3><code>{t(code)}</code> · '
            f"{t(_plural(group.count, 'item'))}{t(carried)} · {t(kinds)}"
            f"{t(' · ' + ', '.join(vendors)) if vendors else ''}</h3>"
            f"<p><strong>Meaning:</strong> {t(helptext.meaning)}</p>"
            f"<p><strong>What to do:</strong> {t(helptext.todo)}</p>"
            "<p>Examples:</p><ul>"
        )
        for ex in group.examples.values():
            tag = " (earlier run)" if ex.carried_over else ""
            variants = ", ".join(sorted(ex.variants))  # results.jsonl order varies by run
            if ex.more_variants:
                variants += f" and {ex.more_variants:,} more"
            parts.append(
                f'<li><span class="mono">{t(ex.input_rel)}</span> · {t(variants)}{t(tag)}'
                f'<br><span class="muted">{t(ex.message, _MAX_TEXT)}</span></li>'
            )
        if group.count > group.example_lines:
            parts.append(f"<li class=\"muted\">and {group.count - group.example_lines:,} more "
                         "(results.jsonl has them all)</li>")  # fmt: skip
        parts.append("</ul></div>")
    rest = groups[MAX_CODE_GROUPS:]
    if rest:
        shown = ", ".join(f"{code} ({g.count:,})" for code, g in rest[:MAX_LISTED])
        more = f" and {len(rest) - MAX_LISTED:,} more codes" if len(rest) > MAX_LISTED else ""
        parts.append(f"<p>Other codes: {t(shown + more)}</p>")
    parts.append("</section>")
    return "".join(parts)


def _section_lost(t: _Text, report: Mapping[str, Any], got: _Collected) -> str:
    parts = ['<section id="paid-lost"><h2>Paid for but lost</h2>']
    reported = report.get("paid_lost")
    n_reported = len(reported) if isinstance(reported, list) else _n(reported)
    total = max(got.lost_total, n_reported)
    if not total:
        parts.append("<p>None: every result that was paid for is stored.</p></section>")
        return "".join(parts)
    spend = ", ".join(
        f"{_num(amount)} {unit} ({vendor})"
        for (vendor, unit), amount in sorted(got.lost_spend.items())
    )
    parts.append(
        f"<p>{t(_plural(total, 'item'))} {_were(total)} billed by the vendor but their results could "
        f"not be kept{t(f' (about {spend})') if spend else ''}. They are never resubmitted on "
        "their own: --retry-failed makes them again, and pays again.</p>"
    )
    if got.lost:
        rows = [
            [x["input_rel"], x["operation"], x["variant"], x["task_id"], x["code"],
             x["message"]]
            for x in got.lost
        ]  # fmt: skip
        parts.append(
            _table(t, ["Input", "Operation", "Variant", "Task id", "Code", "Message"], rows, set())
        )
        if got.lost_total > len(got.lost):
            parts.append(f"<p class=\"muted\">and {got.lost_total - len(got.lost):,} more in "
                         "results.jsonl</p>")  # fmt: skip
    parts.append("</section>")
    return "".join(parts)


def _section_changes(t: _Text, report: Mapping[str, Any], got: _Collected) -> str:
    parts = ['<section id="auto-fix"><h2>Auto-fix changes</h2>']
    total = max(got.changed_total, _n(report.get("auto_fixed")))
    if not total:
        parts.append("<p>No input was changed before sending.</p></section>")
        return "".join(parts)
    parts.append(
        f"<p>{t(_plural(total, 'input'))} {_were(total)} converted, shrunk or turned upright before "
        "sending (auto_fix); the originals are untouched.</p>"
    )
    rows = [[inp, op, var, "; ".join(ch)] for inp, op, var, ch in got.changed]
    parts.append(_table(t, ["Input", "Operation", "Variant", "Changes"], rows, set()))
    if got.changed_total > len(got.changed):
        parts.append(f"<p class=\"muted\">and {got.changed_total - len(got.changed):,} more in "
                     "results.jsonl</p>")  # fmt: skip
    parts.append("</section>")
    return "".join(parts)


def _section_rate(t: _Text, report: Mapping[str, Any]) -> str:
    parts = ['<section id="rate"><h2>Rate budget</h2>']
    budget_raw = report.get("rate_budget")
    budget = budget_raw if isinstance(budget_raw, Mapping) else {}
    requests_raw = report.get("requests")
    requests = requests_raw if isinstance(requests_raw, Mapping) else {}
    vendors = sorted({str(v) for v in budget} | {str(v) for v in requests})
    if not vendors:
        parts.append("<p>No requests were sent.</p></section>")
        return "".join(parts)

    def fmt(value: object, suffix: str = "") -> str:
        if value is None or isinstance(value, bool):
            return "-"
        if isinstance(value, int):
            return f"{value:,}{suffix}"
        if isinstance(value, float):
            return f"{value:,.3g}{suffix}" if value < 100 else f"{value:,.0f}{suffix}"
        return str(value)

    rows = []
    for vendor in vendors:
        b = budget.get(vendor)
        b = b if isinstance(b, Mapping) else {}
        r = requests.get(vendor)
        by_kind = (
            ", ".join(f"{k} {_n(v):,}" for k, v in sorted(r.items()))
            if isinstance(r, Mapping)
            else ""
        )
        rows.append(
            [
                vendor,
                fmt(b.get("sent")),
                fmt(b.get("waited_seconds"), " s"),
                fmt(b.get("rate_limited_answers")),
                fmt(b.get("rate_decreases")),
                fmt(b.get("lowest_rate"), "/s"),
                by_kind or "-",
            ]
        )
    parts.append(
        _table(
            t,
            ["Vendor", "Sent", "Waited for the budget", "429s (rate-limit answers)",
             "Rate cuts", "Lowest rate", "Requests by kind"],
            rows,
            {1, 2, 3, 4, 5},
        )
    )  # fmt: skip
    parts.append(
        '<p class="muted">Waits are time spent holding requests back to stay inside the '
        "vendor's budget; rate-limit answers (429, or AILabTools' flow restriction) slow the "
        "client down and do not use up an item's attempts.</p></section>"
    )
    return "".join(parts)


# Stands for the prefix in a card's template: never in text that went through _Text
# (which shows control characters as escapes) or a percent-encoded href.
_PREFIX_MARK = "\x00"


def _card(t: _Text, item: _GalleryItem, prefix: str) -> str:
    """One gallery card, its links relative to ``prefix``. Made once per item: the
    main page, its archived copy and the gallery pages differ only by the prefix."""
    if item.card is None:
        item.card = _card_template(t, item)
    return item.card.replace(_PREFIX_MARK, prefix)


def _card_template(t: _Text, item: _GalleryItem) -> str:
    # t(prefix + href) is prefix + t(href): a prefix ("", "../") holds nothing to scrub,
    # escape or show, and a percent-encoded href no "://" to join it.
    def img(rel: str | None, alt: str, link: str | None) -> str:
        if rel is None:
            return f'<span class="none">no preview ({t(alt)})</span>'
        tag = (
            f'<img src="{_PREFIX_MARK}{t(_href("", rel))}" alt="{t(alt)}" width="160" '
            'height="160" loading="lazy" decoding="async">'
        )
        return f'<a href="{link}">{tag}</a>' if link else tag

    input_link = None
    if item.input_path and os.path.isabs(item.input_path):
        try:
            input_link = t(Path(item.input_path).as_uri())
        except ValueError:
            input_link = None
    result_link = _PREFIX_MARK + t(_href("", item.output_rel)) if item.output_rel else None
    status = "" if item.status == "succeeded" else " · done earlier"
    return (
        '<figure class="card"><div class="pair">'
        f"{img(item.input_thumb, 'before', input_link)}"
        f"{img(item.result_thumb, 'after', result_link)}</div>"
        f'<figcaption><span class="mono">{t(item.input_rel)}</span><br>'
        f"{t(item.operation)} · {t(item.variant)}{t(status)}</figcaption></figure>"
    )


def _pages_nav(t: _Text, pages: int, current: int | None, prefix: str) -> str:
    links = []
    for n in range(1, pages + 1):
        if n == current:
            links.append(f"<strong>{n}</strong>")
        else:
            links.append(f'<a href="{t(_href(prefix, f"gallery-{n}.html"))}">{n}</a>')
    return f'<p class="pages">Pages: {" ".join(links)}</p>'


@dataclass(frozen=True)
class _Layout:
    """Where a main page stands: ``prefix`` leads from it to the output folder;
    ``pages_prefix`` to the gallery pages, ``None`` in an archived copy (which points
    to the latest report instead); the gallery shows ``page_size`` items a page."""

    prefix: str
    page_size: int
    pages_prefix: str | None


def _section_gallery(
    t: _Text, got: _Collected, gallery: Sequence[_GalleryItem], layout: _Layout
) -> str:
    prefix, page_size, pages_prefix = layout.prefix, layout.page_size, layout.pages_prefix
    parts = ['<section id="gallery"><h2>Before and after</h2>']
    if not gallery:
        parts.append("<p>No results to show.</p></section>")
        return "".join(parts)
    shown = gallery[:page_size]
    pages = math.ceil(len(gallery) / page_size)
    beyond = got.with_result - len(gallery)
    note = f"Showing {len(shown):,} of {_plural(got.with_result, 'result')}"
    if got.gallery_new and got.gallery_old:
        note += " (this run's new results first)"
    if beyond > 0:
        note += f"; the gallery keeps the first {len(gallery):,}, the rest are in the folder"
    parts.append(f"<p>{t(note)}. Click a thumbnail to open the full image.</p>")
    if pages > 1 and pages_prefix is not None:
        parts.append(_pages_nav(t, pages, None, pages_prefix))
    elif pages > 1:
        parts.append(
            f'<p class="muted">More pages: see the <a href="{t(_href("../", REPORT_HTML_NAME))}">'
            "latest report</a>.</p>"
        )
    parts.append('<div class="gallery">')
    parts.extend(_card(t, item, prefix) for item in shown)
    parts.append("</div></section>")
    return "".join(parts)


def _render_main(
    t: _Text,
    report: Mapping[str, Any],
    got: _Collected,
    gallery: Sequence[_GalleryItem],
    layout: _Layout,
) -> str:
    prefix = layout.prefix
    cls, outcome = outcome_text(report, got.kinds)
    run_id = report.get("run_id")
    exit_code = report.get("exit_code")
    meta = [
        f"Exit code {exit_code if isinstance(exit_code, int) else 'unknown'}",
        f"wall time {_duration(report.get('wall_time_seconds'))}",
        f"run {run_id if run_id is not None else '-'}",
        f"started {_when(report.get('started_at'))}",
    ]
    manifest = report.get("manifest")
    parts = [
        _head(t, f"Run {run_id if run_id is not None else '-'}: {outcome}"),
        f'<header><h1 class="outcome {cls}" id="outcome">{t(outcome)}</h1>',
        f'<p class="meta" id="meta">{t(" · ".join(meta))}</p>',
    ]
    if isinstance(manifest, str):
        parts.append(f'<p class="meta">Manifest <span class="mono">{t(manifest)}</span></p>')
    parts.append(
        '</header><nav><a href="#counts">Counts</a><a href="#spend">Spend</a>'
        '<a href="#errors">Errors</a><a href="#paid-lost">Paid but lost</a>'
        '<a href="#auto-fix">Auto-fix</a><a href="#rate">Rate budget</a>'
        '<a href="#gallery">Gallery</a></nav>'
    )
    parts.append(_section_counts(t, report, got))
    parts.append(_section_spend(t, report))
    parts.append(_section_errors(t, got))
    parts.append(_section_lost(t, report, got))
    parts.append(_section_changes(t, report, got))
    parts.append(_section_rate(t, report))
    parts.append(_section_gallery(t, got, gallery, layout))
    parts.append(
        f'<footer><p class="muted">Built from <a href="{t(_href(prefix, "report.json"))}">'
        f'report.json</a> and <a href="{t(_href(prefix, "results.jsonl"))}">results.jsonl'
        f'</a>; earlier runs are in <a href="{t(_href(prefix, REPORTS_DIR + "/"))}">'
        f"{REPORTS_DIR}/</a>.</p></footer>\n</body>\n</html>\n"
    )
    return "".join(parts)


def _render_gallery_page(
    t: _Text, report: Mapping[str, Any], items: Sequence[_GalleryItem], page: int, pages: int
) -> str:
    run_id = report.get("run_id")
    title = f"Run {run_id if run_id is not None else '-'}: gallery page {page} of {pages}"
    parts = [
        _head(t, title),
        f"<h1>{t(title)}</h1>",
        f'<p><a href="{t(_href("../", REPORT_HTML_NAME))}">Back to the report</a></p>',
        _pages_nav(t, pages, page, ""),
        '<div class="gallery">',
        *(_card(t, item, "../") for item in items),
        "</div>",
        _pages_nav(t, pages, page, ""),
        "\n</body>\n</html>\n",
    ]
    return "".join(parts)


# --------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------


def write_html_report(
    output_dir: Path,
    report: dict[str, Any],
    results: Iterable[dict[str, Any]],
    *,
    reports_keep: int = 30,
    gallery_max: int = GALLERY_MAX,
    page_size: int = GALLERY_PAGE_SIZE,
    thumb_size: int = DEFAULT_SIZE,
    secrets: Iterable[str] = (),
    collected: Collector | None = None,
    archive_json: bool = True,
) -> Path:
    """Write ``report.html`` and this run's copies under ``reports/``; return its path.

    ``archive_json=False``: not ``reports/run-<id>.json``; the caller writes it with
    :func:`archive_report_json` (a run ending: once its wall time is final).

    ``report`` is the dict written to ``report.json`` (optionally with
    ``folder_totals`` and ``max_credits``); ``results`` the ``results.jsonl`` lines,
    streamed once. Thumbnails are made (or found) for up to ``gallery_max`` results;
    pages beyond the first go to ``reports/gallery-N.html``. ``reports/run-<id>.json``
    and ``reports/run-<id>.html`` are kept for the last ``reports_keep`` runs.
    ``secrets`` (API keys) are scrubbed from every text, on top of any key found in
    environment variables named ``*API_KEY``. ``collected``: the lines already
    gathered (a :class:`Collector` fed while ``results.jsonl`` was written); then
    ``results`` is not read and the collector's ``gallery_max`` applies.
    Synchronous: run it in a worker thread from async code. Raises ``OSError`` if
    the folder cannot be written.
    """
    output_dir = Path(output_dir)
    t = _Text([*secrets, *_secrets_from_env()])
    page_size = max(1, page_size)
    gallery_max = max(0, gallery_max)
    if collected is not None:
        got = collected.got
        gallery_max = collected.gallery_max
    else:
        got = _collect(results, output_dir, gallery_max)
    gallery = (got.gallery_new + got.gallery_old)[:gallery_max]
    _attach_thumbnails(gallery, output_dir, thumb_size)
    pages = math.ceil(len(gallery) / page_size) if gallery else 0
    reports_dir = output_dir / REPORTS_DIR

    page = _render_main(t, report, got, gallery, _Layout("", page_size, f"{REPORTS_DIR}/"))
    target = output_dir / REPORT_HTML_NAME
    atomic_write_text(target, page)

    if pages > 1:
        for n in range(1, pages + 1):
            chunk = gallery[(n - 1) * page_size : n * page_size]
            atomic_write_text(
                reports_dir / f"gallery-{n}.html",
                _render_gallery_page(t, report, chunk, n, pages),
                root=output_dir,
            )
    _remove_stale_gallery_pages(reports_dir, pages if pages > 1 else 0)

    run_id = report.get("run_id")
    if isinstance(run_id, int) and not isinstance(run_id, bool) and run_id >= 0:
        archived = _render_main(t, report, got, gallery, _Layout("../", page_size, None))
        if archive_json:
            archive_report_json(output_dir, report)
        _archive_run(output_dir, run_id, archived, reports_keep)
    return target


def archive_report_json(output_dir: Path, report: Mapping[str, Any]) -> None:
    """``reports/run-<id>.json``: this run's ``report.json``, kept with its page."""
    run_id = report.get("run_id")
    if not isinstance(run_id, int) or isinstance(run_id, bool) or run_id < 0:
        return
    atomic_write_text(
        output_dir / REPORTS_DIR / f"run-{run_id}.json",
        json.dumps(report, indent=2, sort_keys=True, default=str) + "\n",
        root=output_dir,
    )


def _archive_run(output_dir: Path, run_id: int, page: str, keep: int) -> None:
    """``reports/run-<id>.html`` for this run; older runs beyond ``keep`` are pruned."""
    reports_dir = output_dir / REPORTS_DIR
    atomic_write_text(reports_dir / f"run-{run_id}.html", page, root=output_dir)
    prune_reports(reports_dir, keep, keep_id=run_id)


def _remove_stale_gallery_pages(reports_dir: Path, pages: int) -> None:
    for name in _listdir(reports_dir):
        match = _GALLERY_FILE.match(name)
        if match and int(match.group(1)) > pages:
            _unlink(reports_dir / name)


def prune_reports(reports_dir: Path, keep: int, *, keep_id: int | None = None) -> list[int]:
    """Delete ``run-<id>.json``/``.html`` of all but the ``keep`` newest runs (by id).

    ``keep_id`` (the run just written) is always kept. Returns the ids removed.
    """
    ids: set[int] = set()
    for name in _listdir(reports_dir):
        match = _RUN_FILE.match(name)
        if match:
            ids.add(int(match.group(1)))
    newest = sorted(ids, reverse=True)[: max(1, keep)]
    kept = set(newest) | ({keep_id} if keep_id is not None else set())
    removed = sorted(ids - kept)
    for run_id in removed:
        for ext in ("json", "html"):
            _unlink(reports_dir / f"run-{run_id}.{ext}")
    return removed


def _listdir(folder: Path) -> list[str]:
    try:
        return os.listdir(folder)
    except OSError:
        return []


def _unlink(path: Path) -> None:
    # unlink never follows a symlink: a planted link is removed, not its target.
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def iter_results(path: Path) -> Iterator[dict[str, Any]]:
    """The lines of a ``results.jsonl``, streamed; unreadable lines are skipped."""
    try:
        handle = path.open("r", encoding="utf-8", errors="surrogateescape")
    except FileNotFoundError:
        return
    with handle:
        for raw in handle:
            try:
                line = json.loads(raw)
            except ValueError:
                continue
            if isinstance(line, dict):
                yield line


def build_html_for(output_dir: Path, *, reports_keep: int = 30, **options: Any) -> Path:
    """``report.html`` from the folder's ``report.json`` and ``results.jsonl``.

    For ``pipeline report`` and for rebuilding a page by hand; ``options`` go to
    :func:`write_html_report`. Raises ``FileNotFoundError`` if there is no
    ``report.json`` and ``ValueError`` if it is not a JSON object.
    """
    output_dir = Path(output_dir)
    report = json.loads((output_dir / "report.json").read_text(encoding="utf-8"))
    if not isinstance(report, dict):
        raise ValueError(f"{output_dir / 'report.json'}: not a JSON object")
    return write_html_report(
        output_dir,
        report,
        iter_results(output_dir / "results.jsonl"),
        reports_keep=reports_keep,
        **options,
    )
