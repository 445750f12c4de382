"""Smoke-sized runs of every pace benchmark (bench/pace.py), so none of them can rot.

Each test runs the benchmark the way a person does (``python bench/pace.py --json F
BENCHMARK ...``, which starts the emulator, ``pipeline run`` and the plain loop as
processes) at a size of a few items, then checks that it printed its table and that
both clients' counts are right. No timed assertions: figures only have to exist.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
PACE = ROOT / "bench" / "pace.py"


def pace(tmp_path: Path, *args: str) -> tuple[dict[str, Any], str]:
    """Run one benchmark; returns (its JSON figures, what it printed)."""
    out = tmp_path / "figures.json"
    argv = [sys.executable, str(PACE), "--workdir", str(tmp_path / "work"), "--json", str(out)]
    done = subprocess.run([*argv, *args], capture_output=True, text=True, timeout=55, check=False)
    assert done.returncode == 0, done.stderr[-3000:]
    figures: dict[str, Any] = json.loads(out.read_text())
    return figures, done.stdout


def assert_measured(fig: dict[str, Any]) -> None:
    """The process figures every client run must have."""
    assert fig["wall_seconds"] > 0
    assert fig["cpu_seconds"] > 0
    assert fig["peak_rss_mb"] > 0
    assert fig["timed_out"] is False


def assert_all_done(fig: dict[str, Any], n: int, *, vendor_submits: int | None = None) -> None:
    """Every item succeeded, its result is on disk, the vendor billed each input once."""
    assert_measured(fig)
    assert (fig["exit_code"], fig["succeeded"], fig["outputs_on_disk"]) == (0, n, n)
    submits = n if vendor_submits is None else vendor_submits
    assert fig["vendor_submits"] == submits
    assert (fig["charged"], fig["charged_inputs"], fig["paid_twice"]) == (submits, submits, 0)


def test_async_face_swap(tmp_path: Path) -> None:
    figures, printed = pace(
        tmp_path, "async", "--cases", "6x3", "--task-seconds", "0.2", "--poll-interval", "0.05"
    )
    (case,) = figures["async"]["cases"]
    assert (case["N"], case["C"], case["ideal_seconds"]) == (6, 3, 0.4)
    for client in ("pipeline", "plain"):
        assert_all_done(case[client], 6)
        assert case[client]["wall_over_ideal"] > 0
        assert case[client]["polls_per_task"] >= 1
    assert case["throughput_ratio"] > 0
    assert "1. async face swap" in printed
    assert "N=6 C=3: throughput pipeline/plain" in printed


def test_sync_emotion_editor(tmp_path: Path) -> None:
    figures, printed = pace(tmp_path, "sync", "--n", "12", "--concurrency", "4")
    result = figures["sync"]
    for client in ("pipeline", "plain"):
        assert_all_done(result[client], 12)
        assert result[client]["cpu_ms_per_item"] > 0
        assert result[client]["polls_per_task"] is None  # sync: nothing to poll
    assert result["throughput_ratio"] > 0
    assert "2. sync emotion editor" in printed


def test_alternated_pairs_report_each_pair_and_their_median(tmp_path: Path) -> None:
    figures, printed = pace(tmp_path, "sync", "--n", "6", "--concurrency", "3", "--repeat", "3")
    result = figures["sync"]
    assert len(result["pairs"]) == 3
    ratios = []
    for pair in result["pairs"]:
        for client in ("pipeline", "plain"):
            assert_all_done(pair[client], 6)
        ratios.append(pair["pipeline"]["items_per_second"] / pair["plain"]["items_per_second"])
    assert abs(result["throughput_ratio"] - sorted(ratios)[1]) < 1e-3  # figures are rounded
    walls = sorted(pair["pipeline"]["wall_seconds"] for pair in result["pairs"])
    assert result["pipeline"]["wall_seconds"] == walls[1]  # the median-wall run is shown
    assert "3 alternated pairs: throughput pipeline/plain" in printed


def test_rerun_with_everything_done(tmp_path: Path) -> None:
    figures, printed = pace(
        tmp_path, "rerun", "--n", "8", "--big-n", "2", "--big-mb", "0.3", "--concurrency", "4"
    )
    sets = figures["rerun"]["sets"]
    assert set(sets) == {"tiny", "0.3MB"}
    for tag, n in (("tiny", 8), ("0.3MB", 2)):
        runs = sets[tag]
        assert_all_done(runs["pipeline first"], n)
        assert_all_done(runs["plain first"], n)
        rerun = runs["pipeline rerun"]
        # Nothing sent again: the emulator was reset before the rerun and saw no submit.
        assert_all_done(rerun, n, vendor_submits=0)
        assert rerun["skipped"] == n
        assert rerun["report_wall_seconds"] is not None
        plain = runs["plain rerun"]
        assert_all_done(plain, n, vendor_submits=0)
        assert plain["skipped"] == n
    assert "3. rerun with every item done" in printed


def test_peak_rss_first_run_and_rerun(tmp_path: Path) -> None:
    figures, printed = pace(tmp_path, "rss", "--sizes", "3,6", "--concurrency", "3")
    result = figures["rss"]
    assert result["sizes"] == [3, 6]
    for size in ("3", "6"):
        runs = result["runs"][size]
        assert set(runs) == {"pipeline first", "pipeline rerun", "plain first", "plain rerun"}
        assert_all_done(runs["pipeline first"], int(size))
        assert_all_done(runs["pipeline rerun"], int(size), vendor_submits=0)
    assert set(result["growth"]) == {
        "pipeline first", "pipeline rerun", "plain first", "plain rerun",
    }  # fmt: skip
    assert all(g is not None and g > 0 for g in result["growth"].values())
    assert "growth 3 -> 6 inputs" in printed


def test_binding_budget(tmp_path: Path) -> None:
    figures, printed = pace(
        tmp_path,
        "budget",
        "--n", "4", "--concurrency", "4", "--requests", "30", "--per-seconds", "3",
        "--qps", "10", "--task-seconds", "0.2", "--poll-interval", "0.1", "--window", "5",
    )  # fmt: skip
    result = figures["budget"]
    assert result["polls_per_task_bound"] == 3  # ceil(0.2 / 0.1) + 1
    for client in ("pipeline", "plain"):
        fig = result[client]
        assert_all_done(fig, 4)
        assert fig["expired"] == 0
        assert fig["admitted"] == fig["vendor_requests"] - fig["rate_limited"]
        assert 0 < fig["budget_used"] <= 1
        assert 0 <= fig["share_429"] < 1
    assert "5. binding budget" in printed


def test_polling_window(tmp_path: Path) -> None:
    figures, printed = pace(
        tmp_path,
        "window",
        "--n", "6", "--concurrency", "3", "--window", "3", "--task-seconds", "0.2",
        "--poll-interval", "0.05",
    )  # fmt: skip
    result = figures["window"]
    for client in ("pipeline", "plain"):
        assert_all_done(result[client], 6)
        assert result[client]["expired"] == 0
    assert result["pipeline"]["report_credits_spent"] == 6
    assert "6. Perfect Corp polling window 3 s" in printed
