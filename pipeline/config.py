"""Machine and account settings: endpoints, key variables, rate limits, timeouts.

Loaded once at the edge (``--config PATH``, else ``./config.yaml`` if present, else
built-in defaults), validated, frozen and passed inward. API keys are never stored
in the config: it names the environment variable that holds each key, and
:func:`api_key` reads it at the moment a provider is built.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, PositiveFloat, PositiveInt

from pipeline.errors import ConfigError

__all__ = [
    "DEFAULT_CONFIG_NAME",
    "Config",
    "NetworkConfig",
    "ProviderConfig",
    "RateLimit",
    "RetryConfig",
    "TimeoutConfig",
    "api_key",
    "load_config",
]

DEFAULT_CONFIG_NAME = "config.yaml"
VendorName = Literal["ailab", "perfectcorp"]


class _Frozen(BaseModel):
    # strict: YAML already types its scalars, so "5" or true where a number belongs
    # is a mistake to report, not to coerce.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True)


class RateLimit(_Frozen):
    """A vendor's request budget: ``requests`` per ``per_seconds`` and at most ``qps``/s."""

    requests: PositiveInt | None = None
    per_seconds: PositiveFloat | None = None
    qps: PositiveFloat | None = None


class ProviderConfig(_Frozen):
    base_url: str
    api_key_env: str
    poll_interval_seconds: PositiveFloat = 5.0
    rate_limit: RateLimit | None = None
    # Perfect Corp: the upload path; the feature path is the documented one (§2.2, Q11).
    upload_path: str | None = None
    # A task still running this long after its submit fails as TASK_DEADLINE, task id
    # kept, so a rerun resumes polling it (docs/vendors.md "Task lifetimes").
    task_deadline_seconds: PositiveFloat = 900.0
    # Longest gap allowed between two polls of a running task; None: no window.
    # Perfect Corp expires a task not polled in time and still charges it
    # (docs/vendors.md "Perfect Corp polling window"); its docs give no number.
    polling_window_seconds: PositiveFloat | None = None


class RetryConfig(_Frozen):
    backoff_initial_seconds: float = Field(default=1.0, ge=0)
    backoff_max_seconds: float = Field(default=60.0, ge=0)
    # vendor-protocols.md §1.8 [R]: N items in a row rejected with the same 400/415
    # code is a client bug, not bad inputs: stop the run (exit 3). 0 turns it off.
    stop_after_identical_rejections: int = Field(default=10, ge=0)
    # A vendor's Retry-After is honoured up to this many seconds, never longer.
    retry_after_max_seconds: float = Field(default=300.0, ge=0)


class TimeoutConfig(_Frozen):
    connect_seconds: PositiveFloat = 10.0
    request_seconds: PositiveFloat = 120.0
    # §1.7 [R]: storage downloads sometimes stall; 20 s per try.
    download_seconds: PositiveFloat = 20.0


class NetworkConfig(_Frozen):
    """Where results may be fetched from, and how much any answer may weigh."""

    # Result URLs on loopback/private hosts are refused except the exact origin of the
    # provider's base_url and these "host:port" entries (link-local: always refused).
    allow_result_hosts: tuple[str, ...] = ()
    # Caps on what a vendor can make us hold: an API answer (JSON, with a base64
    # result inside for sync operations), a downloaded result, a result's pixels.
    max_response_bytes: PositiveInt = 32 * 1024 * 1024
    max_download_bytes: PositiveInt = 64 * 1024 * 1024
    max_result_pixels: PositiveInt = 50_000_000


def _default_providers() -> dict[VendorName, ProviderConfig]:
    return {
        "ailab": ProviderConfig(
            base_url="https://www.ailabapi.com",
            api_key_env="AILAB_API_KEY",
            poll_interval_seconds=5.0,
        ),
        "perfectcorp": ProviderConfig(
            base_url="https://yce-api-01.makeupar.com",
            api_key_env="PERFECTCORP_API_KEY",
            poll_interval_seconds=5.0,
            # vendor-protocols.md §2.6: 250 requests / 300 s and 5 QPS per key.
            rate_limit=RateLimit(requests=250, per_seconds=300, qps=5),
            polling_window_seconds=10.0,
            task_deadline_seconds=600.0,
        ),
    }


class Config(_Frozen):
    providers: dict[VendorName, ProviderConfig] = Field(default_factory=_default_providers)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    source: str = "built-in defaults"

    def provider(self, vendor: str) -> ProviderConfig:
        return self.providers[vendor]  # type: ignore[index]


def _merge_providers(raw: dict[str, Any]) -> dict[str, Any]:
    """Fill each provider section the file gives with the built-in defaults it omits
    (and its ``rate_limit`` with the default limit's keys it omits)."""
    defaults: dict[str, Any] = {
        k: v.model_dump(exclude_none=True) for k, v in _default_providers().items()
    }
    given = raw.get("providers")
    if isinstance(given, dict):
        merged: dict[str, Any] = dict(defaults)
        for name, section in given.items():
            if isinstance(section, dict) and name in defaults:
                merged[name] = {**defaults[name], **section}
                # One level deeper for the rate limit: `rate_limit: {qps: 3}` keeps the
                # published 250 per 300 s; `rate_limit: null` removes the limit.
                base_limit = defaults[name].get("rate_limit")
                given_limit = section.get("rate_limit")
                if isinstance(base_limit, dict) and isinstance(given_limit, dict):
                    merged[name]["rate_limit"] = {**base_limit, **given_limit}
            else:
                merged[name] = section
        raw = {**raw, "providers": merged}
    return raw


def load_config(path: Path | None) -> Config:
    """Load and validate the config; ``None`` means ``./config.yaml`` or defaults."""
    from pipeline.yamlsrc import load_yaml_with_lines, validation_error_message

    if path is None:
        candidate = Path.cwd() / DEFAULT_CONFIG_NAME
        if not candidate.is_file():
            return Config()
        path = candidate
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found; pass an existing file to --config")
    doc = load_yaml_with_lines(path, ConfigError)
    if doc.data is None:
        return Config(source=str(path))
    if not isinstance(doc.data, dict):
        raise ConfigError(f"{path}:1: the config must be a mapping of settings")
    from pydantic import ValidationError

    try:
        return Config.model_validate({**_merge_providers(doc.data), "source": str(path)})
    except ValidationError as exc:
        raise ConfigError(validation_error_message(path, doc, exc, model=Config)) from None


def api_key(config: Config, vendor: str) -> str:
    """The vendor's API key from the environment variable the config names."""
    var = config.provider(vendor).api_key_env
    value = os.environ.get(var, "").strip()
    if not value:
        raise ConfigError(
            f"{vendor}: environment variable {var} is not set; export your {vendor} API key "
            f"in it, or run against the built-in emulator with --emulate"
        )
    return value
