"""How close a run gets to a vendor's rate limit, and how many 429s it provokes.

    python bench/ratelimit.py --seconds 60

Two scenarios against the in-process emulator, which enforces the limit per key:

1. **published limit** (Perfect Corp's shape: a sustained window plus a QPS cap,
   scaled to seconds so a run is short): the config states the same limit the
   emulator enforces. Goal: at least 90% of the budget used, (almost) no 429s.
2. **unpublished limit** (AILab publishes none, vendor-protocols.md §1.7): the emulator
   enforces a QPS the client does not know; AIMD has to find it from 429s.

Budget use = API-host requests the vendor admitted / the most it would have admitted
in the run's wall time (a sliding window of R per W s admits at most R * ceil(T / W);
a QPS token bucket at most Q + Q * T). Uploads, submits and polls all count;
downloads and storage PUTs do not. Reported with 429s and requests per item.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import anyio
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from pipeline.config import Config, ProviderConfig, RateLimit, RetryConfig
from pipeline.emulator import Scenario, start_emulator
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import make_portrait

SMILE = {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}}
EMOTION = {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}


async def scenario(
    label: str,
    *,
    op: dict[str, Any],
    vendor: str,
    images: int,
    vendor_limit: dict[str, float],
    client_limit: RateLimit | None,
    concurrency: int,
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for i in range(images):
            make_portrait(root / "in" / f"p{i:05d}.jpg", seed=i)
        manifest_path = root / "job.yaml"
        manifest_path.write_text(
            yaml.safe_dump(
                {
                    "inputs": ["in/*.jpg"],
                    "operations": [op],
                    "output": "out",
                    "concurrency": concurrency,
                }
            )
        )
        emu = await start_emulator(
            Scenario(
                task_seconds=1.0,
                sync_seconds=0.05,
                rate_limit=vendor_limit,  # type: ignore[arg-type]
                rate_limit_vendors=(vendor,),  # type: ignore[arg-type]
            )
        )
        try:
            providers = {
                name: ProviderConfig(
                    base_url=emu.base_url,
                    api_key_env=f"{name.upper()}_API_KEY",
                    poll_interval_seconds=1.0,
                    rate_limit=client_limit if name == vendor else None,
                )
                for name in ("ailab", "perfectcorp")
            }
            config = Config(
                providers=providers,  # type: ignore[arg-type]
                retry=RetryConfig(backoff_initial_seconds=0.2, backoff_max_seconds=5),
            )
            start = time.perf_counter()
            result = await run_job(load_manifest(manifest_path), config, RunOptions(quiet=True))
            elapsed = time.perf_counter() - start
        finally:
            stats = emu.stats()[vendor]
            await emu.close()
    report = result.report
    requests = report["requests"].get(vendor, {})
    api = sum(n for kind, n in requests.items() if kind not in {"download", "put"})
    admitted = api - stats["rate_limited"]
    capacity = _capacity(vendor_limit, elapsed)
    use = admitted / capacity
    items = report["counts"]["total"]
    polls = report["polls_per_task"].get(op["op"], {}).get("mean", 0.0)
    print(
        f"{label}: {items} items in {elapsed:.1f} s, exit {result.exit_code}; "
        f"{api} API requests ({api / max(items, 1):.2f}/item, {polls:g} polls/task); "
        f"429s: {stats['rate_limited']} ({100 * stats['rate_limited'] / max(api, 1):.1f}%); "
        f"budget use {100 * use:.0f}% ({admitted} admitted of at most {capacity:.0f})"
    )


def _capacity(limit: dict[str, float], seconds: float) -> float:
    """The most requests ``limit`` admits in ``seconds`` (see the module docstring)."""
    bounds = []
    if "requests" in limit and "per_seconds" in limit:
        bounds.append(limit["requests"] * math.ceil(seconds / limit["per_seconds"]))
    if "qps" in limit:
        bounds.append(limit["qps"] * (1 + seconds))
    return min(bounds)


async def main(seconds: float) -> None:
    os.environ.setdefault("AILAB_API_KEY", "bench-key")
    os.environ.setdefault("PERFECTCORP_API_KEY", "bench-key")
    # 1. Perfect Corp's 250 per 300 s and 5 QPS, scaled: 50 per 10 s and 10 QPS.
    #    ~3 requests an item (upload, create, ~1 poll) at 5 req/s sustained.
    published = {"requests": 50, "per_seconds": 10.0, "qps": 10.0}
    await scenario(
        "published limit (50 per 10 s, 10 QPS; config = vendor)",
        op=SMILE,
        vendor="perfectcorp",
        images=int(seconds * 5 / 3),
        vendor_limit=published,
        client_limit=RateLimit(requests=50, per_seconds=10.0, qps=10.0),
        concurrency=16,
    )
    # 2. AILab with an unpublished 15 QPS; one request an item (sync).
    await scenario(
        "unpublished limit (15 QPS; client not told)",
        op=EMOTION,
        vendor="ailab",
        images=int(seconds * 15),
        vendor_limit={"qps": 15.0},
        client_limit=None,
        concurrency=24,
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser()
    parser.add_argument("--seconds", type=float, default=60, help="target length of each run")
    args = parser.parse_args()
    anyio.run(main, args.seconds)
