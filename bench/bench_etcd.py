"""Metrics against a real etcd: cached reads vs a network get, commit vs a raw Txn."""

from __future__ import annotations

import dataclasses
import random
import time

import etcd3

import txindex
from bench.common import (
    US,
    Context,
    Host,
    InprocWatch,
    Measured,
    Node,
    TxnRecorder,
    Watchers,
    batch,
    interleave,
    interleave_sides,
    make_node,
    median,
    metric,
    p99,
    preload,
)
from txindex.model import info_of


def _client(ctx: Context) -> etcd3.Etcd3Client:
    host, port = ctx.host_port
    client = etcd3.client(host, port)
    ctx.on_close(client.close)
    return client


@metric(
    "get_vs_etcd", unit="us/get", ratio="baseline/value", target=("ratio", ">=", 200), etcd=True
)
def get_vs_etcd(ctx: Context) -> Measured:
    """Cached tx.get inside an open db.read() vs the etcd3 client's get (loopback)."""
    n_keys = ctx.pick(100, 2000, 10000)
    prefix = ctx.fresh_prefix("get")
    nodes = [make_node(i) for i in range(n_keys)]
    preload(ctx.etcd_url, prefix, nodes)
    db = txindex.open(ctx.etcd_url, models=[Node], prefix=prefix)
    ctx.on_close(db.close)
    client = _client(ctx)
    pks = [n.id for n in nodes]
    random.Random(1).shuffle(pks)
    keys = [prefix + "nodes/" + pk for pk in pks]
    m = len(pks)
    with db.read() as tx:  # correctness check, outside timing
        assert all(tx.get(Node, pk) is not None for pk in pks)
    assert client.get(keys[0])[0] is not None

    def candidate() -> list[float]:
        with db.read() as tx:  # the read transaction is open; only the gets are timed
            get = tx.get

            def loop(n: int) -> None:
                for i in range(n):
                    get(Node, pks[i % m])

            return batch(loop, ctx.pick(2000, 20000, 50000))

    def baseline() -> list[float]:
        get = client.get

        def loop(n: int) -> None:
            for i in range(n):
                get(keys[i % m])

        return batch(loop, ctx.pick(20, 150, 300))

    cand, base = interleave(ctx.pick(3, 12, 30), candidate, baseline)
    return Measured(
        median(cand) * US,
        median(base) * US,
        {"keys": n_keys, "rounds": len(cand), "etcd_get_p99_us": p99(base) * US},
    )


@metric(
    "commit_vs_raw",
    unit="ms/commit",
    ratio="value/baseline",
    target=("ratio", "<=", 1.25),
    etcd=True,
)
def commit_vs_raw(ctx: Context) -> Measured:
    """1 read + 1 write tx on a 3-index model, commit + next db.read() seeing it, vs a raw
    etcd3 transaction (mod_revision compare on the read key, one put)."""
    prefix = ctx.fresh_prefix("commit")
    db = txindex.open(ctx.etcd_url, models=[Host], prefix=prefix)
    ctx.on_close(db.close)
    # background objects so the indexes are not trivially empty
    n_rows = ctx.pick(100, 2000, 10000)
    preload(
        ctx.etcd_url,
        prefix,
        [Host(f"h{i}", f"u{i % 50}", f"10.1.{i >> 8}.{i & 255}", ("prod",)) for i in range(n_rows)],
    )
    r_obj = Host("r", "alice", "100.64.0.1", ("prod",), 1.0)
    w_obj = Host("w", "bob", "100.64.0.2", ("dev", "gpu"), 1.0)
    with db.tx() as tx:
        tx.put(r_obj)
        tx.put(w_obj)
    info = info_of(Host)
    recorder = TxnRecorder.install(db)
    client = _client(ctx)
    raw = ctx.fresh_prefix("raw")
    rkey, wkey = raw + "hosts/r", raw + "hosts/w"
    client.put(rkey, info.encode(r_obj))
    client.put(wkey, info.encode(w_obj))
    rrev = client.get(rkey)[1].mod_revision
    t_ = client.transactions
    state = {"i": 1}
    commit_t: list[float] = []
    visible_t: list[float] = []
    per_round = ctx.pick(5, 20, 40)

    def candidate() -> list[float]:
        out = []
        for _ in range(per_round):
            state["i"] += 1
            i = state["i"]
            t0 = time.perf_counter()
            with db.tx() as tx:
                tx.get(Host, "r")
                tx.put(dataclasses.replace(w_obj, last_seen=float(i)))
            t1 = time.perf_counter()
            with db.read() as rtx:
                seen = rtx.get(Host, "w")
            t2 = time.perf_counter()
            assert seen is not None and seen.last_seen == float(i), (seen, i)
            commit_t.append(t1 - t0)
            visible_t.append(t2 - t1)
            out.append(t2 - t0)
        return out

    def raw_txns(key: str) -> list[float]:
        out = []
        for _ in range(per_round):
            state["i"] += 1
            t0 = time.perf_counter()
            data = info.encode(dataclasses.replace(w_obj, last_seen=float(state["i"])))
            ok, _ = client.transaction(
                compare=[t_.mod(rkey) == rrev], success=[t_.put(key, data)], failure=[]
            )
            out.append(time.perf_counter() - t0)
            assert ok
        return out

    # A third side, reported only: the same raw Txn into a prefix that one etcdctl process
    # watches (what etcd and the machine charge any watched write; see bench.common.Watchers).
    watched = ctx.fresh_prefix("raw-watched")
    watchers = Watchers(ctx.endpoint or "", watched, 1, ctx.tmp)
    ctx.on_close(watchers.close)
    # A fourth side, reported only: the same raw Txn into a prefix that a do-nothing watch of
    # this process reads over txindex's own watch transport (bench.common.InprocWatch).
    inproc = ctx.fresh_prefix("raw-inproc")
    inproc_watch = InprocWatch(ctx.etcd_url, inproc)
    ctx.on_close(inproc_watch.close)
    sides = {
        "candidate": candidate,
        "baseline": lambda: raw_txns(wkey),
        "inproc": lambda: raw_txns(inproc + "hosts/w"),
    }
    if watchers.available:
        sides["watched"] = lambda: raw_txns(watched + "hosts/w")
    interleave_sides(1, sides)  # warm-up (channels, code paths), discarded
    commit_t.clear()
    visible_t.clear()
    recorder.seconds.clear()
    txns0 = recorder.succeeded + recorder.failed
    local0 = db.stats()["local_applies"]
    samples = interleave_sides(ctx.pick(2, 10, 25), sides)
    cand, base = samples["candidate"], samples["baseline"]
    assert inproc_watch.events > 0, "the in-process watch saw no event"
    floor: dict[str, float] = {}
    for side in ("inproc", "watched"):  # the floors (see the two sides above)
        if side in samples:
            t = median(samples[side])
            floor[f"raw_{side}_ms"] = t * 1e3
            floor[f"raw_{side}_ratio"] = t / median(base)
            floor[f"ratio_vs_raw_{side}"] = median(cand) / t
    return Measured(
        median(cand) * 1e3,
        median(base) * 1e3,
        {
            **floor,
            "p99_ms": p99(cand) * 1e3,
            "baseline_p99_ms": p99(base) * 1e3,
            "commit_only_ms": median(commit_t) * 1e3,
            "visible_wait_ms": median(visible_t) * 1e3,
            "txn_rpc_ms": median(recorder.seconds) * 1e3,
            "txns_per_commit": (recorder.succeeded + recorder.failed - txns0) / len(cand),
            # share of commits the committing thread applied itself (else the watch did)
            "local_apply_share": (db.stats()["local_applies"] - local0) / len(cand),
            "txn_shape": recorder.shape,
            "model_rows": n_rows,
            "samples": len(cand),
        },
    )
