"""YAML documents that remember where every value came from.

Config and manifest errors must name the file, the line and the field. PyYAML's
``safe_load`` throws the positions away, so :func:`load_yaml_with_lines` composes
the node graph once with ``SafeLoader`` (which keeps ``start_mark`` on every node),
builds the plain Python data from that same graph, and keeps the graph so
:meth:`YamlDoc.line_of` can map a key path such as
``("operations", 1, "params", "smoothing")`` back to a line.

Hostile files end in the same one-line errors rather than a traceback or a stall:
:func:`read_text_file` refuses anything but a regular UTF-8 file of at most
:data:`MAX_YAML_BYTES` (a FIFO is never opened), and the loader refuses control
characters, nesting deeper than :data:`MAX_YAML_DEPTH`, aliases that expand to
more than :data:`MAX_ALIAS_EXPANSION` nodes (billion laughs), anchors that contain
themselves, duplicate keys and several documents in one file.

:func:`validation_error_message` turns a pydantic ``ValidationError`` into one
readable line per problem, ``FILE:LINE: a.b[1].c: message``, without
pydantic's documentation URLs.
"""

from __future__ import annotations

import datetime
import os
import re
import stat
import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError
from yaml.composer import ComposerError
from yaml.constructor import ConstructorError
from yaml.reader import ReaderError

from pipeline.errors import UsageError

__all__ = [
    "MAX_ALIAS_EXPANSION",
    "MAX_YAML_BYTES",
    "MAX_YAML_DEPTH",
    "KeyPath",
    "YamlDoc",
    "display_path",
    "format_keypath",
    "load_yaml_with_lines",
    "read_text_file",
    "render_problems",
    "short_repr",
    "validation_error_message",
    "validation_problems",
]

KeyPath = Sequence[str | int]

# Shown at most; the rest are summarised so a broken file can't flood the terminal.
_MAX_PROBLEMS = 20


@dataclass(frozen=True)
class YamlDoc:
    """A parsed YAML file: ``data`` as ``yaml.safe_load`` would return it, plus positions."""

    path: Path
    data: Any
    root: yaml.Node | None

    def line_of(self, keypath: KeyPath) -> int:
        """1-based line of ``keypath``; 1 for the empty path or an empty document.

        A mapping step points at its *key* (the line that names the field), a list
        step at the item. When the path does not exist (a missing field), the line
        of the deepest step that does exist is returned: the mapping that should
        have held it.
        """
        node = self.root
        anchor: yaml.Node | None = None
        for step in keypath:
            found: tuple[yaml.Node, yaml.Node] | None = None
            if isinstance(node, yaml.MappingNode):
                for key_node, value_node in node.value:
                    if isinstance(key_node, yaml.ScalarNode) and key_node.value == str(step):
                        found = (key_node, value_node)
                        break
            elif (
                isinstance(node, yaml.SequenceNode)
                and isinstance(step, int)
                and 0 <= step < len(node.value)
            ):
                found = (node.value[step], node.value[step])
            if found is None:
                break
            anchor, node = found
        if anchor is None:
            return 1
        return int(anchor.start_mark.line) + 1

    def where(self, keypath: KeyPath) -> str:
        """``FILE:LINE`` for messages."""
        return f"{display_path(self.path)}:{self.line_of(keypath)}"


# ----------------------------------------------------------------------- reading

# A manifest or config is a few KB; a file above this is the wrong file (a photo, a
# log, a dump) or an attack, and parsing it would only waste memory.
MAX_YAML_BYTES = 1024 * 1024
# Real manifests nest about five levels (operations[0].params.x[1]). PyYAML's
# composer recurses once per level, so "[[[[..." 10 000 deep ends in RecursionError
# (a traceback); refusing at a depth no real file reaches keeps it a clean error.
MAX_YAML_DEPTH = 50
# Nodes that aliases may add when expanded. The node graph of a "billion laughs"
# file is tiny (each alias shares its anchor's node), but everything downstream
# (pydantic, the expansion of variants) walks the *expanded* tree, which grows
# exponentially: 1 KB became a minute and 380 MB. Counting the expanded size while
# composing stops it after a few thousand nodes, and still allows the ordinary use
# of anchors (a shared block of params merged with ``<<: *common``).
MAX_ALIAS_EXPANSION = 10_000

# Byte-order marks of encodings that are not UTF-8 (UTF-32 first: its LE BOM starts
# with the UTF-16 LE one).
_FOREIGN_BOMS = (
    (b"\xff\xfe\x00\x00", "UTF-32"),
    (b"\x00\x00\xfe\xff", "UTF-32"),
    (b"\xff\xfe", "UTF-16"),
    (b"\xfe\xff", "UTF-16"),
)


def display_path(path: Path | str) -> str:
    """``path`` for a one-line message: as is, or quoted when it holds control characters."""
    text = str(path)
    return text if text.isprintable() else repr(text)


def _line_at(data: bytes | str, offset: int) -> int:
    newline: Any = b"\n" if isinstance(data, bytes) else "\n"
    return data.count(newline, 0, max(0, offset)) + 1


def read_text_file(path: Path, error_cls: type[UsageError], *, what: str = "file") -> str:
    """The UTF-8 text of the regular file ``path``, refusing anything else in one line.

    ``stat`` comes first, so a FIFO, socket or device is refused without being
    opened (opening a FIFO for reading blocks until a writer appears); the file is
    then opened non-blocking and checked again on its descriptor (no race with a
    file swapped in between). Files over :data:`MAX_YAML_BYTES`, UTF-16/UTF-32 text
    and bytes that are not UTF-8 are refused with the line where the problem is.
    A UTF-8 byte-order mark is accepted and dropped.
    """
    shown = display_path(path)
    try:
        st = os.stat(path)
        if stat.S_ISDIR(st.st_mode):
            raise error_cls(f"{shown}: is a folder, not a YAML {what}")
        if not stat.S_ISREG(st.st_mode):
            raise error_cls(
                f"{shown}: is not a regular file ({_kind_of(st.st_mode)}); give a YAML {what}"
            )
        _check_size(shown, st.st_size, error_cls, what)
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise error_cls(f"{shown}: is not a regular file; give a YAML {what}")
            with os.fdopen(fd, "rb", closefd=False) as fp:
                data = fp.read(MAX_YAML_BYTES + 1)
        finally:
            os.close(fd)
    except FileNotFoundError:
        raise error_cls(f"{shown}: {what} not found") from None
    except OSError as exc:
        raise error_cls(f"{shown}: cannot read: {exc.strerror or exc}") from None
    except ValueError:  # a NUL byte in the path itself
        raise error_cls(f"{shown}: not a valid file name") from None
    _check_size(shown, len(data), error_cls, what)  # it grew since the stat
    for bom, name in _FOREIGN_BOMS:
        if data.startswith(bom):
            raise error_cls(f"{shown}:1: the {what} is {name} text; save it as UTF-8")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        line = _line_at(data, exc.start)
        bad = data[exc.start : exc.start + 1].hex()
        raise error_cls(
            f"{shown}:{line}: not UTF-8 text (byte 0x{bad}: {exc.reason}); save the {what} as UTF-8"
        ) from None


def _kind_of(mode: int) -> str:
    if stat.S_ISFIFO(mode):
        return "a FIFO"
    if stat.S_ISSOCK(mode):
        return "a socket"
    if stat.S_ISCHR(mode) or stat.S_ISBLK(mode):
        return "a device"
    return "not a file"


def _check_size(shown: str, size: int, error_cls: type[UsageError], what: str) -> None:
    if size > MAX_YAML_BYTES:
        raise error_cls(
            f"{shown}: the {what} is larger than {MAX_YAML_BYTES // 1024 // 1024} MB "
            f"({size / 1024 / 1024:.1f} MB); is this the right file?"
        )


class _LimitError(ComposerError):
    """A limit of :class:`_BoundedLoader` was hit at ``keypath``."""

    def __init__(self, problem: str, mark: Any, keypath: list[str | int]) -> None:
        super().__init__(None, None, problem, mark)
        self.keypath = keypath


class _BoundedLoader(yaml.SafeLoader):
    """``SafeLoader`` that refuses deep nesting, alias bombs and self-referencing anchors.

    PyYAML has no such limits (and no hook for them), so ``compose_node`` is
    wrapped: it tracks the nesting depth, the key path, and the expanded size (node
    count, as if every alias were copied out) of each finished node. An alias adds
    its anchor's expanded size to a running total capped at
    :data:`MAX_ALIAS_EXPANSION`; an alias to a node that is not finished yet is a
    node containing itself (``&a [*a]``), which PyYAML accepts as a recursive
    structure that nothing downstream can walk.
    """

    def __init__(self, stream: str) -> None:
        super().__init__(stream)
        self._frames: list[int] = [0]  # expanded size of the children composed so far
        self._sizes: dict[int, int] = {}  # id(node) -> expanded size, once finished
        self._alias_nodes = 0
        self._path: list[str | int] = []  # key path of the node being composed

    def _step(self, index: Any) -> list[str | int]:
        # compose_mapping_node passes the key node as the index of a value, and
        # compose_sequence_node the position; a key itself is composed with None.
        if isinstance(index, int):
            return [index]
        if isinstance(index, yaml.ScalarNode):
            return [str(index.value)]
        return []

    def compose_node(self, parent: yaml.Node | None, index: Any) -> yaml.Node | None:
        step = self._step(index)
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()  # type: ignore[no-untyped-call]
            target = self.anchors.get(event.anchor)
            if target is not None:  # (an undefined alias is PyYAML's own error)
                size = self._sizes.get(id(target))
                if size is None:
                    raise _LimitError(
                        f"alias *{event.anchor} refers to the node that contains it "
                        f"(a structure that contains itself); write the values out",
                        event.start_mark,
                        [*self._path, *step],
                    )
                self._alias_nodes += size
                if self._alias_nodes > MAX_ALIAS_EXPANSION:
                    raise _LimitError(
                        f"aliases expand to more than {MAX_ALIAS_EXPANSION} values "
                        f"(an alias bomb?); write the values out or use fewer aliases",
                        event.start_mark,
                        [*self._path, *step],
                    )
                self._frames[-1] += size
            return super().compose_node(parent, index)
        if len(self._frames) > MAX_YAML_DEPTH:
            raise _LimitError(
                f"nested more than {MAX_YAML_DEPTH} levels deep; a manifest or config "
                f"needs a handful",
                self.peek_event().start_mark,  # type: ignore[no-untyped-call]
                [*self._path, *step],
            )
        self._frames.append(0)
        self._path.extend(step)
        node = super().compose_node(parent, index)
        del self._path[len(self._path) - len(step) :]
        size = 1 + self._frames.pop()
        self._sizes[id(node)] = size
        self._frames[-1] += size
        return node

    def construct_object(self, node: yaml.Node, deep: bool = False) -> Any:
        # Some scalars pass PyYAML's resolver but not Python's constructors: the date
        # 2024-13-45, an int of 5 000 digits (Python's int() limit). They raise plain
        # ValueError; give them the node's position like any YAML error.
        try:
            return super().construct_object(node, deep=deep)
        except (ValueError, OverflowError) as exc:
            detail = str(exc).split(";")[0][:120]
            raise ConstructorError(
                None, None, f"cannot read this value ({detail})", node.start_mark
            ) from None


def _yaml_problem(exc: yaml.YAMLError, text: str) -> tuple[int, str]:
    if isinstance(exc, ReaderError):
        # PyYAML reports the offset in the whole text, not a line.
        char = exc.character if isinstance(exc.character, int) else 0
        name = " (NUL)" if char == 0 else ""
        return _line_at(text, exc.position), (
            f"control character U+{char:04X}{name} is not allowed in YAML "
            f"(a binary file, or text not saved as UTF-8?)"
        )
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem and exc.context not in exc.problem:
            problem = f"{problem} ({exc.context})"
        if "'\\t'" in problem:
            problem += "; YAML indents with spaces, not tabs"
        return line, problem
    return 1, str(exc).splitlines()[0] if str(exc) else "syntax error"


def _key_identity(node: yaml.Node) -> tuple[str, str] | None:
    if isinstance(node, yaml.ScalarNode):
        return (node.tag, node.value)
    return None


def _check_duplicate_keys(path: Path, root: yaml.Node | None, error_cls: type[UsageError]) -> None:
    """Reject a mapping that names a key twice (safe_load silently keeps the last)."""
    stack: list[tuple[yaml.Node, tuple[str | int, ...]]] = [(root, ())] if root else []
    seen_nodes: set[int] = set()  # aliases share nodes; visit each once
    while stack:
        node, at = stack.pop()
        if id(node) in seen_nodes:
            continue
        seen_nodes.add(id(node))
        if isinstance(node, yaml.MappingNode):
            first_line: dict[tuple[str, str], int] = {}
            for key_node, value_node in node.value:
                ident = _key_identity(key_node)
                # "<<" merge keys may legitimately repeat.
                if ident is not None and ident[1] != "<<":
                    line = int(key_node.start_mark.line) + 1
                    if ident in first_line:
                        raise error_cls(
                            f"{display_path(path)}:{line}: "
                            f"{format_keypath((*at, key_node.value))}: duplicate key (first "
                            f"given on line {first_line[ident]}); keep only one"
                        )
                    first_line[ident] = line
                step = str(key_node.value) if ident is not None else "?"
                stack.append((key_node, at))
                stack.append((value_node, (*at, step)))
        elif isinstance(node, yaml.SequenceNode):
            stack.extend((child, (*at, i)) for i, child in enumerate(node.value))


def load_yaml_with_lines(path: Path, error_cls: type[UsageError], *, what: str = "file") -> YamlDoc:
    """Parse ``path`` as YAML (safe types only) keeping node positions.

    Anything that is not a readable UTF-8 regular file of at most
    :data:`MAX_YAML_BYTES` (see :func:`read_text_file`), syntax errors, control
    characters, several documents in one file, duplicate keys, nesting deeper than
    :data:`MAX_YAML_DEPTH`, aliases expanding beyond :data:`MAX_ALIAS_EXPANSION`
    nodes and self-referencing anchors raise ``error_cls`` with one
    ``FILE:LINE: ...`` line. ``what`` names the file in messages (``manifest``).
    """
    text = read_text_file(path, error_cls, what=what)
    shown = display_path(path)
    loader: _BoundedLoader | None = None
    try:
        # The reader checks for control characters (NUL...) here, in the constructor.
        loader = _BoundedLoader(text)
        root = loader.get_single_node()
        _check_duplicate_keys(path, root, error_cls)
        data = loader.construct_document(root) if root is not None else None
    except _LimitError as exc:
        line, problem = _yaml_problem(exc, text)
        field = format_keypath(exc.keypath[:3]) + ("..." if len(exc.keypath) > 3 else "")
        raise error_cls(f"{shown}:{line}: {field or '(top level)'}: {problem}") from None
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc, text)
        raise error_cls(f"{shown}:{line}: invalid YAML: {problem}") from None
    except RecursionError:  # a safety net: the depth limit should make this unreachable
        raise error_cls(f"{shown}: invalid YAML: nested too deeply") from None
    finally:
        if loader is not None:
            loader.dispose()
    return YamlDoc(path=path, data=data, root=root)


_PLAIN_KEY = re.compile(r"[A-Za-z0-9_\-/]{1,60}")


def format_keypath(keypath: Iterable[str | int]) -> str:
    """``("operations", 1, "params", "x")`` -> ``operations[1].params.x``.

    A key that is not a plain name (spaces, dots, control characters, very long) is
    shown quoted and shortened, ``params['a\\nb']``, so a message stays one line.
    """
    out = ""
    for step in keypath:
        if isinstance(step, int):
            out += f"[{step}]"
        elif _PLAIN_KEY.fullmatch(step):
            out += f".{step}" if out else step
        else:
            text = repr(step)
            out += f"[{text if len(text) <= 40 else text[:37] + '...'}]"
    return out


def short_repr(value: Any) -> str:
    """A value as the user wrote it in YAML (``true``, ``null``, ``'text'``), shortened."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, datetime.date):  # YAML reads 2026-11-01 as a date
        return f"the date {value.isoformat()}"
    if isinstance(value, bytes):  # !!binary
        return f"{len(value)} bytes of binary data"
    # repr() escapes control characters and line separators, so a value can never
    # break the one-line message it is quoted in.
    text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."


def _unwrap(annotation: Any) -> list[Any]:
    """The candidate types inside ``X | None`` / ``Annotated`` / unions."""
    origin = typing.get_origin(annotation)
    if origin is typing.Annotated:
        return _unwrap(typing.get_args(annotation)[0])
    if origin is typing.Union or origin is types.UnionType:
        out: list[Any] = []
        for arg in typing.get_args(annotation):
            out.extend(_unwrap(arg))
        return out
    return [annotation]


def _allowed_keys(model: type[BaseModel] | None, loc: Sequence[str | int]) -> list[str] | None:
    """Field names of the sub-model that ``loc`` (minus its last step) points into."""
    if model is None:
        return None
    current: list[Any] = [model]
    for step in loc[:-1]:
        nxt: list[Any] = []
        for cand in current:
            if isinstance(cand, type) and issubclass(cand, BaseModel):
                info = cand.model_fields.get(str(step))
                if info is not None:
                    nxt.extend(_unwrap(info.annotation))
            else:
                origin = typing.get_origin(cand)
                args = typing.get_args(cand)
                if origin in (list, tuple) and args:
                    nxt.extend(_unwrap(args[0]))
                elif origin is dict and len(args) == 2:
                    nxt.extend(_unwrap(args[1]))
        current = nxt
    for cand in current:
        if isinstance(cand, type) and issubclass(cand, BaseModel):
            return list(cand.model_fields)
    return None


def _message(err: Any, model: type[BaseModel] | None, loc: Sequence[str | int]) -> str:
    kind = err.get("type", "")
    msg = str(err.get("msg", "invalid value"))
    value = err.get("input")
    if kind == "missing":
        return "required, but not given"
    if kind == "extra_forbidden":
        allowed = _allowed_keys(model, loc)
        hint = f"; known keys: {', '.join(sorted(allowed))}" if allowed else ""
        return f"unknown key{hint}"
    if kind in ("model_type", "model_attributes_type", "dict_type"):
        return f"expected a mapping of keys to values (got {short_repr(value)})"
    if kind in ("list_type", "tuple_type"):
        return f"expected a list (got {short_repr(value)})"
    if kind in ("value_error", "assertion_error"):
        # Our own validators' messages, minus pydantic's "Value error, " prefix.
        ctx = err.get("ctx") or {}
        inner = ctx.get("error")
        return str(inner) if inner is not None else msg.removeprefix("Value error, ")
    msg = msg[0].lower() + msg[1:] if msg else msg
    if value is not None and not isinstance(value, dict | list):
        msg = f"{msg} (got {short_repr(value)})"
    return msg


def validation_problems(
    doc: YamlDoc,
    exc: ValidationError,
    *,
    model: type[BaseModel] | None = None,
    prefix: Sequence[str | int] = (),
    field_word: str = "",
) -> list[tuple[int, str]]:
    """``(line, "a.b: message")`` for each problem of ``exc``, in file order.

    ``prefix`` is prepended to every error location (when the validated object is
    a sub-tree of the document). ``model`` lets unknown-key errors list the keys
    that are allowed there.
    """
    problems: list[tuple[int, str]] = []
    seen: set[str] = set()
    errors = exc.errors(include_url=False)
    # "[key]" marks an invalid mapping key: report it at the key itself, and drop the
    # errors about the value under that key (they would only repeat the mistake).
    bad_keys = [tuple(e["loc"][:-1]) for e in errors if e["loc"] and e["loc"][-1] == "[key]"]
    for err in errors:
        err_loc = tuple(err.get("loc", ()))
        is_key = bool(err_loc) and err_loc[-1] == "[key]"
        if not is_key and any(err_loc[: len(k)] == k for k in bad_keys):
            continue
        loc: list[str | int] = [s for s in (*prefix, *err_loc) if s != "[key]"]
        line = doc.line_of(loc)
        where = format_keypath(loc) or "(top level)"
        text = _message(err, model, loc[len(prefix) :])
        if is_key:
            text = f"not an allowed key: {text}"
        entry = f"{field_word}{where}: {text}"
        if entry not in seen:
            seen.add(entry)
            problems.append((line, entry))
    problems.sort(key=lambda p: p[0])  # stable: same-line problems keep pydantic's order
    return problems


def render_problems(path: Path, problems: Sequence[tuple[int, str]]) -> str:
    """One ``FILE:LINE: text`` line per problem, capped at a readable number."""
    shown = display_path(path)
    lines = [f"{shown}:{line}: {text}" for line, text in problems[:_MAX_PROBLEMS]]
    if len(problems) > _MAX_PROBLEMS:
        lines.append(f"{shown}: ... and {len(problems) - _MAX_PROBLEMS} more problems")
    return "\n".join(lines)


def validation_error_message(
    path: Path,
    doc: YamlDoc,
    exc: ValidationError,
    *,
    model: type[BaseModel] | None = None,
) -> str:
    """One line per problem: ``FILE:LINE: a.b.c: message``, first problem first."""
    return render_problems(path, validation_problems(doc, exc, model=model))
