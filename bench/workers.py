"""Commit loops shared by the throughput benchmarks, and a pool of worker processes.

A *writer* owns two keys: ``r<id>`` (read) and ``w<id>`` (written). One operation is
"read r, write w, commit": a txindex transaction (``tx.get`` + ``tx.put``) or, for the
baseline, a raw etcd3 transaction (``mod_revision(r) == seen`` compare, one put of w).
Writers never share keys, so neither side should ever conflict.

:class:`ProcPool` runs writers in child processes (``spawn``): each child opens its own DB
(own watcher, store, gRPC channel) and its own etcd3 client, then runs timed rounds on
command, started together by a barrier. This module must stay importable by a spawned child.
"""

from __future__ import annotations

import contextlib
import dataclasses
import multiprocessing as mp
import threading
import time
from typing import Any

import etcd3

import txindex
from bench.common import Host, InprocWatch
from txindex.model import info_of

HOST = info_of(Host)


def host_pair(wid: int) -> tuple[Host, Host]:
    r = Host(f"r{wid}", f"reader{wid}", f"100.64.{wid >> 8}.{wid & 255}", ("prod",), 1.0)
    w = Host(f"w{wid}", f"writer{wid}", f"100.65.{wid >> 8}.{wid & 255}", ("dev", "gpu"), 1.0)
    return r, w


def etcd3_client(endpoint: str) -> etcd3.Etcd3Client:
    host, _, port = endpoint.rpartition(":")
    return etcd3.client(host, int(port))


class TxindexWriter:
    """Writer ``wid`` on an open DB."""

    def __init__(self, db: txindex.DB, wid: int) -> None:
        self.db = db
        self.r, self.w = host_pair(wid)
        with db.tx() as tx:
            if tx.get(Host, self.r.id) is None:
                tx.put(self.r)
            if tx.get(Host, self.w.id) is None:
                tx.put(self.w)
        self.i = 0

    def op(self) -> None:
        self.i += 1
        with self.db.tx() as tx:
            tx.get(Host, self.r.id)
            tx.put(dataclasses.replace(self.w, last_seen=float(self.i)))


class RawWriter:
    """Writer ``wid`` with raw etcd3 transactions under ``prefix``."""

    def __init__(self, client: etcd3.Etcd3Client, prefix: str, wid: int) -> None:
        self.client = client
        self.r, self.w = host_pair(wid)
        self.rkey = f"{prefix}hosts/{self.r.id}"
        self.wkey = f"{prefix}hosts/{self.w.id}"
        client.put(self.rkey, HOST.encode(self.r))
        client.put(self.wkey, HOST.encode(self.w))
        self.rrev = client.get(self.rkey)[1].mod_revision
        self.i = 0

    def op(self) -> None:
        self.i += 1
        t = self.client.transactions
        data = HOST.encode(dataclasses.replace(self.w, last_seen=float(self.i)))
        ok, _ = self.client.transaction(
            compare=[t.mod(self.rkey) == self.rrev], success=[t.put(self.wkey, data)], failure=[]
        )
        if not ok:
            raise AssertionError(f"raw txn on disjoint keys failed ({self.rkey})")


def timed_loop(op: Any, duration: float) -> tuple[int, list[float]]:
    """Call ``op()`` until ``duration`` has passed; (count, per-op latencies)."""
    lat: list[float] = []
    deadline = time.perf_counter() + duration
    now = time.perf_counter()
    while now < deadline:
        op()
        t = time.perf_counter()
        lat.append(t - now)
        now = t
    return len(lat), lat


def run_threads(writers: list[Any], duration: float) -> tuple[float, list[float]]:
    """Run every writer's op in its own thread for ``duration``; (ops/s, all latencies)."""
    results: list[tuple[int, list[float]] | None] = [None] * len(writers)
    errors: list[BaseException] = []
    start = threading.Barrier(len(writers) + 1)

    def body(k: int) -> None:
        try:
            start.wait()
            results[k] = timed_loop(writers[k].op, duration)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,), daemon=True) for k in range(len(writers))]
    for t in threads:
        t.start()
    start.wait()
    t0 = time.perf_counter()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - t0
    if errors:
        raise errors[0]
    count = sum(r[0] for r in results if r)
    lat = [x for r in results if r for x in r[1]]
    return count / elapsed, lat


# ---- processes ----------------------------------------------------------------------------


def _child(
    url: str,
    prefix: str,
    raw_endpoint: str,
    raw_prefix: str,
    watched_prefix: str | None,
    inproc_prefix: str | None,
    wid: int,
    conn: Any,
    barrier: Any,
) -> None:
    inproc: InprocWatch | None = None
    try:
        db = txindex.open(url, models=[Host], prefix=prefix)
        client = etcd3_client(raw_endpoint)
        sides = {"txindex": TxindexWriter(db, wid), "raw": RawWriter(client, raw_prefix, wid)}
        if watched_prefix is not None:
            sides["raw_watched"] = RawWriter(client, watched_prefix, wid)
        if inproc_prefix is not None:
            inproc = InprocWatch(url, inproc_prefix)
            sides["raw_inproc"] = RawWriter(client, inproc_prefix, wid)
        conn.send(("ready", None))
    except BaseException as e:
        conn.send(("error", repr(e)))
        return
    try:
        while True:
            cmd = conn.recv()
            if cmd is None:
                break
            side, duration = cmd
            barrier.wait(timeout=120)
            t0 = time.perf_counter()
            count, lat = timed_loop(sides[side].op, duration)
            conn.send(("done", (count, time.perf_counter() - t0, lat)))
    except BaseException as e:
        conn.send(("error", repr(e)))
    finally:
        db.close()
        client.close()
        if inproc is not None:
            inproc.close()


class ProcPool:
    """``n`` writer processes; :meth:`round` runs one side (one of :attr:`sides`) in all of
    them at once. ``watched_prefix`` adds the side ``raw_watched``: raw Txns under a prefix
    the caller has watchers on; ``inproc_prefix`` adds ``raw_inproc``: raw Txns under a prefix
    each worker watches itself (:class:`~bench.common.InprocWatch`)."""

    def __init__(
        self,
        n: int,
        url: str,
        prefix: str,
        raw_endpoint: str,
        raw_prefix: str,
        watched_prefix: str | None = None,
        inproc_prefix: str | None = None,
    ) -> None:
        self.sides: tuple[str, ...] = ("txindex", "raw")
        if watched_prefix is not None:
            self.sides += ("raw_watched",)
        if inproc_prefix is not None:
            self.sides += ("raw_inproc",)
        ctx = mp.get_context("spawn")
        self.barrier = ctx.Barrier(n + 1)
        self.conns = []
        self.procs = []
        for wid in range(n):
            parent, child = ctx.Pipe()
            p = ctx.Process(
                target=_child,
                args=(
                    url,
                    prefix,
                    raw_endpoint,
                    raw_prefix,
                    watched_prefix,
                    inproc_prefix,
                    100 + wid,
                    child,
                    self.barrier,
                ),
                daemon=True,
            )
            p.start()
            self.conns.append(parent)
            self.procs.append(p)
        for c in self.conns:
            self._recv(c, "ready", 120)

    @staticmethod
    def _recv(conn: Any, want: str, timeout: float) -> Any:
        if not conn.poll(timeout):
            raise TimeoutError(f"worker did not answer {want!r} within {timeout}s")
        kind, payload = conn.recv()
        if kind != want:
            raise RuntimeError(f"worker failed: {payload}")
        return payload

    def round(self, side: str, duration: float) -> tuple[float, list[float]]:
        """(ops/s summed over workers, all latencies)."""
        for c in self.conns:
            c.send((side, duration))
        self.barrier.wait(timeout=120)
        rate = 0.0
        lat: list[float] = []
        for c in self.conns:
            count, elapsed, xs = self._recv(c, "done", duration + 120)
            rate += count / elapsed
            lat += xs
        return rate, lat

    def close(self) -> None:
        for c in self.conns:
            with contextlib.suppress(OSError):
                c.send(None)
        for p in self.procs:
            p.join(timeout=15)
            if p.is_alive():
                p.kill()
                p.join()
