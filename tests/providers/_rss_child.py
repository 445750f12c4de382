"""Child process of the memory test (``test_memory_bound.py``).

``python -m tests.providers._rss_child PORT CALL:KIND:N ...``: for each argument, N
simultaneous provider calls (``sync`` submit, ``poll``, ``download``,
``download_to``) with the default settings against the impostor on PORT (another
process, so its memory is not counted here) answering as KIND; prints one JSON line:
this process's peak RSS (``VmHWM``) and the codes each phase ended with.
"""

from __future__ import annotations

import asyncio
import json
import resource
import sys
from collections import Counter
from pathlib import Path

import aiohttp

from pipeline.config import NetworkConfig, ProviderConfig, TimeoutConfig
from pipeline.errors import VendorError
from pipeline.providers.ailab import AILabProvider
from pipeline.providers.base import ImagePayload, RequestStats

from .impostor import KEY, jpeg


def _peak_rss_kib() -> int:
    """This process's own peak RSS. Not ``getrusage``: Linux folds the RSS of the
    forked parent (the test runner, large late in a suite) into ``ru_maxrss`` at exec;
    ``VmHWM`` belongs to the exec'd image alone."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


class NullSink:
    def write(self, data: bytes) -> int:
        return len(data)


async def _nobudget(kind: str) -> None:
    return None


async def one(session: aiohttp.ClientSession, port: int, call: str, kind: str) -> str:
    origin = f"http://127.0.0.1:{port}"
    p = AILabProvider(
        session,
        ProviderConfig(base_url=f"{origin}/k/{kind}", api_key_env="UNUSED"),
        KEY,
        TimeoutConfig(connect_seconds=10, request_seconds=60, download_seconds=60),
        RequestStats(),
        _nobudget,
        network=NetworkConfig(),
    )
    url = f"{origin}/r/{kind}/result.jpg?X-Amz-Signature=S"
    try:
        if call == "sync":
            image = ImagePayload(data=jpeg(), filename="p.jpg", content_type="image/jpeg")
            out = await p.submit("ailab/emotion-editor", image, {"service_choice": 10}, {})
            return "ok" if out.image else "empty"
        if call == "poll":
            await p.poll("ailab/face-swap", "t")
            return "ok"
        if call == "download":
            await p.download(url)
            return "ok"
        await p.download_to(url, NullSink(), check_path=str(Path("/nonexistent/never-read")))
        return "ok"
    except VendorError as exc:
        return exc.code


async def main(port: int, plan: list[tuple[str, str, int]]) -> None:
    outcomes: dict[str, dict[str, int]] = {}
    connector = aiohttp.TCPConnector(limit=0)
    async with aiohttp.ClientSession(connector=connector) as session:
        for call, kind, concurrency in plan:
            codes = await asyncio.gather(
                *(one(session, port, call, kind) for _ in range(concurrency))
            )
            outcomes[f"{call}:{kind}"] = dict(Counter(codes))
    peak_mb = _peak_rss_kib() / 1024
    print(json.dumps({"peak_rss_mb": peak_mb, "outcomes": outcomes}))


def parse_plan(args: list[str]) -> list[tuple[str, str, int]]:
    plan = []
    for arg in args:
        call, kind, n = arg.split(":")
        plan.append((call, kind, int(n)))
    return plan


if __name__ == "__main__":
    asyncio.run(main(int(sys.argv[1]), parse_plan(sys.argv[2:])))
