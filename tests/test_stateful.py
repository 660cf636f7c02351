"""Hypothesis stateful test: transactions and every index kind against a plain dict model.

After every step, inside the open transaction (with its own writes) and after commit or
rollback, every query on every index equals a brute-force filter and sort over the reference
model, and the committed indexes equal indexes rebuilt from scratch.
"""

from __future__ import annotations

import uuid
from typing import Any

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import txindex
from txindex.store import index_keys

from .models import Node, User

IDS = st.sampled_from(["n1", "n2", "n3", "n4", "n5"])
USERS = st.sampled_from(["alice", "bob", "carol"])
IPS = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "10.0.0.4"])
TAGS = st.lists(st.sampled_from(["prod", "dev", "gpu", "edge"]), max_size=3).map(tuple)
SEEN = st.sampled_from([0.0, 1.0, 2.5, 7.0])
NODES = st.builds(Node, id=IDS, user=USERS, ip=IPS, tags=TAGS, last_seen=SEEN)
USER_OBJS = st.builds(
    User, name=st.sampled_from(["u1", "u2", "u3"]), team=st.sampled_from(["a", "b", ""]),
    quota=st.integers(0, 3),
)


def brute(view: dict[tuple[type, str], Any], index: str, lo: Any, hi: Any) -> list[Any]:
    """Reference answer for a half-open query, written from the declarations by hand."""
    out: list[tuple[Any, Any]] = []
    for obj in view.values():
        if isinstance(obj, Node):
            keys: list[Any] = {
                "by_user": [obj.user],
                "by_ip": [obj.ip],
                "by_tag": sorted(set(obj.tags)),
                "by_user_seen": [(obj.user, obj.last_seen)],
                "active": [obj.last_seen] if obj.last_seen > 0 else [],
            }.get(index, [])
        else:
            keys = [obj.team] if index == "by_team" else []
        out.extend((k, obj) for k in keys if (lo is None or k >= lo) and (hi is None or k < hi))
    out.sort(key=lambda p: (p[0], p[1].id if isinstance(p[1], Node) else p[1].name))
    return [obj for _, obj in out]


class TxMachine(RuleBasedStateMachine):
    url = "memory://"
    runs = 0  # machines built and invariant checks made: proof the machine really ran
    checks = 0
    commits = 0

    def __init__(self) -> None:
        super().__init__()
        TxMachine.runs += 1
        self.db = txindex.open(self.url, models=[Node, User], prefix=f"sm-{uuid.uuid4().hex}/")
        self.committed: dict[tuple[type, str], Any] = {}
        self.view: dict[tuple[type, str], Any] | None = None
        self.tx: txindex.Transaction | None = None
        self.snap: txindex.Transaction | None = None  # an old read snapshot kept open
        self.snap_view: dict[tuple[type, str], Any] = {}

    @initialize(node=NODES)
    def seed(self, node: Node) -> None:
        """Start from one committed object, so that every machine commits at least once (with
        50 examples, hypothesis now and then drew machines that almost never committed a
        write, and the proof-of-work assertion at the end failed)."""
        tx = self.db.tx()
        tx.put(node)
        rev = tx.commit()
        assert rev is not None and self.db.wait_for(rev, 10)
        TxMachine.commits += 1
        self.committed[(Node, node.id)] = node

    def teardown(self) -> None:
        if self.tx is not None:
            self.tx.rollback()
        if self.snap is not None:
            self.snap.rollback()
        self.db.close()

    @rule()
    def hold_snapshot(self) -> None:
        """Open (or replace) a read snapshot that stays open across later commits."""
        if self.snap is not None:
            self.snap.rollback()
        self.snap = self.db.read()
        _ = self.snap.revision  # pins it now
        self.snap_view = dict(self.committed)

    # ---- transaction lifecycle ----

    @precondition(lambda self: self.tx is None)
    @rule()
    def begin(self) -> None:
        self.tx = self.db.tx()
        self.view = dict(self.committed)

    @precondition(lambda self: self.tx is not None)
    @rule()
    def commit(self) -> None:
        assert self.tx is not None and self.view is not None
        rev = self.tx.commit()
        TxMachine.commits += rev is not None
        self.committed, self.view, self.tx = self.view, None, None
        if rev is not None:
            assert self.db.wait_for(rev, 10)

    @precondition(lambda self: self.tx is not None)
    @rule()
    def rollback(self) -> None:
        assert self.tx is not None
        self.tx.rollback()
        self.view, self.tx = None, None

    # ---- writes ----

    @precondition(lambda self: self.tx is not None)
    @rule(node=NODES)
    def put_node(self, node: Node) -> None:
        assert self.tx is not None and self.view is not None
        holder = next(
            (o.id for o in self.view.values()
             if isinstance(o, Node) and o.ip == node.ip and o.id != node.id),
            None,
        )
        if holder is not None:
            with pytest.raises(txindex.UniqueViolation) as err:
                self.tx.put(node)
            assert err.value.holder == holder and err.value.value == node.ip
        else:
            self.tx.put(node)
            self.view[(Node, node.id)] = node

    @precondition(lambda self: self.tx is not None)
    @rule(user=USER_OBJS)
    def put_user(self, user: User) -> None:
        assert self.tx is not None and self.view is not None
        self.tx.put(user)
        self.view[(User, user.name)] = user

    @precondition(lambda self: self.tx is not None)
    @rule(pk=IDS)
    def delete_node(self, pk: str) -> None:
        assert self.tx is not None and self.view is not None
        self.tx.delete(Node, pk)
        self.view.pop((Node, pk), None)

    # ---- reads ----

    @precondition(lambda self: self.tx is not None)
    @rule(pk=IDS)
    def get_node(self, pk: str) -> None:
        assert self.tx is not None and self.view is not None
        assert self.tx.get(Node, pk) == self.view.get((Node, pk))

    @precondition(lambda self: self.tx is not None)
    @rule(user=USERS, ip=IPS, tag=st.sampled_from(["prod", "dev", "gpu", "edge"]))
    def point_queries(self, user: str, ip: str, tag: str) -> None:
        assert self.tx is not None and self.view is not None
        self._check_points(self.tx, self.view, user, ip, tag)

    @precondition(lambda self: self.tx is not None)
    @rule(
        lo=st.one_of(st.none(), USERS), hi=st.one_of(st.none(), USERS),
        seen=st.one_of(st.none(), SEEN), reverse=st.booleans(),
        limit=st.one_of(st.none(), st.integers(0, 4)),
    )
    def range_queries(
        self, lo: str | None, hi: str | None, seen: float | None, reverse: bool, limit: int | None
    ) -> None:
        assert self.tx is not None and self.view is not None
        self._check_ranges(self.tx, self.view, lo, hi, seen, reverse, limit)

    # ---- invariants ----

    @invariant()
    def committed_state_matches(self) -> None:
        TxMachine.checks += 1
        with self.db.read() as rtx:
            for (cls, pk), obj in self.committed.items():
                assert rtx.get(cls, pk) == obj
            for user in ["alice", "bob", "carol"]:
                self._check_points(rtx, self.committed, user, "10.0.0.1", "prod")
            self._check_ranges(rtx, self.committed, "alice", "carol", 1.0, False, None)
            self._check_ranges(rtx, self.committed, None, "bob", None, True, 2)

    @invariant()
    def old_snapshot_is_unchanged(self) -> None:
        if self.snap is None:
            return
        for (cls, pk), obj in self.snap_view.items():
            assert self.snap.get(cls, pk) == obj
        for user in ["alice", "bob", "carol"]:
            self._check_points(self.snap, self.snap_view, user, "10.0.0.2", "dev")
        self._check_ranges(self.snap, self.snap_view, "alice", None, 1.0, True, None)

    @invariant()
    def committed_indexes_equal_rebuild(self) -> None:
        store = self.db._store
        entries = store.entries()
        for index in store.declared:
            rebuilt = sorted(
                (k, e.pk) for e in entries.values() for k in index_keys(index, e)
            )
            assert [(k, pk) for k, pk, _ in store.index_items(index)] == rebuilt
            with store._lock:  # the ordered keys and the buckets agree
                store._indexes[index].check()

    # ---- shared checks ----

    @staticmethod
    def _check_points(tx: txindex.Transaction, view: dict[Any, Any], user: str, ip: str,
                      tag: str) -> None:
        expect_user = brute(view, "by_user", user, user + "\0")
        assert tx.find(Node.by_user, user) == expect_user
        assert tx.count(Node.by_user, user) == len(expect_user)
        assert tx.first(Node.by_ip, ip) == next(iter(brute(view, "by_ip", ip, ip + "\0")), None)
        expect_tag = brute(view, "by_tag", tag, tag + "\0")
        assert tx.find(Node.by_tag, tag) == expect_tag
        assert tx.count(Node.by_tag, tag) == len(expect_tag)
        assert tx.find(User.by_team, "a") == brute(view, "by_team", "a", "a\0")
        assert tx.prefix(Node.by_user, user[:2]) == brute(view, "by_user", user[:2],
                                                          user[:2] + "\uffff")

    @staticmethod
    def _check_ranges(tx: txindex.Transaction, view: dict[Any, Any], lo: str | None,
                      hi: str | None, seen: float | None, reverse: bool,
                      limit: int | None) -> None:
        def cut(items: list[Any]) -> list[Any]:
            items = items[::-1] if reverse else items
            return items if limit is None else items[:limit]

        got = list(tx.range(Node.by_user, lo, hi, reverse=reverse, limit=limit))
        assert got == cut(brute(view, "by_user", lo, hi))
        clo = None if lo is None else (lo, seen if seen is not None else 0.0)
        chi = None if hi is None else (hi, 0.0)
        got = list(tx.range(Node.by_user_seen, clo, chi, reverse=reverse, limit=limit))
        assert got == cut(brute(view, "by_user_seen", clo, chi))
        got = list(tx.range(Node.active, seen, None, reverse=reverse, limit=limit))
        assert got == cut(brute(view, "active", seen, None))


@pytest.mark.parametrize("kind", ["memory", "etcd"])
def test_transactions_and_indexes_match_reference(
    kind: str, request: pytest.FixtureRequest
) -> None:
    TxMachine.url = "memory://" if kind == "memory" else request.getfixturevalue("etcd_url")
    TxMachine.runs = TxMachine.checks = TxMachine.commits = 0
    run_state_machine_as_test(
        TxMachine,
        settings=settings(
            max_examples=150 if kind == "memory" else 50,
            stateful_step_count=40,
            deadline=None,
            suppress_health_check=list(HealthCheck),
        ),
    )
    print(f"{kind}: {TxMachine.runs} machines, {TxMachine.checks} checks, "
          f"{TxMachine.commits} commits")
    assert TxMachine.runs >= 30 and TxMachine.checks >= 500
    assert TxMachine.commits >= TxMachine.runs  # every machine committed at least its seed
