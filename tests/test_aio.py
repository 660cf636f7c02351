"""asyncio: db.atx(), db.aread(), db.atransact() (txindex.aio) against real etcd."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine, Iterator
from typing import Any

import pytest

import txindex
from txindex import DB, Conflict, Transaction
from txindex.backend import Put
from txindex.server import EtcdServer

from .models import MODELS, Counter, Node, User
from .test_local_apply import watcher_held


@pytest.fixture
def edb(etcd_url: str, prefix: str) -> Iterator[DB]:
    db = txindex.open(etcd_url, models=MODELS, prefix=prefix)
    yield db
    db.close()


class Heartbeat:
    """Ticks every 5 ms on the loop; records the largest gap between ticks."""

    def __init__(self) -> None:
        self.max_gap = 0.0
        self.ticks = 0
        self._stop = False

    async def run(self) -> None:
        last = time.perf_counter()
        while not self._stop:
            await asyncio.sleep(0.005)
            now = time.perf_counter()
            self.max_gap = max(self.max_gap, now - last)
            self.ticks += 1
            last = now

    def stop(self) -> None:
        self._stop = True


def run(coro: Coroutine[Any, Any, Any]) -> Any:
    return asyncio.run(coro)


def test_loop_keeps_ticking_while_commits_run(edb: DB) -> None:
    async def main() -> tuple[float, int]:
        hb = Heartbeat()
        beat = asyncio.create_task(hb.run())
        await asyncio.sleep(0.02)

        async def bump(tx: Transaction) -> None:
            c = tx.get(Counter, 1) or Counter(1, 0)
            await asyncio.sleep(0)  # an async fn: other tasks run between read and write
            tx.put(Counter(1, c.value + 1))

        async def worker() -> None:
            for _ in range(10):
                await edb.atransact(bump, attempts=100)

        await asyncio.gather(*(worker() for _ in range(4)))
        hb.stop()
        await beat
        async with edb.aread() as tx:
            final = tx.get(Counter, 1)
        assert final is not None
        return hb.max_gap, final.value

    gap, value = run(main())
    assert value == 40  # serializable: no lost update among 40 concurrent increments
    assert gap < 0.05, f"event loop blocked for {gap * 1000:.1f} ms"


def test_commit_against_a_stalled_server_does_not_block_the_loop(
    edb: DB, etcd_server: EtcdServer
) -> None:
    """The commit waits ~300 ms for a paused etcd; the loop must keep ticking meanwhile."""

    async def main() -> tuple[float, float, int]:
        hb = Heartbeat()
        beat = asyncio.create_task(hb.run())
        await asyncio.sleep(0.02)
        etcd_server.pause()
        resumer = threading.Timer(0.3, etcd_server.resume)
        resumer.start()
        try:
            start = time.perf_counter()
            async with edb.atx() as tx:
                tx.put(Node("n1", "alice", "10.0.0.1"))
            took = time.perf_counter() - start
        finally:
            resumer.join()
            etcd_server.resume()
        hb.stop()
        await beat
        return took, hb.max_gap, hb.ticks

    took, gap, ticks = run(main())
    assert took >= 0.25  # the commit really waited for the stalled server
    assert gap < 0.05, f"event loop blocked for {gap * 1000:.1f} ms"
    assert ticks >= 20
    with edb.read() as tx:
        assert tx.get(Node, "n1") == Node("n1", "alice", "10.0.0.1")


def test_atx_read_your_writes_rollback_and_aread(make_db: Callable[..., DB]) -> None:
    db = make_db()

    async def main() -> None:
        async with db.atx() as tx:
            tx.put(Node("n1", "alice", "10.0.0.1"))
            assert tx.get(Node, "n1") is not None
        async with db.aread() as tx:  # sees the commit just made (read-your-writes)
            assert [n.id for n in tx.find(Node.by_user, "alice")] == ["n1"]
        with pytest.raises(RuntimeError):
            async with db.atx() as tx:
                tx.put(Node("n2", "alice", "10.0.0.2"))
                raise RuntimeError("abort")
        async with db.aread() as tx:
            assert tx.get(Node, "n2") is None
            with pytest.raises(txindex.ModelError):
                tx.put(Node("n3", "x", "y"))  # read-only
        async with db.atx() as tx:  # no writes: ends without a commit
            assert tx.get(Node, "n1") is not None

    run(main())


def test_atransact_sync_fn_retries_conflicts_and_returns(make_db: Callable[..., DB]) -> None:
    db = make_db()
    other = make_db()
    with db.tx() as tx:
        tx.put(Counter(1, 0))
        rev = tx.commit()
    assert rev is not None and other.wait_for(rev, 10)
    calls = []

    def fn(tx: Transaction) -> int:
        c = tx.get(Counter, 1)
        assert c is not None
        calls.append(c.value)
        if len(calls) == 1:  # someone else commits in between: the first attempt conflicts
            with other.tx() as otx:
                otx.put(Counter(1, 100))
        tx.put(Counter(1, c.value + 1))
        return c.value + 1

    result = run(db.atransact(fn))
    assert result == 101 and len(calls) == 2

    def always_conflicts(tx: Transaction) -> None:
        raise Conflict("synthetic")

    with pytest.raises(Conflict):
        run(db.atransact(always_conflicts, attempts=3))
    with pytest.raises(ValueError):
        run(db.atransact(fn, attempts=0))


def test_a_cache_behind_the_last_commit_does_not_block_the_loop(
    make_db: Callable[..., DB],
) -> None:
    """Our commit is kept behind another writer's revision the watch does not apply: the
    first read waits for it in a worker thread, once, then raises ``Unavailable``; the loop
    keeps ticking (the pin on the loop never waits the timeout a second time)."""
    timeout = 0.5
    db = make_db(timeout=timeout)
    with watcher_held(db):
        db._backend.txn([], [Put((db.prefix + "users/foreign").encode(), b'{"name": "f"}')])
        with db.tx() as tx:
            tx.put(User("mine"))  # kept: the store has not applied the foreign revision
        assert db.revision < db._visible

        async def main() -> tuple[float, float]:
            hb = Heartbeat()
            beat = asyncio.create_task(hb.run())
            await asyncio.sleep(0.02)
            start = time.perf_counter()
            with pytest.raises(txindex.Unavailable):
                async with db.aread():
                    pass
            took = time.perf_counter() - start
            hb.stop()
            await beat
            return took, hb.max_gap

        took, gap = run(main())
    assert took < 1.8 * timeout, f"waited {took:.2f}s: twice the timeout"
    assert gap < timeout / 2, f"event loop blocked for {gap * 1000:.0f} ms"
    with db.read() as tx:  # the watch applied both once released
        assert tx.get(User, "mine") == User("mine")


def test_async_commits_run_in_the_dbs_commit_pool(make_db: Callable[..., DB]) -> None:
    """Commits of tasks wait in the DB's own pool of threads (where they share Txns), not in
    the loop's small default executor; the pool ends with the DB."""
    db = make_db()
    threads: set[str] = set()
    send = db._group.send

    def recording(req: Any) -> Any:
        threads.add(threading.current_thread().name)
        return send(req)

    db._group.send = recording  # type: ignore[method-assign]

    async def main() -> None:
        async def bump(n: int) -> None:
            async with db.atx() as tx:
                tx.put(Counter(n, n))

        await asyncio.gather(*(bump(n) for n in range(20)))

    run(main())
    assert threads and all(t.startswith("txindex-commit") for t in threads), threads
    with db.read() as tx:
        assert [tx.get(Counter, n) for n in range(20)] == [Counter(n, n) for n in range(20)]
    pool = db._async_pool
    db.close()
    assert pool is not None and pool._shutdown
