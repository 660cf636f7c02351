"""Concurrency metric: false conflicts among writers on disjoint objects of one model."""

from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable

import txindex
from bench.common import Context, Measured, Node, TxnRecorder, make_node, metric, preload
from txindex import Conflict, Transaction


def _reason(msg: str) -> str:
    """A Conflict message with object-specific parts cut, for grouping."""
    return msg.split(":")[0][:60] if "changed" in msg else msg[:60]


def _run_writers(
    db: txindex.DB,
    owned: list[Node],
    duration: float,
    query: Callable[[Transaction, Node], list[Node]],
) -> tuple[int, int, dict[str, int], float]:
    """Each thread, for ``duration`` s: ``query`` (must find only its own object), then a write
    of it. (commits, Conflicts reaching the caller, their reasons, seconds)."""
    threads = len(owned)
    commits = [0] * threads
    conflicts = [0] * threads
    errors: list[BaseException] = []
    reasons: dict[str, int] = {}
    start = threading.Barrier(threads + 1)

    def writer(t: int) -> None:
        obj = owned[t]
        k = int(obj.last_seen)
        try:
            start.wait()
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                k += 1
                try:
                    with db.tx() as tx:
                        mine = query(tx, obj)
                        assert len(mine) == 1 and mine[0].id == obj.id, mine
                        tx.put(dataclasses.replace(mine[0], last_seen=float(k)))
                    commits[t] += 1
                except Conflict as e:
                    conflicts[t] += 1
                    reasons[_reason(str(e))] = reasons.get(_reason(str(e)), 0) + 1
        except BaseException as e:  # surfaced below
            errors.append(e)

    workers = [threading.Thread(target=writer, args=(t,), daemon=True) for t in range(threads)]
    for w in workers:
        w.start()
    start.wait()
    t0 = time.monotonic()
    for w in workers:
        w.join()
    if errors:
        raise errors[0]
    return sum(commits), sum(conflicts), reasons, time.monotonic() - t0


def _find_own(tx: Transaction, obj: Node) -> list[Node]:
    return tx.find(Node.by_user, obj.user)


def _range_own(tx: Transaction, obj: Node) -> list[Node]:
    return list(tx.range(Node.by_user_seen, (obj.user, 0.0), (obj.user, float("inf"))))


@metric(
    "false_conflict_rate", unit="%", ratio="value/baseline", target=("value", "<=", 1.0), etcd=True
)
def false_conflict_rate(ctx: Context) -> Measured:
    """W writer threads on disjoint objects of one model, each tx: an index query that finds
    only its own object, then a write of it; half the time an equality query (``find`` on a
    value only it uses), half a range (its own slice of a compound index: it guards the
    model's fence, which every write moves). value = Conflicts reaching the caller / commits
    (%); baseline = failed Txns / commits (%), the rate a design aborting on every failed
    guard would show."""
    threads = ctx.pick(4, 8, 8)
    duration = ctx.pick(1.5, 10.0, 30.0) / 2
    prefix = ctx.fresh_prefix("conflict")
    preload(ctx.etcd_url, prefix, [make_node(i) for i in range(ctx.pick(100, 2000, 10000))])
    db = txindex.open(ctx.etcd_url, models=[Node], prefix=prefix)
    ctx.on_close(db.close)
    counter = TxnRecorder.install(db)
    owned = [Node(f"w{t}", f"owner{t}", f"100.65.0.{t}", ("bench",), 1.0) for t in range(threads)]
    with db.tx() as tx:
        for obj in owned:
            tx.put(obj)
    phases: dict[str, dict[str, float]] = {}
    reasons: dict[str, int] = {}
    for name, query in (("find", _find_own), ("range", _range_own)):
        ok0, failed0, objects0 = counter.succeeded, counter.failed, counter.objects
        n_commits, n_conflicts, why, elapsed = _run_writers(db, owned, duration, query)
        # each commit wrote one object, alone or in a group commit
        assert counter.objects - objects0 == n_commits, (counter.objects, n_commits)
        for r, n in why.items():
            reasons[r] = reasons.get(r, 0) + n
        phases[name] = {
            "commits": n_commits,
            "conflicts": n_conflicts,
            "failed_txns": counter.failed - failed0,
            "txns": counter.succeeded - ok0,
            "commits_per_s": n_commits / elapsed,
        }
        with db.read() as tx:  # every thread's last write is there
            owned = [o for o in (tx.get(Node, o.id) for o in owned) if o is not None]
        assert len(owned) == threads
    counted = ("commits", "conflicts", "failed_txns", "txns")
    total = {k: sum(p[k] for p in phases.values()) for k in counted}
    denom = max(1, total["commits"])
    extra: dict[str, object] = {
        "threads": threads,
        "commits": total["commits"],
        "conflicts": total["conflicts"],
        "failed_txns": total["failed_txns"],
        "commits_per_txn": total["commits"] / max(1, total["txns"]),
        "rounds_per_commit": (total["commits"] + total["failed_txns"]) / denom,
    }
    for name, p in phases.items():
        extra[f"{name}_commits_per_s"] = p["commits_per_s"]
        extra[f"{name}_failed_txns_per_commit"] = p["failed_txns"] / max(1, p["commits"])
    extra["conflict_reasons"] = "; ".join(f"{n}x {r}" for r, n in reasons.items()) or "-"
    return Measured(100.0 * total["conflicts"] / denom, 100.0 * total["failed_txns"] / denom, extra)
