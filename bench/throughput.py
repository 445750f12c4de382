"""Throughput and memory of a whole run against the in-process emulator.

    python bench/throughput.py --images 300 --concurrency 32

Generates small distinct portraits, runs emotion-editor (sync) and face-swap (async)
over them against the emulator on loopback (no rate limit, 0.2 s tasks, polls every
0.2 s), and prints items/s, journal commits and peak RSS. Run it twice to also time a
full-skip rerun.
"""

from __future__ import annotations

import argparse
import resource
import sys
import tempfile
import time
from pathlib import Path

import anyio
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, ProviderConfig, RetryConfig
from pipeline.emulator import Scenario, start_emulator
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import make_portrait


async def main(images: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(images):
            make_portrait(root / "in" / f"d{i % 10}" / f"p{i:06d}.jpg", seed=i)
        make_portrait(root / "template.jpg", seed=10**9)
        manifest_path = root / "job.yaml"
        manifest_path.write_text(
            yaml.safe_dump(
                {
                    "inputs": ["in/**/*.jpg"],
                    "operations": [
                        {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}},
                        {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}},
                    ],
                    "output": "out",
                    "concurrency": concurrency,
                }
            )
        )
        emu = await start_emulator(Scenario(task_seconds=0.2, sync_seconds=0.0))
        try:
            provider = ProviderConfig(
                base_url=emu.base_url, api_key_env="AILAB_API_KEY", poll_interval_seconds=0.2
            )
            config = Config(
                providers={"ailab": provider, "perfectcorp": provider},
                retry=RetryConfig(backoff_initial_seconds=0.05, backoff_max_seconds=1),
            )
            import os

            os.environ.setdefault("AILAB_API_KEY", "bench-key")
            manifest = load_manifest(manifest_path)
            for label in ("first run", "rerun (all skipped)"):
                start = time.perf_counter()
                result = await run_job(manifest, config, RunOptions(quiet=True))
                elapsed = time.perf_counter() - start
                counts = result.report["counts"]
                print(
                    f"{label}: {counts['total']} items in {elapsed:.2f} s = "
                    f"{counts['total'] / elapsed:.1f} items/s; exit {result.exit_code}; "
                    f"succeeded {counts['succeeded']}, skipped {counts['skipped']}"
                )
        finally:
            await emu.close()
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS (client + emulator in one process): {peak_mb:.0f} MB")


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--images", type=int, default=300)
    parser.add_argument("--concurrency", type=int, default=32)
    args = parser.parse_args()
    anyio.run(main, args.images, args.concurrency)
