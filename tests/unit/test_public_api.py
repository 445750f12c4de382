"""The library surface (issue 10 point 8): what ``from pipeline import *`` gives."""

from __future__ import annotations

import inspect
import subprocess
import sys

import pytest

import pipeline
from pipeline import errors


def test_public_names_are_exactly_the_documented_surface() -> None:
    expected = {
        "run_job", "RunOptions", "RunResult", "load_manifest", "load_config", "Manifest",
        "Config", "__version__",
    }  # fmt: skip
    tree = {
        name for name, obj in vars(errors).items()
        if inspect.isclass(obj) and issubclass(obj, errors.PipelineError)
    }  # fmt: skip
    assert set(pipeline.__all__) == expected | tree
    for name in pipeline.__all__:
        assert getattr(pipeline, name) is not None


def test_run_job_is_the_async_entry_point() -> None:
    assert inspect.iscoroutinefunction(pipeline.run_job)
    params = list(inspect.signature(pipeline.run_job).parameters)
    assert params == ["manifest", "config", "options"]


@pytest.mark.parametrize("before", [True, False])
def test_importing_the_package_leaves_the_callers_collector_as_it_was(before: bool) -> None:
    """The imports run with collection off (start-up time); a library user's
    setting is what it was afterwards, and nothing is frozen on their behalf."""
    script = (
        "import gc\n"
        f"gc.enable() if {before} else gc.disable()\n"
        "import pipeline, pipeline.engine, pipeline.cli\n"
        "print(gc.isenabled(), gc.get_freeze_count())\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True
    )
    assert out.stdout.split() == [str(before), "0"]
