"""Fixtures: emulators on loopback with fast scenarios, and an HTTP client."""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from pipeline.emulator import RunningEmulator, Scenario, start_emulator

StartEmulator = Callable[..., Awaitable[RunningEmulator]]

# Fast by default: tests must finish in milliseconds, not in vendor time.
FAST = {"task_seconds": 0.05, "sync_seconds": 0.0}


@pytest.fixture
async def start() -> AsyncIterator[StartEmulator]:
    """``await start(**knobs)``: an emulator with FAST timing plus ``knobs``, closed after the test."""
    running: list[RunningEmulator] = []

    async def _start(**knobs: Any) -> RunningEmulator:
        emulator = await start_emulator(Scenario(**{**FAST, **knobs}))
        running.append(emulator)
        return emulator

    yield _start
    for emulator in running:
        await emulator.close()


@pytest.fixture
async def emu(start: StartEmulator) -> RunningEmulator:
    """A default (fast, fault-free) emulator."""
    return await start()


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session
