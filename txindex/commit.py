"""The commit protocol: one etcd Txn per transaction (or per group of transactions that touch
disjoint things, :mod:`txindex.group`), serializable across processes.

Let R be the transaction's snapshot and V the store's applied revision when the Txn is built.

1. **Local validation** over the change log ``(R, V]``: a change to a key the transaction read,
   or a change whose old or new index keys fall inside a recorded predicate, is a real
   conflict: raise :class:`~txindex.errors.Conflict`.
2. **Compares** that carry the check from V to the commit point on the server:

   * each point read: ``mod_revision(key) == seen`` (``0`` for an absent key), which catches
     updates, creates and deletes, by anyone. Every write is also such a read (the fences it
     owes depend on the index keys the object had), so a write conflicts with a concurrent
     write of the same object;
   * each predicate (index query): ``mod_revision < V + 1`` on the fence keys it depends on
     (:mod:`txindex.fences`): the bucket fence of its key and the model's coarse fence for an
     equality query, the model's fence for a range. Every txindex commit writes the fences of
     what it changes.
   * Past the compare budget (``max_txn_ops``), equality predicates coarsen to the model fence,
     then the point reads of the models with the most reads do: never an error, only coarser.

3. If the Txn fails, its failure branch writes the prefix's sync key, so the watch delivers an
   event at the failure revision F; the store catches up to F and step 1 runs again over
   ``(V, F]``. Only if something the transaction read changed is it a conflict; otherwise the
   Txn is re-sent with V = F (bounded by ``max_rounds``).

4. **Local apply.** When the Txn succeeds at revision C and the store has applied exactly
   C - 1, the store's state at C is known: one Txn is one revision, the only changes in the
   watched prefix at C are this Txn's writes, its group's (fences live outside it; the sync
   key is claimed by no model), so the committing thread applies the writes itself (the
   objects put, not decoded copies) through :meth:`~txindex.watcher.Watcher.apply_local`,
   which checks C - 1 under the store lock and runs the notification hook like the watch
   does. The watch later delivers the same revision and ignores it (at or below the applied
   revision). If the store is further behind (a revision of another writer not yet
   applied), the writes are kept (a few dozen commits at most) and applied when the store
   reaches C - 1, by the watcher or by the thread that gets it there; meanwhile
   read-your-writes waits as before.
   A failed Txn, ``Conflict``, ``TxTooLarge`` and ``CommitUnknown`` never apply anything.
5. **Group commit** (:mod:`txindex.group`): a DB has one Txn of small commits in flight at a
   time; small commits queued behind it that touch disjoint things share the next Txn (one
   revision, one local apply of all their writes), and a failed group's members re-validate
   and go alone. A queued commit is validated again (step 1) when its Txn is sent, and V
   becomes the revision that check reached. A large commit goes out at once in its own Txn,
   beside the others.

Writes by other tools (``etcdctl``) do not write fences: they are applied to the cache like any
write and conflict with exact point reads, but they are not serialized against predicate reads
(or point reads past the compare budget) of transactions in flight.

The Txn's operations: the writes, one model fence per model written, and the bucket fences of
every index key added or removed (or the model's coarse fence when those do not fit).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Iterable
from functools import partial
from typing import TYPE_CHECKING, Any

from . import _seeded
from .backend.base import Compare, Delete, Op, Put
from .codec import round_trips_exactly
from .errors import CommitUnknown, Conflict, TxTooLarge
from .fences import (
    bucket_fence,
    coarse_fence,
    equality_key,
    index_coarse_fence,
    model_fence,
    sync_key,
)
from .group import Request
from .index import Index
from .metrics import log_commit_unknown
from .model import ModelInfo
from .store import Change, Entry, index_keys

if TYPE_CHECKING:
    from .transaction import Predicate, Transaction

log = logging.getLogger("txindex")



def commit(tx: Transaction) -> int:
    """Send ``tx``'s writes as one Txn (alone or in a group); returns the commit revision."""
    # hook: txindex.metrics times and counts commits when open() got metrics= (else None)
    observer = tx._db._observer
    if observer is not None:
        return observer.commit(tx, _commit)
    try:
        return _commit(tx)
    except CommitUnknown as exc:  # hook: txindex.metrics logs it (keys only, never values)
        log_commit_unknown(tx, exc)
        raise


def _commit(tx: Transaction) -> int:
    db = tx._db
    ops = _ops(tx)
    size = _check_size(tx, ops)
    point_keys, fences = _plan_compares(tx)
    validated = tx.revision
    if _seeded.active:
        point_keys, fences = _seeded_compares(point_keys, fences)
    alone = False
    for _ in range(db.max_rounds):
        validated = _revalidate(tx, validated)
        points = [Compare((db.prefix + k).encode(), "mod", "=", tx.reads[k]) for k in point_keys]
        req = Request(
            points, fences, validated, ops, size, partial(_updates, tx),
            partial(_revalidate, tx, validated), alone,
        )
        result = db._group.send(req)
        alone = alone or req.shared  # a failed group: which member failed is unknown
        if result is None:  # its group was too large for the server
            continue
        if result.succeeded:
            return result.revision
        db._catch_up(result.revision)
    raise Conflict(f"gave up after {db.max_rounds} re-validation rounds under write load")


def _revalidate(tx: Transaction, since: int) -> int:
    """Step 1 over what the store applied after ``since``; the revision validated up to.
    Also a queued commit's check before its group is sent (:mod:`txindex.group`). O(c) for
    c changes."""
    store = tx._store
    applied = store.revision
    if applied != since:
        _validate(tx, store.changes(since, applied))
    return applied


def _updates(tx: Transaction, revision: int) -> list[tuple[str, Entry | None]]:
    """The committed writes as store updates at ``revision``, for the local apply (module
    doc, step 4). O(w) for w writes."""
    tx._unpin()  # the snapshot is no longer read: the store need keep no history for it
    updates: list[tuple[str, Entry | None]] = []
    for key, w in tx.writes.items():
        if w.obj is None:
            updates.append((key, None))
            continue
        # the object put, unless its model's encoding does not round-trip it exactly (the
        # watch would then cache another value: a list in an ``Any`` field comes back a tuple)
        obj = w.obj if round_trips_exactly(w.info.cls) else w.info.decode(w.data, key)  # type: ignore[arg-type]
        updates.append((key, Entry(w.pk, obj, revision, w.info)))
    return updates


def _ops(tx: Transaction) -> list[Op]:
    """The writes, then the fences they owe (see :mod:`txindex.fences`). O(w * i) for w
    writes of i indexes."""
    prefix = tx._db.prefix
    ops: list[Op] = []
    buckets: dict[ModelInfo, dict[Index[Any], set[bytes]]] = {}
    puts = False
    for key, w in tx.writes.items():
        full = (prefix + key).encode()
        if w.data is None:
            ops.append(Delete(full))
        else:
            ops.append(Put(full, w.data))
            puts = True
        owed = buckets.get(w.info)
        if owed is None:
            owed = buckets[w.info] = {}
        new_keys = w.keys
        for idx, old in w.old_keys.items():
            new = new_keys[idx]
            if old != new:  # (the common update moves no index key)
                fences = owed.get(idx)
                if fences is None:
                    fences = owed[idx] = set()
                for k in set(old).symmetric_difference(new):  # entered or left
                    fences.add(bucket_fence(prefix, idx, k))
    if not puts:
        # Deletes of absent keys make no event in the prefix and the fences live outside it:
        # the sync key gives the watch an event at the commit revision (read-your-writes).
        ops.append(Put(sync_key(prefix), b""))
    budget = tx._db.max_txn_ops - len(ops) - len(buckets)  # the model fences are reserved
    models = sorted(buckets, key=lambda i: sum(map(len, buckets[i].values())))
    for n, info in enumerate(models):
        ops.append(Put(model_fence(prefix, info), b""))
        later = len(models) - n - 1  # each later model may still need its coarse fence
        owed_puts = _bucket_puts(prefix, info, buckets[info], budget - later)
        budget -= len(owed_puts)
        ops.extend(Put(f, b"") for f in owed_puts)
    return ops


def _bucket_puts(
    prefix: str, info: ModelInfo, owed: dict[Index[Any], set[bytes]], budget: int
) -> list[bytes]:
    """The fences one model's writes owe for index keys they moved, in at most ``budget``
    (>= 1) keys: each index's bucket fences, else its coarse fence, else the model's coarse
    fence for the indexes left (see :mod:`txindex.fences`). Unique indexes first, then the
    indexes with the fewest buckets. O(b log b) for b bucket fences."""
    out: list[bytes] = []
    order = sorted(owed.items(), key=lambda kv: (not kv[0].unique, len(kv[1]), kv[0].name))
    for n, (index, fences) in enumerate(order):
        if not fences:
            continue
        reserve = 1 if n < len(order) - 1 else 0  # the model's coarse fence, for the rest
        if len(out) + len(fences) + reserve <= budget:
            out.extend(sorted(fences))
        elif len(out) + 1 + reserve <= budget:
            out.append(index_coarse_fence(prefix, index))
        else:
            out.append(coarse_fence(prefix, info))
            break
    return out


def _check_size(tx: Transaction, ops: list[Op]) -> int:
    """The request bytes of ``ops``; raises ``TxTooLarge`` past the server's limits."""
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
    return size


def _plan_compares(tx: Transaction) -> tuple[list[str], list[bytes]]:
    """Exact point compares, and the fences that guard the predicates (and any point reads
    beyond the compare budget)."""
    prefix = tx._db.prefix
    ranged: set[ModelInfo] = set()
    equal: dict[ModelInfo, set[bytes]] = {}
    for index, lo, hi in tx.predicates:
        info = index.model.__txindex_model__
        key = equality_key(lo, hi)
        if key is None:
            ranged.add(info)
        else:
            equal.setdefault(info, set()).update(
                (bucket_fence(prefix, index, key), index_coarse_fence(prefix, index))
            )
    budget = tx._db.max_txn_ops

    def fences() -> list[bytes]:
        out = [model_fence(prefix, i) for i in ranged]
        for info, keys in equal.items():
            if info not in ranged:
                out.append(coarse_fence(prefix, info))
                out.extend(keys)
        return sorted(out)

    planned = fences()
    if len(tx.reads) + len(planned) <= budget:  # the usual case: everything fits
        return list(tx.reads), planned
    for info in sorted(equal, key=lambda i: -len(equal[i])):  # too many buckets: coarsen
        if len(fences()) <= budget:
            break
        ranged.add(info)
    infos = {info.prefix: info for info in tx._store.models}
    points = list(tx.reads)
    by_model = Counter(_model_of(infos, k) for k in points)
    while len(points) + len(fences()) > budget and by_model:
        info, _ = by_model.most_common(1)[0]
        del by_model[info]
        ranged.add(info)
        points = [k for k in points if _model_of(infos, k) is not info]
    if len(points) + len(fences()) > budget:
        raise TxTooLarge(f"transaction reads {len(ranged)} models; too many to guard")
    return points, fences()


def _model_of(infos: dict[str, ModelInfo], key: str) -> ModelInfo:
    for prefix, info in infos.items():
        if key.startswith(prefix):
            return info
    raise KeyError(key)


def _seeded_compares(points: list[str], fences: list[bytes]) -> tuple[list[str], list[bytes]]:
    """Apply the seeded bugs of :mod:`txindex._seeded` (tests of the checker only)."""
    if "drop_compare" in _seeded.active:
        points = []
    if "skip_predicate_validation" in _seeded.active:
        fences = []
    return points, fences


def _validate(tx: Transaction, changes: Iterable[Change]) -> None:
    """Raise ``Conflict`` if any change touches what ``tx`` read."""
    skip_predicates = "skip_predicate_validation" in _seeded.active
    drop_points = "drop_compare" in _seeded.active
    for change in changes:
        if change.key in tx.reads and not drop_points:
            raise Conflict(f"{change.key!r} changed since the transaction read it")
        for pred in () if skip_predicates else tx.predicates:
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
