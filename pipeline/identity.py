"""Work-item identity: content, not paths.

A work item's key is the SHA-256 of the input file's content hash, the operation and
its canonical params (with extra files such as the face-swap template by *content*
hash too). Moving or renaming inputs therefore redoes nothing; changing a param
redoes exactly the variants it changes.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from pathlib import Path

__all__ = ["hash_file", "item_key"]

_CHUNK = 1024 * 1024


def hash_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def item_key(
    input_hash: str,
    operation: str,
    params: Mapping[str, int | str],
    file_hashes: Mapping[str, str],
) -> str:
    """The stable key of (input content, operation, canonical params)."""
    canonical = json.dumps(
        {
            "input": input_hash,
            "op": operation,
            "params": {k: params[k] for k in sorted(params)},
            "files": {k: file_hashes[k] for k in sorted(file_hashes)},
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()
