"""Fair retries: a ``transact`` that lost a conflict gets the next turn in its DB.

Without turns, a hot key starves all but one thread of a process: the thread that just
committed starts its next transaction at once, on a fresh snapshot, while the threads that
lost sleep their backoff and wake while its next Txn is in flight; their snapshots miss that
Txn's write, so they lose again (measured: 8 threads incrementing one key, one thread made
4,259 commits, the others 1 each, and 54 calls gave up after 10 attempts).

With turns, a retry (from its second attempt on, after its backoff) takes the DB's turn,
waits for the Txn of small commits in flight (:mod:`txindex.group`) to land, and only then
takes its snapshot; first attempts that start while a retry holds the turn wait for it to
finish. So a retry in a process loses only to other processes or to transactions that had
already begun. Every wait is bounded by :data:`TURN_SECONDS`, after which the caller goes on
without its turn: a ``transact`` nested in another's ``fn`` cannot deadlock, only wait.
Transactions opened with ``db.tx()`` take no part.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .group import GroupCommit

TURN_SECONDS = 0.1  # the longest any transaction waits for a turn, or a retry for a Txn


def check_attempts(attempts: object) -> None:
    """``ValueError`` unless ``attempts`` (of ``transact``/``atransact``) is an int >= 1."""
    if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
        raise ValueError(f"attempts must be an int >= 1, got {attempts!r}")


class Turns:
    """The retry turn of one DB."""

    def __init__(self, group: GroupCommit) -> None:
        self._gate = threading.Lock()
        self._group = group

    def first(self) -> None:
        """Before a first attempt: wait while a retry holds the turn. O(1) when none does."""
        gate = self._gate
        if gate.locked() and gate.acquire(timeout=TURN_SECONDS):
            gate.release()

    def busy(self) -> bool:
        """A retry holds the turn now. O(1)."""
        return self._gate.locked()

    def try_take(self) -> bool:
        """Take the turn if it is free, without waiting (asyncio: a task never holds a
        thread's lock while cancelled between acquiring and using it)."""
        return self._gate.acquire(blocking=False)

    def take(self) -> bool:
        """Before a retry: take the turn, then let the Txn in flight land. True if the turn
        was taken (then :meth:`give` it back)."""
        got = self._gate.acquire(timeout=TURN_SECONDS)
        try:
            self._group.wait_idle(TURN_SECONDS)
        except BaseException:  # (KeyboardInterrupt): never leave the turn taken
            self.give(got)
            raise
        return got

    def give(self, taken: bool) -> None:
        if taken:
            self._gate.release()
