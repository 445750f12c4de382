"""``pipeline run --dry-run``: the plan, the journal's view and the balances; nothing billable."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.config import RateLimit
from pipeline.emulator import RunningEmulator
from tests.conftest import AILAB_KEY, PERFECTCORP_KEY, config_yaml, make_portrait

pytestmark = pytest.mark.timeout(120)

BILLABLE = ("submits", "uploads", "charged")


async def _cli(*args: str, **env_extra: str) -> subprocess.CompletedProcess[bytes]:
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY})
    env.update(env_extra)
    for name, value in env_extra.items():
        if not value:
            env.pop(name)
    return await anyio.run_process([sys.executable, "-m", "pipeline", *args], check=False, env=env)


async def test_dry_run_counts_prices_and_balances_and_sends_nothing_billable(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(
        ailab_credits={"common": 100.0}, perfectcorp_units=50
    )
    portraits(3)
    limit = RateLimit(requests=250, per_seconds=300, qps=5)
    cfg = config_yaml(emu.base_url, tmp_path / "config.yaml", rate_limit=limit)
    manifest = write_manifest(max_credits={"ailab": 500})
    done = await _cli("run", str(manifest), "--config", str(cfg), "--dry-run")
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    assert "inputs: 3; variants: 4" in out
    assert "work items: 12; to send: 12" in out
    # Documented prices: emotion 12, beauty 15, swap 5 credits; smile 1 unit.
    assert (
        "ailab: expected spend if every item succeeds: 96 credits (max_credits caps it at 500)"
        in out
    )
    assert "perfectcorp: expected spend if every item succeeds: 3 units" in out
    assert "ailab balance: 100 credits; NOT enough: 96 needed" not in out
    assert "ailab balance: 100 credits; enough" in out
    assert "perfectcorp balance: 50 units; enough" in out
    assert "under its budget of 250 per 300 s and 5/s" in out
    stats = emu.stats()
    for vendor in ("ailab", "perfectcorp"):
        for counter in BILLABLE:
            assert stats[vendor].get(counter, 0) == 0, (vendor, counter)
    assert not (tmp_path / "out" / "journal.sqlite").exists()


async def test_dry_run_after_a_run_knows_what_is_done(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(ailab_credits={"common": 20.0})
    portraits(3)
    cfg = config_yaml(emu.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(
        ops=[{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}]
    )
    done = await _cli("run", str(manifest), "--config", str(cfg), "--quiet")
    assert done.returncode == 3  # 20 credits pay for one 12-credit edit, then none left
    portraits(2, start=3)  # two new inputs since
    submits = emu.stats()["ailab"]["submits"]
    done = await _cli("run", str(manifest), "--config", str(cfg), "--dry-run")
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    assert "5 item(s), 1 already done, 4 to send" in out
    assert "ailab: expected spend if every item succeeds: 48 credits" in out
    assert "ailab balance: 8 credits; NOT enough: 48 needed" in out
    assert emu.stats()["ailab"]["submits"] == submits


async def test_dry_run_without_keys_says_it_did_not_ask(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(1)
    cfg = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    done = await _cli(
        "run", str(write_manifest()), "--config", str(cfg), "--dry-run",
        AILAB_API_KEY="", PERFECTCORP_API_KEY="",
    )  # fmt: skip
    out = done.stdout.decode()
    assert done.returncode == 0, done.stderr
    assert "ailab balance: not asked: AILAB_API_KEY is not set" in out
    assert emulator.stats()["ailab"]["requests"] == 0


async def test_dry_run_keys_items_by_content_like_the_run(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    paths = portraits(3)
    cfg = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(
        ops=[{"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}}]
    )
    done = await _cli("run", str(manifest), "--config", str(cfg), "--quiet")
    assert done.returncode == 0, done.stderr
    # Same name, new photo: the run will send it, so the plan must count it.
    make_portrait(paths[0], seed=500)
    done = await _cli("run", str(manifest), "--config", str(cfg), "--dry-run")
    assert "3 item(s), 2 already done, 1 to send" in done.stdout.decode(), done.stdout


async def test_dry_run_reports_a_refused_balance_query_without_the_key(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(ailab_api_keys=["some-other-key"])
    portraits(1)
    cfg = config_yaml(emu.base_url, tmp_path / "config.yaml")
    done = await _cli("run", str(write_manifest()), "--config", str(cfg), "--dry-run")
    out = done.stdout.decode() + done.stderr.decode()
    assert done.returncode == 0, out
    assert "ailab balance: could not ask: ailab ERROR_USER_NOT_EXISTS" in out
    assert "perfectcorp balance: 100,000 units; enough" in out
    assert AILAB_KEY not in out
