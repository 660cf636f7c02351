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
* Watches: :meth:`EtcdBackend.watch` gives an :class:`EtcdWatchStream` (bidi call, reader
  thread, ``get(timeout)``, progress requests); :meth:`EtcdBackend.follow` gives the watcher's
  :class:`EtcdFollowStream` (unary-stream call read by the calling thread itself, liveness by
  a watchdog probe), which costs two thread hand-offs less per response. Both live in
  :mod:`txindex.backend.etcd_watch`; reading gRPC failures in :mod:`txindex.backend.etcd_errors`.
* ``Compacted.compact_revision``: etcd's error does not carry it; it is fetched with a probe
  watch from revision 1 (canceled with the compact revision), 0 if that probe fails.
* TLS: ``ca_cert`` (PEM file of the CA that signed the server's certificate), ``cert_cert`` and
  ``cert_key`` (PEM files of a client certificate and its key, for ``--client-cert-auth``) build
  ``grpc.ssl_channel_credentials``; any of them, or ``tls=True`` (what ``etcds://`` URLs set:
  TLS with the system's trusted roots), makes every channel a TLS channel. ``credentials`` (a
  ready ``grpc.ChannelCredentials``) is the low-level alternative.
* Auth: with ``user`` and ``password`` the backend calls ``Auth.Authenticate`` at construction
  (a wrong password raises :class:`AuthError` at once) and sends the token as ``token``
  metadata on every call, watches included. When etcd refuses a token (expired simple token,
  server restart, "revision of auth store is old") the backend authenticates again, once per
  call, and retries: reads always, a ``Txn`` too (an auth refusal is definite: nothing was
  applied), a watch when its creation was refused (before any event was delivered).
* Secrets: the password and the token appear in no ``repr``, log line or exception message.
"""

from __future__ import annotations

import functools
import gc
import threading
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import grpc
from etcd3 import etcdrpc

from txindex.backend.base import (
    Compare,
    KeyValue,
    Op,
    Put,
    RangePage,
    TxnResult,
)
from txindex.backend.etcd_errors import (
    _RETRY,
    _UNKNOWN_OUTCOME,
    _auth_refused,
    _code,
    _details,
    _never_sent,
    _token_refused,
)
from txindex.backend.etcd_watch import EtcdFollowStream, EtcdWatchStream, Metadata
from txindex.errors import (
    AuthError,
    Closed,
    CommitUnknown,
    Compacted,
    RequestRejected,
    TxTooLarge,
    Unavailable,
)

__all__ = [
    "DEFAULT_GRPC_OPTIONS", "AuthError", "EtcdBackend", "EtcdFollowStream", "EtcdWatchStream"
]

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

_TARGETS = {
    "mod": etcdrpc.Compare.MOD,
    "create": etcdrpc.Compare.CREATE,
    "version": etcdrpc.Compare.VERSION,
    "value": etcdrpc.Compare.VALUE,
}
_MOD = etcdrpc.Compare.MOD
_FIELDS = {"mod": "mod_revision", "create": "create_revision", "version": "version"}
_OPS = {
    "=": etcdrpc.Compare.EQUAL,
    "!=": etcdrpc.Compare.NOT_EQUAL,
    "<": etcdrpc.Compare.LESS,
    ">": etcdrpc.Compare.GREATER,
}


class _Secret:
    """A string that never shows itself in a repr or str."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "'***'"

    __str__ = __repr__


def _read_pem(path: str | None, what: str) -> bytes | None:
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ValueError(f"cannot read {what} {path!r}: {e.strerror}") from None


def _check_pems(ca_cert: str | None, cert_cert: str | None, cert_key: str | None) -> None:
    """``ValueError`` naming the file for a CA that is not PEM, or a client certificate and
    key that do not parse or do not match: gRPC would only fail each handshake, retried as a
    transient fault, with no file named."""
    import ssl

    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    if ca_cert is not None:
        try:
            context.load_verify_locations(cafile=ca_cert)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(f"ca_cert {ca_cert!r} is not a PEM CA certificate: {e}") from None
    if cert_cert is not None and cert_key is not None:
        try:
            context.load_cert_chain(cert_cert, cert_key)
        except (ssl.SSLError, OSError) as e:
            raise ValueError(
                f"cert_cert {cert_cert!r} and cert_key {cert_key!r} are not a PEM certificate "
                f"and its private key: {e}"
            ) from None


def tls_credentials(
    ca_cert: str | None = None, cert_cert: str | None = None, cert_key: str | None = None
) -> grpc.ChannelCredentials:
    """``grpc.ssl_channel_credentials`` from PEM files: ``ca_cert`` the trusted CA (None: the
    system's roots), ``cert_cert`` + ``cert_key`` a client certificate (both or neither)."""
    if (cert_cert is None) != (cert_key is None):
        raise ValueError("cert_cert and cert_key go together (a client certificate and its key)")
    root = _read_pem(ca_cert, "ca_cert")
    key = _read_pem(cert_key, "cert_key")
    chain = _read_pem(cert_cert, "cert_cert")
    _check_pems(ca_cert, cert_cert, cert_key)
    return grpc.ssl_channel_credentials(
        root_certificates=root, private_key=key, certificate_chain=chain
    )


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


def _txn_pb(compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op]) -> Any:
    """The TxnRequest, built in place (a third of the cost of building each message and
    copying it into its parent, which is what keyword construction does)."""
    req = etcdrpc.TxnRequest()
    add = req.compare.add
    for c in compares:
        if c.target == "mod" and type(c.value) is int and not c.range_end:  # the usual kind
            add(key=c.key, target=_MOD, result=_OPS[c.op], mod_revision=c.value)
        else:
            req.compare.append(_compare_pb(c))
    for ops, repeated in ((success, req.success), (failure, req.failure)):
        add = repeated.add
        for op in ops:
            if type(op) is Put:
                put = add().request_put
                put.SetInParent()
                put.key = op.key
                put.value = op.value
            else:
                repeated.append(_op_pb(op))
    return req


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
        # A Python-side option: unary-stream calls on this channel are read by the thread that
        # iterates them (no channel spin thread). Only EtcdFollowStream makes such calls.
        opts = [*options, (grpc.experimental.ChannelOptions.SingleThreadedUnaryStream, 1)]
        if credentials is None:
            self.channel = grpc.insecure_channel(target, options=opts)
        else:
            self.channel = grpc.secure_channel(target, credentials, options=opts)
        self.kv = etcdrpc.KVStub(self.channel)
        self.watch = etcdrpc.WatchStub(self.channel)
        self.auth = etcdrpc.AuthStub(self.channel)
        # etcd's bidi Watch called as unary-stream: one create request, then the client's
        # half-close, which etcd ignores (its receive loop ends, the watch goes on)
        self.watch_one = self.channel.unary_stream(
            "/etcdserverpb.Watch/Watch",
            request_serializer=etcdrpc.WatchRequest.SerializeToString,
            response_deserializer=etcdrpc.WatchResponse.FromString,
        )


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
        tls: bool = False,
        ca_cert: str | None = None,
        cert_cert: str | None = None,
        cert_key: str | None = None,
        user: str | None = None,
        password: str | None = None,
    ) -> None:
        if isinstance(endpoints, str):
            endpoints = endpoints.split(",")
        targets = [_normalize(e) for e in endpoints if e.strip()]
        if not targets:
            raise ValueError("EtcdBackend needs at least one endpoint")
        wants_tls = tls or any(p is not None for p in (ca_cert, cert_cert, cert_key))
        if credentials is not None and wants_tls:
            raise ValueError("pass either credentials or tls/ca_cert/cert_cert/cert_key")
        if wants_tls:
            credentials = tls_credentials(ca_cert, cert_cert, cert_key)
        if (user is None) != (password is None):
            raise ValueError("etcd authentication needs both user and password")
        self.timeout = timeout
        self.tls = credentials is not None
        self.user = user
        self._password = None if password is None else _Secret(password)
        self._token: str | None = None
        self._auth_lock = threading.Lock()
        self.reauthentications = 0  # times a refused token was replaced (observability)
        self._metadata = tuple(metadata) if metadata else None
        options = list({**dict(DEFAULT_GRPC_OPTIONS), **dict(grpc_options)}.items())
        self._endpoints = [_Endpoint(t, credentials, options) for t in targets]
        self._current = 0
        self._lock = threading.Lock()
        self._closed = False
        self._watches: set[EtcdWatchStream | EtcdFollowStream] = set()
        if self._password is not None:
            try:
                self._token = self._authenticate()
            except BaseException:
                self.close()
                raise

    def __repr__(self) -> str:
        user = "" if self.user is None else f", user={self.user!r}"
        return f"EtcdBackend(endpoints={self.endpoints!r}, tls={self.tls}{user})"

    @property
    def endpoints(self) -> list[str]:
        return [e.target for e in self._endpoints]

    # -- auth ----------------------------------------------------------------------------

    def _authenticate(self) -> str:
        """A fresh token from ``Auth.Authenticate`` (rotating endpoints while unreachable).
        Raises ``AuthError`` on refusal, ``Unavailable`` when no endpoint answers."""
        assert self.user is not None and self._password is not None
        req = etcdrpc.AuthenticateRequest(name=self.user, password=self._password.reveal())
        try:
            resp = self._idempotent(
                "authenticate", lambda ep: ep.auth.Authenticate(req, timeout=self.timeout)
            )
        except grpc.RpcError as e:
            raise AuthError(
                f"etcd authentication failed for user {self.user!r}: {_code(e)}: {_details(e)}"
            ) from None  # the gRPC error holds the request (and so the password): drop it
        token = str(resp.token)
        if not token:
            raise AuthError(
                f"etcd returned no token for user {self.user!r}: is auth enabled on the server?"
            )
        return token

    def _call_metadata(self, token: str | None) -> Metadata | None:
        if token is None:
            return self._metadata
        return (*(self._metadata or ()), ("token", token))

    def _reauthenticate(self, stale: str | None) -> None:
        """Replace the token ``stale`` with a fresh one (no-op if another thread already did)."""
        with self._auth_lock:
            if self._token != stale:
                return
            self._token = self._authenticate()
            self.reauthentications += 1

    def _with_auth(self, fn: Callable[[Metadata | None], T]) -> T:
        """``fn(metadata)``; if etcd refuses the token, authenticate again and call once more.
        Only for requests that a refusal proves were not applied."""
        token = self._token
        try:
            return fn(self._call_metadata(token))
        except grpc.RpcError as e:
            if self._password is None or not _token_refused(e):
                raise
        self._reauthenticate(token)
        return fn(self._call_metadata(self._token))

    def _watch_reauthenticate(self, stale: Metadata) -> Metadata:
        """For a watch refused at creation: a fresh token, as the watch's new metadata."""
        stale_token = dict(stale).get("token")
        self._reauthenticate(stale_token)
        return self._call_metadata(self._token) or ()

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
            resp = self._with_auth(
                lambda md: self._idempotent(
                    "range", lambda ep: ep.kv.Range(req, timeout=self.timeout, metadata=md)
                )
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
        req = _txn_pb(compares, success, failure)
        last: grpc.RpcError | None = None
        for _ in range(len(self._endpoints)):
            i, ep = self._pick()
            try:
                # an auth refusal is definite (not applied): re-authenticate, send once more
                resp = self._with_auth(functools.partial(self._send_txn, ep, req))
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

    def _send_txn(self, ep: _Endpoint, req: Any, metadata: Metadata | None) -> Any:
        return ep.kv.Txn(req, timeout=self.timeout, metadata=metadata)

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> EtcdWatchStream:
        """Open a watch from ``start_revision`` on the current endpoint; if its stream fails,
        later calls move on to the next endpoint."""
        if start_revision <= 0:
            raise ValueError("start_revision must be > 0")
        i, ep = self._pick()
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, progress_notify=True
        )
        stream = EtcdWatchStream(
            ep.watch,
            create,
            self._call_metadata(self._token),
            lambda: self._advance(i),
            reauthenticate=self._watch_reauthenticate if self._password is not None else None,
        )
        with self._lock:
            self._watches = {w for w in self._watches if not w._closed}
            self._watches.add(stream)
        return stream

    def follow(
        self, key: bytes, range_end: bytes, start_revision: int, liveness: float
    ) -> EtcdFollowStream:
        """Like :meth:`watch`, for one reading thread that blocks in ``get`` (the watcher):
        an :class:`EtcdFollowStream`, whose watchdog probes the endpoint after ``liveness``
        seconds of silence."""
        if start_revision <= 0:
            raise ValueError("start_revision must be > 0")
        i, ep = self._pick()
        create = etcdrpc.WatchCreateRequest(
            key=key, range_end=range_end, start_revision=start_revision, progress_notify=True
        )
        probe_req = etcdrpc.RangeRequest(key=b"\0", count_only=True)

        def probe(timeout: float) -> None:
            """Raises unless the endpoint answers within ``timeout`` (any answer will do)."""
            try:
                ep.kv.Range(probe_req, timeout=timeout, metadata=self._call_metadata(self._token))
            except grpc.RpcError as e:
                if _code(e) in _RETRY:
                    raise
        stream = EtcdFollowStream(
            ep.watch_one,
            create,
            self._call_metadata(self._token),
            liveness,
            probe,
            lambda: self._advance(i),
            reauthenticate=self._watch_reauthenticate if self._password is not None else None,
        )
        with self._lock:
            self._watches = {w for w in self._watches if not w._closed}
            self._watches.add(stream)
        return stream

    def current_revision(self) -> int:
        """Header revision of a count-only Range (linearizable)."""
        req = etcdrpc.RangeRequest(key=b"\0", count_only=True)
        try:
            resp = self._with_auth(
                lambda md: self._idempotent(
                    "current_revision",
                    lambda ep: ep.kv.Range(req, timeout=self.timeout, metadata=md),
                )
            )
        except grpc.RpcError as e:
            raise self._definite(e) from e
        return int(resp.header.revision)

    def compact(self, revision: int) -> None:
        """Physical compaction up to ``revision``. Raises ``Compacted`` if already compacted
        at or past it, ``RequestRejected`` for a future revision."""
        req = etcdrpc.CompactionRequest(revision=revision, physical=True)
        try:
            self._with_auth(
                lambda md: self._idempotent(
                    "compact", lambda ep: ep.kv.Compact(req, timeout=self.timeout, metadata=md)
                )
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
        # Finalize gRPC call objects now, while gRPC's threads run. Left in reference cycles,
        # they would be finalized at interpreter exit, where their __del__ can wait forever
        # for a lock held by a daemon thread frozen mid-callback (seen: a short-lived process
        # hanging on exit about once in 25-80 runs).
        gc.collect()

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
        if _auth_refused(e):
            who = "" if self.user is None else f" (user {self.user!r})"
            return AuthError(f"etcd refused the credentials{who}: {code}: {details}")
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
