"""Size-dependent metrics: opening a large DB, applying watch batches, memory, and the
get/query/load scaling curve.

The large data sets live in a dedicated etcd (data dir under the run's temp dir on /tmp,
``--quota-backend-bytes`` 8 GiB) shared by the load metric and the curve: ``scale<N>/`` holds N
:class:`~bench.common.Host` objects (3 indexes), written with raw Txns of 128 puts from
several threads.
"""

from __future__ import annotations

import gc
import multiprocessing as mp
import queue
import random
import statistics
import threading
import time
import tracemalloc
import uuid
from typing import Any

import txindex
from bench.common import (
    US,
    Context,
    Host,
    Measured,
    batch,
    curve,
    metric,
    preload,
)
from bench.workers import HOST
from txindex.backend import Put, open_backend
from txindex.backend.base import Event, prefix_end, successor
from txindex.server import EtcdServer
from txindex.store import Store
from txindex.watcher import Watcher

QUOTA = 8 * 1024**3
PAGE = 2000  # the DB's default page size


def make_host(i: int, n: int) -> Host:
    """Host i of a set of n: ``user`` groups of 10 (a find returns 10 objects at any n)."""
    return Host(
        id=f"h{i:07d}",
        user=f"u{i // 10}",
        ip=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        tags=("prod", "gpu") if i % 3 else ("dev",),
        last_seen=float(i),
    )


def write_hosts(url: str, prefix: str, n: int, senders: int = 3) -> None:
    """Write n hosts under ``prefix``: raw Txns of 128 puts, ``senders`` threads sending."""
    backend = open_backend(url)
    q: queue.Queue[list[Put] | None] = queue.Queue(maxsize=64)
    errors: list[BaseException] = []

    def send() -> None:
        try:
            while (ops := q.get()) is not None:
                backend.txn([], ops)
        except BaseException as e:
            errors.append(e)

    threads = [threading.Thread(target=send, daemon=True) for _ in range(senders)]
    for t in threads:
        t.start()
    try:
        p = prefix + HOST.prefix
        for lo in range(0, n, 128):
            q.put([
                Put(f"{p}h{i:07d}".encode(), HOST.encode(make_host(i, n)))
                for i in range(lo, min(n, lo + 128))
            ])
            if errors:
                break
    finally:
        for _ in threads:
            q.put(None)
        for t in threads:
            t.join()
        backend.close()
    if errors:
        raise errors[0]


def scale_server(ctx: Context) -> EtcdServer:
    srv = ctx.cache.get("scale-etcd")
    if srv is None:
        srv = EtcdServer(
            ctx.tmp / "etcd-scale", extra_args=[f"--quota-backend-bytes={QUOTA}"]
        )
        srv.start()
        ctx.on_close(srv.stop, scope="run")
        ctx.cache["scale-etcd"] = srv
    return srv  # type: ignore[no-any-return]


def scale_prefix(ctx: Context, n: int) -> tuple[str, str]:
    """(url, prefix) of a data set of n hosts, written on first use."""
    srv = scale_server(ctx)
    prefix = f"scale{n}/"
    key = f"scale-written-{n}"
    if key not in ctx.cache:
        t0 = time.monotonic()
        write_hosts(srv.url, prefix, n)
        ctx.cache[key] = time.monotonic() - t0
    return srv.url, prefix


def open_db(url: str, prefix: str, n: int) -> tuple[float, txindex.DB]:
    gc.collect()
    t0 = time.perf_counter()
    db = txindex.open(url, models=[Host], prefix=prefix)
    dt = time.perf_counter() - t0
    assert db.stats()["keys"] == n, (db.stats()["keys"], n)
    return dt, db


def time_open(url: str, prefix: str, n: int) -> float:
    dt, db = open_db(url, prefix, n)
    db.close()
    del db
    gc.collect()
    return dt


def time_decode(url: str, prefix: str, n: int) -> float:
    """The baseline: paged range (page 2000, pinned revision) + decode of every value, the
    objects kept in a list as a cache would."""
    backend = open_backend(url)
    start, end = prefix.encode(), prefix_end(prefix.encode())
    try:
        gc.collect()
        t0 = time.perf_counter()
        objs = []
        key, rev = start, 0
        decode = HOST.decode
        while True:
            page = backend.range(key, end, revision=rev, limit=PAGE)
            rev = rev or page.revision
            for kv in page.kvs:
                objs.append(decode(kv.value, kv.key.decode()))
            if not page.more or not page.kvs:
                break
            key = successor(page.kvs[-1].key)
        dt = time.perf_counter() - t0
        assert len(objs) == n, (len(objs), n)
    finally:
        backend.close()
    del objs
    gc.collect()
    return dt


def load_pair(ctx: Context, n: int, rounds: int) -> tuple[list[float], list[float]]:
    """Alternating open / decode timings over the n-host data set (cached per n)."""
    key = f"load-{n}"
    if key not in ctx.cache:
        url, prefix = scale_prefix(ctx, n)
        opens: list[float] = []
        decodes: list[float] = []
        for r in range(rounds):
            if r % 2 == 0:
                opens.append(time_open(url, prefix, n))
                decodes.append(time_decode(url, prefix, n))
            else:
                decodes.append(time_decode(url, prefix, n))
                opens.append(time_open(url, prefix, n))
        ctx.cache[key] = (opens, decodes)
    return ctx.cache[key]  # type: ignore[no-any-return]


def scale_sizes(ctx: Context) -> tuple[int, ...]:
    return ctx.pick((2_000, 10_000), (10_000, 100_000), (10_000, 100_000, 1_000_000))


@metric(
    "load_1m_vs_decode",
    unit="s/open",
    ratio="value/baseline",
    target=("ratio", "<=", 1.5),
    etcd=True,
)
def load_1m_vs_decode(ctx: Context) -> Measured:
    """txindex.open over N hosts (3 indexes; N = 1M full, 100k quick, 10k smoke) vs the paged
    range + decode alone."""
    n = scale_sizes(ctx)[-1]
    opens, decodes = load_pair(ctx, n, ctx.pick(2, 2, 3))
    return Measured(
        statistics.median(opens),
        statistics.median(decodes),
        {
            "objects": n,
            "open_min_s": min(opens),
            "decode_min_s": min(decodes),
            "write_s": ctx.cache.get(f"scale-written-{n}", 0.0),
            "rounds": len(opens),
        },
    )


@curve("scale_get_query_load", etcd=True)
def scale_get_query_load(ctx: Context) -> list[dict[str, Any]]:
    """tx.get, tx.find (10 objects), tx.first (unique) and open/decode time at growing N."""
    rows = []
    for n in scale_sizes(ctx):
        opens, decodes = load_pair(ctx, n, 1)
        url, prefix = scale_prefix(ctx, n)
        _, db = open_db(url, prefix, n)
        try:
            g, f, u = _point_times(db, n)
        finally:
            db.close()
            del db
            gc.collect()
        rows.append(
            {
                "objects": n,
                "get_us": g * US,
                "find10_us": f * US,
                "first_unique_us": u * US,
                "open_s": statistics.median(opens),
                "decode_s": statistics.median(decodes),
                "open/decode": statistics.median(opens) / statistics.median(decodes),
            }
        )
    return rows


def _point_times(db: txindex.DB, n: int) -> tuple[float, float, float]:
    """Seconds per tx.get, tx.find (10 objects), tx.first (unique) on random objects."""
    rnd = random.Random(n)
    idx = [rnd.randrange(n) for _ in range(5000)]
    pks = [f"h{i:07d}" for i in idx]
    users = [f"u{i // 10}" for i in idx]
    ips = [make_host(i, n).ip for i in idx]
    m = len(idx)
    with db.read() as tx:
        assert len(tx.find(Host.by_user, users[0])) == min(10, n - (idx[0] // 10) * 10)
        get, find, first = tx.get, tx.find, tx.first

        def gets(k: int) -> None:
            for i in range(k):
                get(Host, pks[i % m])

        def finds(k: int) -> None:
            for i in range(k):
                find(Host.by_user, users[i % m])

        def firsts(k: int) -> None:
            for i in range(k):
                first(Host.by_ip, ips[i % m])

        g = statistics.median(batch(gets, 20000)[0] for _ in range(3))
        f = statistics.median(batch(finds, 5000)[0] for _ in range(3))
        u = statistics.median(batch(firsts, 10000)[0] for _ in range(3))
    return g, f, u


# ---- watch batches --------------------------------------------------------------------------


def _record_events(ctx: Context, n: int) -> tuple[list[tuple[Event, ...]], int]:
    """Write n creates then n updates (user and tags change: index keys move) with raw Txns
    of 128 puts while a txindex etcd watch on the prefix follows them: the real watch responses
    as delivered live (``Event`` tuples). Returns (responses, revision of the last create)."""
    prefix = ctx.fresh_prefix("events")
    backend = open_backend(ctx.etcd_url)
    try:
        rev0 = backend.current_revision()
        stream = backend.watch(prefix.encode(), prefix_end(prefix.encode()), rev0 + 1)
        responses: list[tuple[Event, ...]] = []
        try:
            p = prefix + HOST.prefix
            rev = creates_end = 0
            for phase in (0, 1):
                for lo in range(0, n, 128):
                    ops = []
                    for i in range(lo, min(n, lo + 128)):
                        h = make_host(i, n)
                        if phase:
                            h = Host(h.id, f"moved{i % 500}", h.ip, ("edge",), h.last_seen + 1)
                        ops.append(Put(f"{p}{h.id}".encode(), HOST.encode(h)))
                    rev = backend.txn([], ops).revision
                if phase == 0:
                    creates_end = rev
            got = 0
            while got < 2 * n:
                resp = stream.get(10.0)
                if resp is None:
                    raise TimeoutError(f"watch delivered {got} of {2 * n} events")
                if resp.events:
                    responses.append(resp.events)
                    got += len(resp.events)
        finally:
            stream.close()
    finally:
        backend.close()
    return responses, creates_end


def _apply_all(prefix: str, responses: list[tuple[Event, ...]]) -> tuple[float, Store]:
    store = Store([HOST])
    watcher = Watcher(None, store, prefix)  # type: ignore[arg-type]  # never started
    gc.collect()
    t0 = time.perf_counter()
    for events in responses:
        watcher._apply(events)
    return time.perf_counter() - t0, store


def _decode_all(responses: list[tuple[Event, ...]]) -> float:
    decode = HOST.decode
    gc.collect()
    t0 = time.perf_counter()
    kept = [decode(ev.value, "") for events in responses for ev in events]
    dt = time.perf_counter() - t0
    del kept
    return dt


@metric(
    "apply_events_per_s",
    unit="events/s",
    ratio="value/baseline",
    target=("value", ">=", 100_000),
    etcd=True,
)
def apply_events_per_s(ctx: Context) -> Measured:
    """Watcher apply (decode + store + 3 indexes) of REAL etcd watch responses, replayed from a
    list (creates, then updates moving index keys); baseline = decoding the same values alone.
    Both in events/s."""
    n = ctx.pick(2_000, 20_000, 100_000)
    responses, creates_end = _record_events(ctx, n)
    prefix = ""  # replay: keys keep their prefix, so use the events' own prefix
    first_key = responses[0][0].key.decode()
    prefix = first_key[: first_key.index(HOST.prefix)]
    events = sum(len(r) for r in responses)
    creates = [r for r in responses if r[-1].mod_revision <= creates_end]
    updates = [r for r in responses if r[0].mod_revision > creates_end]
    applied: list[float] = []
    decoded: list[float] = []
    create_t: list[float] = []
    update_t: list[float] = []
    for r in range(ctx.pick(2, 3, 3)):
        pair = [("apply", None), ("decode", None)]
        for side, _ in pair if r % 2 == 0 else reversed(pair):
            if side == "apply":
                dt, store = _apply_all(prefix, responses)
                last = responses[-1][-1].mod_revision
                assert len(store.entries()) == n and store.revision == last
                applied.append(dt)
                del store
                if creates and updates and len(creates) + len(updates) == len(responses):
                    dt_c, store = _apply_all(prefix, creates)
                    t0 = time.perf_counter()
                    w = Watcher(None, store, prefix)  # type: ignore[arg-type]
                    for evs in updates:
                        w._apply(evs)
                    update_t.append(time.perf_counter() - t0)
                    create_t.append(dt_c)
                    del store, w
            else:
                decoded.append(_decode_all(responses))
            gc.collect()
    extra: dict[str, Any] = {
        "source": "real etcd watch responses (recorded, replayed into Watcher._apply)",
        "events": events,
        "responses": len(responses),
        "events_per_response": events / len(responses),
    }
    if create_t:
        extra["create_events_per_s"] = (sum(len(r) for r in creates)) / statistics.median(create_t)
        extra["update_events_per_s"] = (sum(len(r) for r in updates)) / statistics.median(update_t)
    return Measured(events / statistics.median(applied), events / statistics.median(decoded), extra)


def _e2e_writer(url: str, prefix: str, n: int, conn: Any) -> None:
    """Child: write n creates then n updates in Txns of 128 puts as fast as possible."""
    backend = open_backend(url)
    try:
        p = prefix + HOST.prefix
        txns = []
        for phase in (0, 1):
            for lo in range(0, n, 128):
                txns.append([
                    Put(f"{p}h{i:07d}".encode(), HOST.encode(make_host(i, n + phase)))
                    for i in range(lo, min(n, lo + 128))
                ])
        conn.send("ready")
        conn.recv()
        t0 = time.monotonic()
        rev = 0
        for ops in txns:
            rev = backend.txn([], ops).revision
        conn.send((t0, time.monotonic(), rev))
    finally:
        backend.close()


@metric("apply_e2e_events_per_s", unit="events/s", ratio="value/baseline", etcd=True)
def apply_e2e_events_per_s(ctx: Context) -> Measured:
    """End to end: another process writes N creates + N updates (Txns of 128 puts); value = events
    / (first write -> the DB's cache has applied the last), baseline = the writer's own rate."""
    n = ctx.pick(2_000, 20_000, 100_000)
    prefix = ctx.fresh_prefix("e2e")
    db = txindex.open(ctx.etcd_url, models=[Host], prefix=prefix)
    ctx.on_close(db.close)
    mpc = mp.get_context("spawn")
    parent, child = mpc.Pipe()
    proc = mpc.Process(target=_e2e_writer, args=(ctx.etcd_url, prefix, n, child), daemon=True)
    proc.start()
    ctx.on_close(lambda: proc.join(30))
    if not parent.poll(120):
        raise TimeoutError("writer did not start")
    assert parent.recv() == "ready"
    parent.send("go")
    if not parent.poll(300):
        raise TimeoutError("writer did not finish")
    t0, t_end, last_rev = parent.recv()
    assert db.wait_for(last_rev, timeout=120), "cache never reached the writer's last revision"
    t_applied = time.monotonic()
    events = 2 * n
    return Measured(
        events / (t_applied - t0),
        events / (t_end - t0),
        {
            "source": "real etcd writes from another process, txindex watch",
            "events": events,
            "lag_after_last_write_ms": (t_applied - t_end) * 1e3,
            "watch_events_counted": db._watcher.stats.events,
        },
    )


# ---- memory ---------------------------------------------------------------------------------


@metric("memory_vs_objects", unit="MB", ratio="value/baseline", target=("ratio", "<=", 2))
def memory_vs_objects(ctx: Context) -> Measured:
    """tracemalloc: bytes held by an open DB's store (entries + 3 indexes + unique maps; no
    versions, none pinned) vs the decoded objects alone in a list. memory:// backend."""
    n = ctx.pick(5_000, 50_000, 200_000)
    url = f"memory://bench-mem-{uuid.uuid4().hex}"
    prefix = "m/"
    preload(url, prefix, [make_host(i, n) for i in range(n)])
    backend = open_backend(url)
    kvs = []
    key, end, rev = prefix.encode(), prefix_end(prefix.encode()), 0
    while True:
        page = backend.range(key, end, revision=rev, limit=PAGE)
        rev = rev or page.revision
        kvs.extend(page.kvs)
        if not page.more:
            break
        key = successor(page.kvs[-1].key)
    backend.close()

    gc.collect()
    tracemalloc.start()
    objs = [HOST.decode(kv.value, kv.key.decode()) for kv in kvs]
    gc.collect()
    objects_bytes = tracemalloc.get_traced_memory()[0]
    tracemalloc.stop()
    del objs
    gc.collect()

    tracemalloc.start()
    db = txindex.open(url, models=[Host], prefix=prefix)
    gc.collect()
    db_bytes = tracemalloc.get_traced_memory()[0]
    before = tracemalloc.take_snapshot()
    # versions: hold a snapshot open while 10% of the objects are rewritten
    k = n // 10
    pin = db.read()
    pin.__enter__()
    updated = [make_host(i, n) for i in range(k)]
    preload(url, prefix, [Host(h.id, h.user, h.ip, h.tags, h.last_seen + 1) for h in updated])
    assert db.wait_for(db._backend.current_revision(), 30)
    gc.collect()
    after = tracemalloc.take_snapshot()
    tracemalloc.stop()
    flt = [tracemalloc.Filter(False, "*/backend/memory.py"), tracemalloc.Filter(False, "*/grpc/*")]
    diff = after.filter_traces(flt).compare_to(before.filter_traces(flt), "filename")
    grown = sum(s.size_diff for s in diff)
    pin.__exit__(None, None, None)
    db.close()
    assert len(kvs) == n
    return Measured(
        db_bytes / 1e6,
        objects_bytes / 1e6,
        {
            "objects": n,
            "db_bytes_per_object": db_bytes / n,
            "object_bytes_per_object": objects_bytes / n,
            "pinned_update_bytes_per_version": grown / max(1, k),
        },
    )
