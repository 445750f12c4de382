"""Perfect Corp emulator: upload flow, tasks, units, limits and faults.

The vendor as docs/vendors.md describes it (the "Perfect Corp: ..." sections).
"""

from __future__ import annotations

import asyncio
from urllib.parse import quote

import aiohttp
import pytest

from pipeline.emulator import RunningEmulator

from .conftest import StartEmulator
from .helpers import (
    PC_CREDIT,
    PC_KEY,
    PC_TASK,
    PC_UPLOAD,
    fetch,
    image_bytes,
    is_jpeg,
    pc_create,
    pc_file_record,
    pc_headers,
    pc_poll,
    pc_request,
    pc_units,
    pc_upload,
    pc_wait,
)

# --- upload (docs/vendors.md, "Perfect Corp: upload") --------------------------------------


@pytest.mark.parametrize("path", [PC_UPLOAD, "/s2s/v2.0/file"])
async def test_file_record_shape(
    emu: RunningEmulator, http: aiohttp.ClientSession, path: str
) -> None:
    files = [{"content_type": "image/jpg", "file_name": "my-selfie.jpg", "file_size": 547541}]
    status, body = await pc_request(http, emu, "POST", path, {"files": files})
    assert status == 200 and body["status"] == 200
    (record,) = body["data"]["files"]
    assert record["content_type"] == "image/jpg" and record["file_name"] == "my-selfie.jpg"
    assert "/" in record["file_id"] and "+" in record["file_id"]
    (put,) = record["requests"]
    assert put["method"] == "PUT"
    assert put["url"].startswith(emu.base_url + "/_storage/perfectcorp/upload/")
    assert put["headers"] == {"Content-Type": "image/jpg", "Content-Length": "547541"}
    assert emu.stats()["perfectcorp"]["uploads"] == 1


@pytest.mark.parametrize(
    "body",
    [
        {},
        {"files": []},
        {"files": [{"content_type": "image/jpeg", "file_name": "a.jpg"}]},
        {"files": [{"content_type": "image/gif", "file_name": "a.gif", "file_size": 10}]},
        {
            "files": [
                {"content_type": "image/jpeg", "file_name": "a.jpg", "file_size": 10 * 1024 * 1024}
            ]
        },
        {
            "files": [{"content_type": "video/mp4", "file_name": "a.mp4", "file_size": 10}]
        },  # feature path: images only
        ["not", "an", "object"],
    ],
    ids=["empty", "no-files", "no-size", "gif", "10MB", "video", "list"],
)
async def test_file_record_invalid(
    emu: RunningEmulator, http: aiohttp.ClientSession, body: object
) -> None:
    status, answer = await pc_request(http, emu, "POST", PC_UPLOAD, body)
    assert status == 400
    assert answer == {
        "status": 400,
        "error": "Invalid parameter value",
        "error_code": "InvalidParameters",
    }


async def test_universal_path_takes_video(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    record = await pc_file_record(http, emu, 50 * 1024 * 1024, "video/mp4", path="/s2s/v2.0/file")
    assert record["requests"][0]["headers"]["Content-Type"] == "video/mp4"


@pytest.mark.parametrize(
    ("headers", "status", "code"),
    [
        ({"Content-Type": "image/png"}, 403, "SignatureDoesNotMatch"),
        (
            {"Content-Type": "image/jpeg", "Authorization": f"Bearer {PC_KEY}"},
            400,
            "InvalidArgument",
        ),
    ],
    ids=["wrong-type", "authorization"],
)
async def test_put_enforces_signed_headers(
    emu: RunningEmulator,
    http: aiohttp.ClientSession,
    headers: dict[str, str],
    status: int,
    code: str,
) -> None:
    data = image_bytes()
    record = await pc_file_record(http, emu, len(data))
    async with http.put(record["requests"][0]["url"], data=data, headers=headers) as response:
        assert response.status == status
        assert f"<Code>{code}</Code>" in await response.text()
    assert emu.stats()["perfectcorp"]["puts"] == 0


async def test_put_enforces_declared_length(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    data = image_bytes()
    record = await pc_file_record(http, emu, len(data) + 1)
    put = record["requests"][0]
    async with http.put(put["url"], data=data, headers={"Content-Type": "image/jpeg"}) as response:
        assert response.status == 403
        assert "<Code>SignatureDoesNotMatch</Code>" in await response.text()


async def test_put_url_expires(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(upload_url_ttl_seconds=0.1)
    data = image_bytes()
    record = await pc_file_record(http, emu, len(data))
    await asyncio.sleep(0.2)
    put = record["requests"][0]
    async with http.put(put["url"], data=data, headers=put["headers"]) as response:
        assert response.status == 403
        assert "Request has expired" in await response.text()


async def test_bytes_never_put(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    record = await pc_file_record(http, emu, 1234)
    body = {"src_file_id": record["file_id"], "expression_type": "closed_mouth_smile"}
    status, answer = await pc_request(http, emu, "POST", PC_TASK, body)
    assert status == 500 and answer["error_code"] == "unknown_internal_error"
    status, answer = await pc_request(
        http, emu, "POST", PC_TASK, {**body, "src_file_id": "no/such+id"}
    )
    assert status == 404 and answer["error_code"] == "unknown_internal_error"
    assert emu.stats()["perfectcorp"]["submits"] == 0


# --- tasks -----------------------------------------------------------------------------------
# docs/vendors.md "Perfect Corp: create task" and "Perfect Corp: polling and task states".


async def test_smile_success_fresh_url_each_poll(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.1)
    file_id = await pc_upload(http, emu, image_bytes())
    task_id = await pc_create(http, emu, file_id, "smile_with_teeth_visible")
    assert len(task_id) >= 40
    status, running = await pc_poll(http, emu, task_id)
    assert status == 200 and running == {
        "status": 200,
        "data": {"task_status": "running", "error": None},
    }
    status, done = await pc_wait(http, emu, task_id)
    assert (
        status == 200 and done["data"]["task_status"] == "success" and done["data"]["error"] is None
    )
    url = done["data"]["results"]["url"]
    assert url.startswith(emu.base_url + "/_storage/perfectcorp/result/")
    code, data = await fetch(http, url)
    assert code == 200 and is_jpeg(data)
    _, again = await pc_poll(http, emu, task_id)
    # A re-poll gives a fresh URL (docs/vendors.md "Perfect Corp: result URLs").
    assert again["data"]["results"]["url"] != url
    stats = emu.stats()["perfectcorp"]
    assert (
        stats["uploads"],
        stats["puts"],
        stats["submits"],
        stats["charged"],
        stats["credits_spent"],
    ) == (1, 1, 1, 1, 1)
    assert await pc_units(http, emu) == 99_999


async def test_url_encoded_task_id(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    status, body = await pc_poll(http, emu, quote(task_id, safe=""))
    assert status == 200 and body["data"]["task_status"] in ("running", "success")


async def test_src_file_url_without_upload(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    """The vendor sample's body: a public URL; offline, the emulator draws a stand-in."""
    body = {
        "expression_type": "closed_mouth_smile",
        "src_file_url": "https://plugins-media.makeupar.com/strapi/assets/face_reshape_01_85c8ffc055.jpg",
    }
    status, answer = await pc_request(http, emu, "POST", PC_TASK, body)
    assert status == 200
    _, done = await pc_wait(http, emu, answer["data"]["task_id"])
    assert done["data"]["task_status"] == "success"
    assert is_jpeg((await fetch(http, done["data"]["results"]["url"]))[1])


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (
            {"src_file_id": "x", "expression_type": "closed_mouth_smile", "strength": 3},
            "BadRequest",
        ),
        ({"expression_type": "closed_mouth_smile"}, "InvalidParameters"),
        (
            {
                "src_file_id": "x",
                "src_file_url": "https://a/b.jpg",
                "expression_type": "closed_mouth_smile",
            },
            "InvalidParameters",
        ),
        ({"src_file_url": "https://a/b.jpg", "expression_type": "grin"}, "InvalidParameters"),
        ({"src_file_url": "https://a/b.jpg"}, "InvalidParameters"),
        (
            {"src_file_url": "ftp://a/b.jpg", "expression_type": "closed_mouth_smile"},
            "InvalidParameters",
        ),
    ],
    ids=["unknown-field", "no-source", "two-sources", "bad-expression", "no-expression", "bad-url"],
)
async def test_create_task_errors(
    emu: RunningEmulator, http: aiohttp.ClientSession, body: dict[str, object], code: str
) -> None:
    status, answer = await pc_request(http, emu, "POST", PC_TASK, body)
    assert status == 400
    assert answer == {
        "status": 400,
        "error": "The operation could not be completed",
        "error_code": code,
    }


async def test_unknown_task_is_invalid_task_id(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    status, body = await pc_poll(http, emu, "nope")
    assert (status, body) == (
        400,
        {"status": 400, "error": "Invalid task ID", "error_code": "InvalidTaskId"},
    )
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    status, body = await pc_poll(http, emu, task_id, key="someone-else")
    assert status == 400 and body["error_code"] == "InvalidTaskId"


async def test_unpolled_task_expires_but_is_charged_if_it_finished(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.05, unpolled_window_seconds=0.15)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    await asyncio.sleep(0.25)
    status, body = await pc_poll(http, emu, task_id)
    assert status == 400 and body["error_code"] == "InvalidTaskId"
    # "The consumed units may still be charged" (docs/vendors.md "Perfect Corp: polling window").
    assert emu.stats()["perfectcorp"]["charged"] == 1


async def test_task_lapsed_while_running_is_never_charged(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.3, unpolled_window_seconds=0.1)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    await asyncio.sleep(0.15)
    assert (await pc_poll(http, emu, task_id))[0] == 400
    await asyncio.sleep(0.25)
    assert emu.stats()["perfectcorp"]["charged"] == 0
    assert await pc_units(http, emu) == 100_000


async def test_window_does_not_apply_after_the_result_was_seen(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.0, unpolled_window_seconds=0.1)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    assert (await pc_poll(http, emu, task_id))[1]["data"]["task_status"] == "success"
    await asyncio.sleep(0.15)
    assert (await pc_poll(http, emu, task_id))[1]["data"]["task_status"] == "success"


async def test_result_url_expires_and_repoll_renews(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.0, result_url_ttl_seconds=0.2)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    url = (await pc_poll(http, emu, task_id))[1]["data"]["results"]["url"]
    await asyncio.sleep(0.3)
    code, xml = await fetch(http, url)
    assert code == 403 and b"<Code>AccessDenied</Code>" in xml and b"Request has expired" in xml
    fresh = (await pc_poll(http, emu, task_id))[1]["data"]["results"]["url"]
    assert (await fetch(http, fresh))[0] == 200
    assert emu.stats()["perfectcorp"]["charged"] == 1


async def test_polling_interval_knob(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(polling_interval_ms=2000)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    assert (await pc_poll(http, emu, task_id))[1]["data"]["polling_interval"] == 2000


async def test_delete_task(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(task_seconds=0.1)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    status, body = await pc_request(
        http, emu, "POST", "/s2s/v2.0/task/delete", {"task_id": task_id}
    )
    assert status == 400 and body["error_code"] == "OperationInvalid"  # still running
    await pc_wait(http, emu, task_id)
    assert await pc_request(http, emu, "POST", "/s2s/v2.0/task/delete", {"task_id": task_id}) == (
        200,
        {"status": 200},
    )
    assert (await pc_poll(http, emu, task_id))[1]["error_code"] == "InvalidTaskId"


# --- units (docs/vendors.md, "Perfect Corp: units and prices") ---------------------------------


async def test_credit_endpoint_shape(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    status, body = await pc_request(http, emu, "GET", PC_CREDIT)
    assert status == 200 and body["status"] == 200 and "data" not in body
    (entry,) = body["results"]
    assert entry["type"] == "ApiSubsToken"
    assert entry["amount"] == 100_000 and entry["amount_dec"] == 100_000
    assert entry["id"] > 2**53 and entry["expiry"] > 10**12  # ms


async def test_failures_are_free_and_units_run_out(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(perfectcorp_units=1, task_failure_rate=1.0)
    file_id = await pc_upload(http, emu, image_bytes())
    task_id = await pc_create(http, emu, file_id)
    # The one unit is held by the task in flight.
    status, body = await pc_request(
        http,
        emu,
        "POST",
        PC_TASK,
        {"src_file_id": file_id, "expression_type": "closed_mouth_smile"},
    )
    assert (status, body) == (
        400,
        {"status": 400, "error": "Insufficient unit to run", "error_code": "CreditInsufficiency"},
    )
    status, done = await pc_wait(http, emu, task_id)
    assert status == 200
    assert done["data"]["task_status"] == "error" and done["data"]["error"] == "error_inference"
    assert done["data"]["error_message"]
    # An engine error uses no unit (docs/vendors.md "Perfect Corp: polling and task states").
    assert await pc_units(http, emu) == 1
    await pc_create(http, emu, file_id)  # the unit is free again
    stats = emu.stats()["perfectcorp"]
    assert (stats["charged"], stats["task_failures"]) == (0, 1)


async def test_permanent_error_is_error_no_face(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(permanent_error_rate=1.0)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image_bytes()))
    status, done = await pc_wait(http, emu, task_id)
    assert status == 200 and done["data"]["error"] == "error_no_face"
    assert emu.stats()["perfectcorp"]["charged"] == 0


async def test_undecodable_upload_is_an_engine_error(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    task_id = await pc_create(http, emu, await pc_upload(http, emu, b"not an image at all"))
    assert (await pc_wait(http, emu, task_id))[1]["data"]["error"] == "error_decode_image"


# --- auth, limits, faults ------------------------------------------------------------------------


async def test_auth(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(perfectcorp_api_keys=[PC_KEY])
    for headers in ({}, {"Authorization": PC_KEY}, {"Authorization": f"Token {PC_KEY}"}):
        async with http.get(emu.base_url + PC_CREDIT, headers=headers) as response:
            assert response.status == 401
            assert (await response.json())["status"] == 401
    status, body = await pc_request(http, emu, "GET", PC_CREDIT, key="unknown")
    assert (status, body) == (
        401,
        {"status": 401, "error": "This API key is not recognized.", "error_code": "InvalidApiKey"},
    )
    assert (await pc_request(http, emu, "GET", PC_CREDIT))[0] == 200


async def test_rate_limit_counts_every_api_call_but_not_storage(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.0, rate_limit={"requests": 3, "per_seconds": 60, "qps": 5})
    file_id = await pc_upload(http, emu, image_bytes())  # 1 API call + 1 PUT (free)
    task_id = await pc_create(http, emu, file_id)  # 2
    status, done = await pc_poll(http, emu, task_id)  # 3
    assert status == 200
    assert (await fetch(http, done["data"]["results"]["url"]))[0] == 200  # storage: free
    async with http.get(f"{emu.base_url}{PC_TASK}/{task_id}", headers=pc_headers()) as response:
        assert response.status == 429
        assert await response.json() == {
            "status": 429,
            "error": "Too many requests",
        }  # no error_code
    assert (await pc_request(http, emu, "GET", PC_CREDIT, key="second-key"))[0] == 429  # same IP
    stats = emu.stats()["perfectcorp"]
    assert stats["rate_limited"] == 2 and stats["requests"] == 5


async def test_rate_limit_qps_per_key(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(rate_limit={"qps": 5}, rate_limit_per_ip=False)
    statuses = [(await pc_request(http, emu, "GET", PC_CREDIT))[0] for _ in range(6)]
    assert statuses == [200] * 5 + [429]
    assert (await pc_request(http, emu, "GET", PC_CREDIT, key="second-key"))[0] == 200


async def test_rate_limit_can_spare_a_vendor(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(rate_limit={"qps": 1}, rate_limit_vendors=["perfectcorp"])
    assert [(await pc_request(http, emu, "GET", PC_CREDIT))[0] for _ in range(2)] == [200, 429]
    for _ in range(3):
        async with http.get(
            emu.base_url + "/api/common/query-credits", headers={"ailabapi-api-key": "k"}
        ) as response:
            assert response.status == 200


async def test_transient_errors(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(transient_error_rate=1.0)
    seen = set()
    for _ in range(12):
        status, body = await pc_request(
            http,
            emu,
            "POST",
            PC_TASK,
            {"src_file_url": "https://a/b.jpg", "expression_type": "closed_mouth_smile"},
        )
        assert status in (429, 500, 503) and body["status"] == status
        seen.add(body.get("error_code"))
    assert "TaskTimeout" in seen
    assert emu.stats()["perfectcorp"]["submits"] == 0


@pytest.mark.parametrize(
    ("code", "status"),
    [("InactiveApiKey", 401), ("ExpiredApiKey", 401), ("CreditInsufficiency", 400)],
)
async def test_fatal_error_knob(
    start: StartEmulator, http: aiohttp.ClientSession, code: str, status: int
) -> None:
    emu = await start(fatal_error=code, fatal_after_requests=1)
    file_id = await pc_upload(http, emu, image_bytes())
    answer = await pc_request(
        http,
        emu,
        "POST",
        PC_TASK,
        {"src_file_id": file_id, "expression_type": "closed_mouth_smile"},
    )
    assert answer[0] == status and answer[1]["error_code"] == code
