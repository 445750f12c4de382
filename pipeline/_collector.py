"""The garbage collector paused while long-lived objects are made (imports, schemas).

Importing the package makes some 10^5 objects that live as long as the process; a
collection while they are made finds no garbage and cost about 25 ms of every start
(README "Performance"). Kept free of imports from the package: ``pipeline/__init__``
uses it before any other module is loaded.
"""

from __future__ import annotations

import gc
from collections.abc import Iterator
from contextlib import contextmanager


@contextmanager
def collection_paused(*, freeze: bool = False) -> Iterator[None]:
    """No collection inside the block; after it, the caller's setting is back.
    ``freeze``: move everything made so far out of the collector's sight
    (:func:`gc.freeze`), so a later full collection does not walk it."""
    collecting = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if freeze:
            gc.freeze()
        if collecting:
            gc.enable()
