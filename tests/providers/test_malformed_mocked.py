"""Failures a real server cannot easily produce, injected with aioresponses.

Only malformed-response and broken-transport edge cases live here; everything else
talks HTTP to the loopback server in ``_server.py``.
"""

from __future__ import annotations

import re
from collections.abc import AsyncIterator, Iterator
from types import SimpleNamespace
from typing import Any

import aiohttp
import pytest
from aioresponses import aioresponses

from pipeline.errors import RetryableError, TransportError
from pipeline.providers.ailab import AILabProvider
from pipeline.providers.perfectcorp import PerfectCorpProvider

from ._server import KEY, Kit, jpeg_payload, make_kit

BASE = "https://api.vendor.test"


@pytest.fixture
def mocked() -> Iterator[aioresponses]:
    with aioresponses() as m:
        yield m


@pytest.fixture
async def kit() -> AsyncIterator[Kit]:
    async with aiohttp.ClientSession() as session:
        yield make_kit(session, BASE)


def ailab(kit: Kit) -> AILabProvider:
    return AILabProvider(kit.session, kit.config, KEY, kit.timeouts, kit.stats, kit.budget)


def perfectcorp(kit: Kit) -> PerfectCorpProvider:
    return PerfectCorpProvider(kit.session, kit.config, KEY, kit.timeouts, kit.stats, kit.budget)


ANY = re.compile(r"^https://.*$")


class CompatResponse(aiohttp.ClientResponse):
    """aioresponses 0.7.9 predates aiohttp 3.14's required ``stream_writer`` argument
    (pnuckowski/aioresponses#289, open); hand it a finished writer's stand-in."""

    def __init__(self, method: str, url: Any, **kwargs: Any) -> None:
        kwargs.setdefault("stream_writer", SimpleNamespace(output_size=0))
        super().__init__(method, url, **kwargs)


@pytest.mark.parametrize(
    "exc",
    [
        aiohttp.ClientPayloadError("Response payload is not completed"),  # truncated body
        aiohttp.ServerDisconnectedError(),
        aiohttp.ClientOSError(104, "Connection reset by peer"),
    ],
)
async def test_ailab_poll_broken_transport(mocked: aioresponses, kit: Kit, exc: Exception) -> None:
    mocked.get(ANY, exception=exc)
    with pytest.raises(TransportError) as info:
        await ailab(kit).poll("ailab/face-swap", "t1")
    assert info.value.code == "NETWORK_ERROR"
    assert info.value.vendor == "ailab"
    assert type(exc).__name__ in info.value.message
    assert KEY not in str(info.value)


async def test_ailab_submit_timeout(mocked: aioresponses, kit: Kit) -> None:
    mocked.post(ANY, exception=TimeoutError())
    with pytest.raises(TransportError) as info:
        await ailab(kit).submit("ailab/emotion-editor", jpeg_payload(), {"service_choice": 10}, {})
    assert info.value.code == "TIMEOUT"


async def test_ailab_submit_truncated_json(mocked: aioresponses, kit: Kit) -> None:
    mocked.post(
        ANY,
        status=200,
        body=b'{"request_id":"r","error_detail":{"code":""},"data":{"im',
        response_class=CompatResponse,
    )
    with pytest.raises(RetryableError) as info:
        await ailab(kit).submit("ailab/emotion-editor", jpeg_payload(), {"service_choice": 10}, {})
    assert info.value.code == "MALFORMED_RESPONSE"


async def test_ailab_credits_html_200(mocked: aioresponses, kit: Kit) -> None:
    mocked.get(
        ANY,
        status=200,
        body=b"<html>Cloudflare challenge</html>",
        content_type="text/html",
        response_class=CompatResponse,
    )
    with pytest.raises(RetryableError) as info:
        await ailab(kit).credits()
    assert info.value.code == "MALFORMED_RESPONSE"


async def test_perfectcorp_poll_html_502(mocked: aioresponses, kit: Kit) -> None:
    mocked.get(
        ANY,
        status=502,
        body=b"<html><h1>502 Bad Gateway</h1></html>",
        content_type="text/html",
        headers={"x-request-id": "rq-502"},
        response_class=CompatResponse,
    )
    with pytest.raises(TransportError) as info:
        await perfectcorp(kit).poll("perfectcorp/ai-smile", "t1")
    assert info.value.code == "HTTP_502"
    assert info.value.request_id == "rq-502"


async def test_perfectcorp_upload_disconnect(mocked: aioresponses, kit: Kit) -> None:
    mocked.post(ANY, exception=aiohttp.ServerDisconnectedError())
    with pytest.raises(TransportError):
        await perfectcorp(kit).submit(
            "perfectcorp/ai-smile", jpeg_payload(), {"expression_type": "closed_mouth_smile"}, {}
        )
    assert kit.stats.by_vendor() == {"perfectcorp": {"upload": 1}}


async def test_perfectcorp_download_payload_error(mocked: aioresponses, kit: Kit) -> None:
    mocked.get(ANY, exception=aiohttp.ClientPayloadError("Response payload is not completed"))
    with pytest.raises(TransportError) as info:
        await perfectcorp(kit).download("https://yce-us.s3.test/r.jpg?X-Amz-Signature=s3cr3t")
    assert "s3cr3t" not in str(info.value)
    assert kit.budget.taken == 0
