"""From input patterns to work items, in batches: discovery, hashing, journal lookups.

Each batch of matched entries costs one journal read for the stat cache, one for
the items and one write for what the batch learned, so a rerun over a million
unchanged inputs re-reads none of them: a file whose (size, mtime, ctime, inode,
device) match the cache, and whose mtime is safely older than the cache entry (git's
"racily clean" rule, :func:`pipeline.identity.cached_hash_usable`), keeps its
content hash without being opened.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import anyio.to_thread

from pipeline.errors import InputProblem, PipelineError
from pipeline.identity import (
    FileSignature,
    cached_hash_usable,
    hash_file,
    hash_file_checked,
    item_key,
)
from pipeline.images import max_input_bytes
from pipeline.inputs import InputEntry, iter_input_entries
from pipeline.journal import ItemRecord, Journal, db_text
from pipeline.manifest import Manifest, Variant

if TYPE_CHECKING:
    from pipeline.progress import Progress

__all__ = ["BATCH", "InputSource", "WorkItem"]

BATCH = 512


@dataclass(frozen=True)
class WorkItem:
    """One input x one variant, identified by content (see :mod:`pipeline.identity`).

    An input that can't be used (a FIFO, a broken link...) is keyed by its path and
    carries the ``problem``; it fails with that code and is never opened.
    """

    key: str
    input_path: Path
    input_rel: str
    variant: Variant
    problem: InputProblem | None = None
    record: ItemRecord | None = None  # as the journal had it when the batch was read


@dataclass(frozen=True)
class _Hashed:
    entry: InputEntry
    content: str | None  # None: entry.problem (or a read error) says why
    problem: InputProblem | None


class InputSource:
    """Streams the manifest's work items, each with its journal record attached."""

    def __init__(self, manifest: Manifest, journal: Journal, progress: Progress) -> None:
        self.manifest = manifest
        self.journal = journal
        self.progress = progress
        self._file_hashes: dict[Path, str] = {}
        # Inputs larger than any operation of the job will read are not even hashed.
        self._max_bytes = max(max_input_bytes(v.operation.limits) for v in manifest.variants)

    async def batches(self) -> AsyncIterator[list[WorkItem]]:
        """The work items, a batch at a time, each with the journal record it had when
        the batch was read."""
        await self._hash_variant_files()
        entries = iter_input_entries(
            self.manifest.base_dir, self.manifest.inputs, self.manifest.output
        )
        while True:
            batch = await anyio.to_thread.run_sync(_take, entries, BATCH)
            if not batch:
                self.progress.discovery_finished()
                break
            hashed = await self._hash(batch)
            items = [item for h in hashed for item in self._expand(h)]
            records = await self.journal.lookup_many([i.key for i in items])
            self.progress.discovered(len(items))
            yield [
                WorkItem(i.key, i.input_path, i.input_rel, i.variant, i.problem, records.get(i.key))
                for i in items
            ]

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

    async def _hash(self, batch: Sequence[InputEntry]) -> list[_Hashed]:
        paths = [str(e.path) for e in batch if e.stat is not None]
        cached = await self.journal.cached_hashes(paths)
        out, fresh = await anyio.to_thread.run_sync(_hash_batch, batch, cached, self._max_bytes)
        await self.journal.cache_hashes(fresh)
        return out

    def _expand(self, hashed: _Hashed) -> Iterator[WorkItem]:
        entry = hashed.entry
        identity = hashed.content or f"path:{entry.rel}"
        for variant in self.manifest.variants:
            files = {k: self._file_hashes[p] for k, p in variant.files.items()}
            key = item_key(identity, variant.operation.name, variant.params, files)
            yield WorkItem(key, entry.path, entry.rel, variant, hashed.problem)


def _take(entries: Iterator[InputEntry], n: int) -> list[InputEntry]:
    out = []
    for entry in entries:
        out.append(entry)
        if len(out) >= n:
            break
    return out


def _hash_batch(
    batch: Sequence[InputEntry], cached: dict[str, tuple[Any, ...]], max_bytes: int
) -> tuple[list[_Hashed], list[tuple[Any, ...]]]:
    """Content hashes for a batch (runs in a worker thread), and the new cache rows."""
    out: list[_Hashed] = []
    fresh: list[tuple[Any, ...]] = []
    for entry in batch:
        if entry.stat is None:
            out.append(_Hashed(entry, None, entry.problem))
            continue
        name = db_text(str(entry.path))
        row = cached.get(name)
        if row is not None:
            *sig_row, cached_at_ns, digest = row
            usable = cached_hash_usable(
                FileSignature.from_row(tuple(sig_row)),
                cached_at_ns,
                FileSignature.of(entry.stat),
            )
            if usable:
                out.append(_Hashed(entry, str(digest), None))
                continue
        # The cache entry's time is taken before the read: an edit made while the file
        # is being hashed is then never trusted (git's "racily clean" rule).
        cached_at = time.time_ns()
        try:
            hashed = hash_file_checked(entry.path, max_bytes, why="for the operations of this job")
        except InputProblem as problem:
            out.append(_Hashed(entry, None, problem))
            continue
        fresh.append((name, *hashed.signature.as_row(), hashed.digest, cached_at))
        out.append(_Hashed(entry, hashed.digest, None))
    return out, fresh
