"""In-memory metrics (memory:// backend): unique lookups and ranges vs sqlite, read-tx cost."""

from __future__ import annotations

import random
import sqlite3
import uuid
from typing import Any

import txindex
from bench.common import (
    US,
    Context,
    Measured,
    Node,
    batch,
    interleave,
    make_node,
    median,
    metric,
    preload,
)

HEAVY = "heavy"  # the user with many nodes, for the range benchmark
RANGE = 200
SEP = "\x1f"


def _tags(s: str) -> tuple[str, ...]:
    return tuple(s.split(SEP)) if s else ()


class Dataset:
    """N nodes (plus HEAVY's nodes) in a memory:// DB and in an in-memory sqlite table."""

    def __init__(self, ctx: Context) -> None:
        n = ctx.pick(2000, 20000, 100000)
        heavy = ctx.pick(RANGE + 50, RANGE + 200, RANGE + 800)
        nodes = [make_node(i) for i in range(n)]
        nodes += [make_node(n + j, user=HEAVY, last_seen=1000.0 + j * 0.5) for j in range(heavy)]
        url = f"memory://bench-{uuid.uuid4().hex}"
        prefix = "bench/"
        preload(url, prefix, nodes)
        self.db = txindex.open(url, models=[Node], prefix=prefix)
        ctx.on_close(self.db.close, scope="run")
        self.nodes = nodes
        self.n = n
        self.heavy_seen = [x.last_seen for x in nodes[n:]]

        conn = sqlite3.connect(":memory:", check_same_thread=False)
        conn.execute(
            "CREATE TABLE nodes (id TEXT PRIMARY KEY, user TEXT NOT NULL, ip TEXT NOT NULL, "
            "tags TEXT NOT NULL, last_seen REAL NOT NULL)"
        )
        conn.executemany(
            "INSERT INTO nodes VALUES (?, ?, ?, ?, ?)",
            [(x.id, x.user, x.ip, SEP.join(x.tags), x.last_seen) for x in nodes],
        )
        conn.execute("CREATE UNIQUE INDEX nodes_by_ip ON nodes (ip)")
        conn.execute("CREATE INDEX nodes_by_user_seen ON nodes (user, last_seen, id)")
        conn.execute("ANALYZE")
        conn.commit()
        ctx.on_close(conn.close, scope="run")
        self.sql = conn


def dataset(ctx: Context) -> Dataset:
    ds = ctx.cache.get("memory-dataset")
    if ds is None:
        ds = ctx.cache["memory-dataset"] = Dataset(ctx)
    return ds  # type: ignore[no-any-return]


LOOKUP_SQL = "SELECT id, user, ip, tags, last_seen FROM nodes WHERE ip = ?"
RANGE_SQL = (
    "SELECT id, user, ip, tags, last_seen FROM nodes WHERE user = ? AND last_seen >= ? "
    "ORDER BY last_seen, id LIMIT ?"
)


@metric(
    "unique_lookup_vs_sqlite", unit="us/lookup", ratio="baseline/value", target=("ratio", ">=", 1)
)
def unique_lookup_vs_sqlite(ctx: Context) -> Measured:
    """tx.first on a unique index (object returned) vs sqlite SELECT by an indexed column
    building the same dataclass."""
    ds = dataset(ctx)
    ips = [x.ip for x in random.Random(2).sample(ds.nodes, min(5000, len(ds.nodes)))]
    m = len(ips)
    ex = ds.sql.execute
    with ds.db.read() as tx:  # both sides return the same objects
        for ip in ips[:50]:
            row = ex(LOOKUP_SQL, (ip,)).fetchone()
            assert tx.first(Node.by_ip, ip) == Node(row[0], row[1], row[2], _tags(row[3]), row[4])
    n_ops = ctx.pick(1000, 20000, 50000)

    def candidate() -> list[float]:
        with ds.db.read() as tx:
            first, idx = tx.first, Node.by_ip

            def loop(n: int) -> None:
                for i in range(n):
                    first(idx, ips[i % m])

            return batch(loop, n_ops)

    def baseline() -> list[float]:
        def loop(n: int) -> None:
            for i in range(n):
                row = ex(LOOKUP_SQL, (ips[i % m],)).fetchone()
                Node(row[0], row[1], row[2], _tags(row[3]), row[4])

        return batch(loop, n_ops)

    cand, base = interleave(ctx.pick(3, 10, 20), candidate, baseline)
    return Measured(median(cand) * US, median(base) * US, {"rows": len(ds.nodes)})


@metric("range200_vs_sqlite", unit="us/range", ratio="baseline/value", target=("ratio", ">=", 5))
def range200_vs_sqlite(ctx: Context) -> Measured:
    """A 200-object tx.range on the compound index by_user_seen vs sqlite ORDER BY over a
    compound index, building the objects."""
    ds = dataset(ctx)
    starts = ds.heavy_seen[: len(ds.heavy_seen) - RANGE]
    m = len(starts)
    hi = (HEAVY, 1e300)
    ex = ds.sql.execute

    def sql_range(t: float) -> list[Any]:
        return [Node(r[0], r[1], r[2], _tags(r[3]), r[4]) for r in ex(RANGE_SQL, (HEAVY, t, RANGE))]

    with ds.db.read() as tx:
        for t in starts[:: max(1, m // 20)]:
            got = list(tx.range(Node.by_user_seen, (HEAVY, t), hi, limit=RANGE))
            assert len(got) == RANGE and got == sql_range(t), t
    n_ops = ctx.pick(20, 300, 1000)

    def candidate() -> list[float]:
        with ds.db.read() as tx:
            rng, idx = tx.range, Node.by_user_seen

            def loop(n: int) -> None:
                for i in range(n):
                    list(rng(idx, (HEAVY, starts[i % m]), hi, limit=RANGE))

            return batch(loop, n_ops)

    def baseline() -> list[float]:
        def loop(n: int) -> None:
            for i in range(n):
                sql_range(starts[i % m])

        return batch(loop, n_ops)

    cand, base = interleave(ctx.pick(3, 10, 20), candidate, baseline)
    return Measured(median(cand) * US, median(base) * US, {"rows": len(ds.nodes), "objects": RANGE})


@metric("readtx_overhead", unit="us/iter", ratio="value/baseline")
def readtx_overhead(ctx: Context) -> Measured:
    """`with db.read() as tx:` + 3 gets vs 3 plain dict lookups (report only)."""
    ds = dataset(ctx)
    picks = random.Random(3).sample(ds.nodes, 300)
    triples = [(picks[i].id, picks[i + 1].id, picks[i + 2].id) for i in range(0, 297, 3)]
    plain = {x.id: x for x in ds.nodes}
    m = len(triples)
    read = ds.db.read
    n_ops = ctx.pick(1000, 20000, 50000)

    def candidate() -> list[float]:
        def loop(n: int) -> None:
            for i in range(n):
                a, b, c = triples[i % m]
                with read() as tx:
                    tx.get(Node, a)
                    tx.get(Node, b)
                    tx.get(Node, c)

        return batch(loop, n_ops)

    def baseline() -> list[float]:
        def loop(n: int) -> None:
            for i in range(n):
                a, b, c = triples[i % m]
                plain[a]
                plain[b]
                plain[c]

        return batch(loop, n_ops)

    cand, base = interleave(ctx.pick(3, 10, 20), candidate, baseline)
    return Measured(median(cand) * US, median(base) * US)
