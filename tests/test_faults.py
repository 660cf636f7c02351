"""Faults under a running DB: etcd restarts and crashes, compaction behind a stalled watch,
watch streams cut mid-flight. Each test runs its OWN etcd server (never the session one) and
ends with :func:`tests.consistency.assert_converged`: cache == etcd, indexes == a rebuild.

A small loopback TCP proxy (:class:`Proxy`) sits between a DB and etcd where a test needs to
stall ("freeze": stop forwarding) or drop ("cut": close every connection) the DB's traffic
without touching txindex code.
"""

from __future__ import annotations

import logging
import random
import re
import threading
import time
from typing import Any

import pytest

import txindex
from txindex import DB
from txindex.backend import EtcdBackend
from txindex.backend.base import Delete, Put
from txindex.errors import CommitUnknown, Conflict, TxIndexError, Unavailable
from txindex.keyindex import KeyIndex
from txindex.model import info_of
from txindex.server import EtcdServer

from .consistency import assert_converged
from .models import MODELS, Counter, Node, User
from .proxy import Proxy

NODE = info_of(Node)


# ---- fixtures and helpers ------------------------------------------------------------------


PREFIX = "app/"


def open_db(opened: list[DB], endpoint: str, **opts: Any) -> DB:
    """A DB over ``endpoint`` with short timeouts, so faults surface within seconds."""
    backend = EtcdBackend([endpoint], timeout=opts.pop("backend_timeout", 2.0))
    try:
        db = DB(backend, MODELS, prefix=PREFIX, timeout=opts.pop("timeout", 4.0), **opts)
    except BaseException:
        backend.close()
        raise
    opened.append(db)
    return db


def node_key(pk: str) -> bytes:
    return f"{PREFIX}nodes/{pk}".encode()


def put_node(raw: EtcdBackend, n: Node) -> int:
    res = raw.txn([], [Put(node_key(n.id), NODE.encode(n))])
    assert res.succeeded
    return res.revision


def del_node(raw: EtcdBackend, pk: str) -> int:
    res = raw.txn([], [Delete(node_key(pk))])
    assert res.succeeded
    return res.revision


def make_node(i: int, rnd: random.Random, gen: int = 0) -> Node:
    return Node(
        f"n{i}",
        f"u{rnd.randrange(4)}",
        f"10.{gen % 250}.{i // 250}.{i % 250}",  # unique per (gen, i): no unique clash
        tuple(sorted(rnd.sample(["prod", "dev", "gpu", "edge"], rnd.randrange(3)))),
        float(rnd.choice([0, 0, rnd.randrange(1, 1000)])),
    )


def db_state(db: DB) -> dict[str, Any]:
    return {k: e.value for k, e in db._store.entries().items()}


def view(tx: txindex.Transaction, ids: list[str]) -> dict[str, Any]:
    """Everything a snapshot can tell about nodes: points, equality, counts, ranges."""
    return {
        "points": {pk: tx.get(Node, pk) for pk in ids},
        "by_user": {u: [n.id for n in tx.find(Node.by_user, u)] for u in ("u0", "u1", "u2", "u3")},
        "by_tag": {t: tx.count(Node.by_tag, t) for t in ("prod", "dev", "gpu", "edge")},
        "active": [n.id for n in tx.range(Node.active, None, None)],
        "by_ip": {n.ip: n.id for n in tx.range(Node.by_ip, None, None)},
        "users": [u.name for u in tx.range(User.by_team, None, None)],
    }


# ---- 1. clean restart ----------------------------------------------------------------------


FAIL_FAST = (Unavailable, CommitUnknown, Conflict)


def test_restart_under_running_db(server: EtcdServer, raw: EtcdBackend, dbs: list[DB]) -> None:
    db = open_db(dbs, server.endpoint)
    rnd = random.Random(1)
    with db.tx() as tx:
        for i in range(20):
            tx.put(make_node(i, rnd))
    assert_converged(db, raw, PREFIX)
    with db.read() as r:
        before = view(r, [f"n{i}" for i in range(20)])

    server.stop()
    outcomes: list[str] = []
    for i in range(3):
        t0 = time.monotonic()
        tx = db.tx()
        tx.put(Node(f"down{i}", "u0", f"192.168.0.{i}"))
        assert len(tx.find(Node.by_user, "u0")) >= 1  # reads need no network
        with pytest.raises(FAIL_FAST) as err:
            tx.commit()
        took = time.monotonic() - t0
        assert took < 12, f"a commit during the outage took {took:.1f}s"
        assert str(err.value), "the error must say what happened"
        outcomes.append(type(err.value).__name__)
    with db.read() as r:  # snapshots need no network
        assert view(r, [f"n{i}" for i in range(20)]) == before
    assert not any(k.startswith("nodes/down") for k in db_state(db))

    server.start()
    # writes by another tool and by another DB right after the restart
    put_node(raw, Node("raw1", "u3", "172.16.0.1", ("edge",), 7.0))
    del_node(raw, "n0")
    db2 = open_db(dbs, server.endpoint)
    with db2.tx() as tx:
        tx.put(User("alice", "blue", 3))
        tx.delete(Node, "n1")
    ms = assert_converged(db, raw, PREFIX, timeout=15)
    # the first DB works again: reads the others' writes and commits
    with db.tx() as tx:
        assert tx.get(Node, "raw1") is not None
        assert tx.get(Node, "n0") is None and tx.get(Node, "n1") is None
        assert tx.get(User, "alice") == User("alice", "blue", 3)
        tx.put(Node("after", "u2", "172.16.0.2"))
    assert_converged(db, raw, PREFIX)
    assert_converged(db2, raw, PREFIX)
    assert db._watcher.stats.reconnects >= 1
    assert db._watcher.alive
    print(f"restart: outage errors {outcomes}, converged {ms:.0f} ms after restart")


# ---- 2. crash while another writer writes --------------------------------------------------


def test_sigkill_while_writing(server: EtcdServer, raw: EtcdBackend, dbs: list[DB]) -> None:
    db = open_db(dbs, server.endpoint)
    with db.tx() as tx:
        tx.put(Counter(1, 0))
    stop = threading.Event()
    acked: dict[str, Node | None] = {}
    uncertain: set[str] = set()
    counts = {"raw_ok": 0, "raw_fail": 0, "inc_ok": 0, "inc_unknown": 0, "inc_fail": 0}

    def raw_writer() -> None:
        w = EtcdBackend([server.endpoint], timeout=1.0)
        rnd = random.Random(2)
        try:
            while not stop.is_set():
                i = rnd.randrange(60)
                pk = f"n{i}"
                n = None if rnd.random() < 0.2 else make_node(i, rnd)
                op = Delete(node_key(pk)) if n is None else Put(node_key(pk), NODE.encode(n))
                try:
                    assert w.txn([], [op]).succeeded
                    acked[pk] = n
                    uncertain.discard(pk)
                    counts["raw_ok"] += 1
                except CommitUnknown:
                    uncertain.add(pk)
                    counts["raw_fail"] += 1
                except Unavailable:
                    counts["raw_fail"] += 1
                    time.sleep(0.05)
        finally:
            w.close()

    def incrementer() -> None:
        def inc(tx: txindex.Transaction) -> None:
            c = tx.get(Counter, 1)
            assert c is not None
            tx.put(Counter(1, c.value + 1))

        while not stop.is_set():
            try:
                db.transact(inc)
                counts["inc_ok"] += 1
            except CommitUnknown:
                counts["inc_unknown"] += 1
            except (Unavailable, Conflict):
                counts["inc_fail"] += 1
                time.sleep(0.05)

    threads = [threading.Thread(target=raw_writer), threading.Thread(target=incrementer)]
    for t in threads:
        t.start()
    try:
        time.sleep(1.0)
        server.kill()
        time.sleep(0.5)
        server.start()
        time.sleep(1.5)
    finally:
        stop.set()
        for t in threads:
            t.join(timeout=30)
    assert not any(t.is_alive() for t in threads), "a writer hung"
    assert counts["raw_ok"] > 20 and counts["inc_ok"] > 5, counts
    ms = assert_converged(db, raw, PREFIX, timeout=15)

    state = db_state(db)
    for pk, n in acked.items():  # every acknowledged write survived the crash
        if pk not in uncertain:
            assert state.get(f"nodes/{pk}") == n, pk
    value = state["counters/1"].value
    assert counts["inc_ok"] <= value <= counts["inc_ok"] + counts["inc_unknown"], (value, counts)
    assert db._watcher.stats.reconnects >= 1
    print(f"sigkill: {counts}, counter={value}, converged {ms:.0f} ms")


# ---- 3. compaction while the watch is behind -----------------------------------------------


def test_compaction_behind_stalled_watch(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB]
) -> None:
    rnd = random.Random(3)
    ids = [f"n{i}" for i in range(40)]
    for i in range(40):
        put_node(raw, make_node(i, rnd))
    db = open_db(dbs, proxy.endpoint, progress_interval=0.5)
    assert_converged(db, raw, PREFIX)

    snap = db.read()
    old = view(snap, ids)
    pinned = snap.revision
    # a read-write transaction whose index query will be invalidated by the resync batch
    # (only the store's change log can tell: etcd's guards are built after the resync)
    stale = db.tx()
    u0 = [n.id for n in stale.find(Node.by_user, "u0")]
    stale.put(Node("decided-from-u0", "u0", f"3.3.3.{len(u0)}"))

    proxy.freeze()
    probe = put_node(raw, Node("probe", "u0", "1.1.1.1"))
    time.sleep(0.5)
    assert db.revision < probe, "the proxy did not stall the watch"

    for gen in range(1, 6):  # many revisions; objects move between index keys
        for i in range(0, 40, 2):
            put_node(raw, make_node(i, rnd, gen))
    for i in range(1, 40, 4):
        del_node(raw, f"n{i}")
    for i in range(40, 50):
        put_node(raw, make_node(i, rnd, 9))
    assert raw.txn([], [Put(f"{PREFIX}users/bob".encode(), b'{"name":"bob","team":"red"}')])
    latest = raw.current_revision()
    raw.compact(latest)

    proxy.cut()
    proxy.thaw()
    deadline = time.monotonic() + 15
    while db._watcher.stats.resyncs < 1:
        assert time.monotonic() < deadline, f"no resync: {db._watcher.stats}"
        time.sleep(0.05)
    ms = assert_converged(db, raw, PREFIX)
    assert db.revision >= latest
    assert db._watcher.stats.resyncs >= 1

    with pytest.raises(Conflict):
        stale.commit()
    assert db._store.get("nodes/decided-from-u0", db.revision) is None

    # the snapshot pinned before the resync still reads its old consistent view
    assert snap.revision == pinned
    assert view(snap, ids) == old
    snap.rollback()
    with db.read() as r:
        now = view(r, [*ids, *(f"n{i}" for i in range(40, 50))])
    assert now["users"] == ["bob"]
    assert now["points"]["n1"] is None and now["points"]["n45"] is not None
    with db.tx() as tx:  # and the DB commits again
        tx.put(Node("fresh", "u1", "2.2.2.2"))
    assert_converged(db, raw, PREFIX)
    print(f"compaction: resyncs={db._watcher.stats.resyncs}, converged {ms:.0f} ms")


# ---- 4. watch stream cut -------------------------------------------------------------------


def test_reconnect_backoff_starts_over_after_a_working_stream(
    raw: EtcdBackend, proxy: Proxy, dbs: list[DB], caplog: pytest.LogCaptureFixture
) -> None:
    """Each cut follows a stream that delivered events: every reconnect waits the first
    backoff step again (it once kept doubling for the life of the process, up to 2 s)."""
    db = open_db(dbs, proxy.endpoint)
    caplog.set_level(logging.WARNING, logger="txindex")
    rnd = random.Random(5)
    for i in range(6):
        rev = put_node(raw, make_node(i, rnd, i))
        assert db.wait_for(rev, 10)  # the (new) stream works
        proxy.cut()
        deadline = time.monotonic() + 10
        while db._watcher.stats.reconnects <= i:
            assert time.monotonic() < deadline, "the cut did not break the stream"
            time.sleep(0.01)
    delays = [float(d) for d in re.findall(r"reconnecting in ([0-9.]+)s", caplog.text)]
    assert len(delays) >= 6, caplog.text
    assert max(delays) < 0.2, delays  # doubling would have reached 1.6 s by the sixth




def test_watch_stream_cut_loses_nothing(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB]
) -> None:
    db = open_db(dbs, proxy.endpoint)
    loaded = db._watcher.stats.events
    assert loaded == 0
    stop = threading.Event()
    reference: dict[str, Node] = {}
    written = [0]
    errors: list[BaseException] = []

    def writer() -> None:
        rnd = random.Random(4)
        try:
            while not stop.is_set():
                i = rnd.randrange(80)
                pk = f"n{i}"
                if pk in reference and rnd.random() < 0.25:
                    del_node(raw, pk)
                    del reference[pk]
                else:
                    n = make_node(i, rnd, written[0])
                    put_node(raw, n)
                    reference[pk] = n
                written[0] += 1
                time.sleep(0.002)
        except BaseException as exc:  # surfaced below
            errors.append(exc)

    t = threading.Thread(target=writer)
    t.start()
    try:
        for _ in range(5):
            time.sleep(0.4)
            proxy.cut()
    finally:
        time.sleep(0.3)
        stop.set()
        t.join(timeout=10)
    assert not errors, errors
    ms = assert_converged(db, raw, PREFIX)
    assert db_state(db) == {f"nodes/{k}": v for k, v in reference.items()}
    stats = db._watcher.stats
    assert stats.reconnects >= 1, stats
    # every write is one event in the prefix; a resume at anything but applied + 1 would
    # deliver some twice (counted here even though the store ignores them)
    assert stats.events == written[0], (stats.events, written[0])
    assert stats.resyncs == 0
    print(f"cut: {written[0]} writes, reconnects={stats.reconnects}, converged {ms:.0f} ms")


def test_silent_stream_is_replaced(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB]
) -> None:
    """A stream that goes silent (proxy frozen, no error) is detected by the progress deadline
    and replaced; after the thaw the watch resumes at applied + 1: nothing lost, no event
    delivered twice."""
    db = open_db(dbs, proxy.endpoint, progress_interval=0.3)
    rnd = random.Random(6)
    reference: dict[str, Node] = {}
    writes = 0
    for i in range(30):
        reference[f"n{i}"] = make_node(i, rnd)
        put_node(raw, reference[f"n{i}"])
        writes += 1
    assert_converged(db, raw, PREFIX)
    proxy.freeze()
    for i in range(0, 30, 3):
        reference[f"n{i}"] = make_node(i, rnd, 1)
        put_node(raw, reference[f"n{i}"])
        del_node(raw, f"n{i + 1}")
        reference.pop(f"n{i + 1}")
        writes += 2
    deadline = time.monotonic() + 10
    while db._watcher.stats.reconnects < 1:
        assert time.monotonic() < deadline, "a silent stream was never replaced"
        time.sleep(0.05)
    t0 = time.monotonic()
    proxy.thaw()
    ms = assert_converged(db, raw, PREFIX)
    assert db_state(db) == {f"nodes/{k}": v for k, v in reference.items()}
    assert db._watcher.stats.events == writes, (db._watcher.stats, writes)
    assert db._watcher.stats.resyncs == 0
    print(f"silent: replaced after freeze, converged {ms:.0f} ms "
          f"({(time.monotonic() - t0) * 1000:.0f} ms after thaw)")


def test_commit_through_cut_is_unknown_or_done(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB]
) -> None:
    """A commit whose connection dies mid-request fails with a typed error, and the cache
    converges to whatever etcd decided."""
    db = open_db(dbs, proxy.endpoint)
    with db.tx() as tx:
        tx.put(Counter(7, 0))
    proxy.freeze()
    out: list[BaseException | None] = []

    def commit() -> None:
        try:
            with db.tx() as tx:
                c = tx.get(Counter, 7)
                assert c is not None
                tx.put(Counter(7, c.value + 1))
            out.append(None)  # committed
        except TxIndexError as exc:
            out.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    time.sleep(0.5)
    proxy.cut()
    proxy.thaw()
    t.join(timeout=15)
    assert not t.is_alive(), "commit hung after its connection was cut"
    assert len(out) == 1, out
    # the request's bytes were held by the frozen proxy and dropped by the cut; gRPC may
    # replay a request it knows never reached a server on a new connection. Either it
    # committed exactly once, or the outcome is reported unknown (it may still be retried by
    # nobody), or it was provably never sent; the cache agrees with etcd in every case.
    assert out[0] is None or isinstance(out[0], CommitUnknown | Unavailable), out
    assert_converged(db, raw, PREFIX)
    with db.read() as r:
        value = r.get(Counter, 7)
    if out[0] is None:
        assert value == Counter(7, 1)
    elif isinstance(out[0], Unavailable):
        assert value == Counter(7, 0)
    else:
        assert value in (Counter(7, 0), Counter(7, 1))
    print(f"cut commit: {type(out[0]).__name__}, counter {value}")


def test_checker_detects_divergence(server: EtcdServer, raw: EtcdBackend, dbs: list[DB]) -> None:
    """The convergence checker itself can fail: a damaged index and a lost key are each
    reported."""
    db = open_db(dbs, server.endpoint)
    rnd = random.Random(7)
    for i in range(10):
        put_node(raw, make_node(i, rnd))
    assert_converged(db, raw, PREFIX)
    store = db._store
    with store._lock:  # damage one index only
        store._indexes[Node.by_user].remove(*next(store._indexes[Node.by_user].items()))
    with pytest.raises(AssertionError, match=r"index Node\.by_user"):
        assert_converged(db, raw, PREFIX, timeout=0.3)
    with store._lock:  # mend the damaged index, then lose a key (data and index items)
        entries = store._tables[info_of(Node)]
        store._indexes[Node.by_user] = KeyIndex.build(
            (k, pk) for pk, e in entries.items() for k in Node.by_user.entries(e.value)
        )
        store._plans = store._plan()
        store._unindex(entries.pop("n3"))
    with pytest.raises(AssertionError, match="nodes/n3"):
        assert_converged(db, raw, PREFIX, timeout=0.3)


def test_commit_whose_reply_is_lost(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB]
) -> None:
    """The Txn reaches etcd and is applied, but the reply is lost with the connection. The
    outcome is unknown to the client: it must say CommitUnknown (never Conflict, which tells
    the caller to retry, and never a silent second send of the request)."""
    db = open_db(dbs, proxy.endpoint)
    with db.tx() as tx:
        tx.put(Counter(8, 0))
    assert_converged(db, raw, PREFIX)
    before = raw.current_revision()
    proxy.hold_replies()
    out: list[BaseException | None] = []

    def commit() -> None:
        try:
            with db.tx() as tx:
                c = tx.get(Counter, 8)
                assert c is not None
                tx.put(Counter(8, c.value + 1))
            out.append(None)
        except TxIndexError as exc:
            out.append(exc)

    t = threading.Thread(target=commit)
    t.start()
    deadline = time.monotonic() + 5
    while raw.current_revision() == before:  # etcd applied the Txn
        assert time.monotonic() < deadline, "the Txn never reached etcd"
        time.sleep(0.01)
    proxy.cut()
    proxy.thaw()
    t.join(timeout=15)
    assert not t.is_alive(), "commit hung after its reply was lost"
    assert_converged(db, raw, PREFIX)
    with db.read() as r:
        assert r.get(Counter, 8) == Counter(8, 1)  # applied once
    assert len(out) == 1 and isinstance(out[0], CommitUnknown), (
        f"the Txn was applied but the caller got {out[0]!r}"
    )
