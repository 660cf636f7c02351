"""asyncio support: ``async with db.atx()``, ``async with db.aread()``, ``await db.atransact(fn)``.

::

    async with db.atx() as tx:            # a plain Transaction: reads and puts are local
        node = tx.get(Node, "n1")          # and synchronous (no network, microseconds)
        tx.put(replace(node, user="bob"))
    # the commit ran in a worker thread; the event loop kept running meanwhile

    async with db.aread() as tx:          # read-only snapshot
        tx.find(Node.by_user, "alice")

    await db.atransact(fn, attempts=10)    # fn(tx) may be sync or async; retried on Conflict

Nothing here blocks the loop on the network: the commit (one or more etcd round trips) runs in
the DB's own pool of commit threads (:data:`~txindex.db.ASYNC_COMMIT_THREADS`, started on first
use), where the commits of many tasks wait together and share Txns (group commit; the loop's
default executor, ~6 threads on 2 cores, capped the groups: 200 tasks went from ~2,350 to
~4,700 commits/s); the one wait a transaction's first read can need (the cache catching up
with this process's last commit, for read-your-writes) runs in the default executor. Each
transaction is still used by one task at a time; it is handed to the worker thread only to
commit.

Cancellation: a task cancelled while its commit runs gets ``CancelledError``, but the commit
itself is not interrupted and may be applied (treat it like ``CommitUnknown``).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import random
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, TypeVar

from .errors import Conflict, Unavailable
from .transaction import Transaction
from .turns import TURN_SECONDS, check_attempts

if TYPE_CHECKING:
    from .db import DB

__all__ = ["AsyncTx", "atransact"]

T = TypeVar("T")


class AsyncTx:
    """``async with`` wrapper of one :class:`~txindex.transaction.Transaction`: commits (in a
    worker thread) on a clean exit of a read-write transaction, rolls back otherwise."""

    __slots__ = ("_db", "_tx", "_writable")

    def __init__(self, db: DB, *, writable: bool) -> None:
        db._check_open()
        self._db = db
        self._writable = writable
        self._tx: Transaction | None = None

    async def __aenter__(self) -> Transaction:
        db = self._db
        store = db._store
        if store.revision < db._visible:
            # Read-your-writes: the snapshot must include this process's last commit; wait
            # for the watcher off the loop (the fast path above costs nothing).
            await asyncio.to_thread(_wait_visible, db)
        tx = Transaction(db, writable=self._writable)
        tx._pin()  # no wait now (unless another commit landed in between: rare, and short)
        self._tx = tx
        return tx

    async def __aexit__(self, exc_type: object, exc: object, tb: object) -> None:
        tx = self._tx
        assert tx is not None
        if tx._done:
            return
        if exc_type is None and self._writable:
            if tx.writes:
                pool = self._db._commit_pool()
                run = functools.partial(contextvars.copy_context().run, tx.commit)
                await asyncio.get_running_loop().run_in_executor(pool, run)
            else:
                tx.commit()  # nothing to send: ends the transaction without a thread hop
        else:
            tx.rollback()


def _wait_visible(db: DB) -> None:
    """Wait (in a worker thread) for the cache to reach this process's last commit; raises
    ``Unavailable`` after ``db.timeout``, so that the pin on the loop never waits again."""
    db._watcher.nudge()
    visible = db._visible
    if not db._store.wait_for(visible, db.timeout):
        raise db._behind(visible)


async def atransact(
    db: DB, fn: Callable[[Transaction], T | Awaitable[T]], attempts: int = 10
) -> T:
    """Run ``fn(tx)`` (sync, or async and awaited) in ``db.atx()`` and commit, retrying the
    whole ``fn`` on ``Conflict`` (and ``Unavailable``) with jittered exponential backoff
    (``asyncio.sleep``), at most ``attempts`` times. ``CommitUnknown`` propagates. A retry
    takes the DB's retry turn when it is free (:mod:`txindex.turns`)."""
    check_attempts(attempts)
    delay = 0.002
    turns = db._turns
    for attempt in range(attempts):
        taken = False
        if attempt:
            await asyncio.sleep(delay * random.random())
            delay = min(delay * 2, 0.25)
            taken = turns.try_take()  # as db.transact, without waiting for the turn
        elif turns.busy():
            await asyncio.to_thread(turns.first)
        try:
            if taken:
                await asyncio.to_thread(db._group.wait_idle, TURN_SECONDS)
            async with AsyncTx(db, writable=True) as tx:
                result = fn(tx)
                if inspect.isawaitable(result):
                    result = await result
                return result
        except (Conflict, Unavailable):  # as db.transact: Unavailable means nothing was sent
            if attempt == attempts - 1:
                raise
        finally:
            turns.give(taken)
    raise AssertionError("unreachable")
