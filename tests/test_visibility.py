"""Read-your-writes across DB handles of one process on one server (txindex.db._visibility).

A commit through a handle is waited for by later transactions of every handle whose prefix
contains the committing handle's prefix (their watches see its keys), and by no other: a
handle on a disjoint prefix may never see an event at that revision, so waiting for it would
end in ``Unavailable`` after the timeout.
"""

from __future__ import annotations

import uuid

import txindex

from .models import MODELS, Node


def test_handles_on_disjoint_and_nested_prefixes(etcd_url: str) -> None:
    root = f"vis-{uuid.uuid4().hex}/"
    outer = txindex.open(etcd_url, models=MODELS, prefix=root, timeout=2)
    inner = txindex.open(etcd_url, models=MODELS, prefix=root + "in/", timeout=2)
    same = txindex.open(etcd_url, models=MODELS, prefix=root + "in/", timeout=2)
    other = txindex.open(etcd_url, models=MODELS, prefix=f"vis-{uuid.uuid4().hex}/", timeout=2)
    try:
        with inner.tx() as tx:
            tx.put(Node("x", "u", "10.9.0.1"))
        rev = inner._visible
        assert same._visible == rev and outer._visible == rev  # their watches see the write
        with same.read() as r:  # another handle on the prefix: read-your-writes
            assert r.get(Node, "x") == Node("x", "u", "10.9.0.1")
        with outer.read() as r:  # the key is inside its range (under "in/", no model of it)
            assert r.revision >= rev
        assert other._visible < rev
        with other.read() as r:  # disjoint: no wait (it would time out: no event comes)
            assert r.get(Node, "x") is None

        with outer.tx() as tx:  # a commit through the outer handle: the inner ones don't wait
            tx.put(Node("y", "u", "10.9.0.2"))
        assert outer._visible > rev and inner._visible == rev
        with inner.read() as r:
            assert r.get(Node, "y") is None
    finally:
        for db in (outer, inner, same, other):
            db.close()
