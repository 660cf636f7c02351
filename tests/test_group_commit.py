"""Group commit (txindex.group): commits queued behind a DB's Txn in flight share the next Txn
when they touch disjoint things, and never otherwise.

Each test holds the first Txn's reply (:class:`Gate`), queues commits from threads behind it,
then releases it, so which commits meet in one Txn is deterministic. Both backends.
"""

from __future__ import annotations

import os
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import pytest

from txindex import DB, CommitUnknown, Conflict, Transaction

from .models import Node, User
from .test_local_apply import Gate, changes, converged, local, watcher_held

MakeDB = Callable[..., DB]


class Queued:
    """Transactions committed from threads while the gate holds the first Txn."""

    def __init__(self, db: DB) -> None:
        self.db = db
        self.results: dict[str, int | BaseException | None] = {}
        self._threads: list[threading.Thread] = []

    def commit(self, name: str, work: Callable[[Transaction], Any]) -> None:
        """Start ``name``: a transaction running ``work`` then committing; waits until it
        queues."""
        before = len(self.db._group._queue)

        def run() -> None:
            try:
                tx = self.db.tx()
                work(tx)
                self.results[name] = tx.commit()
            except BaseException as exc:  # inspected by the test
                self.results[name] = exc

        t = threading.Thread(target=run)
        t.start()
        self._threads.append(t)
        deadline = time.monotonic() + 10
        while len(self.db._group._queue) == before:
            assert name not in self.results, f"{name} ended before queueing: {self.results}"
            assert time.monotonic() < deadline, f"{name} did not queue"
            time.sleep(0.005)

    def join(self) -> None:
        for t in self._threads:
            t.join(30)
            assert not t.is_alive()


@contextmanager
def held_first_txn(db: DB) -> Iterator[tuple[Gate, Queued]]:
    """A first commit (of user ``first``) whose reply is held until the block ends; commits
    started in the block with ``Queued.commit`` queue behind it."""
    gate = Gate(db._group._backend)
    db._group._backend = gate  # type: ignore[assignment]
    first: dict[str, Any] = {}

    def run() -> None:
        with db.tx() as tx:
            tx.put(User("first"))
        first["done"] = True

    t = threading.Thread(target=run)
    t.start()
    assert gate.holding.wait(10)
    queued = Queued(db)
    try:
        yield gate, queued
    finally:
        gate.release.set()
        t.join(30)
        queued.join()
    assert first.get("done")


def users(prefix: str, n: int) -> Callable[[Transaction], None]:
    """Work that puts users ``prefix0`` .. ``prefix{n-1}``."""
    def work(tx: Transaction) -> None:
        for j in range(n):
            tx.put(User(f"{prefix}{j}"))
    return work


def test_queued_disjoint_commits_share_one_txn(make_db: MakeDB) -> None:
    db = make_db()
    sub = db.subscribe(Node)
    base = db.revision
    nodes = [Node(f"n{i}", "u", f"10.9.0.{i}", ("t",)) for i in range(4)]
    with watcher_held(db), held_first_txn(db) as (gate, queued):
        for n in nodes:
            queued.commit(n.id, lambda tx, n=n: tx.put(n))
    assert set(queued.results.values()) == {base + 2}  # one revision after the first's
    assert len(gate.sent) == 2
    stats = db.stats()
    assert stats["group_txns"] == 1 and stats["grouped_commits"] == 4
    assert local(db) == 2  # the first Txn, then the group as one batch
    with db.read() as r:
        assert [r.get(Node, n.id) for n in nodes] == nodes
        assert r.find(Node.by_tag, "t") == nodes
    converged(db)
    got = changes(sub, 4)
    assert sorted(got) == [(base + 2, f"nodes/{n.id}", None, n) for n in nodes]


def test_a_write_of_a_key_another_commit_read_is_not_grouped(make_db: MakeDB) -> None:
    db = make_db()
    with db.tx() as tx:
        tx.put(User("x", "red", 1))

    def bump(tx: Transaction) -> None:
        u = tx.get(User, "x")
        assert u is not None
        tx.put(User("x", u.team, u.quota + 1))

    with held_first_txn(db) as (_gate, queued):
        queued.commit("a", bump)
        queued.commit("b", bump)
    assert db.stats()["group_txns"] == 0
    ok = [r for r in queued.results.values() if isinstance(r, int)]
    failed = [r for r in queued.results.values() if isinstance(r, Conflict)]
    assert len(ok) == 1 and len(failed) == 1, queued.results
    with db.read() as r:
        assert r.get(User, "x") == User("x", "red", 2)  # no lost update


@pytest.mark.parametrize("reader_first", [True, False])
def test_a_read_of_what_another_commit_writes_is_not_grouped(
    make_db: MakeDB, reader_first: bool
) -> None:
    """One-way dependencies too (either queue order): members touch disjoint things only."""
    db = make_db()

    def reader(tx: Transaction) -> None:
        tx.get(User, "x")
        tx.put(User("r"))

    with held_first_txn(db) as (_gate, queued):
        for name, work in (("r", reader), ("w", lambda tx: tx.put(User("x"))))[
            :: 1 if reader_first else -1
        ]:
            queued.commit(name, work)
    assert db.stats()["group_txns"] == 0
    assert isinstance(queued.results["w"], int)


def test_claims_decided_by_one_index_query_are_not_grouped(make_db: MakeDB) -> None:
    """"No user is in team ops, so I join it as its lead": the two queries and the two puts
    meet in one bucket fence, so the commits go in two Txns and the second sees the first."""
    db = make_db()

    def claim(name: str) -> Callable[[Transaction], None]:
        def work(tx: Transaction) -> None:
            if tx.count(User.by_team, "ops") == 0:
                tx.put(User(name, "ops"))
        return work

    with held_first_txn(db) as (_gate, queued):
        queued.commit("a", claim("a"))
        queued.commit("b", claim("b"))
    assert db.stats()["group_txns"] == 0
    with db.read() as r:
        assert len(r.find(User.by_team, "ops")) == 1
    assert sum(isinstance(r, int) for r in queued.results.values()) == 1, queued.results


def test_queries_of_other_values_do_not_block_a_group(make_db: MakeDB) -> None:
    db = make_db()

    def claim(name: str, team: str) -> Callable[[Transaction], None]:
        def work(tx: Transaction) -> None:
            assert tx.count(User.by_team, team) == 0
            tx.put(User(name, team))
        return work

    with held_first_txn(db) as (_gate, queued):
        queued.commit("a", claim("a", "ops"))
        queued.commit("b", claim("b", "dev"))
    assert db.stats()["grouped_commits"] == 2
    assert len(set(queued.results.values())) == 1


def test_a_failed_group_sends_its_members_again_alone(make_db: MakeDB) -> None:
    db = make_db()
    other = make_db()
    with db.tx() as tx:
        tx.put(User("x", "red"))

    def stale(tx: Transaction) -> None:
        assert tx.get(User, "x") == User("x", "red")
        tx.put(User("y", "saw-red"))

    with watcher_held(db) as release, held_first_txn(db) as (gate, queued):
        queued.commit("a", stale)
        queued.commit("b", lambda tx: tx.put(User("z")))
        with other.tx() as tx:  # changes what a read; the cache sees it only later
            tx.put(User("x", "blue"))
        threading.Timer(0.5, release.set).start()  # the members' catch-up needs the watch
    assert isinstance(queued.results["a"], Conflict)
    b = queued.results["b"]
    assert isinstance(b, int)
    assert db.stats()["group_txns"] == 1  # the failed group; b then went alone
    assert len(gate.sent) == 3
    with db.read() as r:
        assert r.get(User, "y") is None and r.get(User, "z") == User("z")
        assert r.get(User, "x") == User("x", "blue")
    converged(db)


def test_a_commit_whose_read_the_txn_ahead_changed_fails_without_a_txn(
    make_db: MakeDB,
) -> None:
    """The leader re-validates each member against the store before sending: a commit that
    read ``first`` (absent) while the Txn ahead of it wrote it is a Conflict, sent nowhere;
    the group's other member commits."""
    db = make_db()

    def read_first(tx: Transaction) -> None:
        assert tx.get(User, "first") is None
        tx.put(User("saw-no-first"))

    with watcher_held(db), held_first_txn(db) as (gate, queued):  # a reads before first
        queued.commit("a", read_first)
        queued.commit("b", lambda tx: tx.put(User("b")))
    assert isinstance(queued.results["a"], Conflict)
    assert isinstance(queued.results["b"], int)
    assert len(gate.sent) == 2  # the first, then b alone: a's doomed compare never went out
    with db.read() as r:
        assert r.get(User, "saw-no-first") is None and r.get(User, "b") == User("b")


def test_a_range_reader_queued_behind_a_write_of_its_model_sends_one_txn(
    make_db: MakeDB,
) -> None:
    """A range query compares its model's fence, and the Txn ahead writes it (every write of
    the model does). The leader's re-validation covers that Txn's change (outside the range),
    so the fence compare need only hold from there: one Txn, not a failed one and a retry."""
    db = make_db()

    def query_then_write(tx: Transaction) -> None:
        assert list(tx.range(User.by_team, "blue", "green")) == []
        tx.put(User("r", "red"))

    with watcher_held(db), held_first_txn(db) as (gate, queued):  # r reads before first
        queued.commit("r", query_then_write)
    assert isinstance(queued.results["r"], int), queued.results
    assert len(gate.sent) == 2, gate.sent  # the first's Txn, then r's


class _Interrupted(Exception):
    pass


def test_a_commit_interrupted_while_queued_does_not_stall_the_queue(make_db: MakeDB) -> None:
    """An exception raised in a thread waiting in the queue (here by a signal handler, as
    Ctrl-C or a SIGTERM handler would) takes its commit out; the commits behind it go on."""
    db = make_db()
    previous = signal.signal(signal.SIGUSR1, lambda *_: (_ for _ in ()).throw(_Interrupted()))
    try:
        with held_first_txn(db) as (_gate, queued):
            queued.commit("behind", lambda tx: tx.put(User("behind")))
            timer = threading.Timer(0.3, os.kill, (os.getpid(), signal.SIGUSR1))
            timer.start()
            # this (main) thread queues behind the first's Txn
            with pytest.raises(_Interrupted), db.tx() as tx:
                tx.put(User("interrupted"))
            timer.join()
            assert len(db._group._queue) == 1  # "behind" only
    finally:
        signal.signal(signal.SIGUSR1, previous)
    assert isinstance(queued.results["behind"], int), queued.results
    assert not db._group._sending and not db._group._queue
    with db.tx() as tx:  # and later commits too
        tx.put(User("later"))
    with db.read() as r:
        assert r.get(User, "interrupted") is None
        assert r.get(User, "behind") is not None and r.get(User, "later") is not None


def test_an_unknown_outcome_reaches_every_member(make_db: MakeDB) -> None:
    db = make_db()
    with held_first_txn(db) as (gate, queued):
        gate.unknown = True
        queued.commit("a", lambda tx: tx.put(User("a")))
        queued.commit("b", lambda tx: tx.put(User("b")))
    assert all(isinstance(r, CommitUnknown) for r in queued.results.values()), queued.results
    with db.tx() as tx:  # the queue goes on
        tx.put(User("c"))
    converged(db)


def test_groups_keep_to_the_txn_budget(make_db: MakeDB) -> None:
    """Ten queued commits of 5 writes each (7 operations with the fences they share) under
    max_txn_ops=40: groups of 7 and 3, every Txn within the budget, every commit done."""
    db = make_db(max_txn_ops=40)

    with held_first_txn(db) as (gate, queued):
        for i in range(10):
            queued.commit(f"c{i}", users(f"u{i}-", 5))
    assert all(isinstance(r, int) for r in queued.results.values()), queued.results
    assert all(c <= 40 and o <= 40 for c, o in gate.sent), gate.sent
    assert db.stats()["group_txns"] == 2 and db.stats()["grouped_commits"] == 10
    with db.read() as r:
        assert sum(r.get(User, f"u{i}-{j}") is not None for i in range(10) for j in range(5)) == 50
    converged(db)


def test_a_group_the_server_refuses_as_too_large_goes_out_member_by_member(
    make_db: MakeDB,
) -> None:
    """The DB was told the server takes 512 operations, it takes 128: two commits of 70
    writes fit the DB's budget together, the server refuses the group, each then commits
    alone."""
    db = make_db(max_txn_ops=512)

    with held_first_txn(db) as (_gate, queued):
        queued.commit("a", users("b0-", 70))
        queued.commit("b", users("b1-", 70))
    assert all(isinstance(r, int) for r in queued.results.values()), queued.results
    assert queued.results["a"] != queued.results["b"]
    assert db.stats()["group_txns"] == 1  # the refused one
    with db.read() as r:
        assert sum(r.get(User, f"b{i}-{j}") is not None for i in (0, 1) for j in range(70)) == 140
    converged(db)


def test_a_large_commit_does_not_queue(make_db: MakeDB) -> None:
    """More than a quarter of the budget (40 writes of 128): its own Txn at once, while the
    small commits' Txn is still in flight."""
    db = make_db()
    done: dict[str, int | None] = {}

    def large() -> None:
        with db.tx() as tx:
            for j in range(40):
                tx.put(User(f"l{j}"))
        done["large"] = tx.revision

    with held_first_txn(db) as (gate, _queued):
        t = threading.Thread(target=large)
        t.start()
        t.join(10)
        assert "large" in done and not gate.release.is_set()
    assert len(gate.sent) == 2 and db.stats()["group_txns"] == 0
    converged(db)


@pytest.mark.parametrize("threads", [8])
def test_many_threads_counting_through_groups(make_db: MakeDB, threads: int) -> None:
    """Threads incrementing shared and own counters through transact: exact sums (shared
    counters never meet in one group, own ones often do)."""
    db = make_db()
    errors: list[BaseException] = []

    def work(t: int) -> None:
        try:
            for i in range(30):
                key = "shared" if i % 3 == 0 else f"own{t}"
                db.transact(lambda tx, key=key: tx.put(
                    User(key, quota=(getattr(tx.get(User, key), "quota", 0) + 1))
                ), attempts=200)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    ts = [threading.Thread(target=work, args=(t,)) for t in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join(120)
    assert not errors, errors
    with db.read() as r:
        assert r.get(User, "shared") == User("shared", quota=10 * threads)
        for t in range(threads):
            assert r.get(User, f"own{t}") == User(f"own{t}", quota=20)
    converged(db)
