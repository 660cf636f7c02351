"""A 100k-key prefix loads in pages at one pinned revision, on a private etcd server.

The data (100k Node values, > 4 MiB) is written once per module with raw Txns of 128 puts
from a few threads. A single unlimited Range of it cannot pass gRPC's default 4 MiB receive
limit, and a counting backend subclass proves the DB's load paged and pinned its revision.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest

from txindex import DB
from txindex.backend import EtcdBackend
from txindex.backend.base import Delete, Put, RangePage, prefix_end
from txindex.errors import TxIndexError
from txindex.model import info_of
from txindex.server import EtcdServer

from .consistency import assert_converged
from .models import MODELS, Node

N = 100_000
PREFIX = "load/"
USERS = 10
NODE = info_of(Node)
GRPC_DEFAULT_RECEIVE = 4 * 1024 * 1024


class CountingBackend(EtcdBackend):
    """An EtcdBackend that records every Range it serves: (requested revision, limit,
    keys returned, revision read at)."""

    def __init__(self, endpoints: Sequence[str], **options: Any) -> None:
        super().__init__(endpoints, **options)
        self.ranges: list[tuple[int, int, int, int]] = []

    def range(
        self, key: bytes, range_end: bytes, *, revision: int = 0, limit: int = 0
    ) -> RangePage:
        page = super().range(key, range_end, revision=revision, limit=limit)
        self.ranges.append((revision, limit, len(page.kvs), page.revision))
        return page


def node(i: int, gen: int = 0) -> Node:
    return Node(
        f"n{i:06d}",
        f"u{i % USERS}",
        f"{10 + i // 65536}.{gen}.{i // 256 % 256}.{i % 256}",
        ("prod",) if i % 2 else ("prod", "gpu"),
        float(i % 7),
    )


def key(i: int) -> bytes:
    return f"{PREFIX}nodes/n{i:06d}".encode()


@pytest.fixture(scope="module")
def loaded(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[EtcdServer, int]]:
    """A private etcd holding N nodes under PREFIX; yields (server, total bytes written)."""
    server = EtcdServer(Path(tmp_path_factory.mktemp("etcd-load")))
    server.start()
    try:
        raw = EtcdBackend([server.endpoint], timeout=30.0)
        total = [0]
        lock = threading.Lock()

        def write(chunks: list[range]) -> None:
            for chunk in chunks:
                ops = [Put(key(i), NODE.encode(node(i))) for i in chunk]
                assert raw.txn([], ops).succeeded
                with lock:
                    total[0] += sum(len(o.key) + len(o.value) for o in ops)

        chunks = [range(s, min(s + 128, N)) for s in range(0, N, 128)]
        t0 = time.monotonic()
        threads = [threading.Thread(target=write, args=(chunks[k::4],)) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        print(f"wrote {N} keys ({total[0] / 2**20:.1f} MiB) in {time.monotonic() - t0:.1f}s")
        raw.close()
        yield server, total[0]
    finally:
        server.stop()


def open_counting(server: EtcdServer) -> tuple[DB, CountingBackend]:
    backend = CountingBackend([server.endpoint], timeout=10.0)
    try:
        return DB(backend, MODELS, prefix=PREFIX, timeout=10.0), backend
    except BaseException:
        backend.close()
        raise


def check_paged_and_pinned(backend: CountingBackend, db: DB) -> int:
    pages = backend.ranges
    assert len(pages) >= N // 2000, f"only {len(pages)} Range calls for {N} keys"
    assert all(0 < limit <= 10_000 for _, limit, _, _ in pages), "a Range without a limit"
    first_requested, _, _, pinned = pages[0]
    assert first_requested == 0
    assert all(req == pinned for req, _, _, _ in pages[1:]), "pages read at different revisions"
    # (etcd's header revision is the server's current one, so later pages may report more)
    assert all(at >= pinned for _, _, _, at in pages)
    assert sum(n for _, _, n, _ in pages) == db._watcher.stats.loaded_keys
    return pinned


def test_single_range_cannot_hold_the_prefix(loaded: tuple[EtcdServer, int]) -> None:
    server, total = loaded
    assert total > GRPC_DEFAULT_RECEIVE, total
    small = EtcdBackend(
        [server.endpoint], grpc_options=[("grpc.max_receive_message_length", GRPC_DEFAULT_RECEIVE)]
    )
    try:
        with pytest.raises(TxIndexError, match=r"(?i)resource|larger than max|exhaust"):
            small.range(PREFIX.encode(), prefix_end(PREFIX.encode()))
    finally:
        small.close()


def test_100k_keys_load_in_pages(loaded: tuple[EtcdServer, int]) -> None:
    server, _ = loaded
    t0 = time.monotonic()
    db, backend = open_counting(server)
    try:
        took = time.monotonic() - t0
        pinned = check_paged_and_pinned(backend, db)
        assert db.revision == pinned
        entries = db._store.entries()
        assert len(entries) == N
        assert entries[f"nodes/n{N - 1:06d}"].value == node(N - 1)
        assert db._watcher.stats.decode_errors == 0
        with db.read() as r:
            for u in range(USERS):
                assert r.count(Node.by_user, f"u{u}") == N // USERS
            assert r.count(Node.by_tag, "prod") == N
            assert r.count(Node.by_tag, "gpu") == N // 2
            assert r.first(Node.by_ip, "10.0.1.2") == node(258)
            assert len(list(r.range(Node.active, 6.0, None))) == len(range(6, N, 7))
            assert r.count(Node.by_user_seen, ("u3", 3.0)) == sum(
                1 for i in range(N) if i % USERS == 3 and i % 7 == 3
            )
        raw = EtcdBackend([server.endpoint], timeout=10.0)
        try:
            ms = assert_converged(db, raw, PREFIX, timeout=60)
        finally:
            raw.close()
        pages = len(backend.ranges)
        print(f"load: {N} keys in {took:.1f}s, {pages} Range pages, check {ms:.0f} ms")
    finally:
        db.close()


def test_load_pinned_while_writer_writes(loaded: tuple[EtcdServer, int]) -> None:
    server, _ = loaded
    stop = threading.Event()
    revisions: list[int] = []
    errors: list[BaseException] = []

    def writer() -> None:
        w = EtcdBackend([server.endpoint], timeout=10.0)
        rnd = random.Random(5)
        gen = 1
        try:
            while not stop.is_set():
                i = rnd.randrange(N + 1000)  # updates, deletes and new keys
                if rnd.random() < 0.3:
                    res = w.txn([], [Delete(key(i))])
                else:
                    gen = gen % 250 + 1
                    res = w.txn([], [Put(key(i), NODE.encode(node(i, gen)))])
                assert res.succeeded
                revisions.append(res.revision)
        except BaseException as exc:
            errors.append(exc)
        finally:
            w.close()

    t = threading.Thread(target=writer)
    t.start()
    try:
        while len(revisions) < 20:
            assert not errors, errors
            time.sleep(0.01)
        db, backend = open_counting(server)
    finally:
        if t.is_alive() and "db" not in locals():
            stop.set()
    try:
        pinned = check_paged_and_pinned(backend, db)
        time.sleep(0.3)
        stop.set()
        t.join(timeout=20)
        assert not errors, errors
        assert any(r > pinned for r in revisions), "the writer wrote nothing after the pin"
        assert any(r < pinned for r in revisions)
        raw = EtcdBackend([server.endpoint], timeout=10.0)
        try:
            ms = assert_converged(db, raw, PREFIX, timeout=60)
        finally:
            raw.close()
        print(f"load under writes: {len(revisions)} writes, pinned {pinned}, converged {ms:.0f} ms")
    finally:
        db.close()
