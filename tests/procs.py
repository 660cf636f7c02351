"""Worker entry points for the multi-process tests (run in children started with "spawn").

Every worker opens its own DB (own watcher, own store, own gRPC channel) on the shared etcd
and reports a plain dict on a result queue. Workers never assert: the parent judges the
results against etcd's raw data. Models used only by these tests live here too.
"""

from __future__ import annotations

import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import txindex
from txindex import Conflict, Index, UniqueViolation

from .models import MODELS, Counter, Node, User

BARRIER_TIMEOUT = 60.0


@txindex.model("leases/", key="id")
@dataclass(frozen=True)
class Lease:
    """An address lease with a plain (non-unique) index: uniqueness is the allocator's job."""

    id: str
    ip: str

    by_ip = Index("ip")


@txindex.model("uleases/", key="id")
@dataclass(frozen=True)
class ULease:
    """An address lease whose ip is a unique index: txindex enforces uniqueness."""

    id: str
    ip: str

    by_ip = Index("ip", unique=True)


LEASE_MODELS = [Lease, ULease]


def pool(size: int) -> list[str]:
    return [f"10.0.0.{i}" for i in range(1, size + 1)]


def _run(name: str, queue: Any, body: Callable[[], dict[str, Any]]) -> None:
    """Run ``body`` and put its result (or the traceback) on ``queue``."""
    try:
        result = body()
        result["name"] = name
        queue.put(result)
    except BaseException:
        queue.put({"name": name, "error": traceback.format_exc()})


def _threads(n: int, target: Callable[[int], Any]) -> list[Any]:
    """Run ``target(i)`` in ``n`` threads; results in thread order; re-raise the first error."""
    results: list[Any] = [None] * n
    errors: list[BaseException] = []

    def wrap(i: int) -> None:
        try:
            results[i] = target(i)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=wrap, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if errors:
        raise errors[0]
    return results


# ---- 1. counters ---------------------------------------------------------------------------


def counter_worker(
    url: str,
    prefix: str,
    proc: int,
    threads: int,
    per_thread: int,
    counters: int,
    barrier: Any,
    queue: Any,
) -> None:
    """Each thread increments counter ``(proc + thread + i) % counters`` ``per_thread`` times,
    each time with ``transact`` (read value, put value + 1). Reports increments per counter
    and the number of fn attempts (attempts - increments = retries after Conflict)."""

    def body() -> dict[str, Any]:
        with txindex.open(url, models=MODELS, prefix=prefix) as db:
            barrier.wait(BARRIER_TIMEOUT)
            t0 = time.monotonic()

            def thread(t: int) -> tuple[list[int], int]:
                done = [0] * counters
                attempts = [0]
                for i in range(per_thread):
                    n = (proc + t + i) % counters

                    def incr(tx: txindex.Transaction, n: int = n) -> None:
                        attempts[0] += 1
                        c = tx.get(Counter, n)
                        assert c is not None, f"counter {n} missing"
                        tx.put(Counter(n, c.value + 1))

                    db.transact(incr, attempts=500)
                    done[n] += 1
                return done, attempts[0]

            results = _threads(threads, thread)
            return {
                "done": [sum(r[0][n] for r in results) for n in range(counters)],
                "attempts": sum(r[1] for r in results),
                "seconds": time.monotonic() - t0,
            }

    _run(f"counter-{proc}", queue, body)


# ---- 2. IP allocator -----------------------------------------------------------------------


def allocator_worker(
    url: str,
    prefix: str,
    proc: int,
    threads: int,
    pool_size: int,
    unique: bool,
    barrier: Any,
    queue: Any,
) -> None:
    """Allocate addresses from one pool until it is exhausted.

    ``unique=False`` (model ``Lease``, plain index): ask the index which address is free
    (``tx.first(Lease.by_ip, ip) is None``) and put a lease with it; the predicate read must
    make a concurrent allocation of the same address a Conflict.
    ``unique=True`` (model ``ULease``, unique index): try to put a lease for every address in
    turn, blindly, and rely on ``UniqueViolation`` (possibly after a Conflict and a retry).
    """
    addresses = pool(pool_size)

    def body() -> dict[str, Any]:
        with txindex.open(url, models=LEASE_MODELS, prefix=prefix) as db:
            barrier.wait(BARRIER_TIMEOUT)
            t0 = time.monotonic()

            def plain(t: int) -> dict[str, Any]:
                got: list[tuple[str, str]] = []
                attempts = 0
                seq = 0
                while True:
                    seq += 1
                    lease_id = f"p{proc}-t{t}-{seq}"

                    def allocate(tx: txindex.Transaction, lid: str = lease_id) -> str | None:
                        nonlocal attempts
                        attempts += 1
                        for ip in addresses:
                            if tx.first(Lease.by_ip, ip) is None:
                                tx.put(Lease(lid, ip))
                                return ip
                        return None

                    ip = db.transact(allocate, attempts=500)
                    if ip is None:
                        break
                    got.append((lease_id, ip))
                return {"got": got, "attempts": attempts, "violations": 0}

            def blind(t: int) -> dict[str, Any]:
                got: list[tuple[str, str]] = []
                attempts = violations = 0
                for k, ip in enumerate(addresses):
                    lease_id = f"p{proc}-t{t}-{k}"

                    def claim(tx: txindex.Transaction, ip: str = ip, lid: str = lease_id) -> None:
                        nonlocal attempts
                        attempts += 1
                        tx.put(ULease(lid, ip))

                    try:
                        db.transact(claim, attempts=500)
                    except UniqueViolation as exc:
                        violations += 1
                        if exc.value != ip:
                            raise AssertionError(
                                f"violation names {exc.value!r}, not {ip!r}"
                            ) from exc
                        continue
                    got.append((lease_id, ip))
                return {"got": got, "attempts": attempts, "violations": violations}

            results = _threads(threads, blind if unique else plain)
            return {
                "got": [g for r in results for g in r["got"]],
                "attempts": sum(r["attempts"] for r in results),
                "violations": sum(r["violations"] for r in results),
                "seconds": time.monotonic() - t0,
            }

    _run(f"allocator-{proc}", queue, body)


# ---- 3. unique race ------------------------------------------------------------------------


def race_worker(url: str, prefix: str, proc: int, rounds: int, barrier: Any, queue: Any) -> None:
    """Each round, both racers wait on the barrier, then try to claim the round's ip with a
    Node of their own. Reports per round ("won", None) or ("violation", holder) and how many
    fn attempts that round took (> 1 means a Conflict was retried before the verdict)."""

    def body() -> dict[str, Any]:
        outcomes: list[tuple[str, Any, int]] = []
        with txindex.open(url, models=MODELS, prefix=prefix) as db:
            for r in range(rounds):
                node = Node(f"p{proc}-r{r}", f"racer{proc}", f"10.9.{r}.1")
                tries = 0

                def claim(tx: txindex.Transaction, node: Node = node) -> None:
                    nonlocal tries
                    tries += 1
                    tx.put(node)

                barrier.wait(BARRIER_TIMEOUT)
                try:
                    db.transact(claim, attempts=50)
                    outcomes.append(("won", None, tries))
                except UniqueViolation as exc:
                    outcomes.append(("violation", exc.holder, tries))
                except Conflict:
                    outcomes.append(("conflict", None, tries))
        return {"outcomes": outcomes}

    _run(f"racer-{proc}", queue, body)


# ---- 4. on-call doctors: write skew through deletes and updates ----------------------------


def oncall_worker(
    url: str,
    prefix: str,
    proc: int,
    threads: int,
    rounds: int,
    mode: str,
    min_on: int,
    barrier: Any,
    queue: Any,
) -> None:
    """Each thread is one doctor (``User(f"d{proc}-{t}", "oncall")``), taking ``rounds`` breaks
    (retrying while the rota is full of absentees). Per break it leaves the
    rota only if ``count(User.by_team, "oncall") > min_on`` (by ``delete`` or by a ``put`` to
    team "off", per ``mode``) and then rejoins with a blind put. Two doctors who both see a
    count of ``min_on + 1`` and both leave would break the rule: the classic write skew."""

    def body() -> dict[str, Any]:
        with txindex.open(url, models=MODELS, prefix=prefix) as db:
            barrier.wait(BARRIER_TIMEOUT)
            t0 = time.monotonic()

            def doctor(t: int) -> tuple[int, int, int]:
                name = f"d{proc}-{t}"
                leaves = attempts = calls = 0

                def leave(tx: txindex.Transaction) -> bool:
                    nonlocal attempts
                    attempts += 1
                    me = tx.get(User, name)
                    if me is None or me.team != "oncall":
                        raise AssertionError(f"{name} is not on call at the start of a round")
                    if tx.count(User.by_team, "oncall") <= min_on:
                        return False
                    if mode == "delete":
                        tx.delete(User, name)
                    else:
                        tx.put(User(name, "off"))
                    return True

                def rejoin(tx: txindex.Transaction) -> None:
                    tx.put(User(name, "oncall"))

                deadline = time.monotonic() + 60
                while leaves < rounds and time.monotonic() < deadline:
                    calls += 1
                    if db.transact(leave, attempts=500):
                        leaves += 1
                        db.transact(rejoin, attempts=500)
                    else:
                        time.sleep(0.001)  # someone else is off: wait for the rota to refill
                return leaves, attempts, calls

            results = _threads(threads, doctor)
            return {
                "leaves": sum(r[0] for r in results),
                "attempts": sum(r[1] for r in results),
                "calls": sum(r[2] for r in results),
                "seconds": time.monotonic() - t0,
            }

    _run(f"oncall-{proc}", queue, body)
