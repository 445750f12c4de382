"""The job manifest: model, validation with file/line/field errors, variant expansion.

HELPER-OWNED: the dataclasses below are the contract the engine relies on; keep their
fields (add freely). ``load_manifest`` is to be implemented.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.operations import OperationSpec

__all__ = ["Manifest", "Variant", "load_manifest"]


@dataclass(frozen=True)
class Variant:
    """One operation with one concrete set of params (after list expansion).

    ``params``: vendor codes (enum names already mapped to codes; ints as int), path
    params excluded. ``files``: path params (``image_template``) as absolute paths.
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
    max_credits: Mapping[str, float] = field(default_factory=dict)


def load_manifest(path: Path) -> Manifest:
    raise NotImplementedError
