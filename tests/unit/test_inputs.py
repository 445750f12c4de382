"""Input discovery: patterns, order, dedupe, hidden files, exclusion, relpath safety."""

from __future__ import annotations

import os
import types
from collections.abc import Iterable
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath

import pytest
from hypothesis import assume, given, settings
from hypothesis import strategies as st

from pipeline.errors import UsageError
from pipeline.inputs import (
    InputEntry,
    InputPatternError,
    NoInputsMatched,
    count_inputs,
    input_relpath,
    iter_input_entries,
    iter_inputs,
    pattern_problem,
)


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
    assert rel(tree, got) == ["s/1.jpg", "s/a/3.jpg", "s/a/b/4.jpg", "s/a/b/c/5.jpg", "s/b.JPG"]
    assert all(p.is_absolute() for p in got)


def test_single_star_does_not_cross_directories(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/*.jpg"])) == ["s/1.jpg", "s/b.JPG"]
    assert rel(tree, iter_inputs(tree, ["*/*/*.jpg"])) == ["s/a/3.jpg"]


def test_question_mark_and_brackets(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/?.*"])) == ["s/1.jpg", "s/2.png", "s/b.JPG"]
    assert rel(tree, iter_inputs(tree, ["s/[12].*"])) == ["s/1.jpg", "s/2.png"]
    assert rel(tree, iter_inputs(tree, ["s/[!1].*"])) == ["s/2.png", "s/b.JPG"]


def test_matching_ignores_case(tree: Path) -> None:
    assert rel(tree, iter_inputs(tree, ["s/*.JPG"])) == ["s/1.jpg", "s/b.JPG"]
    assert rel(tree, iter_inputs(tree, ["S/*.jpg"])) == []  # the literal root is a path
    assert rel(tree, iter_inputs(tree, ["*/A/*.JPG"])) == ["s/a/3.jpg"]
    assert rel(tree, iter_inputs(tree, ["s/[B]*"])) == ["s/b.JPG"]


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
    make(tmp_path, "photos/x/1.jpg", "jobs/j.yaml")
    got = list(iter_inputs(tmp_path / "jobs", ["../photos/**/*.jpg"]))
    assert got == [tmp_path / "photos" / "x" / "1.jpg"]  # normalised, no ".."


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
    assert len(list(iter_inputs(tree, ["**/*.jpg"], exclude=tree / "new-out"))) == 7


@pytest.mark.skipif(not hasattr(os, "symlink"), reason="needs symlinks")
def test_exclude_reached_through_a_symlink_and_symlink_loops(tree: Path) -> None:
    os.symlink(tree / "out", tree / "s" / "link-to-out")
    os.symlink(tree, tree / "s" / "a" / "loop")  # a cycle back to the root
    got = rel(tree, iter_inputs(tree, ["**/*.jpg"], exclude=tree / "out"))
    assert not any("8.jpg" in p for p in got)
    # The loop leads back to the walk's root, which is on the current path: not entered.
    assert got == ["s/1.jpg", "s/a/3.jpg", "s/a/b/4.jpg", "s/a/b/c/5.jpg", "s/b.JPG", "top.jpg"]
    # Walking from s/, the loop's target (job/) is new once; job/s is then on the path.
    below = rel(tree, iter_inputs(tree, ["s/**/*.jpg"], exclude=tree / "out"))
    assert below == [
        "s/1.jpg",
        "s/a/3.jpg",
        "s/a/b/4.jpg",
        "s/a/b/c/5.jpg",
        "s/a/loop/top.jpg",
        "s/b.JPG",
    ]


def test_non_regular_files_are_skipped(tree: Path) -> None:
    if not hasattr(os, "mkfifo"):
        pytest.skip("needs mkfifo")
    os.mkfifo(tree / "s" / "pipe.jpg")
    os.symlink(tree / "missing.jpg", tree / "s" / "broken.jpg")
    os.symlink(tree / "s" / "1.jpg", tree / "s" / "linked.jpg")
    got = rel(tree, iter_inputs(tree, ["s/*.jpg"]))
    assert got == ["s/1.jpg", "s/b.JPG", "s/linked.jpg"]
    assert list(iter_inputs(tree, ["s/pipe.jpg"])) == []


def test_file_matched_by_several_patterns_is_yielded_once(tree: Path) -> None:
    got = rel(tree, iter_inputs(tree, ["s/**/*.jpg", "s/a/*.jpg", "s/a/3.jpg", "**/*", "*.jpg"]))
    assert got == [
        "s/1.jpg",
        "s/a/3.jpg",
        "s/a/b/4.jpg",
        "s/a/b/c/5.jpg",
        "s/b.JPG",
        # from "**/*": only what the first pattern did not match
        "out/8.jpg",
        "s/2.png",
        "s/a/notes.txt",
        "top.jpg",
    ]


def test_dedupe_works_across_relative_and_absolute_spellings(tree: Path) -> None:
    got = list(iter_inputs(tree, ["s/*.jpg", str(tree / "s" / "1.jpg"), "../job/s/1.jpg"]))
    assert rel(tree, got) == ["s/1.jpg", "s/b.JPG"]


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
    assert count_inputs(tree, ["**/*.jpg"], exclude=tree / "out") == 6
    assert count_inputs(tree, ["s/**/*.jpg", "s/*.jpg"]) == 5
    assert count_inputs(tree, []) == 0


def test_large_flat_folder_streams(tmp_path: Path) -> None:
    for i in range(2000):
        (tmp_path / f"{i:05d}.jpg").write_bytes(b"")
    it = iter_inputs(tmp_path, ["*.jpg"])
    assert next(it).name == "00000.jpg"
    assert sum(1 for _ in it) == 1999


# A name a folder can hold: no "/" and no NUL; surrogates stand for bytes that are
# not UTF-8 (os.fsdecode), which this file system takes back through os.fsencode.
_NAME_CHARS = st.characters(blacklist_characters="/\x00", blacklist_categories=("Cs",))
_names = st.one_of(
    st.text(_NAME_CHARS, min_size=1, max_size=12),
    # names that are not UTF-8, as the walk sees them (surrogate escapes)
    st.binary(min_size=1, max_size=12)
    .filter(lambda b: b"/" not in b and b"\x00" not in b)
    .map(os.fsdecode),
).filter(lambda n: n not in (".", ".."))


@settings(max_examples=40, deadline=None)
@given(
    names=st.sets(_names, min_size=0, max_size=40),
    dirs=st.sets(_names, max_size=5),
    run=st.integers(min_value=1, max_value=7),
)
def test_a_listing_is_every_entry_once_sorted_by_name_whatever_the_runs(
    tmp_path_factory: pytest.TempPathFactory, names: set[str], dirs: set[str], run: int
) -> None:
    """The listing kept as sorted runs merged lazily (memory: issue 9) gives what
    sorting the whole folder gives, prefixes of one another and non-ASCII names
    included, across every run boundary."""
    from pipeline import inputs

    folder = tmp_path_factory.mktemp("listing")
    made: dict[str, int] = {}
    for name in names | dirs:
        try:
            if name in dirs:
                (folder / name).mkdir()
                made[name] = inputs._DIR
            else:
                (folder / name).write_bytes(b"")
                made[name] = inputs._FILE
        except OSError:  # a name this file system refuses (too long in bytes)
            continue
    old = inputs._RUN
    inputs._RUN = run
    try:
        got = list(inputs._listing(str(folder)))
    finally:
        inputs._RUN = old
    assert got == sorted(made.items())


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


# ------------------------------------------------------- case, braces, entries


def test_case_insensitive_extensions(tmp_path: Path) -> None:
    make(tmp_path, "a.jpg", "b.JPG", "c.Jpg", "d.jPg", "e.jpeg", "f.JPEG", "g.png", "h.PNG")
    assert rel(tmp_path, iter_inputs(tmp_path, ["*.jpg"])) == ["a.jpg", "b.JPG", "c.Jpg", "d.jPg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["*.JPEG"])) == ["e.jpeg", "f.JPEG"]


def test_braces(tmp_path: Path) -> None:
    make(tmp_path, "a.jpg", "b.JPEG", "c.png", "d.gif", "e.jp", "f.jpgx", "{x}.jpg")
    assert rel(tmp_path, iter_inputs(tmp_path, ["*.{jpg,jpeg,png}"])) == [
        "a.jpg",
        "b.JPEG",
        "c.png",
        "{x}.jpg",
    ]
    # Nested, with an empty alternative: jpg, jpeg.
    assert rel(tmp_path, iter_inputs(tmp_path, ["*.jp{,e}g"])) == ["a.jpg", "b.JPEG", "{x}.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["*.{jp{,e}g,png}"])) == [
        "a.jpg",
        "b.JPEG",
        "c.png",
        "{x}.jpg",
    ]
    # A brace with no comma is literal; [{] matches a literal brace.
    assert rel(tmp_path, iter_inputs(tmp_path, ["{x}.jpg"])) == ["{x}.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["[{]*"])) == ["{x}.jpg"]
    # Commas inside [...] are members, not separators.
    assert rel(tmp_path, iter_inputs(tmp_path, ["{[a,]*,d*}"])) == ["a.jpg", "d.gif"]


def test_braces_across_segments_and_with_star_star(tmp_path: Path) -> None:
    make(
        tmp_path,
        "raw/1.png",
        "raw/deep/2.png",
        "edited/x/3.JPG",
        "edited/4.jpg",
        "2025/a/5.jpg",
        "2026/6.jpeg",
        "2027/7.jpg",
    )
    got = rel(tmp_path, iter_inputs(tmp_path, ["{raw/*.png,edited/**/*.jpg}"]))
    assert got == ["raw/1.png", "edited/4.jpg", "edited/x/3.JPG"]
    got = rel(tmp_path, iter_inputs(tmp_path, ["{2025,2026}/**/*.{jpg,jpeg}"]))
    assert got == ["2025/a/5.jpg", "2026/6.jpeg"]
    # Alternatives overlapping: each file once.
    got = rel(tmp_path, iter_inputs(tmp_path, ["{edited/*,edited/**/*}.jpg"]))
    assert got == ["edited/4.jpg", "edited/x/3.JPG"]


def test_braces_that_expand_too_far_are_refused(tmp_path: Path) -> None:
    pattern = "/".join(["{a/b,c/d}"] * 9) + "/*.jpg"  # 2**9 = 512 walks
    with pytest.raises(InputPatternError) as err:
        list(iter_input_entries(tmp_path, [pattern]))
    assert err.value.exit_code == 2
    assert "more than 256 patterns" in str(err.value)
    assert pattern_problem(pattern) == str(err.value)
    assert pattern_problem("{a/b,c/d}/**/*.{jpg,png}") is None
    # Within one segment braces are one regex, never expanded: 2**20 alternatives.
    make(tmp_path, "ab" * 10 + ".jpg")
    assert rel(tmp_path, iter_inputs(tmp_path, ["{a,b}" * 20 + ".{jpg,png}"])) == [
        "ab" * 10 + ".jpg"
    ]


def test_hidden_names_need_a_literal_dot(tmp_path: Path) -> None:
    make(tmp_path, ".a.jpg", "._IMG_1.JPG", "b.jpg", ".hid/c.jpg", ".DS_Store")
    assert rel(tmp_path, iter_inputs(tmp_path, ["*.jpg"])) == ["b.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["?*"])) == ["b.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["[.b]*.jpg"])) == ["b.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["{.*,*}.jpg"])) == [
        "._IMG_1.JPG",
        ".a.jpg",
        "b.jpg",
    ]
    assert rel(tmp_path, iter_inputs(tmp_path, ["**/*.jpg"])) == ["b.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, [".*/*.jpg"])) == [".hid/c.jpg"]


def test_bracket_ranges_and_negation(tmp_path: Path) -> None:
    make(tmp_path, "a1.jpg", "B2.jpg", "c3.jpg", "-.jpg", "].jpg")
    assert rel(tmp_path, iter_inputs(tmp_path, ["[a-b]?.jpg"])) == ["B2.jpg", "a1.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["[!a-b]?.jpg"])) == ["c3.jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["[]-].jpg"])) == ["-.jpg", "].jpg"]
    assert rel(tmp_path, iter_inputs(tmp_path, ["[z-a]*"])) == []  # reversed: matches nothing


def test_entries_carry_stat_and_rel(tmp_path: Path) -> None:
    make(tmp_path, "s/a.jpg")
    (entry,) = iter_input_entries(tmp_path, ["s/*.jpg"])
    assert isinstance(entry, InputEntry) and entry.ok and entry.problem is None
    assert entry.path == tmp_path / "s" / "a.jpg"
    assert entry.rel == "s/a.jpg" == input_relpath(tmp_path, entry.path)
    assert entry.stat is not None
    assert (entry.stat.st_ino, entry.stat.st_size) == (entry.path.stat().st_ino, 1)


def test_no_match_at_all_raises_at_the_end(tmp_path: Path) -> None:
    make(tmp_path, "photos/a.txt")
    it = iter_input_entries(tmp_path, ["photos/*.jpg", "share/**/*.jpg"])
    with pytest.raises(NoInputsMatched) as err:
        next(it)
    exc = err.value
    assert isinstance(exc, UsageError) and exc.exit_code == 2
    assert exc.patterns == ("photos/*.jpg", "share/**/*.jpg")
    assert exc.base_dir == tmp_path
    assert str(exc) == (
        f"no file matches the input patterns 'photos/*.jpg', 'share/**/*.jpg' under {tmp_path} "
        f"({tmp_path / 'share'} does not exist); check the patterns, and that the folder "
        f"(or network share) is there and mounted"
    )
    # iter_inputs stays quiet, as it always was.
    assert list(iter_inputs(tmp_path, ["photos/*.jpg"])) == []


def test_files_left_out_as_inside_the_output_folder_are_named_as_such(tmp_path: Path) -> None:
    # output: . with inputs ["*.jpg"]: the photos exist, but all are in the output
    # folder. The error says so (and where to put the output), not "is it mounted?".
    make(tmp_path, "p0.jpg")
    make(tmp_path, "p1.jpg")
    make(tmp_path, "sub/p2.jpg")
    with pytest.raises(NoInputsMatched) as err:
        list(iter_input_entries(tmp_path, ["*.jpg", "**/*.jpg"], exclude=tmp_path))
    assert err.value.in_output == 3 and err.value.exit_code == 2
    assert str(err.value) == (
        f"no input to process: 3 file(s) match the input patterns '*.jpg', '**/*.jpg' under "
        f"{tmp_path}, but all are inside the output folder {tmp_path}, and inputs are never "
        "taken from there (results would become inputs); put the output folder elsewhere, "
        "outside what the patterns reach (say `output: ../out`), or move the photos out of it"
    )
    assert "mounted" not in str(err.value)
    # A file outside the output folder is an input as before; with none matching at
    # all, the usual message.
    make(tmp_path, "elsewhere/q.jpg")
    (entry,) = iter_input_entries(tmp_path, ["elsewhere/*.jpg"], exclude=tmp_path / "out")
    assert entry.rel == "elsewhere/q.jpg"
    with pytest.raises(NoInputsMatched, match="no file matches") as none:
        list(iter_input_entries(tmp_path, ["*.png"], exclude=tmp_path))
    assert none.value.in_output == 0


def test_no_match_names_a_folder_given_as_a_pattern(tmp_path: Path) -> None:
    make(tmp_path, "photos/a.jpg")
    with pytest.raises(NoInputsMatched, match=r"photos is a folder: write photos/\*\*/\*\.jpg"):
        list(iter_input_entries(tmp_path, ["photos"]))


def test_no_match_when_everything_is_in_the_output_folder(tmp_path: Path) -> None:
    make(tmp_path, "out/a.jpg")
    with pytest.raises(NoInputsMatched):
        list(iter_input_entries(tmp_path, ["**/*.jpg"], exclude=tmp_path / "out"))


def test_an_empty_mount_point_is_no_match(tmp_path: Path) -> None:
    (tmp_path / "mnt" / "share").mkdir(parents=True)  # the share is not mounted
    with pytest.raises(NoInputsMatched):
        list(iter_input_entries(tmp_path, ["mnt/share/**/*.jpg"]))


def test_a_bad_entry_alone_is_a_match(tmp_path: Path) -> None:
    os.symlink(tmp_path / "missing.jpg", tmp_path / "a.jpg")
    (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.problem is not None and entry.problem.code == "INPUT_BROKEN_SYMLINK"
    assert list(iter_inputs(tmp_path, ["*.jpg"])) == []


def test_entries_are_lazy(tree: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    calls: list[str] = []
    real_scandir = os.scandir

    def spy(path: str) -> object:
        calls.append(path)
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", spy)
    it = iter_input_entries(tree, ["**/*.jpg"])
    assert isinstance(it, types.GeneratorType) and calls == []
    assert next(it).path.name == "8.jpg"
    assert len(calls) == 2


@given(
    names=st.lists(st.text(alphabet="abAB.{},*?-", min_size=1, max_size=6), min_size=1, max_size=6),
    pattern=st.text(alphabet="abAB.*?", min_size=1, max_size=5),
)
@settings(max_examples=150, deadline=None)
def test_without_braces_matching_is_fnmatch_on_folded_names(
    tmp_path_factory: pytest.TempPathFactory, names: list[str], pattern: str
) -> None:
    """For plain *, ? and literals, a name matches exactly when fnmatch says so on
    lower-cased text, leading dots aside (a pattern without wildcards is a path, not
    scanned: the file system decides its case)."""
    assume(any(ch in "*?" for ch in pattern))
    base = tmp_path_factory.mktemp("h")
    for name in set(names):
        if name in (".", "..") or "/" in name:
            continue
        if not (base / name).exists():
            (base / name).write_bytes(b"x")
    present = sorted(p.name for p in base.iterdir())
    want = [
        n
        for n in present
        if fnmatchcase(n.lower(), pattern.lower())
        and (not n.startswith(".") or pattern.startswith("."))
    ]
    got = sorted(p.name for p in iter_inputs(base, [pattern]) if p.parent == base)
    assert got == want


def test_entry_rel_is_input_relpath_for_marker_like_names(tmp_path: Path) -> None:
    make(tmp_path, "_up/a.jpg", "__abs/b.jpg", "x/_up/c.jpg", "shared/d.jpg")
    base = tmp_path / "job"
    base.mkdir()
    entries = list(iter_input_entries(base, ["../**/*.jpg"]))
    assert [e.rel for e in entries] == [input_relpath(base, e.path) for e in entries]
    assert [e.rel for e in entries] == [
        "_up/___abs/b.jpg",
        "_up/__up/a.jpg",
        "_up/shared/d.jpg",
        "_up/x/__up/c.jpg",
    ]
    inside = list(iter_input_entries(tmp_path, ["**/*.jpg"]))
    assert [e.rel for e in inside] == ["___abs/b.jpg", "__up/a.jpg", "shared/d.jpg", "x/__up/c.jpg"]
    assert [e.rel for e in inside] == [input_relpath(tmp_path, e.path) for e in inside]


@settings(max_examples=300, deadline=None)
@given(
    base=st.lists(st.sampled_from(["a", "b", "_up", "_abs", "x y", "é"]), min_size=0, max_size=3),
    path=st.lists(
        st.sampled_from(["a", "b", "_up", "_abs", "__up", "x y", "é", "c.jpg", "_", "~h"]),
        min_size=1,
        max_size=5,
    ),
    up=st.integers(0, 2),
)
def test_rel_maker_agrees_with_input_relpath(base: list[str], path: list[str], up: int) -> None:
    from pipeline.inputs import _RelMaker

    root = "/r"
    base_dir = os.path.join(root, *base) if base else root
    start = base[: max(0, len(base) - up)]
    full = os.path.join(root, *start, *path)
    maker = _RelMaker(os.path.normpath(base_dir))
    assert maker(full) == input_relpath(Path(base_dir), Path(full))
    assert maker(full) == input_relpath(Path(base_dir), Path(full))  # memoised folder
