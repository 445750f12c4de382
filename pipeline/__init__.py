"""portrait-pipeline: bulk portrait editing through AILabTools and Perfect Corp APIs.

The library surface, for code that runs jobs without the CLI::

    import anyio
    from pipeline import RunOptions, load_config, load_manifest, run_job

    result = anyio.run(run_job, load_manifest(path), load_config(None), RunOptions())
    result.exit_code, result.report["counts"]

Errors raised on purpose are :class:`PipelineError` subclasses; ``exit_code`` and
``kind`` say what they mean for a run (the tree is drawn in :mod:`pipeline.errors`).
"""

from __future__ import annotations

from pipeline._collector import collection_paused

# No collection while the package's modules are imported (pipeline._collector).
with collection_paused():
    from pipeline.config import Config, load_config
    from pipeline.errors import (
        ConfigError,
        DiskFullError,
        FatalError,
        InputProblem,
        JournalError,
        LockHeldError,
        ManifestError,
        PermanentError,
        PipelineError,
        RateLimitedError,
        ResultLostError,
        ResultNotImageError,
        RetryableError,
        StoreError,
        TransportError,
        UsageError,
        VendorError,
    )
    from pipeline.manifest import Manifest, load_manifest
    from pipeline.runner import RunOptions, RunResult, run_job

# The one place the version is written: pyproject.toml reads it from here (setuptools
# "attr:"). A literal rather than importlib.metadata, whose lookup cost every process
# start about 20 ms (README "Performance").
__version__ = "0.1.0"

__all__ = [
    "Config",
    "ConfigError",
    "DiskFullError",
    "FatalError",
    "InputProblem",
    "JournalError",
    "LockHeldError",
    "Manifest",
    "ManifestError",
    "PermanentError",
    "PipelineError",
    "RateLimitedError",
    "ResultLostError",
    "ResultNotImageError",
    "RetryableError",
    "RunOptions",
    "RunResult",
    "StoreError",
    "TransportError",
    "UsageError",
    "VendorError",
    "__version__",
    "load_config",
    "load_manifest",
    "run_job",
]
