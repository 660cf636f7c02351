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
    # no index key of by_user / by_ip moves here: no bucket fence is written for them, the
    # returned object's own compare must catch the change of its content
    "content change of an object find returned": (
        lambda tx: tx.find(Node.by_user, "old"), [Node("o1", "old", "ip-o1", ("new",))], ()),
    "content change of an object first returned": (
        lambda tx: tx.first(Node.by_ip, "ip-o1"), [Node("o1", "old", "ip-o1", ("new",))], ()),
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


def test_an_update_that_keeps_its_index_keys_writes_no_bucket_fence(make_db: MakeDB) -> None:
    """Bucket fences mark objects entering or leaving a key; an update that moves no index
    key (and keeps its unique key, which it already held) owes only the model fence."""
    from txindex.commit import _ops
    from txindex.fences import model_fence
    from txindex.model import info_of

    db = make_db()
    with db.tx() as tx:
        tx.put(Node("k1", "kim", "ip-k1", ("a",), 1.0))
    tx = db.tx()
    tx.put(Node("k1", "kim", "ip-k1", ("a",), 1.0))  # same keys, a new object
    assert tx.predicates == []  # the unique key was held: no predicate, no fence compare
    keys = [op.key for op in _ops(tx)]
    assert keys == [f"{db.prefix}nodes/k1".encode(), model_fence(db.prefix, info_of(Node))]
    tx.put(Node("k1", "kim", "ip-k1", ("a", "b"), 1.0))  # enters by_tag "b"
    fences = [op.key for op in _ops(tx) if b"/bucket/" in op.key]
    assert fences == [bucket_fence(db.prefix, Node.by_tag, "b")]
    tx.put(Node("k1", "kim", "ip-k2", ("a",), 1.0))  # a new unique key is checked
    assert [p[0] for p in tx.predicates] == [Node.by_ip]
    tx.rollback()


def test_equal_keys_share_a_bucket_across_types() -> None:
    assert _canonical(sort_key(1)) == _canonical(sort_key(1.0))
    assert bucket_fence("p/", Node.by_user, "a") == bucket_fence("p/", Node.by_user, "a")
    buckets = {bucket_fence("p/", Node.by_user, f"user{i}") for i in range(200)}
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


def test_fences_always_fit_when_put_accepted_the_writes() -> None:
    """put() admits writes while two fences per model written (model + coarse) and the sync
    key still fit; whatever the bucket counts, the commit's Txn must then fit too (the bucket
    fences of one model must leave room for the coarse fences of the others)."""
    from .models import User

    for nodes in range(0, 10):
        for users in range(0, 10):
            db = txindex.open("memory://", models=[Node, User], max_txn_ops=24)
            try:
                with db.tx() as tx:
                    try:
                        for i in range(nodes):
                            tx.put(Node(f"n{i}", f"u{i}", f"ip{i}", (f"t{i}",)))
                        for i in range(users):
                            tx.put(User(f"m{i}", f"team{i}"))
                    except txindex.TxTooLarge:
                        tx.rollback()
                        continue
            finally:
                db.close()


def test_a_bulk_writer_keeps_the_unique_buckets_other_claims_compare(make_db: MakeDB) -> None:
    """60 new nodes owe more bucket fences than the Txn has room for: the unique index's
    buckets are kept (the other indexes get their coarse fences), so a unique check on
    another value commits without a Conflict or a failed round."""
    bulk = [Node(f"b{i}", f"u{i}", f"ip-b{i}") for i in range(60)]
    mine = "ip-mine"
    assert bucket_fence("x/", Node.by_ip, sort_key(mine)) not in {
        bucket_fence("x/", Node.by_ip, sort_key(n.ip)) for n in bulk
    }  # (buckets are a pure function of the key: no collision by construction)
    db = make_db(timeout=1.0)
    tx = db.tx()
    assert tx.first(Node.by_ip, mine) is None
    tx.put(Node("m1", "me", mine))
    db._watcher.stop()
    other_writes(make_db, bulk)
    assert tx.commit() is not None


def test_bucket_fences_fall_back_to_coarse_fences_within_the_budget() -> None:
    from txindex.commit import _bucket_puts
    from txindex.fences import coarse_fence, index_coarse_fence
    from txindex.model import info_of

    info = info_of(Node)

    def owed(index: txindex.Index[Node], n: int) -> set[bytes]:
        return {bucket_fence("p/", index, sort_key(f"k{i}")) for i in range(n)}

    by_user, by_ip, by_tag = owed(Node.by_user, 3), owed(Node.by_ip, 5), owed(Node.by_tag, 1)
    debt = {Node.by_user: by_user, Node.by_ip: by_ip, Node.by_tag: by_tag}
    assert _bucket_puts("p/", info, debt, 100) == sorted(by_ip) + sorted(by_tag) + sorted(by_user)
    # unique first, then the fewest buckets; an index that does not fit gets its coarse fence
    assert _bucket_puts("p/", info, debt, 8) == [
        *sorted(by_ip), *sorted(by_tag), index_coarse_fence("p/", Node.by_user)
    ]
    assert _bucket_puts("p/", info, debt, 4) == [
        index_coarse_fence("p/", Node.by_ip), *sorted(by_tag),
        index_coarse_fence("p/", Node.by_user),
    ]
    # no room for a fence per index: the model's coarse fence covers the rest
    assert _bucket_puts("p/", info, debt, 2) == [
        index_coarse_fence("p/", Node.by_ip), coarse_fence("p/", info)
    ]
    assert _bucket_puts("p/", info, debt, 1) == [coarse_fence("p/", info)]
