"""KeyIndex against a sorted list of (key, pk) pairs: a hypothesis state machine adds and
removes items (buckets grow from one primary key to a list to a SortedList and shrink back, with
the bucket sizes made tiny) and checks every read form against the reference after each step."""

from __future__ import annotations

from typing import Any

import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from txindex import keyindex
from txindex.keyindex import KeyIndex
from txindex.ordering import TOP

KEYS = st.integers(0, 12)
PKS = st.integers(0, 40)


def within(pair: tuple[Any, Any], lo: Any, hi: Any) -> bool:
    return (lo is None or pair >= lo) and (hi is None or pair < hi)


BOUNDS = st.one_of(
    st.none(),
    st.builds(lambda k: (k,), KEYS),
    st.builds(lambda k: (k, TOP), KEYS),
)


class KeyIndexMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.ki = KeyIndex()
        self.model: set[tuple[int, int]] = set()

    @rule(key=KEYS, pk=PKS)
    def add(self, key: int, pk: int) -> None:
        if (key, pk) in self.model:
            with pytest.raises(ValueError):
                self.ki.add(key, pk)
            return
        self.ki.add(key, pk)
        self.model.add((key, pk))

    @rule(key=KEYS, pk=PKS)
    def remove_missing(self, key: int, pk: int) -> None:
        if (key, pk) not in self.model:
            with pytest.raises(KeyError):
                self.ki.remove(key, pk)

    @precondition(lambda self: self.model)
    @rule(data=st.data())
    def remove(self, data: st.DataObject) -> None:
        key, pk = data.draw(st.sampled_from(sorted(self.model)))
        self.ki.remove(key, pk)
        self.model.discard((key, pk))

    @rule(key=KEYS, pks=st.lists(PKS, min_size=1, max_size=12, unique=True))
    def fill(self, key: int, pks: list[int]) -> None:
        """Many items under one key: the bucket crosses the list/SortedList thresholds."""
        for pk in pks:
            if (key, pk) not in self.model:
                self.ki.add(key, pk)
                self.model.add((key, pk))

    @rule(lo=BOUNDS, hi=BOUNDS, reverse=st.booleans(), limit=st.none() | st.integers(0, 8))
    def scan_and_count(self, lo: Any, hi: Any, reverse: bool, limit: int | None) -> None:
        want = sorted((p for p in self.model if within(p, lo, hi)), reverse=reverse)
        got = self.ki.scan(lo, hi, reverse, limit)
        assert got == (want if limit is None else want[:limit])
        assert self.ki.count(lo, hi) == len(want)

    @rule(key=KEYS, reverse=st.booleans(), limit=st.none() | st.integers(0, 8))
    def get(self, key: int, reverse: bool, limit: int | None) -> None:
        want = sorted((pk for k, pk in self.model if k == key), reverse=reverse)
        assert self.ki.get(key, reverse, limit) == (want if limit is None else want[:limit])

    @invariant()
    def matches_reference(self) -> None:
        assert list(self.ki.items()) == sorted(self.model)
        assert len(self.ki) == len(self.model)
        self.ki.check()

    @invariant()
    def rebuilt_in_bulk_is_equal(self) -> None:
        bulk = KeyIndex.build(self.model)
        bulk.check()
        assert list(bulk.items()) == sorted(self.model)


@pytest.fixture
def tiny_buckets(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(keyindex, "LARGE", 6)
    monkeypatch.setattr(keyindex, "SMALL", 2)


def test_keyindex_against_sorted_pairs(tiny_buckets: None) -> None:
    KeyIndexMachine.TestCase.settings = settings(max_examples=150, stateful_step_count=60,
                                                 deadline=None)
    KeyIndexMachine.TestCase().runTest()


def test_keyindex_default_buckets_grow_and_shrink() -> None:
    """With the real thresholds: a key past LARGE items is a SortedList, back to a list when
    it shrinks, and scans read across the change."""
    ki = KeyIndex()
    n = keyindex.LARGE + 10
    for pk in range(n):
        ki.add("tag", pk)
    ki.add("other", 5)
    assert type(ki.buckets["tag"]).__name__ == "SortedList"
    assert ki.get("tag", limit=3) == [0, 1, 2]
    assert ki.get("tag", reverse=True, limit=2) == [n - 1, n - 2]
    assert ki.count(("tag",), ("tag", TOP)) == n
    for pk in range(n - keyindex.SMALL):
        ki.remove("tag", pk)
    assert type(ki.buckets["tag"]) is list
    kept = range(n - keyindex.SMALL, n)
    assert ki.scan(None, None) == [("other", 5)] + [("tag", pk) for pk in kept]
    ki.check()
