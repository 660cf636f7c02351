"""The committed state: a multi-version cache of one key prefix, with its secondary indexes.

Only the watcher writes the store (:meth:`Store.load`, :meth:`Store.apply`,
:meth:`Store.advance`); transactions read it at a pinned revision.

Layout:

* ``_tables``: per model, the latest :class:`Entry` of every live key by primary key (the key
  string is not kept: ``<model prefix><pk>`` is derived when needed, saving a string per object).
* ``_history``: for keys changed after the oldest pinned snapshot, the entry each change
  replaced, as an immutable tuple of ``(revision, entry_before)`` (copy on write, so lock-free
  readers never see a list being mutated).
* ``_log``: the changes of each applied revision after the oldest pin, in revision order; it
  serves snapshot index queries and commit-time validation.
* ``_indexes``: one :class:`~txindex.keyindex.KeyIndex` of ``(index_key, primary_key)`` items
  per declared index; queries pair each item with the entry from its model's table.

Point reads are lock-free: the applier writes history before data, so a reader that finds a
newer ``mod_revision`` than its snapshot always finds the older entry in the history.
Index queries and all writes take one lock, so applying a revision batch is atomic for them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import operator
import threading
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from collections.abc import Set as AbstractSet
from dataclasses import dataclass
from typing import Any

from .errors import Closed, DecodeError, UnorderableValue
from .fences import equality_key
from .index import Index
from .keyindex import KeyIndex
from .model import ModelInfo

log = logging.getLogger("txindex.store")

IndexItem = tuple[Any, Any, "Entry"]  # (encoded index key, primary key, entry)
# what applying a change to one model touches: per index, its key extractor, its items and,
# for a typed field index, the getter of its fields (equal fields: equal keys, see _plan)
Plan = tuple[
    tuple[Index[Any], Callable[[Any], tuple[Any, ...]], KeyIndex, Callable[[Any], Any] | None],
    ...,
]


class Entry:
    """One version of one key. ``value`` is the decoded object, or a :class:`DecodeError`.
    The key string is not stored: it is ``info.prefix + str(pk)`` (:attr:`key`)."""

    __slots__ = ("info", "mod_revision", "pk", "value")

    def __init__(self, pk: Any, value: Any, mod_revision: int, info: ModelInfo) -> None:
        self.pk = pk
        self.value = value
        self.mod_revision = mod_revision
        self.info = info

    @property
    def key(self) -> str:
        """The store key (the etcd key minus the database prefix). O(len(key))."""
        return f"{self.info.prefix}{self.pk}"

    @property
    def broken(self) -> bool:
        """True if the stored value did not decode (``value`` is the DecodeError)."""
        return isinstance(self.value, DecodeError)

    def __repr__(self) -> str:
        return f"Entry({self.key!r}, rev={self.mod_revision})"


@dataclass(frozen=True, slots=True)
class Change:
    """One key changed at one revision: ``before`` is the replaced entry, ``after`` the new one
    (``None`` for absent)."""

    key: str
    before: Entry | None
    after: Entry | None


@dataclass(frozen=True, slots=True)
class Batch:
    revision: int
    changes: tuple[Change, ...]


def index_keys(index: Index[Any], entry: Entry | None) -> tuple[Any, ...]:
    """The index keys ``entry`` holds in ``index`` (none for another model, a broken value or
    a value the index cannot order). O(k log k) for k keys; recomputed on each call (caching
    them per entry cost ~15% more memory for no measured apply gain)."""
    if entry is None or entry.info.cls is not index.model or entry.broken:
        return ()
    try:
        return index.entries(entry.value)
    except (UnorderableValue, Exception) as exc:  # a foreign writer's value: skip, never crash
        log.warning("%s: %s not indexed: %s", index.qualname, entry.key, exc)
        return ()


class Store:
    """The multi-version committed state of one database prefix. Thread-safe."""

    def __init__(self, models: Sequence[ModelInfo]) -> None:
        self.models = tuple(models)
        self.revision = 0
        self._closed = False  # by close(): waits raise Closed
        self.index_repairs = 0  # items re-indexed after an impure index function (_repair)
        self._tables: dict[ModelInfo, dict[Any, Entry]] = {info: {} for info in self.models}
        self._routes = self._route_table()
        self._history: dict[str, tuple[tuple[int, Entry | None], ...]] = {}
        self._log: deque[Batch] = deque()
        self._pins: dict[int, int] = {}
        self._indexes: dict[Index[Any], KeyIndex] = {
            idx: KeyIndex() for info in self.models for idx in info.indexes
        }
        self._model_of: dict[Index[Any], ModelInfo] = {
            idx: info for info in self.models for idx in info.indexes
        }
        self.declared = frozenset(self._indexes)
        self._plans = self._plan()
        self._lock = threading.Lock()
        # threads waiting for a revision: a heap of (revision, seq, gate); a gate is a held
        # lock released when the store reaches its revision, so each apply wakes only the
        # threads whose revision it reached (a Condition's notify_all woke every waiter)
        self._waiters: list[tuple[int, int, threading.Lock]] = []
        self._waiter_seq = itertools.count()

    # ---- pins ----------------------------------------------------------------------------

    def pin(self, min_revision: int = 0, timeout: float | None = None) -> int:
        """Pin a snapshot at the applied revision, waiting until it reaches ``min_revision``.
        Returns the revision, or raises ``TimeoutError``. O(1)."""
        with self._lock:
            if self.revision < min_revision and not self._wait(min_revision, timeout):
                raise TimeoutError(f"cache did not reach revision {min_revision}")
            rev = self.revision
            pins = self._pins
            pins[rev] = pins.get(rev, 0) + 1
            return rev

    def unpin(self, revision: int) -> None:
        """Release a pin; history no open snapshot needs is reclaimed. Amortised O(changes)."""
        with self._lock:
            pins = self._pins
            left = pins[revision] - 1
            if left:
                pins[revision] = left
            else:
                del pins[revision]
                if self._log:
                    self._trim()

    def wait_for(self, revision: int, timeout: float | None) -> bool:
        """Block until the applied revision reaches ``revision``; False on timeout, ``Closed``
        once :meth:`close` was called."""
        with self._lock:
            return self._wait(revision, timeout)

    def close(self) -> None:
        """Wake every thread waiting for a revision; their waits (and later ones) raise
        ``Closed``. O(w) for w waiting threads."""
        with self._lock:
            self._closed = True
            for _, _, gate in self._waiters:
                gate.release()
            self._waiters.clear()

    def _wait(self, revision: int, timeout: float | None) -> bool:
        """Wait (the caller holds the lock; it is released meanwhile) until the applied
        revision reaches ``revision``; False on timeout. Woken once, by the apply that gets
        there (:meth:`_wake`) or by :meth:`close`. O(log w) for w waiting threads."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.revision < revision:
            if self._closed:
                raise Closed("database is closed")
            remaining = -1.0 if deadline is None else deadline - time.monotonic()
            if deadline is not None and remaining <= 0:
                return False
            gate = threading.Lock()
            gate.acquire()
            heapq.heappush(self._waiters, (revision, next(self._waiter_seq), gate))
            self._lock.release()
            try:
                gate.acquire(timeout=remaining)
            finally:
                self._lock.acquire()
        return True

    def _wake(self) -> None:
        """Open the gates of every thread waiting for a revision now applied (lock held)."""
        waiters = self._waiters
        while waiters and waiters[0][0] <= self.revision:
            heapq.heappop(waiters)[2].release()

    # ---- reads ---------------------------------------------------------------------------

    def get(self, key: str, revision: int) -> Entry | None:
        """The entry of ``key`` at a pinned ``revision``. Lock-free, O(1) for keys not changed
        since the snapshot, O(h) for a key with h newer versions."""
        return self._at(self._latest(key), key, revision)

    def lookup(self, info: ModelInfo, pk: Any, key: str, revision: int) -> Entry | None:
        """:meth:`get` for a caller that already has the model, the (valid) primary key and
        the key ``info.prefix + str(pk)``: one dict probe less work. Lock-free, O(1) as get."""
        return self._at(self._tables[info].get(pk), key, revision)

    def _at(self, entry: Entry | None, key: str, revision: int) -> Entry | None:
        if entry is not None and entry.mod_revision <= revision:
            return entry
        for rev, before in self._history.get(key, ()):
            if rev > revision:
                return before
        return entry

    def entries(self) -> dict[str, Entry]:
        """A copy of the latest entries (for tests and tools). O(n)."""
        with self._lock:
            return {e.key: e for table in self._tables.values() for e in table.values()}

    def __len__(self) -> int:
        """Number of live keys. O(models)."""
        return sum(map(len, self._tables.values()))

    def query(
        self,
        index: Index[Any],
        lo: Any,
        hi: Any,
        revision: int,
        *,
        reverse: bool = False,
        limit: int | None = None,
    ) -> list[IndexItem]:
        """Index items in ``[lo, hi)`` (``None`` = unbounded) as of ``revision``, in order.

        O(log k + m) for m items and k distinct keys (O(1) + m for one key), plus O(c) for c
        changes applied after ``revision``.
        """
        with self._lock:
            hidden, shown = self._changes_since(index, revision)
            need = None if limit is None else limit + len(hidden)
            ki = self._indexes[index]
            table = self._tables[self._model_of[index]]
            try:
                items = _fetch(ki, table, lo, hi, reverse, need)
            except KeyError:  # an item of an object that is gone (see _drop_stale)
                self._drop_stale(index, ki, table)
                items = _fetch(ki, table, lo, hi, reverse, need)
            if not hidden and not shown:
                return items
            items = [it for it in items if (it[0], it[1]) not in hidden]
            items.extend(it for it in shown if _within(it, lo, hi))
            items.sort(key=_order, reverse=reverse)
            return items if limit is None else items[:limit]

    def objects(
        self,
        index: Index[Any],
        lo: Any,
        hi: Any,
        revision: int,
        *,
        reverse: bool = False,
        limit: int | None = None,
    ) -> list[Any]:
        """The objects of :meth:`query`'s items, in the same order; when nothing was applied
        after ``revision``, read without building the items. Same complexity."""
        with self._lock:
            if revision >= self.revision:
                ki = self._indexes[index]
                key = equality_key(lo, hi)
                if key is not None:
                    pks = ki.get(key, reverse, limit)
                else:
                    pks = ki.columns(lo, hi, reverse, limit)[1]
                table = self._tables[self._model_of[index]]
                try:
                    return list(map(_VALUE, map(table.__getitem__, pks)))
                except KeyError:  # an item of an object that is gone (see _drop_stale)
                    self._drop_stale(index, ki, table)
        return [it[2].value for it in self.query(index, lo, hi, revision, reverse=reverse,
                                                 limit=limit)]

    def count(self, index: Index[Any], lo: Any, hi: Any, revision: int) -> int:
        """Number of items in ``[lo, hi)`` as of ``revision``. O(log k + keys in range) for k
        distinct keys, plus O(c) as above."""
        with self._lock:
            hidden, shown = self._changes_since(index, revision)
            n = self._indexes[index].count(lo, hi)
            n -= sum(1 for h in hidden if _within(h, lo, hi))
            return n + sum(1 for it in shown if _within(it, lo, hi))

    def changes(self, after: int, upto: int) -> Iterator[Change]:
        """Changes applied in revisions ``(after, upto]``; ``after`` must be pinned. O(b) for
        the b batches applied after ``after``, however long the log a snapshot keeps."""
        batches = []
        with self._lock:
            for b in reversed(self._log):
                if b.revision <= after:
                    break
                batches.append(b)
        for batch in reversed(batches):
            if batch.revision > upto:
                break
            yield from batch.changes

    def index_items(self, index: Index[Any]) -> list[IndexItem]:
        """Every committed item of ``index``, in order (for checks and tests). O(n)."""
        with self._lock:
            table = self._tables[self._model_of[index]]
            return [(k, pk, table[pk]) for k, pk in self._indexes[index].scan(None, None)]

    def index_size(self, index: Index[Any]) -> int:
        """Number of committed items of ``index``. O(1)."""
        return len(self._indexes[index])

    # ---- writes (watcher only) -----------------------------------------------------------

    def load(self, revision: int, entries: Iterable[Entry]) -> None:
        """Replace the whole state with ``entries`` at ``revision``; indexes are built in bulk
        (one sort each). O(n log n). Only for the first load: resyncs use :meth:`apply`."""
        tables: dict[ModelInfo, dict[Any, Entry]] = {info: {} for info in self.models}
        for e in entries:
            tables[e.info][e.pk] = e
        built: dict[Index[Any], list[tuple[Any, Any]]] = {idx: [] for idx in self._indexes}
        for entry in (e for table in tables.values() for e in table.values()):
            pk = entry.pk
            for idx in entry.info.indexes:
                pairs = built[idx]
                for k in _keys(idx, idx.extract, entry):
                    pairs.append((k, pk))
        indexes = {idx: KeyIndex.build(pairs) for idx, pairs in built.items()}
        with self._lock:
            self._tables, self._indexes = tables, indexes
            self._routes = self._route_table()
            self._plans = self._plan()
            self._history.clear()
            self._log.clear()
            self.revision = revision
            self._wake()

    def apply(
        self,
        batches: Sequence[tuple[int, Sequence[tuple[str, Entry | None]]]],
        *,
        reindex: bool = True,
        after: int | None = None,
    ) -> bool:
        """Apply revision batches atomically: ``(revision, [(key, entry or None)])`` in
        revision order. Revisions at or below the applied one are ignored. With ``after``,
        apply only if the applied revision is exactly ``after`` (else change nothing and
        return False): a process that knows every change of the next revision (its own commit
        when no other revision came between) can apply it without waiting for the watch.
        O(c log n) for c changed keys. ``reindex=False`` exists only for a seeded bug."""
        with self._lock:
            if after is not None and self.revision != after:
                return False
            # With no snapshot pinned nobody can read an older version (pins are taken under
            # this lock), so history and change log are only kept while some pin exists.
            keep = bool(self._pins)
            for revision, updates in batches:
                if revision <= self.revision:
                    continue
                if keep:
                    changes = [self._apply_one(revision, k, e, reindex, keep) for k, e in updates]
                    self._log.append(Batch(revision, tuple(c for c in changes if c is not None)))
                else:
                    for k, e in updates:
                        self._apply_one(revision, k, e, reindex, keep)
                self.revision = revision
            if self._log:
                self._trim()
            self._wake()
            return True

    def advance(self, revision: int) -> None:
        """Record that every change up to ``revision`` has been applied (a progress
        notification). O(1)."""
        with self._lock:
            if revision > self.revision:
                self.revision = revision
                self._trim()
                self._wake()

    # ---- internals -----------------------------------------------------------------------

    def _route_table(self) -> tuple[tuple[str, ModelInfo, dict[Any, Entry]], ...]:
        """(model prefix, model, its table), longest prefix first (as the watcher's Decoder
        claims keys)."""
        infos = sorted(self.models, key=lambda i: len(i.prefix), reverse=True)
        return tuple((info.prefix, info, self._tables[info]) for info in infos)

    def _route(self, key: str) -> tuple[dict[Any, Entry], Any] | None:
        """The table and primary key a store key lives under (a key whose suffix is not a
        canonical primary key is stored, broken, under the suffix string). O(models)."""
        for prefix, info, table in self._routes:
            if key.startswith(prefix):
                suffix = key[len(prefix):]
                if info.key_type is str:
                    return table, suffix
                try:
                    return table, info.pk_from_suffix(suffix)
                except ValueError:
                    return table, suffix
        return None

    def _latest(self, key: str) -> Entry | None:
        found = self._route(key)
        return None if found is None else found[0].get(found[1])

    def _plan(self) -> dict[ModelInfo, Plan]:
        return {
            info: tuple(
                (idx, idx.extract, self._indexes[idx], _field_getter(idx))
                for idx in info.indexes
            )
            for info in self.models
        }

    def _apply_one(
        self, revision: int, key: str, after: Entry | None, reindex: bool, keep: bool
    ) -> Change | None:
        """Apply one key's change: history, then indexes, then data (lock-free readers rely on
        this order). O(i log n) for i index items of the key."""
        if after is not None:
            table, pk = self._tables[after.info], after.pk
        else:
            found = self._route(key)
            if found is None:
                return None
            table, pk = found
        before = table.get(pk)
        if before is None and after is None:
            return None
        if keep:
            self._history[key] = (*self._history.get(key, ()), (revision, before))
        if not reindex:
            pass
        elif before is None or after is None or before.info is not after.info:
            if before is not None:
                self._unindex(before)
            if after is not None:
                self._index(after)
        else:  # an update: only the index keys it enters or leaves change (items hold no
            # entry, so a kept key needs nothing)
            old_value, new_value, pk = before.value, after.value, after.pk
            for idx, extract, ki, fields in self._plans[after.info]:
                try:
                    if fields is not None and fields(old_value) == fields(new_value):
                        continue
                    old = extract(old_value)
                    new = extract(new_value)
                except Exception:  # a broken entry, a value the index cannot order
                    old, new = index_keys(idx, before), index_keys(idx, after)
                if old == new:
                    continue
                try:
                    for k in old:
                        if k not in new:
                            ki.remove(k, pk)
                    for k in new:
                        if k not in old:
                            ki.add(k, pk)
                except (KeyError, ValueError):
                    self._repair(idx, ki, pk, new)
        if after is None:
            del table[pk]
        else:
            table[pk] = after
        return Change(key, before, after) if keep else None

    def _index(self, entry: Entry) -> None:
        pk = entry.pk
        for idx, extract, ki, _ in self._plans[entry.info]:
            keys = _keys(idx, extract, entry)
            try:
                for k in keys:
                    ki.add(k, pk)
            except ValueError:
                self._repair(idx, ki, pk, keys)

    def _unindex(self, entry: Entry) -> None:
        pk = entry.pk
        for idx, extract, ki, _ in self._plans[entry.info]:
            try:
                for k in _keys(idx, extract, entry):
                    ki.remove(k, pk)
            except KeyError:
                self._repair(idx, ki, pk, ())

    def _drop_stale(self, index: Index[Any], ki: KeyIndex, table: dict[Any, Entry]) -> None:
        """Drop the items of objects that are gone: left by an index function or ``where=``
        predicate that is not a pure function of the object (an object deleted when it no
        longer gave the keys it was indexed under). Logged and counted (``index_repairs``).
        Caller holds the lock. O(n) for n items of the index."""
        stale = [(k, pk) for k, pk in ki.scan(None, None) if pk not in table]
        self.index_repairs += len(stale)
        log.warning(
            "%s: dropped %d items of deleted objects (index functions must be pure)",
            index.qualname, len(stale),
        )
        for k, pk in stale:
            ki.remove(k, pk)

    def _repair(self, index: Index[Any], ki: KeyIndex, pk: Any, keys: Sequence[Any]) -> None:
        """The index's function or ``where=`` predicate gave an object other keys than it is
        indexed under (it is not a pure function of the object: it reads the clock, say):
        index ``pk`` under ``keys`` alone, whatever it held before. Logged and counted
        (``index_repairs``); the apply goes on. O(n) for n items of the index."""
        self.index_repairs += 1
        log.warning(
            "%s: the index function or where= predicate gave %r other keys than it is "
            "indexed under; re-indexed it (index functions must be pure)", index.qualname, pk,
        )
        for k, p in ki.scan(None, None):
            if p == pk:
                ki.remove(k, pk)
        for k in keys:
            ki.add(k, pk)

    def _trim(self) -> None:
        low = min(self._pins) if self._pins else self.revision
        while self._log and self._log[0].revision <= low:
            batch = self._log.popleft()
            for change in batch.changes:
                kept = tuple(h for h in self._history.get(change.key, ()) if h[0] > low)
                if kept:
                    self._history[change.key] = kept
                else:
                    self._history.pop(change.key, None)

    def _changes_since(
        self, index: Index[Any], revision: int
    ) -> tuple[AbstractSet[tuple[Any, Any]], Sequence[IndexItem]]:
        """Pairs to hide and items to show so that the latest index reads as of ``revision``:
        every current pair of a key changed since then is hidden and every item it had then is
        shown again (with the entry of then, also where its index key did not move). Caller
        holds the lock. O(changes since ``revision``)."""
        if revision >= self.revision:
            return _NO_CHANGES
        first_before: dict[str, Entry | None] = {}
        for batch in reversed(self._log):
            if batch.revision <= revision:
                break
            for change in batch.changes:
                first_before[change.key] = change.before
        hidden: set[tuple[Any, Any]] = set()
        shown: list[IndexItem] = []
        for key, then in first_before.items():
            now = self._latest(key)
            if now is not None:
                hidden.update((k, now.pk) for k in index_keys(index, now))
            if then is not None:
                shown.extend((k, then.pk, then) for k in index_keys(index, then))
        return hidden, shown


def _field_getter(index: Index[Any]) -> Callable[[Any], Any] | None:
    """For a typed field index (bare keys, no callable, no ``where``): a getter of its fields.
    The codec guarantees the annotated types there, so equal field values give equal keys and
    an update that keeps them needs no key extraction. ``None`` for any other index (with
    ``Any`` fields, ``True == 1`` although they are different keys)."""
    if not index.bare or index.computed or index.where is not None:
        return None
    return operator.attrgetter(*index.fields)


def _fetch(
    ki: KeyIndex, table: dict[Any, Entry], lo: Any, hi: Any, reverse: bool, limit: int | None
) -> list[IndexItem]:
    """The latest items in ``[lo, hi)`` with their entries; ``KeyError`` for an item whose
    object is gone. O(log k + m) (one dict probe + m for one key)."""
    key = equality_key(lo, hi)
    if key is not None:  # one key: one dict probe
        return [(key, pk, table[pk]) for pk in ki.get(key, reverse, limit)]
    keys, pks = ki.columns(lo, hi, reverse, limit)
    return list(zip(keys, pks, map(table.__getitem__, pks), strict=True))


def _keys(index: Index[Any], extract: Callable[[Any], tuple[Any, ...]], entry: Entry) -> Any:
    """:func:`index_keys` for an entry of the index's own model, by its fast extractor."""
    try:
        return extract(entry.value)
    except Exception:  # a broken entry, a value the index cannot order: the careful way
        return index_keys(index, entry)


_VALUE = operator.attrgetter("value")
_NO_CHANGES: tuple[AbstractSet[tuple[Any, Any]], Sequence[IndexItem]] = (frozenset(), ())


def _order(item: IndexItem) -> tuple[Any, Any]:
    return item[0], item[1]


def _within(item: tuple[Any, ...], lo: Any, hi: Any) -> bool:
    pair = (item[0], item[1])
    return (lo is None or pair >= lo) and (hi is None or pair < hi)
