"""The vendors, as one registry: every per-vendor fact the rest of the code needs.

:data:`VENDORS` maps a vendor's name (the ``ailab`` of ``ailab/face-swap``, the key of
``providers:`` in the config and of ``max_credits:`` in the manifest) to its
:class:`VendorSpec`. Nothing outside the registry, the vendor's own modules and
:mod:`pipeline.operations` spells a vendor name or switches on one: config defaults,
manifest validation, the dry-run's request count, the provider factory, rate-limit
classification, the report's units and code help all read the spec
(``tests/unit/test_vendor_registry.py`` checks that no other module quotes a name).

Why the entries live here rather than as a ``SPEC`` in each vendor's module: the
config and the manifest validate vendor names and fill in provider defaults, so they
need the list on import, and ``import pipeline.config`` must stay cheap (no aiohttp,
no provider code) and free of cycles (the providers import the config). Importing
each vendor module to collect its spec would pull every provider in at config load.
So an entry holds plain data, and refers to the vendor's code by a lazy
``"module:attribute"`` hook, imported the first time it is called. Adding a vendor
is then: one entry below, plus the vendor's own modules (its provider class and,
if it has any, its rate-limit rule and code help, wherever the hooks point).
Adding an operation is its :data:`pipeline.operations.OPERATIONS` entry plus what
its vendor module does with it. A hook may also be a callable (tests, plugins).

Every hook is called with plain arguments; see :class:`VendorSpec` for each one's
signature. This module imports nothing of the pipeline at run time.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal, Protocol, cast

if TYPE_CHECKING:
    import aiohttp

    from pipeline.config import NetworkConfig, ProviderConfig, TimeoutConfig
    from pipeline.htmlreport import CodeHelp
    from pipeline.providers.base import AcquireSlot, Provider, RequestStats

__all__ = [
    "VENDORS",
    "CodeExplainer",
    "Hook",
    "ProviderDefaults",
    "ProviderFactory",
    "RateLimitRule",
    "VendorSpec",
    "get_vendor",
    "vendor_names",
]


class ProviderFactory(Protocol):
    """Builds a vendor's provider; the provider classes' constructor signature."""

    def __call__(
        self,
        session: aiohttp.ClientSession,
        config: ProviderConfig,
        api_key: str,
        timeouts: TimeoutConfig,
        stats: RequestStats,
        acquire: AcquireSlot,
        *,
        network: NetworkConfig | None = None,
    ) -> Provider: ...


# (http_status, code or None) -> True when the failure means "slow down", not "this
# attempt failed" (pipeline.providers.classify.is_rate_limit_code dispatches to it).
RateLimitRule = Callable[[int, "str | None"], bool]
# (code, display name) -> the help for a code of this vendor, or None when it has
# none (pipeline.htmlreport.explain_code then tries the generic rules).
CodeExplainer = Callable[[str, str], "CodeHelp | None"]
# "package.module:attribute", imported on first use, or the callable itself.
Hook = str | Callable[..., Any]


def _resolve(hook: Hook) -> Any:
    if not isinstance(hook, str):
        return hook
    module, _, attribute = hook.partition(":")
    return getattr(importlib.import_module(module), attribute)


@dataclass(frozen=True)
class ProviderDefaults:
    """The built-in ``providers.<vendor>`` section: what a config file may override.

    ``None`` leaves a setting at :class:`pipeline.config.ProviderConfig`'s own default
    (no rate limit, no polling window, its task deadline).
    """

    base_url: str
    api_key_env: str
    poll_interval_seconds: float = 5.0
    # ``requests`` per ``per_seconds`` and ``qps``, as the vendor publishes them.
    rate_limit: Mapping[str, int | float] | None = None
    polling_window_seconds: float | None = None
    task_deadline_seconds: float | None = None

    def settings(self) -> dict[str, Any]:
        """The section as a config file would write it (``None`` values left out)."""
        out: dict[str, Any] = {
            "base_url": self.base_url,
            "api_key_env": self.api_key_env,
            "poll_interval_seconds": self.poll_interval_seconds,
        }
        if self.rate_limit is not None:
            out["rate_limit"] = dict(self.rate_limit)
        if self.polling_window_seconds is not None:
            out["polling_window_seconds"] = self.polling_window_seconds
        if self.task_deadline_seconds is not None:
            out["task_deadline_seconds"] = self.task_deadline_seconds
        return out


@dataclass(frozen=True)
class VendorSpec:
    """One vendor: its names, unit, provider defaults and the hooks into its code.

    ``requests_per_item``: API requests one item needs besides polls (the dry run's
    estimate against the rate limit). ``provider``: a :class:`ProviderFactory`.
    ``rate_limit_rule``: a :data:`RateLimitRule`. ``explain``: a :data:`CodeExplainer`,
    or ``None`` for a vendor without code help of its own.
    """

    name: str
    display_name: str  # as the vendor calls itself, for messages and reports
    price_unit: Literal["credits", "units"]
    defaults: ProviderDefaults
    requests_per_item: int
    provider: Hook
    rate_limit_rule: Hook
    explain: Hook | None = None
    # The field of the credit answer a balance is summed from, for messages.
    balance_field: str = "balance"

    def provider_factory(self) -> ProviderFactory:
        """The provider class (imported now, not when the registry is)."""
        return cast("ProviderFactory", _resolve(self.provider))

    def is_rate_limit(self, http_status: int, code: str | None) -> bool:
        rule = cast("RateLimitRule", _resolve(self.rate_limit_rule))
        return rule(http_status, code)

    def explain_code(self, code: str) -> CodeHelp | None:
        if self.explain is None:
            return None
        explainer = cast("CodeExplainer", _resolve(self.explain))
        return explainer(code, self.display_name)


VENDORS: dict[str, VendorSpec] = {
    "ailab": VendorSpec(
        name="ailab",
        display_name="AILabTools",
        price_unit="credits",
        defaults=ProviderDefaults(
            base_url="https://www.ailabapi.com",
            api_key_env="AILAB_API_KEY",
            poll_interval_seconds=5.0,
        ),
        # One multipart POST (docs/vendors.md, "The four operations").
        requests_per_item=1,
        provider="pipeline.providers.ailab:AILabProvider",
        rate_limit_rule="pipeline.providers.classify:is_ailab_rate_limit",
        explain="pipeline.htmlreport:explain_ailab_code",
        # docs/vendors.md, "AILab: credits and prices".
        balance_field="data[].balance",
    ),
    "perfectcorp": VendorSpec(
        name="perfectcorp",
        display_name="Perfect Corp",
        price_unit="units",
        defaults=ProviderDefaults(
            base_url="https://yce-api-01.makeupar.com",
            api_key_env="PERFECTCORP_API_KEY",
            poll_interval_seconds=5.0,
            # 250 requests / 300 s and 5 QPS per key (docs/vendors.md,
            # "Perfect Corp: rate limits").
            rate_limit={"requests": 250, "per_seconds": 300, "qps": 5},
            # Perfect Corp expires a task not polled in time and still charges it
            # (docs/vendors.md, "Perfect Corp: polling window").
            polling_window_seconds=10.0,
            task_deadline_seconds=600.0,
        ),
        # File record + task create; the S3 PUT is not on the API host and is not
        # counted against the budget (docs/vendors.md, "Perfect Corp: upload").
        requests_per_item=2,
        provider="pipeline.providers.perfectcorp:PerfectCorpProvider",
        rate_limit_rule="pipeline.providers.classify:is_perfectcorp_rate_limit",
        explain="pipeline.htmlreport:explain_perfectcorp_code",
        # docs/vendors.md, "Perfect Corp: units and prices": ``amount_dec``, the
        # deprecated ``amount`` only where ``amount_dec`` is missing.
        balance_field="results[].amount_dec (or amount)",
    ),
}


def vendor_names() -> tuple[str, ...]:
    """The registered names, in registry order (read at call time: tests may add one)."""
    return tuple(VENDORS)


def get_vendor(name: str) -> VendorSpec:
    """The spec of ``name``; raises ``KeyError`` listing the known vendors."""
    try:
        return VENDORS[name]
    except KeyError:
        raise KeyError(f"unknown vendor {name!r}; known: {', '.join(VENDORS)}") from None
