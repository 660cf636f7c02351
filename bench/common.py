"""Shared benchmark machinery: the metric registry, the run context, timing helpers, models.

Adding a metric: write one function ``fn(ctx) -> Measured`` in any ``bench/bench_*.py`` module
and decorate it with :func:`metric`; ``run.py`` imports every such module and runs the registry.

Every figure is measured against its baseline in the same run: :func:`interleave` alternates
repetitions of candidate and baseline (order flipped each round) so that noise from a shared
machine hits both sides alike; reported values are medians (and p99 where it matters).
"""

from __future__ import annotations

import gc
import shutil
import statistics
import subprocess
import threading
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import txindex
from txindex import Index

MODES = ("smoke", "quick", "full")

# ---- models ---------------------------------------------------------------------------------


@txindex.model("nodes/", key="id")
@dataclass(frozen=True)
class Node:
    """The DESIGN.md example model: five indexes (unique, multi, compound, computed+partial)."""

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


@txindex.model("hosts/", key="id")
@dataclass(frozen=True)
class Host:
    """Same fields as Node, exactly three indexes (the commit benchmark's model)."""

    id: str
    user: str
    ip: str
    tags: tuple[str, ...] = ()
    last_seen: float = 0.0

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)


TAGS = ("prod", "dev", "gpu", "edge", "db")


def make_node(i: int, user: str | None = None, last_seen: float | None = None) -> Node:
    return Node(
        id=f"n{i:07d}",
        user=user if user is not None else f"u{i % 997}",
        ip=f"10.{(i >> 16) & 255}.{(i >> 8) & 255}.{i & 255}",
        tags=(TAGS[i % 5], TAGS[(i // 5) % 5]) if i % 3 else (TAGS[i % 5],),
        last_seen=float(i) if last_seen is None else last_seen,
    )


# ---- registry -------------------------------------------------------------------------------


@dataclass
class Measured:
    """What a metric function returns. ``extra`` holds secondary figures (p99, counts)."""

    value: float
    baseline: float
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass
class Metric:
    name: str
    fn: Callable[[Context], Measured]
    unit: str
    ratio: str  # "baseline/value" (higher is better) or "value/baseline"
    target: tuple[str, str, float] | None  # (field "ratio"|"value", "<="|">=", threshold)
    etcd: bool  # needs the etcd server
    doc: str


REGISTRY: dict[str, Metric] = {}


def metric(
    name: str,
    *,
    unit: str,
    ratio: str,
    target: tuple[str, str, float] | None = None,
    etcd: bool = False,
) -> Callable[[Callable[[Context], Measured]], Callable[[Context], Measured]]:
    """Register ``fn(ctx) -> Measured`` as metric ``name``."""
    if ratio not in ("baseline/value", "value/baseline"):
        raise ValueError(f"bad ratio {ratio!r}")

    def deco(fn: Callable[[Context], Measured]) -> Callable[[Context], Measured]:
        if name in REGISTRY:
            raise ValueError(f"metric {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        REGISTRY[name] = Metric(name, fn, unit, ratio, target, etcd, doc[0] if doc else "")
        return fn

    return deco


@dataclass
class Curve:
    """A scaling curve: ``fn(ctx) -> rows`` (one dict per point, same keys)."""

    name: str
    fn: Callable[[Context], list[dict[str, Any]]]
    etcd: bool
    doc: str


CURVES: dict[str, Curve] = {}


CurveFn = Callable[["Context"], list[dict[str, Any]]]


def curve(name: str, *, etcd: bool = False) -> Callable[[CurveFn], CurveFn]:
    """Register ``fn(ctx) -> [row, ...]`` as curve ``name`` (printed as a table, reported in
    the JSON under ``"curves"``)."""

    def deco(fn: CurveFn) -> CurveFn:
        if name in CURVES or name in REGISTRY:
            raise ValueError(f"curve {name!r} registered twice")
        doc = (fn.__doc__ or "").strip().splitlines()
        CURVES[name] = Curve(name, fn, etcd, doc[0] if doc else "")
        return fn

    return deco


def ratio_of(m: Metric, r: Measured) -> float | None:
    num, den = (r.baseline, r.value) if m.ratio == "baseline/value" else (r.value, r.baseline)
    if den == 0:
        return None if num == 0 else float("inf")
    return num / den


def target_met(m: Metric, r: Measured, ratio: float | None) -> bool | None:
    if m.target is None:
        return None
    what, op, threshold = m.target
    x = ratio if what == "ratio" else r.value
    if x is None:
        return None
    return x >= threshold if op == ">=" else x <= threshold


def target_text(m: Metric) -> str:
    if m.target is None:
        return "(report)"
    what, op, threshold = m.target
    return f"{what} {op} {threshold:g}"


# ---- context --------------------------------------------------------------------------------


class Context:
    """One run: the mode, a temp dir, the etcd endpoint (if started) and a shared cache."""

    def __init__(self, mode: str, tmp: Path, endpoint: str | None) -> None:
        if mode not in MODES:
            raise ValueError(mode)
        self.mode = mode
        self.tmp = tmp
        self.endpoint = endpoint
        self.cache: dict[str, Any] = {}
        self._closers: dict[str, list[Callable[[], None]]] = {"metric": [], "run": []}

    def on_close(self, fn: Callable[[], None], scope: str = "metric") -> None:
        """Register cleanup (closing a DB or client) for the end of the current metric, or of
        the run (``scope="run"``, for resources kept in :attr:`cache`)."""
        self._closers[scope].append(fn)

    def close(self, scope: str = "run") -> None:
        """Run the cleanups of ``scope`` ("run" also runs the "metric" ones), newest first."""
        for s in ("metric", "run") if scope == "run" else (scope,):
            closers = self._closers[s]
            while closers:
                closers.pop()()

    def pick(self, smoke: Any, quick: Any, full: Any) -> Any:
        return {"smoke": smoke, "quick": quick, "full": full}[self.mode]

    @property
    def etcd_url(self) -> str:
        if self.endpoint is None:
            raise RuntimeError("this metric needs etcd but none was started")
        return f"etcd://{self.endpoint}"

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.etcd_url[len("etcd://") :].rpartition(":")
        return host, int(port)

    @staticmethod
    def fresh_prefix(tag: str) -> str:
        return f"bench-{tag}-{uuid.uuid4().hex[:8]}/"


# ---- timing ---------------------------------------------------------------------------------

Sampler = Callable[[], list[float]]  # one repetition -> per-op samples in seconds


def interleave(
    rounds: int, candidate: Sampler, baseline: Sampler
) -> tuple[list[float], list[float]]:
    """Run ``rounds`` repetitions of each side, alternating which goes first; returns all
    per-op samples of each side."""
    out = interleave_sides(rounds, {"candidate": candidate, "baseline": baseline})
    return out["candidate"], out["baseline"]


T = TypeVar("T")


def interleave_sides(rounds: int, sides: dict[str, Callable[[], list[T]]]) -> dict[str, list[T]]:
    """Like :func:`interleave` for any number of sides: each round runs every side once, in
    the given order on even rounds and reversed on odd ones; each side's results in order."""
    out: dict[str, list[T]] = {name: [] for name in sides}
    order = list(sides)
    for r in range(rounds):
        for name in order if r % 2 == 0 else order[::-1]:
            out[name] += sides[name]()
    return out


def batch(fn: Callable[[int], None], n: int) -> list[float]:
    """Time ``fn(n)`` (a loop of ``n`` operations) with the collector off; one per-op sample."""
    gc.collect()
    enabled = gc.isenabled()
    gc.disable()
    try:
        t0 = time.perf_counter()
        fn(n)
        dt = time.perf_counter() - t0
    finally:
        if enabled:
            gc.enable()
    return [dt / n]


def median(xs: list[float]) -> float:
    return statistics.median(xs)


def p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


US = 1e6


# ---- data -----------------------------------------------------------------------------------


def preload(url: str, prefix: str, objs: list[Any], batch_size: int = 128) -> None:
    """Write ``objs`` straight into the KV store (raw Txns of ``batch_size`` puts, encoded by
    the model codec), bypassing transactions: setting up a large data set fast."""
    from txindex.backend import Put, open_backend
    from txindex.model import info_of

    backend = open_backend(url)
    try:
        for i in range(0, len(objs), batch_size):
            ops = []
            for obj in objs[i : i + batch_size]:
                info = info_of(obj)
                key = prefix + info.prefix + info.key_suffix(info.pk(obj))
                ops.append(Put(key.encode(), info.encode(obj)))
            backend.txn([], ops)
    finally:
        backend.close()


class TxnRecorder:
    """Delegates to a DB's backend; counts Txn outcomes (a failed Txn = one re-validation
    round of the commit protocol), the objects written by successful Txns (keys under the
    DB's prefix: a group commit carries several), the time spent in ``txn`` and the shape of
    the last Txn. :meth:`install` puts it on the commit path; the watcher keeps the original."""

    def __init__(self, inner: Any, prefix: str = "") -> None:
        self._inner = inner
        self._prefix = prefix.encode()
        self._lock = threading.Lock()
        self.succeeded = 0
        self.failed = 0
        self.objects = 0
        self.seconds: list[float] = []
        self.shape = ""

    @classmethod
    def install(cls, db: Any) -> TxnRecorder:
        """A recorder on ``db``'s commit path (its group commit queue)."""
        rec = cls(db._group._backend, db.prefix)
        db._backend = db._group._backend = rec
        return rec

    def txn(
        self, compares: Sequence[Any], success: Sequence[Any], failure: Sequence[Any] = ()
    ) -> Any:
        t0 = time.perf_counter()
        result = self._inner.txn(compares, success, failure)
        dt = time.perf_counter() - t0
        ranged = sum(1 for c in compares if getattr(c, "range_end", None))
        with self._lock:
            self.seconds.append(dt)
            self.shape = f"{len(compares)} cmp ({ranged} range), {len(success)} ops"
            if result.succeeded:
                self.succeeded += 1
                self.objects += sum(
                    1 for op in success
                    if op.key.startswith(self._prefix) and b"__txindex__/" not in op.key
                )
            else:
                self.failed += 1
        return result

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)


class Watchers:
    """``n`` ``etcdctl watch --prefix`` processes on one prefix: native watchers in other
    processes, the cheapest a watch gets. Raw Txns into a prefix they watch measure what etcd
    itself (sending the events) and the machine (receiving them) charge a commit that anyone
    watches: the floor for any watch-fed cache, txindex included.

    ``available`` is False (and nothing runs) when no ``etcdctl`` is found next to the etcd
    binary or on ``$PATH``."""

    def __init__(self, endpoint: str, prefix: str, n: int, tmp: Path) -> None:
        from txindex.server import find_etcd_binary

        sibling = Path(find_etcd_binary()).with_name("etcdctl")
        etcdctl = str(sibling) if sibling.is_file() else shutil.which("etcdctl")
        self.procs: list[subprocess.Popen[bytes]] = []
        self.available = etcdctl is not None
        if etcdctl is None:
            return
        outs = [tmp / f"watch-{uuid.uuid4().hex[:8]}.out" for _ in range(n)]
        for out in outs:
            with open(out, "wb") as f:  # a file, not a pipe: nothing in this process reads it
                self.procs.append(
                    subprocess.Popen(
                        [etcdctl, "--endpoints", endpoint, "watch", "--prefix", prefix],
                        stdout=f,
                        stderr=subprocess.DEVNULL,
                    )
                )
        self._wait_ready(endpoint, prefix, outs)

    def _wait_ready(self, endpoint: str, prefix: str, outs: list[Path]) -> None:
        """Write a marker key until every watcher has printed an event."""
        from txindex.backend import Put, open_backend

        backend = open_backend(f"etcd://{endpoint}")
        try:
            deadline = time.monotonic() + 30
            while not all(o.stat().st_size > 0 for o in outs):
                if time.monotonic() > deadline:
                    raise RuntimeError("etcdctl watchers did not start within 30 s")
                backend.txn([], [Put((prefix + "watchers-ready").encode(), b"1")])
                time.sleep(0.1)
        finally:
            backend.close()

    def close(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait()


class InprocWatch:
    """A do-nothing watch on ``prefix`` read by a thread of this process, over the same
    transport the DB's watcher uses (``EtcdBackend.follow``: a single-threaded unary-stream
    call): it only counts events. Raw Txns into a prefix it watches measure what the watch
    txindex uses charges a commit before txindex does any work of its own: the floor for
    txindex's design in one Python process (:class:`Watchers` is the floor for any cache)."""

    def __init__(self, url: str, prefix: str) -> None:
        from txindex.backend import open_backend
        from txindex.backend.base import prefix_end

        self.events = 0
        self._backend = open_backend(url)
        key = prefix.encode()
        rev = self._backend.current_revision()
        self._stream = self._backend.follow(key, prefix_end(key), rev + 1, liveness=5.0)  # type: ignore[attr-defined]
        self._thread = threading.Thread(target=self._read, name="bench-inproc-watch", daemon=True)
        self._thread.start()

    def _read(self) -> None:
        from txindex.errors import WatchBroken

        try:
            while True:
                resp = self._stream.get()
                if resp is not None:
                    self.events += len(resp.events)
        except WatchBroken:
            return

    def close(self) -> None:
        self._stream.close()
        self._thread.join(timeout=10)
        self._backend.close()
