"""Models shared by the tests: the DESIGN.md example plus a second model."""

from __future__ import annotations

from dataclasses import dataclass

import txindex
from txindex import Index


@txindex.model("nodes/", key="id")
@dataclass(frozen=True)
class Node:
    id: str
    user: str
    ip: str
    tags: tuple[str, ...] = ()
    last_seen: float = 0.0

    by_user = Index("user")
    by_ip = Index("ip", unique=True)
    by_tag = Index("tags", multi=True)
    by_user_seen = Index("user", "last_seen")
    active = Index(lambda n: n.last_seen, where=lambda n: n.last_seen > 0)


@txindex.model("users/", key="name")
@dataclass(frozen=True)
class User:
    name: str
    team: str = ""
    quota: int = 0

    by_team = Index("team")


@txindex.model("counters/", key="n")
@dataclass(frozen=True)
class Counter:
    n: int
    value: int = 0


MODELS = [Node, User, Counter]
