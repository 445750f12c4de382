"""The library surface (issue 10 point 8): what ``from pipeline import *`` gives."""

from __future__ import annotations

import inspect

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
