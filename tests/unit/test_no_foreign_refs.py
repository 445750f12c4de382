"""The project cites only what its users have: its own files, never the authors' notes.

Two checks over every file git tracks:

* no file mentions the authors' private reference material (the vendor protocol notes
  and the folder beside the checkout that held them), nor cites it the short way, by
  its section numbers (a section sign and a number) or its open-question numbers (Q
  and 1 to 18): a user reading a comment, a message or the README can open none of
  them;
* every citation of the vendor notes in the form the project uses, the file name
  followed by a quoted heading (optionally after a comma, optionally in parentheses),
  names a ``##`` heading that exists in ``docs/vendors.md``, so a reader can find it.
  A citation may name several headings joined by ``,`` or ``and``, and may wrap across
  comment lines.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
VENDORS = ROOT / "docs" / "vendors.md"

# Spelled in pieces so this file does not match its own search.
FOREIGN_NAME = "vendor-" + "protocols"
FOREIGN = re.compile(
    "|".join(
        [
            re.escape(FOREIGN_NAME),
            re.escape(".." + "/shared"),
            "\u00a7 ?[0-9]",  # a section number of those notes
            r"\bQ(?:1[0-8]|[1-9])\b",  # one of their open questions
        ]
    )
)

# Where the file name of the vendor notes occurs; each hit is then read from there on.
_MENTION = re.compile(r"docs/vendors\.md")
# A line break with the next line's indentation and comment marker (Python/YAML ``#``,
# Markdown quote ``>``): a citation wrapped across lines reads as one line.
_WRAP = re.compile(r"[ \t]*\n[ \t]*(?:#+|>)?[ \t]*")
_QUOTED = r'"([^"\n]*)"'
# The file name, an optional closing backtick, an optional comma, then the first quoted
# heading; further headings may follow, joined by "," or "and".
_CITATION = re.compile(r"`?,?[ ]*" + _QUOTED + r"((?:[ ]*(?:,|and|, and)[ ]*" + _QUOTED + r")*)")
_FOLLOWING = re.compile(_QUOTED)
# How far after the file name a citation can reach (several wrapped headings).
_WINDOW = 400


def _tracked_files() -> list[Path]:
    if not (ROOT / ".git").exists():
        pytest.skip("not a git checkout: the tracked files are unknown")
    out = subprocess.run(
        ["git", "ls-files", "-z"], cwd=ROOT, check=True, capture_output=True
    ).stdout
    paths = [ROOT / name for name in out.decode("utf-8", "surrogateescape").split("\0") if name]
    return [p for p in paths if p.is_file() and not p.is_symlink()]


def _text_files() -> list[tuple[str, str]]:
    """(relative path, text) of every tracked text file; binary files are skipped."""
    files: list[tuple[str, str]] = []
    for path in _tracked_files():
        data = path.read_bytes()
        if b"\0" in data:
            continue
        files.append((path.relative_to(ROOT).as_posix(), data.decode("utf-8", "replace")))
    assert files, "git ls-files listed no text file"
    return files


def _headings() -> set[str]:
    text = VENDORS.read_text(encoding="utf-8")
    return {line[3:].strip() for line in text.splitlines() if line.startswith("## ")}


def _line_of(text: str, pos: int) -> int:
    return text.count("\n", 0, pos) + 1


def citations(text: str) -> list[tuple[int, str]]:
    """(line, heading) for every heading cited after the vendor notes' file name."""
    found: list[tuple[int, str]] = []
    for mention in _MENTION.finditer(text):
        window = _WRAP.sub(" ", text[mention.end() : mention.end() + _WINDOW])
        window = window.replace('\\"', '"')  # a citation inside a "..." string literal
        match = _CITATION.match(window)
        if match is None:
            continue  # the file itself, not one of its sections
        names = [match.group(1), *_FOLLOWING.findall(match.group(2))]
        line = _line_of(text, mention.start())
        found.extend((line, " ".join(name.split())) for name in names)
    return found


def test_no_file_cites_material_users_do_not_have() -> None:
    offenders = [
        f"{rel}:{number}: {line.strip()}"
        for rel, text in _text_files()
        for number, line in enumerate(text.splitlines(), start=1)
        if FOREIGN.search(line)
    ]
    assert not offenders, (
        f"{len(offenders)} line(s) cite files the project's users don't have "
        "(cite docs/vendors.md by heading instead):\n" + "\n".join(offenders)
    )


def test_every_vendor_notes_citation_names_an_existing_heading() -> None:
    headings = _headings()
    assert len(headings) > 30, "docs/vendors.md lost its ## headings"
    wrong = [
        f"{rel}:{line}: {name!r}"
        for rel, text in _text_files()
        for line, name in citations(text)
        if name not in headings
    ]
    assert not wrong, (
        f"{len(wrong)} citation(s) of docs/vendors.md name no heading of it "
        "(cite an existing '## ' heading exactly, or add the section):\n" + "\n".join(wrong)
    )


def test_cross_references_inside_the_vendor_notes_exist() -> None:
    # Sections point at each other as (see "AILab: error codes"); a renamed heading must
    # take those along too.
    headings = _headings()
    text = VENDORS.read_text(encoding="utf-8")
    prefixes = ("AILab: ", "Perfect Corp: ", "Both vendors: ")
    wrong = [
        f"docs/vendors.md:{_line_of(text, m.start())}: {name!r}"
        for m in re.finditer(r'"([^"]*)"', text)
        if (name := " ".join(_WRAP.sub(" ", m.group(1)).split())).startswith(prefixes)
        and name not in headings
    ]
    assert not wrong, "cross-references to missing headings:\n" + "\n".join(wrong)


# The file name, spelled so that these examples are not citations of this file.
_N = "docs/" + "vendors.md"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (f'x ({_N}, "AILab: error codes") y', ["AILab: error codes"]),
        (f'see {_N} "Perfect Corp: polling window".', ["Perfect Corp: polling window"]),
        (f'# ({_N}, "Perfect Corp:\n    # polling window")', ["Perfect Corp: polling window"]),
        (f'# {_N},\n# "AILab: downloads"', ["AILab: downloads"]),
        (f'`{_N}` "AILab: downloads"', ["AILab: downloads"]),
        (f'msg = "({_N}, \\"AILab: downloads\\")"', ["AILab: downloads"]),
        (f'{_N} "A: b", "C: d" and "E: f") "not this"', ["A: b", "C: d", "E: f"]),
        (f"Vendor facts are in `{_N}`, with sources.", []),
        (f'{_N}: "AILab: downloads"', []),
    ],
)
def test_citation_reader(text: str, expected: list[str]) -> None:
    assert [name for _, name in citations(text)] == expected


def test_citation_lines_count_from_the_file_name() -> None:
    text = f'a\nb\n# ({_N}, "X:\n# y")\n'
    assert citations(text) == [(3, "X: y")]


@pytest.mark.parametrize(
    ("line", "foreign"),
    [
        ("see " + FOREIGN_NAME + ".md", True),
        ("(``" + ".." + "/shared/x``)", True),
        ("\u00a7" + "1.8 row 400", True),
        ("rows of \u00a7 " + "2.9", True),
        ("the lost task of " + "Q" + "17.", True),
        ("(" + "Q" + "9)", True),
        ("``../photos/**/*.jpg``", False),
        ("FAQ1, Q19, SQ2", False),
        (f'({_N}, "AILab: error codes")', False),
    ],
)
def test_foreign_reference_reader(line: str, foreign: bool) -> None:
    assert bool(FOREIGN.search(line)) is foreign
