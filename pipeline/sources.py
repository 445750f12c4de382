"""From input patterns to work items, in batches: discovery, hashing, journal lookups.

Each batch of matched entries costs one journal read for the stat cache, one for
the items and one write for what the batch learned, so a rerun over a million
unchanged inputs re-reads none of them: a file whose (size, mtime, ctime, inode,
device) match the cache, and whose mtime is safely older than the cache entry (git's
"racily clean" rule, :func:`pipeline.identity.signature_trustworthy`), keeps its
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
from pipeline.identity import FileSignature, hash_file, item_key, signature_trustworthy
from pipeline.inputs import InputEntry, iter_input_entries
from pipeline.journal import ItemRecord, Journal
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
    record: ItemRecord | None = None
    looked_up: bool = False


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

    async def items(self) -> AsyncIterator[WorkItem]:
        await self._hash_variant_files()
        entries = iter_input_entries(
            self.manifest.base_dir, self.manifest.inputs, self.manifest.output
        )
        while True:
            batch = await anyio.to_thread.run_sync(_take, entries, BATCH)
            if not batch:
                break
            hashed = await self._hash(batch)
            items = [item for h in hashed for item in self._expand(h)]
            records = await self.journal.lookup_many([i.key for i in items])
            self.progress.discovered(len(items))
            for item in items:
                yield WorkItem(
                    item.key, item.input_path, item.input_rel, item.variant, item.problem,
                    records.get(item.key), looked_up=True,
                )  # fmt: skip

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
        out, fresh = await anyio.to_thread.run_sync(_hash_batch, batch, cached)
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
    batch: Sequence[InputEntry], cached: dict[str, tuple[Any, ...]]
) -> tuple[list[_Hashed], list[tuple[Any, ...]]]:
    """Content hashes for a batch (runs in a worker thread), and the new cache rows."""
    out: list[_Hashed] = []
    fresh: list[tuple[Any, ...]] = []
    for entry in batch:
        if entry.stat is None:
            out.append(_Hashed(entry, None, entry.problem))
            continue
        sig = FileSignature.of(entry.stat)
        row = cached.get(str(entry.path))
        if row is not None:
            size, mtime_ns, ctime_ns, inode, dev, cached_at_ns, digest = row
            if (size, mtime_ns, ctime_ns, inode, dev) == (
                sig.size, sig.mtime_ns, sig.ctime_ns, sig.inode, sig.dev,
            ) and signature_trustworthy(sig, cached_at_ns):  # fmt: skip
                out.append(_Hashed(entry, str(digest), None))
                continue
        try:
            digest = hash_file(entry.path)
        except OSError as exc:
            problem = InputProblem(
                f"{entry.path}: cannot read the input file ({exc.strerror}); check it exists "
                "and is readable",
                code="INPUT_UNREADABLE",
            )
            out.append(_Hashed(entry, None, problem))
            continue
        now_ns = time.time_ns()
        fresh.append(
            (
                str(entry.path),
                sig.size,
                sig.mtime_ns,
                sig.ctime_ns,
                sig.inode,
                sig.dev,
                digest,
                now_ns,
            )
        )
        out.append(_Hashed(entry, digest, None))
    return out, fresh
