"""Fence keys: how a commit tells concurrent index queries in other processes "I changed this".

etcd cannot compare on "no key in this index range changed": a range compare over a model's
keys misses deletes (a deleted key leaves the range) and makes etcd scan the whole range. So
every txindex commit also writes small fence keys under ``<prefix>__txindex__/``, and a
transaction that queried an index compares the fences its query depends on
(``mod_revision < V + 1``). Three kinds, per model M:

* ``fence/M`` — written by every commit that writes M. Guards range queries.
* ``bucket/M<index>/<b>`` — written for every index key a commit adds or removes (old and new
  keys), ``b`` a stable hash of the key modulo :data:`BUCKETS`. Guards equality queries
  (``find``, ``first``, ``count``, unique checks) without colliding with unrelated writers.
* ``coarse/M`` — written instead of the bucket fences when those would not fit the Txn's
  operation budget. Equality queries compare it too.

All fence values are empty; the watcher ignores the ``__txindex__/`` subtree.
"""

from __future__ import annotations

import zlib
from typing import Any

from .index import Index
from .model import ModelInfo
from .ordering import TOP

ROOT = "__txindex__/"
BUCKETS = 1024


def model_fence(db_prefix: str, info: ModelInfo) -> bytes:
    return f"{db_prefix}{ROOT}fence/{info.prefix}".encode()


def coarse_fence(db_prefix: str, info: ModelInfo) -> bytes:
    return f"{db_prefix}{ROOT}coarse/{info.prefix}".encode()


def bucket_fence(db_prefix: str, index: Index[Any], key: Any) -> bytes:
    """The fence of the bucket that holds encoded index ``key``. O(len(key))."""
    info: ModelInfo = index.model.__txindex_model__
    bucket = zlib.crc32(_canonical(key).encode()) % BUCKETS
    return f"{db_prefix}{ROOT}bucket/{info.prefix}{index.name}/{bucket}".encode()


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
