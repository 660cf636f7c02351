"""@txindex.model declarations, ModelInfo, and Index key extraction for every index kind."""

from __future__ import annotations

import re
import typing
from dataclasses import dataclass, field
from typing import Any, Optional

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txindex.errors import DecodeError, ModelError, UnorderableValue
from txindex.index import Index
from txindex.model import ModelInfo, check_object, check_prefixes, info_of, model
from txindex.ordering import sort_key

relaxed = settings(deadline=None)


@model("nodes/", key="id")
@dataclass(frozen=True)
class Node:
    id: str
    user: str
    ip: Any
    tags: tuple[Any, ...] = ()
    last_seen: float = 0.0

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)
    by_user_seen = Index("user", "last_seen")
    active = Index(lambda n: n.last_seen, where=lambda n: n.last_seen > 0)
    tag_count = Index(lambda n: n.tags, multi=True)


@model("jobs/", key="num")
@dataclass(frozen=True)
class Job:
    num: int
    name: str = ""


@dataclass(frozen=True)
class Inner:
    xs: tuple[int, ...]


# -- model declaration ---------------------------------------------------------------------------


def test_model_info() -> None:
    info = info_of(Node)
    assert info is info_of(Node("a", "u", "1")) and isinstance(info, ModelInfo)
    assert (info.cls, info.name, info.prefix, info.key_field, info.key_type) == (
        Node,
        "Node",
        "nodes/",
        "id",
        str,
    )
    assert [i.name for i in info.indexes] == [
        "by_user",
        "by_ip",
        "by_tag",
        "by_user_seen",
        "active",
        "tag_count",
    ]
    assert Node.by_user_seen.qualname == "Node.by_user_seen"
    assert Node.by_user.model is Node and Node("a", "u", "1").by_user is Node.by_user
    assert Node.by_ip.unique and not Node.by_user.unique
    assert Node.by_tag.multi and Node.by_user_seen.fields == ("user", "last_seen")
    assert Node.active.fields == () and Node.active.computed
    n = Node("n1", "alice", "10.0.0.1", ("a",), 3.5)
    assert info.pk(n) == "n1"
    assert info.decode(info.encode(n), "app/nodes/n1") == n
    assert check_object(info, n) is n


def test_keys() -> None:
    node, job = info_of(Node), info_of(Job)
    assert node.key_suffix("n/1") == "n/1" and node.pk_from_suffix("n/1") == "n/1"
    assert job.key_suffix(-5) == "-5" and job.pk_from_suffix("-5") == -5
    with pytest.raises(ModelError, match=re.escape("Node key must be str, got int 5")):
        node.key_suffix(5)
    with pytest.raises(ModelError, match="Job key must be int, got bool True"):
        job.key_suffix(True)
    with pytest.raises(ModelError, match="non-empty"):
        node.key_suffix("")
    for bad in ["", "05", "+5", " 5", "5_0", "x", "1.0"]:
        with pytest.raises(ValueError):
            job.pk_from_suffix(bad)
    with pytest.raises(ValueError):
        node.pk_from_suffix("")


def test_info_of_and_check_object_reject_non_models() -> None:
    advice = r"is not a txindex model; decorate it with @txindex\.model"
    for thing in (Inner, Inner((1,)), int, 5):
        with pytest.raises(ModelError, match=advice):
            info_of(thing)

    class Sub(Node):
        pass

    with pytest.raises(ModelError, match="not a txindex model"):
        info_of(Sub)  # a subclass does not inherit the declaration
    with pytest.raises(ModelError, match="expected a Node, got Job"):
        check_object(info_of(Node), Job(1))


def test_check_prefixes() -> None:
    assert check_prefixes([Node, Job, Node]) == (info_of(Node), info_of(Job))

    @model("nodes/sub/", key="id")
    @dataclass(frozen=True)
    class Sub:
        id: str

    @model("nodes/", key="id")
    @dataclass(frozen=True)
    class Same:
        id: str

    with pytest.raises(ModelError, match="model prefixes overlap: Node uses 'nodes/' and Sub"):
        check_prefixes([Job, Sub, Node])
    with pytest.raises(ModelError, match="overlap"):
        check_prefixes([Node, Same])
    with pytest.raises(ModelError, match="not a txindex model"):
        check_prefixes([Node, Inner])


def declare(prefix: str = "x/", key: str = "id", frozen: bool = True, **annotations: Any) -> type:
    ns: dict[str, Any] = {"__annotations__": {"id": "str", **annotations}}
    cls = type("Thing", (), ns)
    return model(prefix, key=key)(dataclass(frozen=frozen)(cls))


@pytest.mark.parametrize(
    ("annotation", "shown", "advice"),
    [
        (list[str], "list[str]", "tuple[X, ...]"),
        (typing.List[int], "typing.List[int]", "tuple[X, ...]"),  # noqa: UP006
        (dict[str, int], "dict[str, int]", "a tuple of pairs"),
        (set[int], "set[int]", "frozenset[X]"),
        (bytearray, "bytearray", "bytes"),
        (Optional[list[int]], "list[int]", "tuple[X, ...]"),  # noqa: UP045
        (tuple[int, dict[str, int]] | None, "dict[str, int]", "a tuple of pairs"),
        (tuple[frozenset[int], ...], None, None),
        (Inner | None, None, None),
    ],
)
def test_mutable_field_types_are_refused(annotation: Any, shown: str | None, advice: str) -> None:
    if shown is None:
        declare(things=annotation)
        return
    with pytest.raises(ModelError) as info:
        declare(things=annotation)
    msg = str(info.value)
    assert msg.startswith(f"Thing.things: {shown} is mutable") and advice in msg, msg


def test_non_frozen_nested_dataclass_is_refused() -> None:
    @dataclass
    class Loose:
        a: int

    with pytest.raises(ModelError, match=r"Thing.inner: .*Loose is mutable.*frozen=True"):
        declare(inner=Loose)


def test_declaration_errors() -> None:
    with pytest.raises(ModelError, match="must be frozen: use @dataclass\\(frozen=True\\)"):
        declare(frozen=False)
    with pytest.raises(ModelError, match="not a dataclass; put @dataclass\\(frozen=True\\)"):
        model("x/", key="id")(type("Plain", (), {}))
    with pytest.raises(ModelError, match="has no field 'nope'"):
        declare(key="nope")
    with pytest.raises(ModelError, match="key field must be annotated str or int, got float"):
        declare(key="f", f=float)
    with pytest.raises(ModelError, match="key field must be annotated str or int, got bool"):
        declare(key="f", f=bool)
    with pytest.raises(ModelError, match="must end with '/'"):
        declare(prefix="x")
    with pytest.raises(ModelError, match="non-empty"):
        declare(prefix="")
    with pytest.raises(ModelError, match="not supported by the codec"):
        declare(c=complex)


def test_annotated_index_is_not_a_field() -> None:
    with pytest.raises(ModelError, match=r"F\.by_id: an Index must not be a dataclass field"):

        @model("f/", key="id")
        @dataclass(frozen=True)
        class F:
            id: str
            by_id: Index[Any] = Index("id")  # noqa: RUF009 - the mistake under test

    @model("g/", key="id")
    @dataclass(frozen=True)
    class G:
        id: str
        by_id: typing.ClassVar[Index[Any]] = Index("id")

    assert info_of(G).indexes == (G.by_id,)


def test_index_field_must_exist_and_not_be_shared() -> None:
    with pytest.raises(ModelError, match=r"Bad\.by_x names 'x', which is not a field of Bad"):

        @model("bad/", key="id")
        @dataclass(frozen=True)
        class Bad:
            id: str
            by_x = Index("x")

    shared = Index("id")

    @model("one/", key="id")
    @dataclass(frozen=True)
    class One:
        id: str
        by_id = shared

    with pytest.raises(ModelError, match=r"already belongs to One\.by_id"):

        @model("two/", key="id")
        @dataclass(frozen=True)
        class Two:
            id: str
            by_id = shared


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((), {}, "needs a field name"),
        (("a", lambda o: o), {}, "exactly one callable"),
        ((lambda o: o, lambda o: o), {}, "exactly one callable"),
        (("a", "b"), {"multi": True}, "compound multi index is not supported"),
        ((3,), {}, "field names \\(str\\) or one callable"),
        (("a", "a"), {}, "names a field twice"),
        (("not a name",), {}, "not a valid field name"),
        (("a",), {"where": 3}, "where=...\\) must be a callable"),
    ],
)
def test_bad_index_forms(args: tuple[Any, ...], kwargs: dict[str, Any], message: str) -> None:
    with pytest.raises(ModelError, match=message):
        Index(*args, **kwargs)


def test_unbound_index() -> None:
    idx = Index("a")
    assert idx.qualname == "<unbound Index>"
    with pytest.raises(ModelError, match="not declared in a class"):
        _ = idx.model


# -- index entries -------------------------------------------------------------------------------


def test_entries_every_kind() -> None:
    n = Node("n1", "alice", "10.0.0.1", ("b", "a", "b", 1, 1.0, True), 7)
    assert Node.by_user.bare and Node.by_user_seen.bare  # str / (str, float) fields: bare keys
    assert not Node.by_ip.bare and not Node.by_tag.bare  # Any fields: sort_key encoding
    assert Node.by_user.entries(n) == ("alice",)
    assert Node.by_user.canonical("alice") == sort_key("alice")
    assert Node.by_ip.entries(n) == (sort_key("10.0.0.1"),)
    assert Node.by_user_seen.entries(n) == (("alice", 7),)
    assert Node.by_user_seen.canonical(("alice", 7)) == (sort_key("alice"), sort_key(7))
    assert Node.by_tag.entries(n) == (sort_key(True), sort_key(1), sort_key("a"), sort_key("b"))
    assert Node.active.entries(n) == (sort_key(7),)
    assert Node.active.entries(Node("n2", "bob", "x")) == ()  # partial: where excludes it
    assert Node.by_tag.entries(Node("n3", "bob", "x")) == ()  # empty multi value
    assert Node.tag_count.entries(n) == Node.by_tag.entries(n)  # computed multi


@relaxed
@given(st.lists(st.one_of(st.integers(-3, 3), st.text("ab", max_size=2), st.none()), max_size=8))
def test_multi_entries_sorted_and_deduplicated(tags: list[Any]) -> None:
    got = Node.by_tag.entries(Node("n", "u", "i", tuple(tags)))
    assert list(got) == sorted({sort_key(t) for t in tags})


def test_unorderable_values_name_model_index_and_field() -> None:
    bad = Node("n1", "alice", {"v": 4})
    with pytest.raises(UnorderableValue) as info:
        Node.by_ip.entries(bad)
    assert str(info.value).startswith("Node.by_ip (field 'ip'): value {'v': 4} of type dict")
    with pytest.raises(UnorderableValue, match=r"Node.by_user_seen \(field 'last_seen'\): .*NaN"):
        Node.by_user_seen.entries(Node("n1", "alice", "ip", (), float("nan")))
    with pytest.raises(UnorderableValue, match=r"Node.by_tag \(field 'tags'\): .*list"):
        Node.by_tag.entries(Node("n1", "alice", "ip", ([1],)))
    with pytest.raises(UnorderableValue, match=r"Node.tag_count \(computed\): .*set"):
        Node.tag_count.entries(Node("n1", "alice", "ip", ({1},)))


def test_user_callables_errors_are_wrapped() -> None:
    @model("w/", key="id")
    @dataclass(frozen=True)
    class W:
        id: str
        s: Any = None
        boom = Index(lambda w: 1 / 0)
        picky = Index("id", where=lambda w: w.s.upper() == "X")
        chars = Index("s", multi=True)

    w = W("a")
    with pytest.raises(ModelError, match=r"W.boom: the key callable raised ZeroDivisionError"):
        W.boom.entries(w)
    with pytest.raises(ModelError, match=r"W.picky: where= raised AttributeError"):
        W.picky.entries(w)
    assert W.picky.entries(W("a", "x")) == ("a",)
    with pytest.raises(ModelError, match=r"W.chars \(field 's'\): a multi index needs an iterable"):
        W.chars.entries(W("a", "abc"))
    with pytest.raises(ModelError, match="a multi index needs an iterable"):
        W.chars.entries(W("a", 5))
    assert W.chars.entries(W("a", frozenset({2, 1}))) == (sort_key(1), sort_key(2))


def test_defaults_and_factories_in_models() -> None:
    @model("d/", key="id")
    @dataclass(frozen=True)
    class D:
        id: int
        xs: tuple[int, ...] = field(default_factory=tuple)

    info = info_of(D)
    assert info.decode(b'{"id":3}', "d/3") == D(3)
    with pytest.raises(DecodeError):
        info.decode(b'{"xs":[]}', "d/3")


def test_slots_dataclass_model_keeps_its_indexes() -> None:
    @model("slotted/", key="id")
    @dataclass(frozen=True, slots=True)
    class Slotted:
        id: str
        v: int = 0

        by_v = Index("v")

    info = Slotted.__txindex_model__  # type: ignore[attr-defined]
    assert info.indexes == (Slotted.by_v,)
    assert Slotted.by_v.model is Slotted
    assert Slotted.by_v.entries(Slotted("a", 3)) == (3,)
