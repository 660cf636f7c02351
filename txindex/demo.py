"""A small control plane on an embedded etcd: the ``txindex demo`` command.

Users own nodes; every node gets an address from one pool. Two worker processes register
nodes at once, each choosing a free address by asking the unique ``Node.by_ip`` index, so the
same address is never handed out twice even though the processes race. The parent process
watches, then checks the result through the indexes and prints a summary.
"""

from __future__ import annotations

import multiprocessing
import random
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import txindex
from txindex import Index
from txindex.server import EmbeddedEtcd


@txindex.model("users/", key="name")
@dataclass(frozen=True)
class User:
    name: str
    team: str

    by_team = Index("team")


@txindex.model("nodes/", key="id")
@dataclass(frozen=True)
class Node:
    id: str
    user: str
    ip: str
    tags: tuple[str, ...] = ()
    last_seen: float = 0.0

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)
    by_user_seen = Index("user", "last_seen")
    active = Index(lambda n: n.last_seen, where=lambda n: n.last_seen > 0)


MODELS = [User, Node]
POOL = [f"100.64.0.{i}" for i in range(1, 255)]
USERS = {"alice": "infra", "bob": "infra", "carol": "ml", "dave": "ml"}


def register(tx: txindex.Transaction, node_id: str, user: str, rng: random.Random) -> str:
    """Give ``node_id`` the first free address of the pool; the index query is a predicate,
    so a racing process that takes the same address makes one of the two retry."""
    for ip in POOL:
        if tx.first(Node.by_ip, ip) is None:
            tags = tuple(rng.sample(["prod", "dev", "gpu", "edge"], k=rng.randint(0, 2)))
            tx.put(Node(node_id, user, ip, tags, time.time() if rng.random() < 0.7 else 0.0))
            return ip
    raise RuntimeError("address pool exhausted")


def worker(url: str, name: str, count: int, out: Any) -> None:
    """One process of the service: registers ``count`` nodes, reporting its retries."""
    rng = random.Random(name)
    attempts = 0
    with txindex.open(url, models=MODELS, prefix="demo/") as db:
        for i in range(count):
            user = rng.choice(sorted(USERS))

            def fn(tx: txindex.Transaction, node_id: str = f"{name}-{i}", user: str = user) -> str:
                nonlocal attempts
                attempts += 1
                return register(tx, node_id, user, rng)

            db.transact(fn, attempts=50)
        with db.read() as tx:  # waits until this process's cache shows its last commit
            out.put((name, count, attempts - count, tx.revision))


def run(directory: str | None = None, nodes_per_worker: int = 40) -> dict[str, Any]:
    """Run the demo; returns the summary it prints."""
    with tempfile.TemporaryDirectory(prefix="txindex-demo-") as tmp:
        server = EmbeddedEtcd(directory or tmp)
        server.start()
        try:
            return _run(server.url, nodes_per_worker)
        finally:
            server.stop()


def _clear_nodes(db: txindex.DB) -> None:
    """Delete the nodes of an earlier run, 100 per transaction (one Txn takes 128 ops)."""
    while True:
        with db.tx() as tx:
            old = list(tx.range(Node.by_user, limit=100))
            for node in old:
                tx.delete(Node, node.id)
        if not old:
            return


def _run(url: str, nodes_per_worker: int) -> dict[str, Any]:
    started = time.perf_counter()
    with txindex.open(url, models=MODELS, prefix="demo/") as db:
        _clear_nodes(db)
        with db.tx() as tx:
            for name, team in USERS.items():
                tx.put(User(name, team))
        print(f"embedded etcd at {url}; 2 processes register {nodes_per_worker} nodes each")
        ctx = multiprocessing.get_context("spawn")
        out = ctx.Queue()
        procs = [ctx.Process(target=worker, args=(url, f"p{i}", nodes_per_worker, out))
                 for i in range(2)]
        for p in procs:
            p.start()
        reports = [out.get(timeout=120) for _ in procs]
        for p in procs:
            p.join(timeout=30)
        db.wait_for(max(r[3] for r in reports), 10)
        with db.read() as tx:
            nodes = list(tx.range(Node.by_user))
            summary = {
                "nodes": len(nodes),
                "distinct_ips": len({n.ip for n in nodes}),
                "retries": sum(r[2] for r in reports),
                "per_user": {u: tx.count(Node.by_user, u) for u in sorted(USERS)},
                "per_team": {t: sum(tx.count(Node.by_user, u.name)
                                    for u in tx.find(User.by_team, t))
                             for t in sorted(set(USERS.values()))},
                "gpu_nodes": tx.count(Node.by_tag, "gpu"),
                "active": sum(1 for _ in tx.range(Node.active, 0.000001, None)),
                "seconds": round(time.perf_counter() - started, 2),
            }
    for key, value in summary.items():
        print(f"  {key:13} {value}")
    ok = summary["nodes"] == summary["distinct_ips"] == 2 * nodes_per_worker
    print("every address was handed out once" if ok else "ERROR: an address was given twice")
    if not ok:
        raise SystemExit(1)
    return summary
