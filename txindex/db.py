"""The database handle: ``open(url)``, lifecycle, ``tx()``, ``read()``, ``transact()``."""

from __future__ import annotations

import atexit
import logging
import random
import threading
import time
import weakref
from collections.abc import Awaitable, Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any, TypeVar

from . import _seeded
from .backend import open_backend
from .backend.base import Backend, Put
from .errors import Closed, CommitUnknown, Conflict, ModelError, Unavailable
from .fences import sync_key
from .group import GroupCommit
from .index import Index
from .metrics import Metrics, Observer, safe_url
from .model import ModelInfo, check_prefixes, info_of
from .store import Store
from .transaction import Transaction
from .turns import Turns, check_attempts
from .watcher import Watcher

if TYPE_CHECKING:  # hooks: txindex.aio / txindex.notify are imported on first use
    from .aio import AsyncTx
    from .notify import Change, Notifier, Subscription

log = logging.getLogger("txindex")

T = TypeVar("T")

MAX_REQUEST_BYTES = 1536 * 1024  # etcd's default --max-request-bytes (1.5 MiB)


class DB:
    """A transactional in-memory view of one etcd prefix, kept current by a watch.

    Thread-safe: any number of threads may run transactions at once; each transaction
    belongs to one thread.
    """

    def __init__(
        self,
        backend: Backend,
        models: Sequence[type[Any]],
        *,
        prefix: str = "",
        max_txn_ops: int = 128,
        max_request_bytes: int = MAX_REQUEST_BYTES,
        max_rounds: int = 20,
        timeout: float = 10.0,
        page_size: int = 2000,
        progress_interval: float = 2.0,
        metrics: Metrics | None = None,
        visibility_key: str | None = None,
        on_load_progress: Callable[[int], object] | None = None,
    ) -> None:
        _check_options(prefix, max_txn_ops, max_request_bytes, max_rounds, timeout)
        infos = [info_of(m) for m in models]
        if not infos:
            raise ModelError("open() needs at least one model")
        check_prefixes(infos)
        self.prefix = prefix
        self.models: tuple[ModelInfo, ...] = tuple(infos)
        self.max_txn_ops = max_txn_ops
        self.max_request_bytes = max_request_bytes
        self.max_rounds = max_rounds
        self.timeout = timeout
        self._backend = backend
        self._store = Store(infos)
        # hook: txindex.metrics (None = no metrics; commit.py and the watcher test for None)
        self._observer = None if metrics is None else Observer(metrics)
        self._notifier: Notifier | None = None  # hook: txindex.notify, created by subscribe()
        self._watcher = Watcher(
            backend, self._store, prefix, page_size=page_size, progress_interval=progress_interval,
            observer=self._observer, on_load_progress=on_load_progress,
        )
        self._group = GroupCommit(
            backend, self._watcher, [Put(sync_key(prefix), b"")], max_txn_ops, max_request_bytes
        )
        self._turns = Turns(self._group)  # fair retries of transact (txindex.turns)
        self._async_pool: ThreadPoolExecutor | None = None  # asyncio commits (_commit_pool)
        self._last_commit = 0  # this handle's newest commit revision
        self._visible_cell = _visibility(visibility_key, prefix)
        self._visibility_key = visibility_key
        self._visible_lock = threading.Lock()
        self._closed = False
        self._watcher.load()
        _OPEN.add(self)

    # ---- transactions --------------------------------------------------------------------

    def tx(self) -> Transaction:
        """A read-write transaction: commits on a clean ``with`` exit, rolls back on error."""
        self._check_open()
        return Transaction(self, writable=True)

    def read(self) -> Transaction:
        """A read-only snapshot transaction: consistent, never conflicts, no network."""
        self._check_open()
        return Transaction(self, writable=False)

    def transact(self, fn: Callable[[Transaction], T], attempts: int = 10) -> T:
        """Run ``fn(tx)`` in a transaction and commit it, retrying the whole ``fn`` on
        ``Conflict`` (and ``Unavailable``: no request was sent) with jittered exponential
        backoff, at most ``attempts`` times. A retry goes next among this DB's ``transact``
        calls (:mod:`txindex.turns`), so a hot key does not starve a thread.
        ``CommitUnknown`` is never retried blindly; it propagates."""
        check_attempts(attempts)
        delay = 0.002
        turns = self._turns
        for attempt in range(attempts):
            taken = False
            try:
                if attempt:
                    time.sleep(delay * random.random())
                    delay = min(delay * 2, 0.25)
                    taken = turns.take()  # a retry goes next in this DB (txindex.turns)
                else:
                    turns.first()
                with self.tx() as tx:
                    return fn(tx)
            except (Conflict, Unavailable):  # Unavailable: nothing was sent, or cache behind
                if attempt == attempts - 1:
                    raise
            except CommitUnknown:
                if "blind_retry_unknown" not in _seeded.active or attempt == attempts - 1:
                    raise
            finally:
                turns.give(taken)
        raise AssertionError("unreachable")

    # ---- asyncio and notifications (txindex.aio, txindex.notify) -------------------------

    def atx(self) -> AsyncTx:
        """``async with db.atx() as tx``: a read-write transaction whose commit runs in a
        worker thread, so the event loop never blocks on etcd (see :mod:`txindex.aio`)."""
        from .aio import AsyncTx

        return AsyncTx(self, writable=True)

    def aread(self) -> AsyncTx:
        """``async with db.aread() as tx``: a read-only snapshot (see :mod:`txindex.aio`)."""
        from .aio import AsyncTx

        return AsyncTx(self, writable=False)

    async def atransact(
        self, fn: Callable[[Transaction], T | Awaitable[T]], attempts: int = 10
    ) -> T:
        """``await db.atransact(fn)``: :meth:`transact` for asyncio; ``fn`` may be async."""
        from .aio import atransact

        return await atransact(self, fn, attempts)

    def subscribe(
        self,
        target: Any,
        callback: Callable[[Change], object] | None = None,
        *,
        max_pending: int | None = 10_000,
    ) -> Subscription:
        """Changes to ``(Model, pk)``, a ``Model`` or ``(Model.index, value)``, delivered after
        the cache applied them: to ``callback`` from a dispatcher thread, or by iterating the
        returned :class:`~txindex.notify.Subscription`, which ends with ``SubscriptionLagged``
        if its consumer falls ``max_pending`` changes behind (see :mod:`txindex.notify`)."""
        self._check_open()
        from .notify import Notifier

        with self._visible_lock:
            if self._notifier is None:
                self._notifier = Notifier(self, self._watcher, self._store)
        return self._notifier.subscribe(target, callback, max_pending)

    # ---- state ---------------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The etcd revision the local cache has applied."""
        return self._store.revision

    def wait_for(self, revision: int, timeout: float | None = None) -> bool:
        """Block until the cache has applied ``revision``; False on timeout, ``Closed`` if the
        DB is (or gets) closed."""
        self._watcher.nudge()
        return self._store.wait_for(revision, self.timeout if timeout is None else timeout)

    def stats(self) -> dict[str, Any]:
        """Keys, revision, index sizes, watcher counters, and the group commit counters:
        Txns that carried several commits (``group_txns``) and the commits they carried."""
        s = self._watcher.stats
        return {
            "revision": self._store.revision,
            "keys": len(self._store),
            "indexes": {
                idx.qualname: self._store.index_size(idx) for idx in self._store.declared
            },
            "decode_errors": s.decode_errors,
            "unclaimed_keys": s.unclaimed_keys,
            "reconnects": s.reconnects,
            "resyncs": s.resyncs,
            "events": s.events,
            "local_applies": s.local_applies,
            "index_repairs": self._store.index_repairs,
            "group_txns": self._group.groups,
            "grouped_commits": self._group.grouped,
            "watcher_alive": self._watcher.alive,
        }

    def index_items(self, index: Index[Any]) -> list[tuple[Any, Any, Any]]:
        """The committed items of ``index`` as ``(index key, primary key, object)``."""
        return [(k, pk, e.value) for k, pk, e in self._store.index_items(index)]

    # ---- lifecycle -----------------------------------------------------------------------

    def close(self) -> None:
        """Stop the watcher and release the backend (stopping an embedded server)."""
        if self._closed:
            return
        self._closed = True
        self._store.close()  # threads waiting for a revision raise Closed
        if self._async_pool is not None:
            self._async_pool.shutdown(wait=False)
        self._watcher.stop()
        if self._notifier is not None:  # hook: txindex.notify (iterators end)
            self._notifier.close()
        self._backend.close()
        log.info("txindex: closed (prefix %r, revision %d)", self.prefix, self._store.revision)

    def __enter__(self) -> DB:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ---- used by transactions ------------------------------------------------------------

    def _commit_pool(self) -> ThreadPoolExecutor:
        """The pool asyncio commits run in, started on first use. O(1)."""
        self._check_open()
        pool = self._async_pool
        if pool is None:
            with self._visible_lock:
                if self._async_pool is None:
                    self._async_pool = ThreadPoolExecutor(
                        ASYNC_COMMIT_THREADS, thread_name_prefix="txindex-commit"
                    )
                pool = self._async_pool
        return pool

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("database is closed")

    def _pin(self) -> int:
        self._check_open()
        visible = self._visible
        if visible > self._store.revision and visible > self._last_commit:
            # another handle's commit (read-your-writes across handles): only this handle's
            # watch brings it, so no lazy pause of the watch (txindex.watcher)
            self._watcher.nudge()
        try:
            return self._store.pin(visible, self.timeout)
        except TimeoutError:
            self._watcher.nudge()
            log.warning("txindex: cache behind revision %d after %.1fs", visible, self.timeout)
            raise self._behind(visible) from None

    def _behind(self, visible: int) -> Unavailable:
        """The error of a wait for this process's last commit ``visible`` that timed out."""
        return Unavailable(
            f"cache has not caught up with this process's last commit (revision {visible}) "
            f"within {self.timeout}s"
        )

    @property
    def _visible(self) -> int:
        """The newest commit revision of this process on this server whose writes this
        handle's watch sees (read-your-writes)."""
        return self._visible_cell.revision

    def _committed(self, revision: int) -> None:
        if revision > self._last_commit:
            self._last_commit = revision  # (a race may leave it lower: one nudge too many)
        for cell in _covering(self._visibility_key, self.prefix, self._visible_cell):
            cell.advance(revision)

    def _catch_up(self, revision: int) -> None:
        self._watcher.nudge()
        if not self._store.wait_for(revision, self.timeout):
            raise Conflict(f"cache did not reach revision {revision} to re-validate")


def _check_options(
    prefix: object, max_txn_ops: object, max_request_bytes: object, max_rounds: object,
    timeout: object,
) -> None:
    """Refuse option values that would fail later in obscure ways (``ValueError``)."""
    if not isinstance(prefix, str):
        raise ValueError(f"prefix must be a str, got {prefix!r}")
    try:
        prefix.encode()
    except UnicodeEncodeError:
        raise ValueError(f"prefix {prefix!r} is not valid Unicode text") from None
    # the sync key and a model fence must fit beside one write
    for name, value, least in (
        ("max_txn_ops", max_txn_ops, 4), ("max_request_bytes", max_request_bytes, 1024),
        ("max_rounds", max_rounds, 1),
    ):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ValueError(f"{name} must be an int >= {least}, got {value!r}")
    if timeout is not None and (
        isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0
    ):
        raise ValueError(f"timeout must be a positive number or None, got {timeout!r}")


ASYNC_COMMIT_THREADS = 32
"""Threads of a DB's pool for asyncio commits (:mod:`txindex.aio`): commits waiting there
share Txns (group commit), so more threads than cores pay off; each waits mostly on etcd."""

_OPEN: weakref.WeakSet[DB] = weakref.WeakSet()


@atexit.register
def _close_open_databases() -> None:
    """Close databases still open at exit, while gRPC's threads run (see EtcdBackend.close)."""
    for db in list(_OPEN):
        try:
            db.close()
        except Exception as exc:  # exiting anyway: report, never raise
            log.warning("txindex: closing at exit failed: %s", exc)


class _Visibility:
    """The newest commit revision made in this process through any DB handle on one server
    whose prefix lies within one prefix (see :func:`_visibility`)."""

    def __init__(self) -> None:
        self.revision = 0
        self._lock = threading.Lock()

    def advance(self, revision: int) -> None:
        with self._lock:
            if revision > self.revision:
                self.revision = revision


_VISIBILITY: dict[str, dict[str, _Visibility]] = {}  # server (URL) -> DB prefix -> cell
_VISIBILITY_LOCK = threading.Lock()


def _visibility(key: str | None, prefix: str) -> _Visibility:
    """The read-your-writes cell of handles on server ``key`` with ``prefix``: shared by
    every such handle of the process; ``None`` (a private store) gets its own. A commit
    advances the cells of its handle's prefix and of every prefix that contains it (see
    :func:`_covering`): their watches see its keys. A handle on another prefix never waits
    for it: its watch may never see an event at that revision."""
    if key is None:
        return _Visibility()
    with _VISIBILITY_LOCK:
        return _VISIBILITY.setdefault(key, {}).setdefault(prefix, _Visibility())


def _covering(key: str | None, prefix: str, own: _Visibility) -> list[_Visibility]:
    """The cells a commit through a handle on (``key``, ``prefix``) advances: those of the
    prefixes ``prefix`` starts with (each commit writes a key inside ``prefix``: a write or
    the sync key). O(prefixes open on the server)."""
    if key is None:
        return [own]
    with _VISIBILITY_LOCK:
        return [c for p, c in _VISIBILITY[key].items() if prefix.startswith(p)]


def open(
    url: str,
    *,
    models: Sequence[type[Any]],
    prefix: str = "",
    max_txn_ops: int = 128,
    max_request_bytes: int = MAX_REQUEST_BYTES,
    timeout: float = 10.0,
    metrics: Metrics | None = None,
    on_load_progress: Callable[[int], object] | None = None,
    **backend_options: Any,
) -> DB:
    """Open a database over ``url`` and load it.

    ``etcd://host:port[,host:port...]`` a server or cluster; ``file://DIR`` an embedded etcd
    server started (and stopped on ``close()``) with its data in DIR; ``memory://[NAME]`` an
    in-process store with etcd's semantics (shared by name within the process).
    ``prefix`` scopes every key; ``max_txn_ops`` must match the server's ``--max-txn-ops``.
    ``metrics`` receives commit latency, conflicts, reconnects, lag... (:mod:`txindex.metrics`).
    """
    backend = open_backend(url, **backend_options)
    try:
        db = DB(
            backend,
            models,
            prefix=prefix,
            max_txn_ops=max_txn_ops,
            max_request_bytes=max_request_bytes,
            timeout=timeout,
            metrics=metrics,
            visibility_key=None if url.rstrip("/") == "memory:" else url,
            on_load_progress=on_load_progress,
        )
    except BaseException:
        backend.close()
        raise
    log.info(  # never the backend options (credentials, tokens) nor user info in the URL
        "txindex: opened %s prefix %r with models %s at revision %d",
        safe_url(url), prefix, [m.name for m in db.models], db.revision,
    )
    return db


__all__ = ["DB", "open"]
