"""Finding an API key in text a vendor sent back, in whole, in part or encoded.

A vendor may echo the key in an error message, a code, a request id or a URL
(README "Using real API keys": the key never appears in logs, reports, the journal
or exceptions). Matching only the whole key missed three ways it comes back:

* cut: messages are clipped to a few hundred characters before anything else sees
  them, and a key that straddles the cut survived as all but its last characters;
* encoded: as hex, or base64 inside a longer string (``"Bearer " + key``), where
  its characters fall at a different offset from the key's own base64;
* split: halves of the key in two fields of one answer.

So a text is searched for *runs* of the key's characters, not only the whole key:
any run of at least :data:`MIN_RUN` consecutive characters of the key or one of its
encodings, in either case, is replaced. A key shorter than that is matched whole
(its forms), as before: a run of a few characters turns up in ordinary text by
chance. The search looks up only every ``g``-th window of the text (``g`` half a
run) in an index of the forms' ``g``-grams, then extends each hit both ways, so it
costs a few microseconds for a message, whatever the key.
"""

from __future__ import annotations

import base64
import binascii
from dataclasses import dataclass
from functools import lru_cache
from urllib.parse import quote, quote_plus

__all__ = ["MIN_RUN", "REPLACEMENT", "contains_secret", "redact_secret", "secret_forms"]

# A run this long of a 32-character random key leaves 20 characters unknown: far past
# guessing. Shorter runs of an ordinary key collide with ordinary text by chance.
MIN_RUN = 12
REPLACEMENT = "***"
_ASCII_LOWER = str.maketrans("ABCDEFGHIJKLMNOPQRSTUVWXYZ", "abcdefghijklmnopqrstuvwxyz")


def secret_forms(secret: str) -> tuple[str, ...]:
    """The key and the forms a vendor could echo it back in: URL-encoded (path and
    form style), hex, and base64 (standard and URL-safe) at each of the three
    offsets a key can sit at inside a longer encoded string (the characters that
    depend on the key's bytes alone). Longest first."""
    raw = secret.encode()
    forms = {secret, quote(secret, safe=""), quote_plus(secret), binascii.hexlify(raw).decode()}
    for offset in range(3):
        for encode in (base64.b64encode, base64.urlsafe_b64encode):
            text = encode(b"\0" * offset + raw).decode().rstrip("=")
            # Inside a longer string, the first group of four mixes in the bytes
            # before the key (offset > 0), and a last, partial one those after it.
            core = text[(4 if offset else 0) : len(text) - len(text) % 4]
            if core:
                forms.add(core)
    return tuple(sorted(forms, key=len, reverse=True))


@dataclass(frozen=True)
class _Index:
    forms: tuple[str, ...]  # lower-cased (ASCII), longest first
    gram: int  # window length looked up; runs of 2 * gram - 1 always contain one
    grams: dict[str, tuple[tuple[int, int], ...]]  # window -> (form, offset) pairs


@lru_cache(maxsize=8)
def _index(secret: str) -> _Index | None:
    """The run index of a key long enough to be matched by runs (None: whole only)."""
    if len(secret) < MIN_RUN:
        return None
    forms = tuple(f.translate(_ASCII_LOWER) for f in secret_forms(secret))
    gram = MIN_RUN // 2
    grams: dict[str, list[tuple[int, int]]] = {}
    for number, form in enumerate(forms):
        for offset in range(len(form) - gram + 1):
            grams.setdefault(form[offset : offset + gram], []).append((number, offset))
    return _Index(forms, gram, {k: tuple(v) for k, v in grams.items()})


def _spans(text: str, secret: str) -> list[tuple[int, int]]:
    """The merged ``[start, end)`` spans of ``text`` that carry the key (see module)."""
    index = _index(secret)
    if index is None:
        found = []
        for form in secret_forms(secret):
            at = text.find(form)
            while at >= 0:
                found.append((at, at + len(form)))
                at = text.find(form, at + 1)
        return _merge(found)
    low = text.translate(_ASCII_LOWER)  # same length as text: ASCII letters only
    gram, size = index.gram, len(low)
    found = []
    for at in range(0, size - gram + 1, gram):
        for number, offset in index.grams.get(low[at : at + gram], ()):
            form = index.forms[number]
            start, back = at, offset
            while start > 0 and back > 0 and low[start - 1] == form[back - 1]:
                start, back = start - 1, back - 1
            end, ahead = at + gram, offset + gram
            while end < size and ahead < len(form) and low[end] == form[ahead]:
                end, ahead = end + 1, ahead + 1
            if end - start >= MIN_RUN:
                found.append((start, end))
    return _merge(found)


def _merge(spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    merged: list[tuple[int, int]] = []
    for start, end in sorted(spans):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def contains_secret(text: str, secret: str | None) -> bool:
    """Whether ``text`` carries ``secret`` as :func:`redact_secret` finds it."""
    if not secret:
        return False
    return bool(_spans(text, secret))


def redact_secret(text: str, secret: str | None) -> str:
    """``text`` with every span that carries ``secret`` replaced by ``***``."""
    if not secret or not text:
        return text
    spans = _spans(text, secret)
    if not spans:
        return text
    pieces, last = [], 0
    for start, end in spans:
        pieces += [text[last:start], REPLACEMENT]
        last = end
    pieces.append(text[last:])
    return "".join(pieces)
