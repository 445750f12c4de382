"""Content identity and the stat cache's trust rule (git's "racily clean")."""

from __future__ import annotations

import hashlib
import os
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from pipeline.errors import InputProblem
from pipeline.identity import (
    RACY_GRANULARITY_NS,
    FileSignature,
    HashedFile,
    cached_hash_usable,
    cached_row_usable,
    hash_file,
    hash_file_checked,
    item_key,
    item_key_maker,
    signature_trustworthy,
)
from tests.unit._opens import watch_opens

G = RACY_GRANULARITY_NS


def sig(mtime_ns: int = 10 * G, ctime_ns: int = 10 * G, **kw: int) -> FileSignature:
    args = {"size": 100, "inode": 7, "dev": 1, **kw}
    return FileSignature(mtime_ns=mtime_ns, ctime_ns=ctime_ns, **args)


def test_signature_of_a_stat_result(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"12345")
    st_ = os.stat(path)
    got = FileSignature.of(st_)
    assert got == FileSignature(
        size=5, mtime_ns=st_.st_mtime_ns, ctime_ns=st_.st_ctime_ns, inode=st_.st_ino, dev=st_.st_dev
    )
    assert FileSignature.from_row(got.as_row()) == got


def test_trusted_only_once_a_whole_tick_older_than_the_cache_moment() -> None:
    s = sig(mtime_ns=5 * G, ctime_ns=5 * G)
    assert signature_trustworthy(s, 6 * G)
    assert not signature_trustworthy(s, 6 * G - 1)
    assert not signature_trustworthy(s, 5 * G)  # same moment: racily clean
    assert not signature_trustworthy(s, 4 * G)  # written after the cache (clock skew)
    assert signature_trustworthy(s, 5 * G + 10, granularity_ns=10)


def test_a_recent_ctime_is_not_trusted_even_with_an_old_mtime() -> None:
    # cp -p / rsync -t / touch -r set the mtime back; only the kernel sets ctime.
    s = sig(mtime_ns=1 * G, ctime_ns=9 * G)
    assert not signature_trustworthy(s, 9 * G + G // 2)
    assert signature_trustworthy(s, 10 * G)


@given(
    mtime=st.integers(0, 2**62),
    ctime=st.integers(0, 2**62),
    cached_at=st.integers(0, 2**62),
    later=st.integers(0, 2**40),
)
def test_trust_is_monotonic_in_time_and_never_before_a_tick(
    mtime: int, ctime: int, cached_at: int, later: int
) -> None:
    s = sig(mtime_ns=mtime, ctime_ns=ctime)
    trusted = signature_trustworthy(s, cached_at)
    assert trusted == (cached_at - max(mtime, ctime) >= G)
    if trusted:
        assert signature_trustworthy(s, cached_at + later)


def test_usable_needs_equal_signatures() -> None:
    s = sig()
    at = 20 * G
    assert cached_hash_usable(s, at, sig())
    for changed in (
        sig(size=101),
        sig(mtime_ns=10 * G + 1),
        sig(ctime_ns=10 * G + 1),
        sig(inode=8),
        sig(dev=2),
    ):
        assert not cached_hash_usable(s, at, changed), changed


def _cache(path: Path) -> tuple[HashedFile, int]:
    """What the lead's cache stores: (digest, signature) and the moment read *before*."""
    cached_at = time.time_ns()
    return hash_file_checked(path), cached_at


def test_file_rewritten_in_place_with_the_same_size_is_rehashed(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"A" * 1000)
    old = os.stat(path)
    hashed, cached_at = _cache(path)
    assert hashed.digest == hashlib.sha256(b"A" * 1000).hexdigest()
    assert hashed.signature == FileSignature.of(old)
    # Right after the hash the entry is racily clean: a same-size rewrite in this tick
    # could keep the mtime, so the cache must not be trusted yet.
    assert not cached_hash_usable(hashed.signature, cached_at, FileSignature.of(os.stat(path)))

    # Much later (as the lead's next night would see it): trusted while untouched...
    later = max(old.st_mtime_ns, old.st_ctime_ns) + G
    assert cached_hash_usable(hashed.signature, later, FileSignature.of(os.stat(path)))
    # ...and not once the bytes are rewritten in place, same size, mtime put back.
    with path.open("r+b") as fp:
        fp.write(b"B" * 1000)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    while os.stat(path).st_ctime_ns == old.st_ctime_ns:  # same coarse-clock tick
        time.sleep(0.005)
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    now = os.stat(path)
    assert (now.st_size, now.st_mtime_ns, now.st_ino) == (old.st_size, old.st_mtime_ns, old.st_ino)
    assert not cached_hash_usable(hashed.signature, later, FileSignature.of(now))
    assert hash_file_checked(path).digest == hashlib.sha256(b"B" * 1000).hexdigest()


def test_file_replaced_by_rename_is_rehashed(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"A" * 10)
    hashed, _ = _cache(path)
    other = tmp_path / "b.jpg"
    other.write_bytes(b"B" * 10)
    st_old = os.stat(path)
    os.utime(other, ns=(st_old.st_atime_ns, st_old.st_mtime_ns))
    os.replace(other, path)
    later = max(st_old.st_mtime_ns, st_old.st_ctime_ns, os.stat(path).st_ctime_ns) + G
    assert not cached_hash_usable(hashed.signature, later, FileSignature.of(os.stat(path)))


def test_hash_file_checked_refuses_a_fifo_without_opening_it(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with watch_opens(fifo) as opened, pytest.raises(InputProblem) as err:
        hash_file_checked(fifo)
    assert opened == []
    assert err.value.code == "INPUT_NOT_A_FILE"
    with watch_opens(fifo) as opened, pytest.raises(OSError, match="not a regular file"):
        hash_file(fifo)  # the old contract: OSError, and no hang
    assert opened == []


def test_hash_file_checked_refuses_a_huge_file_unread(tmp_path: Path) -> None:
    big = tmp_path / "huge.jpg"
    with big.open("wb") as fp:
        fp.truncate(1536 * 1024 * 1024)  # sparse: takes no disk
    with watch_opens(big) as opened, pytest.raises(InputProblem) as err:
        hash_file_checked(big, 100 * 1024 * 1024, why="the limit")
    assert opened == []
    assert err.value.code == "INPUT_TOO_LARGE"
    assert err.value.message == (
        f"{big}: 1.5 GB is more than the 100.0 MB the pipeline reads for one input "
        f"(the limit); shrink or re-export it, or remove it from the inputs"
    )


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda p: None, "INPUT_MISSING"),
        (lambda p: p.mkdir(), "INPUT_NOT_A_FILE"),
        (lambda p: os.symlink(p.parent / "nowhere", p), "INPUT_BROKEN_SYMLINK"),
        (lambda p: os.symlink(p, p), "INPUT_SYMLINK_LOOP"),
    ],
    ids=["missing", "folder", "broken-link", "self-loop"],
)
def test_hash_file_checked_codes(tmp_path: Path, make: object, code: str) -> None:
    path = tmp_path / "x.jpg"
    make(path)  # type: ignore[operator]
    with pytest.raises(InputProblem) as err:
        hash_file_checked(path)
    assert err.value.code == code
    assert err.value.message.startswith(f"{path}: ")
    assert "\n" not in err.value.message


# -- the fast paths a rerun takes (same answers as the plain rules) ---------------------


@given(
    st.tuples(*(st.integers(0, 5 * G) for _ in range(5))),
    st.tuples(*(st.integers(0, 5 * G) for _ in range(5))),
    st.integers(0, 10 * G),
)
def test_cached_row_usable_agrees_with_cached_hash_usable(
    cached: tuple[int, int, int, int, int], now: tuple[int, int, int, int, int], at: int
) -> None:
    # A stat result with exactly these fields (size, mtime_ns, ctime_ns, inode, dev).
    size, mtime, ctime, ino, dev = now
    fields = [0] * 10
    fields[1], fields[2], fields[6] = ino, dev, size
    result = os.stat_result((*fields,), {"st_mtime_ns": mtime, "st_ctime_ns": ctime})
    assert FileSignature.of(result).as_row() == now
    expected = cached_hash_usable(FileSignature.from_row(cached), at, FileSignature.of(result))
    assert cached_row_usable(cached, at, result) is expected
    assert cached_row_usable(now, at, result) is signature_trustworthy(
        FileSignature.from_row(now), at
    )


def test_cached_row_usable_refuses_a_same_size_rewrite(tmp_path: Path) -> None:
    path = tmp_path / "a.jpg"
    path.write_bytes(b"A" * 1000)
    old = os.stat(path)
    row = FileSignature.of(old).as_row()
    later = max(old.st_mtime_ns, old.st_ctime_ns) + G
    assert cached_row_usable(row, later, os.stat(path))
    with path.open("r+b") as fp:
        fp.write(b"B" * 1000)
    os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    while os.stat(path).st_ctime_ns == old.st_ctime_ns:
        time.sleep(0.005)
        os.utime(path, ns=(old.st_atime_ns, old.st_mtime_ns))
    assert not cached_row_usable(row, later, os.stat(path))


@given(
    st.one_of(
        st.text("0123456789abcdef", min_size=64, max_size=64),
        st.text(min_size=0, max_size=80),
    ),
    st.dictionaries(
        st.sampled_from(["input", "service_choice", "x", "op"]),
        st.one_of(st.integers(-5, 5), st.text(max_size=70), st.just("0" * 64)),
        max_size=3,
    ),
    st.dictionaries(
        st.sampled_from(["image_template", "input"]),
        st.sampled_from(["0" * 64, "f" * 64, "ab" * 32]),
        max_size=2,
    ),
)
def test_item_key_maker_gives_item_key(
    identity: str, params: dict[str, int | str], files: dict[str, str]
) -> None:
    make = item_key_maker("ailab/emotion-editor", params, files)
    assert make(identity) == item_key(identity, "ailab/emotion-editor", params, files)
