"""ResultFolders: reusing open folders never writes through a planted link or into a
folder that no longer sits at its path.

A hypothesis state machine interleaves result writes with hostile changes to the
output tree (a folder swapped for a symlink to a folder outside, a folder removed or
moved away, a symlink or a folder planted at a result's name) and checks after every
step: a write that returned put its bytes at exactly ``root/relpath`` with no link on
the way; one that was refused raised the path errors; nothing ever landed outside.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import hypothesis.strategies as st
import pytest
from hypothesis import HealthCheck, settings
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from pipeline.outputs import (
    FileWriteError,
    ResultFolders,
    UnsafePathError,
    write_result,
)

FOLDERS = ["a", "a/b", "c/d/e"]
NAMES = ["x.jpg", "y.png"]


def _no_link_below(root: Path, rel: str) -> bool:
    current = root
    for part in rel.split("/"):
        current = current / part
        if current.is_symlink():
            return False
    return True


class HostileTree(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.base = Path(tempfile.mkdtemp(prefix="rf-"))
        self.root = self.base / "out"
        self.root.mkdir()
        self.outside = self.base / "outside"
        self.outside.mkdir()
        self.folders = ResultFolders(self.root)
        self.written: dict[str, bytes] = {}  # relpath -> the bytes its last write put there
        self.counter = 0

    def teardown(self) -> None:
        self.folders.close()
        shutil.rmtree(self.base, ignore_errors=True)

    @rule(folder=st.sampled_from(FOLDERS), name=st.sampled_from(NAMES))
    def write(self, folder: str, name: str) -> None:
        rel = f"{folder}/{name}"
        self.counter += 1
        data = f"result {self.counter}".encode()
        try:
            path = write_result(self.root, rel, data, folders=self.folders)
        except (UnsafePathError, FileWriteError):
            # Refused: something hostile is on the way; nothing may have been written.
            assert not _no_link_below(self.root, rel) or self._blocked(rel), rel
            return
        assert path.name == name
        target = self.root / rel
        assert _no_link_below(self.root, rel), f"{rel}: written through a link"
        assert target.read_bytes() == data, f"{rel}: the bytes are not at the path"
        self.written[rel] = data

    def _blocked(self, rel: str) -> bool:
        """A folder or file in the way (not a link): the write may be refused."""
        current = self.root
        parts = rel.split("/")
        for i, part in enumerate(parts):
            current = current / part
            last = i == len(parts) - 1
            if os.path.lexists(current) and (current.is_dir() if last else not current.is_dir()):
                return True
        return False

    @rule(folder=st.sampled_from(FOLDERS))
    def swap_folder_for_link(self, folder: str) -> None:
        path = self.root / folder
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
            path.symlink_to(self.outside, target_is_directory=True)
            self._forget(folder)

    @rule(folder=st.sampled_from(FOLDERS))
    def remove_folder(self, folder: str) -> None:
        path = self.root / folder
        if path.is_symlink():
            path.unlink()
        elif path.is_dir():
            shutil.rmtree(path)
        self._forget(folder)

    @rule(folder=st.sampled_from(FOLDERS))
    def move_folder_away(self, folder: str) -> None:
        path = self.root / folder
        if path.is_dir() and not path.is_symlink():
            self.counter += 1
            os.rename(path, self.base / f"moved-{self.counter}")
            self._forget(folder)

    @rule(folder=st.sampled_from(FOLDERS), name=st.sampled_from(NAMES), as_dir=st.booleans())
    def plant_at_name(self, folder: str, name: str, as_dir: bool) -> None:
        path = self.root / folder / name
        if not path.parent.is_dir() or path.parent.is_symlink() or os.path.lexists(path):
            return
        if as_dir:
            path.mkdir()
        else:
            path.symlink_to(self.outside / "planted.jpg")
        self.written.pop(f"{folder}/{name}", None)

    def _forget(self, folder: str) -> None:
        for rel in list(self.written):
            if rel.startswith(folder + "/"):
                del self.written[rel]

    @invariant()
    def nothing_outside(self) -> None:
        assert list(self.outside.iterdir()) == [], "a result landed outside the output folder"

    @invariant()
    def written_results_stay(self) -> None:
        for rel, data in self.written.items():
            assert (self.root / rel).read_bytes() == data, rel

    @invariant()
    def no_temporaries_left(self) -> None:
        assert not [p for p in self.root.rglob("*.part")], "a temporary was left behind"


HostileTree.TestCase.settings = settings(
    max_examples=150,
    stateful_step_count=30,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
TestHostileTree = pytest.mark.timeout(120)(HostileTree.TestCase)


def test_a_reused_folder_swapped_for_a_link_is_refused(tmp_path: Path) -> None:
    root, outside = tmp_path / "out", tmp_path / "outside"
    outside.mkdir()
    folders = ResultFolders(root)
    try:
        write_result(root, "op/v/a.jpg", b"one", folders=folders)  # opens and keeps op/v
        shutil.rmtree(root / "op" / "v")
        (root / "op" / "v").symlink_to(outside, target_is_directory=True)
        with pytest.raises(UnsafePathError):
            write_result(root, "op/v/b.jpg", b"two", folders=folders)
        assert list(outside.iterdir()) == []
    finally:
        folders.close()


def test_a_reused_folder_moved_away_gets_the_result_at_its_path(tmp_path: Path) -> None:
    root = tmp_path / "out"
    folders = ResultFolders(root)
    try:
        write_result(root, "op/v/a.jpg", b"one", folders=folders)
        os.rename(root / "op" / "v", tmp_path / "moved")
        write_result(root, "op/v/b.jpg", b"two", folders=folders)
        assert (root / "op" / "v" / "b.jpg").read_bytes() == b"two"
        assert not (tmp_path / "moved" / "b.jpg").exists()
    finally:
        folders.close()


def test_descriptors_are_bounded_and_closed(tmp_path: Path) -> None:
    root = tmp_path / "out"
    folders = ResultFolders(root)
    before = len(os.listdir("/proc/self/fd"))
    for i in range(ResultFolders.MAX_OPEN * 2):
        write_result(root, f"op/f{i}/a.jpg", b"x", folders=folders)
    assert len(os.listdir("/proc/self/fd")) - before <= ResultFolders.MAX_OPEN
    folders.close()
    assert len(os.listdir("/proc/self/fd")) <= before
