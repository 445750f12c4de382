"""The vendor registry (pipeline.vendors): the one place a vendor is spelled out.

Checks that every operation's vendor is registered and agrees with it, that no other
module quotes a vendor name, and that a third vendor added to the registry alone is
accepted by the config, the manifest, the provider factory, the rate-limit rule and
the code help, with no other module touched.
"""

from __future__ import annotations

import ast
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, cast

import aiohttp
import pytest

from pipeline import vendors
from pipeline.budget import RateBudget
from pipeline.config import Config, ProviderConfig, load_config
from pipeline.errors import ConfigError, ManifestError
from pipeline.htmlreport import CodeHelp, explain_code
from pipeline.manifest import load_manifest
from pipeline.operations import OPERATIONS
from pipeline.providers.base import RequestStats
from pipeline.providers.classify import is_rate_limit_code
from pipeline.runner import build_provider
from pipeline.vendors import VENDORS, ProviderDefaults, VendorSpec

ROOT = Path(__file__).resolve().parents[2]
PIPELINE = ROOT / "pipeline"
# The vendors' own modules, the registry and the operation table may name vendors.
ALLOWED = {"vendors.py", "operations.py", "providers/ailab.py", "providers/perfectcorp.py"}


# ------------------------------------------------------------------ the real registry


def test_every_operation_vendor_is_registered_with_its_unit() -> None:
    for name, op in OPERATIONS.items():
        assert op.vendor in VENDORS, name
        assert op.price_unit == VENDORS[op.vendor].price_unit, name
        assert name.startswith(f"{op.vendor}/"), name
    assert {op.vendor for op in OPERATIONS.values()} == set(VENDORS)  # no vendor unused


def test_entries_are_named_by_their_key_and_every_hook_resolves() -> None:
    from pipeline.providers.ailab import AILabProvider
    from pipeline.providers.perfectcorp import PerfectCorpProvider

    assert list(VENDORS) == ["ailab", "perfectcorp"]
    for key, spec in VENDORS.items():
        assert spec.name == key
        assert spec.requests_per_item >= 1
        ProviderConfig.model_validate(spec.defaults.settings())  # a valid section
    assert VENDORS["ailab"].provider_factory() is AILabProvider
    assert VENDORS["perfectcorp"].provider_factory() is PerfectCorpProvider
    assert VENDORS["ailab"].is_rate_limit(503, "AI_SERVICE_FLOW_RESTRICTION") is True
    assert VENDORS["ailab"].is_rate_limit(429, "ERROR_NOT_ENOUGH_CREDITS") is False
    assert VENDORS["perfectcorp"].is_rate_limit(429, None) is True
    assert VENDORS["perfectcorp"].is_rate_limit(400, "CreditInsufficiency") is False
    ailab_help = VENDORS["ailab"].explain_code("ERROR_NOT_ENOUGH_CREDITS")
    assert ailab_help is not None and ailab_help.todo == "Buy credits, then rerun to resume."
    assert VENDORS["ailab"].explain_code("creditinsufficiency") is None
    pc_help = VENDORS["perfectcorp"].explain_code("CreditInsufficiency")
    assert pc_help is not None and pc_help.todo == "Buy units, then rerun to resume."


def test_builtin_provider_defaults_come_from_the_registry() -> None:
    config = Config()
    assert list(config.providers) == list(VENDORS)
    pc = config.provider("perfectcorp")
    assert (pc.base_url, pc.api_key_env) == (
        "https://yce-api-01.makeupar.com",
        "PERFECTCORP_API_KEY",
    )
    assert pc.rate_limit is not None
    assert (pc.rate_limit.requests, pc.rate_limit.per_seconds, pc.rate_limit.qps) == (250, 300, 5)
    assert (pc.polling_window_seconds, pc.task_deadline_seconds) == (10.0, 600.0)
    ailab = config.provider("ailab")
    assert (ailab.rate_limit, ailab.polling_window_seconds) == (None, None)
    assert (
        ailab.task_deadline_seconds == ProviderConfig.model_fields["task_deadline_seconds"].default
    )


def _vendor_literals(path: Path) -> list[tuple[int, str]]:
    """String constants (f-string pieces included) that are a vendor name or an op name."""
    names = tuple(VENDORS)
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Constant) and isinstance(node.value, str):
            text = node.value.strip().lower()
            if text in names or text.startswith(tuple(f"{n}/" for n in names)):
                found.append((node.lineno, node.value))
    return found


def test_no_module_outside_the_registry_quotes_a_vendor_name() -> None:
    files = [*PIPELINE.glob("*.py"), *PIPELINE.glob("providers/*.py")]
    assert len(files) > 20
    offenders = {
        str(p.relative_to(PIPELINE)): hits
        for p in files
        if str(p.relative_to(PIPELINE)) not in ALLOWED and (hits := _vendor_literals(p))
    }
    assert offenders == {}


def test_the_scan_finds_a_quoted_name(tmp_path: Path) -> None:
    # The scan above can fail: a comparison and an f-string piece are both caught.
    sample = tmp_path / "sample.py"
    sample.write_text('if vendor == "ailab":\n    x = f"perfectcorp/ai-smile {y}"\n# ailab\n')
    assert _vendor_literals(sample) == [(1, "ailab"), (2, "perfectcorp/ai-smile ")]


def test_loading_the_config_imports_no_provider() -> None:
    code = (
        "import sys\n"
        "from pipeline.config import Config\n"
        "Config()\n"
        "print(sorted(m for m in sys.modules if m.startswith('pipeline.providers.')))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT
    ).stdout
    assert "pipeline.providers.ailab" not in out and "pipeline.providers.perfectcorp" not in out


def test_unknown_vendor_messages_are_unchanged(tmp_path: Path) -> None:
    path = tmp_path / "config.yaml"
    path.write_text("providers:\n  openai:\n    base_url: x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2: providers.openai: not an allowed key: "
        "input should be 'ailab' or 'perfectcorp' (got 'openai')"
    )


# ------------------------------------------------------------------ a third vendor


class FakeProvider:
    """What build_provider hands a vendor's factory, kept to compare."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.args = args
        self.kwargs = kwargs


def _acme_rule(http_status: int, code: str | None) -> bool:
    return code == "SLOW_DOWN"


def _acme_help(code: str, vendor_name: str) -> CodeHelp | None:
    if code == "ACME_BROKE":
        return CodeHelp(f"{vendor_name} broke.", "Wait.")
    return None


ACME = VendorSpec(
    name="acme",
    display_name="Acme Faces",
    price_unit="credits",
    defaults=ProviderDefaults(
        base_url="https://api.acme.test",
        api_key_env="ACME_API_KEY",
        poll_interval_seconds=2.0,
        rate_limit={"qps": 3},
        task_deadline_seconds=120.0,
    ),
    requests_per_item=3,
    provider=FakeProvider,
    rate_limit_rule=_acme_rule,
    explain=_acme_help,
)


@pytest.fixture
def acme(monkeypatch: pytest.MonkeyPatch) -> VendorSpec:
    monkeypatch.setitem(VENDORS, "acme", ACME)
    return ACME


def test_a_third_vendor_gets_config_defaults_and_overrides(
    acme: VendorSpec, tmp_path: Path
) -> None:
    assert vendors.vendor_names() == ("ailab", "perfectcorp", "acme")
    default = Config().provider("acme")
    assert (default.base_url, default.api_key_env, default.poll_interval_seconds) == (
        "https://api.acme.test",
        "ACME_API_KEY",
        2.0,
    )
    assert default.rate_limit is not None and default.rate_limit.qps == 3
    assert default.task_deadline_seconds == 120.0
    path = tmp_path / "config.yaml"
    path.write_text("providers:\n  acme:\n    api_key_env: OTHER_KEY\n", encoding="utf-8")
    given = load_config(path).provider("acme")
    assert (given.base_url, given.api_key_env) == ("https://api.acme.test", "OTHER_KEY")
    path.write_text("providers:\n  openai:\n    base_url: x\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == (
        f"{path}:2: providers.openai: not an allowed key: "
        "input should be 'ailab', 'perfectcorp' or 'acme' (got 'openai')"
    )


def _manifest(tmp_path: Path, max_credits: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(
        textwrap.dedent(
            f"""\
            inputs: "*.jpg"
            operations: [{{op: ailab/face-beauty-pro}}]
            output: out
            max_credits: {max_credits}
            """
        ),
        encoding="utf-8",
    )
    return path


def test_a_third_vendor_is_a_max_credits_key(acme: VendorSpec, tmp_path: Path) -> None:
    assert load_manifest(_manifest(tmp_path, "{acme: 7}")).max_credits == {"acme": 7.0}
    assert load_manifest(_manifest(tmp_path, "4")).max_credits == {
        "ailab": 4.0,
        "perfectcorp": 4.0,
        "acme": 4.0,
    }
    with pytest.raises(ManifestError) as info:
        load_manifest(_manifest(tmp_path, "{openai: 5}"))
    assert str(info.value) == (
        f"{tmp_path / 'job.yaml'}:4: max_credits.openai: not an allowed key: "
        "input should be 'ailab', 'perfectcorp' or 'acme' (got 'openai')"
    )


def test_without_it_the_third_vendor_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ManifestError) as info:
        load_manifest(_manifest(tmp_path, "{acme: 7}"))
    assert "max_credits.acme: not an allowed key: input should be 'ailab' or 'perfectcorp'" in (
        str(info.value)
    )


def test_build_provider_uses_the_registered_factory(acme: VendorSpec) -> None:
    config = Config()
    session = cast(aiohttp.ClientSession, object())  # the factory only keeps it
    stats = RequestStats()
    budget = RateBudget(config.provider("acme").rate_limit)
    provider = build_provider(
        "acme", session, config.provider("acme"), "k-123", config, stats, budget
    )
    assert isinstance(provider, FakeProvider)
    assert provider.args == (
        session,
        config.provider("acme"),
        "k-123",
        config.timeouts,
        stats,
        budget.acquire,
    )
    assert provider.kwargs == {"network": config.network}


def test_rate_limit_rule_and_code_help_come_from_the_entry(acme: VendorSpec) -> None:
    assert is_rate_limit_code("acme", 200, "SLOW_DOWN") is True
    assert is_rate_limit_code("acme", 429, None) is False  # its rule, not a 429 default
    assert explain_code("ACME_BROKE", "acme") == CodeHelp("Acme Faces broke.", "Wait.")
    assert explain_code("ACME_BROKE") == CodeHelp("Acme Faces broke.", "Wait.")  # all tried
    # A code of another vendor is not looked up in its table when the vendor is given.
    assert explain_code("ERROR_NOT_ENOUGH_CREDITS", "acme") != explain_code(
        "ERROR_NOT_ENOUGH_CREDITS", "ailab"
    )


def test_an_unknown_vendor_is_a_key_error_naming_the_known_ones() -> None:
    with pytest.raises(KeyError, match="unknown vendor 'acme'; known: ailab, perfectcorp"):
        vendors.get_vendor("acme")
