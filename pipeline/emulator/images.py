"""Image work of the emulator: what the vendors check, and visibly processed results.

Nothing here knows a vendor's limits or codes: :func:`inspect_image` reports what an
input is, the vendor modules decide what that means. Every ``render_*`` function takes
input bytes, applies a cheap, recognisable effect per operation, stamps a plain
``EMULATED <operation>`` banner and returns JPEG bytes. They are CPU work: call them
through ``asyncio.to_thread``.
"""

from __future__ import annotations

import io
import warnings
from collections.abc import Mapping
from dataclasses import dataclass

from PIL import Image, ImageDraw, ImageEnhance, ImageFilter, ImageFont, ImageOps

__all__ = [
    "ImageInfo",
    "inspect_image",
    "looks_like_heif",
    "render_beauty",
    "render_emotion",
    "render_face_swap",
    "render_smile",
]

# Results are downscaled to this long side: cheap to draw, small to store and send.
MAX_RESULT_SIDE = 1024

# Pillow names multi-picture camera JPEGs "MPO"; the vendors see them as JPEG.
_FORMAT_ALIASES = {"MPO": "JPEG"}

_HEIF_BRANDS = {b"heic", b"heix", b"hevc", b"hevx", b"heim", b"heis", b"mif1", b"msf1"}


@dataclass(frozen=True)
class ImageInfo:
    """What an input is. ``format`` is ``None`` when Pillow cannot identify the bytes."""

    format: str | None
    width: int = 0
    height: int = 0
    decodes: bool = False
    too_many_pixels: bool = False

    @property
    def long_side(self) -> int:
        return max(self.width, self.height)


def looks_like_heif(data: bytes) -> bool:
    """An ISO-BMFF HEIF/HEIC file (Pillow cannot decode it without a plugin)."""
    return len(data) >= 12 and data[4:8] == b"ftyp" and data[8:12] in _HEIF_BRANDS


def inspect_image(data: bytes) -> ImageInfo:
    """Identify the bytes and try a (reduced-size) decode. Never raises."""
    if looks_like_heif(data):
        return ImageInfo(format="HEIF")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            img = Image.open(io.BytesIO(data))
        except Image.DecompressionBombError:
            return ImageInfo(format="UNKNOWN", too_many_pixels=True)
        except (OSError, ValueError, SyntaxError, EOFError):
            return ImageInfo(format=None)
        with img:
            fmt = img.format or "UNKNOWN"
            fmt = _FORMAT_ALIASES.get(fmt, fmt)
            width, height = img.size
            try:
                img.draft("RGB", (min(width, 512), min(height, 512)))
                img.load()
                decodes = True
            except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError):
                decodes = False
    return ImageInfo(format=fmt, width=width, height=height, decodes=decodes)


# --- rendering -------------------------------------------------------------------------


def _load(data: bytes | None) -> Image.Image:
    """Decode to upright RGB no larger than ``MAX_RESULT_SIDE``; a stand-in if impossible."""
    if data is not None:
        try:
            with Image.open(io.BytesIO(data)) as opened:
                opened.draft("RGB", (MAX_RESULT_SIDE, MAX_RESULT_SIDE))
                img = ImageOps.exif_transpose(opened).convert("RGB")
            img.thumbnail((MAX_RESULT_SIDE, MAX_RESULT_SIDE))
            return img
        except (OSError, ValueError, SyntaxError, EOFError):
            pass
    return _stand_in_portrait()


def _stand_in_portrait(width: int = 480, height: int = 600) -> Image.Image:
    """A plain drawn head, for inputs the emulator cannot read (foreign URLs, HEIC)."""
    img = Image.new("RGB", (width, height), (168, 182, 196))
    draw = ImageDraw.Draw(img)
    draw.ellipse(_face_box(width, height), fill=(231, 196, 170))
    draw.rectangle((width * 0.25, height * 0.78, width * 0.75, height), fill=(70, 90, 120))
    return img


def _face_box(width: int, height: int) -> tuple[float, float, float, float]:
    """Where a centred portrait's face usually is."""
    return (width * 0.32, height * 0.16, width * 0.68, height * 0.6)


def _encode(img: Image.Image) -> bytes:
    out = io.BytesIO()
    img.save(out, format="JPEG", quality=85)
    return out.getvalue()


def _font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except (OSError, ImportError, TypeError):  # Pillow built without FreeType
        return ImageFont.load_default()


def _banner(img: Image.Image, title: str, detail: str) -> Image.Image:
    """Stamp a high-contrast ``EMULATED`` banner across the top."""
    width, height = img.size
    bar = max(24, height // 9)
    overlay = Image.new("RGBA", img.size, (0, 0, 0, 0))
    draw = ImageDraw.Draw(overlay)
    draw.rectangle((0, 0, width, bar), fill=(0, 0, 0, 190))
    draw.text((8, 2), f"EMULATED {title}", font=_font(max(10, bar * 9 // 20)), fill=(255, 220, 0))
    draw.text((8, bar * 11 // 20), detail, font=_font(max(8, bar * 6 // 20)), fill=(255, 255, 255))
    return Image.alpha_composite(img.convert("RGBA"), overlay).convert("RGB")


def _tint(img: Image.Image, color: tuple[int, int, int], strength: float) -> Image.Image:
    return Image.blend(img, Image.new("RGB", img.size, color), strength)


def _mouth(img: Image.Image, *, smile: bool, teeth: bool, color: tuple[int, int, int]) -> None:
    """Draw a mouth curve in the usual mouth area of a centred portrait."""
    width, height = img.size
    draw = ImageDraw.Draw(img)
    x0, y0, x1, y1 = width * 0.4, height * 0.4, width * 0.6, height * 0.5
    line = max(2, width // 90)
    if smile:
        if teeth:
            draw.chord((x0, y0, x1, y1), 0, 180, fill=(250, 250, 245), outline=color, width=line)
        else:
            draw.arc((x0, y0, x1, y1), 20, 160, fill=color, width=line)
    else:  # a frown: the upper half of the ellipse, lower down
        draw.arc(
            (x0, y1 - (y1 - y0) * 0.4, x1, y1 + (y1 - y0) * 0.6), 200, 340, fill=color, width=line
        )


# AILab emotion editor codes (docs/vendors.md, "AILab: emotion editor"), for the banner.
_EXPRESSIONS = {
    0: "big laugh", 1: "pouting", 2: "feel sad", 3: "smile",
    10: "dimple smile", 11: "pear dimple smile", 12: "big grin", 13: "standard grin",
    14: "cool pose", 15: "sad", 16: "forced smile", 100: "opening eyes",
}  # fmt: skip


def render_emotion(data: bytes, service_choice: int) -> bytes:
    """AILab emotion editor: a warm tint plus the chosen expression drawn on."""
    img = _tint(_load(data), (255, 170, 60), 0.18)
    width, height = img.size
    red = (200, 30, 40)
    if service_choice == 14:  # cool pose: sunglasses
        draw = ImageDraw.Draw(img)
        y = height * 0.36
        for cx in (width * 0.42, width * 0.58):
            draw.rounded_rectangle(
                (cx - width * 0.07, y - height * 0.03, cx + width * 0.07, y + height * 0.03),
                radius=6,
                fill=(15, 15, 15),
            )
        draw.line((width * 0.42, y, width * 0.58, y), fill=(15, 15, 15), width=max(2, width // 120))
    elif service_choice == 100:  # opening eyes
        draw = ImageDraw.Draw(img)
        r = width * 0.035
        for cx in (width * 0.42, width * 0.58):
            draw.ellipse(
                (cx - r, height * 0.36 - r, cx + r, height * 0.36 + r),
                fill=(255, 255, 255),
                outline=(20, 20, 20),
                width=2,
            )
            draw.ellipse(
                (cx - r / 2, height * 0.36 - r / 2, cx + r / 2, height * 0.36 + r / 2),
                fill=(30, 60, 30),
            )
    else:
        sad = service_choice in (1, 2, 15)
        _mouth(img, smile=not sad, teeth=service_choice in (0, 12, 13), color=red)
    name = _EXPRESSIONS.get(service_choice, "?")
    return _encode(
        _banner(img, "ailab/emotion-editor", f"service_choice={service_choice} ({name})")
    )


def render_face_swap(target: bytes, template: bytes) -> bytes:
    """AILab face swap: the template's face region pasted, mirrored, into the target's."""
    img = _load(target)
    face = _load(template)
    left, top, right, bottom = (int(v) for v in _face_box(*img.size))
    src = _face_box(*face.size)
    size = (max(1, right - left), max(1, bottom - top))
    patch = ImageOps.mirror(face.crop(src).resize(size))
    patch = _tint(patch, (120, 200, 255), 0.15)
    mask = Image.new("L", size, 0)
    ImageDraw.Draw(mask).ellipse((0, 0, size[0] - 1, size[1] - 1), fill=255)
    img.paste(patch, (left, top), mask.filter(ImageFilter.GaussianBlur(max(1, size[0] // 25))))
    return _encode(_banner(img, "ailab/face-swap", "template face pasted into target"))


def render_beauty(data: bytes, params: Mapping[str, int]) -> bytes:
    """AILab Face Beauty Pro: smoothing blurs, whitening brightens, a filter tints."""
    img = _load(data)
    smoothing = params.get("smoothing", 50)
    whitening = params.get("whitening", 50)
    if smoothing:
        img = Image.blend(
            img,
            img.filter(ImageFilter.GaussianBlur(1 + smoothing / 40)),
            min(1.0, smoothing / 150 + 0.1),
        )
    img = ImageEnhance.Brightness(img).enhance(1.0 + whitening / 250)
    filter_type = params.get("filter_type")
    if filter_type == 1:
        img = ImageOps.grayscale(img).convert("RGB")
    elif filter_type is not None:
        hue = (filter_type * 47) % 256
        img = _tint(img, (255 - hue // 3, 120 + hue // 3, 140 + hue // 2), 0.15)
    detail = ",".join(f"{k}={v}" for k, v in sorted(params.items()))
    return _encode(_banner(img, "ailab/face-beauty-pro", detail or "defaults"))


def render_smile(data: bytes | None, expression_type: str, note: str = "") -> bytes:
    """Perfect Corp AI Smile: a cool tint plus an open or closed smile."""
    img = _tint(_load(data), (120, 160, 255), 0.16)
    _mouth(
        img, smile=True, teeth=expression_type == "smile_with_teeth_visible", color=(190, 20, 90)
    )
    detail = expression_type + (f" ({note})" if note else "")
    return _encode(_banner(img, "perfectcorp/ai-smile", detail))
