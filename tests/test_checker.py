"""The history checker (tests/checker.py) can fail: hand-made histories with one anomaly each,
and each seeded bug of txindex/_seeded.py caught from a real run on a real etcd (some need a
fault: a cut watch, a compaction while behind, a lost commit reply). A clean run of the same
workload reports nothing, so the detections are not noise."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest

from txindex import DB, _seeded
from txindex.backend import EtcdBackend
from txindex.server import EtcdServer

from .checker import Report, TruthLog, check
from .proxy import Proxy
from .torture import ListRecorder, client_loop, open_db, run_op, setup, uid_for

# ---- hand-made histories -------------------------------------------------------------------


def lst(k: int, *vals: int) -> dict[str, Any]:
    return {"k": k, "vals": list(vals)}


def slot(i: int, owner: str = "", tag: int = 0) -> dict[str, Any]:
    return {"id": i, "owner": owner, "tag": tag}


SETUP = [(2, "lst/0", lst(0)), (2, "lst/1", lst(1)), (2, "slot/0", slot(0)),
         (2, "slot/1", slot(1))]


def op(uid: int, kind: str = "append", status: str = "ok", **kw: Any) -> dict[str, Any]:
    base = {"id": uid, "proc": uid, "thread": 0, "kind": kind, "status": status,
            "t0": float(uid), "t1": float(uid) + 0.5, "snap": 2, "reads": {}, "queries": [],
            "writes": {}, "commit": None}
    return {**base, **kw}


def report(ops: list[dict[str, Any]], events: list[tuple[int, str, Any]]) -> Report:
    return check(ops, SETUP + events)


def classes(ops: list[dict[str, Any]], events: list[tuple[int, str, Any]]) -> dict[str, int]:
    return report(ops, events).classes


def test_clean_history_has_no_anomaly() -> None:
    ops = [
        op(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}, commit=3),
        op(2, snap=3, reads={"lst/0": lst(0, 4)}, writes={"lst/0": lst(0, 4, 8)}, commit=4),
        op(3, "read", snap=4, reads={"lst/0": lst(0, 4, 8)}),
    ]
    assert classes(ops, [(3, "lst/0", lst(0, 4)), (4, "lst/0", lst(0, 4, 8))]) == {}


def test_lost_update_is_named() -> None:
    ops = [op(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}, commit=3),
           op(2, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 8)}, commit=4)]
    got = classes(ops, [(3, "lst/0", lst(0, 4)), (4, "lst/0", lst(0, 8))])
    assert got.get("lost-update", 0) >= 2, got  # the dropped 4, and txn 2's stale read


def test_g_single_read_skew() -> None:
    ops = [op(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}, commit=3),
           op(2, reads={"lst/0": lst(0), "lst/1": lst(1)}, writes={"lst/1": lst(1, 8)},
              commit=4)]
    assert classes(ops, [(3, "lst/0", lst(0, 4)), (4, "lst/1", lst(1, 8))]) == {"G-single": 1}


def test_g2_predicate_read() -> None:
    q = {"model": "slot/", "field": "owner", "value": "", "pk": "id",
         "result": [slot(0), slot(1)]}
    ops = [op(1, "claim", queries=[q], writes={"slot/0": slot(0, "c1", 1)}, commit=3),
           op(2, "claim", queries=[q], writes={"slot/1": slot(1, "c2", 2)}, commit=4)]
    got = classes(ops, [(3, "slot/0", slot(0, "c1", 1)), (4, "slot/1", slot(1, "c2", 2))])
    assert got == {"G2": 1}


def test_g1a_aborted_read() -> None:
    ops = [op(1, status="fail", error="Conflict"),
           op(2, "read", snap=2, reads={"lst/0": lst(0, 4)})]
    assert classes(ops, []) == {"G1a": 1}


def test_g1b_intermediate_read() -> None:
    ops = [op(2, "read", snap=2, reads={"lst/0": lst(0, 99)})]
    assert classes(ops, []) == {"G1b": 1}


def test_g1c_read_from_the_future() -> None:
    ops = [op(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}, commit=3),
           op(2, "read", snap=2, reads={"lst/0": lst(0, 4)})]
    assert classes(ops, [(3, "lst/0", lst(0, 4))]) == {"G1c": 1}


def test_g0_mixed_revision() -> None:
    ops = [op(1, writes={"lst/0": lst(0, 4)}, reads={"lst/0": lst(0)}, commit=3),
           op(2, writes={"lst/1": lst(1, 8)}, reads={"lst/1": lst(1)}, commit=3)]
    got = classes(ops, [(3, "lst/0", lst(0, 4)), (3, "lst/1", lst(1, 8))])
    assert got.get("G0", 0) >= 1, got


# group commit: several transactions of one process at one etcd revision

FREE = {"model": "slot/", "field": "owner", "value": "", "pk": "id"}


def member(uid: int, kind: str = "append", **kw: Any) -> dict[str, Any]:
    """A txn of process 7 merged into revision 3, concurrent with the other members."""
    return op(uid, kind, **{"proc": 7, "t0": 1.0, "t1": 9.0, "commit": 3, **kw})


def test_legal_group_commit_has_no_anomaly() -> None:
    """Three txns merged into revision 3: disjoint reads and writes, a delete, and a query no
    other member's write touches."""
    ops = [member(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}),
           member(2, reads={"lst/1": lst(1)}, writes={"lst/1": lst(1, 8), "tmp/0": None}),
           member(3, "claim", queries=[{**FREE, "result": [slot(0), slot(1)]}],
                  writes={"slot/0": slot(0, "c3", 3)})]
    events = [(2, "tmp/0", {"x": 1}), (3, "lst/0", lst(0, 4)), (3, "lst/1", lst(1, 8)),
              (3, "tmp/0", None), (3, "slot/0", slot(0, "c3", 3))]
    rep = report(ops, events)
    assert rep.anomalies == [] and rep.committed == 3, rep.summary()


def test_write_skew_inside_a_group() -> None:
    ops = [member(1, reads={"lst/0": lst(0)}, writes={"lst/1": lst(1, 4)}),
           member(2, reads={"lst/1": lst(1)}, writes={"lst/0": lst(0, 8)})]
    got = classes(ops, [(3, "lst/0", lst(0, 8)), (3, "lst/1", lst(1, 4))])
    assert got == {"group-rw": 2}, got


def test_query_changed_by_another_member() -> None:
    """Txn 1's free-slot query was right at revision 2, but in the same etcd Txn txn 2 took
    free slot 1 and txn 3 freed slot 5: group commit must not merge them."""
    ops = [member(1, "claim", queries=[{**FREE, "result": [slot(0), slot(1)]}],
                  writes={"slot/0": slot(0, "c1", 1)}),
           member(2, "release", reads={"slot/1": slot(1)}, writes={"slot/1": slot(1, "c2", 2)}),
           member(3, "release", reads={"slot/5": slot(5, "x")}, writes={"slot/5": slot(5, "", 3)})]
    got = classes(ops, [(2, "slot/5", slot(5, "x")), (3, "slot/0", slot(0, "c1", 1)),
                        (3, "slot/1", slot(1, "c2", 2)), (3, "slot/5", slot(5, "", 3))])
    assert got == {"G2": 2}, got


def test_group_of_two_processes_is_g0() -> None:
    ops = [member(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}),
           member(2, proc=8, reads={"lst/1": lst(1)}, writes={"lst/1": lst(1, 8)})]
    got = classes(ops, [(3, "lst/0", lst(0, 4)), (3, "lst/1", lst(1, 8))])
    assert got == {"G0": 1}, got


def test_group_revision_with_a_write_no_member_made_is_g0() -> None:
    """An unattributable delete of tmp/0 rides along a legal group."""
    ops = [member(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}),
           member(2, reads={"lst/1": lst(1)}, writes={"lst/1": lst(1, 8)})]
    rep = report(ops, [(2, "tmp/0", {"x": 1}), (3, "lst/0", lst(0, 4)), (3, "lst/1", lst(1, 8)),
                       (3, "tmp/0", None)])
    assert rep.classes == {"G0": 1} and "tmp/0" in rep.summary(), rep.summary()


def test_two_members_writing_one_key_is_g0() -> None:
    """Both delete tmp/0: each write matches etcd@3, only disjointness catches it."""
    ops = [member(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4), "tmp/0": None}),
           member(2, reads={"lst/1": lst(1)}, writes={"lst/1": lst(1, 8), "tmp/0": None})]
    rep = report(ops, [(2, "tmp/0", {"x": 1}), (3, "lst/0", lst(0, 4)), (3, "lst/1", lst(1, 8)),
                       (3, "tmp/0", None)])
    assert rep.classes == {"G0": 1} and "both wrote tmp/0" in rep.summary(), rep.summary()


def test_lost_write_of_a_group_member_is_g0() -> None:
    """Txn 2's slot write and its delete of tmp/0 are not in etcd at the group's revision."""
    ops = [member(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}),
           member(2, reads={"slot/1": slot(1)},
                  writes={"lst/1": lst(1, 8), "slot/1": slot(1, "c2", 2), "tmp/0": None})]
    rep = report(ops, [(2, "tmp/0", {"x": 1}), (3, "lst/0", lst(0, 4)), (3, "lst/1", lst(1, 8))])
    assert rep.classes == {"G0": 1}, rep.summary()
    assert "txn 2 " in rep.summary() and "['slot/1', 'tmp/0']" in rep.summary(), rep.summary()


def test_lost_write_failed_effect_phantom_duplicate() -> None:
    ops = [op(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}, commit=3),
           op(2, status="fail", error="Conflict", reads={"lst/1": lst(1)},
              writes={"lst/1": lst(1, 8)}),
           op(4, reads={"lst/1": lst(1, 8)}, writes={"lst/1": lst(1, 8, 16)}, commit=5)]
    got = classes(ops, [(4, "lst/1", lst(1, 8)), (5, "lst/1", lst(1, 8, 16)),
                        (6, "lst/1", lst(1, 8, 16, 12)), (7, "lst/1", lst(1, 8, 16, 12, 16))])
    assert got.get("lost-write", 0) >= 1 and got.get("failed-effect") == 1, got
    assert got.get("phantom-write") == 1 and got.get("duplicate-append") == 1, got
    assert got.get("duplicate-effect") == 1, got


def test_realtime_order() -> None:
    ops = [op(1, reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}, commit=4, t0=1, t1=2),
           op(2, reads={"lst/1": lst(1)}, writes={"lst/1": lst(1, 8)}, commit=3, t0=5, t1=6)]
    got = classes(ops, [(4, "lst/0", lst(0, 4)), (3, "lst/1", lst(1, 8))])
    assert got.get("realtime") == 1, got


def test_unknown_counts_as_possibly_committed() -> None:
    ops = [op(1, status="unknown", reads={"lst/0": lst(0)}, writes={"lst/0": lst(0, 4)}),
           op(2, status="unknown", reads={"lst/1": lst(1)}, writes={"lst/1": lst(1, 8)})]
    assert classes(ops, [(3, "lst/0", lst(0, 4))]) == {}


# ---- seeded bugs on a real etcd ------------------------------------------------------------


@pytest.fixture
def seed_bug() -> Iterator[Any]:
    enabled: list[str] = []

    def enable(name: str) -> None:
        _seeded.enable(name)
        enabled.append(name)

    yield enable
    for name in enabled:
        _seeded.disable(name)


PREFIX = "chk/"


def db_on(dbs: list[DB], endpoint: str, **kw: Any) -> DB:
    db = open_db(endpoint, PREFIX, **kw)
    dbs.append(db)
    return db


def contend(dbs: list[DB], kinds: tuple[str, ...], seconds: float, rec: ListRecorder,
            n_lists: int = 2, n_slots: int = 6) -> None:
    """Two threads per DB hammering few keys (contention is what the bugs need)."""
    stop = threading.Event()
    threads = []
    for p, db in enumerate(dbs):
        for t in range(2):
            def loop(db: DB = db, p: int = p, t: int = t) -> None:
                rnd = random.Random(p * 10 + t)
                seq = 0
                while not stop.is_set():
                    seq += 1
                    run_op(db, rnd.choice(kinds), uid_for(p, t, seq), rnd, rec, proc=p,
                           thread=t, n_lists=n_lists, n_slots=n_slots, attempts=5)
            threads.append(threading.Thread(target=loop))
    for th in threads:
        th.start()
    time.sleep(seconds)
    stop.set()
    for th in threads:
        th.join(30)


def judge(raw: EtcdBackend, truth: TruthLog, rec: ListRecorder) -> Report:
    truth.sync()
    return check(rec.ops, truth.events)


def start(raw: EtcdBackend, dbs: list[DB], endpoint: str, **kw: Any) -> tuple[DB, TruthLog]:
    truth = TruthLog(raw, PREFIX, raw.current_revision() + 1)
    db = db_on(dbs, endpoint, **kw)
    setup(db, 2, 6)
    return db, truth


def test_clean_run_has_no_anomaly(server: EtcdServer, raw: EtcdBackend, dbs: list[DB]) -> None:
    db, truth = start(raw, dbs, server.endpoint)
    rec = ListRecorder()
    contend([db, db_on(dbs, server.endpoint)], ("append", "claim", "release", "read"), 3.0, rec)
    rep = judge(raw, truth, rec)
    assert rep.committed > 20, rep.committed
    assert rep.anomalies == [], rep.summary()


def test_drop_compare_is_caught(
    server: EtcdServer, raw: EtcdBackend, dbs: list[DB], seed_bug: Any
) -> None:
    db, truth = start(raw, dbs, server.endpoint)
    seed_bug("drop_compare")
    rec = ListRecorder()
    contend([db, db_on(dbs, server.endpoint)], ("append",), 3.0, rec)
    rep = judge(raw, truth, rec)
    assert rep.classes.get("lost-update", 0) > 0, rep.classes


def test_skip_predicate_validation_is_caught(
    server: EtcdServer, raw: EtcdBackend, dbs: list[DB], seed_bug: Any
) -> None:
    db, truth = start(raw, dbs, server.endpoint)
    seed_bug("skip_predicate_validation")
    rec = ListRecorder()
    contend([db, db_on(dbs, server.endpoint)], ("claim", "release"), 3.0, rec)
    rep = judge(raw, truth, rec)
    assert rep.classes.get("G2", 0) > 0, rep.classes


def test_group_ignoring_conflicts_is_caught(
    server: EtcdServer, raw: EtcdBackend, dbs: list[DB], seed_bug: Any
) -> None:
    """Two threads of one DB appending to two lists: their commits queue behind each other,
    and merged despite touching one list they lose appends."""
    db, truth = start(raw, dbs, server.endpoint)
    seed_bug("group_ignores_conflicts")
    rec = ListRecorder()
    contend([db], ("append",), 3.0, rec)
    rep = judge(raw, truth, rec)
    assert db.stats()["group_txns"] > 0
    assert rep.lost > 0 and rep.classes.get("group-rw", 0) > 0, rep.classes


def wait(cond: Any, what: str, timeout: float = 15.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < deadline, what
        time.sleep(0.05)


def ops_on(db: DB, kinds: tuple[str, ...], n: int, rec: ListRecorder, proc: int) -> None:
    rnd = random.Random(proc)
    for i in range(n):
        run_op(db, kinds[i % len(kinds)], uid_for(proc, 0, i + 1), rnd, rec, proc=proc,
               n_lists=2, n_slots=6)


def test_watch_from_zero_is_caught(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB], seed_bug: Any
) -> None:
    direct, truth = start(raw, dbs, server.endpoint)
    lagging = db_on(dbs, proxy.endpoint, progress_interval=0.3)
    seed_bug("watch_from_zero")
    rec = ListRecorder()
    proxy.freeze()
    ops_on(direct, ("append",), 15, rec, proc=1)  # events the lagging watch must not lose
    wait(lambda: lagging._watcher.stats.reconnects >= 1, "the frozen watch was not replaced")
    proxy.cut()
    proxy.thaw()
    time.sleep(1.0)
    ops_on(direct, ("claim",), 5, rec, proc=2)  # other keys: the watch moves past the gap
    wait(lambda: lagging.revision >= raw.current_revision() - 1, "lagging DB never moved on")
    ops_on(lagging, ("read",), 10, rec, proc=3)
    rep = judge(raw, truth, rec)
    assert rep.classes.get("snapshot-mismatch", 0) > 0, rep.classes


def test_resync_without_index_rebuild_is_caught(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB], seed_bug: Any
) -> None:
    direct, truth = start(raw, dbs, server.endpoint)
    lagging = db_on(dbs, proxy.endpoint, progress_interval=0.3)
    wait(lambda: lagging.revision >= direct.revision, "lagging DB never loaded")
    seed_bug("resync_without_index_rebuild")
    rec = ListRecorder()
    proxy.freeze()
    ops_on(direct, ("claim",), 4, rec, proc=1)  # slots leave the "free" index bucket
    target = truth.sync()  # the truth log first, then compaction while the DB is behind
    raw.compact(target)
    proxy.cut()
    proxy.thaw()
    wait(lambda: lagging._watcher.stats.resyncs >= 1, "no resync")
    ops_on(lagging, ("read",), 5, rec, proc=3)
    rep = judge(raw, truth, rec)
    assert rep.classes.get("snapshot-mismatch", 0) > 0, rep.classes


def test_blind_retry_unknown_is_caught(
    server: EtcdServer, raw: EtcdBackend, proxy: Proxy, dbs: list[DB], seed_bug: Any
) -> None:
    direct, truth = start(raw, dbs, server.endpoint)
    db = db_on(dbs, proxy.endpoint, progress_interval=0.3)
    wait(lambda: db.revision >= direct.revision, "proxied DB never loaded")
    seed_bug("blind_retry_unknown")
    rec = ListRecorder()
    before = raw.current_revision()
    proxy.hold_replies()
    t = threading.Thread(target=run_op, args=(db, "append", uid_for(1, 0, 1),
                                              random.Random(1), rec),
                         kwargs={"n_lists": 2, "attempts": 6})
    t.start()
    wait(lambda: raw.current_revision() > before, "the Txn never reached etcd", 5.0)
    proxy.cut()
    proxy.thaw()
    t.join(30)
    assert not t.is_alive()
    rep = judge(raw, truth, rec)
    assert rep.classes.get("duplicate-effect", 0) > 0, (rep.classes, rec.ops)
    assert rep.classes.get("duplicate-append", 0) > 0, rep.classes


def test_client_loop_records_every_op() -> None:
    """client_loop over a memory DB: every op is recorded with its outcome and revisions."""
    import txindex

    from .torture import MODELS

    rec = ListRecorder()
    with txindex.open("memory://chk-loop", models=MODELS, prefix=PREFIX) as db:
        setup(db, 4, 3)
        stop = threading.Event()
        n = client_loop(db, 0, 0, 7, rec, stop, max_ops=60, n_lists=4, n_slots=3, pause=0)
    assert n == 60 and len(rec.ops) == 60
    assert all(o["status"] == "ok" and o["snap"] >= 1 for o in rec.ops)
    assert any(o["commit"] for o in rec.ops) and any(o["kind"] == "read" for o in rec.ops)
