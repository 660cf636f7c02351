"""etcd watch streams: :class:`EtcdWatchStream` (bidi call, reader thread, progress requests)
and :class:`EtcdFollowStream` (unary-stream call read by the watcher thread itself, liveness by
a watchdog probe). :class:`~txindex.backend.etcd.EtcdBackend` opens them (``watch`` /
``follow``); both turn etcd's ``WatchResponse`` messages into
:class:`~txindex.backend.base.WatchResponse` values and a canceled watch into ``Compacted`` or
``WatchBroken``."""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from txindex.backend.base import Event, WatchResponse
from txindex.backend.etcd_errors import _code, _details, _token_refused
from txindex.errors import Compacted, WatchBroken

__all__ = ["EtcdFollowStream", "EtcdWatchStream", "Metadata"]

Metadata = tuple[tuple[str, str], ...]


def _auth_cancel(reason: str) -> bool:
    """True if a watch cancel reason is an auth refusal (etcd 3.5 cancels a watch created with
    a stale token as "permission denied")."""
    low = reason.lower()
    return "permission denied" in low or "auth" in low


def _canceled(resp: Any) -> Exception:
    """The error a canceled watch response stands for."""
    if resp.compact_revision > 0:
        return Compacted(resp.compact_revision)
    return WatchBroken(f"watch canceled by the server: {resp.cancel_reason or '-'}")


def _answer(item: Any) -> WatchResponse | None:
    """A watch response as an event batch or a progress notification; None for the response
    that only confirms the watch was created."""
    if item.events:
        return _events(item)
    if item.created:
        return None
    return WatchResponse((), item.header.revision, progress=True)


def _events(resp: Any) -> WatchResponse:
    delete = kv_pb2.Event.DELETE
    events = tuple(
        Event(e.kv.key, e.kv.value, e.kv.mod_revision, e.type == delete) for e in resp.events
    )
    return WatchResponse(events, events[-1].mod_revision)


class _Stream:
    """What both streams share: the ``closed`` / ``dead`` flags (under ``_lock``), dying
    (:meth:`_shutdown` is the subclass's), and a response turned into an answer or an error."""

    _lock: threading.Lock
    _closed: bool
    _dead: bool

    def _shutdown(self) -> None:
        raise NotImplementedError

    def _die(self) -> None:
        self._dead = True
        self._shutdown()

    def _deliver(self, item: Any) -> WatchResponse | None:
        """``item``'s event batch or progress notification (None for the ``created``
        confirmation); a canceled response kills the stream and raises its error."""
        if item.canceled:
            self._die()
            raise _canceled(item)
        return _answer(item)


class EtcdWatchStream(_Stream):
    """One etcd watch on its own bidi ``Watch`` call (progress notifications on).

    A reader thread moves responses into a queue; :meth:`get` turns them into
    :class:`WatchResponse` values. The ``created`` response is consumed internally. An event
    batch's ``revision`` is its last event's revision (etcd's header revision on a catch-up
    batch may run ahead of the events delivered so far, so it is not a safe promise).
    """

    def __init__(
        self,
        stub: Any,
        create: Any,
        metadata: Sequence[tuple[str, str]] | None,
        on_failure: Callable[[], None] | None = None,
        reauthenticate: Callable[[Metadata], Metadata] | None = None,
    ) -> None:
        self._stub = stub
        self._create = create
        self._responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._lock = threading.Lock()
        self._closed = False
        self._dead = False
        self._on_failure = on_failure
        # ``reauthenticate(stale metadata) -> fresh metadata``: called (at most once) when
        # etcd refuses to create the watch for an auth reason; the watch is then created again.
        self._reauthenticate = reauthenticate
        self._metadata: Metadata = tuple(metadata or ())
        self._requests, self._call = self._open()
        self._thread = threading.Thread(target=self._read, name="txindex-etcd-watch", daemon=True)
        self._thread.start()

    def _open(self) -> tuple[queue.SimpleQueue[Any], Any]:
        requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        requests.put(etcdrpc.WatchRequest(create_request=self._create))
        # "hasleader": etcd cancels the watch when its member loses the leader, instead of
        # letting it stall silently on a partitioned member (clientv3's WithRequireLeader).
        call = self._stub.Watch(
            self._request_iter(requests), metadata=(*self._metadata, ("hasleader", "true"))
        )
        return requests, call

    @staticmethod
    def _request_iter(requests: queue.SimpleQueue[Any]) -> Iterator[Any]:
        while True:
            req = requests.get()
            if req is None:
                return
            yield req

    def _reopen(self) -> bool:
        """Authenticate again and create the watch anew on a fresh call (nothing has been
        delivered from the refused one). False if closed meanwhile or re-auth failed."""
        assert self._reauthenticate is not None
        refresh, self._reauthenticate = self._reauthenticate, None
        try:
            metadata = refresh(self._metadata)
        except Exception as e:
            self._responses.put(WatchBroken(f"watch re-authentication failed: {e}"))
            return False
        with self._lock:
            if self._closed:
                return False
            old_requests, old_call = self._requests, self._call
            self._metadata = metadata
            self._requests, self._call = self._open()
        old_requests.put(None)
        old_call.cancel()
        return True

    def _read(self) -> None:
        while True:
            call = self._call
            first = True
            try:
                for resp in call:
                    if (
                        first
                        and resp.canceled
                        and self._reauthenticate is not None
                        and _auth_cancel(resp.cancel_reason)
                    ):
                        break  # refused at creation: re-authenticate, create again
                    first = False
                    self._responses.put(resp)
                else:
                    self._responses.put(WatchBroken("watch stream ended by the server"))
                    return
            except grpc.RpcError as e:
                if self._closed:
                    self._responses.put(WatchBroken("watch stream is closed"))
                    return
                if not (first and self._reauthenticate is not None and _token_refused(e)):
                    if self._on_failure is not None:
                        self._on_failure()  # later watches try the next endpoint
                    self._responses.put(
                        WatchBroken(f"watch stream failed: {_code(e)}: {_details(e)}")
                    )
                    return
            except Exception as e:  # pragma: no cover - defensive: never lose the failure
                self._responses.put(WatchBroken(f"watch reader failed: {e!r}"))
                return
            if not self._reopen():
                self._responses.put(WatchBroken("watch stream is closed"))
                return

    def get(self, timeout: float | None) -> WatchResponse | None:
        """Next event batch or progress notification; None after ``timeout`` seconds.
        Raises ``Compacted`` or ``WatchBroken``, after which the stream is dead."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while True:
            if self._dead or self._closed:
                raise WatchBroken("watch stream is closed")
            remaining = None if deadline is None else max(0.0, deadline - time.monotonic())
            try:
                item = self._responses.get(timeout=remaining)
            except queue.Empty:
                return None
            if isinstance(item, Exception):
                self._die()
                raise item
            answer = self._deliver(item)
            if answer is not None:
                return answer

    def request_progress(self) -> None:
        """Send a WatchProgressRequest; the answer arrives through :meth:`get`.

        Caveat: etcd < 3.5.8 / 3.4.24 answers at once with the store revision even when this
        watcher is still catching up (etcd issue #15220)."""
        with self._lock:
            if not self._closed:
                self._requests.put(
                    etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())
                )

    def _shutdown(self, join: bool = False) -> None:
        with self._lock:
            first = not self._closed
            self._closed = True
        if first:
            self._requests.put(None)
            self._call.cancel()
        if join and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)
            if not self._thread.is_alive():
                # Drop the call now, while gRPC's threads run: if its finalizer only ran at
                # interpreter exit it could wait forever for a lock held by a frozen daemon
                # thread (seen as a hang of a short-lived process on exit, ~1 run in 25).
                self._call = None

    def close(self) -> None:
        """Cancel the call and join the reader thread. Idempotent."""
        self._shutdown(join=True)


class EtcdFollowStream(_Stream):
    """One etcd watch read directly by the thread that calls :meth:`get` (the watcher's): the
    ``Watch`` method called as unary-stream on a single-threaded call, so a response reaches
    that thread with no hand-off (no channel spin thread, no reader thread, no queue: two
    thread wake-ups and about a third of the process's CPU per watch event fewer than
    :class:`EtcdWatchStream`).

    Without a request stream there are no progress requests: liveness is a watchdog thread's
    job. When nothing arrived for ``liveness`` seconds it probes the watch's endpoint with a
    count-only Range (deadline ``liveness``); a probe with no answer (connection stalled or
    lost, no leader) cancels the call, and :meth:`get` raises ``WatchBroken``. The server
    itself cancels the watch when its member loses the leader (``hasleader``). A watch that a
    healthy, answering server stops feeding is not detected (as with etcd's own client).
    """

    def __init__(
        self,
        watch_one: Callable[..., Any],
        create: Any,
        metadata: Sequence[tuple[str, str]] | None,
        liveness: float,
        probe: Callable[[float], None],
        on_failure: Callable[[], None] | None = None,
        reauthenticate: Callable[[Metadata], Metadata] | None = None,
    ) -> None:
        self._watch_one = watch_one  # the endpoint's Watch method called as unary-stream
        self._create = create
        self._metadata: Metadata = tuple(metadata or ())
        self._liveness = liveness
        self._probe = probe
        self._on_failure = on_failure
        self._reauthenticate = reauthenticate  # at most once, as in EtcdWatchStream
        self._lock = threading.Lock()
        self._closed = False
        self._dead = False
        self._reading = False  # a thread is inside the call: only it may drop the call
        self._first = True  # the next response is the call's first
        self._received = 0  # responses so far (the watchdog's evidence of life)
        self._broken = ""  # why the watchdog canceled the call
        self._stop = threading.Event()
        self._call: Any = self._open()
        self._watchdog = threading.Thread(
            target=self._watch, name="txindex-etcd-watchdog", daemon=True
        )
        self._watchdog.start()

    def _open(self) -> Any:
        return self._watch_one(
            etcdrpc.WatchRequest(create_request=self._create),
            metadata=(*self._metadata, ("hasleader", "true")),
        )

    def get(self, timeout: float | None = None) -> WatchResponse | None:
        """Next event batch or progress notification, read in the calling thread (one thread
        at a time). Blocks until one arrives: ``timeout`` is ignored (the watchdog ends a
        silent stream). Raises ``Compacted`` or ``WatchBroken``, after which the stream is
        dead."""
        while True:
            with self._lock:
                if self._dead or self._closed:
                    raise WatchBroken(self._broken or "watch stream is closed")
                call = self._call
                self._reading = True
            try:
                item = next(call)
            except StopIteration:
                self._die()
                raise WatchBroken("watch stream ended by the server") from None
            except grpc.RpcError as e:
                if self._closed:  # by close(), or by the watchdog (then _broken says why)
                    self._die()
                    raise WatchBroken(self._broken or "watch stream is closed") from None
                if self._first and self._reauthenticate is not None and _token_refused(e):
                    self._reopen()
                    continue
                if self._on_failure is not None:
                    self._on_failure()  # later watches try the next endpoint
                self._die()
                raise WatchBroken(f"watch stream failed: {_code(e)}: {_details(e)}") from None
            finally:
                with self._lock:
                    self._reading = False
                    if self._closed:
                        self._call = None  # see _shutdown
            self._received += 1
            first, self._first = self._first, False
            if (
                item.canceled
                and first
                and self._reauthenticate is not None
                and _auth_cancel(item.cancel_reason)
            ):
                self._reopen()  # refused at creation: re-authenticate, create again
                continue
            answer = self._deliver(item)
            if answer is not None:
                return answer

    def _reopen(self) -> None:
        """Authenticate again and create the watch anew on a fresh call (nothing has been
        delivered from the refused one)."""
        assert self._reauthenticate is not None
        refresh, self._reauthenticate = self._reauthenticate, None
        try:
            metadata = refresh(self._metadata)
        except Exception as e:
            self._die()
            raise WatchBroken(f"watch re-authentication failed: {e}") from None
        with self._lock:
            if self._closed:
                raise WatchBroken("watch stream is closed")
            old = self._call
            self._metadata = metadata
            self._call = self._open()
            self._first = True
        if old is not None:
            old.cancel()

    def request_progress(self) -> None:
        """No-op: this stream has no request side (see the class doc)."""

    def _watch(self) -> None:
        """The watchdog: probe the endpoint after ``liveness`` seconds with no response."""
        seen = -1
        while not self._stop.wait(self._liveness):
            if self._received != seen:
                seen = self._received
                continue
            try:
                self._probe(self._liveness)
            except Exception as e:
                why = f"{_code(e)}: {_details(e)}" if isinstance(e, grpc.RpcError) else repr(e)
                with self._lock:
                    if self._closed:
                        return
                    self._broken = (
                        f"watch stream silent for {self._liveness:g}s and its endpoint did not "
                        f"answer a probe: {why}"
                    )
                if self._on_failure is not None:
                    self._on_failure()
                self._shutdown()  # the reading thread wakes up with WatchBroken
                return

    def _shutdown(self) -> None:
        with self._lock:
            first = not self._closed
            self._closed = True
            call = self._call
            if not self._reading:
                # Drop the call now, while gRPC's threads run (see EtcdWatchStream._shutdown);
                # a thread inside it drops it on its way out.
                self._call = None
        self._stop.set()
        if first and call is not None:
            call.cancel()

    def close(self) -> None:
        """Cancel the call and stop the watchdog. Idempotent."""
        self._shutdown()
        if self._watchdog is not threading.current_thread():
            self._watchdog.join(timeout=self._liveness + 5)
