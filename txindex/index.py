"""``Index`` declarations and index-key extraction.

An :class:`Index` is declared as a class attribute of a model::

    by_user = Index("user")                          # single field
    by_user_seen = Index("user", "last_seen")        # compound, ordered field by field
    by_tag = Index("tags", multi=True)               # one entry per distinct element
    active = Index(lambda n: n.last_seen, where=lambda n: n.last_seen > 0)  # computed, partial

Keys are *encoded* with :func:`txindex.ordering.sort_key` so values of mixed types order totally.
A compound key is ``tuple(sort_key(getattr(obj, f)) for f in fields)``. The store keeps each
index as a sorted list of ``(encoded_key, primary_key)`` entries; the ``*_bounds`` helpers return
probes for ``bisect_left`` so that ``entries[bisect_left(lo):bisect_left(hi)]`` is the answer
(``None`` = unbounded on that side).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, Generic, TypeVar, overload

from txindex.errors import ModelError, UnorderableValue
from txindex.ordering import RANK_STR, TOP, sort_key, str_successor

__all__ = ["Index"]

M = TypeVar("M")
T = TypeVar("T")

Bound = tuple[Any, ...]


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

    __slots__ = ("_func", "_model", "fields", "multi", "name", "unique", "where")

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

    # -- key extraction ------------------------------------------------------------------------

    def entries(self, obj: M) -> tuple[Any, ...]:
        """The encoded index keys of ``obj``: sorted, deduplicated, ``()`` if ``where`` excludes it.

        O(k log k) for a multi index over k elements, O(size of the key) otherwise. Raises
        :class:`UnorderableValue` naming model, index and field (or "computed") for a value that
        cannot be ordered, and :class:`ModelError` wrapping any exception from a user callable.
        """
        if self.where is not None:
            try:
                keep = self.where(obj)
            except Exception as exc:
                raise ModelError(f"{self.qualname}: where= raised {exc!r}") from exc
            if not keep:
                return ()
        fields = self.fields
        if len(fields) > 1:
            key: list[Any] = []
            for f in fields:
                try:
                    key.append(sort_key(getattr(obj, f)))
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
                return (sort_key(value),)
            if value is None:
                return ()
            return tuple(sorted({sort_key(v) for v in self._elements(value)}))
        except UnorderableValue as exc:
            raise UnorderableValue(f"{self.qualname} ({self._source()}): {exc}") from None

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
                return tuple([sort_key(v) for v in value])
            return sort_key(value)
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
        lo: Any = (RANK_STR, s)
        hi: Any = (RANK_STR, TOP) if succ is None else (RANK_STR, succ)
        if len(self.fields) > 1:
            lo, hi = (lo,), (hi,)
        return (lo,), (hi,)
