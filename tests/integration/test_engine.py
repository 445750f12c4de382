"""The whole pipeline against the emulator over real HTTP on loopback."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import AILAB_KEY, fast_config

pytestmark = pytest.mark.timeout(90)


async def _run(
    manifest_path: Path, emu: RunningEmulator, **options: Any
) -> tuple[int, dict[str, Any], list[dict[str, Any]]]:
    manifest = load_manifest(manifest_path)
    result = await run_job(manifest, fast_config(emu.base_url), RunOptions(quiet=True, **options))
    lines = [json.loads(x) for x in (manifest.output / "results.jsonl").read_text().splitlines()]
    return result.exit_code, result.report, lines


async def test_all_four_operations_succeed(
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(4)
    code, report, lines = await _run(write_manifest(), emulator)
    assert code == 0
    assert report["counts"] == {
        "total": 16, "succeeded": 16, "failed": 0, "failed_earlier": 0, "skipped": 0,
        "interrupted": 0,
    }  # fmt: skip
    assert set(report["by_operation"]) == {
        "ailab/emotion-editor", "ailab/face-beauty-pro", "ailab/face-swap", "perfectcorp/ai-smile",
    }  # fmt: skip
    for line in lines:
        assert line["status"] == "succeeded" and line["error"] is None
        out = Path(line["output"])
        assert out.is_file() and out.stat().st_size > 0
        assert out.read_bytes()[:3] == b"\xff\xd8\xff"
    async_lines = [x for x in lines if x["operation"] != "ailab/emotion-editor"]
    assert all(x["task_id"] for x in async_lines)
    stats = emulator.stats()
    assert stats["ailab"]["charged"] == 12 and stats["perfectcorp"]["charged"] == 4
    assert report["credits_spent"]["ailab"]["amount"] == 4 * (12 + 15 + 5)
    assert report["requests"]["perfectcorp"]["upload"] == 4
    # Nothing leaked the key into what we wrote.
    out_dir = Path(lines[0]["output"]).parents[4]
    for name in ("results.jsonl", "report.json"):
        assert AILAB_KEY not in (out_dir / name).read_text()


async def test_rerun_skips_everything_and_sends_nothing(
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(3)
    manifest = write_manifest()
    assert (await _run(manifest, emulator))[0] == 0
    before = emulator.stats()
    code, report, _ = await _run(manifest, emulator)
    assert code == 0
    assert report["counts"] == {
        "total": 12, "succeeded": 0, "failed": 0, "failed_earlier": 0, "skipped": 12,
        "interrupted": 0,
    }  # fmt: skip
    after = emulator.stats()
    assert after["ailab"]["submits"] == before["ailab"]["submits"]
    assert after["perfectcorp"]["submits"] == before["perfectcorp"]["submits"]


async def test_moved_inputs_redo_nothing_and_new_params_redo_only_their_variants(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(3)
    ops = [{"op": "ailab/emotion-editor", "params": {"service_choice": ["big_grin"]}}]
    assert (await _run(write_manifest(ops), emulator))[0] == 0
    (tmp_path / "in").rename(tmp_path / "moved")
    moved = write_manifest(ops, inputs=["moved/**/*.jpg", "moved/**/*.png"])
    code, report, _ = await _run(moved, emulator)
    assert (code, report["counts"]["skipped"], report["counts"]["succeeded"]) == (0, 3, 0)
    ops2 = [{"op": "ailab/emotion-editor", "params": {"service_choice": ["big_grin", "sad"]}}]
    code, report, _ = await _run(
        write_manifest(ops2, inputs=["moved/**/*.jpg", "moved/**/*.png"]), emulator
    )
    assert (code, report["counts"]["skipped"], report["counts"]["succeeded"]) == (0, 3, 3)
    assert emulator.stats()["ailab"]["submits"] == 6


async def test_permanent_errors_fail_items_and_the_run_goes_on(
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu = await emulator_factory(permanent_error_rate=1.0)
    portraits(3)
    code, report, lines = await _run(write_manifest(), emu)
    assert code == 1
    assert report["counts"]["failed"] == 12 and report["counts"]["total"] == 12
    assert {x["error"]["kind"] for x in lines} == {"permanent"}
    codes = set(report["errors_by_code"])
    assert "ERROR_NO_FACE_IN_FILE" in codes and "error_no_face" in codes
    assert all(x["attempts"] == 1 for x in lines)  # permanent: never retried
    # A rerun does not send them again unless asked to.
    stats = emu.stats()
    code, report, _ = await _run(write_manifest(), emu)
    # Carried over, not failed in this run: exit 0 (issue 11 point 4).
    assert code == 0 and emu.stats()["ailab"]["requests"] == stats["ailab"]["requests"]
    assert (report["counts"]["failed"], report["counts"]["failed_earlier"]) == (0, 12)
    code, report, _ = await _run(write_manifest(), emu, retry_failed=True)
    assert emu.stats()["ailab"]["requests"] > stats["ailab"]["requests"]


@pytest.mark.parametrize(
    ("knobs", "expected_code"),
    [
        ({"ailab_api_keys": ("someone-else",)}, "ERROR_USER_NOT_EXISTS"),
        ({"ailab_credits": {"common": 0.0}}, "ERROR_NOT_ENOUGH_CREDITS"),
        ({"perfectcorp_units": 0.0}, "CreditInsufficiency"),
    ],
)
async def test_fatal_errors_stop_the_run_with_exit_3(
    knobs: dict[str, Any],
    expected_code: str,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu = await emulator_factory(**knobs)
    portraits(6)
    code, report, lines = await _run(write_manifest(concurrency=2), emu)
    assert code == 3
    assert report["aborted"]["code"] == expected_code
    assert report["aborted"]["kind"] == "fatal"
    assert emu.stats()["ailab"]["charged"] + emu.stats()["perfectcorp"]["charged"] < 24
    # Items the stopped run did not finish are interrupted, not failed (issue 8 point 11).
    assert all(x["status"] in {"succeeded", "failed", "interrupted"} for x in lines)


async def test_faults_every_item_still_succeeds_with_exact_counts(
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu = await emulator_factory(transient_error_rate=0.3, disconnect_rate=0.05, seed=7)
    portraits(12)
    code, report, lines = await _run(write_manifest(max_attempts=10), emu)
    # Issue 8 point 3: a dropped connection may have been billed, so a sync item whose
    # send goes unanswered twice stops there (OUTCOME_UNKNOWN) instead of paying again.
    gave_up = [x for x in lines if x["status"] == "failed"]
    assert all(x["error"]["code"] == "OUTCOME_UNKNOWN" for x in gave_up), gave_up
    assert all(x["possibly_billed"] for x in gave_up)
    assert code == (1 if gave_up else 0), report["errors_by_code"]
    assert report["counts"] == {
        "total": 48, "succeeded": 48 - len(gave_up), "failed": len(gave_up),
        "failed_earlier": 0, "skipped": 0, "interrupted": 0,
    }  # fmt: skip
    done = [x for x in lines if x["status"] == "succeeded"]
    assert len(done) == 48 - len(gave_up) and all(Path(x["output"]).is_file() for x in done)
    stats = emu.stats()
    assert stats["ailab"]["rejected"] > 0  # faults really happened
    # Nothing was paid twice (the emulator drops connections before doing the work).
    lost = Counter(x["operation"].split("/")[0] for x in gave_up)
    assert stats["ailab"]["charged"] == 36 - lost["ailab"]
    assert stats["perfectcorp"]["charged"] == 12 - lost["perfectcorp"]


async def test_task_failures_are_resubmitted(
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu = await emulator_factory(task_failure_rate=0.4, seed=3)
    portraits(6)
    code, _report, lines = await _run(write_manifest(max_attempts=10), emu)
    assert code == 0
    assert max(x["attempts"] for x in lines) > 1


async def test_emulate_option_runs_in_process(
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AILAB_API_KEY")
    monkeypatch.delenv("PERFECTCORP_API_KEY")
    portraits(2)
    manifest = load_manifest(
        write_manifest([{"op": "ailab/emotion-editor", "params": {"service_choice": 14}}])
    )
    from pipeline.config import Config

    result = await run_job(manifest, Config(), RunOptions(quiet=True, emulate=True))
    assert result.exit_code == 0 and result.report["counts"]["succeeded"] == 2


async def test_many_copies_of_few_photos_are_sent_once_each_without_a_hitch(
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    tmp_path: Path,
) -> None:
    # Copies of one photo land in different batches while the first is in flight: a
    # later batch's journal read must not roll back the status this run holds for it
    # (that made the next change an illegal move and crashed the run).
    from tests.conftest import make_portrait

    emu = await emulator_factory(sync_seconds=0.02)
    originals = [make_portrait(tmp_path / f"o{i}.jpg", seed=i) for i in range(4)]
    for n in range(1200):
        target = tmp_path / "in" / f"d{n % 7}" / f"copy{n:05d}.jpg"
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_bytes(originals[n % 4].read_bytes())
    code, report, lines = await _run(
        write_manifest([{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}],
                       concurrency=32),
        emu,
    )  # fmt: skip
    assert code == 0, report["errors_by_code"]
    assert len(lines) == 1200
    assert report["counts"]["succeeded"] == 4 and report["counts"]["skipped"] == 1196
    assert sum(x["duplicate_of"] is not None for x in lines) == 1196
    assert emu.stats()["ailab"]["submits"] == 4 and emu.stats()["ailab"]["charged"] == 4
