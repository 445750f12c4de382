"""Shared fixtures: test images, manifests, a fast config and the emulator on loopback."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image, ImageDraw

from pipeline.config import Config, ProviderConfig, RetryConfig, TimeoutConfig
from pipeline.emulator import RunningEmulator, Scenario, start_emulator

AILAB_KEY = "test-ailab-key-123"
PERFECTCORP_KEY = "test-perfectcorp-key-456"


def make_portrait(
    path: Path, seed: int, size: tuple[int, int] = (160, 200), fmt: str | None = None
) -> Path:
    """A small, distinct face-like image (distinct bytes per seed)."""
    rng = random.Random(seed)
    img = Image.new("RGB", size, (rng.randrange(256), rng.randrange(256), rng.randrange(256)))
    draw = ImageDraw.Draw(img)
    w, h = size
    skin = (220 - rng.randrange(80), 180 - rng.randrange(60), 150 - rng.randrange(50))
    draw.ellipse((w * 0.25, h * 0.15, w * 0.75, h * 0.75), fill=skin)
    draw.ellipse((w * 0.37, h * 0.35, w * 0.45, h * 0.42), fill=(30, 30, 30))
    draw.ellipse((w * 0.55, h * 0.35, w * 0.63, h * 0.42), fill=(30, 30, 30))
    draw.arc((w * 0.4, h * 0.5, w * 0.6, h * 0.62), 20, 160, fill=(120, 20, 20), width=2)
    draw.point([(rng.randrange(w), rng.randrange(h)) for _ in range(50)], fill=(255, 255, 255))
    path.parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format=fmt or ("PNG" if path.suffix.lower() == ".png" else "JPEG"))
    return path


@pytest.fixture
def portraits(tmp_path: Path) -> Callable[..., list[Path]]:
    """``portraits(n, folder="in")`` writes n distinct portraits (jpg and png mixed)."""

    def make(n: int, folder: str = "in", start: int = 0) -> list[Path]:
        out = []
        for i in range(start, start + n):
            ext = ".png" if i % 3 == 2 else ".jpg"
            sub = "a" if i % 2 else "b"
            out.append(make_portrait(tmp_path / folder / sub / f"p{i:04d}{ext}", seed=i))
        return out

    return make


ALL_OPS: list[dict[str, Any]] = [
    {"op": "ailab/emotion-editor", "params": {"service_choice": "big_grin"}},
    {"op": "ailab/face-beauty-pro", "params": {"smoothing": 70, "filter_type": "sakura"}},
    {"op": "ailab/face-swap", "params": {"image_template": "template.jpg"}},
    {"op": "perfectcorp/ai-smile", "params": {"expression_type": "closed_mouth_smile"}},
]


@pytest.fixture
def write_manifest(tmp_path: Path) -> Callable[..., Path]:
    """``write_manifest(ops, **top)`` writes jobs/manifest.yaml next to tmp_path/in."""

    def write(ops: Iterable[dict[str, Any]] = ALL_OPS, name: str = "job.yaml", **top: Any) -> Path:
        template = tmp_path / "template.jpg"
        if not template.exists():
            make_portrait(template, seed=999_999)
        doc: dict[str, Any] = {
            "name": "test",
            "inputs": ["in/**/*.jpg", "in/**/*.png"],
            "operations": list(ops),
            "output": "out",
            "concurrency": 8,
            "max_attempts": 5,
        }
        doc.update(top)
        path = tmp_path / name
        path.write_text(yaml.safe_dump(doc, sort_keys=False))
        return path

    return write


def fast_config(base_url: str, **provider_extra: Any) -> Config:
    """Point both vendors at ``base_url`` with millisecond waits."""
    providers = {
        "ailab": ProviderConfig(
            base_url=base_url,
            api_key_env="AILAB_API_KEY",
            poll_interval_seconds=0.05,
            **provider_extra,
        ),
        "perfectcorp": ProviderConfig(
            base_url=base_url,
            api_key_env="PERFECTCORP_API_KEY",
            poll_interval_seconds=0.05,
            **provider_extra,
        ),
    }
    return Config(
        providers=providers,  # type: ignore[arg-type]
        retry=RetryConfig(backoff_initial_seconds=0.01, backoff_max_seconds=0.1),
        timeouts=TimeoutConfig(connect_seconds=2, request_seconds=5, download_seconds=5),
    )


def config_yaml(base_url: str, path: Path, **provider_extra: Any) -> Path:
    """The same fast config as a file, for CLI subprocess tests."""
    cfg = fast_config(base_url, **provider_extra).model_dump(mode="json", exclude={"source"})
    path.write_text(yaml.safe_dump(cfg))
    return path


@pytest.fixture(autouse=True)
def api_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AILAB_API_KEY", AILAB_KEY)
    monkeypatch.setenv("PERFECTCORP_API_KEY", PERFECTCORP_KEY)


@pytest.fixture
async def emulator_factory() -> AsyncIterator[Callable[..., Any]]:
    """``await emulator_factory(**scenario_knobs)`` starts an emulator; all stop at teardown."""
    running: list[RunningEmulator] = []

    async def start(**knobs: Any) -> RunningEmulator:
        emu = await start_emulator(Scenario(**{"task_seconds": 0.05, "sync_seconds": 0.0, **knobs}))
        running.append(emu)
        return emu

    yield start
    for emu in running:
        await emu.close()


@pytest.fixture
async def emulator(emulator_factory: Callable[..., Any]) -> RunningEmulator:
    emu: RunningEmulator = await emulator_factory()
    return emu
