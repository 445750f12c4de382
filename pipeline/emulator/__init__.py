"""The built-in emulator of both vendors' APIs (``pipeline emulate``, ``--emulate``).

One aiohttp server speaks AILabTools (``/api/...``) and Perfect Corp (``/s2s/...``) as
``docs/vendors.md`` describes them, serves their storage (``/_storage/...``)
and counts what it saw (``GET /_emulator/stats``). A :class:`Scenario` sets its timing,
faults, limits and accounts.
"""

from __future__ import annotations

from pipeline.emulator.scenario import RateLimitSpec, Scenario, load_scenario
from pipeline.emulator.server import (
    RunningEmulator,
    create_app,
    running_emulator,
    serve,
    start_emulator,
)

__all__ = [
    "RateLimitSpec",
    "RunningEmulator",
    "Scenario",
    "create_app",
    "load_scenario",
    "running_emulator",
    "serve",
    "start_emulator",
]
