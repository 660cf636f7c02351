"""Change notifications: db.subscribe (txindex.notify)."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txindex import DB, Closed, ModelError, SubscriptionLagged
from txindex.model import check_prefixes, info_of
from txindex.notify import Change, Notifier, Subscription
from txindex.store import Entry, Store, index_keys

from .models import MODELS, Counter, Node, User


class Recorder:
    def __init__(self, db: DB | None = None) -> None:
        self.db = db
        self.changes: list[Change] = []
        self.seen: list[Any] = []  # what a db.read() inside the callback saw
        self.threads: set[str] = set()
        self.cond = threading.Condition()

    def __call__(self, change: Change) -> None:
        self.threads.add(threading.current_thread().name)
        if self.db is not None:
            with self.db.read() as tx:
                self.seen.append((self.db.revision, tx.revision, tx.get(Node, change.pk)))
        with self.cond:
            self.changes.append(change)
            self.cond.notify_all()

    def wait(self, n: int, timeout: float = 10) -> list[Change]:
        with self.cond:
            assert self.cond.wait_for(lambda: len(self.changes) >= n, timeout), self.changes
            return list(self.changes)


def test_key_subscription_callback(make_db: Callable[..., DB]) -> None:
    db = make_db()
    rec = Recorder(db)
    sub = db.subscribe((Node, "n1"), rec)
    with db.tx() as tx:
        tx.put(Node("n1", "alice", "10.0.0.1"))
        tx.put(Node("n2", "alice", "10.0.0.2"))  # another key: not delivered
        r1 = tx.commit()
    with db.tx() as tx:
        tx.put(Node("n1", "bob", "10.0.0.1"))
        r2 = tx.commit()
    with db.tx() as tx:
        tx.delete(Node, "n1")
        r3 = tx.commit()
    got = rec.wait(3)
    time.sleep(0.05)
    assert len(rec.changes) == 3
    assert [(c.revision, c.key, c.pk) for c in got] == [
        (r1, "nodes/n1", "n1"), (r2, "nodes/n1", "n1"), (r3, "nodes/n1", "n1")
    ]
    assert got[0].old is None and got[0].new == Node("n1", "alice", "10.0.0.1")
    assert got[1].old == Node("n1", "alice", "10.0.0.1")
    assert got[1].new == Node("n1", "bob", "10.0.0.1")
    assert got[2].old == Node("n1", "bob", "10.0.0.1") and got[2].new is None
    # delivered after the store applied the revision, off the watcher thread and its locks
    for change, (applied, snap, obj) in zip(got, rec.seen, strict=True):
        assert applied >= change.revision and snap >= change.revision
        if snap == change.revision:
            assert obj == change.new
    assert rec.threads == {"txindex-notify"}
    sub.close()


def test_model_subscription_iterator_and_other_writers(make_db: Callable[..., DB]) -> None:
    db = make_db()
    other = make_db()  # another cache (stands in for another process)
    sub = db.subscribe(User)
    assert isinstance(sub, Subscription) and sub.revision == db.revision
    collected: list[Change] = []

    def consume() -> None:
        collected.extend(sub)  # ends when the subscription is closed

    t = threading.Thread(target=consume)
    t.start()
    with other.tx() as tx:
        tx.put(User("u1", "red"))
        tx.put(User("u2", "red"))
        tx.put(Counter(1, 5))  # another model: not delivered
        rev = tx.commit()
    with other.tx() as tx:
        tx.delete(User, "u1")
        last = tx.commit()
    assert last is not None and db.wait_for(last, 10)
    deadline = time.monotonic() + 10
    while len(collected) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    sub.close()
    t.join(5)
    assert not t.is_alive()
    assert [(c.revision, c.key) for c in collected] == [
        (rev, "users/u1"), (rev, "users/u2"), (last, "users/u1")
    ]
    assert collected[2].old == User("u1", "red") and collected[2].new is None


def test_index_subscription_sees_objects_moving_in_and_out(make_db: Callable[..., DB]) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(Node("n1", "alice", "10.0.0.1"))
    sub = db.subscribe((Node.by_user, "alice"))
    with db.tx() as tx:
        tx.put(Node("n2", "bob", "10.0.0.2"))     # never alice: not delivered
        tx.put(Node("n3", "alice", "10.0.0.3"))   # moves in
    with db.tx() as tx:
        tx.put(Node("n1", "bob", "10.0.0.1"))     # moves out
    with db.tx() as tx:
        tx.put(Node("n2", "bob", "10.0.0.9"))     # still not alice
        tx.put(Node("n3", "alice", "10.0.0.4"))   # stays in
    got = [sub.get(10) for _ in range(3)]
    assert [c.pk for c in got if c is not None] == ["n3", "n1", "n3"]
    assert sub.get(0.2) is None
    sub.close()
    assert sub.get(0) is None and list(sub) == []


def test_callback_errors_do_not_stop_delivery(make_db: Callable[..., DB]) -> None:
    db = make_db()
    calls: list[int] = []

    def flaky(change: Change) -> None:
        calls.append(change.revision)
        if len(calls) == 1:
            raise RuntimeError("boom")

    db.subscribe(Counter, flaky)
    for i in range(3):
        with db.tx() as tx:
            tx.put(Counter(1, i))
    deadline = time.monotonic() + 10
    while len(calls) < 3 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert len(calls) == 3


def test_hook_is_removed_without_subscribers_and_close_ends_iterators(
    make_db: Callable[..., DB],
) -> None:
    db = make_db()
    assert db._watcher.apply_hook is None
    a = db.subscribe(Node)
    b = db.subscribe((Counter, 1))
    assert db._watcher.apply_hook is not None
    a.close()
    assert db._watcher.apply_hook is not None
    b.close()
    assert db._watcher.apply_hook is None
    c = db.subscribe(Node)
    ended = threading.Event()
    t = threading.Thread(target=lambda: (list(c), ended.set()))
    t.start()
    db.close()
    assert ended.wait(10)
    with pytest.raises(Closed):
        db.subscribe(Node)


def test_bad_targets(make_db: Callable[..., DB]) -> None:
    db = make_db()
    with pytest.raises(TypeError, match="subscribe"):
        db.subscribe("nodes/n1")
    with pytest.raises(ModelError):
        db.subscribe((Node, 5))  # Node keys are str
    sub = db.subscribe(Node, lambda c: None)
    with pytest.raises(TypeError, match="callback"):
        iter(sub)
    for bad in (0, -1, True, 1.5, "10"):
        with pytest.raises(ValueError, match="max_pending"):
            db.subscribe(Node, max_pending=bad)  # type: ignore[arg-type]


def _count_to(db: DB, n: int) -> list[int]:
    """``n`` commits, each a revision that changes Counter 1; their revisions."""
    revs = []
    for i in range(n):
        with db.tx() as tx:
            tx.put(Counter(1, i))
            rev = tx.commit()
        assert rev is not None
        revs.append(rev)
    return revs


def test_iterator_that_falls_behind_ends_with_lagged(make_db: Callable[..., DB]) -> None:
    """A consumer ``max_pending`` changes behind loses its subscription: it still gets the
    changes queued, in order, then ``SubscriptionLagged`` names the first one it missed;
    other subscriptions go on."""
    db = make_db()
    lagging = db.subscribe((Counter, 1), max_pending=5)
    steady = db.subscribe(Counter)  # default bound, far away
    revs = _count_to(db, 3)
    got = [lagging.get(10) for _ in range(3)]  # consumed while it keeps up
    assert [c.revision for c in got if c is not None] == revs
    revs += _count_to(db, 20)  # not consumed: 5 queue, the 6th ends it
    deadline = time.monotonic() + 10
    while not lagging.closed and time.monotonic() < deadline:
        time.sleep(0.01)
    queued = [lagging.get(1) for _ in range(5)]
    assert [c.revision for c in queued if c is not None] == revs[3:8]
    for _ in range(2):  # then it ends, and stays ended
        with pytest.raises(SubscriptionLagged) as info:
            lagging.get(1)
        assert info.value.revision == revs[8] and info.value.max_pending == 5
    with pytest.raises(SubscriptionLagged):
        list(lagging)
    assert lagging not in db._notifier._subs  # type: ignore[union-attr]
    lagging.close()  # idempotent after the overflow
    assert [steady.get(10).revision for _ in revs] == revs  # type: ignore[union-attr]
    steady.close()


def test_unbounded_iterator_keeps_everything(make_db: Callable[..., DB]) -> None:
    db = make_db()
    sub = db.subscribe((Counter, 1), max_pending=None)
    revs = _count_to(db, 30)
    assert [sub.get(10).revision for _ in revs] == revs  # type: ignore[union-attr]
    sub.close()
    assert sub.get(1) is None


def test_subscription_start_is_exact_under_concurrent_writes(make_db: Callable[..., DB]) -> None:
    """Every change above ``sub.revision`` is delivered, even while writes are being applied."""
    db = make_db()
    writer = make_db()
    stop = threading.Event()
    last = [0]

    def write() -> None:
        i = 0
        while not stop.is_set():
            with writer.tx() as tx:
                tx.put(Counter(1, i))
                last[0] = tx.commit() or 0
            i += 1

    t = threading.Thread(target=write)
    t.start()
    try:
        subs = []
        for _ in range(10):
            subs.append(db.subscribe((Counter, 1)))
            time.sleep(0.01)
    finally:
        stop.set()
        t.join(10)
    final = last[0]
    assert db.wait_for(final, 10)
    for sub in subs:
        revs = []
        while True:
            c = sub.get(5)
            assert c is not None
            revs.append(c.revision)
            if c.revision == final:
                break
        # every Counter write is its own revision: the delivered ones are consecutive commits
        assert revs[0] > sub.revision
        assert revs == sorted(set(revs))
        sub.close()


_USERS = ("alice", "bob", "carol")
_TAGS = ("a", "b", "c")


@st.composite
def _node_or_none(draw: st.DrawFn, pk: str) -> Node | None:
    if draw(st.booleans()):
        return None
    tags = tuple(sorted(draw(st.sets(st.sampled_from(_TAGS), max_size=3))))
    seen = draw(st.sampled_from((0.0, 1.0, 2.0)))
    return Node(pk, draw(st.sampled_from(_USERS)), "10.0.0.1", tags, seen)


_TARGETS = st.one_of(
    st.tuples(st.just(Node), st.sampled_from(("n1", "n2"))),
    st.just(Node),
    st.just(User),
    st.tuples(st.just(Node.by_user), st.sampled_from(_USERS)),
    st.tuples(st.just(Node.by_tag), st.sampled_from(_TAGS)),
    st.tuples(st.just(Node.by_user_seen), st.sampled_from(_USERS).map(lambda u: (u,))),
    st.tuples(st.just(Node.by_user_seen), st.tuples(st.sampled_from(_USERS), st.just(1.0))),
    st.tuples(st.just(Node.active), st.sampled_from((1.0, 2.0))),
)


def _concerns(sub: Subscription, key: str, before: Entry | None, after: Entry | None) -> bool:
    """What a subscription matches, spelled out (the routes must agree)."""
    if sub.kind == "key":
        return bool(key == sub.match)
    if sub.kind == "model":
        return any(e is not None and e.info is sub.info for e in (before, after))
    index, lo, hi = sub.match
    return any(
        lo <= (k, e.pk) < hi for e in (before, after) if e is not None for k in index_keys(index, e)
    )


@settings(max_examples=150, deadline=None)
@given(
    targets=st.lists(_TARGETS, min_size=1, max_size=12),
    closed=st.sets(st.integers(0, 11)),
    changes=st.lists(st.tuples(st.sampled_from(("n1", "n2")), st.data()), max_size=6),
)
def test_routes_find_exactly_the_subscriptions_a_change_concerns(
    targets: list[Any], closed: set[int], changes: list[tuple[str, st.DataObject]]
) -> None:
    db = DB.__new__(DB)  # no server: only the notifier's routing is exercised
    store = Store(check_prefixes(MODELS))
    notifier = Notifier(db, None, store)  # type: ignore[arg-type]
    subs = [notifier._make(t, None) for t in targets]
    for sub in subs:
        notifier._routes.add(sub)
    for i in closed & set(range(len(subs))):
        notifier._routes.remove(subs[i])
    open_subs = [s for i, s in enumerate(subs) if i not in closed]
    info = info_of(Node)
    for pk, data in changes:
        before, after = data.draw(_node_or_none(pk)), data.draw(_node_or_none(pk))
        if before is None and after is None:
            continue
        eb = None if before is None else Entry(pk, before, 1, info)
        ea = None if after is None else Entry(pk, after, 2, info)
        key = f"nodes/{pk}"
        got = notifier._routes.matching(key, eb, ea)
        assert len(got) == len(set(got))  # each once
        assert set(got) == {s for s in open_subs if _concerns(s, key, eb, ea)}
