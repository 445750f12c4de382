"""Local preflight: inspection, every limit, auto-fix, true-format naming."""

from __future__ import annotations

import io
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline import images
from pipeline.errors import InputProblem, PermanentError
from pipeline.images import (
    ImageInfo,
    check_limits,
    inspect_image,
    prepare_payload,
    sniff_image_format,
)
from pipeline.operations import MB, OPERATIONS, ImageLimits

BEAUTY = OPERATIONS["ailab/face-beauty-pro"].limits
EMOTION = OPERATIONS["ailab/emotion-editor"].limits
SMILE = OPERATIONS["perfectcorp/ai-smile"].limits


@pytest.fixture
def no_heif_plugin(monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow as it is without pillow-heif: HEIC known only by its brand."""
    monkeypatch.setattr(images, "HEIF_DECODER", False)
    monkeypatch.setattr(Image, "ID", [i for i in Image.ID if i != "HEIF"])


def small_limits(**kw: object) -> ImageLimits:
    args: dict[str, object] = {
        "formats": frozenset({"JPEG", "PNG"}),
        "max_bytes": 5 * MB,
        "max_side_exclusive": 4096,
        "label": "test/op",
    }
    args.update(kw)
    return ImageLimits(**args)  # type: ignore[arg-type]


def save(path: Path, im: Image.Image, fmt: str | None = None, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    im.save(path, fmt, **kw)
    return path


def noise(w: int, h: int) -> Image.Image:
    return Image.merge("RGB", [Image.effect_noise((w, h), 80) for _ in range(3)])


def exif_with_orientation(value: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = value
    return exif


def decode(data: bytes) -> Image.Image:
    im = Image.open(io.BytesIO(data))
    im.load()
    return im


def fake_heic(width: int = 4032, height: int = 3024, brand: bytes = b"heic") -> bytes:
    ftyp = b"\x00\x00\x00\x18ftyp" + brand + b"\x00\x00\x00\x00mif1heic"
    ispe_tile = b"\x00\x00\x00\x14ispe\x00\x00\x00\x00" + (512).to_bytes(4, "big") * 2
    ispe_full = (
        b"\x00\x00\x00\x14ispe\x00\x00\x00\x00"
        + width.to_bytes(4, "big")
        + height.to_bytes(4, "big")
    )
    return ftyp + b"\x00\x00\x00\x08meta" + ispe_tile + ispe_full + b"\x00" * 64


def info(**kw: object) -> ImageInfo:
    args: dict[str, object] = {
        "path": Path("p.jpg"),
        "size_bytes": 1000,
        "format": "JPEG",
        "width": 1000,
        "height": 800,
    }
    args.update(kw)
    return ImageInfo(**args)  # type: ignore[arg-type]


# ----------------------------------------------------------------------------- sniff


@pytest.mark.parametrize(
    ("fmt", "expected"), [("JPEG", "jpg"), ("PNG", "png"), ("WEBP", "webp"), ("GIF", None)]
)
def test_sniff_real_encodings(fmt: str, expected: str | None) -> None:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, fmt)
    assert sniff_image_format(buf.getvalue()) == expected


def test_sniff_garbage() -> None:
    assert sniff_image_format(b"") is None
    assert sniff_image_format(b"RIFF\x00\x00\x00\x00WAVE") is None
    assert sniff_image_format(b'{"error": 1}') is None


# --------------------------------------------------------------------------- inspect


def test_inspect_jpeg_reads_header_and_orientation(tmp_path: Path) -> None:
    path = save(tmp_path / "a.jpg", Image.new("RGB", (640, 480)), exif=exif_with_orientation(6))
    got = inspect_image(path)
    assert (got.format, got.width, got.height, got.orientation) == ("JPEG", 640, 480, 6)
    assert got.size_bytes == path.stat().st_size
    assert got.mode == "RGB" and not got.has_alpha and got.decodable
    assert got.wire_format == "JPEG"


def test_inspect_png_alpha_and_webp(tmp_path: Path) -> None:
    png = inspect_image(save(tmp_path / "a.png", Image.new("RGBA", (10, 20))))
    assert (png.format, png.has_alpha, png.orientation) == ("PNG", True, 1)
    webp = inspect_image(save(tmp_path / "a.webp", Image.new("RGB", (10, 20))))
    assert webp.format == "WEBP"


def test_inspect_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "notes.jpg"
    path.write_text("hello")
    got = inspect_image(path)
    assert got.format is None and got.error


@pytest.mark.usefixtures("no_heif_plugin")
def test_inspect_heic_by_magic(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(fake_heic(4032, 3024))
    got = inspect_image(path)
    assert (got.format, got.width, got.height, got.decodable) == ("HEIF", 4032, 3024, False)
    for brand in (b"heix", b"mif1"):
        path.write_bytes(fake_heic(brand=brand))
        assert inspect_image(path).format == "HEIF"


def test_inspect_avif_brand_is_not_heic(tmp_path: Path) -> None:
    path = tmp_path / "x.avif"
    path.write_bytes(b"\x00\x00\x00\x1cftypmif1\x00\x00\x00\x00mif1avifmiaf" + b"\x00" * 32)
    assert inspect_image(path).format != "HEIF"


# ---------------------------------------------------------------------------- limits


def test_limits_message_example() -> None:
    problems = check_limits(info(size_bytes=int(2.4 * MB)), BEAUTY)
    assert problems == ["2.4 MB is over the 2 MB limit of ailab/face-beauty-pro"]


def test_bytes_limit_inclusive_boundary() -> None:
    assert check_limits(info(size_bytes=2 * MB), BEAUTY) == []
    [msg] = check_limits(info(size_bytes=2 * MB + 1), BEAUTY)
    # Never "2.0 MB is over the 2 MB limit": exact bytes when rounding would hide it.
    assert msg == "2,097,153 bytes is over the 2 MB (2,097,152-byte) limit of ailab/face-beauty-pro"


def test_bytes_limit_exclusive_for_perfect_corp() -> None:
    # Smaller than 10 MB (docs/vendors.md "Perfect Corp: image limits").
    assert check_limits(info(size_bytes=10 * MB - 1), SMILE) == []
    [msg] = check_limits(info(size_bytes=10 * MB), SMILE)
    assert "is not under the 10 MB" in msg and "perfectcorp/ai-smile" in msg


def test_format_limit() -> None:
    [msg] = check_limits(info(format="WEBP"), EMOTION)
    assert msg == "WEBP is not accepted by ailab/emotion-editor (it takes JPEG/PNG)"
    assert check_limits(info(format="PNG"), EMOTION) == []
    assert check_limits(info(format="HEIF"), SMILE) == []
    assert check_limits(info(format="HEIF"), BEAUTY) != []


def test_mpo_counts_as_jpeg() -> None:
    assert check_limits(info(format="MPO"), BEAUTY) == []


def test_max_side_exclusive() -> None:
    # "less than 4096x4096 px" (docs/vendors.md "AILab: image limits").
    assert check_limits(info(width=4095, height=4095), EMOTION) == []
    [msg] = check_limits(info(width=4096, height=100), EMOTION)
    assert msg == "4096x100 px: each side must be under 4096 px for ailab/emotion-editor"
    assert check_limits(info(width=100, height=5000), EMOTION) != []


def test_max_long_side_inclusive() -> None:
    # Long side at most 4096 px (docs/vendors.md "Perfect Corp: image limits").
    assert check_limits(info(width=4096, height=3000), SMILE) == []
    [msg] = check_limits(info(width=3000, height=4097), SMILE)
    assert msg == "long side 4097 px is over the 4096 px limit of perfectcorp/ai-smile"


def test_min_side_exclusive() -> None:
    # Face beauty pro: "larger than 48x48" (docs/vendors.md "AILab: image limits").
    assert check_limits(info(width=49, height=49), BEAUTY) == []
    [msg] = check_limits(info(width=48, height=300), BEAUTY)
    assert msg == "48x300 px: each side must be over 48 px for ailab/face-beauty-pro"


def test_several_problems_and_unknown_dimensions() -> None:
    problems = check_limits(info(format="WEBP", size_bytes=3 * MB, width=5000), BEAUTY)
    assert len(problems) == 3
    assert check_limits(info(format="HEIF", width=None, height=None), SMILE) == []
    assert check_limits(info(format=None, error="broken"), SMILE) == [
        "not an image that can be read (broken)"
    ]


# ------------------------------------------------------------------- prepare: as is


def test_valid_jpeg_is_sent_byte_for_byte(tmp_path: Path) -> None:
    path = save(tmp_path / "portrait.jpeg", noise(300, 200), quality=90)
    prepared = prepare_payload(path, BEAUTY, auto_fix=False)
    assert prepared.payload.data == path.read_bytes()
    assert prepared.payload.filename == "portrait.jpg"
    assert prepared.payload.content_type == "image/jpeg"
    assert prepared.changes == [] and prepared.notes == []
    assert prepared.info.format == "JPEG"


def test_png_named_jpg_is_sent_as_png(tmp_path: Path) -> None:
    path = save(tmp_path / "portrait.jpg", Image.new("RGB", (100, 100)), "PNG")
    prepared = prepare_payload(path, EMOTION, auto_fix=False)
    assert prepared.payload.filename == "portrait.png"
    assert prepared.payload.content_type == "image/png"
    assert prepared.payload.data == path.read_bytes()
    assert prepared.notes == ["the file is PNG although its name ends in .jpg: sent as .png"]


def test_jpeg_without_extension_gets_one(tmp_path: Path) -> None:
    path = save(tmp_path / "scan", Image.new("RGB", (100, 100)), "JPEG")
    assert prepare_payload(path, EMOTION, auto_fix=False).payload.filename == "scan.jpg"


def test_unsafe_filename_is_sanitised(tmp_path: Path) -> None:
    path = save(tmp_path / "my photo é.jpg", Image.new("RGB", (100, 100)))
    assert prepare_payload(path, EMOTION, auto_fix=False).payload.filename == "my_photo__.jpg"


def test_orientation_is_not_applied_without_auto_fix(tmp_path: Path) -> None:
    path = save(tmp_path / "a.jpg", noise(300, 200), exif=exif_with_orientation(6))
    prepared = prepare_payload(path, EMOTION, auto_fix=False)
    assert prepared.payload.data == path.read_bytes()
    assert prepared.changes == []


def test_auto_fix_sends_an_in_limit_rotated_image_upright(tmp_path: Path) -> None:
    path = save(tmp_path / "a.jpg", noise(300, 200), exif=exif_with_orientation(6))
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == ["applied EXIF orientation 6"]
    with Image.open(io.BytesIO(prepared.payload.data)) as sent:
        assert sent.size == (200, 300)  # upright: the sides swapped
        assert sent.getexif().get(0x0112, 1) == 1


def test_auto_fix_leaves_an_upright_in_limit_image_alone(tmp_path: Path) -> None:
    path = save(tmp_path / "a.jpg", noise(300, 200))
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.payload.data == path.read_bytes() and prepared.changes == []


def test_mpo_is_sent_as_jpeg(tmp_path: Path) -> None:
    path = tmp_path / "phone.jpg"
    Image.new("RGB", (120, 80), "red").save(
        path, "MPO", save_all=True, append_images=[Image.new("RGB", (60, 40), "blue")]
    )
    prepared = prepare_payload(path, BEAUTY, auto_fix=False)
    assert prepared.info.format == "MPO"
    assert prepared.payload.content_type == "image/jpeg"
    assert prepared.payload.filename == "phone.jpg"
    assert prepared.payload.data == path.read_bytes()


@pytest.mark.usefixtures("no_heif_plugin")
def test_heic_passes_through_for_ai_smile(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.HEIC"
    path.write_bytes(fake_heic(4032, 3024))
    prepared = prepare_payload(path, SMILE, auto_fix=False)
    assert prepared.payload.filename == "IMG_0001.heic"
    assert prepared.payload.content_type == "image/heic"
    assert prepared.payload.data == path.read_bytes()


@pytest.mark.usefixtures("no_heif_plugin")
def test_heic_refused_by_ailab_even_with_auto_fix(tmp_path: Path) -> None:
    path = tmp_path / "IMG_0001.heic"
    path.write_bytes(fake_heic())
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, EMOTION, auto_fix=False)
    assert err.value.code == "PREFLIGHT_FORMAT"
    assert "auto_fix: true" in err.value.message
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, EMOTION, auto_fix=True)
    assert err.value.code == "PREFLIGHT_FORMAT"
    assert "pillow-heif" in err.value.message
    path.write_bytes(fake_heic(5000, 3000))
    with pytest.raises(PermanentError, match="long side 5000 px") as err:
        prepare_payload(path, SMILE, auto_fix=False)
    assert err.value.code == "PREFLIGHT_DIMENSIONS"


# ------------------------------------------------------------------ prepare: refused


@pytest.mark.parametrize(
    ("make", "limits", "code", "needle"),
    [
        (
            lambda p: save(p / "a.webp", Image.new("RGB", (100, 100))),
            EMOTION,
            "PREFLIGHT_FORMAT",
            "WEBP is not accepted by ailab/emotion-editor",
        ),
        (
            lambda p: save(p / "a.jpg", Image.new("RGB", (4096, 50))),
            EMOTION,
            "PREFLIGHT_DIMENSIONS",
            "4096x50 px: each side must be under 4096 px",
        ),
        (
            lambda p: save(p / "a.png", noise(900, 900)),
            small_limits(max_bytes=100_000),
            "PREFLIGHT_FILE_SIZE",
            "MB is over the 97.7 KB limit of test/op",
        ),
    ],
)
def test_breaking_a_limit_without_auto_fix_is_permanent(
    tmp_path: Path,
    make: object,
    limits: ImageLimits,
    code: str,
    needle: str,
) -> None:
    path = make(tmp_path)  # type: ignore[operator]
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, limits, auto_fix=False)
    assert err.value.code == code
    assert err.value.kind == "permanent"
    assert str(path) in err.value.message
    assert needle in err.value.message
    assert "auto_fix: true" in err.value.message
    assert "\n" not in err.value.message


def test_too_small_is_refused_even_with_auto_fix(tmp_path: Path) -> None:
    path = save(tmp_path / "tiny.jpg", Image.new("RGB", (40, 40)))
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, BEAUTY, auto_fix=True)
    assert err.value.code == "PREFLIGHT_TOO_SMALL"
    assert "40x40 px: each side must be over 48 px" in err.value.message
    assert "larger image" in err.value.message


def test_not_an_image(tmp_path: Path) -> None:
    path = tmp_path / "readme.jpg"
    path.write_text("not a picture")
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, EMOTION, auto_fix=True)
    assert err.value.code == "PREFLIGHT_UNREADABLE"
    assert str(path) in err.value.message and "remove it from the inputs" in err.value.message


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(InputProblem) as err:
        prepare_payload(tmp_path / "gone.jpg", EMOTION, auto_fix=False)
    assert err.value.code == "INPUT_MISSING"
    assert err.value.kind == "permanent"
    assert err.value.message.startswith(f"{tmp_path / 'gone.jpg'}: no longer exists")


@pytest.mark.parametrize(("fmt", "name"), [("JPEG", "cut.jpg"), ("PNG", "cut.png")])
@pytest.mark.parametrize("auto_fix", [False, True])
def test_truncated_file_is_unreadable(tmp_path: Path, fmt: str, name: str, auto_fix: bool) -> None:
    buf = io.BytesIO()
    noise(400, 300).save(buf, fmt)
    data = buf.getvalue()
    path = tmp_path / name
    path.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, EMOTION, auto_fix=auto_fix)
    assert err.value.code == "PREFLIGHT_UNREADABLE"
    assert "truncated" in err.value.message


# ----------------------------------------------------------------- prepare: auto-fix


def test_auto_fix_resizes_to_fit_each_side(tmp_path: Path) -> None:
    path = save(tmp_path / "big.jpg", Image.new("RGB", (5000, 3000), "gray"))
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == ["resized 5000x3000 -> 4095x2457"]
    out = decode(prepared.payload.data)
    assert out.format == "JPEG" and out.size == (4095, 2457)
    assert prepared.payload.filename == "big.jpg"
    assert (
        check_limits(inspect_image(_write(tmp_path / "o.jpg", prepared.payload.data)), EMOTION)
        == []
    )


def test_auto_fix_long_side_for_perfect_corp(tmp_path: Path) -> None:
    path = save(tmp_path / "tall.png", Image.new("RGB", (3000, 5000), "gray"))
    prepared = prepare_payload(path, SMILE, auto_fix=True)
    assert prepared.changes == ["resized 3000x5000 -> 2458x4096"]
    out = decode(prepared.payload.data)
    assert out.format == "PNG" and out.size == (2458, 4096)
    assert prepared.payload.content_type == "image/png"


def test_auto_fix_extreme_aspect_ratio_cannot_fit(tmp_path: Path) -> None:
    path = save(tmp_path / "strip.jpg", Image.new("RGB", (10000, 60)))
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, BEAUTY, auto_fix=True)
    assert err.value.code == "PREFLIGHT_DIMENSIONS"
    assert "crop it" in err.value.message


def test_auto_fix_reencodes_webp_as_jpeg(tmp_path: Path) -> None:
    path = save(tmp_path / "a.webp", noise(200, 100))
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == ["re-encoded WEBP as JPEG"]
    assert prepared.payload.filename == "a.jpg"
    assert prepared.payload.content_type == "image/jpeg"
    assert decode(prepared.payload.data).format == "JPEG"


def test_auto_fix_keeps_transparency_as_png(tmp_path: Path) -> None:
    im = Image.new("RGBA", (100, 100), (255, 0, 0, 0))
    im.paste((0, 0, 255, 255), (10, 10, 50, 50))
    prepared = prepare_payload(save(tmp_path / "logo.webp", im), EMOTION, auto_fix=True)
    assert prepared.changes == ["re-encoded WEBP as PNG"]
    out = decode(prepared.payload.data)
    assert out.format == "PNG" and out.mode == "RGBA"
    assert prepared.payload.filename == "logo.png"


def test_auto_fix_opaque_alpha_becomes_jpeg(tmp_path: Path) -> None:
    im = Image.new("RGBA", (100, 100), (10, 200, 10, 255))
    prepared = prepare_payload(save(tmp_path / "a.webp", im, lossless=True), EMOTION, True)
    assert prepared.changes == ["re-encoded WEBP as JPEG"]


def test_auto_fix_transparent_to_jpeg_when_png_not_accepted(tmp_path: Path) -> None:
    limits = small_limits(formats=frozenset({"JPEG"}))
    im = Image.new("RGBA", (60, 60), (0, 0, 0, 0))
    prepared = prepare_payload(save(tmp_path / "a.png", im), limits, auto_fix=True)
    out = decode(prepared.payload.data).convert("RGB")
    assert out.getpixel((30, 30)) == (255, 255, 255)  # transparent -> white, not black


@pytest.mark.parametrize("fmt", ["BMP", "TIFF", "GIF"])
def test_auto_fix_other_formats(tmp_path: Path, fmt: str) -> None:
    path = save(tmp_path / f"a.{fmt.lower()}", Image.new("RGB", (80, 80), "blue"), fmt)
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == [f"re-encoded {fmt} as JPEG"]
    assert decode(prepared.payload.data).size == (80, 80)


def test_auto_fix_animated_gif_uses_first_frame(tmp_path: Path) -> None:
    frames = [Image.new("RGB", (64, 64), c) for c in ("red", "green", "blue")]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:])
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == ["used the first of 3 frames", "re-encoded GIF as JPEG"]
    r, g, b = decode(prepared.payload.data).convert("RGB").getpixel((32, 32))  # type: ignore[misc]
    assert r > 200 and g < 60 and b < 60


def test_auto_fix_applies_exif_orientation_when_reencoding(tmp_path: Path) -> None:
    im = Image.new("RGB", (600, 400), "white")
    im.paste((255, 0, 0), (0, 0, 60, 60))  # red marker top-left as stored
    path = save(tmp_path / "phone.webp", im, exif=exif_with_orientation(6))
    assert inspect_image(path).orientation == 6
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == ["applied EXIF orientation 6", "re-encoded WEBP as JPEG"]
    out = decode(prepared.payload.data).convert("RGB")
    assert out.size == (400, 600)
    # Orientation 6 = rotate 90 degrees clockwise to display: top-left goes top-right.
    r, g, b = out.getpixel((370, 30))  # type: ignore[misc]
    assert r > 200 and g < 80 and b < 80
    assert out.getexif().get(0x0112, 1) == 1


def test_auto_fix_orientation_with_resize_reports_display_sizes(tmp_path: Path) -> None:
    path = save(tmp_path / "big.jpg", Image.new("RGB", (5000, 3000)), exif=exif_with_orientation(6))
    prepared = prepare_payload(path, EMOTION, auto_fix=True)
    assert prepared.changes == ["applied EXIF orientation 6", "resized 3000x5000 -> 2457x4095"]
    assert decode(prepared.payload.data).size == (2457, 4095)


def test_auto_fix_lowers_jpeg_quality_stepwise(tmp_path: Path) -> None:
    path = save(tmp_path / "q.jpg", noise(500, 500), quality=100)
    pixels = decode(path.read_bytes())

    def size_at(quality: int) -> int:
        buf = io.BytesIO()
        pixels.save(buf, "JPEG", quality=quality, optimize=True)
        return buf.tell()

    assert size_at(90) < size_at(95) < path.stat().st_size
    limits = small_limits(max_bytes=size_at(95) - 1)
    prepared = prepare_payload(path, limits, auto_fix=True)
    assert len(prepared.payload.data) <= limits.max_bytes
    assert len(prepared.changes) == 1
    assert prepared.changes[0].startswith("lowered JPEG quality to 90 to fit the ")
    assert decode(prepared.payload.data).size == (500, 500)


def test_auto_fix_scales_down_when_quality_is_not_enough(tmp_path: Path) -> None:
    path = save(tmp_path / "n.jpg", noise(800, 800), quality=100)
    limits = small_limits(max_bytes=40_000)
    prepared = prepare_payload(path, limits, auto_fix=True)
    assert len(prepared.payload.data) <= 40_000
    assert prepared.changes[-1].startswith("scaled down to ")
    assert "at JPEG quality 85" in prepared.changes[-1]
    w, h = decode(prepared.payload.data).size
    assert w == h and w < 800


def test_auto_fix_png_too_big_becomes_jpeg(tmp_path: Path) -> None:
    path = save(tmp_path / "n.png", noise(400, 400))
    limits = small_limits(max_bytes=path.stat().st_size // 2)
    prepared = prepare_payload(path, limits, auto_fix=True)
    assert prepared.changes[0].startswith("re-encoded PNG as JPEG to fit the ")
    assert prepared.payload.content_type == "image/jpeg"
    assert prepared.payload.filename == "n.jpg"
    assert len(prepared.payload.data) <= limits.max_bytes


def test_auto_fix_gives_up_with_file_size_error(tmp_path: Path) -> None:
    path = save(tmp_path / "n.jpg", noise(300, 300), quality=100)
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, small_limits(max_bytes=200), auto_fix=True)
    assert err.value.code == "PREFLIGHT_FILE_SIZE"
    assert "can't get the file under" in err.value.message


def test_exclusive_byte_limit_is_respected_by_auto_fix(tmp_path: Path) -> None:
    path = save(tmp_path / "n.jpg", noise(300, 300), quality=100)
    size = path.stat().st_size
    limits = small_limits(max_bytes=size, max_bytes_inclusive=False)
    prepared = prepare_payload(path, limits, auto_fix=True)
    assert len(prepared.payload.data) < size


def _write(path: Path, data: bytes) -> Path:
    path.write_bytes(data)
    return path


def test_inspect_missing_file_is_permanent(tmp_path: Path) -> None:
    with pytest.raises(InputProblem) as err:
        inspect_image(tmp_path / "gone.jpg")
    assert err.value.code == "INPUT_MISSING"
    assert err.value.kind == "permanent"
    assert "gone.jpg" in err.value.message


# ------------------------------------------------ damaged files, re-compression notes


@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_inspect_reports_a_truncated_file_and_check_limits_lists_it(
    tmp_path: Path, fmt: str
) -> None:
    buf = io.BytesIO()
    noise(400, 300).save(buf, fmt)
    data = buf.getvalue()
    path = _write(tmp_path / f"cut.{fmt.lower()}", data[: len(data) * 2 // 3])
    got = inspect_image(path)
    assert (got.format, got.width, got.height) == (fmt, 400, 300)
    assert got.damaged
    problems = check_limits(got, EMOTION)
    assert len(problems) == 1 and "damaged or truncated" in problems[0]
    whole = inspect_image(_write(tmp_path / f"whole.{fmt.lower()}", data))
    assert whole.damaged is None and check_limits(whole, EMOTION) == []


def test_not_an_image_message_has_no_object_repr(tmp_path: Path) -> None:
    path = _write(tmp_path / "notes.jpg", b"shopping list")
    assert inspect_image(path).error == "not a format Pillow recognises"
    with pytest.raises(PermanentError) as err:
        prepare_payload(path, EMOTION, auto_fix=False)
    assert " at 0x" not in err.value.message and "notes.jpg" in err.value.message


def test_auto_fix_says_it_recompressed_a_file_that_fit_at_best_quality(tmp_path: Path) -> None:
    path = save(tmp_path / "q.jpg", noise(500, 500), quality=100)
    pixels = decode(path.read_bytes())
    buf = io.BytesIO()
    pixels.save(buf, "JPEG", quality=95, optimize=True)
    limits = small_limits(max_bytes=buf.tell() + 10)
    assert path.stat().st_size > limits.max_bytes
    prepared = prepare_payload(path, limits, auto_fix=True)
    assert len(prepared.payload.data) <= limits.max_bytes
    assert len(prepared.changes) == 1
    assert prepared.changes[0].startswith("re-compressed as JPEG at quality 95 to fit the ")
    assert " -> " in prepared.changes[0]


def test_auto_fix_says_it_recompressed_an_oversized_png(tmp_path: Path) -> None:
    # A PNG stored without compression: lossless re-encoding alone makes it fit.
    path = save(
        tmp_path / "flat.png", Image.new("RGB", (600, 600), (200, 30, 30)), compress_level=0
    )
    limits = small_limits(max_bytes=path.stat().st_size // 10)
    prepared = prepare_payload(path, limits, auto_fix=True)
    assert prepared.payload.content_type == "image/png"
    assert len(prepared.changes) == 1
    assert prepared.changes[0].startswith("re-compressed as PNG to fit the ")


# ------------------------------------- one open: header and pixels checked together

_WHOLE: dict[str, bytes] = {}


def _whole(fmt: str) -> bytes:
    if fmt not in _WHOLE:
        buf = io.BytesIO()
        noise(160, 120).save(buf, fmt)
        _WHOLE[fmt] = buf.getvalue()
    return _WHOLE[fmt]


@settings(
    max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(fmt=st.sampled_from(["JPEG", "PNG"]), cut=st.floats(0.0, 1.0), auto_fix=st.booleans())
def test_a_cut_image_is_sent_whole_or_refused_as_unreadable_never_anything_else(
    tmp_path: Path, fmt: str, cut: float, auto_fix: bool
) -> None:
    # prepare_payload checks the header and the pixels from one open (PNG's verify
    # from a second: it must follow the open). Whatever the cut, the input is sent
    # byte for byte or refused with PREFLIGHT_UNREADABLE, and inspect_image (pipeline
    # validate) says the same of it.
    data = _whole(fmt)
    kept = data[: int(len(data) * cut)]
    path = _write(tmp_path / f"cut.{fmt.lower()}", kept)
    seen = inspect_image(path)
    try:
        prepared = prepare_payload(path, EMOTION, auto_fix=auto_fix)
    except PermanentError as exc:
        assert exc.code == "PREFLIGHT_UNREADABLE", exc.message
        assert seen.format is None or seen.damaged
    else:
        assert prepared.payload.data == kept and prepared.changes == []
        assert seen.format == fmt and seen.damaged is None
