"""Seeded bugs, for proving that the history checker catches them (issue: mutation check).

Never set in production. A bug is switched on for a whole process tree with the environment
variable ``TXINDEX_SEED_BUG`` (comma-separated names, read at import), or in-process with
:func:`enable`. Each name is one known way to break a guarantee:

* ``drop_compare`` — commit sends no point-read compares (lost updates, write skew).
* ``skip_predicate_validation`` — no local predicate check and no fence compares (phantoms).
* ``watch_from_zero`` — a reconnecting watch starts "from now" (etcd's revision 0) instead of
  the last applied revision + 1, losing the events in between.
* ``resync_without_index_rebuild`` — a resync replaces the data but leaves indexes stale.
* ``blind_retry_unknown`` — ``transact`` retries after ``CommitUnknown`` (duplicate effects).
* ``group_ignores_conflicts`` — group commit merges queued commits that touch the same keys
  (lost updates, write skew inside one revision).
"""

from __future__ import annotations

import os

KNOWN = frozenset({
    "drop_compare",
    "skip_predicate_validation",
    "watch_from_zero",
    "resync_without_index_rebuild",
    "blind_retry_unknown",
    "group_ignores_conflicts",
})

active: set[str] = {b for b in os.environ.get("TXINDEX_SEED_BUG", "").split(",") if b}
if active - KNOWN:
    raise RuntimeError(f"unknown TXINDEX_SEED_BUG {sorted(active - KNOWN)}; known: {sorted(KNOWN)}")


def enable(name: str) -> None:
    if name not in KNOWN:
        raise ValueError(f"unknown seeded bug {name!r}")
    active.add(name)


def disable(name: str) -> None:
    active.discard(name)
