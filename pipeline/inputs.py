"""Streaming discovery of input files.

:func:`iter_inputs` walks the file system lazily, one directory listing at a time,
so a manifest over a million photos never holds a million paths in memory. Each
pattern is split into a literal *root* (``../shared``, ``/data/shoots``) and the
wildcard segments after it; the walk starts at the root and descends only into
directories that can still match (segment-wise matching with a small NFA, so
``**`` never yields the same file twice for one pattern).

Pattern rules (posix-style, ``/`` separates segments):

* ``*``, ``?``, ``[...]`` match within one segment (case-sensitive); ``**`` as a
  whole segment matches zero or more directories.
* Absolute patterns, ``~`` and ``..`` in the literal leading part are allowed
  (``../shared/**/*.jpg``). A ``..`` after a wildcard matches nothing.
* Names starting with ``.`` are skipped unless the pattern segment that matches
  them starts with ``.`` itself (``.cache/*.jpg``, ``.*``); ``**`` never enters
  hidden directories.
* Only regular files (or symlinks to them) are yielded; anything at or under
  ``exclude`` (the output folder) is skipped. Symlinked directories are followed,
  but a directory already on the current walk path (a symlink loop) is not.
* Order is deterministic: entries sorted by name within each directory, depth
  first, patterns in the order given.
* A file matched by several patterns is yielded once, by the first pattern that
  matches it; later patterns re-check earlier ones instead of remembering paths.
"""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path, PurePosixPath, PureWindowsPath

__all__ = ["count_inputs", "input_relpath", "iter_inputs"]

_MAGIC = frozenset("*?[")


def _is_magic(segment: str) -> bool:
    return any(ch in _MAGIC for ch in segment)


@dataclass(frozen=True)
class _Pattern:
    """A pattern split into an absolute literal root and the segments to match below it."""

    text: str
    root: str  # absolute, normalised
    segments: tuple[str, ...]  # may be empty: the root itself is the (file) match

    def start(self) -> frozenset[int]:
        return _closure(self.segments, frozenset({0}))

    def step(self, states: frozenset[int], name: str) -> frozenset[int]:
        """States after consuming one path component ``name``."""
        nxt: set[int] = set()
        hidden = name.startswith(".")
        for i in states:
            if i >= len(self.segments):
                continue
            seg = self.segments[i]
            if seg == "**":
                if not hidden:  # ** never matches hidden directories
                    nxt.add(i)
                continue
            if hidden and not seg.startswith("."):
                continue
            if fnmatchcase(name, seg):
                nxt.add(i + 1)
        return _closure(self.segments, frozenset(nxt))

    def accepts(self, states: frozenset[int]) -> bool:
        return len(self.segments) in states

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


def _closure(segments: tuple[str, ...], states: frozenset[int]) -> frozenset[int]:
    # "**" may match zero directories: being before it also means being after it.
    out = set(states)
    for i in sorted(states):
        j = i
        while j < len(segments) and segments[j] == "**":
            j += 1
            out.add(j)
    return frozenset(out)


def _compile(base_dir: str, text: str) -> _Pattern:
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
    return _Pattern(text=text, root=root, segments=tuple(segments[literal:]))


def _under(path: str, excluded: Sequence[str]) -> bool:
    for ex in excluded:
        if path == ex or path.startswith(ex if ex.endswith(os.sep) else ex + os.sep):
            return True
    return False


def _is_regular(path: str) -> bool:
    try:
        return stat.S_ISREG(os.stat(path).st_mode)
    except OSError:
        return False


def _listing(path: str) -> list[tuple[str, bool, bool]]:
    """``(name, is_dir, is_regular_file)`` sorted by name; unreadable dirs are empty."""
    out: list[tuple[str, bool, bool]] = []
    try:
        with os.scandir(path) as it:
            for entry in it:
                try:
                    is_dir = entry.is_dir()
                    is_file = not is_dir and entry.is_file()
                except OSError:
                    continue
                out.append((entry.name, is_dir, is_file))
    except OSError:
        return []
    out.sort(key=lambda e: e[0])
    return out


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


def _walk(pattern: _Pattern, exclude: _Exclude) -> Iterator[str]:
    excluded = exclude.paths
    if exclude.covers_root(pattern.root):
        return
    if not pattern.segments:
        if _is_regular(pattern.root):
            yield pattern.root
        return
    root_id = _dir_id(pattern.root)
    if root_id is None:
        return
    # Explicit stack of (dir, states, sorted entries, next index, dir identity):
    # memory is one listing per level of the current path, never the whole tree.
    stack: list[tuple[str, frozenset[int], list[tuple[str, bool, bool]], list[int]]] = [
        (pattern.root, pattern.start(), _listing(pattern.root), [0])
    ]
    on_path: list[tuple[int, int]] = [root_id]
    while stack:
        dirpath, states, entries, cursor = stack[-1]
        if cursor[0] >= len(entries):
            stack.pop()
            on_path.pop()
            continue
        name, is_dir, is_file = entries[cursor[0]]
        cursor[0] += 1
        nxt = pattern.step(states, name)
        if not nxt:
            continue
        full = os.path.join(dirpath, name)
        if is_file:
            if pattern.accepts(nxt) and not _under(full, excluded):
                yield full
        elif is_dir:
            # A directory is worth entering only if some state still has segments left.
            if not any(i < len(pattern.segments) for i in nxt) or _under(full, excluded):
                continue
            ident = _dir_id(full)
            # Vanished, a symlink loop, or the output folder reached through a symlink.
            if ident is None or ident in on_path or ident in exclude.dir_ids:
                continue
            stack.append((full, nxt, _listing(full), [0]))
            on_path.append(ident)


def iter_inputs(
    base_dir: Path, patterns: Sequence[str], exclude: Path | None = None
) -> Iterator[Path]:
    """Yield every regular file matched by ``patterns``, lazily, once each.

    Paths are absolute and normalised (``..`` resolved lexically, symlinks kept).
    See the module docstring for the pattern rules.
    """
    base = os.path.normpath(os.path.abspath(base_dir))
    compiled = [_compile(base, p) for p in patterns]
    excluded = _Exclude.of(exclude)
    for j, pattern in enumerate(compiled):
        earlier = compiled[:j]
        for path in _walk(pattern, excluded):
            # Dedupe without memory: an earlier pattern that matches this path
            # has already yielded it.
            if any(p.matches(path) for p in earlier):
                continue
            yield Path(path)


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
