"""A rerun with (almost) everything done: the bulk paths keep every rule (issue 9).

The rerun settles done items a batch at a time without waiting for each journal
commit, reads batches through a connection of its own and gathers report.html while
writing results.jsonl; these tests shrink the batch to a few items so every one of
those paths meets batch boundaries.
"""

from __future__ import annotations

import errno
import json
import os
import sqlite3
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest

import pipeline.sources as sources
from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.errors import DiskFullError
from pipeline.htmlreport import Collector, _collect, iter_results
from pipeline.journal import _ITEM_COLUMNS, ItemRecord, _record_of
from pipeline.manifest import load_manifest
from pipeline.report import build_reports
from pipeline.sources import UnsettledKeys
from tests.conftest import fast_config, make_portrait

pytestmark = pytest.mark.timeout(90)

OP = [{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}]
HOUR_NS = 3600 * 10**9


async def _run(
    manifest_path: Path, emu: RunningEmulator, code: int = 0
) -> tuple[dict[str, Any], list[Any]]:
    manifest = load_manifest(manifest_path)
    result = await run_job(manifest, fast_config(emu.base_url), RunOptions(quiet=True))
    assert result.exit_code == code, result.report.get("errors_by_code")
    lines = [json.loads(x) for x in (manifest.output / "results.jsonl").read_text().splitlines()]
    return result.report, lines


def _age(path: Path) -> None:
    """Put the file's mtime an hour back, so its stat-cache entry is trusted later."""
    old = time.time_ns() - HOUR_NS
    os.utime(path, ns=(old, old))


async def test_rerun_in_small_batches_keeps_every_rule(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(sources, "BATCH", 3)
    folder = tmp_path / "in"
    folder.mkdir()
    originals = [make_portrait(tmp_path / f"o{i}.jpg", seed=i) for i in range(6)]
    # 12 inputs, 6 contents: each content's copies sit in different batches of 3.
    names = []
    for n in range(12):
        target = folder / f"p{n:02d}.jpg"
        target.write_bytes(originals[n % 6].read_bytes())
        _age(target)
        names.append(target.name)
    manifest = write_manifest(OP, concurrency=4)
    report, lines = await _run(manifest, emulator)
    assert report["counts"]["succeeded"] == 6 and report["counts"]["skipped"] == 6
    assert emulator.stats()["ailab"]["charged"] == 6

    # Before the rerun: one result deleted, one input rewritten in place with the
    # same size and its mtime put back (only ctime moved).
    by_input = {Path(x["input"]).name: x for x in lines if x["duplicate_of"] is None}
    gone = by_input["p01.jpg"]
    Path(gone["output"]).unlink()
    edited = folder / "p02.jpg"
    before = os.stat(edited)
    data = bytearray(edited.read_bytes())
    data[-3] ^= 0xFF  # inside the JPEG's last bytes: same size, new content
    edited.write_bytes(bytes(data))
    os.utime(edited, ns=(before.st_atime_ns, before.st_mtime_ns))
    assert os.stat(edited).st_size == before.st_size

    charged = emulator.stats()["ailab"]["charged"]
    report, lines = await _run(manifest, emulator, code=1)
    # Every input has exactly one line, counted once.
    assert sorted(Path(x["input"]).name for x in lines) == names
    assert report["counts"]["total"] == 12
    # The edited input is redone, and only it is sent; the edited file's old content
    # is still p08's, now carried by p08 alone. The paid result whose file is gone is
    # not counted as skipped: it is lost (--retry-failed pays for it again), and so is
    # its duplicate p07.
    assert emulator.stats()["ailab"]["charged"] == charged + 1
    statuses = {Path(x["input"]).name: x["status"] for x in lines}
    assert statuses["p02.jpg"] == "succeeded"
    assert statuses["p01.jpg"] == statuses["p07.jpg"] == "failed"
    assert report["errors_by_code"] == {"RESULT_LOST": 1}  # by item: p07 sent nothing
    assert Counter(statuses.values()) == {"succeeded": 1, "failed": 2, "skipped": 9}
    for line in lines:
        if line["status"] in ("succeeded", "skipped"):
            assert Path(line["output"]).is_file()
    # Content duplicates are still recorded, never sent twice: each content but the
    # edited one has two inputs, one of them a duplicate (p07 shares p01's redo).
    dups = sorted(Path(x["input"]).name for x in lines if x["duplicate_of"] is not None)
    assert dups == ["p06.jpg", "p07.jpg", "p09.jpg", "p10.jpg", "p11.jpg"]
    out = load_manifest(manifest).output
    with sqlite3.connect(out / "journal.sqlite") as conn:
        run_id = conn.execute("SELECT MAX(id) FROM runs").fetchone()[0]
        recorded = conn.execute("SELECT COUNT(*) FROM duplicates WHERE run_id = ?", (run_id,))
        assert recorded.fetchone()[0] == 5
    assert report["duplicates"] == 5

    # report.html's figures, gathered while results.jsonl was written, are the ones
    # read back from the file.
    collector = Collector(out)
    build_reports(out, collector=collector)
    assert collector.got == _collect(iter_results(out / "results.jsonl"), out, 200)
    assert collector.got.lines == 12 and collector.got.with_result == 6


def test_unsettled_keys_are_held_until_a_batch_read_after_the_commit() -> None:
    held = UnsettledKeys()
    held.next_batch()  # batch 1 handled: its settlement write starts
    entry = held.add({"k1"})
    held.next_batch()  # batch 2 (read before the commit)
    assert held.holds("k1")
    held.committed(entry)  # committed while batch 2 is current: batch 3 may predate it
    held.next_batch()
    assert held.holds("k1")
    held.next_batch()  # batch 4 was read after the commit
    assert not held.holds("k1") and not held.holds("k2")


def test_a_fast_built_record_equals_the_dataclass(tmp_path: Path) -> None:
    row = (
        "k", "ailab/emotion-editor", "v", "{}", "/in/a.jpg", "a.jpg", "succeeded", None, 1,
        0, "out/a.jpg", None, None, None, None, 3, "succeeded", 3, None, 1.5, 2.5, 0, 3,
        None, 0,
    )  # fmt: skip
    assert len(row) == len(_ITEM_COLUMNS)
    rec = _record_of(row)
    assert rec == ItemRecord(*row) and hash(rec) == hash(ItemRecord(*row))
    with pytest.raises(AttributeError):
        rec.status = "failed"  # type: ignore[misc]


def test_the_state_read_with_a_batch_equals_the_dataclass_and_resumes_as_the_full_row(
    tmp_path: Path,
) -> None:
    # item_states builds ItemState rows without __init__ (the rerun's hot path); each
    # must equal the dataclass built the usual way, and give the snapshot the full
    # row gives, whatever the row holds.
    import sqlite3

    from pipeline.journal import ItemState, item_records, item_states

    conn = sqlite3.connect(":memory:")
    conn.execute(f"CREATE TABLE items ({', '.join(_ITEM_COLUMNS)})")
    rows = [
        ("k1", "ailab/face-swap", "v", "{}", "/in/a.jpg", "a.jpg", "submitted", "T-1", 2,
         3, None, None, None, None, None, 4, None, None, 1.0, None, 2.0, 1, None, None, 1),
        ("k2", "ailab/face-swap", "v", "{}", "/in/b.jpg", "b.jpg", "failed", None, 4, 0,
         None, "E", "bad input", "weird-kind", '["x"]', 2, "failed", None, None, 3.0, 4.0,
         0, None, 0.2, 0),
        ("k3", "ailab/emotion-editor", "v", "{}", "/in/c.jpg", "c.jpg", "succeeded", None,
         1, 0, "out/c.jpg", None, None, None, None, 3, "succeeded", 3, None, 1.5, 2.5, 0,
         3, None, 0),
    ]  # fmt: skip
    conn.executemany(f"INSERT INTO items VALUES ({', '.join('?' * len(_ITEM_COLUMNS))})", rows)
    keys = ["k1", "k2", "k3", "missing"]
    states, records = item_states(conn, keys), item_records(conn, keys)
    assert set(states) == set(records) == {"k1", "k2", "k3"}
    for key, state in states.items():
        fields = {name: getattr(records[key], name) for name in ItemState.__dataclass_fields__}
        usual = ItemState(**fields)
        assert state == usual and hash(state) == hash(usual) and repr(state) == repr(usual)
        assert vars(state) == fields  # exactly the 12 fields
        for spool in (False, True):
            assert state.snapshot(has_spool=spool) == records[key].snapshot(has_spool=spool)
        with pytest.raises(AttributeError):
            state.status = "failed"  # type: ignore[misc]
    conn.close()


async def test_the_wall_time_in_report_json_covers_every_report(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """report.json, written last, times the run up to its own writing: report.html
    and the archived copies included, however long they take."""
    import pipeline.runner as runner

    folder = tmp_path / "in"
    folder.mkdir()
    for i in range(3):
        make_portrait(folder / f"p{i}.jpg", seed=i)
    html_done: list[float] = []
    real_write_html = runner._write_html

    def slow_write_html(*args: Any, **kwargs: Any) -> None:
        real_write_html(*args, **kwargs)
        time.sleep(0.3)  # a page that takes long to write
        html_done.append(time.time())

    monkeypatch.setattr(runner, "_write_html", slow_write_html)
    manifest = write_manifest(OP, concurrency=2)
    for _ in range(2):  # a first run, then a rerun of done items
        report, _ = await _run(manifest, emulator)
        out = load_manifest(manifest).output
        on_disk = json.loads((out / "report.json").read_text())
        assert on_disk == report
        assert report["started_at"] + report["wall_time_seconds"] >= html_done[-1] - 0.001
        assert report["report_seconds"] >= 0.3
        archived = json.loads((out / "reports" / f"run-{report['run_id']}.json").read_text())
        assert archived == on_disk
    assert emulator.stats()["ailab"]["charged"] == 3


@pytest.mark.parametrize("errno_code", [errno.ENOSPC, errno.EISDIR])
async def test_a_report_json_that_cannot_be_written_leaves_the_run_recorded_as_exit_3(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    errno_code: int,
) -> None:
    """report.json is written last; when it can't be (a full disk, a folder in its
    place), the run stops with exit 3 and its journal record says exit 3 too, so
    ``pipeline status`` and a later ``pipeline report`` tell what the run told."""
    import pipeline.runner as runner

    make_portrait(tmp_path / "in" / "p0.jpg", seed=0)
    real_write = runner.write_report_json

    def refuse(output: Path, report: dict[str, Any]) -> None:
        raise OSError(errno_code, os.strerror(errno_code), str(output / "report.json"))

    monkeypatch.setattr(runner, "write_report_json", refuse)
    manifest = write_manifest(OP, concurrency=1)
    expected: type[BaseException] = DiskFullError if errno_code == errno.ENOSPC else OSError
    with pytest.raises(expected) as caught:
        await run_job(
            load_manifest(manifest), fast_config(emulator.base_url), RunOptions(quiet=True)
        )
    if errno_code == errno.ENOSPC:
        assert "report.json could not be written" in str(caught.value)
    out = load_manifest(manifest).output
    with sqlite3.connect(out / "journal.sqlite") as conn:
        code, stats = conn.execute("SELECT exit_code, stats FROM runs").fetchone()
    assert code == 3
    aborted = json.loads(stats)["aborted"]
    assert (aborted or {}).get("code") == ("DISK_FULL" if errno_code == errno.ENOSPC else None)
    monkeypatch.setattr(runner, "write_report_json", real_write)
    report = build_reports(out)  # what `pipeline report` writes once there is room
    assert report["exit_code"] == 3
    assert report["aborted"] == aborted
    assert report["counts"]["succeeded"] == 1
    assert emulator.stats()["ailab"]["charged"] == 1


async def _run_then_rerun_in_a_process(
    script_text: str, manifest: Path, emulator: RunningEmulator, tmp_path: Path
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Run ``script_text`` (argv: manifest, vendor URL; prints one JSON line last) in
    a process of its own twice, a first run then a rerun; both JSON lines."""
    script = tmp_path / "run_in_a_process.py"
    script.write_text(script_text)
    seen = []
    for _ in range(2):
        done = await anyio.run_process(
            [sys.executable, str(script), str(manifest), emulator.base_url],
            check=False,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
        )
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        seen.append(json.loads(done.stdout.decode().splitlines()[-1]))
    return seen[0], seen[1]


_WHO_IMPORTS = """
import importlib.abc, json, sys, threading
import anyio
from pathlib import Path

class Watch(importlib.abc.MetaPathFinder):
    def __init__(self):
        self.by = None
    def find_spec(self, name, path=None, target=None):
        if name == "simplejpeg" and self.by is None:
            self.by = threading.current_thread().name
        return None

watch = Watch()
sys.meta_path.insert(0, watch)
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import fast_config

result = anyio.run(
    run_job, load_manifest(Path(sys.argv[1])), fast_config(sys.argv[2]), RunOptions(quiet=True)
)
print(json.dumps({"code": result.exit_code, "counts": result.report["counts"], "by": watch.by}))
"""


async def test_the_strict_decoder_loads_beside_the_first_send_and_never_on_a_rerun(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """simplejpeg (with numpy, about 70 ms) is imported in a thread of its own once a
    run sends (not on the event loop at the first result check), and a rerun of done
    items never imports it."""
    for i in range(3):
        make_portrait(tmp_path / "in" / f"p{i}.jpg", seed=i)
    manifest = write_manifest(OP, concurrency=2)
    first, rerun = await _run_then_rerun_in_a_process(_WHO_IMPORTS, manifest, emulator, tmp_path)
    assert first["counts"]["succeeded"] == 3 and first["by"] == "pipeline-decoder-warm-up"
    assert rerun["counts"]["skipped"] == 3 and rerun["by"] is None
    assert emulator.stats()["ailab"]["charged"] == 3


async def test_a_first_run_sends_before_it_has_read_every_input_of_a_full_batch(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Batches start small (sources.FIRST_BATCH) and grow: the first billable send
    waits for 16 inputs to be read and hashed, not 512 (with 3 MB photos, 1.5 GB)."""
    for i in range(100):
        make_portrait(tmp_path / "in" / f"p{i:03d}.jpg", seed=i)
    hashed: list[str] = []
    real_hash = sources.hash_file_checked

    def counting(path: Any, *args: Any, **kwargs: Any) -> Any:
        hashed.append(str(path))
        return real_hash(path, *args, **kwargs)

    monkeypatch.setattr(sources, "hash_file_checked", counting)
    at_first_send: list[int] = []
    manifest = write_manifest(OP, concurrency=1)
    from pipeline.providers import client as vendor_client

    real_billable = vendor_client.VendorClient._billable

    async def watching(self: Any, *args: Any, **kwargs: Any) -> Any:
        if not at_first_send:  # the first billable send: how many inputs were read
            at_first_send.append(len(hashed))
        return await real_billable(self, *args, **kwargs)

    monkeypatch.setattr(vendor_client.VendorClient, "_billable", watching)
    report, _ = await _run(manifest, emulator)
    assert report["counts"]["succeeded"] == 100 and len(hashed) == 100
    assert at_first_send == [16]  # sources.FIRST_BATCH
    assert emulator.stats()["ailab"]["charged"] == 100


_NO_DECODER = """
import json, logging, sys
sys.modules["simplejpeg"] = None  # a broken install: the import fails
import anyio
from pathlib import Path
from pipeline.engine import RunOptions, run_job
from pipeline.manifest import load_manifest
from tests.conftest import fast_config

seen = []
class Keep(logging.Handler):
    def emit(self, record):
        seen.append(record.getMessage())
logging.getLogger("pipeline").addHandler(Keep())
result = anyio.run(
    run_job, load_manifest(Path(sys.argv[1])), fast_config(sys.argv[2]), RunOptions(quiet=True)
)
print(json.dumps({"code": result.exit_code, "counts": result.report["counts"], "logged": seen}))
"""


async def test_without_the_strict_decoder_paid_results_are_kept_not_paid_twice(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
) -> None:
    """simplejpeg that cannot be imported (a broken install) must not fail results the
    vendor billed (a rerun would pay for them again): JPEGs are checked by Pillow, and
    the log says so once."""
    for i in range(3):
        make_portrait(tmp_path / "in" / f"p{i}.jpg", seed=i)
    manifest = write_manifest(OP, concurrency=2)
    first, rerun = await _run_then_rerun_in_a_process(_NO_DECODER, manifest, emulator, tmp_path)
    assert first["code"] == 0 and first["counts"]["succeeded"] == 3
    warnings = [m for m in first["logged"] if "simplejpeg" in m]
    assert len(warnings) == 1 and "checked by Pillow only" in warnings[0]
    assert rerun["counts"]["skipped"] == 3
    assert emulator.stats()["ailab"]["charged"] == 3


async def test_an_archived_report_that_cannot_be_written_fails_nothing(
    emulator: RunningEmulator,
    write_manifest: Callable[..., Path],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """reports/run-<id>.json, like report.html, is a copy: when it can't be written
    the run ends as it would have (report.json written, its exit code recorded)."""
    import pipeline.runner as runner

    make_portrait(tmp_path / "in" / "p0.jpg", seed=0)

    def refuse(output: Path, report: dict[str, Any]) -> None:
        raise OSError(errno.EACCES, "Permission denied", str(output / "reports"))

    monkeypatch.setattr(runner, "archive_report_json", refuse)
    report, _ = await _run(write_manifest(OP, concurrency=1), emulator)
    out = tmp_path / "out"
    assert json.loads((out / "report.json").read_text()) == report
    assert not (out / "reports" / f"run-{report['run_id']}.json").exists()
    assert any("could not write" in r.getMessage() for r in caplog.records)
    with sqlite3.connect(out / "journal.sqlite") as conn:
        assert conn.execute("SELECT exit_code FROM runs").fetchone()[0] == 0
