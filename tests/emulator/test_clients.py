"""The vendors' own ways of calling: documented curl, the AILab SDK's httpx style, the
Perfect Corp vendor-org client's ``requests`` style. Written here in their style; nothing
is copied from those projects."""

from __future__ import annotations

import asyncio
import json
import shutil
import subprocess
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from pipeline.emulator import RunningEmulator

from .helpers import (
    AILAB_KEY,
    BEAUTY,
    CREDITS,
    EMOTION,
    FACE_SWAP,
    PC_KEY,
    POLL,
    image_bytes,
    is_jpeg,
)

CURL = shutil.which("curl")
needs_curl = pytest.mark.skipif(CURL is None, reason="curl is not installed")


async def _curl(*args: str) -> tuple[int, str]:
    """Run curl; returns (HTTP status, body)."""
    assert CURL is not None
    proc = await asyncio.create_subprocess_exec(
        CURL,
        "-s",
        "-S",
        "-w",
        "\n%{http_code}",
        *args,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    out, err = await proc.communicate()
    assert proc.returncode == 0, err.decode()
    body, _, status = out.decode().rpartition("\n")
    return int(status), body


@needs_curl
async def test_ailab_face_swap_docs_curl(emu: RunningEmulator, tmp_path: Path) -> None:
    """The curl example of the AI Face Swap page, verbatim but for host, key and file."""
    example = tmp_path / "example-file"  # no extension: curl sends application/octet-stream
    example.write_bytes(image_bytes())
    status, body = await _curl(
        "--request", "POST",
        "--url", f"{emu.base_url}/api/portrait/editing/ai-face-swap",
        "--header", "Content-Type: multipart/form-data",
        "--header", f"ailabapi-api-key: {AILAB_KEY}",
        "--form", f"image_target=@{example}",
        "--form", f"image_template=@{example}",
    )  # fmt: skip
    answer = json.loads(body)
    assert status == 200 and answer["error_code"] == 0 and answer["task_type"] == "async"
    for _ in range(100):
        status, body = await _curl(
            "--url", f"{emu.base_url}/api/common/query-async-task-result?task_id={answer['task_id']}",
            "--header", f"ailabapi-api-key: {AILAB_KEY}",
        )  # fmt: skip
        poll = json.loads(body)
        if poll["task_status"] == 2:
            break
        await asyncio.sleep(0.02)
    assert poll["data"]["image"].startswith("http")


@needs_curl
async def test_perfectcorp_flow_with_curl(emu: RunningEmulator, tmp_path: Path) -> None:
    """Upload, PUT with the returned headers, create, poll: the documented curl flow."""
    selfie = tmp_path / "my-selfie.jpg"
    selfie.write_bytes(image_bytes())
    auth = f"Authorization: Bearer {PC_KEY}"
    files = {
        "files": [
            {
                "content_type": "image/jpeg",
                "file_name": "my-selfie.jpg",
                "file_size": selfie.stat().st_size,
            }
        ]
    }
    status, body = await _curl(
        "-X", "POST", f"{emu.base_url}/s2s/v2.0/file/ai-smile",
        "-H", auth, "-H", "Content-Type: application/json", "-d", json.dumps(files),
    )  # fmt: skip
    assert status == 200
    record = json.loads(body)["data"]["files"][0]
    put = record["requests"][0]
    headers = [arg for name, value in put["headers"].items() for arg in ("-H", f"{name}: {value}")]
    status, _ = await _curl("-X", "PUT", put["url"], *headers, "--data-binary", f"@{selfie}")
    assert status == 200
    task = {"src_file_id": record["file_id"], "expression_type": "smile_with_teeth_visible"}
    status, body = await _curl(
        "-X", "POST", f"{emu.base_url}/s2s/v2.0/task/ai-smile",
        "-H", auth, "-H", "Content-Type: application/json", "-d", json.dumps(task),
    )  # fmt: skip
    assert status == 200
    task_id = json.loads(body)["data"]["task_id"]
    for _ in range(100):
        status, body = await _curl(f"{emu.base_url}/s2s/v2.0/task/ai-smile/{task_id}", "-H", auth)
        data = json.loads(body)["data"]
        if data["task_status"] != "running":
            break
        await asyncio.sleep(0.02)
    assert data["task_status"] == "success" and data["results"]["url"]


def _sdk_file(field: str, value: bytes) -> tuple[str, bytes, str]:
    """How the AILab SDK names a bytes file part: ``<field>.<sniffed ext>`` + sniffed type."""
    if value.startswith(b"\x89PNG\r\n\x1a\n"):
        return (f"{field}.png", value, "image/png")
    return (f"{field}.jpg", value, "image/jpeg")


async def _sdk_request(
    client: httpx.AsyncClient,
    method: str,
    path: str,
    *,
    query: dict[str, Any] | None = None,
    body: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The SDK's request rule: multipart (files + str fields); error if non-200 or error_code."""
    files = {k: _sdk_file(k, v) for k, v in (body or {}).items() if isinstance(v, bytes)}
    data = {k: str(v) for k, v in (body or {}).items() if not isinstance(v, bytes)}
    if body is None:
        response = await client.request(method, path, params=query or {})
    else:
        response = await client.request(method, path, params=query or {}, data=data, files=files)
    answer: dict[str, Any] = response.json()
    assert response.status_code == 200 and not answer.get("error_code"), answer
    return answer


async def test_ailab_sdk_style_httpx(emu: RunningEmulator) -> None:
    async with httpx.AsyncClient(
        base_url=emu.base_url, timeout=30.0, headers={"ailabapi-api-key": AILAB_KEY}
    ) as client:
        credits = await _sdk_request(client, "GET", CREDITS, query={})
        assert credits["data"][0]["unique_sign"] == "common"
        edited = await _sdk_request(
            client,
            "POST",
            EMOTION,
            body={"image_target": image_bytes(fmt="PNG"), "service_choice": 13},
        )
        assert edited["data"]["image"]
        beauty = await _sdk_request(
            client,
            "POST",
            BEAUTY,
            body={"image": image_bytes(), "smoothing": 70, "filter_type": 10, "task_type": "async"},
        )
        swap = await _sdk_request(
            client,
            "POST",
            FACE_SWAP,
            body={"image_target": image_bytes(), "image_template": image_bytes(seed=4)},
        )
        for submitted in (beauty, swap):
            for _ in range(100):
                poll = await _sdk_request(
                    client, "GET", POLL, query={"task_id": submitted["task_id"]}
                )
                if poll["task_status"] == 2:
                    break
                await asyncio.sleep(0.02)
            url = poll.get("result_url") or poll["data"]["image"]
            assert is_jpeg((await client.get(url)).content)


async def test_perfectcorp_vendor_client_style_requests(
    emu: RunningEmulator, tmp_path: Path
) -> None:
    """The vendor-org client: requests, JSON headers on every call, PUT of an open file."""
    import requests  # declared in the test extra: never skipped

    selfie = tmp_path / "selfie.jpg"
    selfie.write_bytes(image_bytes())
    headers = {"Authorization": f"Bearer {PC_KEY}", "Content-Type": "application/json"}

    def flow() -> dict[str, Any]:
        meta = requests.post(
            f"{emu.base_url}/s2s/v2.0/file",  # the client's default upload path
            headers=headers,
            json={
                "files": [
                    {
                        "content_type": "image/jpeg",
                        "file_name": selfie.name,
                        "file_size": selfie.stat().st_size,
                    }
                ]
            },
            timeout=30,
        )
        meta.raise_for_status()
        info = meta.json()["data"]["files"][0]
        put_req = info["requests"][0]
        with selfie.open("rb") as fh:
            requests.put(
                put_req["url"], headers=put_req.get("headers"), data=fh, timeout=30
            ).raise_for_status()
        created = requests.post(
            f"{emu.base_url}/s2s/v2.0/task/ai-smile",
            headers=headers,
            json={"expression_type": "closed_mouth_smile", "src_file_id": info["file_id"]},
            timeout=30,
        )
        created.raise_for_status()
        task_id = created.json()["data"]["task_id"]
        data: dict[str, Any] = {}
        for _ in range(100):
            polled = requests.get(
                f"{emu.base_url}/s2s/v2.0/task/ai-smile/{task_id}", headers=headers, timeout=30
            )
            polled.raise_for_status()
            data = polled.json().get("data", {})
            if data.get("task_status") in {"success", "error"}:
                break
            time.sleep(0.02)
        balance = requests.get(
            f"{emu.base_url}/s2s/v1.0/client/credit", headers=headers, timeout=30
        ).json()
        data["spendable"] = sum(
            b["amount"] for b in balance["results"] if str(b["type"]).startswith("Api")
        )
        return data

    data = await asyncio.to_thread(flow)
    assert data["task_status"] == "success" and data["results"]["url"]
    assert data["spendable"] == 99_999
