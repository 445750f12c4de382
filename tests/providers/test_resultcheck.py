"""check_result_image: what counts as a result, from bytes, a path or a file."""

from __future__ import annotations

import io
import resource
import struct
import threading
import zlib
from pathlib import Path

import pytest
import simplejpeg  # type: ignore[import-untyped]
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.errors import ResultNotImageError
from pipeline.resultcheck import (
    FULL_DECODE_PIXELS,
    check_result_image,
    check_result_image_async,
    describe_non_image,
)

MAX_BYTES = 64 * 1024 * 1024
MAX_PIXELS = 50_000_000


def encode(fmt: str, size: tuple[int, int] = (120, 90), **kw: object) -> bytes:
    buf = io.BytesIO()
    Image.effect_noise(size, 60).convert("RGB").save(buf, fmt, **kw)
    return buf.getvalue()


def png_chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def png_of_size(w: int, h: int) -> bytes:
    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    rows = zlib.compress(b"\x00" * (1 + 3 * min(w, 64)), 9)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", ihdr)
        + png_chunk(b"IDAT", rows)
        + png_chunk(b"IEND", b"")
    )


def webp_vp8x_header(w: int, h: int) -> bytes:
    """A WebP whose VP8X header claims w x h (the canvas Pillow would allocate)."""
    payload = b"\x00\x00\x00\x00" + (w - 1).to_bytes(3, "little") + (h - 1).to_bytes(3, "little")
    chunk = b"VP8X" + len(payload).to_bytes(4, "little") + payload
    body = b"WEBP" + chunk
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def check(data: bytes, **kw: int) -> str:
    return check_result_image(
        data, max_bytes=kw.get("max_bytes", MAX_BYTES), max_pixels=kw.get("max_pixels", MAX_PIXELS)
    )


def reason(data: bytes, **kw: int) -> str:
    with pytest.raises(ResultNotImageError) as info:
        check(data, **kw)
    err = info.value
    assert err.code == "RESULT_NOT_IMAGE" and err.kind == "permanent"
    assert "\n" not in err.message
    return err.message


def save(img: Image.Image, fmt: str, **kw: object) -> bytes:
    buf = io.BytesIO()
    img.save(buf, fmt, **kw)
    return buf.getvalue()


GOOD: dict[str, bytes] = {
    "jpg": encode("JPEG"),
    "progressive": encode("JPEG", progressive=True),
    "cmyk": save(Image.new("CMYK", (40, 30)), "JPEG"),
    "tiny_jpeg": encode("JPEG", (3, 2)),
    "png": encode("PNG"),
    "png_rgba": save(Image.new("RGBA", (40, 30)), "PNG"),
    "webp": encode("WEBP"),
    "webp_lossless": encode("WEBP", lossless=True),
    "webp_alpha": save(Image.new("RGBA", (40, 30)), "WEBP"),
}
FORMAT = {"jpg": "jpg", "progressive": "jpg", "cmyk": "jpg", "tiny_jpeg": "jpg"}


@pytest.mark.parametrize("name", sorted(GOOD))
def test_good_images(name: str, tmp_path: Path) -> None:
    data = GOOD[name]
    fmt = FORMAT.get(name, name.split("_")[0])
    assert check(data) == fmt
    path = tmp_path / "r.bin"
    path.write_bytes(data)
    assert check_result_image(path, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS) == fmt
    assert check_result_image(str(path), max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS) == fmt
    with path.open("rb") as fh:
        assert check_result_image(fh, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS) == fmt
        assert not fh.closed  # Pillow may close what it gets; the caller's file stays open


def test_trailing_bytes_after_a_complete_jpeg_are_accepted() -> None:
    assert check(GOOD["jpg"] + b"\x00" * 100) == "jpg"


@pytest.mark.parametrize(
    ("data", "words"),
    [
        (b"", "empty"),
        (b"<!DOCTYPE html><html><body>x</body></html>", "HTML page"),
        (b"  <html lang=en>", "HTML page"),
        (b"<script>alert(1)</script>", "script"),
        (b'{"error": "x"}', "JSON"),
        (b"[1, 2, 3]", "JSON"),
        (b"<?xml version='1.0'?><Error/>", "XML"),
        (b"<svg xmlns='http://www.w3.org/2000/svg'/>", "XML/SVG"),
        (b"just words here", "plain text"),
        (b"aGVsbG8gd29ybGQ=", "plain text"),  # base64 that was never decoded
        ("caf\u00e9 cr\u00e8me".encode(), "plain text"),
        (b"GIF89a\x01\x00\x01\x00", "GIF"),
        (b"\x00\x00\x00\x18ftypheic" + b"\x00" * 16, "HEIF"),
        (b"BM" + b"\x00" * 60, "BMP"),
        (b"II*\x00" + b"\x00" * 60, "TIFF"),
        (b"%PDF-1.7\n", "PDF"),
        (b"PK\x03\x04" + b"\x00" * 30, "ZIP"),
        (b"\x1f\x8b\x08\x00" + b"\x00" * 30, "gzip"),
        (bytes(range(256)), "unknown binary"),
    ],
)
def test_not_images(data: bytes, words: str) -> None:
    assert words in reason(data)


@pytest.mark.parametrize("name", ["jpg", "progressive", "png", "webp", "webp_lossless"])
@pytest.mark.parametrize("keep", [0.1, 0.5, 0.9])
def test_truncated(name: str, keep: float) -> None:
    data = GOOD[name]
    words = reason(data[: int(len(data) * keep)])
    assert "truncated" in words or "corrupt" in words


@given(st.sampled_from(sorted(GOOD)), st.floats(min_value=0.0, max_value=1.0))
@settings(max_examples=300, deadline=None)
def test_cut_anywhere_is_refused(name: str, where: float) -> None:
    data = GOOD[name]
    cut = min(len(data) - 1, max(1, int(len(data) * where)))
    with pytest.raises(ResultNotImageError) as info:
        check(data[:cut])
    assert info.value.code == "RESULT_NOT_IMAGE"


def test_truncated_jpeg_even_when_pillow_is_told_to_accept_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from PIL import ImageFile

    monkeypatch.setattr(ImageFile, "LOAD_TRUNCATED_IMAGES", True)
    data = GOOD["jpg"]
    assert "truncated" in reason(data[: len(data) // 2])


def test_corrupt_png_crc() -> None:
    data = bytearray(GOOD["png"])
    data[40] ^= 0xFF  # inside a chunk: its CRC no longer matches
    assert "corrupt" in reason(bytes(data)) or "truncated" in reason(bytes(data))


@pytest.mark.parametrize(
    ("data", "size"),
    [
        (png_of_size(20000, 20000), "20000x20000"),
        (png_of_size(1_000_000, 100), "1000000x100"),
        (webp_vp8x_header(16384, 16384), "16384x16384"),
    ],
)
def test_bombs_refused_from_the_header(data: bytes, size: str) -> None:
    words = reason(data)
    assert size in words and "exceeds the limit of 50000000 pixels" in words


def test_long_thin_png_within_the_cap_is_judged_on_its_chunks() -> None:
    assert check(png_of_size(100_000, 1)) == "png"


def test_jpeg_bomb_refused_before_decoding() -> None:
    # A real 8000x8000 JPEG (64 Mpx) is refused from its header under a 50 Mpx cap,
    # and accepted (decoded at 1/8 scale, in bounded memory) under a larger one.
    buf = io.BytesIO()
    Image.new("L", (8000, 8000)).save(buf, "JPEG", quality=10)
    data = buf.getvalue()
    assert "8000x8000" in reason(data)
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    assert check(data, max_pixels=100_000_000) == "jpg"
    grown_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) / 1024
    assert grown_mb < 40  # a full decode would take 64 MB


def test_pillow_bomb_limit_never_warns() -> None:
    # Above Pillow's own MAX_IMAGE_PIXELS (89 Mpx) it would warn, and the test suite
    # turns warnings into errors: our check passes it without a warning.
    assert check(png_of_size(12000, 8000), max_pixels=200_000_000) == "png"


def test_big_progressive_jpeg_is_checked_by_structure() -> None:
    buf = io.BytesIO()
    Image.new("RGB", (4000, 3200), (10, 20, 30)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    assert FULL_DECODE_PIXELS < 4000 * 3200
    assert check(data) == "jpg"
    assert "truncated" in reason(data[: len(data) // 2])


def test_byte_cap() -> None:
    data = GOOD["png"]
    assert f"larger than {len(data) - 1} bytes" in reason(data, max_bytes=len(data) - 1)
    assert check(data, max_bytes=len(data)) == "png"


@given(st.binary(max_size=2048))
@settings(max_examples=300, deadline=None)
def test_any_bytes_give_a_format_or_a_one_line_reason(data: bytes) -> None:
    try:
        fmt = check(data)
    except ResultNotImageError as exc:
        assert exc.message.startswith("the result is not an acceptable image: ")
        assert "\n" not in exc.message and len(exc.message) < 300
    else:
        assert fmt in ("jpg", "png", "webp")


@given(st.sampled_from(sorted(GOOD)), st.integers(min_value=0), st.integers(0, 255))
@settings(max_examples=200, deadline=None)
def test_damaged_good_images_never_crash(name: str, pos: int, value: int) -> None:
    # One byte changed anywhere: a format or RESULT_NOT_IMAGE, never another error.
    data = bytearray(GOOD[name])
    data[pos % len(data)] = value
    try:
        fmt = check(bytes(data))
    except ResultNotImageError as exc:
        assert exc.code == "RESULT_NOT_IMAGE"
    else:
        assert fmt in ("jpg", "png", "webp")


def test_describe_non_image_cut_utf8() -> None:
    text = ("\u00e9" * 40).encode()[:63]  # a two-byte character cut in half at the end
    assert describe_non_image(text) == "plain text"


async def test_async_variant_and_concurrency() -> None:
    assert await check_result_image_async(GOOD["jpg"], max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS)
    errors: list[BaseException] = []

    def worker() -> None:
        try:
            for _ in range(5):
                check(GOOD["webp"])
                with pytest.raises(ResultNotImageError):
                    check(png_of_size(20000, 20000))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []


# ------------------------------------------- JPEG scans cut short or made of junk


def gradient(size: tuple[int, int]) -> Image.Image:
    return Image.merge(
        "RGB",
        (
            Image.linear_gradient("L").resize(size),
            Image.linear_gradient("L").rotate(90).resize(size),
            Image.new("L", size, 128),
        ),
    )


def noise(size: tuple[int, int]) -> Image.Image:
    return Image.effect_noise(size, 60).convert("RGB")


def exif_and_icc() -> dict[str, object]:
    from PIL import ImageCms

    exif = Image.Exif()
    exif[0x010F] = "Vendor"  # Make
    exif[0x0110] = "Portrait model"  # Model
    icc = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    return {"exif": exif.tobytes(), "icc_profile": icc}


def cmyk_noise(size: tuple[int, int]) -> Image.Image:
    return Image.merge("CMYK", [Image.effect_noise(size, 60) for _ in range(4)])


VALID_JPEGS: dict[str, bytes] = {
    "baseline_noise": save(noise((256, 256)), "JPEG", quality=90),
    "baseline_gradient": save(gradient((256, 256)), "JPEG", quality=90),
    "progressive": save(noise((256, 256)), "JPEG", quality=90, progressive=True),
    "progressive_gradient": save(gradient((256, 256)), "JPEG", progressive=True),
    "optimized": save(noise((256, 256)), "JPEG", quality=90, optimize=True),
    "subsampling_420": save(noise((256, 256)), "JPEG", quality=90, subsampling="4:2:0"),
    "subsampling_422": save(noise((256, 256)), "JPEG", quality=90, subsampling="4:2:2"),
    "subsampling_444": save(noise((256, 256)), "JPEG", quality=90, subsampling="4:4:4"),
    "progressive_444": save(
        noise((256, 256)), "JPEG", quality=90, subsampling="4:4:4", progressive=True
    ),
    "restart_blocks": save(noise((256, 256)), "JPEG", quality=90, restart_marker_blocks=7),
    "restart_rows": save(noise((256, 256)), "JPEG", quality=90, restart_marker_rows=1),
    "progressive_restart": save(
        noise((256, 256)), "JPEG", quality=90, progressive=True, restart_marker_blocks=5
    ),
    "exif_icc": save(noise((256, 256)), "JPEG", quality=90, **exif_and_icc()),
    "grayscale": save(noise((256, 256)).convert("L"), "JPEG", quality=90),
    "grayscale_progressive": save(noise((256, 256)).convert("L"), "JPEG", progressive=True),
    "cmyk": save(cmyk_noise((256, 256)), "JPEG", quality=90),
    "cmyk_progressive": save(cmyk_noise((96, 64)), "JPEG", progressive=True),
    "odd_size": save(noise((257, 93)), "JPEG", quality=90),
    "one_pixel": save(noise((1, 1)), "JPEG"),
    "quality_100": save(noise((64, 64)), "JPEG", quality=100),
    "quality_1": save(noise((64, 64)), "JPEG", quality=1),
    "large_2000x1500": save(noise((2000, 1500)), "JPEG", quality=90),
    "large_progressive": save(gradient((2000, 1500)), "JPEG", progressive=True),
}


def jpeg_scans(data: bytes) -> list[tuple[int, int]]:
    """(start, end) of each scan's entropy-coded data, by walking the segments."""
    scans, pos = [], 2
    while data[pos + 1] != 0xD9:
        length = int.from_bytes(data[pos + 2 : pos + 4], "big")
        pos += 2 + length
        if data[pos - length - 1] == 0xDA:
            end = pos
            while not (data[end] == 0xFF and data[end + 1] not in (0x00, *range(0xD0, 0xD8))):
                end += 1
            scans.append((pos, end))
            pos = end
    return scans


def cut_scan(data: bytes, scan: int, keep: float) -> bytes:
    """The file cut inside scan ``scan`` (a fraction ``keep`` of its data), + EOI."""
    start, end = jpeg_scans(data)[scan]
    return data[: start + int((end - start) * keep)] + b"\xff\xd9"


HTML_502 = (
    b"<html>\r\n<head><title>502 Bad Gateway</title></head>\r\n<body>\r\n"
    b"<center><h1>502 Bad Gateway</h1></center>\r\n<hr><center>nginx</center>\r\n"
    b"</body>\r\n</html>\r\n"
)


@pytest.mark.parametrize("name", sorted(VALID_JPEGS))
def test_every_jpeg_pillow_writes_is_accepted(name: str, tmp_path: Path) -> None:
    data = VALID_JPEGS[name]
    assert check(data) == "jpg"
    path = tmp_path / "r.jpg"
    path.write_bytes(data)  # a path is mapped, not read: the same verdict
    assert check_result_image(path, max_bytes=MAX_BYTES, max_pixels=MAX_PIXELS) == "jpg"


def test_the_structure_walk_sees_the_scans_pillow_writes() -> None:
    assert len(jpeg_scans(VALID_JPEGS["baseline_noise"])) == 1
    assert len(jpeg_scans(VALID_JPEGS["progressive"])) == 10  # libjpeg's default script


@pytest.mark.parametrize(
    "name",
    [
        "baseline_noise",
        "baseline_gradient",
        "progressive",
        "optimized",
        "subsampling_420",
        "subsampling_444",
        "restart_blocks",
        "grayscale",
        "cmyk",
        "large_2000x1500",
    ],
)
def test_scan_cut_to_a_quarter_with_eoi_appended_is_refused(name: str) -> None:
    # libjpeg only warns ("premature end of data segment") and fills the rest with
    # grey; Pillow ignores the warning, so this passed before.
    data = VALID_JPEGS[name]
    last = len(jpeg_scans(data)) - 1
    words = reason(cut_scan(data, last, 0.25))
    assert words.startswith("the result is not an acceptable image: truncated or corrupt JPEG")
    assert "premature end of data segment" in words


@pytest.mark.parametrize(
    "name", ["baseline_noise", "progressive", "subsampling_444", "grayscale", "large_2000x1500"]
)
def test_html_error_page_as_scan_data_is_refused(name: str) -> None:
    data = VALID_JPEGS[name]
    start, _ = jpeg_scans(data)[0]
    words = reason(data[:start] + HTML_502 + b"\xff\xd9")
    # libjpeg's warning, or (progressive) the scans that never came after the junk
    assert words.startswith("the result is not an acceptable image: truncated")


@pytest.mark.parametrize("name", ["progressive", "progressive_444", "grayscale_progressive"])
def test_progressive_jpeg_cut_between_two_scans_with_eoi_is_refused(name: str) -> None:
    # Every scan complete, so libjpeg decodes without a warning: the coarse image the
    # first scans give. The scan headers tell that coefficients were never sent.
    data = VALID_JPEGS[name]
    scans = jpeg_scans(data)
    for _, end in scans[:-1]:
        words = reason(data[:end] + b"\xff\xd9")
        assert "truncated JPEG: its scans end before coding all of component(s)" in words


def test_big_progressive_jpeg_cut_between_scans_is_refused_undecoded() -> None:
    buf = io.BytesIO()
    gradient((4000, 3200)).save(buf, "JPEG", progressive=True)
    data = buf.getvalue()
    assert FULL_DECODE_PIXELS < 4000 * 3200
    assert check(data) == "jpg"
    _, end = jpeg_scans(data)[5]
    assert "truncated JPEG: its scans end before" in reason(data[:end] + b"\xff\xd9")


SEARCHED = sorted(set(VALID_JPEGS) - {"large_2000x1500", "large_progressive"})


@given(st.sampled_from(SEARCHED), st.data())
@settings(max_examples=400, deadline=None)
def test_any_cut_in_the_scan_data_with_eoi_appended_is_refused(
    name: str, draw: st.DataObject
) -> None:
    data = VALID_JPEGS[name]
    scans = jpeg_scans(data)
    scan = draw.draw(st.integers(0, len(scans) - 1), label="scan")
    start, end = scans[scan]
    # Any cut from the scan's first byte to its last one removed (the whole scan
    # kept is the valid file itself, or a cut between two scans).
    cut = draw.draw(st.integers(start, end - 1), label="cut")
    with pytest.raises(ResultNotImageError) as info:
        check(data[:cut] + b"\xff\xd9")
    assert "truncated" in info.value.message and "\n" not in info.value.message


@given(st.sampled_from(SEARCHED), st.data())
@settings(max_examples=400, deadline=None)
def test_a_corrupt_byte_in_the_scan_data_is_refused_unless_it_is_still_a_valid_stream(
    name: str, draw: st.DataObject
) -> None:
    data = VALID_JPEGS[name]
    start, end = draw.draw(st.sampled_from(jpeg_scans(data)), label="scan")
    pos = draw.draw(st.integers(start, end - 1), label="pos")
    value = draw.draw(st.integers(0, 255).filter(lambda v: v != data[pos]), label="value")
    damaged = data[:pos] + bytes([value]) + data[pos + 1 :]
    try:
        simplejpeg.decode_jpeg(damaged, colorspace="GRAY", strict=True)  # full scale
        clean = True
    except ValueError:
        clean = False
    # A stuffed FF (FF 00) changed to another byte leaves plain data ("X 00"); an FF
    # written makes a marker only if the first byte after it that is not FF (fill
    # bytes, "FF FF 00" is still a stuffed FF) is not 00.
    after = pos + 1
    while after < len(damaged) - 1 and damaged[after] == 0xFF:
        after += 1
    makes_marker = value == 0xFF and damaged[after] != 0x00
    try:
        check(damaged)
    except ResultNotImageError as exc:
        assert exc.message.startswith("the result is not an acceptable image: ")
        assert "\n" not in exc.message
        # Refused exactly when a full-scale decode has libjpeg complain (the 1/8
        # scale check is as strict), or when the scans no longer code every
        # coefficient (a progressive scan header hit).
        assert not clean or "its scans end before" in exc.message
    else:
        # Accepted: the changed bits still form Huffman codes that decode to exactly
        # the frame's number of blocks, up to EOI, so libjpeg at full scale decodes it
        # without any warning. JPEG has no checksum: such a file is a well-formed
        # JPEG whose pixels differ, indistinguishable from a real image by any format
        # check. A byte that made (or unmade) a marker never gets this far.
        assert clean
        assert not makes_marker


# Made by libjpeg's own cjpeg (`cjpeg -sample 3x1`, `-sample 2x2,2x1,1x1`) from a 48x40
# gradient: valid files that libjpeg decodes, whose sampling TurboJPEG's API (and so
# simplejpeg) cannot classify. Pillow cannot write such samplings.
ODD_SAMPLINGS = sorted((Path(__file__).parent / "data").glob("sampling_*.jpg"))


@pytest.mark.parametrize("path", ODD_SAMPLINGS, ids=lambda p: p.stem)
def test_a_valid_jpeg_with_a_sampling_turbojpeg_cannot_name_is_accepted(path: Path) -> None:
    # The defect: "Could not determine subsampling level" from TurboJPEG's header read
    # refused such a file as corrupt: a paid, valid result lost (RESULT_NOT_IMAGE).
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as im:
        im.load()  # libjpeg decodes it
    assert check(data) == "jpg"
    assert check_result_image(str(path), max_bytes=10**8, max_pixels=10**8) == "jpg"


@pytest.mark.parametrize("path", ODD_SAMPLINGS, ids=lambda p: p.stem)
def test_a_jpeg_with_such_a_sampling_is_still_refused_when_cut(path: Path) -> None:
    data = path.read_bytes()
    assert "truncated" in reason(data[: len(data) // 2])
