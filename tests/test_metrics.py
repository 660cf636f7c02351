"""Observability: the Metrics hook, PrometheusMetrics, and what is logged (txindex.metrics)."""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

import txindex
from txindex import DB, CommitUnknown, Conflict
from txindex.backend import Put
from txindex.metrics import Metrics, Observer, PrometheusMetrics, safe_url
from txindex.server import EtcdServer

from .models import MODELS, Counter, Node


class Rec(Metrics):
    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.calls: list[tuple[str, tuple[Any, ...]]] = []

    def _add(self, name: str, *args: Any) -> None:
        with self.lock:
            self.calls.append((name, args))

    def names(self, name: str) -> list[tuple[Any, ...]]:
        with self.lock:
            return [a for n, a in self.calls if n == name]

    def commit_latency(self, seconds: float) -> None:
        self._add("latency", seconds)

    def conflict(self) -> None:
        self._add("conflict")

    def commit_unknown(self) -> None:
        self._add("unknown")

    def resync(self) -> None:
        self._add("resync")

    def reconnect(self) -> None:
        self._add("reconnect")

    def decode_error(self) -> None:
        self._add("decode_error")

    def cache_lag(self, revisions: int, seconds: float) -> None:
        self._add("lag", revisions, seconds)


def _until(pred: Callable[[], bool], timeout: float = 10) -> bool:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def test_commits_conflicts_and_lag(make_db: Callable[..., DB]) -> None:
    rec = Rec()
    db = make_db(metrics=rec)
    with db.tx() as tx:
        tx.put(Counter(1, 0))
        rev = tx.commit()
    assert rev is not None
    assert len(rec.names("latency")) == 1 and 0 < rec.names("latency")[0][0] < 10
    # the commit's revision is known, and the lag reported after it is applied is zero
    assert db.wait_for(rev, 10)
    assert _until(lambda: (0, 0.0) in rec.names("lag"))
    assert db._observer is not None and db._observer.lag() == (0, 0.0)

    a, b = db.tx(), db.tx()
    a.put(Counter(1, a.get(Counter, 1).value + 1))  # type: ignore[union-attr]
    b.put(Counter(1, b.get(Counter, 1).value + 1))  # type: ignore[union-attr]
    a.commit()
    with pytest.raises(Conflict):
        b.commit()
    assert len(rec.names("conflict")) == 1
    assert len(rec.names("latency")) == 2
    assert db.stats()["keys"] == 1  # stats() unchanged


def test_lag_definition() -> None:
    rec = Rec()
    obs = Observer(rec)
    obs.applied(10)
    assert obs.lag() == (0, 0.0)
    obs.known(13)  # this process committed revision 13; the cache is at 10
    time.sleep(0.02)
    revisions, seconds = obs.lag()
    assert revisions == 3 and seconds >= 0.02
    obs.known(15)
    obs.applied(13)  # 13 arrived: lag now measured from 15's commit
    revisions, seconds = obs.lag()
    assert revisions == 2 and seconds < 0.02
    obs.progress(20)  # everything up to 20 delivered
    assert obs.lag() == (0, 0.0)
    assert rec.names("lag")[-1] == (0, 0.0)


def test_decode_errors_reconnects_resyncs(make_db: Callable[..., DB], prefix: str) -> None:
    rec = Rec()
    db = make_db(metrics=rec)
    rev = db._backend.txn([], [Put(f"{prefix}nodes/bad".encode(), b"{nope")]).revision
    assert db.wait_for(rev, 10)
    assert len(rec.names("decode_error")) == 1
    stream = db._watcher._stream
    assert stream is not None
    stream.close()  # the stream dies under the watcher: it reconnects
    assert _until(lambda: len(rec.names("reconnect")) == 1)
    assert _until(lambda: db._watcher._stream not in (None, stream))
    db._watcher._resync()
    assert len(rec.names("resync")) == 1
    assert db.stats()["reconnects"] == 1 and db.stats()["resyncs"] == 1


def test_metrics_hook_errors_are_swallowed(make_db: Callable[..., DB]) -> None:
    class Broken(Metrics):
        def commit_latency(self, seconds: float) -> None:
            raise RuntimeError("exporter down")

    db = make_db(metrics=Broken())
    for i in range(2):
        with db.tx() as tx:
            tx.put(Counter(1, i))
    with db.read() as tx:
        assert tx.get(Counter, 1) == Counter(1, 1)


def test_prometheus_exporter(make_db: Callable[..., DB]) -> None:
    reg = CollectorRegistry()
    db = make_db(metrics=PrometheusMetrics(registry=reg, labels={"db": "main"}))
    with db.tx() as tx:
        tx.put(Node("n1", "alice", "10.0.0.1"))
        rev = tx.commit()
    a, b = db.tx(), db.tx()
    a.get(Node, "n1")
    b.get(Node, "n1")
    a.put(Node("n1", "bob", "10.0.0.1"))
    b.put(Node("n1", "carol", "10.0.0.1"))
    a.commit()
    with pytest.raises(Conflict):
        b.commit()
    labels = {"db": "main"}
    assert reg.get_sample_value("txindex_commit_seconds_count", labels) == 2
    assert reg.get_sample_value("txindex_conflicts_total", labels) == 1
    assert reg.get_sample_value("txindex_commit_unknown_total", labels) == 0
    assert rev is not None and db.wait_for(rev, 10)
    assert _until(lambda: reg.get_sample_value("txindex_cache_lag_revisions", labels) == 0)


def test_commit_unknown_is_counted_and_logged_without_values(
    etcd_server: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    rec = Rec()
    db = txindex.open(etcd_server.url, models=MODELS, prefix=prefix, metrics=rec, timeout=0.5)
    try:
        with db.tx() as tx:
            tx.put(Counter(7, 1))
        secret = "s3cr3t-" + uuid.uuid4().hex
        tx = db.tx()
        tx.put(Node("n1", secret, "10.0.0.1"))
        etcd_server.pause()
        try:
            with caplog.at_level(logging.WARNING, logger="txindex"), pytest.raises(CommitUnknown):
                tx.commit()
        finally:
            etcd_server.resume()
        assert len(rec.names("unknown")) == 1
        text = caplog.text
        assert "commit outcome unknown" in text and "nodes/n1" in text
        assert secret not in text
    finally:
        db.close()


def test_commit_unknown_is_logged_without_metrics(
    etcd_server: EtcdServer, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    db = txindex.open(etcd_server.url, models=MODELS, prefix=prefix, timeout=0.5)
    try:
        tx = db.tx()
        tx.put(Counter(8, 1))
        etcd_server.pause()
        try:
            with caplog.at_level(logging.WARNING, logger="txindex"), pytest.raises(CommitUnknown):
                tx.commit()
        finally:
            etcd_server.resume()
        assert "commit outcome unknown" in caplog.text and "counters/8" in caplog.text
    finally:
        db.close()


def test_open_and_close_are_logged_without_credentials(
    db_url: str, prefix: str, caplog: pytest.LogCaptureFixture
) -> None:
    with caplog.at_level(logging.INFO, logger="txindex"):
        db = txindex.open(db_url, models=MODELS, prefix=prefix)
        db.close()
    assert "txindex: opened" in caplog.text and "loaded 0 keys" in caplog.text
    assert "txindex: closed" in caplog.text
    assert safe_url("etcd://root:pw@h1:2379,u:p@h2:2379") == "etcd://h2:2379"
    assert safe_url("etcd://root:Pw,SECRET@h1:2379") == "etcd://h1:2379"  # a comma in it
    assert safe_url("etcd://root:a@b@h1:2379") == "etcd://h1:2379"
    assert safe_url("file:///data") == "file:///data"
