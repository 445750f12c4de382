"""AILabTools emulator: routes, validation, tasks, credits and faults.

The vendor as docs/vendors.md describes it (the "AILab: ..." sections).
"""

from __future__ import annotations

import asyncio
import base64

import aiohttp
import pytest

from pipeline.emulator import RunningEmulator

from .conftest import StartEmulator
from .helpers import (
    AILAB_KEY,
    BEAUTY,
    CREDITS,
    EMOTION,
    FACE_SWAP,
    POLL,
    ailab_balance,
    ailab_get,
    ailab_post,
    ailab_wait,
    assert_ailab_error,
    assert_ailab_ok,
    fetch,
    image_bytes,
    is_jpeg,
)

# --- success paths -------------------------------------------------------------------


async def test_emotion_editor_returns_base64_jpeg(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    status, body = await ailab_post(
        http, emu, EMOTION, {"image_target": image_bytes()}, {"service_choice": 12}
    )
    assert_ailab_ok(status, body)
    assert "task_id" not in body
    assert is_jpeg(base64.b64decode(body["data"]["image"], validate=True))
    stats = emu.stats()["ailab"]
    assert (stats["submits"], stats["charged"], stats["credits_spent"]) == (1, 1, 12)


async def test_face_swap_task_goes_0_1_2_and_result_downloads(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.3)
    files = {"image_target": image_bytes(seed=1), "image_template": image_bytes(seed=2)}
    status, body = await ailab_post(http, emu, FACE_SWAP, files)
    assert_ailab_ok(status, body)
    assert body["task_type"] == "async" and len(body["task_id"]) >= 32
    seen: list[int] = []
    for _ in range(100):
        status, poll = await ailab_get(http, emu, POLL, {"task_id": body["task_id"]})
        assert_ailab_ok(status, poll)
        if not seen or seen[-1] != poll["task_status"]:
            seen.append(poll["task_status"])
        if poll["task_status"] == 2:
            break
        await asyncio.sleep(0.03)
    assert seen == [0, 1, 2]
    url = poll["data"]["image"]
    assert url.startswith(emu.base_url + "/_storage/ailab/result/")
    code, data = await fetch(http, url)
    assert code == 200 and is_jpeg(data)
    # The URL is fixed for the task (valid 24 h from completion: docs/vendors.md "AILab: task
    # lifetimes").
    assert (await ailab_get(http, emu, POLL, {"task_id": body["task_id"]}))[1]["data"][
        "image"
    ] == url
    stats = emu.stats()["ailab"]
    assert stats["submits"] == 1 and stats["charged"] == 1 and stats["credits_spent"] == 5
    assert stats["polls"] >= 3 and stats["downloads"] == 1


async def test_face_beauty_pro_sync_is_the_default(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    fields = {"smoothing": 70, "whitening": 40, "filter_type": 10}
    status, body = await ailab_post(http, emu, BEAUTY, {"image": image_bytes()}, fields)
    assert_ailab_ok(status, body)
    assert body["task_type"] == "sync"
    assert is_jpeg(base64.b64decode(body["result"]))
    assert emu.stats()["ailab"]["credits_spent"] == 15


@pytest.mark.parametrize(("knob", "where"), [("result_url", "top"), ("data.image", "data")])
async def test_face_beauty_pro_async_result_field(
    start: StartEmulator, http: aiohttp.ClientSession, knob: str, where: str
) -> None:
    emu = await start(beauty_result_field=knob)
    status, body = await ailab_post(
        http, emu, BEAUTY, {"image": image_bytes()}, {"task_type": "async"}
    )
    assert_ailab_ok(status, body)
    assert body["task_type"] == "async"
    status, done = await ailab_wait(http, emu, body["task_id"])
    assert_ailab_ok(status, done)
    assert done["task_status"] == 2
    url = done["result_url"] if where == "top" else done["data"]["image"]
    code, data = await fetch(http, url)
    assert code == 200 and is_jpeg(data)


async def test_credits_lists_pools_with_every_field(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(ailab_credits={"common": 2000, "portrait_ai_face_swap": 30})
    status, body = await ailab_get(http, emu, CREDITS)
    assert_ailab_ok(status, body)
    assert isinstance(body["data"], list)
    fields = {
        "unique_sign",
        "name",
        "balance",
        "total",
        "last_recharge_balance",
        "balance_warning",
        "first_buy_time",
        "last_update_time",
    }
    for pool in body["data"]:
        assert set(pool) == fields
        assert isinstance(pool["balance"], float) and isinstance(pool["first_buy_time"], int)
    assert {p["unique_sign"]: p["balance"] for p in body["data"]} == {
        "common": 2000.0,
        "portrait_ai_face_swap": 30.0,
    }


# --- validation ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fields", "http_status", "code"),
    [
        ({}, 400, "MISSING_PARAMETERS"),
        ({"service_choice": 17}, 400, "UNSUPPORTED_PARAMETER_VALUES"),
        ({"service_choice": "big_grin"}, 400, "UNSUPPORTED_PARAMETER_VALUES"),
    ],
)
async def test_emotion_editor_service_choice(
    emu: RunningEmulator,
    http: aiohttp.ClientSession,
    fields: dict[str, object],
    http_status: int,
    code: str,
) -> None:
    status, body = await ailab_post(http, emu, EMOTION, {"image_target": image_bytes()}, fields)
    assert_ailab_error(status, body, http_status, code)
    assert emu.stats()["ailab"]["submits"] == 0
    assert emu.stats()["ailab"]["rejected"] == 1


@pytest.mark.parametrize(("knob", "ok"), [("accept", True), ("reject", False)])
async def test_legacy_service_choice_switch(
    start: StartEmulator, http: aiohttp.ClientSession, knob: str, ok: bool
) -> None:
    emu = await start(legacy_service_choice=knob)
    status, body = await ailab_post(
        http, emu, EMOTION, {"image_target": image_bytes()}, {"service_choice": 3}
    )
    if ok:
        assert_ailab_ok(status, body)
    else:
        assert_ailab_error(status, body, 400, "UNSUPPORTED_PARAMETER_VALUES")


async def test_face_swap_needs_both_images(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    status, body = await ailab_post(http, emu, FACE_SWAP, {"image_target": image_bytes()})
    assert_ailab_error(status, body, 400, "MISSING_PARAMETERS")
    assert "image_template" in body["error_detail"]["message"]


@pytest.mark.parametrize(
    ("field", "value", "code"),
    [
        ("whitening", 101, "ERROR_INVALID_SKIN_WHITENING_PARAMETER"),
        ("smoothing", -1, "ERROR_INVALID_SMOOTHING_PARAMETER"),
        ("thinface", "x", "ERROR_INVALID_FACE_SLIMMING_PARAMETER"),
        ("enlarge_eye", 200, "ERROR_INVALID_BIG_EYES_PARAMETER"),
        ("shrink_face", 101, "ERROR_INVALID_PARAMETER"),
        ("remove_eyebrow", 101, "ERROR_INVALID_PARAMETER"),
        ("filter_type", 36, "UNSUPPORTED_PARAMETER_VALUES"),
        ("task_type", "later", "UNSUPPORTED_PARAMETER_VALUES"),
    ],
)
async def test_face_beauty_pro_param_errors(
    emu: RunningEmulator, http: aiohttp.ClientSession, field: str, value: object, code: str
) -> None:
    status, body = await ailab_post(http, emu, BEAUTY, {"image": image_bytes()}, {field: value})
    assert_ailab_error(status, body, 400, code)


async def test_face_beauty_pro_slider_bounds_are_inclusive(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    fields = {"whitening": 0, "smoothing": 100, "filter_type": 35}
    assert_ailab_ok(*await ailab_post(http, emu, BEAUTY, {"image": image_bytes()}, fields))


def _gif() -> bytes:
    return image_bytes(fmt="GIF")


@pytest.mark.parametrize(
    ("path", "field", "data", "http_status", "code"),
    [
        (EMOTION, "image_target", b"x" * (5 * 1024 * 1024 + 1), 413, "FILE_SIZE_EXCEEDS_LIMIT"),
        (BEAUTY, "image", b"x" * (2 * 1024 * 1024 + 1), 413, "FILE_SIZE_EXCEEDS_LIMIT"),
        (EMOTION, "image_target", image_bytes(4096, 16), 413, "FILE_RESOLUTION_EXCEEDS_LIMITS"),
        (BEAUTY, "image", image_bytes(48, 200), 422, "ERROR_LOW_RESOLUTION"),
        (EMOTION, "image_target", _gif(), 415, "UNSUPPORTED_FILE_TYPES"),
        (EMOTION, "image_target", image_bytes(fmt="BMP"), 415, "UNSUPPORTED_FILE_TYPES"),
        (EMOTION, "image_target", b"definitely not an image", 422, "FILE_DECODING_FAILURE"),
        (EMOTION, "image_target", image_bytes(400, 400)[:300], 422, "FILE_DECODING_FAILURE"),
        (EMOTION, "image_target", b"", 400, "PARAMETERS_CANNOT_EMPTY"),
    ],
    ids=["5MB+1", "2MB+1", "4096px", "48px", "gif", "bmp", "text", "truncated", "empty"],
)
async def test_image_validation(
    emu: RunningEmulator,
    http: aiohttp.ClientSession,
    path: str,
    field: str,
    data: bytes,
    http_status: int,
    code: str,
) -> None:
    fields = {"service_choice": 12} if path == EMOTION else {}
    status, body = await ailab_post(http, emu, path, {field: data}, fields)
    assert_ailab_error(status, body, http_status, code)
    assert emu.stats()["ailab"]["submits"] == 0


async def test_png_and_limits_that_pass(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    assert_ailab_ok(
        *await ailab_post(
            http,
            emu,
            EMOTION,
            {"image_target": image_bytes(4095, 8, fmt="PNG")},
            {"service_choice": 100},
        )
    )
    assert_ailab_ok(*await ailab_post(http, emu, BEAUTY, {"image": image_bytes(49, 49)}))


async def test_malformed_multipart(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    headers = {"ailabapi-api-key": AILAB_KEY, "Content-Type": "multipart/form-data; boundary=zzz"}
    async with http.post(emu.base_url + EMOTION, data=b"garbage", headers=headers) as response:
        assert_ailab_error(response.status, await response.json(), 400, "ERROR_PARAMETERS")


async def test_unknown_api_path(emu: RunningEmulator, http: aiohttp.ClientSession) -> None:
    status, body = await ailab_get(http, emu, "/api/portrait/effects/no-such-thing")
    assert_ailab_error(status, body, 404, "ERROR_AI_NOT_EXISTS")


# --- auth and polls ----------------------------------------------------------------------


@pytest.mark.parametrize("key", [None, "", "wrong-key"])
async def test_missing_or_unknown_key_is_401(
    start: StartEmulator, http: aiohttp.ClientSession, key: str | None
) -> None:
    emu = await start(ailab_api_keys=[AILAB_KEY])
    status, body = await ailab_post(
        http, emu, EMOTION, {"image_target": image_bytes()}, {"service_choice": 12}, key=key
    )
    assert_ailab_error(status, body, 401, "ERROR_USER_NOT_EXISTS")
    status, body = await ailab_get(http, emu, CREDITS, key="wrong-key")
    assert_ailab_error(status, body, 401, "ERROR_USER_NOT_EXISTS")
    assert_ailab_ok(*await ailab_get(http, emu, CREDITS, key=AILAB_KEY))


async def test_poll_unknown_missing_and_foreign_task(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    status, body = await ailab_get(http, emu, POLL, {"task_id": "nope"})
    assert_ailab_error(status, body, 404, "ERROR_RESOURCE_NOT_FOUND")
    status, body = await ailab_get(http, emu, POLL)
    assert_ailab_error(status, body, 400, "MISSING_PARAMETERS")
    _, submitted = await ailab_post(
        http, emu, FACE_SWAP, {"image_target": image_bytes(), "image_template": image_bytes(seed=3)}
    )
    status, body = await ailab_get(
        http, emu, POLL, {"task_id": submitted["task_id"]}, key="another-account"
    )
    assert_ailab_error(status, body, 404, "ERROR_RESOURCE_NOT_FOUND")


# --- credits -----------------------------------------------------------------------------


async def test_debit_own_pool_first_then_common(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(ailab_credits={"common": 100, "portrait_ai_face_swap": 3})
    _, body = await ailab_post(
        http, emu, FACE_SWAP, {"image_target": image_bytes(), "image_template": image_bytes(seed=1)}
    )
    await ailab_wait(http, emu, body["task_id"])
    assert await ailab_balance(http, emu) == {"common": 98.0, "portrait_ai_face_swap": 0.0}


async def test_not_enough_credits_at_submit(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(ailab_credits={"common": 20})
    assert_ailab_ok(
        *await ailab_post(
            http, emu, EMOTION, {"image_target": image_bytes()}, {"service_choice": 12}
        )
    )
    status, body = await ailab_post(
        http, emu, EMOTION, {"image_target": image_bytes(seed=1)}, {"service_choice": 12}
    )
    assert_ailab_error(status, body, 429, "ERROR_NOT_ENOUGH_CREDITS")
    # 8 credits left: a 5-credit face swap still fits.
    assert_ailab_ok(
        *await ailab_post(
            http,
            emu,
            FACE_SWAP,
            {"image_target": image_bytes(), "image_template": image_bytes(seed=1)},
        )
    )
    assert emu.stats()["ailab"]["submits"] == 2


async def test_tasks_in_flight_hold_their_price(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(ailab_credits={"common": 20}, task_seconds=5)
    fields = {"task_type": "async"}
    assert_ailab_ok(*await ailab_post(http, emu, BEAUTY, {"image": image_bytes()}, fields))
    status, body = await ailab_post(http, emu, BEAUTY, {"image": image_bytes(seed=1)}, fields)
    assert_ailab_error(status, body, 429, "ERROR_NOT_ENOUGH_CREDITS")
    assert await ailab_balance(http, emu) == {"common": 20.0}  # held, not yet debited


@pytest.mark.parametrize("style", ["status3", "http422"])
async def test_failed_tasks_are_not_billed(
    start: StartEmulator, http: aiohttp.ClientSession, style: str
) -> None:
    emu = await start(task_failure_rate=1.0, ailab_task_failure_style=style)
    _, body = await ailab_post(
        http, emu, FACE_SWAP, {"image_target": image_bytes(), "image_template": image_bytes(seed=1)}
    )
    status, done = await ailab_wait(http, emu, body["task_id"])
    if style == "status3":
        assert_ailab_ok(status, done)
        assert done["task_status"] == 3
    else:
        assert_ailab_error(status, done, 422, "ERROR_NO_FACE_IN_FILE")
    await asyncio.sleep(0.06)
    assert await ailab_balance(http, emu) == {"common": 1_000_000.0}
    stats = emu.stats()["ailab"]
    assert (stats["submits"], stats["charged"], stats["task_failures"]) == (1, 0, 1)


async def test_task_is_billed_when_it_finishes_even_unpolled(
    emu: RunningEmulator, http: aiohttp.ClientSession
) -> None:
    await ailab_post(
        http, emu, FACE_SWAP, {"image_target": image_bytes(), "image_template": image_bytes(seed=1)}
    )
    await asyncio.sleep(0.08)
    assert emu.stats()["ailab"]["charged"] == 1


# --- faults ------------------------------------------------------------------------------


async def test_permanent_error_is_fixed_per_input(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(permanent_error_rate=0.5, seed=7)
    answers = {}
    for seed in range(12):
        image = image_bytes(seed=seed)
        first = await ailab_post(
            http, emu, EMOTION, {"image_target": image}, {"service_choice": 12}
        )
        again = await ailab_post(
            http, emu, EMOTION, {"image_target": image}, {"service_choice": 12}
        )
        assert first[0] == again[0]
        answers[seed] = first[0]
        if first[0] != 200:
            assert_ailab_error(*first, 422, "ERROR_NO_FACE_IN_FILE")
    assert set(answers.values()) == {200, 422}


async def test_transient_errors_are_retryable_codes_and_create_nothing(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(transient_error_rate=1.0)
    retryable = {
        (503, "ERROR_INSUFFICIENT_RESOURCES"),
        (502, "AI_SERVICE_ERROR"),
        (500, "PROCESSING_FAILURE"),
        (429, "EXCEEDING_LIMITS"),
    }
    for _ in range(8):
        status, body = await ailab_post(
            http,
            emu,
            FACE_SWAP,
            {"image_target": image_bytes(), "image_template": image_bytes(seed=1)},
        )
        assert (status, body["error_detail"]["code"]) in retryable
        assert_ailab_error(status, body, status, body["error_detail"]["code"])
    stats = emu.stats()["ailab"]
    assert (stats["submits"], stats["transient_errors"], stats["rejected"]) == (0, 8, 8)


@pytest.mark.parametrize(
    ("code", "http_status", "credits_ok"),
    [
        ("ERROR_USER_LOCKED", 403, False),
        ("ERROR_AI_NOT_EXISTS", 404, True),
        ("ERROR_NOT_ENOUGH_CREDITS", 429, True),
    ],
)
async def test_fatal_error_knob(
    start: StartEmulator, http: aiohttp.ClientSession, code: str, http_status: int, credits_ok: bool
) -> None:
    emu = await start(fatal_error=code, fatal_after_requests=1)
    assert_ailab_ok(
        *await ailab_post(
            http, emu, EMOTION, {"image_target": image_bytes()}, {"service_choice": 12}
        )
    )
    status, body = await ailab_post(
        http, emu, EMOTION, {"image_target": image_bytes()}, {"service_choice": 12}
    )
    assert_ailab_error(status, body, http_status, code)
    status, body = await ailab_get(http, emu, CREDITS)
    assert (status == 200) is credits_ok


async def test_rate_limit_per_key(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(rate_limit={"requests": 3, "per_seconds": 60}, rate_limit_per_ip=False)
    for _ in range(3):
        assert_ailab_ok(*await ailab_get(http, emu, CREDITS))
    status, body = await ailab_get(http, emu, POLL, {"task_id": "x"})  # polls count too
    assert_ailab_error(status, body, 429, "EXCEEDING_LIMITS")
    assert_ailab_ok(*await ailab_get(http, emu, CREDITS, key="other-key"))
    assert emu.stats()["ailab"]["rate_limited"] == 1


async def test_rate_limit_per_ip(start: StartEmulator, http: aiohttp.ClientSession) -> None:
    emu = await start(rate_limit={"qps": 2})
    assert_ailab_ok(*await ailab_get(http, emu, CREDITS, key="a"))
    assert_ailab_ok(*await ailab_get(http, emu, CREDITS, key="b"))
    status, body = await ailab_get(http, emu, CREDITS, key="c")  # a fresh key, same IP
    assert_ailab_error(status, body, 429, "EXCEEDING_LIMITS")
    await asyncio.sleep(0.55)  # the 2/s bucket refills
    assert_ailab_ok(*await ailab_get(http, emu, CREDITS, key="c"))


async def test_result_url_and_task_expire(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.0, ailab_result_url_ttl_seconds=0.3)
    _, body = await ailab_post(
        http, emu, FACE_SWAP, {"image_target": image_bytes(), "image_template": image_bytes(seed=1)}
    )
    _, done = await ailab_wait(http, emu, body["task_id"])
    url = done["data"]["image"]
    assert (await fetch(http, url))[0] == 200
    await asyncio.sleep(0.4)
    code, xml = await fetch(http, url)
    assert code == 403 and b"<Code>AccessDenied</Code>" in xml and b"Request has expired" in xml
    status, gone = await ailab_get(http, emu, POLL, {"task_id": body["task_id"]})
    assert_ailab_error(status, gone, 410, "ERROR_RESOURCE_RECLAIMED")
