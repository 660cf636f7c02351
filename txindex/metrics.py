"""Observability: a metrics hook, an optional Prometheus exporter, and what txindex logs.

Metrics
-------

``txindex.open(url, models=..., metrics=Metrics())`` sends events to a :class:`Metrics` object.
Subclass it and override what you need (every method is a no-op), or use
:class:`PrometheusMetrics`. Without ``metrics=`` no hook runs (one ``is None`` test per commit
and per watch response).

=================================  ==========================================================
method                             called when (thread)
=================================  ==========================================================
``commit_latency(seconds)``        a commit succeeded; wall time of ``tx.commit()``'s Txn
                                   rounds, validation included (committing thread)
``conflict()``                     a commit raised ``Conflict`` (committing thread)
``commit_unknown()``               a commit raised ``CommitUnknown`` (committing thread)
``resync()``                       the cache was rebuilt after compaction (watcher thread)
``reconnect()``                    the watch failed and is being replaced (watcher thread)
``decode_error()``                 a stored value did not decode (watcher thread, also
                                   during the initial load in the opening thread)
``cache_lag(revisions, seconds)``  after every applied watch batch and every progress
                                   notification (watcher thread)
=================================  ==========================================================

Methods must be quick and thread-safe; an exception they raise is logged and swallowed.

Cache lag
---------

etcd events carry no timestamps, so lag is measured against revisions this process *knows*
exist: the revision of each of its own successful commits (etcd's response header) is recorded
with the time it was learnt. A progress notification at revision R promises that every event up
to R has been delivered, so the cache is current through R. Then:

* ``revisions`` = highest known revision - max(applied revision, last progress revision), at
  least 0: how many revisions this process has committed that its cache has not yet applied.
* ``seconds`` = age of the oldest known revision the cache has not yet applied (0 when none):
  for a steady stream of commits this is the commit-to-visible (read-your-writes) delay.

Writes by other processes are invisible to this measure until they arrive; a watch that stalls
outright is caught by the progress deadline (``reconnect()``) and by ``db.stats()``.

Logging
-------

Loggers ``txindex`` (open, close, commit unknowns), ``txindex.watcher`` (load with timing,
resync, reconnect, decode errors: key and reason) and ``txindex.store``. Nothing logs
credentials, backend options or stored values (a decode error's reason may quote up to 60
characters of the offending *stored* JSON; see ``DecodeError``).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import CommitUnknown, Conflict

if TYPE_CHECKING:
    from .transaction import Transaction

__all__ = ["Metrics", "PrometheusMetrics"]

log = logging.getLogger("txindex")

T = TypeVar("T")

# Commit latency buckets (seconds): a local etcd commits in ~1 ms, a WAN cluster in ~100 ms.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
)


class Metrics:
    """The metrics hook: every method is a no-op; override the ones you need (see module doc)."""

    def commit_latency(self, seconds: float) -> None:
        """A commit succeeded after ``seconds`` (a histogram observation)."""

    def conflict(self) -> None:
        """A commit raised ``Conflict``."""

    def commit_unknown(self) -> None:
        """A commit raised ``CommitUnknown``."""

    def resync(self) -> None:
        """The cache was resynchronised after compaction."""

    def reconnect(self) -> None:
        """The watch stream failed and is being replaced."""

    def decode_error(self) -> None:
        """A stored value did not decode (the key then raises ``DecodeError`` on ``get``)."""

    def cache_lag(self, revisions: int, seconds: float) -> None:
        """The cache's lag behind revisions this process knows exist (gauges)."""


class PrometheusMetrics(Metrics):
    """:class:`Metrics` exported with ``prometheus_client`` (imported lazily: install it
    yourself; txindex does not depend on it).

    Metric names, each prefixed with ``namespace`` (default ``txindex``) and labelled with
    ``labels`` if given: ``_commit_seconds`` (histogram), ``_conflicts_total``,
    ``_commit_unknown_total``, ``_resyncs_total``, ``_reconnects_total``,
    ``_decode_errors_total`` (counters), ``_cache_lag_revisions``, ``_cache_lag_seconds``
    (gauges). Pass a ``registry`` (``prometheus_client.CollectorRegistry``) to keep several DBs
    or tests apart; the default registry otherwise.
    """

    def __init__(
        self,
        namespace: str = "txindex",
        *,
        registry: Any = None,
        labels: dict[str, str] | None = None,
        buckets: Sequence[float] = LATENCY_BUCKETS,
    ) -> None:
        try:
            import prometheus_client as prom
        except ImportError as exc:  # pragma: no cover - depends on the environment
            raise ImportError(
                "PrometheusMetrics needs prometheus_client: pip install prometheus_client"
            ) from exc
        names = tuple(labels or {})
        values = tuple((labels or {}).values())
        kw: dict[str, Any] = {"namespace": namespace, "labelnames": names}
        if registry is not None:
            kw["registry"] = registry

        def bind(metric: Any) -> Any:
            return metric.labels(*values) if names else metric

        self.commit_seconds = bind(prom.Histogram(
            "commit_seconds", "Latency of successful commits", buckets=tuple(buckets), **kw
        ))
        self.conflicts = bind(prom.Counter("conflicts", "Commits that raised Conflict", **kw))
        self.commit_unknowns = bind(prom.Counter(
            "commit_unknown", "Commits whose outcome is unknown (CommitUnknown)", **kw
        ))
        self.resyncs = bind(prom.Counter("resyncs", "Cache resyncs after compaction", **kw))
        self.reconnects = bind(prom.Counter("reconnects", "Watch stream reconnects", **kw))
        self.decode_errors = bind(prom.Counter(
            "decode_errors", "Stored values that did not decode", **kw
        ))
        self.lag_revisions = bind(prom.Gauge(
            "cache_lag_revisions", "Known committed revisions not yet applied to the cache", **kw
        ))
        self.lag_seconds = bind(prom.Gauge(
            "cache_lag_seconds", "Age of the oldest known revision not yet applied", **kw
        ))

    def commit_latency(self, seconds: float) -> None:
        self.commit_seconds.observe(seconds)

    def conflict(self) -> None:
        self.conflicts.inc()

    def commit_unknown(self) -> None:
        self.commit_unknowns.inc()

    def resync(self) -> None:
        self.resyncs.inc()

    def reconnect(self) -> None:
        self.reconnects.inc()

    def decode_error(self) -> None:
        self.decode_errors.inc()

    def cache_lag(self, revisions: int, seconds: float) -> None:
        self.lag_revisions.set(revisions)
        self.lag_seconds.set(seconds)


class Observer:
    """Internal: drives one DB's :class:`Metrics` (exception-safe) and tracks cache lag."""

    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self._lock = threading.Lock()
        self._pending: deque[tuple[int, float]] = deque()  # (known revision, when learnt)
        self._known = 0
        self._watermark = 0  # revision the cache is known to be current through
        self._failed: set[str] = set()

    def _call(self, fn: Callable[..., None], *args: Any) -> None:
        try:
            fn(*args)
        except Exception:
            name = getattr(fn, "__name__", repr(fn))
            if name not in self._failed:  # log each failing method once
                self._failed.add(name)
                log.exception("txindex: metrics hook %s raised; ignoring", name)

    # ---- commits (committing thread) -----------------------------------------------------

    def commit(self, tx: Transaction, fn: Callable[[Transaction], int]) -> int:
        start = time.perf_counter()
        try:
            revision = fn(tx)
        except Conflict:
            self._call(self.metrics.conflict)
            raise
        except CommitUnknown as exc:
            log_commit_unknown(tx, exc)
            self._call(self.metrics.commit_unknown)
            raise
        self._call(self.metrics.commit_latency, time.perf_counter() - start)
        self.known(revision)
        return revision

    def known(self, revision: int) -> None:
        """``revision`` exists on the server (learnt now)."""
        with self._lock:
            if revision > self._known:
                self._known = revision
                if revision > self._watermark:
                    self._pending.append((revision, time.monotonic()))

    # ---- watcher events (watcher thread) -------------------------------------------------

    def decode_error(self) -> None:
        self._call(self.metrics.decode_error)

    def reconnect(self) -> None:
        self._call(self.metrics.reconnect)

    def resync(self) -> None:
        self._call(self.metrics.resync)

    def applied(self, revision: int) -> None:
        """The store has applied ``revision``."""
        self._report(revision)

    def progress(self, revision: int) -> None:
        """A progress notification: every event up to ``revision`` has been delivered."""
        self._report(revision)

    def lag(self) -> tuple[int, float]:
        """``(revisions, seconds)`` as last defined in the module doc."""
        with self._lock:
            seconds = time.monotonic() - self._pending[0][1] if self._pending else 0.0
            return max(0, self._known - self._watermark), seconds

    def _report(self, revision: int) -> None:
        with self._lock:
            if revision > self._watermark:
                self._watermark = revision
            pending = self._pending
            while pending and pending[0][0] <= self._watermark:
                pending.popleft()
        revisions, seconds = self.lag()
        self._call(self.metrics.cache_lag, revisions, seconds)


def log_commit_unknown(tx: Transaction, exc: BaseException) -> None:
    """Log a commit whose outcome is unknown: how many keys and which (never the values)."""
    keys = sorted(tx.writes)
    shown = ", ".join(keys[:5]) + (f", ... ({len(keys) - 5} more)" if len(keys) > 5 else "")
    log.warning(
        "txindex: commit outcome unknown (%s) for %d key(s) [%s] at snapshot %s; "
        "read the keys again to find out whether it was applied",
        exc, len(keys), shown, tx._rev,
    )


def safe_url(url: str) -> str:
    """``url`` without user info (``etcd://user:secret@h:p`` -> ``etcd://h:p``) for logs:
    everything up to the last ``@`` goes (a password may hold commas and ``@``, so hosts
    before it go too; ``open`` refuses user info in a URL anyway)."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        return url.rsplit("@", 1)[-1]
    return f"{scheme}://{rest.rsplit('@', 1)[-1]}"
