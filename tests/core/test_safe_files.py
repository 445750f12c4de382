"""Fault injection for every file the pipeline writes in its output folder.

Each test plants something hostile (a symlink out of the folder, a file where a
folder should be, a name too long, a full or read-only file system), asserts the
exact errno, and checks that nothing outside the output folder changed.
"""

from __future__ import annotations

import errno
import hashlib
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import outputs
from pipeline.errors import PipelineError, UsageError
from pipeline.lock import LOCK_NAME, LockFileError, OutputLock
from pipeline.outputs import (
    TEMP_SUFFIX,
    AtomicFile,
    FileWriteError,
    UnsafePathError,
    atomic_open_text,
    atomic_write_bytes,
    atomic_write_text,
    check_no_symlink,
    open_result,
    resolve_inside,
    result_relpath,
    sweep_partial_files,
    write_file_nofollow,
    write_result,
)

SECRET = b"outside the output folder: must never change\n"


def snapshot(folder: Path) -> dict[str, tuple[str, bytes | str]]:
    """Every entry under ``folder`` (links not followed): kind and content."""
    seen: dict[str, tuple[str, bytes | str]] = {}
    for dirpath, dirnames, filenames in os.walk(folder):
        for name in dirnames + filenames:
            p = Path(dirpath, name)
            key = str(p.relative_to(folder))
            if p.is_symlink():
                seen[key] = ("link", os.readlink(p))
            elif p.is_dir():
                seen[key] = ("dir", "")
            else:
                seen[key] = ("file", p.read_bytes())
    return seen


@pytest.fixture
def world(tmp_path: Path) -> Iterator[tuple[Path, Path]]:
    """(output folder, a folder outside it holding a file that must not change)."""
    out, outside = tmp_path / "out", tmp_path / "elsewhere"
    out.mkdir()
    outside.mkdir()
    (outside / "victim.txt").write_bytes(SECRET)
    before = snapshot(outside)
    yield out, outside
    assert snapshot(outside) == before, "something outside the output folder changed"


def no_temporaries(folder: Path) -> bool:
    return not [p for p in folder.rglob(f"*{TEMP_SUFFIX}")]


# -- atomic writes and AtomicFile -----------------------------------------------------


def test_atomic_write_replaces_a_planted_symlink_instead_of_following_it(
    world: tuple[Path, Path],
) -> None:
    out, outside = world
    for name in ("report.json", "results.jsonl", "report.html"):
        (out / name).symlink_to(outside / "victim.txt")
        atomic_write_text(out / name, "{}\n")
        assert not (out / name).is_symlink()
        assert (out / name).read_text() == "{}\n"
    (out / "reports").mkdir()
    (out / "reports" / "run-1.json").symlink_to(outside / "victim.txt")
    write_file_nofollow(out / "reports" / "run-1.json", b"{}", root=out)
    assert (out / "reports" / "run-1.json").read_bytes() == b"{}"
    assert no_temporaries(out)


def test_streamed_text_replaces_a_planted_symlink(world: tuple[Path, Path]) -> None:
    out, outside = world
    (out / "results.jsonl").symlink_to(outside / "victim.txt")
    with atomic_open_text(out / "results.jsonl") as handle:
        for n in range(1000):
            handle.write(f'{{"n": {n}}}\n')
    assert not (out / "results.jsonl").is_symlink()
    assert (out / "results.jsonl").read_text().count("\n") == 1000


@pytest.mark.parametrize("depth", [1, 2, 3])
def test_a_symlinked_output_folder_is_refused(world: tuple[Path, Path], depth: int) -> None:
    out, outside = world
    rel = result_relpath("ailab/emotion-editor", "service_choice=big_grin", "studio/a.jpg", "jpg")
    parts = rel.split("/")
    real = out.joinpath(*parts[: depth - 1])
    real.mkdir(parents=True, exist_ok=True)
    (real / parts[depth - 1]).symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError) as caught:
        atomic_write_bytes(out / rel, b"result", root=out)
    assert caught.value.errno == errno.ELOOP
    assert "symbolic link" in str(caught.value) and "\n" not in str(caught.value)
    assert caught.value.strerror == str(caught.value)
    assert str(real / parts[depth - 1]) in str(caught.value)
    # resolve_inside, which the engine calls first, refuses it too.
    with pytest.raises(UnsafePathError) as early:
        resolve_inside(out, rel)
    assert early.value.errno == errno.ELOOP
    assert no_temporaries(out)


def test_a_file_where_a_folder_should_be_is_refused(world: tuple[Path, Path]) -> None:
    out, _ = world
    (out / "ailab-emotion-editor").write_bytes(b"planted")
    target = out / "ailab-emotion-editor" / "default" / "a.jpg"
    with pytest.raises(UnsafePathError) as caught:
        atomic_write_bytes(target, b"result", root=out)
    assert caught.value.errno == errno.ENOTDIR
    assert "a file is in the way" in str(caught.value)
    with pytest.raises(UnsafePathError) as early:
        resolve_inside(out, "ailab-emotion-editor/default/a.jpg")
    assert early.value.errno == errno.ENOTDIR
    assert (out / "ailab-emotion-editor").read_bytes() == b"planted"


def test_a_fifo_where_a_folder_should_be_is_refused_without_opening_it(
    world: tuple[Path, Path],
) -> None:
    out, _ = world
    os.mkfifo(out / "op")
    with pytest.raises(UnsafePathError) as caught:
        atomic_write_bytes(out / "op" / "a.jpg", b"x", root=out)
    assert caught.value.errno == errno.ENOTDIR


def test_a_folder_where_the_file_should_be_is_refused_and_cleaned_up(
    world: tuple[Path, Path],
) -> None:
    out, _ = world
    (out / "a.jpg").mkdir()
    with pytest.raises(UnsafePathError) as caught:
        atomic_write_bytes(out / "a.jpg", b"result", root=out)
    assert caught.value.errno == errno.EISDIR
    assert (out / "a.jpg").is_dir() and no_temporaries(out)
    with pytest.raises(UnsafePathError) as early:
        resolve_inside(out, "a.jpg")
    assert early.value.errno == errno.EISDIR


def test_a_planted_temp_name_is_skipped_not_followed(
    world: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    out, outside = world
    tokens = iter(["aaaaaaaaaaaa", "bbbbbbbbbbbb"])
    monkeypatch.setattr(outputs, "_temp_token", lambda: next(tokens))
    planted = out / f".aaaaaaaaaaaa{TEMP_SUFFIX}"
    planted.symlink_to(outside / "victim.txt")
    atomic_write_bytes(out / "a.jpg", b"result", root=out)
    assert (out / "a.jpg").read_bytes() == b"result"
    assert planted.is_symlink()  # untouched; the sweep unlinks it, never its target
    assert sweep_partial_files(out) == 1
    assert not planted.is_symlink() and (outside / "victim.txt").read_bytes() == SECRET


def test_temp_names_are_short_whatever_the_target_name(world: tuple[Path, Path]) -> None:
    out, _ = world
    name = "y" * 250 + ".jpg"
    with AtomicFile(out / name, root=out) as handle:
        handle.write(b"x")
        assert handle.path.parent == out
        assert len(handle.path.name) <= 20
        assert handle.path.name.startswith(".") and handle.path.name.endswith(TEMP_SUFFIX)
    assert (out / name).read_bytes() == b"x"


def test_a_name_too_long_fails_with_its_errno_before_writing(world: tuple[Path, Path]) -> None:
    out, _ = world
    with pytest.raises(FileWriteError) as caught:
        AtomicFile(out / ("z" * 256 + ".jpg"), root=out)
    assert caught.value.errno == errno.ENAMETOOLONG
    assert "name too long" in str(caught.value)
    with pytest.raises(FileWriteError) as nested:
        atomic_write_bytes(out / ("d" * 300) / "a.jpg", b"x", root=out)
    assert nested.value.errno == errno.ENAMETOOLONG
    assert list(out.iterdir()) == []


@pytest.mark.parametrize("rel", ["../victim.jpg", "a/../../victim.jpg", "/etc/x.jpg"])
def test_paths_leaving_the_output_folder_are_refused(world: tuple[Path, Path], rel: str) -> None:
    out, _outside = world
    with pytest.raises(UnsafePathError) as caught:
        resolve_inside(out, rel)
    assert caught.value.errno == errno.EINVAL
    assert isinstance(caught.value, ValueError)
    with pytest.raises(UnsafePathError) as writing:
        atomic_write_bytes(out / rel, b"x", root=out)
    assert writing.value.errno == errno.EINVAL


def test_resolve_inside_accepts_a_symlinked_root_and_existing_real_folders(
    world: tuple[Path, Path],
) -> None:
    out, _outside = world
    link = out.parent / "out-link"
    link.symlink_to(out, target_is_directory=True)
    (out / "op" / "v").mkdir(parents=True)
    target = resolve_inside(link, "op/v/a.jpg")
    assert target == out.resolve() / "op" / "v" / "a.jpg"
    atomic_write_bytes(target, b"r", root=link)
    assert (out / "op" / "v" / "a.jpg").read_bytes() == b"r"


def test_atomic_file_commits_discards_and_keeps_the_old_file(world: tuple[Path, Path]) -> None:
    out, _ = world
    target = out / "op" / "a.jpg"
    with AtomicFile(target, root=out) as handle:
        for chunk in (b"ab", b"cd", b"ef"):
            handle.write(chunk)
        handle.flush()
        assert handle.path.read_bytes() == b"abcdef"  # readable for validation
        assert not target.exists()
    assert target.read_bytes() == b"abcdef" and handle.bytes_written == 6
    # Discarded explicitly: the old file stays.
    handle = AtomicFile(target, root=out)
    handle.write(b"new")
    handle.discard()
    handle.discard()
    assert target.read_bytes() == b"abcdef" and no_temporaries(out)
    with pytest.raises(ValueError, match="already committed or discarded"):
        handle.commit()
    # An exception inside the block discards.
    with pytest.raises(RuntimeError), AtomicFile(target, root=out) as handle:
        handle.write(b"half")
        raise RuntimeError("validation failed")
    assert target.read_bytes() == b"abcdef" and no_temporaries(out)
    # Explicit commit inside the block is not repeated at exit.
    with AtomicFile(target, root=out) as handle:
        handle.write(b"v2")
        handle.commit()
    assert target.read_bytes() == b"v2"


def test_streamed_text_discards_on_an_exception(world: tuple[Path, Path]) -> None:
    out, _ = world
    (out / "results.jsonl").write_text("old\n")
    with pytest.raises(KeyError), atomic_open_text(out / "results.jsonl") as handle:
        handle.write("partial\n" * 10000)
        raise KeyError("boom")
    assert (out / "results.jsonl").read_text() == "old\n" and no_temporaries(out)


def test_sweep_finds_the_temporaries_a_killed_writer_leaves(tmp_path: Path) -> None:
    code = (
        "import os, sys; from pathlib import Path; from pipeline.outputs import AtomicFile\n"
        "root = Path(sys.argv[1]); h = AtomicFile(root / 'op' / 'v' / 'a.jpg', root=root)\n"
        "h.write(b'half'); h.flush(); print(h.path, flush=True); os._exit(9)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path)], capture_output=True, text=True, check=False
    )
    assert done.returncode == 9, done.stderr
    left = Path(done.stdout.strip())
    assert left.read_bytes() == b"half"
    (tmp_path / "op" / ".old-style.jpg.x1y2.part").write_bytes(b"older naming")
    assert sweep_partial_files(tmp_path) == 2
    assert not left.exists() and no_temporaries(tmp_path)
    assert [p.name for p in (tmp_path / "op" / "v").iterdir()] == []


# -- full and read-only file systems ----------------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    if os.geteuid() != 0:
        pytest.skip("mounting a tiny tmpfs needs root")
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {done.stderr.strip()}")


@pytest.fixture
def tiny_fs(tmp_path: Path) -> Iterator[Path]:
    mnt = tmp_path / "tiny"
    mnt.mkdir()
    _mount_tmpfs(mnt, "size=64k")
    try:
        yield mnt
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


def test_a_full_disk_raises_enospc_and_keeps_the_old_file(tiny_fs: Path) -> None:
    target = tiny_fs / "op" / "a.jpg"
    atomic_write_bytes(target, b"old result", root=tiny_fs)
    with pytest.raises(FileWriteError) as caught:
        atomic_write_bytes(target, os.urandom(256 * 1024), root=tiny_fs)
    assert caught.value.errno == errno.ENOSPC
    assert "no space left" in str(caught.value) and str(target) in str(caught.value)
    assert target.read_bytes() == b"old result"
    assert no_temporaries(tiny_fs)
    # Streaming hits it too, and leaves nothing behind.
    with pytest.raises(FileWriteError) as streamed, AtomicFile(target, root=tiny_fs) as h:
        for _ in range(64):
            h.write(b"\0" * 8192)
    assert streamed.value.errno == errno.ENOSPC
    assert target.read_bytes() == b"old result" and no_temporaries(tiny_fs)
    with pytest.raises(FileWriteError) as text:
        atomic_write_text(tiny_fs / "report.json", "x" * 200_000)
    assert text.value.errno == errno.ENOSPC


def test_a_read_only_file_system_raises_erofs(tmp_path: Path) -> None:
    mnt = tmp_path / "ro"
    mnt.mkdir()
    _mount_tmpfs(mnt, "size=64k,ro")
    try:
        with pytest.raises(FileWriteError) as caught:
            atomic_write_bytes(mnt / "op" / "a.jpg", b"x", root=mnt)
        assert caught.value.errno == errno.EROFS
        assert "read-only" in str(caught.value)
        with pytest.raises(LockFileError) as lock:
            OutputLock(mnt).__enter__()
        assert lock.value.errno == errno.EROFS
    finally:
        subprocess.run(["umount", str(mnt)], check=False)


# -- the lock and the journal -------------------------------------------------------


def test_a_planted_lock_symlink_is_refused_and_its_target_not_truncated(
    world: tuple[Path, Path],
) -> None:
    out, outside = world
    (out / LOCK_NAME).symlink_to(outside / "victim.txt")
    with pytest.raises(LockFileError) as caught, OutputLock(out):
        pass
    err = caught.value
    assert err.errno == errno.ELOOP
    assert isinstance(err, UsageError) and isinstance(err, OSError) and err.exit_code == 2
    assert "symbolic link" in str(err) and str(out / LOCK_NAME) in str(err)
    assert "\n" not in str(err)
    # A dangling link would have been created through: refused the same way.
    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to(outside / "new-file")
    with pytest.raises(LockFileError), OutputLock(out):
        pass
    assert not (outside / "new-file").exists()


def test_a_planted_lock_hard_link_is_refused(world: tuple[Path, Path]) -> None:
    out, outside = world
    os.link(outside / "victim.txt", out / LOCK_NAME)
    with pytest.raises(LockFileError) as caught, OutputLock(out):
        pass
    assert caught.value.errno == errno.EINVAL and "hard links" in str(caught.value)


def test_a_planted_lock_fifo_is_refused_without_hanging(world: tuple[Path, Path]) -> None:
    out, _ = world
    os.mkfifo(out / LOCK_NAME)
    with pytest.raises(LockFileError) as caught, OutputLock(out):
        pass
    assert caught.value.errno == errno.EINVAL and "not a regular file" in str(caught.value)


def test_the_lock_still_works_and_cli_shows_one_line(world: tuple[Path, Path]) -> None:
    out, _ = world
    with OutputLock(out):
        assert (out / LOCK_NAME).read_text().strip() == str(os.getpid())
    assert (out / LOCK_NAME).read_text() == ""
    (out / LOCK_NAME).unlink()
    (out / LOCK_NAME).symlink_to("/nonexistent")
    # What the CLI catches and prints in one line (PipelineError), never a traceback.
    with pytest.raises(PipelineError), OutputLock(out):
        pass


def test_check_no_symlink_guards_the_journal_and_its_sidecars(world: tuple[Path, Path]) -> None:
    out, outside = world
    journal = out / "journal.sqlite"
    check_no_symlink(journal, sqlite=True)  # nothing there yet: fine
    journal.write_bytes(b"")
    check_no_symlink(journal, sqlite=True)
    for sidecar in ("-wal", "-shm", "-journal"):
        link = out / f"journal.sqlite{sidecar}"
        link.symlink_to(outside / "victim.txt")
        check_no_symlink(journal)  # only the main file unless asked
        with pytest.raises(UnsafePathError) as caught:
            check_no_symlink(journal, sqlite=True)
        assert caught.value.errno == errno.ELOOP and str(link) in str(caught.value)
        link.unlink()
    journal.unlink()
    journal.symlink_to(outside / "victim.txt")
    with pytest.raises(UnsafePathError) as main:
        check_no_symlink(journal)
    assert main.value.errno == errno.ELOOP
    journal.unlink()
    os.mkfifo(journal)
    with pytest.raises(UnsafePathError) as fifo:
        check_no_symlink(journal)
    assert fifo.value.errno == errno.EINVAL
    journal.unlink()
    journal.mkdir()
    with pytest.raises(UnsafePathError) as folder:
        check_no_symlink(journal)
    assert folder.value.errno == errno.EISDIR


def test_a_result_write_through_the_engine_path_never_escapes(world: tuple[Path, Path]) -> None:
    """The sequence the engine runs: result_relpath, resolve_inside, atomic write."""
    out, _outside = world
    names = ["../../elsewhere/victim.txt", "a b.jpg", "A B.JPG", "..", "x" * 255]
    for n, name in enumerate(names):
        rel = result_relpath("ailab/emotion-editor", "..", name, "jpg")
        target = resolve_inside(out, rel)
        atomic_write_bytes(target, hashlib.sha256(bytes([n])).digest(), root=out)
    files = [p for p in out.rglob("*") if p.is_file()]
    assert len(files) == len(names)


def test_write_result_and_open_result_refuse_a_planted_folder_link(
    world: tuple[Path, Path],
) -> None:
    out, outside = world
    rel = result_relpath("ailab/face-swap", "default", "shoot/a.jpg", "png")
    assert write_result(out, rel, b"png bytes") == out.resolve() / rel
    assert (out / rel).read_bytes() == b"png bytes"
    with open_result(out, rel) as handle:
        handle.write(b"streamed")
        assert handle.path.parent == (out / rel).parent.resolve()
    assert (out / rel).read_bytes() == b"streamed"
    other = result_relpath("ailab/face-swap", "default", "other/a.jpg", "png")
    (out / other).parent.parent.mkdir(parents=True, exist_ok=True)
    (out / other).parent.symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafePathError) as caught:
        write_result(out, other, b"x")
    assert caught.value.errno == errno.ELOOP
    with pytest.raises(UnsafePathError):
        open_result(out, other)
