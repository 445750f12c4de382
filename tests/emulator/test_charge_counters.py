"""The emulator's per-input charge counts and its count of tasks lost to the polling window."""

from __future__ import annotations

import asyncio
import hashlib

import aiohttp

from tests.emulator.conftest import StartEmulator
from tests.emulator.helpers import (
    EMOTION,
    FACE_SWAP,
    ailab_post,
    ailab_wait,
    assert_ailab_ok,
    image_bytes,
    pc_create,
    pc_poll,
    pc_upload,
    pc_wait,
)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def test_ailab_charges_are_booked_to_the_input_bytes(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start()
    first, second, template = image_bytes(seed=1), image_bytes(seed=2), image_bytes(seed=3)
    for image in (first, first, second):
        assert_ailab_ok(
            *await ailab_post(http, emu, EMOTION, {"image_target": image}, {"service_choice": 12})
        )
    status, body = await ailab_post(
        http, emu, FACE_SWAP, {"image_target": second, "image_template": template}
    )
    assert_ailab_ok(status, body)
    assert (await ailab_wait(http, emu, body["task_id"]))[1]["task_status"] == 2
    stats = emu.stats()["ailab"]
    # The template is not the input: a face swap is booked to its target image.
    assert stats["charged_by_input"] == {sha(first): 2, sha(second): 2}
    assert stats["charged"] == 4


async def test_ailab_failed_task_books_no_charge(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_failure_rate=1.0)
    files = {"image_target": image_bytes(seed=4), "image_template": image_bytes(seed=5)}
    status, body = await ailab_post(http, emu, FACE_SWAP, files)
    assert_ailab_ok(status, body)
    assert (await ailab_wait(http, emu, body["task_id"]))[1]["task_status"] == 3
    stats = emu.stats()["ailab"]
    assert (stats["charged_by_input"], stats["charged"], stats["task_failures"]) == ({}, 0, 1)


async def test_perfectcorp_polled_task_is_charged_once_and_never_expires(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.05, unpolled_window_seconds=0.2)
    image = image_bytes(seed=6)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image))
    assert (await pc_wait(http, emu, task_id))[1]["data"]["task_status"] == "success"
    await asyncio.sleep(0.3)  # past the window, but the result was seen
    stats = emu.stats()["perfectcorp"]
    assert (stats["charged_by_input"], stats["expired"]) == ({sha(image): 1}, 0)


async def test_task_lapsed_while_running_counts_as_expired_without_a_poll(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.3, unpolled_window_seconds=0.1)
    await pc_create(http, emu, await pc_upload(http, emu, image_bytes(seed=7)))
    assert emu.stats()["perfectcorp"]["expired"] == 0
    await asyncio.sleep(0.4)
    stats = emu.stats()["perfectcorp"]
    assert (stats["expired"], stats["charged"], stats["charged_by_input"]) == (1, 0, {})


async def test_finished_task_left_unpolled_is_expired_and_still_charged(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.05, unpolled_window_seconds=0.15)
    image = image_bytes(seed=8)
    task_id = await pc_create(http, emu, await pc_upload(http, emu, image))
    await asyncio.sleep(0.25)
    status, body = await pc_poll(http, emu, task_id)
    assert (status, body["error_code"]) == (400, "InvalidTaskId")
    # A second poll and a stats read must not count the same task again.
    assert (await pc_poll(http, emu, task_id))[0] == 400
    stats = emu.stats()["perfectcorp"]
    assert (stats["expired"], stats["charged_by_input"]) == (1, {sha(image): 1})
