"""Index declarations end to end: no migrations, mixed-type ordering, bad values at put."""

from __future__ import annotations

import enum
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

import txindex
from txindex import DB, Index


def _models(version: int) -> type[Any]:
    """The same stored model under three declarations: v1 indexes user, v2 indexes zone and a
    computed key instead, v3 has no index at all."""
    if version == 1:
        @txindex.model("hosts/", key="id")
        @dataclass(frozen=True)
        class Host:
            id: str
            user: str
            zone: str = ""

            by_user = Index("user")
        return Host
    if version == 2:
        @txindex.model("hosts/", key="id")
        @dataclass(frozen=True)
        class Host2:
            id: str
            user: str
            zone: str = ""

            by_zone = Index("zone")
            by_len = Index(lambda h: len(h.user), where=lambda h: h.zone != "")
        return Host2

    @txindex.model("hosts/", key="id")
    @dataclass(frozen=True)
    class Host3:
        id: str
        user: str
        zone: str = ""
    return Host3


def test_changing_index_declarations_needs_only_a_restart(make_db: Callable[..., DB]) -> None:
    v1 = _models(1)
    db = make_db(models=[v1])
    with db.tx() as tx:
        tx.put(v1("a", "alice", "eu"))
        tx.put(v1("b", "bob", "us"))
        tx.put(v1("c", "carol", ""))
    with db.read() as tx:
        assert [h.id for h in tx.find(v1.by_user, "bob")] == ["b"]
    db.close()

    v2 = _models(2)  # same data, new indexes: derived at load, nothing to migrate
    db2 = make_db(models=[v2])
    with db2.read() as tx:
        assert [h.id for h in tx.find(v2.by_zone, "eu")] == ["a"]
        assert [h.id for h in tx.range(v2.by_len)] == ["b", "a"]  # carol has no zone
        assert tx.get(v2, "c") == v2("c", "carol", "")
    db2.close()

    v3 = _models(3)
    db3 = make_db(models=[v3])
    with db3.read() as tx:
        assert tx.get(v3, "a") == v3("a", "alice", "eu")


@txindex.model("things/", key="id")
@dataclass(frozen=True)
class Thing:
    id: str
    v: Any = None

    by_v = Index("v")


def test_mixed_types_order_as_documented(make_db: Callable[..., DB]) -> None:
    db = make_db(models=[Thing])
    values = [("s", "b"), ("n", None), ("t", True), ("f", False), ("i", 3), ("x", 2.5),
              ("u", ("a", 1)), ("a", "a"), ("w", ("a",))]
    with db.tx() as tx:
        for pk, v in values:
            tx.put(Thing(pk, v))
    with db.read() as tx:
        got = [t.id for t in tx.range(Thing.by_v)]
    # None < False < True < numbers < str < (bytes <) tuples, a shorter tuple prefix first
    assert got == ["n", "f", "t", "x", "i", "a", "s", "w", "u"]


def test_unorderable_value_is_refused_at_put(make_db: Callable[..., DB]) -> None:
    db = make_db(models=[Thing])
    with db.tx() as tx:
        with pytest.raises(txindex.UnorderableValue, match=r"Thing\.by_v.*'v'"):
            tx.put(Thing("bad", {"a": 1}))
        tx.put(Thing("ok", 1))  # the transaction is still usable
    with db.read() as tx:
        assert tx.get(Thing, "bad") is None and tx.get(Thing, "ok") == Thing("ok", 1)


def test_unique_index_tolerates_clashes_written_by_other_tools(make_db: Callable[..., DB]) -> None:
    """etcd does not enforce uniqueness: values written around txindex may clash. The index
    shows every holder (ordered by primary key), refuses a new holder, lets a holder keep the
    value, and recovers when the clash goes away."""
    from txindex.backend.base import Delete, Put
    from txindex.model import info_of

    from .models import Node

    db = make_db()
    info, prefix = info_of(Node), db.prefix
    raw = db._backend
    rev = 0
    for pk in ("b", "a", "c"):
        rev = raw.txn([], [Put(f"{prefix}nodes/{pk}".encode(),
                               info.encode(Node(pk, "u", "10.9.9.9")))]).revision
    assert db.wait_for(rev, 10)
    with db.read() as tx:
        assert [n.id for n in tx.find(Node.by_ip, "10.9.9.9")] == ["a", "b", "c"]
        assert tx.first(Node.by_ip, "10.9.9.9") == Node("a", "u", "10.9.9.9")
    with db.tx() as tx, pytest.raises(txindex.UniqueViolation):
        tx.put(Node("d", "u", "10.9.9.9"))
    with db.tx() as tx:  # a holder's update that keeps the value adds no clash: allowed
        tx.put(Node("b", "v", "10.9.9.9"))
    for pk in ("a", "c"):
        rev = raw.txn([], [Delete(f"{prefix}nodes/{pk}".encode())]).revision
    assert db.wait_for(rev, 10)
    with db.read() as tx:
        assert [n.id for n in tx.find(Node.by_ip, "10.9.9.9")] == ["b"]
    assert [pk for _, pk, _ in db._store.index_items(Node.by_ip)] == ["b"]


class _Role(str, enum.Enum):  # noqa: UP042 (the classic "str enum": str() gives "_Role.ADMIN")
    ADMIN = "admin"
    USER = "user"


@txindex.model("members/", key="id")
@dataclass(frozen=True)
class _Member:
    id: str
    role: _Role
    by_role = Index("role")


def test_a_str_enum_field_is_indexed_by_its_value(make_db: Callable[..., DB]) -> None:
    db = make_db(models=[_Member])
    admin, user = _Member("m1", _Role.ADMIN), _Member("m2", _Role.USER)
    with db.tx() as tx:
        tx.put(admin)
        tx.put(user)
    with db.read() as r:
        assert r.find(_Member.by_role, "admin") == [admin]
        assert r.find(_Member.by_role, _Role.ADMIN) == [admin]
        assert r.prefix(_Member.by_role, "us") == [user]
        assert list(r.range(_Member.by_role, "a", "b")) == [admin]
