"""Transaction semantics on both backends: snapshots, own writes, rollback, conflicts, misuse."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest

import txindex
from txindex import DB
from txindex.server import EtcdServer

from .models import Counter, Node, User

MakeDB = Callable[..., DB]


def test_put_get_delete_roundtrip(make_db: MakeDB) -> None:
    db = make_db()
    n = Node("n1", "alice", "100.64.0.1", ("prod",), 5.0)
    with db.tx() as tx:
        assert tx.get(Node, "n1") is None
        tx.put(n)
        assert tx.get(Node, "n1") == n
    with db.read() as tx:
        assert tx.get(Node, "n1") == n
    with db.tx() as tx:
        tx.delete(Node, "n1")
        assert tx.get(Node, "n1") is None
    with db.read() as tx:
        assert tx.get(Node, "n1") is None


def test_reads_hand_out_the_cached_object(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(User("u1", "a"))
    with db.read() as t1, db.read() as t2:
        assert t1.get(User, "u1") is t2.get(User, "u1")


def test_rollback_leaves_no_trace(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Node("n1", "alice", "ip1"))
    with db.read() as r:
        rev = r.revision
    with pytest.raises(RuntimeError), db.tx() as tx:
        tx.put(Node("n2", "alice", "ip2"))
        tx.delete(Node, "n1")
        assert [n.id for n in tx.find(Node.by_user, "alice")] == ["n2"]
        raise RuntimeError("boom")
    with db.read() as tx:
        assert [n.id for n in tx.find(Node.by_user, "alice")] == ["n1"]
        assert tx.get(Node, "n2") is None
        assert tx.revision == rev


def test_read_snapshot_ignores_later_commits(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Node("n1", "alice", "ip1"))
    with db.read() as snap:
        assert snap.get(Node, "n1") is not None  # pins the snapshot
        with db.tx() as tx:
            tx.put(Node("n1", "bob", "ip1"))
            tx.put(Node("n2", "alice", "ip2"))
        with db.read() as fresh:
            assert fresh.get(Node, "n1").user == "bob"  # type: ignore[union-attr]
        assert snap.get(Node, "n1").user == "alice"  # type: ignore[union-attr]
        assert [n.id for n in snap.find(Node.by_user, "alice")] == ["n1"]
        assert snap.find(Node.by_user, "bob") == []
        assert snap.count(Node.by_user, "alice") == 1
        assert snap.get(Node, "n2") is None


def test_lost_update_is_a_conflict(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Counter(1, 0))
    t1, t2 = db.tx(), db.tx()
    v1 = t1.get(Counter, 1)
    v2 = t2.get(Counter, 1)
    assert v1 is not None and v2 is not None
    t1.put(Counter(1, v1.value + 1))
    t2.put(Counter(1, v2.value + 1))
    t1.commit()
    with pytest.raises(txindex.Conflict):
        t2.commit()
    with db.read() as tx:
        assert tx.get(Counter, 1) == Counter(1, 1)


def test_absent_read_conflicts_with_create(make_db: MakeDB) -> None:
    db = make_db()
    t1 = db.tx()
    assert t1.get(User, "ghost") is None
    t1.put(User("other", "x"))
    with db.tx() as t2:
        t2.put(User("ghost", "y"))
    with pytest.raises(txindex.Conflict):
        t1.commit()


def test_transact_retries_conflicts_with_threads(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Counter(7, 0))

    def bump(tx: txindex.Transaction) -> None:
        c = tx.get(Counter, 7)
        assert c is not None
        tx.put(Counter(7, c.value + 1))

    def worker() -> None:
        for _ in range(15):
            db.transact(bump, attempts=200)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    with db.read() as tx:
        assert tx.get(Counter, 7) == Counter(7, 60)


def test_transact_on_a_hot_key_starves_no_thread(make_db: MakeDB) -> None:
    """Threads incrementing one key for a while: a retry takes the DB's turn
    (txindex.turns), so every thread keeps committing and none gives up (without turns, one
    thread made ~4,000 commits while the others made 1 each, and some gave up)."""
    db = make_db()
    with db.tx() as tx:
        tx.put(Counter(9, 0))
    threads, seconds = 4, 1.5
    commits = [0] * threads
    gave_up: list[BaseException] = []
    start = threading.Barrier(threads)

    def bump(tx: txindex.Transaction) -> None:
        c = tx.get(Counter, 9)
        assert c is not None
        tx.put(Counter(9, c.value + 1))

    def worker(t: int) -> None:
        start.wait()
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            try:
                db.transact(bump, attempts=10)
            except txindex.Conflict as e:
                gave_up.append(e)
                return
            commits[t] += 1

    ts = [threading.Thread(target=worker, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not gave_up, gave_up[:1]
    assert min(commits) * 4 >= sum(commits) / threads, commits
    with db.read() as tx:
        assert tx.get(Counter, 9) == Counter(9, sum(commits))


def test_transact_returns_value_and_reraises_other_errors(make_db: MakeDB) -> None:
    db = make_db()
    assert db.transact(lambda tx: tx.put(User("a")) or 42) == 42
    with pytest.raises(KeyError):
        db.transact(lambda tx: {}["missing"])
    calls: list[int] = []

    def always_conflicts(tx: txindex.Transaction) -> None:
        calls.append(1)
        raise txindex.Conflict("synthetic")

    with pytest.raises(txindex.Conflict):
        db.transact(always_conflicts, attempts=3)
    assert len(calls) == 3


def test_own_writes_in_every_query(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Node("a", "alice", "ip-a", ("prod",), 1.0))
        tx.put(Node("b", "bob", "ip-b", ("dev",), 2.0))
    with db.tx() as tx:
        tx.put(Node("a", "bob", "ip-a", ("dev", "gpu"), 0.0))  # moves a: alice -> bob
        tx.put(Node("c", "alice", "ip-c", ("prod",), 3.0))
        tx.delete(Node, "b")
        assert [n.id for n in tx.find(Node.by_user, "alice")] == ["c"]
        assert [n.id for n in tx.find(Node.by_user, "bob")] == ["a"]
        assert tx.count(Node.by_user, "bob") == 1
        assert [n.id for n in tx.find(Node.by_tag, "dev")] == ["a"]
        assert [n.id for n in tx.find(Node.by_tag, "prod")] == ["c"]
        assert [n.id for n in tx.range(Node.active, 0.5, None)] == ["c"]
        assert [n.id for n in tx.range(Node.by_user, None, None, reverse=True)] == ["a", "c"]
        assert tx.first(Node.by_ip, "ip-b") is None
        assert tx.first(Node.by_ip, "ip-a") == Node("a", "bob", "ip-a", ("dev", "gpu"), 0.0)
    with db.read() as tx:
        assert [n.id for n in tx.find(Node.by_user, "bob")] == ["a"]
        assert tx.find(Node.by_tag, "dev") == [tx.get(Node, "a")]


def test_unique_violation_names_index_value_holder(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Node("n1", "alice", "10.0.0.1"))
    with db.tx() as tx:
        with pytest.raises(txindex.UniqueViolation) as err:
            tx.put(Node("n2", "bob", "10.0.0.1"))
        assert (err.value.index, err.value.value, err.value.holder) == (
            "Node.by_ip", "10.0.0.1", "n1")
        tx.put(Node("n1", "alice", "10.0.0.9"))  # free the address first ...
        tx.put(Node("n2", "bob", "10.0.0.1"))  # ... then it can be taken
        # n1 held the address in the snapshot, but this transaction gave it to n2
        with pytest.raises(txindex.UniqueViolation) as err:
            tx.put(Node("n1", "alice", "10.0.0.1"))
        assert err.value.holder == "n2"
    with db.read() as tx:
        assert tx.first(Node.by_ip, "10.0.0.1") == Node("n2", "bob", "10.0.0.1")


def test_misuse_gives_clear_errors(make_db: MakeDB) -> None:
    db = make_db()
    tx = db.tx()
    tx.put(User("u"))
    tx.commit()
    with pytest.raises(txindex.Closed):
        tx.get(User, "u")
    with pytest.raises(txindex.Closed):
        tx.put(User("v"))
    with db.tx() as tx2:
        with pytest.raises(txindex.ModelError, match="not a txindex model"):
            tx2.put(object())
        with pytest.raises(txindex.ModelError, match="must be str"):
            tx2.get(User, 5)
        with pytest.raises(txindex.ModelError):
            tx2.get(dict, "x")
        surrogate = "file-\udcff"  # (from a surrogateescape-decoded name): no UTF-8 key
        with pytest.raises(txindex.ModelError, match="not valid Unicode"):
            tx2.put(User(surrogate))
        with pytest.raises(txindex.ModelError, match="not valid Unicode"):
            tx2.delete(User, surrogate)
        tx2.put(User("ünïcode-✓"))  # any valid text is a key
    with db.read() as rtx, pytest.raises(txindex.ModelError, match="read-only"):
        rtx.put(User("w"))


def test_closed_db(make_db: MakeDB) -> None:
    db = make_db()
    db.close()
    with pytest.raises(txindex.Closed):
        db.tx()
    with pytest.raises(txindex.Closed):
        db.read()
    db.close()  # idempotent


def test_too_many_writes(make_db: MakeDB) -> None:
    db = make_db(max_txn_ops=8)
    with db.tx() as tx:
        for i in range(5):  # 5 writes + two fences for the model + one sync key = 8 operations
            tx.put(Counter(i))
        with pytest.raises(txindex.TxTooLarge, match="max-txn-ops"):
            tx.put(Counter(99))
        tx.put(Counter(3, 33))  # rewriting a key already in the write set costs nothing
    with db.read() as tx:
        assert [tx.get(Counter, i) for i in range(5)] == [
            Counter(i, 33 if i == 3 else 0) for i in range(5)]
        assert tx.get(Counter, 99) is None


def test_too_many_bytes(make_db: MakeDB) -> None:
    db = make_db()
    with pytest.raises(txindex.TxTooLarge, match="bytes"), db.tx() as tx:
        for i in range(4):
            tx.put(User(f"big{i}", "x" * 500_000))
    with db.read() as tx:
        assert tx.get(User, "big0") is None


def test_large_read_set_is_not_an_error(make_db: MakeDB) -> None:
    db = make_db(max_txn_ops=16)
    with db.tx() as tx:
        for i in range(10):
            tx.put(Counter(i))
    with db.tx() as tx:
        seen = [tx.get(Counter, i) for i in range(300)]
        tx.put(Counter(0, sum(c.value for c in seen if c is not None) + 1))
    with db.read() as tx:
        assert tx.get(Counter, 0) == Counter(0, 1)


def test_large_read_set_still_conflicts(make_db: MakeDB) -> None:
    with make_db().tx() as tx:
        for i in range(40):
            tx.put(Counter(i))
    db = make_db(max_txn_ops=16)
    t1 = db.tx()
    for i in range(40):
        t1.get(Counter, i)
    t1.put(Counter(100))
    with db.tx() as t2:
        t2.delete(Counter, 33)
    with pytest.raises(txindex.Conflict):
        t1.commit()


def test_read_only_transaction_does_not_conflict(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Counter(1, 1))
    with db.read() as r:
        assert r.get(Counter, 1) == Counter(1, 1)
        with db.tx() as tx:
            tx.put(Counter(1, 2))
        assert r.get(Counter, 1) == Counter(1, 1)
    # leaving the block is not an error: nothing to commit, nothing to conflict


def test_concurrent_threads_see_consistent_snapshots(make_db: MakeDB) -> None:
    """Writers move value between two counters; readers always see the same total."""
    db = make_db()
    with db.tx() as tx:
        tx.put(Counter(1, 100))
        tx.put(Counter(2, 0))
    stop = threading.Event()
    bad: list[Any] = []

    def mover() -> None:
        for i in range(40):
            def move(tx: txindex.Transaction) -> None:
                a, b = tx.get(Counter, 1), tx.get(Counter, 2)
                assert a is not None and b is not None
                tx.put(Counter(1, a.value - 1))
                tx.put(Counter(2, b.value + 1))
            db.transact(move, attempts=100)
            del i

    def reader() -> None:
        while not stop.is_set():
            with db.read() as r:
                a, b = r.get(Counter, 1), r.get(Counter, 2)
                if a is None or b is None or a.value + b.value != 100:
                    bad.append((a, b))

    readers = [threading.Thread(target=reader) for _ in range(2)]
    movers = [threading.Thread(target=mover) for _ in range(2)]
    for t in readers + movers:
        t.start()
    for t in movers:
        t.join()
    stop.set()
    for t in readers:
        t.join()
    assert bad == []
    with db.read() as r:
        assert r.get(Counter, 1) == Counter(1, 20) and r.get(Counter, 2) == Counter(2, 80)


def test_read_your_writes_across_handles_in_one_process(make_db: MakeDB) -> None:
    writer, reader = make_db(), make_db()
    for i in range(20):
        with writer.tx() as tx:
            tx.put(Counter(1, i))
        with reader.read() as tx:  # another handle on the same server: waits for the commit
            assert tx.get(Counter, 1) == Counter(1, i)


def test_load_progress_is_reported_per_page(make_db: MakeDB) -> None:
    with make_db().tx() as tx:
        for i in range(100):
            tx.put(Counter(i))
    seen: list[int] = []
    make_db(on_load_progress=seen.append)
    assert seen and seen == sorted(seen) and seen[-1] >= 100

    def broken(n: int) -> None:
        raise RuntimeError("display failed")

    db = make_db(on_load_progress=broken)  # a failing display never breaks the load
    with db.read() as tx:
        assert tx.get(Counter, 99) == Counter(99)


def test_deleting_only_absent_keys_is_still_visible(make_db: MakeDB) -> None:
    """Such a commit changes nothing in the prefix; the next transaction must not wait forever
    for an event at its revision."""
    db = make_db(timeout=5.0)
    for i in range(3):
        with db.tx() as tx:
            tx.delete(Counter, 1000 + i)
        with db.read() as tx:
            assert tx.get(Counter, 1000 + i) is None


def test_snapshot_query_returns_the_object_of_its_revision(make_db: MakeDB) -> None:
    """An update that keeps an object's index key must not leak into older snapshots."""
    db = make_db()
    with db.tx() as tx:
        tx.put(Node("n1", "alice", "ip-1", ("prod",), 1.0))
    with db.read() as snap:
        assert snap.find(Node.by_user, "alice")[0].ip == "ip-1"  # pins the snapshot
        with db.tx() as tx:
            tx.put(Node("n1", "alice", "ip-2", ("prod",), 1.0))  # by_user key unchanged
        with db.read() as fresh:
            assert fresh.find(Node.by_user, "alice")[0].ip == "ip-2"
        assert [n.ip for n in snap.find(Node.by_user, "alice")] == ["ip-1"]
        assert [n.ip for n in snap.find(Node.by_tag, "prod")] == ["ip-1"]
        assert [n.ip for n in snap.range(Node.by_user_seen)] == ["ip-1"]
        assert snap.first(Node.by_ip, "ip-1") is not None and snap.first(Node.by_ip, "ip-2") is None
        assert snap.count(Node.by_user, "alice") == 1


def test_an_interrupted_retry_gives_its_turn_back(make_db: MakeDB) -> None:
    """A KeyboardInterrupt while a retry waits for the Txn in flight (txindex.turns) must not
    leave the DB's turn taken: later transact calls would each wait for it."""
    db = make_db()
    wait_idle = db._group.wait_idle

    def interrupted(timeout: float) -> None:
        db._group.wait_idle = wait_idle  # type: ignore[method-assign]
        raise KeyboardInterrupt

    db._group.wait_idle = interrupted  # type: ignore[method-assign]
    calls = [0]

    def conflict_once(tx: txindex.Transaction) -> None:
        calls[0] += 1
        if calls[0] == 1:
            raise txindex.Conflict("forced: the retry takes the turn")
        tx.put(Counter(3, 1))

    with pytest.raises(KeyboardInterrupt):
        db.transact(conflict_once)
    assert not db._turns.busy()
    db.transact(lambda tx: tx.put(Counter(3, 2)))
    with db.read() as tx:
        assert tx.get(Counter, 3) == Counter(3, 2)


def test_the_empty_prefix_works_on_a_real_etcd(server: EtcdServer) -> None:
    """``prefix=""`` (the default) is every key: etcd refuses the empty key, so the load and
    the watch start at "\\0". A commit is loaded by a later DB and watched by another."""
    first = txindex.open(server.url, models=[Node, User, Counter])
    watching = txindex.open(server.url, models=[Node, User, Counter])
    try:
        with first.tx() as tx:
            tx.put(User("u1", "red"))
        assert watching.wait_for(first._visible, 10)
        with watching.read() as r:
            assert r.get(User, "u1") == User("u1", "red")
        later = txindex.open(server.url, models=[Node, User, Counter])
        with later.read() as r:
            assert r.find(User.by_team, "red") == [User("u1", "red")]
        later.close()
    finally:
        first.close()
        watching.close()
