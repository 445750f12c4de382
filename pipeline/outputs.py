"""Where results go, and how they get there without ever being half-written.

Result path: ``<output>/<vendor>-<operation>/<variant label>/<input path relative to
the manifest>``, with the extension of the real result format. The same input,
operation and variant always map to the same path; two inputs never share one
(their relative paths differ), and nothing escapes the output folder.

Writes are atomic: bytes go to a temporary file in the same folder, are fsynced,
then renamed over the final name, so a crash never leaves a partial file under a
final name. Leftover temporaries (``.*.part``) are swept at the start of a run.
"""

from __future__ import annotations

import contextlib
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import IO

__all__ = [
    "TEMP_SUFFIX",
    "atomic_open_text",
    "atomic_write_bytes",
    "atomic_write_text",
    "resolve_inside",
    "result_relpath",
    "sweep_partial_files",
]

TEMP_SUFFIX = ".part"

# Extensions already meaning the sniffed result format.
_SAME_FORMAT = {"jpg": {".jpg", ".jpeg"}, "png": {".png"}, "webp": {".webp"}}


def _safe_component(part: str) -> str:
    cleaned = "".join(c if c.isalnum() or c in "-_.=,+@" else "_" for c in part)
    if cleaned in {"", ".", ".."}:
        cleaned = cleaned.replace(".", "_") or "_"
    return cleaned


def result_relpath(operation: str, variant: str, input_rel: str, result_ext: str) -> str:
    """The result's path relative to the output folder (posix separators).

    ``input_rel`` comes from :func:`pipeline.inputs.input_relpath` and is already
    free of ``..``; every component is sanitised again here all the same, because
    this function is what keeps writes inside the output folder.
    """
    op_dir = _safe_component(operation.replace("/", "-"))
    parts = [_safe_component(p) for p in PurePosixPath(input_rel).parts if p not in {"/", ""}]
    if not parts:
        parts = ["input"]
    name = parts[-1]
    suffix = PurePosixPath(name).suffix.lower()
    # Otherwise keep the input's own extension in the name: "a.png" and "a.jpg" in
    # one folder must not collide once both become JPEG results.
    final = name if suffix in _SAME_FORMAT.get(result_ext, set()) else f"{name}.{result_ext}"
    return str(PurePosixPath(op_dir, _safe_component(variant), *parts[:-1], final))


def resolve_inside(output_dir: Path, relpath: str) -> Path:
    """Join and prove the result stays inside ``output_dir``."""
    root = output_dir.resolve()
    target = (root / relpath).resolve()
    if root != target and root not in target.parents:
        raise ValueError(f"refusing to write outside the output folder: {relpath}")
    return target


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so readers see either nothing or all of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def _fsync_dir(folder: Path) -> None:
    # The rename is durable only once the directory entry is on disk.
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def sweep_partial_files(output_dir: Path) -> int:
    """Delete temporaries left by a run that was killed mid-write. Returns the count."""
    removed = 0
    if not output_dir.is_dir():
        return 0
    for dirpath, _dirnames, filenames in os.walk(output_dir):
        for name in filenames:
            if name.startswith(".") and name.endswith(TEMP_SUFFIX):
                with contextlib.suppress(OSError):
                    os.unlink(os.path.join(dirpath, name))
                    removed += 1
    return removed


@contextlib.contextmanager
def atomic_open_text(path: Path) -> Iterator[IO[str]]:
    """Stream text into ``path`` atomically (for large files such as results.jsonl)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=TEMP_SUFFIX, dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8", newline="\n") as handle:
            yield handle
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    _fsync_dir(path.parent)
