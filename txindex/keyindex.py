"""``KeyIndex``: the committed items of one secondary index, as an ordered multimap.

An index item is an ``(index key, primary key)`` pair; items are ordered by key, then by
primary key. A ``KeyIndex`` keeps:

* ``keys``: the distinct index keys, in a ``SortedList`` (for range scans);
* ``buckets``: a dict from each key to its primary keys (for point lookups and updates). A
  bucket is the primary key itself while it is alone, a sorted ``list`` while it is small, and a
  ``SortedList`` past :data:`LARGE` items (a list insert moves every later item).

Most writes then touch only the dict and one bucket: a key that already has items (a user's
hosts, a tag) gains or loses a primary key without the ordered key list changing, and a change
that keeps an object's key touches nothing at all (the entry comes from the store's table, not
from the index). Memory is one slot per item plus one dict slot per distinct key.

Primary keys of one index must be mutually orderable (they are: one model, one key type) and
hashable; a primary key is never a ``list`` or ``SortedList``, which is how a one-item bucket is
told apart from a bigger one.

Bounds are the probes :mod:`txindex.index` builds: ``(key,)`` (before every item of ``key``) and
``(key, TOP)`` (after every item of ``key``); ``None`` is unbounded.
"""

from __future__ import annotations

import itertools
from bisect import bisect_left, bisect_right
from collections.abc import Iterable, Iterator
from typing import Any

from sortedcontainers import SortedList

from .ordering import TOP

__all__ = ["LARGE", "KeyIndex"]

LARGE = 1024  # a bucket past this many items becomes a SortedList
SMALL = LARGE // 4  # a SortedList bucket shrunk to this many items becomes a list again

Pair = tuple[Any, Any]  # (index key, primary key)


class KeyIndex:
    """Ordered ``(index key, primary key)`` items of one index. Not thread-safe: the store
    calls it under its lock."""

    __slots__ = ("buckets", "keys", "size")

    def __init__(self) -> None:
        self.keys: SortedList = SortedList()
        self.buckets: dict[Any, Any] = {}
        self.size = 0

    @classmethod
    def build(cls, pairs: Iterable[Pair]) -> KeyIndex:
        """An index holding ``pairs`` (no pair twice). O(n log n)."""
        ki = cls()
        pairs = pairs if isinstance(pairs, list) else list(pairs)
        single = dict(pairs)
        if len(single) == len(pairs):  # every key has one item (a unique index): C-level work
            ki.buckets, ki.size, ki.keys = single, len(single), SortedList(single)
            return ki
        grouped: dict[Any, list[Any]] = {}
        for key, pk in pairs:
            found = grouped.get(key)
            if found is None:
                grouped[key] = [pk]
            else:
                found.append(pk)
        buckets = ki.buckets
        for key, pks in grouped.items():
            ki.size += len(pks)
            if len(pks) == 1:
                buckets[key] = pks[0]
            else:
                pks.sort()
                buckets[key] = SortedList(pks) if len(pks) > LARGE else pks
        ki.keys = SortedList(buckets)
        return ki

    def __len__(self) -> int:
        """Number of items. O(1)."""
        return self.size

    # ---- writes --------------------------------------------------------------------------

    def add(self, key: Any, pk: Any) -> None:
        """Add the item ``(key, pk)``; ``ValueError`` if it is present. O(1) dict work plus
        O(log b) in a bucket of b items; O(log k) more for a key new to the index (k distinct
        keys)."""
        buckets = self.buckets
        bucket = buckets.get(key, _MISSING)
        if bucket is _MISSING:
            buckets[key] = pk
            self.keys.add(key)
        elif type(bucket) is list:
            i = bisect_left(bucket, pk)
            if i < len(bucket) and bucket[i] == pk:
                raise _present(key, pk)
            bucket.insert(i, pk)
            if len(bucket) > LARGE:
                buckets[key] = SortedList(bucket)
        elif type(bucket) is SortedList:
            _insert_new(bucket, key, pk)
        elif pk == bucket:
            raise _present(key, pk)
        else:
            buckets[key] = [bucket, pk] if bucket < pk else [pk, bucket]
        self.size += 1

    def remove(self, key: Any, pk: Any) -> None:
        """Remove the item ``(key, pk)``; ``KeyError`` if it is not present. Cost as
        :meth:`add`."""
        buckets = self.buckets
        bucket = buckets.get(key, _MISSING)
        if type(bucket) is list:
            i = bisect_left(bucket, pk)
            if i == len(bucket) or bucket[i] != pk:
                raise KeyError((key, pk))
            del bucket[i]
            if len(bucket) == 1:
                buckets[key] = bucket[0]
        elif type(bucket) is SortedList:
            try:
                bucket.remove(pk)
            except ValueError:
                raise KeyError((key, pk)) from None
            if len(bucket) <= SMALL:
                buckets[key] = list(bucket)
        elif bucket is _MISSING or bucket != pk:
            raise KeyError((key, pk))
        else:
            del buckets[key]
            self.keys.remove(key)
        self.size -= 1

    # ---- reads ---------------------------------------------------------------------------

    def get(self, key: Any, reverse: bool = False, limit: int | None = None) -> list[Any]:
        """The primary keys of ``key`` in order (or reversed), at most ``limit``, as a new
        list. O(1) dict probe plus O(m) for m returned."""
        bucket = self.buckets.get(key, _MISSING)
        return [] if bucket is _MISSING else _pks(bucket, reverse, limit)

    def scan(self, lo: Any, hi: Any, reverse: bool = False, limit: int | None = None) -> list[Pair]:
        """Items within the bounds ``[lo, hi)``, in order or reversed, at most ``limit``.
        O(log k + m) for m items returned."""
        keys, pks = self.columns(lo, hi, reverse, limit)
        return list(zip(keys, pks, strict=True))

    def columns(
        self, lo: Any, hi: Any, reverse: bool = False, limit: int | None = None
    ) -> tuple[list[Any], list[Any]]:
        """:meth:`scan` as two parallel lists, keys and primary keys (no pair tuples to build).
        A run of one-item keys is read with C-level ``map``/``extend``; O(log k + m)."""
        keys: list[Any] = []
        pks: list[Any] = []
        if limit == 0:
            return keys, pks
        bucket_of = self.buckets.__getitem__
        for run in self._key_runs(lo, hi, reverse, limit):
            if limit is not None:  # every key has an item: no more keys than items are needed
                run = run[:limit - len(pks)]
            found = list(map(bucket_of, run))
            kinds = set(map(type, found))
            if list not in kinds and SortedList not in kinds:  # one pk per key
                keys += run
                pks += found
            else:
                for key, bucket in zip(run, found, strict=True):
                    more = _pks(bucket, reverse, None if limit is None else limit - len(pks))
                    keys += [key] * len(more)
                    pks += more
                    if limit is not None and len(pks) >= limit:
                        break
            if limit is not None and len(pks) >= limit:
                break
        return keys, pks

    def count(self, lo: Any, hi: Any) -> int:
        """Number of items within ``[lo, hi)``. O(log k + keys in range)."""
        buckets = self.buckets
        n = 0
        for key in itertools.chain.from_iterable(self._key_runs(lo, hi, False, None)):
            bucket = buckets[key]
            n += len(bucket) if type(bucket) is list or type(bucket) is SortedList else 1
        return n

    def items(self) -> Iterator[Pair]:
        """Every item, in order. O(n)."""
        return iter(self.scan(None, None))

    def check(self) -> None:
        """Assert the invariants (for tests): keys sorted and equal to the buckets' keys,
        buckets sorted and of the right kind, size right. O(n log n)."""
        keys = list(self.keys)
        assert keys == sorted(self.buckets), "keys differ from the buckets"
        n = 0
        for key, bucket in self.buckets.items():
            if type(bucket) is list:
                assert 2 <= len(bucket) <= LARGE, (key, len(bucket))
                assert all(a < b for a, b in itertools.pairwise(bucket)), key
            elif type(bucket) is SortedList:
                assert len(bucket) > SMALL, (key, len(bucket))
                bucket._check()
                assert all(a < b for a, b in itertools.pairwise(bucket)), key
            n += len(_pks(bucket, False, None))
        assert n == self.size, (n, self.size)

    # ---- internals -----------------------------------------------------------------------

    def _key_runs(
        self, lo: Any, hi: Any, reverse: bool, most: int | None
    ) -> Iterator[list[Any]]:
        """The distinct keys within ``[lo, hi)`` as list slices of at most ``most`` keys, one
        per sublist of the SortedList, walked directly (its positional methods would build an
        index tree that every later write must then maintain). O(log k) plus the slices."""
        lists: list[list[Any]] = self.keys._lists
        maxes: list[Any] = self.keys._maxes
        if not maxes:
            return
        i, j = (0, 0) if lo is None else _locate(lists, maxes, lo)
        i2, j2 = (len(lists) - 1, len(lists[-1])) if hi is None else _locate(lists, maxes, hi)
        if (i, j) >= (i2, j2):
            return
        for n in range(i2, i - 1, -1) if reverse else range(i, i2 + 1):
            start = j if n == i else 0
            stop = j2 if n == i2 else len(lists[n])
            if most is not None and stop - start > most:
                if reverse:
                    start = stop - most
                else:
                    stop = start + most
            run = lists[n][start:stop]
            if reverse:
                run.reverse()
            yield run


_MISSING: Any = object()


def _present(key: Any, pk: Any) -> ValueError:
    return ValueError(f"index item {(key, pk)!r} is already present")


def _insert_new(bucket: SortedList, key: Any, pk: Any) -> None:
    """``bucket.add(pk)`` with the presence check folded into its one search (SortedList's
    ``_lists``/``_maxes``/``_expand`` internals, stable since sortedcontainers 2.0). O(log b)."""
    lists, maxes = bucket._lists, bucket._maxes
    i = bisect_left(maxes, pk)
    if i == len(maxes):
        i -= 1
        lists[i].append(pk)
        maxes[i] = pk
    else:
        sub = lists[i]
        j = bisect_left(sub, pk)
        if sub[j] == pk:
            raise _present(key, pk)
        sub.insert(j, pk)
    bucket._expand(i)
    bucket._len += 1


def _pks(bucket: Any, reverse: bool, limit: int | None) -> list[Any]:
    """A bucket's primary keys as a new list, in order or reversed, at most ``limit``. O(m)
    for m returned (a SortedList bucket is read through its sublists, as above)."""
    if type(bucket) is list:
        pks = bucket[::-1] if reverse else bucket[:]
    elif type(bucket) is SortedList:
        lists = bucket._lists
        if reverse:
            chained = itertools.chain.from_iterable(reversed(sub) for sub in reversed(lists))
        else:
            chained = itertools.chain.from_iterable(lists)
        return list(chained if limit is None else itertools.islice(chained, limit))
    else:
        return [bucket] if limit != 0 else []
    return pks if limit is None else pks[:limit]


def _locate(lists: list[list[Any]], maxes: list[Any], bound: tuple[Any, ...]) -> tuple[int, int]:
    """(sublist, offset) of the first key a bound ``(key,)`` or ``(key, TOP)`` lets in (past
    the end is (last, len(last)))."""
    if len(bound) == 1:
        key, find = bound[0], bisect_left
    elif len(bound) == 2 and bound[1] is TOP:
        key, find = bound[0], bisect_right
    else:
        raise ValueError(f"index bound {bound!r} is neither (key,) nor (key, TOP)")
    i = find(maxes, key)
    if i == len(maxes):
        return i - 1, len(lists[i - 1])
    return i, find(lists[i], key)
