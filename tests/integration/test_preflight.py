"""Local preflight end to end: bad inputs never reach the vendor, auto-fix repairs what it can.

One folder of inputs, each broken in one documented way (docs/vendors.md, "AILab: image
limits" and "Perfect Corp: image limits"; the limits in ``pipeline.operations``), next
to good ones, goes through all four operations against the emulator over loopback.
The emulator's ``submits_by_input`` (sha256 of the image bytes it received, per
vendor) is the proof of what was sent.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
import re
import shutil
import subprocess
import sys
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from pipeline.emulator import RunningEmulator
from pipeline.engine import RunOptions, run_job
from pipeline.images import prepare_payload
from pipeline.manifest import load_manifest
from pipeline.operations import OPERATIONS
from tests.conftest import AILAB_KEY, PERFECTCORP_KEY, config_yaml, fast_config, make_portrait

pytestmark = pytest.mark.timeout(60)

EMOTION, BEAUTY, SWAP, SMILE = (
    "ailab/emotion-editor",
    "ailab/face-beauty-pro",
    "ailab/face-swap",
    "perfectcorp/ai-smile",
)
AILAB_OPS = (EMOTION, BEAUTY, SWAP)
OPS = (*AILAB_OPS, SMILE)

GOOD = ("good.jpg", "good.png", "rotated_ok.jpg", "png_named.jpg")

# (code, fragment of the message) per input and operation it breaks, auto_fix off.
Expectation = dict[str, dict[str, tuple[str, str]]]


def _each_side(w: int, h: int) -> dict[str, tuple[str, str]]:
    return {
        op: ("PREFLIGHT_DIMENSIONS", f"{w}x{h} px: each side must be under 4096 px for {op}")
        for op in AILAB_OPS
    }


def _format(fmt: str) -> dict[str, tuple[str, str]]:
    out = {
        op: ("PREFLIGHT_FORMAT", f"{fmt} is not accepted by {op} (it takes JPEG/PNG)")
        for op in AILAB_OPS
    }
    out[SMILE] = ("PREFLIGHT_FORMAT", f"{fmt} is not accepted by {SMILE} (it takes HEIF/JPEG/PNG)")
    return out


def _unreadable(fragment: str) -> dict[str, tuple[str, str]]:
    return {op: ("PREFLIGHT_UNREADABLE", fragment) for op in OPS}


BAD: Expectation = {
    # 2.3 MB: only Face Beauty Pro's 2 MB limit is broken (the others take 5 / 10 MB).
    "noisy.jpg": {BEAUTY: ("PREFLIGHT_FILE_SIZE", f"MB is over the 2 MB limit of {BEAUTY}")},
    "wide.jpg": {
        **_each_side(4200, 1400),
        SMILE: ("PREFLIGHT_DIMENSIONS", f"long side 4200 px is over the 4096 px limit of {SMILE}"),
    },
    # 4096 px: AILab wants each side *under* 4096; Perfect Corp takes a long side <= 4096.
    "edge.jpg": _each_side(4096, 1024),
    # Stored landscape 4300x1200 with EXIF Orientation 6: a portrait, and too big.
    "rotated_big.jpg": {
        **_each_side(4300, 1200),
        SMILE: ("PREFLIGHT_DIMENSIONS", f"long side 4300 px is over the 4096 px limit of {SMILE}"),
    },
    "pic.webp": _format("WEBP"),
    "pic.bmp": _format("BMP"),
    "pic.gif": _format("GIF"),
    "pic.tiff": _format("TIFF"),
    "truncated.jpg": _unreadable("truncated"),
    "notes.jpg": _unreadable("cannot be decoded as an image"),
    "tiny.jpg": {
        BEAUTY: ("PREFLIGHT_TOO_SMALL", f"40x40 px: each side must be over 48 px for {BEAUTY}")
    },
}

# What auto-fix does per input and operation (display sizes: EXIF applied first).
FIXED: dict[str, dict[str, list[str]]] = {
    "wide.jpg": {
        **{op: ["resized 4200x1400 -> 4095x1365"] for op in AILAB_OPS},
        SMILE: ["resized 4200x1400 -> 4096x1365"],
    },
    "edge.jpg": {op: ["resized 4096x1024 -> 4095x1024"] for op in AILAB_OPS},
    "rotated_big.jpg": {
        **{
            op: ["applied EXIF orientation 6", "resized 1200x4300 -> 1143x4095"] for op in AILAB_OPS
        },
        SMILE: ["applied EXIF orientation 6", "resized 1200x4300 -> 1143x4096"],
    },
    # Within every limit, but on its side: auto_fix sends it upright.
    "rotated_ok.jpg": {op: ["applied EXIF orientation 8"] for op in OPS},
    **{
        f"pic.{ext}": {op: [f"re-encoded {fmt} as JPEG"] for op in OPS}
        for ext, fmt in (("webp", "WEBP"), ("bmp", "BMP"), ("gif", "GIF"), ("tiff", "TIFF"))
    },
}
# Never fixable: auto-fix does not enlarge, and cannot decode what is damaged.
UNFIXABLE: Expectation = {name: BAD[name] for name in ("truncated.jpg", "notes.jpg", "tiny.jpg")}
NOISY_FIX = re.compile(
    r"^(re-compressed as JPEG at quality 95|lowered JPEG quality to \d+) to fit the 2 MB limit"
)


def _exif(orientation: int) -> Image.Exif:
    exif = Image.Exif()
    exif[0x0112] = orientation
    return exif


def _rotated(path: Path, seed: int, display: tuple[int, int], orientation: int) -> Path:
    """A portrait of ``display`` size stored sideways, upright only through EXIF."""
    upright = Image.open(make_portrait(path.with_suffix(".tmp.png"), seed, display))
    upright.load()
    path.with_suffix(".tmp.png").unlink()
    turn = Image.Transpose.ROTATE_90 if orientation == 6 else Image.Transpose.ROTATE_270
    upright.transpose(turn).save(path, "JPEG", quality=90, exif=_exif(orientation))
    return path


def _write_inputs(folder: Path) -> None:
    make_portrait(folder / "good.jpg", seed=1)
    make_portrait(folder / "good.png", seed=2)
    _rotated(folder / "rotated_ok.jpg", 3, (160, 200), 8)
    make_portrait(folder / "png_named.jpg", seed=4, fmt="PNG")
    rng = random.Random(5)
    noise = Image.frombytes("RGB", (1300, 1600), rng.randbytes(1300 * 1600 * 3))
    noise.save(folder / "noisy.jpg", "JPEG", quality=95)
    make_portrait(folder / "wide.jpg", seed=6, size=(4200, 1400))
    make_portrait(folder / "edge.jpg", seed=7, size=(4096, 1024))
    _rotated(folder / "rotated_big.jpg", 8, (1200, 4300), 6)
    for seed, (ext, fmt) in enumerate(
        (("webp", "WEBP"), ("bmp", "BMP"), ("gif", "GIF"), ("tiff", "TIFF")), start=9
    ):
        make_portrait(folder / f"pic.{ext}", seed=seed, fmt=fmt)
    whole = make_portrait(folder / "truncated.jpg", seed=13).read_bytes()
    (folder / "truncated.jpg").write_bytes(whole[: len(whole) // 2])
    (folder / "notes.jpg").write_text("shopping list: eggs, milk\n")
    make_portrait(folder / "tiny.jpg", seed=14, size=(40, 40))


@pytest.fixture(scope="module")
def input_set(tmp_path_factory: pytest.TempPathFactory) -> Path:
    folder = tmp_path_factory.mktemp("inputs")
    _write_inputs(folder)
    assert sorted(p.name for p in folder.iterdir()) == sorted([*GOOD, *BAD])
    noisy = (folder / "noisy.jpg").stat().st_size
    assert 2 * 1024 * 1024 < noisy < 5 * 1024 * 1024
    return folder


@pytest.fixture
def job(
    tmp_path: Path, input_set: Path, write_manifest: Callable[..., Path]
) -> Callable[..., Path]:
    """``job(auto_fix, names=None)``: a manifest over (a copy of) the input set."""

    def make(auto_fix: bool, names: tuple[str, ...] | None = None) -> Path:
        target = tmp_path / "in"
        target.mkdir()
        for path in input_set.iterdir():
            if names is None or path.name in names:
                shutil.copy2(path, target / path.name)
        return write_manifest(inputs=["in/*"], auto_fix=auto_fix, concurrency=4)

    return make


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


async def _run(
    manifest_path: Path, emu: RunningEmulator, **options: Any
) -> tuple[int, dict[str, Any], dict[tuple[str, str], dict[str, Any]]]:
    manifest = load_manifest(manifest_path)
    result = await run_job(manifest, fast_config(emu.base_url), RunOptions(quiet=True, **options))
    lines = [json.loads(x) for x in (manifest.output / "results.jsonl").read_text().splitlines()]
    by_item = {(Path(x["input"]).name, x["operation"]): x for x in lines}
    assert len(by_item) == len(lines)
    return result.exit_code, result.report, by_item


def _vendor(op: str) -> str:
    return op.split("/")[0]


async def test_without_auto_fix_bad_inputs_fail_exactly_and_are_never_sent(
    tmp_path: Path, emulator: RunningEmulator, job: Callable[..., Path]
) -> None:
    manifest = job(auto_fix=False)
    code, report, items = await _run(manifest, emulator)
    assert code == 1
    assert len(items) == len([*GOOD, *BAD]) * len(OPS)
    sent: dict[str, Counter[str]] = {"ailab": Counter(), "perfectcorp": Counter()}
    for (name, op), line in sorted(items.items()):
        path = tmp_path / "in" / name
        expected = BAD.get(name, {}).get(op)
        assert line["changes"] == [], (name, op)
        if expected is None:
            assert line["status"] == "succeeded", (name, op, line["error"])
            assert Path(line["output"]).is_file()
            # Sent byte for byte: an EXIF-rotated or misnamed image that fits is untouched.
            sent[_vendor(op)][_sha(path.read_bytes())] += 1
            continue
        code_, fragment = expected
        assert line["status"] == "failed", (name, op)
        assert line["output"] is None and line["task_id"] is None
        assert line["attempts"] == 0, (name, op)  # refused before any submit
        assert line["error"]["code"] == code_, (name, op, line["error"])
        assert line["error"]["kind"] == "permanent"
        message = line["error"]["message"]
        assert message.startswith(f"{path}: "), message
        assert fragment in message, (name, op, message)
        assert " at 0x" not in message  # no object reprs with addresses
    stats = emulator.stats()
    # The vendor received exactly the good (input, operation) pairs, once each, and
    # refused nothing: no bad input cost a request.
    assert Counter(stats["ailab"]["submits_by_input"]) == sent["ailab"]
    assert Counter(stats["perfectcorp"]["submits_by_input"]) == sent["perfectcorp"]
    assert stats["perfectcorp"]["uploads"] == sent["perfectcorp"].total()
    assert stats["ailab"]["rejected"] == stats["perfectcorp"]["rejected"] == 0
    failed = sum(len(ops) for ops in BAD.values())
    assert report["counts"] == {
        "total": len(items), "succeeded": len(items) - failed, "failed": failed, "skipped": 0,
        "failed_earlier": 0, "interrupted": 0,
    }  # fmt: skip
    assert report["errors_by_code"] == dict(
        Counter(code_ for ops in BAD.values() for code_, _ in ops.values())
    )
    assert report["errors_by_kind"] == {"permanent": failed}
    assert report["auto_fixed"] == 0
    for vendor in ("ailab", "perfectcorp"):
        assert report["credits_spent"][vendor]["amount"] == stats[vendor]["credits_spent"]

    # A rerun refuses them again from the journal, and sends nothing new.
    code, report, _ = await _run(manifest, emulator)
    # Carried over, not failed in this run: exit 0 (issue 11 point 4).
    assert code == 0 and report["counts"]["failed_earlier"] == failed
    assert report["counts"]["failed"] == 0
    after = emulator.stats()
    for vendor in ("ailab", "perfectcorp"):
        assert after[vendor]["requests"] == stats[vendor]["requests"]


def _fit_ok(size: tuple[int, int], ref: tuple[int, int]) -> bool:
    """``size`` has the aspect ratio of ``ref`` to within rounding of one pixel."""
    (w, h), (rw, rh) = size, ref
    return abs(w * rh - h * rw) <= max(rw, rh)


async def test_auto_fix_repairs_what_it_can_and_says_what_it_changed(
    tmp_path: Path, emulator: RunningEmulator, job: Callable[..., Path]
) -> None:
    manifest = job(auto_fix=True)
    code, report, items = await _run(manifest, emulator)
    assert code == 1  # the unfixable ones
    sent: dict[str, Counter[str]] = {"ailab": Counter(), "perfectcorp": Counter()}
    fixed = 0
    for (name, op), line in sorted(items.items()):
        path = tmp_path / "in" / name
        unfixable = UNFIXABLE.get(name, {}).get(op)
        if unfixable is not None:
            assert line["status"] == "failed", (name, op)
            assert line["error"]["code"] == unfixable[0], (name, op, line["error"])
            assert line["error"]["kind"] == "permanent" and line["attempts"] == 0
            assert line["error"]["message"].startswith(f"{path}: ")
            assert line["changes"] == []
            continue
        assert line["status"] == "succeeded", (name, op, line["error"])
        if name == "noisy.jpg" and op == BEAUTY:
            assert len(line["changes"]) == 1 and NOISY_FIX.match(line["changes"][0]), line
        else:
            assert line["changes"] == FIXED.get(name, {}).get(op, []), (name, op)
        fixed += bool(line["changes"])
        # What the vendor received: the payload preflight builds (deterministic).
        prepared = prepare_payload(path, OPERATIONS[op].limits, auto_fix=True)
        sent[_vendor(op)][_sha(prepared.payload.data)] += 1
        with Image.open(io.BytesIO(prepared.payload.data)) as payload:
            size = payload.size
            assert payload.format in ("JPEG", "PNG")
            tag = payload.getexif().get(0x0112, 1)
            if line["changes"]:
                assert tag == 1  # upright pixels, no orientation left to apply
        shown = size[::-1] if tag in (5, 6, 7, 8) else size
        with Image.open(path) as original:
            upright = original.size
            if original.getexif().get(0x0112, 1) in (6, 8) and line["changes"]:
                upright = upright[::-1]
        resized = [c for c in line["changes"] if c.startswith("resized ")]
        if resized:
            assert resized[0].endswith(f"-> {size[0]}x{size[1]}")
            assert max(size) <= 4096 and size != upright
        assert _fit_ok(size, upright), (name, op, size, upright)
        # The result keeps the payload's aspect ratio as displayed (the emulator applies
        # EXIF and scales to 1024 px).
        with Image.open(line["output"]) as result:
            assert _fit_ok(result.size, shown), (name, op, result.size, shown)
    stats = emulator.stats()
    assert Counter(stats["ailab"]["submits_by_input"]) == sent["ailab"]
    assert Counter(stats["perfectcorp"]["submits_by_input"]) == sent["perfectcorp"]
    assert stats["ailab"]["rejected"] == stats["perfectcorp"]["rejected"] == 0
    # 4 formats x 4 ops, wide 4, rotated_big 4, rotated_ok 4, edge 3, noisy 1.
    assert fixed == 32
    assert report["auto_fixed"] == fixed
    failed = sum(len(ops) for ops in UNFIXABLE.values())
    assert report["counts"]["failed"] == failed
    assert report["counts"]["succeeded"] == len(items) - failed
    assert report["errors_by_code"] == {"PREFLIGHT_TOO_SMALL": 1, "PREFLIGHT_UNREADABLE": 8}


async def test_auto_fix_rotates_an_exif_portrait_it_has_to_re_encode(
    tmp_path: Path, emulator: RunningEmulator, job: Callable[..., Path]
) -> None:
    """Orientation 6 stored 4300x1200: sent upright as 1143x4095, result upright too."""
    manifest = job(auto_fix=True, names=("rotated_big.jpg",))
    code, _report, items = await _run(manifest, emulator)
    assert code == 0
    for op in OPS:
        line = items[("rotated_big.jpg", op)]
        assert line["changes"][0] == "applied EXIF orientation 6"
        with Image.open(line["output"]) as result:
            assert result.height > result.width  # a portrait, as the camera meant


def _env() -> dict[str, str]:
    env = dict(os.environ)
    env.update({"AILAB_API_KEY": AILAB_KEY, "PERFECTCORP_API_KEY": PERFECTCORP_KEY})
    return env


async def _validate(manifest: Path, config: Path) -> subprocess.CompletedProcess[bytes]:
    return await anyio.run_process(
        [sys.executable, "-m", "pipeline", "validate", str(manifest), "--config", str(config)],
        check=False,
        env=_env(),
    )


async def test_validate_lists_every_problem_and_sends_nothing(
    tmp_path: Path, emulator: RunningEmulator, job: Callable[..., Path]
) -> None:
    manifest = job(auto_fix=False)
    config = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    done = await _validate(manifest, config)
    assert done.returncode == 1, done.stderr
    lines = done.stdout.decode().splitlines()
    problems = [x for x in lines if x.startswith(str(tmp_path / "in"))]
    expected = {(name, op) for name, ops in BAD.items() for op in ops}
    seen: Counter[tuple[str, str]] = Counter()
    for line in problems:
        name = Path(line.split(": ", 1)[0]).name
        op = line.split(": ")[1]
        seen[(name, op)] += 1
        code_, fragment = BAD[name][op]
        if code_ != "PREFLIGHT_UNREADABLE":  # the run words those after decoding
            assert fragment in line, line
    # Every bad input x every operation it breaks, once; nothing about good inputs.
    assert set(seen) == expected and max(seen.values()) == 1, sorted(set(seen) ^ expected)
    assert "truncated" in "\n".join(x for x in problems if "truncated.jpg" in x)
    n_inputs = len([*GOOD, *BAD])
    assert lines[-1] == (
        f"{manifest}: {n_inputs} input(s), 4 variant(s), {n_inputs * 4} work item(s); "
        f"{len(BAD)} input(s) with problems"
    )
    # Sent nothing: the emulator the config points at saw no request at all.
    stats = emulator.stats()
    assert stats["ailab"]["requests"] == stats["perfectcorp"]["requests"] == 0
    assert not (tmp_path / "out" / "journal.sqlite").exists()


async def test_validate_exits_0_when_every_input_is_fine(
    tmp_path: Path, emulator: RunningEmulator, job: Callable[..., Path]
) -> None:
    manifest = job(auto_fix=False, names=GOOD)
    config = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    done = await _validate(manifest, config)
    assert done.returncode == 0, done.stdout + done.stderr
    assert done.stdout.decode().splitlines() == [
        f"{manifest}: {len(GOOD)} input(s), 4 variant(s), {len(GOOD) * 4} work item(s); "
        "0 input(s) with problems"
    ]
    assert emulator.stats()["ailab"]["requests"] == 0


async def test_validate_with_auto_fix_promises_only_what_auto_fix_can_do(
    tmp_path: Path, emulator: RunningEmulator, job: Callable[..., Path]
) -> None:
    manifest = job(auto_fix=True, names=("tiny.jpg", "notes.jpg", "wide.jpg"))
    config = config_yaml(emulator.base_url, tmp_path / "config.yaml")
    done = await _validate(manifest, config)
    lines = done.stdout.decode().splitlines()
    for line in lines:
        if "wide.jpg" in line:
            assert line.endswith("(auto_fix will try to fix it)"), line
        if "tiny.jpg" in line or "notes.jpg" in line:
            assert "auto_fix will try" not in line, line


async def test_inputs_over_1_mb_upload_without_a_resource_warning(
    emulator: RunningEmulator, job: Callable[..., Path], write_manifest: Callable[..., Path]
) -> None:
    manifest = job(auto_fix=False, names=("noisy.jpg",))  # 2.3 MB, fine for both ops
    ops = [
        {"op": EMOTION, "params": {"service_choice": "big_grin"}},
        {"op": SMILE, "params": {"expression_type": "closed_mouth_smile"}},
    ]
    manifest = write_manifest(ops, inputs=["in/*"])
    code, _report, items = await _run(manifest, emulator)
    assert code == 0 and {x["status"] for x in items.values()} == {"succeeded"}
