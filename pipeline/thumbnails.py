"""Small JPEG thumbnails of inputs and results, made once and kept in ``<output>/.thumbs/``.

The HTML report shows a before/after gallery. Its thumbnails are a cache inside the
output folder, so the folder can be moved with its report, and each is made once per
result, never per run: a nightly rerun over a million finished items decodes nothing.

Cache contract:

- A thumbnail's name is derived from a *cache key* alone (:func:`input_cache_key`,
  :func:`result_cache_key`), and a thumbnail that exists is trusted: no decode.
  A result's key is its item key (the SHA-256 of the input's content, the operation
  and its params, :mod:`pipeline.identity`) and path: a paid result is never
  replaced, so the result file is not even stat'ed. An input's key is its path,
  size and ``mtime_ns`` (one ``stat``; inputs live outside the output folder and
  can change), shared by every variant of that input. Without an item key a result
  is keyed the same way as an input.
- Making one is bounded in memory: JPEG sources are decoded at a reduced DCT scale
  (``Image.draft``), sources over :data:`MAX_SOURCE_PIXELS` are refused before they
  are decoded, and only regular files are opened (a FIFO planted as an input is never
  waited on).
- A source that cannot be read or decoded gives no thumbnail (``None``); that is not
  cached, so an input on a share that was not mounted gets one on the next run.
- Files are written with :func:`pipeline.outputs.atomic_write_bytes`, so a crash never
  leaves half a thumbnail under its final name.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
import warnings
from collections.abc import Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from PIL import Image

from pipeline.outputs import atomic_write_bytes

__all__ = [
    "DEFAULT_SIZE",
    "MAX_SOURCE_PIXELS",
    "THUMBS_DIR",
    "ThumbRequest",
    "ThumbnailCache",
    "ThumbnailError",
    "card_requests",
    "input_cache_key",
    "render_thumbnail",
    "result_cache_key",
    "thumb_relpath",
]

THUMBS_DIR = ".thumbs"
DEFAULT_SIZE = 160
# Above this a source is not thumbnailed: PNG and WebP cannot be decoded at a reduced
# scale, so this bounds the memory one thumbnail can take (about 4 bytes per pixel).
MAX_SOURCE_PIXELS = 50_000_000
JPEG_QUALITY = 80
# EXIF orientation -> the transpose that makes the image upright (the same table as
# ImageOps.exif_transpose, applied to the small copy instead of the full image).
_TRANSPOSE: dict[int, Image.Transpose] = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}
# Making thumbnails is mostly waiting for decodes (Pillow releases the GIL) and for
# the fsyncs of atomic writes, so a few threads help even on two cores.
DEFAULT_WORKERS = 4


class ThumbnailError(Exception):
    """A source could not be turned into a thumbnail (not a file, not an image, too big)."""


@dataclass(frozen=True)
class ThumbRequest:
    """One thumbnail wanted: its cache key and the image file it is made from."""

    cache_key: str
    source: Path


def input_cache_key(source: Path) -> str | None:
    """Cache key of an input's thumbnail; ``None`` if the source can't be stat'ed.

    Inputs live outside the output folder and may be edited in place, so their path,
    size and ``mtime_ns`` name the pixels (one ``stat``). Every variant of one input
    shares the thumbnail.
    """
    return _stat_key("input", source)


def result_cache_key(item_key: str | None, output_rel: str, source: Path) -> str | None:
    """Cache key of a result's thumbnail; ``None`` if the source can't even be stat'ed.

    A succeeded item's result is never replaced by another image (a paid result is
    never redone), so ``(item key, result path)`` identifies its pixels.
    """
    if item_key:
        return f"result\0{item_key}\0{output_rel}"
    return _stat_key("result", source)


def _stat_key(kind: str, source: Path) -> str | None:
    try:
        st = source.stat()
    except (OSError, ValueError):
        return None
    return f"{kind}\0{source}\0{st.st_size}\0{st.st_mtime_ns}"


def card_requests(
    input_path: Path | None, output_dir: Path, output_rel: str | None, item_key: str | None
) -> tuple[ThumbRequest | None, ThumbRequest | None]:
    """The two thumbnails of a gallery card: its input's and its result's (None where
    there is no such file, or its key can't be made). One ``stat`` of the input."""
    wanted_input = wanted_result = None
    if input_path is not None:
        key = input_cache_key(input_path)
        if key is not None:
            wanted_input = ThumbRequest(key, input_path)
    if output_rel:
        source = output_dir / output_rel
        key = result_cache_key(item_key, output_rel, source)
        if key is not None:
            wanted_result = ThumbRequest(key, source)
    return wanted_input, wanted_result


def thumb_relpath(cache_key: str, size: int = DEFAULT_SIZE) -> str:
    """Where the thumbnail for ``cache_key`` lives, relative to the output folder.

    Sharded by the first two hex digits so no folder holds millions of entries.
    """
    digest = hashlib.sha256(cache_key.encode("utf-8", "surrogatepass")).hexdigest()[:40]
    return f"{THUMBS_DIR}/{digest[:2]}/{digest}-{size}.jpg"


def render_thumbnail(source: Path, size: int = DEFAULT_SIZE) -> bytes:
    """JPEG bytes of ``source`` fitted into ``size`` x ``size``, upright.

    Raises :class:`ThumbnailError` for anything that is not a regular image file
    within :data:`MAX_SOURCE_PIXELS`.
    """
    try:
        # O_NONBLOCK: opening a FIFO for reading would otherwise wait for a writer.
        fd = os.open(source, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except (OSError, ValueError) as exc:
        raise ThumbnailError(f"{source}: cannot open ({exc})") from None
    with os.fdopen(fd, "rb") as handle:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise ThumbnailError(f"{source}: not a regular file")
        try:
            return _render(handle, size)
        except ThumbnailError:
            raise
        # Pillow's format plugins raise many types for hostile files (OSError,
        # SyntaxError, struct.error, ValueError, EOFError, DecompressionBombError...);
        # a thumbnail is best-effort, so any of them means "no thumbnail".
        except Exception as exc:
            raise ThumbnailError(f"{source}: not a readable image ({type(exc).__name__})") from None


def _render(handle: io.BufferedReader, size: int) -> bytes:
    with warnings.catch_warnings():
        # Our own pixel cap below is stricter; Pillow's bomb warning must not escape
        # to callers running with warnings as errors.
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        with Image.open(handle) as im:
            width, height = im.size
            if width * height > MAX_SOURCE_PIXELS:
                raise ThumbnailError(f"{width}x{height} is too large to thumbnail")
            im.draft("RGB", (size, size))  # JPEG only: decode at 1/2..1/8 scale
            orientation = im.getexif().get(0x0112, 1)
            im.thumbnail((size, size), Image.Resampling.BILINEAR, reducing_gap=2.0)
            small = _to_rgb(im)
    method = _TRANSPOSE.get(orientation) if isinstance(orientation, int) else None
    if method is not None:
        small = small.transpose(method)
    out = io.BytesIO()
    small.save(out, format="JPEG", quality=JPEG_QUALITY)
    return out.getvalue()


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("RGBA", "LA", "PA") or (im.mode == "P" and "transparency" in im.info):
        rgba = im.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return im.convert("RGB")


class ThumbnailCache:
    """The thumbnails of one output folder (see the module docstring for the contract)."""

    def __init__(self, output_dir: Path, size: int = DEFAULT_SIZE) -> None:
        self.output_dir = output_dir
        self.size = size
        self.made = 0  # thumbnails rendered by this instance (the rest came from the cache)
        self.failed = 0

    def relpath(self, cache_key: str) -> str:
        return thumb_relpath(cache_key, self.size)

    def ensure(
        self, requests: Iterable[ThumbRequest], *, workers: int = DEFAULT_WORKERS
    ) -> dict[str, str | None]:
        """Make the missing thumbnails; map each cache key to its relative path or None.

        A thumbnail already on disk is trusted as it is (one ``stat`` of the thumbnail
        file, none of its source).
        """
        found: dict[str, str | None] = {}
        missing: dict[str, Path] = {}
        for req in requests:
            if req.cache_key in found or req.cache_key in missing:
                continue
            rel = self.relpath(req.cache_key)
            path = self.output_dir / rel
            if os.path.isfile(path) and os.path.getsize(path) > 0:  # a crash may leave 0 B
                found[req.cache_key] = rel
            else:
                missing[req.cache_key] = req.source
        if missing:
            found.update(self._make(missing, workers))
        return found

    def _make(self, missing: Mapping[str, Path], workers: int) -> dict[str, str | None]:
        def one(item: tuple[str, Path]) -> tuple[str, str | None]:
            key, source = item
            try:
                data = render_thumbnail(source, self.size)
            except ThumbnailError:
                return key, None
            rel = self.relpath(key)
            try:
                # A cache: made again if lost, so not worth an fsync per thumbnail.
                atomic_write_bytes(self.output_dir / rel, data, root=self.output_dir, durable=False)
            except OSError:
                return key, None
            return key, rel

        if workers <= 1 or len(missing) == 1:
            results = [one(item) for item in missing.items()]
        else:
            with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="thumb") as pool:
                results = list(pool.map(one, missing.items()))
        out: dict[str, str | None] = {}
        for key, rel in results:
            out[key] = rel
            if rel is None:
                self.failed += 1
            else:
                self.made += 1
        return out
