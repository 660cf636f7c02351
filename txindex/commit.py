"""The commit protocol: one etcd Txn per transaction, serializable across processes.

Let R be the transaction's snapshot and V the store's applied revision when the Txn is built.

1. **Local validation** over the change log ``(R, V]``: a change to a key the transaction read,
   or a change whose old or new index keys fall inside a recorded predicate, is a real
   conflict: raise :class:`~txindex.errors.Conflict`.
2. **Compares** that carry the check from V to the commit point on the server:

   * each point read: ``mod_revision(key) == seen`` (``0`` for an absent key), which catches
     updates, creates and deletes, by anyone;
   * each model that a predicate (index query) read: ``mod_revision < V + 1`` on the model's
     *fence* key (``<prefix>__txindex__/fence/<model prefix>``), which every txindex commit
     that writes objects of the model also writes. A range compare over the model's keys would
     miss deletes (a deleted key leaves the range) and costs etcd a scan of the whole range
     on every commit; the fence is one key.
   * When point compares would exceed the compare budget (``max_txn_ops``), the point reads of
     the models with the most reads are covered by the model's fence instead: never an error,
     only coarser.

3. If the Txn fails, its failure branch writes the prefix's sync key, so the watch delivers an
   event at the failure revision F; the store catches up to F and step 1 runs again over
   ``(V, F]``. Only if something the transaction read changed is it a conflict; otherwise the
   Txn is re-sent with V = F (bounded by ``max_rounds``).

Writes by other tools (``etcdctl``) do not write fences: they are applied to the cache like any
write and conflict with exact point reads, but they are not serialized against predicate reads
(or point reads past the compare budget) of transactions in flight.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from .backend.base import Compare, Delete, Op, Put
from .errors import Conflict, TxTooLarge
from .model import ModelInfo
from .store import Change, Entry, index_keys

if TYPE_CHECKING:
    from .transaction import Predicate, Transaction

FENCE = "__txindex__/fence/"


def commit(tx: Transaction) -> int:
    """Send ``tx``'s writes as one Txn; returns the commit revision."""
    db = tx._db
    store = tx._store
    ops = _ops(tx)
    _check_size(tx, ops)
    point_keys, guarded = _plan_compares(tx)
    validated = tx.revision
    for _ in range(db.max_rounds):
        applied = store.revision
        _validate(tx, store.changes(validated, applied))
        validated = applied
        compares = _compares(tx, point_keys, guarded, validated)
        result = db._backend.txn(compares, ops, [Put(sync_key(db.prefix), b"")])
        if result.succeeded:
            return result.revision
        db._catch_up(result.revision)
    raise Conflict(f"gave up after {db.max_rounds} re-validation rounds under write load")


def _ops(tx: Transaction) -> list[Op]:
    prefix = tx._db.prefix
    ops: list[Op] = []
    fenced: set[str] = set()
    for key, w in tx.writes.items():
        full = (prefix + key).encode()
        ops.append(Delete(full) if w.data is None else Put(full, w.data))
        fenced.add(w.info.prefix)
    ops.extend(Put(fence_key(prefix, p), b"") for p in sorted(fenced))
    return ops


def sync_key(db_prefix: str) -> bytes:
    """Written by a failed Txn's failure branch, so that every watcher of the prefix sees an
    event at the failure revision F: catching up to F never depends on progress
    notifications (which etcd before 3.5.8 may send ahead of undelivered events)."""
    return (db_prefix + "__txindex__/sync").encode()


def fence_key(db_prefix: str, model_prefix: str) -> bytes:
    """The fence key every commit that writes ``model_prefix`` objects also writes."""
    return (db_prefix + FENCE + model_prefix).encode()


def _check_size(tx: Transaction, ops: list[Op]) -> None:
    db = tx._db
    if len(ops) > db.max_txn_ops:
        raise TxTooLarge(
            f"transaction needs {len(ops)} operations; one etcd Txn takes {db.max_txn_ops} "
            "(--max-txn-ops). Split it into several transactions."
        )
    size = sum(len(op.key) + len(op.value) + 16 if isinstance(op, Put) else len(op.key) + 8
               for op in ops)
    if size > db.max_request_bytes:
        raise TxTooLarge(
            f"transaction is {size} bytes; one etcd request takes {db.max_request_bytes} "
            "(--max-request-bytes)"
        )


def _plan_compares(tx: Transaction) -> tuple[list[str], set[ModelInfo]]:
    """Which reads get exact point compares, and which models a coarse guard."""
    guarded = {pred[0].model.__txindex_model__ for pred in tx.predicates}
    infos = {info.prefix: info for info in tx._store.models}
    points = [k for k in tx.reads if _model_of(infos, k) not in guarded]
    budget = tx._db.max_txn_ops
    by_model = Counter(_model_of(infos, k) for k in points)
    while len(points) + len(guarded) > budget and by_model:
        info, _ = by_model.most_common(1)[0]
        del by_model[info]
        guarded.add(info)
        points = [k for k in points if _model_of(infos, k) is not info]
    if len(guarded) > budget:
        raise TxTooLarge(f"transaction reads {len(guarded)} models; too many to guard")
    return points, guarded


def _model_of(infos: dict[str, ModelInfo], key: str) -> ModelInfo:
    for prefix, info in infos.items():
        if key.startswith(prefix):
            return info
    raise KeyError(key)


def _compares(
    tx: Transaction, point_keys: list[str], guarded: set[ModelInfo], validated: int
) -> list[Compare]:
    prefix = tx._db.prefix
    compares = [Compare((prefix + k).encode(), "mod", "=", tx.reads[k]) for k in point_keys]
    compares.extend(
        Compare(fence_key(prefix, info.prefix), "mod", "<", validated + 1)
        for info in sorted(guarded, key=lambda i: i.prefix)
    )
    return compares


def _validate(tx: Transaction, changes: Iterable[Change]) -> None:
    """Raise ``Conflict`` if any change touches what ``tx`` read."""
    for change in changes:
        if change.key in tx.reads:
            raise Conflict(f"{change.key!r} changed since the transaction read it")
        for pred in tx.predicates:
            if _touches(pred, change.before) or _touches(pred, change.after):
                raise Conflict(
                    f"{pred[0].qualname}: {change.key!r} changed inside a range the "
                    "transaction queried"
                )


def _touches(pred: Predicate, entry: Entry | None) -> bool:
    index, lo, hi = pred
    if entry is None:
        return False
    for k in index_keys(index, entry):
        pair: tuple[Any, Any] = (k, entry.pk)
        if (lo is None or pair >= lo) and (hi is None or pair < hi):
            return True
    return False
