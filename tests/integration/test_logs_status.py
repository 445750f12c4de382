"""What a run says, and what the folder says afterwards: the command as cron sees it.

Real ``pipeline`` processes against the emulator, with stderr a pipe (off a
terminal): timestamped start, progress and end lines; ``--log-json`` lines; ``-v``
on either side of the command name; ``--quiet``; ``--skip-if-locked`` and ``--strict``
exit codes; ``pipeline status`` and ``pipeline ops``. The README's crontab line,
systemd units and emulator config are run as written (paths moved under tmp_path).
"""

from __future__ import annotations

import configparser
import io
import json
import logging
import os
import re
import shlex
import shutil
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from datetime import datetime
from functools import partial
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml

from pipeline import logs
from pipeline.cli import main
from pipeline.emulator import RunningEmulator
from pipeline.htmlreport import explain_code
from pipeline.lock import OutputLock
from pipeline.manifest import load_manifest
from pipeline.operations import FILTER_CHOICES, OPERATIONS
from pipeline.progress import Progress, count_work_items, report_progress
from tests.conftest import AILAB_KEY, PERFECTCORP_KEY, config_yaml, make_portrait

pytestmark = pytest.mark.timeout(120)

README = Path(__file__).resolve().parents[2] / "README.md"
TS = r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d[+-]\d\d:\d\d"
BEAUTY = [{"op": "ailab/face-beauty-pro", "params": {"smoothing": 70}}]
SWAP_AND_SMILE = [
    {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}},
    {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
]


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY, **extra})
    return env


async def _cli(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "pipeline", *args], check=False, env=env or _env()
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _config(base_url: str, path: Path, interval: float = 0.05) -> Path:
    """The tests' fast config, with progress lines every ``interval`` seconds."""
    config_yaml(base_url, path)
    doc = yaml.safe_load(path.read_text())
    doc["reporting"] = {"progress_interval_seconds": interval}
    path.write_text(yaml.safe_dump(doc))
    return path


def _report(out: Path) -> dict[str, Any]:
    report: dict[str, Any] = json.loads((out / "report.json").read_text())
    return report


def _results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]


# -- off a terminal: start, progress, end ---------------------------------------------------


async def test_off_a_tty_lines_are_timestamped_with_start_progress_and_end(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    # Tasks take 0.3 s, far longer than the 0.05 s between progress lines, so the
    # first result already comes after a progress line is due.
    emu: RunningEmulator = await emulator_factory(task_seconds=0.3)
    portraits(4)
    cfg = _config(emu.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(SWAP_AND_SMILE)
    code, stdout, stderr = await _cli("run", str(manifest), "--config", str(cfg))
    assert code == 0, stderr
    lines = stderr.splitlines()
    assert all(re.match(rf"{TS} pipeline: ", line) for line in lines), stderr
    out = tmp_path / "out"
    assert re.fullmatch(
        rf"{TS} pipeline: start: job test \({re.escape(str(manifest))}\) -> "
        rf"{re.escape(str(out))}; config {re.escape(os.path.realpath(cfg))}; vendors "
        rf"ailab at {re.escape(emu.base_url)}, perfectcorp at {re.escape(emu.base_url)}; "
        rf"pid \d+",
        lines[0],
    ), lines[0]
    progress = [line for line in lines if " pipeline: progress: " in line]
    assert progress, stderr
    pattern = re.compile(
        rf"{TS} pipeline: progress: (\d+) of (\d+|\d+\+ \(discovering\)) finished "
        r"\((\d+) succeeded, (\d+) failed, (\d+) skipped\), (\d+) in flight, "
        r"(?:[\d.]+ items/s|rate unknown), spent (?:nothing|[a-z]+ [\d.]+ \w+(?:, [a-z]+ [\d.]+ \w+)*), "
        r"(\d+) 429s, ETA (?:unknown(?: \(still discovering inputs\))?|\w+)"
    )
    for line in progress:
        m = pattern.fullmatch(line)
        assert m, line
        finished, succeeded, failed, skipped = (int(m[i]) for i in (1, 3, 4, 5))
        assert finished == succeeded + failed + skipped <= 8
    assert re.fullmatch(
        rf"{TS} pipeline: end: exit 0 \(nothing failed in this run\); 8 succeeded, 0 failed, "
        r"0 skipped of 8; spent ailab 20 credits, perfectcorp 4 units; in \d+s",
        lines[-1],
    ), lines[-1]
    assert stdout.splitlines() == [
        f"test: 8 succeeded, 0 failed, 0 skipped of 8 (exit 0); spent ailab 20 credits, "
        f"perfectcorp 4 units; report: {out / 'report.html'}"
    ]
    assert AILAB_KEY not in stderr + stdout and PERFECTCORP_KEY not in stderr + stdout


async def test_log_json_lines_parse_with_the_fixed_keys(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(task_seconds=0.3)
    portraits(3)
    make_portrait(tmp_path / "in" / "b" / "tiny.jpg", seed=7, size=(40, 40))  # fails preflight
    cfg = _config(emu.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(BEAUTY)
    code, stdout, stderr = await _cli("run", str(manifest), "--config", str(cfg), "--log-json")
    assert code == 1, stderr
    records = [json.loads(line) for line in stderr.splitlines()]
    for rec in records:
        assert {"ts", "level", "event", "message"} <= rec.keys(), rec
        assert datetime.fromisoformat(rec["ts"]).utcoffset() is not None
        assert rec["level"] in {"debug", "info", "warning", "error"}
    events = [rec["event"] for rec in records]
    assert events[0] == "start" and events[-1] == "end" and "progress" in events, events
    start, end = records[0], records[-1]
    assert start["config"] == os.path.realpath(cfg) and start["emulator"] is False
    assert start["vendors"] == {"ailab": emu.base_url}
    assert start["manifest"] == str(manifest) and start["job"] == "test"
    report = _report(tmp_path / "out")
    assert end["exit_code"] == 1 and end["counts"] == report["counts"]
    assert end["counts"]["failed"] == 1 and end["counts"]["succeeded"] == 3
    assert end["credits_spent"] == {"ailab": {"amount": 45, "unit": "credits"}}
    assert end["report"] == str(tmp_path / "out" / "report.html")
    for rec in records:
        if rec["event"] == "progress":
            assert rec["finished"] == rec["succeeded"] + rec["failed"] + rec["skipped"]
            assert rec["total"] in (None, 4)
            assert {"in_flight", "rate_per_second", "credits_spent", "rate_limited"} <= rec.keys()
    warnings = [rec for rec in records if rec["level"] == "warning"]
    assert len(warnings) == 1 and "tiny.jpg" in warnings[0]["message"]
    assert stdout.count("\n") == 1 and "1 failed" in stdout  # the summary stays plain text


async def test_verbose_works_before_or_after_the_command(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(1)
    cfg = _config(emulator.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(SWAP_AND_SMILE[:1])
    # Each run has a fresh output folder, so each one submits (and logs the task id).
    seen = {}
    for n, args in enumerate(
        (["-v", "run", str(manifest)], ["run", str(manifest), "-v"], ["run", str(manifest)])
    ):
        shutil.rmtree(tmp_path / "out", ignore_errors=True)
        code, _, stderr = await _cli(*args, "--config", str(cfg))
        assert code == 0, stderr
        seen[n] = "task_id=" in stderr
    assert seen == {0: True, 1: True, 2: False}
    for args in (["-v", "status", str(tmp_path / "out")], ["status", str(tmp_path / "out"), "-v"]):
        code, stdout, _ = await _cli(*args)
        assert code == 0 and stdout.startswith("output folder: ")


async def test_quiet_keeps_the_summary_line_and_errors_only(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(2)
    make_portrait(tmp_path / "in" / "b" / "tiny.jpg", seed=7, size=(40, 40))
    cfg = _config(emulator.base_url, tmp_path / "config.yaml")
    code, stdout, stderr = await _cli(
        "run", str(write_manifest(BEAUTY)), "--config", str(cfg), "--quiet"
    )
    assert code == 1
    assert stderr == ""  # the failure is a warning: not an error
    assert stdout.splitlines() == [
        f"test: 2 succeeded, 1 failed, 0 skipped of 3 (exit 1); spent ailab 30 credits; "
        f"report: {tmp_path / 'out' / 'report.html'}"
    ]
    env = _env()
    del env["AILAB_API_KEY"]
    code, stdout, stderr = await _cli(
        "run", str(write_manifest(BEAUTY)), "--config", str(cfg), "--quiet", env=env
    )
    assert code == 2 and stdout == ""
    assert stderr.count("\n") == 1 and stderr.startswith("pipeline: error: ")
    assert "AILAB_API_KEY" in stderr


# -- exit codes for schedulers -----------------------------------------------------------


async def test_skip_if_locked_exits_0_with_one_line_while_another_run_holds_the_folder(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(1)
    cfg = _config(emulator.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(BEAUTY)
    out = tmp_path / "out"
    with OutputLock(out):  # held by this process: the CLI's flock can't be had
        code, stdout, stderr = await _cli(
            "run", str(manifest), "--config", str(cfg), "--skip-if-locked"
        )
        assert (code, stderr) == (0, "")
        assert stdout.splitlines() == [
            f"test: not run (--skip-if-locked): {out}: another pipeline run (pid "
            f"{os.getpid()}) is using this output folder; wait for it to finish or stop it"
        ]
        code, stdout, stderr = await _cli("run", str(manifest), "--config", str(cfg))
        assert code == 3 and stdout == ""
        assert f"pid {os.getpid()}" in stderr.splitlines()[-2]  # the error, then the end line
        assert re.fullmatch(rf"{TS} pipeline: end: exit 3 \(aborted\); .*", stderr.splitlines()[-1])
    assert emulator.stats()["ailab"]["requests"] == 0
    assert not (out / "journal.sqlite").exists()
    # Free again: the same command runs.
    code, stdout, _ = await _cli("run", str(manifest), "--config", str(cfg), "--skip-if-locked")
    assert code == 0 and stdout.startswith("test: 1 succeeded, 0 failed")


async def test_strict_counts_carried_over_failures_for_the_exit_code(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(2)
    make_portrait(tmp_path / "in" / "b" / "tiny.jpg", seed=7, size=(40, 40))
    cfg = _config(emulator.base_url, tmp_path / "config.yaml")
    manifest = str(write_manifest(BEAUTY))
    code, _, _ = await _cli("run", manifest, "--config", str(cfg), "--quiet")
    assert code == 1  # failed in this run
    code, stdout, _ = await _cli("run", manifest, "--config", str(cfg), "--quiet")
    assert code == 0  # carried over: reported, not counted
    assert "0 failed, 1 failed earlier (not retried), 2 skipped of 3 (exit 0)" in stdout
    assert _report(tmp_path / "out")["counts"]["failed_earlier"] == 1
    code, stdout, _ = await _cli("run", manifest, "--config", str(cfg), "--quiet", "--strict")
    assert code == 1
    assert "0 failed, 1 failed earlier (not retried), 2 skipped of 3 (exit 1)" in stdout


# -- pipeline status -------------------------------------------------------------------------


async def test_status_prints_counts_spend_failures_and_the_next_command(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(3)
    make_portrait(tmp_path / "in" / "b" / "tiny.jpg", seed=7, size=(40, 40))
    cfg = _config(emulator.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(BEAUTY)
    code, _, _ = await _cli("run", str(manifest), "--config", str(cfg), "--quiet")
    assert code == 1
    out = tmp_path / "out"
    failed = [x for x in _results(out) if x["status"] == "failed"]
    assert [x["input_rel"] for x in failed] == ["in/b/tiny.jpg"]
    error = failed[0]["error"]
    help_ = explain_code(error["code"], "ailab")
    code, stdout, stderr = await _cli("status", str(out))
    assert (code, stderr) == (0, "")
    lines = stdout.splitlines()
    assert lines[0] == f"output folder: {out}"
    assert re.fullmatch(
        rf"last run: #1 of 1, {re.escape(str(manifest))}, started {TS}, took \d+s, exit 1",
        lines[1],
    ), lines[1]
    assert lines[2] == "items (all runs): 4: 3 succeeded, 1 failed"
    assert lines[3] == "spent to date (all runs): ailab 45 credits"
    assert lines[4] == "failures by code:"
    assert lines[5] == (
        f"  {error['code']} (permanent, ailab/face-beauty-pro): 1 item(s), e.g. in/b/tiny.jpg"
    )
    text = " ".join(" ".join(lines).split())
    assert f"what it means: {help_.meaning}" in text
    assert f"what to do: {help_.todo}" in text
    assert lines[-2] == "next:"
    assert lines[-1] == (
        f"  pipeline run {manifest} --retry-failed    # after fixing the inputs or params: "
        "sends the 1 permanent failure(s) again"
    )


async def test_status_of_an_interrupted_run_says_rerun_to_resume(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(task_seconds=30)
    portraits(3)
    cfg = _config(emu.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(SWAP_AND_SMILE[:1])
    out = tmp_path / "out"
    summary = await _interrupted_once_tasks_run(manifest, cfg, out, 3)
    assert "0 succeeded, 0 failed, 3 not finished: rerun to resume, 0 skipped of 3 (exit 130)" in (
        summary
    )
    code, stdout, _ = await _cli("status", str(out))
    assert code == 0
    assert "items (all runs): 3: 0 succeeded, 0 failed, 3 not finished" in stdout
    assert re.search(r"last run: #1 of 1, .*, took \d+s, exit 130", stdout)
    assert stdout.splitlines()[-1] == (
        f"  pipeline run {manifest}    # resumes the 3 unfinished item(s)"
    )


async def test_status_names_the_manifest_that_collects_what_an_earlier_one_left(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    """A run of manifest A is stopped with its face-swap tasks running; a run of
    manifest B (Perfect Corp only, the same output folder) leaves them: its vendor is
    not theirs. ``status`` names A for them, not B, the last run's manifest."""
    emu: RunningEmulator = await emulator_factory(task_seconds=30)
    portraits(2)
    cfg = _config(emu.base_url, tmp_path / "config.yaml")
    swap = write_manifest(SWAP_AND_SMILE[:1], name="swap.yaml")
    smile = write_manifest(SWAP_AND_SMILE[1:], name="smile.yaml")
    out = tmp_path / "out"
    await _interrupted_once_tasks_run(swap, cfg, out, 2)
    quick: RunningEmulator = await emulator_factory()  # the smile run's vendor
    cfg = _config(quick.base_url, tmp_path / "config-quick.yaml")
    code, _, stderr = await _cli("run", str(smile), "--config", str(cfg))
    assert code == 0, stderr
    assert "are not collected: this manifest does not use its vendor" in stderr

    code, stdout, _ = await _cli("status", str(out))
    assert code == 0
    lines = stdout.splitlines()
    assert f"  pipeline run {swap}    # resumes the 2 unfinished item(s) a run of it left" in lines
    assert not any(line.startswith(f"  pipeline run {smile}    # resumes") for line in lines)
    assert (
        lines[-1] == f"  pipeline run {swap}    # resumes the 2 unfinished item(s) a run of it left"
    )


async def _interrupted_once_tasks_run(manifest: Path, cfg: Path, out: Path, tasks: int) -> str:
    """``pipeline run manifest`` stopped with SIGINT once ``tasks`` task ids are
    journaled in ``out``; asserts exit 130 and returns what it printed."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg), "--quiet"],
        env=_env(), stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    with anyio.fail_after(30):
        while _task_ids(out) < tasks:
            await anyio.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    stdout_bytes, _ = await anyio.to_thread.run_sync(proc.communicate)
    assert proc.returncode == 130
    return str(stdout_bytes.decode())


def _task_ids(out: Path) -> int:
    if not (out / "journal.sqlite").exists():
        return 0
    conn = sqlite3.connect(out / "journal.sqlite")
    try:
        return int(
            conn.execute("SELECT count(*) FROM items WHERE task_id IS NOT NULL").fetchone()[0]
        )
    except sqlite3.OperationalError:  # still being created
        return 0
    finally:
        conn.close()


async def test_status_without_a_journal_or_folder_is_exit_2_with_one_line(tmp_path: Path) -> None:
    (tmp_path / "empty").mkdir()
    code, stdout, stderr = await _cli("status", str(tmp_path / "empty"))
    assert (code, stdout) == (2, "")
    assert stderr == (
        f"pipeline: error: {tmp_path / 'empty' / 'journal.sqlite'}: no journal here; run "
        "`pipeline run` on a manifest first\n"
    )
    code, stdout, stderr = await _cli("status", str(tmp_path / "nowhere"))
    assert (code, stdout) == (2, "")
    assert stderr.count("\n") == 1 and "nowhere: no such output folder" in stderr


# -- pipeline ops and pipeline report -----------------------------------------------------------


def test_ops_lists_every_operation_param_enum_name_and_price(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["ops"]) == 0
    out, err = capsys.readouterr()
    assert err == ""
    blocks = {b.split(":", 1)[0]: " ".join(b.split()) for b in out.strip().split("\n\n")}
    assert set(OPERATIONS) <= set(blocks)
    for name, spec in OPERATIONS.items():
        block = blocks[name]
        unit = spec.price_unit if spec.price != 1 else spec.price_unit.rstrip("s")
        assert f"; {spec.price:g} {unit} per success" in block, block
        for param in spec.params:
            assert f" {param.name}" in block, (name, param.name)
            if param.kind == "int":
                assert f"{param.name}: integer {param.minimum}..{param.maximum}" in block
            for choice in param.choices:
                assert re.search(rf"[ (]{re.escape(str(choice))}[ ,)]", block), (name, choice)
    # All 35 filters, each with its code, in order.
    filters = re.findall(
        r"([a-z_]+) \((\d+)\)", blocks["ailab/face-beauty-pro"].split("filter_type")[1]
    )
    assert filters[:35] == [(n, str(c)) for n, c in FILTER_CHOICES.items()]
    assert len(FILTER_CHOICES) == 35


async def test_report_rewrites_report_html_and_says_so(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(2)
    cfg = _config(emulator.base_url, tmp_path / "config.yaml")
    code, _, _ = await _cli("run", str(write_manifest(BEAUTY)), "--config", str(cfg), "--quiet")
    assert code == 0
    out = tmp_path / "out"
    (out / "report.html").unlink()
    (out / "report.json").unlink()
    code, stdout, stderr = await _cli("report", str(out))
    assert (code, stderr) == (0, "")
    assert stdout == (
        f"{out}: 2 succeeded, 0 failed, 0 skipped of 2; wrote report.json, results.jsonl "
        f"and {out / 'report.html'}\n"
    )
    assert "<html" in (out / "report.html").read_text()
    assert _report(out)["counts"]["succeeded"] == 2


# -- errors never show a traceback ---------------------------------------------------------


def test_an_internal_error_is_one_line_and_exit_3_with_the_traceback_only_under_v(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def broken(output_dir: Path) -> Iterator[str]:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr("pipeline.status.status_lines", broken)
    assert main(["status", str(tmp_path)]) == 3
    out, err = capsys.readouterr()
    assert out == ""
    assert err == (
        "pipeline: error: internal error (RuntimeError: boom second line); this is a bug, "
        "please report it with the output of the same command run with -v\n"
    )
    assert main(["status", str(tmp_path), "-v"]) == 3
    err = capsys.readouterr().err
    assert err.startswith("pipeline: error: internal error") and "Traceback" in err


def test_an_os_error_is_one_line_naming_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    def denied(output_dir: Path) -> Iterator[str]:
        raise PermissionError(13, "Permission denied", str(output_dir / "journal.sqlite"))

    monkeypatch.setattr("pipeline.status.status_lines", denied)
    assert main(["status", str(tmp_path), "--log-json"]) == 2
    records = [json.loads(x) for x in capsys.readouterr().err.splitlines()]
    assert len(records) == 1
    assert records[0]["event"] == "error" and records[0]["level"] == "error"
    assert records[0]["exit_code"] == 2
    assert records[0]["message"] == (
        f"{tmp_path / 'journal.sqlite'}: Permission denied; check the path, its permissions "
        "and free space"
    )


# -- the progress reporter on its own --------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """main() and logs.configure() set up the process's pipeline loggers: undo it."""
    saved = [
        (lg, lg.handlers[:], lg.level, lg.propagate)
        for lg in (logging.getLogger(logs.ROOT), logging.getLogger(logs.EVENTS))
    ]
    settings = logs.settings()
    yield
    for lg, handlers, level, propagate in saved:
        lg.handlers[:] = handlers
        lg.setLevel(level)
        lg.propagate = propagate
    logs._settings = settings


def _capture_logs(**kwargs: Any) -> io.StringIO:
    stream = io.StringIO()
    logs.configure(stream=stream, **kwargs)
    return stream


def test_progress_lines_say_rate_spend_429s_and_eta_from_the_real_total() -> None:
    stream = _capture_logs()
    clock = _Clock()
    with Progress(enabled=False, interval=10, clock=clock) as p:
        p.discovered(40)
        assert p.total is None  # still discovering
        p.counted(100)
        for _ in range(20):
            p.started()
        clock.now += 5
        for _ in range(10):
            p.succeeded()
            p.stopped()
        p.skipped()
        p.rate_limited()
        p.spent("ailab", 150)
        assert stream.getvalue() == ""  # not due yet
        clock.now += 5  # 10 s in: 10 worked in 10 s since the first start
        p.tick()
    (line,) = stream.getvalue().splitlines()
    assert line.split(" ", 1)[1] == (
        "pipeline: progress: 11 of 100 finished (10 succeeded, 0 failed, 1 skipped), "
        "10 in flight, 1.00 items/s, spent ailab 150 credits, 1 429s, ETA 1m29s"
    )


def test_progress_eta_is_unknown_while_discovering_and_bounded_by_limit() -> None:
    stream = _capture_logs(json_lines=True)
    clock = _Clock()
    with Progress(enabled=False, interval=1, clock=clock, limit=4) as p:
        p.discovered(512)
        p.started()
        p.started()
        clock.now += 2
        p.succeeded()  # due: a line while the total is unknown
        p.counted(1000)
        clock.now += 2
        p.succeeded()  # due again: 1 more in the 2 s since the last line
    first, second = (json.loads(x) for x in stream.getvalue().splitlines())
    assert first["event"] == "progress" and first["total"] is None
    assert first["eta_seconds"] is None
    assert first["message"].endswith("ETA unknown (still discovering inputs)")
    assert "1 of 512+ (discovering) finished" in first["message"]
    # 0.5 items/s, and --limit 4 leaves 2 to send of the 998 still to go: 4 s.
    assert second["total"] == 1000 and second["rate_per_second"] == 0.5
    assert second["eta_seconds"] == 4.0 and second["message"].endswith("ETA 4s")


def test_progress_bar_total_is_the_count_and_log_lines_print_above_it(
    capsys: pytest.CaptureFixture[str],
) -> None:
    logs.configure()  # the handler on (captured) stderr, as the CLI sets it up
    log = logging.getLogger("pipeline")
    with Progress(enabled=True, interval=0.01) as p:
        assert p.drawing
        handler = log.handlers[0]
        assert type(handler).__name__ == "_TqdmLoggingHandler"  # redirected to tqdm.write
        p.discovered(3)
        assert p._bar.total is None
        p.counted(7)
        assert p._bar.total == 7
        log.warning("a line above the bar")
    assert isinstance(log.handlers[0], logging.StreamHandler)  # restored
    err = capsys.readouterr().err
    assert re.search(rf"{TS} pipeline: warning: a line above the bar", err)
    assert " pipeline: progress: " not in err  # the bar replaces progress lines


def test_log_json_turns_the_bar_off(capsys: pytest.CaptureFixture[str]) -> None:
    logs.configure(json_lines=True)
    with Progress(enabled=True) as p:
        assert not p.drawing
    assert capsys.readouterr().err == ""


async def test_report_progress_counts_the_inputs_and_keeps_lines_coming(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    for i in range(5):
        make_portrait(tmp_path / "in" / "a" / f"p{i}.jpg", seed=i)
    (tmp_path / "in" / "a" / "notes.txt").write_text("not matched")
    manifest = load_manifest(write_manifest(SWAP_AND_SMILE))
    assert count_work_items(manifest) == 10
    stream = _capture_logs()
    with Progress(enabled=False, interval=0.01) as p:
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(report_progress, p, 0.01, manifest=manifest))
            with anyio.fail_after(10):
                while p.total is None or p.lines < 2:
                    await anyio.sleep(0.01)
            tg.cancel_scope.cancel()
    assert p.total == 10
    assert "0 of 10 finished" in stream.getvalue().splitlines()[-1]


@pytest.mark.parametrize("quiet", [True, False])
async def test_the_inputs_are_counted_only_when_someone_sees_the_total(
    tmp_path: Path, write_manifest: Callable[..., Path], quiet: bool
) -> None:
    """--quiet with no bar: nobody sees a total, so the inputs are not walked a second
    time; with progress lines, they are counted halfway to the first line."""
    for i in range(3):
        make_portrait(tmp_path / "in" / "a" / f"p{i}.jpg", seed=i)
    manifest = load_manifest(write_manifest(SWAP_AND_SMILE))
    _capture_logs(quiet=quiet)
    with Progress(enabled=False, interval=0.2) as p:
        delay = p.count_delay()
        async with anyio.create_task_group() as tg:
            tg.start_soon(partial(report_progress, p, 0.2, manifest=manifest))
            await anyio.sleep(0.05)
            assert p.total is None  # not before halfway to the first line, if at all
            await anyio.sleep(0.45)
            tg.cancel_scope.cancel()
    if quiet:
        assert (delay, p.planned, p.lines) == (None, None, 0)
    else:
        assert delay is not None and 0.05 < delay <= 0.1
        assert p.planned == 6 and p.lines >= 1


# -- the README's schedules, as written ----------------------------------------------------------


def _section(title: str) -> str:
    """The README's text under the heading ``title`` (e.g. ``## Running on a schedule``),
    up to the next heading of the same or a higher level outside code blocks."""
    level = len(title.split(" ")[0])
    lines = README.read_text().splitlines()
    start = lines.index(title) + 1
    fenced = False
    for i in range(start, len(lines)):
        if lines[i].startswith("```"):
            fenced = not fenced
        heading = re.match(r"(#+) ", lines[i])
        if not fenced and heading and len(heading[1]) <= level:
            return "\n".join(lines[start:i]) + "\n"
    return "\n".join(lines[start:]) + "\n"


def _blocks(section: str, lang: str = "") -> list[str]:
    """The fenced code blocks of ``section`` whose info string is ``lang``, in order."""
    found: list[tuple[str, list[str]]] = []
    current: list[str] | None = None
    for line in section.splitlines():
        if current is None and line.startswith("```"):
            current = []
            found.append((line[3:].strip(), current))
        elif current is not None and line.strip() == "```":
            current = None
        elif current is not None:
            current.append(line)
    return ["\n".join(body) + "\n" for info, body in found if info == lang]


SRV = "/srv/portraits"


@pytest.fixture
def schedule_root(tmp_path: Path) -> Callable[[str], Path]:
    """The README's /srv/portraits layout under tmp_path, its config pointing at
    ``base_url``; ``jobs/nightly.yaml`` processes ``photos/*.jpg``."""

    def make(base_url: str) -> Path:
        root = tmp_path / "srv" / "portraits"
        (root / "jobs").mkdir(parents=True)
        (root / "logs").mkdir()
        (root / ".venv" / "bin").mkdir(parents=True)
        console = shutil.which("pipeline", path=str(Path(sys.executable).parent))
        assert console is not None, "pip install -e . puts the pipeline command beside python"
        (root / ".venv" / "bin" / "pipeline").symlink_to(console)
        keys = _blocks(_section("## Running on a schedule"))[1]
        assert keys.startswith("AILAB_API_KEY=")
        (root / "keys.env").write_text(keys)
        _config(base_url, root / "config.yaml", interval=0.05)
        for i in range(2):
            make_portrait(root / "photos" / f"p{i}.jpg", seed=i)
        (root / "jobs" / "nightly.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "nightly",
                    "inputs": ["../photos/*.jpg"],
                    "operations": BEAUTY,
                    "output": "../out/nightly",
                }
            )
        )
        return root

    return make


def _cron_env(root: Path, fake_bin: Path) -> dict[str, str]:
    # What cron gives a job: a bare PATH, HOME, sh. No venv, no API keys.
    return {
        "PATH": f"{fake_bin}:/usr/bin:/bin",
        "HOME": str(root),
        "SHELL": "/bin/sh",
        "LANG": "C.UTF-8",
    }


async def test_the_readme_crontab_line_runs_mails_on_new_failures_only_and_skips_overlaps(
    tmp_path: Path, emulator: RunningEmulator, schedule_root: Callable[[str], Path]
) -> None:
    section = _section("## Running on a schedule")
    (cron_line,) = [
        line for block in _blocks(section) for line in block.splitlines()
        if re.match(r"\d+ \d+ \* \* \* ", line)
    ]  # fmt: skip
    command = re.sub(r"^(\S+\s+){5}", "", cron_line)
    assert "%" not in command  # cron would turn it into a newline
    root = schedule_root(emulator.base_url)
    command = command.replace(SRV, str(root))
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    mailed = tmp_path / "mailed"
    (fake_bin / "mail").write_text(
        f'#!/bin/sh\nprintf "%s\\n" "$@" >> {mailed}.args\ncat >> {mailed}.body\n'
    )
    (fake_bin / "mail").chmod(0o755)
    env = _cron_env(root, fake_bin)
    log_file = root / "logs" / "nightly.log"

    async def cron() -> None:
        done = await anyio.run_process(["sh", "-c", command], env=env, cwd=root, check=False)
        assert (
            done.returncode == 0 and done.stdout == done.stderr == b""
        )  # nothing for cron to mail

    await cron()  # all good: exit 0, no mail
    log = log_file.read_text().splitlines()
    assert re.match(rf"{TS} pipeline: start: job nightly \(", log[0])
    assert f"config {os.path.realpath(root / 'config.yaml')}" in log[0]
    assert re.match(rf"{TS} pipeline: end: exit 0 ", log[-1])
    assert log[-2].startswith("nightly: 2 succeeded, 0 failed, 0 skipped of 2 (exit 0)")
    assert not Path(f"{mailed}.args").exists()

    make_portrait(root / "photos" / "tiny.jpg", seed=9, size=(40, 40))
    await cron()  # a new input fails: exit 1, mailed with the log's tail
    assert Path(f"{mailed}.args").read_text().splitlines() == [
        "-s", "portrait pipeline: exit 1", "ops@example.com",
    ]  # fmt: skip
    body = Path(f"{mailed}.body").read_text()
    assert "tiny.jpg" in body and re.search(rf"{TS} pipeline: end: exit 1 ", body)
    Path(f"{mailed}.args").unlink()

    await cron()  # the same failure again: carried over, exit 0, no mail
    assert not Path(f"{mailed}.args").exists()
    assert "1 failed earlier (not retried), 2 skipped of 3 (exit 0)" in log_file.read_text()

    with OutputLock(root / "out" / "nightly"):  # a long run still going
        await cron()
    assert not Path(f"{mailed}.args").exists()
    assert log_file.read_text().splitlines()[-1].startswith("nightly: not run (--skip-if-locked): ")


async def test_the_readme_systemd_units_verify_and_the_service_runs_as_written(
    tmp_path: Path, emulator: RunningEmulator, schedule_root: Callable[[str], Path]
) -> None:
    units = {}
    for block in _blocks(_section("## Running on a schedule"), "ini"):
        first, text = block.split("\n", 1)
        units[Path(first.removeprefix("# ")).name] = text
    assert set(units) == {"portrait-pipeline.service", "portrait-pipeline.timer"}
    root = schedule_root(emulator.base_url)
    unit_dir = tmp_path / "units"
    unit_dir.mkdir()
    for name, text in units.items():
        (unit_dir / name).write_text(text.replace(SRV, str(root)))
    analyze = shutil.which("systemd-analyze")
    if analyze is not None:
        done = await anyio.run_process(
            [analyze, "verify", "--man=no", *(str(unit_dir / n) for n in sorted(units))],
            check=False,
        )
        assert done.returncode == 0, done.stderr.decode()
        assert "portrait-pipeline" not in done.stderr.decode(), done.stderr.decode()
    # Run the service as systemd would: its user, folder, environment file and command.
    service = configparser.ConfigParser(interpolation=None, strict=False)
    service.optionxform = str  # type: ignore[assignment,method-assign]
    service.read_string((unit_dir / "portrait-pipeline.service").read_text())
    svc = service["Service"]
    env = {"PATH": "/usr/local/bin:/usr/bin:/bin", "LANG": "C.UTF-8"}
    for line in Path(svc["EnvironmentFile"]).read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            key, value = line.split("=", 1)
            env[key] = value
    done = await anyio.run_process(
        shlex.split(svc["ExecStart"]), cwd=svc["WorkingDirectory"], env=env, check=False
    )
    ok = {0, *(int(c) for c in svc.get("SuccessExitStatus", "").split())}
    assert done.returncode in ok and done.returncode == 0, done.stderr.decode()
    assert done.stdout.decode().startswith("nightly: 2 succeeded, 0 failed, 0 skipped of 2")
    assert "end: exit 0" in done.stderr.decode()
    timer = configparser.ConfigParser(interpolation=None, strict=False)
    timer.read_string(units["portrait-pipeline.timer"])
    assert timer["Timer"]["OnCalendar"] == "*-*-* 02:15:00"


async def test_the_readme_emulate_config_and_dummy_keys_work(tmp_path: Path) -> None:
    section = _section("### Using `pipeline emulate`")
    serve_block, run_block = _blocks(section)
    (config_block,) = _blocks(section, "yaml")
    serve = shlex.split(serve_block.split("#")[0])
    assert serve[:4] == ["pipeline", "emulate", "--port", "8765"]
    (tmp_path / "faults.yaml").write_text("task_seconds: 0.05\n")
    serve[3] = "0"  # a free port; the config below is moved to it
    emulator = subprocess.Popen(
        [sys.executable, "-m", *serve], cwd=tmp_path, stdout=subprocess.PIPE, text=True
    )
    try:
        assert emulator.stdout is not None
        url = emulator.stdout.readline().strip().removeprefix("emulator listening on ")
        port = url.rsplit(":", 1)[1]
        (tmp_path / "emulator.yaml").write_text(config_block.replace("8765", port))
        exports, command = run_block.strip().splitlines()
        env = {k: v for k, v in os.environ.items() if not k.endswith("_API_KEY")}
        env.update(dict(x.split("=", 1) for x in shlex.split(exports)[1:]))
        for i in range(2):
            make_portrait(tmp_path / "jobs" / "in" / f"p{i}.jpg", seed=i)
        make_portrait(tmp_path / "jobs" / "template.jpg", seed=99)
        (tmp_path / "jobs" / "my-job.yaml").write_text(
            yaml.safe_dump(
                {
                    "name": "try",
                    "inputs": ["in/*.jpg"],
                    "operations": SWAP_AND_SMILE,
                    "output": "out",
                }
            )
        )
        argv = shlex.split(command)
        assert argv[:2] == ["pipeline", "run"]
        done = await anyio.run_process(
            [sys.executable, "-m", *argv], cwd=tmp_path, env=env, check=False
        )
        stderr = done.stderr.decode()
        assert done.returncode == 0, stderr
        assert (
            f"config {os.path.realpath(tmp_path / 'emulator.yaml')}; vendors ailab at {url}, "
            f"perfectcorp at {url}"
        ) in stderr
        assert done.stdout.decode().startswith("try: 4 succeeded, 0 failed, 0 skipped of 4")
    finally:
        emulator.send_signal(signal.SIGINT)
        emulator.communicate(timeout=10)
