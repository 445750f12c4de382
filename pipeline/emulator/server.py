"""The emulator server: both vendors, their storage and a stats endpoint on one port.

::

    /api/...            AILabTools (pipeline.emulator.ailab)
    /s2s/...            Perfect Corp (pipeline.emulator.perfectcorp)
    /_storage/...       presigned uploads and expiring result downloads (pipeline.emulator.storage)
    GET  /_emulator/stats      {"ailab": {...}, "perfectcorp": {...}} (see VendorStats)
    GET  /_emulator/scenario   the scenario in force
    POST /_emulator/reset      forget all tasks, files, accounts, budgets and counters

In-process use (tests, ``--emulate``)::

    async with running_emulator(Scenario(task_seconds=0.1)) as emu:
        ...  # point clients at emu.base_url; emu.stats() is the stats JSON
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
import time
from collections.abc import AsyncIterator
from typing import Any

from aiohttp import web

from pipeline.emulator.ailab import AilabAPI
from pipeline.emulator.faults import Faults
from pipeline.emulator.gate import Shared
from pipeline.emulator.perfectcorp import PerfectCorpAPI
from pipeline.emulator.scenario import Scenario
from pipeline.emulator.stats import VendorStats
from pipeline.emulator.storage import BlobStore, Links, StorageRoutes

__all__ = ["RunningEmulator", "create_app", "running_emulator", "serve", "start_emulator"]

# Room for a 100 MB Perfect Corp video PUT (docs/vendors.md, "Perfect Corp: upload");
# AILab bodies have their own cap.
_CLIENT_MAX_SIZE = 110 * 1024 * 1024
# In-flight requests (e.g. a stalled download) get this long at shutdown.
_SHUTDOWN_TIMEOUT = 2.0


class EmulatorState:
    """Everything one emulator instance knows."""

    def __init__(self, scenario: Scenario) -> None:
        self.scenario = scenario
        clock = time.monotonic
        faults = Faults(scenario.seed)
        shared = Shared(scenario, faults, BlobStore(), Links(clock), clock=clock)
        self.shared = shared
        self.ailab = AilabAPI(shared)
        self.perfectcorp = PerfectCorpAPI(shared)
        self.storage = StorageRoutes(shared, self._stats_of)

    def _stats_of(self, vendor: str) -> VendorStats:
        return self.ailab.stats if vendor == "ailab" else self.perfectcorp.stats

    def stats(self) -> dict[str, Any]:
        """Current counters of both vendors (tasks due by now are settled first)."""
        self.ailab.settle_due()
        self.perfectcorp.settle_due()
        self.perfectcorp.expire_lapsed()
        return {
            "ailab": self.ailab.stats.as_dict(),
            "perfectcorp": self.perfectcorp.stats.as_dict(),
        }

    def reset(self) -> None:
        self.ailab.reset()
        self.perfectcorp.reset()
        self.shared.links.clear()
        self.shared.blobs.close()
        self.shared.faults.reset()

    async def close(self) -> None:
        """Stop the renders still running, wait for them, then remove every blob."""
        jobs = [*self.ailab.cancel_renders(), *self.perfectcorp.cancel_renders()]
        if jobs:
            await asyncio.gather(*jobs, return_exceptions=True)
        self.shared.blobs.close()


_STATE = web.AppKey("pipeline_emulator_state", EmulatorState)


async def _stats(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].stats())


async def _scenario(request: web.Request) -> web.Response:
    return web.json_response(request.app[_STATE].scenario.model_dump(mode="json"))


async def _reset(request: web.Request) -> web.Response:
    request.app[_STATE].reset()
    return web.json_response({"ok": True})


def create_app(scenario: Scenario) -> web.Application:
    """A fresh aiohttp application emulating both vendors under ``scenario``."""
    app = web.Application(client_max_size=_CLIENT_MAX_SIZE)
    state = EmulatorState(scenario)
    app[_STATE] = state
    app.add_routes(
        [
            web.get("/_emulator/stats", _stats),
            web.get("/_emulator/scenario", _scenario),
            web.post("/_emulator/reset", _reset),
        ]
    )
    app.add_routes(state.storage.routes())
    app.add_routes(state.ailab.routes())
    app.add_routes(state.perfectcorp.routes())

    async def _cleanup(_: web.Application) -> None:
        await state.close()

    app.on_cleanup.append(_cleanup)
    return app


class RunningEmulator:
    """An emulator serving on a real socket. Close it with :meth:`close`."""

    base_url: str
    """e.g. ``http://127.0.0.1:54321``: the base URL of both vendors' APIs."""

    def __init__(self, runner: web.AppRunner, base_url: str) -> None:
        self._runner = runner
        self.base_url = base_url

    @property
    def app(self) -> web.Application:
        return self._runner.app

    @property
    def scenario(self) -> Scenario:
        return self.app[_STATE].scenario

    def stats(self) -> dict[str, Any]:
        """The same JSON as ``GET /_emulator/stats``."""
        return self.app[_STATE].stats()

    def reset(self) -> None:
        """The same as ``POST /_emulator/reset``."""
        self.app[_STATE].reset()

    async def close(self) -> None:
        await self._runner.cleanup()

    async def __aenter__(self) -> RunningEmulator:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()


async def start_emulator(
    scenario: Scenario | None = None, host: str = "127.0.0.1", port: int = 0
) -> RunningEmulator:
    """Start serving on ``host:port`` (``0``: a free port) and return at once."""
    runner = web.AppRunner(
        create_app(scenario or Scenario()), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
    )
    await runner.setup()
    try:
        site = web.TCPSite(runner, host, port)
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    bound_host, bound_port = runner.addresses[0][:2]
    shown = f"[{bound_host}]" if ":" in bound_host else bound_host
    return RunningEmulator(runner, f"http://{shown}:{bound_port}")


@contextlib.asynccontextmanager
async def running_emulator(
    scenario: Scenario | None = None, host: str = "127.0.0.1", port: int = 0
) -> AsyncIterator[RunningEmulator]:
    """``async with running_emulator(...) as emu:`` starts it and always stops it."""
    emulator = await start_emulator(scenario, host, port)
    try:
        yield emulator
    finally:
        await emulator.close()


def serve(host: str, port: int, scenario: Scenario) -> None:
    """Serve until SIGINT or SIGTERM, after printing ``emulator listening on URL``."""

    async def main() -> None:
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):  # e.g. Windows
                loop.add_signal_handler(signum, stop.set)
        async with running_emulator(scenario, host, port) as emulator:
            print(f"emulator listening on {emulator.base_url}", flush=True)
            await stop.wait()

    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(main())
    sys.stdout.flush()
