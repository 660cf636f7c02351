"""An in-process :class:`~txindex.backend.base.Backend` with etcd's semantics.

The store keeps every key's history (until :meth:`MemoryBackend.compact`) and a log of events
per revision, so ranges at old revisions and watches from the past behave as on etcd:

* revisions start at 1; a Txn that changes something bumps the revision by one and all its
  changes share it; a Txn that changes nothing (no writes, or only deletes of absent keys)
  does not bump it;
* per key ``create_revision``, ``mod_revision`` and ``version`` (reset by delete + recreate);
* compares as etcd's ``applyCompare``: a missing key (or an empty compare range) compares as an
  all-zero KeyValue, except that a ``value`` compare on it fails; a range compare must hold for
  every key in the range;
* more than ``max_txn_ops`` ops in compares, success or failure -> ``TxTooLarge``; a key put twice
  in one op list, or put and deleted in it -> :class:`RequestRejected` (etcd: "duplicate key
  given in txn request");
* reads or watches below the compacted revision -> ``Compacted(compact_revision)``.

A :class:`MemoryBackend` is a handle on a store: ``MemoryBackend()`` owns a private store,
``MemoryBackend.named(name)`` shares one store per name within the process. Closing a handle
cancels its watches and makes the handle unusable; the store lives on for other handles.
Every operation holds the store's lock: thread-safe, linearizable.
"""

from __future__ import annotations

import bisect
import queue
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import ClassVar

from txindex.backend.base import (
    Compare,
    Delete,
    Event,
    KeyValue,
    Op,
    Put,
    RangePage,
    TxnResult,
    WatchResponse,
)
from txindex.errors import Closed, Compacted, RequestRejected, TxTooLarge, WatchBroken

__all__ = ["DEFAULT_MAX_TXN_OPS", "MemoryBackend", "MemoryWatchStream", "RequestRejected"]

DEFAULT_MAX_TXN_OPS = 128  # etcd's --max-txn-ops default


@dataclass(slots=True)
class _Version:
    """One state of a key at ``mod_revision``; ``version == 0`` marks a delete (tombstone)."""

    mod_revision: int
    create_revision: int
    version: int
    value: bytes


@dataclass(slots=True)
class _History:
    versions: list[_Version] = field(default_factory=list)
    revs: list[int] = field(default_factory=list)  # mod_revision of each version, for bisect

    def at(self, revision: int) -> _Version | None:
        """The live version at ``revision``, or None (absent or deleted). O(log versions)."""
        i = bisect.bisect_right(self.revs, revision)
        if i == 0:
            return None
        v = self.versions[i - 1]
        return v if v.version > 0 else None

    def append(self, v: _Version) -> None:
        self.versions.append(v)
        self.revs.append(v.mod_revision)


def _in_range(key: bytes, start: bytes, end: bytes | None) -> bool:
    """Key in etcd's range: ``end`` None/empty = just ``start``; ``b"\\0"`` = all keys >= start."""
    if not end:
        return key == start
    if end == b"\0":
        return key >= start
    return start <= key < end


class _Store:
    """One shared keyspace. All fields are guarded by ``lock``."""

    def __init__(self, max_txn_ops: int) -> None:
        self.lock = threading.Lock()
        self.max_txn_ops = max_txn_ops
        self.revision = 1
        self.compacted = 0  # compact revision; reads below it are gone
        self.keys: list[bytes] = []  # sorted, every key with a history
        self.history: dict[bytes, _History] = {}
        self.log: list[tuple[int, tuple[Event, ...]]] = []  # (revision, events), ascending
        self.log_revs: list[int] = []
        self.watchers: set[MemoryWatchStream] = set()

    # -- reads -----------------------------------------------------------------------------

    def _keys_in(self, start: bytes, end: bytes | None) -> list[bytes]:
        if not end:
            return [start] if start in self.history else []
        lo = bisect.bisect_left(self.keys, start)
        hi = len(self.keys) if end == b"\0" else bisect.bisect_left(self.keys, end)
        return self.keys[lo:hi]

    def _live(
        self, start: bytes, end: bytes | None, revision: int, stop_after: int = 0
    ) -> list[KeyValue]:
        """Live keys in the range at ``revision``; with ``stop_after``, at most that many
        (so a page costs O(page), not O(rest of the range))."""
        out = []
        for k in self._keys_in(start, end):
            v = self.history[k].at(revision)
            if v is not None:
                out.append(KeyValue(k, v.value, v.mod_revision, v.create_revision, v.version))
                if len(out) == stop_after:
                    break
        return out

    def check_revision(self, revision: int) -> int:
        if revision <= 0:
            return self.revision
        if revision < self.compacted:
            raise Compacted(self.compacted)
        if revision > self.revision:
            raise RequestRejected("mvcc: required revision is a future revision")
        return revision

    # -- txn -------------------------------------------------------------------------------

    def compare(self, c: Compare) -> bool:
        kvs = self._live(c.key, c.range_end, self.revision)
        if not kvs:
            if c.target == "value":
                return False
            kvs = [KeyValue(c.key, b"", 0, 0, 0)]
        return all(_compare_kv(c, kv) for kv in kvs)

    def apply(self, ops: Sequence[Op]) -> tuple[Event, ...]:
        """Apply ``ops`` at ``revision + 1``; returns the events (empty if nothing changed)."""
        rev = self.revision + 1
        events: list[Event] = []
        for op in ops:
            if isinstance(op, Put):
                h = self.history.get(op.key)
                if h is None:
                    h = self.history[op.key] = _History()
                    bisect.insort(self.keys, op.key)
                cur = h.at(rev)
                if cur is None:
                    h.append(_Version(rev, rev, 1, op.value))
                else:
                    h.append(_Version(rev, cur.create_revision, cur.version + 1, op.value))
                events.append(Event(op.key, op.value, rev, deleted=False))
            else:
                for k in self._keys_in(op.key, op.range_end):
                    h = self.history[k]
                    if h.at(rev) is not None:
                        h.append(_Version(rev, 0, 0, b""))
                        events.append(Event(k, b"", rev, deleted=True))
        return tuple(events)

    def compact(self, revision: int) -> None:
        """Drop history below ``revision``, keeping each key's state at ``revision``. O(keys)."""
        if revision <= self.compacted:
            raise Compacted(self.compacted)
        if revision > self.revision:
            raise RequestRejected("mvcc: required revision is a future revision")
        self.compacted = revision
        for k in list(self.keys):
            h = self.history[k]
            i = bisect.bisect_right(h.revs, revision)
            keep = h.versions[i - 1 :] if i else h.versions
            if keep and keep[0].version == 0:  # tombstone at or below the compact revision
                keep = keep[1:]
            if not keep:
                del self.history[k]
                self.keys.pop(bisect.bisect_left(self.keys, k))
            elif len(keep) != len(h.versions):
                h.versions = list(keep)
                h.revs = [v.mod_revision for v in keep]
        cut = bisect.bisect_left(self.log_revs, revision)
        del self.log[:cut]
        del self.log_revs[:cut]
        if self.log_revs and self.log_revs[0] == revision:
            # etcd drops a tombstone at the compact revision: a watch from there misses it
            kept = tuple(e for e in self.log[0][1] if not e.deleted)
            if kept:
                self.log[0] = (revision, kept)
            else:
                del self.log[0]
                del self.log_revs[0]


def _compare_kv(c: Compare, kv: KeyValue) -> bool:
    if c.target == "value":
        if not isinstance(c.value, bytes):
            raise RequestRejected(f"value compare needs bytes, got {c.value!r}")
        left: int | bytes = kv.value
    else:
        if not isinstance(c.value, int) or isinstance(c.value, bool):
            raise RequestRejected(f"{c.target} compare needs an int, got {c.value!r}")
        left = {"mod": kv.mod_revision, "create": kv.create_revision, "version": kv.version}[
            c.target
        ]
    right = c.value
    if c.op == "=":
        return left == right
    if c.op == "!=":
        return left != right
    if c.op == "<":
        return left < right  # type: ignore[operator]
    if c.op == ">":
        return left > right  # type: ignore[operator]
    raise RequestRejected(f"unknown compare op {c.op!r}")


def _check_ops(ops: Sequence[Op]) -> None:
    """etcd's ``checkIntervals``: no key put twice, no put inside a delete range."""
    puts: set[bytes] = set()
    for op in ops:
        if not op.key:
            raise RequestRejected("etcdserver: key is not provided")
        if isinstance(op, Put):
            if op.key in puts:
                raise RequestRejected("etcdserver: duplicate key given in txn request")
            puts.add(op.key)
    for op in ops:
        if isinstance(op, Delete) and any(_in_range(k, op.key, op.range_end) for k in puts):
            raise RequestRejected("etcdserver: duplicate key given in txn request")


class MemoryWatchStream:
    """A watch on a :class:`_Store`: history replay, then live events, one response per
    revision. Events are queued at commit time, so the stream never lags the store."""

    def __init__(self, store: _Store, key: bytes, range_end: bytes, owner: MemoryBackend) -> None:
        self._store = store
        self._key = key
        self._end = range_end
        self._owner = owner
        self._queue: queue.SimpleQueue[WatchResponse | Exception] = queue.SimpleQueue()
        self._dead = False
        self._closed = False

    def _offer(self, revision: int, events: Sequence[Event]) -> None:
        """Queue the events of one revision that fall in range (store lock held)."""
        mine = tuple(e for e in events if _in_range(e.key, self._key, self._end))
        if mine:
            self._queue.put(WatchResponse(mine, revision))

    def _fail(self, exc: Exception) -> None:
        self._queue.put(exc)

    def get(self, timeout: float | None) -> WatchResponse | None:
        """Next response or None after ``timeout``; ``revision`` of an event batch is its
        events' revision. Raises ``Compacted`` / ``WatchBroken`` (then the stream is dead)."""
        if self._dead:
            raise WatchBroken("watch stream is closed")
        try:
            item = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if isinstance(item, Exception):
            self._dead = True
            raise item
        return item

    def request_progress(self) -> None:
        """Queue a progress notification at the store's current revision."""
        with self._store.lock:
            if not self._closed:
                self._queue.put(WatchResponse((), self._store.revision, progress=True))

    def close(self) -> None:
        """Cancel the watch; a pending :meth:`get` raises ``WatchBroken``. Idempotent."""
        with self._store.lock:
            if self._closed:
                return
            self._closed = True
            self._store.watchers.discard(self)
        self._fail(WatchBroken("watch canceled by close()"))


class MemoryBackend:
    """A handle on an in-process etcd-like store (see the module docstring)."""

    _named: ClassVar[dict[str, _Store]] = {}
    _named_lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(
        self, *, max_txn_ops: int = DEFAULT_MAX_TXN_OPS, _store: _Store | None = None
    ) -> None:
        self._store = _store if _store is not None else _Store(max_txn_ops)
        self._closed = False
        self._watches: set[MemoryWatchStream] = set()

    @classmethod
    def named(cls, name: str, *, max_txn_ops: int = DEFAULT_MAX_TXN_OPS) -> MemoryBackend:
        """A new handle on the process-wide store called ``name`` (created on first use with
        ``max_txn_ops``; later handles share it as is). The store is never destroyed."""
        with cls._named_lock:
            store = cls._named.get(name)
            if store is None:
                store = cls._named[name] = _Store(max_txn_ops)
        return cls(_store=store)

    def _check_open(self) -> None:
        if self._closed:
            raise Closed("backend is closed")

    def range(
        self, key: bytes, range_end: bytes, *, revision: int = 0, limit: int = 0
    ) -> RangePage:
        """Keys in ``[key, range_end)`` at ``revision``. O(log n + keys in range)."""
        self._check_open()
        s = self._store
        with s.lock:
            rev = s.check_revision(revision)
            kvs = s._live(key, range_end, rev, limit + 1 if limit > 0 else 0)
            header = s.revision
        more = 0 < limit < len(kvs)
        if more:
            kvs = kvs[:limit]
        return RangePage(tuple(kvs), more, header)

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Atomic Txn. Raises ``TxTooLarge`` or :class:`RequestRejected` (nothing applied)."""
        self._check_open()
        s = self._store
        if max(len(compares), len(success), len(failure)) > s.max_txn_ops:
            raise TxTooLarge(
                f"etcdserver: too many operations in txn request (max {s.max_txn_ops})"
            )
        _check_ops(success)
        _check_ops(failure)
        with s.lock:
            ok = all(s.compare(c) for c in compares)
            events = s.apply(success if ok else failure)
            if events:
                s.revision += 1
                s.log.append((s.revision, events))
                s.log_revs.append(s.revision)
                for w in s.watchers:
                    w._offer(s.revision, events)
            return TxnResult(ok, s.revision)

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> MemoryWatchStream:
        """Replays history from ``start_revision`` then streams live events. A compacted
        ``start_revision`` is reported by the first ``get`` (as etcd does)."""
        self._check_open()
        if start_revision <= 0:
            raise ValueError("start_revision must be > 0")
        s = self._store
        w = MemoryWatchStream(s, key, range_end, self)
        with s.lock:
            if start_revision < s.compacted:
                w._fail(Compacted(s.compacted))
                w._closed = True
                return w
            for rev, events in s.log[bisect.bisect_left(s.log_revs, start_revision) :]:
                w._offer(rev, events)
            s.watchers.add(w)
            self._watches.add(w)
        return w

    def current_revision(self) -> int:
        self._check_open()
        with self._store.lock:
            return self._store.revision

    def compact(self, revision: int) -> None:
        """Compact history below ``revision``; raises ``Compacted`` if already compacted there.
        Watches already streaming are unaffected (their events were queued)."""
        self._check_open()
        with self._store.lock:
            self._store.compact(revision)

    def close(self) -> None:
        """Cancel this handle's watches; the store itself stays for other handles."""
        if self._closed:
            return
        self._closed = True
        for w in list(self._watches):
            w.close()
        self._watches.clear()
