"""Local preflight of input images against an operation's documented limits.

Sending an image the vendor will refuse costs a request, a rate-budget slot and a
round of retries for nothing, so each input is checked here first against the
operation's :class:`~pipeline.operations.ImageLimits` (format, bytes, pixel
dimensions; transcribed from docs/vendors.md "AILab: image limits" and "Perfect Corp:
image limits").

* Every input is checked by ``stat`` before it is opened
  (:func:`pipeline.inputs.open_input`): a FIFO, socket, device or folder is never
  opened (``INPUT_NOT_A_FILE``), and a file larger than the pipeline reads for an
  operation (:func:`max_input_bytes`) is refused unread (``INPUT_TOO_LARGE``).
* :func:`inspect_image` reads the header (Pillow's lazy ``Image.open``) and checks
  that the pixels decode; it also recognises HEIC by its ``ftyp`` brand when Pillow
  has no HEIF plugin.
* HEIC/HEIF: when ``pillow-heif`` is installed (the ``heif`` extra), its opener is
  registered (imported on the first HEIF file opened), so HEIC inputs are decoded,
  checked and (with ``auto_fix``) converted like any other format. Without it, a HEIC file is
  recognised by its brand and sent untouched where it is accepted (ai-smile).
* :func:`check_limits` lists what is wrong, one short sentence per problem.
* :func:`prepare_payload` returns the bytes to send, named with the extension of
  their *true* format (a PNG called ``.jpg`` is sent as ``.png``; docs/vendors.md "AILab:
  transport and authentication"), or raises
  :class:`~pipeline.errors.PermanentError` with a ``PREFLIGHT_*`` code. With
  ``auto_fix`` it converts, shrinks and re-compresses instead of refusing.
* :func:`sniff_image_format` names the format of result bytes from their magic
  number (the emotion-editor output format is undocumented: docs/vendors.md "AILab:
  emotion editor output format").

Everything here is synchronous and CPU-bound: the engine runs it in a worker thread.
"""

from __future__ import annotations

import importlib.util
import io
import logging
import os
import re
import threading
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import IO

from PIL import Image, ImageFile, ImageOps, UnidentifiedImageError

from pipeline.errors import PermanentError
from pipeline.inputs import (
    display_path,
    open_input,
    problem_for_os_error,
    stat_input,
    too_large_problem,
)
from pipeline.operations import MB, ImageLimits
from pipeline.providers.base import ImagePayload

# The optional "heif" extra. Importing pillow-heif costs 20-50 ms, paid by every
# process start (README "Performance": start-up counts in each run's wall time) though
# most runs never meet a HEIC file; so a stand-in opener is registered under Pillow's
# "HEIF" id and imports the real one the first time a HEIF file is opened.
HEIF_DECODER = importlib.util.find_spec("pillow_heif") is not None
_heif_loading = threading.Lock()
_heif_broken = False  # installed, but its import failed: treated as not installed
# pillow-heif's own test of a file's first bytes (``_is_supported_heif`` in
# pillow_heif.as_plugin): the stand-in takes exactly the files the real opener takes,
# whichever of them a run meets first.
_PILLOW_HEIF_BRANDS = frozenset(
    {b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"hevm", b"hevs", b"mif1", b"msf1"}
)


def _pillow_heif_accepts(prefix: bytes) -> bool:
    return prefix[4:8] == b"ftyp" and prefix[8:12] in _PILLOW_HEIF_BRANDS


def _load_heif_opener() -> None:
    """Import pillow-heif and register its opener (replacing the stand-in); idempotent.

    If the import fails (a missing libheif, a version mismatch), pillow-heif counts
    as not installed from then on (:data:`HEIF_DECODER` False: a HEIC is known by its
    brand and sent untouched where it is accepted), said once in the log, and the
    file at hand is refused to Pillow as not HEIF (``SyntaxError``), so it moves on."""
    global HEIF_DECODER, _heif_broken
    with _heif_loading:
        if _heif_broken:
            raise SyntaxError("pillow-heif could not be loaded")
        factory, _accept = Image.OPEN.get("HEIF", (None, None))
        if factory is not _open_heif:
            return  # the real opener is in (or a test took HEIF out): nothing to do
        try:
            import pillow_heif

            pillow_heif.register_heif_opener()
        except Exception as exc:  # anything its import or set-up raises
            HEIF_DECODER, _heif_broken = False, True
            logging.getLogger("pipeline").warning(
                "pillow-heif is installed but could not be loaded (%s: %s); HEIC inputs "
                "are not decoded: reinstall it (pip install --force-reinstall pillow-heif)",
                type(exc).__name__, exc,
            )  # fmt: skip
            raise SyntaxError("pillow-heif could not be loaded") from None


def _open_heif(fp: IO[bytes], filename: str | bytes) -> ImageFile.ImageFile:
    # The stand-in accepted the file with the real opener's own test, and Pillow put
    # ``fp`` back at its start: hand it over as it is.
    _load_heif_opener()
    factory, _accept = Image.OPEN["HEIF"]
    if factory is _open_heif:  # pragma: no cover - register_heif_opener always replaces it
        raise SyntaxError("no HEIF opener")
    return factory(fp, filename)


if HEIF_DECODER:
    Image.register_open("HEIF", _open_heif, _pillow_heif_accepts)

# Pillow says what it finds odd in a file (a corrupt EXIF block: "Corrupt EXIF data",
# from PIL/TiffImagePlugin.py) with ``warnings.warn``, which prints a Python source
# path on stderr, where only the pipeline's own log lines belong (README "Logs").
# What matters of it is handled here (an unreadable EXIF reads as orientation 1:
# :func:`_orientation`). A filter installed once for the process, not
# ``warnings.catch_warnings`` around each open: that swaps the process's filter list
# and is not thread-safe (Python 3.11), and images are opened in worker threads.
# Only Pillow's ``UserWarning`` (``DecompressionBombWarning`` is a ``RuntimeWarning``
# and bombs are refused on their own, :data:`Image.MAX_IMAGE_PIXELS`).
warnings.filterwarnings("ignore", category=UserWarning, module=r"PIL(\.|$)")

log = logging.getLogger("pipeline")

__all__ = [
    "AUTO_FIX_MIN_READ_BYTES",
    "AUTO_FIX_READ_FACTOR",
    "HEIF_DECODER",
    "ImageInfo",
    "PreparedImage",
    "check_limits",
    "inspect_image",
    "max_input_bytes",
    "prepare_payload",
    "sniff_image_format",
]

# EXIF tag 0x0112 (Orientation): 1 = stored upright; 5-8 swap width and height.
_ORIENTATION_TAG = 0x0112
_SWAPS_SIDES = frozenset({5, 6, 7, 8})

# MPO is how Pillow names the multi-picture JPEGs many phones write: the file starts
# with an ordinary baseline JPEG (SOI FFD8FF) that any JPEG decoder reads, so it is
# sent as JPEG untouched rather than refused or re-encoded.
_FORMAT_ALIASES = {"MPO": "JPEG"}

# Wire naming per accepted format: extension and Content-Type (every file part gets a
# real extension and the matching Content-Type: docs/vendors.md "AILab: transport and
# authentication"; content_type/file_name: docs/vendors.md "Perfect Corp: upload").
_WIRE = {
    "JPEG": ("jpg", "image/jpeg"),
    "PNG": ("png", "image/png"),
    "HEIF": ("heic", "image/heic"),
}
_EXTENSIONS = {
    "JPEG": {".jpg", ".jpeg", ".jpe", ".jfif"},
    "PNG": {".png"},
    "HEIF": {".heic", ".heif", ".hif"},
}

# ISO-BMFF brands of HEIC/HEIF still images (bytes 4..12 are "ftyp" + major brand).
_HEIF_BRANDS = frozenset({b"heic", b"heix", b"heim", b"heis", b"hevc", b"hevx", b"mif1", b"msf1"})
_HEAD_BYTES = 256 * 1024  # HEIF metadata ("meta"/"ispe") sits at the start of the file

# The most auto_fix reads of one input: 10 x the operation's byte limit, and at least
# 100 MB (a 50-megapixel PNG export). Beyond that nothing is read: a 1.5 GB file is a
# mistake (a video, a disk image), not a photo to shrink. Without auto_fix nothing
# over the limit itself is read whole (only its header, to say what else is wrong).
AUTO_FIX_READ_FACTOR = 10
AUTO_FIX_MIN_READ_BYTES = 100 * MB

# Auto-fix re-compression: first try, then lower quality stepwise, then shrink.
_JPEG_QUALITIES = (95, 90, 85, 80, 75, 70, 65, 60)
_SHRINK_QUALITY = 85
_SHRINK_STEP = 0.85

# What Pillow raises for unreadable, truncated or hostile files.
_PIL_ERRORS: tuple[type[BaseException], ...] = (
    UnidentifiedImageError,
    OSError,
    SyntaxError,
    ValueError,
    EOFError,
    Image.DecompressionBombError,
    # Pillow plugins raise these for corrupt structures (tables, tiles, struct).
    IndexError,
    KeyError,
    TypeError,
    ZeroDivisionError,
)


@dataclass(frozen=True)
class ImageInfo:
    """What the header of one image file says, without decoding its pixels.

    ``format``: Pillow's format name (``JPEG``, ``PNG``, ``WEBP``, ``MPO`` ...), or
    ``HEIF`` for a HEIC file recognised by its brand; ``None`` when the file is not
    an image Pillow can read (``error`` says why). ``width``/``height`` are as
    stored (before EXIF orientation), ``None`` when unknown (HEIC without a HEIF
    plugin and without a readable ``ispe`` box).
    """

    path: Path
    size_bytes: int
    format: str | None
    width: int | None = None
    height: int | None = None
    orientation: int = 1
    mode: str | None = None
    has_alpha: bool = False
    frames: int = 1
    decodable: bool = True  # Pillow can decode it (False for HEIC without a plugin)
    error: str | None = None
    # Why decoding the pixels failed (truncated, corrupt data after a valid header);
    # ``None`` when they decoded or were not decoded (see :func:`inspect_image`).
    damaged: str | None = None

    @property
    def wire_format(self) -> str | None:
        """The format the vendor sees: ``MPO`` counts as ``JPEG``."""
        if self.format is None:
            return None
        return _FORMAT_ALIASES.get(self.format, self.format)


@dataclass(frozen=True)
class PreparedImage:
    """The bytes to send for one input, and what preflight did to get them.

    ``changes``: what auto-fix changed in the picture (empty when sent as is).
    ``notes``: remarks that didn't change the bytes (e.g. a PNG named ``.jpg`` is
    sent as ``.png``).
    """

    payload: ImagePayload
    info: ImageInfo
    changes: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class _Problem:
    code: str
    text: str
    fixable: bool


# --------------------------------------------------------------------------- sniff


def sniff_image_format(data: bytes) -> str | None:
    """``"jpg"``, ``"png"`` or ``"webp"`` from the magic number of ``data``; else ``None``."""
    if data[:3] == b"\xff\xd8\xff":
        return "jpg"
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return "png"
    if data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "webp"
    return None


def _heif_brand(head: bytes) -> bool:
    if head[4:8] != b"ftyp" or head[8:12] not in _HEIF_BRANDS:
        return False
    # "mif1"/"msf1" are generic; an AVIF file carries them too. Require a HEVC brand
    # among the compatible ones in that case.
    if head[8:12] in (b"mif1", b"msf1"):
        box_size = int.from_bytes(head[0:4], "big")
        compatible = head[16:box_size] if 16 <= box_size <= len(head) else head[16:64]
        if b"avif" in compatible and not any(b in compatible for b in (b"heic", b"heix")):
            return False
    return True


def _heif_dimensions(head: bytes) -> tuple[int, int] | None:
    """Largest ``ispe`` (image spatial extents) box: the primary image's size.

    HEIC stores tiles, a thumbnail and the full grid each with an ``ispe``; the
    largest is the picture itself. A heuristic, good enough for a limit check.
    """
    best: tuple[int, int] | None = None
    i = head.find(b"ispe")
    while i != -1 and i + 16 <= len(head):
        w = int.from_bytes(head[i + 8 : i + 12], "big")
        h = int.from_bytes(head[i + 12 : i + 16], "big")
        if w and h and (best is None or w * h > best[0] * best[1]):
            best = (w, h)
        i = head.find(b"ispe", i + 4)
    return best


# ------------------------------------------------------------------------- inspect


def _has_alpha(im: Image.Image) -> bool:
    return im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in im.info


def _orientation(im: Image.Image) -> int:
    try:
        exif = im.getexif()
        value = exif.get(_ORIENTATION_TAG, 1)
    except _PIL_ERRORS as exc:
        log.debug("%s: the EXIF block is unreadable (%s): orientation taken as 1", _name(im), exc)
        return 1
    if not exif and len(im.info.get("exif") or b"") > 14:
        # An EXIF block is there, but Pillow could read nothing of it (it warned
        # "Corrupt EXIF data", filtered out above): no orientation to apply.
        log.debug("%s: the EXIF block is unreadable: orientation taken as 1", _name(im))
    return value if isinstance(value, int) and 1 <= value <= 8 else 1


def _name(im: Image.Image) -> str:
    return str(getattr(im, "filename", "") or "an image")


def max_input_bytes(limits: ImageLimits) -> int:
    """The largest input :func:`prepare_payload` reads for an operation with ``limits``
    (with ``auto_fix``; without it, nothing over ``limits.max_bytes`` is read whole).
    Larger inputs fail with ``INPUT_TOO_LARGE`` before they are opened."""
    return max(AUTO_FIX_READ_FACTOR * limits.max_bytes, AUTO_FIX_MIN_READ_BYTES)


def _cap_reason(limits: ImageLimits) -> str:
    whose = limits.label or "this operation"
    return (
        f"{AUTO_FIX_READ_FACTOR} x the {_limit_text(limits.max_bytes)} limit of {whose}, "
        f"at least {_limit_text(AUTO_FIX_MIN_READ_BYTES)}"
    )


def _inspect(
    path: Path, size: int, open_fp: Callable[[], IO[bytes]], *, decode: bool = False
) -> ImageInfo:
    """The header's facts; with ``decode``, for a JPEG (:data:`_CHECKED_IN_OPEN`),
    also whether its pixels decode (``damaged``, :func:`_decode_check`) from the
    same open: a second open for that was 25 of the 130 us of CPU a small JPEG's
    whole check took (measured over 2 000 bench inputs). Other formats are checked
    by the caller when they are to be sent as they are (:func:`_decode_error`):
    a PNG's ``verify`` must come straight after its open (the EXIF read loads it),
    and a HEIC or WebP that auto-fix converts is decoded there anyway, in full."""
    try:
        with open_fp() as fp, Image.open(fp) as im:
            info = ImageInfo(
                path=path,
                size_bytes=size,
                format=im.format,
                width=im.width,
                height=im.height,
                orientation=_orientation(im),
                mode=im.mode,
                has_alpha=_has_alpha(im),
                frames=int(getattr(im, "n_frames", 1) or 1),
            )
            if decode and im.format in _CHECKED_IN_OPEN:
                damaged = _decode_check(im)
                return replace(info, damaged=damaged) if damaged else info
            return info
    except Image.DecompressionBombError as exc:
        error = f"too many pixels to process safely ({exc})"
    except UnidentifiedImageError:
        # Pillow's own text embeds the repr of the file object ("<_io.BytesIO object at
        # 0x7f...>"): noise in a report, and different on every run.
        error = "not a format Pillow recognises"
    except _PIL_ERRORS as exc:
        error = str(exc) or type(exc).__name__
    try:
        with open_fp() as fp:
            head = fp.read(_HEAD_BYTES)
    except OSError as exc:
        return ImageInfo(path=path, size_bytes=size, format=None, error=str(exc))
    if _heif_brand(head) and HEIF_DECODER:
        # The decoder is there and could not open it: a damaged or truncated HEIC.
        return ImageInfo(path=path, size_bytes=size, format=None, error=f"damaged HEIC ({error})")
    if _heif_brand(head):
        dims = _heif_dimensions(head)
        return ImageInfo(
            path=path,
            size_bytes=size,
            format="HEIF",
            width=dims[0] if dims else None,
            height=dims[1] if dims else None,
            decodable=False,
            error="no HEIF decoder installed (pip install pillow-heif)",
        )
    return ImageInfo(path=path, size_bytes=size, format=None, error=error)


def _opener(path: Path, cap: int | None = None, why: str = "") -> Callable[[], IO[bytes]]:
    def opener() -> IO[bytes]:
        return open_input(path, cap, why=why)[0]

    return opener


def inspect_image(path: Path, *, max_bytes: int | None = None) -> ImageInfo:
    """Format, size, bytes and EXIF orientation of ``path``, and whether it decodes.

    The header gives format, size and orientation; then the pixels are decoded as
    cheaply as :func:`prepare_payload` checks them (JPEG at 1/8 scale, PNG chunk
    CRCs), so a truncated or corrupt file is reported here (``damaged``) and not
    only when a run reaches it: ``pipeline validate`` and ``pipeline run`` agree.

    Never raises for a bad image (``format`` is ``None`` and ``error`` says why, or
    ``damaged`` says why the pixels don't decode); raises
    :class:`~pipeline.errors.InputProblem` (a :class:`PermanentError` with an
    ``INPUT_*`` code, see :func:`pipeline.inputs.stat_input`) if the file itself
    can't be used: not a regular file (never opened), gone, unreadable, or larger
    than ``max_bytes`` (``INPUT_TOO_LARGE``, checked by ``stat`` before opening).
    The file is streamed, never read whole.
    """
    size = stat_input(path).st_size
    if max_bytes is not None and size > max_bytes:
        raise too_large_problem(path, size, max_bytes, "the most any of its operations reads")
    opener = _opener(path, max_bytes)
    info = _inspect(path, size, opener, decode=True)
    if info.format is None or not info.decodable or info.format in _CHECKED_IN_OPEN:
        return info
    with opener() as fp:
        damaged = _decode_error(fp)
    return replace(info, damaged=damaged) if damaged else info


# -------------------------------------------------------------------------- limits


def _human(n: int, *, decimals: bool) -> tuple[float, str]:
    """``(value, unit)`` in MB, KB or bytes; value rounded to 1 decimal."""
    if n >= MB:
        value, unit = n / MB, "MB"
    elif n >= 1024:
        value, unit = n / 1024, "KB"
    else:
        return float(n), "bytes"
    return (round(value, 1) if decimals else value), unit


def _show(value: float, unit: str, *, decimals: bool) -> str:
    if unit == "bytes":
        return f"{int(value):,} bytes"
    if decimals:
        return f"{value:.1f} {unit}"
    return f"{value:g} {unit}" if value == round(value, 1) else f"{value:.1f} {unit}"


def _bytes_text(n: int) -> str:
    """``n`` bytes for a message: ``2.3 MB``, ``512.0 KB``, ``900 bytes``."""
    value, unit = _human(n, decimals=True)
    return _show(value, unit, decimals=True)


def _limit_text(limit: int) -> str:
    value, unit = _human(limit, decimals=False)
    return _show(value, unit, decimals=False)


def _size_phrase(n: int, limit: int) -> tuple[str, str]:
    """Measured size and limit, precise enough that they never print as equal."""
    nv, nu = _human(n, decimals=True)
    lv, lu = _human(limit, decimals=False)
    shown, lim = _show(nv, nu, decimals=True), _limit_text(limit)
    if nu == lu and nv == round(lv, 1):
        return f"{n:,} bytes", f"{lim} ({limit:,}-byte)"
    return shown, lim


def _target_long_side(limits: ImageLimits) -> int | None:
    """The longest side that satisfies every side limit, or ``None`` if unbounded."""
    bounds = []
    if limits.max_side_exclusive:
        bounds.append(limits.max_side_exclusive - 1)
    if limits.max_long_side:
        bounds.append(limits.max_long_side)
    return min(bounds) if bounds else None


def _bytes_ok(n: int, limits: ImageLimits) -> bool:
    return n <= limits.max_bytes if limits.max_bytes_inclusive else n < limits.max_bytes


def _problems(info: ImageInfo, limits: ImageLimits) -> list[_Problem]:
    whose = limits.label or "this operation"
    accepted = "/".join(sorted(limits.formats))
    out: list[_Problem] = []
    if info.format is None:
        reason = f" ({info.error})" if info.error else ""
        return [_Problem("PREFLIGHT_UNREADABLE", f"not an image that can be read{reason}", False)]
    if info.damaged:
        return [
            _Problem(
                "PREFLIGHT_UNREADABLE",
                f"{info.format} whose pixels cannot be decoded ({info.damaged}): the file is "
                f"damaged or truncated",
                False,
            )
        ]
    if info.wire_format not in limits.formats:
        out.append(
            _Problem(
                "PREFLIGHT_FORMAT",
                f"{info.format} is not accepted by {whose} (it takes {accepted})",
                True,
            )
        )
    if not _bytes_ok(info.size_bytes, limits):
        shown, lim = _size_phrase(info.size_bytes, limits.max_bytes)
        verb = "is over" if limits.max_bytes_inclusive else "is not under"
        out.append(
            _Problem("PREFLIGHT_FILE_SIZE", f"{shown} {verb} the {lim} limit of {whose}", True)
        )
    if info.width is not None and info.height is not None:
        w, h = info.width, info.height
        if limits.max_side_exclusive and max(w, h) >= limits.max_side_exclusive:
            out.append(
                _Problem(
                    "PREFLIGHT_DIMENSIONS",
                    f"{w}x{h} px: each side must be under {limits.max_side_exclusive} px "
                    f"for {whose}",
                    True,
                )
            )
        if limits.max_long_side and max(w, h) > limits.max_long_side:
            out.append(
                _Problem(
                    "PREFLIGHT_DIMENSIONS",
                    f"long side {max(w, h)} px is over the {limits.max_long_side} px limit "
                    f"of {whose}",
                    True,
                )
            )
        if limits.min_side_exclusive and min(w, h) <= limits.min_side_exclusive:
            out.append(
                _Problem(
                    "PREFLIGHT_TOO_SMALL",
                    f"{w}x{h} px: each side must be over {limits.min_side_exclusive} px "
                    f"for {whose}",
                    False,
                )
            )
    return out


def check_limits(info: ImageInfo, limits: ImageLimits) -> list[str]:
    """Every way ``info`` breaks ``limits``, one short sentence each; ``[]`` if none.

    E.g. ``"2.4 MB is over the 2 MB limit of ailab/face-beauty-pro"``. Dimensions
    that are unknown (HEIC without a decoder) are not checked.
    """
    return [p.text for p in _problems(info, limits)]


def check_limits_fixable(info: ImageInfo, limits: ImageLimits) -> list[tuple[str, bool]]:
    """Like :func:`check_limits`, with whether ``auto_fix`` can repair each problem
    (format, bytes, resolution: yes; too small, unreadable: no)."""
    return [(p.text, p.fixable) for p in _problems(info, limits)]


# ------------------------------------------------------------------------- prepare


def _safe_stem(path: Path) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]", "_", path.stem).lstrip(".")
    return stem[:100] or "image"


def _payload(path: Path, data: bytes, fmt: str) -> ImagePayload:
    ext, content_type = _WIRE[fmt]
    return ImagePayload(data=data, filename=f"{_safe_stem(path)}.{ext}", content_type=content_type)


def _unreadable(path: Path, detail: str) -> PermanentError:
    return PermanentError(
        f"{display_path(path)}: cannot be decoded as an image ({detail}); the file is damaged, "
        f"truncated or not an image: re-export it or remove it from the inputs",
        code="PREFLIGHT_UNREADABLE",
    )


# Formats whose cheap decode check runs in the open that reads the header.
_CHECKED_IN_OPEN = frozenset({"JPEG", "MPO"})


def _decode_error(fp: IO[bytes]) -> str | None:
    """Open the image in ``fp`` and :func:`_decode_check` it; why it failed, or ``None``."""
    try:
        with Image.open(fp) as im:
            return _decode_check(im)
    except UnidentifiedImageError:
        return "not a format Pillow recognises"
    except _PIL_ERRORS as exc:
        return str(exc) or type(exc).__name__


def _verify_decodable(path: Path, data: bytes) -> None:
    """Raise ``PREFLIGHT_UNREADABLE`` if ``data`` does not decode (see :func:`_decode_check`)."""
    detail = _decode_error(io.BytesIO(data))
    if detail is not None:
        raise _unreadable(path, detail)


def _decode_check(im: Image.Image) -> str | None:
    """Decode enough of the opened ``im`` to catch truncation, cheaply; why it
    failed, or ``None`` when it decodes. Read its header fields first: ``verify``
    spends the image (and must come straight after the open).

    JPEG is decoded at 1/8 scale (``draft``): the whole entropy-coded stream is
    still read, so a truncated file fails, at a fraction of the cost. PNG's
    ``verify`` checks every chunk CRC through ``IEND`` without inflating pixels.
    Other formats are decoded in full.
    """
    try:
        if im.format in ("JPEG", "MPO"):
            im.draft(im.mode, (max(1, im.width // 8), max(1, im.height // 8)))
            im.load()
        elif im.format == "PNG":
            im.verify()
        else:
            im.load()
    except _PIL_ERRORS as exc:
        return str(exc) or type(exc).__name__
    return None


def _refuse(path: Path, problems: list[_Problem], auto_fix: bool) -> PermanentError:
    text = "; ".join(p.text for p in problems)
    unfixable = [p for p in problems if not p.fixable]
    if unfixable:
        first = unfixable[0]
        if first.code == "PREFLIGHT_TOO_SMALL":
            advice = "use a larger image (auto_fix never enlarges images)"
        else:
            advice = "convert it to JPEG or PNG, or remove it from the inputs"
        return PermanentError(f"{display_path(path)}: {text}; {advice}", code=first.code)
    advice = (
        "set auto_fix: true in the manifest to convert/shrink it automatically, "
        "or fix the file yourself"
    )
    if auto_fix:  # only reached for HEIC we cannot decode
        advice = "install pillow-heif so auto_fix can convert HEIC, or convert it to JPEG"
    return PermanentError(f"{display_path(path)}: {text}; {advice}", code=problems[0].code)


def prepare_payload(path: Path, limits: ImageLimits, auto_fix: bool) -> PreparedImage:
    """The bytes to send for ``path`` under ``limits``, named by their true format.

    An image within the limits is sent byte for byte as it is (only its name may
    change, to the extension of its real format). Otherwise:

    * ``auto_fix=False``: raises :class:`PermanentError` with code
      ``PREFLIGHT_FORMAT``, ``PREFLIGHT_FILE_SIZE`` or ``PREFLIGHT_DIMENSIONS``
      naming the file, every problem and what to do;
    * ``auto_fix=True``: decodes the image, applies its EXIF orientation (the
      pixels are rewritten anyway, and the tag does not survive re-encoding), keeps
      JPEG/PNG as they are when accepted, else re-encodes as JPEG (PNG when the
      image has real transparency and PNG is accepted), shrinks it so each side
      fits, then lowers JPEG quality stepwise and finally scales down further until
      the byte limit is met. An image within the limits but with an EXIF
      orientation other than 1 is also re-encoded upright (at the best quality);
      any other image within the limits is never touched.

    Never fixable: ``PREFLIGHT_TOO_SMALL`` (auto-fix never enlarges) and
    ``PREFLIGHT_UNREADABLE`` (not an image, damaged or truncated).

    The file is checked by ``stat`` before it is read
    (:class:`~pipeline.errors.InputProblem`, ``INPUT_*`` codes): nothing that is not
    a regular file is opened, a file over :func:`max_input_bytes` is refused
    unopened (``INPUT_TOO_LARGE``), and without ``auto_fix`` a file over the byte
    limit is refused after reading only its header.
    """
    size = stat_input(path).st_size
    cap = max_input_bytes(limits)
    if size > cap:
        raise too_large_problem(path, size, cap, _cap_reason(limits))
    if not auto_fix and not _bytes_ok(size, limits):
        # Refused whatever else it is: say everything that is wrong, from the header.
        header = _inspect(path, size, _opener(path, cap, _cap_reason(limits)))
        if header.format is None:
            raise _unreadable(path, header.error or "unknown format")
        raise _refuse(path, _problems(header, limits), auto_fix)
    data = _read_bounded(path, cap, _cap_reason(limits))
    info = _inspect(path, len(data), lambda: io.BytesIO(data), decode=True)
    if info.format is None:
        raise _unreadable(path, info.error or "unknown format")
    problems = _problems(info, limits)
    notes = _naming_notes(path, info)
    if not problems:
        return _within_limits(path, data, info, limits, auto_fix, notes)
    if not auto_fix or not all(p.fixable for p in problems) or not info.decodable:
        raise _refuse(path, problems, auto_fix)
    out, fmt, changes = _auto_fix(path, data, info, limits)
    return PreparedImage(_payload(path, out, fmt), info, changes, notes)


def _within_limits(
    path: Path,
    data: bytes,
    info: ImageInfo,
    limits: ImageLimits,
    auto_fix: bool,
    notes: list[str],
) -> PreparedImage:
    """An image within the limits: sent as it is, or upright when ``auto_fix``."""
    fmt = info.wire_format
    if fmt not in _WIRE:  # a limits table naming a format we can't label
        raise PermanentError(
            f"{display_path(path)}: {fmt} has no known file extension/Content-Type to send it with; "
            f"convert it to JPEG or PNG",
            code="PREFLIGHT_FORMAT",
        )
    if info.damaged:  # a JPEG: checked by _inspect while it had the image open
        raise _unreadable(path, info.damaged)
    if info.decodable and info.format not in _CHECKED_IN_OPEN:
        _verify_decodable(path, data)
    if auto_fix and info.orientation != 1 and info.decodable:
        # Whether the vendors honour the EXIF tag is undocumented; a face lying on its
        # side may not be found. auto_fix opted in to changed pixels: send it upright.
        out, fmt, changes = _auto_fix(path, data, info, limits)
        return PreparedImage(_payload(path, out, fmt), info, changes, notes)
    return PreparedImage(_payload(path, data, fmt), info, [], notes)


def _read_bounded(path: Path, cap: int, why: str) -> bytes:
    """The bytes of ``path``, refusing (``INPUT_TOO_LARGE``) past ``cap`` even if the
    file grew after its ``stat``."""
    handle, st = open_input(path, cap, why=why)
    with handle as fp:
        try:
            # Sized by the fstat (<= cap): read(cap + 1) would allocate the cap each time.
            data = fp.read(st.st_size + 1)
            if len(data) > st.st_size:  # it grew since: read on, up to just past the cap
                data += fp.read(cap + 1 - len(data))
        except OSError as exc:
            raise problem_for_os_error(os.fspath(path), exc) from None
    if len(data) > cap:
        raise too_large_problem(path, len(data), cap, why)
    return data


def _naming_notes(path: Path, info: ImageInfo) -> list[str]:
    notes: list[str] = []
    if info.format == "MPO":
        notes.append("multi-picture JPEG (MPO): sent as JPEG")
    fmt = info.wire_format
    suffix = path.suffix.lower()
    if fmt in _EXTENSIONS and suffix not in _EXTENSIONS[fmt]:
        ext = _WIRE[fmt][0]
        notes.append(
            f"the file is {fmt} although its name ends in {suffix or '(no extension)'}: "
            f"sent as .{ext}"
        )
    return notes


# ------------------------------------------------------------------------ auto-fix


def _real_alpha(im: Image.Image) -> bool:
    """Transparency that is actually used (an all-opaque alpha channel doesn't count)."""
    if not _has_alpha(im):
        return False
    rgba = im if im.mode == "RGBA" else im.convert("RGBA")
    extrema = rgba.getchannel("A").getextrema()
    low = extrema[0] if isinstance(extrema, tuple) else extrema
    return not isinstance(low, tuple) and low < 255


def _flatten(im: Image.Image) -> Image.Image:
    """RGB (or L) for JPEG: transparent areas become white, not black."""
    if im.mode in ("RGB", "L"):
        return im
    if _has_alpha(im):
        rgba = im.convert("RGBA")
        bg = Image.new("RGB", rgba.size, (255, 255, 255))
        bg.paste(rgba, mask=rgba.getchannel("A"))
        return bg
    return im.convert("RGB")


def _encode(im: Image.Image, fmt: str, quality: int, icc: bytes | None) -> bytes:
    buf = io.BytesIO()
    if fmt == "JPEG":
        extra = {"icc_profile": icc} if icc else {}
        _flatten(im).save(buf, "JPEG", quality=quality, optimize=True, **extra)
    else:
        png = (
            im
            if im.mode in ("1", "L", "LA", "P", "RGB", "RGBA", "I", "I;16")
            else (im.convert("RGBA" if _has_alpha(im) else "RGB"))
        )
        extra = {"icc_profile": icc} if icc else {}
        png.save(buf, "PNG", **extra)
    return buf.getvalue()


def _fit(w: int, h: int, long_side: int) -> tuple[int, int]:
    """Scale ``w``x``h`` so its long side is ``long_side``, keeping the aspect ratio."""
    if w >= h:
        return long_side, max(1, round(h * long_side / w))
    return max(1, round(w * long_side / h)), long_side


def _auto_fix(
    path: Path, data: bytes, info: ImageInfo, limits: ImageLimits
) -> tuple[bytes, str, list[str]]:
    """Re-encode ``data`` to meet ``limits``: first frame, upright, a format the
    operation takes, sides that fit, then bytes that fit. Returns the bytes, their
    format and what was changed, in words."""
    fix = _Fix(path, info, limits)
    im, oriented = fix.decode(data)
    if info.orientation != 1:
        im = ImageOps.exif_transpose(im)
        fix.changes.append(f"applied EXIF orientation {info.orientation}")
    alpha = _real_alpha(im)
    fmt = fix.target_format(alpha)
    im = fix.fit_sides(im, oriented)
    out, fmt = fix.fit_bytes(im, fmt, alpha)
    return out, fmt, fix.changes


@dataclass
class _Fix:
    """One auto-fix under way: the image's facts, the limits it must meet, its ICC
    profile (kept through re-encoding) and the changes made so far."""

    path: Path
    info: ImageInfo
    limits: ImageLimits
    icc: bytes | None = None
    changes: list[str] = field(default_factory=list)

    @property
    def whose(self) -> str:
        return self.limits.label or "this operation"

    def decode(self, data: bytes) -> tuple[Image.Image, tuple[int, int]]:
        """The first frame, loaded, and its size as shown (EXIF orientation applied)."""
        info = self.info
        target_long = _target_long_side(self.limits)
        try:
            with Image.open(io.BytesIO(data)) as src:
                if info.frames > 1:
                    src.seek(0)
                    if info.format != "MPO":  # MPO's extra frames are previews/depth maps
                        self.changes.append(f"used the first of {info.frames} frames")
                self.icc = src.info.get("icc_profile")
                stored = src.size
                oriented = stored[::-1] if info.orientation in _SWAPS_SIDES else stored
                if src.format in ("JPEG", "MPO") and target_long and max(oriented) > target_long:
                    # Decode at a reduced DCT scale no smaller than the target: faster
                    # and uses far less memory for 50-megapixel phone shots.
                    want = _fit(*stored, target_long)
                    src.draft(src.mode, want)
                src.load()
                im: Image.Image = src.copy()
        except _PIL_ERRORS as exc:
            raise _unreadable(self.path, str(exc) or type(exc).__name__) from None
        return im, oriented

    def target_format(self, alpha: bool) -> str:
        """JPEG or PNG as they are when accepted; else JPEG, or PNG for an image with
        real transparency when PNG is accepted."""
        wire = self.info.wire_format
        if wire in self.limits.formats and wire in ("JPEG", "PNG"):
            return wire
        fmt = "PNG" if alpha and "PNG" in self.limits.formats else "JPEG"
        self.changes.append(f"re-encoded {self.info.format} as {fmt}")
        return fmt

    def fit_sides(self, im: Image.Image, size: tuple[int, int]) -> Image.Image:
        """``im`` shrunk so its long side fits; refused if a side would then drop to
        the minimum or below."""
        target_long = _target_long_side(self.limits)
        min_side = self.limits.min_side_exclusive or 0
        w, h = size
        if not target_long or max(w, h) <= target_long:
            return im
        nw, nh = _fit(w, h, target_long)
        if min(nw, nh) <= min_side:
            raise PermanentError(
                f"{display_path(self.path)}: {w}x{h} px can't be shrunk to fit {self.whose} (long side "
                f"<= {target_long} px) without a side dropping to {min_side} px or less; "
                f"crop it to a less extreme aspect ratio",
                code="PREFLIGHT_DIMENSIONS",
            )
        im = im.resize((nw, nh), Image.Resampling.LANCZOS)
        self.changes.append(f"resized {w}x{h} -> {nw}x{nh}")
        return im

    def _recompressed(self, how: str, out: bytes) -> str:
        return (
            f"re-compressed {how} to fit the {_limit_text(self.limits.max_bytes)} limit "
            f"({_bytes_text(self.info.size_bytes)} -> {_bytes_text(len(out))})"
        )

    def fit_bytes(self, im: Image.Image, fmt: str, alpha: bool) -> tuple[bytes, str]:
        """``im`` encoded within the byte limit: as decided (JPEG at the best quality,
        PNG lossless), then JPEG at lower qualities, then scaled down."""
        limits = self.limits
        limit_text = _limit_text(limits.max_bytes)
        # A file over the byte limit that fits once re-encoded as it is (same format,
        # best quality) still had its bytes changed: say so, or ``changes`` would be
        # empty for an image that was not sent as it is.
        over_bytes = not _bytes_ok(self.info.size_bytes, limits)
        # 1. As decided: JPEG at the best quality / PNG lossless.
        if fmt == "PNG":
            out = _encode(im, "PNG", 0, self.icc)
            if _bytes_ok(len(out), limits):
                if over_bytes:
                    self.changes.append(self._recompressed("as PNG", out))
                return out, fmt
            if not alpha and "JPEG" in limits.formats:
                fmt = "JPEG"
                self.changes.append(f"re-encoded PNG as JPEG to fit the {limit_text} limit")
                over_bytes = False  # noted
        if fmt == "JPEG":
            # 2. Lower JPEG quality stepwise.
            for quality in _JPEG_QUALITIES:
                out = _encode(im, "JPEG", quality, self.icc)
                if _bytes_ok(len(out), limits):
                    if quality != _JPEG_QUALITIES[0]:
                        self.changes.append(
                            f"lowered JPEG quality to {quality} to fit the {limit_text} limit"
                        )
                    elif over_bytes:
                        self.changes.append(
                            self._recompressed(f"as JPEG at quality {quality}", out)
                        )
                    return out, fmt
        return self.scale_down(im, fmt), fmt

    def scale_down(self, base: Image.Image, fmt: str) -> bytes:
        """3. Scale down further (from the fitted image, one resample each time)."""
        limits = self.limits
        limit_text = _limit_text(limits.max_bytes)
        min_side = limits.min_side_exclusive or 0
        scale = 1.0
        while True:
            scale *= _SHRINK_STEP
            nw, nh = max(1, round(base.width * scale)), max(1, round(base.height * scale))
            if min(nw, nh) <= max(min_side, 1) or min(nw, nh) < 16:
                raise PermanentError(
                    f"{display_path(self.path)}: can't get the file under the {limit_text} limit of {self.whose} even "
                    f"after shrinking it; compress it yourself or remove it from the inputs",
                    code="PREFLIGHT_FILE_SIZE",
                )
            smaller = base.resize((nw, nh), Image.Resampling.LANCZOS)
            out = _encode(smaller, fmt, _SHRINK_QUALITY, self.icc)
            if _bytes_ok(len(out), limits):
                quality_note = f" at JPEG quality {_SHRINK_QUALITY}" if fmt == "JPEG" else ""
                self.changes.append(
                    f"scaled down to {nw}x{nh}{quality_note} to fit the {limit_text} limit"
                )
                return out
