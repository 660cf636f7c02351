"""Change notifications: ``db.subscribe(target, callback=None)``.

``target`` is one of

* ``(Model, pk)``: one object;
* ``Model``: every object of a model;
* ``(Model.index, value)``: every object whose ``index`` key equals ``value`` before or after
  the change (so an object moving out of the query is reported too).

A :class:`Change` carries ``revision``, ``key`` (the store key, ``"nodes/n1"``), ``pk``,
``old`` and ``new`` (the object before and after; ``None`` for absent; a
:class:`~txindex.errors.DecodeError` for a stored value that does not decode).

Delivery: after the watcher (or a committing thread of this process, for its own commit: see
:meth:`~txindex.watcher.Watcher.apply_local`) has applied a revision to the store, its changes
are queued to one dispatcher thread per DB, which calls callbacks (or fills iterator queues) in
revision order, never under a store lock: a callback may open ``db.read()`` and sees at least
that revision. Each matching key change is delivered once per subscription (a commit applied
locally is skipped when its watch event arrives); a revision that changes several matching
keys gives several changes with the same revision. Changes with a revision above
``Subscription.revision`` are all delivered: the applied revision when ``subscribe`` returned,
or this process's last commit if that is later (the state a ``db.read()`` opened then sees);
a resync after compaction reports the net change of each key at the resync revision.

Without a callback the subscription is an iterator (``for change in sub``) that blocks until
the next change and ends after :meth:`Subscription.close` (or ``db.close()``). It holds at most
``max_pending`` undelivered changes (10,000 by default; ``None``: no bound): a consumer that
falls that far behind loses its subscription rather than letting memory grow: the changes
already queued are still delivered, in order, then ``get`` (and so iteration) raises
:class:`~txindex.errors.SubscriptionLagged`, naming the revision of the first change not
delivered. Re-read with ``db.read()`` and subscribe again.

Routing a change to its subscriptions costs a few dict probes (by key, by model, by index
key), however many subscriptions are open; only a subscription to a prefix of a compound
index is tested per change of its model.

A callback runs in the dispatcher thread, so a slow one holds up every subscription of the
DB (their backlog waits in the dispatcher's queue, unbounded); a callback that raises is
logged and keeps its subscription. When no subscription is open the watcher skips all of this
(one ``is None`` test per watch response).
"""

from __future__ import annotations

import logging
import queue
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from .errors import Closed, ModelError, SubscriptionLagged
from .fences import equality_key
from .index import Index
from .model import ModelInfo, info_of
from .store import Entry, Store, index_keys

if TYPE_CHECKING:
    from .db import DB
    from .watcher import Watcher

__all__ = ["Change", "Subscription"]

log = logging.getLogger("txindex.notify")

Updates = Sequence[tuple[int, Sequence[tuple[str, Entry | None]]]]


@dataclass(frozen=True, slots=True)
class Change:
    """One key changed at one applied revision."""

    revision: int
    key: str
    pk: Any
    old: Any
    new: Any


_END: Any = object()


class Subscription:
    """An open subscription (see the module doc). Iterable when created without a callback;
    a context manager that closes it."""

    def __init__(
        self,
        notifier: Notifier,
        kind: str,
        info: ModelInfo,
        match: Any,
        callback: Callable[[Change], object] | None,
    ) -> None:
        self._notifier = notifier
        self.kind = kind  # "key" | "model" | "index"
        self.info = info
        self.match = match  # the store key, the ModelInfo, or (index, lo, hi)
        self.callback = callback
        self.revision = 0  # set by subscribe: changes above it are delivered
        self.closed = False
        self._queue: queue.SimpleQueue[Any] | None = None if callback else queue.SimpleQueue()
        self.max_pending: int | None = None  # an iterator's bound on undelivered changes
        self._lagged: SubscriptionLagged | None = None  # set when it overflowed
        # an iterator's end mark goes in after every change queued, and nothing after it
        self._lock = threading.Lock()

    def close(self) -> None:
        """Stop delivery; an iterator ends after the changes already queued. Idempotent."""
        with self._lock:
            if self.closed:
                return
            self.closed = True
            if self._queue is not None:
                self._queue.put(_END)
        self._notifier.remove(self)

    def get(self, timeout: float | None = None) -> Change | None:
        """The next change; ``None`` after ``timeout`` seconds or once closed and drained.
        Raises :class:`~txindex.errors.SubscriptionLagged` once it overflowed (module doc)."""
        if self._queue is None:
            raise TypeError("this subscription delivers to its callback; it has no queue")
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if item is _END:
            self._queue.put(_END)  # stay ended for later calls
            if self._lagged is not None:
                raise SubscriptionLagged(self._lagged.revision, self._lagged.max_pending)
            return None
        change: Change = item
        return change

    def __iter__(self) -> Iterator[Change]:
        if self._queue is None:
            raise TypeError("this subscription delivers to its callback; it is not iterable")
        return self._iterate()

    def _iterate(self) -> Iterator[Change]:
        while True:
            change = self.get()
            if change is None:
                return
            yield change

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _deliver(self, change: Change) -> None:
        if self._queue is None:
            if self.closed:
                return
            assert self.callback is not None
            try:
                self.callback(change)
            except Exception:
                log.exception("txindex: subscription callback raised on %s; continuing", change.key)
            return
        with self._lock:
            if self.closed:
                return
            if self.max_pending is None or self._queue.qsize() < self.max_pending:
                self._queue.put(change)
                return
            # fell max_pending changes behind: this change is the first it will not get; the
            # consumer reads those queued (all before it, in order), then SubscriptionLagged
            self.closed = True
            self._lagged = SubscriptionLagged(change.revision, self.max_pending)
            self._queue.put(_END)
        log.warning("txindex: %s", self._lagged)
        self._notifier.remove(self)



class _Routes:
    """The open subscriptions by what they match, so that routing a change costs a few dict
    probes, not a test per subscription: by store key, by model, and by (index, key) for an
    index subscription on one key; a prefix of a compound index is tested per change
    (``scan``). Mutated and read under the notifier's lock."""

    def __init__(self) -> None:
        self.keys: dict[str, dict[Subscription, None]] = {}
        self.models: dict[ModelInfo, dict[Subscription, None]] = {}
        self.exact: dict[ModelInfo, dict[Index[Any], dict[Any, dict[Subscription, None]]]] = {}
        self.scan: dict[ModelInfo, dict[Subscription, None]] = {}

    def _slot(self, sub: Subscription) -> dict[Subscription, None]:
        if sub.kind == "key":
            return self.keys.setdefault(sub.match, {})
        if sub.kind == "model":
            return self.models.setdefault(sub.info, {})
        index, lo, hi = sub.match
        key = equality_key(lo, hi)
        if key is None:
            return self.scan.setdefault(sub.info, {})
        return self.exact.setdefault(sub.info, {}).setdefault(index, {}).setdefault(key, {})

    def add(self, sub: Subscription) -> None:
        """O(1)."""
        self._slot(sub)[sub] = None

    def remove(self, sub: Subscription) -> None:
        """O(1) (empty slots are kept: they cost a probe that finds nothing)."""
        self._slot(sub).pop(sub, None)

    def matching(self, key: str, before: Entry | None, after: Entry | None) -> list[Subscription]:
        """The subscriptions a change of ``key`` from ``before`` to ``after`` concerns, each
        once. O(s + i * k) for s matches and k keys in each of the model's i subscribed
        indexes, plus a test per prefix subscription of the model."""
        entry = after or before
        assert entry is not None
        info = entry.info
        found: dict[Subscription, None] = {}
        found.update(self.keys.get(key, {}))
        found.update(self.models.get(info, {}))
        for index, by_key in self.exact.get(info, {}).items():
            for e in (before, after):
                for k in index_keys(index, e):
                    subs = by_key.get(k)
                    if subs:
                        found.update(subs)
        for sub in self.scan.get(info, {}):
            index, lo, hi = sub.match
            if _touches(index, lo, hi, before) or _touches(index, lo, hi, after):
                found[sub] = None
        return list(found)


def _touches(index: Index[Any], lo: Any, hi: Any, entry: Entry | None) -> bool:
    if entry is None:
        return False
    for k in index_keys(index, entry):
        pair = (k, entry.pk)
        if pair >= lo and pair < hi:
            return True
    return False


class Notifier:
    """Internal: one per DB. Installs the watcher's apply hook while subscriptions exist and
    runs the dispatcher thread."""

    def __init__(self, db: DB, watcher: Watcher, store: Store) -> None:
        self._db = db
        self._watcher = watcher
        self._store = store
        self._lock = threading.Lock()
        self._subs: dict[Subscription, None] = {}
        self._routes = _Routes()  # the same subscriptions by what they match
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._closed = False

    # ---- subscriptions (user threads) ----------------------------------------------------

    def subscribe(
        self,
        target: Any,
        callback: Callable[[Change], object] | None = None,
        max_pending: int | None = 10_000,
    ) -> Subscription:
        if callback is not None and not callable(callback):
            raise TypeError(f"callback must be callable, got {callback!r}")
        if max_pending is not None and (
            isinstance(max_pending, bool) or not isinstance(max_pending, int) or max_pending < 1
        ):
            raise ValueError(f"max_pending must be a positive int or None, got {max_pending!r}")
        sub = self._make(target, callback)
        sub.max_pending = max_pending
        if sub.info not in self._store.models:
            raise ModelError(f"{sub.info.name} is not a model of this database")
        with self._lock:
            if self._closed:
                raise Closed("database is closed")
            if self._thread is None:
                self._thread = threading.Thread(
                    target=self._run, name="txindex-notify", daemon=True
                )
                self._thread.start()
            self._subs[sub] = None
            self._routes.add(sub)
            # The watcher applies under ``hook_lock`` and reads ``apply_hook`` inside it, so
            # every revision above the one read here goes through the hook.
            with self._watcher.hook_lock:
                self._watcher.apply_hook = self._apply
                # read-your-writes: this process's own commits count as already seen
                sub.revision = max(self._store.revision, self._db._visible)
        return sub

    def _make(self, target: Any, callback: Callable[[Change], object] | None) -> Subscription:
        if isinstance(target, type):
            return Subscription(self, "model", info_of(target), None, callback)
        if isinstance(target, tuple) and len(target) == 2:
            first, value = target
            if isinstance(first, Index):
                if first not in self._store.declared:
                    raise ModelError(f"{first!r} is not an index of a model of this database")
                lo, hi = first.eq_bounds(value)
                info = info_of(first.model)
                return Subscription(self, "index", info, (first, lo, hi), callback)
            if isinstance(first, type):
                info = info_of(first)
                key = info.prefix + info.key_suffix(value)
                return Subscription(self, "key", info, key, callback)
        raise TypeError(
            "subscribe() takes (Model, pk), a Model class, or (Model.index, value); "
            f"got {target!r}"
        )

    def remove(self, sub: Subscription) -> None:
        with self._lock:
            if sub in self._subs:
                del self._subs[sub]
                self._routes.remove(sub)
            if not self._subs:
                with self._watcher.hook_lock:
                    self._watcher.apply_hook = None

    def close(self) -> None:
        """Close every subscription (iterators end) and stop the dispatcher."""
        with self._lock:
            self._closed = True
            subs = list(self._subs)
        for sub in subs:
            sub.close()
        thread = self._thread
        if thread is not None:
            self._queue.put(_END)
            if thread is not threading.current_thread():
                thread.join(timeout=10)

    # ---- the watcher hook (watcher or committing thread, under Watcher.hook_lock) --------

    def _apply(self, batches: Updates, reindex: bool, after: int | None = None) -> bool:
        """Capture the entries each update replaces, apply, then queue the changes. With
        ``after``: only if the store's applied revision is exactly ``after`` (a local apply of
        this process's own commit, :meth:`Watcher.apply_local`); False if nothing applied."""
        revision = self._store.revision
        if after is not None and revision != after:
            return False
        current: dict[str, Entry | None] = {}
        out: list[tuple[int, list[tuple[str, Entry | None, Entry | None]]]] = []
        for rev, updates in batches:
            if rev <= revision:
                continue
            triples = []
            for key, new in updates:
                before = current[key] if key in current else self._store.get(key, revision)
                current[key] = new
                if before is not None or new is not None:
                    triples.append((key, before, new))
            if triples:
                out.append((rev, triples))
        if not self._store.apply(batches, reindex=reindex, after=after):
            return False
        if out:
            self._queue.put(out)
        return True

    # ---- the dispatcher thread -----------------------------------------------------------

    def _run(self) -> None:
        while True:
            item = self._queue.get()
            if item is _END:
                return
            with self._lock:  # routed under the lock, delivered outside it
                routed = [
                    (rev, key, before, after, subs)
                    for rev, triples in item
                    for key, before, after in triples
                    if (subs := self._routes.matching(key, before, after))
                ]
            for rev, key, before, after, subs in routed:
                e = after or before
                assert e is not None
                change = Change(
                    rev, key, e.pk,
                    None if before is None else before.value,
                    None if after is None else after.value,
                )
                for sub in subs:
                    if rev > sub.revision:  # (changes up to sub.revision predate it)
                        sub._deliver(change)
