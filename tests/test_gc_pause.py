"""The watcher pauses the cyclic GC around bulk applies and loads, and always restores it."""

from __future__ import annotations

import gc
import uuid
from dataclasses import dataclass

import txindex
from txindex import Index
from txindex.watcher import GC_PAUSE_EVENTS

SEEN: list[bool] = []  # gc.isenabled() each time the index below extracts a key


def _record(obj: object) -> bool:
    SEEN.append(gc.isenabled())
    return True


@txindex.model("gcp/", key="id")
@dataclass(frozen=True)
class Item:
    id: str
    v: int = 0

    by_v = Index("v", where=_record)


def _write(url: str, ids: range) -> None:
    with txindex.open(url, models=[Item]) as writer, writer.tx() as tx:
        for i in ids:
            tx.put(Item(f"i{i}", i))


def test_bulk_apply_and_load_pause_the_gc_and_restore_it() -> None:
    url = f"memory://gcp-{uuid.uuid4().hex}"
    _write(url, range(10))
    SEEN.clear()
    db = txindex.open(url, models=[Item])
    try:
        assert SEEN and not any(SEEN)  # the load ran paused
        assert gc.isenabled()
        SEEN.clear()
        _write(url, range(100, 100 + GC_PAUSE_EVENTS))  # one watch batch of many events
        assert db.wait_for(db._backend.current_revision(), 10)
        assert False in SEEN[-GC_PAUSE_EVENTS:] and gc.isenabled()
    finally:
        db.close()


def test_a_disabled_gc_stays_disabled() -> None:
    url = f"memory://gcp-{uuid.uuid4().hex}"
    _write(url, range(10))
    gc.disable()
    try:
        db = txindex.open(url, models=[Item])
        _write(url, range(100, 100 + GC_PAUSE_EVENTS))
        assert db.wait_for(db._backend.current_revision(), 10)
        db.close()
        assert not gc.isenabled()
    finally:
        gc.enable()
