"""Model libraries: ``msgspec`` Structs, ``attrs`` classes and ``pydantic`` v2 models as models.

``@txindex.model(prefix, key=...)`` accepts, besides a frozen dataclass:

* a ``msgspec.Struct`` declared with ``frozen=True``;
* an ``attrs`` class declared frozen (``@attrs.frozen``, ``@attrs.define(frozen=True)``,
  ``@attr.s(frozen=True)``);
* a ``pydantic.BaseModel`` (v2) with ``model_config = ConfigDict(frozen=True, ...)``.

None of these libraries is a dependency: txindex looks at a class only if the library that made
it is already imported. Index declarations stay class attributes; the one difference is pydantic,
which rejects unannotated class attributes. Either add ``ignored_types=(Index,)`` to the config::

    class Node(BaseModel):
        model_config = ConfigDict(frozen=True, ignored_types=(Index,))
        by_user = Index("user")

or annotate it (any library): ``by_user: ClassVar[Index[Any]] = Index("user")``.

Storage is the same compact JSON as for the equivalent dataclass (fields in declaration order,
field names as keys, same annotation table as :mod:`txindex.codec`), written by txindex's
type-directed encoder (which validates every value: :class:`ModelError` naming the field).
Decoding uses each library's own validation, mapping its errors to :class:`DecodeError`:

* msgspec: ``msgspec.json.Decoder(cls)`` (strict). Every encode is also checked by that decoder
  (so constraints such as ``Meta(ge=0)``, which msgspec does not check at construction, cannot
  write an unreadable value). ``Any`` fields decode JSON arrays as lists there.
* pydantic: ``cls.model_validate_json`` (validators, constraints and strictness as configured).
  ``bytes`` fields need ``ser_json_bytes="base64", val_json_bytes="base64"`` in the config
  (txindex stores bytes as base64) and fields must not have aliases (keys are field names).
* attrs: type-checked field values passed to ``cls(**fields)`` (validators and converters
  run); attrs has no validation of its own beyond those.

Declaration errors (:class:`ModelError`, naming the class and field): a class that is not
frozen, a mutable field type (``list``, ``dict``, ``set``...), an annotation the codec does not
support, or a nested model class that is not frozen.
"""

from __future__ import annotations

import dataclasses
import sys
import typing
from collections.abc import Callable
from typing import Any

from .codec import (
    _FAST_ENC,
    _JSON_ENCODE,
    Codec,
    _Bad,
    _Builder,
    _jexpected,
    object_encoder,
)
from .errors import DecodeError, ModelError

__all__ = ["Adapter", "find_adapter"]

Enc = Callable[[Any], Any]
Dec = Callable[[Any], Any]
_MISSING: Any = object()


class Adapter:
    """How txindex reads one library's classes. Subclasses: one per library."""

    library = ""

    def matches(self, cls: type) -> bool:
        raise NotImplementedError

    def frozen(self, cls: type) -> bool:
        raise NotImplementedError

    def fields(self, cls: type) -> list[tuple[str, str, Any, bool]]:
        """``(attribute, init argument, annotation, required)`` of each stored field, in
        declaration order (the JSON key is the attribute name)."""
        raise NotImplementedError

    def describe(self, cls: type) -> dict[str, Any]:
        """Field name -> annotation, after checking the class is frozen and no field type is
        mutable. Raises :class:`ModelError`."""
        name = cls.__qualname__
        if not self.frozen(cls):
            raise ModelError(f"{name} must be frozen: {self.advice} (stored objects are shared "
                             "between transactions and must never change)")
        from .model import _find_mutable, _type_name

        out: dict[str, Any] = {}
        for attr, _arg, tp, _req in self.fields(cls):
            found = _find_mutable(tp, set())
            if found is not None:
                bad, advice = found
                raise ModelError(
                    f"{name}.{attr}: {_type_name(bad)} is mutable; models are immutable, "
                    f"use {advice}"
                )
            out[attr] = tp
        return out

    advice = ""

    def recreated(self, old: type[Any] | None, cls: type[Any]) -> bool:
        """True if ``cls`` is a class the library rebuilt from ``old``'s body (slots)."""
        return False

    def native_decoder(self, cls: type) -> Callable[[bytes, str], Any] | None:
        """``decode(data, key)`` using the library's own JSON validation, if it has one."""
        return None

    def nested_decoder(self, cls: type) -> Dec | None:
        """``dec(json value) -> obj`` for a class nested in another model, if native."""
        return None

    def check_encoded(self, cls: type) -> Callable[[bytes], None] | None:
        """A check of freshly encoded bytes (raise ``ValueError``), if the library needs one."""
        return None


def _hints(cls: type) -> dict[str, Any]:
    try:
        return typing.get_type_hints(cls)
    except Exception as exc:
        raise ModelError(f"cannot resolve the annotations of {cls.__qualname__}: {exc}") from exc


class MsgspecAdapter(Adapter):
    library = "msgspec"
    advice = "declare it class X(msgspec.Struct, frozen=True)"

    def matches(self, cls: type) -> bool:
        msgspec = sys.modules.get("msgspec")
        return msgspec is not None and issubclass(cls, msgspec.Struct)

    def frozen(self, cls: type) -> bool:
        return bool(cls.__struct_config__.frozen)  # type: ignore[attr-defined]

    def fields(self, cls: type) -> list[tuple[str, str, Any, bool]]:
        import msgspec

        hints = _hints(cls)
        if cls.__struct_config__.array_like:  # type: ignore[attr-defined]
            raise ModelError(f"{cls.__qualname__}: array_like Structs are not supported "
                             "(txindex stores a JSON object of field names)")
        out = []
        for f in msgspec.structs.fields(cls):
            if f.encode_name != f.name:
                raise ModelError(f"{cls.__qualname__}.{f.name}: renamed fields are not supported "
                                 "(txindex stores field names)")
            out.append((f.name, f.name, hints[f.name], f.required))
        return out

    def native_decoder(self, cls: type) -> Callable[[bytes, str], Any]:
        import msgspec

        try:
            decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(cls)
        except TypeError as exc:
            raise ModelError(f"{cls.__qualname__}: msgspec cannot decode it: {exc}") from exc
        errors = (msgspec.ValidationError, msgspec.DecodeError)
        name = cls.__qualname__

        def decode(data: bytes, key: str) -> Any:
            try:
                return decoder.decode(data)
            except errors as exc:
                raise DecodeError(key, f"{name}: {exc}") from None
            except Exception as exc:  # a __post_init__ that raised something else
                raise DecodeError(key, f"{name}: {type(exc).__name__}: {exc}") from None

        return decode

    def nested_decoder(self, cls: type) -> Dec:
        import msgspec

        def dec(j: Any) -> Any:
            try:
                return msgspec.convert(j, cls)
            except msgspec.ValidationError as exc:
                raise _Bad(str(exc)) from None

        return dec

    def check_encoded(self, cls: type) -> Callable[[bytes], None]:
        import msgspec

        decoder: msgspec.json.Decoder[Any] = msgspec.json.Decoder(cls)

        def check(data: bytes) -> None:
            try:
                decoder.decode(data)
            except (msgspec.ValidationError, msgspec.DecodeError) as exc:
                raise ValueError(str(exc)) from None

        return check


class AttrsAdapter(Adapter):
    library = "attrs"
    advice = "use @attrs.frozen or @attrs.define(frozen=True)"

    def matches(self, cls: type) -> bool:
        return "__attrs_attrs__" in cls.__dict__

    def frozen(self, cls: type) -> bool:
        import attrs

        inspect = getattr(attrs, "inspect", None)
        if inspect is not None:
            return bool(inspect(cls).is_frozen)
        return getattr(cls.__setattr__, "__name__", "") == "_frozen_setattrs"  # attrs < 25.4

    def fields(self, cls: type) -> list[tuple[str, str, Any, bool]]:
        import attrs

        hints = _hints(cls)
        out = []
        for a in attrs.fields(cls):
            if not a.init:
                continue
            tp = hints.get(a.name, a.type)
            if tp is None or isinstance(tp, str):
                raise ModelError(f"{cls.__qualname__}.{a.name}: needs a type annotation")
            out.append((a.name, a.alias or a.name.lstrip("_"), tp, a.default is attrs.NOTHING))
        return out

    def recreated(self, old: type[Any] | None, cls: type[Any]) -> bool:
        # attrs' slotted classes (the default of @attrs.define/frozen) are rebuilt from the body
        return (
            old is not None
            and old is not cls
            and "__attrs_attrs__" not in old.__dict__
            and "__attrs_attrs__" in cls.__dict__
            and old.__qualname__ == cls.__qualname__
            and old.__module__ == cls.__module__
        )


class PydanticAdapter(Adapter):
    library = "pydantic"
    advice = "set model_config = ConfigDict(frozen=True)"

    def matches(self, cls: type) -> bool:
        pydantic = sys.modules.get("pydantic")
        return pydantic is not None and issubclass(cls, pydantic.BaseModel)

    def frozen(self, cls: type) -> bool:
        return bool(cls.model_config.get("frozen"))  # type: ignore[attr-defined]

    def fields(self, cls: type) -> list[tuple[str, str, Any, bool]]:
        hints = _hints(cls)
        config = cls.model_config  # type: ignore[attr-defined]
        base64 = (config.get("ser_json_bytes") == "base64"
                  and config.get("val_json_bytes") == "base64")
        out = []
        for name, f in cls.model_fields.items():  # type: ignore[attr-defined]
            if f.alias not in (None, name) or f.validation_alias not in (None, name):
                raise ModelError(f"{cls.__qualname__}.{name}: fields with aliases are not "
                                 "supported (txindex stores field names)")
            tp = hints[name]
            if not base64 and _mentions(tp, bytes):
                raise ModelError(
                    f"{cls.__qualname__}.{name}: a bytes field needs model_config = ConfigDict("
                    "..., ser_json_bytes='base64', val_json_bytes='base64') (txindex stores "
                    "bytes as base64)"
                )
            out.append((name, name, tp, f.is_required()))
        return out

    def native_decoder(self, cls: type) -> Callable[[bytes, str], Any]:
        import pydantic

        name = cls.__qualname__
        validate = cls.model_validate_json  # type: ignore[attr-defined]

        def decode(data: bytes, key: str) -> Any:
            try:
                return validate(data)
            except pydantic.ValidationError as exc:
                raise DecodeError(key, f"{name}: {_pydantic_reason(exc)}") from None
            except Exception as exc:  # a validator that raised something else
                raise DecodeError(key, f"{name}: {type(exc).__name__}: {exc}") from None

        return decode

    def check_encoded(self, cls: type) -> Callable[[bytes], None]:
        """Validate the encoded bytes as a reader will: an object built without validation
        (``model_construct``) that breaks a constraint is refused at put, not stored for
        every reader to fail on."""
        import pydantic

        validate = cls.model_validate_json  # type: ignore[attr-defined]

        def check(data: bytes) -> None:
            try:
                validate(data)
            except pydantic.ValidationError as exc:
                raise ValueError(_pydantic_reason(exc)) from None
            except Exception as exc:  # a validator that raised something else
                raise ValueError(f"{type(exc).__name__}: {exc}") from None

        return check

    def nested_decoder(self, cls: type) -> Dec:
        import pydantic

        validate = cls.model_validate_json  # type: ignore[attr-defined]

        def dec(j: Any) -> Any:
            try:
                return validate(_JSON_ENCODE(j))
            except pydantic.ValidationError as exc:
                raise _Bad(_pydantic_reason(exc)) from None

        return dec


def _pydantic_reason(exc: Any) -> str:
    """Locations and messages only: pydantic's ``str()`` also quotes the input values."""
    parts = []
    for err in exc.errors(include_url=False, include_input=False):
        loc = ".".join(str(p) for p in err.get("loc", ()))
        parts.append(f"{loc}: {err.get('msg')}" if loc else str(err.get("msg")))
    return "; ".join(parts)


def _mentions(tp: Any, target: type) -> bool:
    if tp is target:
        return True
    return any(_mentions(a, target) for a in typing.get_args(tp))


_ADAPTERS: tuple[Adapter, ...] = (MsgspecAdapter(), AttrsAdapter(), PydanticAdapter())


def find_adapter(cls: Any) -> Adapter | None:
    """The adapter for ``cls``, or ``None`` (a dataclass, or a class no adapter knows).
    Never imports a library that is not already imported."""
    if not isinstance(cls, type) or dataclasses.is_dataclass(cls):
        return None
    for adapter in _ADAPTERS:
        if adapter.matches(cls):
            return adapter
    return None


# -- converters ----------------------------------------------------------------------------------


def _convs(adapter: Adapter, cls: type, builder: _Builder) -> tuple[Enc, Dec]:
    """Encoder (txindex's, validating) and decoder (native, else type-checked fields passed to
    the constructor) of one adapter class."""
    adapter.describe(cls)
    plans = []
    for attr, arg, tp, required in adapter.fields(cls):
        enc, dec = builder.conv(tp, f"{cls.__qualname__}.{attr}")
        plans.append((attr, arg, enc, dec, required))
    layout = tuple((p[0], p[2], _FAST_ENC.get(p[2])) for p in plans)
    enc_obj = object_encoder(cls, layout)

    native = adapter.nested_decoder(cls)
    if native is not None:
        return enc_obj, native

    def dec_obj(j: Any) -> Any:
        if type(j) is not dict:
            raise _jexpected("a JSON object", j)
        kw = {}
        for name, arg, _enc, dec, required in plans:
            x = j.get(name, _MISSING)
            if x is _MISSING:
                if required:
                    raise _Bad(f"missing required field {name!r}")
                continue
            try:
                kw[arg] = dec(x)
            except _Bad as e:
                e.path.append(name)
                raise
        try:
            return cls(**kw)
        except Exception as e:
            raise _Bad(f"constructor raised {e!r}") from e

    return enc_obj, dec_obj


def nested_convs(tp: Any, builder: _Builder, where: str) -> tuple[Enc, Dec] | None:
    """Converters for an adapter class used inside an annotation (hook in ``codec._Builder``);
    ``None`` if ``tp`` is not one."""
    adapter = find_adapter(tp)
    if adapter is None:
        return None
    cell = builder.cells.get(tp)
    if cell is None:
        cell = builder.cells[tp] = []
        try:
            cell.append(_convs(adapter, tp, builder))
        except ModelError as exc:
            raise ModelError(f"{where}: {exc}") from None
    if cell:
        return cell[0]
    return (lambda v: cell[0][0](v)), (lambda j: cell[0][1](j))


class AdapterCodec(Codec[Any]):
    """:class:`~txindex.codec.Codec` of an adapter class (see the module doc)."""

    __slots__ = ("_check", "_native")

    def __init__(self, adapter: Adapter, cls: type) -> None:
        self.cls = cls
        builder = _Builder()
        builder.cells[cls] = cell = []
        cell.append(_convs(adapter, cls, builder))
        self._enc, self._dec = cell[0]
        self._native = adapter.native_decoder(cls)
        self._check = adapter.check_encoded(cls)

    def encode(self, obj: Any) -> bytes:
        data = super().encode(obj)
        if self._check is not None:
            try:
                self._check(data)
            except ValueError as exc:
                raise ModelError(
                    f"cannot encode {self.cls.__qualname__}: it would not decode: {exc}"
                ) from None
        return data

    def decode(self, data: bytes, key: str) -> Any:
        if self._native is not None:
            return self._native(data, key)
        return super().decode(data, key)


def codec_for(adapter: Adapter, cls: type) -> Codec[Any]:
    """The codec of a model class declared with ``adapter``'s library."""
    return AdapterCodec(adapter, cls)
