"""Total order over index values (txindex.ordering) and the query bounds of txindex.index."""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from sortedcontainers import SortedList

from txindex.errors import ModelError, UnorderableValue
from txindex.index import Index
from txindex.model import model
from txindex.ordering import (
    RANK_BOOL,
    RANK_BYTES,
    RANK_NONE,
    RANK_NUMBER,
    RANK_STR,
    RANK_TUPLE,
    TOP,
    sort_key,
    str_successor,
)

relaxed = settings(deadline=None)  # the machine is shared; never fail on timing

numbers = st.one_of(st.integers(), st.floats(allow_nan=False))
scalars = st.one_of(st.none(), st.booleans(), numbers, st.text(max_size=5), st.binary(max_size=5))
values = st.recursive(
    scalars, lambda inner: st.tuples(inner, inner) | st.tuples(inner), max_leaves=3
)


def rank_of(v: Any) -> int:
    if v is None:
        return RANK_NONE
    if isinstance(v, bool):
        return RANK_BOOL
    if isinstance(v, (int, float)):
        return RANK_NUMBER
    if isinstance(v, str):
        return RANK_STR
    if isinstance(v, bytes):
        return RANK_BYTES
    return RANK_TUPLE


# -- sort_key ------------------------------------------------------------------------------------


def test_encoding_shape() -> None:
    assert sort_key(None) == (RANK_NONE, None)
    assert sort_key(True) == (RANK_BOOL, True)
    assert sort_key(3) == (RANK_NUMBER, 3)
    assert sort_key("a") == (RANK_STR, "a")
    assert sort_key(b"a") == (RANK_BYTES, b"a")
    assert sort_key((1, "a")) == (RANK_TUPLE, ((RANK_NUMBER, 1), (RANK_STR, "a")))


def test_documented_rank_order() -> None:
    ordered: list[Any] = [None, False, True, -math.inf, -1, 0, 0.5, 1, math.inf, "", "a"]
    ordered += [b"", b"a", (), (None,), (None, None), (1,), ("a",), ((),)]
    assert sorted(reversed(ordered), key=sort_key) == ordered


def test_int_and_float_encode_equal_bool_is_not_a_number() -> None:
    assert sort_key(1) == sort_key(1.0)
    assert hash(sort_key(1)) == hash(sort_key(1.0))
    assert sort_key(True) != sort_key(1)
    assert sort_key(True) < sort_key(-(10**100))
    assert sort_key((1, 2)) == sort_key((1.0, 2.0))


@relaxed
@given(values, values, values)
def test_total_order(a: Any, b: Any, c: Any) -> None:
    ka, kb, kc = sort_key(a), sort_key(b), sort_key(c)
    assert [ka < kb, ka == kb, ka > kb].count(True) == 1
    if ka <= kb and kb <= kc:
        assert ka <= kc
    assert (ka == kb) == (kb == ka)


@relaxed
@given(values, values)
def test_mixed_kinds_follow_rank(a: Any, b: Any) -> None:
    if rank_of(a) != rank_of(b):
        assert (sort_key(a) < sort_key(b)) == (rank_of(a) < rank_of(b))


@relaxed
@given(
    st.one_of(
        st.tuples(numbers, numbers),
        st.tuples(st.text(), st.text()),
        st.tuples(st.binary(), st.binary()),
        st.tuples(st.booleans(), st.booleans()),
        st.tuples(
            st.lists(numbers, max_size=3).map(tuple), st.lists(numbers, max_size=3).map(tuple)
        ),
        st.tuples(
            st.lists(st.text(max_size=3), max_size=3).map(tuple),
            st.lists(st.text(max_size=3), max_size=3).map(tuple),
        ),
    )
)
def test_consistent_with_python_order_within_a_type(pair: tuple[Any, Any]) -> None:
    a, b = pair
    assert (sort_key(a) < sort_key(b)) == (a < b)
    assert (sort_key(a) == sort_key(b)) == (a == b)


@pytest.mark.parametrize(
    "bad", [math.nan, {}, {"a": 1}, [1], {1}, frozenset(), object(), (1, [2]), ((math.nan,),)]
)
def test_unorderable_raises(bad: Any) -> None:
    with pytest.raises(UnorderableValue, match="cannot be ordered"):
        sort_key(bad)


def test_top() -> None:
    assert TOP == TOP and TOP is type(TOP)()
    assert hash(TOP) == hash(TOP)
    top: Any = TOP
    for v in [None, 10**100, math.inf, "\U0010ffff" * 3, b"\xff", (TOP,), sort_key(("z",))]:
        assert top.__gt__(v) and v < top and top.__ge__(v) and v <= top
        assert not top.__lt__(v) and not top.__le__(v) and v != top
    enc: Any = sort_key("alice")
    assert (enc, "zzz") < (enc, TOP) < (sort_key("alicf"), "")
    assert sort_key(TOP) > sort_key(("x", 1))
    assert repr(TOP) == "TOP"


def test_str_successor_edges() -> None:
    top = chr(sys.maxunicode)
    assert str_successor("") is None
    assert str_successor(top * 2) is None
    assert str_successor("ab") == "ac"
    assert str_successor("a" + top) == "b"


@relaxed
@given(st.text(max_size=4), st.text(max_size=6))
def test_str_successor_is_least_upper_bound(s: str, t: str) -> None:
    succ = str_successor(s)
    if succ is None:
        assert s.rstrip(chr(sys.maxunicode)) == ""
        return
    assert not succ.startswith(s) and succ > s
    if t.startswith(s):
        assert t < succ
    elif t >= s:
        assert t >= succ


# -- index bounds over a SortedList --------------------------------------------------------------


@model("rows/", key="id")
@dataclass(frozen=True)
class Row:
    id: int
    v: Any
    s: str
    n: int
    tags: tuple[Any, ...] = ()

    by_v = Index("v")
    by_s = Index("s")
    by_sn = Index("s", "n")
    by_tag = Index("tags", multi=True)
    by_upper = Index(lambda r: r.s.upper())


small_text = st.text(alphabet="ab\U0010ffff", max_size=3)
rows = st.lists(
    st.builds(
        Row,
        id=st.integers(0, 10**6),
        v=values,
        s=small_text,
        n=st.integers(-3, 3),
        tags=st.lists(scalars, max_size=4).map(tuple),
    ),
    max_size=25,
    unique_by=lambda r: r.id,
)


def build(index: Index[Row], objs: list[Row]) -> SortedList:
    return SortedList((k, o.id) for o in objs for k in index.entries(o))


def select(sl: SortedList, lo: Any, hi: Any) -> list[Any]:
    i = 0 if lo is None else sl.bisect_left(lo)
    j = len(sl) if hi is None else sl.bisect_left(hi)
    return list(sl[i:j])


@relaxed
@given(rows, values)
def test_eq_bounds_single(objs: list[Row], q: Any) -> None:
    sl = build(Row.by_v, objs)
    got = select(sl, *Row.by_v.eq_bounds(q))
    want = sorted((sort_key(o.v), o.id) for o in objs if sort_key(o.v) == sort_key(q))
    assert got == want
    # brute force on raw values for the scalar case
    if not isinstance(q, tuple):
        assert {pk for _, pk in got} == {
            o.id for o in objs if rank_of(o.v) == rank_of(q) and o.v == q
        }


@relaxed
@given(rows, st.one_of(st.none(), values), st.one_of(st.none(), values))
def test_range_bounds_single(objs: list[Row], lo: Any, hi: Any) -> None:
    sl = build(Row.by_v, objs)
    got = select(sl, *Row.by_v.range_bounds(lo, hi))
    want = sorted(
        (sort_key(o.v), o.id)
        for o in objs
        if (lo is None or sort_key(o.v) >= sort_key(lo))
        and (hi is None or sort_key(o.v) < sort_key(hi))
    )
    assert got == want


@relaxed
@given(rows, small_text, st.integers(-3, 3), st.booleans())
def test_compound_eq_full_and_prefix(objs: list[Row], s: str, n: int, prefix: bool) -> None:
    sl = build(Row.by_sn, objs)
    q: tuple[Any, ...] = (s,) if prefix else (s, n)
    got = [pk for _, pk in select(sl, *Row.by_sn.eq_bounds(q))]
    want = sorted(
        ((o.s, o.n, o.id) for o in objs if o.s == s and (prefix or o.n == n)),
    )
    assert got == [pk for *_, pk in want]
    # the empty prefix selects everything, in order
    assert select(sl, *Row.by_sn.eq_bounds(())) == list(sl)


@relaxed
@given(rows, small_text, st.integers(-3, 3), small_text, st.integers(-3, 3), st.booleans())
def test_compound_range(objs: list[Row], s1: str, n1: int, s2: str, n2: int, hi_top: bool) -> None:
    sl = build(Row.by_sn, objs)
    hi: tuple[Any, ...] = (s2, TOP) if hi_top else (s2, n2)
    got = [pk for _, pk in select(sl, *Row.by_sn.range_bounds((s1, n1), hi))]
    want = sorted(
        (o.s, o.n, o.id)
        for o in objs
        if (o.s, o.n) >= (s1, n1) and ((o.s <= s2) if hi_top else ((o.s, o.n) < (s2, n2)))
    )
    assert got == [pk for *_, pk in want]
    # a prefix hi bound excludes every key with that prefix
    got2 = [pk for _, pk in select(sl, *Row.by_sn.range_bounds(None, (s2,)))]
    assert got2 == [pk for *_, pk in sorted((o.s, o.n, o.id) for o in objs if o.s < s2)]


@relaxed
@given(rows, small_text)
def test_prefix_bounds(objs: list[Row], p: str) -> None:
    def plain(o: Row) -> str:
        return o.s

    def upper(o: Row) -> str:
        return o.s.upper()

    for index, raw in ((Row.by_s, plain), (Row.by_upper, upper)):
        sl = build(index, objs)
        got = [pk for _, pk in select(sl, *index.prefix_bounds(p))]
        assert got == [pk for _, pk in sorted((raw(o), o.id) for o in objs if raw(o).startswith(p))]
    sl = build(Row.by_sn, objs)
    got = [pk for _, pk in select(sl, *Row.by_sn.prefix_bounds(p))]
    assert got == [pk for *_, pk in sorted((o.s, o.n, o.id) for o in objs if o.s.startswith(p))]
    # non-string keys are never selected by a prefix query
    sl = build(Row.by_v, objs)
    got = [pk for _, pk in select(sl, *Row.by_v.prefix_bounds(p))]
    assert sorted(got) == sorted(o.id for o in objs if isinstance(o.v, str) and o.v.startswith(p))


@relaxed
@given(rows, scalars)
def test_multi_eq_bounds(objs: list[Row], q: Any) -> None:
    sl = build(Row.by_tag, objs)
    got = [pk for _, pk in select(sl, *Row.by_tag.eq_bounds(q))]
    want = sorted(o.id for o in objs if any(rank_of(t) == rank_of(q) and t == q for t in o.tags))
    assert got == want  # one entry per object even when a tag repeats


def test_query_errors_name_the_index() -> None:
    with pytest.raises(ModelError, match=r"Row.by_sn .*tuple"):
        Row.by_sn.eq_bounds("alice")
    with pytest.raises(ModelError, match="more than 2"):
        Row.by_sn.eq_bounds(("a", 1, 2))
    with pytest.raises(UnorderableValue, match=r"Row.by_v: query .*dict"):
        Row.by_v.eq_bounds({"a": 1})
    with pytest.raises(ModelError, match="prefix query needs a str"):
        Row.by_s.prefix_bounds(1)  # type: ignore[arg-type]
