"""One commit vs the seed story's starting point, the "JSON mutex DB": take a lock, change one
object, rewrite the whole state as one JSON file (temp file + fsync + rename)."""

from __future__ import annotations

import dataclasses
import fcntl
import json
import os
import statistics
import threading
import time
from pathlib import Path
from typing import Any

import txindex
from bench.common import Context, Host, Measured, metric, preload


class JsonMutexDB:
    """The whole state in one JSON file, rewritten under a lock (thread + flock) per write."""

    def __init__(self, path: Path, state: dict[str, dict[str, Any]]) -> None:
        self.path = path
        self.state = state
        self.lock = threading.Lock()
        self.lockfile = path.with_suffix(".lock")
        self.lockfile.touch()
        self.bytes = 0

    def write(self, key: str, field: str, value: Any) -> None:
        with self.lock, open(self.lockfile) as lf:
            fcntl.flock(lf, fcntl.LOCK_EX)
            self.state[key][field] = value
            data = json.dumps(self.state, separators=(",", ":")).encode()
            tmp = self.path.with_suffix(".tmp")
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, self.path)
            self.bytes = len(data)


def json_state(mb: float) -> dict[str, dict[str, Any]]:
    """Host-shaped records until the JSON is about ``mb`` MB."""
    one = len(json.dumps(_rec(0), separators=(",", ":"))) + 12
    return {f"h{i:07d}": _rec(i) for i in range(int(mb * 1e6 / one))}


def _rec(i: int) -> dict[str, Any]:
    return {
        "id": f"h{i:07d}",
        "user": f"u{i // 10}",
        "ip": f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        "tags": ["prod", "gpu"],
        "last_seen": float(i),
    }


@metric(
    "write_vs_jsonmutexdb",
    unit="ms/write",
    ratio="baseline/value",
    target=("ratio", ">=", 100),
    etcd=True,
)
def write_vs_jsonmutexdb(ctx: Context) -> Measured:
    """One txindex commit (1 read + 1 write, 3-index model, etcd on loopback) vs lock + rewrite
    the whole state as JSON + fsync + rename; value/baseline at the largest size (150 MB full;
    quick 1/5/15 MB)."""
    sizes = ctx.pick((0.2, 0.5, 1.0), (1.0, 5.0, 15.0), (10.0, 50.0, 150.0))
    reps = ctx.pick(2, 3, 3)
    prefix = ctx.fresh_prefix("json")
    preload(
        ctx.etcd_url,
        prefix,
        [Host(f"h{i}", f"u{i // 10}", f"10.2.{i >> 8}.{i & 255}", ("prod",)) for i in range(5000)],
    )
    db = txindex.open(ctx.etcd_url, models=[Host], prefix=prefix)
    ctx.on_close(db.close)
    counter = [0]

    def commits(k: int) -> list[float]:
        out = []
        for _ in range(k):
            counter[0] += 1
            t0 = time.perf_counter()
            with db.tx() as tx:
                tx.get(Host, "h1")
                h = tx.get(Host, "h2")
                tx.put(dataclasses.replace(h, last_seen=float(counter[0])))
            out.append(time.perf_counter() - t0)
        return out

    commits(10)  # warm-up
    cand: list[float] = []
    per_size: dict[str, float] = {}
    base_last: list[float] = []
    for mb in sizes:
        jdb = JsonMutexDB(ctx.tmp / f"state-{mb}.json", json_state(mb))
        jdb.write("h0000001", "last_seen", -1.0)  # first write creates the file, untimed
        samples = []
        for r in range(reps):
            cand += commits(20)
            t0 = time.perf_counter()
            jdb.write("h0000001", "last_seen", float(r))
            samples.append(time.perf_counter() - t0)
        per_size[f"json_{mb:g}MB_ms"] = statistics.median(samples) * 1e3
        per_size[f"json_{mb:g}MB_actual_MB"] = jdb.bytes / 1e6
        base_last = samples
        del jdb
    commit_ms = statistics.median(cand) * 1e3
    for mb in sizes:
        per_size[f"ratio_{mb:g}MB"] = per_size[f"json_{mb:g}MB_ms"] / commit_ms
    return Measured(
        commit_ms,
        statistics.median(base_last) * 1e3,
        {"commit_p99_ms": sorted(cand)[int(0.99 * (len(cand) - 1))] * 1e3, **per_size},
    )
