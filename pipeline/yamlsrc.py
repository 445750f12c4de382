"""YAML documents that remember where every value came from.

Config and manifest errors must name the file, the line and the field. PyYAML's
``safe_load`` throws the positions away, so :func:`load_yaml_with_lines` composes
the node graph once with ``SafeLoader`` (which keeps ``start_mark`` on every node),
builds the plain Python data from that same graph, and keeps the graph so
:meth:`YamlDoc.line_of` can map a key path such as
``("operations", 1, "params", "smoothing")`` back to a line.

:func:`validation_error_message` turns a pydantic ``ValidationError`` into one
readable line per problem, ``FILE:LINE: field a.b[1].c: message``, without
pydantic's documentation URLs.
"""

from __future__ import annotations

import types
import typing
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from pipeline.errors import UsageError

__all__ = [
    "KeyPath",
    "YamlDoc",
    "format_keypath",
    "load_yaml_with_lines",
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
        return f"{self.path}:{self.line_of(keypath)}"


def _yaml_problem(exc: yaml.YAMLError) -> tuple[int, str]:
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        line = int(mark.line) + 1 if mark is not None else 1
        problem = exc.problem or exc.context or "syntax error"
        if exc.context and exc.problem and exc.context not in exc.problem:
            problem = f"{problem} ({exc.context})"
        return line, problem
    return 1, str(exc).splitlines()[0] if str(exc) else "syntax error"


def _key_identity(node: yaml.Node) -> tuple[str, str] | None:
    if isinstance(node, yaml.ScalarNode):
        return (node.tag, node.value)
    return None


def _check_duplicate_keys(path: Path, root: yaml.Node | None, error_cls: type[UsageError]) -> None:
    """Reject a mapping that names a key twice (safe_load silently keeps the last)."""
    stack: list[yaml.Node] = [root] if root is not None else []
    seen_nodes: set[int] = set()  # aliases share nodes; visit each once
    while stack:
        node = stack.pop()
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
                            f"{path}:{line}: duplicate key {key_node.value!r} "
                            f"(first given on line {first_line[ident]}); keep only one"
                        )
                    first_line[ident] = line
                stack.append(key_node)
                stack.append(value_node)
        elif isinstance(node, yaml.SequenceNode):
            stack.extend(node.value)


def load_yaml_with_lines(path: Path, error_cls: type[UsageError]) -> YamlDoc:
    """Parse ``path`` as YAML (safe types only) keeping node positions.

    Unreadable files, syntax errors, several documents in one file and duplicate
    keys raise ``error_cls`` with a one-line ``FILE:LINE: ...`` message.
    """
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except FileNotFoundError:
        raise error_cls(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error_cls(f"{path}: is a folder, not a YAML file") from None
    except UnicodeDecodeError as exc:
        raise error_cls(f"{path}: not UTF-8 text ({exc.reason}); save it as UTF-8") from None
    except OSError as exc:
        raise error_cls(f"{path}: cannot read: {exc.strerror or exc}") from None

    loader = yaml.SafeLoader(text)
    try:
        root = loader.get_single_node()
        _check_duplicate_keys(path, root, error_cls)
        data = loader.construct_document(root) if root is not None else None
    except yaml.YAMLError as exc:
        line, problem = _yaml_problem(exc)
        raise error_cls(f"{path}:{line}: invalid YAML: {problem}") from None
    finally:
        loader.dispose()
    return YamlDoc(path=path, data=data, root=root)


def format_keypath(keypath: Iterable[str | int]) -> str:
    """``("operations", 1, "params", "x")`` -> ``operations[1].params.x``."""
    out = ""
    for step in keypath:
        if isinstance(step, int):
            out += f"[{step}]"
        else:
            out += f".{step}" if out else str(step)
    return out


def short_repr(value: Any) -> str:
    """A value as the user wrote it in YAML (``true``, ``null``, ``'text'``), shortened."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
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
    field_word: str = "field ",
) -> list[tuple[int, str]]:
    """``(line, "field a.b: message")`` for each problem of ``exc``, in file order.

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
    lines = [f"{path}:{line}: {text}" for line, text in problems[:_MAX_PROBLEMS]]
    if len(problems) > _MAX_PROBLEMS:
        lines.append(f"{path}: ... and {len(problems) - _MAX_PROBLEMS} more problems")
    return "\n".join(lines)


def validation_error_message(
    path: Path,
    doc: YamlDoc,
    exc: ValidationError,
    *,
    model: type[BaseModel] | None = None,
) -> str:
    """One line per problem: ``FILE:LINE: field a.b.c: message``, first problem first."""
    return render_problems(path, validation_problems(doc, exc, model=model))
