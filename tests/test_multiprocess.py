"""Serializability across processes on a real etcd: lost updates, write skew through index
reads (phantoms), and unique-index races. Every worker process opens its own DB on the session
server (workers in :mod:`tests.procs`, started with the "spawn" context); the verdict is
read from etcd's raw data, not from any worker's cache.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from collections import Counter as Tally
from collections.abc import Callable, Sequence
from typing import Any

import pytest

import txindex
from txindex.backend import EtcdBackend
from txindex.backend.base import prefix_end
from txindex.server import EtcdServer

from . import procs
from .models import MODELS, Counter, Node, User

CTX = multiprocessing.get_context("spawn")
RESULT_TIMEOUT = 120.0


def run_procs(target: Callable[..., None], args: Sequence[tuple[Any, ...]]) -> list[dict[str, Any]]:
    """Start one spawned process per ``args`` tuple as ``target(*a, barrier, queue)`` (the
    barrier holds all of them until every one has opened its DB) and collect their results."""
    barrier = CTX.Barrier(len(args))
    queue = CTX.Queue()
    ps = [CTX.Process(target=target, args=(*a, barrier, queue)) for a in args]
    for p in ps:
        p.start()
    results: list[dict[str, Any]] = []
    try:
        deadline = time.monotonic() + RESULT_TIMEOUT
        while len(results) < len(ps):
            results.append(queue.get(timeout=max(0.1, deadline - time.monotonic())))
    finally:
        for p in ps:
            p.join(timeout=30)
            if p.is_alive():
                p.terminate()
                p.join()
    errors = [r["error"] for r in results if "error" in r]
    assert not errors, "\n".join(errors)
    assert all(p.exitcode == 0 for p in ps), [p.exitcode for p in ps]
    return sorted(results, key=lambda r: str(r["name"]))


def raw_values(server: EtcdServer, key_prefix: str) -> dict[str, dict[str, Any]]:
    """Every key under ``key_prefix`` straight from etcd, values parsed as JSON."""
    backend = EtcdBackend([server.endpoint])
    try:
        start = key_prefix.encode()
        page = backend.range(start, prefix_end(start))
        assert not page.more
        return {kv.key.decode(): json.loads(kv.value) for kv in page.kvs}
    finally:
        backend.close()


# ---- 1. no lost update ---------------------------------------------------------------------


def test_counters_no_lost_update_across_processes(
    etcd_server: EtcdServer, etcd_url: str, prefix: str
) -> None:
    procs_n, threads, per_thread, counters = 3, 4, 40, 3
    with txindex.open(etcd_url, models=MODELS, prefix=prefix) as db:
        with db.tx() as tx:
            for n in range(counters):
                tx.put(Counter(n, 0))

        t0 = time.monotonic()
        results = run_procs(
            procs.counter_worker,
            [(etcd_url, prefix, p, threads, per_thread, counters) for p in range(procs_n)],
        )
        elapsed = time.monotonic() - t0

        done = [sum(r["done"][n] for r in results) for n in range(counters)]
        attempts = sum(r["attempts"] for r in results)
        total = procs_n * threads * per_thread
        assert sum(done) == total
        retries = attempts - total
        print(
            f"\ncounters: {procs_n} procs x {threads} threads, {total} increments in "
            f"{elapsed:.1f}s (workers {max(r['seconds'] for r in results):.1f}s), "
            f"{attempts} attempts, {retries} conflict retries"
        )

        raw = raw_values(etcd_server, prefix + "counters/")
        assert {v["n"]: v["value"] for v in raw.values()} == dict(enumerate(done))

        # this process's cache converges on the same values
        rev = etcd_revision(etcd_server)
        assert db.wait_for(rev, timeout=10)
        with db.read() as tx:
            assert [tx.get(Counter, n) for n in range(counters)] == [
                Counter(n, done[n]) for n in range(counters)
            ]
        # 12 threads on 3 counters must have collided; otherwise the test proves nothing
        assert retries > 0


def etcd_revision(server: EtcdServer) -> int:
    backend = EtcdBackend([server.endpoint])
    try:
        return backend.current_revision()
    finally:
        backend.close()


# ---- 2. IP allocator: write skew through index reads ---------------------------------------


def _allocate(etcd_server: EtcdServer, etcd_url: str, prefix: str, unique: bool) -> None:
    procs_n, threads, pool_size = 3, 2, 12
    model = "uleases/" if unique else "leases/"
    t0 = time.monotonic()
    results = run_procs(
        procs.allocator_worker,
        [(etcd_url, prefix, p, threads, pool_size, unique) for p in range(procs_n)],
    )
    elapsed = time.monotonic() - t0

    got = [tuple(g) for r in results for g in r["got"]]
    attempts = sum(r["attempts"] for r in results)
    violations = sum(r["violations"] for r in results)
    commits = len(got)

    # what etcd holds: every pool address exactly once, held by the lease its winner reported
    raw = raw_values(etcd_server, prefix + model)
    ips = Tally(v["ip"] for v in raw.values())
    dupes = {ip: n for ip, n in ips.items() if n > 1}
    assert not dupes, f"addresses given twice: {dupes}"
    assert sorted(ips) == sorted(procs.pool(pool_size)), "pool not fully allocated"
    assert {v["id"]: v["ip"] for v in raw.values()} == dict(got)
    assert commits == pool_size

    if unique:
        # each of the 6 threads tried every address once: everything but the wins clashed
        assert violations == procs_n * threads * pool_size - commits
        conflicts = attempts - procs_n * threads * pool_size
    else:
        # every thread's last transaction found the pool exhausted (no write, no commit)
        conflicts = attempts - commits - procs_n * threads
    print(
        f"\nallocator ({'unique index' if unique else 'plain index'}): {procs_n} procs x "
        f"{threads} threads, pool {pool_size}: {commits} commits, {violations} unique "
        f"violations, {conflicts} conflict retries, {elapsed:.1f}s"
    )
    assert conflicts >= 0


def test_ip_allocator_plain_index_no_write_skew(
    etcd_server: EtcdServer, etcd_url: str, prefix: str
) -> None:
    """"No lease has ip X, so I take it" through a non-unique index: phantom protection alone
    must keep two processes from handing out the same address."""
    _allocate(etcd_server, etcd_url, prefix, unique=False)


def test_ip_allocator_unique_index_blind_puts(
    etcd_server: EtcdServer, etcd_url: str, prefix: str
) -> None:
    """Blind puts on a unique index: exactly one put per address wins, across processes."""
    _allocate(etcd_server, etcd_url, prefix, unique=True)


# ---- 3. unique race ------------------------------------------------------------------------


def test_unique_race_one_winner_per_round(
    etcd_server: EtcdServer, etcd_url: str, prefix: str
) -> None:
    rounds = 30
    t0 = time.monotonic()
    a, b = run_procs(procs.race_worker, [(etcd_url, prefix, p, rounds) for p in range(2)])
    elapsed = time.monotonic() - t0

    raw = raw_values(etcd_server, prefix + "nodes/")
    owner = {v["ip"]: v["id"] for v in raw.values()}
    assert len(owner) == len(raw) == rounds, "an ip has two holders, or a round has none"
    after_conflict = 0
    for r, (oa, ob) in enumerate(zip(a["outcomes"], b["outcomes"], strict=True)):
        verdicts = sorted([oa[0], ob[0]])
        assert verdicts == ["violation", "won"], f"round {r}: {oa} / {ob}"
        winner = f"p{0 if oa[0] == 'won' else 1}-r{r}"
        loser = ob if oa[0] == "won" else oa
        assert loser[1] == winner, f"round {r}: violation names {loser[1]!r}, not {winner!r}"
        assert owner[f"10.9.{r}.1"] == winner
        after_conflict += loser[2] > 1
    wins = sum(o[0] == "won" for o in a["outcomes"])
    print(
        f"\nunique race: {rounds} rounds in {elapsed:.1f}s; process 0 won {wins}, process 1 "
        f"won {rounds - wins}; {after_conflict} violations came after a Conflict retry"
    )

    with txindex.open(etcd_url, models=MODELS, prefix=prefix) as db, db.read() as tx:
        for r in range(rounds):
            assert [n.id for n in tx.find(Node.by_ip, f"10.9.{r}.1")] == [owner[f"10.9.{r}.1"]]


# ---- 4. write skew through deletes (fences) and updates ------------------------------------


@pytest.mark.parametrize("mode", ["delete", "update"])
def test_oncall_write_skew_never_empties_the_rota(
    etcd_server: EtcdServer, etcd_url: str, prefix: str, mode: str
) -> None:
    """Doctors leave the rota only while more than ``min_on`` are on call (a count over an
    index), by deleting themselves (guarded by the model's fence key) or by updating their team
    (guarded by the model's range compare). With ``min_on`` = doctors - 1 only one may be off
    at any time, so every leave races every other. Replaying etcd's history revision by
    revision, the rota never drops below ``min_on``."""
    procs_n, threads, rounds = 3, 2, 25
    min_on = procs_n * threads - 1
    with txindex.open(etcd_url, models=MODELS, prefix=prefix) as db:
        tx = db.tx()
        for p in range(procs_n):
            for t in range(threads):
                tx.put(User(f"d{p}-{t}", "oncall"))
        start = tx.commit()
        assert start is not None

    t0 = time.monotonic()
    results = run_procs(
        procs.oncall_worker,
        [(etcd_url, prefix, p, threads, rounds, mode, min_on) for p in range(procs_n)],
    )
    elapsed = time.monotonic() - t0
    leaves = sum(r["leaves"] for r in results)
    attempts = sum(r["attempts"] for r in results)
    conflicts = attempts - sum(r["calls"] for r in results)

    # replay every revision after setup from etcd's own history
    end = etcd_revision(etcd_server)
    oncall = {f"d{p}-{t}" for p in range(procs_n) for t in range(threads)}
    users = (prefix + "users/").encode()
    lowest, revisions = len(oncall), 0
    backend = EtcdBackend([etcd_server.endpoint])
    try:
        stream = backend.watch(users, prefix_end(users), start + 1)
        try:
            last = start
            while last < end:
                resp = stream.get(10.0)
                assert resp is not None, f"history replay stalled at {last} (< {end})"
                by_rev: dict[int, list[Any]] = {}
                for ev in resp.events:
                    by_rev.setdefault(ev.mod_revision, []).append(ev)
                for rev in sorted(by_rev):
                    for ev in by_rev[rev]:
                        name = ev.key.decode()[len(prefix) + len("users/"):]
                        on = not ev.deleted and json.loads(ev.value)["team"] == "oncall"
                        (oncall.add if on else oncall.discard)(name)
                    revisions += 1
                    lowest = min(lowest, len(oncall))
                    assert len(oncall) >= min_on, f"revision {rev}: {sorted(oncall)} on call"
                last = max(last, resp.revision)
                if not resp.events and resp.progress:
                    last = max(last, resp.revision)
        finally:
            stream.close()
    finally:
        backend.close()

    print(
        f"\non-call ({mode}): {procs_n} procs x {threads} doctors x {rounds} rounds: {leaves} "
        f"leaves, {attempts} leave attempts, {conflicts} conflict retries, {revisions} "
        f"user revisions replayed, fewest on call {lowest}, {elapsed:.1f}s"
    )
    assert leaves == procs_n * threads * rounds
    assert len(oncall) == procs_n * threads  # everyone rejoined at the end
