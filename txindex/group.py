"""Group commit: concurrent commits of one DB share one etcd Txn.

While a Txn of small commits is in flight, other threads' small commits queue. When it
answers, the first queued thread leads the next Txn: itself and every queued commit that fits
(the compare and operation budget, the request size) and that no other member touches,
merged into one Txn. A lone committer (nothing in flight) sends at once, so a
single-threaded process sees no change; with many threads, the etcd round trips, the Raft
entries and the watch events per commit fall with the size of the groups. A large commit
(more than a quarter of a budget) could share its Txn with little, so it never queues: it
goes out at once in its own Txn, side by side with others, as every commit did before
groups.

Why a group is as good as its members one by one: members touch disjoint things. No member
writes (puts, deletes, or writes a fence of) a key another member compares, so every
member's compares decide the same whether or not the others' writes happen, and the members
serialize in any order at the group's one revision C. Shared fence writes (two members
moving keys of one model) merge into one put: a fence only says "changed at C".

Before sending, the leader runs each member's local validation over what the store applied
since the member built its compares (it may have queued behind a Txn that wrote what it
read): a member that fails it gets its ``Conflict`` without a Txn, and the others go on; a
member that passes has its fence compares start from the revision the check reached (the
Txn it waited behind wrote the fence of a range it queried, and changed nothing in it).
The group's writes are every change of the prefix at C, so the leader applies them locally as
one batch (one member's writes alone at C would let the watch skip the others'). If the Txn
fails, the leader cannot tell which member's compare failed: every member gets the failure
revision, re-validates, and re-sends alone; if the server refuses the group's size (its
``--max-txn-ops`` below the DB's ``max_txn_ops``), every member is sent again alone. If its
outcome is unknown, every member gets the same ``CommitUnknown``.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import _seeded
from .backend.base import Compare, Op, Put, TxnResult
from .errors import CommitUnknown, TxTooLarge

if TYPE_CHECKING:
    from .backend.base import Backend
    from .store import Entry
    from .watcher import Watcher

log = logging.getLogger("txindex")

IDLE_POLL_SECONDS = 0.0002  # how often wait_idle looks (a Txn takes ~0.5 ms on loopback)

#: A member's writes as store updates at a commit revision (for the local apply).
Updates = Callable[[int], "list[tuple[str, Entry | None]]"]


class Request:
    """One transaction's Txn, queued for a group. Its compares: ``points`` (exact
    mod_revision compares), then ``mod_revision < validated + 1`` on each of the ``guards``
    (the fences of its predicates, :mod:`txindex.commit`), ``validated`` being the revision
    its local validation reached."""

    __slots__ = (
        "alone", "check", "compares", "error", "guards", "lead", "led", "ops", "points",
        "result", "shared", "size", "updates", "validated", "wake",
    )

    def __init__(
        self, points: list[Compare], guards: list[bytes], validated: int, ops: list[Op],
        size: int, updates: Updates, check: Callable[[], int], alone: bool = False,
    ) -> None:
        self.points, self.guards = points, guards
        self.validated = validated
        self.compares = self._compares()
        self.ops, self.size, self.updates = ops, size, updates
        # validates against the store as it is now: raises Conflict if it shows a change the
        # transaction read, else returns the revision validated up to
        self.check = check
        self.alone = alone  # never grouped (a retry after its group failed)
        self.result: TxnResult | None = None
        self.error: BaseException | None = None
        self.lead = False  # handed the lead of the next Txn
        self.led = False  # began leading it (then hands it over, whatever happens)
        self.shared = False  # sent in a Txn with other commits
        self.wake: threading.Event | None = None

    def revalidated(self, validated: int) -> None:
        """Its local validation now covers the store up to ``validated``: the guards'
        compares need only hold from there (a commit that waited behind a Txn writing one
        of its fences, at a revision the store has applied, is not failed by it). O(g)."""
        if validated != self.validated:
            self.validated = validated
            self.compares = self._compares()

    def _compares(self) -> list[Compare]:
        return self.points + [Compare(f, "mod", "<", self.validated + 1) for f in self.guards]

    def compared(self) -> set[bytes]:
        return {c.key for c in self.compares}

    def written(self) -> set[bytes]:
        return {op.key for op in self.ops}

    def fences(self) -> set[bytes]:
        """The keys it writes as markers (fences, the sync key): empty puts, which members
        may share."""
        return {op.key for op in self.ops if isinstance(op, Put) and not op.value}


class GroupCommit:
    """The commit queue of one DB: at most one Txn of small commits in flight, queued
    commits grouped; large commits on their own."""

    def __init__(
        self, backend: Backend, watcher: Watcher, failure: Sequence[Op],
        max_ops: int, max_bytes: int,
    ) -> None:
        self._backend, self._watcher, self._failure = backend, watcher, list(failure)
        self._max_ops, self._max_bytes = max_ops, max_bytes
        self._lock = threading.Lock()
        self._queue: list[Request] = []
        self._sending = False
        self.groups = 0  # Txns sent for more than one commit (stats)
        self.grouped = 0  # commits sent in those

    def send(self, req: Request) -> TxnResult | None:
        """Send ``req`` alone or in a group; its Txn's result (the group's revision on
        success, after the group was applied locally when it could be), or ``None`` if the
        server refused the group's size (nothing applied: send it again alone). Raises what
        the backend raised for the group, or ``Conflict`` if the store shows, before sending,
        that something ``req`` read changed. A large commit (more than a quarter of a budget)
        goes out at once in its own Txn; the others go one Txn at a time, in the order their
        leaders queued: such a commit waits for the small commits' Txn in flight (if any)
        and for nothing else."""
        if self._large(req):
            self._run([req])
        else:
            self._queued_send(req)
        if req.error is not None:
            raise req.error
        return req.result

    def wait_idle(self, timeout: float) -> None:
        """Return once no Txn of small commits is in flight or queued (its writes applied
        locally when they could be), or after ``timeout`` seconds (:mod:`txindex.turns`)."""
        deadline = time.monotonic() + timeout
        while self._sending and time.monotonic() < deadline:
            time.sleep(IDLE_POLL_SECONDS)

    def _large(self, req: Request) -> bool:
        """More than a quarter of one Txn's operations, compares or bytes: at most two
        others of its size could join it, and it goes out side by side with others
        instead (measured: 8 threads of 40-write commits lose ~6 % in groups of 3)."""
        return 4 * max(len(req.ops), len(req.compares)) > self._max_ops or (
            4 * req.size > self._max_bytes
        )

    def _queued_send(self, req: Request) -> None:
        with self._lock:
            if self._sending:
                req.wake = threading.Event()
                self._queue.append(req)
            else:
                self._sending = True
                req.lead = True
        try:
            if not req.lead:
                assert req.wake is not None
                req.wake.wait()
            if req.lead:
                self._lead(req)
        except BaseException:
            if not req.led:
                self._abandon(req)
            raise

    def _abandon(self, req: Request) -> None:
        """``req``'s thread left while queued (an exception raised in it, say by a signal
        handler): take it out of the queue, or pass on the lead it was handed, so that the
        commits behind it go on. Picked into a group already, it is sent with the group and
        its outcome is unknown to its caller."""
        with self._lock:
            if req in self._queue:
                self._queue.remove(req)
                return
            if not req.lead:
                return
        self._hand_over([req])

    def _lead(self, req: Request) -> None:
        """Pick, check and send ``req``'s group, then hand the lead over. O(q * k) to pick
        among q queued commits of k keys, then one Txn."""
        group = [req]
        try:
            req.led = True  # from here on, the lead is handed over in the finally below
            if self._queue and not req.alone:  # (a commit queueing now joins the next group)
                with self._lock:
                    group, self._queue = _pick(req, self._queue, self._max_ops, self._max_bytes)
            self._run(group)
        finally:
            self._hand_over(group)

    def _run(self, group: list[Request]) -> None:
        """Check and send ``group``; every member leaves with a result or an error, or with
        neither if the server refused the group's size."""
        try:
            ready = [m for m in group if _still_valid(m)]
            if ready:
                try:
                    result = self._txn(ready)
                except TxTooLarge:
                    if len(ready) == 1:
                        raise
                    # the server takes less than the budget we were given: each member may
                    # still fit alone (nothing was applied); no result tells it to go again
                    return
                for m in ready:
                    m.result = result
        except BaseException as exc:
            for m in group:
                if m.result is None and m.error is None:
                    # a member's Txn may have been sent: its outcome is unknown
                    m.error = exc if m is group[0] or isinstance(exc, Exception) else (
                        CommitUnknown(f"the Txn of this commit's group was interrupted: {exc!r}")
                    )

    def _txn(self, group: list[Request]) -> TxnResult:
        if len(group) == 1:
            compares, ops = group[0].compares, group[0].ops
        else:
            compares = [c for m in group for c in m.compares]
            ops = list({op.key: op for m in group for op in m.ops}.values())
            self.groups += 1
            self.grouped += len(group)
            for m in group:
                m.shared = True
        watcher = self._watcher
        watcher.commit_begins()  # the watch may read lazily: this commit applies itself
        try:
            result = self._backend.txn(compares, ops, self._failure)
            if result.succeeded:
                try:
                    updates = [u for m in group for u in m.updates(result.revision)]
                    watcher.apply_local(result.revision, updates)
                except Exception:  # committed: never fail the commit; the watch delivers it
                    log.exception("txindex: local apply of revision %d failed", result.revision)
            return result
        finally:
            watcher.commit_ends()

    def _hand_over(self, group: list[Request]) -> None:
        """Wake the group's members and the next leader (or mark the queue idle)."""
        with self._lock:
            if self._queue:
                nxt = self._queue.pop(0)
                nxt.lead = True
                assert nxt.wake is not None
                nxt.wake.set()
            else:
                self._sending = False
        for member in group[1:]:
            assert member.wake is not None
            member.wake.set()


def _still_valid(req: Request) -> bool:
    """Run ``req``'s check against the store as it is now (it may have waited behind a Txn
    that changed what it read): a ``Conflict`` (or any failure of the check) becomes its
    error and it is not sent; else its guards' compares start from what the check covered."""
    try:
        validated = req.check()
    except Exception as exc:
        req.error = exc
        return False
    req.revalidated(validated)
    return True


def _pick(
    lead: Request, queue: list[Request], max_ops: int, max_bytes: int
) -> tuple[list[Request], list[Request]]:
    """The group led by ``lead``: queued requests in order that fit the budgets and touch
    nothing another member touches; and the requests left queued. O(q * k) for q queued
    requests of k keys."""
    group = [lead]
    rest: list[Request] = []
    compared = lead.compared()
    written = lead.written()
    n_compares, n_ops, size = len(lead.compares), len(lead.ops), lead.size
    for req in queue:
        if req.alone:
            rest.append(req)
            continue
        c, w = req.compared(), req.written()
        shared = w & written
        fits = (
            n_compares + len(req.compares) <= max_ops
            and n_ops + len(req.ops) - len(shared) <= max_ops
            and size + req.size <= max_bytes
        )
        disjoint = not (w & compared) and not (c & written) and shared <= req.fences()
        if fits and (disjoint or "group_ignores_conflicts" in _seeded.active):
            group.append(req)
            compared |= c
            written |= w
            n_compares += len(req.compares)
            n_ops += len(req.ops) - len(shared)
            size += req.size
        else:
            rest.append(req)
    return group, rest
