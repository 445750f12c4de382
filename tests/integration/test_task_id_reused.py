"""A task id the vendor gives two sends is polled for one photo only.

A cache or proxy that replays an old create answer, or a vendor bug, would hand the
same task id to the sends of two different photos; polling it for both would store
one task's result as the result of both (docs/vendors.md, "Task ids given twice").
The id stays with the item it was first given to, in this run or an earlier one; a
send answered with an id another item holds fails ``TASK_ID_REUSED`` (permanent,
possibly billed) and its task is never polled for it.

The vendor is a scripted AILab face swap on loopback (tests/providers/_server.py)
that counts submits per input (by the sha256 of the photo) and serves each task's
result as an image of its own (its colour follows the task id), so a result stored
for the wrong photo shows.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import secrets
import sqlite3
import tempfile
import types
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from pipeline.providers.ailab import OPERATIONS, POLL_PATH
from tests.conftest import fast_config, make_portrait
from tests.providers._server import Reply, Seen, Vendor, ailab_ok, start_vendor

pytestmark = pytest.mark.timeout(120)

SWAP = {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}}
RESULT_PATH = "/outputs/result.jpg"


def task_image(task_id: str) -> bytes:
    """The result of ``task_id``: a JPEG whose colour follows the id."""
    r, g, b = hashlib.sha256(task_id.encode()).digest()[:3]
    buf = io.BytesIO()
    Image.new("RGB", (32, 32), (r, g, b)).save(buf, "JPEG")
    return buf.getvalue()


class ReplayingAILab:
    """AILab face swap whose n-th submit (from 0, in arrival order) is answered with
    the task id ``task_ids(n)``; every task has succeeded by its first poll."""

    def __init__(self, vendor: Vendor, task_ids: Callable[[int], str]) -> None:
        self.vendor = vendor
        self.task_ids = task_ids
        self.running = False  # every task still running at every poll
        self.submits_by_input: Counter[str] = Counter()
        self.given: list[str] = []
        self.polls_by_task: Counter[str] = Counter()
        vendor.route("POST", OPERATIONS["ailab/face-swap"], self._submit)
        vendor.route("GET", POLL_PATH, self._poll)
        vendor.route("GET", RESULT_PATH, self._result)

    def _submit(self, seen: Seen) -> Reply:
        photo = next(p.data for p in seen.parts if p.name == "image_target")
        self.submits_by_input[hashlib.sha256(photo).hexdigest()] += 1
        task_id = self.task_ids(len(self.given))
        self.given.append(task_id)
        return Reply(body=ailab_ok(task_type="async", task_id=task_id))

    def _poll(self, seen: Seen) -> Reply:
        task_id = parse_qs(urlsplit(seen.raw_path).query)["task_id"][0]
        self.polls_by_task[task_id] += 1
        if self.running:
            return Reply(body=ailab_ok(task_status=1))
        url = self.vendor.url(f"{RESULT_PATH}?task={quote(task_id)}")
        return Reply(body=ailab_ok(task_status=2, data={"image": url}))

    def _result(self, seen: Seen) -> Reply:
        task_id = parse_qs(urlsplit(seen.raw_path).query)["task"][0]
        return Reply(body=task_image(task_id), headers={"Content-Type": "image/jpeg"})


@pytest.fixture
async def vendor() -> AsyncIterator[Vendor]:
    async for v in start_vendor():
        yield v


def _write_job(root: Path, inputs: int, concurrency: int) -> tuple[Path, dict[str, str]]:
    """A face-swap job over ``inputs`` portraits; returns it and input name -> digest."""
    make_portrait(root / "template.jpg", seed=999_999)
    digests = {}
    for i in range(inputs):
        path = make_portrait(root / "in" / f"p{i}.jpg", seed=i)
        digests[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    doc = {
        "name": "replay",
        "inputs": ["in/*.jpg"],
        "operations": [SWAP],
        "output": "out",
        "concurrency": concurrency,
    }
    manifest = root / "job.yaml"
    manifest.write_text(yaml.safe_dump(doc, sort_keys=False))
    return manifest, digests


async def _run(
    manifest: Path, vendor: Vendor, *, deadline: float | None = None, **options: Any
) -> tuple[int, list[dict[str, Any]]]:
    extra = {} if deadline is None else {"task_deadline_seconds": deadline}
    result = await run_job(
        load_manifest(manifest),
        fast_config(vendor.url(), **extra),
        RunOptions(quiet=True, **options),
    )
    out = manifest.parent / "out"
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert json.loads((out / "report.json").read_text()) == result.report
    return result.exit_code, lines


def _assert_every_result_is_its_own_task(root: Path, lines: list[dict[str, Any]]) -> None:
    stored = [x for x in lines if x["status"] in ("succeeded", "skipped")]
    ids = [x["task_id"] for x in stored]
    assert len(ids) == len(set(ids)), "one task stored for two photos"
    for line in stored:
        assert (root / "out" / line["output_rel"]).read_bytes() == task_image(line["task_id"])


async def test_a_task_id_given_to_every_send_is_polled_for_one_photo_only(
    tmp_path: Path, vendor: Vendor
) -> None:
    ailab = ReplayingAILab(vendor, lambda n: "task-replayed")
    manifest, digests = _write_job(tmp_path, inputs=3, concurrency=3)

    code, lines = await _run(manifest, vendor)

    assert code == 1
    assert ailab.submits_by_input == dict.fromkeys(digests.values(), 1)
    assert ailab.polls_by_task == {"task-replayed": 1}  # for its holder alone
    by_status = Counter(x["status"] for x in lines)
    assert by_status == {"succeeded": 1, "failed": 2}
    holder = next(x for x in lines if x["status"] == "succeeded")
    for line in lines:
        if line["status"] == "failed":
            assert line["error"]["code"] == "TASK_ID_REUSED"
            assert line["error"]["kind"] == "permanent"
            assert line["possibly_billed"] is True and line["billed"] is False
            assert line["task_id"] is None and line["output"] is None
            assert holder["input_rel"] in line["error"]["message"]
    _assert_every_result_is_its_own_task(tmp_path, lines)
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["errors_by_code"] == {"TASK_ID_REUSED": 2}
    assert report["possibly_billed"] == 2

    # A plain rerun sends nothing: the two failed for good and may have been billed.
    before = len(vendor.seen)
    code, lines = await _run(manifest, vendor)
    assert vendor.seen[before:] == [] and code == 0
    assert Counter(x["status"] for x in lines) == {"skipped": 1, "failed": 2}

    # --retry-failed sends those two once more; with ids of their own they succeed.
    ailab.task_ids = lambda n: f"task-{n}"
    code, lines = await _run(manifest, vendor, retry_failed=True)
    assert code == 0
    assert sorted(ailab.submits_by_input.values()) == [1, 2, 2]
    assert ailab.polls_by_task == {"task-replayed": 1, "task-3": 1, "task-4": 1}
    assert Counter(x["status"] for x in lines) == {"skipped": 1, "succeeded": 2}
    _assert_every_result_is_its_own_task(tmp_path, lines)


async def test_a_task_id_an_earlier_run_recorded_is_not_taken_by_a_new_photo(
    tmp_path: Path, vendor: Vendor
) -> None:
    ailab = ReplayingAILab(vendor, lambda n: "task-first")
    manifest, _ = _write_job(tmp_path, inputs=1, concurrency=1)
    code, lines = await _run(manifest, vendor)
    assert code == 0 and [x["task_id"] for x in lines] == ["task-first"]
    first_result = (tmp_path / "out" / lines[0]["output_rel"]).read_bytes()

    # A new photo; the vendor (a stale cache) answers its send with the old id.
    new = make_portrait(tmp_path / "in" / "p9.jpg", seed=9)
    code, lines = await _run(manifest, vendor)
    assert code == 1
    assert ailab.submits_by_input[hashlib.sha256(new.read_bytes()).hexdigest()] == 1
    assert ailab.polls_by_task == {"task-first": 1}  # never polled for the new photo
    failed = next(x for x in lines if x["status"] == "failed")
    assert failed["input_rel"].endswith("p9.jpg")
    assert failed["error"]["code"] == "TASK_ID_REUSED"
    assert lines[0]["input_rel"] in failed["error"]["message"]
    kept = next(x for x in lines if x["status"] == "skipped")
    assert (tmp_path / "out" / kept["output_rel"]).read_bytes() == first_result
    _assert_every_result_is_its_own_task(tmp_path, lines)


async def test_two_journal_rows_with_one_task_id_store_its_result_once(
    tmp_path: Path, vendor: Vendor
) -> None:
    """A journal where two photos' rows hold one task id (as a release before this
    check could leave it): resumed, the task is polled and stored for one of them."""
    ailab = ReplayingAILab(vendor, lambda n: f"task-{n}")
    ailab.running = True
    manifest, _ = _write_job(tmp_path, inputs=2, concurrency=2)
    code, lines = await _run(manifest, vendor, deadline=0.3)
    assert {x["error"]["code"] for x in lines} == {"TASK_DEADLINE"}  # ids kept
    with sqlite3.connect(tmp_path / "out" / "journal.sqlite") as conn:
        conn.execute("UPDATE items SET task_id = 'task-replayed' WHERE task_id IS NOT NULL")
    ailab.running = False
    ailab.polls_by_task.clear()

    code, lines = await _run(manifest, vendor)

    assert code == 1
    assert ailab.polls_by_task == {"task-replayed": 1}
    assert sorted(ailab.submits_by_input.values()) == [1, 1]  # nothing sent again
    assert Counter(x["status"] for x in lines) == {"succeeded": 1, "failed": 1}
    failed = next(x for x in lines if x["status"] == "failed")
    assert failed["error"]["code"] == "TASK_ID_REUSED" and failed["possibly_billed"] is True
    _assert_every_result_is_its_own_task(tmp_path, lines)
    # The next run leaves the refused one alone (permanent) and keeps the stored one.
    code, lines = await _run(manifest, vendor)
    assert ailab.polls_by_task == {"task-replayed": 1}
    assert Counter(x["status"] for x in lines) == {"skipped": 1, "failed": 1}


async def test_an_unusable_task_id_counts_as_possibly_billed(
    tmp_path: Path, vendor: Vendor
) -> None:
    """An answer whose task id is refused (a control character in it) came from a
    send the vendor accepted: the item may have been billed, and says so."""
    ailab = ReplayingAILab(vendor, lambda n: "task\x07bell")
    manifest, digests = _write_job(tmp_path, inputs=1, concurrency=1)
    code, lines = await _run(manifest, vendor)
    assert code == 1
    assert ailab.submits_by_input == dict.fromkeys(digests.values(), 1)
    (line,) = lines
    assert line["error"]["code"] == "UNSAFE_TASK_ID"
    assert line["possibly_billed"] is True
    report = json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["possibly_billed"] == 1


async def test_the_same_task_id_at_two_vendors_is_two_tasks(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each vendor numbers its own tasks (both emulated vendors give "1" to their
    first): one photo through an AILab and a Perfect Corp operation succeeds twice."""
    import pipeline.emulator.ailab as emu_ailab
    import pipeline.emulator.perfectcorp as emu_pc
    from pipeline.emulator import Scenario, start_emulator

    def numbered(real: Callable[..., str], length: int) -> Any:
        counter = iter(range(1, 1000))
        return lambda n=None: str(next(counter)) if n == length else real(n)

    for module, name, length in ((emu_ailab, "token_hex", 20), (emu_pc, "token_urlsafe", 48)):
        fake = types.SimpleNamespace(**vars(secrets))
        setattr(fake, name, numbered(getattr(secrets, name), length))
        monkeypatch.setattr(module, "secrets", fake)
    make_portrait(tmp_path / "template.jpg", seed=999_999)
    make_portrait(tmp_path / "in" / "a.jpg", seed=1)
    doc = {
        "name": "two-vendors",
        "inputs": ["in/*.jpg"],
        "operations": [
            SWAP,
            {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
        ],
        "output": "out",
        "concurrency": 2,
    }
    (tmp_path / "job.yaml").write_text(yaml.safe_dump(doc, sort_keys=False))
    emu = await start_emulator(Scenario(task_seconds=0.05, sync_seconds=0.0))
    try:
        result = await run_job(
            load_manifest(tmp_path / "job.yaml"), fast_config(emu.base_url), RunOptions(quiet=True)
        )
        stats = emu.stats()
    finally:
        await emu.close()
    lines = [json.loads(x) for x in (tmp_path / "out" / "results.jsonl").read_text().splitlines()]
    assert result.exit_code == 0, result.report["errors_by_code"]
    assert sorted(x["task_id"] for x in lines) == ["1", "1"]
    assert [x["status"] for x in lines] == ["succeeded", "succeeded"]
    assert (stats["ailab"]["charged"], stats["perfectcorp"]["charged"]) == (1, 1)


async def _replay_scenario(root: Path, ids: list[str], concurrency: int) -> None:
    async for vendor in start_vendor():
        ailab = ReplayingAILab(vendor, lambda n: ids[n % len(ids)])
        manifest, digests = _write_job(root, inputs=len(ids), concurrency=concurrency)
        _, lines = await _run(manifest, vendor)
        assert ailab.submits_by_input == dict.fromkeys(digests.values(), 1)
        # Each id given is polled for one photo, and kept by it; every other send
        # that got it failed, possibly billed.
        distinct = set(ailab.given)
        assert set(ailab.polls_by_task) == distinct
        assert set(ailab.polls_by_task.values()) == {1}
        failed = [x for x in lines if x["status"] == "failed"]
        assert len(failed) == len(ids) - len(distinct)
        assert {x["error"]["code"] for x in failed} <= {"TASK_ID_REUSED"}
        assert all(x["possibly_billed"] for x in failed)
        assert sorted(x["task_id"] for x in lines if x["status"] == "succeeded") == sorted(distinct)
        _assert_every_result_is_its_own_task(root, lines)


@settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(
    ids=st.lists(st.sampled_from(["t-a", "t-b", "t-c"]), min_size=1, max_size=5),
    concurrency=st.integers(1, 4),
)
def test_whatever_ids_the_vendor_repeats_no_task_is_stored_for_two_photos(
    ids: list[str], concurrency: int
) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        asyncio.run(_replay_scenario(Path(tmp), ids, concurrency))
