"""Work-item identity: content, not paths; and when a cached content hash still holds.

A work item's key is the SHA-256 of the input file's content hash, the operation and
its canonical params (with extra files such as the face-swap template by *content*
hash too). Moving or renaming inputs therefore redoes nothing; changing a param
redoes exactly the variants it changes.

Hashing a million unchanged photos every night is the slow part of a rerun, so a
hash may be reused from a stat cache (kept by the journal): :class:`FileSignature`
is what ``stat`` says of a file, and :func:`cached_hash_usable` decides whether a
hash recorded with a signature still describes the file, with git's "racily clean"
rule (see :func:`signature_trustworthy`). Everything here except the ``hash_*``
functions is pure.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import stat
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

from pipeline.inputs import open_input, problem_for_os_error, too_large_problem

__all__ = [
    "RACY_GRANULARITY_NS",
    "FileSignature",
    "HashedFile",
    "cached_hash_usable",
    "cached_row_usable",
    "hash_file",
    "hash_file_checked",
    "item_key",
    "item_key_maker",
    "signature_row",
    "signature_trustworthy",
]

_CHUNK = 1024 * 1024

# How far apart two moments must be for a file system to give them different
# modification times. 2 s: FAT32 (SD cards and USB sticks, where photos come from)
# stores mtimes in 2-second steps; ext4, APFS and NTFS are finer, and the margin also
# absorbs a little clock skew between a network share and this machine.
RACY_GRANULARITY_NS = 2_000_000_000


def hash_file(path: Path) -> str:
    """Hex SHA-256 of a file's bytes, read in chunks (never whole).

    Raises ``OSError`` if the file can't be read, and for anything that is not a
    regular file (a FIFO is never opened: it would block until a writer appears).
    """
    if not stat.S_ISREG(os.stat(path).st_mode):
        raise OSError(errno.EINVAL, "not a regular file", str(path))
    # O_NONBLOCK: a FIFO swapped in after the stat opens at once, and the fstat refuses it.
    fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_BINARY", 0))
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(handle.fileno()).st_mode):
            raise OSError(errno.EINVAL, "not a regular file", str(path))
        digest = hashlib.sha256()
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


@dataclass(frozen=True)
class FileSignature:
    """What ``stat`` says of a file, enough to notice that it changed.

    Size and mtime catch ordinary edits; ctime catches a rewrite whose mtime was
    set back (``cp -p``, ``rsync -t``, ``touch -r``: only the kernel sets ctime);
    inode and device catch a file replaced by another (rename over it, a share
    mounted elsewhere).
    """

    size: int
    mtime_ns: int
    ctime_ns: int
    inode: int
    dev: int

    @classmethod
    def of(cls, st: os.stat_result) -> FileSignature:
        """The signature of a ``stat``/``fstat`` result (:attr:`InputEntry.stat`)."""
        return cls(
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
            inode=st.st_ino,
            dev=st.st_dev,
        )

    def as_row(self) -> tuple[int, int, int, int, int]:
        """``(size, mtime_ns, ctime_ns, inode, dev)``, e.g. for SQLite INTEGER columns.

        SQLite integers are signed 64-bit: every field fits (nanoseconds since 1970
        overflow in 2262; device numbers and inodes are well below 2**63 in practice).
        """
        return (self.size, self.mtime_ns, self.ctime_ns, self.inode, self.dev)

    @classmethod
    def from_row(cls, row: tuple[int, int, int, int, int]) -> FileSignature:
        """The inverse of :meth:`as_row`."""
        size, mtime_ns, ctime_ns, inode, dev = row
        return cls(size=size, mtime_ns=mtime_ns, ctime_ns=ctime_ns, inode=inode, dev=dev)


def signature_trustworthy(
    sig: FileSignature, cached_at_ns: int, *, granularity_ns: int = RACY_GRANULARITY_NS
) -> bool:
    """May a hash recorded with ``sig`` at ``cached_at_ns`` be trusted while the file's
    signature stays ``sig``?

    git's "racily clean" rule: a file changed within the same timestamp tick as the
    moment its hash was taken can change again without its mtime moving, so its
    signature proves nothing. The hash is trusted only if the file's mtime *and*
    ctime are at least ``granularity_ns`` older than ``cached_at_ns``. Then any later
    write, landing at or after ``cached_at_ns``, gets a strictly newer timestamp and
    a different signature.

    ``cached_at_ns`` must be ``time.time_ns()`` read *before* the file was opened for
    hashing (see :func:`hash_file_checked`), not when the row was written: a write
    during the hashing must fall after it. An untrusted entry is simply re-hashed
    (and re-cached with a new ``cached_at_ns``, trusted from then on if untouched).
    """
    return _settled_before(sig.mtime_ns, sig.ctime_ns, cached_at_ns, granularity_ns)


def _settled_before(mtime_ns: int, ctime_ns: int, cached_at_ns: int, granularity_ns: int) -> bool:
    """The racily-clean rule itself (see :func:`signature_trustworthy`)."""
    return max(mtime_ns, ctime_ns) + granularity_ns <= cached_at_ns


def cached_hash_usable(
    cached: FileSignature,
    cached_at_ns: int,
    current: FileSignature,
    *,
    granularity_ns: int = RACY_GRANULARITY_NS,
) -> bool:
    """Is the hash cached with ``cached`` (at ``cached_at_ns``) the hash of the file
    whose ``stat`` now gives ``current``? Equal signatures, and not racily clean."""
    return cached == current and signature_trustworthy(
        cached, cached_at_ns, granularity_ns=granularity_ns
    )


def signature_row(st: os.stat_result) -> tuple[int, int, int, int, int]:
    """``FileSignature.of(st).as_row()`` without the object."""
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)


def cached_row_usable(
    cached: tuple[int, ...],
    cached_at_ns: int,
    st: os.stat_result,
    *,
    granularity_ns: int = RACY_GRANULARITY_NS,
) -> bool:
    """:func:`cached_hash_usable` of a stat-cache row ``(size, mtime_ns, ctime_ns,
    inode, dev)`` against a ``stat`` result, the same rule without building two
    :class:`FileSignature` objects: a rerun checks 10^6 of these."""
    return tuple(cached) == signature_row(st) and _settled_before(
        cached[1], cached[2], cached_at_ns, granularity_ns
    )


class HashedFile(NamedTuple):
    """A content hash and the signature (``fstat``) of the file it was read from."""

    digest: str
    signature: FileSignature


def hash_file_checked(path: Path, max_bytes: int | None = None, *, why: str = "") -> HashedFile:
    """Hex SHA-256 of a regular file and its signature, streaming, checked by ``stat``.

    The file is ``stat``-ed first: nothing that is not a regular file is opened, and
    a file over ``max_bytes`` is refused before a byte is read (``why`` says why the
    cap, for the message). A file that grows past ``max_bytes`` while it is read is
    refused too. The signature is the ``fstat`` of the open file, taken before the
    first read: store it with the digest and the ``time.time_ns()`` read just before
    this call (:func:`signature_trustworthy`).

    Raises :class:`~pipeline.errors.InputProblem` (``INPUT_NOT_A_FILE``,
    ``INPUT_BROKEN_SYMLINK``, ``INPUT_SYMLINK_LOOP``, ``INPUT_MISSING``,
    ``INPUT_UNREADABLE``, ``INPUT_TOO_LARGE``), one line naming the path.
    """
    handle, st = open_input(path, max_bytes, why=why)
    digest = hashlib.sha256()
    seen = 0
    try:
        with handle:
            while chunk := handle.read(_CHUNK):
                seen += len(chunk)
                if max_bytes is not None and seen > max_bytes:
                    raise too_large_problem(path, seen, max_bytes, why)
                digest.update(chunk)
    except OSError as exc:  # EIO on a failing disk or a share that went away
        raise problem_for_os_error(os.fspath(path), exc) from None
    return HashedFile(digest.hexdigest(), FileSignature.of(st))


def item_key(
    input_hash: str,
    operation: str,
    params: Mapping[str, int | str],
    file_hashes: Mapping[str, str],
) -> str:
    """The stable key of (input content, operation, canonical params)."""
    canonical = _canonical(input_hash, operation, params, file_hashes)
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def _canonical(
    input_hash: str,
    operation: str,
    params: Mapping[str, int | str],
    file_hashes: Mapping[str, str],
) -> str:
    return json.dumps(
        {
            "input": input_hash,
            "op": operation,
            "params": {k: params[k] for k in sorted(params)},
            "files": {k: file_hashes[k] for k in sorted(file_hashes)},
        },
        sort_keys=True,
        separators=(",", ":"),
    )


def item_key_maker(
    operation: str,
    params: Mapping[str, int | str],
    file_hashes: Mapping[str, str],
) -> Callable[[str], str]:
    """``lambda input_hash: item_key(input_hash, operation, params, file_hashes)``,
    with the canonical JSON of everything but the input worked out once.

    For a hex content hash (what :func:`hash_file` returns) the key is the same
    string, computed by splicing the hash between the canonical text's two fixed
    halves; any other identity (``path:...`` of an unusable input, which could need
    JSON escaping) goes through :func:`item_key`.
    """
    marker = "0" * 64
    canonical = _canonical(marker, operation, params, file_hashes)
    head, _, tail = canonical.partition(f'"input":"{marker}"')
    head, tail = head + '"input":"', '"' + tail
    # The split must hold for any hash (a param or file value equal to the marker
    # could fool it): checked with a second marker, else every key takes the long way.
    other = "f" * 64
    spliced = head + other + tail == _canonical(other, operation, params, file_hashes)
    head_b, tail_b = head.encode(), tail.encode()
    sha256 = hashlib.sha256
    hexdigits = frozenset("0123456789abcdef")

    def key(input_hash: str) -> str:
        if spliced and len(input_hash) == 64 and hexdigits.issuperset(input_hash):
            return sha256(head_b + input_hash.encode() + tail_b).hexdigest()
        return item_key(input_hash, operation, params, file_hashes)

    return key
