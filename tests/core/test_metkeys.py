"""MetKeys never says "not met" for a key it was given (a false "met" only costs a read)."""

from __future__ import annotations

import hashlib

import hypothesis.strategies as st
from hypothesis import given, settings

from pipeline.metkeys import MetKeys


@settings(max_examples=200, deadline=None)
@given(
    keys=st.lists(st.one_of(st.text(), st.binary().map(lambda b: hashlib.sha256(b).hexdigest())))
)
def test_every_key_added_is_met(keys: list[str]) -> None:
    met = MetKeys()
    for key in keys:
        met.add(key)
    assert all(key in met for key in keys)


def test_false_positives_are_rare_at_a_hundred_thousand_keys() -> None:
    met = MetKeys()
    for i in range(100_000):
        met.add(hashlib.sha256(b"in%d" % i).hexdigest())
    others = [hashlib.sha256(b"out%d" % i).hexdigest() for i in range(100_000)]
    assert sum(key in met for key in others) <= 20  # expected about 0.5
