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
* ``_indexes``: one ``SortedList`` of ``(index_key, primary_key, entry)`` per declared index.

Point reads are lock-free: the applier writes history before data, so a reader that finds a
newer ``mod_revision`` than its snapshot always finds the older entry in the history.
Index queries and all writes take one lock, so applying a revision batch is atomic for them.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import threading
import time
from bisect import bisect_left
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

from sortedcontainers import SortedList

from .errors import DecodeError, UnorderableValue
from .fences import equality_key
from .index import Index
from .model import ModelInfo

log = logging.getLogger("txindex.store")

IndexItem = tuple[Any, Any, "Entry"]  # (encoded index key, primary key, entry)
UniqueMap = dict[Any, "IndexItem | list[IndexItem]"]  # key -> its item (a list on a clash)
# what applying a change to one model touches: per index, its key extractor, items, unique map
Plan = tuple[tuple[Index[Any], Callable[[Any], tuple[Any, ...]], SortedList, "UniqueMap | None"],
             ...]


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
        self._tables: dict[ModelInfo, dict[Any, Entry]] = {info: {} for info in self.models}
        self._routes = self._route_table()
        self._history: dict[str, tuple[tuple[int, Entry | None], ...]] = {}
        self._log: deque[Batch] = deque()
        self._pins: dict[int, int] = {}
        self._indexes: dict[Index[Any], SortedList] = {
            idx: SortedList() for info in self.models for idx in info.indexes
        }
        # unique indexes also map each key to its items (normally one): a point lookup is then
        # one dict probe instead of two bisects (external writers may break uniqueness)
        self._unique: dict[Index[Any], UniqueMap] = {
            idx: {} for idx in self._indexes if idx.unique
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
        """Block until the applied revision reaches ``revision``; False on timeout."""
        with self._lock:
            return self._wait(revision, timeout)

    def _wait(self, revision: int, timeout: float | None) -> bool:
        """Wait (the caller holds the lock; it is released meanwhile) until the applied
        revision reaches ``revision``; False on timeout. Woken once, by the apply that gets
        there (:meth:`_wake`). O(log w) for w waiting threads."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.revision < revision:
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

        O(log n + m) for m items, plus O(c) for c changes applied after ``revision``.
        """
        with self._lock:
            hidden, shown = self._changes_since(index, revision)
            if not hidden and not shown and index in self._unique:
                key = equality_key(lo, hi)
                if key is not None:  # a point lookup on a unique index: one dict probe
                    items = _items(self._unique[index].get(key))
                    if reverse:
                        items.reverse()
                    return items if limit is None else items[:limit]
            need = None if limit is None else limit + len(hidden)
            items = scan(self._indexes[index], lo, hi, reverse, need)
            if not hidden and not shown:
                return items
            items = [it for it in items if (it[0], it[1]) not in hidden]
            items.extend(it for it in shown if _within(it, lo, hi))
            items.sort(key=_order, reverse=reverse)
            return items if limit is None else items[:limit]

    def count(self, index: Index[Any], lo: Any, hi: Any, revision: int) -> int:
        """Number of items in ``[lo, hi)`` as of ``revision``. O(log n) plus O(c) as above."""
        with self._lock:
            hidden, shown = self._changes_since(index, revision)
            sl = self._indexes[index]
            n = _bisect(sl, hi, len(sl)) - _bisect(sl, lo, 0)
            n -= sum(1 for h in hidden if _within(h, lo, hi))
            return n + sum(1 for it in shown if _within(it, lo, hi))

    def changes(self, after: int, upto: int) -> Iterator[Change]:
        """Changes applied in revisions ``(after, upto]``; ``after`` must be pinned."""
        with self._lock:
            batches = [b for b in reversed(self._log) if b.revision > after]
        for batch in reversed(batches):
            if batch.revision > upto:
                break
            yield from batch.changes

    def unique_items(self, index: Index[Any]) -> list[IndexItem]:
        """Every item of a unique index's point-lookup map (for checks and tests). O(n)."""
        with self._lock:
            return [it for found in self._unique[index].values() for it in _items(found)]

    def index_items(self, index: Index[Any]) -> list[IndexItem]:
        """Every committed item of ``index`` (for checks and tests). O(n)."""
        with self._lock:
            return list(self._indexes[index])

    # ---- writes (watcher only) -----------------------------------------------------------

    def load(self, revision: int, entries: Iterable[Entry]) -> None:
        """Replace the whole state with ``entries`` at ``revision``; indexes are built in bulk
        (one sort each). O(n log n). Only for the first load: resyncs use :meth:`apply`."""
        tables: dict[ModelInfo, dict[Any, Entry]] = {info: {} for info in self.models}
        for e in entries:
            tables[e.info][e.pk] = e
        built: dict[Index[Any], list[IndexItem]] = {idx: [] for idx in self._indexes}
        for entry in (e for table in tables.values() for e in table.values()):
            pk, value = entry.pk, entry.value
            for idx in entry.info.indexes:
                try:
                    keys = idx.extract(value)
                except Exception:  # a broken entry, a value the index cannot order
                    keys = index_keys(idx, entry)
                items = built[idx]
                for k in keys:
                    items.append((k, pk, entry))
        indexes = {idx: SortedList(items) for idx, items in built.items()}
        unique: dict[Index[Any], UniqueMap] = {idx: {} for idx in self._unique}
        for idx, by_key in unique.items():
            for item in indexes[idx]:
                _link(by_key, item)
        with self._lock:
            self._tables, self._indexes, self._unique = tables, indexes, unique
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
                (idx, idx.extract, self._indexes[idx], self._unique.get(idx))
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
        else:
            old_value, new_value, pk = before.value, after.value, after.pk
            for idx, extract, sl, by_key in self._plans[after.info]:
                try:
                    old = extract(old_value)
                    new = extract(new_value)
                except Exception:  # a broken entry, a value the index cannot order
                    old, new = index_keys(idx, before), index_keys(idx, after)
                for k in new:
                    item = (k, pk, after)
                    if k in old:  # kept key, new object: swap the item in place
                        _swap(sl, item)
                        if by_key is not None:
                            _relink(by_key, before, item)
                        continue
                    sl.add(item)
                    if by_key is not None:
                        _link(by_key, item)
                for k in old:
                    if k not in new:
                        sl.remove((k, pk, before))
                        if by_key is not None:
                            _unlink(by_key, (k, pk, before))
        if after is None:
            del table[pk]
        else:
            table[pk] = after
        return Change(key, before, after) if keep else None

    def _index(self, entry: Entry) -> None:
        pk, value = entry.pk, entry.value
        for idx, extract, sl, by_key in self._plans[entry.info]:
            try:
                keys = extract(value)
            except Exception:  # a broken entry, a value the index cannot order
                keys = index_keys(idx, entry)
            for k in keys:
                item = (k, pk, entry)
                sl.add(item)
                if by_key is not None:
                    _link(by_key, item)

    def _unindex(self, entry: Entry) -> None:
        pk = entry.pk
        for idx, extract, sl, by_key in self._plans[entry.info]:
            for k in _keys(idx, extract, entry):
                sl.remove((k, pk, entry))
                if by_key is not None:
                    _unlink(by_key, (k, pk, entry))

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
    ) -> tuple[set[tuple[Any, Any]], list[IndexItem]]:
        """Pairs to hide and items to show so that the latest index reads as of ``revision``:
        every current pair of a key changed since then is hidden and every item it had then is
        shown again (with the entry of then, also where its index key did not move). Caller
        holds the lock. O(changes since ``revision``)."""
        if revision >= self.revision:
            return set(), []
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


def _keys(index: Index[Any], extract: Callable[[Any], tuple[Any, ...]], entry: Entry) -> Any:
    """:func:`index_keys` for an entry of the index's own model, by its fast extractor."""
    try:
        return extract(entry.value)
    except Exception:  # a broken entry, a value the index cannot order: the careful way
        return index_keys(index, entry)


def _swap(sl: SortedList, item: IndexItem) -> None:
    """Replace the item with the same (key, pk) as ``item`` by ``item``, in place: the order
    does not change, so neither do SortedList's positional index nor its sublist sizes. Uses
    its ``_lists``/``_maxes`` (see :func:`scan`). O(log n)."""
    pair = (item[0], item[1])
    lists, maxes = sl._lists, sl._maxes
    i = bisect_left(maxes, pair)
    sub = lists[i]
    j = bisect_left(sub, pair)
    if (sub[j][0], sub[j][1]) != pair:
        raise KeyError(pair)
    sub[j] = item
    if j == len(sub) - 1:
        maxes[i] = item


def _items(found: IndexItem | list[IndexItem] | None) -> list[IndexItem]:
    if found is None:
        return []
    return list(found) if type(found) is list else [found]  # type: ignore[list-item]


def _link(by_key: UniqueMap, item: IndexItem) -> None:
    """Add ``item`` to a unique map: the item itself, a sorted list only on a clash."""
    current = by_key.get(item[0])
    by_key[item[0]] = item if current is None else sorted([*_items(current), item], key=_order)


def _relink(by_key: UniqueMap, before: Entry, item: IndexItem) -> None:
    """Replace ``before``'s item under ``item``'s key by ``item`` (same key, same pk)."""
    current = by_key.get(item[0])
    if type(current) is tuple and current[2] is before:
        by_key[item[0]] = item
    else:
        _unlink(by_key, (item[0], item[1], before))
        _link(by_key, item)


def _unlink(by_key: UniqueMap, item: IndexItem) -> None:
    rest = [it for it in _items(by_key[item[0]]) if it[2] is not item[2]]
    if not rest:
        del by_key[item[0]]
    else:
        by_key[item[0]] = rest[0] if len(rest) == 1 else rest


def scan(sl: SortedList, lo: Any, hi: Any, reverse: bool, limit: int | None) -> list[Any]:
    """Items of ``sl`` in ``[lo, hi)`` (``None`` = unbounded), in order or reversed, at most
    ``limit``. O(log n + m), copying with C-level slices.

    Uses SortedList's sublists directly (``_maxes``/``_lists``, stable since sortedcontainers
    2.0): positional ``bisect_left``/``islice`` also walk its index tree, which costs more
    than the whole lookup of a point query.
    """
    lists, maxes = sl._lists, sl._maxes
    if not maxes or limit == 0:
        return []
    i, j = (0, 0) if lo is None else _locate(lists, maxes, lo)
    i2, j2 = (len(lists) - 1, len(lists[-1])) if hi is None else _locate(lists, maxes, hi)
    if (i, j) >= (i2, j2):
        return []
    if i == i2:
        out = lists[i][j:j2]
    elif not reverse and limit is not None and len(lists[i]) - j >= limit:
        return lists[i][j:j + limit]  # type: ignore[no-any-return]
    else:
        out = lists[i][j:]
        for sub in itertools.islice(lists, i + 1, i2):
            out.extend(sub)
            if not reverse and limit is not None and len(out) >= limit:
                return out[:limit]  # type: ignore[no-any-return]
        out.extend(lists[i2][:j2])
    if reverse:
        out.reverse()
    return out if limit is None else out[:limit]  # type: ignore[no-any-return]


def _locate(lists: list[list[Any]], maxes: list[Any], bound: Any) -> tuple[int, int]:
    """(sublist, offset) of the first item >= ``bound``; past the end is (last, len(last))."""
    i = bisect_left(maxes, bound)
    if i == len(maxes):
        return i - 1, len(lists[i - 1])
    return i, bisect_left(lists[i], bound)


def _bisect(sl: SortedList, bound: Any, default: int) -> int:
    return default if bound is None else sl.bisect_left(bound)


def _order(item: IndexItem) -> tuple[Any, Any]:
    return item[0], item[1]


def _within(item: tuple[Any, ...], lo: Any, hi: Any) -> bool:
    pair = (item[0], item[1])
    return (lo is None or pair >= lo) and (hi is None or pair < hi)
