"""Checked by mypy --strict in tests/test_typing.py: query results carry the model type."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import assert_type

import txindex
from txindex import Index


@txindex.model("nodes/", key="id")
@dataclass(frozen=True)
class Node:
    id: str
    user: str

    by_user = Index("user")


def queries(db: txindex.DB) -> None:
    with db.read() as tx:
        assert_type(Node.by_user, Index[Node])
        assert_type(tx.find(Node.by_user, "alice"), list[Node])
        assert_type(tx.first(Node.by_user, "alice"), Node | None)
        assert_type(tx.range(Node.by_user, "a", "b"), Iterator[Node])
        assert_type(tx.get(Node, "n1"), Node | None)
        assert_type(tx.count(Node.by_user, "alice"), int)
