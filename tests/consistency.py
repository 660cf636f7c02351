"""Convergence checks for fault tests: the cache equals etcd, every index equals a rebuild.

:func:`assert_converged` polls (with a deadline) until, at one applied revision R of the DB:

* the cached entries equal etcd's data read directly (paged Range over the prefix, decoded with
  the model infos) at R, values and mod revisions included;
* etcd's latest data under the prefix equals that too (the cache is not stuck behind);
* every declared index equals one rebuilt from scratch over the cached entries.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from txindex import DB
from txindex.backend.base import Backend, prefix_end, successor
from txindex.errors import Compacted, DecodeError, TxIndexError
from txindex.model import ModelInfo
from txindex.store import index_keys

INTERNAL = "__txindex__/"

# key -> (decoded value or ("DecodeError", type name), mod_revision)
State = dict[str, tuple[Any, int]]
# key -> (raw value, mod_revision), model keys only
Raw = dict[str, tuple[bytes, int]]
# (key, mod_revision) -> decoded value: a version never changes, so it is decoded once
Memo = dict[tuple[str, int], Any]


def read_raw(
    backend: Backend, prefix: str, models: Sequence[ModelInfo], revision: int = 0, page: int = 2000
) -> tuple[int, Raw]:
    """Every model key under ``prefix`` at ``revision`` (0 = latest), read in pages pinned at
    the first page's revision. Returns (revision read at, raw state)."""
    infos = [m.prefix for m in models]
    start = prefix.encode()
    end = prefix_end(start) if prefix else b"\x00"
    raw: Raw = {}
    key, pinned = start, revision
    cut = len(prefix)
    while True:
        res = backend.range(key, end, revision=pinned, limit=page)
        pinned = pinned or res.revision
        for kv in res.kvs:
            skey = kv.key.decode()[cut:]
            if not skey.startswith(INTERNAL) and any(skey.startswith(p) for p in infos):
                raw[skey] = (kv.value, kv.mod_revision)
        if not res.more or not res.kvs:
            return pinned, raw
        key = successor(res.kvs[-1].key)


def decode_state(raw: Raw, models: Sequence[ModelInfo], memo: Memo | None = None) -> State:
    """Decode a raw state with the model infos (independently of the watcher's decoder)."""
    infos = sorted(models, key=lambda m: len(m.prefix), reverse=True)
    memo = {} if memo is None else memo
    out: State = {}
    for skey, (value, rev) in raw.items():
        got = memo.get((skey, rev), memo)
        if got is memo:
            info = next(m for m in infos if skey.startswith(m.prefix))
            got = memo[(skey, rev)] = _decode(info, skey, value)
        out[skey] = (got, rev)
    return out


def read_etcd(
    backend: Backend, prefix: str, models: Sequence[ModelInfo], revision: int = 0
) -> tuple[int, State]:
    """Decoded model state of etcd under ``prefix`` at ``revision`` (0 = latest)."""
    rev, raw = read_raw(backend, prefix, models, revision)
    return rev, decode_state(raw, models)


def _decode(info: ModelInfo, skey: str, data: bytes) -> Any:
    try:
        obj = info.decode(data, skey)
        if info.key_suffix(info.pk(obj)) != skey[len(info.prefix):]:
            raise ValueError("key does not match primary key")
        return obj
    except Exception:  # any reason the cache would hold a DecodeError for (see _cached_value)
        return ("DecodeError", "DecodeError")


def _cached_value(value: Any) -> Any:
    return ("DecodeError", "DecodeError") if isinstance(value, DecodeError) else value


def snapshot_cache(db: DB) -> tuple[int, dict[str, Any], dict[Any, list[Any]]]:
    """(revision, entries, index items) taken atomically (retries while the watcher applies:
    the store's revision moves with every batch it applies)."""
    store = db._store
    while True:
        rev = store.revision
        entries = store.entries()
        items = {idx: store.index_items(idx) for idx in store.declared}
        if store.revision == rev:
            return rev, entries, items


def problems(db: DB, backend: Backend, memo: Memo | None = None) -> tuple[int, list[str]]:
    """What differs right now between the DB, etcd and rebuilt indexes (empty = converged)."""
    memo = {} if memo is None else memo
    rev, entries, items = snapshot_cache(db)
    cached: State = {k: (_cached_value(e.value), e.mod_revision) for k, e in entries.items()}
    try:
        _, raw_at = read_raw(backend, db.prefix, db.models, revision=rev)
    except Compacted:
        raw_at = None  # etcd compacted past the cache: only "latest" can be compared
    _, raw_latest = read_raw(backend, db.prefix, db.models)
    if raw_at is not None and raw_at != raw_latest:
        at = decode_state(raw_at, db.models, memo)
        detail = "" if at == cached else f"; cache != etcd@{rev}: {_diff(cached, at)}"
        return rev, [f"cache@{rev} is behind etcd's latest{detail}"]
    latest = decode_state(raw_latest, db.models, memo)
    if latest != cached:
        return rev, [f"cache@{rev} != etcd: {_diff(cached, latest)}"]
    out: list[str] = []
    for idx, got in items.items():
        rebuilt = {
            (k, e.pk, e.key, e.mod_revision)
            for e in entries.values() if idx in e.info.indexes
            for k in index_keys(idx, e)
        }
        flat = [(k, pk, e.key, e.mod_revision) for k, pk, e in got]
        if len(flat) != len(rebuilt) or set(flat) != rebuilt:
            out.append(f"index {idx.qualname}: committed != rebuilt: {_ldiff(flat, rebuilt)}")
        if any(entries.get(e.key) is not e for _, _, e in got):
            out.append(f"index {idx.qualname}: an item holds a stale entry")
    return rev, out


def _diff(a: State, b: State, limit: int = 5) -> str:
    keys = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    shown = ", ".join(f"{k}: {a.get(k)!r} vs {b.get(k)!r}" for k in keys[:limit])
    return f"{len(keys)} keys differ ({len(a)} cached, {len(b)} in etcd): {shown}"


def _ldiff(a: list[Any], b: set[Any], limit: int = 5) -> str:
    sa, sb = set(a), b
    return (
        f"{len(a)} vs {len(b)} items; extra {sorted(sa - sb, key=repr)[:limit]}; "
        f"missing {sorted(sb - sa, key=repr)[:limit]}"
    )


def assert_converged(db: DB, backend: Backend, prefix: str, timeout: float = 15.0) -> float:
    """Poll until the DB's cache equals etcd (at the cache's revision and at the latest one)
    and every index equals a rebuild; returns the time it took in ms. ``backend`` must talk to
    etcd directly (not through a fault-injecting proxy)."""
    assert db.prefix == prefix, f"DB prefix {db.prefix!r} is not {prefix!r}"
    t0 = time.monotonic()
    deadline = t0 + timeout
    last: list[str] = []
    memo: Memo = {}
    while True:
        try:
            _, last = problems(db, backend, memo)
        except TxIndexError as exc:  # etcd briefly unreachable while a test restarts it
            last = [f"etcd read failed: {type(exc).__name__}: {exc}"]
        if not last:
            return (time.monotonic() - t0) * 1000
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not converged after {timeout}s (watcher {db._watcher.stats}):\n"
                + "\n".join(last)
            )
        db._watcher.nudge()
        time.sleep(0.05)
