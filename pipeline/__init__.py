"""portrait-pipeline: bulk portrait editing through AILabTools and Perfect Corp APIs."""

from __future__ import annotations

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("portrait-pipeline")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
