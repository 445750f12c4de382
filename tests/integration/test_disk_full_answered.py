"""A full disk never makes the next run pay again for a sync answer already received.

The real CLI (``python -m pipeline run``) against the real emulator on loopback, with
real files on a small tmpfs (needs root for ``mount``; skipped otherwise) and the real
SQLite journal. Sync results (AILab's emotion editor) of a few hundred KB each meet a
disk with about 1.4 MB free: the disk fills while answered, billed results are in
hand. Their bytes find no room (the reserve is an eighth of the free space, less than
one result), so the run gives the bytes up, not the answer: those items are journaled
``failed`` ``RESULT_LOST`` (paid for, lost), and the rerun on an enlarged disk sends
only what was never answered. Before the fix they stayed ``submitting`` and the rerun
paid for each of them a second time.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import sqlite3
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
import yaml
from PIL import Image

from pipeline.emulator import RunningEmulator
from pipeline.rescue import read_paid_lost, read_rescued
from tests.conftest import config_yaml
from tests.integration._disk import fill, tmpfs

pytestmark = pytest.mark.timeout(120)

SYNC: dict[str, Any] = {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _noise_jpegs(folder: Path, n: int, start: int) -> list[Path]:
    """Photos that do not compress: about 230 KB each, and so are their results."""
    folder.mkdir(parents=True, exist_ok=True)
    out = []
    for i in range(start, start + n):
        rng = random.Random(i)
        path = folder / f"p{i:02d}.jpg"
        Image.frombytes("RGB", (500, 500), rng.randbytes(500 * 500 * 3)).save(path, quality=90)
        out.append(path)
    return out


def _argv(manifest: Path, cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg), *extra]


async def _cli(manifest: Path, cfg: Path, *extra: str) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(_argv(manifest, cfg, *extra), check=False, env=dict(os.environ))


async def _wait_for(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.01)


def _rows(out: Path) -> dict[str, tuple[str, str | None, int | None]]:
    """key -> (status, error code, billed_run), read from the journal itself."""
    with contextlib.closing(sqlite3.connect(out / "journal.sqlite")) as conn:
        return {
            key: (status, code, billed)
            for key, status, code, billed in conn.execute(
                "SELECT key, status, error_code, billed_run FROM items"
            )
        }


def _input_of_key(out: Path) -> dict[str, str]:
    with contextlib.closing(sqlite3.connect(out / "journal.sqlite")) as conn:
        return dict(conn.execute("SELECT key, input_rel FROM items"))


async def test_answered_sync_results_on_a_full_disk_are_never_paid_for_again(
    tmp_path: Path, emulator_factory: Callable[..., Any]
) -> None:
    # Each sync call takes 1.5 s: the disk is filled while the first four are on the
    # wire (answered, and billed, after it filled).
    emu: RunningEmulator = await emulator_factory(sync_seconds=1.5)
    inputs = _noise_jpegs(tmp_path / "in", 12, start=0)
    by_rel = {f"in/{p.name}": _sha(p) for p in inputs}
    manifest = tmp_path / "job.yaml"
    cfg = config_yaml(emu.base_url, tmp_path / "config.yaml")
    with tmpfs(tmp_path / "mnt", "4m") as mnt:
        out = mnt / "out"
        manifest.write_text(
            yaml.safe_dump(
                {"name": "full", "inputs": ["in/*.jpg"], "operations": [SYNC],
                 "output": str(out), "concurrency": 4}
            )
        )  # fmt: skip
        # 1.2 MB free when the run starts: its reserve (an eighth) is 150 KB.
        before = fill(mnt, 1_200_000)
        before.rename(mnt / "filler-before.bin")
        before = mnt / "filler-before.bin"
        with subprocess.Popen(
            _argv(manifest, cfg), env=dict(os.environ),
            stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        ) as proc:  # fmt: skip
            try:
                await _wait_for(
                    lambda: sum(emu.stats()["ailab"]["submits_by_input"].values()) == 4,
                    "four sends on the wire",
                )
                # 16 KB left: with the reserve, less than one result (230 KB), more
                # than the rows that journal the answers.
                during = fill(mnt, 16_000)
                stdout, stderr = await anyio.to_thread.run_sync(
                    lambda: proc.communicate(timeout=60)
                )
            finally:
                if proc.poll() is None:
                    proc.kill()
        shown = stderr.decode()
        assert "Traceback" not in shown + stdout.decode(), shown
        assert proc.returncode == 3, shown
        assert "DISK_FULL" in shown, shown
        assert "RESULT_LOST" in shown, shown  # said as it happens, per item
        charged_first = Counter(emu.stats()["ailab"]["charged_by_input"])
        assert Counter(emu.stats()["ailab"]["submits_by_input"]) == charged_first
        # The four on the wire, and any sent before the run met the full disk: answered
        # and billed, once each.
        assert len(charged_first) >= 4 and set(charged_first.values()) == {1}, charged_first

        rows, rel_of = _rows(out), _input_of_key(out)
        answered = {rel for rel, sha in by_rel.items() if charged_first[sha]}
        # None could be stored; every one is journaled as paid for and lost: none is
        # left ``submitting`` (a send of unknown outcome, which a rerun sends again).
        lost = {
            rel_of[k]
            for k, (status, code, billed) in rows.items()
            if status == "failed" and code == "RESULT_LOST" and billed == 1
        }
        assert lost == answered, (answered, rows)
        # The others were never sent (pending, or failed DISK_FULL before the send):
        # nothing is in doubt, nothing billed.
        others = {(s, c, b) for k, (s, c, b) in rows.items() if rel_of[k] not in lost}
        assert others <= {("pending", None, None), ("failed", "DISK_FULL", None)}, rows
        assert read_rescued(out) == [] and read_paid_lost(out) == []

        during.unlink()
        before.unlink()
        rerun = await _cli(manifest, cfg, "--quiet")
        assert rerun.returncode == 0, rerun.stderr.decode()
        report = json.loads((out / "report.json").read_text())
        lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]

    # The vendor saw every input once: the rerun sent only what was never answered.
    assert Counter(emu.stats()["ailab"]["submits_by_input"]) == Counter(by_rel.values())
    assert Counter(emu.stats()["ailab"]["charged_by_input"]) == Counter(by_rel.values())
    by_input = {x["input_rel"]: x for x in lines}
    assert set(by_input) == set(by_rel)
    for rel, line in by_input.items():
        if rel in lost:  # reported as paid for and lost, not sent again
            assert line["status"] == "failed" and line["carried_over"] is True, line
            assert line["error"]["code"] == "RESULT_LOST" and line["billed"] is True, line
        else:
            assert line["status"] == "succeeded", line
    n = len(lost)
    assert report["counts"] == {
        "total": 12, "succeeded": 12 - n, "failed": 0, "failed_earlier": n, "skipped": 0,
        "interrupted": 0,
    }  # fmt: skip
    assert report["paid_lost_total"] == n
    # This run paid only for what it sent (12 credits an emotion edit).
    assert report["credits_spent"]["ailab"]["amount"] == 12 * (12 - n)
