"""Issue 8, end to end: the promise kept in a hostile world.

Every test drives the real engine (in process, or ``python -m pipeline run`` as a
subprocess) against the real emulator over loopback HTTP, with real files and the
real SQLite journal, and asserts exact outcomes: the exit code, every item's status
and error code in ``results.jsonl``, ``report.json`` counts, and what the vendor saw
(the emulator's ``submits_by_input`` and ``charged_by_input``, keyed by the sha256 of
each input's bytes).

A vendor that fails and then recovers is two emulators (the emulator keeps its tasks
in memory): one that fails every request (or a port where nothing listens) for the
first run, a healthy one for the rerun. While every request fails no task exists
anywhere, so nothing is lost by switching; the money checks add both emulators up.

The points of issue 8 covered here: 1 (reruns after any failure), 2 (failures stay
inside their item; a full disk), 3 (unknown outcomes), 5 (every matched input
accounted for), 8 (no wait without end), 10 (secrets) and 11 (interrupted is not
failed).
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
import pytest
import yaml

from pipeline.config import Config, NetworkConfig, RetryConfig
from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.errors import UsageError
from pipeline.manifest import load_manifest
from pipeline.rescue import read_rescued
from tests.conftest import AILAB_KEY, PERFECTCORP_KEY, fast_config, make_portrait
from tests.integration._disk import fill, tmpfs

pytestmark = pytest.mark.timeout(60)

SYNC: dict[str, Any] = {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}
SMILE: dict[str, Any] = {
    "op": "perfectcorp/ai-smile",
    "params": {"expression_type": "closed_mouth_smile"},
}
SWAP: dict[str, Any] = {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}}
# One operation per vendor, so each vendor's submits_by_input counts one item per input.
BOTH = [SYNC, SMILE]
VENDOR_OF = {SYNC["op"]: "ailab", SMILE["op"]: "perfectcorp", SWAP["op"]: "ailab"}
VENDORS = ("ailab", "perfectcorp")


# -- helpers ------------------------------------------------------------------------------


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _inputs(tmp_path: Path, n: int, start: int = 0, folder: str = "in") -> list[Path]:
    return [
        make_portrait(tmp_path / folder / f"p{i:03d}.jpg", seed=i) for i in range(start, start + n)
    ]


def _dead_url() -> str:
    """A loopback URL where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


def _config(
    ailab_url: str,
    perfectcorp_url: str | None = None,
    *,
    retry: Mapping[str, Any] | None = None,
    network: Mapping[str, Any] | None = None,
    **provider: Any,
) -> Config:
    """The fast test config, each vendor at its own URL, with settings overridden."""
    config = fast_config(ailab_url, **provider)
    if perfectcorp_url is not None:
        pc = config.provider("perfectcorp").model_copy(update={"base_url": perfectcorp_url})
        config = config.model_copy(update={"providers": {**config.providers, "perfectcorp": pc}})
    if retry:
        config = config.model_copy(
            update={"retry": RetryConfig.model_validate({**config.retry.model_dump(), **retry})}
        )
    if network:
        config = config.model_copy(
            update={
                "network": NetworkConfig.model_validate({**config.network.model_dump(), **network})
            }
        )
    return config


def _config_file(config: Config, path: Path) -> Path:
    path.write_text(yaml.safe_dump(config.model_dump(mode="json", exclude={"source"})))
    return path


@dataclass
class Outcome:
    code: int
    report: dict[str, Any]
    lines: list[dict[str, Any]]

    def line(self, op: str, input_path: Path) -> dict[str, Any]:
        (found,) = [x for x in self.lines if x["operation"] == op and x["input"] == str(input_path)]
        return found

    def tally(self) -> Counter[tuple[str, str, str | None]]:
        """(operation, status, error code) -> lines."""
        return Counter(
            (x["operation"], x["status"], x["error"]["code"] if x["error"] else None)
            for x in self.lines
        )


def _read_outcome(out: Path, code: int) -> Outcome:
    report = json.loads((out / "report.json").read_text())
    lines = [json.loads(x) for x in (out / "results.jsonl").read_text().splitlines()]
    assert report["counts"]["total"] == len(lines)
    return Outcome(code, report, lines)


async def _run(manifest_path: Path, config: Config, **options: Any) -> Outcome:
    manifest = load_manifest(manifest_path)
    result = await run_job(manifest, config, RunOptions(quiet=True, **options))
    outcome = _read_outcome(manifest.output, result.exit_code)
    assert outcome.report["exit_code"] == result.exit_code
    return outcome


def _counts(**given: int) -> dict[str, int]:
    counts = dict.fromkeys(("succeeded", "failed", "failed_earlier", "skipped", "interrupted"), 0)
    counts.update(given)
    return {"total": sum(counts.values()), **counts}


def _vendor(emus: tuple[RunningEmulator, ...], vendor: str, field: str) -> Counter[str]:
    total: Counter[str] = Counter()
    for emu in emus:
        total.update(emu.stats()[vendor][field])
    return total


def _submits(*emus: RunningEmulator) -> dict[str, Counter[str]]:
    return {v: _vendor(emus, v, "submits_by_input") for v in VENDORS}


def _charges(*emus: RunningEmulator) -> dict[str, Counter[str]]:
    return {v: _vendor(emus, v, "charged_by_input") for v in VENDORS}


def _once_each(inputs: list[Path], ops: list[dict[str, Any]]) -> dict[str, Counter[str]]:
    """What the vendors must have seen: each input once per operation's vendor."""
    want: dict[str, Counter[str]] = {v: Counter() for v in VENDORS}
    for op in ops:
        for path in inputs:
            want[VENDOR_OF[str(op["op"])]][_sha(path)] += 1
    return want


def _env(**extra: str) -> dict[str, str]:
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY})
    env.update(extra)
    return env


def _argv(manifest: Path, cfg: Path, *extra: str) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", str(manifest), "--config", str(cfg), *extra]


async def _cli(
    manifest: Path, cfg: Path, *extra: str, env: Mapping[str, str] | None = None
) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        _argv(manifest, cfg, *extra), check=False, env=dict(env or _env())
    )


def _no_traceback(text: bytes | str) -> None:
    shown = text.decode(errors="replace") if isinstance(text, bytes) else text
    assert "Traceback" not in shown, shown


# -- 1. reruns after any failure work -------------------------------------------------------


@pytest.mark.parametrize("retry_failed", [False, True])
async def test_rerun_after_a_5xx_outage_retries_everything_and_takes_new_inputs(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    retry_failed: bool,
) -> None:
    down: RunningEmulator = await emulator_factory(transient_error_rate=1.0)
    up: RunningEmulator = await emulator_factory()
    old = _inputs(tmp_path, 3)
    manifest = write_manifest(BOTH, max_attempts=3, concurrency=4)

    first = await _run(manifest, _config(down.base_url))
    assert first.code == 1
    assert first.report["counts"] == _counts(failed=6)
    assert {x["status"] for x in first.lines} == {"failed"}
    assert {x["error"]["kind"] for x in first.lines} == {"retryable"}
    assert all(x["attempts"] == 3 for x in first.lines), first.lines
    assert first.report["aborted"] is None
    assert sum(down.stats()[v]["charged"] for v in VENDORS) == 0

    new = _inputs(tmp_path, 2, start=3)
    second = await _run(manifest, _config(up.base_url), retry_failed=retry_failed)
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=10)
    assert all(Path(x["output"]).is_file() for x in second.lines)
    assert _charges(down, up) == _once_each(old + new, BOTH)
    assert _submits(down, up) == _once_each(old + new, BOTH)


@pytest.mark.parametrize("retry_failed", [False, True])
async def test_rerun_after_connection_refused_retries_everything(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    retry_failed: bool,
) -> None:
    old = _inputs(tmp_path, 3)
    manifest = write_manifest(BOTH, max_attempts=2, concurrency=4)
    dead = _dead_url()

    first = await _run(manifest, _config(dead))
    assert first.code == 1, first.report["aborted"]
    assert first.report["counts"] == _counts(failed=6)
    assert first.tally() == Counter(
        {(SYNC["op"], "failed", "CONNECT_FAILED"): 3, (SMILE["op"], "failed", "CONNECT_FAILED"): 3}
    )
    assert {x["error"]["kind"] for x in first.lines} == {"retryable"}
    assert first.report["possibly_billed"] == 0  # a refused connection carried no body

    new = _inputs(tmp_path, 1, start=3)
    second = await _run(manifest, _config(emulator.base_url), retry_failed=retry_failed)
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=8)
    assert _charges(emulator) == _once_each(old + new, BOTH)
    assert _submits(emulator) == _once_each(old + new, BOTH)


async def test_rerun_after_disconnects_sends_unknown_outcomes_once_more_at_most(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # A dropped connection after the body went out is an unknown outcome: the sync
    # send may have been billed, so it is sent twice at most (issue 8 point 3), and
    # only --retry-failed sends it again. Perfect Corp's upload comes before the
    # billable create, so its items are retried freely.
    down: RunningEmulator = await emulator_factory(disconnect_rate=1.0)
    up: RunningEmulator = await emulator_factory()
    old = _inputs(tmp_path, 3)
    manifest = write_manifest(BOTH, max_attempts=4, concurrency=4)

    first = await _run(manifest, _config(down.base_url))
    assert first.code == 1, first.report["aborted"]
    assert first.tally() == Counter(
        {
            (SYNC["op"], "failed", "OUTCOME_UNKNOWN"): 3,
            (SMILE["op"], "failed", "UPLOAD_PUT_FAILED"): 3,
        }
    )
    for path in old:
        line = first.line(SYNC["op"], path)
        assert line["error"]["kind"] == "permanent" and line["possibly_billed"] is True
        assert line["attempts"] == 2
    assert first.report["possibly_billed"] == 3
    assert down.stats()["ailab"]["disconnects"] == 6  # 2 sends of each sync item

    new = _inputs(tmp_path, 1, start=3)
    second = await _run(manifest, _config(up.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    assert second.tally() == Counter(
        {
            (SYNC["op"], "failed", "OUTCOME_UNKNOWN"): 3,  # carried over, not sent again
            (SYNC["op"], "succeeded", None): 1,
            (SMILE["op"], "succeeded", None): 4,
        }
    )
    assert second.report["counts"] == _counts(succeeded=5, failed_earlier=3)
    assert _submits(up)["ailab"] == Counter({_sha(new[0]): 1})

    third = await _run(manifest, _config(up.base_url), retry_failed=True)
    assert third.code == 0
    assert third.report["counts"] == _counts(succeeded=3, skipped=5)
    assert _charges(down, up) == _once_each(old + new, BOTH)


@pytest.mark.parametrize("retry_failed", [False, True])
async def test_rerun_after_a_bad_key_stop_finishes_everything(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
    retry_failed: bool,
) -> None:
    emu: RunningEmulator = await emulator_factory(
        ailab_api_keys=(AILAB_KEY,), perfectcorp_api_keys=(PERFECTCORP_KEY,)
    )
    old = _inputs(tmp_path, 4)
    manifest = write_manifest(BOTH, concurrency=2)
    monkeypatch.setenv("AILAB_API_KEY", "not-the-key-000")

    first = await _run(manifest, _config(emu.base_url))
    assert first.code == 3
    assert first.report["aborted"]["code"] == "ERROR_USER_NOT_EXISTS"
    assert first.report["aborted"]["kind"] == "fatal"
    assert _charges(emu)["ailab"] == Counter()
    # Nothing the stop cut short is reported as a failure of its own.
    for line in first.lines:
        if line["status"] == "failed":
            assert line["error"]["code"] == "ERROR_USER_NOT_EXISTS", line
        else:
            assert line["status"] in {"succeeded", "interrupted"}, line

    monkeypatch.setenv("AILAB_API_KEY", AILAB_KEY)
    new = _inputs(tmp_path, 1, start=4)
    second = await _run(manifest, _config(emu.base_url), retry_failed=retry_failed)
    assert second.code == 0, second.report["errors_by_code"]
    done_before = sum(x["status"] == "succeeded" for x in first.lines)
    assert second.report["counts"] == _counts(succeeded=10 - done_before, skipped=done_before)
    assert _charges(emu) == _once_each(old + new, BOTH)
    assert _submits(emu) == _once_each(old + new, BOTH)


# -- 1 and 11. Ctrl-C: interrupted is not failed, and the rerun finishes it --------------------


async def _kill_when(
    manifest: Path, cfg: Path, check: Callable[[], bool], what: str, *, settle: float = 0.3
) -> None:
    """Run the CLI as a child and ``kill -9`` it ``settle`` s after ``check`` holds (a
    task id is committed within that time of its answer)."""
    with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
        await _wait_for(check, what)
        await anyio.sleep(settle)
        proc.kill()
        await anyio.to_thread.run_sync(proc.wait)


def _result_files(out: Path) -> list[Path]:
    """Result images written so far (not the pipeline's own .thumbs/ and reports/)."""
    found: list[Path] = []
    for top in ("ailab-emotion-editor", "ailab-face-swap", "perfectcorp-ai-smile"):
        for dirpath, _dirs, names in os.walk(out / top):
            found += [Path(dirpath, n) for n in names if not n.startswith(".")]
    return found


async def _wait_for(check: Callable[[], bool], what: str, seconds: float = 20.0) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        await anyio.sleep(0.02)


@contextlib.contextmanager
def _child(argv: list[str], env: Mapping[str, str]) -> Iterator[subprocess.Popen[bytes]]:
    proc = subprocess.Popen(argv, env=dict(env), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


async def _sigint_and_wait(proc: subprocess.Popen[bytes]) -> tuple[int, str, str]:
    proc.send_signal(signal.SIGINT)
    # Bounded only so that a hang fails the test instead of the whole suite.
    out, err = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
    return proc.returncode, out.decode(), err.decode()


@pytest.mark.parametrize("retry_failed", [False, True])
async def test_sigint_mid_run_is_interrupted_not_failed_and_a_rerun_finishes(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    retry_failed: bool,
) -> None:
    emu: RunningEmulator = await emulator_factory(task_seconds=1.5, sync_seconds=0.2)
    inputs = _inputs(tmp_path, 6)
    manifest = write_manifest(BOTH, concurrency=3)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    out = tmp_path / "out"

    with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
        await _wait_for(lambda: bool(_result_files(out)), "a first result")
        code, stdout, stderr = await _sigint_and_wait(proc)
    assert code == 130, stderr
    _no_traceback(stderr + stdout)
    first = _read_outcome(out, code)
    assert first.report["exit_code"] == 130 and first.report["interrupted"] is True
    statuses = Counter(x["status"] for x in first.lines)
    assert set(statuses) <= {"succeeded", "interrupted"}, first.lines
    assert statuses["interrupted"] > 0 and statuses["succeeded"] > 0
    assert first.report["counts"] == _counts(
        succeeded=statuses["succeeded"], interrupted=statuses["interrupted"]
    )
    for line in first.lines:
        if line["status"] == "interrupted":
            assert line["error"]["code"] == "INTERRUPTED" and line["output"] is None
    by_op = first.report["by_operation"]
    assert sum(v["interrupted"] for v in by_op.values()) == statuses["interrupted"]
    assert f"{statuses['interrupted']} not finished: rerun to resume" in stdout, stdout

    new = _inputs(tmp_path, 1, start=6)
    extra = ("--retry-failed",) if retry_failed else ()
    done = await _cli(manifest, cfg, "--quiet", *extra)
    assert done.returncode == 0, done.stderr.decode()
    second = _read_outcome(out, 0)
    # Inputs the stopped run never reached have no line in its results, but are met now.
    assert second.report["counts"] == _counts(
        succeeded=14 - statuses["succeeded"], skipped=statuses["succeeded"]
    )
    assert _charges(emu) == _once_each(inputs + new, BOTH)
    assert _submits(emu) == _once_each(inputs + new, BOTH)


# -- 8. no wait without end -------------------------------------------------------------------


async def test_a_huge_retry_after_is_honoured_only_up_to_the_cap(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(
        rate_limit={"requests": 2, "per_seconds": 1}, rate_limit_retry_after_seconds=999999999
    )
    inputs = _inputs(tmp_path, 5)
    manifest = write_manifest([SYNC], concurrency=5)
    # The run must end well inside the test's timeout: each 429 waits 0.3 s, not 31 years.
    outcome = await _run(manifest, _config(emu.base_url, retry={"retry_after_max_seconds": 0.3}))
    assert outcome.code == 0, outcome.report["errors_by_code"]
    assert outcome.report["counts"] == _counts(succeeded=5)
    assert emu.stats()["ailab"]["rate_limited"] > 0  # the huge Retry-After was really sent
    assert outcome.report["rate_budget"]["ailab"]["rate_limited_answers"] > 0
    assert _charges(emu) == _once_each(inputs, [SYNC])


async def test_ctrl_c_during_a_long_retry_after_wait_exits_130_promptly(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(
        rate_limit={"requests": 1, "per_seconds": 3600}, rate_limit_retry_after_seconds=999999999
    )
    inputs = _inputs(tmp_path, 3)
    manifest = write_manifest([SYNC], concurrency=1)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")  # cap: 300 s
    out = tmp_path / "out"

    with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
        await _wait_for(lambda: emu.stats()["ailab"]["rate_limited"] > 0, "a 429")
        await anyio.sleep(0.3)  # now waiting out the (capped) Retry-After
        code, stdout, stderr = await _sigint_and_wait(proc)
    assert code == 130, stderr
    _no_traceback(stderr + stdout)
    first = _read_outcome(out, code)
    # One item done, the next one waiting at the budget, the third read ahead and
    # waiting for the one vendor slot (engine.prefetch): neither was sent.
    assert Counter(x["status"] for x in first.lines) == Counter(succeeded=1, interrupted=2)
    assert _charges(emu)["ailab"] == Counter({_sha(inputs[0]): 1})


# -- 2. failures stay inside their item ---------------------------------------------------------

SYNC_DIR = "ailab-emotion-editor"
SYNC_VARIANT = "service_choice=big_grin"


def _plant(kind: str, out: Path, outside: Path, first_input: str) -> Path:
    """Put an obstacle where the sync operation's results go; returns what to remove."""
    out.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    if kind == "file_at_operation_folder":
        (out / SYNC_DIR).write_bytes(b"not a folder")
        return out / SYNC_DIR
    if kind == "symlink_at_operation_folder":
        (out / SYNC_DIR).symlink_to(outside, target_is_directory=True)
        return out / SYNC_DIR
    if kind == "symlink_at_input_folder":
        (out / SYNC_DIR / SYNC_VARIANT).mkdir(parents=True)
        (out / SYNC_DIR / SYNC_VARIANT / "in").symlink_to(outside, target_is_directory=True)
        return out / SYNC_DIR / SYNC_VARIANT / "in"
    assert kind == "folder_at_result_name"
    # A name the file system refuses to rename a file onto: a non-empty folder.
    blocker = out / SYNC_DIR / SYNC_VARIANT / "in" / first_input
    (blocker / "keep").mkdir(parents=True)
    return blocker


def _remove(path: Path) -> None:
    if path.is_symlink() or path.is_file():
        path.unlink()
    else:
        for dirpath, dirs, files in os.walk(path, topdown=False):
            for name in files:
                Path(dirpath, name).unlink()
            for name in dirs:
                Path(dirpath, name).rmdir()
        path.rmdir()


@pytest.mark.parametrize(
    "obstacle",
    [
        "file_at_operation_folder",
        "symlink_at_operation_folder",
        "symlink_at_input_folder",
        "folder_at_result_name",
    ],
)
async def test_an_output_that_cannot_be_written_fails_its_item_and_the_rerun_stores_it_unpaid(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    obstacle: str,
) -> None:
    inputs = _inputs(tmp_path, 3)
    manifest = write_manifest(BOTH, concurrency=4)
    out, outside = tmp_path / "out", tmp_path / "outside"
    planted = _plant(obstacle, out, outside, inputs[0].name)
    blocked = inputs[:1] if obstacle == "folder_at_result_name" else inputs

    first = await _run(manifest, _config(emulator.base_url))
    assert first.code == 1
    assert first.tally() == Counter(
        {
            (SYNC["op"], "failed", "STORE_FAILED"): len(blocked),
            (SYNC["op"], "succeeded", None): 3 - len(blocked),
            (SMILE["op"], "succeeded", None): 3,
        }
    )
    for path in blocked:
        line = first.line(SYNC["op"], path)
        assert line["billed"] is True and line["output"] is None
        assert "not paid for again" in line["error"]["message"]
        assert "\n" not in line["error"]["message"]
    assert first.report["paid_not_stored"] == len(blocked)
    assert list(outside.iterdir()) == [], "something was written outside the output folder"
    assert _charges(emulator) == _once_each(inputs, BOTH)

    # Still blocked, even with --retry-failed: failed again, and not sent again.
    again = await _run(manifest, _config(emulator.base_url), retry_failed=True)
    assert again.code == 1
    assert again.report["counts"] == _counts(failed=len(blocked), skipped=6 - len(blocked))
    assert {x["error"]["code"] for x in again.lines if x["error"]} == {"STORE_FAILED"}
    assert _submits(emulator) == _once_each(inputs, BOTH)

    _remove(planted)
    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=len(blocked), skipped=6 - len(blocked))
    for path in blocked:
        line = second.line(SYNC["op"], path)
        assert line["status"] == "succeeded" and Path(line["output"]).is_file()
        assert not Path(line["output"]).is_symlink()
    assert list(outside.iterdir()) == []
    # Stored from the journal's copy: not sent, not paid again.
    assert _submits(emulator) == _once_each(inputs, BOTH)
    assert _charges(emulator) == _once_each(inputs, BOTH)


async def _no_wait(_request: Any) -> None:
    return None


class _Proxy:
    """A loopback HTTP proxy in front of the emulator that can answer instead of it.

    ``intercept(request)`` returns a response to send instead of forwarding, or None.
    The Host header is passed on, so URLs the emulator builds point back here.
    """

    HOP = frozenset(
        {"connection", "keep-alive", "transfer-encoding", "content-length", "content-encoding"}
    )

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream
        self.intercept: Callable[[Any], Any] = lambda request: None
        self.intercepted = 0
        self.forwarded = 0
        # Changes the headers of a forwarded request (e.g. swaps the API key); it sees
        # the request's method as the pseudo-header X-Probe-Method.
        self.rewrite: Callable[[dict[str, str]], None] = lambda headers: None
        # Changes the body of a forwarded answer.
        self.transform: Callable[[Any, bytes], bytes] = lambda request, body: body
        # Awaited first for every request: may hold it back.
        self.before: Callable[[Any], Awaitable[None]] = _no_wait

    async def __aenter__(self) -> _Proxy:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=200 * 1024 * 1024)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        host, port = self._runner.addresses[0][:2]
        self.base_url = f"http://{host}:{port}"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        await self._session.close()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        await self.before(request)
        answer = self.intercept(request)
        if answer is not None:
            self.intercepted += 1
            return answer
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in self.HOP}
        headers["X-Probe-Method"] = request.method  # for rewrite(); not forwarded
        self.rewrite(headers)
        del headers["X-Probe-Method"]
        self.forwarded += 1
        async with self._session.request(
            request.method, self.upstream + request.path_qs, headers=headers, data=body,
            allow_redirects=False,
        ) as resp:  # fmt: skip
            data = self.transform(request, await resp.read())
            back = {k: v for k, v in resp.headers.items() if k.lower() not in self.HOP}
            if resp.headers.get("Content-Encoding"):
                back["Content-Encoding"] = resp.headers["Content-Encoding"]
            return web.Response(status=resp.status, body=data, headers=back)


def _html(_request: Any) -> Any:
    from aiohttp import web

    return web.Response(status=200, text="<html><body>maintenance</body></html>",
                        content_type="text/html")  # fmt: skip


async def test_an_unexpected_answer_to_polls_fails_the_item_task_kept_and_the_rerun_collects_it(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    inputs = _inputs(tmp_path, 3)
    manifest = write_manifest(BOTH, max_attempts=2, concurrency=4)
    async with _Proxy(emulator.base_url) as proxy:
        # Perfect Corp's task polls answer an HTML page; everything else goes through.
        proxy.intercept = lambda r: _html(r) if r.method == "GET" and "/task/" in r.path else None
        config = _config(emulator.base_url, proxy.base_url)
        first = await _run(manifest, config)
        assert proxy.intercepted > 0
        assert first.code == 1
        smile = [first.line(SMILE["op"], p) for p in inputs]
        assert {x["status"] for x in smile} == {"failed"}, smile
        assert {x["error"]["kind"] for x in smile} == {"retryable"}
        assert all(x["task_id"] for x in smile)
        assert Counter(x["status"] for x in first.lines if x["operation"] == SYNC["op"]) == {
            "succeeded": 3
        }
        assert _submits(emulator)["perfectcorp"] == _once_each(inputs, [SMILE])["perfectcorp"]

        proxy.intercept = lambda request: None
        second = await _run(manifest, config)
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=3, skipped=3)
    for path, line in zip(inputs, smile, strict=True):
        assert second.line(SMILE["op"], path)["task_id"] == line["task_id"]  # resumed
    assert _submits(emulator) == _once_each(inputs, BOTH)
    assert _charges(emulator) == _once_each(inputs, BOTH)


async def test_an_unexpected_answer_to_uploads_fails_only_that_vendors_items(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    inputs = _inputs(tmp_path, 3)
    manifest = write_manifest(BOTH, max_attempts=2, concurrency=4)
    async with _Proxy(emulator.base_url) as proxy:
        proxy.intercept = _html  # every Perfect Corp request: an HTML page with 200
        first = await _run(manifest, _config(emulator.base_url, proxy.base_url))
    assert first.code == 1
    smile = [first.line(SMILE["op"], p) for p in inputs]
    assert {x["status"] for x in smile} == {"failed"}, smile
    assert {x["error"]["kind"] for x in smile} == {"retryable"}
    assert len({x["error"]["code"] for x in smile}) == 1
    assert Counter(x["status"] for x in first.lines if x["operation"] == SYNC["op"]) == {
        "succeeded": 3
    }
    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0
    assert second.report["counts"] == _counts(succeeded=3, skipped=3)
    assert _charges(emulator) == _once_each(inputs, BOTH)


@pytest.mark.parametrize(
    "free_bytes",
    [
        0,
        16 * 1024,
        128 * 1024,
    ],
)
async def test_a_full_disk_stops_the_run_with_disk_full_and_the_rerun_pays_nothing_twice(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    free_bytes: int,
) -> None:
    manifest = write_manifest(BOTH, concurrency=4)
    cfg = _config_file(_config(emulator.base_url), tmp_path / "config.yaml")
    with tmpfs(tmp_path / "out", "2m") as out:
        inputs = _inputs(tmp_path, 1)
        done = await _cli(manifest, cfg, "--quiet")
        assert done.returncode == 0, done.stderr.decode()
        inputs += _inputs(tmp_path, 3, start=1)
        filler = fill(out, free_bytes)

        full = await _cli(manifest, cfg, "--quiet")
        stderr = full.stderr.decode()
        _no_traceback(stderr + full.stdout.decode())
        assert full.returncode == 3, stderr
        assert "DISK_FULL" in stderr, stderr
        with contextlib.suppress(FileNotFoundError, ValueError):
            report = json.loads((out / "report.json").read_text())
            if report["run_id"] != 1:  # the stopped run got its report written after all
                assert report["aborted"]["code"] == "DISK_FULL"
                assert report["exit_code"] == 3

        filler.unlink()
        rerun = await _cli(manifest, cfg, "--quiet")
        assert rerun.returncode == 0, rerun.stderr.decode()
        final = _read_outcome(out, 0)
        assert final.report["counts"]["succeeded"] + final.report["counts"]["skipped"] == 8
        assert all(Path(x["output"]).is_file() for x in final.lines)
    assert _submits(emulator) == _once_each(inputs, BOTH)
    assert _charges(emulator) == _once_each(inputs, BOTH)


async def test_reports_that_cannot_be_written_still_leave_the_run_recorded_as_ended(
    tmp_path: Path, emulator: RunningEmulator, write_manifest: Callable[..., Path]
) -> None:
    """The end of a run is committed once, after its reports: when they fail (a
    folder planted where results.jsonl goes), its end and what it did are recorded all
    the same, every item's outcome is kept, and a rerun pays for nothing again."""
    import sqlite3

    manifest = write_manifest(BOTH, concurrency=4)
    cfg = _config_file(_config(emulator.base_url), tmp_path / "config.yaml")
    inputs = _inputs(tmp_path, 3)
    out = load_manifest(manifest).output
    (out / "results.jsonl").mkdir(parents=True)
    failed = await _cli(manifest, cfg, "--quiet")
    stderr = failed.stderr.decode()
    _no_traceback(stderr + failed.stdout.decode())
    assert failed.returncode != 0 and "results.jsonl" in stderr, stderr
    with contextlib.closing(sqlite3.connect(out / "journal.sqlite")) as conn:
        finished_at, exit_code, stats = conn.execute(
            "SELECT finished_at, exit_code, stats FROM runs ORDER BY id DESC LIMIT 1"
        ).fetchone()
        statuses = Counter(s for (s,) in conn.execute("SELECT status FROM items"))
    assert finished_at is not None and exit_code is None
    assert json.loads(stats)["requests"]["ailab"]["submit"] == 3
    assert statuses == Counter({"succeeded": 6})
    (out / "results.jsonl").rmdir()
    rerun = await _cli(manifest, cfg, "--quiet")
    assert rerun.returncode == 0, rerun.stderr.decode()
    assert _read_outcome(out, 0).report["counts"]["skipped"] == 6
    assert _submits(emulator) == _once_each(inputs, BOTH)
    assert _charges(emulator) == _once_each(inputs, BOTH)


# -- 3. a sync send with an unknown outcome ------------------------------------------------------


async def test_a_sync_send_whose_answer_is_lost_is_sent_twice_at_most_then_only_on_request(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # The emulator runs (and bills) every sync job, then drops the connection.
    lossy: RunningEmulator = await emulator_factory(lost_response_rate=1.0)
    healthy: RunningEmulator = await emulator_factory()
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest([SYNC], max_attempts=5, concurrency=2)

    first = await _run(manifest, _config(lossy.base_url))
    assert first.code == 1
    assert first.tally() == Counter({(SYNC["op"], "failed", "OUTCOME_UNKNOWN"): 2})
    for path in inputs:
        line = first.line(SYNC["op"], path)
        assert line["error"]["kind"] == "permanent" and line["possibly_billed"] is True
        assert "--retry-failed" in line["error"]["message"]
    assert first.report["possibly_billed"] == 2
    assert lossy.stats()["ailab"]["lost_responses"] == 4
    assert _submits(lossy)["ailab"] == Counter({_sha(p): 2 for p in inputs})

    # A rerun does not send them again on its own...
    second = await _run(manifest, _config(lossy.base_url))
    assert second.code == 0
    assert second.report["counts"] == _counts(failed_earlier=2)
    assert (second.report["possibly_billed"], second.report["possibly_billed_total"]) == (0, 2)
    assert _submits(lossy)["ailab"] == Counter({_sha(p): 2 for p in inputs})
    assert lossy.stats()["ailab"]["requests"] == 4

    # ...--retry-failed does (the user's consent), once.
    third = await _run(manifest, _config(healthy.base_url), retry_failed=True)
    assert third.code == 0, third.report["errors_by_code"]
    assert third.report["counts"] == _counts(succeeded=2)
    assert _submits(healthy)["ailab"] == Counter({_sha(p): 1 for p in inputs})


async def test_unknown_outcomes_are_counted_across_runs(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # max_attempts 1: each run sends once. The first unknown outcome leaves the item to
    # be retried; the second (in the next run) is the last one: OUTCOME_UNKNOWN.
    lossy: RunningEmulator = await emulator_factory(lost_response_rate=1.0)
    (source,) = _inputs(tmp_path, 1)
    manifest = write_manifest([SYNC], max_attempts=1)

    first = await _run(manifest, _config(lossy.base_url))
    assert first.code == 1
    line = first.line(SYNC["op"], source)
    assert line["error"]["kind"] == "retryable" and line["possibly_billed"] is True
    assert first.report["possibly_billed"] == 1

    second = await _run(manifest, _config(lossy.base_url))
    assert second.code == 1
    line = second.line(SYNC["op"], source)
    assert (line["error"]["code"], line["error"]["kind"]) == ("OUTCOME_UNKNOWN", "permanent")
    assert second.report["possibly_billed"] == 1

    for _ in range(2):
        again = await _run(manifest, _config(lossy.base_url))
        assert again.code == 0 and again.report["counts"] == _counts(failed_earlier=1)
    assert _submits(lossy)["ailab"] == Counter({_sha(source): 2})
    assert lossy.stats()["ailab"]["charged"] == 2  # what the vendor billed, result lost


# -- 8. task deadline ----------------------------------------------------------------------------


@pytest.mark.parametrize("op", [SMILE, SWAP], ids=["perfectcorp", "ailab"])
async def test_a_task_past_its_deadline_fails_task_deadline_and_the_rerun_collects_it(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    op: dict[str, Any],
) -> None:
    emu: RunningEmulator = await emulator_factory(task_seconds=2.5)
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest([op], concurrency=2)
    config = _config(emu.base_url, task_deadline_seconds=0.4)

    first = await _run(manifest, config)
    assert first.code == 1
    assert first.tally() == Counter({(op["op"], "failed", "TASK_DEADLINE"): 2})
    task_ids = {}
    for path in inputs:
        line = first.line(op["op"], path)
        assert line["error"]["kind"] == "retryable" and line["task_id"]
        assert line["task_id"] in line["error"]["message"]
        task_ids[path] = line["task_id"]

    # Still running: the rerun (even with --retry-failed) polls the same task again.
    again = await _run(manifest, config, retry_failed=True)
    assert again.code == 1
    assert again.tally() == Counter({(op["op"], "failed", "TASK_DEADLINE"): 2})
    assert {again.line(op["op"], p)["task_id"] for p in inputs} == set(task_ids.values())
    assert _submits(emu) == _once_each(inputs, [op])

    await anyio.sleep(2.6)  # the tasks finish at the vendor meanwhile
    second = await _run(manifest, config)
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=2)
    for path in inputs:
        line = second.line(op["op"], path)
        assert line["task_id"] == task_ids[path] and Path(line["output"]).is_file()
    assert _submits(emu) == _once_each(inputs, [op])
    assert _charges(emu) == _once_each(inputs, [op])


# -- 8 (no grinding). a vendor that is not there ---------------------------------------------------


async def test_a_vendor_nobody_listens_for_stops_the_run_vendor_unreachable(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    inputs = _inputs(tmp_path, 12)
    manifest = write_manifest([SYNC], max_attempts=5, concurrency=2)
    dead = _dead_url()
    config = _config(dead, network={"unreachable_after_requests": 3})

    first = await _run(manifest, config)
    assert first.code == 3
    aborted = first.report["aborted"]
    assert aborted["code"] == "VENDOR_UNREACHABLE" and aborted["kind"] == "fatal"
    assert dead.removeprefix("http://") in aborted["message"]
    # Stopped after a handful of refused connections, not 12 x 5 attempts.
    sent = first.report["requests"]["ailab"]
    assert sum(sent.values()) <= 3 + 2, sent
    assert {x["status"] for x in first.lines} <= {"failed", "interrupted"}
    assert len(first.lines) < 12 or {x["status"] for x in first.lines} == {"interrupted"}

    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=12)
    assert _charges(emulator) == _once_each(inputs, [SYNC])


async def test_vendor_unreachable_from_the_command_line_names_the_host(
    tmp_path: Path,
    write_manifest: Callable[..., Path],
) -> None:
    _inputs(tmp_path, 4)
    manifest = write_manifest([SYNC], concurrency=1)
    dead = _dead_url()
    cfg = _config_file(
        _config(dead, network={"unreachable_after_requests": 2}), tmp_path / "config.yaml"
    )
    done = await _cli(manifest, cfg, "--quiet")
    stderr = done.stderr.decode()
    assert done.returncode == 3, stderr
    _no_traceback(stderr)
    assert "VENDOR_UNREACHABLE" in stderr and dead.removeprefix("http://") in stderr, stderr


# -- 5. every matched input is accounted for ---------------------------------------------------


async def test_a_content_duplicate_gets_its_own_line_with_the_shared_output(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    (first_copy,) = _inputs(tmp_path, 1)
    second_copy = tmp_path / "in" / "zz-copy.jpg"
    second_copy.write_bytes(first_copy.read_bytes())
    manifest = write_manifest([SYNC])

    for run in range(2):
        outcome = await _run(manifest, _config(emulator.base_url))
        assert outcome.code == 0
        assert len(outcome.lines) == 2
        original, duplicate = (outcome.line(SYNC["op"], p) for p in (first_copy, second_copy))
        assert original["status"] == ("succeeded" if run == 0 else "skipped")
        assert original["duplicate_of"] is None
        assert duplicate["status"] == "skipped"
        assert duplicate["duplicate_of"] == str(first_copy)
        assert duplicate["output"] == original["output"] and Path(original["output"]).is_file()
        assert outcome.report["duplicates"] == 1
        assert outcome.report["counts"] == (
            _counts(succeeded=1, skipped=1) if run == 0 else _counts(skipped=2)
        )
    assert _submits(emulator)["ailab"] == Counter({_sha(first_copy): 1})


def _special_entries(folder: Path) -> dict[str, str]:
    """A FIFO, a socket, a broken symlink, a symlink loop, a link to /dev/null and a
    device, all named *.jpg: name -> the code each must fail with."""
    folder.mkdir(parents=True, exist_ok=True)
    os.mkfifo(folder / "fifo.jpg")
    here = Path.cwd()
    os.chdir(folder)  # AF_UNIX paths are limited to ~108 bytes: bind relatively
    try:
        sock = socket.socket(socket.AF_UNIX)
        sock.bind("socket.jpg")
        sock.close()  # the file stays
    finally:
        os.chdir(here)
    (folder / "broken.jpg").symlink_to(folder / "no-such-file.jpg")
    (folder / "loop.jpg").symlink_to(folder / "loop.jpg")
    (folder / "null.jpg").symlink_to("/dev/null")
    expected = {
        "fifo.jpg": "INPUT_NOT_A_FILE",
        "socket.jpg": "INPUT_NOT_A_FILE",
        "broken.jpg": "INPUT_BROKEN_SYMLINK",
        "loop.jpg": "INPUT_SYMLINK_LOOP",
        "null.jpg": "INPUT_NOT_A_FILE",
    }
    with contextlib.suppress(PermissionError):  # a device node needs root
        os.mknod(folder / "zero.jpg", stat.S_IFCHR | 0o600, os.makedev(1, 5))
        expected["zero.jpg"] = "INPUT_NOT_A_FILE"
    return expected


async def test_fifos_sockets_and_bad_links_get_failed_lines_and_are_carried_over(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    (good,) = _inputs(tmp_path, 1)
    expected = _special_entries(tmp_path / "in")
    manifest = write_manifest([SYNC])

    first = await _run(manifest, _config(emulator.base_url))
    assert first.code == 1
    assert first.report["counts"] == _counts(succeeded=1, failed=len(expected))
    for name, code in expected.items():
        line = first.line(SYNC["op"], tmp_path / "in" / name)
        assert line["status"] == "failed" and line["error"]["code"] == code, line
        assert line["error"]["kind"] == "permanent"
    assert first.line(SYNC["op"], good)["status"] == "succeeded"
    assert _submits(emulator)["ailab"] == Counter({_sha(good): 1})

    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0
    assert second.report["counts"] == _counts(skipped=1, failed_earlier=len(expected))
    for name in expected:
        assert second.line(SYNC["op"], tmp_path / "in" / name)["carried_over"] is True

    cfg = _config_file(_config(emulator.base_url), tmp_path / "config.yaml")
    checked = await anyio.run_process(
        [sys.executable, "-m", "pipeline", "validate", str(manifest), "--config", str(cfg)],
        check=False, env=_env(),
    )  # fmt: skip
    shown = checked.stdout.decode() + checked.stderr.decode()
    _no_traceback(shown)
    assert checked.returncode != 0, shown
    for name in expected:
        assert str(tmp_path / "in" / name) in shown, shown
    assert emulator.stats()["ailab"]["submits"] == 1


async def test_patterns_that_match_nothing_exit_2_naming_them(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    (tmp_path / "share").mkdir()  # an unmounted share: the folder is there, empty
    manifest = write_manifest([SYNC], inputs=["share/**/*.jpg", "share/*.png"])
    cfg = _config_file(_config(emulator.base_url), tmp_path / "config.yaml")
    done = await _cli(manifest, cfg, "--quiet")
    stderr = done.stderr.decode()
    assert done.returncode == 2, stderr
    _no_traceback(stderr)
    assert "share/**/*.jpg" in stderr and "share/*.png" in stderr, stderr
    assert "error: no file matches the input patterns" in stderr, stderr
    assert emulator.stats()["ailab"]["requests"] == 0
    # The library entry point says the same with a UsageError (exit 2), not a group.
    with pytest.raises(UsageError, match=r"share/\*\*/\*\.jpg"):
        await _run(manifest, _config(emulator.base_url))


async def test_upper_case_extensions_match_lower_case_patterns(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    upper = make_portrait(tmp_path / "in" / "IMG_0001.JPG", seed=1, fmt="JPEG")
    mixed = make_portrait(tmp_path / "in" / "Shot.Png", seed=2, fmt="PNG")
    manifest = write_manifest([SYNC])
    outcome = await _run(manifest, _config(emulator.base_url))
    assert outcome.code == 0
    assert outcome.report["counts"] == _counts(succeeded=2)
    for path in (upper, mixed):
        assert Path(outcome.line(SYNC["op"], path)["output"]).is_file()


# -- 10. secrets ---------------------------------------------------------------------------------


def _files_under(folder: Path) -> Iterator[Path]:
    for dirpath, _dirs, names in os.walk(folder):
        for name in names:
            path = Path(dirpath, name)
            if path.is_file() and not path.is_symlink():
                yield path


async def test_keys_never_reach_any_file_or_output_even_with_v(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    ailab_key, pc_key, wrong_key = "sk-AILAB-9f3e7c1d2b", "pc-KEY-51aa0e77c3", "pc-WRONG-8d0c44f1"
    emu: RunningEmulator = await emulator_factory(
        transient_error_rate=0.3, disconnect_rate=0.05, lost_response_rate=0.1, seed=11,
        ailab_api_keys=(ailab_key,), perfectcorp_api_keys=(pc_key,),
    )  # fmt: skip
    _inputs(tmp_path, 6)
    manifest = write_manifest([SYNC, SMILE, SWAP], max_attempts=6, concurrency=4)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    out = tmp_path / "out"
    secrets = [ailab_key, pc_key, wrong_key]

    good = _env(AILAB_API_KEY=ailab_key, PERFECTCORP_API_KEY=pc_key)
    runs = [await _cli(manifest, cfg, "-v", env=good)]
    _inputs(tmp_path, 2, start=6)  # new work for the run with the wrong key
    wrong = _env(AILAB_API_KEY=ailab_key, PERFECTCORP_API_KEY=wrong_key)
    runs.append(await _cli(manifest, cfg, "-v", "--retry-failed", env=wrong))
    runs.append(await _cli(manifest, cfg, "-v", "--log-json", env=good))
    assert runs[1].returncode == 3, runs[1].stderr.decode()
    assert emu.stats()["ailab"]["transient_errors"] > 0
    for done in runs:
        shown = done.stdout + done.stderr
        _no_traceback(shown)
        for secret in secrets:
            assert secret.encode() not in shown, (secret, shown.decode(errors="replace"))
    written = list(_files_under(out))
    assert any(p.name == "journal.sqlite" for p in written)
    for path in written:
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (secret, path)


# -- more hostile paths -------------------------------------------------------------------------


async def test_names_at_the_file_system_limit_and_odd_bytes_are_stored(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    folder = tmp_path / "in"
    names = [
        "a" * 251 + ".jpg",  # 255 bytes: a temporary "<name>.part" would not fit
        "é" * 125 + ".jpg",  # 254 bytes of two-byte characters
        "x.png.jpg",
        "a b.jpg",
        "a_b.jpg",
    ]
    paths = [make_portrait(folder / name, seed=i) for i, name in enumerate(names)]
    odd = os.fsencode(folder) + b"/bad-\xff\xfe.jpg"  # not UTF-8
    with open(odd, "wb") as handle:
        handle.write(make_portrait(tmp_path / "seed.jpg", seed=77).read_bytes())
    manifest = write_manifest([SYNC])

    outcome = await _run(manifest, _config(emulator.base_url))
    assert outcome.code == 0, outcome.report["errors_by_code"]
    assert outcome.report["counts"] == _counts(succeeded=6)
    outputs = [Path(x["output"]) for x in outcome.lines]
    assert len(set(outputs)) == 6 and all(p.is_file() for p in outputs)
    out = (tmp_path / "out").resolve()
    assert all(p.resolve().is_relative_to(out) for p in outputs)
    assert _submits(emulator)["ailab"] == Counter(
        {
            **{_sha(p): 1 for p in paths},
            hashlib.sha256(Path(os.fsdecode(odd)).read_bytes()).hexdigest(): 1,
        }
    )


async def test_planted_links_for_the_lock_and_the_journal_never_touch_their_targets(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    _inputs(tmp_path, 1)
    manifest = write_manifest([SYNC])
    out, outside = tmp_path / "out", tmp_path / "outside"
    out.mkdir()
    outside.mkdir()
    precious = outside / "precious.txt"
    precious.write_text("keep me\n")
    (out / ".pipeline.lock").symlink_to(precious)

    cfg = _config_file(_config(emulator.base_url), tmp_path / "config.yaml")
    done = await _cli(manifest, cfg, "--quiet")
    stderr = done.stderr.decode()
    _no_traceback(stderr)
    assert done.returncode in (2, 3), stderr
    assert ".pipeline.lock" in stderr, stderr
    assert precious.read_text() == "keep me\n"
    assert emulator.stats()["ailab"]["requests"] == 0

    (out / ".pipeline.lock").unlink()
    (out / "journal.sqlite").symlink_to(precious)
    done = await _cli(manifest, cfg, "--quiet")
    stderr = done.stderr.decode()
    _no_traceback(stderr)
    assert done.returncode in (2, 3), stderr
    assert "journal.sqlite" in stderr, stderr
    assert precious.read_text() == "keep me\n"
    assert sorted(p.name for p in outside.iterdir()) == ["precious.txt"]
    assert emulator.stats()["ailab"]["requests"] == 0


async def test_a_sync_send_that_times_out_is_sent_twice_at_most(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # The vendor takes 1.5 s; the client gives up after 0.4 s: the job still ran (and
    # was billed) at the vendor, but the client cannot know.
    slow: RunningEmulator = await emulator_factory(sync_seconds=1.5)
    (source,) = _inputs(tmp_path, 1)
    manifest = write_manifest([SYNC], max_attempts=5)
    config = _config(slow.base_url)
    timeouts = config.timeouts.model_copy(update={"request_seconds": 0.4})
    config = config.model_copy(update={"timeouts": timeouts})

    first = await _run(manifest, config)
    assert first.code == 1
    line = first.line(SYNC["op"], source)
    assert (line["error"]["code"], line["error"]["kind"]) == ("OUTCOME_UNKNOWN", "permanent")
    assert line["possibly_billed"] is True and first.report["possibly_billed"] == 1
    await anyio.sleep(1.6)  # let the vendor finish what it was sent
    assert _submits(slow)["ailab"] == Counter({_sha(source): 2})
    again = await _run(manifest, config)
    assert again.code == 0 and again.report["counts"] == _counts(failed_earlier=1)
    assert _submits(slow)["ailab"] == Counter({_sha(source): 2})


# -- 1, continued: fatal stops and Ctrl-C with tasks in flight -------------------------------------


async def test_rerun_after_a_fatal_stop_with_tasks_in_flight_collects_them_unpaid(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # Three tasks are created; then Perfect Corp refuses the key (401) for the other
    # uploads, while those tasks still run. The emulator, and the tasks, stay. A proxy
    # holds the later uploads until the three tasks exist and swaps their key, so the
    # vendor's own answer is real. (A refused poll: see
    # test_a_fatal_answer_to_a_poll_keeps_the_task_id_and_the_rerun_collects_it.)
    emu: RunningEmulator = await emulator_factory(
        task_seconds=2.0, perfectcorp_api_keys=(PERFECTCORP_KEY,)
    )
    inputs = _inputs(tmp_path, 6)
    manifest = write_manifest([SMILE], concurrency=6)
    uploads = 0

    def is_upload(request: Any) -> bool:
        return bool(request.method == "POST" and "/file/" in request.path)

    async def hold_late_uploads(request: Any) -> None:
        nonlocal uploads
        if is_upload(request):
            uploads += 1
            if uploads > 3:
                await _wait_for(lambda: emu.stats()["perfectcorp"]["submits"] >= 3, "3 tasks")

    def revoke_late_uploads(headers: dict[str, str]) -> None:
        if emu.stats()["perfectcorp"]["submits"] >= 3 and headers["X-Probe-Method"] == "POST":
            headers["Authorization"] = "Bearer revoked-key"

    async with _Proxy(emu.base_url) as proxy:
        proxy.before = hold_late_uploads
        proxy.rewrite = revoke_late_uploads
        config = _config(emu.base_url, proxy.base_url)
        first = await _run(manifest, config)
        assert first.code == 3, first.report["errors_by_code"]
        assert first.report["aborted"]["code"] == "InvalidApiKey"
        assert emu.stats()["perfectcorp"]["submits"] == 3
        kept = [x for x in first.lines if x["task_id"]]
        assert len(kept) == 3, first.lines
        assert {x["status"] for x in kept} == {"interrupted"}

        proxy.before = _no_wait
        proxy.rewrite = lambda headers: None
        second = await _run(manifest, config)
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=6)
    for line in kept:
        assert second.line(SMILE["op"], Path(line["input"]))["task_id"] == line["task_id"]
    assert _submits(emu) == _once_each(inputs, [SMILE])
    assert _charges(emu) == _once_each(inputs, [SMILE])


async def test_rerun_after_every_task_failed_retries_them(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    failing: RunningEmulator = await emulator_factory(task_failure_rate=1.0)
    healthy: RunningEmulator = await emulator_factory()
    inputs = _inputs(tmp_path, 3)
    manifest = write_manifest([SMILE, SWAP], max_attempts=2, concurrency=6)

    first = await _run(manifest, _config(failing.base_url))
    assert first.code == 1
    assert {x["status"] for x in first.lines} == {"failed"}
    assert {x["attempts"] for x in first.lines} == {2}
    assert _charges(failing) == {v: Counter() for v in VENDORS}  # failures are free

    second = await _run(manifest, _config(healthy.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=6)
    assert _charges(healthy) == _once_each(inputs, [SMILE, SWAP])


@pytest.mark.parametrize("outcome", ["task failed", "vendor forgot the task"])
async def test_a_resumed_task_that_failed_is_sent_again_after_its_input_is_read(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    outcome: str,
) -> None:
    # The defect: a rerun resumed a journaled task at its poll, without reading the
    # input; when the vendor said the task failed (or no longer knew it), the retry
    # went straight to the send, which found no payload: INTERNAL_ERROR, the task id
    # dropped, and the row left "submitting", counted as a send of unknown outcome
    # (after two such runs the item ended OUTCOME_UNKNOWN, every send answered).
    if outcome == "task failed":
        first_emu = second_emu = await emulator_factory(task_seconds=1.5, task_failure_rate=1.0)
    else:
        first_emu = await emulator_factory(task_seconds=60.0)
        second_emu = await emulator_factory()
    inputs = _inputs(tmp_path, 3)
    # A Perfect Corp task it no longer knows expired there, and is charged anyway
    # (docs/vendors.md, "Perfect Corp: task lifetimes"): lost, not sent again.
    ops = [SMILE, SWAP] if outcome == "task failed" else [SWAP]
    manifest = write_manifest(ops, max_attempts=3, concurrency=6)
    cfg = _config_file(_config(first_emu.base_url), tmp_path / "config.yaml")
    created = len(inputs) * len(ops)
    await _kill_when(
        manifest, cfg,
        lambda: sum(sum(c.values()) for c in _submits(first_emu).values()) >= created,
        "every task created",
    )  # fmt: skip
    if outcome == "task failed":
        await anyio.sleep(1.6)  # every task has failed at the vendor
        second = await _run(manifest, _config(second_emu.base_url))
        assert second.code == 1, second.report["errors_by_code"]
        codes = {SMILE["op"]: "error_inference", SWAP["op"]: "TASK_FAILED"}
        assert sorted(
            (x["operation"], x["error"]["code"], x["attempts"]) for x in second.lines
        ) == sorted((op["op"], codes[op["op"]], 3) for op in ops for _ in inputs)
        # One task created by the killed run, three by the rerun (attempts are per run).
        once = _once_each(inputs, ops)
        assert _submits(first_emu) == {
            v: Counter({k: 4 * n for k, n in c.items()}) for v, c in once.items()
        }
        assert second.report["possibly_billed_total"] == 0
    else:
        second = await _run(manifest, _config(second_emu.base_url))
        assert second.code == 0, second.report["errors_by_code"]
        assert second.report["counts"] == _counts(succeeded=created)
        assert _charges(second_emu) == _once_each(inputs, ops)
        assert second.report["possibly_billed_total"] == 0
    assert _charges(first_emu) == {v: Counter() for v in VENDORS}  # no task finished there


@pytest.mark.parametrize(
    "signals",
    [
        pytest.param(["SIGTERM"], id="term"),
        pytest.param(["SIGINT"] * 5, id="impatient"),
    ],
)
async def test_sigterm_and_a_second_ctrl_c_still_exit_130_and_the_rerun_pays_once(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    signals: list[str],
) -> None:
    emu: RunningEmulator = await emulator_factory(task_seconds=1.0, sync_seconds=0.3)
    inputs = _inputs(tmp_path, 6)
    manifest = write_manifest(BOTH, concurrency=4)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    out = tmp_path / "out"

    with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
        await _wait_for(lambda: bool(_result_files(out)), "a first result")
        for name in signals:
            proc.send_signal(getattr(signal, name))
            await anyio.sleep(0.05)
        # Bounded only so that a hang fails the test instead of the whole suite.
        stdout, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=12))
    # 130 from the CLI, or a death by SIGINT once the run is over (a shell shows 130).
    assert proc.returncode in (130, -signal.SIGINT), stderr.decode()
    _no_traceback(stdout + stderr)
    first = _read_outcome(out, 130)
    assert {x["status"] for x in first.lines} <= {"succeeded", "interrupted"}

    done = await _cli(manifest, cfg, "--quiet")
    assert done.returncode == 0, done.stderr.decode()
    second = _read_outcome(out, 0)
    assert second.report["counts"]["succeeded"] + second.report["counts"]["skipped"] == 12
    assert _charges(emu) == _once_each(inputs, BOTH)
    assert _submits(emu) == _once_each(inputs, BOTH)


async def test_ctrl_c_during_a_slow_sync_send_keeps_what_it_paid_for(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(sync_seconds=1.0)
    inputs = _inputs(tmp_path, 4)
    manifest = write_manifest([SYNC], concurrency=4)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    out = tmp_path / "out"

    with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
        await _wait_for(lambda: emu.stats()["ailab"]["requests"] >= 4, "four sends on the wire")
        code, stdout, stderr = await _sigint_and_wait(proc)
    assert code == 130, stderr
    _no_traceback(stdout + stderr)
    await anyio.sleep(1.1)  # whatever the vendor was running is done (and billed) now
    billed = _charges(emu)["ailab"]

    done = await _cli(manifest, cfg, "--quiet")
    assert done.returncode == 0, done.stderr.decode()
    second = _read_outcome(out, 0)
    assert second.report["counts"]["succeeded"] + second.report["counts"]["skipped"] == 4
    # What the vendor billed before the stop was kept: nothing is paid twice.
    assert _charges(emu) == _once_each(inputs, [SYNC]), billed
    assert _submits(emu) == _once_each(inputs, [SYNC])


async def test_a_paid_task_result_that_cannot_be_stored_is_fetched_again_not_paid_again(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    inputs = _inputs(tmp_path, 3)
    manifest = write_manifest([SMILE, SWAP], concurrency=6)
    out = tmp_path / "out"
    out.mkdir()
    for folder in ("perfectcorp-ai-smile", "ailab-face-swap"):
        (out / folder).write_bytes(b"in the way")

    first = await _run(manifest, _config(emulator.base_url))
    assert first.code == 1
    assert first.tally() == Counter(
        {(SMILE["op"], "failed", "STORE_FAILED"): 3, (SWAP["op"], "failed", "STORE_FAILED"): 3}
    )
    assert all(x["task_id"] and x["billed"] for x in first.lines)
    assert first.report["paid_not_stored"] == 6

    for folder in ("perfectcorp-ai-smile", "ailab-face-swap"):
        (out / folder).unlink()
    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"] == _counts(succeeded=6)
    for line in first.lines:
        again = second.line(line["operation"], Path(line["input"]))
        assert again["task_id"] == line["task_id"] and Path(again["output"]).is_file()
    assert _submits(emulator) == _once_each(inputs, [SMILE, SWAP])
    assert _charges(emulator) == _once_each(inputs, [SMILE, SWAP])


async def test_the_duplicate_of_a_failed_input_shares_its_outcome(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(permanent_error_rate=1.0)
    (original,) = _inputs(tmp_path, 1)
    copy = tmp_path / "in" / "zz-copy.jpg"
    copy.write_bytes(original.read_bytes())
    manifest = write_manifest([SYNC])
    outcome = await _run(manifest, _config(emu.base_url))
    assert outcome.code == 1
    first, duplicate = (outcome.line(SYNC["op"], p) for p in (original, copy))
    assert first["status"] == "failed" and first["error"]["code"] == "ERROR_NO_FACE_IN_FILE"
    assert duplicate["duplicate_of"] == str(original)
    assert emu.stats()["ailab"]["requests"] == 1  # the copy was not sent
    assert (duplicate["status"], duplicate["error"]) == (first["status"], first["error"])


def _unavailable(retry_after: str) -> Callable[[Any], Any]:
    from aiohttp import web

    def answer(_request: Any) -> Any:
        return web.Response(status=503, text="busy", headers={"Retry-After": retry_after})

    return answer


@pytest.mark.parametrize("retry_after", ["999999999", "Fri, 31 Dec 9999 23:59:59 GMT"])
async def test_a_503_with_a_huge_retry_after_waits_only_the_cap(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    retry_after: str,
) -> None:
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest(BOTH, concurrency=4)
    async with _Proxy(emulator.base_url) as proxy:
        busy = _unavailable(retry_after)
        proxy.intercept = lambda r: busy(r) if proxy.intercepted < 4 else None
        config = _config(proxy.base_url, retry={"retry_after_max_seconds": 0.3})
        outcome = await _run(manifest, config)
    assert proxy.intercepted == 4
    assert outcome.code == 0, outcome.report["errors_by_code"]
    assert outcome.report["counts"] == _counts(succeeded=4)
    assert _charges(emulator) == _once_each(inputs, BOTH)


async def test_ctrl_c_while_a_download_stalls_exits_130_and_keeps_the_paid_task(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(
        download_stall_rate=1.0, download_stall_seconds=30.0
    )
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest([SMILE], concurrency=2)
    config = _config(emu.base_url)
    timeouts = config.timeouts.model_copy(update={"download_seconds": 20.0})
    cfg = _config_file(config.model_copy(update={"timeouts": timeouts}), tmp_path / "c.yaml")
    out = tmp_path / "out"

    with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
        await _wait_for(lambda: emu.stats()["perfectcorp"]["charged"] == 2, "two billed tasks")
        await anyio.sleep(0.3)  # the downloads are stalling now
        code, stdout, stderr = await _sigint_and_wait(proc)
    assert code == 130, stderr
    _no_traceback(stdout + stderr)
    first = _read_outcome(out, code)
    assert Counter(x["status"] for x in first.lines) == Counter(interrupted=2)
    assert all(x["task_id"] for x in first.lines)
    assert _submits(emu) == _once_each(inputs, [SMILE])


def _swap_result_urls(bad: str) -> Callable[[Any, bytes], bytes]:
    """A poll-answer rewriter: every result URL becomes ``bad``."""

    def transform(request: Any, body: bytes) -> bytes:
        if request.method != "GET" or (
            "/task/" not in request.path and "async-task" not in request.path
        ):
            return body
        try:
            doc = json.loads(body)
        except ValueError:
            return body

        def walk(node: Any) -> Any:
            if isinstance(node, dict):
                return {
                    k: bad
                    if k in ("url", "image", "result_url") and isinstance(v, str)
                    else walk(v)
                    for k, v in node.items()
                }
            if isinstance(node, list):
                return [walk(v) for v in node]
            return node

        return json.dumps(walk(doc)).encode()

    return transform


@pytest.mark.parametrize("bad_url", ["ftp://127.0.0.1/r.jpg", "file:///etc/passwd"])
async def test_a_succeeded_task_with_an_unusable_result_url_is_never_submitted_again(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    bad_url: str,
) -> None:
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest([SMILE, SWAP], concurrency=4)
    async with _Proxy(emulator.base_url) as proxy:
        proxy.transform = _swap_result_urls(bad_url)
        config = _config(proxy.base_url)
        first = await _run(manifest, config)
        assert first.code == 1
        assert {x["status"] for x in first.lines} == {"failed"}, first.lines
        assert all(x["task_id"] and x["billed"] for x in first.lines), first.lines
        assert _submits(emulator) == _once_each(inputs, [SMILE, SWAP])
        assert {x["error"]["code"] for x in first.lines} == {"RESULT_LOST"}
        assert {x["error"]["kind"] for x in first.lines} == {"permanent"}
        assert all("paid for" in x["error"]["message"] for x in first.lines)
        assert first.report["paid_lost"] == 4
        # Reported as lost and paid for; a rerun does not submit them on its own, even
        # once the vendor's answers are fine again.
        proxy.transform = lambda request, body: body
        again = await _run(manifest, config)
    assert again.code == 0
    assert again.report["counts"] == _counts(failed_earlier=4)
    assert _submits(emulator) == _once_each(inputs, [SMILE, SWAP])
    assert _charges(emulator) == _once_each(inputs, [SMILE, SWAP])


@pytest.mark.parametrize("what", ["template", "input"])
async def test_a_file_that_vanishes_mid_run_fails_only_its_items_and_the_rerun_sends_it(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    what: str,
) -> None:
    inputs = _inputs(tmp_path, 3)
    manifest = write_manifest([SYNC, SWAP], concurrency=1)
    victim = tmp_path / "template.jpg" if what == "template" else inputs[2]
    saved = victim.read_bytes()
    async with _Proxy(emulator.base_url) as proxy:

        def remove_victim(_request: Any) -> None:
            victim.unlink(missing_ok=True)  # after the run has listed and hashed it

        proxy.intercept = remove_victim
        first = await _run(manifest, _config(proxy.base_url))
    assert first.code == 1
    failed = [x for x in first.lines if x["status"] == "failed"]
    assert failed and {x["error"]["code"] for x in failed} == {"INPUT_MISSING"}
    for line in failed:
        assert victim.name in line["error"]["message"], line["error"]
    assert {x["status"] for x in first.lines} == {"failed", "succeeded"}

    victim.write_bytes(saved)  # back where it was (or moved anywhere the patterns match)
    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    assert second.report["counts"]["failed_earlier"] == 0
    assert _charges(emulator) == _once_each(inputs, [SYNC, SWAP])


async def test_a_vendor_echoing_the_key_in_its_answers_never_gets_it_printed(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(transient_error_rate=0.3, seed=5)
    _inputs(tmp_path, 3)
    manifest = write_manifest([SYNC, SMILE, SWAP], max_attempts=6, concurrency=3)
    secrets = [AILAB_KEY, PERFECTCORP_KEY]

    def echo(request: Any, body: bytes) -> bytes:
        # Each vendor echoes the key it was sent (it knows no other).
        key = AILAB_KEY if request.path.startswith("/api/") else PERFECTCORP_KEY
        try:
            doc = json.loads(body)
        except ValueError:
            return body
        if not isinstance(doc, dict):
            return body
        for field in ("request_id", "requestId", "log_id"):
            doc[field] = f"req-{key}"
        for field in ("error_msg", "message", "error_detail"):
            if isinstance(doc.get(field), str):
                doc[field] += f" (key {key} / Bearer {key})"
        return json.dumps(doc).encode()

    async with _Proxy(emu.base_url) as proxy:
        proxy.transform = echo
        cfg = _config_file(_config(proxy.base_url), tmp_path / "config.yaml")
        runs = [
            await _cli(manifest, cfg, "-v"),
            await _cli(manifest, cfg, "-v", "--log-json", "--retry-failed"),
        ]
    assert emu.stats()["ailab"]["transient_errors"] > 0
    for done in runs:
        shown = done.stdout + done.stderr
        _no_traceback(shown)
        for secret in secrets:
            at = shown.find(secret.encode())
            assert at < 0, (secret, shown[max(0, at - 400) : at + 100].decode(errors="replace"))
    for path in _files_under(tmp_path / "out"):
        data = path.read_bytes()
        for secret in secrets:
            assert secret.encode() not in data, (secret, path)


def _key_echoes(key: str, style: str) -> str:
    """A vendor's error text that carries ``key`` cut, encoded or split."""
    raw = key.encode()
    if style == "cut":  # all but its last character inside the 300-character clip
        return "x" * (288 - len(key)) + "invalid key " + key + " for this account"
    if style == "cut-in-a-word":  # no space before it: cut mid-word
        return "x" * (300 - len(key)) + key + " for this account"
    if style == "hex":
        return f"key {raw.hex()} refused"
    if style == "bearer-base64":
        return "header " + base64.b64encode(b"Bearer " + raw).decode() + " refused"
    raise AssertionError(style)


def _runs(data: bytes, piece: str, run: int = 12) -> list[str]:
    """Every ``run``-character piece of ``piece`` in ``data`` (either case), but those
    the run writes itself: the test keys are not random, and "perfectcorp-" is also
    in the name of every AI Smile result folder."""
    low = data.lower()
    ours = " ".join(str(op["op"]).replace("/", "-") for op in (SYNC, SMILE, SWAP))
    return [
        piece[i : i + run]
        for i in range(len(piece) - run + 1)
        if piece[i : i + run].lower().encode() in low and piece[i : i + run] not in ours
    ]


@pytest.mark.parametrize("style", ["cut", "cut-in-a-word", "hex", "bearer-base64"])
async def test_a_key_echoed_cut_or_encoded_never_reaches_a_file_or_the_terminal(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    style: str,
) -> None:
    # The defect: vendor messages were clipped to 300 characters before the key was
    # looked for, so a key straddling the cut got through as all but its last
    # character (stderr, results.jsonl, report.html, the journal); hex and base64 of
    # "Bearer <key>" were not looked for at all.
    emu: RunningEmulator = await emulator_factory(transient_error_rate=1.0, seed=3)
    _inputs(tmp_path, 2)
    manifest = write_manifest([SYNC, SMILE], max_attempts=2, concurrency=2)

    def echo(request: Any, body: bytes) -> bytes:
        key = AILAB_KEY if request.path.startswith("/api/") else PERFECTCORP_KEY
        try:
            doc = json.loads(body)
        except ValueError:
            return body
        if not isinstance(doc, dict):
            return body
        for field in ("error_msg", "message", "error_message", "error"):
            if isinstance(doc.get(field), str):
                doc[field] = _key_echoes(key, style)
        detail = doc.get("error_detail")
        if isinstance(detail, dict):
            for field in ("message", "code_message"):
                if isinstance(detail.get(field), str):
                    detail[field] = _key_echoes(key, style)
        return json.dumps(doc).encode()

    async with _Proxy(emu.base_url) as proxy:
        proxy.transform = echo
        cfg = _config_file(_config(proxy.base_url), tmp_path / "config.yaml")
        done = await _cli(manifest, cfg, "-v", "--log-json")
    assert (
        emu.stats()["ailab"]["transient_errors"] + emu.stats()["perfectcorp"]["transient_errors"]
        > 0
    )
    shown = done.stdout + done.stderr
    _no_traceback(shown)
    echoed = 0
    for key in (AILAB_KEY, PERFECTCORP_KEY):
        raw = key.encode()
        pieces = {
            "cut": key, "cut-in-a-word": key, "hex": raw.hex(),
            "bearer-base64": base64.b64encode(b"Bearer " + raw).decode()[12:-4],
        }  # fmt: skip
        piece = pieces[style]
        assert _runs(shown, piece) == [], (key, style)
        for path in [*_files_under(tmp_path / "out"), *_files_under(tmp_path / "logs")]:
            assert _runs(path.read_bytes(), piece) == [], (key, style, path)
        echoed += b"***" in shown or b"x" * 200 in shown  # replaced, or cut off whole
    assert echoed  # the vendor's text did reach the terminal, only not the key


async def test_possibly_billed_total_remembers_sends_retried_with_retry_failed(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    lossy: RunningEmulator = await emulator_factory(lost_response_rate=1.0)
    healthy: RunningEmulator = await emulator_factory()
    _inputs(tmp_path, 2)
    manifest = write_manifest([SYNC], max_attempts=5, concurrency=2)
    first = await _run(manifest, _config(lossy.base_url))
    assert first.report["possibly_billed_total"] == 2
    assert lossy.stats()["ailab"]["charged"] == 4  # billed, answers lost
    retried = await _run(manifest, _config(healthy.base_url), retry_failed=True)
    assert retried.code == 0 and retried.report["counts"] == _counts(succeeded=2)
    assert retried.report["possibly_billed_total"] == 2


async def test_a_gateway_answering_502_for_everything_is_vendor_unreachable(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
) -> None:
    from aiohttp import web

    inputs = _inputs(tmp_path, 6)
    manifest = write_manifest([SMILE], max_attempts=5, concurrency=2)
    async with _Proxy(emulator.base_url) as proxy:
        proxy.intercept = lambda r: web.Response(
            status=502, text="<html>Bad Gateway</html>", content_type="text/html"
        )
        config = _config(proxy.base_url, network={"unreachable_after_requests": 4})
        first = await _run(manifest, config)
        assert first.code == 3, first.report["errors_by_code"]
        assert first.report["aborted"]["code"] == "VENDOR_UNREACHABLE"
        assert proxy.intercepted <= 4 + 2, proxy.intercepted  # not 6 items x 5 attempts
        proxy.intercept = lambda request: None
        second = await _run(manifest, config)
    assert second.code == 0, second.report["errors_by_code"]
    assert _charges(emulator) == _once_each(inputs, [SMILE])


async def test_ctrl_c_during_a_long_backoff_exits_130_promptly(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    emu: RunningEmulator = await emulator_factory(transient_error_rate=1.0)
    _inputs(tmp_path, 2)
    manifest = write_manifest(BOTH, concurrency=4)
    config = _config(
        emu.base_url, retry={"backoff_initial_seconds": 60.0, "backoff_max_seconds": 600.0}
    )
    cfg = _config_file(config, tmp_path / "config.yaml")
    with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
        await _wait_for(
            lambda: all(emu.stats()[v]["transient_errors"] >= 2 for v in VENDORS), "errors"
        )
        await anyio.sleep(0.3)  # every item is backing off now (30 s or more)
        code, stdout, stderr = await _sigint_and_wait(proc)
    assert code == 130, stderr
    _no_traceback(stdout + stderr)
    first = _read_outcome(tmp_path / "out", code)
    assert first.report["counts"] == _counts(interrupted=4)


@pytest.mark.parametrize("op", [SMILE, SWAP], ids=["perfectcorp", "ailab"])
async def test_a_fatal_answer_to_a_poll_keeps_the_task_id_and_the_rerun_collects_it(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    op: dict[str, Any],
) -> None:
    # The key is refused from the first poll on (revoked while the task runs): the run
    # stops (exit 3), but the task exists and will be billed, so its id must stay.
    emu: RunningEmulator = await emulator_factory(
        task_seconds=0.3, ailab_api_keys=(AILAB_KEY,), perfectcorp_api_keys=(PERFECTCORP_KEY,)
    )
    (source,) = _inputs(tmp_path, 1)
    manifest = write_manifest([op])
    vendor = VENDOR_OF[op["op"]]
    async with _Proxy(emu.base_url) as proxy:

        def revoke_on_polls(headers: dict[str, str]) -> None:
            if emu.stats()[vendor]["submits"] >= 1:
                for name in list(headers):
                    if name.lower() == "authorization":
                        headers[name] = "Bearer revoked"
                    elif name.lower() == "ailabapi-api-key":
                        headers[name] = "revoked"

        proxy.rewrite = revoke_on_polls
        config = _config(proxy.base_url)
        first = await _run(manifest, config)
        assert first.code == 3
        assert first.report["aborted"]["kind"] == "fatal"
        line = first.line(op["op"], source)
        assert line["task_id"], line  # the task at the vendor is not forgotten

        proxy.rewrite = lambda headers: None
        second = await _run(manifest, config)
    assert second.code == 0, second.report["errors_by_code"]
    assert second.line(op["op"], source)["task_id"] == line["task_id"]
    assert _submits(emu)[vendor] == Counter({_sha(source): 1})
    assert _charges(emu)[vendor] == Counter({_sha(source): 1})


async def test_a_disk_that_fills_during_the_run_stops_it_and_nothing_is_paid_twice(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # Where the first ENOSPC lands depends on timing; three rounds (each its own
    # emulator, inputs and disk) make a pass by luck unlikely.
    for round_ in range(3):
        await _fill_during_a_run(tmp_path / f"r{round_}", emulator_factory, round_)


async def _fill_during_a_run(base: Path, emulator_factory: Callable[..., Any], round_: int) -> None:
    emu: RunningEmulator = await emulator_factory(task_seconds=0.3, sync_seconds=0.1)
    make_portrait(base / "template.jpg", seed=999_999)
    manifest = base / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {"name": "fill", "inputs": ["in/*.jpg"], "operations": BOTH, "output": "out",
             "concurrency": 8}
        )
    )  # fmt: skip
    cfg = _config_file(_config(emu.base_url), base / "config.yaml")
    with tmpfs(base / "out", "3m") as out:
        inputs = _inputs(base, 24, start=100 * round_)
        with _child(_argv(manifest, cfg, "--quiet"), _env()) as proc:
            await _wait_for(lambda: len(_result_files(out)) >= 2, "two results")
            # Filled in one go while the run is frozen: the space its reserve gives
            # back when it meets the full disk is then its own.
            proc.send_signal(signal.SIGSTOP)
            try:
                filler = await anyio.to_thread.run_sync(fill, out, 0)
            finally:
                proc.send_signal(signal.SIGCONT)
            stdout, stderr = await anyio.to_thread.run_sync(lambda: proc.communicate(timeout=15))
        shown = stderr.decode()
        _no_traceback(shown + stdout.decode())
        assert proc.returncode in (0, 3), shown
        if proc.returncode == 3:
            assert "DISK_FULL" in shown, shown
        filler.unlink()
        rerun = await _cli(manifest, cfg, "--quiet")
        assert rerun.returncode == 0, rerun.stderr.decode()
        final = _read_outcome(out, 0)
        assert final.report["counts"]["succeeded"] + final.report["counts"]["skipped"] == 48
    assert _submits(emu) == _once_each(inputs, BOTH), f"round {round_}"
    assert _charges(emu) == _once_each(inputs, BOTH), f"round {round_}"


class _Hog:
    """Fills a file system and keeps it full: any space given back is taken at once."""

    def __init__(self, folder: Path) -> None:
        self.path = folder / "hog.bin"
        self._stop = threading.Event()
        self.thread: threading.Thread | None = None
        self.full = threading.Event()

    def start(self) -> None:
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        self.full.wait(10)

    def _run(self) -> None:
        fd = os.open(self.path, os.O_WRONLY | os.O_CREAT, 0o600)
        try:
            while not self._stop.is_set():
                try:
                    os.write(fd, b"\0" * 4096)
                except OSError:
                    self.full.set()
                    time.sleep(0.0002)
        finally:
            os.close(fd)

    def stop(self) -> None:
        self._stop.set()
        if self.thread is not None:
            self.thread.join(10)
        self.path.unlink(missing_ok=True)


async def test_a_task_id_the_full_journal_cannot_take_is_kept_aside_and_never_paid_twice(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
) -> None:
    # The disk fills while task creates are on the wire and stays full (any space the
    # run gives back, its reserve included, is taken again): the journal cannot take
    # the task ids. They go to the preallocated rescue file; the rerun applies them
    # and polls those tasks instead of creating them again.
    emu: RunningEmulator = await emulator_factory(task_seconds=0.5)
    make_portrait(tmp_path / "template.jpg", seed=999_999)
    manifest = tmp_path / "job.yaml"
    manifest.write_text(
        yaml.safe_dump(
            {"name": "hog", "inputs": ["in/*.jpg"], "operations": [SWAP], "output": "out",
             "concurrency": 4}
        )
    )  # fmt: skip
    inputs = _inputs(tmp_path, 8)
    with tmpfs(tmp_path / "out", "3m") as out:
        hog = _Hog(out)
        try:
            async with _Proxy(emu.base_url) as proxy:

                async def fill_on_first_create(request: Any) -> None:
                    if request.method == "POST" and "face-swap" in request.path and not hog.thread:
                        await anyio.to_thread.run_sync(hog.start)

                proxy.before = fill_on_first_create
                cfg = _config_file(_config(proxy.base_url), tmp_path / "proxied.yaml")
                first = await _cli(manifest, cfg, "--quiet")
        finally:
            hog.stop()
        shown = first.stderr.decode()
        _no_traceback(shown + first.stdout.decode())
        assert first.returncode == 3, shown
        assert "DISK_FULL" in shown, shown
        rescued = read_rescued(out)
        assert rescued, "no task id was kept aside: the case was not reached"
        created = sum(emu.stats()["ailab"]["submits_by_input"].values())
        assert len(rescued) <= created
        direct = _config_file(_config(emu.base_url), tmp_path / "direct.yaml")
        rerun = await _cli(manifest, direct, "--quiet", "--verbose")
        assert rerun.returncode == 0, rerun.stderr.decode()
        assert "recovered" in rerun.stderr.decode()
        final = _read_outcome(out, 0)
        assert final.report["counts"]["succeeded"] + final.report["counts"]["skipped"] == 8
        by_key = {x["key"]: x for x in final.lines}
        for item in rescued:  # polled under the task id kept aside, not created again
            assert by_key[item.key]["task_id"] == item.task_id
    assert _submits(emu) == _once_each(inputs, [SWAP])
    assert _charges(emu) == _once_each(inputs, [SWAP])


async def test_a_short_key_met_by_chance_inside_a_task_id_costs_nothing(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # Task ids are random; a one-letter "key" is inside most of them. Either such a
    # key is refused before anything is sent, or it must not fail paid tasks as
    # "echoing the key" (UNSAFE_TASK_ID: created, billed, and then given up).
    monkeypatch.setenv("PERFECTCORP_API_KEY", "Q")
    inputs = _inputs(tmp_path, 8)
    manifest = write_manifest([SMILE], concurrency=8)
    try:
        outcome = await _run(manifest, _config(emulator.base_url))
    except UsageError:
        assert emulator.stats()["perfectcorp"]["requests"] == 0
        return
    assert outcome.tally() == Counter({(SMILE["op"], "succeeded", None): 8}), outcome.tally()
    assert _charges(emulator) == _once_each(inputs, [SMILE])


# -- a later item mapped to an earlier item's result path ---------------------------------


def _outputs(outcome: Outcome, out: Path) -> dict[tuple[str, str], tuple[str, str]]:
    """(operation, input_rel) -> (status, sha256 of its result file)."""
    return {
        (x["operation"], x["input_rel"]): (x["status"], _sha(out / x["output_rel"]))
        for x in outcome.lines
        if x["output_rel"]
    }


@pytest.mark.parametrize("change", ["renamed, new photo under the old name", "replaced, then back"])
async def test_a_new_photo_under_an_old_name_never_overwrites_the_old_paid_result(
    tmp_path: Path,
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    change: str,
) -> None:
    # The defect: the result path is a function of the name, and a run met a new photo
    # under the name an earlier photo's paid result was stored for: it renamed its own
    # result over it, and both items (the old one skipped at its recorded path) named
    # one file. Replaced and put back, the old photo was "skipped" with the new one's
    # result in its file.
    ops = [SYNC, SWAP]
    old, other = _inputs(tmp_path, 2)
    manifest = write_manifest(ops, concurrency=4)
    out = tmp_path / "out"
    config = _config(emulator.base_url)
    first = await _run(manifest, config)
    assert first.code == 0
    kept = _outputs(first, out)
    original = old.read_bytes()
    new_photo = make_portrait(tmp_path / "new.jpg", seed=500).read_bytes()
    if change == "renamed, new photo under the old name":
        old.rename(old.with_name("moved.jpg"))
    old.write_bytes(new_photo)
    second = await _run(manifest, config)
    assert second.code == 0, second.report["errors_by_code"]
    for op in ops:
        moved = "in/moved.jpg" if change.startswith("renamed") else None
        old_rel = first.line(op["op"], old)["output_rel"]
        new_line = second.line(op["op"], old)
        assert new_line["status"] == "succeeded" and new_line["output_rel"] != old_rel
        assert _sha(out / old_rel) == kept[(op["op"], "in/p000.jpg")][1]  # untouched
        if moved:
            (moved_line,) = [
                x for x in second.lines if x["operation"] == op["op"] and x["input_rel"] == moved
            ]
            assert moved_line["status"] == "skipped" and moved_line["output_rel"] == old_rel
    if change == "replaced, then back":
        old.write_bytes(original)
        third = await _run(manifest, config)
        assert third.code == 0 and third.report["counts"] == _counts(skipped=4)
        assert _outputs(third, out) == {k: ("skipped", sha) for k, (_, sha) in kept.items()}
    files = _result_files(out)
    assert len(files) == len({_sha(f) for f in files}) == 6  # three photos x two operations
    shas = {_sha(p) for p in (tmp_path / "new.jpg", other)} | {hashlib.sha256(original).hexdigest()}
    # Each photo paid once per operation (both AILab's), none twice.
    assert _charges(emulator) == {
        "ailab": Counter(dict.fromkeys(shas, 2)),
        "perfectcorp": Counter(),
    }


async def test_a_template_replaced_under_its_name_gets_results_of_its_own(
    tmp_path: Path, emulator: RunningEmulator, write_manifest: Callable[..., Path]
) -> None:
    # The same with a variant: face-swap's folder is named after the template's file
    # name, and a template replaced by another image under that name mapped its
    # results onto the first template's.
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest([SWAP], concurrency=2)
    out = tmp_path / "out"
    first = await _run(manifest, _config(emulator.base_url))
    assert first.code == 0
    kept = {x["output_rel"]: _sha(out / x["output_rel"]) for x in first.lines}
    make_portrait(tmp_path / "template.jpg", seed=424_242)  # another template, same name
    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0 and second.report["counts"] == _counts(succeeded=2)
    assert {_sha(out / rel) for rel in kept} == set(kept.values())
    assert {x["output_rel"] for x in second.lines}.isdisjoint(kept)
    assert _charges(emulator)["ailab"] == Counter({_sha(p): 2 for p in inputs})


async def test_a_kill_mid_send_never_adopts_another_photos_result_as_its_own(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # The defect: after a kill during a sync send, the rerun adopted any file at the
    # item's result path as the result the killed run wrote but had not journaled,
    # here the result of the photo that had the name before: the new photo reported
    # succeeded with the old one's image, and its own paid result never stored.
    emu: RunningEmulator = await emulator_factory(sync_seconds=3.0)
    (photo,) = _inputs(tmp_path, 1)
    manifest = write_manifest([SYNC], concurrency=1)
    out = tmp_path / "out"
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    first = await _run(manifest, _config(emu.base_url))
    assert first.code == 0
    old_rel = first.lines[0]["output_rel"]
    old_result = _sha(out / old_rel)
    make_portrait(photo, seed=777)  # another photo under the same name
    new_sha = _sha(photo)
    await _kill_when(
        manifest, cfg, lambda: _submits(emu)["ailab"][new_sha] >= 1, "the new photo's send",
        settle=0.0,
    )  # fmt: skip
    third = await _run(manifest, _config(emu.base_url))
    assert third.code == 0, third.report["errors_by_code"]
    (line,) = third.lines
    assert line["status"] == "succeeded" and line["output_rel"] != old_rel
    assert _sha(out / line["output_rel"]) != old_result
    assert _sha(out / old_rel) == old_result
    # Its first send's outcome was unknown (killed mid-send): sent once more, no more.
    assert third.report["possibly_billed_total"] == 1
    assert _submits(emu)["ailab"][new_sha] == 2


@pytest.mark.parametrize("change", ["deleted", "edited", "left out", "template replaced"])
async def test_a_task_of_an_input_the_rerun_does_not_meet_is_still_collected(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
    change: str,
) -> None:
    # The defect: a rerun collected only the tasks of inputs its walk met. A task
    # created for an input deleted, edited or left out of the manifest since was
    # charged at the vendor and its result never fetched; nothing reported it, and
    # `pipeline status` advised a rerun that would never resume it.
    emu: RunningEmulator = await emulator_factory(task_seconds=2.0)
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest([SWAP], concurrency=2)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    out = tmp_path / "out"
    first_shas = [_sha(p) for p in inputs]
    await _kill_when(
        manifest, cfg, lambda: sum(_submits(emu)["ailab"].values()) >= 2, "both tasks created"
    )
    gone = inputs[0]
    if change == "deleted":
        gone.unlink()
    elif change == "edited":
        make_portrait(gone, seed=4242)
    elif change == "left out":
        manifest = write_manifest([SWAP], concurrency=2, inputs=["in/p001.jpg"])
    else:
        make_portrait(tmp_path / "template.jpg", seed=31337)
    second = await _run(manifest, _config(emu.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    for line in second.lines:
        assert line["status"] == "succeeded", line
        assert (out / line["output_rel"]).is_file()
    created_first = Counter(dict.fromkeys(first_shas, 1))
    new = Counter()
    if change == "edited":
        new[_sha(gone)] = 1
    elif change == "template replaced":
        new = Counter(dict.fromkeys(first_shas, 1))
    assert _charges(emu)["ailab"] == created_first + new
    assert _submits(emu)["ailab"] == created_first + new
    # One line per task the killed run created, and one per new item; all kept.
    assert len(second.lines) == 2 + sum(new.values())
    assert len({x["output_rel"] for x in second.lines}) == len(second.lines)
    assert second.report["paid_lost"] == 0
    spent = second.report["credits_spent"]["ailab"]
    assert spent == {"amount": 5 * sum((created_first + new).values()), "unit": "credits"}
    # And the next run has nothing left to collect or send.
    third = await _run(manifest, _config(emu.base_url))
    assert third.code == 0 and third.report["counts"]["succeeded"] == 0
    assert _submits(emu)["ailab"] == created_first + new


async def test_a_collected_task_of_a_deleted_input_that_failed_is_not_sent_again(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # Collect only: the input is not this run's to send (it is gone, or is another
    # photo now), so a task of it that failed at the vendor ends failed, unsent.
    emu: RunningEmulator = await emulator_factory(task_seconds=1.5, task_failure_rate=1.0)
    inputs = _inputs(tmp_path, 2)
    manifest = write_manifest([SWAP], concurrency=2, max_attempts=2)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    await _kill_when(
        manifest, cfg, lambda: sum(_submits(emu)["ailab"].values()) >= 2, "both tasks created"
    )
    gone, kept = inputs
    gone_sha, kept_sha = _sha(gone), _sha(kept)
    gone.unlink()
    second = await _run(manifest, _config(emu.base_url))
    assert second.code == 1
    by_input = {x["input_rel"]: x for x in second.lines}
    assert by_input["in/p000.jpg"]["status"] == "failed"
    assert by_input["in/p000.jpg"]["error"]["code"] == "TASK_FAILED"
    assert by_input["in/p001.jpg"]["status"] == "failed"
    # The deleted input's task: its one submit; the other input sent again twice.
    assert _submits(emu)["ailab"] == Counter({gone_sha: 1, kept_sha: 3})
    assert _charges(emu)["ailab"] == Counter()


async def test_a_retried_resumed_task_never_sends_other_bytes_under_its_key(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    write_manifest: Callable[..., Path],
) -> None:
    # The defect: a resumed task the vendor said failed was sent again after reading
    # the input afresh, with nothing comparing it with what the item's key was hashed
    # from: a photo replaced meanwhile was sent (twice) under the old photo's key.
    emu: RunningEmulator = await emulator_factory(task_seconds=3.0, task_failure_rate=1.0)
    (photo,) = _inputs(tmp_path, 1)
    manifest = write_manifest([SWAP], concurrency=1, max_attempts=3)
    cfg = _config_file(_config(emu.base_url), tmp_path / "config.yaml")
    old_sha = _sha(photo)
    await _kill_when(
        manifest, cfg, lambda: _submits(emu)["ailab"][old_sha] >= 1, "the task created"
    )
    polls_before = emu.stats()["ailab"]["polls"]
    outcome: list[Outcome] = []

    async def rerun() -> None:
        outcome.append(await _run(manifest, _config(emu.base_url)))

    async with anyio.create_task_group() as tg:
        tg.start_soon(rerun)
        # Polled again: the rerun read the photo and resumed its task. Replace it now,
        # before the task fails at the vendor and a new one is sent.
        await _wait_for(lambda: emu.stats()["ailab"]["polls"] > polls_before, "the resumed poll")
        make_portrait(photo, seed=8888)
    new_sha = _sha(photo)
    (second,) = outcome
    (line,) = second.lines
    assert line["status"] == "failed" and line["error"]["code"] == "INPUT_CHANGED", line
    assert line["error"]["kind"] == "retryable"
    assert _submits(emu)["ailab"] == Counter({old_sha: 1})  # the new photo: never sent
    assert new_sha != old_sha


async def test_a_spooled_result_of_an_input_edited_since_is_stored_all_the_same(
    tmp_path: Path, emulator: RunningEmulator, write_manifest: Callable[..., Path]
) -> None:
    # The defect: a paid sync result kept in the journal (its file could not be
    # written) was stored only if a later run met its input again; with the photo
    # edited since, it stayed "paid for, not stored" for good.
    (photo,) = _inputs(tmp_path, 1)
    manifest = write_manifest([SYNC], concurrency=1)
    out = tmp_path / "out"
    blocker = out / SYNC_DIR / SYNC_VARIANT / "in" / "p000.jpg"
    blocker.mkdir(parents=True)  # a folder where the result must go: STORE_FAILED
    first = await _run(manifest, _config(emulator.base_url))
    assert first.lines[0]["error"]["code"] == "STORE_FAILED"
    blocker.rmdir()
    old_sha = _sha(photo)
    make_portrait(photo, seed=9999)
    second = await _run(manifest, _config(emulator.base_url))
    assert second.code == 0, second.report["errors_by_code"]
    assert sorted(x["status"] for x in second.lines) == ["succeeded", "succeeded"]
    outputs = {x["output_rel"] for x in second.lines}
    assert len(outputs) == 2 and all((out / rel).is_file() for rel in outputs)
    assert _charges(emulator)["ailab"] == Counter({old_sha: 1, _sha(photo): 1})
