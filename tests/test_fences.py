"""The server-side half of predicate validation: fence keys.

Each test stops the watcher of the querying database, so local validation sees nothing and
only the compares in the etcd Txn can catch the concurrent write: if a fence were missing, the
commit would succeed and the test would fail.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest

import txindex
from txindex import DB
from txindex.fences import BUCKETS, _canonical, bucket_fence, equality_key
from txindex.ordering import TOP, sort_key

from .models import Node

MakeDB = Callable[..., DB]


def other_writes(make_db: MakeDB, nodes: list[Node], deletes: tuple[str, ...] = ()) -> None:
    with make_db().tx() as tx:
        for n in nodes:
            tx.put(n)
        for pk in deletes:
            tx.delete(Node, pk)


Query = Callable[[txindex.Transaction], object]
SCENARIOS: dict[str, tuple[Query, list[Node], tuple[str, ...]]] = {
    "equality, small writer (bucket fence)": (
        lambda tx: tx.find(Node.by_user, "zed"), [Node("z1", "zed", "ip-z1")], ()),
    "equality, big writer (coarse fence)": (
        lambda tx: tx.find(Node.by_user, "zed"),
        [Node(f"b{i}", "zed" if i == 7 else f"u{i}", f"ip-b{i}") for i in range(60)], ()),
    "unique check (bucket fence)": (
        lambda tx: tx.first(Node.by_ip, "ip-taken"), [Node("t1", "x", "ip-taken")], ()),
    "count over a multi index": (
        lambda tx: tx.count(Node.by_tag, "gpu"), [Node("g1", "x", "ip-g1", ("gpu",))], ()),
    "range (model fence)": (
        lambda tx: list(tx.range(Node.active, 100.0, None)),
        [Node("r1", "x", "ip-r1", (), 150.0)], ()),
    "delete seen by an equality query": (
        lambda tx: tx.find(Node.by_user, "old"), [], ("o1",)),
}


@pytest.mark.parametrize("scenario", list(SCENARIOS))
def test_concurrent_change_in_a_predicate_conflicts(make_db: MakeDB, scenario: str) -> None:
    query, nodes, deletes = SCENARIOS[scenario]
    other_writes(make_db, [Node("o1", "old", "ip-o1")])
    db = make_db(timeout=1.0)
    tx = db.tx()
    query(tx)
    tx.put(Node("mine", "me", "ip-mine"))
    db._watcher.stop()  # from here on the cache does not move: only etcd can object
    other_writes(make_db, nodes, deletes)
    with pytest.raises(txindex.Conflict):
        tx.commit()


def test_disjoint_equality_queries_commit_without_rounds(make_db: MakeDB) -> None:
    """Writers of other index keys do not touch this transaction's bucket fences."""
    db = make_db(timeout=1.0)
    tx = db.tx()
    assert tx.find(Node.by_user, "alone") == []
    tx.put(Node("a1", "alone", "ip-a1"))
    db._watcher.stop()
    other_writes(make_db, [Node(f"x{i}", f"user{i}", f"ip-x{i}") for i in range(5)])
    assert tx.commit() is not None  # no Conflict, and no round that waits for the cache


def test_equal_keys_share_a_bucket_across_types() -> None:
    assert _canonical(sort_key(1)) == _canonical(sort_key(1.0))
    assert bucket_fence("p/", Node.by_user, sort_key("a")) == bucket_fence(
        "p/", Node.by_user, sort_key("a"))
    buckets = {bucket_fence("p/", Node.by_user, sort_key(f"user{i}")) for i in range(200)}
    assert len(buckets) > 150  # spread over BUCKETS
    assert all(int(b.rsplit(b"/", 1)[1]) < BUCKETS for b in buckets)


def test_equality_key_recognises_only_exact_bounds() -> None:
    k = sort_key("alice")
    assert equality_key((k,), (k, TOP)) == k
    assert equality_key((k,), None) is None
    assert equality_key(None, (k, TOP)) is None
    assert equality_key((k,), (sort_key("bob"),)) is None
    lo, hi = Node.by_user_seen.eq_bounds(("alice",))  # a prefix of a compound key
    assert equality_key(lo, hi) is None
    lo, hi = Node.by_user_seen.eq_bounds(("alice", 1.0))
    assert equality_key(lo, hi) is not None
