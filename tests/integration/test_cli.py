"""The ``pipeline`` command as a user runs it: real subprocesses, real exit codes."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.config import RateLimit
from pipeline.emulator import RunningEmulator
from tests.conftest import AILAB_KEY, PERFECTCORP_KEY, config_yaml

pytestmark = pytest.mark.timeout(120)


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY, **extra})
    return env


async def _cli(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "pipeline", *args], check=False, env=env or _env(), cwd=cwd
    )


async def test_run_validate_report_exit_codes(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(2)
    cfg = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    manifest = write_manifest()
    done = await _cli("validate", str(manifest), "--config", str(cfg))
    assert done.returncode == 0, done.stdout + done.stderr
    done = await _cli("run", str(manifest), "--config", str(cfg), "--quiet")
    assert done.returncode == 0, done.stderr
    (tmp_path / "out" / "report.json").unlink()
    done = await _cli("report", str(tmp_path / "out"))
    assert done.returncode == 0
    assert json.loads((tmp_path / "out" / "report.json").read_text())["counts"]["succeeded"] == 8
    stderr = done.stderr.decode() + done.stdout.decode()
    assert AILAB_KEY not in stderr


async def test_bad_manifest_exits_2_naming_file_line_field(
    tmp_path: Path, write_manifest: Callable[..., Path]
) -> None:
    manifest = write_manifest([{"op": "ailab/face-beauty-pro", "params": {"smoothing": 170}}])
    for command in ("run", "validate"):
        done = await _cli(command, str(manifest))
        assert done.returncode == 2
        message = done.stderr.decode()
        assert str(manifest) in message and "smoothing" in message
        assert len(message.strip().splitlines()) == 1


async def test_missing_key_variable_exits_2_and_mentions_emulate(
    tmp_path: Path, portraits: Callable[..., list[Path]], write_manifest: Callable[..., Path]
) -> None:
    portraits(1)
    env = _env()
    del env["AILAB_API_KEY"]
    done = await _cli("run", str(write_manifest()), env=env, cwd=tmp_path)
    assert done.returncode == 2
    assert "AILAB_API_KEY" in done.stderr.decode() and "--emulate" in done.stderr.decode()


async def test_damaged_journal_exits_2_and_is_not_overwritten(
    tmp_path: Path, portraits: Callable[..., list[Path]], write_manifest: Callable[..., Path]
) -> None:
    portraits(1)
    (tmp_path / "out").mkdir()
    journal = tmp_path / "out" / "journal.sqlite"
    journal.write_bytes(b"not a database at all" * 100)
    done = await _cli("run", str(write_manifest()), "--emulate")
    assert done.returncode == 2 and "journal" in done.stderr.decode()
    assert journal.read_bytes() == b"not a database at all" * 100


async def test_fatal_bad_key_exits_3(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu = await emulator_factory(ailab_api_keys=("the-real-key",), perfectcorp_api_keys=("x",))
    portraits(2)
    cfg = config_yaml(emu.base_url, tmp_path / "config.yaml")
    done = await _cli("run", str(write_manifest()), "--config", str(cfg), "--quiet")
    assert done.returncode == 3
    assert AILAB_KEY not in done.stderr.decode()


async def test_second_run_on_same_output_exits_3_naming_pid(
    tmp_path: Path, portraits: Callable[..., list[Path]], write_manifest: Callable[..., Path]
) -> None:
    portraits(1)
    manifest = write_manifest()
    (tmp_path / "out").mkdir()
    code = (
        "import sys, time; from pathlib import Path; from pipeline.lock import OutputLock\n"
        "with OutputLock(Path(sys.argv[1])):\n    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen(
        [sys.executable, "-c", code, str(tmp_path / "out")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "locked"
        done = await _cli("run", str(manifest), "--emulate", "--quiet")
        assert done.returncode == 3
        assert f"pid {holder.pid}" in done.stderr.decode()
    finally:
        holder.kill()
        holder.communicate()


def _journal_task_ids(out: Path) -> int:
    conn = sqlite3.connect(out / "journal.sqlite")
    try:
        return int(
            conn.execute("SELECT count(*) FROM items WHERE task_id IS NOT NULL").fetchone()[0]
        )
    except sqlite3.OperationalError:  # the journal is still being created
        return 0
    finally:
        conn.close()


def _journal_statuses(out: Path) -> list[str]:
    if not (out / "journal.sqlite").exists():
        return []
    conn = sqlite3.connect(out / "journal.sqlite")
    try:
        return [str(row[0]) for row in conn.execute("SELECT status FROM items")]
    except sqlite3.OperationalError:  # the journal is still being created
        return []
    finally:
        conn.close()


def _journaled_inputs(out: Path) -> set[tuple[str, str]]:
    """(vendor, sha256 of the input) of every item with a journaled task id."""
    conn = sqlite3.connect(out / "journal.sqlite")
    try:
        rows = conn.execute(
            "SELECT operation, input_path FROM items WHERE task_id IS NOT NULL"
        ).fetchall()
    finally:
        conn.close()
    return {(op.split("/")[0], hashlib.sha256(Path(p).read_bytes()).hexdigest()) for op, p in rows}


@pytest.mark.parametrize("kill_when", ["polling", "submitting"])
async def test_kill_9_then_rerun_never_submits_a_journaled_task_twice(
    kill_when: str,
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    # Slow tasks so the kill lands while tasks are being polled.
    emu = await emulator_factory(
        task_seconds=1.5 if kill_when == "polling" else 0.3, sync_seconds=0.05
    )
    inputs = portraits(10)
    cfg = config_yaml(emu.base_url, tmp_path / "config.yaml")
    ops = [
        {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}},
        {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
    ]
    manifest = write_manifest(ops, concurrency=6)
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg), "--quiet"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out = tmp_path / "out"
    try:
        with anyio.fail_after(30):
            while not (out / "journal.sqlite").exists() or _journal_task_ids(out) < (
                4 if kill_when == "polling" else 1
            ):
                await anyio.sleep(0.02)
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    journaled = _journaled_inputs(out)
    assert journaled
    done = await _cli("run", str(manifest), "--config", str(cfg), "--quiet")
    assert done.returncode == 0, done.stderr
    stats = emu.stats()
    # Every item whose task id was journaled before the kill was never submitted again.
    for vendor, digest in journaled:
        assert stats[vendor]["submits_by_input"][digest] == 1, (vendor, digest)
    for vendor in ("ailab", "perfectcorp"):
        assert set(stats[vendor]["submits_by_input"]) == {
            hashlib.sha256(p.read_bytes()).hexdigest() for p in inputs
        }
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 20 and all(x["status"] in {"succeeded", "skipped"} for x in lines), [
        (x["status"], x["error"]) for x in lines if x["status"] not in {"succeeded", "skipped"}
    ]
    report = json.loads((out / "report.json").read_text())
    assert report["counts"]["failed"] == 0 and report["counts"]["total"] == 20
    for line in lines:
        assert Path(line["output"]).is_file()
    assert not [p for p in out.rglob("*.part")]


async def test_sigint_exits_130_and_rerun_completes(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu = await emulator_factory(task_seconds=1.0)
    portraits(6)
    cfg = config_yaml(emu.base_url, tmp_path / "config.yaml")
    manifest = write_manifest(
        [{"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}}]
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg), "--quiet"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out = tmp_path / "out"
    with anyio.fail_after(30):
        while not (out / "journal.sqlite").exists() or _journal_task_ids(out) < 2:
            await anyio.sleep(0.02)
    proc.send_signal(signal.SIGINT)
    assert await anyio.to_thread.run_sync(proc.wait) == 130
    done = await _cli("run", str(manifest), "--config", str(cfg), "--quiet")
    assert done.returncode == 0
    assert max(emu.stats()["ailab"]["submits_by_input"].values()) == 1


async def test_sigint_does_not_wait_out_the_rate_budget(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    # One request per 10 minutes: every item after the first waits at the budget.
    # Ctrl-C must end the run now (exit 130), not after the budget lets them go;
    # only a request already on the wire is waited for.
    emu = await emulator_factory()
    portraits(4)
    cfg = config_yaml(
        emu.base_url, tmp_path / "config.yaml", rate_limit=RateLimit(requests=1, per_seconds=600)
    )
    manifest = write_manifest(
        [{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}], concurrency=4
    )
    proc = subprocess.Popen(
        [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg), "--quiet"],
        env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    out = tmp_path / "out"
    with anyio.fail_after(30):
        while not _journal_statuses(out).count("succeeded"):
            await anyio.sleep(0.02)
    await anyio.sleep(0.3)  # the other three are now waiting at the budget
    proc.send_signal(signal.SIGINT)
    with anyio.fail_after(30):  # far below the 600 s the budget would hold them
        assert await anyio.to_thread.run_sync(proc.wait) == 130
    assert emu.stats()["ailab"]["submits"] == 1
    # Issue 8 point 3: "submitting" is journaled only once the budget lets a send go,
    # so the three that never left are plain pending (not sends of unknown outcome).
    assert sorted(_journal_statuses(out)) == ["pending"] * 3 + ["succeeded"]


async def test_limit_sends_at_most_n_items_and_a_rerun_continues(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(5)
    cfg = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    manifest = write_manifest([{"op": "ailab/face-beauty-pro", "params": {"smoothing": 70}}])
    done = await _cli("run", str(manifest), "--config", str(cfg), "--quiet", "--limit", "2")
    assert done.returncode == 0, done.stderr
    assert emulator.stats()["ailab"]["submits"] == 2
    assert done.stdout.decode().startswith("test: 2 succeeded, 0 failed, 0 skipped of 2 (exit 0)")
    done = await _cli("run", str(manifest), "--config", str(cfg), "--quiet")
    assert done.returncode == 0
    assert emulator.stats()["ailab"]["submits"] == 5
    assert done.stdout.decode().startswith("test: 3 succeeded, 0 failed, 2 skipped of 5 (exit 0)")
    done = await _cli("run", str(manifest), "--limit", "0")
    assert (done.returncode, done.stdout) == (2, b"")
    assert done.stderr.decode() == (
        "pipeline: error: argument --limit: '0': give at least 1 (see `pipeline run --help`)\n"
    )
