"""The watch read lazily while this process commits (Watcher.batch_seconds).

After a commit of this process the watcher pauses before reading its etcd watch on (its own
commits apply themselves; ``tests/test_local_apply.py``). Nothing that waits for the store may
sit out that pause: a commit kept for a revision that only the watch brings (another
writer's), ``db.wait_for`` and a re-validation wake the watcher at once. The pause is made
30 s here, so that a missing wake-up shows as a timeout rather than as a few milliseconds.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import Iterator

import pytest

import txindex
from txindex import DB, Conflict
from txindex.backend import EtcdBackend, Put

from .models import MODELS, Node

LONG = 30.0


@pytest.fixture
def db(etcd_url: str, prefix: str) -> Iterator[DB]:
    db = txindex.open(etcd_url, models=MODELS, prefix=prefix)
    db._watcher.batch_seconds = 0.0  # eager until paused() makes it lazy
    yield db
    db.close()


def commit_once(db: DB, node: Node) -> int:
    with db.tx() as tx:
        tx.put(node)
    with db.read() as rtx:  # read-your-writes
        assert rtx.get(Node, node.id) == node
    return db._visible


def paused(db: DB, node: Node) -> None:
    """Commit ``node`` twice, the second time with the long pause on, and wait until the
    watcher has read both events: it then sits in its pause."""
    for n in (1, 2):
        if n == 2:
            db._watcher.batch_seconds = LONG
        commit_once(db, dataclasses.replace(node, last_seen=float(n)))
        deadline = time.monotonic() + 10
        while db._watcher.stats.events < n:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        time.sleep(0.2)


def foreign_put(backend: EtcdBackend, prefix: str, node: Node) -> int:
    """Another writer's put of ``node``; its revision."""
    value = json.dumps(dataclasses.asdict(node)).encode()
    return backend.txn([], [Put(f"{prefix}nodes/{node.id}".encode(), value)]).revision


def test_a_commit_kept_behind_another_writers_revision_wakes_the_watcher(
    db: DB, prefix: str, etcd_backend: EtcdBackend
) -> None:
    a = Node("a", "u1", "10.0.0.1")
    paused(db, a)
    other = foreign_put(etcd_backend, prefix, Node("x", "u9", "10.9.9.9"))
    t0 = time.monotonic()
    # this commit lands after the other writer's revision, which the watcher has not read:
    # it is kept, and the next transaction waits for the watch to bring that revision
    rev = commit_once(db, dataclasses.replace(a, user="u2"))
    assert time.monotonic() - t0 < LONG / 3
    assert rev > other
    with db.read() as tx:
        assert tx.get(Node, "x") == Node("x", "u9", "10.9.9.9")


def test_wait_for_wakes_a_pausing_watcher(
    db: DB, prefix: str, etcd_backend: EtcdBackend
) -> None:
    paused(db, Node("a", "u1", "10.0.0.1"))
    other = foreign_put(etcd_backend, prefix, Node("y", "u8", "10.8.8.8"))
    t0 = time.monotonic()
    assert db.wait_for(other, timeout=LONG / 3)
    assert time.monotonic() - t0 < LONG / 3


def test_a_conflict_revalidation_wakes_a_pausing_watcher(
    db: DB, prefix: str, etcd_backend: EtcdBackend
) -> None:
    a = Node("a", "u1", "10.0.0.1")
    paused(db, a)
    tx = db.tx()
    assert tx.get(Node, "b") is None  # a point read: the other writer's put conflicts
    foreign_put(etcd_backend, prefix, Node("b", "u7", "10.7.7.7"))
    tx.put(dataclasses.replace(a, user="u3"))
    t0 = time.monotonic()
    # the Txn fails, the cache catches up to the failure (a timeout would be a Conflict too)
    with pytest.raises(Conflict, match="changed since"):
        tx.commit()
    assert time.monotonic() - t0 < LONG / 3


def test_without_commits_the_watch_is_read_at_once(
    db: DB, prefix: str, etcd_backend: EtcdBackend
) -> None:
    db._watcher.batch_seconds = LONG  # but nothing commits: it never pauses
    time.sleep(0.2)  # the watcher is reading
    other = foreign_put(etcd_backend, prefix, Node("z", "u6", "10.6.6.6"))
    deadline = time.monotonic() + LONG / 3
    while db.revision < other:  # no wait_for: nothing nudges the watcher here
        assert time.monotonic() < deadline
        time.sleep(0.005)


def test_a_read_after_another_handles_commit_wakes_the_watcher(
    db: DB, etcd_url: str, prefix: str
) -> None:
    """Read-your-writes across two handles of one process: after the other handle commits,
    this handle's next transaction waits for a revision only its own watch brings."""
    other = txindex.open(etcd_url, models=MODELS, prefix=prefix)
    try:
        paused(db, Node("a", "u1", "10.0.0.1"))
        y = Node("y", "u8", "10.8.8.8")
        with other.tx() as tx:
            tx.put(y)
        t0 = time.monotonic()
        with db.read() as tx:
            assert tx.get(Node, "y") == y
        assert time.monotonic() - t0 < LONG / 3
    finally:
        other.close()
