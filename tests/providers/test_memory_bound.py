"""Peak memory against a vendor that sends the worst it can, at concurrency 64.

The impostor runs in a process of its own; a child process (``_rss_child.py``) makes
64 simultaneous calls per phase with the default settings and reports its own peak
RSS from ``getrusage``. Every phase must also end with the exact expected outcome.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
LIMIT_MB = 300

# call:kind:concurrency -> the one outcome every call of the phase must end with.
PLAN = {
    "sync:huge_body:64": "RESULT_NOT_IMAGE",  # 200 MB answers: billed, over the cap
    "sync:gzip_bomb:64": "RESULT_NOT_IMAGE",  # 512 MB once inflated
    "sync:near_cap_valid:16": "ok",  # legit, ~22 MB of base64: as heavy as allowed
    "download:gzip_bomb:64": "RESULT_NOT_IMAGE",
    "download_to:huge_body:64": "RESULT_NOT_IMAGE",
    "poll:huge_poll:64": "RESPONSE_TOO_LARGE",
}


@pytest.fixture
def impostor_port(tmp_path: Path) -> Iterator[int]:
    port_file = tmp_path / "port"
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.providers.impostor", str(port_file)], cwd=ROOT
    )
    try:
        deadline = time.monotonic() + 30
        while not port_file.exists() or not port_file.read_text().strip():
            assert proc.poll() is None, "the impostor died"
            assert time.monotonic() < deadline, "the impostor did not start"
            time.sleep(0.05)
        yield int(port_file.read_text())
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.mark.timeout(180)
def test_peak_rss_stays_bounded_at_concurrency_64(impostor_port: int) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    done = subprocess.run(
        [sys.executable, "-m", "tests.providers._rss_child", str(impostor_port), *PLAN],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=170,
        check=False,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    for phase, outcome in PLAN.items():
        call, kind, n = phase.split(":")
        assert report["outcomes"][f"{call}:{kind}"] == {outcome: int(n)}, phase
    assert report["peak_rss_mb"] < LIMIT_MB, report
