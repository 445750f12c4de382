"""Running out of credits end to end: the run stops (exit 3), nothing is retried or lost.

AILab ``429 ERROR_NOT_ENOUGH_CREDITS`` is fatal, with the same status as the retryable
rate limits, so the code decides (docs/vendors.md, "AILab: error codes"); Perfect Corp
``400 CreditInsufficiency`` is fatal (docs/vendors.md, "Perfect Corp: error codes").
Both emulated vendors bill successes only.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import AILAB_KEY, PERFECTCORP_KEY, config_yaml, fast_config

pytestmark = pytest.mark.timeout(60)

EMOTION_OP = {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}
SMILE_OP = {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}}

# vendor, operation, scenario knobs leaving room for exactly two items, the fatal code.
OUT_OF_CREDITS = [
    pytest.param(
        "ailab", EMOTION_OP, {"ailab_credits": {"common": 30.0}}, "ERROR_NOT_ENOUGH_CREDITS",
        id="ailab-credits",
    ),
    pytest.param(
        "perfectcorp", SMILE_OP, {"perfectcorp_units": 2.0}, "CreditInsufficiency",
        id="perfectcorp-units",
    ),
]  # fmt: skip


def _sha(path: str | Path) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


async def _run(
    manifest_path: Path, emu: RunningEmulator
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    manifest = load_manifest(manifest_path)
    result = await run_job(manifest, fast_config(emu.base_url), RunOptions(quiet=True))
    lines = [json.loads(x) for x in (manifest.output / "results.jsonl").read_text().splitlines()]
    return result.exit_code, result.report, lines


@pytest.mark.parametrize(("vendor", "op", "knobs", "fatal_code"), OUT_OF_CREDITS)
async def test_out_of_credits_stops_the_run_and_a_topped_up_rerun_finishes_the_rest(
    vendor: str,
    op: dict[str, Any],
    knobs: dict[str, Any],
    fatal_code: str,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    inputs = portraits(5)
    # One worker: the two affordable items finish before the third is refused.
    manifest = write_manifest([op], concurrency=1)
    poor: RunningEmulator = await emulator_factory(**knobs)
    code, report, lines = await _run(manifest, poor)

    assert code == 3
    assert report["exit_code"] == 3
    assert report["aborted"]["code"] == fatal_code
    assert report["aborted"]["kind"] == "fatal"
    done = [x for x in lines if x["status"] == "succeeded"]
    refused = [x for x in lines if x["error"] and x["error"]["code"] == fatal_code]
    assert len(done) == 2 and all(Path(x["output"]).is_file() for x in done)
    assert len(refused) == 1
    assert refused[0]["status"] == "failed" and refused[0]["error"]["kind"] == "fatal"
    assert refused[0]["attempts"] == 1  # not retried like a rate limit
    assert report["counts"]["succeeded"] == 2
    assert report["errors_by_code"].get(fatal_code) == 1
    stats = poor.stats()[vendor]
    # Exactly one refused request: the failing submit was sent once, not retried.
    assert stats["rejected"] == 1 and stats["rate_limited"] == 0
    assert stats["charged"] == 2
    assert report["credits_spent"][vendor]["amount"] == stats["credits_spent"] > 0

    # Topped up (a fresh account), same output folder: only the rest is sent.
    rich: RunningEmulator = await emulator_factory()
    code, report, lines = await _run(manifest, rich)
    assert code == 0, report["errors_by_code"]
    assert report["counts"] == {
        "total": 5, "succeeded": 3, "skipped": 2, "failed": 0, "failed_earlier": 0,
        "interrupted": 0,
    }  # fmt: skip
    assert report["aborted"] is None
    by_input = {x["input"]: x for x in lines}
    for line in done:
        assert by_input[line["input"]]["status"] == "skipped"
        assert Path(line["output"]).is_file()
    rest = {_sha(p) for p in inputs} - {_sha(x["input"]) for x in done}
    assert rich.stats()[vendor]["submits_by_input"] == dict.fromkeys(sorted(rest), 1)
    assert report["credits_spent"][vendor]["amount"] == rich.stats()[vendor]["credits_spent"]


@pytest.mark.parametrize(("vendor", "op", "knobs", "fatal_code"), OUT_OF_CREDITS)
async def test_out_of_credits_with_workers_in_flight_is_not_retried(
    vendor: str,
    op: dict[str, Any],
    knobs: dict[str, Any],
    fatal_code: str,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(12)
    concurrency = 4
    emu: RunningEmulator = await emulator_factory(**knobs)
    code, report, lines = await _run(write_manifest([op], concurrency=concurrency), emu)
    assert code == 3 and report["aborted"]["code"] == fatal_code
    stats = emu.stats()[vendor]
    # At most one refusal per worker: a rate-limit style retry would send it again
    # and again (up to 100 times per item) before giving up.
    assert 1 <= stats["rejected"] <= concurrency
    assert stats["charged"] <= 2
    assert all(x["attempts"] <= 1 for x in lines)
    # Nothing claims success without having been paid for. (The converse, that every
    # paid sync result is kept, is test_a_sync_result_paid_for_during_an_abort_is_kept.)
    assert sum(x["status"] == "succeeded" for x in lines) <= stats["charged"]
    if vendor == "perfectcorp":
        # Every task the vendor may bill has its id journaled: a rerun resumes it.
        assert sum(x["task_id"] is not None for x in lines) >= stats["charged"]


async def test_a_sync_result_paid_for_during_an_abort_is_kept(
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(2)
    # Credits for one emotion edit; two workers: one slow sync call is in flight
    # (1 s) when the other is refused for credits and stops the run.
    emu: RunningEmulator = await emulator_factory(ailab_credits={"common": 12.0}, sync_seconds=1.0)
    code, report, lines = await _run(write_manifest([EMOTION_OP], concurrency=2), emu)
    assert code == 3 and report["aborted"]["code"] == "ERROR_NOT_ENOUGH_CREDITS"
    assert emu.stats()["ailab"]["charged"] == 1
    kept = [x for x in lines if x["status"] == "succeeded"]
    assert len(kept) == 1 and Path(kept[0]["output"]).is_file()


@pytest.mark.parametrize(
    ("vendor", "op", "knobs", "succeeded"),
    [
        # The first two AILab requests are served, then every submit is refused.
        pytest.param(
            "ailab", EMOTION_OP,
            {"fatal_error": "ERROR_NOT_ENOUGH_CREDITS", "fatal_after_requests": 2}, 2,
            id="ailab",
        ),
        # Perfect Corp's file upload is spared; the first task creation is refused.
        pytest.param(
            "perfectcorp", SMILE_OP, {"fatal_error": "CreditInsufficiency"}, 0, id="perfectcorp"
        ),
    ],
)  # fmt: skip
async def test_fatal_credit_error_injected_by_the_emulator(
    vendor: str,
    op: dict[str, Any],
    knobs: dict[str, Any],
    succeeded: int,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(4)
    emu: RunningEmulator = await emulator_factory(**knobs)
    code, report, lines = await _run(write_manifest([op], concurrency=1), emu)
    assert code == 3
    assert report["aborted"]["code"] == knobs["fatal_error"]
    assert report["aborted"]["kind"] == "fatal"
    stats = emu.stats()[vendor]
    assert stats["rejected"] == 1 and stats["charged"] == succeeded
    assert sum(x["status"] == "succeeded" for x in lines) == succeeded
    refused = [x for x in lines if x["error"] and x["error"]["kind"] == "fatal"]
    assert len(refused) == 1 and refused[0]["attempts"] == 1


async def test_cli_exits_3_naming_the_credit_error(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(3)
    emu: RunningEmulator = await emulator_factory(ailab_credits={"common": 12.0})
    config = config_yaml(emu.base_url, tmp_path / "config.yaml")
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY})
    manifest = write_manifest([EMOTION_OP], concurrency=1)
    done: subprocess.CompletedProcess[bytes] = await anyio.run_process(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(config)],
        check=False,
        env=env,
    )
    assert done.returncode == 3
    stderr = done.stderr.decode()
    assert "ERROR_NOT_ENOUGH_CREDITS" in stderr
    assert AILAB_KEY not in stderr + done.stdout.decode()
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["exit_code"] == 3 and report["counts"]["succeeded"] == 1


async def test_credits_spent_match_what_the_vendors_charged(
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(3)
    ops = [
        {"op": "ailab/emotion-editor", "params": {"service_choice": ["big_grin", "sad"]}},
        {"op": "ailab/face-beauty-pro", "params": {"smoothing": 70}},
        {"op": "ailab/face-beauty-pro", "params": {"whitening": 10, "task_type": "sync"}},
        {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}},
        {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
    ]
    code, report, _lines = await _run(write_manifest(ops), emulator)
    assert code == 0
    stats = emulator.stats()
    assert stats["ailab"]["charged"] == 3 * 5 and stats["perfectcorp"]["charged"] == 3
    assert report["credits_spent"] == {
        "ailab": {"amount": stats["ailab"]["credits_spent"], "unit": "credits"},
        "perfectcorp": {"amount": stats["perfectcorp"]["credits_spent"], "unit": "units"},
    }
    # The published prices (README): 12 + 12 + 15 + 15 + 5 credits, 1 unit, per input.
    assert stats["ailab"]["credits_spent"] == 3 * (12 + 12 + 15 + 15 + 5)
    assert stats["perfectcorp"]["credits_spent"] == 3
