"""cProfile the hot paths the issue #5 metrics miss on, no etcd needed (memory:// backend and
synthetic watch events shaped like etcd's): ``python bench/hotspots.py [N]``.

Prints, per path, the top functions by own time (tottime) as % of the path's total.
"""

from __future__ import annotations

import cProfile
import dataclasses
import pstats
import sys
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import txindex  # noqa: E402
from bench.bench_scale import make_host  # noqa: E402
from bench.common import Host, preload  # noqa: E402
from bench.workers import HOST, TxindexWriter  # noqa: E402
from txindex.backend.base import Event  # noqa: E402
from txindex.store import Store  # noqa: E402
from txindex.watcher import Watcher  # noqa: E402


def report(title: str, prof: cProfile.Profile, top: int = 12) -> None:
    st = pstats.Stats(prof)
    total = st.total_tt  # type: ignore[attr-defined]
    rows = sorted(st.stats.items(), key=lambda kv: -kv[1][2])[:top]  # type: ignore[attr-defined]
    print(f"\n== {title}: {total:.2f} s profiled")
    print(f"  {'own %':>6} {'cum %':>6} {'calls':>9}  function")
    for (file, line, fn), (_cc, nc, tt, ct, _callers) in rows:
        where = f"{Path(file).parent.name}/{Path(file).name}:{line}" if line else file
        print(f"  {100 * tt / total:6.1f} {100 * ct / total:6.1f} {nc:9d}  {fn} ({where})")


def apply_path(n: int) -> None:
    prefix = "p/"
    rev = 1
    batches = []
    for phase in (0, 1):
        for lo in range(0, n, 128):
            rev += 1
            evs = []
            for i in range(lo, min(n, lo + 128)):
                h = make_host(i, n)
                if phase:
                    h = Host(h.id, f"moved{i % 500}", h.ip, ("edge",), h.last_seen + 1)
                evs.append(Event(f"{prefix}hosts/{h.id}".encode(), HOST.encode(h), rev, False))
            batches.append(tuple(evs))
    store = Store([HOST])
    w = Watcher(None, store, prefix)  # type: ignore[arg-type]
    prof = cProfile.Profile()
    prof.enable()
    for evs in batches:
        w._apply(evs)
    prof.disable()
    report(f"watch apply, {2 * n} synthetic events (n creates + n index-moving updates)", prof)


def load_path(n: int) -> None:
    """The load minus the backend: decode every KV into an entry, then Store.load (index
    build). (On memory:// the paged range itself dominates: see memory_range_path.)"""
    from txindex.watcher import Decoder, WatchStats

    kvs = [
        (f"l/hosts/{h.id}".encode(), HOST.encode(h), 2)
        for h in (make_host(i, n) for i in range(n))
    ]
    store = Store([HOST])
    dec = Decoder("l/", [HOST], WatchStats())
    prof = cProfile.Profile()
    prof.enable()
    entries = [e[1] for k, v, r in kvs if (e := dec.entry(k, v, r)) is not None]
    store.load(2, entries)
    prof.disable()
    report(f"load minus backend (decode to entries + Store.load), {n} objects", prof)


def memory_range_path(n: int) -> None:
    url = f"memory://hot-{uuid.uuid4().hex}"
    preload(url, "l/", [make_host(i, n) for i in range(n)])
    prof = cProfile.Profile()
    prof.enable()
    db = txindex.open(url, models=[Host], prefix="l/")
    prof.disable()
    db.close()
    report(f"open over memory://, {n} objects (paged range of the memory backend)", prof, 4)


def commit_path(k: int) -> None:
    url = f"memory://hot-{uuid.uuid4().hex}"
    preload(url, "c/", [make_host(i, 2000) for i in range(2000)])
    db = txindex.open(url, models=[Host], prefix="c/")
    w = TxindexWriter(db, 1)
    w.op()
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(k):
        w.op()
    prof.disable()
    db.close()
    report(f"commit (1 get + 1 put) x{k}, memory:// (Python side only, no network)", prof)
    _ = dataclasses


if __name__ == "__main__":
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 20000
    apply_path(n)
    load_path(n * 5)
    memory_range_path(n * 5)
    commit_path(3000)
