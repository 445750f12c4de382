"""An AILab task that succeeds without a result: paid once, never resubmitted.

AILab answers a poll with ``task_status: 2`` (succeeded) and no result field. A
succeeded task is billed (docs/vendors.md, "Both vendors: billing"), so creating a
second task would pay twice. The pipeline asks the same task again for its result a
few times (``Policy.url_refetches``), keeps the result if one comes, and otherwise
reports the item as paid but lost (``RESULT_LOST``: in ``paid_lost`` and
``credits_spent``), never submitted again (docs/vendors.md, "AILab: task failures at
poll").

The vendor is a scripted AILab on loopback (tests/providers/_server.py) that counts
the submits it receives per input (by the sha256 of the photo's bytes); the engine
runs in process against it, as tests/integration/test_proxy_env.py does.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import pytest

from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from pipeline.providers.ailab import OPERATIONS, POLL_PATH
from tests.conftest import fast_config, make_portrait
from tests.providers._server import JPEG, Reply, Seen, Vendor, ailab_ok, start_vendor

pytestmark = pytest.mark.timeout(60)

# Both asynchronous AILab operations, with the form field that carries the input
# (docs/vendors.md, "AILab: face swap", "AILab: face beauty pro") and the price.
OPS: dict[str, tuple[dict[str, Any], str, int]] = {
    "face-swap": (
        {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}},
        "image_target",
        5,
    ),
    "face-beauty-pro": (
        {"op": "ailab/face-beauty-pro", "params": {"smoothing": 70}},
        "image",
        15,
    ),
}
N_INPUTS = 3


class AILabWithoutResult:
    """An AILab that always says ``task_status: 2``, without a result for the first
    ``bare_polls`` polls of each task (all of them when ``None``), then with
    ``result_url`` on its own origin."""

    def __init__(self, vendor: Vendor, operation: str, field: str, bare_polls: int | None) -> None:
        self.vendor = vendor
        self.field = field
        self.bare_polls = bare_polls
        self.submits_by_input: Counter[str] = Counter()
        self.polls_by_task: Counter[str] = Counter()
        vendor.route("POST", OPERATIONS[operation], self._submit)
        vendor.route("GET", POLL_PATH, self._poll)
        vendor.route(
            "GET", "/outputs/result.jpg", Reply(body=JPEG, headers={"Content-Type": "image/jpeg"})
        )

    def _submit(self, seen: Seen) -> Reply:
        photo = next(p.data for p in seen.parts if p.name == self.field)
        digest = hashlib.sha256(photo).hexdigest()
        self.submits_by_input[digest] += 1
        task_id = f"task-{digest[:12]}-{self.submits_by_input[digest]}"
        return Reply(body=ailab_ok(task_type="async", task_id=task_id))

    def _poll(self, seen: Seen) -> Reply:
        task_id = parse_qs(urlsplit(seen.raw_path).query)["task_id"][0]
        self.polls_by_task[task_id] += 1
        if self.bare_polls is None or self.polls_by_task[task_id] <= self.bare_polls:
            return Reply(body=ailab_ok(task_status=2))  # succeeded, no result field
        url = self.vendor.url(f"/outputs/result.jpg?task={task_id}")
        return Reply(body=ailab_ok(task_status=2, result_url=url))


@pytest.fixture
async def vendor() -> AsyncIterator[Vendor]:
    async for v in start_vendor():
        yield v


def _inputs(tmp_path: Path) -> dict[str, Path]:
    paths = [make_portrait(tmp_path / "in" / f"p{i}.jpg", seed=i) for i in range(N_INPUTS)]
    return {hashlib.sha256(p.read_bytes()).hexdigest(): p for p in paths}


def _results(out: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]


async def _run(manifest: Path, vendor: Vendor) -> tuple[int, dict[str, Any]]:
    result = await run_job(
        load_manifest(manifest), fast_config(vendor.url()), RunOptions(quiet=True)
    )
    report = json.loads((manifest.parent / "out" / "report.json").read_text())
    return result.exit_code, report


@pytest.mark.parametrize("op", list(OPS))
async def test_succeeded_without_a_result_ever_is_paid_once_and_lost(
    tmp_path: Path, vendor: Vendor, write_manifest: Callable[..., Path], op: str
) -> None:
    spec, field, price = OPS[op]
    inputs = _inputs(tmp_path)
    ailab = AILabWithoutResult(vendor, spec["op"], field, bare_polls=None)
    manifest = write_manifest([spec], concurrency=2)

    code, report = await _run(manifest, vendor)

    # One billable submit per input: the succeeded task was never replaced by another.
    assert ailab.submits_by_input == dict.fromkeys(inputs, 1)
    assert code == 1  # items failed in this run
    assert report["counts"]["failed"] == N_INPUTS
    assert report["errors_by_code"] == {"RESULT_LOST": N_INPUTS}
    assert report["paid_lost"] == N_INPUTS
    assert report["credits_spent"] == {"ailab": {"amount": price * N_INPUTS, "unit": "credits"}}
    # The same task was asked again for its result, a bounded number of times.
    assert len(ailab.polls_by_task) == N_INPUTS
    assert set(ailab.polls_by_task.values()) == {3}  # the first poll + url_refetches (2)
    lines = _results(tmp_path / "out")
    assert sorted(line["error"]["code"] for line in lines) == ["RESULT_LOST"] * N_INPUTS
    assert not list((tmp_path / "out").rglob("*.jpg"))  # no result was kept

    # A rerun sends nothing: a paid, lost result is not paid for again on its own.
    before = len(vendor.seen)
    code, report = await _run(manifest, vendor)
    assert vendor.seen[before:] == []
    assert ailab.submits_by_input == dict.fromkeys(inputs, 1)
    assert report["credits_spent"] == {"ailab": {"amount": 0, "unit": "credits"}}
    assert report["paid_lost"] == 0
    assert report["paid_lost_total"] == N_INPUTS
    assert report["counts"]["failed_earlier"] == N_INPUTS
    assert code == 0  # carried-over failures only (no --strict)


@pytest.mark.parametrize("op", list(OPS))
async def test_succeeded_without_a_result_then_with_one_keeps_the_result(
    tmp_path: Path, vendor: Vendor, write_manifest: Callable[..., Path], op: str
) -> None:
    spec, field, price = OPS[op]
    inputs = _inputs(tmp_path)
    ailab = AILabWithoutResult(vendor, spec["op"], field, bare_polls=1)
    manifest = write_manifest([spec], concurrency=2)

    code, report = await _run(manifest, vendor)

    assert ailab.submits_by_input == dict.fromkeys(inputs, 1)
    assert code == 0, report["errors_by_code"]
    assert report["counts"]["succeeded"] == N_INPUTS
    assert report["paid_lost"] == 0
    assert report["credits_spent"] == {"ailab": {"amount": price * N_INPUTS, "unit": "credits"}}
    assert set(ailab.polls_by_task.values()) == {2}  # without, then with the result
    lines = _results(tmp_path / "out")
    assert [line["status"] for line in lines] == ["succeeded"] * N_INPUTS
    for line in lines:
        assert (tmp_path / "out" / line["output"]).read_bytes() == JPEG

    before = len(vendor.seen)
    code, report = await _run(manifest, vendor)
    assert vendor.seen[before:] == []
    assert ailab.submits_by_input == dict.fromkeys(inputs, 1)
    assert report["counts"]["skipped"] == N_INPUTS
    assert report["credits_spent"] == {"ailab": {"amount": 0, "unit": "credits"}}
    assert code == 0
