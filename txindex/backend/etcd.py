"""The etcd :class:`~txindex.backend.base.Backend`: raw gRPC on ``etcd3.etcdrpc`` stubs.

* One channel per endpoint; receive limit 256 MiB (a lagging watch batch can pass 4 MiB and
  these stubs predate etcd's ``fragment`` flag), send limit 16 MiB; reconnect backoff capped
  at 1 s so a failed endpoint is retried soon (python-etcd3 locks it out for 300 s).
* Idempotent calls (``range``, ``current_revision``, ``compact``) rotate through the endpoints on
  UNAVAILABLE / DEADLINE_EXCEEDED with a short backoff, then raise ``Unavailable``.
* ``txn`` is sent once. Outcome unknown (UNAVAILABLE, DEADLINE_EXCEEDED, CANCELLED, UNKNOWN,
  INTERNAL) -> ``CommitUnknown``; refused for size -> ``TxTooLarge``; any other refusal ->
  :class:`~txindex.backend.memory.RequestRejected`. Only a request that provably never left the
  client (no connection to the endpoint) is retried on the next endpoint.
* ``Compacted.compact_revision``: etcd's error does not carry it; it is fetched with a probe
  watch from revision 1 (canceled with the compact revision), 0 if that probe fails.
* TLS and auth seam: ``credentials`` (a secure channel) and ``metadata`` (e.g. an auth token)
  are used for every call.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Any, TypeVar

import grpc
from etcd3 import etcdrpc
from etcd3.etcdrpc import kv_pb2

from txindex.backend.base import (
    Compare,
    Event,
    KeyValue,
    Op,
    Put,
    RangePage,
    TxnResult,
    WatchResponse,
)
from txindex.backend.memory import RequestRejected
from txindex.errors import Closed, CommitUnknown, Compacted, TxTooLarge, Unavailable, WatchBroken

__all__ = ["DEFAULT_GRPC_OPTIONS", "EtcdBackend", "EtcdWatchStream"]

T = TypeVar("T")

DEFAULT_GRPC_OPTIONS: tuple[tuple[str, int], ...] = (
    ("grpc.max_receive_message_length", 256 * 1024 * 1024),
    ("grpc.max_send_message_length", 16 * 1024 * 1024),
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.min_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 1000),
    ("grpc.keepalive_time_ms", 10_000),
    ("grpc.keepalive_timeout_ms", 5_000),
)

_RETRY = frozenset({grpc.StatusCode.UNAVAILABLE, grpc.StatusCode.DEADLINE_EXCEEDED})
_UNKNOWN_OUTCOME = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.UNKNOWN,
        grpc.StatusCode.INTERNAL,
    }
)
_TARGETS = {
    "mod": etcdrpc.Compare.MOD,
    "create": etcdrpc.Compare.CREATE,
    "version": etcdrpc.Compare.VERSION,
    "value": etcdrpc.Compare.VALUE,
}
_FIELDS = {"mod": "mod_revision", "create": "create_revision", "version": "version"}
_OPS = {
    "=": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}


def _code(e: grpc.RpcError) -> Any:
    return e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN


def _details(e: grpc.RpcError) -> str:
    return (e.details() if isinstance(e, grpc.Call) else str(e)) or ""


def _never_sent(e: grpc.RpcError) -> bool:
    """True if the RPC failed before reaching any server (no connection could be made)."""
    return _code(e) == grpc.StatusCode.UNAVAILABLE and "failed to connect" in _details(e).lower()


def _compare_pb(c: Compare) -> Any:
    pb = etcdrpc.Compare(key=c.key, target=_TARGETS[c.target], result=_OPS[c.op])
    if c.range_end:
        pb.range_end = c.range_end
    if c.target == "value":
        if not isinstance(c.value, bytes):
            raise RequestRejected(f"value compare needs bytes, got {c.value!r}")
        pb.value = c.value
    else:
        if not isinstance(c.value, int) or isinstance(c.value, bool):
            raise RequestRejected(f"{c.target} compare needs an int, got {c.value!r}")
        setattr(pb, _FIELDS[c.target], c.value)
    return pb


def _op_pb(op: Op) -> Any:
    if isinstance(op, Put):
        return etcdrpc.RequestOp(request_put=etcdrpc.PutRequest(key=op.key, value=op.value))
    return etcdrpc.RequestOp(
        request_delete_range=etcdrpc.DeleteRangeRequest(key=op.key, range_end=op.range_end or b"")
    )


def _normalize(endpoint: str) -> str:
    for scheme in ("http://", "https://", "etcd://"):
        if endpoint.startswith(scheme):
            endpoint = endpoint[len(scheme) :]
    host, sep, port = endpoint.strip().rstrip("/").rpartition(":")
    if not sep or not host or not port.isdigit():
        raise ValueError(f"bad etcd endpoint {endpoint!r}: expected host:port")
    return f"{host}:{port}"


class _Endpoint:
    def __init__(
        self,
        target: str,
        credentials: grpc.ChannelCredentials | None,
        options: Sequence[tuple[str, Any]],
    ) -> None:
        self.target = target
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=list(options))
        else:
            self.channel = grpc.secure_channel(target, credentials, options=list(options))
        self.kv = etcdrpc.KVStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)


class EtcdWatchStream:
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
    ) -> None:
        self._requests: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._responses: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._requests.put(etcdrpc.WatchRequest(create_request=create))
        self._lock = threading.Lock()
        self._closed = False
        self._dead = False
        self._on_failure = on_failure
        # "hasleader": etcd cancels the watch when its member loses the leader, instead of
        # letting it stall silently on a partitioned member (clientv3's WithRequireLeader).
        self._call = stub.Watch(
            self._request_iter(), metadata=(*(metadata or ()), ("hasleader", "true"))
        )
        self._thread = threading.Thread(target=self._read, name="txindex-etcd-watch", daemon=True)
        self._thread.start()

    def _request_iter(self) -> Iterator[Any]:
        while True:
            req = self._requests.get()
            if req is None:
                return
            yield req

    def _read(self) -> None:
        try:
            for resp in self._call:
                self._responses.put(resp)
            self._responses.put(WatchBroken("watch stream ended by the server"))
        except grpc.RpcError as e:
            if not self._closed and self._on_failure is not None:
                self._on_failure()  # later watches try the next endpoint
            self._responses.put(WatchBroken(f"watch stream failed: {_code(e)}: {_details(e)}"))
        except Exception as e:  # pragma: no cover - defensive: never lose the failure
            self._responses.put(WatchBroken(f"watch reader failed: {e!r}"))

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
            if item.canceled:
                self._die()
                if item.compact_revision > 0:
                    raise Compacted(item.compact_revision)
                raise WatchBroken(f"watch canceled by the server: {item.cancel_reason or '-'}")
            if item.events:
                events = tuple(
                    Event(
                        e.kv.key,
                        e.kv.value,
                        e.kv.mod_revision,
                        deleted=e.type == kv_pb2.Event.DELETE,
                    )
                    for e in item.events
                )
                return WatchResponse(events, events[-1].mod_revision)
            if item.created:
                continue
            return WatchResponse((), item.header.revision, progress=True)

    def request_progress(self) -> None:
        """Send a WatchProgressRequest; the answer arrives through :meth:`get`.

        Caveat: etcd < 3.5.8 / 3.4.24 answers at once with the store revision even when this
        watcher is still catching up (etcd issue #15220)."""
        with self._lock:
            if not self._closed:
                self._requests.put(
                    etcdrpc.WatchRequest(progress_request=etcdrpc.WatchProgressRequest())
                )

    def _die(self) -> None:
        self._dead = True
        self._shutdown(join=False)

    def _shutdown(self, join: bool) -> None:
        with self._lock:
            first = not self._closed
            self._closed = True
        if first:
            self._requests.put(None)
            self._call.cancel()
        if join and self._thread is not threading.current_thread():
            self._thread.join(timeout=5)

    def close(self) -> None:
        """Cancel the call and join the reader thread. Idempotent."""
        self._shutdown(join=True)


class EtcdBackend:
    """:class:`~txindex.backend.base.Backend` over etcd's gRPC API (see module docstring).

    ``endpoints`` are ``host:port`` (an ``http://`` prefix is accepted); ``timeout`` is the
    per-call deadline in seconds; ``grpc_options`` override keys of
    :data:`DEFAULT_GRPC_OPTIONS`. Thread-safe: gRPC channels are, and the endpoint cursor is
    guarded by a lock.
    """

    def __init__(
        self,
        endpoints: Sequence[str],
        *,
        timeout: float = 5.0,
        grpc_options: Sequence[tuple[str, Any]] = (),
        credentials: grpc.ChannelCredentials | None = None,
        metadata: Sequence[tuple[str, str]] | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        targets = [_normalize(e) for e in endpoints if e.strip()]
        if not targets:
            raise ValueError("EtcdBackend needs at least one endpoint")
        self.timeout = timeout
        self._metadata = tuple(metadata) if metadata else None
        options = list({**dict(DEFAULT_GRPC_OPTIONS), **dict(grpc_options)}.items())
        self._endpoints = [_Endpoint(t, credentials, options) for t in targets]
        self._current = 0
        self._lock = threading.Lock()
        self._closed = False
        self._watches: set[EtcdWatchStream] = set()

    @property
    def endpoints(self) -> list[str]:
        return [e.target for e in self._endpoints]

    # -- endpoint selection --------------------------------------------------------------

    def _pick(self) -> tuple[int, _Endpoint]:
        if self._closed:
            raise Closed("backend is closed")
        with self._lock:
            return self._current, self._endpoints[self._current]

    def _advance(self, failed: int) -> None:
        """Move off ``failed`` (no-op if another thread already did). No lockout."""
        with self._lock:
            if self._current == failed:
                self._current = (failed + 1) % len(self._endpoints)

    def _idempotent(self, what: str, fn: Callable[[_Endpoint], T]) -> T:
        """Run ``fn`` on endpoints in turn until one answers: at least two rounds and until
        ``timeout`` has passed, backing off 50 ms .. 500 ms between rounds (enough for a
        channel's 1 s reconnect backoff). Non-retryable errors propagate as ``grpc.RpcError``;
        exhaustion raises ``Unavailable``."""
        n = len(self._endpoints)
        deadline = time.monotonic() + self.timeout
        pause = 0.05
        attempt = 0
        while True:
            i, ep = self._pick()
            try:
                return fn(ep)
            except grpc.RpcError as e:
                if _code(e) not in _RETRY:
                    raise
                self._advance(i)
                attempt += 1
                if attempt >= 2 * n and time.monotonic() >= deadline:
                    raise Unavailable(
                        f"{what}: no etcd endpoint answered: {_code(e)}: {_details(e)}"
                    ) from e
                if attempt % n == 0:
                    time.sleep(pause)
                    pause = min(pause * 2, 0.5)

    # -- Backend -------------------------------------------------------------------------

    def range(
        self, key: bytes, range_end: bytes, *, revision: int = 0, limit: int = 0
    ) -> RangePage:
        """One Range (linearizable). Raises ``Compacted``, ``Unavailable`` or
        ``RequestRejected`` (future revision, response too large)."""
        req = etcdrpc.RangeRequest(key=key, range_end=range_end, revision=revision, limit=limit)
        try:
            resp = self._idempotent(
                "range",
                lambda ep: ep.kv.Range(req, timeout=self.timeout, metadata=self._metadata),
            )
        except grpc.RpcError as e:
            raise self._definite(e) from e
        kvs = tuple(
            KeyValue(kv.key, kv.value, kv.mod_revision, kv.create_revision, kv.version)
            for kv in resp.kvs
        )
        return RangePage(kvs, resp.more, resp.header.revision)

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """Send one Txn (never retried once it may have reached a server). Raises
        ``CommitUnknown``, ``TxTooLarge``, ``RequestRejected``, or ``Unavailable`` when no
        endpoint could even be connected to (then nothing was applied)."""
        req = etcdrpc.TxnRequest(
            compare=[_compare_pb(c) for c in compares],
            success=[_op_pb(o) for o in success],
            failure=[_op_pb(o) for o in failure],
        )
        last: grpc.RpcError | None = None
        for _ in range(len(self._endpoints)):
            i, ep = self._pick()
            try:
                resp = ep.kv.Txn(req, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as e:
                code, details = _code(e), _details(e)
                if _never_sent(e):
                    last = e
                    self._advance(i)
                    continue
                if code in _UNKNOWN_OUTCOME:
                    self._advance(i)
                    raise CommitUnknown(f"txn outcome unknown: {code}: {details}") from e
                raise self._definite(e) from e
            return TxnResult(resp.succeeded, resp.header.revision)
        assert last is not None
        raise Unavailable(f"txn not sent: no etcd endpoint reachable: {_details(last)}") from last

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> EtcdWatchStream:
        """Open a watch from ``start_revision`` on the current endpoint; if its stream fails,
        later calls move on to the next endpoint."""
        if start_revision <= 0:
            raise ValueError("start_revision must be > 0")
        i, ep = self._pick()
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, progress_notify=True
        )
        stream = EtcdWatchStream(ep.watch, create, self._metadata, lambda: self._advance(i))
        with self._lock:
            self._watches = {w for w in self._watches if not w._closed}
            self._watches.add(stream)
        return stream

    def current_revision(self) -> int:
        """Header revision of a count-only Range (linearizable)."""
        req = etcdrpc.RangeRequest(key=b"\0", count_only=True)
        try:
            resp = self._idempotent(
                "current_revision",
                lambda ep: ep.kv.Range(req, timeout=self.timeout, metadata=self._metadata),
            )
        except grpc.RpcError as e:
            raise self._definite(e) from e
        return int(resp.header.revision)

    def compact(self, revision: int) -> None:
        """Physical compaction up to ``revision``. Raises ``Compacted`` if already compacted
        at or past it, ``RequestRejected`` for a future revision."""
        req = etcdrpc.CompactionRequest(revision=revision, physical=True)
        try:
            self._idempotent(
                "compact",
                lambda ep: ep.kv.Compact(req, timeout=self.timeout, metadata=self._metadata),
            )
        except grpc.RpcError as e:
            raise self._definite(e) from e

    def close(self) -> None:
        """Close watches and channels. Idempotent."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            watches = list(self._watches)
        for w in watches:
            w.close()
        for ep in self._endpoints:
            ep.channel.close()

    # -- errors --------------------------------------------------------------------------

    def _definite(self, e: grpc.RpcError) -> Exception:
        """Map a definite (nothing applied) gRPC error to a txindex error."""
        code, details = _code(e), _details(e)
        low = details.lower()
        if code == grpc.StatusCode.OUT_OF_RANGE and "compacted" in low:
            return Compacted(self._compact_revision())
        if code == grpc.StatusCode.RESOURCE_EXHAUSTED or (
            code == grpc.StatusCode.INVALID_ARGUMENT
            and ("too many operations" in low or "too large" in low)
        ):
            return TxTooLarge(f"etcd refused the request's size: {details}")
        return RequestRejected(f"etcd refused the request: {code}: {details}")

    def _compact_revision(self) -> int:
        """The server's compact revision, via a probe watch from revision 1 (etcd cancels it
        with ``compact_revision``); 0 if the probe does not tell within a second."""
        try:
            probe = self.watch(b"\0", b"", 1)
        except Exception:
            return 0
        try:
            probe.get(timeout=1.0)
        except Compacted as c:
            return c.compact_revision
        except Exception:
            return 0
        finally:
            probe.close()
        return 0
