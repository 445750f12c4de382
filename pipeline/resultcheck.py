"""Is what the vendor billed us for an image we can hand to the user?

:func:`check_result_image` answers for bytes in memory, a file path or an open binary
file, within bounded memory and time, and returns the format (``"jpg"``, ``"png"`` or
``"webp"``) or raises :class:`~pipeline.errors.ResultNotImageError` with a one-line
reason. The order of the checks is what keeps memory bounded:

1. the byte count (``os.stat`` for a path) against ``max_bytes``; empty is refused;
2. the magic bytes: HTML pages, JSON, plain text and other formats are named as such;
3. the pixel count from the header, before anything is decoded: a 20000x20000 PNG is
   refused from its first 24 bytes. WebP's header is parsed here, because Pillow's
   WebP decoder allocates the whole canvas the moment it opens a file;
4. integrity, cheaply: a JPEG's scans must between them code every coefficient of
   every component (a file cut between two progressive scans is refused), and the
   JPEG is then decoded at 1/8 scale by libjpeg-turbo (``simplejpeg``, strict), which
   Huffman-decodes every scan and refuses on any libjpeg *warning* as well as an
   error: a scan cut short, or replaced by an HTML page, with an end-of-image marker
   appended only draws a warning, which Pillow ignores; a PNG's chunks and CRCs are
   walked by ``verify()`` up to ``IEND``; a WebP is decoded in full (its pixels are
   capped by :data:`FULL_DECODE_PIXELS`).

Pillow's format classes are used directly rather than ``Image.open``: ``Image.open``
runs Pillow's own decompression-bomb check, which *warns* (a process-wide warning
filter decides whether that is an exception) between 89 and 179 million pixels.
Step 3 is stricter and always an error, so that check is redundant here; any bomb
error Pillow still raises is turned into ``ResultNotImageError`` too.

Decodes are limited process-wide (:data:`MAX_CONCURRENT_DECODES`, a threading
semaphore, so thread-pool callers share it); async callers use
:func:`check_result_image_async`, which also queues in the event loop before taking a
worker thread, so waiting checks never hold the thread pool.
"""

from __future__ import annotations

import io
import logging
import mmap
import os
import re
import struct
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from functools import cache, partial
from types import ModuleType
from typing import IO, Final, cast

import anyio
import anyio.to_thread
from PIL import Image, JpegImagePlugin, PngImagePlugin, WebPImagePlugin

from pipeline.errors import ResultNotImageError
from pipeline.offload import INLINE_BYTES
from pipeline.perloop import PerLoop

__all__ = [
    "FULL_DECODE_PIXELS",
    "MAX_CONCURRENT_DECODES",
    "ResultSource",
    "check_result_image",
    "check_result_image_async",
    "describe_non_image",
    "warm_decoder",
]

log = logging.getLogger("pipeline")

ResultSource = bytes | bytearray | memoryview | str | os.PathLike[str] | IO[bytes]

# At most this many results are being decoded at once in the process. A JPEG decoded
# at 1/8 scale needs about pixels*3/64 bytes; a progressive JPEG or a WebP decoded in
# full needs up to 6 and 4 bytes per pixel, bounded by FULL_DECODE_PIXELS below.
MAX_CONCURRENT_DECODES: Final = 2
# Above this many pixels a progressive JPEG (libjpeg keeps every DCT coefficient of a
# progressive scan: up to 6 bytes per pixel) or a WebP (the decoder allocates the
# RGBA canvas: 4 bytes per pixel) is not decoded; its structure is checked instead
# (JPEG: its scans code every coefficient and end with EOI; WebP: every RIFF chunk is
# complete). 12 Mpx
# keeps one decode under ~72 MB; portraits are far smaller.
FULL_DECODE_PIXELS: Final = 12_000_000

_HEAD = 64
_DECODES = threading.BoundedSemaphore(MAX_CONCURRENT_DECODES)
_LIMITERS: PerLoop[anyio.CapacityLimiter] = PerLoop(
    lambda: anyio.CapacityLimiter(MAX_CONCURRENT_DECODES)
)

_JPEG_MAGIC = b"\xff\xd8\xff"
_PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
_PNG_IEND = b"\x00\x00\x00\x00IEND\xaeB`\x82"


def _refuse(reason: str, vendor: str) -> ResultNotImageError:
    return ResultNotImageError(f"the result is not an acceptable image: {reason}", vendor=vendor)


# ------------------------------------------------------------------------- sources


class _Source:
    """Uniform access to bytes, a path or a seekable binary file."""

    def __init__(self, source: ResultSource) -> None:
        self._owned: IO[bytes] | None = None
        self._data: memoryview | None = None
        if isinstance(source, bytes | bytearray | memoryview):
            self._data = memoryview(source).cast("B")
            self.size = len(self._data)
            self._fp: IO[bytes] = io.BytesIO(self._data)
        elif isinstance(source, str | os.PathLike):
            self.size = os.stat(source).st_size
            self._owned = self._fp = open(source, "rb")  # noqa: SIM115 (closed in close())
        else:
            self._fp = source
            self._fp.seek(0, os.SEEK_END)
            self.size = self._fp.tell()

    def fp(self) -> IO[bytes]:
        """The data from its start, for Pillow, which may close what it is given
        (``verify()`` does): a wrapper whose ``close`` leaves the source open."""
        self._fp.seek(0)
        return cast(IO[bytes], _KeepOpen(self._fp))

    def read_at(self, offset: int, n: int) -> bytes:
        self._fp.seek(offset)
        return self._fp.read(n)

    @contextmanager
    def buffer(self) -> Iterator[memoryview]:
        """All the data as one read-only buffer, for the JPEG decoder, which needs it
        in one piece: the caller's own bytes, else the file mapped (page cache, not
        a copy), else (a file object without a descriptor) read into memory, which
        is at most ``max_bytes``."""
        if self._data is not None:
            yield self._data
            return
        try:
            mapped = mmap.mmap(self._fp.fileno(), 0, access=mmap.ACCESS_READ)
        except (AttributeError, OSError, ValueError, io.UnsupportedOperation):
            self._fp.seek(0)
            yield memoryview(self._fp.read())
            return
        try:
            with memoryview(mapped) as view:
                yield view
        finally:
            mapped.close()

    def close(self) -> None:
        if self._owned is not None:
            self._owned.close()


class _KeepOpen:
    def __init__(self, fp: IO[bytes]) -> None:
        self._fp = fp

    def read(self, size: int = -1) -> bytes:
        return self._fp.read(size)

    def seek(self, offset: int, whence: int = os.SEEK_SET) -> int:
        return self._fp.seek(offset, whence)

    def tell(self) -> int:
        return self._fp.tell()

    def close(self) -> None:
        return None


# --------------------------------------------------------------- what it is instead


def describe_non_image(head: bytes) -> str:
    """A short name for data that is not JPEG/PNG/WebP, from its first bytes."""
    if head.startswith((b"GIF87a", b"GIF89a")):
        return "unsupported image format GIF (accepted: JPEG, PNG, WebP)"
    if head[4:8] == b"ftyp":
        return "unsupported image format HEIF/AVIF (accepted: JPEG, PNG, WebP)"
    if head.startswith(b"BM"):
        return "unsupported image format BMP (accepted: JPEG, PNG, WebP)"
    if head.startswith((b"II*\x00", b"MM\x00*")):
        return "unsupported image format TIFF (accepted: JPEG, PNG, WebP)"
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head.startswith(b"\x1f\x8b"):
        return "gzip-compressed data"
    text = head.lstrip(b"\xef\xbb\xbf \t\r\n").lower()
    if text.startswith((b"<!doctype html", b"<html", b"<head", b"<body")):
        return "an HTML page"
    if text.startswith(b"<script") or b"<script" in text:
        return "a script (HTML/JavaScript text)"
    if text.startswith(b"<?xml") or text.startswith(b"<svg") or text.startswith(b"<"):
        return "XML/SVG markup"
    if text[:1] in (b"{", b"["):
        return "JSON text"
    for cut in range(4):  # a multi-byte character may be cut at the end of the head
        try:
            decoded = head[: len(head) - cut].decode("utf-8")
        except UnicodeDecodeError:
            continue
        if decoded and all(c.isprintable() or c in "\t\r\n" for c in decoded):
            return "plain text"
        break
    return "not an image (unknown binary format)"


def _format_of(head: bytes) -> str | None:
    if head.startswith(_JPEG_MAGIC):
        return "jpg"
    if head.startswith(_PNG_MAGIC):
        return "png"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "webp"
    return None


# ------------------------------------------------------------------------- headers


def _webp_size(head: bytes) -> tuple[int, int] | None:
    """Canvas size from a WebP header (RIFF + first chunk), ``None`` if unreadable.

    Hand-written because Pillow only reads it inside the decoder constructor, which
    already allocates the canvas (the very thing a bomb check must come before).
    """
    fourcc = head[12:16]
    if fourcc == b"VP8X" and len(head) >= 30:
        w = int.from_bytes(head[24:27], "little") + 1
        h = int.from_bytes(head[27:30], "little") + 1
        return w, h
    if fourcc == b"VP8L" and len(head) >= 25 and head[20] == 0x2F:
        bits = int.from_bytes(head[21:25], "little")
        return (bits & 0x3FFF) + 1, ((bits >> 14) & 0x3FFF) + 1
    if fourcc == b"VP8 " and len(head) >= 30 and head[23:26] == b"\x9d\x01\x2a":
        w, h = struct.unpack("<HH", head[26:30])
        return w & 0x3FFF, h & 0x3FFF
    return None


def _check_pixels(size: tuple[int, int], max_pixels: int, what: str, vendor: str) -> None:
    w, h = size
    if w <= 0 or h <= 0:
        raise _refuse(f"{what} header gives an empty size {w}x{h}", vendor)
    if w * h > max_pixels:
        raise _refuse(
            f"{what} of {w}x{h} pixels exceeds the limit of {max_pixels} pixels "
            "(a decompression bomb or an absurd size)",
            vendor,
        )


# ----------------------------------------------------------------------- integrity


def _webp_structure(src: _Source, vendor: str) -> None:
    """Every RIFF chunk of a WebP complete and inside the file (truncation check)."""
    riff_size = int.from_bytes(src.read_at(4, 4), "little")
    if riff_size + 8 > src.size:
        raise _refuse(
            f"truncated WebP: the header announces {riff_size + 8} bytes, got {src.size}", vendor
        )
    offset, end, chunks = 12, riff_size + 8, 0
    while offset + 8 <= end:
        length = int.from_bytes(src.read_at(offset + 4, 4), "little")
        offset += 8 + length + (length & 1)
        chunks += 1
    if chunks == 0 or offset > end + 1:  # the last chunk's pad byte may be missing
        raise _refuse("truncated or corrupt WebP: a chunk runs past the end", vendor)


# A marker after entropy-coded data: FF00 is a stuffed FF byte, RSTn belongs to the scan
# and FF FF is fill before a marker.
_JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
_JPEG_PROGRESSIVE_SOF = frozenset({0xC2, 0xC6, 0xCA, 0xCE})
_JPEG_SOF = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}  # minus DHT, JPG, DAC


def _jpeg_scans_complete(data: memoryview, progressive: bool, vendor: str) -> None:
    """Every component of the frame coded in full by the scans, which end with EOI.

    libjpeg decodes, without any warning, a file cut between two scans and given an
    end-of-image marker (a progressive JPEG then shows only its first, coarse scans;
    a non-interleaved sequential one lacks components), and no library reports which
    coefficients the scans covered, so the scan headers are read here: segments by
    their lengths, entropy-coded data skipped to the next marker by a regex (C speed).
    A progressive component is complete when each of its 64 coefficients was sent by
    a scan with Al=0 (the last successive-approximation step); every encoder in use
    (libjpeg's, mozjpeg's, Pillow's) finishes that way. An interleaved sequential
    scan of all components is complete by itself: the walk stops there.
    """
    n = len(data)
    pos = 2
    components: list[int] = []
    missing: dict[int, set[int]] = {}
    while True:
        while pos < n - 1 and data[pos] == 0xFF and data[pos + 1] == 0xFF:
            pos += 1  # fill bytes before a marker
        if pos + 2 > n or data[pos] != 0xFF:
            break
        marker = data[pos + 1]
        if marker == 0xD9:
            if components and not any(missing.values()):
                return
            incomplete = sorted(c for c in components if missing.get(c))
            raise _refuse(
                "truncated JPEG: its scans end before coding all of component(s) "
                + ", ".join(map(str, incomplete)),
                vendor,
            )
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        body = bytes(data[pos + 4 : pos + 2 + length])
        if length < 2 or len(body) != length - 2:
            break
        pos += 2 + length
        if marker in _JPEG_SOF and len(body) >= 6:
            components = [body[6 + 3 * i] for i in range(body[5]) if 8 + 3 * i < len(body)]
            missing = {c: set(range(64)) for c in components}
        elif marker == 0xDA and len(body) >= 1:
            ns = body[0]
            ids = [body[1 + 2 * i] for i in range(ns) if 2 + 2 * i < len(body)]
            ss, se, al = (body[-3], body[-2], body[-1] & 0x0F) if len(body) >= 4 else (0, 0, 1)
            if not progressive:
                if sorted(ids) == sorted(components):
                    return  # one interleaved scan codes it all; the decoder checks it
                ss, se, al = 0, 63, 0
            if al == 0:
                for c in ids:
                    missing.get(c, set()).difference_update(range(ss, se + 1))
            found = _JPEG_MARKER.search(data, pos)
            if found is None:
                break
            pos = found.start()
    raise _refuse("truncated JPEG: no end-of-image marker after the last scan", vendor)


@cache
def _strict_decoder() -> ModuleType | None:
    """simplejpeg, imported by the first JPEG check: with numpy it costs about 70 ms
    and 11 MB, which a rerun that checks no result need not pay. None if it cannot be
    imported (a broken or partial install): JPEG results are then decoded by Pillow,
    blind to libjpeg's warnings (one warning in the log), rather than failing after
    the vendor billed them."""
    try:
        import simplejpeg  # type: ignore[import-untyped]  # no py.typed marker
    except ImportError as exc:
        log.warning(
            "the strict JPEG decoder (simplejpeg) cannot be imported (%s): JPEG results "
            "are checked by Pillow only; reinstall the package to restore the check",
            " ".join(str(exc).split())[:200],
        )
        return None
    return cast(ModuleType, simplejpeg)


_warm_up: threading.Thread | None = None
_warm_up_lock = threading.Lock()


def warm_decoder() -> None:
    """Import the strict JPEG decoder in a thread of its own, once per process.

    Called as a run first sends: the import then overlaps the wait for the vendor's
    answer, where a small result's check (made inline on the event loop) would have
    stalled every item in flight for it at the first result (README "Performance").
    A rerun that sends nothing never pays it. A daemon thread: a run that ends (or is
    stopped) while the import is under way does not wait for it.
    """
    global _warm_up
    with _warm_up_lock:
        if _warm_up is None:
            _warm_up = threading.Thread(target=_warm, name="pipeline-decoder-warm-up", daemon=True)
            _warm_up.start()


def _warm() -> None:
    _strict_decoder()  # a failure is logged once; checks then use Pillow


def _verify_jpeg(src: _Source, max_pixels: int, vendor: str) -> None:
    # Pillow parses the header (size, progressive) without decoding anything.
    im = JpegImagePlugin.JpegImageFile(src.fp())
    try:
        _check_pixels(im.size, max_pixels, "JPEG", vendor)
        w, h = im.size
        progressive = bool(im.info.get("progressive") or im.info.get("progression"))
    finally:
        im.close()
    with src.buffer() as data:
        _jpeg_scans_complete(data, progressive, vendor)
        if progressive and w * h > FULL_DECODE_PIXELS:
            return
        # Pillow is not used to decode: its libjpeg glue discards warnings
        # (JpegDecode.c: an empty output_message, "if (jerr.pub.num_warnings) return
        # BROKEN" commented out), and a scan cut short or made of junk, with EOI after
        # it, only draws the warning "Corrupt JPEG data: premature end of data
        # segment" (the rest is filled in grey). simplejpeg's strict mode raises on
        # it. 1/8 scale (min_factor with a minimum size, else it does not scale):
        # every scan is still Huffman-decoded, the pixel buffer is 64 times smaller;
        # grey output skips the colour conversion, not the decoding of any component.
        decoder = _strict_decoder()
        if decoder is None:  # a broken install: a paid result must not fail on it
            _pillow_decode(src)
            return
        try:
            decoder.decode_jpeg(
                data, colorspace="GRAY", min_height=1, min_width=1, min_factor=8, strict=True
            )
        except ValueError as exc:
            if "subsampling" not in str(exc):
                detail = " ".join(str(exc).split())[:160]
                raise _refuse(f"truncated or corrupt JPEG (libjpeg: {detail})", vendor) from None
            # TurboJPEG's API, which simplejpeg decodes through, cannot classify some
            # samplings libjpeg itself decodes (3x1, 4x2, one per component...: cjpeg
            # writes them): refusing one would lose a valid paid result. Pillow decodes
            # those at 1/8 scale, blind to libjpeg's warnings; the scan walk above
            # still refuses a file cut between scans.
            _pillow_decode(src)


def _pillow_decode(src: _Source) -> None:
    """Decode the JPEG at 1/8 scale with Pillow (errors raise; warnings are unseen)."""
    im = JpegImagePlugin.JpegImageFile(src.fp())
    try:
        w, h = im.size
        im.draft(im.mode, (max(1, w // 8), max(1, h // 8)))
        im.load()
    finally:
        im.close()


def _verify_png(src: _Source, max_pixels: int, vendor: str) -> None:
    head = src.read_at(0, 33)
    if len(head) < 24 or head[12:16] != b"IHDR":
        raise _refuse("corrupt PNG: no IHDR header", vendor)
    w, h = struct.unpack(">II", head[16:24])
    _check_pixels((w, h), max_pixels, "PNG", vendor)
    im = PngImagePlugin.PngImageFile(src.fp())
    try:
        im.verify()  # every chunk's CRC, up to IEND: a cut file fails
    finally:
        im.close()
    # verify() stops at IEND's header without reading its CRC: a file cut inside
    # those last bytes passes it. The complete IEND chunk must be there (trailing
    # bytes after it are tolerated, as decoders do).
    tail_start = max(0, src.size - 4096)
    if _PNG_IEND not in src.read_at(tail_start, src.size - tail_start):
        raise _refuse("truncated PNG: no complete IEND chunk at the end", vendor)


def _verify_webp(src: _Source, max_pixels: int, vendor: str) -> None:
    head = src.read_at(0, _HEAD)
    size = _webp_size(head)
    if size is None:
        raise _refuse("corrupt WebP: unreadable header", vendor)
    _check_pixels(size, max_pixels, "WebP", vendor)
    _webp_structure(src, vendor)
    if size[0] * size[1] > FULL_DECODE_PIXELS:
        return
    im = WebPImagePlugin.WebPImageFile(src.fp())
    try:
        _check_pixels(im.size, max_pixels, "WebP", vendor)
        im.load()
    finally:
        im.close()


_VERIFY = {"jpg": _verify_jpeg, "png": _verify_png, "webp": _verify_webp}
_NAMES = {"jpg": "JPEG", "png": "PNG", "webp": "WebP"}


@contextmanager
def _decode_slot() -> Iterator[None]:
    with _DECODES:
        yield


def check_result_image(
    data_or_path: ResultSource, *, max_bytes: int, max_pixels: int, vendor: str = ""
) -> str:
    """The result's format (``"jpg"`` | ``"png"`` | ``"webp"``), or raise
    :class:`~pipeline.errors.ResultNotImageError` with a one-line reason.

    ``data_or_path`` is the bytes, a path to them (a streamed download) or a seekable
    binary file. Blocking: call it from a worker thread, or use
    :func:`check_result_image_async`. Never warns: Pillow's decompression-bomb
    warnings and errors come out as ``ResultNotImageError``.
    """
    src = _Source(data_or_path)
    try:
        if src.size == 0:
            raise _refuse("empty (0 bytes)", vendor)
        if src.size > max_bytes:
            raise _refuse(f"result larger than {max_bytes} bytes ({src.size})", vendor)
        head = src.read_at(0, _HEAD)
        fmt = _format_of(head)
        if fmt is None:
            raise _refuse(describe_non_image(head), vendor)
        with _decode_slot():
            try:
                _VERIFY[fmt](src, max_pixels, vendor)
            except ResultNotImageError:
                raise
            except (Image.DecompressionBombError, Image.DecompressionBombWarning) as exc:
                raise _refuse(f"{_NAMES[fmt]} decompression bomb ({exc})", vendor) from None
            except (OSError, SyntaxError, ValueError, EOFError, struct.error, MemoryError) as exc:
                detail = " ".join(str(exc).split())[:160] or type(exc).__name__
                raise _refuse(f"truncated or corrupt {_NAMES[fmt]} ({detail})", vendor) from None
        return fmt
    finally:
        src.close()


async def check_result_image_async(
    data_or_path: ResultSource,
    *,
    max_bytes: int,
    max_pixels: int,
    vendor: str = "",
    size: int | None = None,
) -> str:
    """:func:`check_result_image` in a worker thread; at most
    :data:`MAX_CONCURRENT_DECODES` of them per event loop hold a thread at once.
    A small result (in memory, or a file of ``size`` bytes) is checked inline (see
    :mod:`pipeline.offload`)."""
    if isinstance(data_or_path, bytes | bytearray):
        size = len(data_or_path)
    if size is not None and size <= INLINE_BYTES:
        return check_result_image(
            data_or_path, max_bytes=max_bytes, max_pixels=max_pixels, vendor=vendor
        )
    return await anyio.to_thread.run_sync(
        partial(
            check_result_image,
            data_or_path,
            max_bytes=max_bytes,
            max_pixels=max_pixels,
            vendor=vendor,
        ),
        limiter=_LIMITERS.get(),
    )
