"""Streaming discovery of input files, with every matched entry accounted for.

:func:`iter_input_entries` walks the file system lazily, one directory listing at
a time, so a manifest over a million photos never holds a million paths in memory
(only the sorted listing of each directory on the current path). Each pattern is
split into a literal *root* (``../photos``, ``/data/shoots``) and the wildcard
segments after it; the walk starts at the root and descends only into directories
that can still match (segment-wise matching with a small NFA, so ``**`` never
yields the same file twice for one pattern).

Pattern rules (posix-style, ``/`` separates segments):

* ``*``, ``?``, ``[...]`` (``[!...]`` negates) match within one segment; ``**`` as a
  whole segment matches zero or more directories. There is no backslash escape: a
  literal ``*``, ``?``, ``[`` or ``{`` is written ``[*]``, ``[?]``, ``[[]``, ``[{]``.
* File and folder names match **regardless of case**: ``*.jpg`` matches ``a.JPG``
  and ``b.Jpg`` (cameras and phones write upper case, editors lower case). The
  literal leading part of a pattern (``Shoots/2026`` in ``Shoots/2026/*.jpg``, or a
  whole pattern without wildcards) is a path, looked up as written: there the file
  system decides on case.
* Braces give alternatives, nested as deep as needed: ``*.{jpg,jpeg,png}``,
  ``{2025,2026}/**/*.{jp{,e}g,png}``; alternatives may hold ``/``
  (``{raw/*.png,edited/**/*.jpg}``). A brace without a comma at its own level
  (``{x}``) is literal. Ranges (``{1..9}``) are not supported.
* Absolute patterns, ``~`` and ``..`` in the literal leading part are allowed
  (``../photos/**/*.jpg``). A ``..`` after a wildcard matches nothing.
* Names starting with ``.`` are skipped unless the pattern matches their leading
  ``.`` literally (``.cache/*.jpg``, ``.*``, ``{.*,*}``): a wildcard never matches
  it, so macOS ``._IMG_0001.jpg`` resource forks and ``.DS_Store`` stay out.
  ``**`` never enters hidden directories.
* Anything at or under ``exclude`` (the output folder) is skipped. Symlinked
  directories are followed, but a directory already on the current walk path (a
  symlink cycle) is not entered again.
* Order is deterministic: entries sorted by name within each directory, depth
  first, patterns in the order given.
* A path matched by several patterns is yielded once, by the first pattern that
  matches it; later patterns re-check earlier ones instead of remembering paths.

What is yielded (:class:`InputEntry`):

* every regular file (or symlink to one) that a pattern matches, with its ``stat``;
* every *other* matched entry, with a ``problem`` (an
  :class:`~pipeline.errors.InputProblem`) and no ``stat``: a FIFO, socket or device
  (``INPUT_NOT_A_FILE``; only ``stat`` is called, a FIFO is never opened), a broken
  symlink (``INPUT_BROKEN_SYMLINK``), a symlink loop (``INPUT_SYMLINK_LOOP``), a
  file that cannot be stat'ed (``INPUT_UNREADABLE``) or that disappeared between the
  listing and its ``stat`` (``INPUT_MISSING``);
* a folder the walk needed to enter but cannot list (``INPUT_UNREADABLE``, path of
  the folder): the inputs in it would otherwise vanish without a word.

Folders matched by a pattern (``photos/*`` matching ``photos/2026``) are not
inputs and are skipped silently; they are only walked into where a pattern
continues below them.

When the patterns match nothing at all (not one entry, good or bad), the
iteration ends by raising :class:`NoInputsMatched` (a usage error: exit 2), so an
unmounted share does not look like a successful empty run.
"""

from __future__ import annotations

import errno
import heapq
import os
import re
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath
from typing import IO

from pipeline.errors import InputProblem, UsageError

__all__ = [
    "INPUT_BROKEN_SYMLINK",
    "INPUT_MISSING",
    "INPUT_NOT_A_FILE",
    "INPUT_SYMLINK_LOOP",
    "INPUT_TOO_LARGE",
    "INPUT_UNREADABLE",
    "InputEntry",
    "InputPatternError",
    "NoInputsMatched",
    "count_inputs",
    "display_path",
    "input_relpath",
    "iter_input_entries",
    "iter_inputs",
    "open_input",
    "pattern_problem",
    "problem_for_os_error",
    "stat_input",
    "too_large_problem",
]

# Codes of the problems an input can have before its content is looked at.
INPUT_NOT_A_FILE = "INPUT_NOT_A_FILE"  # FIFO, socket, device, folder
INPUT_BROKEN_SYMLINK = "INPUT_BROKEN_SYMLINK"
INPUT_SYMLINK_LOOP = "INPUT_SYMLINK_LOOP"
INPUT_UNREADABLE = "INPUT_UNREADABLE"  # permission, I/O error, folder that can't be listed
INPUT_MISSING = "INPUT_MISSING"  # gone between the listing and the read
INPUT_TOO_LARGE = "INPUT_TOO_LARGE"  # over what the pipeline reads for one input

# Matching files inside the output folder are counted up to this many (only once
# nothing else matched: to say why, see NoInputsMatched).
_IN_OUTPUT_CAP = 10_000

# Patterns whose braces hold "/" are expanded into several walks; more than this
# many is almost certainly a mistake (and would walk the tree that many times).
_MAX_EXPANSIONS = 256


class NoInputsMatched(UsageError):
    """The input patterns matched no file at all (exit 2): nothing was sent.

    ``patterns`` and ``base_dir`` are what was searched. Raised at the *end* of
    :func:`iter_input_entries`, once it is known that not one entry matched.
    """

    def __init__(
        self,
        patterns: Sequence[str],
        base_dir: Path,
        hints: Sequence[str] = (),
        *,
        in_output: int = 0,
        output: Path | None = None,
    ) -> None:
        self.patterns = tuple(patterns)
        self.base_dir = base_dir
        self.in_output = in_output  # matching files left out: inside the output folder
        shown = ", ".join(repr(p) for p in self.patterns) or "(none given)"
        hint = f" ({'; '.join(hints)})" if hints else ""
        if in_output and output is not None:
            # The files are there: saying "check that the folder is mounted" would
            # send the user looking in the wrong place.
            many = f"{in_output}+" if in_output >= _IN_OUTPUT_CAP else str(in_output)
            super().__init__(
                f"no input to process: {many} file(s) match the input patterns {shown} "
                f"under {display_path(base_dir)}, but all are inside the output folder "
                f"{display_path(output)}, and inputs are never taken from there (results "
                "would become inputs); put the output folder elsewhere, outside what the "
                "patterns reach (say `output: ../out`), or move the photos out of it"
            )
            return
        super().__init__(
            f"no file matches the input patterns {shown} under {display_path(base_dir)}{hint}; "
            f"check the patterns, and that the folder (or network share) is there and mounted"
        )


class InputPatternError(UsageError):
    """An input pattern that cannot be used (too many brace alternatives)."""


# --------------------------------------------------------------------- display


_CONTROL_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def display_path(path: str | os.PathLike[str]) -> str:
    """``path`` safe for a one-line message: control characters escaped (``\\n``),
    bytes that were not valid UTF-8 shown as ``\\xNN`` (they arrive as lone
    surrogates from ``os.fsdecode``), everything else as it is."""
    text = os.fspath(path)
    if text.isprintable():
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:
            pass
        else:
            return text
    out = []
    for ch in text:
        code = ord(ch)
        if 0xDC80 <= code <= 0xDCFF:  # surrogateescape: one undecodable byte
            out.append(f"\\x{code - 0xDC00:02x}")
        elif ch in _CONTROL_ESCAPES:
            out.append(_CONTROL_ESCAPES[ch])
        elif 0xD800 <= code <= 0xDFFF or not ch.isprintable():
            out.append(f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")
        else:
            out.append(ch)
    return "".join(out)


def _bytes_text(n: int) -> str:
    for unit, size in (("GB", 1024**3), ("MB", 1024**2), ("KB", 1024)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{n:,} bytes"


# -------------------------------------------------------------------- problems


def _kind_of(mode: int) -> str:
    if stat.S_ISDIR(mode):
        return "a folder"
    if stat.S_ISFIFO(mode):
        return "a FIFO (named pipe)"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode):
        return "a character device"
    if stat.S_ISBLK(mode):
        return "a block device"
    return "not a regular file"


def _not_a_file(path: str, mode: int) -> InputProblem:
    kind = _kind_of(mode)
    return InputProblem(
        f"{display_path(path)}: is {kind}, not a regular file, so it was not read; remove it "
        f"from the input folder or narrow the input patterns",
        code=INPUT_NOT_A_FILE,
    )


def problem_for_os_error(path: str, exc: OSError) -> InputProblem:
    """The :class:`InputProblem` a failed ``stat``/``open``/``read`` of ``path`` means."""
    shown = display_path(path)
    if exc.errno == errno.ELOOP:
        return InputProblem(
            f"{shown}: symlink loop (the link leads back to itself); fix the link or remove it",
            code=INPUT_SYMLINK_LOOP,
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR):
        try:
            is_link = stat.S_ISLNK(os.lstat(path).st_mode)
        except OSError:
            is_link = False
        if is_link:
            try:
                target = f" {display_path(os.readlink(path))}"
            except OSError:
                target = ""
            return InputProblem(
                f"{shown}: broken symlink (its target{target} does not exist); fix the link "
                f"or remove it",
                code=INPUT_BROKEN_SYMLINK,
            )
        return InputProblem(
            f"{shown}: no longer exists (moved or deleted after the inputs were listed); "
            f"rerun to pick it up where it is now",
            code=INPUT_MISSING,
        )
    reason = exc.strerror or type(exc).__name__
    return InputProblem(
        f"{shown}: cannot read it ({reason}); check that it is readable (permissions, a "
        f"disconnected share)",
        code=INPUT_UNREADABLE,
    )


def too_large_problem(
    path: str | os.PathLike[str], size: int, cap: int, why: str = ""
) -> InputProblem:
    """``INPUT_TOO_LARGE``: ``path`` holds ``size`` bytes, over the ``cap`` the pipeline
    reads for one input (``why``: the reason for the cap, e.g. the operation's limit)."""
    reason = f" ({why})" if why else ""
    return InputProblem(
        f"{display_path(path)}: {_bytes_text(size)} is more than the {_bytes_text(cap)} the "
        f"pipeline reads for one input{reason}; shrink or re-export it, or remove it from "
        f"the inputs",
        code=INPUT_TOO_LARGE,
    )


def stat_input(path: str | os.PathLike[str]) -> os.stat_result:
    """``os.stat`` of an input that must be a regular file; never opens it.

    Raises :class:`InputProblem` (``INPUT_NOT_A_FILE``, ``INPUT_BROKEN_SYMLINK``,
    ``INPUT_SYMLINK_LOOP``, ``INPUT_MISSING``, ``INPUT_UNREADABLE``) with a
    one-line message naming the path and what to do.
    """
    p = os.fspath(path)
    try:
        st = os.stat(p)
    except OSError as exc:
        raise problem_for_os_error(p, exc) from None
    if not stat.S_ISREG(st.st_mode):
        raise _not_a_file(p, st.st_mode)
    return st


# O_NONBLOCK: should a FIFO be swapped in between the stat and the open, opening it
# returns at once instead of waiting for a writer; the fstat then refuses it.
_OPEN_FLAGS = (
    os.O_RDONLY
    | getattr(os, "O_NONBLOCK", 0)
    | getattr(os, "O_NOCTTY", 0)
    | getattr(os, "O_CLOEXEC", 0)
    | getattr(os, "O_BINARY", 0)
)


def open_input(
    path: str | os.PathLike[str], max_bytes: int | None = None, *, why: str = ""
) -> tuple[IO[bytes], os.stat_result]:
    """Open an input for reading after checking it by ``stat``; ``(file, fstat)``.

    Nothing that is not a regular file is opened (see :func:`stat_input`), and a
    file over ``max_bytes`` is refused (``INPUT_TOO_LARGE``, ``why`` says why the
    cap) before it is opened. The ``fstat`` of the open descriptor is checked
    again, so a file swapped for a FIFO or a folder in between is refused too. The
    caller closes the file (use it in ``with``).
    """
    p = os.fspath(path)
    st = stat_input(p)
    if max_bytes is not None and st.st_size > max_bytes:
        raise too_large_problem(p, st.st_size, max_bytes, why)
    try:
        fd = os.open(p, _OPEN_FLAGS)
    except OSError as exc:
        raise problem_for_os_error(p, exc) from None
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise _not_a_file(p, st.st_mode)
        if max_bytes is not None and st.st_size > max_bytes:
            raise too_large_problem(p, st.st_size, max_bytes, why)
        return os.fdopen(fd, "rb"), st
    except BaseException:
        os.close(fd)
        raise


# -------------------------------------------------------------------- patterns
#
# Hand-written rather than fnmatch/glob/pathlib: none of them has braces, and glob's
# walker yields only what is a file or folder, so FIFOs and broken links would vanish
# again. The walk has to be ours (pruning, cycle and output-folder checks, entries
# for bad files); what is left is translating one segment to a regex. wcmatch could
# do that part, but it expands braces into separate patterns (one regex each) where
# an alternation inside one regex costs nothing, and it is a dependency for ~100
# lines whose rules are tested here against fnmatch (tests/unit/test_inputs.py).


def _bracket_end(s: str, i: int) -> int | None:
    """Index just past the ``]`` closing the ``[`` at ``s[i]`` (fnmatch rules), or None."""
    j = i + 1
    if j < len(s) and s[j] == "!":
        j += 1
    if j < len(s) and s[j] == "]":  # a "]" first is a literal member
        j += 1
    end = s.find("]", j)
    return None if end == -1 else end + 1


def _outside_brackets(s: str, j: int, stop: int) -> Iterator[tuple[int, str]]:
    """Each index and character of ``s[j:stop]`` that is not inside a ``[...]``
    bracket expression closing by ``stop`` (an unclosed ``[`` is an ordinary one)."""
    while j < stop:
        ch = s[j]
        if ch == "[":
            end = _bracket_end(s, j)
            if end is not None and end <= stop:
                j = end
                continue
        yield j, ch
        j += 1


def _group_end(s: str, i: int) -> int | None:
    """Index just past the ``}`` closing the ``{`` at ``s[i]`` when it is a brace
    group (a comma at its own level), else None."""
    depth = 0
    comma = False
    for j, ch in _outside_brackets(s, i, len(s)):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
            if depth == 0:
                return j + 1 if comma else None
        elif ch == "," and depth == 1:
            comma = True
    return None


def _alternatives(s: str, start: int, end: int) -> list[str]:
    """The comma-separated alternatives of the group ``s[start:end]`` (braces included)."""
    out: list[str] = []
    depth = 0
    last = start + 1
    for j, ch in _outside_brackets(s, start + 1, end - 1):
        if ch == "{":
            depth += 1
        elif ch == "}":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append(s[last:j])
            last = j + 1
    out.append(s[last : end - 1])
    return out


def _expand_slashed(text: str, budget: list[int]) -> list[str]:
    """Expand the brace groups that hold a ``/`` into separate patterns (they span
    segments); groups within one segment stay and become regex alternations, so
    ``**/*.{jpg,png}`` is still one walk."""
    i = 0
    while i < len(text):
        ch = text[i]
        if ch == "[":
            end = _bracket_end(text, i)
            if end is not None:
                i = end
                continue
        elif ch == "{":
            end = _group_end(text, i)
            if end is not None:
                if "/" in text[i:end]:
                    out: list[str] = []
                    for alt in _alternatives(text, i, end):
                        out.extend(_expand_slashed(text[:i] + alt + text[end:], budget))
                    return out
                i = end
                continue
        i += 1
    budget[0] -= 1
    if budget[0] < 0:
        raise InputPatternError(
            f"input pattern {text!r}: its braces expand to more than {_MAX_EXPANSIONS} "
            f"patterns; write fewer alternatives"
        )
    return [text]


# A wildcard never matches a name's leading ".": (?!\A\.) fails only at position 0
# before a ".", wherever the wildcard sits in the regex (inside an alternation too).
_NO_LEADING_DOT = r"(?!\A\.)"


def _bracket_regex(body: str) -> str:
    negate = body.startswith("!")
    if negate:
        body = body[1:]
    parts: list[str] = []
    i = 0
    while i < len(body):
        if i + 2 < len(body) and body[i + 1] == "-":
            lo, hi = body[i], body[i + 2]
            if lo <= hi:  # fnmatch drops reversed ranges
                parts.append(f"{re.escape(lo)}-{re.escape(hi)}")
            i += 3
            continue
        parts.append(re.escape(body[i]))
        i += 1
    if not parts:
        return "." if negate else "(?!)"
    return f"[{'^' if negate else ''}{''.join(parts)}]"


def _segment_regex(s: str, start: int, stop: int) -> str:
    out: list[str] = []
    i = start
    while i < stop:
        ch = s[i]
        if ch == "*":
            while i < stop and s[i] == "*":
                i += 1
            out.append(_NO_LEADING_DOT + ".*")
            continue
        if ch == "?":
            out.append(_NO_LEADING_DOT + ".")
        elif ch == "[" and (end := _bracket_end(s, i)) is not None and end <= stop:
            out.append(_NO_LEADING_DOT + _bracket_regex(s[i + 1 : end - 1]))
            i = end
            continue
        elif ch == "{" and (end := _group_end(s, i)) is not None and end <= stop:
            alts = []
            offset = i + 1
            for alt in _alternatives(s, i, end):
                alts.append(_segment_regex(s, offset, offset + len(alt)))
                offset += len(alt) + 1
            out.append(f"(?:{'|'.join(alts)})")
            i = end
            continue
        else:
            out.append(re.escape(ch))
        i += 1
    return "".join(out)


def _compile_segment(seg: str) -> re.Pattern[str]:
    # DOTALL: "?" and "*" match a newline in a name, as fnmatch does.
    return re.compile(_segment_regex(seg, 0, len(seg)), re.IGNORECASE | re.DOTALL)


def _is_magic(segment: str) -> bool:
    if any(ch in "*?[" for ch in segment):
        return True
    i = segment.find("{")
    while i != -1:
        if _group_end(segment, i) is not None:
            return True
        i = segment.find("{", i + 1)
    return False


@dataclass(frozen=True)
class _Pattern:
    """A pattern split into an absolute literal root and the segments to match below it."""

    text: str
    root: str  # absolute, normalised
    segments: tuple[str, ...]  # may be empty: the root itself is the (file) match
    matchers: tuple[re.Pattern[str] | None, ...]  # None for "**"
    _closures: dict[frozenset[int], frozenset[int]] = field(
        default_factory=dict, compare=False, repr=False
    )

    def start(self) -> frozenset[int]:
        return _closure(self.segments, frozenset({0}))

    def step(self, states: frozenset[int], name: str) -> frozenset[int]:
        """States after consuming one path component ``name``."""
        nxt: set[int] = set()
        n = len(self.segments)
        for i in states:
            if i >= n:
                continue
            matcher = self.matchers[i]
            if matcher is None:  # "**"
                if not name.startswith("."):  # ** never matches hidden directories
                    nxt.add(i)
                continue
            if matcher.fullmatch(name):
                nxt.add(i + 1)
        if not nxt:
            return _NONE
        # The closure depends on the state set alone, and a pattern has few of those:
        # worked out once each (this runs once per directory entry walked).
        found = frozenset(nxt)
        closed = self._closures.get(found)
        if closed is None:
            closed = self._closures[found] = _closure(self.segments, found)
        return closed

    def accepts(self, states: frozenset[int]) -> bool:
        return len(self.segments) in states

    def descends(self, states: frozenset[int]) -> bool:
        """Can a path below the current one still match?"""
        return any(i < len(self.segments) for i in states)

    def matches(self, path: str) -> bool:
        """Would the walk of this pattern reach ``path`` (absolute, normalised)?"""
        if self.root == path:
            return not self.segments
        prefix = self.root if self.root.endswith(os.sep) else self.root + os.sep
        if not path.startswith(prefix):
            return False
        states = self.start()
        for name in path[len(prefix) :].split(os.sep):
            states = self.step(states, name)
            if not states:
                return False
        return self.accepts(states)


_NONE: frozenset[int] = frozenset()


def _closure(segments: tuple[str, ...], states: frozenset[int]) -> frozenset[int]:
    # "**" may match zero directories: being before it also means being after it.
    out = set(states)
    for i in sorted(states):
        j = i
        while j < len(segments) and segments[j] == "**":
            j += 1
            out.add(j)
    return frozenset(out)


def _compile_one(base_dir: str, text: str, source: str) -> _Pattern:
    expanded = os.path.expanduser(text) if text.startswith("~") else text
    if os.path.isabs(expanded):
        anchor = os.path.splitdrive(expanded)[0] + os.sep
        rest = expanded[len(anchor) :]
        root = anchor
    else:
        rest = expanded
        root = base_dir
    parts = [p for p in rest.replace(os.sep, "/").split("/") if p not in ("", ".")]
    # Collapse runs of "**": they match the same thing as one and would only add states.
    segments: list[str] = []
    for part in parts:
        if part == "**" and segments and segments[-1] == "**":
            continue
        segments.append(part)
    # The literal leading part (including "..") is joined, not scanned. When every
    # segment is literal the root is the file itself and nothing is left to match.
    literal = 0
    while literal < len(segments) and not _is_magic(segments[literal]):
        literal += 1
    root = os.path.normpath(os.path.join(root, *segments[:literal]))
    rest_segments = tuple(segments[literal:])
    return _Pattern(
        text=source,
        root=root,
        segments=rest_segments,
        matchers=tuple(None if s == "**" else _compile_segment(s) for s in rest_segments),
    )


def _compile(base_dir: str, patterns: Sequence[str]) -> list[_Pattern]:
    budget = [_MAX_EXPANSIONS]
    out: list[_Pattern] = []
    for text in patterns:
        out.extend(_compile_one(base_dir, t, text) for t in _expand_slashed(text, budget))
    return out


def pattern_problem(text: str) -> str | None:
    """Why the input pattern ``text`` can't be used, or ``None``: for a manifest
    validator, so the error can name the manifest's line before anything runs."""
    try:
        _expand_slashed(text, [_MAX_EXPANSIONS])
    except InputPatternError as exc:
        return str(exc)
    return None


# ------------------------------------------------------------------------ walk


def _under(path: str, excluded: Sequence[str]) -> bool:
    for ex in excluded:
        if path == ex or path.startswith(ex if ex.endswith(os.sep) else ex + os.sep):
            return True
    return False


# What a listing says of an entry (from d_type where the OS gives it; a symlink is
# followed): a folder to descend into, a regular file, or anything else (FIFO,
# socket, device, broken or looping link), which is classified by stat if matched.
_DIR, _FILE, _OTHER = 0, 1, 2


# Names sorted in runs of this many; each run is kept as one string.
_RUN = 4096
_SEP = "\0"  # the one character no file name holds


def _listing(path: str) -> Iterator[tuple[str, int]]:
    """``(name, kind)`` sorted by name. Raises ``OSError`` (here, not while iterating)
    if ``path`` can't be listed.

    A folder of 10^5 photos is common, and as a list of ``(name, kind)`` tuples its
    listing held 12 MB for the whole walk: most of a rerun's memory growth from 10^3
    to 10^5 inputs (README "Performance"). So names are sorted in runs of
    :data:`_RUN`, each kept as one string (``name NUL kind NUL name NUL kind...``,
    about the bytes of the names), and merged lazily; a name never holds NUL.
    ``name NUL kind`` sorts as ``name`` does (NUL sorts before any other character),
    so the runs and the merge agree.
    """
    runs: list[str] = []
    run: list[str] = []
    with os.scandir(path) as it:
        for entry in it:
            try:
                kind = _DIR if entry.is_dir() else _FILE if entry.is_file() else _OTHER
            except OSError:  # ELOOP, EACCES on the target: classified when matched
                kind = _OTHER
            run.append(f"{entry.name}{_SEP}{kind}")
            if len(run) >= _RUN:
                run.sort()
                runs.append(_SEP.join(run))
                run = []
    if run:
        run.sort()
        runs.append(_SEP.join(run))
    if len(runs) == 1:
        return _unpacked(runs[0])
    return heapq.merge(*map(_unpacked, runs))


def _unpacked(run: str) -> Iterator[tuple[str, int]]:
    """The ``(name, kind)`` of a run made by :func:`_listing`, one at a time."""
    pos, end, find = 0, len(run), run.find
    while pos < end:
        cut = find(_SEP, pos)
        yield run[pos:cut], ord(run[cut + 1]) - 48  # the kind's digit
        pos = cut + 3


def _dir_id(path: str) -> tuple[int, int] | None:
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


@dataclass(frozen=True)
class _Exclude:
    """The output folder, by path (lexical and real) and by directory identity."""

    paths: tuple[str, ...] = ()
    dir_ids: frozenset[tuple[int, int]] = frozenset()

    @classmethod
    def of(cls, exclude: Path | None) -> _Exclude:
        if exclude is None:
            return cls()
        lexical = os.path.normpath(os.path.abspath(exclude))
        real = os.path.realpath(lexical)
        ident = _dir_id(lexical)
        return cls(
            paths=(lexical,) if real == lexical else (lexical, real),
            dir_ids=frozenset({ident}) if ident is not None else frozenset(),
        )

    def covers_root(self, root: str) -> bool:
        return _under(root, self.paths) or _under(os.path.realpath(root), self.paths)


def _unlistable(path: str, exc: OSError) -> InputProblem:
    reason = exc.strerror or type(exc).__name__
    return InputProblem(
        f"{display_path(path)}: cannot list this folder ({reason}), so the inputs in it were "
        f"not seen; check its permissions (or the share it is on)",
        code=INPUT_UNREADABLE,
    )


# A walk yields (path, kind, problem): a candidate file (_FILE/_OTHER, classified by
# the caller) or a folder that could not be listed (_DIR with its problem).
_Found = tuple[str, int, InputProblem | None]


def _walk(pattern: _Pattern, exclude: _Exclude) -> Iterator[_Found]:
    excluded = exclude.paths
    if exclude.covers_root(pattern.root):
        return
    if not pattern.segments:
        if os.path.lexists(pattern.root) and not os.path.isdir(pattern.root):
            yield pattern.root, _OTHER, None
        return
    root_id = _dir_id(pattern.root)
    if root_id is None:
        return
    try:
        top = _listing(pattern.root)
    except NotADirectoryError:
        return
    except OSError as exc:
        yield pattern.root, _DIR, _unlistable(pattern.root, exc)
        return
    # Explicit stack of (dir, states, its sorted entries still to see): memory is one
    # listing per level of the current path, never the whole tree.
    stack: list[tuple[str, frozenset[int], Iterator[tuple[str, int]]]] = [
        (pattern.root, pattern.start(), top)
    ]
    on_path: list[tuple[int, int]] = [root_id]
    step, accepts = pattern.step, pattern.accepts
    while stack:
        dirpath, states, entries = stack[-1]
        head = dirpath if dirpath.endswith(os.sep) else dirpath + os.sep
        entered = False
        # The entries of the directory on top, in a tight loop (once per entry walked).
        for name, kind in entries:
            nxt = step(states, name)
            if not nxt:
                continue
            full = head + name  # os.path.join, without its cost: a listed name has no "/"
            if _under(full, excluded):
                continue
            if kind != _DIR:
                if accepts(nxt):
                    yield full, kind, None
                continue
            # A directory is worth entering only if some state still has segments left.
            if not pattern.descends(nxt):
                continue
            ident = _dir_id(full)
            # Vanished, a symlink cycle, or the output folder reached through a symlink.
            if ident is None or ident in on_path or ident in exclude.dir_ids:
                continue
            try:
                listing = _listing(full)
            except OSError as exc:
                if not isinstance(exc, (FileNotFoundError, NotADirectoryError)):
                    yield full, _DIR, _unlistable(full, exc)
                continue
            stack.append((full, nxt, listing))
            on_path.append(ident)
            entered = True
            break
        if not entered:
            stack.pop()
            on_path.pop()


# --------------------------------------------------------------------- entries


class InputEntry:
    """One matched input: a regular file (``stat`` set) or a problem (``problem`` set).

    ``path`` is absolute and normalised (``..`` resolved lexically, symlinks kept);
    ``rel`` is :func:`input_relpath` of it (where its results go under the output
    folder). ``stat`` is the ``os.stat`` of the file (a symlink followed), taken when
    it was listed: feed it to :meth:`pipeline.identity.FileSignature.of`.
    ``problem`` says why the entry cannot be used (its ``code`` is one of the
    ``INPUT_*`` codes, its ``message`` one line naming the path and what to do).

    ``path_text`` is ``str(path)``. The :class:`~pathlib.Path` itself is made on
    first use: a rerun over 10^6 unchanged inputs needs only the text, and building
    a ``Path`` costs more than the ``stat`` of the file. Read-only, compared by value.
    """

    __slots__ = ("_path", "path_text", "problem", "rel", "stat")

    path_text: str
    rel: str
    stat: os.stat_result | None
    problem: InputProblem | None
    _path: Path | None

    def __init__(
        self,
        path: str | os.PathLike[str],
        rel: str,
        stat: os.stat_result | None,
        problem: InputProblem | None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "_path", path if isinstance(path, Path) else None)
        set_(self, "path_text", os.fspath(path))
        set_(self, "rel", rel)
        set_(self, "stat", stat)
        set_(self, "problem", problem)

    @property
    def path(self) -> Path:
        path = self._path
        if path is None:
            path = Path(self.path_text)
            object.__setattr__(self, "_path", path)
        return path

    @property
    def ok(self) -> bool:
        return self.problem is None

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"InputEntry is read-only: cannot set {name}")

    def _fields(self) -> tuple[object, ...]:
        return (self.path_text, self.rel, self.stat, self.problem)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, InputEntry):
            return NotImplemented
        return self._fields() == other._fields()

    def __hash__(self) -> int:
        return hash((self.path_text, self.rel))

    def __repr__(self) -> str:
        return (
            f"InputEntry(path={self.path_text!r}, rel={self.rel!r}, stat={self.stat!r}, "
            f"problem={self.problem!r})"
        )


class _RelMaker:
    """:func:`input_relpath` of normalised absolute paths, without its cost in the
    common case (under ``base``): a million entries are a million calls."""

    def __init__(self, base: str) -> None:
        self.base = base
        self.prefix = base if base.endswith(os.sep) else base + os.sep
        self.fast = os.path.dirname(base) != base  # not the file-system root
        self._dirs: dict[str, str] = {}  # folder outside base -> its mapped prefix

    def __call__(self, path: str) -> str:
        prefix = self.prefix
        if self.fast and path.startswith(prefix):
            tail = path[len(prefix) :]
            parts = tail.split(os.sep)
            if "" not in parts and "." not in parts and ".." not in parts:
                if os.sep == "/" and "_" not in tail:
                    return tail  # nothing to escape (the usual case)
                return "/".join(_escape(p) for p in parts)
        # Outside base (``_up``/``_abs``): the mapping is one per component, so the
        # folder's part is worked out once per folder, not once per file.
        folder, name = os.path.split(path)
        if not name or name in (".", "..") or self.prefix.startswith(path + os.sep):
            # (a path that is base itself or one of its folders: never a file)
            return input_relpath(Path(self.base), Path(path))
        mapped = self._dirs.get(folder)
        if mapped is None:
            probe = input_relpath(Path(self.base), Path(os.path.join(folder, "x")))
            mapped = probe[:-1]  # "<folder's mapping>/" (or "" under base itself)
            if len(self._dirs) > 4096:
                self._dirs.clear()
            self._dirs[folder] = mapped
        return mapped + _escape(name)


def _entry(rel_of: _RelMaker, path: str, problem: InputProblem | None) -> InputEntry:
    rel = rel_of(path)
    if problem is not None:
        return InputEntry(path, rel, None, problem)
    # stat_input inlined (the hot path of a rerun): a regular file, else its problem.
    try:
        st = os.stat(path)
    except OSError:
        st = None
    if st is not None and stat.S_ISREG(st.st_mode):
        return InputEntry(path, rel, st, None)
    try:
        st = stat_input(path)
    except InputProblem as exc:
        return InputEntry(path, rel, None, exc)
    return InputEntry(path, rel, st, None)  # became a regular file in between


def _hints(compiled: Sequence[_Pattern]) -> list[str]:
    hints: list[str] = []
    for pattern in compiled:
        root = display_path(pattern.root)
        if pattern.segments and not os.path.isdir(pattern.root):
            hint = f"{root} does not exist" if not os.path.lexists(pattern.root) else ""
            hint = hint or f"{root} is not a folder"
        elif not pattern.segments and os.path.isdir(pattern.root):
            hint = f"{root} is a folder: write {pattern.text.rstrip('/')}/**/*.jpg for the photos in it"
        else:
            continue
        if hint not in hints:
            hints.append(hint)
    return hints[:3]


def iter_input_entries(
    base_dir: Path, patterns: Sequence[str], exclude: Path | None = None
) -> Iterator[InputEntry]:
    """Yield every entry matched by ``patterns``, lazily, once each, good or bad.

    See the module docstring for the pattern rules and what counts as an entry.
    Raises :class:`NoInputsMatched` when the iteration ends without a single entry,
    and :class:`InputPatternError` (before yielding anything) for a pattern whose
    braces expand too far.
    """
    base = os.path.normpath(os.path.abspath(base_dir))
    rel_of = _RelMaker(base)
    compiled = _compile(base, patterns)
    excluded = _Exclude.of(exclude)
    found = False
    # Folders that could not be listed are reported once even when several patterns
    # try them (few in practice: kept in memory, unlike the files).
    unlistable: set[str] = set()
    for j, pattern in enumerate(compiled):
        earlier = compiled[:j]
        for path, _kind, problem in _walk(pattern, excluded):
            if problem is not None:
                if path in unlistable:
                    continue
                unlistable.add(path)
            # Dedupe without memory: an earlier pattern that matches this path
            # has already yielded it.
            elif any(p.matches(path) for p in earlier):
                continue
            found = True
            yield _entry(rel_of, path, problem)
    if not found:
        in_output = _count_in_output(compiled, excluded)
        raise NoInputsMatched(
            patterns, Path(base), _hints(compiled), in_output=in_output,
            output=Path(excluded.paths[0]) if in_output else None,
        )  # fmt: skip


def _count_in_output(compiled: Sequence[_Pattern], excluded: _Exclude) -> int:
    """How many files the patterns match when the output folder is not left out:
    nothing matched with it left out, so every one of them is inside it."""
    if not excluded.paths:
        return 0
    seen: set[str] = set()
    for pattern in compiled:
        for path, _kind, problem in _walk(pattern, _Exclude()):
            if problem is None:
                seen.add(path)
                if len(seen) >= _IN_OUTPUT_CAP:
                    return len(seen)
    return len(seen)


def iter_inputs(
    base_dir: Path, patterns: Sequence[str], exclude: Path | None = None
) -> Iterator[Path]:
    """The paths of the usable entries of :func:`iter_input_entries`, lazily.

    Kept for callers that only want files: problem entries are left out, and a
    pattern set that matches nothing yields nothing (no :class:`NoInputsMatched`).
    """
    try:
        for entry in iter_input_entries(base_dir, patterns, exclude):
            if entry.problem is None:
                yield entry.path
    except NoInputsMatched:
        return


def count_inputs(base_dir: Path, patterns: Sequence[str], exclude: Path | None = None) -> int:
    """How many files :func:`iter_inputs` yields, counted while streaming."""
    return sum(1 for _ in iter_inputs(base_dir, patterns, exclude))


_RESERVED = ("_up", "_abs")


def _escape(component: str) -> str:
    # Real names that look like our markers get one more "_", so the mapping stays
    # injective: "_up" -> "__up", "__up" -> "___up"; markers are never produced by
    # escaping.
    stripped = component.lstrip("_")
    if component.startswith("_") and f"_{stripped}" in _RESERVED:
        return "_" + component
    return component


def input_relpath(base_dir: Path, path: Path) -> str:
    """A safe posix relative path that mirrors ``path`` under an output folder.

    * under ``base_dir``: the path relative to it (``shoots/a/1.jpg``);
    * outside it but sharing an ancestor other than the file-system root: each
      ``..`` becomes ``_up`` (``_up/shared/1.jpg``);
    * otherwise: ``_abs/`` + the absolute path without its root
      (``_abs/mnt/data/1.jpg``; a Windows drive becomes its letter).

    Real components named like the markers are escaped with one more ``_``, so two
    different inputs never map to the same path. The result never contains ``..``,
    ``.`` or empty components, and is never absolute.
    """
    base = os.path.normpath(os.path.abspath(base_dir))
    full = os.path.normpath(os.path.abspath(path))
    try:
        common = os.path.commonpath([base, full])
    except ValueError:  # different drives (Windows)
        common = ""
    parts: list[str]
    if common and os.path.dirname(common) != common:  # they share more than the root
        rel = os.path.relpath(full, base)
        raw = [p for p in rel.replace(os.sep, "/").split("/") if p not in ("", ".")]
        parts = []
        leading = True
        for p in raw:
            if p == ".." and leading:
                parts.append("_up")
                continue
            leading = False
            parts.append(_escape(p))
    else:
        pure = PureWindowsPath(full) if os.name == "nt" else PurePosixPath(full)
        drive = pure.drive.rstrip(":\\/").replace(":", "") if pure.drive else ""
        tail = [p for p in pure.parts[1:] if p not in ("", ".", "..")]
        parts = ["_abs", *([drive] if drive else []), *(_escape(p) for p in tail)]
    # Defence in depth: nothing that could climb out of the folder it is joined under.
    safe = [p if p not in ("..", ".", "") else "_" for p in parts]
    return "/".join(safe) if safe else "_"
