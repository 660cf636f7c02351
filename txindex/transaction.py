"""Transactions: snapshot reads, a write set, an index overlay, a read set and predicates.

A transaction pins the store's applied revision at its first operation and reads everything
(points and index queries) as of that revision, merged with its own writes. A read-write
transaction records what it read: each point read as ``(key, mod_revision)`` (0 for absent)
and each index query as a predicate ``(index, lo, hi)``. :mod:`txindex.commit` turns those into
one etcd Txn. The index overlay of its own writes is built by the first index query after
them (a transaction that only writes never builds one). A transaction belongs to one thread.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from .errors import Closed, DecodeError, ModelError, TxTooLarge, UniqueViolation
from .index import Index
from .model import ModelInfo, info_of
from .ordering import TOP
from .overlay import IndexOverlay, Overlay
from .store import Entry, index_keys

if TYPE_CHECKING:
    from .db import DB

M = TypeVar("M")
Predicate = tuple[Index[Any], Any, Any]  # (index, lo, hi) over (index key, primary key) pairs


class Write:
    """One key's pending write: ``obj``/``data`` are ``None`` for a delete. ``keys`` holds the
    index keys of ``obj`` (computed once, at ``put``), ``old_keys`` those the object had in the
    snapshot: together, the fences a commit must write."""

    __slots__ = ("data", "entry", "info", "keys", "obj", "old_keys", "pk")

    def __init__(
        self, info: ModelInfo, pk: Any, obj: Any, data: bytes | None,
        keys: dict[Index[Any], tuple[Any, ...]], old_keys: dict[Index[Any], tuple[Any, ...]],
    ) -> None:
        self.info, self.pk, self.obj, self.data, self.keys = info, pk, obj, data, keys
        self.entry = None if obj is None else Entry(pk, obj, 0, info)
        self.old_keys = old_keys


class Transaction:
    """A snapshot transaction; read-write unless opened with ``db.read()``."""

    __slots__ = (
        "_db", "_done", "_fenced", "_moves", "_overlay", "_rev", "_store", "_unpinned",
        "predicates", "reads", "writable", "writes",
    )

    def __init__(self, db: DB, *, writable: bool) -> None:
        self._db = db
        self._store = db._store
        self.writable = writable
        self._rev: int | None = None
        self._unpinned = False
        self._done = False
        self.reads: dict[str, int] = {}
        self.predicates: list[Predicate] = []
        self.writes: dict[str, Write] = {}
        self._fenced: set[ModelInfo] = set()
        self._overlay: Overlay | None = None  # created by the first query after a write
        # index moves of the writes not yet in the overlay: (index, pk, old keys, new keys,
        # entry), applied in order by the next index query (most commits have none after
        # their last write, and never pay for an overlay)
        self._moves: list[tuple[Index[Any], Any, tuple[Any, ...], tuple[Any, ...], Any]] = []

    # ---- lifecycle -----------------------------------------------------------------------

    @property
    def revision(self) -> int:
        """The snapshot revision (pins the snapshot if no operation has yet)."""
        return self._pin()

    def __enter__(self) -> Transaction:
        return self

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        if self._done:
            return
        if exc_type is None and self.writable:
            self.commit()
        else:
            self.rollback()

    def commit(self) -> int | None:
        """Commit as one etcd Txn; returns the commit revision (``None`` if nothing was
        written). Raises ``Conflict``, ``UniqueViolation``, ``CommitUnknown``, ``TxTooLarge``."""
        self._check_open()
        try:
            if not self.writes:
                return None
            from .commit import commit

            revision = commit(self)
            self._db._committed(revision)
            return revision
        finally:
            self._end()

    def rollback(self) -> None:
        """Drop every write; the transaction leaves no trace. Idempotent."""
        if not self._done:
            self._end()

    def _end(self) -> None:
        self._done = True
        self._overlay = None
        self._moves = []
        self._unpin()

    def _unpin(self) -> None:
        """Release the snapshot (its revision stays readable as ``revision``). Idempotent."""
        if self._rev is not None and not self._unpinned:
            self._unpinned = True
            self._store.unpin(self._rev)

    # ---- point reads ---------------------------------------------------------------------

    def get(self, cls: type[M], pk: Any) -> M | None:
        """The object with primary key ``pk`` in this snapshot, own writes included, or
        ``None``. O(1); no network. Raises ``DecodeError`` if the stored value is invalid."""
        if self._done:
            self._check_open()
        info = _info(cls)
        key = info.prefix + info.key_suffix(pk)
        if self.writes:
            w = self.writes.get(key)
            if w is not None:
                return w.obj  # type: ignore[no-any-return]
        entry = self._store.lookup(
            info, pk, key, self._rev if self._rev is not None else self._pin()
        )
        if self.writable:
            self.reads.setdefault(key, 0 if entry is None else entry.mod_revision)
        if entry is None:
            return None
        value = entry.value
        if value.__class__ is DecodeError:
            raise DecodeError(value.key, value.reason)
        return value  # type: ignore[no-any-return]

    # ---- index queries -------------------------------------------------------------------

    def find(self, index: Index[M], value: Any) -> list[M]:
        """Every object whose ``index`` key equals ``value``, ordered by (index key, primary
        key). O(log n + m)."""
        try:
            lo, hi = index.eq_bounds(value)
        except AttributeError as exc:
            raise _not_an_index(index, exc) from None
        if not self.writable:
            return self._objects(index, lo, hi, False, None)
        items = self._query(index, lo, hi, False, None)
        self._read_members(items)
        return [it[2].value for it in items]

    def first(self, index: Index[M], value: Any) -> M | None:
        """The first object whose ``index`` key equals ``value``, or ``None``. O(log n)."""
        try:
            lo, hi = index.eq_bounds(value)
        except AttributeError as exc:
            raise _not_an_index(index, exc) from None
        items = self._query(index, lo, hi, False, 1)
        if self.writable:
            self._read_members(items)
        return items[0][2].value if items else None

    def range(
        self,
        index: Index[M],
        lo: Any = None,
        hi: Any = None,
        *,
        reverse: bool = False,
        limit: int | None = None,
    ) -> Iterator[M]:
        """Objects whose ``index`` key lies in ``[lo, hi)`` (``None`` = unbounded), in order
        (``reverse`` for descending), at most ``limit``. O(log n + m)."""
        if limit is not None and (
            isinstance(limit, bool) or not isinstance(limit, int) or limit < 0
        ):
            raise ValueError(f"limit must be an int >= 0 or None, got {limit!r}")
        try:
            blo, bhi = index.range_bounds(lo, hi)
        except AttributeError as exc:
            raise _not_an_index(index, exc) from None
        return iter(self._objects(index, blo, bhi, reverse, limit))

    def prefix(self, index: Index[M], prefix: str) -> list[M]:
        """Objects whose string ``index`` key starts with ``prefix``, in order."""
        try:
            lo, hi = index.prefix_bounds(prefix)
        except AttributeError as exc:
            raise _not_an_index(index, exc) from None
        return self._objects(index, lo, hi, False, None)

    def count(self, index: Index[M], value: Any) -> int:
        """Number of items whose ``index`` key equals ``value``. O(log n)."""
        try:
            lo, hi = index.eq_bounds(value)
        except AttributeError as exc:
            raise _not_an_index(index, exc) from None
        rev = self._record(index, lo, hi)
        n = self._store.count(index, lo, hi, rev)
        ov = self._overlay_of(index)
        return n if ov is None else n + ov.count_delta(lo, hi)

    def _query(
        self,
        index: Index[Any],
        lo: Any,
        hi: Any,
        reverse: bool,
        limit: int | None,
        *,
        predicate: bool = True,
    ) -> list[Any]:
        rev = self._record(index, lo, hi, predicate=predicate)
        ov = self._overlay_of(index)
        if ov is None:
            return self._store.query(index, lo, hi, rev, reverse=reverse, limit=limit)
        return self._merged(ov, index, lo, hi, rev, reverse, limit)

    def _merged(
        self, ov: IndexOverlay, index: Index[Any], lo: Any, hi: Any, rev: int, reverse: bool,
        limit: int | None,
    ) -> list[Any]:
        """The snapshot's items at ``rev`` merged with this transaction's own writes."""
        need = None if limit is None else limit + len(ov.removed)
        base = self._store.query(index, lo, hi, rev, reverse=reverse, limit=need)
        return ov.merge(base, lo, hi, reverse, limit)

    def _objects(
        self, index: Index[Any], lo: Any, hi: Any, reverse: bool, limit: int | None
    ) -> list[Any]:
        """The objects of :meth:`_query`'s items (the store skips building the items when
        this transaction's writes do not touch the index). O(log n + m)."""
        rev = self._record(index, lo, hi)
        ov = self._overlay_of(index)
        if ov is None:
            return self._store.objects(index, lo, hi, rev, reverse=reverse, limit=limit)
        return [it[2].value for it in self._merged(ov, index, lo, hi, rev, reverse, limit)]

    def _read_members(self, items: list[Any]) -> None:
        """Record the objects an equality query returned as point reads: bucket fences only
        move when an object enters or leaves a key (see txindex.fences), so a change to a
        returned object's content is caught by its own compare. O(m)."""
        reads = self.reads
        for _key, _pk, entry in items:
            reads.setdefault(entry.key, entry.mod_revision)

    def _overlay_of(self, index: Index[Any]) -> IndexOverlay | None:
        """The overlay of ``index`` with every write so far (None if no write touched it)."""
        if self._moves:
            ov = self._overlay
            if ov is None:
                ov = self._overlay = Overlay()
            for move in self._moves:
                ov.replace(*move)
            self._moves = []
        return None if self._overlay is None else self._overlay.get(index)

    def _record(self, index: Index[Any], lo: Any, hi: Any, *, predicate: bool = True) -> int:
        if self._done:
            self._check_open()
        if index not in self._store.declared:
            raise ModelError(f"{index!r} is not an index of a model of this database")
        rev = self._rev if self._rev is not None else self._pin()
        if self.writable and predicate:
            self.predicates.append((index, lo, hi))
        return rev

    # ---- writes --------------------------------------------------------------------------

    def put(self, obj: Any) -> None:
        """Insert or replace ``obj`` (keyed by its primary key). Checks unique indexes against
        this snapshot and the transaction's own writes; raises ``UniqueViolation``,
        ``UnorderableValue`` or ``ModelError`` and then leaves the transaction unchanged.
        O(i log n) for i index keys."""
        self._check_writable()
        info = info_of(obj)
        if type(obj) is not info.cls:
            raise ModelError(f"{type(obj).__name__} is not the model class {info.name}")
        pk = info.pk(obj)
        key = info.prefix + info.key_suffix(pk)
        data = info.encode(obj)
        new_keys = {idx: idx.entries(obj) for idx in info.indexes}
        prior, snap, held = self._before(info, key)
        # no other write of this transaction can hold a key
        alone = not self.writes or (len(self.writes) == 1 and prior is not None)
        for idx, keys in new_keys.items():
            if idx.unique:
                for k in keys:
                    if k not in held[idx]:
                        self._check_unique(idx, k, pk, predicate=True)
                    elif not alone:
                        # a key the object already held in the snapshot (where no other
                        # object did) needs no predicate: any concurrent change to who holds
                        # it changes this object (its compare); only own writes can take it
                        self._check_unique(idx, k, pk, predicate=False)
        self._write(key, Write(info, pk, obj, data, new_keys, held), prior, snap)

    def delete(self, cls: type[Any], pk: Any) -> None:
        """Delete the object with primary key ``pk`` (a no-op if there is none)."""
        self._check_writable()
        info = _info(cls)
        key = info.prefix + info.key_suffix(pk)
        prior, snap, held = self._before(info, key)
        write = Write(info, pk, None, None, {idx: () for idx in info.indexes}, held)
        self._write(key, write, prior, snap)

    def _before(
        self, info: ModelInfo, key: str
    ) -> tuple[Write | None, Entry | None, dict[Index[Any], tuple[Any, ...]]]:
        """This transaction's earlier write of ``key`` (or None), else the key's snapshot
        entry, and the index keys the object had in the snapshot. O(i) for i index keys."""
        prior = self.writes.get(key)
        if prior is not None:
            return prior, None, prior.old_keys
        snap = self._store.get(key, self._pin())
        return None, snap, {idx: index_keys(idx, snap) for idx in info.indexes}

    def _write(self, key: str, write: Write, old: Write | None, snap: Entry | None) -> None:
        """Record ``write`` over ``old`` (this transaction's earlier write of the key) or the
        snapshot's ``snap`` (see :meth:`_before`)."""
        if old is None:
            limit = self._db.max_txn_ops
            extra = 2 * (len(self._fenced) + (write.info not in self._fenced)) + 1
            if len(self.writes) + 1 + extra > limit:
                raise TxTooLarge(
                    f"one etcd Txn takes {limit} operations (--max-txn-ops): at most "
                    f"{limit - extra} writes here, plus two fence keys per model written and "
                    "one bookkeeping key"
                )
        moves = self._moves
        old_keys = write.old_keys if old is None else old.keys
        for idx, keys in write.keys.items():
            prev = old_keys[idx]
            moves.append((idx, write.pk, prev, keys, write.entry))
        if old is None:
            self._fenced.add(write.info)
            # A write is also a read of the key's version: its fences name the index keys the
            # object had in this snapshot, which must still be the ones it has at commit.
            self.reads.setdefault(key, 0 if snap is None else snap.mod_revision)
        self.writes[key] = write

    def _check_unique(self, index: Index[Any], key: Any, pk: Any, *, predicate: bool) -> None:
        items = self._query(index, (key,), (key, TOP), False, 2, predicate=predicate)
        holders = [it[1] for it in items if it[1] != pk]
        if holders:
            raise UniqueViolation(index.qualname, _plain(key), holders[0])

    # ---- helpers -------------------------------------------------------------------------

    def _pin(self) -> int:
        if self._rev is None:
            self._check_open()
            self._rev = self._db._pin()
        return self._rev

    def _check_open(self) -> None:
        if self._done:
            raise Closed("transaction already ended (committed or rolled back)")

    def _check_writable(self) -> None:
        self._check_open()
        if not self.writable:
            raise ModelError("read-only transaction (db.read()): use db.tx() to write")


def _info(cls: Any) -> ModelInfo:
    info = getattr(cls, "__txindex_model__", None)
    if info is None or info.cls is not cls:
        return info_of(cls)  # raises a clear ModelError
    return info  # type: ignore[no-any-return]


def _plain(encoded: Any) -> Any:
    """A readable form of an encoded index key, for error messages."""
    if isinstance(encoded, tuple) and len(encoded) == 2 and isinstance(encoded[0], int):
        inner = encoded[1]
        if isinstance(inner, tuple):
            return tuple(_plain(x) for x in inner)
        return inner
    if isinstance(encoded, tuple):
        return tuple(_plain(x) for x in encoded)
    return encoded



def _not_an_index(index: Any, exc: AttributeError) -> Exception:
    """What to raise for an ``AttributeError`` from ``index.<bounds>(...)``: ``ModelError``
    when ``index`` is not an Index (a field name, a typo, None), else the error itself."""
    if isinstance(index, Index):
        return exc
    return ModelError(f"expected an index (Model.index), got {index!r}")
