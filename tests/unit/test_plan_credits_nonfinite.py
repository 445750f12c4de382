"""``pipeline run --dry-run`` when a vendor's credit answer holds a number that is not
finite (``NaN``, ``Infinity``, ``-Infinity``, ``1e999``; JSON parsers accept them all).

Such a balance is unknown: the dry run says so in one line naming the vendor and the
field, exits 0 like any other dry run, and never calls it enough (nor short). Each
case is the real ``pipeline`` command against a scripted vendor on loopback serving
the crafted credit answer (docs/vendors.md, "AILab: credits and prices" and "Perfect
Corp: units and prices" for the documented shapes).
"""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.providers.ailab import CREDITS_PATH as AILAB_CREDITS
from pipeline.providers.perfectcorp import CREDIT_PATH as PERFECTCORP_CREDITS
from tests.conftest import AILAB_KEY, PERFECTCORP_KEY, config_yaml
from tests.providers._server import Reply, Vendor, start_vendor

pytestmark = pytest.mark.timeout(60)

OPS: dict[str, dict[str, Any]] = {
    "ailab": {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}},
    "perfectcorp": {"op": "perfectcorp/ai-smile", "params": {"expression_type": "teeth"}},
}
CREDITS = {"ailab": AILAB_CREDITS, "perfectcorp": PERFECTCORP_CREDITS}
# What one item of OPS costs (docs/vendors.md, "The four operations").
NEED = {"ailab": "12 credits", "perfectcorp": "1 units"}
FIELD = {"ailab": "data[].balance", "perfectcorp": "results[].amount_dec (or amount)"}
POOL = {"ailab": "common", "perfectcorp": "ApiSubsToken"}

# The number as it is written in the answer's JSON -> how the dry run names it.
NON_FINITE = {
    "NaN": "NaN",
    "Infinity": "Infinity",
    "-Infinity": "-Infinity",
    "1e999": "Infinity",  # overflows to infinity when parsed
}

_ENVELOPE = (
    '"request_id":"req-1","log_id":"log-1","error_code":0,'
    '"error_detail":{"status_code":200,"code":"","code_message":"","message":""}'
)


def ailab_credits(*pools: tuple[str, str]) -> str:
    """An AILab credit answer, each pool's ``balance`` written verbatim."""
    entries = ",".join(
        f'{{"unique_sign":"{sign}","name":"{sign}","balance":{raw},"total":2000.0,'
        f'"last_recharge_balance":2000.0,"balance_warning":100.0,'
        f'"first_buy_time":1735689600,"last_update_time":1758240000}}'
        for sign, raw in pools
    )
    return f'{{{_ENVELOPE},"data":[{entries}]}}'


def perfectcorp_credits(*entries: tuple[str, str]) -> str:
    """A Perfect Corp credit answer, each entry's ``amount_dec`` written verbatim."""
    body = ",".join(
        f'{{"id":13105541279084536,"type":"{kind}","amount":10,"amount_dec":{raw},'
        f'"expiry":1704789135000}}'
        for kind, raw in entries
    )
    return f'{{"status":200,"results":[{body}]}}'


def credit_answer(vendor: str, raw: str) -> str:
    if vendor == "ailab":
        return ailab_credits(("common", raw))
    return perfectcorp_credits(("ApiSubsToken", raw))


@pytest.fixture
async def vendor() -> AsyncIterator[Vendor]:
    async for v in start_vendor():
        yield v


async def dry_run(
    tmp_path: Path, vendor: Vendor, manifest: Path, name: str, answer: str
) -> tuple[subprocess.CompletedProcess[bytes], list[str]]:
    """Serve ``answer`` as ``name``'s credit answer; run the dry run; its exit and its
    lines about ``name``'s balance."""
    vendor.route(
        "GET",
        CREDITS[name],
        Reply(body=answer, headers={"Content-Type": "application/json"}),
    )
    cfg = config_yaml(vendor.url(), tmp_path / "config.yaml")
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY})
    done = await anyio.run_process(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg), "--dry-run"],
        check=False,
        env=env,
    )
    lines = [
        line
        for line in done.stdout.decode().splitlines()
        if line.lstrip().startswith(f"{name} balance")
    ]
    return done, lines


def assert_unknown(done: subprocess.CompletedProcess[bytes], lines: list[str]) -> str:
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "internal error" not in out and "Traceback" not in out, out
    assert len(lines) == 1, out
    line = lines[0]
    assert "enough" not in line, line  # neither "enough" nor "NOT enough"
    assert "the balance is unknown" in line, line
    return line


@pytest.mark.parametrize("raw", list(NON_FINITE))
@pytest.mark.parametrize("name", ["ailab", "perfectcorp"])
async def test_dry_run_says_a_non_finite_balance_is_unknown(
    tmp_path: Path,
    vendor: Vendor,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    name: str,
    raw: str,
) -> None:
    portraits(1)
    manifest = write_manifest([OPS[name]])
    done, lines = await dry_run(tmp_path, vendor, manifest, name, credit_answer(name, raw))
    line = assert_unknown(done, lines)
    assert line == (
        f"  {name} balance: unknown: the vendor's credit answer has {FIELD[name]} = "
        f"{NON_FINITE[raw]} (pool {POOL[name]}), not a finite number, so the balance is "
        f"unknown; not compared with the {NEED[name]} needed"
    )
    # The credit query was the only request: nothing billable was sent.
    assert {s.path for s in vendor.seen} == {CREDITS[name]}
    assert not (tmp_path / "out" / "journal.sqlite").exists()


@pytest.mark.parametrize("raw", ['"NaN"', '"Infinity"', '"1e999"'])
async def test_dry_run_says_a_non_finite_numeric_string_is_unknown(
    tmp_path: Path,
    vendor: Vendor,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    raw: str,
) -> None:
    # Numeric strings are read as numbers too (http.as_float): "NaN" is no balance.
    portraits(1)
    manifest = write_manifest([OPS["ailab"]])
    done, lines = await dry_run(tmp_path, vendor, manifest, "ailab", credit_answer("ailab", raw))
    assert "data[].balance = " in assert_unknown(done, lines)


async def test_one_non_finite_pool_makes_the_whole_balance_unknown(
    tmp_path: Path,
    vendor: Vendor,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    # 500 readable credits in `common` do not make the sum readable.
    portraits(1)
    manifest = write_manifest([OPS["ailab"]])
    answer = ailab_credits(("common", "500.0"), ("portrait_expression_editing", "NaN"))
    done, lines = await dry_run(tmp_path, vendor, manifest, "ailab", answer)
    line = assert_unknown(done, lines)
    assert "data[].balance = NaN (pool portrait_expression_editing)" in line, line


async def test_finite_pools_that_add_up_to_infinity_are_unknown(
    tmp_path: Path,
    vendor: Vendor,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(1)
    manifest = write_manifest([OPS["perfectcorp"]])
    answer = perfectcorp_credits(("ApiSubsToken", "1e308"), ("ApiPaygToken", "1e308"))
    done, lines = await dry_run(tmp_path, vendor, manifest, "perfectcorp", answer)
    line = assert_unknown(done, lines)
    assert "results[].amount_dec (or amount) adding up to Infinity" in line, line


async def test_a_finite_balance_is_still_compared(
    tmp_path: Path,
    vendor: Vendor,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(1)
    manifest = write_manifest([OPS["perfectcorp"]])
    done, lines = await dry_run(
        tmp_path, vendor, manifest, "perfectcorp", credit_answer("perfectcorp", "0.5")
    )
    assert done.returncode == 0, done.stderr
    assert lines == ["  perfectcorp balance: 0.50 units; NOT enough: 1 needed"]
