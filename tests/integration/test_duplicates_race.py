"""Copies of one content spread over many small batches are sent once, whatever
finishes while later batches are read (the engine re-reads a row read with its batch
only for keys the run met since: pipeline.metkeys)."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pipeline.sources as sources
from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import fast_config, make_portrait

pytestmark = pytest.mark.timeout(90)

OP = [{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}]


@pytest.mark.parametrize("batch", [1, 2, 3])
async def test_copies_across_batches_are_sent_once(
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    batch: int,
) -> None:
    monkeypatch.setattr(sources, "BATCH", batch)
    emu: RunningEmulator = await emulator_factory(sync_seconds=0.01)
    originals = [make_portrait(tmp_path / f"o{i}.jpg", seed=i) for i in range(4)]
    folder = tmp_path / "in"
    folder.mkdir()
    for n in range(40):  # content n % 4: each copy several batches after the last
        (folder / f"p{n:02d}.jpg").write_bytes(originals[n % 4].read_bytes())
    manifest = load_manifest(write_manifest(OP, concurrency=8))
    result = await run_job(manifest, fast_config(emu.base_url), RunOptions(quiet=True))
    assert result.exit_code == 0
    stats = emu.stats()["ailab"]
    assert stats["charged"] == 4
    assert sorted(stats["submits_by_input"].values()) == [1, 1, 1, 1]
    lines = [json.loads(x) for x in (manifest.output / "results.jsonl").read_text().splitlines()]
    assert len(lines) == 40
    assert sum(x["duplicate_of"] is not None for x in lines) == 36
