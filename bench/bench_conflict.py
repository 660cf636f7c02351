"""Concurrency metric: false conflicts among writers on disjoint objects of one model."""

from __future__ import annotations

import dataclasses
import threading
import time

import txindex
from bench.common import Context, Measured, Node, TxnRecorder, make_node, metric, preload
from txindex import Conflict


def _reason(msg: str) -> str:
    """A Conflict message with object-specific parts cut, for grouping."""
    return msg.split(":")[0][:60] if "changed" in msg else msg[:60]


@metric(
    "false_conflict_rate", unit="%", ratio="value/baseline", target=("value", "<=", 1.0), etcd=True
)
def false_conflict_rate(ctx: Context) -> Measured:
    """W writer threads on disjoint objects, each tx: find on a non-unique index (a value only
    it uses) then write its own object. value = Conflicts reaching the caller / commits (%);
    baseline = failed Txns / commits (%), the rate a design aborting on every failed model
    guard would show."""
    threads = ctx.pick(4, 8, 8)
    duration = ctx.pick(1.5, 10.0, 30.0)
    prefix = ctx.fresh_prefix("conflict")
    preload(ctx.etcd_url, prefix, [make_node(i) for i in range(ctx.pick(100, 2000, 10000))])
    db = txindex.open(ctx.etcd_url, models=[Node], prefix=prefix)
    ctx.on_close(db.close)
    counter = TxnRecorder.install(db)
    owned = [Node(f"w{t}", f"owner{t}", f"100.65.0.{t}", ("bench",), 1.0) for t in range(threads)]
    with db.tx() as tx:
        for obj in owned:
            tx.put(obj)
    base_ok, base_failed, base_objects = counter.succeeded, counter.failed, counter.objects
    commits = [0] * threads
    conflicts = [0] * threads
    errors: list[BaseException] = []
    reasons: dict[str, int] = {}
    start = threading.Barrier(threads + 1)

    def writer(t: int) -> None:
        obj = owned[t]
        k = 1
        try:
            start.wait()
            deadline = time.monotonic() + duration
            while time.monotonic() < deadline:
                k += 1
                try:
                    with db.tx() as tx:
                        mine = tx.find(Node.by_user, obj.user)
                        assert len(mine) == 1
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
    elapsed = time.monotonic() - t0
    if errors:
        raise errors[0]
    n_commits, n_conflicts = sum(commits), sum(conflicts)
    failed = counter.failed - base_failed
    # each commit wrote one object, alone or in a group commit
    assert counter.objects - base_objects == n_commits, (counter.objects, n_commits)
    txns = counter.succeeded - base_ok
    with db.read() as tx:  # every thread's last write is there
        assert all(tx.get(Node, o.id) is not None for o in owned)
    denom = max(1, n_commits)
    return Measured(
        100.0 * n_conflicts / denom,
        100.0 * failed / denom,
        {
            "threads": threads,
            "commits": n_commits,
            "conflicts": n_conflicts,
            "failed_txns": failed,
            "commits_per_txn": n_commits / max(1, txns),
            "rounds_per_commit": (n_commits + failed) / denom,
            "commits_per_s": n_commits / elapsed,
            "conflict_reasons": "; ".join(f"{n}x {r}" for r, n in reasons.items()) or "-",
        },
    )
