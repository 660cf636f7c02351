"""Type-directed JSON codec for frozen dataclasses.

A :class:`Codec` is built once per model class from its resolved annotations. Values are stored
as a compact JSON object of the ``__init__`` fields in declaration order (readable with
``etcdctl get``). Mapping:

============================  =============================================================
annotation                    JSON
============================  =============================================================
str, int, bool, None          the same (a bool is never accepted for int, nor int for bool)
float                         number; an int value stays an int both ways (exact round
                              trip; PEP 484 accepts int for float); NaN and infinities
                              are rejected (strict JSON)
bytes                         base64 string
tuple[X, ...], tuple[X, Y]    array (fixed length checked)
frozenset[X]                  array, sorted (by index order, else by JSON text) so the same
                              set always encodes to the same bytes
nested frozen dataclass       object
Literal[...]                  the literal value
Enum subclass                 the member's value
Optional / Union / X | None   the first member that accepts the value
Any, object                   any JSON value; arrays decode as tuples, objects as dicts
============================  =============================================================

Encoding validates every value against its annotation (so anything written can be read back) and
raises :class:`ModelError` naming the field path. Decoding raises :class:`DecodeError` for
invalid UTF-8/JSON, a non-object, a missing required field (fields with defaults may be absent)
or a value of the wrong type. Unknown extra JSON fields are ignored, so a reader with an older
model still reads values written by a newer one (forward compatible). Guarantee:
``decode(encode(x)) == x`` for every object that encodes.

Performance: the decoder of each dataclass is generated code (like ``dataclasses`` does): one
``json.loads`` plus an inlined exact-type check per plain str/int/float/bool field, then
``object.__new__`` + ``object.__setattr__`` (bypassing ``__init__`` unless the class defines
``__post_init__`` or has ``init=False`` fields). About 3 µs per 5-field object, ~2 µs of it in
``json.loads``. ``__dict__.update`` would be faster but doubles the memory of every object.
"""

from __future__ import annotations

import base64
import binascii
import dataclasses
import enum
import functools
import json
import math
import types
import typing
from collections.abc import Callable
from typing import Any, Generic, TypeVar

from txindex.errors import DecodeError, ModelError, UnorderableValue
from txindex.ordering import sort_key

__all__ = ["Codec", "round_trips_exactly"]

T = TypeVar("T")

Enc = Callable[[Any], Any]
Dec = Callable[[Any], Any]

_MISSING: Any = object()
_JSON_ENCODE = json.JSONEncoder(
    ensure_ascii=False, allow_nan=False, check_circular=False, separators=(",", ":")
).encode
_JSON_ENCODE_ASCII = json.JSONEncoder(
    ensure_ascii=True, allow_nan=False, check_circular=False, separators=(",", ":")
).encode


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise ValueError(f"number {text} overflows a float")
    return value


_JSON_DECODER = json.JSONDecoder(parse_constant=_reject_constant, parse_float=_finite_float)
_JSON_SCAN = _JSON_DECODER.scan_once  # type: ignore[attr-defined]  # the C scanner


def _json_decode(text: str) -> Any:
    """``json.loads`` with our hooks, minus the Python-level whitespace handling when the text
    has none around the value (what we write); anything else takes the full path."""
    try:
        doc, end = _JSON_SCAN(text, 0)
    except StopIteration:
        end = -1
    if end == len(text):
        return doc
    return _JSON_DECODER.decode(text)  # leading/trailing whitespace, extra data, errors


class _Bad(Exception):
    """Internal: a value does not fit its annotation. ``path`` is built while unwinding."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason
        self.path: list[str] = []

    def where(self) -> str:
        """``a.b[2].c`` from the innermost-first path segments."""
        out = ""
        for seg in reversed(self.path):
            out += seg if seg.startswith("[") or not out else "." + seg
        return out


def _show(v: Any) -> str:
    r = repr(v)
    return r if len(r) <= 60 else r[:57] + "..."


def _expected(what: str, v: Any) -> _Bad:
    return _Bad(f"expected {what}, got {type(v).__name__} {_show(v)}")


def _jtype(v: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "boolean"}.get(
        type(v), "null" if v is None else "number"
    )


def _jexpected(what: str, v: Any) -> _Bad:
    return _Bad(f"expected {what}, got JSON {_jtype(v)} {_show(v)}")


# -- scalar converters ---------------------------------------------------------------------------


def _enc_str(v: Any) -> Any:
    if type(v) is str:
        return v
    if isinstance(v, str) and not isinstance(v, enum.Enum):
        return str(v)
    raise _expected("str", v)


def _dec_str(j: Any) -> Any:
    if type(j) is str:
        return j
    raise _jexpected("a string", j)


def _enc_int(v: Any) -> Any:
    if type(v) is int:
        return v
    if isinstance(v, int) and not isinstance(v, (bool, enum.Enum)):
        return int(v)
    raise _expected("int", v)


def _dec_int(j: Any) -> Any:
    if type(j) is int:
        return j
    raise _jexpected("an integer", j)


def _enc_float(v: Any) -> Any:
    if type(v) is float:
        if math.isfinite(v):
            return v
        raise _Bad(f"{v!r} is not representable in JSON (only finite floats are)")
    if isinstance(v, int) and not isinstance(v, (bool, enum.Enum)):
        return int(v)  # an int is a valid float (PEP 484 numeric tower): kept exact
    if isinstance(v, float) and not isinstance(v, enum.Enum):
        return _enc_float(float(v))
    raise _expected("float", v)


def _dec_float(j: Any) -> Any:
    if type(j) is float or type(j) is int:
        return j
    raise _jexpected("a number", j)


def _enc_bool(v: Any) -> Any:
    if type(v) is bool:
        return v
    raise _expected("bool", v)


def _dec_bool(j: Any) -> Any:
    if type(j) is bool:
        return j
    raise _jexpected("a boolean", j)


def _enc_none(v: Any) -> Any:
    if v is None:
        return None
    raise _expected("None", v)


def _dec_none(j: Any) -> Any:
    if j is None:
        return None
    raise _jexpected("null", j)


def _enc_bytes(v: Any) -> Any:
    if isinstance(v, bytes):
        return base64.b64encode(v).decode("ascii")
    raise _expected("bytes", v)


def _dec_bytes(j: Any) -> Any:
    if type(j) is str:
        try:
            return base64.b64decode(j, validate=True)
        except (binascii.Error, ValueError):
            raise _jexpected("a base64 string", j) from None
    raise _jexpected("a base64 string", j)


def _enc_any(v: Any) -> Any:
    t = type(v)
    if v is None or t is str or t is bool or t is int:
        return v
    if t is float:
        return _enc_float(v)
    if t is tuple or t is list:
        return [_enc_any(x) for x in v]
    if t is dict:
        out = {}
        for k, x in v.items():
            if type(k) is not str:
                raise _Bad(f"dict key {_show(k)} is not a str")
            out[k] = _enc_any(x)
        return out
    raise _Bad(
        f"{t.__name__} {_show(v)} is not JSON-able (Any fields hold None, bool, int, float, "
        "str, tuples and dicts with str keys)"
    )


def _dec_any(j: Any) -> Any:
    t = type(j)
    if t is list:
        return tuple([_dec_any(x) for x in j])
    if t is dict:
        return {k: _dec_any(x) for k, x in j.items()}
    return j


_SCALARS: dict[Any, tuple[Enc, Dec]] = {
    str: (_enc_str, _dec_str),
    int: (_enc_int, _dec_int),
    float: (_enc_float, _dec_float),
    bool: (_enc_bool, _dec_bool),
    type(None): (_enc_none, _dec_none),
    None: (_enc_none, _dec_none),
    bytes: (_enc_bytes, _dec_bytes),
    Any: (_enc_any, _dec_any),
    object: (_enc_any, _dec_any),
}
# Encoders that pass a value of exactly this type through unchanged (hot-path inlining).
_FAST_ENC: dict[Enc, type] = {_enc_str: str, _enc_int: int, _enc_bool: bool}
# Decoders that accept a JSON value unchanged after an exact type check (hot-path inlining).
_PLAIN_DEC: dict[Any, str] = {
    _dec_str: "str",
    _dec_int: "int",
    _dec_bool: "bool",
}


# -- composite converters ------------------------------------------------------------------------


def _tuple_var(enc: Enc, dec: Dec) -> tuple[Enc, Dec]:
    plain = _PLAIN_DEC.get(dec)
    plain_t: type | None = {"str": str, "int": int, "bool": bool}.get(plain or "")

    def enc_t(v: Any) -> Any:
        if not isinstance(v, tuple):
            raise _expected("tuple", v)
        out = []
        for i, x in enumerate(v):
            try:
                out.append(enc(x))
            except _Bad as e:
                e.path.append(f"[{i}]")
                raise
        return out

    def dec_t(j: Any) -> Any:
        if type(j) is not list:
            raise _jexpected("an array", j)
        if plain_t is not None:
            for x in j:
                if type(x) is not plain_t:
                    break
            else:
                return tuple(j)
        out = []
        for i, x in enumerate(j):
            try:
                out.append(dec(x))
            except _Bad as e:
                e.path.append(f"[{i}]")
                raise
        return tuple(out)

    return enc_t, dec_t


def _tuple_fixed(convs: list[tuple[Enc, Dec]]) -> tuple[Enc, Dec]:
    n = len(convs)

    def enc_t(v: Any) -> Any:
        if not isinstance(v, tuple):
            raise _expected(f"tuple of length {n}", v)
        if len(v) != n:
            raise _Bad(f"expected a tuple of length {n}, got length {len(v)}: {_show(v)}")
        out = []
        for i, (x, (enc, _)) in enumerate(zip(v, convs, strict=True)):
            try:
                out.append(enc(x))
            except _Bad as e:
                e.path.append(f"[{i}]")
                raise
        return out

    def dec_t(j: Any) -> Any:
        if type(j) is not list or len(j) != n:
            raise _jexpected(f"an array of length {n}", j)
        out = []
        for i, (x, (_, dec)) in enumerate(zip(j, convs, strict=True)):
            try:
                out.append(dec(x))
            except _Bad as e:
                e.path.append(f"[{i}]")
                raise
        return tuple(out)

    return enc_t, dec_t


def _frozenset(enc: Enc, dec: Dec) -> tuple[Enc, Dec]:
    def enc_s(v: Any) -> Any:
        if not isinstance(v, frozenset):
            raise _expected("frozenset", v)
        try:
            items = sorted(v, key=sort_key)
        except (UnorderableValue, TypeError):
            items = None
        if items is not None:
            return [enc(x) for x in items]
        encoded = [enc(x) for x in v]
        encoded.sort(key=_JSON_ENCODE_ASCII)
        return encoded

    def dec_s(j: Any) -> Any:
        if type(j) is not list:
            raise _jexpected("an array", j)
        out = []
        for i, x in enumerate(j):
            try:
                out.append(dec(x))
            except _Bad as e:
                e.path.append(f"[{i}]")
                raise
        try:
            return frozenset(out)
        except TypeError as e:  # unhashable element (e.g. a dict inside Any)
            raise _Bad(f"frozenset element is not hashable: {e}") from None

    return enc_s, dec_s


def _union(members: list[tuple[Enc, Dec]]) -> tuple[Enc, Dec]:
    if len(members) == 2 and members[1][0] is _enc_none:
        members = [members[1], members[0]]
    if len(members) == 2 and members[0][0] is _enc_none:
        enc_x, dec_x = members[1]

        def enc_opt(v: Any) -> Any:
            return None if v is None else enc_x(v)

        def dec_opt(j: Any) -> Any:
            return None if j is None else dec_x(j)

        return enc_opt, dec_opt

    def enc_u(v: Any) -> Any:
        reasons = []
        for enc, _ in members:
            try:
                return enc(v)
            except _Bad as e:
                reasons.append(e.reason)
        raise _Bad("no member of the union accepts it: " + "; ".join(reasons))

    def dec_u(j: Any) -> Any:
        reasons = []
        for _, dec in members:
            try:
                return dec(j)
            except _Bad as e:
                reasons.append(e.reason)
        raise _Bad("no member of the union accepts it: " + "; ".join(reasons))

    return enc_u, dec_u


def _literal(values: tuple[Any, ...]) -> tuple[Enc, Dec]:
    for a in values:
        if not (a is None or type(a) in (str, int, bool)):
            raise ModelError(f"Literal value {a!r} is not JSON-able (use str, int, bool, None)")
    allowed = {(type(a), a) for a in values}
    text = ", ".join(map(repr, values))

    def check(v: Any) -> Any:
        try:
            if (type(v), v) in allowed:
                return v
        except TypeError:  # unhashable
            pass
        raise _Bad(f"expected one of {text}, got {_show(v)}")

    return check, check


def _enum(cls: type[enum.Enum]) -> tuple[Enc, Dec]:
    for m in cls:
        if not (m.value is None or type(m.value) in (str, int, bool, float)):
            raise ModelError(f"enum {cls.__name__} has a non-JSON value {m.value!r}")

    def enc_e(v: Any) -> Any:
        if isinstance(v, cls):
            return v.value
        raise _expected(cls.__name__, v)

    def dec_e(j: Any) -> Any:
        try:
            return cls(j)
        except (ValueError, TypeError):
            raise _Bad(f"{_show(j)} is not a value of {cls.__name__}") from None

    return enc_e, dec_e


# -- dataclasses ---------------------------------------------------------------------------------


class _Builder:
    """Builds converters for one annotation tree; dataclass converters are memoised (recursive
    dataclasses work through a late-bound cell)."""

    def __init__(self) -> None:
        self.cells: dict[type, list[tuple[Enc, Dec]]] = {}

    def conv(self, tp: Any, where: str) -> tuple[Enc, Dec]:
        if tp in _SCALARS:
            return _SCALARS[tp]
        origin = typing.get_origin(tp)
        args = typing.get_args(tp)
        if origin is typing.Annotated:
            return self.conv(args[0], where)
        if origin is typing.Union or origin is types.UnionType:
            return _union([self.conv(a, where) for a in args])
        if origin is typing.Literal:
            return _literal(args)
        if tp is tuple or origin is tuple:
            if not args or (len(args) == 2 and args[1] is Ellipsis):
                return _tuple_var(*self.conv(args[0] if args else Any, where))
            return _tuple_fixed([self.conv(a, where) for a in args])
        if tp is frozenset or origin is frozenset:
            return _frozenset(*self.conv(args[0] if args else Any, where))
        if isinstance(tp, type) and issubclass(tp, enum.Enum):
            return _enum(tp)
        if isinstance(tp, type) and dataclasses.is_dataclass(tp):
            return self.dataclass(tp)
        from txindex.adapters import nested_convs  # hook: msgspec/attrs/pydantic classes

        nested = nested_convs(tp, self, where)
        if nested is not None:
            return nested
        raise ModelError(
            f"{where}: annotation {tp!r} is not supported by the codec (use str, int, float, "
            "bool, bytes, None, Optional/Union, Literal, Enum, tuple, frozenset, a frozen "
            "dataclass or Any)"
        )

    def dataclass(self, cls: type) -> tuple[Enc, Dec]:
        cell = self.cells.get(cls)
        if cell is None:
            cell = self.cells[cls] = []
            cell.append(_dataclass_convs(cls, self))
        if cell:
            return cell[0]
        # recursion: the converters are being built; bind late through the cell
        return (lambda v: cell[0][0](v)), (lambda j: cell[0][1](j))


def _dataclass_convs(cls: type, builder: _Builder) -> tuple[Enc, Dec]:
    if not dataclasses.is_dataclass(cls):
        raise ModelError(f"{cls!r} is not a dataclass")
    try:
        hints = typing.get_type_hints(cls)
    except Exception as exc:
        raise ModelError(f"cannot resolve the annotations of {cls.__qualname__}: {exc}") from exc
    all_fields = dataclasses.fields(cls)
    init_fields = [f for f in all_fields if f.init]
    direct = len(init_fields) == len(all_fields) and not hasattr(cls, "__post_init__")
    plans = []
    for f in init_fields:
        enc, dec = builder.conv(hints[f.name], f"{cls.__qualname__}.{f.name}")
        if f.default is not dataclasses.MISSING:
            default: Any = ("value", f.default)
        elif f.default_factory is not dataclasses.MISSING:
            default = ("factory", f.default_factory)
        else:
            default = None
        plans.append((f.name, enc, dec, default))
    names = tuple(p[0] for p in plans)
    encs = tuple(p[1] for p in plans)
    fast = tuple(_FAST_ENC.get(e) for e in encs)
    layout = tuple(zip(names, encs, fast, strict=True))
    dec_obj = _generate_decoder(cls, plans, direct)
    return object_encoder(cls, layout), dec_obj


def object_encoder(cls: type[Any], layout: tuple[tuple[str, Enc, Any], ...]) -> Enc:
    """Encode an instance of exactly ``cls`` field by field: ``layout`` holds (attribute,
    encoder, type that needs no encoding or None). Errors name the field path."""

    def enc_obj(v: Any) -> Any:
        if type(v) is not cls:
            raise _expected(cls.__qualname__, v)
        out = {}
        for name, enc, fast_t in layout:
            x = getattr(v, name)
            if type(x) is fast_t:
                out[name] = x
                continue
            try:
                out[name] = enc(x)
            except _Bad as e:
                e.path.append(name)
                raise
        return out

    return enc_obj


def _generate_decoder(cls: type, plans: list[tuple[str, Enc, Dec, Any]], direct: bool) -> Dec:
    """Generate ``dec(j) -> cls`` with inlined checks for plain fields."""
    ns: dict[str, Any] = {
        "_cls": cls,
        "_Bad": _Bad,
        "_jexpected": _jexpected,
        "_MISSING": _MISSING,
        "_new": object.__new__,
        "_setattr": object.__setattr__,
    }
    lines = [
        "def dec(j):",
        "    if type(j) is not dict:",
        "        raise _jexpected('a JSON object', j)",
    ]
    for i, (name, _enc, dec, default) in enumerate(plans):
        v = f"v{i}"
        ns[f"_dec{i}"] = dec
        qname = repr(name)
        if default is None:
            lines += [
                f"    {v} = j.get({qname}, _MISSING)",
                f"    if {v} is _MISSING:",
                f"        raise _Bad('missing required field ' + {qname!r})",
            ]
            indent = "    "
        else:
            kind, dval = default
            ns[f"_default{i}"] = dval
            lines += [f"    {v} = j.get({qname}, _MISSING)", f"    if {v} is _MISSING:"]
            if not direct:
                lines.append("        pass")
            elif kind == "value":
                lines.append(f"        {v} = _default{i}")
            else:
                lines.append(f"        {v} = _default{i}()")
            lines.append("    else:")
            indent = "        "
        plain = _PLAIN_DEC.get(dec)
        if plain is not None:
            lines += [
                f"{indent}if type({v}) is not {plain}:",
                f"{indent}    _fail(_dec{i}, {v}, {qname})",
            ]
        elif dec is _dec_float:
            lines += [
                f"{indent}if type({v}) is not float:",
                f"{indent}    {v} = _call(_dec{i}, {v}, {qname})",
            ]
        else:
            lines.append(f"{indent}{v} = _call(_dec{i}, {v}, {qname})")
    ns["_fail"] = _fail
    ns["_call"] = _call
    if direct:
        lines.append("    o = _new(_cls)")
        for i, (name, *_rest) in enumerate(plans):
            lines.append(f"    _setattr(o, {name!r}, v{i})")
        lines.append("    return o")
    else:
        lines.append("    kw = {}")
        for i, (name, _enc, _dec, default) in enumerate(plans):
            if default is None:
                lines.append(f"    kw[{name!r}] = v{i}")
            else:
                lines.append(f"    if v{i} is not _MISSING:")
                lines.append(f"        kw[{name!r}] = v{i}")
        lines.append("    try:")
        lines.append("        return _cls(**kw)")
        lines.append("    except Exception as e:")
        lines.append("        raise _Bad(f'constructor raised {e!r}') from e")
    exec("\n".join(lines), ns)  # generated from field names (identifiers) only
    fn: Dec = ns["dec"]
    return fn


def _fail(dec: Dec, v: Any, name: str) -> Any:
    try:
        dec(v)
    except _Bad as e:
        e.path.append(name)
        raise
    raise AssertionError("unreachable")  # pragma: no cover


def _call(dec: Dec, v: Any, name: str) -> Any:
    try:
        return dec(v)
    except _Bad as e:
        e.path.append(name)
        raise


class Codec(Generic[T]):
    """JSON codec for one frozen dataclass, built once (O(annotations)); see the module doc.

    ``encode`` is O(size of the object) and raises :class:`ModelError` naming the field path when
    a value does not fit its annotation; ``decode`` is O(size of data) and raises
    :class:`DecodeError` with the etcd key. Unsupported annotations raise :class:`ModelError` at
    construction.
    """

    __slots__ = ("_dec", "_enc", "cls")

    def __init__(self, cls: type[T]) -> None:
        if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
            raise ModelError(f"{cls!r} is not a dataclass")
        self.cls = cls
        self._enc, self._dec = _Builder().dataclass(cls)

    def encode(self, obj: T) -> bytes:
        """The compact JSON of ``obj`` as UTF-8 bytes (non-ASCII kept readable)."""
        try:
            doc = self._enc(obj)
        except _Bad as e:
            where = e.where()
            field = f"{self.cls.__qualname__}.{where}" if where else self.cls.__qualname__
            raise ModelError(f"cannot encode {field}: {e.reason}") from None
        try:
            return _JSON_ENCODE(doc).encode("utf-8")
        except UnicodeEncodeError:  # lone surrogates: escape them, json reads them back
            return _JSON_ENCODE_ASCII(doc).encode("ascii")
        except ValueError as exc:  # an int past Python's digit limit for str (4,300)
            raise ModelError(f"cannot encode {self.cls.__qualname__}: {exc}") from None

    def decode(self, data: bytes, key: str) -> T:
        """The object stored under etcd key ``key``; :class:`DecodeError` if it does not fit."""
        try:
            doc = _json_decode(data.decode("utf-8"))
        except UnicodeDecodeError as exc:
            raise DecodeError(key, f"not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
        except ValueError as exc:
            raise DecodeError(key, f"not valid JSON ({exc})") from None
        except RecursionError:
            raise DecodeError(key, "JSON nested too deeply") from None
        try:
            obj: T = self._dec(doc)
        except _Bad as e:
            where = e.where()
            prefix = f"field {where!r}: " if where else ""
            raise DecodeError(key, f"{self.cls.__qualname__}: {prefix}{e.reason}") from None
        except RecursionError:
            raise DecodeError(key, "value nested too deeply") from None
        return obj


@functools.cache
def round_trips_exactly(cls: type) -> bool:
    """True if every object of model ``cls`` decodes to an equal object of the same types
    (``decode(encode(x))`` could stand for ``x``): a dataclass whose fields are str, int,
    float, bool, bytes, None, enums, literals, optionals, tuples and frozensets of those, or
    such dataclasses. ``Any``/``object`` fields (arrays come back as tuples), unions of
    several types and adapter classes are not. O(annotations), cached."""
    return _exact_type(cls, set())


def _exact_type(tp: Any, seen: set[type]) -> bool:
    if tp in (str, int, float, bool, bytes, None, type(None)):
        return True
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin is typing.Annotated:
        return _exact_type(args[0], seen)
    if origin is typing.Literal:
        return True
    if origin is typing.Union or origin is types.UnionType:
        rest = [a for a in args if a is not type(None)]
        return len(rest) == 1 and _exact_type(rest[0], seen)
    if origin in (tuple, frozenset):
        return all(a is Ellipsis or _exact_type(a, seen) for a in args) and bool(args)
    if isinstance(tp, type) and issubclass(tp, enum.Enum):
        return True
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        if tp in seen:
            return True
        seen.add(tp)
        try:
            hints = typing.get_type_hints(tp)
        except Exception:
            return False
        return all(_exact_type(hints[f.name], seen) for f in dataclasses.fields(tp) if f.init)
    return False
