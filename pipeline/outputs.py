"""Where results go, and how they get there without ever being half-written.

Result paths
============

``result_relpath(operation, variant, input_rel, ext)`` is
``<operation dir>/<variant dir>/<dir>/.../<file>``: one output component per input
component, each mapped on its own by a pure rule (it looks at nothing but that name,
so a file added tomorrow never renames today's outputs):

* **Plain names are kept as they are.** A folder name (or variant label) is plain when
  it is lowercase ASCII letters, digits and ``_ . , = + -``, starts with a letter,
  digit or ``_``, does not end with ``.``, is not an image name (``*.jpg``, ``.jpeg``,
  ``.png``, ``.webp``: those only ever name result files), is not a Windows device name
  (``con``, ``nul``, ``com1``...) and is at most 190 bytes.
* **A plain file name** is a plain name ``stem.x`` whose extension ``x`` is ``jpg``,
  ``jpeg``, ``png`` or ``webp`` and whose stem does not itself end with one. If ``x``
  already means the result's format it is kept (``ana.jpg`` -> ``ana.jpg``); otherwise
  the result's extension is appended (``ana.png`` with a JPEG result -> ``ana.png.jpg``).
* **Every other name** becomes ``readable~hash`` (a file: ``readable~hash.ext``):
  ``readable`` is the name in NFC with anything but letters, digits and ``. _ - , = + @``
  replaced by ``_`` (and the file's extension dropped if it means the result's format),
  cut to fit; ``hash`` is 10 base32 characters of SHA-256 of the exact name. So
  ``a b.jpg`` -> ``a_b~3kq....jpg`` while ``a_b.jpg`` stays ``a_b.jpg``; ``Ana.jpg`` ->
  ``Ana~....jpg`` while ``ana.jpg`` stays; ``x.png.jpg`` -> ``x.png~....jpg`` while
  ``x.png`` gives ``x.png.jpg``.
* The operation folder is ``vendor-name`` (``ailab/emotion-editor`` ->
  ``ailab-emotion-editor``).
* **Deep trees**: at most 32 folder levels and 1 024 bytes of folders are mirrored;
  the rest of a deeper path becomes one ``_deep~hash`` folder (hash of the exact rest).
* **A displaced result**: the path is a function of the names, and an item is its
  content and parameters, so a later run can map a different item to a path where an
  earlier one stored its paid result (a new photo saved under an old photo's name, a
  template replaced by another of the same name). The journal knows every stored
  path: such an item's file is ``readable~hash.ext`` with the hash taken over its key
  and the name (tagged apart from a name's hash), and the earlier result stays.

Why this is collision-free: plain outputs contain no ``~`` and are their own NFC and
case fold, so two plain outputs are equal only if the names were; hashed outputs
contain ``~`` and a hash of the exact name, so they can equal neither a plain output
nor each other (short of a SHA-256 collision), also after NFC and case folding (case-
insensitive file systems). An appended extension is recognisable (the stem ends with
an image extension, which a kept plain name never has), so it holds for any result
format of each item. Result files always end in an image extension and folders never
do, so a result can never sit where another result's folder must be. Every component
is at most 200 bytes (the file-system limit is 255), never ``.``, ``..`` or empty.

Safe writes
===========

Writes are atomic: bytes go to a short temporary ``.<random>.part`` in the target's
folder, are fsynced, then renamed over the final name (and the folder fsynced), so a
crash never leaves a partial file under a final name. Leftover temporaries are swept
at the start of a run (:func:`sweep_partial_files`).

Nothing is written through a planted symlink: below the output folder (``root``)
every folder is opened with ``O_NOFOLLOW | O_DIRECTORY`` relative to its parent's
descriptor (created if missing), temporaries are created with ``O_EXCL | O_NOFOLLOW``,
and the rename replaces whatever entry holds the final name without following it. A
symlink, or a file where a folder should be, is refused with :class:`UnsafePathError`.
The output folder itself may be a symlink (that is the user's choice).

Every failure is a :class:`FileWriteError` (an ``OSError``) with the original
``errno``, so callers can tell ``ENOSPC`` (disk full) from everything else, and a one
line message naming the file.
"""

from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import io
import os
import re
import secrets
import stat
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from types import TracebackType
from typing import IO, Final, Self

__all__ = [
    "MAX_COMPONENT_BYTES",
    "RESERVE_NAME",
    "RESULT_EXTS",
    "TEMP_SUFFIX",
    "AtomicFile",
    "DiskReserve",
    "FileWriteError",
    "ResultFolders",
    "UnsafePathError",
    "atomic_open_text",
    "atomic_write_bytes",
    "atomic_write_text",
    "check_no_symlink",
    "open_result",
    "resolve_inside",
    "result_relpath",
    "result_relpaths",
    "sweep_partial_files",
    "write_file_nofollow",
    "write_result",
]

TEMP_SUFFIX = ".part"

#: No output component is longer than this (UTF-8 bytes); file systems allow 255.
MAX_COMPONENT_BYTES = 200

# --------------------------------------------------------------------------------------
# errors


class FileWriteError(OSError):
    """A file in the output folder could not be written. ``errno`` is the system's.

    ``str()`` and ``strerror`` are both one line naming the file and what to do (not
    the bare system text, so whichever a caller shows reads well); ``filename`` is
    the path.
    """

    def __init__(self, err: int, path: Path | str, message: str | None = None) -> None:
        text = message or _describe(err, str(path))
        super().__init__(err, text, str(path))
        self.message = text

    def __str__(self) -> str:
        return self.message


class UnsafePathError(FileWriteError, ValueError):
    """Refused: a symlink or a file in the way below the output folder, or a path that
    would leave it. ``errno`` is ``ELOOP`` (symlink), ``ENOTDIR`` (a file where a folder
    should be), ``EISDIR`` (a folder where a file should be) or ``EINVAL`` (bad name)."""


def _describe(err: int, path: str) -> str:
    what = {
        errno.ENOSPC: "no space left on the device; free some space and rerun",
        errno.EDQUOT: "disk quota exceeded; free some space and rerun",
        errno.ELOOP: "is a symbolic link; refusing to follow it (remove it and rerun)",
        errno.ENOTDIR: "a file is in the way where a folder should be; move it aside and rerun",
        errno.EISDIR: "a folder is in the way where a file should be; move it aside and rerun",
        errno.ENAMETOOLONG: "name too long for the file system",
        errno.EROFS: "the file system is read-only; choose a writable output folder",
        errno.EACCES: "permission denied; fix the folder's permissions and rerun",
        errno.EPERM: "operation not permitted; fix the folder's permissions and rerun",
    }.get(err, f"cannot write: {os.strerror(err)}")
    return f"{path}: {what}"


def _wrap(exc: OSError, path: Path | str) -> FileWriteError:
    if isinstance(exc, FileWriteError):
        return exc
    err = exc.errno or errno.EIO
    cls = UnsafePathError if err in (errno.ELOOP, errno.ENOTDIR, errno.EISDIR) else FileWriteError
    wrapped = cls(err, path)
    wrapped.__cause__ = exc
    return wrapped


# --------------------------------------------------------------------------------------
# result paths

_IMAGE_EXTS = frozenset({"jpg", "jpeg", "png", "webp"})
# Input extensions that already mean each result format.
_SAME_FORMAT = {
    "jpg": frozenset({"jpg", "jpeg"}),
    "png": frozenset({"png"}),
    "webp": frozenset({"webp"}),
}
_PLAIN = re.compile(r"[a-z0-9_][a-z0-9_.,=+-]*")
_OPERATION = re.compile(r"[a-z0-9]+/[a-z0-9][a-z0-9-]*")
_READABLE_PUNCT = frozenset("._-,=+@")
_LEADING_DOTS = re.compile(r"^[.-]+")
_WINDOWS_DEVICES = frozenset(
    {"con", "prn", "aux", "nul"} | {f"{d}{n}" for d in ("com", "lpt") for n in "0123456789"}
)
_PLAIN_MAX = 190
_HASH_LEN = 10
_MAX_DIRS = 32
_MAX_DIR_BYTES = 1024
# "~" + hash + ".webp": what a hashed file name adds to its readable part.
_READABLE_MAX = MAX_COMPONENT_BYTES - 1 - _HASH_LEN - len(".webp")


def _hash(tag: str, text: str) -> str:
    # surrogatepass: names that were not valid UTF-8 still hash exactly and distinctly.
    raw = f"{tag}\0{text}".encode("utf-8", "surrogatepass")
    return base64.b32encode(hashlib.sha256(raw).digest()).decode("ascii").lower()[:_HASH_LEN]


def _nbytes(text: str) -> int:
    return len(text.encode("utf-8", "surrogatepass"))


def _has_image_ext(name: str) -> bool:
    return "." in name and name.rsplit(".", 1)[1].lower() in _IMAGE_EXTS


def _is_plain(name: str) -> bool:
    return (
        _PLAIN.fullmatch(name) is not None
        and not name.endswith(".")
        and len(name) <= _PLAIN_MAX
        and name.split(".", 1)[0] not in _WINDOWS_DEVICES
    )


def _readable(name: str) -> str:
    """A lossy, safe, human-readable form of ``name`` (identity comes from the hash)."""
    text = unicodedata.normalize("NFC", name)
    chars = [c if (c.isalnum() and c.isprintable()) or c in _READABLE_PUNCT else "_" for c in text]
    # Never a hidden name (the sweep deletes ".*.part") nor one a shell takes for an option.
    out = _LEADING_DOTS.sub("_", "".join(chars)) or "_"
    encoded = out.encode("utf-8")
    if len(encoded) > _READABLE_MAX:
        out = encoded[:_READABLE_MAX].decode("utf-8", "ignore")
    return out


def _hashed(name: str, tag: str = "name") -> str:
    return f"{_readable(name)}~{_hash(tag, name)}"


def _dir_component(name: str) -> str:
    if _is_plain(name) and not _has_image_ext(name):
        return name
    return _hashed(name)


def _file_component(name: str, ext: str) -> str:
    if _is_plain(name) and "." in name:
        stem, suffix = name.rsplit(".", 1)
        if suffix in _IMAGE_EXTS and not _has_image_ext(stem):
            return name if suffix in _SAME_FORMAT[ext] else f"{name}.{ext}"
    stem, dot, suffix = name.rpartition(".")
    readable_of = stem if dot and stem and suffix.lower() in _SAME_FORMAT[ext] else name
    return f"{_readable(readable_of)}~{_hash('name', name)}.{ext}"


def _keyed(name: str, ext: str, key: str) -> str:
    """A displaced result's file name: readable, then a hash of the item's key and the
    exact name (tagged apart from a name's own hash)."""
    stem, dot, suffix = name.rpartition(".")
    readable_of = stem if dot and stem and suffix.lower() in _SAME_FORMAT[ext] else name
    return f"{_readable(readable_of)}~{_hash('key', key + chr(0) + name)}.{ext}"


def _operation_component(operation: str) -> str:
    if _OPERATION.fullmatch(operation) and len(operation) <= _PLAIN_MAX:
        return operation.replace("/", "-")
    return _hashed(operation, "operation")


def _normal_ext(result_ext: str) -> str:
    ext = result_ext.lower().lstrip(".")
    ext = "jpg" if ext == "jpeg" else ext
    if ext not in _SAME_FORMAT:
        raise ValueError(f"result extension must be jpg, png or webp, not {result_ext!r}")
    return ext


def result_relpath(
    operation: str,
    variant_label: str,
    input_rel: str,
    result_ext: str,
    *,
    displaced_key: str | None = None,
) -> str:
    """The result's path relative to the output folder (posix separators).

    Pure and injective over distinct ``(operation, variant_label, input_rel)``, even
    after Unicode NFC and case folding of the whole path and whatever ``result_ext``
    (``jpg``, ``png`` or ``webp``) each item gets; never absolute, never ``..``. The
    rule is in the module docstring. ``input_rel`` is split on ``/`` and every part,
    even an empty one, maps to exactly one component. ``displaced_key``: the item's
    key, when an earlier item already stored its result at that path (a displaced
    result, in the module docstring).
    """
    ext = _normal_ext(result_ext)
    raw_parts = input_rel.split("/")
    raw_dirs, name = raw_parts[:-1], raw_parts[-1]
    dirs = [_dir_component(p) for p in raw_dirs]
    if len(dirs) > _MAX_DIRS or sum(_nbytes(d) + 1 for d in dirs) > _MAX_DIR_BYTES:
        # Keep the top of the tree readable and fold the rest into one folder named
        # after a hash of the exact remaining parts ("/" never occurs inside a part,
        # so the join is unambiguous).
        marker_bytes = len("_deep~") + _HASH_LEN + 1
        kept: list[str] = []
        used = 0
        for d in dirs[: _MAX_DIRS - 1]:
            if used + _nbytes(d) + 1 + marker_bytes > _MAX_DIR_BYTES:
                break
            kept.append(d)
            used += _nbytes(d) + 1
        rest = "/".join(raw_dirs[len(kept) :])
        dirs = [*kept, f"_deep~{_hash('deep', rest)}"]
    parts = [
        _operation_component(operation),
        _dir_component(variant_label),
        *dirs,
        _file_component(name, ext) if displaced_key is None else _keyed(name, ext, displaced_key),
    ]
    return "/".join(parts)


RESULT_EXTS: Final = ("jpg", "png", "webp")


def result_relpaths(operation: str, variant_label: str, input_rel: str) -> tuple[str, ...]:
    """:func:`result_relpath` for each result extension of :data:`RESULT_EXTS` (the
    folders computed once)."""
    first = result_relpath(operation, variant_label, input_rel, RESULT_EXTS[0])
    folder, name = first.rsplit("/", 1)[0], input_rel.rsplit("/", 1)[-1]
    return (first, *(f"{folder}/{_file_component(name, ext)}" for ext in RESULT_EXTS[1:]))


# --------------------------------------------------------------------------------------
# path checks

_O_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC


def _check_name(name: str, display: Path | str) -> None:
    if name in ("", ".", "..") or "/" in name or "\0" in name:
        raise UnsafePathError(
            errno.EINVAL, display, f"{display}: {name!r} is not a valid file name here"
        )


def _rel_parts(relpath: str, display: str) -> list[str]:
    parts = [p for p in relpath.split("/") if p not in ("", ".")]
    if relpath.startswith("/") or "\0" in relpath or ".." in parts:
        raise UnsafePathError(
            errno.EINVAL, display, f"refusing to write outside the output folder: {relpath!r}"
        )
    return parts


def _lstat_no_link(path: Path, dir_fd: int | None = None) -> os.stat_result | None:
    """``lstat(path)``, ``None`` if it is absent; raises :class:`UnsafePathError`
    (``ELOOP``) if it is a symlink, or the wrapped error if it cannot be read.
    With ``dir_fd``: ``path.name`` in that folder (``path`` names it in errors)."""
    try:
        if dir_fd is None:
            st = os.lstat(path)
        else:
            st = os.stat(path.name, dir_fd=dir_fd, follow_symlinks=False)
    except FileNotFoundError:
        return None
    except OSError as exc:
        raise _wrap(exc, path) from None
    if stat.S_ISLNK(st.st_mode):
        raise UnsafePathError(errno.ELOOP, path)
    return st


def _refuse_symlink(path: Path) -> None:
    """Raise if ``path`` is a symlink; return quietly if it is anything else or absent."""
    _lstat_no_link(path)


def check_no_symlink(path: Path, *, sqlite: bool = False) -> None:
    """Refuse ``path`` if it is a symlink or exists as anything but a regular file.

    Call it before handing ``path`` to a library that follows links (SQLite).
    ``sqlite=True`` also checks the ``-wal``, ``-shm`` and ``-journal`` files SQLite
    opens beside it. Raises :class:`UnsafePathError` (``ELOOP`` for a symlink,
    ``EISDIR`` for a folder, ``EINVAL`` for a FIFO, socket or device).
    """
    paths = [path]
    if sqlite:
        paths += [path.with_name(path.name + s) for s in ("-wal", "-shm", "-journal")]
    for p in paths:
        st = _lstat_no_link(p)
        if st is None:
            continue
        if stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(errno.EISDIR, p)
        if not stat.S_ISREG(st.st_mode):
            raise UnsafePathError(
                errno.EINVAL,
                p,
                f"{p}: is not a regular file (a FIFO, socket or device?); move it aside and rerun",
            )


def resolve_inside(output_dir: Path, relpath: str) -> Path:
    """Join ``relpath`` to ``output_dir`` and prove the result stays inside it.

    Refuses (:class:`UnsafePathError`, also a ``ValueError``) an absolute path, ``..``,
    a NUL byte, and any existing component below ``output_dir`` that is a symlink
    (``ELOOP``), a file where a folder must be (``ENOTDIR``) or a folder where the file
    must be (``EISDIR``). Returns the path under the resolved output folder.
    """
    root = output_dir.resolve()
    parts = _rel_parts(relpath, str(output_dir / relpath))
    if not parts:
        raise UnsafePathError(errno.EINVAL, root, f"{root}: no file name in {relpath!r}")
    current = root
    for i, part in enumerate(parts):
        current = current / part
        st = _lstat_no_link(current)
        if st is None:
            break
        last = i == len(parts) - 1
        if not last and not stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(errno.ENOTDIR, current)
        if last and stat.S_ISDIR(st.st_mode):
            raise UnsafePathError(errno.EISDIR, current)
    return root.joinpath(*parts)


def _parts_under(root: Path, path: Path) -> list[str]:
    """``path``'s components below ``root``, lexically (no link is followed)."""
    display = str(path)
    for base in (Path(os.path.abspath(root)), root.resolve()):
        try:
            rel = Path(os.path.abspath(path)).relative_to(base)
        except ValueError:
            continue
        parts = _rel_parts(rel.as_posix(), display)
        if parts:
            return parts
    raise UnsafePathError(
        errno.EINVAL, path, f"refusing to write outside the output folder {root}: {path}"
    )


def _open_dirs(root: Path, parts: list[str], *, durable: bool = True) -> int:
    """Open (creating as needed) ``root/parts...`` without following any link below
    ``root``; returns the folder's descriptor. ``root`` is created the ordinary way.
    ``durable=False``: a new folder's parent is not fsynced (a cache's folders)."""
    try:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(root, _O_DIR)
    except OSError as exc:
        raise _wrap(exc, root) from None
    current = root
    try:
        for part in parts:
            current = current / part
            _check_name(part, current)
            try:
                child = os.open(part, _O_DIR | os.O_NOFOLLOW, dir_fd=fd)
            except FileNotFoundError:
                try:
                    os.mkdir(part, 0o777, dir_fd=fd)
                except FileExistsError:
                    pass  # another worker made it first; the open below checks what it is
                else:
                    # The new entry is durable only once its parent is on disk.
                    if durable:
                        with contextlib.suppress(OSError):
                            os.fsync(fd)
                child = os.open(part, _O_DIR | os.O_NOFOLLOW, dir_fd=fd)
            os.close(fd)
            fd = child
    except OSError as exc:
        os.close(fd)
        if exc.errno in (errno.ELOOP, errno.ENOTDIR):
            _refuse_symlink(current)  # ELOOP from O_NOFOLLOW: say "symlink" when it is one
        raise _wrap(exc, current) from None
    return fd


def _fsync_dir_fd(fd: int) -> None:
    # The rename is durable only once the directory entry is on disk; some file
    # systems refuse fsync on a directory (EINVAL), which is not our failure.
    with contextlib.suppress(OSError):
        os.fsync(fd)


def _name_max(dir_fd: int) -> int:
    try:
        return os.fpathconf(dir_fd, "PC_NAME_MAX")
    except (OSError, ValueError):
        return 255


def _temp_token() -> str:
    return secrets.token_hex(6)


# --------------------------------------------------------------------------------------
# writers


class AtomicFile:
    """A file written under a temporary name and renamed into place on :meth:`commit`.

    ``AtomicFile(target, root=output_dir)`` opens every folder from ``root`` down to
    ``target``'s without following links (creating missing ones) and creates
    ``.<random>.part`` beside ``target`` (:attr:`path`). :meth:`write` appends bytes;
    :meth:`commit` flushes, fsyncs, renames over ``target`` and fsyncs the folder;
    :meth:`discard` deletes the temporary. As a context manager it discards on an
    exception and commits on a clean exit (unless already committed or discarded).
    Without ``root``, ``target``'s folder is trusted as given (created if missing)
    and only the names inside it are protected: pass ``root`` for nested targets.

    Every failure is a :class:`FileWriteError` with the system's ``errno``; the
    temporary is removed when one occurs.
    """

    def __init__(
        self,
        target: Path,
        *,
        root: Path | None = None,
        durable: bool = True,
        dir_fd: int | None = None,
        name_max: int | None = None,
    ) -> None:
        self.target = target
        self.durable = durable  # fsync the bytes and the folder (False: a cache file)
        if dir_fd is not None:
            # ``target``'s folder, opened already with no link followed (see
            # ResultFolders); this file owns the descriptor from now on.
            self._name, self._dir_fd = target.name, dir_fd
        else:
            if root is None:
                parent, parts = target.parent, [target.name]
            else:
                parent, parts = root, _parts_under(root, target)
            self._name = parts[-1]
            _check_name(self._name, target)
            self._dir_fd = _open_dirs(parent, parts[:-1], durable=durable)
        self._done = False
        try:
            _check_name(self._name, target)
            # Refuse a name the folder cannot hold before any byte is written (the
            # short temporary name alone would only fail at the final rename).
            name_max = name_max or _name_max(self._dir_fd)
            if _nbytes(self._name) > name_max:
                raise FileWriteError(errno.ENAMETOOLONG, target)
            self._tmp_name, fd = self._create_temp()
        except BaseException:
            os.close(self._dir_fd)
            raise
        self.name_max = name_max
        self.path = target.with_name(self._tmp_name)
        self._fh: io.BufferedWriter = os.fdopen(fd, "wb")
        self.bytes_written = 0

    @property
    def dir_fd(self) -> int:
        """The descriptor of the target's folder (owned by this file)."""
        return self._dir_fd

    def _create_temp(self) -> tuple[str, int]:
        flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
        for _ in range(16):
            name = f".{_temp_token()}{TEMP_SUFFIX}"
            try:
                return name, os.open(name, flags, 0o666, dir_fd=self._dir_fd)
            except FileExistsError:
                continue  # taken (or planted): O_EXCL never follows it; pick another
            except OSError as exc:
                raise _wrap(exc, self.target) from None
        raise FileWriteError(errno.EEXIST, self.target)

    def write(self, data: bytes) -> int:
        """Append ``data``; returns its length."""
        try:
            self._fh.write(data)
        except OSError as exc:
            self.discard()
            raise _wrap(exc, self.target) from None
        self.bytes_written += len(data)
        return len(data)

    def flush(self) -> None:
        """Push buffered bytes to the temporary file (so :attr:`path` can be read)."""
        try:
            self._fh.flush()
        except OSError as exc:
            self.discard()
            raise _wrap(exc, self.target) from None

    def retarget(self, target: Path) -> None:
        """Commit under ``target`` instead, a name in the same folder (the result's
        extension is known only once its bytes are)."""
        if target.parent != self.target.parent:
            raise ValueError(f"{target}: not in the folder of {self.target}")
        _check_name(target.name, target)
        if _nbytes(target.name) > self.name_max:
            raise FileWriteError(errno.ENAMETOOLONG, target)
        _refuse_in_the_way(self._dir_fd, target)
        self.target, self._name = target, target.name

    def commit(self) -> None:
        """Make the bytes written so far appear under ``target``, durably."""
        if self._done:
            raise ValueError(f"{self.target}: already committed or discarded")
        try:
            self._fh.flush()
            if self.durable:
                os.fsync(self._fh.fileno())
            self._fh.close()
            os.rename(self._tmp_name, self._name, src_dir_fd=self._dir_fd, dst_dir_fd=self._dir_fd)
        except OSError as exc:
            self.discard()
            raise _wrap(exc, self.target) from None
        self._done = True
        if self.durable:
            _fsync_dir_fd(self._dir_fd)
        os.close(self._dir_fd)

    def discard(self) -> None:
        """Delete the temporary file; ``target`` is left as it was. Idempotent."""
        if self._done:
            return
        self._done = True
        with contextlib.suppress(OSError):
            self._fh.close()
        with contextlib.suppress(OSError):
            os.unlink(self._tmp_name, dir_fd=self._dir_fd)
        os.close(self._dir_fd)

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.discard()
        elif not self._done:
            self.commit()


def atomic_write_bytes(
    path: Path, data: bytes, *, root: Path | None = None, durable: bool = True
) -> None:
    """Write ``data`` to ``path`` so readers see either the old file or all of it.

    ``root``: the output folder; every folder below it is opened without following
    links (see :class:`AtomicFile`). ``durable=False`` skips the fsyncs, for files that
    can be made again (thumbnails). Raises :class:`FileWriteError`.
    """
    with AtomicFile(path, root=root, durable=durable) as handle:
        handle.write(data)


class ResultFolders:
    """The output tree's folders, opened once and reused by every result written in
    them (thread-safe).

    Opening a folder the safe way (:func:`_open_dirs`: every component relative to
    its parent, ``O_NOFOLLOW``) and proving the path inside (:func:`resolve_inside`)
    cost a dozen system calls and most of a result write's CPU, profiled (README
    "Performance"). A folder opened before is reused only while ``lstat`` of its path
    still names that very folder (same device and inode, a folder): a component
    swapped for a symlink, or the folder moved or removed, sends the write back to the
    full, refusing path. At most :attr:`MAX_OPEN` descriptors are kept (least recently
    used first out). Call :meth:`close` when the run ends.
    """

    MAX_OPEN = 64

    def __init__(self, root: Path) -> None:
        self.root = root
        self._lock = threading.Lock()
        # folder parts -> (descriptor, st_dev, st_ino, NAME_MAX)
        self._open: OrderedDict[tuple[str, ...], tuple[int, int, int, int]] = OrderedDict()

    def open(self, relpath: str) -> AtomicFile:
        """An :class:`AtomicFile` for ``relpath`` (refused as :func:`resolve_inside`
        refuses it); the same as :func:`open_result`, faster for a folder met before."""
        parts = _rel_parts(relpath, str(self.root / relpath))
        if not parts:
            return open_result(self.root, relpath)
        key = tuple(parts[:-1])
        reused = self._reuse(key)
        if reused is None:
            handle = open_result(self.root, relpath)
            try:
                self._remember(key, handle)
            except BaseException:
                handle.discard()
                raise
            return handle
        fd, name_max = reused
        target = self.root.joinpath(*parts)
        try:
            _refuse_in_the_way(fd, target)
        except BaseException:
            os.close(fd)
            raise
        return AtomicFile(target, dir_fd=fd, name_max=name_max)  # owns fd, even if it fails

    def _reuse(self, key: tuple[str, ...]) -> tuple[int, int] | None:
        with self._lock:
            found = self._open.get(key)
            if found is None:
                return None
            fd, dev, ino, name_max = found
            try:
                st = os.lstat(os.path.join(self.root, *key))
                same = stat.S_ISDIR(st.st_mode) and (st.st_dev, st.st_ino) == (dev, ino)
            except OSError:
                same = False
            if not same:
                del self._open[key]
                os.close(fd)
                return None
            self._open.move_to_end(key)
            return os.dup(fd), name_max

    def _remember(self, key: tuple[str, ...], handle: AtomicFile) -> None:
        st = os.fstat(handle.dir_fd)
        with self._lock:
            if key in self._open:
                return
            self._open[key] = (os.dup(handle.dir_fd), st.st_dev, st.st_ino, handle.name_max)
            while len(self._open) > self.MAX_OPEN:
                _, (old, *_) = self._open.popitem(last=False)
                os.close(old)

    def close(self) -> None:
        with self._lock:
            while self._open:
                _, (fd, *_) = self._open.popitem()
                os.close(fd)


def _refuse_in_the_way(dir_fd: int, target: Path) -> None:
    """Refuse ``target`` (in the folder ``dir_fd``) if a symlink or a folder holds its
    name, as :func:`resolve_inside` refuses them."""
    st = _lstat_no_link(target, dir_fd)
    if st is not None and stat.S_ISDIR(st.st_mode):
        raise UnsafePathError(errno.EISDIR, target)


def open_result(output_dir: Path, relpath: str) -> AtomicFile:
    """An :class:`AtomicFile` for the result at ``relpath`` (from :func:`result_relpath`)
    under ``output_dir``: checked with :func:`resolve_inside`, written with no link
    followed below ``output_dir``. For streaming a download to disk."""
    return AtomicFile(resolve_inside(output_dir, relpath), root=output_dir)


def write_result(
    output_dir: Path, relpath: str, data: bytes, *, folders: ResultFolders | None = None
) -> Path:
    """Store a result's bytes at ``relpath`` under ``output_dir``; returns the path.

    ``folders``: the run's :class:`ResultFolders` for ``output_dir`` (reuses open
    folders). Raises :class:`FileWriteError` (an ``OSError``; ``errno`` ``ENOSPC``
    when the disk is full) and :class:`UnsafePathError` for a planted symlink or a
    file in the way.
    """
    opened = folders.open(relpath) if folders is not None else open_result(output_dir, relpath)
    with opened as handle:
        handle.write(data)
    return handle.target


def write_file_nofollow(path: Path, data: bytes, *, root: Path | None = None) -> None:
    """Write ``data`` to ``path`` without following a planted symlink (atomically)."""
    atomic_write_bytes(path, data, root=root)


def atomic_write_text(path: Path, text: str, *, root: Path | None = None) -> None:
    atomic_write_bytes(path, text.encode("utf-8"), root=root)


@contextlib.contextmanager
def atomic_open_text(path: Path, *, root: Path | None = None) -> Iterator[IO[str]]:
    """Stream text into ``path`` atomically (for large files such as results.jsonl)."""
    handle = AtomicFile(path, root=root)
    try:
        text = io.TextIOWrapper(handle._fh, encoding="utf-8", newline="\n")
        yield text
        text.flush()
        text.detach()
    except OSError as exc:
        handle.discard()
        raise _wrap(exc, path) from None
    except BaseException:
        handle.discard()
        raise
    handle.commit()


def sweep_partial_files(output_dir: Path) -> int:
    """Delete temporaries left by a run that was killed mid-write. Returns the count.

    Matches every ``.*.part`` file (today's ``.<random>.part`` and older
    ``.<name>.<random>.part``); symlinks are unlinked, never followed.
    """
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


RESERVE_NAME = ".pipeline.reserve"


class DiskReserve:
    """Space held back on the output folder's file system for the end of a run.

    When the disk fills, the results and journal entries of work already paid for
    must still be written: the run releases this file (up to 16 MiB, at most an
    eighth of the free space when the run starts), retries those writes once, and
    stops with ``DISK_FULL``. The file is removed when the run ends.
    """

    def __init__(self, output_dir: Path, max_bytes: int = 16 * 1024 * 1024) -> None:
        self.path = output_dir / RESERVE_NAME
        self.max_bytes = max_bytes
        self.size = 0

    def free_bytes(self) -> int:
        st = os.statvfs(self.path.parent)
        return st.f_bavail * st.f_frsize

    def hold(self) -> int:
        """Create the reserve (best effort: a disk already full holds nothing)."""
        try:
            size = min(self.max_bytes, self.free_bytes() // 8)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)  # a reserve left by a killed run
            fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
        except OSError:
            return 0
        try:
            if size > 0:
                os.posix_fallocate(fd, 0, size)
            self.size = size
        except OSError:
            self.size = 0
        finally:
            os.close(fd)
        return self.size

    def release(self) -> bool:
        """Give the space back; True if that freed anything."""
        held, self.size = self.size, 0
        with contextlib.suppress(OSError):
            os.unlink(self.path)
        return held > 0
