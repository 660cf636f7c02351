"""One conformance suite for every Backend: the memory backend must behave like real etcd.

Every test runs twice (``backend`` is parametrized over memory and etcd) and touches only keys
under its own ``prefix``. Compaction on the shared etcd server only drops revisions older than
the compacting test's own writes, so sequential tests are unaffected.
"""

from __future__ import annotations

import pytest

from txindex.backend import (
    Backend,
    Compare,
    Delete,
    Event,
    Op,
    Put,
    RequestRejected,
    WatchResponse,
    WatchStream,
    prefix_end,
    successor,
)
from txindex.backend.base import CompareOp, CompareTarget
from txindex.errors import Compacted, TxTooLarge, WatchBroken


class Keys:
    def __init__(self, prefix: str) -> None:
        self.prefix = prefix.encode()
        self.end = prefix_end(self.prefix)

    def __call__(self, name: str) -> bytes:
        return self.prefix + name.encode()


@pytest.fixture
def k(prefix: str) -> Keys:
    return Keys(prefix)


def put(b: Backend, *pairs: tuple[bytes, bytes]) -> int:
    """One Txn putting every pair; returns its commit revision."""
    res = b.txn([], [Put(key, value) for key, value in pairs])
    assert res.succeeded
    return res.revision


def delete(b: Backend, key: bytes, range_end: bytes | None = None) -> int:
    return b.txn([], [Delete(key, range_end)]).revision


def next_events(stream: WatchStream, until: int, timeout: float = 10.0) -> list[WatchResponse]:
    """Event responses until one reaches revision ``until``; fails on a timeout."""
    out: list[WatchResponse] = []
    while not out or out[-1].revision < until:
        resp = stream.get(timeout)
        assert resp is not None, f"no watch response within {timeout}s (got {out})"
        if not resp.progress:
            out.append(resp)
    return out


def test_revisions_and_key_metadata(backend: Backend, k: Keys) -> None:
    r0 = backend.current_revision()
    r1 = put(backend, (k("a"), b"1"))
    assert r1 == r0 + 1 == backend.current_revision()
    r2 = put(backend, (k("a"), b"2"))
    (kv,) = backend.range(k("a"), b"").kvs
    assert (kv.value, kv.create_revision, kv.mod_revision, kv.version) == (b"2", r1, r2, 2)

    r3 = put(backend, (k("b"), b"x"), (k("c"), b"y"))  # one Txn, one revision
    assert r3 == r2 + 1
    page = backend.range(k(""), k.end)
    assert [(kv.key, kv.mod_revision) for kv in page.kvs] == [
        (k("a"), r2),
        (k("b"), r3),
        (k("c"), r3),
    ]
    assert page.revision == r3

    r4 = delete(backend, k("a"))
    r5 = put(backend, (k("a"), b"3"))  # recreate: version and create_revision start over
    assert r5 == r4 + 1
    (kv,) = backend.range(k("a"), b"").kvs
    assert (kv.create_revision, kv.mod_revision, kv.version) == (r5, r5, 1)


def test_txn_without_changes_does_not_bump(backend: Backend, k: Keys) -> None:
    r = put(backend, (k("a"), b"1"))
    assert backend.txn([], []).revision == r
    failed = backend.txn([Compare(k("a"), "mod", "=", 0)], [Put(k("a"), b"2")])
    assert (failed.succeeded, failed.revision) == (False, r)
    assert delete(backend, k("missing")) == r  # deleting nothing changes nothing
    assert backend.current_revision() == r
    ok = backend.txn([Compare(k("a"), "mod", "=", r)], [Put(k("a"), b"2")], [])
    assert (ok.succeeded, ok.revision) == (True, r + 1)


def test_range_paging_at_pinned_revision(backend: Backend, k: Keys) -> None:
    for i in range(10):
        put(backend, (k(f"{i:02d}"), str(i).encode()))
    pinned = backend.current_revision()
    put(backend, (k("05x"), b"late"))  # after the pin: invisible to the pinned pages
    delete(backend, k("00"))

    seen: list[bytes] = []
    start = k("")
    while True:
        page = backend.range(start, k.end, revision=pinned, limit=3)
        assert page.revision >= pinned + 2
        assert len(page.kvs) <= 3
        seen.extend(kv.key for kv in page.kvs)
        if not page.more:
            break
        assert len(page.kvs) == 3
        start = successor(page.kvs[-1].key)
    assert seen == [k(f"{i:02d}") for i in range(10)]

    exact = backend.range(k(""), k.end, revision=pinned, limit=10)
    assert (len(exact.kvs), exact.more) == (10, False)
    latest = backend.range(k(""), k.end)
    assert [kv.key for kv in latest.kvs][:6] == [k(f"{i:02d}") for i in range(1, 6)] + [k("05x")]


def test_range_at_old_revision(backend: Backend, k: Keys) -> None:
    r1 = put(backend, (k("a"), b"1"))
    r2 = put(backend, (k("a"), b"2"))
    r3 = delete(backend, k("a"))
    assert [kv.value for kv in backend.range(k("a"), b"", revision=r1).kvs] == [b"1"]
    assert [kv.value for kv in backend.range(k("a"), b"", revision=r2).kvs] == [b"2"]
    assert backend.range(k("a"), b"", revision=r3).kvs == ()
    assert backend.range(k("a"), b"", revision=r1 - 1).kvs == ()
    with pytest.raises(RequestRejected):
        backend.range(k("a"), b"", revision=r3 + 1000)


def test_compaction(backend: Backend, k: Keys) -> None:
    r1 = put(backend, (k("a"), b"1"))
    r2 = put(backend, (k("a"), b"2"))
    r3 = put(backend, (k("b"), b"3"))
    backend.compact(r2)
    with pytest.raises(Compacted) as exc:
        backend.range(k(""), k.end, revision=r1)
    assert exc.value.compact_revision == r2
    assert [kv.value for kv in backend.range(k(""), k.end, revision=r2).kvs] == [b"2"]
    assert len(backend.range(k(""), k.end, revision=r3).kvs) == 2
    with pytest.raises(Compacted):
        backend.compact(r1)

    stream = backend.watch(k(""), k.end, r1)
    try:
        with pytest.raises(Compacted) as wexc:
            while stream.get(10.0) is not None:
                pass
        assert wexc.value.compact_revision == r2
    finally:
        stream.close()

    stream = backend.watch(k(""), k.end, r2)  # the compact revision itself is still readable
    try:
        events = [e for resp in next_events(stream, r3) for e in resp.events]
        assert [(e.key, e.mod_revision) for e in events] == [(k("a"), r2), (k("b"), r3)]
    finally:
        stream.close()


POINT_CASES: list[tuple[CompareTarget, CompareOp, int | bytes | str, bool]] = [
    # (target, op, value, expected) against key "a": created at r1 as b"x", updated at r2 to b"y"
    ("mod", "=", "r2", True),
    ("mod", "=", "r1", False),
    ("mod", "!=", "r1", True),
    ("mod", "<", "r2", False),
    ("mod", "<", "r2+1", True),
    ("mod", ">", "r1", True),
    ("create", "=", "r1", True),
    ("create", ">", "r1", False),
    ("version", "=", 2, True),
    ("version", ">", 2, False),
    ("version", "<", 3, True),
    ("value", "=", b"y", True),
    ("value", "!=", b"x", True),
    ("value", "<", b"z", True),
    ("value", ">", b"z", False),
]
MISSING_CASES: list[tuple[CompareTarget, CompareOp, int | bytes, bool]] = [
    ("mod", "=", 0, True),
    ("create", "=", 0, True),
    ("version", "=", 0, True),
    ("mod", ">", 0, False),
    ("mod", "<", 5, True),
    ("mod", "!=", 0, False),
    ("value", "=", b"", False),  # a value compare on a missing key always fails
    ("value", "!=", b"q", False),
]


def test_point_compares(backend: Backend, k: Keys) -> None:
    r1 = put(backend, (k("a"), b"x"))
    r2 = put(backend, (k("a"), b"y"))
    revs = {"r1": r1, "r2": r2, "r2+1": r2 + 1}
    before = backend.current_revision()
    for target, op, value, expected in POINT_CASES:
        v: int | bytes = revs[value] if isinstance(value, str) else value
        res = backend.txn([Compare(k("a"), target, op, v)], [])
        assert res.succeeded is expected, (target, op, value)
    for target, op, value, expected in MISSING_CASES:
        res = backend.txn([Compare(k("missing"), target, op, value)], [])
        assert res.succeeded is expected, ("missing", target, op, value)
    both = [Compare(k("a"), "mod", "=", r2), Compare(k("missing"), "mod", "=", 0)]
    assert backend.txn(both, []).succeeded
    assert not backend.txn([*both, Compare(k("a"), "version", "=", 1)], []).succeeded
    assert backend.current_revision() == before


def test_range_compares(backend: Backend, k: Keys) -> None:
    ra = put(backend, (k("r/a"), b"1"))
    rb = put(backend, (k("r/b"), b"2"))
    lo, hi = k("r/"), prefix_end(k("r/"))

    def holds(
        target: CompareTarget, op: CompareOp, value: int | bytes, key: bytes = lo, end: bytes = hi
    ) -> bool:
        return backend.txn([Compare(key, target, op, value, range_end=end)], []).succeeded

    assert holds("mod", "<", rb + 1)  # every key
    assert not holds("mod", "<", rb)  # r/b fails
    assert holds("mod", ">", ra - 1)
    assert holds("create", ">", 0)
    assert holds("version", "=", 1)
    assert holds("value", ">", b"0")
    assert not holds("value", "=", b"1")
    # An empty range compares as one all-zero KeyValue (etcd's applyCompare), not vacuously:
    empty, empty_end = k("e/"), prefix_end(k("e/"))
    assert holds("mod", "=", 0, empty, empty_end)
    assert holds("mod", "<", 1, empty, empty_end)
    assert not holds("mod", ">", 0, empty, empty_end)
    assert not holds("value", "=", b"", empty, empty_end)

    # Inserts and updates in the range are visible to a mod compare ...
    guard = Compare(lo, "mod", "<", rb + 1, range_end=hi)
    rc = put(backend, (k("r/c"), b"3"))
    assert not backend.txn([guard], []).succeeded
    # ... but a delete is not: the deleted key simply leaves the range.
    delete(backend, k("r/c"))
    delete(backend, k("r/b"))
    assert rc > rb
    assert backend.txn([guard], []).succeeded


def test_duplicate_keys_rejected(backend: Backend, k: Keys) -> None:
    r = put(backend, (k("a"), b"1"))
    bad_lists: list[list[Op]] = [
        [Put(k("a"), b"1"), Put(k("a"), b"2")],
        [Put(k("x/1"), b"1"), Delete(k("x/"), prefix_end(k("x/")))],
        [Delete(k("a")), Put(k("a"), b"2")],
    ]
    for ops in bad_lists:
        with pytest.raises(RequestRejected):
            backend.txn([], ops)
        with pytest.raises(RequestRejected):  # checked even when the branch does not run
            backend.txn([], [], ops)
    backend.txn([], [Delete(k("a")), Delete(k("a"))])  # overlapping deletes are allowed
    assert backend.current_revision() == r + 1


def test_too_many_ops(backend: Backend, k: Keys) -> None:
    r0 = backend.current_revision()
    with pytest.raises(TxTooLarge):
        backend.txn([], [Put(k(f"{i:03d}"), b"v") for i in range(129)])
    with pytest.raises(TxTooLarge):
        backend.txn([Compare(k(f"{i:03d}"), "mod", "=", 0) for i in range(129)], [])
    with pytest.raises(TxTooLarge):
        backend.txn([], [], [Delete(k(f"{i:03d}")) for i in range(129)])
    assert backend.current_revision() == r0
    r = backend.txn(
        [Compare(k(f"{i:03d}"), "mod", "=", 0) for i in range(128)],
        [Put(k(f"{i:03d}"), b"v") for i in range(128)],
    )
    assert (r.succeeded, r.revision) == (True, r0 + 1)
    assert len(backend.range(k(""), k.end).kvs) == 128


def test_watch_replays_history(backend: Backend, k: Keys) -> None:
    r1 = put(backend, (k("a"), b"1"))
    r2 = put(backend, (k("b"), b"2"), (k("c"), b"3"))
    put(backend, (b"other-" + k("x"), b"outside"))  # not in the watched range
    r3 = delete(backend, k(""), k.end)
    r4 = put(backend, (k("a"), b"4"))
    stream = backend.watch(k(""), k.end, r1)
    try:
        responses = next_events(stream, r4)
    finally:
        stream.close()
    events = [e for resp in responses for e in resp.events]
    assert events == [
        Event(k("a"), b"1", r1, deleted=False),
        Event(k("b"), b"2", r2, deleted=False),
        Event(k("c"), b"3", r2, deleted=False),
        Event(k("a"), b"", r3, deleted=True),
        Event(k("b"), b"", r3, deleted=True),
        Event(k("c"), b"", r3, deleted=True),
        Event(k("a"), b"4", r4, deleted=False),
    ]
    for resp in responses:  # complete revisions, in order, revision = the batch's last one
        assert resp.revision == resp.events[-1].mod_revision
        revs = [e.mod_revision for e in resp.events]
        assert revs == sorted(revs)


def test_watch_live_events_grouped_by_revision(backend: Backend, k: Keys) -> None:
    start = backend.current_revision() + 1
    stream = backend.watch(k(""), k.end, start)
    try:
        assert stream.get(0.2) is None  # nothing yet (the created response is internal)
        r1 = put(backend, (k("a"), b"1"), (k("b"), b"2"), (k("c"), b"3"))
        (resp,) = next_events(stream, r1)
        assert resp.revision == r1 and not resp.progress
        assert [(e.key, e.mod_revision, e.deleted) for e in resp.events] == [
            (k("a"), r1, False),
            (k("b"), r1, False),
            (k("c"), r1, False),
        ]
        r2 = delete(backend, k("a"), k("c"))  # deletes a and b
        (resp,) = next_events(stream, r2)
        assert [(e.key, e.value, e.mod_revision, e.deleted) for e in resp.events] == [
            (k("a"), b"", r2, True),
            (k("b"), b"", r2, True),
        ]
    finally:
        stream.close()


def test_progress_notification(backend: Backend, k: Keys) -> None:
    r1 = put(backend, (k("a"), b"1"))
    stream = backend.watch(k(""), k.end, r1 + 1)
    try:
        put(backend, (b"other-" + k("a"), b"x"))  # a write outside the range
        last = backend.current_revision()
        stream.request_progress()
        resp = stream.get(10.0)
        assert resp is not None
        assert resp.progress and resp.events == ()
        assert resp.revision >= last
    finally:
        stream.close()


def test_watch_close(backend: Backend, k: Keys) -> None:
    stream = backend.watch(k(""), k.end, backend.current_revision() + 1)
    stream.close()
    stream.close()  # idempotent
    with pytest.raises(WatchBroken):
        stream.get(1.0)


def test_compaction_drops_tombstone_at_compact_revision(backend: Backend, k: Keys) -> None:
    r1 = put(backend, (k("a"), b"1"), (k("b"), b"1"))
    r2 = backend.txn([], [Delete(k("a")), Put(k("b"), b"2")]).revision
    r3 = put(backend, (k("c"), b"3"))
    backend.compact(r2)
    assert r2 == r1 + 1
    stream = backend.watch(k(""), k.end, r2)
    try:
        events = [e for resp in next_events(stream, r3) for e in resp.events]
    finally:
        stream.close()
    # etcd compacts a delete at exactly the compact revision away, so a watch from there
    # sees the surviving put of that revision but not the delete.
    assert [(e.key, e.mod_revision, e.deleted) for e in events] == [
        (k("b"), r2, False),
        (k("c"), r3, False),
    ]
    assert [kv.key for kv in backend.range(k(""), k.end, revision=r2).kvs] == [k("b")]
