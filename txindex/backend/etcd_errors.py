"""How a failed gRPC call to etcd is read: its status code and details, whether its outcome
is unknown, whether it never left the client, whether etcd refused its auth token. Shared by
the backend (:mod:`txindex.backend.etcd`) and its watch streams
(:mod:`txindex.backend.etcd_watch`)."""

from __future__ import annotations

from typing import Any

import grpc

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


def _code(e: grpc.RpcError) -> Any:
    return e.code() if isinstance(e, grpc.Call) else grpc.StatusCode.UNKNOWN


def _details(e: grpc.RpcError) -> str:
    return (e.details() if isinstance(e, grpc.Call) else str(e)) or ""


_AUTH_CODES = frozenset(
    {grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED}
)
_AUTH_WORDS = ("invalid auth token", "auth store is old", "user name is empty", "authentication")


def _token_refused(e: grpc.RpcError) -> bool:
    """True if etcd refused the request's auth token (stale, expired, from before a restart):
    authenticating again may help. The request was not applied."""
    low = _details(e).lower()
    return _code(e) == grpc.StatusCode.UNAUTHENTICATED or (
        "invalid auth token" in low or "auth store is old" in low
    )


def _auth_refused(e: grpc.RpcError) -> bool:
    """True for any auth refusal (token, credentials, permission)."""
    low = _details(e).lower()
    return _code(e) in _AUTH_CODES or any(w in low for w in _AUTH_WORDS) or (
        "permission denied" in low
    )


def _never_sent(e: grpc.RpcError) -> bool:
    """True if the RPC failed before reaching any server (no connection could be made)."""
    return _code(e) == grpc.StatusCode.UNAVAILABLE and "failed to connect" in _details(e).lower()
