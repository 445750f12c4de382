"""Results are rendered while a task runs, not by the poll that finds it done.

A vendor's servers do the work during the task; the emulator did it at the done poll,
so a wave of tasks ending together queued their renders behind one another and the
done polls waited (README "Performance"). Each test records when the vendor's render
function runs, beside the task's own clock.
"""

from __future__ import annotations

import asyncio
import glob
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from pipeline.emulator import ailab as ailab_module
from pipeline.emulator import perfectcorp as perfectcorp_module
from pipeline.emulator.server import _STATE

from .conftest import StartEmulator
from .helpers import (
    FACE_SWAP,
    ailab_post,
    ailab_wait,
    assert_ailab_ok,
    fetch,
    image_bytes,
    is_jpeg,
    pc_create,
    pc_request,
    pc_upload,
    pc_wait,
)

TASK_SECONDS = 0.4


def _record_calls(
    monkeypatch: pytest.MonkeyPatch, module: Any, name: str
) -> list[tuple[float, float]]:
    """Wrap ``module.name``; each call appends (started, ended) in monotonic time."""
    calls: list[tuple[float, float]] = []
    real: Callable[..., bytes] = getattr(module, name)

    def recorded(*args: Any, **kwargs: Any) -> bytes:
        started = time.monotonic()
        try:
            return real(*args, **kwargs)
        finally:
            calls.append((started, time.monotonic()))

    monkeypatch.setattr(module, name, recorded)
    return calls


async def test_a_face_swap_result_is_rendered_during_the_task_and_once(
    start: StartEmulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_calls(monkeypatch, ailab_module, "render_face_swap")
    emu = await start(task_seconds=TASK_SECONDS)
    files = {"image_target": image_bytes(seed=1), "image_template": image_bytes(seed=2)}
    submitted = time.monotonic()
    status, body = await ailab_post(http, emu, FACE_SWAP, files)
    assert_ailab_ok(status, body)
    status, done = await ailab_wait(http, emu, body["task_id"])
    assert_ailab_ok(status, done)
    assert done["task_status"] == 2
    assert len(calls) == 1
    assert calls[0][1] < submitted + TASK_SECONDS  # ready before the task ends
    code, data = await fetch(http, done["data"]["image"])
    assert code == 200 and is_jpeg(data)
    again = await ailab_wait(http, emu, body["task_id"])
    assert again[1]["data"]["image"] == done["data"]["image"] and len(calls) == 1
    stats = emu.stats()["ailab"]
    assert (stats["submits"], stats["charged"], stats["downloads"]) == (1, 1, 1)


async def test_a_failing_face_swap_task_renders_nothing(
    start: StartEmulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_calls(monkeypatch, ailab_module, "render_face_swap")
    emu = await start(task_seconds=0.05, task_failure_rate=1.0)
    files = {"image_target": image_bytes(seed=3), "image_template": image_bytes(seed=4)}
    status, body = await ailab_post(http, emu, FACE_SWAP, files)
    assert_ailab_ok(status, body)
    _, done = await ailab_wait(http, emu, body["task_id"])
    assert done["task_status"] == 3
    assert calls == []
    assert emu.stats()["ailab"]["charged"] == 0


async def test_an_ai_smile_result_is_rendered_during_the_task_and_once(
    start: StartEmulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    calls = _record_calls(monkeypatch, perfectcorp_module, "render_smile")
    emu = await start(task_seconds=TASK_SECONDS)
    file_id = await pc_upload(http, emu, image_bytes(seed=5))
    submitted = time.monotonic()
    task_id = await pc_create(http, emu, file_id)
    status, done = await pc_wait(http, emu, task_id)
    assert status == 200 and done["data"]["task_status"] == "success"
    assert len(calls) == 1
    assert calls[0][1] < submitted + TASK_SECONDS
    code, data = await fetch(http, done["data"]["results"]["url"])
    assert code == 200 and is_jpeg(data)
    _, again = await pc_wait(http, emu, task_id)
    assert again["data"]["task_status"] == "success" and len(calls) == 1


async def test_a_reset_drops_the_renders_still_running(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=5.0)
    files = {"image_target": image_bytes(seed=6), "image_template": image_bytes(seed=7)}
    status, body = await ailab_post(http, emu, FACE_SWAP, files)
    assert_ailab_ok(status, body)
    emu.reset()
    status, gone = await ailab_wait(http, emu, body["task_id"])
    assert status != 200 or gone.get("task_status") not in (0, 1, 2)


def _emulator_folders() -> set[str]:
    return set(glob.glob(os.path.join(tempfile.gettempdir(), "pipeline-emulator-*")))


async def test_closing_the_emulator_stops_its_renders_and_leaves_no_folder(
    start: StartEmulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = ailab_module.render_face_swap

    def slow(*args: Any, **kwargs: Any) -> bytes:
        time.sleep(0.3)  # still rendering when the emulator closes
        return real(*args, **kwargs)

    monkeypatch.setattr(ailab_module, "render_face_swap", slow)
    before = _emulator_folders()
    emu = await start(task_seconds=5.0)
    files = {"image_target": image_bytes(seed=8), "image_template": image_bytes(seed=9)}
    status, body = await ailab_post(http, emu, FACE_SWAP, files)
    assert_ailab_ok(status, body)
    await emu.close()
    await asyncio.sleep(0.5)  # the render's thread has ended by now
    assert _emulator_folders() - before == set()
    assert [t for t in asyncio.all_tasks() if t is not asyncio.current_task()] == []


async def test_a_deleted_ai_smile_task_frees_the_result_rendered_ahead(
    start: StartEmulator, http: aiohttp.ClientSession
) -> None:
    emu = await start(task_seconds=0.1)
    file_id = await pc_upload(http, emu, image_bytes(seed=10))
    task_id = await pc_create(http, emu, file_id)
    await asyncio.sleep(0.3)  # done and rendered, never polled
    blobs = Path(emu.app[_STATE].shared.blobs._path("x")).parent
    before = set(os.listdir(blobs))
    status, _ = await pc_request(http, emu, "POST", "/s2s/v2.0/task/delete", {"task_id": task_id})
    assert status == 200
    assert len(before - set(os.listdir(blobs))) == 1  # its result, and nothing else


def _slow_smile(monkeypatch: pytest.MonkeyPatch, seconds: float) -> list[float]:
    """render_smile that takes ``seconds``; each call that returns appends its end."""
    real = perfectcorp_module.render_smile
    ended: list[float] = []

    def slow(*args: Any, **kwargs: Any) -> bytes:
        time.sleep(seconds)
        try:
            return real(*args, **kwargs)
        finally:
            ended.append(time.monotonic())

    monkeypatch.setattr(perfectcorp_module, "render_smile", slow)
    return ended


async def test_a_deleted_ai_smile_task_still_rendering_keeps_no_result(
    start: StartEmulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = _slow_smile(monkeypatch, 0.5)
    emu = await start(task_seconds=0.05)
    file_id = await pc_upload(http, emu, image_bytes(seed=11))
    task_id = await pc_create(http, emu, file_id)
    blobs = Path(emu.app[_STATE].shared.blobs._path("x")).parent
    before = set(os.listdir(blobs))
    await asyncio.sleep(0.15)  # the task is finished, its result still rendering
    status, _ = await pc_request(http, emu, "POST", "/s2s/v2.0/task/delete", {"task_id": task_id})
    assert status == 200 and ended == []
    await asyncio.sleep(0.6)  # the render's thread has returned by now
    assert len(ended) == 1
    assert set(os.listdir(blobs)) == before  # the cancelled render stored nothing


async def test_an_expired_ai_smile_task_still_rendering_keeps_no_result(
    start: StartEmulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    ended = _slow_smile(monkeypatch, 0.6)
    emu = await start(task_seconds=2.0, unpolled_window_seconds=0.2)
    file_id = await pc_upload(http, emu, image_bytes(seed=12))
    task_id = await pc_create(http, emu, file_id)
    blobs = Path(emu.app[_STATE].shared.blobs._path("x")).parent
    before = set(os.listdir(blobs))
    await asyncio.sleep(0.3)  # left unpolled past the window, its result rendering
    status, gone = await pc_wait(http, emu, task_id)
    assert status != 200 and "InvalidTaskId" in str(gone) and ended == []
    assert emu.stats()["perfectcorp"]["expired"] == 1
    await asyncio.sleep(0.6)
    assert len(ended) == 1
    assert set(os.listdir(blobs)) == before


async def test_deleting_an_ai_smile_task_whose_render_failed_frees_nothing_and_answers(
    start: StartEmulator, http: aiohttp.ClientSession, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A render that ended in an exception left no blob: the delete still succeeds,
    deletes nothing else, and the exception is retrieved (no "never retrieved")."""

    def broken(*args: Any, **kwargs: Any) -> bytes:
        raise OSError("render failed")

    monkeypatch.setattr(perfectcorp_module, "render_smile", broken)
    emu = await start(task_seconds=0.05)
    file_id = await pc_upload(http, emu, image_bytes(seed=13))
    task_id = await pc_create(http, emu, file_id)
    blobs = Path(emu.app[_STATE].shared.blobs._path("x")).parent
    await asyncio.sleep(0.3)  # finished; its render has raised by now
    task = emu.app[_STATE].perfectcorp.tasks[task_id]
    assert task.rendering is not None and task.rendering.done()
    before = set(os.listdir(blobs))
    status, _ = await pc_request(http, emu, "POST", "/s2s/v2.0/task/delete", {"task_id": task_id})
    assert status == 200
    assert task.rendering is None and task.result_blob is None
    assert set(os.listdir(blobs)) == before
