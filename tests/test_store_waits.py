"""Threads waiting for a revision (read-your-writes) wake when the store reaches it, not before."""

from __future__ import annotations

import random
import threading

import pytest

from txindex.store import Store


def test_each_waiter_wakes_when_its_revision_is_applied() -> None:
    store = Store([])
    revisions = list(range(1, 21)) * 2
    random.Random(7).shuffle(revisions)
    results: dict[int, tuple[int, bool]] = {}

    def wait(i: int, rev: int) -> None:
        results[i] = (rev, store.wait_for(rev, timeout=30))

    threads = [threading.Thread(target=wait, args=(i, r)) for i, r in enumerate(revisions)]
    for t in threads:
        t.start()
    for applied in range(1, 21):
        store.apply([(applied, [])])
        for t, rev in zip(threads, revisions, strict=True):
            if rev <= applied:
                t.join(timeout=10)
                assert not t.is_alive(), f"waiter for {rev} still blocked at {applied}"
            else:
                assert t.is_alive(), f"waiter for {rev} returned at {applied}"
    assert sorted(results.values()) == sorted((r, True) for r in revisions)


def test_waits_time_out_and_pin_raises() -> None:
    store = Store([])
    store.apply([(3, [])])
    assert store.wait_for(3, timeout=0)  # already there: no wait
    assert not store.wait_for(4, timeout=0.05)
    with pytest.raises(TimeoutError):
        store.pin(5, timeout=0.05)
    store.advance(5)  # the stale gates left by the timed-out waits are opened and dropped
    assert store._waiters == []
    assert store.pin(5, timeout=0) == 5


def test_close_wakes_every_waiter_with_closed() -> None:
    from txindex import Closed

    store = Store([])
    raised: list[BaseException] = []

    def wait() -> None:
        try:
            store.wait_for(100, timeout=30)
        except BaseException as exc:  # inspected below
            raised.append(exc)

    threads = [threading.Thread(target=wait) for _ in range(3)]
    for t in threads:
        t.start()
    while len(store._waiters) < 3:
        threading.Event().wait(0.005)
    store.close()
    for t in threads:
        t.join(timeout=5)
        assert not t.is_alive(), "a waiter slept on after close"
    assert len(raised) == 3 and all(isinstance(e, Closed) for e in raised)
    with pytest.raises(Closed):
        store.wait_for(100, timeout=30)  # and later waits do not block either
    assert store.wait_for(0, timeout=0)  # a revision already applied is no wait
