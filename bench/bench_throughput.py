"""Commit throughput on disjoint keys: threads and processes vs raw etcd3 transactions, and a
curve over 1, 3 and 6 processes against a 3-member etcd cluster on loopback.

Each operation reads one object and writes another (see :mod:`bench.workers`). Rounds of the
txindex side and the raw side alternate (order flipped each round); figures are medians of the
per-round rates, latency p50/p99 over every operation.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from typing import Any

import txindex
from bench.common import (
    Context,
    Host,
    Measured,
    Watchers,
    curve,
    interleave_sides,
    metric,
    p99,
)
from bench.workers import ProcPool, RawWriter, TxindexWriter, etcd3_client, run_threads
from txindex.server import EtcdCluster


def _alternate(
    rounds: int, run: Any, sides: tuple[str, ...] = ("txindex", "raw")
) -> dict[str, tuple[list[float], list[float]]]:
    """``run(side) -> (rate, latencies)`` for ``rounds`` rounds per side, alternating;
    per side, (every round's rate, every latency)."""
    def once(side: str) -> Callable[[], list[tuple[float, list[float]]]]:
        return lambda: [run(side)]

    runs = interleave_sides(rounds, {side: once(side) for side in sides})
    return {
        side: ([rate for rate, _ in rs], [x for _, lat in rs for x in lat])
        for side, rs in runs.items()
    }


def _summary(res: dict[str, tuple[list[float], list[float]]]) -> Measured:
    (c_rates, c_lat), (b_rates, b_lat) = res["txindex"], res["raw"]
    m = Measured(
        statistics.median(c_rates),
        statistics.median(b_rates),
        {
            "p50_ms": statistics.median(c_lat) * 1e3,
            "p99_ms": p99(c_lat) * 1e3,
            "raw_p50_ms": statistics.median(b_lat) * 1e3,
            "raw_p99_ms": p99(b_lat) * 1e3,
            "rounds": len(c_rates),
            "commits": len(c_lat),
        },
    )
    # the floors: raw Txns into a prefix etcdctl processes watch (raw_watched), and into one
    # that a do-nothing watch over txindex's own transport reads (raw_inproc)
    for side in ("raw_watched", "raw_inproc"):
        if side in res:
            floor = statistics.median(res[side][0])
            m.extra[f"{side}_commits_s"] = floor
            m.extra[f"{side}_ratio"] = floor / m.baseline
            m.extra[f"ratio_vs_{side}"] = m.value / floor
    return m


@metric(
    "throughput_8threads_vs_raw",
    unit="commits/s",
    ratio="value/baseline",
    target=("ratio", ">=", 0.8),
    etcd=True,
)
def throughput_8threads_vs_raw(ctx: Context) -> Measured:
    """8 threads, one DB, disjoint keys (1 read + 1 write per tx) vs raw etcd3 Txns from 8
    threads (one client, no watch on the raw prefix)."""
    threads = 8
    duration = ctx.pick(0.5, 2.0, 5.0)
    prefix = ctx.fresh_prefix("thr")
    db = txindex.open(ctx.etcd_url, models=[Host], prefix=prefix)
    ctx.on_close(db.close)
    client = etcd3_client(ctx.endpoint or "")
    ctx.on_close(client.close)
    raw = ctx.fresh_prefix("thr-raw")
    sides = {
        "txindex": [TxindexWriter(db, t) for t in range(threads)],
        "raw": [RawWriter(client, raw, t) for t in range(threads)],
    }
    # reported only: the same raw Txns into a prefix one etcdctl process watches
    watched = ctx.fresh_prefix("thr-watched")
    watchers = Watchers(ctx.endpoint or "", watched, 1, ctx.tmp)
    ctx.on_close(watchers.close)
    if watchers.available:
        sides["raw_watched"] = [RawWriter(client, watched, t) for t in range(threads)]
    for ws in sides.values():  # warm-up: channels, code paths
        run_threads(ws, 0.2)
    s0 = db.stats()
    res = _alternate(
        ctx.pick(2, 4, 6), lambda side: run_threads(sides[side], duration), tuple(sides)
    )
    m = _summary(res)
    s1 = db.stats()
    # Txns sent (group commit: one Txn carries all the commits of a group)
    txns = m.extra["commits"] - (s1["grouped_commits"] - s0["grouped_commits"]) + (
        s1["group_txns"] - s0["group_txns"])
    m.extra["commits_per_txn"] = m.extra["commits"] / txns
    # share of Txns whose commits were applied by the committing thread (else by the watch)
    m.extra["local_apply_share"] = (s1["local_applies"] - s0["local_applies"]) / txns
    with db.read() as tx:  # every writer's last commit is visible
        for w in sides["txindex"]:
            assert tx.get(Host, w.w.id).last_seen == float(w.i), w.w.id
    m.extra.update(threads=threads, seconds_per_round=duration)
    return m


@metric(
    "throughput_3procs_vs_raw",
    unit="commits/s",
    ratio="value/baseline",
    target=("ratio", ">=", 0.8),
    etcd=True,
)
def throughput_3procs_vs_raw(ctx: Context) -> Measured:
    """3 processes, each with its own DB on one prefix (so each watches the others' commits),
    disjoint keys, vs 3 processes of raw etcd3 Txns (no watch on the raw prefix)."""
    procs = 3
    duration = ctx.pick(0.5, 2.0, 5.0)
    # reported only: raw Txns into a prefix 3 etcdctl processes watch, as 3 DBs watch theirs;
    # and raw Txns into a prefix each worker watches itself (txindex's own watch transport)
    watched = ctx.fresh_prefix("pwatched")
    watchers = Watchers(ctx.endpoint or "", watched, procs, ctx.tmp)
    ctx.on_close(watchers.close)
    pool = ProcPool(
        procs,
        ctx.etcd_url,
        ctx.fresh_prefix("procs"),
        ctx.endpoint or "",
        ctx.fresh_prefix("praw"),
        watched if watchers.available else None,
        ctx.fresh_prefix("pinproc"),
    )
    ctx.on_close(pool.close)
    for side in pool.sides:  # warm-up
        pool.round(side, 0.2)
    m = _summary(
        _alternate(ctx.pick(2, 4, 6), lambda side: pool.round(side, duration), pool.sides)
    )
    m.extra.update(procs=procs, seconds_per_round=duration)
    return m


@curve("cluster_commit_throughput", etcd=True)
def cluster_commit_throughput(ctx: Context) -> list[dict[str, Any]]:
    """Commits/s with 1, 3, 6 writer processes (disjoint keys) on a 3-member loopback cluster:
    txindex vs raw etcd3 Txns, medians of alternating rounds."""
    counts = ctx.pick((1, 2), (1, 3, 6), (1, 3, 6))
    duration = ctx.pick(0.5, 1.5, 4.0)
    rounds = ctx.pick(2, 2, 4)
    cluster = EtcdCluster(ctx.tmp / "cluster", size=3)
    cluster.start()
    ctx.on_close(cluster.stop)
    first = cluster.members[0].endpoint  # txindex's backend also sends everything to member 0
    rows = []
    for n in counts:
        pool = ProcPool(
            n, cluster.url, ctx.fresh_prefix(f"cl{n}"), first, ctx.fresh_prefix(f"clraw{n}")
        )
        try:
            pool.round("txindex", 0.2)
            pool.round("raw", 0.2)
            m = _summary(_alternate(rounds, lambda side, pool=pool: pool.round(side, duration)))
        finally:
            pool.close()
        rows.append(
            {
                "procs": n,
                "txindex_commits_s": m.value,
                "raw_commits_s": m.baseline,
                "ratio": m.value / m.baseline,
                "txindex_p99_ms": m.extra["p99_ms"],
                "raw_p99_ms": m.extra["raw_p99_ms"],
            }
        )
    return rows
