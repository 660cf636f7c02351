"""``Index`` declarations and index-key extraction.

An :class:`Index` is declared as a class attribute of a model::

    by_user = Index("user")                          # single field
    by_user_seen = Index("user", "last_seen")        # compound, ordered field by field
    by_tag = Index("tags", multi=True)               # one entry per distinct element
    active = Index(lambda n: n.last_seen, where=lambda n: n.last_seen > 0)  # computed, partial

Keys are *encoded* so that the keys of one index always compare. When ``@txindex.model`` finds
every indexed field annotated with one plain value type (``str``, ``int``, ``float``, ``bool``,
``bytes``; for ``multi=True``, ``tuple[X, ...]`` or ``frozenset[X]`` of one), the key is the bare
value (a tuple of bare values for a compound index): the codec guarantees the type, and bare keys
cost less memory and compare faster. Any other index (computed, ``Optional``, unions, ``Any``)
encodes with :func:`txindex.ordering.sort_key`, which orders values of mixed types totally. A
query value of another type than a typed index holds matches nothing and, as a range bound,
sits where :func:`~txindex.ordering.sort_key` would put it (``BOTTOM`` or ``TOP``). Fence buckets
hash :meth:`Index.canonical`, the ``sort_key`` form, so they do not depend on the encoding.

The store keeps each index as ordered ``(encoded_key, primary_key)`` items
(:class:`~txindex.keyindex.KeyIndex`); the ``*_bounds`` helpers return probes ``(key,)`` (before
every item of ``key``) and ``(key, TOP)`` (after every item of ``key``) that compare with items
as tuples, so that the answer is every item ``lo <= item < hi`` (``None`` = unbounded).
"""

from __future__ import annotations

import operator
import typing
from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, overload

from txindex.errors import ModelError, UnorderableValue
from txindex.ordering import BOTTOM, RANK_STR, TOP, rank_of, sort_key, str_successor

__all__ = ["Index"]

M = TypeVar("M")
T = TypeVar("T")

Bound = tuple[Any, ...]
Extract = Callable[[Any], tuple[Any, ...]]

# Value types an index may hold bare (see the module docstring), with their rank.
_BARE: dict[type, int] = {str: rank_of(""), bytes: rank_of(b""), int: rank_of(0),
                          float: rank_of(0.0), bool: rank_of(False)}


class Index(Generic[M]):
    """A secondary index over the objects of one model.

    ``Index(*fields, unique=False, multi=False, where=None)`` where ``fields`` is one field name,
    several field names (compound), or exactly one callable (computed). ``multi=True`` (one field
    or one callable) indexes every distinct element of an iterable value; ``None`` gives no
    entries. ``where`` makes the index partial: objects for which it is false have no entries.
    ``unique`` is a flag the engine enforces (across processes); it does not change key
    extraction. Declaration errors raise :class:`ModelError` immediately; field names are checked
    against the dataclass by ``@txindex.model``.
    """

    __slots__ = (
        "_func", "_kinds", "_model", "_query_enc", "extract", "fields", "multi", "name",
        "unique", "where",
    )

    def __init__(
        self: Index[Any],
        *fields: str | Callable[[Any], Any],
        unique: bool = False,
        multi: bool = False,
        where: Callable[[Any], bool] | None = None,
    ) -> None:
        # ``self: Index[Any]`` lets ``by_user = Index("user")`` need no annotation in a class
        # body; ``Model.by_user`` is still typed ``Index[Model]`` through ``__get__``.
        if not fields:
            raise ModelError("Index() needs a field name, several field names, or one callable")
        names = tuple(f for f in fields if isinstance(f, str))
        funcs = [f for f in fields if not isinstance(f, str)]
        for f in funcs:
            if not callable(f):
                raise ModelError(
                    f"Index() arguments must be field names (str) or one callable, got {f!r}"
                )
        if funcs and (names or len(funcs) > 1):
            raise ModelError(
                "a computed Index takes exactly one callable and no field names; "
                "return a tuple from the callable for a compound computed key"
            )
        for n in names:
            if not n.isidentifier():
                raise ModelError(f"Index field {n!r} is not a valid field name")
        if len(set(names)) != len(names):
            raise ModelError(f"Index{names!r} names a field twice")
        if multi and len(names) > 1:
            raise ModelError(
                "multi=True takes one field (or one callable) whose value is an iterable; "
                "a compound multi index is not supported"
            )
        if where is not None and not callable(where):
            raise ModelError(f"Index(where=...) must be a callable, got {where!r}")
        self.fields: tuple[str, ...] = names
        self._func: Callable[[Any], Any] | None = funcs[0] if funcs else None
        self.unique: bool = bool(unique)
        self.multi: bool = bool(multi)
        self.where: Callable[[Any], bool] | None = where
        self.name: str = ""
        self._model: type[Any] | None = None
        self._kinds: tuple[type, ...] | None = None  # bare value type per field (see bind)
        self._query_enc: tuple[Callable[[Any], Any], ...] = (sort_key,) * max(1, len(names))
        self.extract: Extract = self._compile()

    # -- descriptor protocol -------------------------------------------------------------------

    def __set_name__(self, owner: type[Any], name: str) -> None:
        """Record the attribute name and owning class (first class only; ``@model`` rejects an
        Index object shared by two classes)."""
        if self._model is None:
            self._model = owner
            self.name = name

    @overload
    def __get__(self, obj: None, owner: type[T]) -> Index[T]: ...
    @overload
    def __get__(self, obj: T, owner: type[T] | None = None) -> Index[T]: ...
    def __get__(self, obj: Any, owner: Any = None) -> Any:
        """``Node.by_user`` (and ``node.by_user``) is the Index itself, typed ``Index[Node]``."""
        return self

    # -- identity ------------------------------------------------------------------------------

    @property
    def model(self) -> type[M]:
        """The model class the index was declared in."""
        if self._model is None:
            raise ModelError("this Index is not declared in a class body")
        return self._model

    @property
    def qualname(self) -> str:
        """``"Model.index"``, used in every error message."""
        if self._model is None:
            return "<unbound Index>"
        return f"{self._model.__name__}.{self.name}"

    @property
    def computed(self) -> bool:
        """True for ``Index(callable)``."""
        return self._func is not None

    @property
    def compound(self) -> bool:
        """True for ``Index("a", "b", ...)`` (two fields or more)."""
        return len(self.fields) > 1

    def __repr__(self) -> str:
        kind = "computed" if self._func is not None else ", ".join(map(repr, self.fields))
        flags = "".join(f", {flag}=True" for flag in ("unique", "multi") if getattr(self, flag)) + (
            ", where=..." if self.where is not None else ""
        )
        return f"<Index {self.qualname}({kind}{flags})>"

    def _source(self) -> str:
        return "computed" if self._func is not None else f"field {self.fields[0]!r}"

    @property
    def bare(self) -> bool:
        """True if keys are bare values (every field has one plain annotated type)."""
        return self._kinds is not None

    def bind(self, hints: dict[str, Any]) -> None:
        """Choose the key encoding from the model's resolved field annotations (called by
        ``@txindex.model``): bare values when every field has one plain value type. O(fields)."""
        kinds: list[type] = []
        for f in self.fields:
            tp = hints.get(f)
            if self.multi:
                args = typing.get_args(tp)
                origin = typing.get_origin(tp)
                variadic = origin is tuple and len(args) == 2 and args[1] is Ellipsis
                tp = args[0] if variadic or (origin is frozenset and len(args) == 1) else None
            if tp not in _BARE:
                break
            kinds.append(typing.cast(type, tp))
        else:
            if kinds:
                self._kinds = tuple(kinds)
                self._query_enc = tuple(_query_encoder(k) for k in kinds)
                self.extract = self._compile()

    def canonical(self, key: Any) -> Any:
        """``key`` in :func:`~txindex.ordering.sort_key` form, whatever the encoding (what fence
        buckets hash, so that they never depend on it). O(size of key)."""
        if self._kinds is None:
            return key
        if len(self.fields) > 1:
            return tuple([sort_key(v) for v in key])
        return sort_key(key)

    # -- key extraction ------------------------------------------------------------------------

    def _compile(self) -> Extract:
        """The fast key extractor for this declaration: what :meth:`entries` returns, without
        the error messages (any failure there is re-run by :meth:`_entries_checked`)."""
        if self._func is not None or self.where is not None:
            return self._entries_checked
        get = operator.attrgetter(*self.fields)
        kinds = self._kinds
        if kinds is None:
            if self.multi:
                return self._entries_checked
            if len(self.fields) > 1:
                return lambda obj: (tuple([sort_key(v) for v in get(obj)]),)
            return lambda obj: (sort_key(get(obj)),)
        if len(kinds) > 1:
            def compound(obj: Any) -> tuple[Any, ...]:
                key = get(obj)
                for v, k in zip(key, kinds, strict=True):
                    if type(v) is not k or (k is float and v != v):
                        raise UnorderableValue(repr(v))
                return (key,)
            return compound
        kind = kinds[0]
        if kind is float:
            return self._entries_checked  # ints in float fields and NaN: the careful way
        if self.multi:
            def multi(obj: Any) -> tuple[Any, ...]:
                values = get(obj)
                for v in values:
                    if type(v) is not kind:
                        raise UnorderableValue(repr(v))
                return tuple(values) if len(values) < 2 else tuple(sorted(set(values)))
            return multi
        def single(obj: Any) -> tuple[Any, ...]:
            v = get(obj)
            if type(v) is not kind:
                raise UnorderableValue(repr(v))
            return (v,)
        return single

    def entries(self, obj: M) -> tuple[Any, ...]:
        """The encoded index keys of ``obj``: sorted, deduplicated, ``()`` if ``where`` excludes it.

        O(k log k) for a multi index over k elements, O(size of the key) otherwise. Raises
        :class:`UnorderableValue` naming model, index and field (or "computed") for a value that
        cannot be ordered (or, for a typed index, that does not have the annotated type), and
        :class:`ModelError` wrapping any exception from a user callable.
        """
        try:
            return self.extract(obj)
        except Exception:
            return self._entries_checked(obj)

    def _entries_checked(self, obj: Any) -> tuple[Any, ...]:
        """:meth:`entries` the slow way, with a clear error for any value that does not fit."""
        if self.where is not None:
            try:
                keep = bool(self.where(obj))  # (a result whose truth test raises, too)
            except Exception as exc:
                raise ModelError(f"{self.qualname}: where= raised {exc!r}") from exc
            if not keep:
                return ()
        fields = self.fields
        encode = self._stored_encoder
        if len(fields) > 1:
            key: list[Any] = []
            for i, f in enumerate(fields):
                try:
                    key.append(encode(i, getattr(obj, f)))
                except UnorderableValue as exc:
                    raise UnorderableValue(f"{self.qualname} (field {f!r}): {exc}") from None
            return (tuple(key),)
        if self._func is not None:
            try:
                value = self._func(obj)
            except Exception as exc:
                raise ModelError(f"{self.qualname}: the key callable raised {exc!r}") from exc
        else:
            value = getattr(obj, fields[0])
        try:
            if not self.multi:
                return (encode(0, value),)
            if value is None:
                return ()
            return tuple(sorted({encode(0, v) for v in self._elements(value)}))
        except UnorderableValue as exc:
            raise UnorderableValue(f"{self.qualname} ({self._source()}): {exc}") from None

    def _stored_encoder(self, i: int, value: Any) -> Any:
        """Encode a stored value of field ``i``: ``sort_key``, or for a typed index the value
        itself after checking its type (subclasses become the plain type, as in sort_key)."""
        if self._kinds is None:
            return sort_key(value)
        kind = self._kinds[i]
        if type(value) is kind and value == value:
            return value
        if kind is float and type(value) is int:
            return value  # an int is a valid float (the codec keeps it an int)
        if isinstance(value, kind) and not (kind is int and isinstance(value, bool)):
            plain = kind(value)
            if plain == plain:
                return plain
        raise UnorderableValue(
            f"value {value!r} of type {type(value).__name__} is not a {kind.__name__} as "
            "annotated" + (" (NaN cannot be ordered)" if value != value else "")
        )

    def _elements(self, value: Any) -> Iterable[Any]:
        if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
            raise ModelError(
                f"{self.qualname} ({self._source()}): a multi index needs an iterable of "
                f"elements (tuple, frozenset), got {type(value).__name__} {value!r}"
            )
        return value

    # -- queries -------------------------------------------------------------------------------

    def encode_query(self, value: Any) -> Any:
        """Encode a user's query value like :meth:`entries` encodes stored values.

        Compound index: ``value`` must be a tuple of at most ``len(fields)`` components; a shorter
        tuple is a prefix. Multi index: ``value`` is one element. ``TOP`` may be used as a
        component to mean "after every value". O(size of value).
        """
        try:
            enc = self._query_enc
            if len(self.fields) > 1:
                if not isinstance(value, tuple):
                    raise ModelError(
                        f"{self.qualname} is a compound index over {self.fields}; query it with "
                        f"a tuple of up to {len(self.fields)} values, got {value!r}"
                    )
                if len(value) > len(self.fields):
                    raise ModelError(
                        f"{self.qualname}: query {value!r} has more than "
                        f"{len(self.fields)} components"
                    )
                return tuple([e(v) for e, v in zip(enc, value, strict=False)])
            return enc[0](value)
        except UnorderableValue as exc:
            raise UnorderableValue(f"{self.qualname}: query {exc}") from None

    def eq_bounds(self, value: Any) -> tuple[Bound, Bound]:
        """``(lo, hi)`` selecting every entry whose key equals ``value``.

        On a compound index a shorter tuple selects every key with that prefix:
        ``eq_bounds(("alice",))`` on ``Index("user", "last_seen")`` is all of alice's entries.
        O(size of value).
        """
        enc = self.encode_query(value)
        if len(self.fields) > 1 and len(enc) < len(self.fields):
            return (enc,), ((*enc, TOP),)
        return (enc,), (enc, TOP)

    def range_bounds(self, lo: Any | None, hi: Any | None) -> tuple[Bound | None, Bound | None]:
        """Half-open ``[lo, hi)`` over keys; ``None`` means unbounded on that side.

        Order is plain lexicographic on encoded keys, so on a compound index a prefix ``lo``
        such as ``("alice",)`` starts at alice's first key, while a prefix ``hi`` such as
        ``("alice",)`` *excludes* every ``("alice", ...)`` key. Use ``("alice", TOP)`` as ``hi``
        to include all of alice, or :meth:`eq_bounds` for exactly one prefix. O(size of bounds).
        """
        lo_b = None if lo is None else (self.encode_query(lo),)
        hi_b = None if hi is None else (self.encode_query(hi),)
        return lo_b, hi_b

    def prefix_bounds(self, s: str) -> tuple[Bound, Bound]:
        """``(lo, hi)`` selecting every entry whose (string) key starts with ``s``.

        On a compound index the prefix applies to the first field. Non-string keys are never
        selected. O(len(s)).
        """
        if not isinstance(s, str):
            raise ModelError(f"{self.qualname}: a prefix query needs a str, got {s!r}")
        succ = str_successor(s)
        lo: Any
        hi: Any
        if self._kinds is None:
            lo = (RANK_STR, s)
            hi = (RANK_STR, TOP) if succ is None else (RANK_STR, succ)
        elif self._kinds[0] is str:
            lo, hi = s, TOP if succ is None else succ
        else:
            lo = hi = BOTTOM  # an index of another type holds no string
        if len(self.fields) > 1:
            lo, hi = (lo,), (hi,)
        return (lo,), (hi,)


def _query_encoder(kind: type) -> Callable[[Any], Any]:
    """Encode a query value for a typed index of ``kind``: the value if it has that type (int
    and float mix, as numbers do), else ``BOTTOM``/``TOP`` where ``sort_key`` ranks it, so
    that it matches nothing and bounds a range where the general order would."""
    rank = _BARE[kind]
    numeric = kind in (int, float)

    def encode(value: Any) -> Any:
        t = type(value)
        if t is kind or (numeric and (t is int or t is float)):
            if value != value:
                raise UnorderableValue(f"value {value!r} (NaN) cannot be ordered")
            return value
        if value is TOP or value is BOTTOM:
            return value
        key = sort_key(value)  # subclasses (IntEnum, StrEnum) and other types
        if key[0] == rank:
            return key[1]
        return BOTTOM if key[0] < rank else TOP

    return encode
