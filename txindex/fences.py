"""Fence keys: how a commit tells concurrent index queries in other processes "I changed this".

etcd cannot compare on "no key in this index range changed": a range compare over a model's
keys misses deletes (a deleted key leaves the range) and makes etcd scan the whole range. So
every txindex commit also writes small fence keys beside the database prefix (``app/`` ->
``app.txindex-fences/``, see :func:`fence_root`; outside the watched range), and a
transaction that queried an index compares the fences its query depends on
(``mod_revision < V + 1``). Three kinds, per model M:

* ``fence/M`` — written by every commit that writes M. Guards range queries.
* ``bucket/M<index>/<b>`` — written for every index key an object enters or leaves (not for
  keys it keeps), ``b`` a stable hash of the key modulo :data:`BUCKETS`. Guards the membership
  of equality queries (``find``, ``first``, ``count``, unique checks) without colliding with
  unrelated writers. The objects ``find``/``first`` return are point reads of the
  transaction, so a change to their content is caught by their own compares; a unique key the
  written object already held in the snapshot needs no check at commit (any change of its
  holder changes that object).
* ``icoarse/M<index>`` — written instead of an index's bucket fences when those would not
  fit the Txn's operation budget (a bulk commit); equality queries on that index compare it.
  Buckets of unique indexes are kept first (unique checks decide claims), then those of the
  indexes with the fewest buckets.
* ``coarse/M`` — written for the remaining indexes of M when not even one fence each fits
  (never more than the model fence and this one per model: what ``put`` reserves). Equality
  queries on any index of M compare it.

All fence values are empty. The sync key (:func:`sync_key`) is the one bookkeeping key inside
the prefix (``<prefix>__txindex__/sync``): its events are the point of it.
"""

from __future__ import annotations

import functools
import zlib
from typing import Any

from .index import Index
from .model import RESERVED_PREFIX, ModelInfo
from .ordering import TOP

ROOT = RESERVED_PREFIX  # the sync key's folder inside the prefix (no model may claim it)
BUCKETS = 1024


def fence_root(db_prefix: str) -> str:
    """Where a database's fences live: beside its prefix, not inside it, so that no watcher
    of the prefix receives (and discards) an event per fence written. ``"app/"`` ->
    ``"app.txindex-fences/"``; any other prefix P -> ``"\\x00txindex-fences/P"`` (for the
    empty prefix, which watches everything, the fences stay visible and are ignored)."""
    if db_prefix.endswith("/"):
        return db_prefix[:-1] + ".txindex-fences/"
    return "\x00txindex-fences/" + db_prefix


# Fence keys are pure functions of their arguments, and a commit names a few: cached.


@functools.lru_cache(maxsize=1 << 10)
def model_fence(db_prefix: str, info: ModelInfo) -> bytes:
    return f"{fence_root(db_prefix)}fence/{info.prefix}".encode()


@functools.lru_cache(maxsize=1 << 10)
def coarse_fence(db_prefix: str, info: ModelInfo) -> bytes:
    return f"{fence_root(db_prefix)}coarse/{info.prefix}".encode()


@functools.lru_cache(maxsize=1 << 10)
def index_coarse_fence(db_prefix: str, index: Index[Any]) -> bytes:
    info: ModelInfo = index.model.__txindex_model__
    return f"{fence_root(db_prefix)}icoarse/{info.prefix}{index.name}".encode()


@functools.lru_cache(maxsize=1 << 16)
def bucket_fence(db_prefix: str, index: Index[Any], key: Any) -> bytes:
    """The fence of the bucket that holds encoded index ``key`` (equal keys, like 1 and 1.0,
    share a cache entry and a bucket). O(len(key)) on a cache miss."""
    info: ModelInfo = index.model.__txindex_model__
    return f"{fence_root(db_prefix)}bucket/{info.prefix}{index.name}/{_bucket(index, key)}".encode()


def _bucket(index: Index[Any], key: Any) -> int:
    """Stable bucket of an encoded key of ``index``. It hashes the key's ``sort_key`` form
    (:meth:`Index.canonical`), so it does not depend on how the index encodes keys."""
    return zlib.crc32(_canonical(index.canonical(key)).encode()) % BUCKETS


def sync_key(db_prefix: str) -> bytes:
    """Written by a failed Txn's failure branch, so that every watcher of the prefix sees an
    event at the failure revision: catching up to it never depends on progress notifications
    (which etcd before 3.5.8 may send ahead of undelivered events, etcd #15220)."""
    return f"{db_prefix}{ROOT}sync".encode()


def equality_key(lo: Any, hi: Any) -> Any:
    """The encoded key if ``[lo, hi)`` selects exactly one index key, else ``None``."""
    if (
        isinstance(hi, tuple) and len(hi) == 2 and hi[1] is TOP
        and isinstance(lo, tuple) and len(lo) == 1 and lo[0] == hi[0]
    ):
        return hi[0]
    return None


def _canonical(key: Any) -> str:
    """A text form equal for equal encoded keys in every process (``1`` and ``1.0`` encode
    equal, so integral floats print as ints; ``hash()`` of str is salted per process)."""
    if isinstance(key, tuple):
        return "(" + ",".join(_canonical(k) for k in key) + ")"
    if isinstance(key, float) and key.is_integer():
        return repr(int(key))
    return repr(key)
