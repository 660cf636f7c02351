"""Store.changes: the change log window a re-validation reads, also while an old snapshot
keeps a long log."""

from __future__ import annotations

import random

from txindex.model import info_of
from txindex.store import Entry, Store

from .models import User


def test_changes_are_exactly_the_window_asked_for() -> None:
    info = info_of(User)
    store = Store([info])
    store.apply([(1, [("users/u0", Entry("u0", User("u0"), 1, info))])])
    pinned = store.pin()  # an old snapshot: the log is kept from here on
    assert pinned == 1
    for rev in range(2, 502):
        name = f"u{rev % 7}"
        store.apply([(rev, [(f"users/{name}", Entry(name, User(name, quota=rev), rev, info))])])
    rng = random.Random(3)
    for _ in range(200):
        after = rng.randrange(pinned, 502)
        upto = rng.randrange(after, 502)
        got = [(c.key, c.after.mod_revision if c.after else None)
               for c in store.changes(after, upto)]
        assert got == [(f"users/u{r % 7}", r) for r in range(after + 1, upto + 1)]
    store.unpin(pinned)
    assert list(store.changes(500, 501)) == []  # the log is gone with the last pin
