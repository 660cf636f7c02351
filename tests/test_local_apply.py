"""Local apply of a process's own commit (txindex.commit, Watcher.apply_local).

A commit that succeeds at revision R while the store has applied exactly R - 1 is applied by
the committing thread; otherwise the watch delivers it as before. These tests hold the
watcher thread (it receives events but does not apply them until released) so that who
applies what is deterministic, then check the store against etcd (values, mod revisions,
indexes rebuilt from scratch) and that subscriptions see every change exactly once, in order.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import pytest

import txindex
from txindex import DB, CommitUnknown, Conflict
from txindex.backend import Delete, Put
from txindex.model import info_of
from txindex.notify import Subscription

from .consistency import problems
from .models import Node, User
from .test_metrics import Rec

MakeDB = Callable[..., DB]


@contextmanager
def watcher_held(db: DB) -> Iterator[threading.Event]:
    """The watcher thread receives responses but applies none until the block ends (or the
    yielded event is set)."""
    release = threading.Event()
    watcher = db._watcher
    original = watcher._apply

    def held(events: Any) -> None:
        release.wait(30)
        original(events)

    watcher._apply = held  # type: ignore[method-assign]
    try:
        yield release
    finally:
        release.set()
        del watcher._apply


def local(db: DB) -> int:
    return int(db.stats()["local_applies"])


def converged(db: DB) -> None:
    assert db.wait_for(db._visible, 10)
    rev, found = problems(db, db._backend)
    assert not found, (rev, found)


def changes(sub: Subscription, n: int) -> list[tuple[int, str, Any, Any]]:
    """The next ``n`` changes, then checks that no other change follows."""
    out = []
    for _ in range(n):
        c = sub.get(10)
        assert c is not None, f"only {len(out)} of {n} changes: {out}"
        out.append((c.revision, c.key, c.old, c.new))
    assert sub.get(0.3) is None
    return out


def test_own_commits_are_applied_by_the_committing_thread(make_db: MakeDB) -> None:
    db = make_db()
    sub = db.subscribe(Node)
    a1, b1 = Node("a", "u1", "10.0.0.1", ("x",), 1.0), Node("b", "u2", "10.0.0.2")
    with watcher_held(db):
        base = db.revision
        tx = db.tx()
        assert tx.get(Node, "a") is None
        tx.put(a1)
        tx.put(b1)
        r1 = tx.commit()
        assert r1 is not None and r1 == base + 1
        assert db.revision == r1 and local(db) == 1  # applied without the watch
        with db.read() as r:  # read-your-writes with the watcher held
            assert r.get(Node, "a") is a1  # the object put is the cached object
            assert [n.id for n in r.find(Node.by_user, "u1")] == ["a"]
            assert r.first(Node.by_ip, "10.0.0.2") is b1
        assert db._store.get("nodes/a", r1).mod_revision == r1  # type: ignore[union-attr]

        a2 = Node("a", "u3", "10.0.0.1", ("y",), 2.0)
        with db.tx() as tx:
            tx.put(a2)
            tx.delete(Node, "b")
            tx.delete(Node, "never-existed")  # no event in etcd, no change here
        r2 = db._visible
        assert db.revision == r2 == r1 + 1 and local(db) == 2
        with db.read() as r:
            assert r.get(Node, "b") is None
            assert r.find(Node.by_user, "u1") == [] and r.find(Node.by_user, "u3") == [a2]

        with db.tx() as tx:  # deletes only (of an absent key): the sync key gives the revision
            tx.delete(Node, "never-existed")
        r3 = db._visible
        assert db.revision == r3 == r2 + 1 and local(db) == 3
    converged(db)  # the watcher then ignores the events it receives for r1..r3
    assert db.revision == r3 and local(db) == 3
    assert changes(sub, 4) == [
        (r1, "nodes/a", None, a1),
        (r1, "nodes/b", None, b1),
        (r2, "nodes/a", a1, a2),
        (r2, "nodes/b", b1, None),
    ]


def test_a_foreign_revision_in_between_forces_the_watch(make_db: MakeDB) -> None:
    db = make_db()
    sub = db.subscribe(Node)
    other = make_db()  # another handle on the prefix: its own store and watcher
    n1, n2 = Node("n1", "u", "10.1.0.1"), Node("n2", "u", "10.1.0.2")
    with watcher_held(db) as release:
        mine_tx = db.tx()
        assert mine_tx.get(Node, "n2") is None  # pinned before the other writes
        with other.tx() as tx:
            tx.put(n1)
        foreign = other._visible
        # a plain write by another tool (no fences) too
        raw = db._backend.txn(
            [], [Put(f"{db.prefix}users/ext".encode(), info_of(User).encode(User("ext", "t")))]
        )
        mine_tx.put(n2)  # decided without seeing either: it writes another key
        mine = mine_tx.commit()
        assert mine is not None
        assert foreign < raw.revision < mine
        assert local(db) == 0 and db.revision < foreign  # not applied: revisions came between
        release.set()
        assert db.wait_for(mine, 10)
    converged(db)
    # mine was kept: applied by the watcher thread once it reached the revision before, unless
    # the same watch response already carried mine (then decoded from the watch)
    assert local(db) in (0, 1)
    with db.read() as r:
        assert r.get(Node, "n1") == n1 and r.get(Node, "n2") == n2
        assert r.get(User, "ext") == User("ext", "t")
        assert [n.id for n in r.find(Node.by_user, "u")] == ["n1", "n2"]
    assert changes(sub, 2) == [(foreign, "nodes/n1", None, n1), (mine, "nodes/n2", None, n2)]

    before = local(db)
    with watcher_held(db), db.tx() as tx:  # caught up: the next commit is local again
        tx.put(Node("n3", "u", "10.1.0.3"))
    assert local(db) == before + 1 and db.revision == db._visible


class Gate:
    """Wraps a DB's commit backend (``db._group._backend``): the first ``txn`` answers only
    once ``release`` is set (a commit whose reply reaches its thread late; ``holding`` is set
    meanwhile); ``unknown`` makes the next Txn raise ``CommitUnknown`` without being sent.
    Records each Txn's (compares, ops) counts."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.holding = threading.Event()
        self.release = threading.Event()
        self.unknown = False
        self.sent: list[tuple[int, int]] = []
        self._first = True
        self._lock = threading.Lock()

    def txn(self, compares: Any, success: Any, failure: Any = ()) -> Any:
        if self.unknown and not self._first:
            self.unknown = False
            raise CommitUnknown("injected: the Txn's outcome is unknown")
        self.sent.append((len(compares), len(success)))
        result = self._inner.txn(compares, success, failure)
        with self._lock:
            first, self._first = self._first, False
        if first:
            self.holding.set()
            assert self.release.wait(30)
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


def test_a_commit_waits_for_the_txn_in_flight(make_db: MakeDB) -> None:
    """A DB has one Txn of small commits in flight at a time (txindex.group): a small commit
    that starts while another's Txn is out is sent after it answers, so the two never
    finish out of order and both apply locally, in order."""
    db = make_db()
    sub = db.subscribe(Node)
    held_backend = Gate(db._group._backend)
    db._group._backend = held_backend  # type: ignore[assignment]
    a, b = Node("a", "u", "10.2.0.1"), Node("b", "u", "10.2.0.2")
    revs: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def commit(name: str, obj: Node) -> None:
        try:
            tx = db.tx()
            tx.put(obj)
            revs[name] = tx.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with watcher_held(db):
        base = db.revision
        ta = threading.Thread(target=commit, args=("a", a))
        ta.start()
        assert held_backend.holding.wait(10)  # a is committed at base + 1, its reply held
        tb = threading.Thread(target=commit, args=("b", b))
        tb.start()
        tb.join(0.3)
        assert tb.is_alive() and "b" not in revs  # b waits for a's Txn
        held_backend.release.set()
        ta.join(10)
        tb.join(10)
        assert not errors, errors
        assert revs == {"a": base + 1, "b": base + 2}
        assert local(db) == 2 and db.revision == base + 2
        with db.read() as r:
            assert r.get(Node, "a") is a and r.get(Node, "b") is b
    converged(db)  # the watcher, released, ignores both events
    assert local(db) == 2
    assert changes(sub, 2) == [(base + 1, "nodes/a", None, a), (base + 2, "nodes/b", None, b)]


def test_own_commits_finishing_out_of_order(make_db: MakeDB) -> None:
    """A large commit (its own Txn, outside the queue) answers late; a small one sent after
    it answers first and is kept until the large one is applied, then both apply locally,
    in revision order."""
    db = make_db()
    sub = db.subscribe(User)
    held_backend = Gate(db._group._backend)
    db._group._backend = held_backend  # type: ignore[assignment]
    large = [User(f"l{j}") for j in range(40)]  # more than a quarter of 128 operations
    revs: dict[str, int | None] = {}
    errors: list[BaseException] = []

    def commit_large() -> None:
        try:
            tx = db.tx()
            for u in large:
                tx.put(u)
            revs["large"] = tx.commit()
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    with watcher_held(db):
        base = db.revision
        t = threading.Thread(target=commit_large)
        t.start()
        assert held_backend.holding.wait(10)  # committed at base + 1, not yet applied
        tx = db.tx()
        tx.put(User("small"))
        revs["small"] = tx.commit()  # base + 2: the store is at base, so it is kept
        assert revs["small"] == base + 2 and local(db) == 0 and db.revision == base
        held_backend.release.set()
        t.join(10)
        assert not errors, errors
        assert revs["large"] == base + 1
        assert local(db) == 2 and db.revision == base + 2
        with db.read() as r:
            assert r.get(User, "small") == User("small") and r.get(User, "l0") is large[0]
    converged(db)
    assert local(db) == 2
    got = changes(sub, 41)
    assert [c[0] for c in got] == [base + 1] * 40 + [base + 2]


def test_failed_commits_apply_nothing(make_db: MakeDB) -> None:
    db = make_db()
    other = make_db()
    with db.tx() as tx:
        tx.put(User("x", "red"))
    with watcher_held(db) as release:
        stale = db.tx()
        assert stale.get(User, "x") == User("x", "red")
        stale.put(User("y", "from-stale-x"))
        with other.tx() as tx:
            tx.put(User("x", "blue"))
        before = local(db)
        # the compare on x fails; the commit catches up with the failure revision (the watch,
        # released meanwhile), finds x changed: Conflict, nothing applied locally
        threading.Timer(0.3, release.set).start()
        with pytest.raises(Conflict, match="changed since the transaction read it"):
            stale.commit()
        assert local(db) == before
    converged(db)
    with db.read() as r:
        assert r.get(User, "y") is None and r.get(User, "x") == User("x", "blue")


def test_cache_lag_metric_sees_local_applies(make_db: MakeDB) -> None:
    rec = Rec()
    db = make_db(metrics=rec)
    with watcher_held(db):
        with db.tx() as tx:
            tx.put(Node("m", "u", "10.3.0.1"))
        assert local(db) == 1
        assert db._observer is not None and db._observer.lag() == (0, 0.0)
        assert rec.names("lag")[-1][0] == 0
    converged(db)


def test_many_threads_state_equals_etcd(make_db: MakeDB) -> None:
    """Threads committing disjoint and shared keys at once, local applies and watch applies
    interleaved: the cache equals etcd, indexes equal a rebuild, and a subscription sees each
    committed change once, in revision order."""
    db = make_db()
    sub = db.subscribe(User)
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(40):
                db.transact(lambda tx, i=i: (
                    tx.put(User(f"t{t}-{i % 5}", f"team{i % 3}", i)),
                    tx.put(User("shared", f"team{t}", i)) if i % 7 == 0 else None,
                    tx.delete(User, f"t{t}-{(i + 2) % 5}") if i % 4 == 0 else None,
                ))
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    threads = [threading.Thread(target=work, args=(t,)) for t in range(4)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert not errors, errors
    converged(db)
    got = []
    while (c := sub.get(0.5)) is not None:
        got.append(c)
    revs = [c.revision for c in got]
    assert revs == sorted(revs)
    assert len({(c.revision, c.key) for c in got}) == len(got)  # each change once
    last: dict[str, Any] = {}
    for c in got:  # the changes chain: each one's old is the previous one's new
        assert c.old == last.get(c.key), c
        last[c.key] = c.new
    with db.read() as r:
        for key, value in last.items():
            assert r.get(User, key.removeprefix("users/")) == value


@txindex.model("docs/", key="id")
@dataclass(frozen=True)
class Doc:
    id: str
    body: Any = None  # JSON arrays decode as tuples: a list put here is not what etcd holds
    kind: str | int = ""  # a union: decoding picks the first member that accepts the value


def test_values_that_do_not_round_trip_are_cached_decoded(make_db: MakeDB) -> None:
    db = make_db(models=[Doc, Node])
    doc = Doc("d", {"tags": ["a", "b"]}, 3)
    node = Node("n", "u", "10.4.0.1")
    with watcher_held(db):
        with db.tx() as tx:
            tx.put(doc)
            tx.put(node)
        assert local(db) == 1
        with db.read() as r:
            cached = r.get(Doc, "d")
            assert cached is not doc and cached == Doc("d", {"tags": ("a", "b")}, 3)
            assert r.get(Node, "n") is node  # exact model: the object put
    converged(db)  # what every other process decodes from etcd


def test_a_local_apply_during_a_resync_is_not_lost_in_its_diff(make_db: MakeDB) -> None:
    """Our commit creates k at V+1 (its reply held), another writer deletes k at V+2, and
    compaction forces a resync. The commit's reply arrives while the resync compares the
    store with etcd: its local apply must not land between the two (the diff would miss k,
    and the cache keep an object etcd does not have)."""
    db = make_db()
    with db.tx() as tx:
        tx.put(User("seed"))
    db._watcher.stop()  # the resync below is driven by hand
    gate = Gate(db._group._backend)
    db._group._backend = gate  # type: ignore[assignment]
    committer = threading.Thread(target=lambda: db.transact(lambda tx: tx.put(User("k", "t"))))
    committer.start()
    assert gate.holding.wait(10)  # k is committed; the reply is held
    raw = db._backend
    deleted = raw.txn([], [Delete((db.prefix + "users/k").encode())])
    raw.compact(deleted.revision)
    store = db._store
    read_entries = store.entries

    def entries_then_reply() -> Any:
        current = read_entries()  # the resync has read the store...
        gate.release.set()  # ...when the commit's reply arrives
        committer.join(0.5)  # (it waits for the resync to finish, or applies at once)
        return current

    store.entries = entries_then_reply  # type: ignore[method-assign]
    try:
        db._watcher._resync()
    finally:
        del store.entries
    committer.join(10)
    assert not committer.is_alive()
    with db.read() as r:
        assert r.get(User, "k") is None
    assert problems(db, raw)[1] == []
