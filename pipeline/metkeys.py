"""Which item keys a run has met: a fixed-size Bloom filter over their digests.

The engine asks "did this run meet this key already?" to decide whether an item's
journal row, read with its batch, may be stale (another input of the same content was
processed since) and must be read again. A false "yes" costs one extra journal read; a
false "no" is impossible. A set of 10^6 keys would hold 200 MB of strings; this holds
1 MiB whatever the run's size (false positives: about 5 in 10^6 lookups at 10^5 keys,
2% at 10^6). Hand-written (a dozen lines) rather than a dependency: it needs no hash
functions of its own, the keys are SHA-256 hex digests (pipeline.identity).
"""

from __future__ import annotations

__all__ = ["MetKeys"]

_BITS = 1 << 23  # 1 MiB
_PROBES = 4


class MetKeys:
    """``add(key)``; ``key in met``. Keys are hexadecimal digests (at least 24 digits);
    anything else is hashed to one first."""

    def __init__(self) -> None:
        self._bits = bytearray(_BITS // 8)

    @staticmethod
    def _positions(key: str) -> list[int]:
        digest = key if len(key) >= 6 * _PROBES and _is_hex(key) else _hex(key)
        return [int(digest[6 * i : 6 * i + 6], 16) % _BITS for i in range(_PROBES)]

    def add(self, key: str) -> None:
        for pos in self._positions(key):
            self._bits[pos >> 3] |= 1 << (pos & 7)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        return all(self._bits[pos >> 3] & (1 << (pos & 7)) for pos in self._positions(key))


_HEX = frozenset("0123456789abcdef")


def _is_hex(text: str) -> bool:
    return set(text[: 6 * _PROBES]) <= _HEX


def _hex(text: str) -> str:
    from hashlib import sha256

    return sha256(text.encode("utf-8", "surrogatepass")).hexdigest()
