"""Pillow's own warnings never reach stderr: only the pipeline's log lines do.

A JPEG with a corrupt EXIF block made Pillow print a raw ``UserWarning`` ("Corrupt
EXIF data", with a Python source path, from PIL/TiffImagePlugin.py) between the log
lines of ``pipeline validate`` and ``pipeline run`` (with ``auto_fix``). The real CLI
in a subprocess (a fresh interpreter: its warning filters are the pipeline's own,
not pytest's), real files, the real emulator on loopback.
"""

from __future__ import annotations

import io
import os
import struct
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import pytest
from PIL import Image

from pipeline.emulator import RunningEmulator
from tests.conftest import config_yaml

pytestmark = pytest.mark.timeout(60)

BEAUTY: dict[str, Any] = {"op": "ailab/face-beauty-pro", "params": {"smoothing": 10}}


def _corrupt_exif_jpeg(path: Path) -> Path:
    """A good JPEG with an APP1 EXIF block whose first IFD claims 65535 entries."""
    buf = io.BytesIO()
    Image.new("RGB", (300, 300), (180, 140, 120)).save(buf, "JPEG")
    good = buf.getvalue()
    app1 = b"Exif\x00\x00" + b"MM\x00\x2a\x00\x00\x00\x08" + b"\xff\xff" + b"\x00" * 20
    segment = b"\xff\xe1" + struct.pack(">H", len(app1) + 2) + app1
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(good[:2] + segment + good[2:])
    return path


async def _cli(*args: str) -> tuple[int, str, str]:
    done = await anyio.run_process(
        [sys.executable, "-m", "pipeline", *args], check=False, env=dict(os.environ)
    )
    return done.returncode, done.stdout.decode(), done.stderr.decode()


def _only_our_lines(stderr: str) -> None:
    assert "UserWarning" not in stderr, stderr
    assert "Corrupt EXIF" not in stderr and "warnings.warn" not in stderr, stderr
    assert "TiffImagePlugin" not in stderr, stderr
    for line in stderr.splitlines():
        assert " pipeline: " in line or line.startswith("pipeline: "), line


def test_the_image_really_makes_pillow_warn(tmp_path: Path) -> None:
    # The reproducer is real: Pillow warns when its EXIF is read.
    path = _corrupt_exif_jpeg(tmp_path / "bad.jpg")
    with pytest.warns(UserWarning, match="Corrupt EXIF"), Image.open(path) as im:
        im.getexif()


# The emulator (the stand-in vendor) runs in this process, under pytest's "error"
# filter: its own open of the image sent must not fail on Pillow's warning. The
# pipeline under test runs in a subprocess, with no filter but its own.
@pytest.mark.filterwarnings("ignore:Corrupt EXIF data:UserWarning")
async def test_validate_and_run_with_auto_fix_print_no_pillow_warning(
    tmp_path: Path, emulator: RunningEmulator, write_manifest: Callable[..., Path]
) -> None:
    _corrupt_exif_jpeg(tmp_path / "in" / "badexif.jpg")
    manifest = write_manifest([BEAUTY], auto_fix=True)
    cfg = config_yaml(emulator.base_url, tmp_path / "config.yaml")

    code, stdout, stderr = await _cli("validate", str(manifest), "--config", str(cfg))
    assert code == 0, stderr
    _only_our_lines(stderr)
    assert "1 input(s), 1 variant(s), 1 work item(s); 0 input(s) with problems" in stdout

    code, stdout, stderr = await _cli("-vv", "run", str(manifest), "--config", str(cfg))
    assert code == 0, stderr
    _only_our_lines(stderr)
    # Orientation taken as 1, and said so at debug level.
    assert "the EXIF block is unreadable: orientation taken as 1" in stderr, stderr
    assert "1 succeeded, 0 failed" in stdout, stdout
    stats = emulator.stats()["ailab"]
    assert sum(stats["submits_by_input"].values()) == 1
    assert sum(stats["charged_by_input"].values()) == 1
