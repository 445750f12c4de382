"""Input discovery: patterns, order, dedupe, hidden files, exclusion, relpath safety."""

from __future__ import annotations

import os
import types
from collections.abc import Iterable
from pathlib import Path, PurePosixPath

import pytest

from pipeline.inputs import count_inputs, input_relpath, iter_inputs


def make(root: Path, *names: str) -> None:
    for name in names:
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")


def rel(base: Path, paths: Iterable[Path]) -> list[str]:
    return [os.path.relpath(p, base).replace(os.sep, "/") for p in paths]


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    base = tmp_path / "job"
    make(
        base,
        "top.jpg",
        "s/1.jpg",
        "s/2.png",
        "s/b.JPG",
        "s/a/3.jpg",
        "s/a/b/4.jpg",
        "s/a/b/c/5.jpg",
        "s/.hid/6.jpg",
        "s/.7.jpg",
        "s/a/notes.txt",
        "out/8.jpg",
    )
    return base


def test_star_star_recursive_sorted_depth_first(tree: Path) -> None:
    got = list(iter_inputs(tree, ["s/**/*.jpg"]))
    assert rel(tree, got) == ["s/1.jpg", "s/a/3.jpg", "s/a/b/4.jpg", "s/a/b/c/5.jpg"]
    assert all(p.is_absolute() for p in got)


def test_single_star_does_not_cross_directories(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/*.jpg"])) == ["s/1.jpg"]
    assert rel(tree, iter_inputs(tree, ["*/*/*.jpg"])) == ["s/a/3.jpg"]


def test_question_mark_and_brackets(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/?.*"])) == ["s/1.jpg", "s/2.png", "s/b.JPG"]
    assert rel(tree, iter_inputs(tree, ["s/[12].*"])) == ["s/1.jpg", "s/2.png"]
    assert rel(tree, iter_inputs(tree, ["s/[!1].*"])) == ["s/2.png", "s/b.JPG"]


def test_matching_is_case_sensitive(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/*.JPG"])) == ["s/b.JPG"]


def test_star_star_in_the_middle_and_repeated(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/**/b/**/*.jpg"])) == ["s/a/b/4.jpg", "s/a/b/c/5.jpg"]
    # "**/**" is the same as "**" and yields nothing twice.
    assert rel(tree, iter_inputs(tree, ["s/**/**/*.jpg"])) == rel(
        tree, iter_inputs(tree, ["s/**/*.jpg"])
    )


def test_literal_path(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/a/3.jpg"])) == ["s/a/3.jpg"]
    assert list(iter_inputs(tree, ["s/a/missing.jpg"])) == []
    assert list(iter_inputs(tree, ["s/a"])) == []  # a folder is not a file
    assert list(iter_inputs(tree, ["nowhere/**/*.jpg"])) == []


def test_absolute_pattern(tree: Path, tmp_path: Path) -> None:
    pattern = str(tree / "s" / "a" / "**" / "*.jpg")
    got = list(iter_inputs(tmp_path / "elsewhere", [pattern]))
    assert rel(tree, got) == ["s/a/3.jpg", "s/a/b/4.jpg", "s/a/b/c/5.jpg"]


def test_dotdot_in_pattern(tmp_path: Path) -> None:
    make(tmp_path, "shared/x/1.jpg", "jobs/j.yaml")
    got = list(iter_inputs(tmp_path / "jobs", ["../shared/**/*.jpg"]))
    assert got == [tmp_path / "shared" / "x" / "1.jpg"]  # normalised, no ".."


def test_hidden_files_and_dirs_are_skipped_unless_named(tree: Path) -> None:
    everything = rel(tree, iter_inputs(tree, ["**/*"]))
    assert not any("/." in "/" + p for p in everything)
    assert rel(tree, iter_inputs(tree, ["s/.hid/*.jpg"])) == ["s/.hid/6.jpg"]
    assert rel(tree, iter_inputs(tree, ["s/.*"])) == ["s/.7.jpg"]
    assert rel(tree, iter_inputs(tree, ["s/.*/*.jpg"])) == ["s/.hid/6.jpg"]
    assert rel(tree, iter_inputs(tree, ["s/.7.jpg"])) == ["s/.7.jpg"]


def test_exclude_skips_output_folder(tree: Path) -> None:
    got = rel(tree, iter_inputs(tree, ["**/*.jpg"], exclude=tree / "out"))
    assert "out/8.jpg" not in got
    assert "top.jpg" in got
    assert list(iter_inputs(tree, ["out/*.jpg"], exclude=tree / "out")) == []
    assert list(iter_inputs(tree, ["out/8.jpg"], exclude=tree / "out")) == []
    # Without exclude it is found.
    assert "out/8.jpg" in rel(tree, iter_inputs(tree, ["**/*.jpg"]))


def test_exclude_given_relative_or_not_existing(
    tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tree)
    got = rel(tree, iter_inputs(Path("."), ["**/*.jpg"], exclude=Path("out")))
    assert "out/8.jpg" not in got
    assert len(list(iter_inputs(tree, ["**/*.jpg"], exclude=tree / "new-out"))) == 6


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_exclude_reached_through_a_symlink_and_symlink_loops(tree: Path) -> None:
    os.symlink(tree / "out", tree / "s" / "link-to-out")
    os.symlink(tree, tree / "s" / "a" / "loop")  # a cycle back to the root
    got = rel(tree, iter_inputs(tree, ["**/*.jpg"], exclude=tree / "out"))
    assert not any("8.jpg" in p for p in got)
    # The loop leads back to the walk's root, which is on the current path: not entered.
    assert got == ["s/1.jpg", "s/a/3.jpg", "s/a/b/4.jpg", "s/a/b/c/5.jpg", "top.jpg"]
    # Walking from s/, the loop's target (job/) is new once; job/s is then on the path.
    below = rel(tree, iter_inputs(tree, ["s/**/*.jpg"], exclude=tree / "out"))
    assert below == [
        "s/1.jpg",
        "s/a/3.jpg",
        "s/a/b/4.jpg",
        "s/a/b/c/5.jpg",
        "s/a/loop/top.jpg",
    ]


def test_non_regular_files_are_skipped(tree: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs mkfifo")
    os.mkfifo(tree / "s" / "pipe.jpg")
    os.symlink(tree / "missing.jpg", tree / "s" / "broken.jpg")
    os.symlink(tree / "s" / "1.jpg", tree / "s" / "linked.jpg")
    got = rel(tree, iter_inputs(tree, ["s/*.jpg"]))
    assert got == ["s/1.jpg", "s/linked.jpg"]
    assert list(iter_inputs(tree, ["s/pipe.jpg"])) == []


def test_file_matched_by_several_patterns_is_yielded_once(tree: Path) -> None:
    got = rel(tree, iter_inputs(tree, ["s/**/*.jpg", "s/a/*.jpg", "s/a/3.jpg", "**/*", "*.jpg"]))
    assert got == [
        "s/1.jpg",
        "s/a/3.jpg",
        "s/a/b/4.jpg",
        "s/a/b/c/5.jpg",
        # from "**/*": only what the first pattern did not match
        "out/8.jpg",
        "s/2.png",
        "s/a/notes.txt",
        "s/b.JPG",
        "top.jpg",
    ]


def test_dedupe_works_across_relative_and_absolute_spellings(tree: Path) -> None:
    got = list(iter_inputs(tree, ["s/*.jpg", str(tree / "s" / "1.jpg"), "../job/s/1.jpg"]))
    assert rel(tree, got) == ["s/1.jpg"]


def test_iteration_is_lazy(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_scandir = os.scandir

    def spy(path: str) -> object:
        calls.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    it = iter_inputs(tree, ["**/*.jpg"])
    assert isinstance(it, types.GeneratorType)
    assert calls == []
    first = next(it)
    assert first.name == "8.jpg"  # "out" sorts first
    # Only the directories on the way to the first match were listed.
    assert len(calls) == 2


def test_count_inputs(tree: Path) -> None:
    assert count_inputs(tree, ["**/*.jpg"], exclude=tree / "out") == 5
    assert count_inputs(tree, ["s/**/*.jpg", "s/*.jpg"]) == 4
    assert count_inputs(tree, []) == 0


def test_large_flat_folder_streams(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"{i:05d}.jpg").write_bytes(b"")
    it = iter_inputs(tmp_path, ["*.jpg"])
    assert next(it).name == "00000.jpg"
    assert sum(1 for _ in it) == 1999


# ----------------------------------------------------------------------- relpath


def test_relpath_under_base(tmp_path: Path) -> None:
    assert input_relpath(tmp_path, tmp_path / "shoots" / "a" / "1.jpg") == "shoots/a/1.jpg"


def test_relpath_up(tmp_path: Path) -> None:
    base = tmp_path / "jobs" / "nightly"
    assert input_relpath(base, tmp_path / "shared" / "1.jpg") == "_up/_up/shared/1.jpg"


def test_relpath_absolute_outside(tmp_path: Path) -> None:
    assert input_relpath(tmp_path, Path("/etc/hosts")) == "_abs/etc/hosts"


def test_relpath_markers_are_escaped_so_mapping_is_injective(tmp_path: Path) -> None:
    base = tmp_path / "jobs"
    a = input_relpath(base, base / "_up" / "shared" / "1.jpg")
    b = input_relpath(base, tmp_path / "shared" / "1.jpg")
    c = input_relpath(base, base / "_abs" / "etc" / "hosts")
    d = input_relpath(base, base / "__up" / "x.jpg")
    assert a == "__up/shared/1.jpg"
    assert b == "_up/shared/1.jpg"
    assert c == "__abs/etc/hosts"
    assert d == "___up/x.jpg"
    assert len({a, b, c, d, input_relpath(base, Path("/etc/hosts"))}) == 5


@pytest.mark.parametrize(
    "path",
    [
        "a/../../b.jpg",
        "../../../../../../etc/passwd",
        "/etc/passwd",
        "./x/./y.jpg",
        "/",
        "..",
    ],
)
def test_relpath_never_escapes(tmp_path: Path, path: str) -> None:
    base = tmp_path / "jobs"
    out = input_relpath(base, Path(path) if path.startswith("/") else base / path)
    pure = PurePosixPath(out)
    assert not pure.is_absolute()
    assert ".." not in pure.parts and "." not in out.split("/") and "" not in out.split("/")
    joined = os.path.normpath(os.path.join("/srv/out", out))
    assert joined.startswith("/srv/out/")
