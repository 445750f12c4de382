"""report.html as a person sees it (headless Chromium), its escaping, its size bounds,
the per-run archive under reports/, and the thumbnail cache behind its gallery."""

from __future__ import annotations

import html
import io
import json
import os
import re
import shutil
import tempfile
import zlib
from collections import Counter
from collections.abc import Callable, Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any

import anyio
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.htmlreport import (
    EXAMPLES_PER_CODE,
    GALLERY_PAGE_SIZE,
    MAX_CODE_GROUPS,
    _Text,
    build_html_for,
    explain_code,
    iter_results,
    outcome_text,
    write_html_report,
)
from pipeline.manifest import load_manifest
from pipeline.providers.classify import (
    AILAB_FATAL_CODES,
    AILAB_PERMANENT_CODES,
    AILAB_RETRYABLE_CODES,
    PERFECTCORP_ENGINE_PERMANENT_CODES,
    PERFECTCORP_ENGINE_RETRYABLE_CODES,
    PERFECTCORP_FATAL_CODES,
    PERFECTCORP_PERMANENT_CODES,
    PERFECTCORP_RETRYABLE_CODES,
)
from pipeline.thumbnails import (
    MAX_SOURCE_PIXELS,
    ThumbnailCache,
    ThumbnailError,
    ThumbRequest,
    render_thumbnail,
)
from tests.conftest import AILAB_KEY, fast_config, make_portrait

pytestmark = pytest.mark.timeout(90)

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
needs_chromium = pytest.mark.skipif(
    CHROMIUM is None,
    reason="Debian's chromium is not installed (apt-get install chromium; .ci/run installs it)",
)

HOSTILE_NAME = "<script>alert(1)<,script>.jpg"
OPS = [
    {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}},
    {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
]

# Injected into a copy of the page: after load, how many images decoded, and the text
# as rendered (innerText skips what CSS hides). Every <img> is made eager first so
# lazy loading cannot hide a broken thumbnail.
PROBE = """<script id="probe">
document.addEventListener('DOMContentLoaded', () => {
  for (const img of document.images) img.loading = 'eager';
});
window.addEventListener('load', () => {
  const imgs = [...document.images];
  document.body.dataset.images = imgs.length;
  document.body.dataset.loaded = imgs.filter(i => i.complete && i.naturalWidth > 0).length;
  const pre = document.createElement('pre');
  pre.id = 'probe-text';
  pre.textContent = document.body.innerText;
  document.body.appendChild(pre);
});
</script>"""


async def _chromium_view(page: Path, profile: Path) -> tuple[dict[str, str], str, str]:
    """Open ``page`` in headless Chromium; (body data attributes, rendered text, DOM)."""
    assert CHROMIUM is not None
    html_text = page.read_text(encoding="utf-8")
    # The page forbids scripts (CSP); let only the probe run, everything else unchanged.
    assert "script-src 'none'" in html_text
    probe_page = page.with_name(f"_probe_{page.name}")
    probe_page.write_text(
        html_text.replace("script-src 'none'", "script-src 'unsafe-inline'").replace(
            "</body>", PROBE + "</body>"
        ),
        encoding="utf-8",
    )
    command = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-dev-shm-usage",
        "--no-first-run",
        f"--user-data-dir={profile}",
        "--window-size=1280,900",
        "--dump-dom",
        probe_page.as_uri(),
    ]
    with anyio.fail_after(60):
        done = await anyio.run_process(command, check=False)
    probe_page.unlink()
    dom = done.stdout.decode("utf-8")
    assert done.returncode == 0, done.stderr.decode(errors="replace")[-2000:]
    body = re.search(r"<body([^>]*)>", dom)
    assert body is not None, dom[:500]
    attrs = dict(re.findall(r'data-([a-z-]+)="([^"]*)"', body.group(1)))
    text = re.search(r'<pre id="probe-text">(.*?)</pre>', dom, re.S)
    assert text is not None, dom[-2000:]
    return attrs, html.unescape(text.group(1)), dom


def _table_rows(text: str, first_label: str, last_label: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    start = next(i for i, x in enumerate(lines) if x.startswith(first_label + "\t"))
    rows: dict[str, list[str]] = {}
    for line in lines[start:]:
        label, *cells = line.split("\t")
        rows[label] = cells
        if label == last_label:
            break
    return rows


async def _run(manifest_path: Path, emu: RunningEmulator) -> tuple[dict[str, Any], Path]:
    manifest = load_manifest(manifest_path)
    result = await run_job(manifest, fast_config(emu.base_url), RunOptions(quiet=True))
    return result.report, manifest.output


def _thumb_files(out: Path) -> dict[str, int]:
    return {str(p.relative_to(out)): p.stat().st_mtime_ns for p in (out / ".thumbs").rglob("*.jpg")}


@needs_chromium
async def test_the_page_shows_counts_errors_and_loaded_thumbnails_in_chromium(
    tmp_path: Path,
    emulator_factory: Callable[..., Any],
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    emu = await emulator_factory(permanent_error_rate=0.3, seed=5)
    portraits(6)
    (tmp_path / "in" / "b" / HOSTILE_NAME).write_bytes(b"this is a text file, not a photo")
    report, out = await _run(write_manifest(OPS, inputs=["in/**/*.jpg", "in/**/*.png"]), emu)
    lines = list(iter_results(out / "results.jsonl"))
    statuses = Counter(x["status"] for x in lines)
    failed_codes = Counter(x["error"]["code"] for x in lines if x["status"] == "failed")
    assert statuses["failed"] > 2 and statuses["succeeded"] > 0  # the emulator really refused some
    assert failed_codes["PREFLIGHT_UNREADABLE"] == 2  # the text file, for both operations
    vendor_codes = set(failed_codes) - {"PREFLIGHT_UNREADABLE"}
    assert vendor_codes <= {"ERROR_NO_FACE_IN_FILE", "error_no_face"} and vendor_codes

    # What the lead wires in: caps from the manifest and the folder's totals.
    report = {
        **report,
        "max_credits": {"ailab": 1000, "perfectcorp": 100},
        "folder_totals": {"succeeded": 40, "failed": 9, "total": 49},
    }
    page = write_html_report(out, report, lines)
    assert page == out / "report.html"
    attrs, text, dom = await _chromium_view(page, tmp_path / "profile")

    # Thumbnails: one before and one after per succeeded item, all decoded.
    assert attrs["images"] == str(2 * statuses["succeeded"])
    assert attrs["loaded"] == attrs["images"]
    # The outcome in words, then exit code and wall time.
    first, meta = [x for x in text.splitlines() if x.strip()][:2]
    assert first == (
        f"{statuses['failed']} items failed; rerun with pipeline run "
        f"{out.parent / 'job.yaml'} --retry-failed once fixed (see Errors)"
    )
    assert meta.startswith("Exit code 1 · wall time ")
    # Counts for this run and the folder totals passed in.
    rows = _table_rows(text, "Succeeded", "Total")
    assert rows["Succeeded"] == [str(statuses["succeeded"]), "40"]
    assert rows["Failed in this run"] == [str(statuses["failed"]), "9"]
    assert rows["Skipped (already done)"] == ["0", ""]
    assert rows["Total"] == [str(len(lines)), "49"]
    # Spend against max_credits.
    ailab_spent = 12 * sum(
        1 for x in lines if x["status"] == "succeeded" and x["operation"].startswith("ailab/")
    )
    assert f"ailab\t{ailab_spent} credits\t1,000 credits\t" in text
    # The error groups, with meaning, what to do, and the hostile name as plain text.
    assert "PREFLIGHT_UNREADABLE · 2 items · permanent · ailab, perfectcorp" in text
    assert "Meaning: The input is not a decodable image" in text
    assert "What to do: Re-export the file or remove it from the inputs." in text
    assert f"in/b/{HOSTILE_NAME} · ailab/emotion-editor service_choice=big_grin, " in text
    for code in vendor_codes:
        assert f"{code} · {failed_codes[code]} item" in text
    assert "No face was detected" in text
    # Nothing from the page ran as script: the probe is the only script element.
    assert dom.count("<script") == 1
    assert AILAB_KEY not in page.read_text(encoding="utf-8")


@needs_chromium
async def test_a_rerun_reuses_thumbnails_and_keeps_each_runs_report(
    tmp_path: Path,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
) -> None:
    portraits(3)
    manifest = write_manifest(OPS)
    report, out = await _run(manifest, emulator)
    build_html_for(out)
    thumbs = _thumb_files(out)
    assert len(thumbs) == 3 + 6  # one per input (shared by its variants) + one per result
    report2, _ = await _run(manifest, emulator)
    assert report2["run_id"] == report["run_id"] + 1
    build_html_for(out, reports_keep=1)
    assert _thumb_files(out) == thumbs  # nothing re-made, nothing rewritten
    attrs, text, _dom = await _chromium_view(out / "report.html", tmp_path / "profile")
    assert attrs["images"] == attrs["loaded"] == "12"
    assert "All 6 items were already done (nothing sent)" in text
    # reports/ keeps the newest run only (reports_keep=1), as JSON and HTML.
    run2 = report2["run_id"]
    assert sorted(os.listdir(out / "reports")) == [f"run-{run2}.html", f"run-{run2}.json"]
    assert json.loads((out / "reports" / f"run-{run2}.json").read_text())["run_id"] == run2
    # The archived page links thumbnails from one level down, and they load there too.
    attrs, _text, _dom = await _chromium_view(
        out / "reports" / f"run-{run2}.html", tmp_path / "profile"
    )
    assert attrs["images"] == attrs["loaded"] == "12"
    # The folder can be moved: links are relative.
    moved = tmp_path / "moved"
    out.rename(moved)
    attrs, _text, _dom = await _chromium_view(moved / "report.html", tmp_path / "profile")
    assert attrs["images"] == attrs["loaded"] == "12"


# --------------------------------------------------------------------------------------
# Pure checks: escaping, scrubbing, size bounds, words, codes
# --------------------------------------------------------------------------------------

ALLOWED_TAGS = {
    "html", "head", "meta", "title", "style", "body", "header", "h1", "h2", "h3", "p",
    "nav", "a", "section", "table", "thead", "tbody", "tr", "th", "td", "div", "ul", "li",
    "span", "strong", "code", "br", "meter", "figure", "figcaption", "img", "footer",
}  # fmt: skip


class _PageParser(HTMLParser):
    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.tags: Counter[str] = Counter()
        self.attrs: list[tuple[str, str, str | None]] = []
        self.text: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        self.tags[tag] += 1
        self.attrs.extend((tag, name, value) for name, value in attrs)

    def handle_data(self, data: str) -> None:
        self.text.append(data)


def _parse(page: str) -> _PageParser:
    parser = _PageParser()
    parser.feed(page)
    parser.close()
    return parser


def _check_structure(page: str) -> _PageParser:
    parsed = _parse(page)
    assert set(parsed.tags) <= ALLOWED_TAGS, set(parsed.tags) - ALLOWED_TAGS
    assert parsed.tags["script"] == 0
    for tag, name, value in parsed.attrs:
        assert not name.startswith("on"), (tag, name, value)
        if name in ("href", "src"):
            assert value is not None
            scheme = re.match(r"^([A-Za-z][A-Za-z0-9+.-]*):", value)
            assert scheme is None or scheme.group(1) == "file", value
            assert not value.startswith("//"), value
    return parsed


def _line(i: int, **over: Any) -> dict[str, Any]:
    line: dict[str, Any] = {
        "key": f"{i:064x}",
        "input": f"/nowhere/in/p{i}.jpg",
        "input_rel": f"in/p{i}.jpg",
        "operation": "ailab/emotion-editor",
        "variant": "service_choice=big_grin",
        "params": {"service_choice": 12},
        "status": "succeeded",
        "output": None,
        "output_rel": f"ailab-emotion-editor/service_choice=big_grin/in/p{i}.jpg",
        "attempts": 1,
        "task_id": None,
        "error": None,
        "changes": [],
    }
    line.update(over)
    return line


def _report(counts: dict[str, int], **over: Any) -> dict[str, Any]:
    report: dict[str, Any] = {
        "run_id": 1,
        "manifest": "/jobs/night.yaml",
        "exit_code": 1 if counts.get("failed") else 0,
        "wall_time_seconds": 12.5,
        "counts": counts,
        "credits_spent": {"ailab": {"amount": 24.0, "unit": "credits"}},
        "rate_budget": {"ailab": {"sent": 3, "waited_seconds": 1.5, "rate_limited_answers": 2}},
    }
    report.update(over)
    return report


def test_hostile_names_codes_and_messages_render_as_text(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("SOME_VENDOR_API_KEY", "sk-live-abcdefgh12345")
    bad = '<script>alert(1)</script>" onerror="alert(2)\u202e\x00gpj.exe'
    lines = [
        _line(0, input_rel=f"in/{bad}.jpg", input="javascript:alert(3)"),
        _line(
            1,
            input_rel=f"in/{bad}.png",
            status="failed",
            output_rel=None,
            error={
                "code": "<img src=x onerror=alert(4)>",
                "kind": "permanent",
                "message": "see https://bucket.s3.amazonaws.com/r.jpg?X-Amz-Signature=deadbeef "
                f"key {AILAB_KEY} and sk-live-abcdefgh12345",
            },
            changes=["<b>resized</b>"],
        ),
        _line(2, output_rel="//evil.example/x.jpg"),
        _line(3, output_rel="../../etc/passwd"),
        _line(4, output_rel="javascript:alert(5)"),
    ]
    report = _report({"succeeded": 4, "failed": 1, "total": 5}, manifest=f"/jobs/{bad}.yaml")
    page_path = write_html_report(tmp_path, report, lines, secrets=[AILAB_KEY])
    page = page_path.read_text(encoding="utf-8")
    parsed = _check_structure(page)
    text = "".join(parsed.text)
    shown = '<script>alert(1)</script>" onerror="alert(2)\\u202e\\u0000gpj.exe'
    assert f"in/{shown}.jpg" in text and f"in/{shown}.png" in text
    assert "<img src=x onerror=alert(4)>" in text  # the code, as text
    assert "<b>resized</b>" in text
    assert "X-Amz-Signature" not in page and "deadbeef" not in page
    assert "https://bucket.s3.amazonaws.com/r.jpg?…" in text
    assert AILAB_KEY not in page and "sk-live-abcdefgh12345" not in page
    assert "\u202e" not in page and "\x00" not in page
    # Paths that would leave the folder, or be read as a URL, get no link at all.
    hrefs = [v for _t, n, v in parsed.attrs if n == "href" and v]
    assert not any("evil.example" in h or "passwd" in h or "alert" in h for h in hrefs)


_NASTY = st.sampled_from(
    ["<script>", "</style>", "<!--", "]]>", '"', "'", "&amp;", "&#x3c;", "\u202e", "\u2066",
     "\x00", "\x1b[31m", "\ud800", "\udcff", "javascript:", "//", "../", "?sig=1", "#", "%2e"]
)  # fmt: skip
_HOSTILE_TEXT = st.lists(
    st.one_of(_NASTY, st.text(st.characters(exclude_categories=()), max_size=8)), max_size=6
).map("".join)


@settings(max_examples=60, deadline=None)
@given(names=st.lists(_HOSTILE_TEXT, min_size=1, max_size=4), code=_HOSTILE_TEXT)
def test_any_name_is_escaped_and_shown(names: list[str], code: str) -> None:
    lines = []
    for i, name in enumerate(names):
        lines.append(_line(2 * i, input_rel=name, output_rel=name, operation=name, variant=name))
        lines.append(
            _line(
                2 * i + 1,
                input_rel=name,
                status="failed",
                error={"code": code or "X", "kind": "permanent", "message": name},
                changes=[name],
            )
        )
    report = _report({"succeeded": len(names), "failed": len(names), "total": 2 * len(names)})
    with tempfile.TemporaryDirectory() as tmp:
        page = write_html_report(Path(tmp), report, lines).read_text(encoding="utf-8")
    parsed = _check_structure(page)
    text = "".join(parsed.text)
    clean = _Text(())
    for name in names:
        # What the reader sees is the name itself, with invisible characters spelled out.
        assert clean.clean(name) in text


@settings(max_examples=300, deadline=None)
@given(
    st.text(
        st.characters(codec="utf-8", exclude_categories=())
        | st.sampled_from("\t\n:/?#\u202e\udcff\ud800\x00\x85"),
        max_size=40,
    )
    | st.builds(
        lambda a, b: f"{a}https://h.example/p?{b}", st.text(max_size=8), st.text(max_size=8)
    )
)
def test_the_quick_paths_of_text_cleaning_change_nothing(text: str) -> None:
    """Skipping the regexes (no "://", every character printable) gives what running
    them gives: a URL's query still hidden, every invisible character still shown."""
    from pipeline.htmlreport import _INVISIBLE, _URL_QUERY, _show_invisible

    full = _INVISIBLE.sub(_show_invisible, _URL_QUERY.sub(r"\1?…", text))
    assert _Text(()).clean(text) == full


def _many_lines(n: int) -> Iterator[dict[str, Any]]:
    for i in range(n):
        if i % 10 < 6:
            yield _line(i)
        elif i % 10 < 9:
            # Half of the failures share 3 codes, half have a code of their own.
            code = f"CODE_{i % 3}" if i % 2 else f"UNIQUE_{i}"
            yield _line(
                i,
                status="failed",
                output_rel=None,
                error={"code": code, "kind": "permanent", "message": f"failed {i}"},
            )
        else:
            yield _line(i, status="skipped", changes=[f"resized {i}"])


def test_page_size_is_bounded_for_100k_items(tmp_path: Path) -> None:
    n = 100_000
    report = _report({"succeeded": 60_000, "failed": 30_000, "skipped": 10_000, "total": n})
    page = write_html_report(tmp_path, report, _many_lines(n), gallery_max=2000)
    html_text = page.read_text(encoding="utf-8")
    assert len(html_text.encode()) < 400_000
    parsed = _check_structure(html_text)
    assert parsed.tags["figure"] == GALLERY_PAGE_SIZE
    assert html_text.count('class="group"') == MAX_CODE_GROUPS
    text = "".join(parsed.text)
    assert "Showing 200 of 70,000 results (this run's new results first)" in text
    assert "the gallery keeps the first 2,000" in text
    # The rest of the gallery: 2000 / 200 pages, each bounded, nothing beyond.
    reports = tmp_path / "reports"
    pages = sorted(p.name for p in reports.glob("gallery-*.html"))
    assert pages == sorted(f"gallery-{k}.html" for k in range(1, 11))
    for p in reports.glob("gallery-*.html"):
        assert p.stat().st_size < 400_000
        assert _check_structure(p.read_text(encoding="utf-8")).tags["figure"] == 200
    # A smaller run later removes the pages it no longer has (700 results: 4 pages).
    write_html_report(tmp_path, report, _many_lines(1000), gallery_max=2000)
    assert sorted(p.name for p in reports.glob("gallery-*.html")) == [
        "gallery-1.html", "gallery-2.html", "gallery-3.html", "gallery-4.html",
    ]  # fmt: skip


def test_error_groups_show_distinct_example_inputs(tmp_path: Path) -> None:
    lines = []
    for i in range(9):
        for op in ("ailab/emotion-editor", "perfectcorp/ai-smile"):
            lines.append(
                _line(
                    i,
                    operation=op,
                    status="failed",
                    error={"code": "ERROR_NO_FACE_IN_FILE", "kind": "permanent", "message": "m"},
                )
            )
    report = _report({"failed": 18, "total": 18})
    text = "".join(_parse(write_html_report(tmp_path, report, lines).read_text()).text)
    assert "ERROR_NO_FACE_IN_FILE · 18 items · permanent · ailab, perfectcorp" in text
    for i in range(EXAMPLES_PER_CODE):
        assert (
            f"in/p{i}.jpg · ailab/emotion-editor service_choice=big_grin, "
            "perfectcorp/ai-smile service_choice=big_grin" in text
        )
    assert f"in/p{EXAMPLES_PER_CODE}.jpg" not in text
    assert "and 8 more (results.jsonl has them all)" in text
    assert "Meaning: No face was detected in the photo." in text


def test_paid_but_lost_changes_and_rate_budget_sections(tmp_path: Path) -> None:
    lost = {"code": "RESULT_LOST", "kind": "permanent", "message": "url expired"}
    lines = [
        _line(0, status="failed", output_rel=None, task_id="T-1", error=lost),
        _line(1, status="failed", output_rel=None, task_id="T-2", operation="ailab/face-swap",
              error={"code": "RESULT_NOT_IMAGE", "kind": "permanent", "message": "html"}),
        _line(2, changes=["re-encoded PNG as JPEG", "resized 5000x4000 to 4095x3276"]),
    ]  # fmt: skip
    report = _report({"succeeded": 1, "failed": 2, "total": 3})
    text = "".join(_parse(write_html_report(tmp_path, report, lines).read_text()).text)
    assert "2 items were billed by the vendor but their results could not be kept" in text
    assert "(about 17 credits (ailab))" in text  # 12 (emotion-editor) + 5 (face swap)
    assert "T-1" in text and "T-2" in text
    assert "1 input was converted, shrunk or turned upright before sending" in text
    assert "re-encoded PNG as JPEG; resized 5000x4000 to 4095x3276" in text
    assert "ailab3" in text.replace(" ", "").replace("\n", "")  # sent
    assert "1.5 s" in text


@pytest.mark.parametrize(
    ("counts", "extra", "kinds", "expected"),
    [
        ({"succeeded": 12, "total": 12}, {}, {}, "All 12 items succeeded"),
        ({"skipped": 5, "total": 5}, {}, {}, "All 5 items were already done (nothing sent)"),
        (
            {"succeeded": 9, "failed": 3, "total": 12},
            {},
            {"permanent": 3},
            "3 items failed; rerun with pipeline run /jobs/night.yaml --retry-failed once "
            "fixed (see Errors)",
        ),
        (
            {"succeeded": 9, "failed": 3, "total": 12},
            {},
            {"retryable": 3},
            "3 items failed; rerun with pipeline run /jobs/night.yaml to retry them",
        ),
        (
            {"succeeded": 2, "interrupted": 4, "total": 6},
            {"interrupted": True, "exit_code": 130},
            {},
            "Interrupted: rerun to resume (4 items not finished): pipeline run /jobs/night.yaml",
        ),
        (
            {"succeeded": 2, "failed": 1, "total": 3},
            {"aborted": {"code": "MAX_CREDITS", "message": "cap reached"}, "exit_code": 3},
            {},
            "Stopped early (MAX_CREDITS: cap reached); fix that, then rerun to resume: "
            "pipeline run /jobs/night.yaml",
        ),
        (
            {"skipped": 10, "failed_earlier": 2, "total": 12},
            {},
            {},
            "No new failures: 10 of 12 items done; 2 items failed in earlier runs (rerun "
            "with pipeline run /jobs/night.yaml --retry-failed to retry them)",
        ),
    ],
)
def test_outcome_in_words(
    counts: dict[str, int], extra: dict[str, Any], kinds: dict[str, int], expected: str
) -> None:
    assert outcome_text(_report(counts, **extra), kinds)[1] == expected


GENERIC = explain_code("NO_SUCH_CODE_ANYWHERE")


@pytest.mark.parametrize(
    "code",
    sorted(
        AILAB_FATAL_CODES | AILAB_PERMANENT_CODES | AILAB_RETRYABLE_CODES
        | PERFECTCORP_FATAL_CODES | PERFECTCORP_PERMANENT_CODES | PERFECTCORP_RETRYABLE_CODES
        | PERFECTCORP_ENGINE_PERMANENT_CODES | PERFECTCORP_ENGINE_RETRYABLE_CODES
        | {"RESULT_LOST", "RESULT_NOT_IMAGE", "TASK_DEADLINE", "DISK_FULL", "VENDOR_UNREACHABLE",
           "INTERRUPTED", "STORE_FAILED", "OUTCOME_UNKNOWN", "RESULT_URL_REFUSED", "NOT_SENT",
           "INPUT_UNREADABLE", "INPUT_FIFO", "INPUT_BROKEN_SYMLINK", "PREFLIGHT_FORMAT",
           "HTTP_502", "HTTP_401", "MAX_CREDITS"}
    ),
)  # fmt: skip
def test_every_known_code_has_its_own_explanation(code: str) -> None:
    helptext = explain_code(code)
    assert helptext != GENERIC and helptext.meaning and helptext.todo


def test_explanations_follow_the_vendor_and_the_kind() -> None:
    assert explain_code("ERROR_NOT_ENOUGH_CREDITS").todo == "Buy credits, then rerun to resume."
    assert explain_code("CreditInsufficiency").todo == "Buy units, then rerun to resume."
    assert explain_code("ERROR_NO_FACE_IN_FILE", "ailab").meaning == (
        "No face was detected in the photo."
    )
    assert explain_code("error_no_face").meaning == "No face was detected in the provided image."
    assert "stopped the run" in explain_code("ERROR_FACE_TRACE_LIMIT_EXCEEDED").meaning or (
        explain_code("ERROR_FACE_TRACE_LIMIT_EXCEEDED").todo.startswith("Check the account")
    )
    assert explain_code("ERROR_GATEWAY").todo.startswith("A plain rerun")
    assert explain_code("ERROR_BLURRY_FACE").meaning == (
        "AILabTools refused this input or request: blurry face."
    )
    assert "--retry-failed" in explain_code("ERROR_BLURRY_FACE").todo
    assert explain_code("error_bald_image", "perfectcorp").meaning == (
        "Perfect Corp refused this input or request: bald image."
    )
    # Unknown codes still get a line, never an exception.
    assert GENERIC.meaning.startswith("A code this report has no description for")


def test_reports_keep_prunes_old_runs(tmp_path: Path) -> None:
    for run_id in range(1, 8):
        report = _report({"succeeded": 1, "total": 1}, run_id=run_id)
        write_html_report(tmp_path, report, [_line(0)], reports_keep=3)
    names = sorted(os.listdir(tmp_path / "reports"))
    assert names == [f"run-{i}.{ext}" for i in (5, 6, 7) for ext in ("html", "json")]
    assert json.loads((tmp_path / "reports" / "run-7.json").read_text())["run_id"] == 7
    assert "Run 7:" in (tmp_path / "reports" / "run-7.html").read_text()
    assert "Run 7:" in (tmp_path / "report.html").read_text()


def test_build_html_for_reads_the_folder_and_tolerates_bad_lines(tmp_path: Path) -> None:
    (tmp_path / "report.json").write_text(json.dumps(_report({"succeeded": 2, "total": 2})))
    good = json.dumps(_line(0))
    (tmp_path / "results.jsonl").write_text(f"{good}\nnot json\n[1, 2]\n{json.dumps(_line(1))}\n")
    page = build_html_for(tmp_path)
    parsed = _check_structure(page.read_text())
    assert parsed.tags["figure"] == 2
    assert "All 2 items succeeded" in "".join(parsed.text)


# --------------------------------------------------------------------------------------
# Thumbnails
# --------------------------------------------------------------------------------------


def test_thumbnails_are_small_upright_jpegs(tmp_path: Path) -> None:
    src = tmp_path / "wide.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # stored landscape, shown rotated 90 degrees: portrait
    Image.new("RGB", (800, 400), (200, 30, 30)).save(src, exif=exif.tobytes())
    data = render_thumbnail(src, 160)
    assert data[:3] == b"\xff\xd8\xff"
    with Image.open(io.BytesIO(data)) as im:
        assert im.size == (80, 160)
    png = make_portrait(tmp_path / "p.png", seed=1, size=(300, 200))
    with Image.open(io.BytesIO(render_thumbnail(png, 160))) as im:
        assert im.size == (160, 107) and im.mode == "RGB"


def _png_header_only(path: Path, width: int, height: int) -> Path:
    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body).to_bytes(4, "big")
        return len(body).to_bytes(4, "big") + kind + body + crc

    ihdr = width.to_bytes(4, "big") + height.to_bytes(4, "big") + bytes([8, 2, 0, 0, 0])
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path


def test_thumbnails_refuse_fifos_bombs_and_non_images(tmp_path: Path) -> None:
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)
    with pytest.raises(ThumbnailError, match="not a regular file"):
        render_thumbnail(fifo)  # returns at once: a FIFO is never waited on
    side = int(MAX_SOURCE_PIXELS**0.5) + 1
    with pytest.raises(ThumbnailError, match="too large"):
        render_thumbnail(_png_header_only(tmp_path / "bomb.png", side, side))
    (tmp_path / "text.jpg").write_text("hello")
    with pytest.raises(ThumbnailError, match="not a readable image"):
        render_thumbnail(tmp_path / "text.jpg")
    with pytest.raises(ThumbnailError, match="cannot open"):
        render_thumbnail(tmp_path / "missing.jpg")


def test_thumbnail_cache_trusts_what_it_made(tmp_path: Path) -> None:
    src = make_portrait(tmp_path / "in" / "a.jpg", seed=3)
    cache = ThumbnailCache(tmp_path / "out")
    first = cache.ensure([ThumbRequest("input\0k1", src), ThumbRequest("input\0k1", src)])
    rel = first["input\0k1"]
    assert rel is not None and rel.startswith(".thumbs/") and cache.made == 1
    made = (tmp_path / "out" / rel).stat().st_mtime_ns
    src.unlink()  # the source is not looked at again: the key names its content
    again = ThumbnailCache(tmp_path / "out")
    assert again.ensure([ThumbRequest("input\0k1", src)]) == {"input\0k1": rel}
    assert again.made == 0 and (tmp_path / "out" / rel).stat().st_mtime_ns == made
    # A source that cannot be read gives None, and is tried again next time.
    assert again.ensure([ThumbRequest("input\0k2", src)]) == {"input\0k2": None}
    assert again.failed == 1


@pytest.mark.parametrize("gallery_max", [2, 200])
async def test_the_runs_first_results_get_their_thumbnails_while_it_runs(
    monkeypatch: pytest.MonkeyPatch,
    emulator: RunningEmulator,
    portraits: Callable[..., list[Path]],
    write_manifest: Callable[..., Path],
    gallery_max: int,
) -> None:
    # The end of a run no longer decodes the gallery (issue 9, C=8 wall time): the
    # first GALLERY_MAX items driven get theirs as they succeed. With the end-of-run
    # page switched off, what is in the cache was made by the run itself.
    import pipeline.context
    import pipeline.runner

    monkeypatch.setattr(pipeline.context, "GALLERY_MAX", gallery_max)
    monkeypatch.setattr(pipeline.runner, "_write_html", lambda *a, **k: None)
    portraits(4)
    report, out = await _run(write_manifest(OPS[:1]), emulator)
    assert report["counts"]["succeeded"] == 4
    made = _thumb_files(out)
    assert len(made) == 2 * min(4, gallery_max)  # an input's and its result's
    # They are the ones the page asks for: writing it now makes none of those again.
    lines = list(iter_results(out / "results.jsonl"))
    write_html_report(out, report, lines)
    after = _thumb_files(out)
    assert {k: v for k, v in after.items() if k in made} == made
    assert len(after) == 8
