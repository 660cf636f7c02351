"""Backends: the only code that talks to a KV server. :func:`open_backend` maps a URL to one.

=============================  =================================================================
``etcd://h:p[,h:p...]``        :class:`EtcdBackend` on those endpoints
``memory://``                  a private :class:`MemoryBackend`
``memory://NAME``              a handle on the process-wide memory store ``NAME``
``file://DIR``                 an :class:`~txindex.server.EmbeddedEtcd` serving ``DIR`` and an
                               :class:`EtcdBackend` on it; closing the backend stops the server
=============================  =================================================================
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
from txindex.backend.etcd import EtcdBackend, EtcdWatchStream
from txindex.backend.memory import MemoryBackend, MemoryWatchStream, RequestRejected

__all__ = [
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
        raise ValueError(f"bad backend URL {url!r}: expected etcd://, memory:// or file://")
    if scheme == "etcd":
        endpoints = [e.strip() for e in rest.split(",")]
        if not rest or any(not e for e in endpoints):
            raise ValueError(f"bad etcd URL {url!r}: expected etcd://host:port[,host:port...]")
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
