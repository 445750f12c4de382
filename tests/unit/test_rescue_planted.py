"""Whatever is planted at ``OUT/.pipeline-rescue`` never hangs a run or is followed.

The rescue file is read at the start of every run (before anything is sent). A FIFO
there once blocked ``pipeline run`` forever in ``open``; now the file is opened with
``O_NONBLOCK | O_NOFOLLOW`` and refused by ``fstat`` unless it is a regular file, with
the same one-line error the journal and the lock file give (exit 2, nothing sent).
Real files, FIFOs and links; the real CLI against the real emulator on loopback.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

from pipeline.emulator import RunningEmulator
from pipeline.errors import JournalError
from pipeline.rescue import (
    RESCUE_NAME,
    PaidLost,
    Rescued,
    RescueLog,
    read_paid_lost,
    read_rescued,
)
from tests.conftest import config_yaml

SYNC: dict[str, Any] = {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}

MESSAGES = {
    "fifo": "is not a regular file (a FIFO, socket or device?); move it aside and rerun",
    "symlink": "is a symbolic link; refusing to follow it (remove it and rerun)",
    "folder": "a folder is in the way where a file should be; move it aside and rerun",
}


def _plant(kind: str, out: Path) -> Path:
    path = out / RESCUE_NAME
    out.mkdir(parents=True, exist_ok=True)
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "symlink":
        target = out.parent / "elsewhere.txt"
        target.write_text('{"key": "k", "task_id": "t"}\n')
        path.symlink_to(target)
    else:
        path.mkdir()
    return path


@pytest.mark.timeout(10)
@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_reading_refuses_what_is_not_a_regular_file_without_blocking(
    tmp_path: Path, kind: str
) -> None:
    path = _plant(kind, tmp_path / "out")
    with pytest.raises(JournalError) as err:
        read_rescued(tmp_path / "out")
    assert str(err.value) == f"{path}: {MESSAGES[kind]}"
    with pytest.raises(JournalError):
        read_paid_lost(tmp_path / "out")


@pytest.mark.timeout(60)
@pytest.mark.parametrize("kind", sorted(MESSAGES))
async def test_a_run_with_something_planted_there_stops_at_once_and_sends_nothing(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    portraits: Callable[..., list[Path]],
    kind: str,
) -> None:
    portraits(2)
    manifest = write_manifest([SYNC])
    cfg = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    path = _plant(kind, tmp_path / "out")
    argv = [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg)]
    with anyio.fail_after(30):  # it hung forever on a FIFO
        done = await anyio.run_process(argv, check=False, env=dict(os.environ))
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    assert "Traceback" not in stderr
    (error,) = [line for line in stderr.splitlines() if "pipeline: error:" in line]
    assert error.endswith(f"pipeline: error: {path}: {MESSAGES[kind]}"), stderr
    stats = emulator.stats()["ailab"]
    assert sum(stats["submits_by_input"].values()) == 0
    assert sum(stats["charged_by_input"].values()) == 0
    if kind == "symlink":  # not written through either
        assert (tmp_path / "elsewhere.txt").read_text() == '{"key": "k", "task_id": "t"}\n'
    # Moved aside as the line says, the next run goes ahead.
    if kind == "folder":
        path.rmdir()
    else:
        path.unlink()
    again = await anyio.run_process(argv, check=False, env=dict(os.environ))
    assert again.returncode == 0, again.stderr.decode()
    assert sum(emulator.stats()["ailab"]["charged_by_input"].values()) == 2


def test_a_paid_and_lost_answer_is_kept_apart_from_the_task_ids(tmp_path: Path) -> None:
    log = RescueLog(tmp_path)
    log.open()
    try:
        assert log.add("k1", "task-1")
        assert log.add_paid_lost("k2", 7)
        assert log.add_paid_lost("k2", 7)  # each later change carries it: once
        assert log.holds("k2")
    finally:
        log.close()
    assert read_rescued(tmp_path) == [Rescued("k1", "task-1")]  # never a task id of ""
    assert read_paid_lost(tmp_path) == [PaidLost("k2", 7)]
    lines = (tmp_path / RESCUE_NAME).read_bytes().split(b"\0", 1)[0].splitlines()
    assert len(lines) == 2


def test_no_file_is_nothing_to_apply(tmp_path: Path) -> None:
    assert read_rescued(tmp_path) == [] and read_paid_lost(tmp_path) == []


async def test_a_paid_and_lost_answer_noted_there_is_journaled_lost_before_anything_is_sent(
    tmp_path: Path,
) -> None:
    # A run whose disk was too full for even the row saying "answered and billed"
    # noted the key in its rescue file. The next run records it lost (paid for in that
    # run), not as a send of unknown outcome that it would send again.
    import os

    from pipeline.journal import Change, Journal
    from pipeline.lifecycle import Status
    from pipeline.runner import _apply_rescued

    async with Journal(tmp_path) as journal:
        run_id = await journal.begin_run("m.yaml", os.getpid())
        for key in ("lost", "answered-later"):
            await journal.see(
                key=key, operation="ailab/emotion-editor", variant="default", params="{}",
                input_path=f"/in/{key}.jpg", input_rel=f"{key}.jpg", run_id=run_id,
            )  # fmt: skip
            await journal.change(key, Change(Status.SUBMITTING))
        await journal.change("answered-later", Change(Status.SUBMITTED, task_id="t-1"))
    log = RescueLog(tmp_path)
    log.open()
    try:
        assert log.add_paid_lost("lost", run_id)
        assert log.add_paid_lost("answered-later", run_id)  # moved on since: left alone
    finally:
        log.close()
    async with Journal(tmp_path) as journal:
        await _apply_rescued(journal, tmp_path)
        await _apply_rescued(journal, tmp_path)  # twice: the same outcome
        lost = await journal.lookup("lost")
        later = await journal.lookup("answered-later")
    assert lost is not None and later is not None
    assert (lost.status, lost.error_code, lost.billed_run) == ("failed", "RESULT_LOST", run_id)
    assert (later.status, later.task_id) == ("submitted", "t-1")
