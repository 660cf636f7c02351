"""``@txindex.model``: declares a frozen dataclass as a stored, indexed model.

::

    @txindex.model("nodes/", key="id")
    @dataclass(frozen=True)
    class Node:
        id: str
        ...
        by_user = Index("user")

The decorator validates the declaration once (frozen dataclass, ``str``/``int`` key field,
immutable field types, Index fields that exist, a codec for every annotation) and attaches a
:class:`ModelInfo` at ``cls.__txindex_model__``. An object is stored under the etcd key
``<db prefix><model prefix><str(pk)>``. Prefix rules: non-empty, ends with ``"/"``; across the
models of one DB no prefix may be a prefix of another (:func:`check_prefixes`, run at open).
"""

from __future__ import annotations

import collections
import collections.abc
import dataclasses
import enum
import itertools
import types
import typing
from collections.abc import Callable, Iterable
from typing import Any, TypeVar

from txindex.codec import Codec
from txindex.errors import ModelError
from txindex.index import Index

__all__ = ["ModelInfo", "check_object", "check_prefixes", "info_of", "model"]

T = TypeVar("T")

_ATTR = "__txindex_model__"
RESERVED_PREFIX = "__txindex__/"  # txindex's own keys inside a DB's prefix (the sync key)

# Mutable container types (and their typing aliases, which share the origin) with advice.
_MUTABLE: dict[Any, str] = {
    list: "tuple[X, ...]",
    dict: "a tuple of pairs or a nested frozen dataclass",
    set: "frozenset[X]",
    bytearray: "bytes",
    collections.deque: "tuple[X, ...]",
    collections.defaultdict: "a tuple of pairs or a nested frozen dataclass",
    collections.OrderedDict: "a tuple of pairs or a nested frozen dataclass",
    collections.Counter: "a tuple of pairs",
    collections.abc.MutableSequence: "tuple[X, ...]",
    collections.abc.MutableMapping: "a tuple of pairs or a nested frozen dataclass",
    collections.abc.MutableSet: "frozenset[X]",
}


class ModelInfo:
    """Everything the engine needs about one model class; built once by :func:`model`."""

    __slots__ = ("cls", "codec", "indexes", "key_field", "key_type", "name", "prefix")

    def __init__(
        self,
        cls: type[Any],
        prefix: str,
        key_field: str,
        key_type: type,
        indexes: tuple[Index[Any], ...],
        codec: Codec[Any],
    ) -> None:
        self.cls = cls
        self.name: str = cls.__name__
        self.prefix = prefix
        self.key_field = key_field
        self.key_type = key_type
        self.indexes = indexes
        self.codec = codec

    def __repr__(self) -> str:
        return f"<ModelInfo {self.name} prefix={self.prefix!r} key={self.key_field!r}>"

    def pk(self, obj: Any) -> str | int:
        """The primary key value of ``obj`` (not validated; see :meth:`key_suffix`). O(1)."""
        pk: str | int = getattr(obj, self.key_field)
        return pk

    def key_suffix(self, pk: Any) -> str:
        """``str(pk)`` after checking its type (bool is not int) and that a str key is non-empty.

        Raises :class:`ModelError`, e.g. ``Node key must be str, got int 5``. O(len(pk)).
        """
        if type(pk) is not self.key_type:
            raise ModelError(
                f"{self.name} key must be {self.key_type.__name__}, got {type(pk).__name__} {pk!r}"
            )
        if self.key_type is str:
            if not pk:
                raise ModelError(f"{self.name} key must be a non-empty str")
            text = typing.cast(str, pk)
            if not text.isascii():  # (O(1) for an ASCII str) etcd keys are UTF-8 bytes
                try:
                    text.encode()
                except UnicodeEncodeError as exc:
                    raise ModelError(
                        f"{self.name} key {pk!r} is not valid Unicode text: {exc.reason}"
                    ) from None
            return text
        try:
            return str(pk)
        except ValueError as exc:  # past Python's digit limit for int -> str (4,300)
            raise ModelError(f"{self.name} key: {exc}") from None

    def pk_from_suffix(self, s: str) -> str | int:
        """Inverse of :meth:`key_suffix`; raises ``ValueError`` (with a reason fit for a
        :class:`DecodeError`) for an empty or non-canonical int suffix. O(len(s))."""
        if not s:
            raise ValueError("empty primary key")
        if self.key_type is str:
            return s
        try:
            n = int(s)
        except ValueError:
            raise ValueError(f"primary key {s!r} is not an int") from None
        if str(n) != s:
            raise ValueError(f"primary key {s!r} is not a canonical int")
        return n

    def encode(self, obj: Any) -> bytes:
        """JSON bytes of ``obj`` (:class:`ModelError` naming the field if a value does not fit)."""
        return self.codec.encode(obj)

    def decode(self, data: bytes, key: str) -> Any:
        """The object stored under ``key`` (:class:`DecodeError` if it does not fit the model)."""
        return self.codec.decode(data, key)


def _find_mutable(tp: Any, seen: set[int]) -> tuple[Any, str] | None:
    """The first mutable type inside annotation ``tp`` and advice, or None."""
    if id(tp) in seen:
        return None
    seen.add(id(tp))
    origin = typing.get_origin(tp)
    base = origin if origin is not None else tp
    try:
        advice = _MUTABLE.get(base)
    except TypeError:  # unhashable annotation object
        advice = None
    if advice is not None:
        return tp, advice
    if isinstance(base, type) and base not in (str, bytes):
        for mutable, adv in _MUTABLE.items():
            if isinstance(mutable, type) and issubclass(base, mutable):
                return tp, adv
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if not tp.__dataclass_params__.frozen:  # type: ignore[attr-defined]
            return tp, f"@dataclass(frozen=True) on {tp.__name__}"
        try:
            hints = typing.get_type_hints(tp)
        except Exception:
            return None  # reported by the codec
        for f in dataclasses.fields(tp):
            found = _find_mutable(hints.get(f.name), seen)
            if found is not None:
                return found
        return None
    if origin is typing.Literal:
        return None
    for arg in typing.get_args(tp):
        found = _find_mutable(arg, seen)
        if found is not None:
            return found
    return None


def _type_name(tp: Any) -> str:
    return tp.__name__ if isinstance(tp, type) and not typing.get_args(tp) else repr(tp)


def model(prefix: str, *, key: str) -> Callable[[type[T]], type[T]]:
    """Class decorator declaring a model stored under ``prefix`` with primary-key field ``key``.

    Apply it above ``@dataclass(frozen=True)``. Raises :class:`ModelError` with advice for: a
    bad prefix, a class that is not a frozen dataclass, a key field that is missing or not
    annotated ``str``/``int``, a mutable field type anywhere in an annotation, an unsupported
    annotation, or an Index naming an unknown field. O(fields + indexes), once per class.
    """
    if not isinstance(prefix, str) or not prefix:
        raise ModelError(f"model prefix must be a non-empty str, got {prefix!r}")
    if not prefix.endswith("/"):
        raise ModelError(f"model prefix {prefix!r} must end with '/' (e.g. {prefix + '/'!r})")
    if prefix.startswith(RESERVED_PREFIX):
        raise ModelError(
            f"model prefix {prefix!r} is reserved: txindex keeps its own keys under "
            f"{RESERVED_PREFIX!r}"
        )
    if not isinstance(key, str) or not key:
        raise ModelError(f"model key must be the name of a field, got {key!r}")

    def decorate(cls: type[T]) -> type[T]:
        if not isinstance(cls, type):
            raise ModelError(f"@txindex.model decorates a class, got {cls!r}")
        name = cls.__name__
        # hook: txindex.adapters (msgspec Struct, attrs, pydantic); None for a dataclass
        from txindex.adapters import codec_for, find_adapter

        adapter = find_adapter(cls)
        fields: dict[str, Any]
        if adapter is not None:
            fields = hints = adapter.describe(cls)
        else:
            if not dataclasses.is_dataclass(cls) or "__dataclass_fields__" not in cls.__dict__:
                raise ModelError(
                    f"{name} is not a dataclass; put @dataclass(frozen=True) below "
                    "@txindex.model (or use a frozen msgspec Struct, attrs or pydantic class)"
                )
            if not cls.__dataclass_params__.frozen:  # type: ignore[attr-defined]
                raise ModelError(
                    f"{name} must be frozen: use @dataclass(frozen=True) (stored objects are "
                    "shared between transactions and must never change)"
                )
            try:
                hints = typing.get_type_hints(cls)
            except Exception as exc:
                raise ModelError(f"cannot resolve the annotations of {name}: {exc}") from exc
            fields = {f.name: f for f in dataclasses.fields(cls)}
            for fld in fields.values():
                if isinstance(fld.default, Index):
                    raise ModelError(
                        f"{name}.{fld.name}: an Index must not be a dataclass field; leave it "
                        "unannotated or annotate it ClassVar[Index[...]]"
                    )
        if key not in fields:
            raise ModelError(f"{name} has no field {key!r} to use as key (fields: {list(fields)})")
        key_type = hints[key]
        if key_type not in (str, int):
            raise ModelError(
                f"{name}.{key}: the key field must be annotated str or int, "
                f"got {_type_name(key_type)}"
            )
        for fname in fields:
            found = _find_mutable(hints[fname], set())
            if found is not None:
                tp, advice = found
                raise ModelError(
                    f"{name}.{fname}: {_type_name(tp)} is mutable; models are immutable, "
                    f"use {advice}"
                )
        indexes: list[Index[Any]] = []
        for attr, value in cls.__dict__.items():
            if not isinstance(value, Index):
                continue
            if _recreated_by_dataclass(value._model, cls) or (
                adapter is not None and adapter.recreated(value._model, cls)  # hook: adapters
            ):
                value._model = cls  # @dataclass(slots=True) built a new class from the old body
            if value._model is not cls or value.name != attr:
                raise ModelError(
                    f"{name}.{attr}: this Index object already belongs to {value.qualname}; "
                    "declare a new Index in each class"
                )
            for f in value.fields:
                if f not in fields:
                    raise ModelError(
                        f"{value.qualname} names {f!r}, which is not a field of {name} "
                        f"(fields: {list(fields)})"
                    )
            for f in value.fields:
                bad = _unorderable(hints[f], value.multi)
                if bad is not None:
                    raise ModelError(
                        f"{value.qualname}: field {f!r} holds {_type_name(bad)} values, which "
                        "cannot be ordered; index something orderable computed from it, e.g. "
                        f"Index(lambda o: o.{f}.value) for an enum"
                    )
            value.bind(hints)
            indexes.append(value)
        codec = Codec(cls) if adapter is None else codec_for(adapter, cls)  # hook: adapters
        info = ModelInfo(cls, prefix, key, key_type, tuple(indexes), codec)
        setattr(cls, _ATTR, info)
        return cls

    return decorate


def _unorderable(tp: Any, multi: bool) -> Any:
    """The type in annotation ``tp`` whose values an index cannot order (a plain ``Enum`` or
    ``Flag``, a nested dataclass, a set), or ``None``; for a ``multi`` index, the elements'.
    Unions are checked member by member; ``Any`` and unknown forms pass (checked at put)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if multi:
        if origin in (tuple, frozenset) and args:
            return _unorderable(args[0], False)
        return None
    if origin in (typing.Union, types.UnionType, tuple):  # each member, each element type
        found = (_unorderable(a, False) for a in args if a is not Ellipsis)
        return next((b for b in found if b is not None), None)
    if origin is frozenset:
        return tp
    if not isinstance(tp, type):
        return None
    if issubclass(tp, enum.Enum) and not issubclass(tp, (int, str, float, bytes)):
        return tp
    if dataclasses.is_dataclass(tp) or issubclass(tp, frozenset):
        return tp
    return None


def _recreated_by_dataclass(old: type[Any] | None, cls: type[Any]) -> bool:
    """True if ``cls`` is the class ``@dataclass(slots=True)`` rebuilt from ``old``."""
    return (
        old is not None
        and old is not cls
        and "__slots__" in cls.__dict__
        and old.__qualname__ == cls.__qualname__
        and old.__module__ == cls.__module__
        and cls.__dict__.get("__dataclass_fields__") is not None
        and getattr(old, "__dataclass_fields__", None) is cls.__dict__["__dataclass_fields__"]
    )


def info_of(cls_or_obj: Any) -> ModelInfo:
    """The :class:`ModelInfo` of a model class or instance; :class:`ModelError` otherwise. O(1)."""
    cls = cls_or_obj if isinstance(cls_or_obj, type) else type(cls_or_obj)
    info = cls.__dict__.get(_ATTR)
    if isinstance(info, ModelInfo) and info.cls is cls:
        return info
    what = cls.__name__ if isinstance(cls_or_obj, type) else f"{cls.__name__} {cls_or_obj!r}"
    raise ModelError(f"{what} is not a txindex model; decorate it with @txindex.model")


def check_object(info: ModelInfo, obj: Any) -> Any:
    """``obj`` if it is an instance of exactly ``info.cls`` (no subclass), else ModelError."""
    if type(obj) is not info.cls:
        raise ModelError(f"expected a {info.name}, got {type(obj).__name__} {obj!r}")
    return obj


def check_prefixes(models: Iterable[Any]) -> tuple[ModelInfo, ...]:
    """Validate the models of one DB; returns their infos in the given order (duplicates dropped).

    Raises :class:`ModelError` if something is not a model or one model prefix is a prefix of
    another's (their keys would mix). O(n log n) in the number of models.
    """
    infos: list[ModelInfo] = []
    for m in models:
        info = m if isinstance(m, ModelInfo) else info_of(m)
        if info not in infos:
            infos.append(info)
    ordered = sorted(infos, key=lambda i: i.prefix)
    for a, b in itertools.pairwise(ordered):
        if b.prefix.startswith(a.prefix):
            raise ModelError(
                f"model prefixes overlap: {a.name} uses {a.prefix!r} and {b.name} uses "
                f"{b.prefix!r}; no prefix may be a prefix of another"
            )
    return tuple(infos)
