"""Typed errors raised by txindex. Every error is importable from ``txindex``."""

from __future__ import annotations

from typing import Any


class TxIndexError(Exception):
    """Base class of every error txindex raises on purpose."""


class Conflict(TxIndexError):
    """Transient: another transaction changed what this one read. Retry the whole transaction."""


class UniqueViolation(TxIndexError):
    """A put would give a unique index value a second holder.

    ``index`` is the index's qualified name (``Model.index``), ``value`` the clashing value and
    ``holder`` the primary key of the object that already holds it.
    """

    def __init__(self, index: str, value: Any, holder: Any) -> None:
        super().__init__(f"unique index {index}: value {value!r} is already held by {holder!r}")
        self.index = index
        self.value = value
        self.holder = holder


class CommitUnknown(TxIndexError):
    """The commit request may or may not have been applied (timeout, lost connection, leader
    change). Never retried blindly: read the state again to find out."""


class TxTooLarge(TxIndexError):
    """The transaction does not fit one etcd Txn (operations or bytes). It is never split."""


class Closed(TxIndexError):
    """The database is closed, or the transaction has already ended."""


class DecodeError(TxIndexError):
    """A stored value does not decode into its model. ``key`` names the etcd key."""

    def __init__(self, key: str, reason: str) -> None:
        super().__init__(f"cannot decode {key!r}: {reason}")
        self.key = key
        self.reason = reason


class ModelError(TxIndexError, TypeError):
    """A model or index declaration is invalid, or an object/key does not fit its model."""


class UnorderableValue(TxIndexError, TypeError):
    """An index value cannot be ordered (names model, index and field)."""


class RequestRejected(TxIndexError, ValueError):
    """The server refused a request as invalid (duplicate key in a Txn, future revision, empty
    key, bad compare). Definite: nothing was applied; retrying the same request fails again."""


class AuthError(RequestRejected):
    """etcd refused the credentials (wrong user or password, missing token, permission
    denied). Definite: nothing was applied. Never carries the password or a token."""


class Unavailable(TxIndexError):
    """No etcd endpoint answered a read-only request (safe to retry)."""


class Compacted(TxIndexError):
    """The requested revision has been compacted away on the server."""

    def __init__(self, compact_revision: int) -> None:
        super().__init__(f"revision compacted; oldest available is {compact_revision}")
        self.compact_revision = compact_revision


class SubscriptionLagged(TxIndexError):
    """An iterator subscription fell ``max_pending`` changes behind its consumer and was
    ended. ``revision`` is that of the first change not delivered (the changes before it
    were, in order; a revision that changed several keys may have been delivered in part).
    Raised once the changes queued before it are consumed. Re-read the state with
    ``db.read()`` and subscribe again."""

    def __init__(self, revision: int, max_pending: int) -> None:
        super().__init__(
            f"subscription fell {max_pending} changes behind; changes from revision {revision} "
            "on were not all delivered: re-read with db.read() and subscribe again"
        )
        self.revision = revision
        self.max_pending = max_pending


class DirectoryInUse(TxIndexError):
    """A ``file://`` directory is already served by another open DB (in this process or
    another): one DB at a time serves a directory."""


class WatchBroken(TxIndexError):
    """A watch stream ended or failed; the watcher reconnects."""
