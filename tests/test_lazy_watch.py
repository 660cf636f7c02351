"""The watch read lazily while this process commits (Watcher.batch_seconds).

After a commit of this process the watcher pauses before reading its etcd watch on (its own
commits apply themselves; ``tests/test_local_apply.py``). Nothing that waits for the store may
sit out that pause: a commit kept for a revision that only the watch brings (another
writer's), ``db.wait_for`` and a re-validation wake the watcher at once. The pause is made
30 s here, so that a missing wake-up shows as a timeout rather than as a few milliseconds.
"""

from __future__ import annotations

import dataclasses
import time

from txindex import DB
from txindex.backend import EtcdBackend, Put

from .models import Node

LONG = 30.0


def lazy_db(etcd_url: str, prefix: str) -> DB:
    import txindex

    from .models import MODELS

    db = txindex.open(etcd_url, models=MODELS, prefix=prefix)
    db._watcher.batch_seconds = 0.0  # eager until paused() makes it lazy
    return db


def commit_once(db: DB, node: Node) -> int:
    with db.tx() as tx:
        tx.put(node)
    rev = db._visible
    with db.read() as rtx:  # read-your-writes (applied by the committing thread)
        assert rtx.get(Node, node.id) == node
    return rev


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


def test_a_commit_kept_behind_another_writers_revision_wakes_the_watcher(
    etcd_url: str, prefix: str, etcd_backend: EtcdBackend
) -> None:
    db = lazy_db(etcd_url, prefix)
    try:
        a = Node("a", "u1", "10.0.0.1")
        paused(db, a)
        other = etcd_backend.txn([], [Put(f"{prefix}nodes/x".encode(), b'{"id":"x","user":"u9",'
                                          b'"ip":"10.9.9.9"}')]).revision
        t0 = time.monotonic()
        # this commit lands after the other writer's revision, which the watcher has not read:
        # it is kept, and the next transaction waits for the watch to bring that revision
        rev = commit_once(db, dataclasses.replace(a, user="u2"))
        assert time.monotonic() - t0 < LONG / 3
        assert rev > other
        with db.read() as tx:
            x = tx.get(Node, "x")
            assert x is not None and x.user == "u9"
    finally:
        db.close()


def test_wait_for_wakes_a_pausing_watcher(
    etcd_url: str, prefix: str, etcd_backend: EtcdBackend
) -> None:
    db = lazy_db(etcd_url, prefix)
    try:
        paused(db, Node("a", "u1", "10.0.0.1"))
        other = etcd_backend.txn([], [Put(f"{prefix}nodes/y".encode(), b'{"id":"y","user":"u8",'
                                          b'"ip":"10.8.8.8"}')]).revision
        t0 = time.monotonic()
        assert db.wait_for(other, timeout=LONG / 3)
        assert time.monotonic() - t0 < LONG / 3
    finally:
        db.close()


def test_a_conflict_revalidation_wakes_a_pausing_watcher(
    etcd_url: str, prefix: str, etcd_backend: EtcdBackend
) -> None:
    db = lazy_db(etcd_url, prefix)
    try:
        a = Node("a", "u1", "10.0.0.1")
        paused(db, a)
        tx = db.tx()
        assert tx.get(Node, "b") is None  # a point read: the other writer's put conflicts
        etcd_backend.txn([], [Put(f"{prefix}nodes/b".encode(), b'{"id":"b","user":"u7",'
                                  b'"ip":"10.7.7.7"}')])
        tx.put(dataclasses.replace(a, user="u3"))
        t0 = time.monotonic()
        try:
            tx.commit()
            raise AssertionError("expected a Conflict")
        except Exception as e:  # the Txn failed, the cache caught up, the read changed
            assert type(e).__name__ == "Conflict", e
        assert time.monotonic() - t0 < LONG / 3
    finally:
        db.close()


def test_without_commits_the_watch_is_read_at_once(
    etcd_url: str, prefix: str, etcd_backend: EtcdBackend
) -> None:
    db = lazy_db(etcd_url, prefix)
    db._watcher.batch_seconds = LONG  # but nothing commits: it never pauses
    try:
        time.sleep(0.2)  # the watcher is reading
        other = etcd_backend.txn([], [Put(f"{prefix}nodes/z".encode(), b'{"id":"z","user":"u6",'
                                          b'"ip":"10.6.6.6"}')]).revision
        deadline = time.monotonic() + LONG / 3
        while db.revision < other:  # no wait_for: nothing nudges the watcher here
            assert time.monotonic() < deadline
            time.sleep(0.005)
    finally:
        db.close()
