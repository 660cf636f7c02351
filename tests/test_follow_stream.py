"""EtcdFollowStream: the watcher's etcd watch, read by the watcher thread itself.

No request side, so liveness is a watchdog that probes the endpoint after ``liveness``
seconds of silence. Checked here against real etcd servers (a proxy stalls the connection):
events flow; an idle but healthy stream stays up; a stalled one breaks in about two
intervals; close() from another thread ends a blocked ``get`` at once; compaction and an
expired auth token at creation behave as on :class:`EtcdWatchStream`.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import pytest

import txindex
from txindex.backend import EtcdBackend, Put, WatchResponse, prefix_end
from txindex.backend.etcd_watch import EtcdFollowStream
from txindex.errors import Compacted, WatchBroken
from txindex.server import EtcdServer

from .models import Node
from .proxy import Proxy
from .test_tls_auth import ROOT_PASSWORD, _let_token_expire, auth_server  # noqa: F401


def get_in_thread(stream: EtcdFollowStream, within: float) -> tuple[Any, float]:
    """``stream.get()`` in a thread (a test must not hang): (response or exception, seconds)."""
    out: list[Any] = []
    t0 = time.monotonic()

    def run() -> None:
        try:
            out.append(stream.get())
        except Exception as exc:
            out.append(exc)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    t.join(within)
    assert out, f"get() still blocked after {within}s"
    return out[0], time.monotonic() - t0


def test_watcher_follows_etcd_directly(etcd_url: str, prefix: str) -> None:
    with txindex.open(etcd_url, models=[Node], prefix=prefix) as db:
        deadline = time.monotonic() + 10
        while db._watcher._stream is None and time.monotonic() < deadline:
            time.sleep(0.01)  # the watcher thread opens it right after the load
        assert isinstance(db._watcher._stream, EtcdFollowStream)
        other = EtcdBackend([etcd_url.removeprefix("etcd://")])
        try:
            res = other.txn([], [Put(f"{prefix}nodes/x".encode(),
                                     b'{"id":"x","user":"u","ip":"1.2.3.4"}')])
            assert db.wait_for(res.revision, 10)
            with db.read() as r:
                assert r.get(Node, "x") == Node("x", "u", "1.2.3.4")
        finally:
            other.close()
        stream = db._watcher._stream
    assert stream._closed and stream._call is None and not stream._watchdog.is_alive()


def test_idle_stream_survives_probes_and_stalled_one_breaks(
    server: EtcdServer, proxy: Proxy
) -> None:
    backend = EtcdBackend([proxy.endpoint], timeout=2.0)
    key = b"follow/"
    try:
        stream = backend.follow(key, prefix_end(key), 1, liveness=0.2)
        time.sleep(1.2)  # idle: the watchdog probes several times and finds the server
        assert not stream._closed
        res = backend.txn([], [Put(b"follow/a", b"1")])
        got, _ = get_in_thread(stream, 10)
        assert isinstance(got, WatchResponse) and [e.key for e in got.events] == [b"follow/a"]
        assert got.revision == res.revision

        proxy.freeze()  # the connection stays open and carries nothing
        got, took = get_in_thread(stream, 10)
        assert isinstance(got, WatchBroken) and "did not answer a probe" in str(got), got
        assert took < 3, took
        with pytest.raises(WatchBroken):
            stream.get()
        assert stream._call is None and not stream._watchdog.is_alive()
        proxy.thaw()
    finally:
        backend.close()


def test_close_from_another_thread_ends_a_blocked_get(etcd_backend: EtcdBackend) -> None:
    start = etcd_backend.current_revision() + 1
    stream = etcd_backend.follow(b"idle/", b"idle0", start, liveness=5.0)
    threading.Timer(0.3, stream.close).start()
    got, took = get_in_thread(stream, 10)
    assert isinstance(got, WatchBroken) and took < 3
    assert stream._call is None  # dropped by the reading thread on its way out
    stream._watchdog.join(2)
    assert not stream._watchdog.is_alive()


def test_compacted_start(etcd_backend: EtcdBackend, prefix: str) -> None:
    key = prefix.encode()
    for i in range(3):
        last = etcd_backend.txn([], [Put(key + b"k", str(i).encode())]).revision
    etcd_backend.compact(last)
    stream = etcd_backend.follow(key, prefix_end(key), last - 1, liveness=5.0)
    try:
        got, _ = get_in_thread(stream, 10)
        assert isinstance(got, Compacted) and got.compact_revision == last
    finally:
        stream.close()


def test_created_with_an_expired_token(auth_server: EtcdServer, prefix: str) -> None:  # noqa: F811
    backend = EtcdBackend([auth_server.endpoint], user="root", password=ROOT_PASSWORD)
    try:
        key = prefix.encode()
        res = backend.txn([], [Put(key + b"a", b"1")])
        _let_token_expire()
        before = backend.reauthentications
        stream = backend.follow(key, prefix_end(key), res.revision, liveness=5.0)
        try:
            got, _ = get_in_thread(stream, 10)
        finally:
            stream.close()
        assert isinstance(got, WatchResponse) and [e.key for e in got.events] == [key + b"a"]
        assert backend.reauthentications == before + 1
    finally:
        backend.close()
