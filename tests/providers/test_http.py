"""Shared wire helpers: headers, Retry-After, base64, sniffing, redaction, downloads."""

from __future__ import annotations

import base64
import email.utils

import pytest

from pipeline.errors import (
    PermanentError,
    RateLimitedError,
    RetryableError,
    VendorError,
)
from pipeline.providers import http

from ._server import JPEG, PNG


def test_header_lookup_is_case_insensitive() -> None:
    headers = {"X-Request-Id": "abc"}
    assert http.header(headers, "x-request-id") == "abc"
    assert http.header(headers, "X-Request-Id") == "abc"
    assert http.header(headers, "missing") is None


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (b'{"a": 1}', {"a": 1}),
        (b"[1, 2]", None),  # JSON, but not an object
        (b'"text"', None),
        (b"<html><body>502 Bad Gateway</body></html>", None),
        (b'{"request_id": "r", "data": {"ima', None),  # truncated
        (b"", None),
        (b"\xff\xfe\x00garbage", None),
    ],
)
def test_parse_json_object(body: bytes, expected: object) -> None:
    assert http.parse_json_object(body) == expected


def test_parse_json_object_keeps_big_ints_exact() -> None:
    doc = http.parse_json_object(b'{"id": 13105541279084536123}')
    assert doc == {"id": 13105541279084536123}


@pytest.mark.parametrize(
    ("value", "expected"),
    [("7", 7.0), (" 2.5 ", 2.5), ("-3", 0.0), ("soon", None), ("nan", None), ("inf", None)],
)
def test_retry_after_seconds(value: str, expected: float | None) -> None:
    assert http.parse_retry_after({"Retry-After": value}) == expected


def test_retry_after_http_date() -> None:
    now = 1_700_000_000.0
    date = email.utils.formatdate(now + 30, usegmt=True)
    assert http.parse_retry_after({"retry-after": date}, now=now) == pytest.approx(30.0)
    assert http.parse_retry_after({}) is None


@pytest.mark.parametrize(
    "text",
    [
        base64.b64encode(JPEG).decode(),
        "data:image/jpeg;base64," + base64.b64encode(JPEG).decode(),  # Q6 prefix
        "DATA:image/png;charset=x;base64," + base64.b64encode(JPEG).decode(),
        base64.b64encode(JPEG).decode().rstrip("="),  # missing padding
        "\n".join(base64.encodebytes(JPEG).decode().split()),  # MIME line breaks
        base64.urlsafe_b64encode(JPEG).decode(),
    ],
)
def test_decode_base64_image_variants(text: str) -> None:
    assert http.decode_base64_image(text) == JPEG


@pytest.mark.parametrize("text", ["", "   ", "not base64 at all!", "data:image/png;base64,"])
def test_decode_base64_image_rejects(text: str) -> None:
    assert http.decode_base64_image(text) is None


def test_sniff_image_type() -> None:
    assert http.sniff_image_type(JPEG) == "image/jpeg"
    assert http.sniff_image_type(PNG) == "image/png"
    assert http.sniff_image_type(b"RIFF\x00\x00\x00\x00WEBPVP8 ") == "image/webp"
    assert http.sniff_image_type(b"\x00\x00\x00\x18ftypheic") == "image/heic"
    assert http.sniff_image_type(b"GIF89a...") == "image/gif"
    assert http.sniff_image_type(b"<html>") is None


def test_safe_url_drops_query_and_userinfo() -> None:
    url = "https://user:pw@yce-us.s3.amazonaws.com/demo/ttl30/x.jpg?X-Amz-Signature=abc#f"
    assert http.safe_url(url) == "https://yce-us.s3.amazonaws.com/demo/ttl30/x.jpg"


def test_redact() -> None:
    text = "key sk-1 at https://h/p?sig=abc&x=1 said no"
    assert http.redact(text, "sk-1") == "key *** at https://h/p?… said no"
    assert http.redact("plain", None) == "plain"


def test_redact_error_in_place() -> None:
    err = VendorError("This API key sk-1 is not recognized", code="sk-1", vendor="v")
    assert http.redact_error(err, "sk-1") is err
    assert "sk-1" not in str(err)
    assert "sk-1" not in repr(err)
    assert err.args == (err.message,)


def test_join_url() -> None:
    assert http.join_url("http://h:1/", "/a?b=c") == "http://h:1/a?b=c"
    assert http.join_url("http://h:1/prefix", "a") == "http://h:1/prefix/a"


def test_clip_and_excerpt() -> None:
    assert http.clip("a\n  b") == "a b"
    assert len(http.clip("x" * 1000)) == 300
    assert http.body_excerpt(b"") == "<empty body>"
    assert http.body_excerpt(b"<html>\n<h1>502</h1>") == "<html> <h1>502</h1>"


# ---------------------------------------------------------------------- downloads

URL = "https://ailab-outputs.oss-accelerate.aliyuncs.com/r/x.jpg?Expires=1&Signature=s3cr3t"


@pytest.mark.parametrize("status", [200, 203, 206])
def test_download_2xx_goes_on(status: int) -> None:
    # The content is judged by pipeline.resultcheck, not by the status or its type.
    assert http.parse_download(status, {"Content-Type": "text/html"}, b"", url=URL, vendor="a") is None


@pytest.mark.parametrize("status", [403, 404, 410])
def test_download_expired(status: int) -> None:
    with pytest.raises(PermanentError) as info:
        http.parse_download(status, {}, b"<Error>AccessDenied</Error>", url=URL, vendor="ailab")
    assert info.value.code == "RESULT_URL_EXPIRED"
    assert info.value.http_status == status
    assert "s3cr3t" not in str(info.value)  # the signature stays out of messages


@pytest.mark.parametrize("status", [500, 502, 503, 504, 408])
def test_download_retryable(status: int) -> None:
    with pytest.raises(RetryableError) as info:
        http.parse_download(status, {}, b"busy", url=URL, vendor="ailab")
    assert info.value.code == f"HTTP_{status}"
    assert not isinstance(info.value, RateLimitedError)


def test_download_429_is_rate_limited() -> None:
    with pytest.raises(RateLimitedError) as info:
        http.parse_download(429, {"Retry-After": "4"}, b"", url=URL, vendor="perfectcorp")
    assert info.value.retry_after == 4.0


def test_download_other_4xx_is_permanent() -> None:
    with pytest.raises(PermanentError) as info:
        http.parse_download(400, {}, b"bad", url=URL, vendor="ailab")
    assert info.value.code == "HTTP_400"
