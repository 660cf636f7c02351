"""Bad input catalogue: one test per case, all in one place. Each case gets a clear typed error
(or a documented, harmless outcome); afterwards the watcher is alive, a previously committed
object is intact and the cache still equals etcd (tests/consistency.py)."""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

import txindex
from txindex import (
    DB,
    Closed,
    DecodeError,
    Index,
    ModelError,
    TxTooLarge,
    UniqueViolation,
    UnorderableValue,
)
from txindex.backend import EtcdBackend
from txindex.backend.base import Delete, Put
from txindex.server import EtcdServer

from .consistency import assert_converged
from .models import MODELS, Counter, Node, User

SENTINEL = Node("sentinel", "keep", "1.1.1.1")


@pytest.fixture
def raw(etcd_server: EtcdServer) -> Iterator[EtcdBackend]:
    b = EtcdBackend([etcd_server.endpoint], timeout=3.0)
    yield b
    b.close()


@pytest.fixture
def db(etcd_url: str, prefix: str, raw: EtcdBackend) -> Iterator[DB]:
    d = txindex.open(etcd_url, models=MODELS, prefix=prefix)
    with d.tx() as tx:
        tx.put(SENTINEL)
    yield d
    # every case ends healthy: watcher alive, committed data intact, cache == etcd
    assert d._watcher.alive, d._watcher.stats
    assert_converged(d, raw, prefix)
    with d.read() as r:
        assert r.get(Node, "sentinel") == SENTINEL
    d.close()


def raw_put(raw: EtcdBackend, db: DB, key: str, value: bytes) -> int:
    rev = raw.txn([], [Put((db.prefix + key).encode(), value)]).revision
    assert db.wait_for(rev, 10)
    return rev


def drop(raw: EtcdBackend, db: DB, key: str) -> None:
    rev = raw.txn([], [Delete((db.prefix + key).encode())]).revision
    assert db.wait_for(rev, 10)


def bad_value(db: DB, raw: EtcdBackend, key: str, value: bytes, cls: Any, pk: Any) -> DecodeError:
    before = db._watcher.stats.decode_errors
    raw_put(raw, db, key, value)
    with db.read() as r, pytest.raises(DecodeError) as info:
        r.get(cls, pk)
    assert info.value.key == key
    assert db._watcher.stats.decode_errors == before + 1
    return info.value


def test_value_not_json(db: DB, raw: EtcdBackend) -> None:
    err = bad_value(db, raw, "nodes/x", b"{not json", Node, "x")
    assert "JSON" in err.reason


def test_value_not_utf8(db: DB, raw: EtcdBackend) -> None:
    err = bad_value(db, raw, "nodes/x", b"\xff\xfe\x00", Node, "x")
    assert "UTF-8" in err.reason


def test_json_wrong_shape(db: DB, raw: EtcdBackend) -> None:
    bad_value(db, raw, "nodes/x", b'["x", "alice"]', Node, "x")


def test_json_wrong_field_type(db: DB, raw: EtcdBackend) -> None:
    err = bad_value(db, raw, "nodes/x", b'{"id":"x","user":5,"ip":"9.9.9.9"}', Node, "x")
    assert "user" in err.reason


def test_json_missing_field(db: DB, raw: EtcdBackend) -> None:
    bad_value(db, raw, "nodes/x", b'{"id":"x"}', Node, "x")


def test_key_and_primary_key_disagree(db: DB, raw: EtcdBackend) -> None:
    bad_value(db, raw, "nodes/x", b'{"id":"y","user":"u","ip":"9.9.9.9"}', Node, "x")
    drop(raw, db, "nodes/x")  # tests/consistency.py names this error differently: clean up


def test_non_canonical_int_key(db: DB, raw: EtcdBackend) -> None:
    raw_put(raw, db, "counters/007", b'{"n":7,"value":1}')
    assert db._watcher.stats.decode_errors == 1
    with db.read() as r:
        assert r.get(Counter, 7) is None  # the canonical key is absent
    drop(raw, db, "counters/007")


def test_decode_error_then_valid_write_recovers(db: DB, raw: EtcdBackend) -> None:
    bad_value(db, raw, "users/bob", b"garbage", User, "bob")
    raw_put(raw, db, "users/bob", b'{"name":"bob","team":"red"}')
    with db.read() as r:
        assert r.get(User, "bob") == User("bob", "red")
        assert r.find(User.by_team, "red") == [User("bob", "red")]


def test_undecodable_value_stays_out_of_indexes(db: DB, raw: EtcdBackend) -> None:
    bad_value(db, raw, "nodes/x", b'{"id":"x","user":"keep"}', Node, "x")
    with db.read() as r:
        assert r.find(Node.by_user, "keep") == [SENTINEL]


def test_unclaimed_key_under_prefix(db: DB, raw: EtcdBackend) -> None:
    before = db._watcher.stats.unclaimed_keys
    raw_put(raw, db, "nobody/owns-this", b"whatever")
    assert db._watcher.stats.unclaimed_keys == before + 1
    assert db._watcher.stats.decode_errors == 0


def test_oversized_value(db: DB) -> None:
    with db.tx() as tx, pytest.raises(TxTooLarge, match="max-request-bytes"):
        tx.put(Node("big", "u", "2.2.2.2", ("x" * (2 << 20),)))
        tx.commit()


def test_too_many_bytes_in_one_transaction(db: DB) -> None:
    with pytest.raises(TxTooLarge), db.tx() as tx:
        for i in range(20):
            tx.put(User(f"u{i}", "t" * 100_000))


def test_more_operations_than_one_txn(db: DB) -> None:
    with db.tx() as tx, pytest.raises(TxTooLarge, match="max-txn-ops"):
        for i in range(200):
            tx.put(Counter(i, i))


def test_key_written_twice_in_one_transaction(db: DB) -> None:
    """Not an error: the write set keeps one write per key (etcd rejects duplicate keys in
    one Txn, so txindex must never send both): the last put wins."""
    with db.tx() as tx:
        tx.put(Counter(1, 1))
        tx.put(Counter(1, 2))
        assert len(tx.writes) == 1
    with db.read() as r:
        assert r.get(Counter, 1) == Counter(1, 2)


def test_unique_clash(db: DB) -> None:
    with db.tx() as tx, pytest.raises(UniqueViolation) as info:
        tx.put(Node("other", "u", SENTINEL.ip))
    assert (info.value.index, info.value.value, info.value.holder) == (
        "Node.by_ip", SENTINEL.ip, "sentinel")


def test_transaction_used_after_commit(db: DB) -> None:
    tx = db.tx()
    tx.put(Counter(2, 1))
    tx.commit()
    with pytest.raises(Closed):
        tx.get(Counter, 2)
    with pytest.raises(Closed):
        tx.put(Counter(2, 3))


def test_transaction_used_after_rollback(db: DB) -> None:
    tx = db.tx()
    tx.put(Counter(3, 1))
    tx.rollback()
    with pytest.raises(Closed):
        tx.find(Node.by_user, "keep")
    with db.read() as r:
        assert r.get(Counter, 3) is None


def test_closed_db(etcd_url: str, prefix: str) -> None:
    d = txindex.open(etcd_url, models=MODELS, prefix=prefix)
    d.close()
    with pytest.raises(Closed):
        d.tx()
    with pytest.raises(Closed):
        d.read()


def test_unorderable_index_value(db: DB) -> None:
    @txindex.model("things/", key="id")
    @dataclass(frozen=True)
    class Thing:
        id: str
        score: Any = None

        by_score = Index("score")

    with txindex.open(f"memory://bad-{id(db)}", models=[Thing]) as mem:
        with mem.tx() as tx, pytest.raises(UnorderableValue, match="by_score"):
            tx.put(Thing("a", {"x": 1}))
        with mem.read() as r:
            assert r.get(Thing, "a") is None


def test_model_with_mutable_field() -> None:
    with pytest.raises(ModelError, match="mutable"):
        @txindex.model("bad/", key="id")
        @dataclass(frozen=True)
        class Bad:
            id: str
            tags: list[str]


def test_model_prefix_without_slash() -> None:
    with pytest.raises(ModelError, match="must end with '/'"):
        txindex.model("bad", key="id")


def test_an_index_on_values_that_cannot_be_ordered_is_refused_at_declaration() -> None:
    """A plain Enum, a Flag, a nested dataclass or a set cannot be ordered: refused when the
    model is declared (every put would fail), naming the index and field; IntEnum, StrEnum
    and tuples of orderable values are fine."""
    import enum

    class Color(enum.Enum):
        RED = 1

    class Perm(enum.Flag):
        R = 1

    class Level(enum.IntEnum):
        LOW = 1

    @dataclass(frozen=True)
    class Inner:
        x: int

    bad: list[tuple[Any, bool]] = [
        (Color, False), (Perm, False), (Inner, False), (frozenset[int], False),
        (Color | None, False), (tuple[int, Color], False), (tuple[Color, ...], True),
    ]
    for annotation, multi in bad:
        with pytest.raises(ModelError, match=r"M\.idx: field 'f' holds .* cannot be ordered"):
            txindex.model("m/", key="id")(
                dataclass(frozen=True)(
                    type("M", (), {
                        "__annotations__": {"id": str, "f": annotation},
                        "idx": txindex.Index("f", multi=multi),
                    })
                )
            )
    for annotation, multi in [(Level, False), (tuple[int, str], False), (frozenset[int], True)]:
        txindex.model("m/", key="id")(
            dataclass(frozen=True)(
                type("M", (), {
                    "__annotations__": {"id": str, "f": annotation},
                    "idx": txindex.Index("f", multi=multi),
                })
            )
        )


def test_model_prefix_reserved_for_txindex() -> None:
    """The sync key lives at ``<db prefix>__txindex__/sync``: no model may claim it."""
    for bad in ("__txindex__/", "__txindex__/sync/"):
        with pytest.raises(ModelError, match="reserved"):
            txindex.model(bad, key="id")
    txindex.model("__txindex2__/", key="id")  # only that folder is reserved


def test_open_without_models(etcd_url: str, prefix: str) -> None:
    with pytest.raises(ModelError):
        txindex.open(etcd_url, models=[], prefix=prefix)


def test_put_of_a_non_model_object(db: DB) -> None:
    with db.tx() as tx, pytest.raises(ModelError):
        tx.put({"id": "n1"})


def test_put_with_wrong_field_type(db: DB) -> None:
    with db.tx() as tx, pytest.raises(ModelError, match="user"):
        tx.put(Node("n1", 5, "3.3.3.3"))  # type: ignore[arg-type]


def test_put_with_nan_field(db: DB) -> None:
    with db.tx() as tx, pytest.raises(ModelError, match="last_seen"):
        tx.put(Node("n1", "u", "3.3.3.4", (), math.nan))


def test_write_in_read_only_transaction(db: DB) -> None:
    with db.read() as r, pytest.raises(ModelError, match="read-only"):
        r.put(Counter(4, 1))


def test_query_of_foreign_index(db: DB) -> None:
    @txindex.model("elsewhere/", key="id")
    @dataclass(frozen=True)
    class Elsewhere:
        id: str
        by_id = Index("id")

    with db.read() as r, pytest.raises(ModelError, match="not an index"):
        r.find(Elsewhere.by_id, "x")


def test_primary_key_of_wrong_type(db: DB) -> None:
    with db.read() as r, pytest.raises(ModelError):
        r.get(Counter, "not-an-int")


def test_bad_range_limits(db: DB) -> None:
    for bad in (-1, 1.5, "2", True):
        with db.read() as r, pytest.raises(ValueError, match="limit"):
            r.range(Node.by_user, limit=bad)  # type: ignore[arg-type]


def test_bad_transact_attempts(db: DB) -> None:
    for bad in (0, "3", 2.0, True):
        with pytest.raises(ValueError, match="attempts"):
            db.transact(lambda tx: None, attempts=bad)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "option",
    [{"prefix": None}, {"prefix": "p\udcff/"}, {"max_txn_ops": 0}, {"max_txn_ops": "128"},
     {"max_request_bytes": -1}, {"timeout": 0}, {"timeout": "10"}],
)
def test_bad_open_options_are_refused_up_front(option: dict[str, Any]) -> None:
    name = next(iter(option))
    with pytest.raises(ValueError, match=name):
        txindex.open("memory://", models=MODELS, **option)


def test_error_inside_transaction_leaves_no_trace(db: DB) -> None:
    with pytest.raises(ZeroDivisionError), db.tx() as tx:
        tx.put(Counter(5, 1))
        _ = 1 / 0
    with db.read() as r:
        assert r.get(Counter, 5) is None


_FLIP = {"on": True}  # what the impure index functions below read


@txindex.model("flips/", key="id")
@dataclass(frozen=True)
class Flip:
    id: str
    color: str

    by_color = txindex.Index("color", where=lambda f: _FLIP["on"])
    painted = txindex.Index(lambda f: f.color if _FLIP["on"] else f.color.upper())


@pytest.mark.parametrize("url", ["memory://", "etcd"])
def test_impure_index_functions_never_wedge_the_watcher(
    url: str, etcd_url: str, prefix: str
) -> None:
    """Index functions and ``where=`` predicates must be pure; one that reads outside state
    (the clock, a global) gives an object other keys than it is indexed under. The store
    re-indexes the object, drops items of objects that are gone, counts it, and goes on:
    the watcher keeps applying and queries never fail."""
    db = txindex.open(etcd_url if url == "etcd" else url, models=[Flip], prefix=prefix)
    try:
        _FLIP["on"] = True
        with db.tx() as tx:
            tx.put(Flip("a", "red"))
        _FLIP["on"] = False  # from now on both functions answer otherwise
        with db.tx() as tx:
            tx.put(Flip("a", "blue"))  # painted: "RED" is not what it holds ("red")
            tx.put(Flip("b", "green"))  # by_color: not indexed
        _FLIP["on"] = True
        with db.tx() as tx:
            tx.delete(Flip, "a")  # by_color still holds a stale "red" item of it
            tx.delete(Flip, "b")  # now "matches" an index it was never put into
        with db.read() as r:
            assert r.find(Flip.by_color, "red") == []  # the stale item is dropped
            assert r.find(Flip.painted, "blue") == []
        with db.tx() as tx:  # the watcher applied everything and goes on
            tx.put(Flip("c", "red"))
        assert db.wait_for(db._visible, 10) and db._watcher.alive
        with db.read() as r:
            assert r.find(Flip.by_color, "red") == [Flip("c", "red")]
        for index in (Flip.by_color, Flip.painted):  # exactly c's items are left
            assert [(pk, obj) for _, pk, obj in db.index_items(index)] == [("c", Flip("c", "red"))]
        assert db.stats()["index_repairs"] >= 2
    finally:
        _FLIP["on"] = True
        db.close()


def test_a_query_on_something_that_is_not_an_index(db: DB) -> None:
    with db.read() as r:
        for call in (
            lambda: r.find(None, "x"), lambda: r.first("by_user", "x"),  # type: ignore[arg-type]
            lambda: r.count(Node, "x"), lambda: list(r.range(1, "a", "b")),  # type: ignore[arg-type]
            lambda: r.prefix(None, "a"),  # type: ignore[arg-type]
        ):
            with pytest.raises(ModelError, match="expected an index"):
                call()


def test_values_python_cannot_print_and_ambiguous_where_results(db: DB) -> None:
    """An int past Python's 4,300-digit str limit (as a key or a value) and a ``where=``
    result whose truth test raises (a numpy array, say) are ModelErrors at put."""

    class Ambiguous:
        def __bool__(self) -> bool:
            raise ValueError("the truth value is ambiguous")

    @txindex.model("ambiguous/", key="id")
    @dataclass(frozen=True)
    class Amb:
        id: str
        by_id = txindex.Index("id", where=lambda a: Ambiguous())

    with db.tx() as tx:
        with pytest.raises(ModelError, match="key"):
            tx.put(Counter(10**5000, 1))
        with pytest.raises(ModelError, match="cannot encode"):
            tx.put(Counter(1, 10**5000))
        tx.rollback()
    other = txindex.open("memory://", models=[Amb])
    try:
        with other.tx() as tx, pytest.raises(ModelError, match="where= raised"):
            tx.put(Amb("a"))
    finally:
        other.close()
