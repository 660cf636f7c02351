"""The JSON codec: round trips (hypothesis), determinism, encode-time validation, DecodeError."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field
from typing import Any, Literal, Optional, Union

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from txindex.codec import Codec
from txindex.errors import DecodeError, ModelError

relaxed = settings(deadline=None)


class Color(enum.Enum):
    RED = "red"
    BLUE = "blue"


@dataclass(frozen=True)
class Addr:
    host: str
    port: int = 0


@dataclass(frozen=True)
class Tree:
    label: str
    kids: tuple[Tree, ...] = ()


@dataclass(frozen=True)
class Flat:
    id: str
    n: int
    x: float
    ok: bool
    nothing: None = None


@dataclass(frozen=True)
class Rich:
    id: int
    maybe: Optional[str]  # noqa: UP045 - the typing spelling must work too
    either: int | str | None
    tags: tuple[str, ...]
    pair: tuple[int, float]
    ints: frozenset[int]
    strs: frozenset[str]
    addr: Addr
    addrs: frozenset[Addr]
    opt_addr: Addr | None
    mode: Literal["a", "b", 3]
    color: Color
    blob: bytes
    anything: Any
    tree: Tree
    union: Union[float, str] = 0.0  # noqa: UP007
    empty: tuple[()] = ()
    dflt: tuple[int, ...] = field(default_factory=tuple)


@dataclass(frozen=True)
class WithPost:
    a: int
    b: int = field(init=False, default=0)

    def __post_init__(self) -> None:
        object.__setattr__(self, "b", self.a * 2)


@dataclass(frozen=True, slots=True)
class Slotted:
    a: str
    b: float = 1.5


json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(allow_nan=False, allow_infinity=False),
    st.text(max_size=5),
)
json_any = st.recursive(
    json_leaf,
    lambda inner: (
        st.lists(inner, max_size=3).map(tuple)
        | st.dictionaries(st.text(max_size=3), inner, max_size=3)
    ),
    max_leaves=6,
)
finite = st.floats(allow_nan=False, allow_infinity=False)
text = st.text(max_size=8)
addrs = st.builds(Addr, host=text, port=st.integers())
trees = st.recursive(
    st.builds(Tree, label=text),
    lambda inner: st.builds(Tree, label=text, kids=st.lists(inner, max_size=3).map(tuple)),
    max_leaves=5,
)

flats = st.builds(Flat, id=text, n=st.integers(), x=finite | st.integers(), ok=st.booleans())
riches = st.builds(
    Rich,
    id=st.integers(),
    maybe=st.none() | text,
    either=st.none() | st.integers() | text,
    tags=st.lists(text, max_size=4).map(tuple),
    pair=st.tuples(st.integers(), finite),
    ints=st.frozensets(st.integers(), max_size=4),
    strs=st.frozensets(text, max_size=4),
    addr=addrs,
    addrs=st.frozensets(addrs, max_size=3),
    opt_addr=st.none() | addrs,
    mode=st.sampled_from(["a", "b", 3]),
    color=st.sampled_from(Color),
    blob=st.binary(max_size=8),
    anything=json_any,
    tree=trees,
    union=finite | text,
    dflt=st.lists(st.integers(), max_size=3).map(tuple),
)


@relaxed
@given(flats)
def test_round_trip_flat(obj: Flat) -> None:
    c = Codec(Flat)
    data = c.encode(obj)
    assert c.decode(data, "k") == obj
    assert json.loads(data)["id"] == obj.id  # plain, readable JSON


@relaxed
@given(riches)
def test_round_trip_rich(obj: Rich) -> None:
    c = Codec(Rich)
    back = c.decode(c.encode(obj), "k")
    assert back == obj
    assert c.encode(back) == c.encode(obj)


@relaxed
@given(st.frozensets(st.integers(), max_size=6), st.frozensets(addrs, max_size=4))
def test_frozenset_encoding_is_deterministic(ints: frozenset[int], a: frozenset[Addr]) -> None:
    base: dict[str, Any] = dict(
        id=1,
        maybe=None,
        either=None,
        tags=(),
        pair=(1, 1.0),
        strs=frozenset(),
        addr=Addr("h"),
        opt_addr=None,
        mode="a",
        color=Color.RED,
        blob=b"",
        anything=None,
        tree=Tree("t"),
    )
    c = Codec(Rich)
    one = c.encode(Rich(ints=ints, addrs=a, **base))
    two = c.encode(
        Rich(ints=frozenset(reversed(list(ints))), addrs=frozenset(reversed(list(a))), **base)
    )
    assert one == two
    assert json.loads(one)["ints"] == sorted(ints)


def test_compact_utf8_and_surrogates() -> None:
    c = Codec(Flat)
    data = c.encode(Flat("é", 1, 2.0, True))
    assert data == '{"id":"é","n":1,"x":2.0,"ok":true,"nothing":null}'.encode()
    lone = Flat("a\udc80b", 1, 0.5, False)
    assert c.decode(c.encode(lone), "k") == lone


def test_post_init_init_false_and_slots() -> None:
    c = Codec(WithPost)
    assert c.encode(WithPost(3)) == b'{"a":3}'
    assert c.decode(b'{"a":4,"b":99}', "k") == WithPost(4)
    assert c.decode(b'{"a":4}', "k").b == 8
    s = Codec(Slotted)
    assert s.decode(s.encode(Slotted("x", 2)), "k") == Slotted("x", 2)
    assert s.decode(b'{"a":"y"}', "k") == Slotted("y")


def test_defaults_may_be_absent_and_extra_fields_are_ignored() -> None:
    c = Codec(Addr)
    assert c.decode(b'{"host":"h"}', "k") == Addr("h", 0)
    assert c.decode(b'{"host":"h","port":2,"new_field":[1,2]}', "k") == Addr("h", 2)
    t = Codec(Tree)
    assert t.decode(b'{"label":"r","kids":[{"label":"c"}]}', "k") == Tree("r", (Tree("c"),))


def test_int_accepted_for_float_and_kept_exact() -> None:
    c = Codec(Flat)
    obj = c.decode(b'{"id":"a","n":1,"x":3,"ok":false}', "k")
    assert obj.x == 3.0 and type(obj.x) is int
    big = Flat("a", 1, 2**60 + 1, True)
    assert c.decode(c.encode(big), "k").x == 2**60 + 1


@pytest.mark.parametrize(
    ("data", "reason"),
    [
        (b"\xff\xfe", "not valid UTF-8"),
        (b"{", "not valid JSON"),
        (b'{"id":"a","n":1,"x":NaN,"ok":true}', "not valid JSON"),
        (b"[1,2]", "expected a JSON object, got JSON array"),
        (b'"str"', "expected a JSON object"),
        (b'{"id":"a","n":1,"x":1.0}', "missing required field 'ok'"),
        (b'{"id":1,"n":1,"x":1.0,"ok":true}', "field 'id': expected a string"),
        (b'{"id":"a","n":true,"x":1.0,"ok":true}', "field 'n': expected an integer"),
        (b'{"id":"a","n":1.5,"x":1.0,"ok":true}', "field 'n': expected an integer"),
        (b'{"id":"a","n":1,"x":"1","ok":true}', "field 'x': expected a number"),
        (b'{"id":"a","n":1,"x":true,"ok":true}', "field 'x': expected a number"),
        (b'{"id":"a","n":1,"x":1,"ok":1}', "field 'ok': expected a boolean"),
        (b'{"id":"a","n":1,"x":1,"ok":true,"nothing":0}', "field 'nothing': expected null"),
    ],
)
def test_decode_errors_flat(data: bytes, reason: str) -> None:
    with pytest.raises(DecodeError) as info:
        Codec(Flat).decode(data, "app/flat/a")
    assert info.value.key == "app/flat/a"
    assert reason in info.value.reason


GOOD_RICH: dict[str, Any] = {
    "id": 1,
    "maybe": None,
    "either": "x",
    "tags": ["a"],
    "pair": [1, 2.5],
    "ints": [1],
    "strs": [],
    "addr": {"host": "h"},
    "addrs": [],
    "opt_addr": None,
    "mode": 3,
    "color": "red",
    "blob": "AAE=",
    "anything": {"k": [1, 2]},
    "tree": {"label": "t"},
}


@pytest.mark.parametrize(
    ("patch", "reason"),
    [
        ({"tags": "a"}, "field 'tags': expected an array"),
        ({"tags": ["a", 1]}, "field 'tags[1]': expected a string"),
        ({"pair": [1]}, "field 'pair': expected an array of length 2"),
        ({"pair": [1, "x"]}, "field 'pair[1]': expected a number"),
        ({"addr": {"port": 1}}, "field 'addr': missing required field 'host'"),
        ({"addr": {"host": "h", "port": "1"}}, "field 'addr.port': expected an integer"),
        ({"addr": []}, "field 'addr': expected a JSON object"),
        ({"mode": "c"}, "field 'mode': expected one of 'a', 'b', 3"),
        ({"mode": True}, "field 'mode': expected one of"),
        ({"color": "green"}, "field 'color': 'green' is not a value of Color"),
        ({"blob": "!!"}, "field 'blob': expected a base64 string"),
        ({"either": 1.5}, "field 'either': no member of the union accepts it"),
        ({"tree": {"label": "t", "kids": [{"label": 2}]}}, "field 'tree.kids[0].label'"),
        ({"ints": [{}]}, "field 'ints[0]': expected an integer"),
    ],
)
def test_decode_errors_rich(patch: dict[str, Any], reason: str) -> None:
    c = Codec(Rich)
    assert isinstance(c.decode(json.dumps(GOOD_RICH).encode(), "k"), Rich)
    with pytest.raises(DecodeError) as info:
        c.decode(json.dumps({**GOOD_RICH, **patch}).encode(), "k")
    assert reason in info.value.reason


@pytest.mark.parametrize(
    ("obj", "message"),
    [
        (Flat(1, 1, 1.0, True), "Flat.id: expected str, got int 1"),  # type: ignore[arg-type]
        (Flat("a", True, 1.0, True), "Flat.n: expected int, got bool"),
        (Flat("a", 1, float("nan"), True), "Flat.x: nan is not representable"),
        (Flat("a", 1, float("inf"), True), "Flat.x: inf is not representable"),
        (Flat("a", 1, 1.0, 1), "Flat.ok: expected bool"),  # type: ignore[arg-type]
        (Addr(["h"]), "Addr.host: expected str, got list"),  # type: ignore[arg-type]
    ],
)
def test_encode_errors_name_the_field(obj: Any, message: str) -> None:
    with pytest.raises(ModelError, match="cannot encode") as info:
        Codec(type(obj)).encode(obj)
    assert message in str(info.value)


def test_encode_errors_nested_paths() -> None:
    c = Codec(Rich)
    good = c.decode(json.dumps(GOOD_RICH).encode(), "k")
    bad: list[tuple[dict[str, Any], str]] = [
        ({"tags": ["a"]}, "Rich.tags: expected tuple"),
        ({"tags": ("a", 1)}, "Rich.tags[1]: expected str"),
        ({"addr": Addr("h", "x")}, "Rich.addr.port: expected int"),  # type: ignore[arg-type]
        ({"anything": {1: 2}}, "Rich.anything: dict key 1 is not a str"),
        ({"anything": {"a": {1, 2}}}, "Rich.anything: set {1, 2} is not JSON-able"),
        ({"ints": {1}}, "Rich.ints: expected frozenset"),
        ({"mode": "z"}, "Rich.mode: expected one of"),
        ({"color": "red"}, "Rich.color: expected Color"),
        ({"pair": (1, 2, 3)}, "Rich.pair: expected a tuple of length 2"),
    ]
    for change, message in bad:
        kwargs: dict[str, Any] = {**good.__dict__, **change}
        obj = Rich(**kwargs)
        with pytest.raises(ModelError) as info:
            c.encode(obj)
        assert message in str(info.value), (change, str(info.value))


def test_unsupported_annotation_is_a_model_error() -> None:
    @dataclass(frozen=True)
    class Bad:
        when: complex

    with pytest.raises(ModelError, match=r"Bad.when: annotation .*complex.* not supported"):
        Codec(Bad)
    with pytest.raises(ModelError, match="not a dataclass"):
        Codec(int)


@relaxed
@given(
    st.one_of(
        st.binary(max_size=40),
        st.dictionaries(st.sampled_from(sorted(GOOD_RICH)), json_any, max_size=6).map(
            lambda patch: json.dumps({**GOOD_RICH, **patch}).encode()
        ),
    )
)
def test_decode_never_raises_anything_but_decode_error(data: bytes) -> None:
    try:
        obj = Codec(Rich).decode(data, "k")
    except DecodeError:
        return
    assert isinstance(obj, Rich)


def test_deeply_nested_json_is_a_decode_error() -> None:
    with pytest.raises(DecodeError, match=r"nested too deeply|not valid JSON"):
        Codec(Rich).decode(b"[" * 100_000 + b"]" * 100_000, "k")


_json_texts = st.one_of(
    st.recursive(
        st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=False,
                  allow_infinity=False), st.text(max_size=5)),
        lambda inner: st.one_of(st.lists(inner, max_size=3),
                                st.dictionaries(st.text(max_size=3), inner, max_size=3)),
        max_leaves=8,
    ).map(json.dumps),
    st.text(max_size=12),
)


@settings(max_examples=300, deadline=None)
@given(_json_texts, st.sampled_from(["", " ", "\n", "x", "{}", "1e999", "NaN"]),
       st.sampled_from(["", " ", "\t"]))
def test_fast_json_path_matches_the_full_decoder(text: str, tail: str, head: str) -> None:
    """The scanner fast path returns what JSONDecoder.decode (with our hooks) returns, and
    raises where it raises."""
    from txindex.codec import _JSON_DECODER, _json_decode

    doc = head + text + tail
    try:
        want: Any = _JSON_DECODER.decode(doc)
    except ValueError as exc:
        with pytest.raises(type(exc)):
            _json_decode(doc)
        return
    assert _json_decode(doc) == want
