"""msgspec Structs, attrs classes and pydantic v2 models as txindex models (txindex.adapters)."""

from __future__ import annotations

import dataclasses
import datetime
import enum
from collections.abc import Callable
from typing import Annotated, Any, ClassVar

import attrs
import msgspec
import pydantic
import pytest

import txindex
from txindex import DB, DecodeError, Index, ModelError, UniqueViolation
from txindex.backend import Put


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@txindex.model("dnodes/", key="id")
@dataclasses.dataclass(frozen=True)
class DNode:
    id: str
    user: str
    ip: str
    tags: tuple[str, ...] = ()
    last_seen: float = 0.0
    color: Color = Color.RED
    blob: bytes = b""

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)


@txindex.model("mnodes/", key="id")
class MNode(msgspec.Struct, frozen=True):
    id: str
    user: str
    ip: str
    tags: tuple[str, ...] = ()
    last_seen: float = 0.0
    color: Color = Color.RED
    blob: bytes = b""

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)


@txindex.model("anodes/", key="id")
@attrs.frozen
class ANode:
    id: str
    user: str
    ip: str
    tags: tuple[str, ...] = ()
    last_seen: float = 0.0
    color: Color = Color.RED
    blob: bytes = b""

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)


@txindex.model("pnodes/", key="id")
class PNode(pydantic.BaseModel):
    # the one difference: pydantic rejects unannotated class attributes unless told to ignore
    model_config = pydantic.ConfigDict(
        frozen=True, ignored_types=(Index,), ser_json_bytes="base64", val_json_bytes="base64"
    )
    id: str
    user: str
    ip: str
    tags: tuple[str, ...] = ()
    last_seen: float = 0.0
    color: Color = Color.RED
    blob: bytes = b""

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)


def _make(cls: type[Any], **kw: Any) -> Any:
    return cls(**kw)


NODE_CLASSES = [DNode, MNode, ANode, PNode]
ids = [c.__name__ for c in NODE_CLASSES]


@pytest.mark.parametrize("cls", NODE_CLASSES, ids=ids)
def test_same_compact_json_and_round_trip(cls: type[Any]) -> None:
    kw: dict[str, Any] = dict(
        id="n1", user="alïce", ip="10.0.0.1", tags=("b", "a"), last_seen=2.5,
        color=Color.BLUE, blob=b"\x00\xffhi",
    )
    info = cls.__txindex_model__
    data = info.encode(cls(**kw))
    assert data == DNode.__txindex_model__.encode(DNode(**kw))
    assert data.startswith(b'{"id":"n1","user":"al\xc3\xafce",')
    assert info.decode(data, "x/n1") == cls(**kw)
    assert [i.name for i in info.indexes] == ["by_user", "by_ip", "by_tag"]
    assert all(i.model is cls for i in info.indexes)


@pytest.mark.parametrize("cls", [MNode, ANode, PNode], ids=["msgspec", "attrs", "pydantic"])
def test_engine_works_on_each_library(
    cls: type[Any], make_db: Callable[..., DB]
) -> None:
    db = make_db(models=[cls])
    with db.tx() as tx:
        tx.put(cls(id="n1", user="alice", ip="10.0.0.1", tags=("prod",)))
        tx.put(cls(id="n2", user="alice", ip="10.0.0.2"))
    with db.tx() as tx:
        with pytest.raises(UniqueViolation):
            tx.put(cls(id="n3", user="bob", ip="10.0.0.1"))
        tx.rollback()
    db2 = make_db(models=[cls])  # a second cache decodes what the first wrote
    assert db2.wait_for(db.revision, 10)
    with db2.read() as tx:
        assert [n.id for n in tx.find(cls.by_user, "alice")] == ["n1", "n2"]
        assert tx.first(cls.by_ip, "10.0.0.2") == cls(id="n2", user="alice", ip="10.0.0.2")
        assert tx.count(cls.by_tag, "prod") == 1
        got = tx.get(cls, "n1")
        assert type(got) is cls and got.tags == ("prod",)


@pytest.mark.parametrize("cls", [MNode, ANode, PNode], ids=["msgspec", "attrs", "pydantic"])
def test_bad_stored_values_are_decode_errors(
    cls: type[Any], make_db: Callable[..., DB], prefix: str
) -> None:
    db = make_db(models=[cls])
    info = cls.__txindex_model__
    bad = {
        "wrongtype": b'{"id":"wrongtype","user":5,"ip":"x"}',
        "missing": b'{"id":"missing","ip":"x"}',
        "notjson": b"{nope",
        "keymismatch": b'{"id":"other","user":"u","ip":"x"}',
    }
    ops = [Put(f"{prefix}{info.prefix}{k}".encode(), v) for k, v in bad.items()]
    rev = db._backend.txn([], ops).revision
    assert db.wait_for(rev, 10)
    with db.read() as tx:
        for k in bad:
            with pytest.raises(DecodeError) as err:
                tx.get(cls, k)
            assert err.value.key == info.prefix + k
    assert db.stats()["decode_errors"] == len(bad)


def test_library_validation_runs_on_decode() -> None:
    @txindex.model("pv/", key="id")
    class P(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(frozen=True)
        id: str
        quota: Annotated[int, pydantic.Field(ge=0)] = 0
        by_quota: ClassVar[Index[Any]] = Index("quota")  # the ClassVar form works too

    info = P.__txindex_model__
    assert info.indexes == (P.by_quota,)
    with pytest.raises(DecodeError, match="greater than or equal to 0"):
        info.decode(b'{"id":"a","quota":-1}', "pv/a")

    def positive(_inst: Any, _att: Any, value: int) -> None:
        if value < 0:
            raise ValueError("quota must be >= 0")

    @txindex.model("av/", key="id")
    @attrs.frozen
    class A:
        id: str
        quota: int = attrs.field(default=0, validator=positive)

    with pytest.raises(DecodeError, match="quota must be >= 0"):
        A.__txindex_model__.decode(b'{"id":"a","quota":-1}', "av/a")
    with pytest.raises(DecodeError, match="quota"):
        A.__txindex_model__.decode(b'{"id":"a","quota":"1"}', "av/a")  # type-checked too

    @txindex.model("mv/", key="id")
    class M(msgspec.Struct, frozen=True):
        id: str
        quota: Annotated[int, msgspec.Meta(ge=0)] = 0

    minfo = M.__txindex_model__
    with pytest.raises(DecodeError, match="quota"):
        minfo.decode(b'{"id":"a","quota":-1}', "mv/a")
    # msgspec does not validate at construction: the encoder refuses what would not read back
    with pytest.raises(ModelError, match="would not decode"):
        minfo.encode(M(id="a", quota=-1))
    with pytest.raises(ModelError, match=r"M\.quota"):
        minfo.encode(M(id="a", quota="x"))  # type: ignore[arg-type]


def test_non_frozen_classes_are_refused() -> None:
    with pytest.raises(ModelError, match="must be frozen"):
        @txindex.model("x/", key="id")
        class M(msgspec.Struct):
            id: str

    with pytest.raises(ModelError, match="must be frozen"):
        @txindex.model("x/", key="id")
        @attrs.define
        class A:
            id: str

    with pytest.raises(ModelError, match="must be frozen"):
        @txindex.model("x/", key="id")
        class P(pydantic.BaseModel):
            id: str


def test_mutable_fields_are_refused_naming_the_field() -> None:
    with pytest.raises(ModelError, match=r"M\.tags: list\[str\] is mutable"):
        @txindex.model("x/", key="id")
        class M(msgspec.Struct, frozen=True):
            id: str
            tags: list[str] = []

    with pytest.raises(ModelError, match=r"A\.attrs_: dict\[str, int\] is mutable"):
        @txindex.model("x/", key="id")
        @attrs.frozen
        class A:
            id: str
            attrs_: dict[str, int] = attrs.Factory(dict)

    with pytest.raises(ModelError, match=r"P\.s: set\[int\] is mutable"):
        @txindex.model("x/", key="id")
        class P(pydantic.BaseModel, frozen=True):
            id: str
            s: set[int] = set()


class Inner(pydantic.BaseModel):  # not frozen
    x: int


class FInner(msgspec.Struct, frozen=True):
    x: int
    data: bytes = b""


def test_nested_classes_must_be_frozen_too() -> None:
    with pytest.raises(ModelError, match=r"Outer\.inner.*Inner must be frozen"):
        @txindex.model("x/", key="id")
        @attrs.frozen
        class Outer:
            id: str
            inner: Inner

    @txindex.model("nest/", key="id")
    @dataclasses.dataclass(frozen=True)
    class DOuter:
        id: str
        inner: FInner
        more: tuple[FInner, ...] = ()

    info = DOuter.__txindex_model__
    obj = DOuter("a", FInner(1, b"\x01"), (FInner(2),))
    data = info.encode(obj)
    assert data == b'{"id":"a","inner":{"x":1,"data":"AQ=="},"more":[{"x":2,"data":""}]}'
    assert info.decode(data, "nest/a") == obj
    with pytest.raises(DecodeError, match="inner"):
        info.decode(b'{"id":"a","inner":{"x":"1"}}', "nest/a")


def test_pydantic_bytes_need_base64_and_aliases_are_refused() -> None:
    with pytest.raises(ModelError, match=r"P\.b: a bytes field needs .*base64"):
        @txindex.model("x/", key="id")
        class P(pydantic.BaseModel, frozen=True):
            id: str
            b: bytes = b""

    with pytest.raises(ModelError, match=r"Q\.name: fields with aliases"):
        @txindex.model("x/", key="id")
        class Q(pydantic.BaseModel, frozen=True):
            id: str
            name: str = pydantic.Field(alias="n")


def test_unsupported_annotation_is_a_model_error() -> None:
    with pytest.raises(ModelError, match="not supported by the codec"):
        @txindex.model("x/", key="id")
        class M(msgspec.Struct, frozen=True):
            id: str
            at: datetime.datetime


def test_key_field_rules_apply() -> None:
    with pytest.raises(ModelError, match="key field must be annotated str or int"):
        @txindex.model("x/", key="id")
        @attrs.frozen
        class A:
            id: float

    with pytest.raises(ModelError, match="no field 'nope'"):
        @txindex.model("x/", key="nope")
        class M(msgspec.Struct, frozen=True):
            id: str


def test_an_object_built_without_validation_is_refused_at_put() -> None:
    """pydantic's ``model_construct`` skips validation: an object that breaks a constraint
    would be stored and then fail every reader's decode; it is refused when put, as msgspec's
    are."""

    @txindex.model("accounts/", key="id")
    class Account(pydantic.BaseModel):
        model_config = pydantic.ConfigDict(frozen=True)
        id: str
        balance: int = pydantic.Field(ge=0)

    db = txindex.open("memory://", models=[Account])
    try:
        with db.tx() as tx:
            with pytest.raises(ModelError, match="would not decode: balance"):
                tx.put(Account.model_construct(id="a1", balance=-5))
            tx.put(Account(id="a2", balance=5))
        with db.read() as r:
            assert r.get(Account, "a1") is None and r.get(Account, "a2") == Account(
                id="a2", balance=5
            )
    finally:
        db.close()


def test_array_like_msgspec_structs_are_refused() -> None:
    class AL(msgspec.Struct, frozen=True, array_like=True):
        id: str

    with pytest.raises(ModelError, match="array_like"):
        txindex.model("al/", key="id")(AL)
