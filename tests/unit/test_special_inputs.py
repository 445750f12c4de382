"""Bad files, the way they turn up in photo folders: each gets its exact code.

Three layers are checked: what :func:`iter_input_entries` says of an entry before
anything is read (``INPUT_*`` problems), what happens when an entry changes between
the listing and the read (``prepare_payload``, ``inspect_image``,
``hash_file_checked``), and what preflight says of the content (``PREFLIGHT_*``).
"Never opened" is checked with an audit hook (``tests/unit/_opens.py``), not a timer.
"""

from __future__ import annotations

import errno
import io
import os
import socket
import stat
import struct
import subprocess
import sys
import zlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import yaml
from PIL import Image

from pipeline.cli import main as cli_main
from pipeline.errors import InputProblem, PermanentError
from pipeline.identity import hash_file_checked
from pipeline.images import inspect_image, max_input_bytes, prepare_payload
from pipeline.inputs import display_path, iter_input_entries, iter_inputs
from pipeline.operations import MB, OPERATIONS, ImageLimits
from tests.unit._opens import watch_opens

EMOTION = OPERATIONS["ailab/emotion-editor"].limits
BEAUTY = OPERATIONS["ailab/face-beauty-pro"].limits
SMILE = OPERATIONS["perfectcorp/ai-smile"].limits
HAS_HEIF_PLUGIN = True
try:
    import pillow_heif
except ImportError:  # pragma: no cover - the test extra installs it
    HAS_HEIF_PLUGIN = False
needs_heif = pytest.mark.skipif(
    not HAS_HEIF_PLUGIN, reason="pillow-heif is not installed (pip install -e '.[heif]')"
)

GB = 1024 * MB


# ------------------------------------------------------------------------ makers


def jpeg_bytes(size: tuple[int, int] = (120, 160), mode: str = "RGB", **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.new(mode, size, (90, 140, 200, 0)[: len(mode)] if mode != "L" else 128).save(
        buf, "JPEG", **kw
    )
    return buf.getvalue()


def image_bytes(fmt: str, im: Image.Image | None = None, **kw: object) -> bytes:
    buf = io.BytesIO()
    (im or Image.new("RGB", (120, 160), (200, 80, 40))).save(buf, fmt, **kw)
    return buf.getvalue()


def noisy_png(w: int = 300, h: int = 200) -> bytes:
    noise = Image.merge("RGB", [Image.effect_noise((w, h), 80) for _ in range(3)])
    return image_bytes("PNG", noise)


def png_chunk(kind: bytes, data: bytes) -> bytes:
    crc = zlib.crc32(kind + data) & 0xFFFFFFFF
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)


def png_header_only(width: int, height: int) -> bytes:
    """A PNG whose IHDR claims ``width`` x ``height``, with a token IDAT: a bomb header."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", zlib.compress(b"\0" * 16))
        + png_chunk(b"IEND", b"")
    )


def psd_bytes(w: int = 120, h: int = 96) -> bytes:
    """A minimal Photoshop file (Pillow reads PSD but cannot write it)."""
    header = b"8BPS" + struct.pack(">H", 1) + b"\0" * 6 + struct.pack(">HIIHH", 3, h, w, 8, 3)
    sections = struct.pack(">I", 0) * 3  # colour mode data, image resources, layers
    return header + sections + struct.pack(">H", 0) + bytes(w * h * 3)


def exif_jpeg(orientation: int) -> bytes:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return image_bytes("JPEG", Image.new("RGB", (200, 120), (10, 200, 30)), exif=exif)


def corrupt_exif_jpeg() -> bytes:
    """A JPEG whose APP1 segment says Exif but holds garbage instead of a TIFF header."""
    good = jpeg_bytes()
    garbage = b"Exif\0\0" + b"\xde\xad\xbe\xef" * 8
    app1 = b"\xff\xe1" + struct.pack(">H", len(garbage) + 2) + garbage
    return good[:2] + app1 + good[2:]


def heic_bytes(size: tuple[int, int] = (320, 240)) -> bytes:
    # Written by pillow-heif itself: Pillow knows no HEIF saver until pipeline.images
    # has met a HEIF file (its opener is loaded on first use).
    buf = io.BytesIO()
    pillow_heif.from_pillow(Image.new("RGB", size, (180, 120, 90))).save(buf, quality=80)
    return buf.getvalue()


def truncated(data: bytes) -> bytes:
    return data[: len(data) * 2 // 3]


def bad_png_crc() -> bytes:
    data = bytearray(noisy_png(64, 64))
    idat = data.index(b"IDAT")
    data[idat + 10] ^= 0xFF  # inside the compressed pixels: the chunk CRC no longer holds
    return bytes(data)


def animated_gif() -> bytes:
    frames = [Image.new("RGB", (80, 80), (i * 80, 0, 0)) for i in range(3)]
    buf = io.BytesIO()
    frames[0].save(buf, "GIF", save_all=True, append_images=frames[1:])
    return buf.getvalue()


def palette_png_with_transparency() -> bytes:
    im = Image.new("P", (100, 100), 0)
    im.putpalette([0, 0, 0, 255, 0, 0] + [0] * 762)
    im.paste(1, (20, 20, 80, 80))
    return image_bytes("PNG", im, transparency=0)


def write(path: Path, data: bytes) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return path


def problems(base: Path, patterns: list[str] | None = None) -> dict[str, str | None]:
    """``{name: code or None}`` of every entry matched (``*`` by default)."""
    return {
        os.path.relpath(e.path, base): (e.problem.code if e.problem else None)
        for e in iter_input_entries(base, patterns or ["*"])
    }


def test_the_open_watch_sees_every_kind_of_open(tmp_path: Path) -> None:
    path = write(tmp_path / "a.png", noisy_png(8, 8))
    with watch_opens(path) as opened:
        path.read_bytes()
        os.close(os.open(path, os.O_RDONLY))
        with Image.open(path):
            pass
        inspect_image(path)
    assert opened[:3] == [str(path)] * 3 and len(opened) > 3


# ----------------------------------------------------- entries: not regular files


def test_fifo_is_an_entry_with_a_problem_and_is_never_opened(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    write(tmp_path / "ok.jpg", jpeg_bytes())
    with watch_opens(fifo) as opened:
        entries = list(iter_input_entries(tmp_path, ["*.jpg"]))
        assert [e.path.name for e in entries] == ["ok.jpg", "pipe.jpg"]
        bad = entries[1]
        for call in (
            lambda: prepare_payload(fifo, EMOTION, auto_fix=True),
            lambda: inspect_image(fifo),
            lambda: hash_file_checked(fifo),
        ):
            with pytest.raises(InputProblem) as err:
                call()
            assert err.value.code == "INPUT_NOT_A_FILE"
    assert opened == []
    assert bad.stat is None and bad.rel == "pipe.jpg"
    assert bad.problem is not None and bad.problem.code == "INPUT_NOT_A_FILE"
    assert bad.problem.kind == "permanent"
    assert bad.problem.message == (
        f"{fifo}: is a FIFO (named pipe), not a regular file, so it was not read; remove it "
        f"from the input folder or narrow the input patterns"
    )
    assert entries[0].ok and entries[0].stat is not None
    assert [p.name for p in iter_inputs(tmp_path, ["*.jpg"])] == ["ok.jpg"]


def test_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # AF_UNIX paths are limited to ~108 bytes: bind relatively
    with socket.socket(socket.AF_UNIX) as sock:
        sock.bind("sock.jpg")
        (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.problem is not None and entry.problem.code == "INPUT_NOT_A_FILE"
    assert "is a socket, not a regular file" in entry.problem.message


def test_symlink_to_dev_null(tmp_path: Path) -> None:
    os.symlink("/dev/null", tmp_path / "null.jpg")
    with watch_opens(tmp_path / "null.jpg", Path("/dev/null")) as opened:
        assert problems(tmp_path) == {"null.jpg": "INPUT_NOT_A_FILE"}
        with pytest.raises(InputProblem, match="is a character device") as err:
            prepare_payload(tmp_path / "null.jpg", SMILE, auto_fix=False)
    assert err.value.code == "INPUT_NOT_A_FILE"
    assert opened == []


@pytest.mark.parametrize(
    ("kind", "words"),
    [(stat.S_IFCHR, "a character device"), (stat.S_IFBLK, "a block device")],
    ids=["char", "block"],
)
def test_device_nodes(tmp_path: Path, kind: int, words: str) -> None:
    node = tmp_path / "dev.jpg"
    try:
        os.mknod(node, kind | 0o600, os.makedev(1, 3) if kind == stat.S_IFCHR else os.makedev(7, 0))
    except (PermissionError, OSError) as exc:  # no CAP_MKNOD here
        pytest.skip(f"cannot create a device node: {exc}")
    with watch_opens(node) as opened:
        (entry,) = iter_input_entries(tmp_path, ["*"])
        with pytest.raises(InputProblem):
            prepare_payload(node, EMOTION, auto_fix=True)
    assert opened == []
    assert entry.problem is not None and entry.problem.code == "INPUT_NOT_A_FILE"
    assert f"is {words}, not a regular file" in entry.problem.message


# ---------------------------------------------------------- entries: symlinks


def test_broken_symlink_names_its_target(tmp_path: Path) -> None:
    os.symlink("../elsewhere/IMG_1.jpg", tmp_path / "a.jpg")
    (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.problem is not None and entry.problem.code == "INPUT_BROKEN_SYMLINK"
    assert entry.problem.message == (
        f"{tmp_path / 'a.jpg'}: broken symlink (its target ../elsewhere/IMG_1.jpg does not "
        f"exist); fix the link or remove it"
    )


def test_symlink_chain_broken_at_the_end(tmp_path: Path) -> None:
    os.symlink(tmp_path / "missing.jpg", tmp_path / "b.jpg")
    os.symlink(tmp_path / "b.jpg", tmp_path / "a.jpg")
    assert problems(tmp_path) == {"a.jpg": "INPUT_BROKEN_SYMLINK", "b.jpg": "INPUT_BROKEN_SYMLINK"}


def test_symlink_self_loop(tmp_path: Path) -> None:
    os.symlink("self.jpg", tmp_path / "self.jpg")
    assert problems(tmp_path) == {"self.jpg": "INPUT_SYMLINK_LOOP"}
    with pytest.raises(InputProblem) as err:
        prepare_payload(tmp_path / "self.jpg", EMOTION, auto_fix=False)
    assert err.value.code == "INPUT_SYMLINK_LOOP"
    assert "symlink loop" in err.value.message


def test_symlink_loop_of_two(tmp_path: Path) -> None:
    os.symlink("b.jpg", tmp_path / "a.jpg")
    os.symlink("a.jpg", tmp_path / "b.jpg")
    assert problems(tmp_path) == {"a.jpg": "INPUT_SYMLINK_LOOP", "b.jpg": "INPUT_SYMLINK_LOOP"}


def test_symlink_loop_given_literally(tmp_path: Path) -> None:
    os.symlink("loop.jpg", tmp_path / "loop.jpg")
    assert problems(tmp_path, ["loop.jpg"]) == {"loop.jpg": "INPUT_SYMLINK_LOOP"}


def test_symlink_to_a_good_file_is_a_good_entry_with_the_targets_stat(tmp_path: Path) -> None:
    target = write(tmp_path / "real" / "1.jpg", jpeg_bytes())
    os.symlink(target, tmp_path / "link.jpg")
    (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.ok and entry.path == tmp_path / "link.jpg"  # the link's path is kept
    assert entry.stat is not None and entry.stat.st_ino == target.stat().st_ino


def test_hard_links_are_two_entries(tmp_path: Path) -> None:
    write(tmp_path / "a.jpg", jpeg_bytes())
    os.link(tmp_path / "a.jpg", tmp_path / "b.jpg")
    entries = list(iter_input_entries(tmp_path, ["*.jpg"]))
    assert [e.path.name for e in entries] == ["a.jpg", "b.jpg"]
    assert entries[0].stat is not None and entries[1].stat is not None
    assert entries[0].stat.st_ino == entries[1].stat.st_ino


# ---------------------------------------------------------- entries: folders


def test_folder_named_like_a_photo_is_not_an_input(tmp_path: Path) -> None:
    (tmp_path / "x.jpg").mkdir()
    write(tmp_path / "y.jpg", jpeg_bytes())
    os.symlink(tmp_path / "x.jpg", tmp_path / "z.jpg")  # a symlink to a folder
    assert problems(tmp_path) == {"y.jpg": None}
    with pytest.raises(InputProblem) as err:
        prepare_payload(tmp_path / "x.jpg", EMOTION, auto_fix=False)
    assert err.value.code == "INPUT_NOT_A_FILE"
    assert "is a folder, not a regular file" in err.value.message


def test_folder_symlink_cycle_is_walked_once(tmp_path: Path) -> None:
    write(tmp_path / "a" / "1.jpg", jpeg_bytes())
    os.symlink(tmp_path / "a", tmp_path / "a" / "again")
    os.symlink(tmp_path, tmp_path / "a" / "up")
    assert problems(tmp_path, ["**/*.jpg"]) == {"a/1.jpg": None}


def test_a_folder_that_cannot_be_listed_is_reported(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # As root, chmod 000 does not stop a listing: fail the one scandir instead.
    write(tmp_path / "a" / "1.jpg", jpeg_bytes())
    write(tmp_path / "locked" / "2.jpg", jpeg_bytes())
    write(tmp_path / "z" / "3.jpg", jpeg_bytes())
    real = os.scandir
    locked = str(tmp_path / "locked")

    def scandir(path: str) -> object:
        if path == locked:
            raise PermissionError(errno.EACCES, "Permission denied", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    entries = list(iter_input_entries(tmp_path, ["**/*.jpg", "*/*.jpg"]))
    assert [(os.path.relpath(e.path, tmp_path), e.problem and e.problem.code) for e in entries] == [
        ("a/1.jpg", None),
        ("locked", "INPUT_UNREADABLE"),  # once, though both patterns tried it
        ("z/3.jpg", None),
    ]
    assert entries[1].problem is not None and entries[1].problem.message == (
        f"{tmp_path / 'locked'}: cannot list this folder (Permission denied), so the inputs in "
        f"it were not seen; check its permissions (or the share it is on)"
    )


def test_an_unreadable_root_is_reported_not_a_silent_empty_run(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "share").mkdir()
    real = os.scandir

    def scandir(path: str) -> object:
        if path == str(tmp_path / "share"):
            raise OSError(errno.EIO, "Input/output error", path)
        return real(path)

    monkeypatch.setattr(os, "scandir", scandir)
    assert problems(tmp_path, ["share/**/*.jpg"]) == {"share": "INPUT_UNREADABLE"}


def test_a_file_that_cannot_be_stat_ed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes())
    real = os.stat

    def fake_stat(p: object, *args: object, **kw: object) -> os.stat_result:
        if os.fspath(p) == str(path):  # type: ignore[call-overload]
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real(p, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "stat", fake_stat)
    (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.problem is not None and entry.problem.code == "INPUT_UNREADABLE"
    assert entry.problem.message == (
        f"{path}: cannot read it (Permission denied); check that it is readable (permissions, "
        f"a disconnected share)"
    )


def test_a_file_that_cannot_be_opened(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes())
    real = os.open

    def fake_open(p: object, *args: object, **kw: object) -> int:
        if os.fspath(p) == str(path):  # type: ignore[call-overload]
            raise PermissionError(errno.EACCES, "Permission denied", str(p))
        return real(p, *args, **kw)  # type: ignore[arg-type]

    monkeypatch.setattr(os, "open", fake_open)
    for call in (
        lambda: prepare_payload(path, EMOTION, auto_fix=False),
        lambda: inspect_image(path),
        lambda: hash_file_checked(path),
    ):
        with pytest.raises(InputProblem) as err:
            call()
        assert err.value.code == "INPUT_UNREADABLE"


# ------------------------------------------------------ entries: names and case


def test_names_people_and_cameras_write(tmp_path: Path) -> None:
    for name in ("a.JPG", "b.Jpg", "c.jpeg", "d.JPEG", "e.png", "f.PNG", "g.heic", "h.gif"):
        write(tmp_path / name, b"x")
    got = problems(tmp_path, ["*.{jpg,jpeg,png,heic}"])
    assert got == dict.fromkeys(["a.JPG", "b.Jpg", "c.jpeg", "d.JPEG", "e.png", "f.PNG", "g.heic"])


def test_hidden_and_apple_double_files_are_not_inputs(tmp_path: Path) -> None:
    for name in (".hidden.jpg", "._IMG_0001.JPG", ".DS_Store", "IMG_0001.JPG"):
        write(tmp_path / name, jpeg_bytes())
    write(tmp_path / ".thumbs" / "t.jpg", jpeg_bytes())
    assert problems(tmp_path, ["**/*.jpg"]) == {"IMG_0001.JPG": None}


def test_name_with_a_newline(tmp_path: Path) -> None:
    write(tmp_path / "two\nlines.jpg", jpeg_bytes())
    os.mkfifo(tmp_path / "pipe\n.jpg")
    got = {e.path.name: e for e in iter_input_entries(tmp_path, ["*.jpg"])}
    assert got["two\nlines.jpg"].ok
    prepared = prepare_payload(got["two\nlines.jpg"].path, EMOTION, auto_fix=False)
    assert prepared.payload.filename == "two_lines.jpg"
    bad = got["pipe\n.jpg"].problem
    assert bad is not None and bad.code == "INPUT_NOT_A_FILE"
    assert "\n" not in bad.message and f"{tmp_path}/pipe\\n.jpg: is a FIFO" in bad.message


def test_name_with_invalid_utf8(tmp_path: Path) -> None:
    raw = os.fsencode(tmp_path) + b"/caf\xe9.jpg"  # Latin-1 from an old camera or share
    with open(raw, "wb") as fp:
        fp.write(jpeg_bytes())
    os.mkfifo(os.fsencode(tmp_path) + b"/pipe\xff.jpg")
    entries = list(iter_input_entries(tmp_path, ["*.jpg"]))
    assert [os.fsencode(e.path) for e in entries] == [raw, os.fsencode(tmp_path) + b"/pipe\xff.jpg"]
    assert entries[0].ok
    prepared = prepare_payload(entries[0].path, EMOTION, auto_fix=False)
    assert prepared.payload.filename == "caf_.jpg"
    bad = entries[1].problem
    assert bad is not None and bad.code == "INPUT_NOT_A_FILE"
    bad.message.encode("utf-8")  # printable on any terminal: no lone surrogates
    assert f"{tmp_path}/pipe\\xff.jpg: is a FIFO" in bad.message
    assert display_path(entries[0].path) == f"{tmp_path}/caf\\xe9.jpg"


def test_very_long_name(tmp_path: Path) -> None:
    name = "x" * 251 + ".JPG"  # 255 bytes: the longest a name can be
    write(tmp_path / name, jpeg_bytes())
    (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.ok and entry.path.name == name
    prepared = prepare_payload(entry.path, EMOTION, auto_fix=False)
    assert prepared.payload.filename == "x" * 100 + ".jpg"


def test_files_in_the_output_folder_are_not_inputs(tmp_path: Path) -> None:
    write(tmp_path / "in.jpg", jpeg_bytes())
    write(tmp_path / "out" / "in.jpg", jpeg_bytes())
    os.mkfifo(tmp_path / "out" / "pipe.jpg")
    got = {
        os.path.relpath(e.path, tmp_path)
        for e in iter_input_entries(tmp_path, ["**/*.jpg"], tmp_path / "out")
    }
    assert got == {"in.jpg"}


# ------------------------------------------------ changed between listing and read


def test_file_removed_between_listing_and_reading(tmp_path: Path) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes())
    (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.ok
    path.unlink()
    for call in (
        lambda: prepare_payload(path, EMOTION, auto_fix=True),
        lambda: inspect_image(path),
        lambda: hash_file_checked(path),
    ):
        with pytest.raises(InputProblem) as err:
            call()
        assert err.value.code == "INPUT_MISSING"
        assert err.value.message == (
            f"{path}: no longer exists (moved or deleted after the inputs were listed); rerun "
            f"to pick it up where it is now"
        )


@pytest.mark.parametrize(
    ("swap", "code"),
    [
        (lambda p: os.mkfifo(p), "INPUT_NOT_A_FILE"),
        (lambda p: p.mkdir(), "INPUT_NOT_A_FILE"),
        (lambda p: os.symlink(p.parent / "gone.jpg", p), "INPUT_BROKEN_SYMLINK"),
        (lambda p: os.symlink(p.name, p), "INPUT_SYMLINK_LOOP"),
    ],
    ids=["fifo", "folder", "broken-link", "loop"],
)
def test_file_replaced_between_listing_and_reading(
    tmp_path: Path, swap: Callable[[Path], None], code: str
) -> None:
    path = write(tmp_path / "a.jpg", jpeg_bytes())
    (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
    assert entry.ok
    path.unlink()
    swap(path)
    with watch_opens(path) as opened:
        for auto_fix in (False, True):
            with pytest.raises(InputProblem) as err:
                prepare_payload(path, SMILE, auto_fix=auto_fix)
            assert err.value.code == code
    assert opened == []


# ------------------------------------------------------------------- sizes


def sparse(path: Path, size: int, head: bytes = b"") -> Path:
    with path.open("wb") as fp:
        fp.write(head)
        fp.truncate(size)  # the rest is a hole: no disk used, no time spent
    return path


@pytest.mark.parametrize("auto_fix", [False, True])
@pytest.mark.parametrize("limits", [EMOTION, BEAUTY, SMILE], ids=lambda x: x.label)
def test_sparse_1_5_gb_file_is_refused_unopened(
    tmp_path: Path, auto_fix: bool, limits: ImageLimits
) -> None:
    big = sparse(tmp_path / "huge.jpg", 1536 * MB, jpeg_bytes())
    with watch_opens(big) as opened:
        (entry,) = iter_input_entries(tmp_path, ["*.jpg"])
        with pytest.raises(InputProblem) as err:
            prepare_payload(big, limits, auto_fix=auto_fix)
        with pytest.raises(InputProblem):
            inspect_image(big, max_bytes=max_input_bytes(limits))
    assert opened == []
    assert entry.ok and entry.stat is not None and entry.stat.st_size == 1536 * MB
    assert err.value.code == "INPUT_TOO_LARGE"
    assert err.value.message == (
        f"{big}: 1.5 GB is more than the 100.0 MB the pipeline reads for one input (10 x the "
        f"{limits.max_bytes // MB} MB limit of {limits.label}, at least 100 MB); shrink or "
        f"re-export it, or remove it from the inputs"
    )


def test_over_the_limit_without_auto_fix_is_refused_from_its_header(tmp_path: Path) -> None:
    """30 MB (a JPEG padded with a hole): only the header is read, all problems named."""
    padded = sparse(tmp_path / "padded.jpg", 30 * MB, jpeg_bytes((5000, 400)))
    with pytest.raises(PermanentError) as err:
        prepare_payload(padded, BEAUTY, auto_fix=False)
    assert err.value.code == "PREFLIGHT_FILE_SIZE"
    assert err.value.message == (
        f"{padded}: 30.0 MB is over the 2 MB limit of ailab/face-beauty-pro; 5000x400 px: each "
        f"side must be under 4096 px for ailab/face-beauty-pro; set auto_fix: true in the "
        f"manifest to convert/shrink it automatically, or fix the file yourself"
    )


def test_over_the_limit_with_auto_fix_is_read_and_shrunk(tmp_path: Path) -> None:
    padded = sparse(tmp_path / "padded.jpg", 30 * MB, jpeg_bytes((400, 300)))
    prepared = prepare_payload(padded, BEAUTY, auto_fix=True)
    assert len(prepared.payload.data) <= BEAUTY.max_bytes
    (change,) = prepared.changes
    assert change.startswith(
        "re-compressed as JPEG at quality 95 to fit the 2 MB limit (30.0 MB -> "
    )


def test_a_file_just_over_the_read_cap(tmp_path: Path) -> None:
    cap = max_input_bytes(EMOTION)
    assert cap == 100 * MB
    path = sparse(tmp_path / "a.png", cap + 1, noisy_png(32, 32))
    with watch_opens(path) as opened, pytest.raises(InputProblem) as err:
        prepare_payload(path, EMOTION, auto_fix=True)
    assert opened == [] and err.value.code == "INPUT_TOO_LARGE"
    exact = sparse(tmp_path / "b.png", cap, noisy_png(32, 32))
    # At the cap it is read (and then refused for its content, not its size).
    with pytest.raises(PermanentError) as err2:
        prepare_payload(exact, EMOTION, auto_fix=False)
    assert err2.value.code == "PREFLIGHT_FILE_SIZE"


# ------------------------------------------------------------------- content


@dataclass(frozen=True)
class Case:
    """One bad (or odd) file and what preflight must say per operation.

    ``expect``: operation label -> code, or ``None`` for "sent"; ``same`` for a file
    that must be sent byte for byte as it is.
    """

    name: str
    data: Callable[[], bytes]
    expect: dict[str, str | None]
    auto_fix: bool = False
    same: bool = False
    changes: dict[str, list[str]] = field(default_factory=dict)


E, B, S = EMOTION.label, BEAUTY.label, SMILE.label
LIMITS = {E: EMOTION, B: BEAUTY, S: SMILE}
U, F, D, T = (
    "PREFLIGHT_UNREADABLE",
    "PREFLIGHT_FORMAT",
    "PREFLIGHT_DIMENSIONS",
    "PREFLIGHT_TOO_SMALL",
)


def every(code: str | None) -> dict[str, str | None]:
    return {E: code, B: code, S: code}


def each(changes: list[str]) -> dict[str, list[str]]:
    return {label: list(changes) for label in (E, B, S)}


CASES = [
    Case("empty.jpg", lambda: b"", every(U)),
    Case("one-byte.jpg", lambda: b"\xff", every(U)),
    Case("soi-only.jpg", lambda: b"\xff\xd8\xff", every(U)),
    Case(
        "truncated.jpg",
        lambda: truncated(image_bytes("JPEG", Image.effect_noise((300, 300), 60).convert("RGB"))),
        every(U),
    ),
    Case("truncated.png", lambda: truncated(noisy_png()), every(U)),
    Case("truncated-fix.png", lambda: truncated(noisy_png()), every(U), auto_fix=True),
    Case("bad-crc.png", bad_png_crc, every(U)),
    Case("notes.jpg", lambda: b"shopping list: eggs, milk\n", every(U)),
    Case("page.png", lambda: b"<!DOCTYPE html><html><body>404 Not Found</body></html>", every(U)),
    Case(
        "drawing.png",
        lambda: b'<svg xmlns="http://www.w3.org/2000/svg" width="10" height="10"/>',
        every(U),
    ),
    Case("doc.jpg", lambda: b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n1 0 obj<<>>endobj\n", every(U)),
    Case("gzipped.jpg", lambda: zlib.compress(jpeg_bytes()), every(U)),
    Case("bomb.png", lambda: png_header_only(100_000, 100_000), every(U)),
    Case("bomb-fix.png", lambda: png_header_only(100_000, 100_000), every(U), auto_fix=True),
    Case("gif.jpg", lambda: image_bytes("GIF"), every(F)),
    Case(
        "animated.gif",
        animated_gif,
        every(None),
        auto_fix=True,
        changes=each(["used the first of 3 frames", "re-encoded GIF as JPEG"]),
    ),
    Case("bmp.jpg", lambda: image_bytes("BMP"), every(F)),
    Case("scan.tiff", lambda: image_bytes("TIFF"), every(F)),
    Case("layers.jpg", psd_bytes, every(F)),
    Case(
        "layers-fix.jpg",
        psd_bytes,
        every(None),
        auto_fix=True,
        changes=each(["re-encoded PSD as JPEG"]),
    ),
    Case("webp.jpg", lambda: image_bytes("WEBP"), every(F)),
    Case("icon.jpg", lambda: image_bytes("ICO", Image.new("RGB", (64, 64))), every(F)),
    Case("avif.jpg", lambda: image_bytes("AVIF"), every(F)),
    Case("strip.png", lambda: image_bytes("PNG", Image.new("L", (50_000, 1))), {E: D, B: T, S: D}),
    Case(
        "strip-fix.png",
        lambda: image_bytes("PNG", Image.new("L", (50_000, 1))),
        {E: None, B: T, S: None},
        auto_fix=True,
        changes={E: ["resized 50000x1 -> 4095x1"], S: ["resized 50000x1 -> 4096x1"]},
    ),
    Case(
        "dot.png",
        lambda: image_bytes("PNG", Image.new("RGB", (1, 1))),
        {E: None, B: T, S: None},
        same=True,
    ),
    Case("cmyk.jpg", lambda: jpeg_bytes(mode="CMYK"), every(None), same=True),
    Case("gray.jpg", lambda: jpeg_bytes(mode="L"), every(None), same=True),
    Case(
        "deep.png",
        lambda: image_bytes("PNG", Image.new("I;16", (100, 80), 40000)),
        every(None),
        same=True,
    ),
    Case(
        "gray-alpha.png",
        lambda: image_bytes("PNG", Image.new("LA", (100, 80), (100, 50))),
        every(None),
        same=True,
    ),
    Case("palette.png", palette_png_with_transparency, every(None), same=True),
    Case("rotated.jpg", lambda: exif_jpeg(6), every(None), same=True),
    Case(
        "rotated-fix.jpg",
        lambda: exif_jpeg(6),
        every(None),
        auto_fix=True,
        changes=each(["applied EXIF orientation 6"]),
    ),
    Case("bad-exif.jpg", corrupt_exif_jpeg, every(None), same=True),
    Case(
        "trailing.jpg", lambda: jpeg_bytes() + b"\0garbage after EOI" * 10, every(None), same=True
    ),
    Case("jpeg.png", jpeg_bytes, every(None), same=True),
    Case("no-extension", jpeg_bytes, every(None), same=True),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.name)
def test_content(tmp_path: Path, case: Case) -> None:
    path = write(tmp_path / case.name, case.data())
    data = path.read_bytes()
    (entry,) = iter_input_entries(tmp_path, ["*"])
    assert entry.ok  # content is preflight's business, not the listing's
    for label, code in case.expect.items():
        limits = LIMITS[label]
        if code is None:
            prepared = prepare_payload(path, limits, auto_fix=case.auto_fix)
            assert prepared.changes == case.changes.get(label, []), label
            if case.same:
                assert prepared.payload.data == data, label
            continue
        with pytest.raises(PermanentError) as err:
            prepare_payload(path, limits, auto_fix=case.auto_fix)
        assert err.value.code == code, (label, err.value.message)
        assert err.value.message.startswith(f"{path}: ") and "\n" not in err.value.message


def test_a_bomb_header_says_why(tmp_path: Path) -> None:
    path = write(tmp_path / "bomb.png", png_header_only(100_000, 100_000))
    with pytest.raises(PermanentError, match="too many pixels to process safely"):
        prepare_payload(path, EMOTION, auto_fix=True)
    info = inspect_image(path)
    assert info.format is None and info.error is not None and "too many pixels" in info.error


def test_a_jpeg_named_png_is_sent_as_jpg(tmp_path: Path) -> None:
    path = write(tmp_path / "photo.png", jpeg_bytes())
    prepared = prepare_payload(path, EMOTION, auto_fix=False)
    assert (prepared.payload.filename, prepared.payload.content_type) == ("photo.jpg", "image/jpeg")
    assert prepared.notes == ["the file is JPEG although its name ends in .png: sent as .jpg"]


# ----------------------------------------------------------------------- HEIC


@needs_heif
def test_real_heic_for_ai_smile(tmp_path: Path) -> None:
    path = write(tmp_path / "IMG_0001.HEIC", heic_bytes((320, 240)))
    info = inspect_image(path)
    assert (info.format, info.width, info.height, info.decodable, info.damaged) == (
        "HEIF",
        320,
        240,
        True,
        None,
    )
    prepared = prepare_payload(path, SMILE, auto_fix=False)
    assert prepared.payload.filename == "IMG_0001.heic"
    assert prepared.payload.content_type == "image/heic"
    assert prepared.payload.data == path.read_bytes()  # accepted: sent untouched
    assert prepared.changes == [] and prepared.notes == []


def _fresh_python(script: str, *, path: Path | None = None) -> str:
    """What ``script`` prints in a new interpreter (``path`` first on its import path)."""
    env = dict(os.environ)
    if path is not None:
        env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60,
        check=True, env=env,
    )  # fmt: skip
    return out.stdout


@needs_heif
def test_pillow_heif_is_loaded_only_when_a_heic_file_is_opened(tmp_path: Path) -> None:
    """Start-up does not pay for pillow-heif's import; the first HEIC met loads it and
    decodes (a fresh interpreter, so nothing imported it before)."""
    heic = write(tmp_path / "IMG_0002.HEIC", heic_bytes((64, 48)))
    jpeg = write(tmp_path / "a.jpg", image_bytes("JPEG"))
    script = (
        "import sys\n"
        "import pipeline.cli, pipeline.engine\n"
        "from pathlib import Path\n"
        "from pipeline.images import inspect_image\n"
        "seen = ['pillow_heif' in sys.modules]\n"
        f"inspect_image(Path({str(jpeg)!r}))\n"
        "seen.append('pillow_heif' in sys.modules)\n"
        f"info = inspect_image(Path({str(heic)!r}))\n"
        "seen.append('pillow_heif' in sys.modules)\n"
        "print(seen, info.format, info.width, info.height, info.decodable, info.damaged)\n"
    )
    got = _fresh_python(script).split()
    assert got == ["[False,", "False,", "True]", "HEIF", "64", "48", "True", "None"]


@needs_heif
def test_a_broken_pillow_heif_counts_as_not_installed(tmp_path: Path) -> None:
    """pillow-heif found but failing to import (libheif missing): a HEIC is known by
    its brand and sent untouched to ai-smile, as with no plugin, not refused as
    damaged; the log says so once."""
    heic = write(tmp_path / "IMG_0003.HEIC", heic_bytes((64, 48)))
    fake = tmp_path / "fake" / "pillow_heif"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text("raise ImportError('libheif.so.1: cannot open')\n")
    script = (
        "import io, logging\n"
        "from pathlib import Path\n"
        "log = io.StringIO()\n"
        "logging.getLogger('pipeline').addHandler(logging.StreamHandler(log))\n"
        "from pipeline import images\n"
        "from pipeline.operations import OPERATIONS\n"
        f"path = Path({str(heic)!r})\n"
        "a, b = images.inspect_image(path), images.inspect_image(path)\n"
        "sent = images.prepare_payload(path, OPERATIONS['perfectcorp/ai-smile'].limits, False)\n"
        "print(a.format, a.decodable, a.error, '|', b == a, '|', sent.payload.content_type,"
        " sent.payload.data == path.read_bytes(), '|', images.HEIF_DECODER, '|',"
        " log.getvalue().count('could not be loaded'), sep='', end='')\n"
    )
    got = _fresh_python(script, path=tmp_path / "fake").split("|")
    assert got == [
        "HEIFFalseno HEIF decoder installed (pip install pillow-heif)", "True",
        "image/heicTrue", "False", "1",
    ]  # fmt: skip


@needs_heif
def test_every_brand_the_real_opener_takes_opens_first_time(tmp_path: Path) -> None:
    """The stand-in takes what pillow-heif takes, so a HEIC whose major brand is
    hevm or hevs decodes even when it is the first HEIF file the process meets."""
    data = bytearray(heic_bytes((64, 48)))
    assert data[4:8] == b"ftyp"
    for brand in (b"hevm", b"hevs", b"heix"):
        data[8:12] = brand
        path = write(tmp_path / f"IMG_{brand.decode()}.HEIC", bytes(data))
        script = (
            "from pathlib import Path\n"
            "from pipeline.images import inspect_image\n"
            f"info = inspect_image(Path({str(path)!r}))\n"
            "print(info.format, info.width, info.height, info.decodable, sep='|', end='')\n"
        )
        assert _fresh_python(script).split("|") == ["HEIF", "64", "48", "True"], brand


@needs_heif
def test_real_heic_for_ailab_is_refused_or_converted(tmp_path: Path) -> None:
    path = write(tmp_path / "IMG_0002.heic", heic_bytes((400, 300)))
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, EMOTION, auto_fix=False)
    assert err.value.code == "PREFLIGHT_FORMAT"
    assert "HEIF is not accepted by ailab/emotion-editor (it takes JPEG/PNG)" in err.value.message
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == ["re-encoded HEIF as JPEG"]
    assert prepared.payload.filename == "IMG_0002.jpg"
    with Image.open(io.BytesIO(prepared.payload.data)) as im:
        assert (im.format, im.size) == ("JPEG", (400, 300))


@needs_heif
def test_heic_too_large_for_ai_smile_is_shrunk(tmp_path: Path) -> None:
    path = write(tmp_path / "big.heic", heic_bytes((4200, 600)))
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, SMILE, auto_fix=False)
    assert err.value.code == "PREFLIGHT_DIMENSIONS"
    prepared = prepare_payload(path, SMILE, auto_fix=True)
    assert prepared.changes == ["re-encoded HEIF as JPEG", "resized 4200x600 -> 4096x585"]


@needs_heif
def test_heic_named_jpg_is_sent_as_heic(tmp_path: Path) -> None:
    path = write(tmp_path / "IMG_0003.jpg", heic_bytes())
    prepared = prepare_payload(path, SMILE, auto_fix=False)
    assert prepared.payload.filename == "IMG_0003.heic"
    assert prepared.notes == ["the file is HEIF although its name ends in .jpg: sent as .heic"]


@needs_heif
@pytest.mark.parametrize(
    "data",
    [
        lambda: truncated(heic_bytes((640, 480))),
        lambda: b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + b"\x00" * 64,
    ],
    ids=["truncated", "brand-only"],
)
def test_damaged_heic_is_unreadable(tmp_path: Path, data: Callable[[], bytes]) -> None:
    path = write(tmp_path / "IMG_0004.heic", data())
    for auto_fix in (False, True):
        with pytest.raises(PermanentError) as err:
            prepare_payload(path, SMILE, auto_fix=auto_fix)
        assert err.value.code == "PREFLIGHT_UNREADABLE", err.value.message


# ------------------------------------------------------------------- validate


def _manifest(tmp_path: Path, inputs: list[str]) -> Path:
    doc = {
        "name": "t",
        "inputs": inputs,
        "operations": [{"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}}],
        "output": "out",
        "emulator": True,
    }
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


@pytest.fixture
def in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)  # no ./config.yaml: defaults
    yield tmp_path


def test_validate_lists_problem_entries(in_tmp: Path, capsys: pytest.CaptureFixture[str]) -> None:
    write(in_tmp / "in" / "a.jpg", jpeg_bytes())
    os.mkfifo(in_tmp / "in" / "b.jpg")
    os.symlink("nowhere.jpg", in_tmp / "in" / "c.jpg")
    os.symlink("d.jpg", in_tmp / "in" / "d.jpg")
    sparse(in_tmp / "in" / "e.jpg", 1536 * MB)
    manifest = _manifest(in_tmp, ["in/*.jpg"])
    with watch_opens(in_tmp / "in" / "b.jpg", in_tmp / "in" / "e.jpg") as opened:
        code = cli_main(["validate", str(manifest)])
    assert opened == []
    out = capsys.readouterr().out.splitlines()
    d = in_tmp / "in"
    assert out == [
        f"{d}/b.jpg: is a FIFO (named pipe), not a regular file, so it was not read; remove it "
        f"from the input folder or narrow the input patterns",
        f"{d}/c.jpg: broken symlink (its target nowhere.jpg does not exist); fix the link or "
        f"remove it",
        f"{d}/d.jpg: symlink loop (the link leads back to itself); fix the link or remove it",
        f"{d}/e.jpg: 1.5 GB is more than the 100.0 MB the pipeline reads for one input (the "
        f"most any of its operations reads); shrink or re-export it, or remove it from the "
        f"inputs",
        f"{manifest}: 5 input(s), 1 variant(s), 5 work item(s); 4 input(s) with problems",
    ]
    assert code == 1


def test_validate_exits_2_when_nothing_matches(
    in_tmp: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (in_tmp / "share").mkdir()
    manifest = _manifest(in_tmp, ["share/**/*.jpg"])
    assert cli_main(["validate", str(manifest)]) == 2
    err = capsys.readouterr().err.strip()
    assert err == (
        f"pipeline: error: no file matches the input patterns 'share/**/*.jpg' under {in_tmp}; "
        f"check the patterns, and that the folder (or network share) is there and mounted"
    )
