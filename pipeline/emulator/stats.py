"""Per-vendor counters served at ``GET /_emulator/stats``.

Tests use them to prove what the vendor saw: how many tasks were created, how many
were billed, and (through ``submits_by_input``) that no input was submitted twice.
"""

from __future__ import annotations

import hashlib
import json
from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

__all__ = ["VendorStats", "request_fingerprint"]


@dataclass
class VendorStats:
    """Counters of one vendor. Every field is in the stats JSON under the same name.

    - ``requests``: every API-host request (``/api/...`` or ``/s2s/...``), dropped ones too.
    - ``submits``: requests that created a task or ran a sync job.
    - ``polls``: task status requests.
    - ``uploads``: Perfect Corp file records created; ``puts``: bytes PUT to storage.
    - ``downloads``: result downloads served (storage host, not API host).
    - ``charged``: billed successes; ``credits_spent``: what they cost (credits or units).
    - ``rejected``: API requests answered with an HTTP error status.
    - ``rate_limited``: of those, refused by the rate limit.
    - ``transient_errors``, ``disconnects``, ``lost_responses``: injected faults.
    - ``task_failures``: tasks that ended failed (never billed).
    - ``expired``: Perfect Corp tasks lost to the polling window (left unpolled longer than
      ``unpolled_window_seconds`` before their result was seen; InvalidTaskId from then
      on). Counted when the next poll finds them gone, or when the stats are read.
    - ``submits_by_input``: sha256 of the input image bytes -> submits.
    - ``submits_by_request``: sha256 of (endpoint, params, every file's sha256) -> submits.
    - ``charged_by_input``: sha256 of the input image bytes -> billed successes (with
      ``submits_by_input``, what a grader counts as "paid twice for one image").
    """

    requests: int = 0
    submits: int = 0
    polls: int = 0
    uploads: int = 0
    puts: int = 0
    downloads: int = 0
    charged: int = 0
    credits_spent: float = 0.0
    rejected: int = 0
    rate_limited: int = 0
    transient_errors: int = 0
    disconnects: int = 0
    lost_responses: int = 0
    task_failures: int = 0
    expired: int = 0
    submits_by_input: Counter[str] = field(default_factory=Counter)
    submits_by_request: Counter[str] = field(default_factory=Counter)
    charged_by_input: Counter[str] = field(default_factory=Counter)

    def count_submit(self, input_digest: str, request_digest: str) -> None:
        """Record one submit that created a task or ran a sync job."""
        self.submits += 1
        self.submits_by_input[input_digest] += 1
        self.submits_by_request[request_digest] += 1

    def count_charge(self, amount: float, input_digest: str) -> None:
        """Record one billed success of ``amount`` for the input with sha256 ``input_digest``."""
        self.charged += 1
        self.credits_spent += amount
        self.charged_by_input[input_digest] += 1

    def as_dict(self) -> dict[str, Any]:
        """The JSON-ready counters."""
        out: dict[str, Any] = {}
        for name in self.__dataclass_fields__:
            value = getattr(self, name)
            out[name] = dict(sorted(value.items())) if isinstance(value, Counter) else value
        return out


def request_fingerprint(
    endpoint: str, params: Mapping[str, object], file_digests: Iterable[str]
) -> str:
    """A stable id of one logical request: same endpoint, params and file bytes."""
    canonical = json.dumps(
        {
            "endpoint": endpoint,
            "params": {k: str(v) for k, v in sorted(params.items())},
            "files": list(file_digests),
        },
        sort_keys=True,
        separators=(",", ":"),
    )
    return hashlib.sha256(canonical.encode()).hexdigest()
