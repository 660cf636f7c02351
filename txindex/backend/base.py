"""The backend protocol: the only surface through which txindex talks to a KV server.

Two implementations share it: :mod:`txindex.backend.etcd` (gRPC) and
:mod:`txindex.backend.memory` (in-process, same semantics). One conformance suite
(``tests/test_backend_conformance.py``) runs against both.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, Protocol


@dataclass(frozen=True, slots=True)
class KeyValue:
    """One key as a range read returns it."""

    key: bytes
    value: bytes
    mod_revision: int
    create_revision: int
    version: int


@dataclass(frozen=True, slots=True)
class Event:
    """One change seen by a watch. For a delete, ``value`` is ``b""`` and ``mod_revision`` is the
    revision of the delete."""

    key: bytes
    value: bytes
    mod_revision: int
    deleted: bool


@dataclass(frozen=True, slots=True)
class RangePage:
    """One page of a range read. ``revision`` is the server's current revision (the response
    header), even when an older revision was requested: the first page of a revision-0 read is
    therefore the revision to pin the following pages at."""

    kvs: tuple[KeyValue, ...]
    more: bool
    revision: int


CompareTarget = Literal["mod", "create", "version", "value"]
CompareOp = Literal["=", "!=", "<", ">"]


@dataclass(frozen=True, slots=True)
class Compare:
    """A Txn guard. With ``range_end`` it must hold for every key in ``[key, range_end)``.
    A missing key compares as mod/create/version 0 (a ``value`` compare on it fails)."""

    key: bytes
    target: CompareTarget
    op: CompareOp
    value: int | bytes
    range_end: bytes | None = None


@dataclass(frozen=True, slots=True)
class Put:
    key: bytes
    value: bytes


@dataclass(frozen=True, slots=True)
class Delete:
    key: bytes
    range_end: bytes | None = None


Op = Put | Delete


@dataclass(frozen=True, slots=True)
class TxnResult:
    """``revision`` is the store revision after the Txn (the commit revision when it wrote)."""

    succeeded: bool
    revision: int


@dataclass(frozen=True, slots=True)
class WatchResponse:
    """A batch of events, complete revisions only, in revision order.

    ``progress`` is true for a progress notification (no events): the server promises every
    event up to ``revision`` has been delivered on this stream.
    """

    events: tuple[Event, ...]
    revision: int
    progress: bool = False


class WatchStream(Protocol):
    """A live watch over ``[key, range_end)`` with progress notifications on."""

    def get(self, timeout: float | None) -> WatchResponse | None:
        """Next response, or ``None`` after ``timeout`` seconds with nothing.

        Raises :class:`~txindex.errors.Compacted` when the start revision is compacted, and
        :class:`~txindex.errors.WatchBroken` when the stream fails or is canceled (a response
        both created and canceled included). After either the stream is dead.
        """
        ...

    def request_progress(self) -> None:
        """Ask the server for a progress notification (answered through :meth:`get`)."""
        ...

    def close(self) -> None:
        """Cancel the watch. Idempotent."""
        ...


class Backend(Protocol):
    """A KV server with etcd's semantics: revisions, mod/create revisions, Txn, watch."""

    def range(
        self, key: bytes, range_end: bytes, *, revision: int = 0, limit: int = 0
    ) -> RangePage:
        """Keys in ``[key, range_end)`` at ``revision`` (0 = latest), sorted by key, at most
        ``limit`` (0 = all). Raises ``Compacted`` or ``Unavailable``."""
        ...

    def txn(
        self, compares: Sequence[Compare], success: Sequence[Op], failure: Sequence[Op] = ()
    ) -> TxnResult:
        """One atomic Txn. Raises ``CommitUnknown`` when the outcome is unknown and
        ``TxTooLarge`` when the server refuses its size."""
        ...

    def watch(self, key: bytes, range_end: bytes, start_revision: int) -> WatchStream:
        """Watch ``[key, range_end)`` from ``start_revision`` (must be > 0).

        A backend may also offer ``follow(key, range_end, start_revision, liveness)``: a
        stream for one thread that blocks in ``get`` (its ``timeout`` ignored), which ends
        itself (``WatchBroken``) when silent past its own liveness check; the watcher prefers
        it when present (the etcd backend has one, see ``EtcdFollowStream``)."""
        ...

    def current_revision(self) -> int:
        """The server's current revision."""
        ...

    def compact(self, revision: int) -> None:
        """Compact history up to ``revision``."""
        ...

    def close(self) -> None:
        """Release connections (and stop an embedded server). Idempotent."""
        ...


def prefix_end(prefix: bytes) -> bytes:
    """The smallest key greater than every key starting with ``prefix`` (etcd's range_end).
    O(len(prefix))."""
    end = bytearray(prefix)
    while end:
        if end[-1] < 0xFF:
            end[-1] += 1
            return bytes(end)
        end.pop()
    return b"\x00"  # etcd: range_end "\0" means "all keys >= key"


def successor(key: bytes) -> bytes:
    """The smallest key greater than ``key`` (for paging). O(len(key))."""
    return key + b"\x00"
