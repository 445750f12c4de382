"""From input patterns to work items, in batches: discovery, hashing, journal lookups.

Each batch of matched entries is prepared in one worker-thread call: the walk of the
next entries (one ``stat`` each), one read of the stat cache, the hashing of what
changed, the items' keys and one read of their journal rows. The reads go through a
read-only connection of the source's own (WAL: they never wait for the journal's
commits). A rerun over a million unchanged inputs re-reads none of them: a file
whose (size, mtime, ctime, inode, device) match the cache, and whose mtime is safely
older than the cache entry (git's "racily clean" rule,
:func:`pipeline.identity.cached_hash_usable`), keeps its content hash without being
opened. What a batch learned (new hashes) is written without waiting for it.
"""

from __future__ import annotations

import os
import sqlite3
import stat
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio
import anyio.to_thread

from pipeline import lifecycle as lc
from pipeline.errors import InputProblem, PipelineError
from pipeline.identity import (
    cached_row_usable,
    hash_file,
    hash_file_checked,
    item_key_maker,
)
from pipeline.images import max_input_bytes
from pipeline.inputs import InputEntry, iter_input_entries
from pipeline.journal import (
    ItemState,
    Journal,
    any_cached_hash,
    cached_hash_rows,
    db_text,
    item_states,
    open_reader,
    output_owners,
)
from pipeline.manifest import Manifest, Variant
from pipeline.outputs import result_relpaths

if TYPE_CHECKING:
    from pipeline.progress import Progress

__all__ = [
    "BATCH",
    "Batch",
    "InputSource",
    "UnsettledKeys",
    "WorkItem",
    "outputs_on_disk",
    "settle_verdicts",
]

BATCH = 512
# A first run's first batch, then each next one four times larger up to BATCH: its
# items start after 16 inputs are read and hashed, not 512 (1.5 GB of 3 MB photos).
# A journal with a stat cache starts at BATCH: a rerun reads few files, and each
# batch costs it a thread hop and its queries (about 2 ms, README "Performance").
FIRST_BATCH = 16


class WorkItem:
    """One input x one variant, identified by content (see :mod:`pipeline.identity`).

    An input that can't be used (a FIFO, a broken link...) is keyed by its path and
    carries the ``problem``; it fails with that code and is never opened.
    ``record`` is the journal row as it was when the batch was read. ``signature``:
    the input's ``(size, mtime_ns, ctime_ns, inode)`` when it was listed, which its
    key was hashed from (:func:`input_signature`). ``displaced``:
    another item already stored its result where this one's maps to (its result goes
    to a name of its own: :func:`pipeline.outputs.result_relpath`). ``input_text``
    is ``str(input_path)``; the :class:`~pathlib.Path` is made on first use (a rerun
    settles 10^6 items that never need one). Read-only.
    """

    __slots__ = (
        "_path", "displaced", "input_rel", "input_text", "key", "problem", "record",
        "signature", "variant",
    )  # fmt: skip

    key: str
    input_text: str
    input_rel: str
    variant: Variant
    problem: InputProblem | None
    record: ItemState | None
    displaced: bool
    signature: tuple[int, int, int, int] | None
    _path: Path | None

    def __init__(
        self,
        key: str,
        input_path: str | os.PathLike[str],
        input_rel: str,
        variant: Variant,
        problem: InputProblem | None = None,
        record: ItemState | None = None,
        displaced: bool = False,
        signature: tuple[int, int, int, int] | None = None,
    ) -> None:
        set_ = object.__setattr__
        set_(self, "displaced", displaced)
        set_(self, "signature", signature)
        set_(self, "key", key)
        set_(self, "_path", input_path if isinstance(input_path, Path) else None)
        set_(self, "input_text", os.fspath(input_path))
        set_(self, "input_rel", input_rel)
        set_(self, "variant", variant)
        set_(self, "problem", problem)
        set_(self, "record", record)

    @property
    def input_path(self) -> Path:
        path = self._path
        if path is None:
            path = Path(self.input_text)
            object.__setattr__(self, "_path", path)
        return path

    def __setattr__(self, name: str, value: object) -> None:
        raise AttributeError(f"WorkItem is read-only: cannot set {name}")

    def __repr__(self) -> str:
        return f"WorkItem(key={self.key!r}, input={self.input_text!r}, variant={self.variant!r})"


class Batch(list[WorkItem]):
    """A batch of work items; ``verdicts`` (one per item, if the consumer asked for
    them) is what the ``judge`` given to :meth:`InputSource.batches` said of each,
    worked out in the thread that prepared the batch."""

    verdicts: list[str | None] | None = None


def outputs_on_disk(output_dir: Path, items: Sequence[WorkItem]) -> set[str]:
    """Keys of the succeeded ``items`` whose recorded output is a regular file (a
    symlink followed) under ``output_dir``: one ``stat`` each, no ``Path``."""
    found = set()
    out = os.fspath(output_dir)
    join, stat_, is_reg = os.path.join, os.stat, stat.S_ISREG
    for item in items:
        rec = item.record
        if rec is None or rec.status != "succeeded" or not rec.output:
            continue
        try:
            st = stat_(join(out, rec.output))
        except (OSError, ValueError):  # ValueError: a NUL in a damaged row
            continue
        if is_reg(st.st_mode):
            found.add(item.key)
    return found


def settle_verdicts(
    items: Sequence[WorkItem],
    *,
    output_dir: Path,
    run_id: int,
    policies: Mapping[str, lc.Policy],
    retry_failed: bool,
) -> list[str | None]:
    """Per item, how an earlier run left it, as :func:`pipeline.lifecycle.resume`
    decides: ``"skipped"`` (done, its output a file on disk), ``"failed_earlier"``
    (failed for good), or None (it needs a worker, or this run met it already).

    Pure but for one ``stat`` per succeeded item's output: safe in a worker thread.
    """
    candidates = [i for i in items if i.record is not None and i.record.seen_run != run_id]
    on_disk = outputs_on_disk(output_dir, candidates)
    out: list[str | None] = []
    resume, skipped, carried = lc.resume, lc.Skipped, lc.CarriedOver
    for item in items:
        rec = item.record
        if rec is None or rec.seen_run == run_id:
            out.append(None)
            continue
        state = resume(
            rec.snapshot(), policies[item.variant.operation.vendor], 0.0,
            retry_failed=retry_failed, output_exists=item.key in on_disk,
        )  # fmt: skip
        if isinstance(state, skipped):
            out.append("skipped")
        elif isinstance(state, carried):
            out.append("failed_earlier")
        else:
            out.append(None)
    return out


class UnsettledKeys:
    """Keys of settlement writes that a batch's rows may not show yet.

    The engine settles done items without waiting for the commit, so a later batch
    read before that commit still has the old rows: a content duplicate of a settled
    item would pass for new. A write's keys are kept until a batch read that began
    after its commit is handled: batches are read one at a time, each once the one
    before was taken (:meth:`InputSource.batches`), so a commit made while batch
    ``n`` was current is in the rows of batch ``n + 2`` at the latest.
    """

    def __init__(self) -> None:
        self.batch = 0
        self._entries: list[list[Any]] = []  # [keys, batch current at commit, or None]

    def next_batch(self) -> None:
        """A new batch arrived: forget the writes every batch from now on shows."""
        self.batch += 1
        self._entries = [e for e in self._entries if e[1] is None or e[1] >= self.batch - 1]

    def add(self, keys: set[str]) -> list[Any]:
        """A write of ``keys`` started; pass the result to :meth:`committed`."""
        entry: list[Any] = [keys, None]
        self._entries.append(entry)
        return entry

    def committed(self, entry: list[Any]) -> None:
        entry[1] = self.batch

    def holds(self, key: str) -> bool:
        return any(key in e[0] for e in self._entries)


# Per variant: (variant, key of a content identity) — the key function has the
# variant's canonical params worked out once (pipeline.identity.item_key_maker).
_Keyed = tuple[Variant, Callable[[str], str]]


class InputSource:
    """Streams the manifest's work items, each with its journal record attached."""

    def __init__(self, manifest: Manifest, journal: Journal, progress: Progress) -> None:
        self.manifest = manifest
        self.journal = journal
        self.progress = progress
        self._file_hashes: dict[Path, str] = {}
        # Inputs larger than any operation of the job will read are not even hashed.
        self._max_bytes = max(max_input_bytes(v.operation.limits) for v in manifest.variants)

    async def batches(
        self, judge: Callable[[list[WorkItem]], list[str | None]] | None = None
    ) -> AsyncIterator[Batch]:
        """The work items, a batch at a time, each with the journal record it had when
        the batch was read. ``judge`` (thread-safe, pure) is run on each batch in the
        thread that prepared it; its answers are the batch's ``verdicts``.

        A batch is read only once the one before it has been taken: whatever the
        consumer committed before asking for the next batch is in that batch's rows.
        """
        await self._hash_variant_files()
        keyed = [
            (
                v,
                item_key_maker(
                    v.operation.name,
                    v.params,
                    {k: self._file_hashes[p] for k, p in v.files.items()},
                ),
            )
            for v in self.manifest.variants
        ]
        entries = iter_input_entries(
            self.manifest.base_dir, self.manifest.inputs, self.manifest.output
        )
        reader, size = await anyio.to_thread.run_sync(self._open_reader)
        try:
            while True:
                items, fresh = await anyio.to_thread.run_sync(
                    self._prepare, entries, reader, keyed, judge, size
                )
                size = min(size * 4, BATCH)
                if not items:
                    self.progress.discovery_finished()
                    break
                if fresh:
                    await self.journal.cache_hashes(fresh)
                self.progress.discovered(len(items))
                yield items
        finally:
            reader.close()

    async def _hash_variant_files(self) -> None:
        for variant in self.manifest.variants:
            for name, path in variant.files.items():
                if path in self._file_hashes:
                    continue
                try:
                    self._file_hashes[path] = await anyio.to_thread.run_sync(hash_file, path)
                except OSError as exc:
                    raise PipelineError(
                        f"{path}: cannot read {name} ({exc.strerror}); check the manifest's "
                        f"{name} path"
                    ) from None

    def _open_reader(self) -> tuple[sqlite3.Connection, int]:
        """The batches' read connection, and the first batch's size."""
        reader = open_reader(self.journal.path)
        try:
            cached = any_cached_hash(reader)
        except BaseException:
            reader.close()
            raise
        return reader, BATCH if cached else min(FIRST_BATCH, BATCH)

    def _prepare(
        self,
        entries: Iterator[InputEntry],
        reader: sqlite3.Connection,
        keyed: list[_Keyed],
        judge: Callable[[list[WorkItem]], list[str | None]] | None = None,
        size: int = BATCH,
    ) -> tuple[Batch, list[tuple[Any, ...]]]:
        """The next batch (of ``size`` inputs) as work items with their rows, and the
        stat cache's new rows (runs in a worker thread, reading through ``reader``)."""
        batch = _take(entries, size)
        if not batch:
            return Batch(), []
        names = [db_text(e.path_text) for e in batch]
        known = [n for n, e in zip(names, batch, strict=True) if e.stat is not None]
        cached = cached_hash_rows(reader, known)
        identities, fresh = _hash_batch(batch, names, cached, self._max_bytes)
        items: list[tuple[str, InputEntry, Variant, InputProblem | None]] = []
        for entry, (content, problem) in zip(batch, identities, strict=True):
            identity = content or f"path:{entry.rel}"
            for variant, key_of in keyed:
                items.append((key_of(identity), entry, variant, problem))
        records = item_states(reader, [i[0] for i in items])
        get = records.get
        displaced = _displaced(reader, items, records)
        out = Batch(
            WorkItem(
                key, entry.path_text, entry.rel, variant, problem, get(key), key in displaced,
                None if entry.stat is None else input_signature(entry.stat),
            )
            for key, entry, variant, problem in items
        )  # fmt: skip
        if judge is not None:
            out.verdicts = judge(out)
        return out, fresh


def input_signature(st: os.stat_result) -> tuple[int, int, int, int]:
    """What changes when a file's content may have: size, mtime, ctime, inode."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)


def _displaced(
    reader: sqlite3.Connection,
    items: list[tuple[str, InputEntry, Variant, InputProblem | None]],
    records: dict[str, ItemState],
) -> set[str]:
    """The keys among ``items`` with no result of their own yet whose result path
    (for any result format) is another item's recorded output: a later run met a new
    photo under an old photo's name, or a template replaced by one of the same name.
    Storing there would overwrite a paid result (README "Where results go"). A rerun
    of done items asks nothing: they have their recorded paths."""
    wanted: dict[str, list[str]] = {}
    for key, entry, variant, problem in items:
        rec = records.get(key)
        if problem is None and (rec is None or not rec.output):
            wanted[key] = list(result_relpaths(variant.operation.name, variant.label, entry.rel))
    if not wanted:
        return set()
    owners = output_owners(reader, [path for paths in wanted.values() for path in paths])
    return {key for key, paths in wanted.items() if any(owners.get(p, key) != key for p in paths)}


def _take(entries: Iterator[InputEntry], n: int) -> list[InputEntry]:
    out = []
    for entry in entries:
        out.append(entry)
        if len(out) >= n:
            break
    return out


def _hash_batch(
    batch: Sequence[InputEntry],
    names: Sequence[str],
    cached: dict[str, tuple[Any, ...]],
    max_bytes: int,
) -> tuple[list[tuple[str | None, InputProblem | None]], list[tuple[Any, ...]]]:
    """``(content hash, problem)`` per entry (one of them None), and the new cache rows
    (``names``: ``db_text`` of each entry's path)."""
    out: list[tuple[str | None, InputProblem | None]] = []
    fresh: list[tuple[Any, ...]] = []
    for entry, name in zip(batch, names, strict=True):
        st = entry.stat
        if st is None:
            out.append((None, entry.problem))
            continue
        row = cached.get(name)
        if row is not None and cached_row_usable(row[:5], row[5], st):
            out.append((str(row[6]), None))
            continue
        # The cache entry's time is taken before the read: an edit made while the file
        # is being hashed is then never trusted (git's "racily clean" rule).
        cached_at = time.time_ns()
        try:
            hashed = hash_file_checked(entry.path, max_bytes, why="for the operations of this job")
        except InputProblem as problem:
            out.append((None, problem))
            continue
        fresh.append((name, *hashed.signature.as_row(), hashed.digest, cached_at))
        out.append((hashed.digest, None))
    return out, fresh
