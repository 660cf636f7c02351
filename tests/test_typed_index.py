"""Typed indexes (bare keys) answer every query exactly like the general sort_key encoding.

``Typed`` and ``Untyped`` store the same objects; ``Typed`` annotates its indexed fields with
plain types (so its indexes hold bare values), ``Untyped`` annotates them ``Any`` (so its indexes
encode with ``sort_key``). Queries with values of every type, including types the typed fields
never hold, must return the same objects in the same order.
"""

from __future__ import annotations

import enum
import uuid
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import txindex
from txindex import Index, UnorderableValue
from txindex.fences import bucket_fence
from txindex.ordering import TOP, sort_key


@txindex.model("typed/", key="id")
@dataclass(frozen=True)
class Typed:
    id: str
    s: str = ""
    f: float = 0.0
    n: int = 0
    tags: tuple[str, ...] = ()

    by_s = Index("s")
    by_f = Index("f")
    by_n = Index("n", unique=True)
    by_s_f = Index("s", "f")
    by_tag = Index("tags", multi=True)


@txindex.model("untyped/", key="id")
@dataclass(frozen=True)
class Untyped:
    id: str
    s: Any = ""
    f: Any = 0.0
    n: Any = 0
    tags: Any = ()

    by_s = Index("s")
    by_f = Index("f")
    by_n = Index("n", unique=True)
    by_s_f = Index("s", "f")
    by_tag = Index("tags", multi=True)


INDEXES = ("by_s", "by_f", "by_n", "by_s_f", "by_tag")


class Color(enum.StrEnum):
    RED = "b"


def test_typed_fields_choose_bare_keys() -> None:
    assert all(getattr(Typed, name).bare for name in INDEXES)
    assert not any(getattr(Untyped, name).bare for name in INDEXES)


texts = st.text("ab", max_size=3)
floats = st.one_of(st.floats(-4, 4, allow_nan=False), st.integers(-4, 4))
scalars = st.one_of(
    texts, floats, st.none(), st.booleans(), st.binary(max_size=2), st.just(TOP),
    st.just(Color.RED),
)
objects = st.lists(
    st.tuples(texts, floats, st.lists(texts, max_size=3).map(tuple)), max_size=25
)


def _open(rows: list[tuple[str, float, tuple[str, ...]]]) -> txindex.DB:
    db = txindex.open(f"memory://typed-{uuid.uuid4().hex}", models=[Typed, Untyped])
    with db.tx() as tx:
        for i, (s, f, tags) in enumerate(rows):
            tx.put(Typed(f"k{i:02d}", s, f, i, tags))
            tx.put(Untyped(f"k{i:02d}", s, f, i, tags))
    return db


def _ids(objs: Any) -> list[str]:
    return [o.id for o in objs]


def _query_value(name: str, data: st.DataObject) -> Any:
    if name == "by_s_f":
        return tuple(data.draw(st.lists(scalars, max_size=2)))
    return data.draw(scalars)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(rows=objects, data=st.data())
def test_typed_and_untyped_indexes_agree(
    rows: list[tuple[str, float, tuple[str, ...]]], data: st.DataObject
) -> None:
    db = _open(rows)
    try:
        with db.read() as tx:
            for _ in range(12):
                name = data.draw(st.sampled_from(INDEXES))
                t, u = getattr(Typed, name), getattr(Untyped, name)
                value = _query_value(name, data)
                assert _ids(tx.find(t, value)) == _ids(tx.find(u, value)), (name, value)
                assert tx.count(t, value) == tx.count(u, value), (name, value)
                first_t, first_u = tx.first(t, value), tx.first(u, value)
                assert (first_t and first_t.id) == (first_u and first_u.id)
                lo = data.draw(st.one_of(st.none(), st.just(value)))
                hi = _query_value(name, data) if data.draw(st.booleans()) else None
                reverse = data.draw(st.booleans())
                limit = data.draw(st.one_of(st.none(), st.integers(0, 5)))
                got = _ids(tx.range(t, lo, hi, reverse=reverse, limit=limit))
                want = _ids(tx.range(u, lo, hi, reverse=reverse, limit=limit))
                assert got == want, (name, lo, hi, reverse, limit)
                if name in ("by_s", "by_s_f", "by_tag"):
                    p = data.draw(texts)
                    assert _ids(tx.prefix(t, p)) == _ids(tx.prefix(u, p)), (name, p)
    finally:
        db.close()


def test_fence_buckets_do_not_depend_on_the_encoding() -> None:
    for name, key in (("by_s", "ab"), ("by_f", 1.5), ("by_n", 3), ("by_tag", "x")):
        t, u = getattr(Typed, name), getattr(Untyped, name)
        (tk,), (uk,) = t.entries(_obj(Typed, name, key)), u.entries(_obj(Untyped, name, key))
        assert tk == key and uk == sort_key(key)
        assert bucket_fence("p/", t, tk).rsplit(b"/", 1)[1] == bucket_fence(
            "p/", u, uk).rsplit(b"/", 1)[1]
    (tk,) = Typed.by_s_f.entries(Typed("k", "ab", 2))
    (uk,) = Untyped.by_s_f.entries(Untyped("k", "ab", 2))
    assert Typed.by_s_f.canonical(tk) == uk


def _obj(cls: type[Any], name: str, key: Any) -> Any:
    field = {"by_s": "s", "by_f": "f", "by_n": "n", "by_tag": "tags"}[name]
    return cls("k", **{field: (key,) if field == "tags" else key})


def test_typed_index_refuses_values_of_another_type_at_put() -> None:
    db = txindex.open(f"memory://typed-{uuid.uuid4().hex}", models=[Typed])
    try:
        with pytest.raises(txindex.ModelError, match=r"Typed.*s"), db.tx() as tx:
            tx.put(Typed("a", 5))  # type: ignore[arg-type]
        # the index check alone (the codec refuses first at put) names index and field
        with pytest.raises(UnorderableValue, match=r"Typed.by_s \(field 's'\).*not a str"):
            Typed.by_s.entries(Typed("a", 5))  # type: ignore[arg-type]
        with pytest.raises(UnorderableValue, match=r"Typed.by_f \(field 'f'\).*NaN"):
            Typed.by_f.entries(Typed("a", f=float("nan")))
        with pytest.raises(UnorderableValue, match=r"Typed.by_n \(field 'n'\).*not a int"):
            Typed.by_n.entries(Typed("a", n=True))
        # subclasses of the annotated type index as the plain type, like sort_key does
        assert Typed.by_s.entries(Typed("a", Color.RED)) == ("b",)
        assert type(Typed.by_s.entries(Typed("a", Color.RED))[0]) is str
        with db.tx() as tx:
            tx.put(Typed("a", "b", 2))
        with db.read() as tx:
            assert _ids(tx.find(Typed.by_s, "b")) == ["a"]
            assert _ids(tx.find(Typed.by_f, 2.0)) == ["a"]  # an int in a float field
    finally:
        db.close()
