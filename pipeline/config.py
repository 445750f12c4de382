"""Machine and account settings: endpoints, key variables, rate limits, timeouts.

Loaded once at the edge (``--config PATH``, else ``./config.yaml`` if present, else
built-in defaults), validated, frozen and passed inward. API keys are never stored
in the config: it names the environment variable that holds each key, and
:func:`api_key` reads it at the moment a provider is built.

:attr:`Config.source` says where the settings came from: the resolved path of the
file, or ``"built-in defaults"``; the run's start line prints it.

Merging: a provider section the file gives keeps the built-in values of the keys it
omits, and so does its ``rate_limit`` (``rate_limit: {qps: 3}`` keeps Perfect
Corp's published 250 requests per 300 s); ``rate_limit: null`` removes the limit.
Every other section keeps the defaults of the keys it omits.

Every invalid value raises :class:`~pipeline.errors.ConfigError` with one
``FILE:LINE: field: message`` line per problem. Values that could be secrets (a
key pasted where the variable name belongs, a URL with a password) are never
echoed in those messages.
"""

from __future__ import annotations

import ipaddress
import os
import re
import stat
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any
from urllib.parse import urlsplit

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from pipeline.errors import ConfigError

if TYPE_CHECKING:
    from pipeline.yamlsrc import YamlDoc

__all__ = [
    "BUILTIN_SOURCE",
    "DEFAULT_CONFIG_NAME",
    "Config",
    "NetworkConfig",
    "ProviderConfig",
    "RateLimit",
    "ReportingConfig",
    "RetryConfig",
    "TimeoutConfig",
    "api_key",
    "load_config",
]

DEFAULT_CONFIG_NAME = "config.yaml"
BUILTIN_SOURCE = "built-in defaults"


def _known_vendor(value: Any) -> Any:
    """A name of :data:`pipeline.vendors.VENDORS`, read when validating (not at import).

    Raised as pydantic's own ``literal_error`` so an unknown name reads as it did when
    this was a ``Literal``: "not an allowed key: input should be 'a' or 'b' (got 'x')".
    """
    from pipeline.vendors import vendor_names

    names = vendor_names()
    if isinstance(value, str) and value in names:
        return value
    quoted = [repr(n) for n in names]
    expected = quoted[0] if len(quoted) == 1 else f"{', '.join(quoted[:-1])} or {quoted[-1]}"
    raise PydanticCustomError("literal_error", "Input should be {expected}", {"expected": expected})


# A vendor's name: a key of pipeline.vendors.VENDORS.
VendorName = Annotated[str, BeforeValidator(_known_vendor)]

_DAY = 86_400.0
_GIB = 1024 * 1024 * 1024

# Waits and timeouts. The upper bounds only catch typos (a value in milliseconds, an
# extra zero row): anything longer than these is never what was meant, and a huge
# float can overflow the event loop's clock arithmetic.
Seconds = Annotated[float, Field(gt=0, le=_DAY)]
SecondsOrZero = Annotated[float, Field(ge=0, le=_DAY)]
LongSeconds = Annotated[float, Field(gt=0, le=7 * _DAY)]


class _Frozen(BaseModel):
    # strict: YAML already types its scalars, so "5" or true where a number belongs
    # is a mistake to report, not to coerce. No inf/nan: YAML's .inf is a float, and
    # an infinite timeout or deadline is a wait without end.
    model_config = ConfigDict(frozen=True, extra="forbid", strict=True, allow_inf_nan=False)


class RateLimit(_Frozen):
    """A vendor's request budget: ``requests`` per ``per_seconds`` and at most ``qps``/s."""

    requests: Annotated[int, Field(gt=0, le=1_000_000)] | None = None
    per_seconds: LongSeconds | None = None
    qps: Annotated[float, Field(gt=0, le=10_000)] | None = None

    @model_validator(mode="after")
    def _window_is_whole(self) -> RateLimit:
        # The budget only builds a window from both numbers; one alone would be
        # silently ignored.
        if (self.requests is None) != (self.per_seconds is None):
            raise ValueError(
                "give requests and per_seconds together (N requests per S seconds), "
                "or neither and only qps"
            )
        return self


# POSIX: environment variable names are letters, digits and "_", not starting with
# a digit; upper case is the convention for everything a user exports.
_ENV_NAME = re.compile(r"[A-Z_][A-Z0-9_]{0,127}")


def _check_base_url(value: str) -> str:
    """An ``http(s)://host[:port][/path]`` URL, without credentials, query or fragment.

    The API key is sent to this URL, so anything else (``ftp://``, ``file://``, no
    host) would only burn every retry or send the key somewhere odd. Messages show
    the scheme and host at most: the URL may carry a password.
    """
    if not value or value != value.strip() or any(ch.isspace() for ch in value):
        raise ValueError("must be a URL without spaces, e.g. https://www.ailabapi.com")
    if any(not ch.isprintable() for ch in value):
        raise ValueError("contains control characters; write the URL out plainly")
    try:
        parts = urlsplit(value)
        port = parts.port
    except ValueError:
        raise ValueError(
            "is not a valid URL (check the host and port), e.g. https://www.ailabapi.com"
        ) from None
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https"):
        shown = f"{scheme}://" if scheme else "no scheme"
        raise ValueError(f"must start with https:// (or http:// for a local emulator), not {shown}")
    if parts.username is not None or parts.password is not None:
        raise ValueError(
            "must not contain a user name or password; the key goes in the environment "
            "variable named by api_key_env"
        )
    if not parts.hostname:
        raise ValueError(f"has no host; write it as {scheme}://HOST[:PORT]")
    if parts.query or parts.fragment or value.endswith(("?", "#")):
        raise ValueError(
            f"must not have a query (?...) or fragment (#...); give just "
            f"{scheme}://{parts.hostname}{f':{port}' if port else ''}"
        )
    if port == 0:
        raise ValueError("port 0 is not a port a server listens on")
    return value


class ProviderConfig(_Frozen):
    base_url: str
    api_key_env: str
    poll_interval_seconds: Seconds = 5.0
    rate_limit: RateLimit | None = None
    # Perfect Corp: the upload path; the feature path is the documented one
    # (docs/vendors.md, "Perfect Corp: upload path").
    upload_path: str | None = None
    # A task still running this long after its submit fails as TASK_DEADLINE, task id
    # kept, so a rerun resumes polling it (docs/vendors.md, "Both vendors: task lifetimes
    # and deadlines").
    task_deadline_seconds: LongSeconds = 900.0
    # Longest gap allowed between two polls of a running task; None: no window.
    # Perfect Corp expires a task not polled in time and still charges it
    # (docs/vendors.md, "Perfect Corp: polling window"); its docs give no number.
    polling_window_seconds: Seconds | None = None

    @field_validator("base_url")
    @classmethod
    def _url(cls, value: str) -> str:
        return _check_base_url(value)

    @field_validator("api_key_env")
    @classmethod
    def _env_name(cls, value: str) -> str:
        # Never echo the value: a key pasted here by mistake is a secret.
        if not value.strip():
            raise ValueError(
                "is empty; name the environment variable that holds the key, "
                "e.g. api_key_env: AILAB_API_KEY"
            )
        if not _ENV_NAME.fullmatch(value):
            raise ValueError(
                "must be the NAME of an environment variable (upper-case letters, digits "
                "and _, not starting with a digit, e.g. AILAB_API_KEY), not the key itself"
            )
        return value

    @field_validator("upload_path")
    @classmethod
    def _path(cls, value: str | None) -> str | None:
        # Joined onto base_url: only a path, so the key never travels to another host.
        if value is None:
            return None
        if not re.fullmatch(r"/[A-Za-z0-9._~/\-]*", value):
            raise ValueError(
                "must be a path on the API host starting with /, e.g. /s2s/v2.0/file/ai-smile "
                "(no host, query or spaces)"
            )
        return value


class RetryConfig(_Frozen):
    backoff_initial_seconds: SecondsOrZero = 1.0
    backoff_max_seconds: SecondsOrZero = 60.0
    # N items in a row rejected with the same 400/415 code is a client bug, not bad
    # inputs: stop the run (exit 3). 0 turns it off (docs/vendors.md, "AILab:
    # retries and backoff").
    stop_after_identical_rejections: int = Field(default=10, ge=0, le=1_000_000)
    # A vendor's Retry-After is honoured up to this many seconds, never longer.
    retry_after_max_seconds: SecondsOrZero = 300.0

    @model_validator(mode="after")
    def _ordered(self) -> RetryConfig:
        if self.backoff_initial_seconds > self.backoff_max_seconds:
            raise ValueError(
                f"backoff_initial_seconds ({self.backoff_initial_seconds:g}) is larger than "
                f"backoff_max_seconds ({self.backoff_max_seconds:g})"
            )
        return self


class TimeoutConfig(_Frozen):
    connect_seconds: Seconds = 10.0
    request_seconds: Seconds = 120.0
    # AILab's result storage sometimes stalls: 20 s per try (docs/vendors.md,
    # "AILab: downloads").
    download_seconds: Seconds = 20.0


def _check_host_port(entry: Any) -> str:
    """``"host:port"`` (``"[::1]:8080"`` for IPv6), normalised to lower case."""
    if not isinstance(entry, str):
        raise ValueError("each entry must be a string 'host:port', e.g. '127.0.0.1:9000'")
    text = entry.strip().lower()
    match = re.fullmatch(r"\[([0-9a-f:.]+)\]:(\d{1,5})|([a-z0-9.\-]+):(\d{1,5})", text)
    if match is None:
        raise ValueError(
            f"{entry!r} is not 'host:port' (e.g. 'storage.internal:9000' or '[::1]:8080')"
            if len(entry) <= 80
            else "an entry is not 'host:port' (e.g. 'storage.internal:9000')"
        )
    host = match.group(1) or match.group(3)
    port = int(match.group(2) or match.group(4))
    if not 1 <= port <= 65535:
        raise ValueError(f"{entry!r}: port must be 1-65535")
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        if match.group(1):
            raise ValueError(f"{entry!r}: not an IPv6 address inside [ ]") from None
        address = None
    del address  # parsed only to reject a malformed IPv6 literal
    return f"[{host}]:{port}" if match.group(1) else f"{host}:{port}"


def _is_link_local(entry: str) -> bool:
    host = entry.rsplit(":", 1)[0].strip("[]")
    try:
        return ipaddress.ip_address(host).is_link_local
    except ValueError:
        return False


class NetworkConfig(_Frozen):
    """Where results may be fetched from, and how much any answer may weigh."""

    # Result URLs on loopback/private hosts are refused except the exact origin of the
    # provider's base_url and these "host:port" entries (link-local: always refused).
    allow_result_hosts: tuple[str, ...] = ()
    # Caps on what a vendor can make us hold: an API answer (JSON, with a base64
    # result inside for sync operations), a downloaded result, a result's pixels.
    max_response_bytes: int = Field(default=32 * 1024 * 1024, ge=1, le=_GIB)
    max_download_bytes: int = Field(default=64 * 1024 * 1024, ge=1, le=_GIB)
    max_result_pixels: int = Field(default=50_000_000, ge=1, le=1_000_000_000)
    # A vendor that answers nothing (refused connections, DNS or TLS failure, transport
    # 5xx) for this many requests in a row, or this long, stops the run:
    # VENDOR_UNREACHABLE, exit 3. Rate-limit answers and task failures never count.
    unreachable_after_requests: int = Field(default=20, ge=1, le=1_000_000)
    unreachable_after_seconds: Seconds = 120.0

    @field_validator("allow_result_hosts", mode="before")
    @classmethod
    def _hosts(cls, value: Any) -> Any:
        # YAML gives a list; the field is a tuple (frozen), which strict mode would
        # refuse to build from a list.
        if value is None:
            return ()
        if isinstance(value, str):
            raise ValueError("expected a list of 'host:port' strings, e.g. ['127.0.0.1:9000']")
        if isinstance(value, list | tuple):
            return tuple(_check_host_port(v) for v in value)
        return value


class ReportingConfig(_Frozen):
    """What a run leaves behind to read, and how often it says where it is."""

    # Per-run reports kept under reports/ beside the latest one (oldest removed first).
    reports_keep: int = Field(default=30, ge=1, le=100_000)
    # Seconds between progress lines when stderr is not a terminal (cron, CI).
    progress_interval_seconds: Seconds = 10.0


def _default_providers() -> dict[str, ProviderConfig]:
    """Every registered vendor's built-in section (pipeline.vendors, ``defaults``)."""
    from pipeline.vendors import VENDORS

    return {
        name: ProviderConfig.model_validate(spec.defaults.settings())
        for name, spec in VENDORS.items()
    }


class Config(_Frozen):
    providers: dict[VendorName, ProviderConfig] = Field(default_factory=_default_providers)
    retry: RetryConfig = Field(default_factory=RetryConfig)
    timeouts: TimeoutConfig = Field(default_factory=TimeoutConfig)
    network: NetworkConfig = Field(default_factory=NetworkConfig)
    reporting: ReportingConfig = Field(default_factory=ReportingConfig)
    # The resolved path of the file the settings came from, or BUILTIN_SOURCE.
    source: str = BUILTIN_SOURCE
    _lines: dict[str, int] = PrivateAttr(default_factory=dict)

    def provider(self, vendor: str) -> ProviderConfig:
        return self.providers[vendor]

    def where(self, *keypath: str) -> str:
        """Where a setting comes from, to start a message about it.

        ``config.where("providers", "ailab", "api_key_env")`` is
        ``FILE:LINE: providers.ailab.api_key_env`` when the file sets it,
        ``FILE: providers.ailab.api_key_env (default)`` when the file leaves it out, and
        ``providers.ailab.api_key_env (built-in default)`` without a file. For
        settings found wrong after loading (a key variable that is not set).
        """
        dotted = ".".join(keypath)
        if self.source == BUILTIN_SOURCE:
            return f"{dotted} (built-in default)"
        line = self._lines.get(dotted)
        return f"{self.source}:{line}: {dotted}" if line else f"{self.source}: {dotted} (default)"


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


def _default_candidate() -> Path | None:
    """``./config.yaml`` if something is there (even a broken link), else ``None``."""
    candidate = Path.cwd() / DEFAULT_CONFIG_NAME
    try:
        os.lstat(candidate)
    except OSError:
        return None
    return candidate


def load_config(path: Path | None) -> Config:
    """Load and validate the config; ``None`` means ``./config.yaml`` or defaults.

    A ``./config.yaml`` that exists but is not a readable regular file (a folder, a
    FIFO, a broken link) is an error, not a silent fall back to the defaults.
    """
    from pipeline.yamlsrc import display_path, load_yaml_with_lines, validation_error_message

    if path is None:
        path = _default_candidate()
        if path is None:
            return Config()
    shown = display_path(path)
    _check_config_file(path, shown)
    doc = load_yaml_with_lines(path, ConfigError, what="config")
    source = os.path.realpath(path)
    if doc.data is None:
        return Config(source=source)
    if not isinstance(doc.data, dict):
        raise ConfigError(
            f"{shown}:1: (top level): the config must be a mapping of settings "
            f"(providers:, retry:, timeouts:, network:, reporting:)"
        )
    if "source" in doc.data:  # a field of the model, but not a setting
        raise ConfigError(
            f"{shown}:{doc.line_of(('source',))}: source: unknown key; known keys: "
            f"network, providers, reporting, retry, timeouts"
        )
    try:
        config = Config.model_validate({**_merge_providers(doc.data), "source": source})
    except ValidationError as exc:
        raise ConfigError(validation_error_message(path, doc, exc, model=Config)) from None
    _refuse_link_local_hosts(config, doc, shown)
    lines = {
        f"providers.{vendor}.{key}": doc.line_of(("providers", vendor, key))
        for vendor in config.providers
        for key in ("api_key_env", "base_url")
        if isinstance(doc.data.get("providers"), dict)
        and isinstance(doc.data["providers"].get(vendor), dict)
        and key in doc.data["providers"][vendor]
    }
    config._lines.update(lines)
    return config


def _check_config_file(path: Path, shown: str) -> None:
    """Refuse a config path that is missing, a link to nothing or a folder; anything
    else unreadable is left for the YAML loader to name."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        if os.path.islink(path):
            raise ConfigError(f"{shown}: config is a link to nothing; fix or remove it") from None
        raise ConfigError(
            f"{shown}: config file not found; pass an existing file to --config"
        ) from None
    except (OSError, ValueError):
        return  # load_yaml_with_lines says what is wrong
    if stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{shown}: is a folder; pass the config's .yaml file to --config")


def _refuse_link_local_hosts(config: Config, doc: YamlDoc, shown: str) -> None:
    # Link-local (169.254.0.0/16, fe80::/10) holds cloud metadata services: the
    # fetcher refuses it whatever the config says, so listing it is a mistake to
    # report now rather than a setting silently ignored. (Checked here, not in the
    # model, so code may build such a config to test that refusal.)
    for i, entry in enumerate(config.network.allow_result_hosts):
        if _is_link_local(entry):
            line = doc.line_of(("network", "allow_result_hosts", i))
            raise ConfigError(
                f"{shown}:{line}: network.allow_result_hosts[{i}]: {entry!r}: link-local "
                f"addresses (cloud metadata services) are always refused; remove it"
            )


def api_key(config: Config, vendor: str) -> str:
    """The vendor's API key from the environment variable the config names."""
    var = config.provider(vendor).api_key_env
    value = os.environ.get(var, "").strip()
    if not value:
        where = config.where("providers", vendor, "api_key_env")
        raise ConfigError(
            f"{where}: environment variable {var} is not set; export your {vendor} API key in it, or run against the built-in "
            f"emulator with --emulate"
        )
    return value
