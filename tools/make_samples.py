#!/usr/bin/env python3
"""Generate the synthetic sample portraits used by ``jobs/demo.yaml``.

Deterministic (fixed seed, Pillow only, no fonts, no network): rerunning it rewrites
the same pictures. The outputs are committed, so the demo works on a fresh checkout
without running this script; run it only to change or regenerate the samples::

    python tools/make_samples.py            # writes jobs/samples/** and jobs/templates/face.jpg
    python tools/make_samples.py --out DIR  # writes DIR/samples/** and DIR/templates/face.jpg

Every face is stylised but laid out like a real head-and-shoulders portrait (one
centred, frontal face filling a good part of the frame), so it fits each vendor's
input rules: JPEG or PNG, well under every size limit, sides between 320 and 800 px.
"""

from __future__ import annotations

import argparse
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFilter

SEED = 20261121
SUPERSAMPLE = 2  # draw at 2x, then downsample: cheap anti-aliasing without extra deps
JPEG_QUALITY = 85
MAX_BYTES = 60 * 1024

RGB = tuple[int, int, int]

SKIN_TONES: list[RGB] = [
    (255, 224, 196),
    (241, 194, 160),
    (224, 172, 128),
    (198, 134, 90),
    (161, 102, 64),
    (112, 70, 44),
]
HAIR_COLOURS: list[RGB] = [
    (30, 22, 18),
    (72, 46, 28),
    (120, 80, 40),
    (196, 154, 92),
    (150, 60, 30),
    (60, 60, 64),
]
IRIS_COLOURS: list[RGB] = [(70, 45, 25), (60, 100, 140), (80, 110, 60), (40, 30, 20)]
CLOTHES: list[RGB] = [
    (40, 70, 120),
    (150, 40, 50),
    (50, 110, 80),
    (90, 90, 100),
    (200, 160, 60),
    (110, 60, 130),
]


@dataclass(frozen=True)
class Sample:
    """One picture: where it goes, its size and its look."""

    relpath: str  # relative to the output root
    size: tuple[int, int]  # width, height
    skin: int  # index into SKIN_TONES
    hair: int  # index into HAIR_COLOURS
    clothes: int  # index into CLOTHES
    hair_style: str  # "short", "long", "bun", "bald"
    background: tuple[RGB, RGB]  # top colour, bottom colour (equal = plain)


SAMPLES: list[Sample] = [
    Sample(
        "samples/studio/ana.jpg", (480, 600), 0, 3, 1, "long", ((214, 222, 232), (150, 164, 186))
    ),
    Sample(
        "samples/studio/ben.png", (400, 500), 3, 0, 0, "short", ((236, 236, 236), (236, 236, 236))
    ),
    Sample("samples/studio/dara.jpg", (640, 800), 5, 0, 4, "bun", ((60, 64, 80), (24, 26, 34))),
    Sample(
        "samples/outdoor/chen.jpg", (512, 640), 1, 0, 2, "short", ((150, 200, 240), (120, 170, 110))
    ),
    Sample(
        "samples/outdoor/eli.png", (320, 400), 2, 4, 5, "long", ((250, 214, 160), (200, 120, 110))
    ),
    Sample(
        "samples/outdoor/farah.jpg", (560, 700), 4, 1, 3, "bald", ((170, 210, 235), (230, 236, 240))
    ),
    # The face that face swap puts onto every input; kept out of the inputs glob.
    Sample("templates/face.jpg", (480, 600), 2, 5, 0, "short", ((225, 225, 215), (190, 190, 175))),
]


def _shade(c: RGB, f: float) -> RGB:
    """Scale a colour: f < 1 darkens, f > 1 lightens (clamped)."""
    return (min(255, int(c[0] * f)), min(255, int(c[1] * f)), min(255, int(c[2] * f)))


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return (
        round(a[0] + (b[0] - a[0]) * t),
        round(a[1] + (b[1] - a[1]) * t),
        round(a[2] + (b[2] - a[2]) * t),
    )


def _background(size: tuple[int, int], top: RGB, bottom: RGB) -> Image.Image:
    w, h = size
    img = Image.new("RGB", size, top)
    if top != bottom:
        draw = ImageDraw.Draw(img)
        for y in range(h):
            draw.line([(0, y), (w, y)], fill=_mix(top, bottom, y / max(1, h - 1)))
    return img


def draw_portrait(sample: Sample, rng: random.Random) -> Image.Image:
    """Draw one head-and-shoulders portrait at the sample's size."""
    s = SUPERSAMPLE
    w, h = sample.size[0] * s, sample.size[1] * s
    img = _background((w, h), *sample.background)
    d = ImageDraw.Draw(img)

    skin = SKIN_TONES[sample.skin]
    skin_dark = _shade(skin, 0.82)
    hair = HAIR_COLOURS[sample.hair]
    cloth = CLOTHES[sample.clothes]
    iris = IRIS_COLOURS[rng.randrange(len(IRIS_COLOURS))]

    # Head geometry, with a little per-face jitter.
    cx = w / 2 + rng.uniform(-0.02, 0.02) * w
    head_w = w * rng.uniform(0.36, 0.42)
    head_h = head_w * rng.uniform(1.25, 1.35)
    top = h * rng.uniform(0.16, 0.2)
    left, right, bottom = cx - head_w / 2, cx + head_w / 2, top + head_h

    # Long hair falls behind the head and shoulders.
    if sample.hair_style == "long":
        d.rounded_rectangle(
            [
                left - head_w * 0.12,
                top + head_h * 0.1,
                right + head_w * 0.12,
                bottom + head_h * 0.45,
            ],
            radius=int(head_w * 0.3),
            fill=hair,
        )

    # Shoulders and neck.
    sh_top = bottom + head_h * 0.12
    d.ellipse([cx - w * 0.6, sh_top, cx + w * 0.6, sh_top + h * 0.75], fill=cloth)
    neck_w = head_w * 0.42
    d.rectangle(
        [cx - neck_w / 2, bottom - head_h * 0.2, cx + neck_w / 2, sh_top + h * 0.04], fill=skin_dark
    )
    # V neckline: skin above the collar line only.
    d.polygon(
        [
            (cx - neck_w / 2, sh_top - h * 0.01),
            (cx + neck_w / 2, sh_top - h * 0.01),
            (cx + neck_w * 0.8, sh_top + h * 0.03),
            (cx, sh_top + h * 0.09),
            (cx - neck_w * 0.8, sh_top + h * 0.03),
        ],
        fill=skin_dark,
    )
    # Collar line.
    d.line(
        [
            (cx - neck_w * 0.8, sh_top + h * 0.03),
            (cx, sh_top + h * 0.09),
            (cx + neck_w * 0.8, sh_top + h * 0.03),
        ],
        fill=_shade(cloth, 0.7),
        width=3 * s,
    )

    # Hair framing the head: drawn behind it, so it shows around the temples.
    if sample.hair_style in ("short", "long", "bun"):
        d.ellipse(
            [left - head_w * 0.06, top - head_h * 0.07, right + head_w * 0.06, top + head_h * 0.72],
            fill=hair,
        )

    # Ears.
    ear_w, ear_h = head_w * 0.12, head_h * 0.18
    ear_y = top + head_h * 0.42
    d.ellipse([left - ear_w * 0.6, ear_y, left + ear_w * 0.4, ear_y + ear_h], fill=skin_dark)
    d.ellipse([right - ear_w * 0.4, ear_y, right + ear_w * 0.6, ear_y + ear_h], fill=skin_dark)

    # Bun sits behind the top of the head.
    if sample.hair_style == "bun":
        bun = head_w * 0.45
        d.ellipse([cx - bun / 2, top - bun * 0.7, cx + bun / 2, top + bun * 0.3], fill=hair)

    # Face.
    d.ellipse([left, top, right, bottom], fill=skin)

    # Hair on top of the head.
    if sample.hair_style in ("short", "long", "bun"):
        d.chord(
            [left - head_w * 0.04, top - head_h * 0.06, right + head_w * 0.04, top + head_h * 0.62],
            180,
            360,
            fill=hair,
        )
        if sample.hair_style == "long":
            # A side parting: a wedge of forehead showing.
            d.pieslice(
                [
                    left + head_w * 0.1,
                    top + head_h * 0.12,
                    right - head_w * 0.1,
                    top + head_h * 0.7,
                ],
                200,
                280,
                fill=skin,
            )
        else:
            d.chord(
                [
                    left + head_w * 0.08,
                    top + head_h * 0.14,
                    right - head_w * 0.08,
                    top + head_h * 0.5,
                ],
                180,
                360,
                fill=skin,
            )
    elif sample.hair_style == "bald":
        # A highlight on the scalp.
        d.ellipse(
            [cx - head_w * 0.2, top + head_h * 0.04, cx + head_w * 0.05, top + head_h * 0.14],
            fill=_shade(skin, 1.12),
        )

    # Eyes.
    eye_y = top + head_h * 0.47
    eye_dx = head_w * 0.21
    eye_w, eye_h = head_w * 0.17, head_h * 0.065
    for ex in (cx - eye_dx, cx + eye_dx):
        d.ellipse(
            [ex - eye_w / 2, eye_y - eye_h / 2, ex + eye_w / 2, eye_y + eye_h / 2],
            fill=(250, 250, 248),
            outline=_shade(skin, 0.55),
            width=max(1, s),
        )
        r = eye_h * 0.48
        d.ellipse([ex - r, eye_y - r, ex + r, eye_y + r], fill=iris)
        r2 = r * 0.5
        d.ellipse([ex - r2, eye_y - r2, ex + r2, eye_y + r2], fill=(12, 10, 10))
        gl = r * 0.28
        d.ellipse(
            [ex + r * 0.2, eye_y - r * 0.55, ex + r * 0.2 + gl, eye_y - r * 0.55 + gl],
            fill=(255, 255, 255),
        )

    # Eyebrows: thick arcs, colour from the hair (darkened for blond and bald).
    brow = _shade(hair, 0.8) if sample.hair_style != "bald" else _shade(skin, 0.4)
    brow_y = eye_y - head_h * 0.1
    lift = rng.uniform(0.02, 0.045) * head_h
    for sign in (-1, 1):
        ex = cx + sign * eye_dx
        d.arc(
            [ex - eye_w * 0.65, brow_y - lift, ex + eye_w * 0.65, brow_y + lift * 2.2],
            200,
            340,
            fill=brow,
            width=int(head_h * 0.03),
        )

    # Nose: a soft shadow line and nostrils.
    nose_top, nose_bot = eye_y + head_h * 0.02, top + head_h * 0.68
    d.line(
        [(cx + head_w * 0.02, nose_top), (cx + head_w * 0.05, nose_bot - head_h * 0.02)],
        fill=_shade(skin, 0.75),
        width=2 * s,
    )
    nw = head_w * 0.14
    d.arc(
        [cx - nw / 2, nose_bot - head_h * 0.05, cx + nw / 2, nose_bot + head_h * 0.01],
        20,
        160,
        fill=_shade(skin, 0.65),
        width=2 * s,
    )

    # Mouth: closed lips with a slight, per-face smile.
    mouth_y = top + head_h * 0.79
    mw = head_w * rng.uniform(0.28, 0.34)
    lip = _mix(skin, (170, 60, 70), 0.55)
    d.chord(
        [cx - mw / 2, mouth_y - head_h * 0.035, cx + mw / 2, mouth_y + head_h * 0.045],
        0,
        180,
        fill=lip,
    )
    d.chord(
        [cx - mw * 0.42, mouth_y - head_h * 0.03, cx + mw * 0.42, mouth_y + head_h * 0.012],
        180,
        360,
        fill=_shade(lip, 0.92),
    )
    d.arc(
        [cx - mw / 2, mouth_y - head_h * 0.03, cx + mw / 2, mouth_y + head_h * 0.015],
        10,
        170,
        fill=_shade(lip, 0.55),
        width=2 * s,
    )

    # Cheeks: a faint blush.
    blush = Image.new("L", (w, h), 0)
    bd = ImageDraw.Draw(blush)
    for sign in (-1, 1):
        bx = cx + sign * head_w * 0.27
        by = top + head_h * 0.64
        bd.ellipse(
            [bx - head_w * 0.08, by - head_h * 0.04, bx + head_w * 0.08, by + head_h * 0.04],
            fill=70,
        )
    blush = blush.filter(ImageFilter.GaussianBlur(head_w * 0.04))
    img = Image.composite(Image.new("RGB", (w, h), (220, 90, 100)), img, blush)

    return img.resize(sample.size, Image.Resampling.LANCZOS)


def save(img: Image.Image, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix.lower() in (".jpg", ".jpeg"):
        img.save(path, "JPEG", quality=JPEG_QUALITY, optimize=True)
    else:
        img.save(path, "PNG", optimize=True)
    size = path.stat().st_size
    if size >= MAX_BYTES:
        raise SystemExit(f"{path}: {size} bytes, over the {MAX_BYTES}-byte budget for samples")


def main(argv: list[str] | None = None) -> int:
    root = Path(__file__).resolve().parent.parent / "jobs"
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument(
        "--out",
        type=Path,
        default=root,
        help=f"folder receiving samples/ and templates/ (default: {root})",
    )
    args = parser.parse_args(argv)
    for i, sample in enumerate(SAMPLES):
        rng = random.Random(SEED * 1000 + i)  # per-picture stream: editing one leaves the rest
        path = args.out / sample.relpath
        save(draw_portrait(sample, rng), path)
        print(f"{path}  {sample.size[0]}x{sample.size[1]}  {path.stat().st_size} bytes")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
