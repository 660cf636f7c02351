"""The watcher: the only writer of the store.

It loads the database prefix in pages at one pinned revision, then watches from that
revision + 1. A stream that fails, or that stays silent past a liveness check, is replaced
(backoff with jitter) and resumed at the last applied revision + 1. The liveness check is a
progress request after ``progress_interval`` of silence (answered within another interval),
or, for a backend with ``follow`` (etcd:
:class:`~txindex.backend.etcd_watch.EtcdFollowStream`, read directly by this thread with no
hand-off), the stream's own watchdog probing the endpoint.
A compacted resume point triggers a resync: a fresh paged load diffed against the store and
applied as one atomic batch, indexes included. Events at or below the applied revision are
ignored (a commit of this process may have been applied by its committing thread); while
this process commits, the etcd watch is read lazily (a pause of up to ``batch_seconds`` after
each response, see :meth:`Watcher._follow`), ended by a thread that waits for a revision
only the watch brings (a kept commit, a re-validation, ``wait_for``). Values
that do not decode are stored as :class:`~txindex.errors.DecodeError` (logged and counted) so
that ``get`` raises for that key; nothing here stops the thread but ``stop``.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import _seeded
from .backend.base import Backend, Event, KeyValue, WatchStream, prefix_end, successor
from .errors import Compacted, DecodeError
from .model import ModelInfo
from .store import Entry, Store

if TYPE_CHECKING:
    from .metrics import Observer

log = logging.getLogger("txindex.watcher")

MAX_PENDING = 64  # own commits kept for a local apply while the store is further behind
BATCH_SECONDS = 0.002  # while this process commits, the watch is read at most this often
EAGER_SECONDS = 0.1  # after a nudge (someone waits for the store) the watch is read at once


@dataclass
class WatchStats:
    """Counters an operator wants to see."""

    loaded_keys: int = 0
    events: int = 0
    decode_errors: int = 0
    unclaimed_keys: int = 0
    reconnects: int = 0
    resyncs: int = 0
    local_applies: int = 0  # own commits applied by the committing thread (Watcher.apply_local)
    last_error: str = ""
    errors: list[str] = field(default_factory=list)


class Decoder:
    """Turns etcd keys and values under the database prefix into store entries."""

    def __init__(
        self,
        prefix: str,
        models: Sequence[ModelInfo],
        stats: WatchStats,
        observer: Observer | None = None,
    ) -> None:
        self._cut = len(prefix)
        self._models = sorted(models, key=lambda m: len(m.prefix), reverse=True)
        self._stats = stats
        self._observer = observer  # hook: txindex.metrics (None without metrics=)

    def entry(self, key: bytes, value: bytes, mod_revision: int) -> tuple[str, Entry] | None:
        """The store key and entry for one KV, or ``None`` if no model claims the key."""
        try:
            skey = key.decode()[self._cut:]
        except UnicodeDecodeError:
            self._stats.unclaimed_keys += 1
            return None
        for info in self._models:
            if skey.startswith(info.prefix):
                return skey, self._decode(info, skey, value, mod_revision)
        self._stats.unclaimed_keys += not skey.startswith(("__txindex__/", "\x00txindex-fences/"))
        return None

    def key(self, key: bytes) -> str | None:
        """The store key of a deleted etcd key, or ``None`` if unclaimed."""
        try:
            skey = key.decode()[self._cut:]
        except UnicodeDecodeError:
            return None
        return skey if any(skey.startswith(m.prefix) for m in self._models) else None

    def _decode(self, info: ModelInfo, skey: str, value: bytes, rev: int) -> Entry:
        suffix = skey[len(info.prefix):]
        pk: object = suffix
        try:
            if info.key_type is not str:
                pk = info.pk_from_suffix(suffix)
            elif not suffix:
                raise ValueError("empty primary key")
            obj = info.codec.decode(value, skey)
            found = getattr(obj, info.key_field)
            if found != pk:
                raise ValueError(f"field {info.key_field!r} is {found!r}, key says {pk!r}")
            # the entry shares the object's own key value (one string less per object)
            return Entry(found, obj, rev, info)
        except Exception as exc:
            err = exc if isinstance(exc, DecodeError) else DecodeError(skey, str(exc))
            self._stats.decode_errors += 1
            log.error("txindex: %s", err)
            if self._observer is not None:  # hook: txindex.metrics
                self._observer.decode_error()
            return Entry(pk, err, rev, info)


class Watcher:
    """Feeds one store from one backend; runs a daemon thread after :meth:`load`."""

    def __init__(
        self,
        backend: Backend,
        store: Store,
        prefix: str,
        *,
        page_size: int = 2000,
        progress_interval: float = 2.0,
        observer: Observer | None = None,
        on_load_progress: Callable[[int], object] | None = None,
    ) -> None:
        self.stats = WatchStats()
        # Hooks. ``observer``: txindex.metrics (None without metrics=). ``apply_hook``:
        # txindex.notify installs it while subscriptions exist; it replaces ``store.apply``
        # (capture, apply, queue for the dispatcher), with the same ``after`` contract. Both
        # are read under ``hook_lock`` (one acquire per watch response or local apply of a
        # commit) so subscribe() starts at an exact revision and changes queue in order.
        self._observer = observer
        self._on_load_progress = on_load_progress  # called per page of the first load
        self.apply_hook: Callable[
            [Sequence[tuple[int, list[tuple[str, Entry | None]]]], bool, int | None], bool
        ] | None = None
        self.hook_lock = threading.Lock()
        # this process's commits known to be the whole of their revision, waiting for the
        # store to reach the revision before (see apply_local); guarded by hook_lock
        self._pending: dict[int, list[tuple[str, Entry | None]]] = {}
        # Txns this process has sent (commit_begins) and has in flight (until commit_ends):
        # the watch is read lazily while the first grows (see _follow)
        self._begun = 0
        self._inflight = 0
        self._count_lock = threading.Lock()
        self.batch_seconds = BATCH_SECONDS
        self._wake = threading.Event()  # ends a lazy pause: a thread waits for the store
        self._streamed = False  # the current stream delivered a response (resets the backoff)
        self._eager_until = 0.0  # no lazy pause before this time.monotonic() (see nudge)
        self._backend = backend
        self._store = store
        # the empty prefix is every key: etcd refuses the empty key, so from "\0" to the end
        self._start = prefix.encode() or b"\x00"
        self._end = prefix_end(self._start) if prefix else b"\x00"
        self._decoder = Decoder(prefix, store.models, self.stats, observer)
        self._page_size = page_size
        self._progress_interval = progress_interval
        self._stopping = threading.Event()
        self._stream: WatchStream | None = None
        self._thread = threading.Thread(target=self._run, name="txindex-watcher", daemon=True)

    # ---- lifecycle -----------------------------------------------------------------------

    def load(self) -> None:
        """Initial paged load (blocking), then start following the watch."""
        started = time.monotonic()
        with _gc_paused(True):
            revision, entries = self._read_all(self._on_load_progress)
            self._store.load(revision, entries)
        self.stats.loaded_keys = len(entries)
        log.info(
            "txindex: loaded %d keys at revision %d in %.3fs (%d decode errors)",
            len(entries), revision, time.monotonic() - started, self.stats.decode_errors,
        )
        self._thread.start()

    def stop(self) -> None:
        self._stopping.set()
        self._wake.set()
        stream = self._stream
        if stream is not None:
            stream.close()
        if self._thread.is_alive():
            self._thread.join(timeout=10)

    def nudge(self) -> None:
        """Ask for a progress notification now (a transaction waits for a revision)."""
        self._hasten()
        stream = self._stream
        if stream is not None:
            try:
                stream.request_progress()
            except Exception as exc:  # the loop notices a dead stream itself
                log.debug("progress request failed: %s", exc)

    def _hasten(self) -> None:
        """Read the watch at once, and for :data:`EAGER_SECONDS` without lazy pauses: a
        thread waits for revisions that only the watch brings, maybe several responses."""
        self._eager_until = time.monotonic() + EAGER_SECONDS
        self._wake.set()

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()

    # ---- the loop ------------------------------------------------------------------------

    def _run(self) -> None:
        delay = 0.05
        while not self._stopping.is_set():
            try:
                self._follow()
                delay = 0.05
            except Compacted as exc:
                log.warning("txindex: watch compacted at %d; resyncing", exc.compact_revision)
                self._guard(self._resync)
            except Exception as exc:
                if self._stopping.is_set():
                    break
                if self._streamed:  # the stream that failed had worked: start over
                    delay, self._streamed = 0.05, False
                self.stats.reconnects += 1
                self.stats.last_error = f"{type(exc).__name__}: {exc}"
                log.warning("txindex: watch failed (%s); reconnecting in %.2fs", exc, delay)
                if self._observer is not None:  # hook: txindex.metrics
                    self._observer.reconnect()
                self._stopping.wait(delay * (0.5 + random.random()))
                delay = min(delay * 2, 2.0)

    def _guard(self, fn: object) -> None:
        try:
            fn()  # type: ignore[operator]
        except Exception as exc:
            self.stats.last_error = f"{type(exc).__name__}: {exc}"
            log.warning("txindex: resync failed (%s); retrying", exc)
            self._stopping.wait(0.2)

    def _follow(self) -> None:
        start = self._store.revision + 1
        if "watch_from_zero" in _seeded.active and self.stats.reconnects:
            start = self._backend.current_revision() + 1  # seeded bug: resume "from now"
        follow = getattr(self._backend, "follow", None)
        timeout: float | None
        if follow is not None:  # a stream read in this thread, with its own liveness check
            stream = follow(self._start, self._end, start, self._progress_interval)
            timeout = None
        else:
            stream = self._backend.watch(self._start, self._end, start)
            timeout = self._progress_interval
        self._stream = stream
        waiting = False
        begun = self._begun
        try:
            while not self._stopping.is_set():
                if (
                    follow is not None
                    and begun != self._begun
                    and self.batch_seconds
                    and time.monotonic() >= self._eager_until
                    and not self._hurry()
                ):
                    # This process is committing: its own commits are applied by the
                    # committing threads (apply_local), so their events need no haste. A
                    # pause lets a few responses queue up; reading queued responses costs a
                    # fraction of waking up for each one (gRPC receive, thread wake-ups,
                    # and etcd's side of the stream), CPU the committing threads need.
                    # Ended early by anyone who waits for the store (nudge, apply_local);
                    # none while a kept commit waits for a revision only the watch brings,
                    # nor for EAGER_SECONDS after a nudge.
                    begun = self._begun
                    self._wake.wait(self.batch_seconds)
                    self._wake.clear()
                resp = stream.get(timeout)
                if resp is None:
                    if waiting:
                        raise TimeoutError("watch stream silent past a progress request")
                    stream.request_progress()
                    waiting = True
                    continue
                waiting = False
                self._streamed = True
                if resp.events:
                    self._apply(resp.events)
                elif resp.progress and self._observer is not None:  # hook: txindex.metrics
                    self._observer.progress(resp.revision)
                # A progress notification only proves the stream is alive: etcd before 3.5.8
                # may report a revision whose events are still undelivered (etcd #15220), so
                # the applied revision moves only with events (see commit.sync_key).
        finally:
            self._stream = None
            stream.close()

    def _apply(self, events: Sequence[Event]) -> None:
        with _gc_paused(len(events) >= GC_PAUSE_EVENTS):
            self._apply_events(events)

    def _apply_events(self, events: Sequence[Event]) -> None:
        applied = self._store.revision
        batches: list[tuple[int, list[tuple[str, Entry | None]]]] = []
        updates: list[tuple[str, Entry | None]] = []
        revision = 0
        for ev in events:
            rev = ev.mod_revision
            if rev <= applied:
                continue
            if rev != revision:
                revision, updates = rev, []
                batches.append((rev, updates))
            update = self._update(ev)
            if update is not None:
                updates.append(update)
        self.stats.events += len(events)
        if batches:
            self._store_apply(batches)
            if self._observer is not None:  # hook: txindex.metrics (cache lag)
                self._observer.applied(self._store.revision)

    def commit_begins(self) -> None:
        """A committing thread is about to send a Txn: its event needs no haste (see
        :meth:`_follow`). Pair with :meth:`commit_ends`. O(1)."""
        with self._count_lock:
            self._begun += 1
            self._inflight += 1

    def commit_ends(self) -> None:
        """The Txn of :meth:`commit_begins` answered or failed (and was applied locally if it
        could be). O(1)."""
        with self._count_lock:
            self._inflight -= 1

    def _hurry(self) -> bool:
        with self.hook_lock:
            return self._hurry_locked(self._inflight)

    def _hurry_locked(self, others: int) -> bool:
        """True if a kept commit (``_pending``) waits for more revisions than ``others``
        Txns of this process in flight can fill by local applies: at least one of them
        (another writer's, a failed Txn's sync key, an unknown outcome) only the watch brings.
        Caller holds ``hook_lock``. O(p) for p kept commits (at most :data:`MAX_PENDING`)."""
        pending = self._pending
        if not pending:
            return False
        applied = self._store.revision
        kept = [r for r in pending if r > applied]
        if not kept:
            return False
        missing = max(kept) - applied - len(kept)  # unapplied revisions before it, not kept
        return missing > others

    def apply_local(self, revision: int, updates: list[tuple[str, Entry | None]]) -> bool:
        """Apply this process's own commit at ``revision`` without waiting for its watch event,
        if the store has applied exactly ``revision - 1`` (then ``updates``, the commit's
        writes, are every change of the prefix at ``revision``: one Txn is one revision).
        If the store is further behind (another thread's commit, or another writer's, not yet
        applied), the commit is kept (at most :data:`MAX_PENDING`) and applied as soon as the
        store reaches ``revision - 1``, by whichever thread gets it there; the watch delivers
        it otherwise, and ignores its event once applied here. Goes through the same hook as
        the watch (notifications). Called by committing threads; True if applied now.
        O(c log n) for c written keys."""
        with self.hook_lock:
            applied = self._store.revision
            if revision <= applied:  # the watch was first
                return False
            if revision - 1 > applied:
                if len(self._pending) >= MAX_PENDING:
                    self._hasten()  # not kept: read-your-writes waits for the watch
                    return False
                self._pending[revision] = updates
                # a revision before it that only the watch brings (the caller's Txn is no
                # other Txn in flight): no lazy pause (see _follow)
                if self._hurry_locked(self._inflight - 1):
                    self._wake.set()
                return False
            if not self._apply_locked([(revision, updates)], True, applied):
                self._hasten()
                return False
            self.stats.local_applies += 1
            if self._pending:
                self._drain_locked()
        if self._observer is not None:  # hook: txindex.metrics (cache lag)
            self._observer.applied(self._store.revision)
        return True

    def _store_apply(self, batches: Sequence[tuple[int, list[tuple[str, Entry | None]]]]) -> None:
        with self.hook_lock:
            self._apply_and_drain_locked(batches, True)

    def _apply_and_drain_locked(
        self, batches: Sequence[tuple[int, list[tuple[str, Entry | None]]]], reindex: bool
    ) -> None:
        """Apply revisions the watch brought, then the kept commits that now follow them.
        Caller holds ``hook_lock``."""
        self._apply_locked(batches, reindex, None)
        if self._pending:
            self._drain_locked()

    def _apply_locked(
        self,
        batches: Sequence[tuple[int, list[tuple[str, Entry | None]]]],
        reindex: bool,
        after: int | None,
    ) -> bool:
        # hook: txindex.notify replaces store.apply while subscriptions exist (see __init__)
        hook = self.apply_hook
        if hook is None:
            return self._store.apply(batches, reindex=reindex, after=after)
        return hook(batches, reindex, after)

    def _drain_locked(self) -> None:
        """Apply kept commits of this process that now directly follow the store's revision;
        drop those it has passed. Caller holds ``hook_lock``."""
        pending = self._pending
        applied = self._store.revision
        for rev in [r for r in pending if r <= applied]:
            del pending[rev]
        while applied + 1 in pending:
            if not self._apply_locked([(applied + 1, pending.pop(applied + 1))], True, applied):
                break
            self.stats.local_applies += 1
            applied += 1

    def _update(self, ev: Event) -> tuple[str, Entry | None] | None:
        if ev.deleted:
            skey = self._decoder.key(ev.key)
            return None if skey is None else (skey, None)
        return self._decoder.entry(ev.key, ev.value, ev.mod_revision)

    # ---- loads ---------------------------------------------------------------------------

    def _read_all(
        self, progress: Callable[[int], object] | None = None
    ) -> tuple[int, list[Entry]]:
        """Every claimed key at one revision, read in pages. Restarts if compacted mid-way.
        ``progress`` is called after each page with the number of keys read so far."""
        while True:
            try:
                entries: list[Entry] = []
                pinned = [0]
                read = 0
                for kvs in self._pages(pinned):
                    for kv in kvs:
                        e = self._decoder.entry(kv.key, kv.value, kv.mod_revision)
                        if e is not None:
                            entries.append(e[1])
                    read += len(kvs)
                    if progress is not None:
                        _report(progress, read)
                return pinned[0], entries
            except Compacted:
                log.warning("txindex: load revision compacted; loading again")

    def _pages(self, pinned: list[int]) -> Iterator[Sequence[KeyValue]]:
        """Pages of the prefix; the first page's revision is pinned (in ``pinned[0]``) for
        the rest."""
        key = self._start
        while True:
            page = self._backend.range(key, self._end, revision=pinned[0], limit=self._page_size)
            pinned[0] = pinned[0] or page.revision
            yield page.kvs
            if not page.more or not page.kvs:
                return
            key = successor(page.kvs[-1].key)

    def _resync(self) -> None:
        with _gc_paused(True):
            self._resync_paused()

    def _resync_paused(self) -> None:
        revision, entries = self._read_all()
        fresh = {e.key: e for e in entries}
        reindex = "resync_without_index_rebuild" not in _seeded.active
        with self.hook_lock:  # no local apply between reading the store and applying the diff
            current = self._store.entries()
            updates: list[tuple[str, Entry | None]] = [
                (k, e) for k, e in fresh.items()
                if k not in current or current[k].mod_revision != e.mod_revision
            ]
            updates.extend((k, None) for k in current if k not in fresh)
            self._apply_and_drain_locked([(revision, updates)], reindex)  # hook: txindex.notify
        self._store.advance(revision)
        self.stats.resyncs += 1
        log.warning("txindex: resynced at revision %d (%d keys changed)", revision, len(updates))
        if self._observer is not None:  # hook: txindex.metrics
            self._observer.resync()
            self._observer.applied(revision)


GC_PAUSE_EVENTS = 64
"""Watch responses with at least this many events are applied with the cyclic GC paused."""


@contextlib.contextmanager
def _gc_paused(pause: bool) -> Iterator[None]:
    """Pause Python's cyclic garbage collector around a bulk apply or load (if it is enabled),
    then enable it again. The objects built there are long-lived; without the pause the
    collector traverses them again and again while they are being built (bulk creates ran
    ~1.5x slower). Reference counting still frees everything meanwhile; collection resumes
    at the end. O(1)."""
    if not pause or not gc.isenabled():
        yield
        return
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


def _report(progress: Callable[[int], object], read: int) -> None:
    try:
        progress(read)
    except Exception as exc:  # a progress display must never break a load
        log.warning("txindex: load progress callback failed: %s", exc)
