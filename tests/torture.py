"""Torture run: a multi-process list-append + index-predicate workload over txindex on a
3-member etcd cluster, with faults, judged by :mod:`tests.checker` against etcd's own log.

    python tests/torture.py --quick     # CI: one seed, every fault kind once (~1-2 min)
    python tests/torture.py --long      # several seeds and fault mixes, >= 6000 transactions

Each worker process opens its own DB (own cache and watcher) and runs several client threads.
A client runs, at random: ``append`` (read 1-3 lists, append a globally unique value to 1-2 of
them), ``claim`` (query free slots through the non-unique index ``Slot.by_owner``, take one),
``release`` (read one slot, free it) and ``read`` (a read-only snapshot of lists and free
slots). Every operation is recorded (invoke/ok/fail/unknown, monotonic times, snapshot and
commit revisions, values read, query results, values written) in one JSONL file per thread.
Worker 0 talks to etcd through loopback proxies, so its connection can be blackholed.

The last line printed is a JSON summary; the exit code is non-zero on any anomaly, lost write or
convergence failure. Importable: :func:`run_op`, :func:`client_loop`, :func:`setup`,
:class:`ListRecorder` serve the in-process tests too.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing as mp
import os
import random
import signal
import sys
import tempfile
import threading
import time
import traceback
import uuid
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

if __name__ == "__main__":  # run as a script: import ourselves as tests.torture
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import grpc
from etcd3 import etcdrpc

import txindex
from tests.checker import TruthLog, check
from tests.consistency import assert_converged
from tests.proxy import Proxy
from txindex import DB, Index
from txindex.backend import EtcdBackend
from txindex.errors import CommitUnknown, Conflict, Unavailable, UniqueViolation
from txindex.server import EtcdCluster


@txindex.model("lst/", key="k")
@dataclass(frozen=True)
class Lst:
    k: int
    vals: tuple[int, ...] = ()


@txindex.model("slot/", key="id")
@dataclass(frozen=True)
class Slot:
    id: int
    owner: str = ""
    tag: int = 0

    by_owner = Index("owner")


MODELS = [Lst, Slot]
KINDS = ("append", "claim", "release", "read")
WEIGHTS = (5, 2, 1, 2)


def js(obj: Any) -> Any:
    return None if obj is None else json.loads(json.dumps(asdict(obj)))


# ---- recording -----------------------------------------------------------------------------


class ListRecorder:
    """In-memory history (in-process tests)."""

    def __init__(self) -> None:
        self._ops: dict[int, dict[str, Any]] = {}
        self._lock = threading.Lock()

    @property
    def ops(self) -> list[dict[str, Any]]:
        with self._lock:
            return list(self._ops.values())

    def invoke(self, op: dict[str, Any]) -> None:
        with self._lock:
            self._ops[op["id"]] = {**op, "status": "unknown", "t1": None}

    def done(self, op: dict[str, Any]) -> None:
        with self._lock:
            self._ops[op["id"]] = op


class FileRecorder:
    """One JSONL file per thread: an ``invoke`` line before, a ``done`` line after, each
    written with one ``os.write`` (a killed process leaves invokes without done: unknown)."""

    def __init__(self, path: Path) -> None:
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)

    def invoke(self, op: dict[str, Any]) -> None:
        self._line({"ev": "invoke", **op})

    def done(self, op: dict[str, Any]) -> None:
        self._line({"ev": "done", **op})

    def _line(self, d: dict[str, Any]) -> None:
        os.write(self._fd, (json.dumps(d) + "\n").encode())

    def close(self) -> None:
        os.close(self._fd)


def load_history(outdir: Path) -> list[dict[str, Any]]:
    ops: dict[int, dict[str, Any]] = {}
    for path in sorted(outdir.glob("hist-*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                d = json.loads(line)
            except ValueError:
                continue  # a line torn by SIGKILL
            ev = d.pop("ev")
            if ev == "invoke":
                ops.setdefault(d["id"], {**d, "status": "unknown", "t1": None,
                                         "error": "no completion (process killed)"})
            else:
                ops[d["id"]] = d
    return list(ops.values())


# ---- the workload --------------------------------------------------------------------------


def setup(db: DB, n_lists: int, n_slots: int) -> None:
    with db.tx() as tx:
        for k in range(n_lists):
            tx.put(Lst(k))
        for i in range(n_slots):
            tx.put(Slot(i))


def run_op(
    db: DB, kind: str, uid: int, rnd: random.Random, rec: Any, *, proc: int = 0,
    thread: int = 0, n_lists: int = 8, n_slots: int = 6, attempts: int = 3,
) -> dict[str, Any]:
    """One recorded operation; returns the op dict (status ok / fail / unknown)."""
    op: dict[str, Any] = {"id": uid, "proc": proc, "thread": thread, "kind": kind,
                          "t0": time.monotonic()}
    rec.invoke(dict(op))

    def begin(tx: txindex.Transaction) -> None:
        op.update(snap=tx.revision, reads={}, queries=[], writes={}, commit=None)

    def free_slots(tx: txindex.Transaction) -> list[Slot]:
        free = tx.find(Slot.by_owner, "")
        op["queries"].append({"model": "slot/", "field": "owner", "value": "", "pk": "id",
                              "result": [js(s) for s in free]})
        return free

    def body(tx: txindex.Transaction) -> None:
        begin(tx)
        if kind == "append":
            keys = rnd.sample(range(n_lists), rnd.randint(1, 3))
            cur = {}
            for k in keys:
                cur[k] = tx.get(Lst, k)
                op["reads"][f"lst/{k}"] = js(cur[k])
            for j, k in enumerate(rnd.sample(keys, min(len(keys), rnd.randint(1, 2)))):
                old = cur[k]
                new = Lst(k, (old.vals if old else ()) + (uid * 4 + j,))
                tx.put(new)
                op["writes"][f"lst/{k}"] = js(new)
        elif kind == "claim":
            free = free_slots(tx)
            if free:
                s = rnd.choice(free[:3])
                new = Slot(s.id, f"c{uid}", uid)
                tx.put(new)
                op["writes"][f"slot/{s.id}"] = js(new)
        elif kind == "release":
            k = rnd.randrange(n_slots)
            s = tx.get(Slot, k)
            op["reads"][f"slot/{k}"] = js(s)
            if s is not None and s.owner:
                new = Slot(k, "", uid)
                tx.put(new)
                op["writes"][f"slot/{k}"] = js(new)
        op["commit"] = tx.commit()

    try:
        if kind == "read":
            with db.read() as tx:
                begin(tx)
                for k in rnd.sample(range(n_lists), rnd.randint(1, 4)):
                    op["reads"][f"lst/{k}"] = js(tx.get(Lst, k))
                free_slots(tx)
        else:
            db.transact(body, attempts=attempts)
        op["status"] = "ok"
    except (Conflict, Unavailable, UniqueViolation) as exc:
        op["status"], op["error"] = "fail", f"{type(exc).__name__}: {exc}"[:200]
    except CommitUnknown as exc:
        op["status"], op["error"] = "unknown", f"{type(exc).__name__}: {exc}"[:200]
    except Exception as exc:  # anything else: possibly committed
        op["status"], op["error"] = "unknown", f"{type(exc).__name__}: {exc}"[:200]
    op["t1"] = time.monotonic()
    rec.done(op)
    return op


def uid_for(proc: int, thread: int, seq: int) -> int:
    return (proc * 16 + thread + 1) * 1_000_000 + seq


def client_loop(
    db: DB, proc: int, thread: int, seed: int, rec: Any, stop: Any, *, max_ops: int | None = None,
    n_lists: int = 8, n_slots: int = 6, pause: float = 0.01,
) -> int:
    rnd = random.Random(seed * 1000 + proc * 16 + thread)
    seq = 0
    while not stop.is_set() and (max_ops is None or seq < max_ops):
        seq += 1
        kind = rnd.choices(KINDS, WEIGHTS)[0]
        run_op(db, kind, uid_for(proc, thread, seq), rnd, rec, proc=proc, thread=thread,
               n_lists=n_lists, n_slots=n_slots)
        if pause:
            time.sleep(pause * rnd.random())
    return seq


# ---- worker processes ----------------------------------------------------------------------


def open_db(endpoints: str, prefix: str, **opts: Any) -> DB:
    backend = EtcdBackend(endpoints.split(","), timeout=opts.pop("backend_timeout", 2.0))
    try:
        return DB(backend, MODELS, prefix=prefix, timeout=opts.pop("timeout", 5.0),
                  progress_interval=opts.pop("progress_interval", 1.0), **opts)
    except BaseException:
        backend.close()
        raise


def worker(cfg: dict[str, Any], stop: Any, check_now: Any, queue: Any) -> None:
    """A client process: its own DB, ``cfg['threads']`` client threads, then a convergence
    check against etcd directly (when the parent says the faults are over)."""
    proc = cfg["proc"]
    outdir = Path(cfg["outdir"])
    try:
        db = open_db(cfg["endpoints"], cfg["prefix"])
    except BaseException:
        queue.put({"proc": proc, "error": traceback.format_exc()})
        return
    recs = [FileRecorder(outdir / f"hist-{proc}-{t}.jsonl") for t in range(cfg["threads"])]
    threads = [
        threading.Thread(target=client_loop, args=(db, proc, t, cfg["seed"], recs[t], stop),
                         kwargs={"max_ops": cfg.get("max_ops"), "n_lists": cfg["n_lists"],
                                 "n_slots": cfg["n_slots"]}, daemon=True)
        for t in range(cfg["threads"])
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    queue.put({"proc": proc, "finished": True})
    check_now.wait()
    out: dict[str, Any] = {"proc": proc}
    raw = EtcdBackend(cfg["direct"].split(","), timeout=2.0)
    try:
        out["converge_ms"] = assert_converged(db, raw, cfg["prefix"], timeout=60.0)
        out["stats"] = {k: v for k, v in db.stats().items() if k != "indexes"}
    except BaseException as exc:
        out["error"] = f"{type(exc).__name__}: {exc}"[:2000]
    finally:
        raw.close()
        db.close()
        for r in recs:
            r.close()
    queue.put(out)


# ---- faults --------------------------------------------------------------------------------


def leader_index(cluster: EtcdCluster) -> int | None:
    for i, m in enumerate(cluster.members):
        if not m.running:
            continue
        ch = grpc.insecure_channel(m.endpoint)
        try:
            st = etcdrpc.MaintenanceStub(ch).Status(etcdrpc.StatusRequest(), timeout=1.0)
            if st.leader and st.leader == st.header.member_id:
                return i
        except grpc.RpcError:
            pass
        finally:
            ch.close()
    return None


def member_revisions(cluster: EtcdCluster, timeout: float = 10.0) -> dict[str, int]:
    """Each member's mvcc revision once all report the same applied raft index: members of one
    cluster must agree. (etcd 3.5.0-3.5.2 can diverge after a SIGKILL under load, etcd #13766.)"""
    deadline = time.monotonic() + timeout
    while True:
        seen: dict[str, tuple[int, int]] = {}
        for m in cluster.members:
            ch = grpc.insecure_channel(m.endpoint)
            try:
                st = etcdrpc.MaintenanceStub(ch).Status(etcdrpc.StatusRequest(), timeout=1.0)
                seen[m.name] = (st.raftIndex, st.header.revision)
            except grpc.RpcError:
                pass
            finally:
                ch.close()
        if len({a for a, _ in seen.values()}) == 1 or time.monotonic() > deadline:
            return {name: rev for name, (_, rev) in seen.items()}
        time.sleep(0.1)


class Faults:
    """Fault injection for one run. Every fault heals itself before returning."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.cluster = run.cluster
        self.log: list[str] = []

    def inject(self, name: str, rnd: random.Random) -> None:
        getattr(self, name)(rnd)
        self.log.append(name)

    def _member(self, rnd: random.Random, leader: bool) -> int:
        idx = leader_index(self.cluster) if leader else None
        return idx if idx is not None else rnd.randrange(len(self.cluster.members))

    def kill_member(self, rnd: random.Random, leader: bool = False) -> None:
        m = self.cluster.members[self._member(rnd, leader)]
        m.kill()
        time.sleep(1.0 + rnd.random())
        m.start()

    def kill_leader(self, rnd: random.Random) -> None:
        self.kill_member(rnd, leader=True)

    def pause_member(self, rnd: random.Random) -> None:
        """SIGSTOP beyond the election timeout (1 s by default), the leader half the time."""
        m = self.cluster.members[self._member(rnd, rnd.random() < 0.5)]
        m.pause()
        time.sleep(2.5)
        m.resume()

    def blackhole(self, rnd: random.Random) -> None:
        """Worker 0's connections stop carrying bytes, then die."""
        for p in self.run.proxies:
            p.freeze()
        time.sleep(2.0 + rnd.random())
        for p in self.run.proxies:
            p.cut()
            p.thaw()

    def compact_lagging(self, rnd: random.Random) -> None:
        """Worker 0 lags (frozen), others write, etcd compacts at the latest revision."""
        for p in self.run.proxies:
            p.freeze()
        time.sleep(1.5)
        target = self.run.truth.sync()  # the truth log first: history is about to go
        self.run.raw.compact(target)
        time.sleep(0.3)
        for p in self.run.proxies:
            p.cut()
            p.thaw()

    def kill_client(self, rnd: random.Random) -> None:
        """SIGKILL a client process mid-workload (some commit is in flight); start another."""
        victims = [p for p, pr in self.run.procs.items() if p != 0 and pr.is_alive()]
        if not victims:
            return
        p = rnd.choice(victims)
        pid = self.run.procs[p].pid
        assert pid is not None
        os.kill(pid, signal.SIGKILL)
        self.run.procs[p].join(5)
        self.run.killed.add(p)
        self.run.spawn(self.run.next_proc())


ALL_FAULTS = ["kill_leader", "pause_member", "compact_lagging", "blackhole", "kill_client",
              "kill_member"]


# ---- a run ---------------------------------------------------------------------------------


class Run:
    def __init__(
        self, cluster: EtcdCluster, outdir: Path, *, seed: int, procs: int = 3, threads: int = 3,
        n_lists: int = 8, n_slots: int = 6, max_ops: int | None = None,
    ) -> None:
        self.cluster = cluster
        self.outdir = outdir
        self.seed = seed
        self.threads = threads
        self.n_lists, self.n_slots = n_lists, n_slots
        self.max_ops = max_ops
        self.prefix = f"torture-{uuid.uuid4().hex[:8]}/"
        self.raw = EtcdBackend(cluster.endpoints.split(","), timeout=3.0)
        self.proxies = [Proxy(m.endpoint) for m in cluster.members]
        self.ctx = mp.get_context("spawn")
        self.stop = self.ctx.Event()
        self.check_now = self.ctx.Event()
        self.queue = self.ctx.Queue()
        self.procs: dict[int, Any] = {}
        self.killed: set[int] = set()
        self.finished: set[int] = set()
        self.results: dict[int, dict[str, Any]] = {}
        self.nprocs = procs
        self.truth = TruthLog(self.raw, self.prefix, self.raw.current_revision() + 1)

    def next_proc(self) -> int:
        return max(self.procs) + 1

    def spawn(self, proc: int) -> None:
        direct = self.cluster.endpoints
        cfg = {
            "proc": proc, "prefix": self.prefix, "outdir": str(self.outdir), "seed": self.seed,
            "threads": self.threads, "n_lists": self.n_lists, "n_slots": self.n_slots,
            "max_ops": self.max_ops, "direct": direct,
            "endpoints": ",".join(p.endpoint for p in self.proxies) if proc == 0 else direct,
        }
        pr = self.ctx.Process(target=worker, args=(cfg, self.stop, self.check_now, self.queue),
                              daemon=True)
        pr.start()
        self.procs[proc] = pr

    def drain(self) -> None:
        while True:
            try:
                msg = self.queue.get_nowait()
            except Exception:
                return
            if msg.get("finished"):
                self.finished.add(msg["proc"])
            else:
                self.results[msg["proc"]] = msg

    def all_finished(self) -> bool:
        self.drain()
        alive = {p for p in self.procs if p not in self.killed}
        return alive <= self.finished

    def execute(self, duration: float, faults: list[str], gap: float) -> dict[str, Any]:
        t0 = time.monotonic()
        with open_db(self.cluster.endpoints, self.prefix) as db:
            setup(db, self.n_lists, self.n_slots)
        for p in range(self.nprocs):
            self.spawn(p)
        rnd = random.Random(self.seed)
        injector = Faults(self)
        time.sleep(gap)
        plan = list(faults)
        deadline = t0 + duration
        i = 0
        while time.monotonic() < deadline and not (self.max_ops and self.all_finished()):
            if plan:
                injector.inject(plan[i % len(plan)], rnd)
                i += 1
            time.sleep(gap * (0.5 + rnd.random()))
            if self.max_ops is None and i >= len(plan) and time.monotonic() > deadline - gap:
                break
        for m in self.cluster.members:  # every fault healed
            m.resume()
            if not m.running:
                m.start()
        self.stop.set()
        fin_deadline = time.monotonic() + 90
        while not self.all_finished() and time.monotonic() < fin_deadline:
            time.sleep(0.2)
        self.check_now.set()
        live = [p for p in self.procs if p not in self.killed]
        while any(p not in self.results for p in live) and time.monotonic() < fin_deadline + 90:
            self.drain()
            time.sleep(0.2)
        for p in self.procs.values():
            p.join(10)
            if p.is_alive():
                p.kill()
        self.truth.sync()
        revs = member_revisions(self.cluster)
        ops = load_history(self.outdir)
        rep = check(ops, self.truth.events)
        conv = [self.results.get(p, {"error": "no result"}) for p in live]
        conv_errors = [f"proc {r.get('proc')}: {r['error']}" for r in conv if "error" in r]
        return {
            "seed": self.seed,
            "txns": len(ops),
            "ok": sum(o["status"] == "ok" for o in ops),
            "failed": sum(o["status"] == "fail" for o in ops),
            "unknown": sum(o["status"] == "unknown" for o in ops),
            "committed_writes": rep.committed,
            # revisions carrying several transactions' writes (group commits), all checked
            "group_revisions": sum(n > 1 for n in Counter(
                o["commit"] for o in ops if o["status"] == "ok" and o.get("writes")
            ).values()),
            "reads_checked": rep.checked_reads,
            "anomalies": len(rep.anomalies) - rep.lost,
            "lost": rep.lost,
            "anomaly_classes": rep.classes,
            "anomaly_examples": [f"{c}: {d}" for c, d in rep.anomalies[:5]],
            "faults": len(injector.log),
            "fault_log": injector.log,
            "converge_ms_max": round(max((r.get("converge_ms", 0.0) for r in conv), default=0.0)),
            "converge_errors": conv_errors,
            "procs": len(self.procs),
            "member_revisions": revs,
            "etcd_diverged": len(set(revs.values())) > 1,
            "seconds": round(time.monotonic() - t0, 1),
        }

    def close(self) -> None:
        for p in self.procs.values():
            if p.is_alive():
                p.kill()
        for px in self.proxies:
            px.close()
        self.raw.close()


def run(
    cluster: EtcdCluster, outdir: Path, *, seed: int, duration: float, faults: list[str],
    gap: float = 3.0, **kw: Any,
) -> dict[str, Any]:
    r = Run(cluster, outdir, seed=seed, **kw)
    try:
        return r.execute(duration, faults, gap)
    finally:
        r.close()


def failed(summary: dict[str, Any]) -> bool:
    return bool(summary["anomalies"] or summary["lost"] or summary["converge_errors"])


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="CI mode (default)")
    mode.add_argument("--long", action="store_true", help="several seeds, >= 6000 txns")
    ap.add_argument("--seed", type=int, default=1)
    args = ap.parse_args(argv)
    t0 = time.monotonic()
    runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="txindex-torture-") as tmp:
        cluster = EtcdCluster(Path(tmp) / "etcd", 3)
        cluster.start()
        try:
            if args.long:
                mixes = [ALL_FAULTS, ["kill_leader", "blackhole", "kill_client", "pause_member"],
                         ["compact_lagging", "kill_member", "pause_member", "blackhole"]]
                for i, mix in enumerate(mixes):
                    out = Path(tmp) / f"run{i}"
                    out.mkdir()
                    s = run(cluster, out, seed=args.seed + i, duration=600, faults=mix, gap=3.0,
                            procs=3, threads=4, max_ops=180)
                    print(json.dumps(s), flush=True)
                    runs.append(s)
            else:
                out = Path(tmp) / "run0"
                out.mkdir()
                s = run(cluster, out, seed=args.seed, duration=40, faults=ALL_FAULTS, gap=2.5,
                        procs=3, threads=3)
                print(json.dumps(s), flush=True)
                runs.append(s)
        finally:
            cluster.stop()
    total = {
        "mode": "long" if args.long else "quick",
        "runs": len(runs),
        **{k: sum(r[k] for r in runs) for k in ("txns", "ok", "failed", "unknown", "anomalies",
                                               "lost", "faults")},
        "converge_ms_max": max(r["converge_ms_max"] for r in runs),
        "convergence_failures": sum(len(r["converge_errors"]) for r in runs),
        "seconds": round(time.monotonic() - t0, 1),
    }
    print(json.dumps(total), flush=True)
    return 1 if any(failed(r) for r in runs) else 0


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        from tests import torture  # the same module under its package name (for spawn)

        sys.exit(torture.main())
