"""Backends: the only code that talks to a KV server. :func:`open_backend` maps a URL to one.

=============================  =================================================================
``etcd://h:p[,h:p...]``        :class:`EtcdBackend` on those endpoints (plaintext unless a TLS
                               option below is given)
``etcds://h:p[,h:p...]``       the same over TLS (server verified against ``ca_cert``, or the
                               system's trusted roots without it)
``memory://``                  a private :class:`MemoryBackend`
``memory://NAME``              a handle on the process-wide memory store ``NAME``
``file://DIR``                 an :class:`~txindex.server.EmbeddedEtcd` serving ``DIR`` and an
                               :class:`EtcdBackend` on it; closing the backend stops the server
=============================  =================================================================

Security options of the etcd URLs (passed through ``txindex.open(url, **options)``):

* ``ca_cert="ca.pem"`` -- trust this CA for the server's certificate; turns TLS on.
* ``cert_cert="client.pem", cert_key="client-key.pem"`` -- present a client certificate (for a
  server started with ``--client-cert-auth``); turns TLS on.
* ``user="app", password="..."`` -- etcd authentication: a token is obtained at open, sent with
  every call (watches too) and renewed transparently when etcd refuses it (expired simple
  token, server restart). Wrong credentials raise :class:`AuthError` from ``open``. Neither the
  password nor the token ever appears in a repr, a log line or an exception message.

Example: ``txindex.open("etcds://10.0.0.5:2379", models=[...], ca_cert="ca.pem",
cert_cert="me.pem", cert_key="me-key.pem", user="app", password=secret)``.
"""

from __future__ import annotations

from typing import Any

from txindex.backend.base import (
    Backend,
    Compare,
    Delete,
    Event,
    KeyValue,
    Op,
    Put,
    RangePage,
    TxnResult,
    WatchResponse,
    WatchStream,
    prefix_end,
    successor,
)
from txindex.backend.etcd import EtcdBackend, tls_credentials
from txindex.backend.etcd_watch import EtcdWatchStream
from txindex.backend.memory import MemoryBackend, MemoryWatchStream
from txindex.errors import AuthError, RequestRejected

__all__ = [
    "AuthError",
    "Backend",
    "Compare",
    "Delete",
    "EmbeddedEtcdBackend",
    "EtcdBackend",
    "EtcdWatchStream",
    "Event",
    "KeyValue",
    "MemoryBackend",
    "MemoryWatchStream",
    "Op",
    "Put",
    "RangePage",
    "RequestRejected",
    "TxnResult",
    "WatchResponse",
    "WatchStream",
    "open_backend",
    "prefix_end",
    "successor",
    "tls_credentials",
]


class EmbeddedEtcdBackend(EtcdBackend):
    """An :class:`EtcdBackend` that owns its server: :meth:`close` also stops it."""

    def __init__(self, directory: str, *, start_timeout: float = 30.0, **options: Any) -> None:
        from txindex.server import EmbeddedEtcd

        self.server = EmbeddedEtcd(directory)
        self.server.start(start_timeout)
        try:
            super().__init__([self.server.endpoint], **options)
        except BaseException:
            self.server.stop()
            raise

    def close(self) -> None:
        try:
            super().close()
        finally:
            self.server.stop()


def open_backend(url: str, **options: Any) -> Backend:
    """Open the backend ``url`` names (see the module docstring); ``options`` go to the
    backend's constructor. Raises ``ValueError`` for a malformed or unknown URL."""
    scheme, sep, rest = url.partition("://")
    if not sep:
        raise ValueError(
            f"bad backend URL {url!r}: expected etcd://, etcds://, memory:// or file://"
        )
    if scheme in ("etcd", "etcds"):
        if "@" in rest:  # (the message never quotes the URL: it holds a password)
            raise ValueError(
                f"bad {scheme} URL: user info (user:password@) is not taken from a URL; "
                "pass user= and password= to open()"
            )
        endpoints = [e.strip() for e in rest.split(",")]
        if not rest or any(not e for e in endpoints):
            raise ValueError(
                f"bad etcd URL {url!r}: expected {scheme}://host:port[,host:port...]"
            )
        if scheme == "etcds":
            options = {**options, "tls": True}
        return EtcdBackend(endpoints, **options)
    if scheme == "memory":
        if "/" in rest:
            raise ValueError(f"bad memory URL {url!r}: expected memory:// or memory://NAME")
        return MemoryBackend.named(rest, **options) if rest else MemoryBackend(**options)
    if scheme == "file":
        if not rest:
            raise ValueError(f"bad file URL {url!r}: expected file://DIR")
        return EmbeddedEtcdBackend(rest, **options)
    raise ValueError(f"unknown backend URL scheme {scheme!r} in {url!r}")
