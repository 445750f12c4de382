"""A finished output folder as a dataset others can load: imagefolder or webdataset.

Reads only the folder's ``results.jsonl`` and the files it names; the journal is not
touched, so an export can run beside a ``pipeline run`` of the same folder (it sees
the results of the last finished run). Only done items are exported: succeeded
ones, and ones skipped because an earlier run had already made them. Failed and
unfinished items, duplicates (``duplicate_of`` set: the same content as another
input, sharing its result) and items whose files are gone are left out and counted.

Every sample carries the same flat columns, written once in :func:`_row`::

    key, operation, variant, <one column per param, readable value or null>,
    template, input_rel, output_rel

``imagefolder`` layout (``datasets.load_dataset("imagefolder", data_dir=DIR)``)::

    DIR/metadata.jsonl          one row per sample: file_name, input_file_name, columns
    DIR/results/<key>.<ext>     the result ("file_name", loaded as column ``image``)
    DIR/inputs/<id>.<ext>       its input ("input_file_name", loaded as ``input``)

File names are the item key (and, for inputs, a hash of the input path) rather than
a mirror of the input tree: ``datasets`` turns any folder or file name containing
``train``, ``test``, ``dev``, ``eval``, ``val``... into a split of its own, so a
photo under ``shoots/test/`` would silently move the sample to another split. Hex
names never spell those words; ``input_rel`` and ``output_rel`` keep the real paths.

``webdataset`` layout: ``DIR/shard-000000.tar``, ``shard-000001.tar``... (1000
samples each by default), each sample three members sharing a key without dots:
``<key>.result.<ext>``, ``<key>.input.<ext>`` and ``<key>.json`` (the columns).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import logging
import os
import re
import shutil
import tarfile
import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Literal

from pipeline.errors import PipelineError, UsageError
from pipeline.operations import OPERATIONS
from pipeline.outputs import TEMP_SUFFIX, atomic_open_text

__all__ = [
    "DEFAULT_SHARD_SIZE",
    "FORMATS",
    "ExportSummary",
    "export_dataset",
    "readable_params",
]

log = logging.getLogger("pipeline.export")

Format = Literal["imagefolder", "webdataset"]
FORMATS: tuple[Format, ...] = ("imagefolder", "webdataset")
DEFAULT_SHARD_SIZE = 1000
METADATA_NAME = "metadata.jsonl"
_RESULTS_NAME = "results.jsonl"
_REPORT_NAME = "report.json"
_DONE = {"succeeded", "skipped"}  # skipped: made by an earlier run, still on disk
_FAILED = {"failed"}
_SHARD_RE = re.compile(r"shard-\d{6}\.tar")
# Columns the export writes itself; a param of the same name gets a prefix.
_FIXED = ("key", "operation", "variant", "template", "input_rel", "output_rel")
# Errors of os.link that mean "no hard links here" (other device, filesystem
# without links, too many links), as opposed to a real write failure.
_NO_LINK = {errno.EXDEV, errno.EPERM, errno.EMLINK, errno.ENOTSUP, errno.EOPNOTSUPP}


@dataclass
class ExportSummary:
    """What an export did; :meth:`line` is the command's one-line summary."""

    format: Format
    to: Path
    exported: int = 0
    failed: int = 0
    unfinished: int = 0
    duplicates: int = 0
    missing: int = 0
    shards: int = 0
    first_missing: str | None = None
    link_fallback: str | None = None  # why --link copied instead

    def line(self) -> str:
        where = str(self.to)
        if self.format == "webdataset" and self.shards:
            where = f"{self.to}/shard-{{000000..{self.shards - 1:06d}}}.tar"
        text = (
            f"exported {self.exported} items as {self.format} to {where}; left out "
            f"{self.failed} failed, {self.duplicates} duplicates, "
            f"{self.missing} missing on disk, {self.unfinished} unfinished"
        )
        if self.link_fallback:
            text += "; copied, not linked (another filesystem)"
        return text


@dataclass(frozen=True)
class _Item:
    """One exportable sample: where its files are and its columns (no file names)."""

    key: str
    result: Path
    input: Path
    input_id: str  # the input's name inside the export, shared by its items
    params: Mapping[str, Any]
    columns: Mapping[str, Any]  # the fixed columns except the params

    @property
    def result_ext(self) -> str:
        return _ext(self.result, ".jpg")

    @property
    def input_ext(self) -> str:
        return _ext(self.input, ".img")


@dataclass
class _Plan:
    """First pass over results.jsonl: the column set and rows that pin its types."""

    params: list[str] = field(default_factory=list)
    witnesses: list[_Item] = field(default_factory=list)


def readable_params(operation: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """``params`` with enum and choice codes replaced by their readable names.

    ``{"service_choice": 12}`` -> ``{"service_choice": "big_grin"}``; ints stay ints;
    a code the operation's table does not know is kept, as a string, so an enum
    column holds one type.
    """
    spec = OPERATIONS.get(operation)
    out: dict[str, Any] = {}
    for name, value in params.items():
        pspec = spec.param(name) if spec is not None else None
        if pspec is not None and pspec.kind in ("enum", "choice"):
            # The first name the table gives a code is its readable name (the
            # manifest labels variants the same way).
            value = next((n for n, code in pspec.choices.items() if code == value), str(value))
        out[name] = value
    return out


def export_dataset(
    output_dir: Path,
    fmt: Format,
    to: Path,
    *,
    force: bool = False,
    link: bool = False,
    shard_size: int = DEFAULT_SHARD_SIZE,
) -> ExportSummary:
    """Export the done items of ``output_dir`` into ``to``; return what was done.

    Refuses (:class:`UsageError`, exit 2) a missing folder or ``results.jsonl``, a
    ``to`` inside ``output_dir`` (or containing it), a non-empty ``to`` unless
    ``force`` (then files of the same names are replaced and, for webdataset,
    shards an earlier export left beyond the new last one are removed), ``link``
    with webdataset, and a ``shard_size`` below 1. ``link`` hard-links results and
    inputs instead of copying them, copying when the filesystem can't link. A write
    that fails midway raises :class:`PipelineError` (exit 3) naming the file.
    """
    output_dir, to = _check_folders(output_dir, to, force)
    if fmt not in FORMATS:
        raise UsageError(f"--format {fmt}: choose one of {', '.join(FORMATS)}")
    if link and fmt == "webdataset":
        raise UsageError("--link works with --format imagefolder only (tar shards hold copies)")
    if shard_size < 1:
        raise UsageError(f"--shard-size {shard_size}: give a number of samples, 1 or more")
    results = output_dir / _RESULTS_NAME
    if not results.is_file():
        raise UsageError(
            f"{results}: not found; run `pipeline report {output_dir}` to rebuild it "
            f"from the journal (or `pipeline run MANIFEST` first)"
        )
    reader = _Reader(results, output_dir)
    plan = _plan(reader)
    summary = ExportSummary(format=fmt, to=to)
    to.mkdir(parents=True, exist_ok=True)
    try:
        if fmt == "imagefolder":
            _write_imagefolder(reader, plan, summary, link)
        else:
            _write_webdataset(reader, plan, summary, shard_size)
    except OSError as exc:
        where = exc.filename or to
        raise PipelineError(
            f"{where}: cannot write the export ({exc.strerror or exc}); "
            f"free space or choose another --to, then rerun with --force"
        ) from None
    reader.tally(summary)
    if summary.missing:
        log.warning(
            "%d files listed in %s are missing on disk (first: %s); rerun the manifest "
            "to restore them, then export again",
            summary.missing,
            results,
            summary.first_missing,
        )
    return summary


# ----------------------------------------------------------------------------- reading


def _check_folders(output_dir: Path, to: Path, force: bool) -> tuple[Path, Path]:
    if not output_dir.is_dir():
        raise UsageError(f"{output_dir}: no such output folder")
    out = output_dir.resolve()
    dest = to.resolve()
    if dest == out or out in dest.parents:
        raise UsageError(
            f"--to {to}: is inside the output folder {output_dir}; choose a folder outside it"
        )
    if dest in out.parents:
        raise UsageError(
            f"--to {to}: contains the output folder {output_dir}; choose a folder beside it"
        )
    if dest.exists() and not dest.is_dir():
        raise UsageError(f"--to {to}: is a file; give a folder")
    if dest.is_dir() and not force and any(dest.iterdir()):
        raise UsageError(f"--to {to}: is not empty; choose an empty folder or add --force")
    return out, dest


class _Reader:
    """Streams results.jsonl as exportable items, counting what it leaves out.

    Call :meth:`reset` before each pass, so that after the last pass the counts
    describe it alone.
    """

    def __init__(self, results: Path, output_dir: Path) -> None:
        self.results = results
        self.output_dir = output_dir
        self.old_dir = _recorded_output_dir(output_dir)
        self.counts: dict[str, int] = {}
        self.first_missing: str | None = None
        self.reset()

    def reset(self) -> None:
        self.counts = {"failed": 0, "unfinished": 0, "duplicates": 0, "missing": 0}
        self.first_missing = None

    def items(self) -> Iterator[_Item]:
        with self.results.open(encoding="utf-8") as handle:
            for lineno, line in enumerate(handle, start=1):
                if not line.strip():
                    continue
                item = self._item(self._parse(line, lineno))
                if item is not None:
                    yield item

    def tally(self, summary: ExportSummary) -> None:
        summary.failed += self.counts["failed"]
        summary.unfinished += self.counts["unfinished"]
        summary.duplicates += self.counts["duplicates"]
        summary.missing += self.counts["missing"]
        summary.first_missing = summary.first_missing or self.first_missing

    def lost(self, path: Path) -> None:
        """A file found in the first pass vanished before it was exported."""
        self.counts["missing"] += 1
        self.first_missing = self.first_missing or str(path)

    def _parse(self, line: str, lineno: int) -> dict[str, Any]:
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            rec = None
        if not isinstance(rec, dict) or not isinstance(rec.get("key"), str):
            raise UsageError(
                f"{self.results}:{lineno}: not a results line (a JSON object with a key); "
                f"run `pipeline report {self.output_dir}` to rebuild the file"
            )
        return rec

    def _item(self, rec: dict[str, Any]) -> _Item | None:
        status = rec.get("status")
        if rec.get("duplicate_of"):
            self.counts["duplicates"] += 1
            return None
        if status in _FAILED:
            self.counts["failed"] += 1
            return None
        if status not in _DONE or not rec.get("output"):
            self.counts["unfinished"] += 1
            return None
        result = self._result_path(rec)
        source = Path(str(rec.get("input") or ""))
        for path in (result, source):
            if path is None or not path.is_file():
                self.counts["missing"] += 1
                self.first_missing = self.first_missing or str(path or rec.get("output"))
                return None
        assert result is not None
        return _make_item(rec, result, source, self.output_dir)

    def _result_path(self, rec: Mapping[str, Any]) -> Path | None:
        """The result file inside the output folder, or None if it points elsewhere."""
        rel = rec.get("output_rel")
        if not rel:
            # Older results.jsonl: absolute paths only. The folder may have been
            # moved since, so also try the folder recorded in report.json.
            out = Path(str(rec["output"]))
            rel = None if out.is_absolute() else str(out)
            for base in (self.output_dir, self.old_dir):
                if rel is None and base is not None and out.is_relative_to(base):
                    rel = str(out.relative_to(base))
            if rel is None:
                return None
        target = (self.output_dir / str(rel)).resolve()
        return target if self.output_dir in target.parents else None


def _recorded_output_dir(output_dir: Path) -> Path | None:
    try:
        recorded = json.loads((output_dir / _REPORT_NAME).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    value = recorded.get("output_dir") if isinstance(recorded, dict) else None
    return Path(value) if isinstance(value, str) else None


def _make_item(rec: Mapping[str, Any], result: Path, source: Path, output_dir: Path) -> _Item:
    operation = str(rec.get("operation") or "")
    raw = rec.get("params_readable")
    if not isinstance(raw, dict):
        params = rec.get("params")
        raw = readable_params(operation, params if isinstance(params, dict) else {})
    spec = OPERATIONS.get(operation)
    # Path params (face swap's image_template) are the template column, not params.
    paths = {p.name for p in spec.params if p.kind == "path"} if spec else set()
    template = rec.get("template")
    if template is None:
        template = next((raw[name] for name in paths if raw.get(name)), None)
    key = _safe_key(str(rec["key"]))
    columns = {
        "key": key,
        "operation": operation,
        "variant": str(rec.get("variant") or "default"),
        "template": str(template) if template is not None else None,
        "input_rel": str(rec.get("input_rel") or source.name),
        "output_rel": result.relative_to(output_dir).as_posix(),
    }
    input_id = hashlib.sha256(str(source).encode("utf-8")).hexdigest()[:20]
    params = {k: v for k, v in raw.items() if k not in paths}
    return _Item(key, result, source, input_id, params, columns)


def _safe_key(key: str) -> str:
    # webdataset splits a member name at its first dot; keys are hex, but be sure.
    return re.sub(r"[^A-Za-z0-9_-]", "_", key) or "_"


def _ext(path: Path, fallback: str) -> str:
    suffix = path.suffix.lower()
    return suffix if re.fullmatch(r"\.[a-z0-9]{1,5}", suffix) else fallback


# ----------------------------------------------------------------------------- columns


def _plan(reader: _Reader) -> _Plan:
    """Pass one: every param column, and for each the first row that sets it.

    ``datasets`` fixes each metadata column's type from the first 10 MB of
    ``metadata.jsonl`` and fails on a later value of another type; a column that is
    null there (every row so far from another operation) becomes type null, and the
    first real value after it breaks the load. Writing those first rows at the top
    settles every column's type at once.
    """
    names: set[str] = set()
    # Nullable columns: every param, and the template (face swap's only).
    first: dict[tuple[str, str], _Item] = {}
    for item in reader.items():
        spec = OPERATIONS.get(str(item.columns["operation"]))
        if spec is not None:
            names.update(p.name for p in spec.params if p.kind != "path")
        names.update(item.params)
        nullable = {("param", k): v for k, v in item.params.items()}
        nullable["column", "template"] = item.columns["template"]
        for column, value in nullable.items():
            if value is not None and column not in first:
                first[column] = item
    witnesses: dict[str, _Item] = {}
    for column in sorted(first):
        witnesses.setdefault(first[column].key, first[column])
    return _Plan(params=sorted(names), witnesses=list(witnesses.values()))


def _column(name: str) -> str:
    """The column of a param: its own name unless that would clash or be read as a file."""
    if name in _FIXED or name in ("file_name", "input_file_name"):
        return f"param_{name}"
    if name.endswith(("file_name", "file_names")):
        return f"{name}_value"
    return name


def _row(item: _Item, plan: _Plan) -> dict[str, Any]:
    """The sample's columns: the same keys, in the same order, for every sample."""
    cols = item.columns
    row: dict[str, Any] = {k: cols[k] for k in ("key", "operation", "variant")}
    for name in plan.params:
        row[_column(name)] = item.params.get(name)
    row.update({k: cols[k] for k in ("template", "input_rel", "output_rel")})
    return row


def _ordered(reader: _Reader, plan: _Plan) -> Iterator[_Item]:
    """Pass two: the witness rows first, then every other item in file order."""
    reader.reset()
    yield from plan.witnesses
    pinned = {w.key for w in plan.witnesses}
    for item in reader.items():
        if item.key not in pinned:
            yield item


# ----------------------------------------------------------------------------- writing


class _Placer:
    """Copies (or hard-links) a file to its final name without a half-written state."""

    def __init__(self, link: bool) -> None:
        self.link = link
        self.fallback: str | None = None
        self._made: set[Path] = set()

    def place(self, src: Path, dest: Path) -> None:
        if dest.parent not in self._made:
            dest.parent.mkdir(parents=True, exist_ok=True)
            self._made.add(dest.parent)
        # Always a new inode renamed over the final name: writing through an old
        # name would edit the paid result if an earlier --link export made it a link.
        tmp = dest.with_name(f".{dest.name}{TEMP_SUFFIX}")
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        try:
            if self.link:
                try:
                    os.link(src, tmp)
                except OSError as exc:
                    if exc.errno not in _NO_LINK:
                        raise
                    self.link = False
                    self.fallback = exc.strerror or str(exc)
                    log.warning(
                        "--link: cannot hard-link %s into %s (%s); copying instead",
                        src.parent,
                        dest.parent,
                        self.fallback,
                    )
                    shutil.copy2(src, tmp)
            else:
                shutil.copy2(src, tmp)
            os.replace(tmp, dest)
        except BaseException:
            with contextlib.suppress(OSError):
                tmp.unlink()
            raise


def _write_imagefolder(reader: _Reader, plan: _Plan, summary: ExportSummary, link: bool) -> None:
    placer = _Placer(link)
    placed_inputs: set[str] = set()
    to = summary.to
    with atomic_open_text(to / METADATA_NAME) as meta:
        for item in _ordered(reader, plan):
            file_name = f"results/{item.key}{item.result_ext}"
            input_name = f"inputs/{item.input_id}{item.input_ext}"
            try:
                placer.place(item.result, to / file_name)
                if input_name not in placed_inputs:
                    placer.place(item.input, to / input_name)
                    placed_inputs.add(input_name)
            except FileNotFoundError as exc:
                if exc.filename is None or Path(exc.filename) not in (item.result, item.input):
                    raise
                reader.lost(Path(exc.filename))
                continue
            row = {"file_name": file_name, "input_file_name": input_name, **_row(item, plan)}
            meta.write(json.dumps(row, ensure_ascii=False) + "\n")
            summary.exported += 1
    summary.link_fallback = placer.fallback


class _Shards:
    """Writes samples into numbered tar shards of ``size`` samples, each atomically."""

    def __init__(self, to: Path, size: int) -> None:
        self.to = to
        self.size = size
        self.count = 0  # shards finished
        self._tar: tarfile.TarFile | None = None
        self._tmp: Path | None = None
        self._in_shard = 0

    def add(self, item: _Item, meta: Mapping[str, Any]) -> None:
        """Add one sample (result, input, json); raises FileNotFoundError before
        writing anything if a file has vanished."""
        with item.result.open("rb") as result, item.input.open("rb") as source:
            if self._tar is None or self._in_shard == self.size:
                self._roll()
            assert self._tar is not None
            mtime = int(os.fstat(result.fileno()).st_mtime)
            self._member(f"{item.key}.result{item.result_ext}", result, mtime)
            self._member(f"{item.key}.input{item.input_ext}", source, mtime)
            data = json.dumps(meta, ensure_ascii=False, indent=None).encode("utf-8")
            self._bytes(f"{item.key}.json", data, mtime)
            self._in_shard += 1

    def _member(self, name: str, fileobj: IO[bytes], mtime: int) -> None:
        assert self._tar is not None
        info = self._info(name, os.fstat(fileobj.fileno()).st_size, mtime)
        self._tar.addfile(info, fileobj)

    def _bytes(self, name: str, data: bytes, mtime: int) -> None:
        assert self._tar is not None
        self._tar.addfile(self._info(name, len(data), mtime), io.BytesIO(data))

    @staticmethod
    def _info(name: str, size: int, mtime: int) -> tarfile.TarInfo:
        info = tarfile.TarInfo(name)
        info.size = size
        info.mtime = mtime
        info.mode = 0o644
        return info

    def _roll(self) -> None:
        self.close()
        fd, tmp = tempfile.mkstemp(
            prefix=f".shard-{self.count:06d}.tar.", suffix=TEMP_SUFFIX, dir=self.to
        )
        os.close(fd)
        self._tmp = Path(tmp)
        # Open across many add() calls; close() or abort() ends it.
        self._tar = tarfile.open(self._tmp, "w", format=tarfile.PAX_FORMAT)  # noqa: SIM115
        self._in_shard = 0

    def close(self) -> None:
        """Finish the open shard under its final name."""
        if self._tar is None or self._tmp is None:
            return
        self._tar.close()
        os.replace(self._tmp, self.to / f"shard-{self.count:06d}.tar")
        self._tar, self._tmp = None, None
        self.count += 1

    def abort(self) -> None:
        if self._tar is not None and self._tmp is not None:
            with contextlib.suppress(OSError):
                self._tar.close()
            with contextlib.suppress(OSError):
                self._tmp.unlink()
            self._tar, self._tmp = None, None


def _write_webdataset(reader: _Reader, plan: _Plan, summary: ExportSummary, size: int) -> None:
    shards = _Shards(summary.to, size)
    try:
        for item in _ordered(reader, plan):
            try:
                shards.add(item, _row(item, plan))
            except FileNotFoundError as exc:
                if exc.filename is None or Path(exc.filename) not in (item.result, item.input):
                    raise
                reader.lost(Path(exc.filename))
                continue
            summary.exported += 1
        shards.close()
    except BaseException:
        shards.abort()
        raise
    summary.shards = shards.count
    # Shards of an earlier, larger export would be read as part of this one.
    for path in summary.to.iterdir():
        if _SHARD_RE.fullmatch(path.name) and int(path.name[6:12]) >= shards.count:
            path.unlink()
