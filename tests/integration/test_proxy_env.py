"""Behind a proxy: ``HTTP_PROXY``/``HTTPS_PROXY`` and ``NO_PROXY`` route the API calls.

The vendor's ``base_url`` names a host that does not resolve (``vendor.invalid``); only
a forward proxy on loopback, named by ``HTTP_PROXY``, can reach the emulator behind it.
A run that succeeds proves the calls went through the proxy; ``NO_PROXY`` for the host
sends them direct (and so they fail, unreachable, with nothing paid).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web

from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import fast_config, make_portrait

SYNC: dict[str, Any] = {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}
pytestmark = pytest.mark.timeout(60)


class ForwardProxy:
    """A plain HTTP forward proxy: absolute-form requests for ``vendor.invalid`` are
    passed to the emulator; it records each request's target host."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.hosts: Counter[str] = Counter()
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def __aenter__(self) -> ForwardProxy:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._forward)
        self.runner = web.AppRunner(app)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self.url = f"http://127.0.0.1:{port}"
        self.session = aiohttp.ClientSession(auto_decompress=False)
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.session.close()
        assert self.runner is not None
        await self.runner.cleanup()

    async def _forward(self, request: web.Request) -> web.Response:
        self.hosts[request.host.split(":")[0]] += 1
        headers = {
            k: v for k, v in request.headers.items()
            if k.lower() not in ("host", "proxy-connection", "connection", "content-length")
        }  # fmt: skip
        body = await request.read()
        async with self.session.request(
            request.method, self.upstream + request.rel_url.path_qs, data=body, headers=headers
        ) as resp:
            payload = await resp.read()
            out = {
                k: v for k, v in resp.headers.items()
                if k.lower() not in ("content-length", "transfer-encoding", "connection")
            }  # fmt: skip
            return web.Response(status=resp.status, body=payload, headers=out)


async def _run_behind_proxy(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    *,
    n: int,
    no_proxy: str | None,
) -> tuple[int, ForwardProxy]:
    """Run ``n`` sync items against ``vendor.invalid`` with ``HTTP_PROXY`` set to a
    forward proxy in front of the emulator; the exit code and the proxy."""
    for i in range(n):
        make_portrait(tmp_path / "in" / f"p{i}.jpg", seed=i)
    manifest = load_manifest(write_manifest([SYNC], concurrency=2))
    port = emulator.base_url.rsplit(":", 1)[1]
    async with ForwardProxy(emulator.base_url) as proxy:
        monkeypatch.setenv("HTTP_PROXY", proxy.url)
        monkeypatch.delenv("no_proxy", raising=False)
        if no_proxy is None:
            monkeypatch.delenv("NO_PROXY", raising=False)
        else:
            monkeypatch.setenv("NO_PROXY", no_proxy)
        config = fast_config(f"http://vendor.invalid:{port}")
        result = await run_job(manifest, config, RunOptions(quiet=True))
    return result.exit_code, proxy


async def test_api_calls_go_through_the_proxy_named_by_http_proxy(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, proxy = await _run_behind_proxy(
        tmp_path, emulator, write_manifest, monkeypatch, n=3, no_proxy=None
    )
    assert code == 0
    assert proxy.hosts == Counter({"vendor.invalid": 3})  # three submits, nothing direct
    assert emulator.stats()["ailab"]["charged"] == 3


async def test_no_proxy_sends_the_host_direct(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    code, proxy = await _run_behind_proxy(
        tmp_path, emulator, write_manifest, monkeypatch, n=2, no_proxy="vendor.invalid"
    )
    assert code != 0  # direct: the name does not resolve
    assert proxy.hosts == Counter()
    assert emulator.stats()["ailab"]["charged"] == 0
