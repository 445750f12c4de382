"""The server around both vendors: stats, reset, dropped connections, stalls, ``serve``."""

from __future__ import annotations

import asyncio
import hashlib
import os
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import aiohttp
import pytest

import pipeline.emulator as emulator_pkg
from pipeline.emulator import RunningEmulator, Scenario, running_emulator

from .conftest import StartEmulator
from .helpers import (
    CREDITS,
    EMOTION,
    FACE_SWAP,
    ailab_post,
    ailab_wait,
    assert_ailab_ok,
    fetch,
    image_bytes,
    pc_create,
    pc_upload,
    pc_wait,
)

REPO = Path(__file__).resolve().parents[2]

COUNTERS = {
    "requests", "submits", "polls", "uploads", "puts", "downloads", "charged", "credits_spent",
    "rejected", "rate_limited", "transient_errors", "disconnects", "lost_responses",
    "task_failures", "expired", "submits_by_input", "submits_by_request", "charged_by_input",
}  # fmt: skip


def test_public_surface() -> None:
    assert set(emulator_pkg.__all__) == {
        "RateLimitSpec", "RunningEmulator", "Scenario", "create_app", "load_scenario",
        "running_emulator", "serve", "start_emulator",
    }  # fmt: skip
    for name in emulator_pkg.__all__:
        assert getattr(emulator_pkg, name) is not None


async def test_stats_endpoint_matches_stats(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    image = image_bytes(seed=5)
    assert_ailab_ok(
        *await ailab_post(http, emu, EMOTION, {"image_target": image}, {"service_choice": 12})
    )
    await pc_wait(http, emu, await pc_create(http, emu, await pc_upload(http, emu, image)))
    async with http.get(emu.base_url + "/_emulator/stats") as response:
        assert response.status == 200
        served = await response.json()
    assert served == emu.stats()
    assert set(served) == {"ailab", "perfectcorp"}
    for vendor in served.values():
        assert set(vendor) == COUNTERS
    digest = hashlib.sha256(image).hexdigest()
    assert served["ailab"]["submits_by_input"] == {digest: 1}
    assert served["perfectcorp"]["submits_by_input"] == {digest: 1}
    assert served["perfectcorp"]["uploads"] == served["perfectcorp"]["puts"] == 1


async def test_submits_by_request_tells_variants_apart(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    image = image_bytes()
    for choice in (12, 14, 12):
        await ailab_post(http, emu, EMOTION, {"image_target": image}, {"service_choice": choice})
    stats = emu.stats()["ailab"]
    assert list(stats["submits_by_input"].values()) == [3]
    assert sorted(stats["submits_by_request"].values()) == [1, 2]


async def test_reset_forgets_everything(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    await ailab_post(http, emu, EMOTION, {"image_target": image_bytes()}, {"service_choice": 12})
    async with http.post(emu.base_url + "/_emulator/reset") as response:
        assert await response.json() == {"ok": True}
    assert emu.stats()["ailab"]["submits"] == 0
    async with http.get(emu.base_url + "/_emulator/scenario") as response:
        assert (await response.json())["task_seconds"] == emu.scenario.task_seconds


async def test_disconnect_drops_before_processing(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(disconnect_rate=1.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await ailab_post(
            http,
            emu,
            FACE_SWAP,
            {"image_target": image_bytes(), "image_template": image_bytes(seed=1)},
        )
    with pytest.raises(aiohttp.ClientConnectionError):
        async with http.get(
            emu.base_url + "/s2s/v1.0/client/credit", headers={"Authorization": "Bearer k"}
        ):
            pass
    stats = emu.stats()
    assert (
        stats["ailab"]["requests"],
        stats["ailab"]["disconnects"],
        stats["ailab"]["submits"],
    ) == (1, 1, 0)
    assert stats["ailab"]["rejected"] == 0
    # aiohttp itself retries an idempotent GET once after a disconnect.
    assert stats["perfectcorp"]["disconnects"] == stats["perfectcorp"]["requests"] >= 1


async def test_lost_response_still_creates_and_bills_the_task(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    """The vendor did the work, the client never heard: the dangerous case.

    There is no idempotency key (docs/vendors.md, "Both vendors: no idempotency key").
    """
    emu = await start(lost_response_rate=1.0, task_seconds=0.0)
    with pytest.raises(aiohttp.ClientConnectionError):
        await ailab_post(
            http,
            emu,
            FACE_SWAP,
            {"image_target": image_bytes(), "image_template": image_bytes(seed=1)},
        )
    await asyncio.sleep(0.01)
    stats = emu.stats()["ailab"]
    assert (stats["submits"], stats["lost_responses"], stats["charged"]) == (1, 1, 1)


async def test_download_stall(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(task_seconds=0.0, download_stall_rate=1.0, download_stall_seconds=0.3)
    _, body = await ailab_post(
        http, emu, FACE_SWAP, {"image_target": image_bytes(), "image_template": image_bytes(seed=1)}
    )
    _, done = await ailab_wait(http, emu, body["task_id"])
    began = time.monotonic()
    status, _ = await fetch(http, done["data"]["image"])
    assert status == 200 and time.monotonic() - began >= 0.3


async def test_unknown_storage_key(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    status, xml = await fetch(http, emu.base_url + "/_storage/ailab/result/nothing.jpg")
    assert status == 404 and b"<Code>NoSuchKey</Code>" in xml


async def test_seed_makes_faults_reproducible(http: aiohttp.ClientSession) -> None:
    async def codes(seed: int) -> list[int]:
        scenario = Scenario(transient_error_rate=0.5, seed=seed)
        async with running_emulator(scenario) as emu:
            out = []
            for _ in range(10):
                async with http.get(
                    emu.base_url + CREDITS, headers={"ailabapi-api-key": "k"}
                ) as response:
                    out.append(response.status)
            return out

    first = await codes(3)
    assert first == await codes(3)
    assert set(first) != {200}


def test_serve_prints_its_url_and_stops_on_sigterm() -> None:
    code = "from pipeline.emulator import Scenario, serve; serve('127.0.0.1', 0, Scenario())"
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    with subprocess.Popen(
        [sys.executable, "-c", code],
        cwd=REPO,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as proc:
        try:
            assert proc.stdout is not None
            line = proc.stdout.readline().strip()
            assert line.startswith("emulator listening on http://127.0.0.1:"), line
            url = line.removeprefix("emulator listening on ")
            with urllib.request.urlopen(url + "/_emulator/stats", timeout=5) as response:
                assert response.status == 200
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(timeout=10) == 0
            assert proc.stderr is not None and "Traceback" not in proc.stderr.read()
        finally:
            if proc.poll() is None:
                proc.kill()
