"""The rescue file: task ids written into preallocated blocks, read back by the next run."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import given, settings

from pipeline.errors import JournalError
from pipeline.rescue import RESCUE_BYTES, RESCUE_NAME, Rescued, RescueLog, read_rescued

_ids = st.text(alphabet="0123456789abcdef-", min_size=1, max_size=64)


@settings(max_examples=60, deadline=None)
@given(pairs=st.lists(st.tuples(_ids, _ids), max_size=40), cut=st.integers(0, 200))
def test_what_was_written_is_read_back_and_a_torn_tail_is_skipped(
    pairs: list[tuple[str, str]], cut: int
) -> None:
    folder = Path(tempfile.mkdtemp(prefix="rescue-"))
    log = RescueLog(folder)
    log.open()
    try:
        for key, task in pairs:
            assert log.add(key, task)
        path = folder / RESCUE_NAME
        assert path.stat().st_size == RESCUE_BYTES  # allocated up front
        # Every pair written is there in order; a pair repeated back to back is
        # written once (each later change of an item carries the same task id).
        expected: list[Rescued] = []
        last: dict[str, str] = {}
        for key, task in pairs:
            if last.get(key) != task:
                expected.append(Rescued(key, task))
            last[key] = task
        got = read_rescued(folder)
        assert got == expected
        # A crash mid-write leaves a cut last line: it is skipped, the others kept.
        data = path.read_bytes().split(b"\0", 1)[0]
        if data:
            torn = max(0, len(data) - 2 - cut % len(data))  # the closing brace cut too
            with open(path, "r+b") as fh:
                fh.seek(torn)
                fh.write(b"\0" * (len(data) - torn))
            # Records cut anywhere before their closing brace are lost, the rest kept.
            whole = sum(1 for line in data[:torn].splitlines() if line.endswith(b"}"))
            assert read_rescued(folder) == expected[:whole]
    finally:
        log.close()
        shutil.rmtree(folder, ignore_errors=True)


def test_a_full_file_refuses_and_an_unused_one_is_removed(tmp_path: Path) -> None:
    log = RescueLog(tmp_path)
    log.open()
    n = 0
    while log.add(f"key-{n:08d}", "t" * 40):
        n += 1
    assert 0 < n * 60 < RESCUE_BYTES + 200  # refused only once the blocks are used up
    log.close()
    assert len(read_rescued(tmp_path)) == n
    unused = RescueLog(tmp_path / "b")
    (tmp_path / "b").mkdir()
    unused.open()
    unused.close()
    assert not (tmp_path / "b" / RESCUE_NAME).exists()


def test_a_planted_symlink_is_not_followed(tmp_path: Path) -> None:
    target = tmp_path / "elsewhere"
    target.write_text('{"key": "k", "task_id": "t"}\n')
    (tmp_path / RESCUE_NAME).symlink_to(target)
    # Refused (one line, exit 2), as the journal and the lock file refuse a link;
    # never read through (tests/unit/test_rescue_planted.py has the run).
    with pytest.raises(JournalError, match="is a symbolic link; refusing to follow it"):
        read_rescued(tmp_path)
    log = RescueLog(tmp_path)
    log.open()  # replaces the link with its own file
    assert log.add("k2", "t2")
    log.close()
    assert target.read_text() == '{"key": "k", "task_id": "t"}\n'
    assert not (tmp_path / RESCUE_NAME).is_symlink()
