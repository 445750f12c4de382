"""The emulator's behaviour knobs: a frozen model and its YAML loader.

A scenario file is a flat YAML mapping of the knobs below; every knob is optional and
an empty (or absent) file means the defaults, which are a well-behaved vendor: fast
tasks, no faults, no rate limit, plenty of credits::

    task_seconds: 0.2           # how long an async task stays queued/processing
    sync_seconds: 0.05          # latency of a sync call
    transient_error_rate: 0.0   # share of API requests answered with a retryable vendor error
    permanent_error_rate: 0.0   # share of inputs refused for the image (e.g. no face)
    task_failure_rate: 0.0      # share of async tasks that fail when polled
    disconnect_rate: 0.0        # share of API requests whose connection drops unanswered
    rate_limit: {requests: 250, per_seconds: 300, qps: 5}   # per key and per IP, per vendor
    result_url_ttl_seconds: 7200
    unpolled_window_seconds: 600   # Perfect Corp: a task left unpolled this long expires
    seed: 1

Unknown knobs, wrong types and out-of-range values are :class:`ConfigError` with one
line naming the file, the line and the knob.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    ValidationError,
    model_validator,
)

from pipeline.errors import ConfigError

__all__ = ["FatalCode", "RateLimitSpec", "Scenario", "load_scenario"]

Rate = Annotated[float, Field(ge=0.0, le=1.0)]

# Codes the ``fatal_error`` knob can inject. AILab codes (the fault switches "403
# ERROR_USER_LOCKED, 404 ERROR_AI_NOT_EXISTS" of docs/vendors.md, "AILab: emulator
# behaviour") affect the AILab API; the Perfect Corp codes (401 key states, 400
# CreditInsufficiency: docs/vendors.md, "Perfect Corp: error codes") affect the Perfect
# Corp API.
FatalCode = Literal[
    "ERROR_USER_LOCKED",
    "ERROR_AI_NOT_EXISTS",
    "ERROR_USER_NOT_EXISTS",
    "ERROR_NOT_ENOUGH_CREDITS",
    "InvalidApiKey",
    "InactiveApiKey",
    "ExpiredApiKey",
    "CreditInsufficiency",
]


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")


class RateLimitSpec(_Frozen):
    """A request budget: at most ``requests`` per sliding ``per_seconds`` and ``qps`` per second.

    The ``qps`` part is a token bucket holding ``max(1, qps)`` tokens, so a client that
    runs its own 5/s bucket is never refused for bursting what the bucket allows.
    """

    requests: PositiveInt | None = None
    per_seconds: PositiveFloat | None = None
    qps: PositiveFloat | None = None

    @model_validator(mode="after")
    def _complete(self) -> RateLimitSpec:
        if (self.requests is None) != (self.per_seconds is None):
            raise ValueError("set requests and per_seconds together")
        if self.requests is None and self.qps is None:
            raise ValueError("set requests + per_seconds, or qps, or both")
        return self


def _default_ailab_credits() -> dict[str, float]:
    return {"common": 1_000_000.0}


class Scenario(_Frozen):
    """How the emulated vendors behave. Frozen; build a new one to change it."""

    model_config = ConfigDict(frozen=True, extra="forbid", use_attribute_docstrings=True)

    # --- timing ---------------------------------------------------------------------
    task_seconds: NonNegativeFloat = 0.2
    """Async task life: queued for the first half, processing for the second half."""
    sync_seconds: NonNegativeFloat = 0.05
    """Minimum latency of a sync call (emotion editor, sync Face Beauty Pro)."""

    # --- faults -----------------------------------------------------------------------
    transient_error_rate: Rate = 0.0
    """Share of API-host requests (any kind) answered with a retryable vendor error."""
    permanent_error_rate: Rate = 0.0
    """Share of input images refused for the image (no face); deterministic per bytes+seed."""
    ailab_permanent_error: Literal[
        "ERROR_NO_FACE_IN_FILE", "ERROR_INVALID_PARAMETER", "UNSUPPORTED_FILE_TYPES"
    ] = "ERROR_NO_FACE_IN_FILE"
    """The AILab code ``permanent_error_rate`` answers with (422, 400 or 415; docs/vendors.md,
    "AILab: error codes"): the 400/415 ones look like a client bug and trip the client's
    repeated-rejection brake."""
    task_failure_rate: Rate = 0.0
    """Share of accepted async tasks that end failed (never billed)."""
    disconnect_rate: Rate = 0.0
    """Share of API-host requests dropped before any processing, with no response."""
    lost_response_rate: Rate = 0.0
    """Share of submits processed in full (task created, sync job billed) whose response
    is then lost to a dropped connection: the "re-POST after a timeout may create a second
    task" case of (docs/vendors.md, "Both vendors: no idempotency key")."""
    fatal_error: FatalCode | None = None
    """Answer the owning vendor's requests with this fatal code (see ``fatal_after_requests``)."""
    fatal_after_requests: NonNegativeInt = 0
    """The first N API requests to that vendor are served normally, then ``fatal_error``."""
    download_stall_rate: Rate = 0.0
    """Share of result downloads that stall ``download_stall_seconds`` before answering."""
    download_stall_seconds: NonNegativeFloat = 30.0
    ailab_task_failure_style: Literal["status3", "http422"] = "status3"
    """How a failed AILab task shows at poll (docs/vendors.md, "AILab: task failures at
    poll"): ``task_status: 3`` once its time is up, or ``422 ERROR_NO_FACE_IN_FILE`` from
    the first poll."""

    # --- limits and accounts ----------------------------------------------------------
    rate_limit: RateLimitSpec | None = None
    """Budget per API key and, separately, per client IP, per vendor. ``None``: unlimited."""
    rate_limit_vendors: tuple[Literal["ailab", "perfectcorp"], ...] = ("ailab", "perfectcorp")
    """Which vendors ``rate_limit`` applies to (AILab publishes no numbers: docs/vendors.md,
    "AILab: rate limits")."""
    rate_limit_retry_after_seconds: NonNegativeFloat | None = None
    """Send ``Retry-After`` with rate-limit 429s. Neither vendor documents one
    (docs/vendors.md, "Both vendors: Retry-After"), so the default sends none; set it to
    test that clients honour it."""
    rate_limit_per_ip: bool = True
    """Also enforce ``rate_limit`` per client IP ("Both conditions": docs/vendors.md,
    "Perfect Corp: rate limits")."""
    ailab_api_keys: tuple[str, ...] | None = None
    """Accepted AILab keys; ``None`` accepts any non-empty key."""
    perfectcorp_api_keys: tuple[str, ...] | None = None
    """Accepted Perfect Corp keys; ``None`` accepts any non-empty key."""
    ailab_credits: dict[str, NonNegativeFloat] = Field(default_factory=_default_ailab_credits)
    """Starting AILab pools per key: ``common`` and/or per-API pools (docs/vendors.md,
    "AILab: credits and prices")."""
    perfectcorp_units: NonNegativeFloat = 100_000.0
    """Starting Perfect Corp units per key (docs/vendors.md, "Perfect Corp: units and
    prices")."""

    # --- protocol switches --------------------------------------------------------------
    legacy_service_choice: Literal["accept", "reject"] = "accept"
    """Emotion editor codes 0-3 (docs/vendors.md, "AILab: legacy expression codes"): accept,
    or refuse as UNSUPPORTED_PARAMETER_VALUES."""
    beauty_result_field: Literal["result_url", "data.image"] = "result_url"
    """Where a finished async Face Beauty Pro poll puts its URL (docs/vendors.md, "AILab:
    face beauty pro result field")."""
    polling_interval_ms: PositiveInt | None = None
    """Perfect Corp: also return ``data.polling_interval`` (ms) on polls (docs/vendors.md,
    "Perfect Corp: polling interval")."""
    unpolled_window_seconds: PositiveFloat = 600.0
    """Perfect Corp: a running task not polled for this long expires as InvalidTaskId
    (docs/vendors.md, "Perfect Corp: polling window")."""
    fetch_src_urls: bool = False
    """Perfect Corp ``src_file_url``: fetch foreign URLs (True), or use a stand-in portrait."""

    # --- retention ----------------------------------------------------------------------
    result_url_ttl_seconds: PositiveFloat = 7200.0
    """Perfect Corp result URL lifetime; each poll issues a fresh one (docs/vendors.md,
    "Perfect Corp: result URLs")."""
    ailab_result_url_ttl_seconds: PositiveFloat = 86400.0
    """AILab result URL and task lifetime from completion: 24 h (docs/vendors.md, "AILab:
    task lifetimes")."""
    upload_url_ttl_seconds: PositiveFloat = 3600.0
    """Perfect Corp presigned PUT URL lifetime (undocumented: docs/vendors.md, "Perfect
    Corp: upload")."""

    seed: int = 1
    """Seed of every random choice, so a scenario replays the same way."""

    def fatal_vendor(self) -> Literal["ailab", "perfectcorp"] | None:
        """Which vendor ``fatal_error`` belongs to (AILab codes are upper snake case)."""
        if self.fatal_error is None:
            return None
        return "ailab" if self.fatal_error.isupper() else "perfectcorp"


def load_scenario(path: Path | None) -> Scenario:
    """Read and validate a scenario file; ``None`` gives the defaults.

    Raises :class:`ConfigError` with one line: ``FILE:LINE: knob: what is wrong``.
    """
    if path is None:
        return Scenario()
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: scenario file not found") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read scenario file: {exc}") from None
    try:
        root = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = mark.line + 1 if mark is not None else 1
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{line}: invalid YAML: {problem}") from None
    if data is None:
        return Scenario()
    if not isinstance(data, dict):
        raise ConfigError(
            f"{path}:1: a scenario must be a mapping of knobs, e.g. 'task_seconds: 1'"
        )
    try:
        return Scenario.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(_describe(path, root, exc)) from None


def _describe(path: Path, root: yaml.Node | None, exc: ValidationError) -> str:
    error = exc.errors()[0]
    loc = tuple(error["loc"])
    field = ".".join(str(part) for part in loc) or "(top level)"
    if error["type"] == "extra_forbidden":
        if len(loc) == 1:
            known = ", ".join(sorted(Scenario.model_fields))
            message = f"unknown knob; known knobs: {known}"
        else:
            message = "unknown field"
    else:
        message = error["msg"]
    return f"{path}:{_line_of(root, loc)}: {field}: {message}"


def _line_of(root: yaml.Node | None, loc: tuple[Any, ...]) -> int:
    """The 1-based line of the deepest YAML node that ``loc`` reaches."""
    line = 1
    node = root
    for part in loc:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                if isinstance(key, yaml.ScalarNode) and key.value == str(part):
                    line = key.start_mark.line + 1
                    node = value
                    break
            else:
                return line
        elif isinstance(node, yaml.SequenceNode) and isinstance(part, int):
            if part >= len(node.value):
                return line
            node = node.value[part]
            line = node.start_mark.line + 1
        else:
            return line
    return line
