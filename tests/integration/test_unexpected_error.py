"""An unexpected error in one item (a bug) stops only that item, leaves it as
journaled, and the run's exit code says not everything was done (1, not 0)."""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import pipeline.driver as driver
from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import fast_config, make_portrait

pytestmark = pytest.mark.timeout(60)

OP = [{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}]


async def test_an_item_that_meets_a_bug_fails_the_run_softly(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    for i in range(4):
        make_portrait(tmp_path / "in" / f"p{i}.jpg", seed=i)
    manifest = load_manifest(write_manifest(OP, concurrency=2))
    real = driver.ItemDriver.run

    async def run(self: driver.ItemDriver, state: Any, **kw: Any) -> Any:
        if self.item.input_rel.endswith("p2.jpg"):
            raise RuntimeError("a bug in the driver")
        return await real(self, state, **kw)

    monkeypatch.setattr(driver.ItemDriver, "run", run)
    result = await run_job(manifest, fast_config(emulator.base_url), RunOptions(quiet=True))
    assert result.exit_code == 1
    lines = [json.loads(x) for x in (manifest.output / "results.jsonl").read_text().splitlines()]
    assert Counter(x["status"] for x in lines) == Counter(succeeded=3, interrupted=1)
    assert emulator.stats()["ailab"]["charged"] == 3

    monkeypatch.setattr(driver.ItemDriver, "run", real)  # fixed: the rerun finishes it
    result = await run_job(manifest, fast_config(emulator.base_url), RunOptions(quiet=True))
    assert result.exit_code == 0
    assert emulator.stats()["ailab"]["charged"] == 4
