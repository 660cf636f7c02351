"""etcd-only behaviour of the backend: failover, broken streams, ``file://``, big watch batches."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from txindex.backend import (
    EtcdBackend,
    MemoryBackend,
    Put,
    open_backend,
    prefix_end,
)
from txindex.errors import Closed, DirectoryInUse, Unavailable, WatchBroken
from txindex.server import EtcdCluster, EtcdServer, _running, free_port, port_is_free


def test_failover_to_live_endpoint_without_lockout(tmp_path: Path) -> None:
    dead_port = free_port()
    live = EtcdServer(tmp_path / "live")
    live.start()
    revived = EtcdServer(tmp_path / "revived", client_port=dead_port)
    backend = EtcdBackend([f"127.0.0.1:{dead_port}", live.endpoint], timeout=3.0)
    try:
        # A Txn that could not even connect is safely retried on the next endpoint.
        assert backend.txn([], [Put(b"failover", b"1")]).succeeded
        for _ in range(3):
            assert backend.range(b"failover", b"").kvs[0].value == b"1"

        # The dead endpoint comes back and the live one dies: the backend uses the former
        # within seconds (python-etcd3 would lock it out for 300 s).
        revived.start()
        live.stop()
        t0 = time.monotonic()
        assert backend.range(b"failover", b"").kvs == ()  # revived is a different cluster
        assert time.monotonic() - t0 < 5.0
        assert backend.txn([], [Put(b"failover", b"2")]).succeeded
    finally:
        backend.close()
        live.stop()
        revived.stop()
    with pytest.raises(Closed):
        backend.current_revision()


def test_watch_breaks_when_server_is_killed(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "etcd")
    server.start()
    backend = EtcdBackend([server.endpoint])
    try:
        stream = backend.watch(b"w/", prefix_end(b"w/"), backend.current_revision() + 1)
        rev = backend.txn([], [Put(b"w/a", b"1")]).revision
        resp = stream.get(5.0)
        assert resp is not None and resp.revision == rev
        server.kill()
        with pytest.raises(WatchBroken):
            for _ in range(3):
                stream.get(5.0)
        with pytest.raises(WatchBroken):  # dead for good
            stream.get(0.1)
        stream.close()
    finally:
        backend.close()
        server.kill()


def test_file_url_persists_across_reopen(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'db'}"
    first = open_backend(url)
    endpoint = first.endpoints[0]  # type: ignore[attr-defined]
    try:
        rev = first.txn([], [Put(b"persist/k", b"v")]).revision
    finally:
        first.close()
    assert port_is_free(int(endpoint.rsplit(":", 1)[1]))  # close() stopped the server
    assert (tmp_path / "db" / "txindex-ports.json").is_file()

    second = open_backend(url)
    try:
        assert second.endpoints == [endpoint]  # type: ignore[attr-defined]
        (kv,) = second.range(b"persist/k", b"").kvs
        assert (kv.value, kv.mod_revision) == (b"v", rev)
    finally:
        second.close()
        second.close()  # idempotent


def test_file_url_serves_one_db_at_a_time(tmp_path: Path) -> None:
    url = f"file://{tmp_path / 'db'}"
    first = open_backend(url)
    try:
        with pytest.raises(DirectoryInUse, match="another open txindex DB"):
            open_backend(url)
    finally:
        first.close()
    second = open_backend(url)  # free again once the first is closed
    second.close()


def test_file_url_reopens_after_its_process_was_killed(tmp_path: Path) -> None:
    """A process killed with its file:// DB open leaves its etcd running (it has its own
    session); the next open stops that etcd and serves the directory again."""
    directory = tmp_path / "db"
    child = subprocess.Popen(
        [sys.executable, "-c", (
            "import sys, time; from txindex.backend import Put, open_backend; "
            f"b = open_backend('file://{directory}'); "
            "b.txn([], [Put(b'crash/k', b'v')]); print('up', flush=True); time.sleep(60)"
        )],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "up"
        saved = json.loads((directory / "txindex-ports.json").read_text())
        child.kill()
        child.wait()
        assert _running(saved["pid"]), "the child's etcd should outlive it"
        again = open_backend(f"file://{directory}", start_timeout=20)
        try:
            (kv,) = again.range(b"crash/k", b"").kvs
            assert kv.value == b"v"
            assert not _running(saved["pid"])
        finally:
            again.close()
    finally:
        child.kill()
        child.wait()


def test_large_watch_batch_beyond_4mib(etcd_backend: EtcdBackend, prefix: str) -> None:
    """~6 MiB over 60 revisions written while nobody watches arrive as one catch-up batch
    larger than gRPC's default 4 MiB receive limit."""
    p = prefix.encode()
    value = b"x" * (100 * 1024)
    start = etcd_backend.current_revision() + 1
    last = 0
    for i in range(60):
        last = etcd_backend.txn([], [Put(p + b"%03d" % i, value)]).revision
    stream = etcd_backend.watch(p, prefix_end(p), start)
    received: list[int] = []
    biggest = 0
    try:
        while not received or received[-1] < last:
            resp = stream.get(10.0)
            assert resp is not None
            received.extend(e.mod_revision for e in resp.events)
            biggest = max(biggest, sum(len(e.value) for e in resp.events))
    finally:
        stream.close()
    assert received == list(range(start, last + 1))
    assert biggest > 4 * 1024 * 1024


def test_open_backend_urls() -> None:
    a, b = open_backend("memory://shared-test"), open_backend("memory://shared-test")
    private = open_backend("memory://")
    try:
        assert isinstance(a, MemoryBackend) and isinstance(private, MemoryBackend)
        rev = a.txn([], [Put(b"k", b"v")]).revision
        a.close()  # closing one handle keeps the shared store
        assert b.range(b"k", b"").kvs[0].mod_revision == rev
        assert private.range(b"k", b"").kvs == ()
        with pytest.raises(Closed):
            a.range(b"k", b"")
    finally:
        b.close()
        private.close()
    for bad in [
        "",
        "etcd://",
        "etcd://h:1,,h:2",
        "etcd://nohostport",
        "redis://x",
        "file://",
        "memory://a/b",
        "127.0.0.1:2379",
    ]:
        with pytest.raises(ValueError):
            open_backend(bad)
    for secret in ["etcd://root:Pw-SECRET@127.0.0.1:2379", "etcds://u:Pw,SECRET@h1:1,h2:2"]:
        with pytest.raises(ValueError, match="user=") as info:
            open_backend(secret)
        assert "SECRET" not in str(info.value)


def test_server_restart_pause_and_cluster_failover(tmp_path: Path) -> None:
    server = EtcdServer(tmp_path / "single")
    server.start()
    backend = EtcdBackend([server.endpoint], timeout=1.0)
    try:
        rev = backend.txn([], [Put(b"r/k", b"v")]).revision
        server.restart()  # same ports, same data
        assert backend.range(b"r/k", b"").kvs[0].mod_revision == rev
        server.pause()
        with pytest.raises(Unavailable):
            backend.current_revision()
        server.resume()
        assert backend.current_revision() == rev
    finally:
        backend.close()
        server.stop()

    cluster = EtcdCluster(tmp_path / "cluster", size=3)
    cluster.start()
    backend = open_backend(cluster.url, timeout=2.0)
    try:
        assert isinstance(backend, EtcdBackend) and len(backend.endpoints) == 3
        rev = backend.txn([], [Put(b"c/k", b"1")]).revision
        cluster.members[0].stop()  # the backend's current endpoint
        assert backend.range(b"c/k", b"").kvs[0].mod_revision == rev
        assert backend.txn([], [Put(b"c/k", b"2")]).revision == rev + 1
    finally:
        backend.close()
        cluster.stop()
