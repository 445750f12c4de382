"""The job manifest: model, validation with file/line/field errors, variant expansion.

The dataclasses below are the contract the engine relies on; keep their fields
(add freely). :func:`load_manifest` reads a YAML manifest, validates it (structure
with pydantic, operation params against :mod:`pipeline.operations`), and expands
list-valued params into one :class:`Variant` per combination. Every problem raises
:class:`~pipeline.errors.ManifestError` with one ``FILE:LINE: field: message`` line
per problem, first problem first; hostile files (binary, huge, alias bombs, deep
nesting) end the same way (see :mod:`pipeline.yamlsrc`).

Paths:

* ``inputs`` are glob patterns relative to the manifest's folder. Absolute
  patterns, ``~`` and ``..`` in the literal part before the first wildcard are
  allowed (``../photos/**/*.jpg``, ``/data/shoots/**/*.jpg``): inputs are only ever
  read, and photos rarely live beside the job file. A ``..`` after a wildcard
  (``a/*/../b.jpg``) would match nothing and is refused.
* ``output`` is the one folder the run writes to. It is refused when it resolves
  (symlinks followed) inside ``/proc``, ``/sys`` or ``/dev``, when it or the
  nearest existing folder above it is not a folder, and when that folder is not
  writable (read-only mount, no permission).
* ``image_template`` (face swap) must be a regular file (stat first: a FIFO is never
  opened) that decodes as an image the operation accepts, within its limits, or
  that ``auto_fix`` can convert/shrink.
"""

from __future__ import annotations

import contextlib
import difflib
import hashlib
import itertools
import json
import math
import os
import re
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    NonNegativeFloat,
    ValidationError,
    field_validator,
)

from pipeline.config import VendorName
from pipeline.errors import ManifestError, PermanentError
from pipeline.operations import MB, OPERATIONS, ImageLimits, OperationSpec, ParamSpec
from pipeline.vendors import vendor_names
from pipeline.yamlsrc import (
    KeyPath,
    YamlDoc,
    display_path,
    format_keypath,
    load_yaml_with_lines,
    render_problems,
    short_repr,
    validation_problems,
)

__all__ = [
    "MAX_VARIANTS",
    "Manifest",
    "Variant",
    "describe_plan",
    "load_manifest",
    "output_problem",
]

# Variants one operation may expand into. Each one multiplies the work items (and
# the bill) by the number of inputs; six sliders with a list of 101 values each
# would be 10^12 variants, built in memory before anything else could say no.
MAX_VARIANTS = 10_000


@dataclass(frozen=True)
class Variant:
    """One operation with one concrete set of params (after list expansion).

    ``params``: vendor codes (enum names already mapped to codes; ints as int), path
    params excluded; only the params the manifest gives (vendor defaults are not
    filled in). ``files``: path params (``image_template``) as absolute paths.
    ``label``: deterministic, filesystem-safe, human-readable, unique within the
    operation, e.g. ``service_choice=big_grin`` or ``smoothing=70,whitening=40``;
    ``default`` when there are no params.
    """

    operation: OperationSpec
    params: Mapping[str, int | str]
    files: Mapping[str, Path] = field(default_factory=dict)
    label: str = "default"

    def canonical(self) -> str:
        """Canonical JSON of op + params (files by path; the engine adds content hashes)."""
        return json.dumps(
            {
                "op": self.operation.name,
                "params": dict(sorted(self.params.items())),
                "files": {k: str(v) for k, v in sorted(self.files.items())},
            },
            sort_keys=True,
            separators=(",", ":"),
        )


@dataclass(frozen=True)
class Manifest:
    """A validated job. Variants are deduplicated and in manifest order."""

    path: Path  # the manifest file, absolute
    name: str
    base_dir: Path  # the manifest's folder; relative paths resolve against it
    inputs: tuple[str, ...]  # glob patterns relative to base_dir (or absolute)
    variants: tuple[Variant, ...]
    output: Path  # absolute
    concurrency: int = 8
    max_attempts: int = 5
    emulator: bool = False
    auto_fix: bool = False
    # Per-vendor spending cap in the vendor's unit (credits / units); absent = no cap.
    max_credits: Mapping[str, float] = field(default_factory=dict)
    # Stop starting items once this share of finished items has failed (in (0, 1]),
    # counted only after min_items_for_failure_ratio items finished; None: never.
    max_failure_ratio: float | None = None
    min_items_for_failure_ratio: int = 20


# --------------------------------------------------------------------------- model

_GLOB_MAGIC = frozenset("*?[{")


def _pattern_problem(pattern: str) -> str | None:
    """Why an ``inputs`` pattern can never work, or ``None`` (see the module docstring)."""
    if not pattern.strip():
        return "a pattern is empty; remove it or write a glob"
    if "\x00" in pattern or not pattern.isprintable():
        return f"pattern {short_repr(pattern)} contains control characters"
    seen_magic = False
    for segment in pattern.split("/"):
        if segment == ".." and seen_magic:
            return (
                f"pattern {short_repr(pattern)}: '..' after a wildcard matches nothing; put "
                f"'..' only before the first wildcard (e.g. ../photos/**/*.jpg)"
            )
        seen_magic = seen_magic or any(ch in _GLOB_MAGIC for ch in segment)
    return None


class _OperationModel(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    op: str
    params: dict[str, Any] = Field(default_factory=dict)

    @field_validator("params", mode="before")
    @classmethod
    def _none_is_empty(cls, value: Any) -> Any:
        # "params:" with nothing after it reads as null: same as no params.
        return {} if value is None else value


class _ManifestModel(BaseModel):
    """The top level of a manifest file. Operation params are checked separately."""

    # No inf/nan: YAML's .inf is a float, and an infinite cap means "no cap", which
    # is what leaving the key out already says.
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    name: str | None = None
    inputs: list[str]
    operations: list[_OperationModel]
    output: str
    concurrency: int = Field(default=8, ge=1, le=1000)
    max_attempts: int = Field(default=5, ge=1, le=100)
    emulator: bool = False
    auto_fix: bool = False
    # Keys: registered vendors (pipeline.vendors), refused like a Literal otherwise.
    max_credits: dict[VendorName, NonNegativeFloat] | None = None
    max_failure_ratio: float | None = Field(default=None, gt=0, le=1)
    min_items_for_failure_ratio: int = Field(default=20, ge=1, le=1_000_000_000)

    @field_validator("name")
    @classmethod
    def _name_not_blank(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty; omit it to use the file name")
        if value is not None and (not value.isprintable() or len(value) > 200):
            # It is printed in log and summary lines: one printable line.
            raise ValueError("must be one line of at most 200 printable characters")
        return value

    @field_validator("inputs", mode="before")
    @classmethod
    def _inputs_list(cls, value: Any) -> Any:
        return [value] if isinstance(value, str) else value

    @field_validator("inputs")
    @classmethod
    def _inputs_not_empty(cls, value: list[str]) -> list[str]:
        if not value:
            raise ValueError('give at least one glob pattern, e.g. ["photos/**/*.jpg"]')
        for pattern in value:
            problem = _pattern_problem(pattern)
            if problem:
                raise ValueError(problem)
        return value

    @field_validator("operations")
    @classmethod
    def _operations_not_empty(cls, value: list[_OperationModel]) -> list[_OperationModel]:
        if not value:
            known = ", ".join(OPERATIONS)
            raise ValueError(f"list at least one operation ({known})")
        return value

    @field_validator("output")
    @classmethod
    def _output_not_empty(cls, value: str) -> str:
        if not value.strip():
            raise ValueError("must name a folder, e.g. output: ../out/my-job")
        if "\x00" in value or not value.isprintable():
            raise ValueError(f"contains control characters ({short_repr(value)}); name a folder")
        return value

    @field_validator("max_credits", mode="before")
    @classmethod
    def _credits_shape(cls, value: Any) -> Any:
        if value is None or isinstance(value, dict):
            return value
        if isinstance(value, int | float) and not isinstance(value, bool):
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"must be a finite number >= 0 (got {short_repr(value)})")
            # A bare number caps each vendor at that amount in its own unit.
            return dict.fromkeys(vendor_names(), value)
        raise ValueError(
            f"expected a number (a cap for each vendor) or a mapping such as "
            f"{{ailab: 500, perfectcorp: 20}} (got {short_repr(value)})"
        )


# ------------------------------------------------------------------------- params


class _ParamProblem(Exception):
    """One invalid param value; carries the message without location."""


def _normalize_name(text: str) -> str:
    return re.sub(r"[\s\-]+", "_", text.strip().lower())


def _code_ranges(codes: list[int]) -> str:
    """``[1, 2, 3, 5]`` -> ``1-3 or 5``."""
    runs: list[str] = []
    ordered = sorted(set(codes))
    start = prev = ordered[0]
    for code in [*ordered[1:], None]:
        if code is not None and code == prev + 1:
            prev = code
            continue
        runs.append(str(start) if start == prev else f"{start}-{prev}")
        if code is not None:
            start = prev = code
    return runs[0] if len(runs) == 1 else ", ".join(runs[:-1]) + " or " + runs[-1]


def _code_phrase(codes: list[int]) -> str:
    """``1-35 or`` / ``10-16 or 100, or``: codes, then the word leading to names."""
    ranges = _code_ranges(codes)
    return f"{ranges}, or" if " or " in ranges else f"{ranges} or"


def _some_names(spec: ParamSpec, near: str | None, count: int = 3) -> list[str]:
    """Close matches for ``near`` first, then the first names of the table."""
    names = list(spec.choices)
    picked = difflib.get_close_matches(near, names, n=count, cutoff=0.6) if near else []
    for name in names:
        if len(picked) >= count:
            break
        if name not in picked:
            picked.append(name)
    return picked


def _enum_hint(spec: ParamSpec, near: str | None) -> str:
    int_codes = [c for c in spec.choices.values() if isinstance(c, int)]
    names = list(spec.choices)
    if int_codes:
        shown = ", ".join(_some_names(spec, near))
        return f"use a code {_code_phrase(int_codes)} a name such as {shown}"
    if len(names) <= 8:
        return "use one of " + ", ".join(names)
    return "use a name such as " + ", ".join(_some_names(spec, near))


def _legacy_message(spec: ParamSpec, code: int | str) -> str:
    # 0-3 are the V1.0 service_choice codes; V1.1 replaced them and whether they still
    # work live is unknown, so we never send them (docs/vendors.md, "AILab: legacy
    # expression codes").
    int_codes = [c for c in spec.choices.values() if isinstance(c, int)]
    current = _code_phrase(int_codes) if int_codes else "or"
    return (
        f"{code} is a legacy V1.0 code that the vendor replaced in V1.1 and may no longer "
        f"support; use a current code {current} a name such as "
        f"{', '.join(_some_names(spec, None))}"
    )


def _parse_enum(spec: ParamSpec, raw: Any) -> int | str:
    """A vendor code from a code (int or numeric string) or a readable name."""
    if isinstance(raw, bool) or not isinstance(raw, int | str):
        raise _ParamProblem(
            f"expected a name or a code, got {short_repr(raw)}; {_enum_hint(spec, None)}"
        )
    codes = set(spec.choices.values())
    if isinstance(raw, str) and re.fullmatch(r"\s*[+-]?\d+\s*", raw):
        raw_code: int | str = int(raw)
    else:
        raw_code = raw
    if isinstance(raw_code, int):
        if raw_code in spec.legacy_codes or str(raw_code) in spec.legacy_codes:
            raise _ParamProblem(_legacy_message(spec, raw_code))
        if raw_code in codes:
            return raw_code
        raise _ParamProblem(f"unknown code {short_repr(raw)}; {_enum_hint(spec, None)}")
    name = _normalize_name(raw_code)
    if name in spec.choices:
        return spec.choices[name]
    if name in spec.legacy_codes:
        raise _ParamProblem(_legacy_message(spec, raw_code))
    raise _ParamProblem(f"unknown value {short_repr(raw)}; {_enum_hint(spec, name)}")


def _parse_int(spec: ParamSpec, raw: Any) -> int:
    lo = spec.minimum if spec.minimum is not None else "-inf"
    hi = spec.maximum if spec.maximum is not None else "inf"
    if isinstance(raw, bool) or not isinstance(raw, int):
        raise _ParamProblem(f"expected a whole number {lo}-{hi}, got {short_repr(raw)}")
    if (spec.minimum is not None and raw < spec.minimum) or (
        spec.maximum is not None and raw > spec.maximum
    ):
        raise _ParamProblem(f"{raw} is out of range; use a whole number {lo}-{hi}")
    return raw


def _parse_choice(spec: ParamSpec, raw: Any) -> int | str:
    allowed = ", ".join(spec.choices)
    if not isinstance(raw, str):
        raise _ParamProblem(f"expected one of {allowed}, got {short_repr(raw)}")
    name = _normalize_name(raw)
    if name not in spec.choices:
        raise _ParamProblem(f"unknown value {short_repr(raw)}; use one of {allowed}")
    return spec.choices[name]


# A template bigger than this is refused before it is read, even with auto_fix (which
# would otherwise read and decode it whole for every item).
_MAX_TEMPLATE_BYTES = 64 * MB


@dataclass(frozen=True)
class _Context:
    """What checking a param value needs besides the value."""

    base_dir: Path
    limits: ImageLimits
    auto_fix: bool


def _parse_path(spec: ParamSpec, raw: Any, ctx: _Context) -> Path:
    if not isinstance(raw, str) or not raw.strip():
        raise _ParamProblem(f"expected a path to an image file, got {short_repr(raw)}")
    if "\x00" in raw or not raw.isprintable():
        raise _ParamProblem(f"{short_repr(raw)} contains control characters; give a file path")
    resolved = Path(os.path.normpath(ctx.base_dir / os.path.expanduser(raw)))
    shown = display_path(resolved)
    try:
        st = os.stat(resolved)  # never open before knowing it is a regular file
    except FileNotFoundError:
        raise _ParamProblem(
            f"file not found: {shown} (paths are relative to the manifest's folder)"
        ) from None
    except OSError as exc:
        raise _ParamProblem(f"{shown}: cannot read it ({exc.strerror or exc})") from None
    if stat.S_ISDIR(st.st_mode):
        raise _ParamProblem(f"{shown} is a folder; give the path of an image file")
    if not stat.S_ISREG(st.st_mode):
        raise _ParamProblem(f"{shown} is not a regular file; give the path of an image file")
    _check_template_image(resolved, st.st_size, ctx)
    return resolved


def _check_template_image(path: Path, size: int, ctx: _Context) -> None:
    """Refuse a template the run could never send: every item would fail on it."""
    from pipeline.images import check_limits_fixable, inspect_image

    shown = display_path(path)
    limit = ctx.limits.max_bytes if not ctx.auto_fix else _MAX_TEMPLATE_BYTES
    if size > max(limit, ctx.limits.max_bytes):
        raise _ParamProblem(
            f"{shown} is {size / MB:.1f} MB, over the {limit / MB:g} MB limit of "
            f"{ctx.limits.label}" + ("" if ctx.auto_fix else "; set auto_fix: true to shrink it")
        )
    try:
        info = inspect_image(path)
    except PermanentError as exc:
        raise _ParamProblem(exc.message) from None
    problems = check_limits_fixable(info, ctx.limits)
    blocking = [text for text, fixable in problems if not (fixable and ctx.auto_fix)]
    if not info.decodable and info.format is not None:
        blocking.append(info.error or f"{info.format} cannot be decoded here")
    if blocking:
        hint = ""
        if not ctx.auto_fix and all(fixable for _, fixable in problems) and problems:
            hint = "; set auto_fix: true to convert/shrink it, or fix the file"
        elif info.format is None or info.damaged:
            hint = "; use a JPEG or PNG photo of the face"
        raise _ParamProblem(f"{shown}: {'; '.join(blocking)}{hint}")


# A param value after parsing: a vendor code, or a file for path params.
_Value = int | str | Path


def _parse_value(spec: ParamSpec, raw: Any, ctx: _Context) -> _Value:
    if raw is None:
        raise _ParamProblem("no value given")
    if spec.kind == "int":
        return _parse_int(spec, raw)
    if spec.kind == "enum":
        return _parse_enum(spec, raw)
    if spec.kind == "choice":
        return _parse_choice(spec, raw)
    return _parse_path(spec, raw, ctx)


# ---------------------------------------------------------------------- expansion


def _display_name(spec: ParamSpec, code: int | str) -> str:
    """The readable name of an enum/choice code (the first name the table gives it)."""
    for name, value in spec.choices.items():
        if value == code:
            return name
    return str(code)


_UNSAFE = re.compile(r"[^A-Za-z0-9._=,-]")
_MAX_LABEL = 120


def _short_hash(text: str, n: int = 6) -> str:
    return hashlib.sha1(text.encode("utf-8")).hexdigest()[:n]


def _sanitize(label: str) -> str:
    safe = _UNSAFE.sub("_", label)
    if len(safe) > _MAX_LABEL:
        safe = f"{safe[: _MAX_LABEL - 9]}-{_short_hash(label, 8)}"
    return safe


@dataclass
class _Draft:
    operation: OperationSpec
    values: dict[str, _Value]  # param name -> parsed value, in manifest order


def _labels(drafts: list[_Draft]) -> list[str]:
    """Labels for the variants of ONE operation, unique among them."""
    # Two different template files with the same stem get a short hash of their path.
    stems: dict[tuple[str, str], set[Path]] = {}
    for d in drafts:
        for name, value in d.values.items():
            if isinstance(value, Path):
                stems.setdefault((name, value.stem), set()).add(value)
    labels: list[str] = []
    for d in drafts:
        parts: list[str] = []
        for name in sorted(d.values):
            value = d.values[name]
            spec = d.operation.param(name)
            if isinstance(value, Path):
                shown = value.stem
                if len(stems[(name, value.stem)]) > 1:
                    shown = f"{shown}-{_short_hash(str(value))}"
            elif spec is not None and spec.kind in ("enum", "choice"):
                shown = _display_name(spec, value)
            else:
                shown = str(value)
            parts.append(f"{name}={shown}")
        labels.append(_sanitize(",".join(parts)) if parts else "default")
    # Sanitising can still make two labels equal ("a b" and "a_b"): disambiguate.
    counts: dict[str, int] = {}
    for label in labels:
        counts[label] = counts.get(label, 0) + 1
    out: list[str] = []
    for label, d in zip(labels, drafts, strict=True):
        if counts[label] > 1:
            label = f"{label}-{_short_hash(json.dumps(_canonical_values(d), sort_keys=True))}"
        out.append(label)
    return out


def _canonical_values(d: _Draft) -> dict[str, Any]:
    return {
        "op": d.operation.name,
        "values": {k: str(v) if isinstance(v, Path) else v for k, v in sorted(d.values.items())},
    }


@dataclass(frozen=True)
class _Problems:
    """Where the problems of a manifest go: ``(line, "key.path: what is wrong")``."""

    doc: YamlDoc
    found: list[tuple[int, str]]

    def add(self, where: KeyPath, text: str) -> None:
        self.found.append((self.doc.line_of(where), f"{format_keypath(where)}: {text}"))


def _expand_operation(
    doc: YamlDoc,
    index: int,
    entry: _OperationModel,
    base_dir: Path,
    problems: list[tuple[int, str]],
    *,
    auto_fix: bool = False,
) -> list[_Draft]:
    """Validate one ``operations[index]`` entry and expand its lists (cross product)."""
    at: KeyPath = ("operations", index)
    found = _Problems(doc, problems)
    spec = OPERATIONS.get(entry.op)
    if spec is None:
        close = difflib.get_close_matches(entry.op[:100], list(OPERATIONS), n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        found.add(
            (*at, "op"),
            f"unknown operation {short_repr(entry.op)}; {hint}known: {', '.join(OPERATIONS)}",
        )
        return []
    ctx = _Context(base_dir=base_dir, limits=spec.limits, auto_fix=auto_fix)
    axes: list[tuple[str, list[_Value]]] = []
    ok = True
    for name, raw in entry.params.items():
        values = _parse_axis(spec, name, raw, ctx, (*at, "params", name), found)
        if values is None:
            ok = False
        else:
            axes.append((name, values))
    ok = _required_given(spec, entry, (*at, "params"), found) and ok
    if not ok:
        return []
    combos_count = math.prod(len(values) for _, values in axes)
    if combos_count > MAX_VARIANTS:
        found.add(
            (*at, "params"),
            f"the lists expand into {combos_count} variants (their cross product); at most "
            f"{MAX_VARIANTS} per operation: split the job or shorten the lists",
        )
        return []
    names = [name for name, _ in axes]
    combos = itertools.product(*(values for _, values in axes))
    return [_Draft(spec, dict(zip(names, combo, strict=True))) for combo in combos]


def _parse_axis(
    spec: OperationSpec, name: str, raw: Any, ctx: _Context, where: KeyPath, found: _Problems
) -> list[_Value] | None:
    """The distinct values of one param (one value or a list), or ``None`` when the
    param is unknown or any value is wrong (every problem reported)."""
    pspec = spec.param(name)
    if pspec is None:
        known = ", ".join(p.name for p in spec.params)
        close = difflib.get_close_matches(name[:100], [p.name for p in spec.params], n=1)
        hint = f"did you mean {close[0]}? " if close else ""
        found.add(where, f"unknown param for {spec.name}; {hint}known: {known}")
        return None
    if isinstance(raw, list) and not raw:
        found.add(where, "empty list; give at least one value (or remove the param)")
        return None
    raw_values = raw if isinstance(raw, list) else [raw]
    parsed: list[_Value] = []
    ok = True
    for j, item in enumerate(raw_values):
        item_at = (*where, j) if isinstance(raw, list) else where
        try:
            if isinstance(item, list | dict):
                raise _ParamProblem(
                    "expected a single value or a list of values (lists don't nest)"
                )
            value = _parse_value(pspec, item, ctx)
        except _ParamProblem as exc:
            found.add(item_at, str(exc))
            ok = False
            continue
        if value not in parsed:  # [big_grin, 12] is one value
            parsed.append(value)
    return parsed if ok else None


def _required_given(
    spec: OperationSpec, entry: _OperationModel, where: KeyPath, found: _Problems
) -> bool:
    """Whether every required param of ``spec`` is given; each missing one is reported
    with an example value."""
    ok = True
    for pspec in spec.params:
        if pspec.required and pspec.name not in entry.params:
            example = (
                next(iter(pspec.choices))
                if pspec.choices
                else "faces/template.jpg"
                if pspec.kind == "path"
                else str(pspec.default if pspec.default is not None else pspec.minimum)
            )
            found.add(
                where,
                f"{pspec.name} is required for {spec.name} ({pspec.help}), "
                f"e.g. {pspec.name}: {example}",
            )
            ok = False
    return ok


def _to_variants(drafts: list[_Draft]) -> tuple[Variant, ...]:
    # Dedupe (same op + same canonical params/files), keeping first occurrence order.
    unique: dict[str, _Draft] = {}
    for d in drafts:
        unique.setdefault(json.dumps(_canonical_values(d), sort_keys=True), d)
    kept = list(unique.values())
    by_op: dict[str, list[_Draft]] = {}
    for d in kept:
        by_op.setdefault(d.operation.name, []).append(d)
    label_of: dict[int, str] = {}
    for group in by_op.values():
        for d, label in zip(group, _labels(group), strict=True):
            label_of[id(d)] = label
    variants: list[Variant] = []
    for d in kept:
        params = {k: v for k, v in d.values.items() if not isinstance(v, Path)}
        files = {k: v for k, v in d.values.items() if isinstance(v, Path)}
        variants.append(Variant(d.operation, params, files, label_of[id(d)]))
    return tuple(variants)


# --------------------------------------------------------------------------- load


def load_manifest(path: Path) -> Manifest:
    """Read, validate and expand the manifest at ``path``.

    Relative paths (``inputs``, ``output``, path params) resolve against the
    manifest's folder. Raises :class:`ManifestError` naming file, line and field.
    """
    shown = display_path(path)
    doc = load_yaml_with_lines(path, ManifestError, what="manifest")
    if not isinstance(doc.data, dict):
        raise ManifestError(
            f"{shown}:1: (top level): a manifest is a mapping with at least inputs, "
            f"operations and output (got {_yaml_kind(doc.data)})"
        )
    abs_path = Path(os.path.abspath(path))
    base_dir = abs_path.parent
    auto_fix = doc.data.get("auto_fix") is True
    try:
        model = _ManifestModel.model_validate(doc.data)
    except ValidationError as exc:
        problems = validation_problems(doc, exc, model=_ManifestModel, field_word="")
        # Still check the params of every well-formed operation entry, so one run of
        # `pipeline validate` reports every problem of the file.
        entries = doc.data.get("operations")
        for i, raw in enumerate(entries if isinstance(entries, list) else []):
            try:
                entry = _OperationModel.model_validate(raw)
            except ValidationError:
                continue  # already reported by the top-level validation
            _expand_operation(doc, i, entry, base_dir, problems, auto_fix=auto_fix)
        problems.sort(key=lambda p: p[0])
        raise ManifestError(render_problems(path, problems)) from None

    problems = []
    drafts: list[_Draft] = []
    for i, entry in enumerate(model.operations):
        drafts.extend(_expand_operation(doc, i, entry, base_dir, problems, auto_fix=model.auto_fix))

    output = Path(os.path.normpath(base_dir / os.path.expanduser(model.output)))
    problem = output_problem(output)
    if problem:
        problems.append((doc.line_of(("output",)), f"output: {problem}"))
    if problems:
        problems.sort(key=lambda p: p[0])
        raise ManifestError(render_problems(path, problems))

    return Manifest(
        path=abs_path,
        name=model.name.strip() if model.name else abs_path.stem,
        base_dir=base_dir,
        inputs=tuple(model.inputs),
        variants=_to_variants(drafts),
        output=output,
        concurrency=model.concurrency,
        max_attempts=model.max_attempts,
        emulator=model.emulator,
        auto_fix=model.auto_fix,
        max_credits={str(k): v for k, v in (model.max_credits or {}).items()},
        max_failure_ratio=model.max_failure_ratio,
        min_items_for_failure_ratio=model.min_items_for_failure_ratio,
    )


def _yaml_kind(data: Any) -> str:
    if data is None:
        return "an empty file"
    if isinstance(data, list):
        return "a list"
    return f"the single value {short_repr(data)}"


# Kernel and device file systems: writing results there is never meant, and can do
# harm (/proc/sys, /sys/class/..., /dev/sda).
_SYSTEM_ROOTS = ("/proc", "/sys", "/dev")


def output_problem(output: Path) -> str | None:
    """Why ``output`` cannot be the job's output folder, or ``None``.

    Checked without creating anything: the folder resolved with symlinks followed
    must not lie inside ``/proc``, ``/sys`` or ``/dev``; it must not be an existing
    non-folder (or a link to nothing); the nearest existing folder above it must be
    a folder, on a writable mount, writable by this user.
    """
    shown = display_path(output)
    try:
        real = os.path.realpath(output)
    except (OSError, ValueError) as exc:
        return f"{shown}: cannot resolve it ({exc}); name a folder"
    for root in _SYSTEM_ROOTS:
        if real == root or real.startswith(root + "/"):
            extra = f" (it resolves to {display_path(real)})" if real != str(output) else ""
            return (
                f"{shown} is inside {root}, a system file system{extra}; choose a folder "
                f"in your home or data area"
            )
    probe = output
    try:
        while True:
            try:
                st = os.stat(probe)
                break
            except (FileNotFoundError, NotADirectoryError):
                # (NotADirectoryError: a file stands where a folder of the path
                # should be; the walk up finds it and says so.)
                if os.path.islink(probe):
                    return f"{display_path(probe)} is a link to nothing; remove it or fix it"
                if probe.parent == probe:
                    return f"{shown}: no part of this path exists"
                probe = probe.parent
    except OSError as exc:
        return f"{display_path(probe)}: cannot use it ({exc.strerror or exc}); name a folder"
    if not stat.S_ISDIR(st.st_mode):
        what = "a file" if stat.S_ISREG(st.st_mode) else "not a folder"
        if probe == output:
            return f"{shown} is {what}; give a folder path"
        return f"{display_path(probe)} (above {shown}) is {what}; give a folder path"
    readonly = False
    with contextlib.suppress(OSError):  # no statvfs: os.access below still answers
        readonly = bool(os.statvfs(probe).f_flag & os.ST_RDONLY)
    if readonly or not os.access(probe, os.W_OK | os.X_OK):
        why = "on a read-only file system" if readonly else "not writable by this user"
        where = "" if probe == output else f" ({display_path(probe)}, where it would be made)"
        return f"{shown} is {why}{where}; choose a folder you can write to"
    return None


def describe_plan(manifest: Manifest) -> list[str]:
    """Human-readable lines for ``--dry-run`` / ``validate``: each operation and its variants."""
    lines = [
        f"job {manifest.name} ({manifest.path})",
        f"inputs: {', '.join(manifest.inputs)} (relative to {manifest.base_dir})",
        f"output: {manifest.output}",
        f"concurrency {manifest.concurrency}, max attempts {manifest.max_attempts}"
        + (", auto-fix on" if manifest.auto_fix else "")
        + (", emulator" if manifest.emulator else ""),
    ]
    if manifest.max_credits:
        caps = ", ".join(f"{v}: {n:g}" for v, n in sorted(manifest.max_credits.items()))
        lines.append(f"spending cap: {caps}")
    groups: dict[str, list[Variant]] = {}
    for v in manifest.variants:
        groups.setdefault(v.operation.name, []).append(v)
    for op_name, variants in groups.items():
        spec = variants[0].operation
        count = len(variants)
        unit = spec.price_unit if spec.price != 1 else spec.price_unit.rstrip("s")
        lines.append(
            f"{op_name}: {count} variant{'s' if count != 1 else ''} per input, "
            f"{spec.price:g} {unit} per success"
        )
        lines.extend(f"  - {v.label}" for v in variants)
    total = len(manifest.variants)
    lines.append(
        f"{total} variant{'s' if total != 1 else ''} in all: each input is processed "
        f"{total} time{'s' if total != 1 else ''}"
    )
    return lines
