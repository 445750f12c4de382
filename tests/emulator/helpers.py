"""Small clients for the emulator tests: real HTTP, one call per helper."""

from __future__ import annotations

import asyncio
import io
from collections.abc import Mapping
from typing import Any

import aiohttp
from PIL import Image

from pipeline.emulator import RunningEmulator

AILAB_KEY = "test-ailab-key"
PC_KEY = "test-perfectcorp-key"

EMOTION = "/api/portrait/effects/emotion-editor"
FACE_SWAP = "/api/portrait/editing/ai-face-swap"
BEAUTY = "/api/portrait/effects/face-beauty-pro"
POLL = "/api/common/query-async-task-result"
CREDITS = "/api/common/query-credits"

PC_UPLOAD = "/s2s/v2.0/file/ai-smile"
PC_TASK = "/s2s/v2.0/task/ai-smile"
PC_CREDIT = "/s2s/v1.0/client/credit"

Json = dict[str, Any]


def image_bytes(width: int = 160, height: int = 200, *, seed: int = 0, fmt: str = "JPEG") -> bytes:
    """A small portrait-sized image; a different ``seed`` gives different bytes."""
    color = (40 + seed * 37 % 200, 90 + seed * 53 % 150, 140 + seed * 29 % 110)
    img = Image.new("RGB", (width, height), color)
    img.putpixel((0, 0), (seed % 256, seed // 256 % 256, 7))
    out = io.BytesIO()
    img.save(out, format=fmt)
    return out.getvalue()


def is_jpeg(data: bytes) -> bool:
    return data[:3] == b"\xff\xd8\xff"


def assert_ailab_ok(status: int, body: Json) -> None:
    """HTTP 200 and the success envelope (docs/vendors.md, "AILab: response envelope")."""
    assert status == 200, body
    assert body["error_code"] == 0
    assert body["error_detail"] == {
        "status_code": 200,
        "code": "",
        "code_message": "",
        "message": "",
    }
    assert body["request_id"] and body["log_id"]


def assert_ailab_error(status: int, body: Json, http: int, code: str) -> None:
    """HTTP status = error_code = error_detail.status_code, code in both places.

    That is how the emulator answers (docs/vendors.md, "AILab: emulator behaviour").
    """
    assert (status, body["error_code"], body["error_detail"]["status_code"]) == (
        http,
        http,
        http,
    ), body
    assert body["error_detail"]["code"] == code
    assert body["error_code_str"] == code
    assert body["error_detail"]["message"]


async def ailab_post(
    http: aiohttp.ClientSession,
    emu: RunningEmulator,
    path: str,
    files: dict[str, bytes],
    fields: Mapping[str, object] | None = None,
    *,
    key: str | None = AILAB_KEY,
) -> tuple[int, Json]:
    form = aiohttp.FormData()
    for name, data in files.items():
        # A BytesIO, not bytes: aiohttp warns about large raw-bytes bodies.
        form.add_field(name, io.BytesIO(data), filename=f"{name}.jpg", content_type="image/jpeg")
    for name, value in (fields or {}).items():
        form.add_field(name, str(value))
    headers = {"ailabapi-api-key": key} if key is not None else {}
    async with http.post(emu.base_url + path, data=form, headers=headers) as response:
        return response.status, await response.json()


async def ailab_get(
    http: aiohttp.ClientSession,
    emu: RunningEmulator,
    path: str,
    params: dict[str, str] | None = None,
    *,
    key: str = AILAB_KEY,
) -> tuple[int, Json]:
    headers = {"ailabapi-api-key": key}
    async with http.get(emu.base_url + path, params=params, headers=headers) as response:
        return response.status, await response.json()


async def ailab_wait(
    http: aiohttp.ClientSession, emu: RunningEmulator, task_id: str, *, key: str = AILAB_KEY
) -> tuple[int, Json]:
    """Poll until the task leaves states 0/1 (or the poll fails); returns the last answer."""
    for _ in range(200):
        status, body = await ailab_get(http, emu, POLL, {"task_id": task_id}, key=key)
        if status != 200 or body["task_status"] not in (0, 1):
            return status, body
        await asyncio.sleep(0.02)
    raise AssertionError("task never finished")


async def ailab_balance(
    http: aiohttp.ClientSession, emu: RunningEmulator, *, key: str = AILAB_KEY
) -> dict[str, float]:
    status, body = await ailab_get(http, emu, CREDITS, key=key)
    assert status == 200, body
    return {pool["unique_sign"]: pool["balance"] for pool in body["data"]}


def pc_headers(key: str = PC_KEY) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def pc_request(
    http: aiohttp.ClientSession,
    emu: RunningEmulator,
    method: str,
    path: str,
    body: object = None,
    *,
    key: str = PC_KEY,
) -> tuple[int, Json]:
    async with http.request(
        method, emu.base_url + path, json=body, headers=pc_headers(key)
    ) as response:
        return response.status, await response.json()


async def pc_file_record(
    http: aiohttp.ClientSession,
    emu: RunningEmulator,
    size: int,
    content_type: str = "image/jpeg",
    *,
    path: str = PC_UPLOAD,
    key: str = PC_KEY,
) -> Json:
    """Upload step 1: the file record (``file_id`` and the PUT request to make).

    Step 1 as docs/vendors.md "Perfect Corp: upload" describes it.
    """
    files = [{"content_type": content_type, "file_name": "portrait.jpg", "file_size": size}]
    status, body = await pc_request(http, emu, "POST", path, {"files": files}, key=key)
    assert status == 200, body
    record: Json = body["data"]["files"][0]
    return record


async def pc_upload(
    http: aiohttp.ClientSession, emu: RunningEmulator, data: bytes, *, key: str = PC_KEY
) -> str:
    """Both upload steps (docs/vendors.md, "Perfect Corp: upload"); returns the ``file_id``."""
    record = await pc_file_record(http, emu, len(data), key=key)
    put = record["requests"][0]
    async with http.put(put["url"], data=data, headers=put["headers"]) as response:
        assert response.status == 200, await response.text()
    file_id: str = record["file_id"]
    return file_id


async def pc_create(
    http: aiohttp.ClientSession,
    emu: RunningEmulator,
    file_id: str,
    expression_type: str = "closed_mouth_smile",
    *,
    key: str = PC_KEY,
) -> str:
    body = {"src_file_id": file_id, "expression_type": expression_type}
    status, answer = await pc_request(http, emu, "POST", PC_TASK, body, key=key)
    assert status == 200, answer
    task_id: str = answer["data"]["task_id"]
    return task_id


async def pc_poll(
    http: aiohttp.ClientSession, emu: RunningEmulator, task_id: str, *, key: str = PC_KEY
) -> tuple[int, Json]:
    return await pc_request(http, emu, "GET", f"{PC_TASK}/{task_id}", key=key)


async def pc_wait(
    http: aiohttp.ClientSession, emu: RunningEmulator, task_id: str, *, key: str = PC_KEY
) -> tuple[int, Json]:
    """Poll until the task is not ``running`` (or the poll fails)."""
    for _ in range(200):
        status, body = await pc_poll(http, emu, task_id, key=key)
        if status != 200 or body["data"]["task_status"] != "running":
            return status, body
        await asyncio.sleep(0.02)
    raise AssertionError("task never finished")


async def pc_units(
    http: aiohttp.ClientSession, emu: RunningEmulator, *, key: str = PC_KEY
) -> float:
    status, body = await pc_request(http, emu, "GET", PC_CREDIT, key=key)
    assert status == 200, body
    units: float = body["results"][0]["amount_dec"]
    return units


async def fetch(http: aiohttp.ClientSession, url: str) -> tuple[int, bytes]:
    async with http.get(url) as response:
        return response.status, await response.read()
