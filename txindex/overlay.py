"""A transaction's uncommitted index changes, merged into every query it makes.

For each index the overlay keeps the items the transaction's writes add (sorted) and the
``(index key, primary key)`` pairs they remove from the snapshot. Rolling back is dropping it;
committing publishes nothing: the store learns the write from the watch like any other.
"""

from __future__ import annotations

from typing import Any

from sortedcontainers import SortedList

from .index import Index

Item = tuple[Any, Any, Any]  # (encoded index key, primary key, store Entry)


class IndexOverlay:
    """Adds and removes of one index within one transaction.

    Invariant: ``removed`` holds only pairs present in the snapshot; once a transaction writes
    an object, every snapshot pair of it is in ``removed`` and ``added`` holds its current
    items.
    """

    __slots__ = ("added", "removed")

    def __init__(self) -> None:
        self.added: SortedList = SortedList(key=lambda it: (it[0], it[1]))
        self.removed: set[tuple[Any, Any]] = set()

    def remove(self, key: Any, pk: Any) -> None:
        """Hide ``(key, pk)``: drop it from the adds, or mark the snapshot's item removed."""
        pos = self.added.bisect_key_left((key, pk))
        if pos < len(self.added) and self.added[pos][:2] == (key, pk):
            del self.added[pos]
        else:
            self.removed.add((key, pk))

    def add(self, key: Any, pk: Any, entry: Any) -> None:
        """Show ``(key, pk)`` with ``entry`` (holding the new object). A snapshot item with the
        same pair stays hidden (it holds the old object); the added item holds the new one."""
        self.added.add((key, pk, entry))

    def merge(
        self, base: list[Item], lo: Any, hi: Any, reverse: bool, limit: int | None
    ) -> list[Item]:
        """Merge the snapshot's ``base`` items (already in order) with this overlay, within
        ``[lo, hi)``. O(m + a log a) for m base items and a added items in range."""
        items = [it for it in base if (it[0], it[1]) not in self.removed]
        items.extend(self._added_within(lo, hi))
        items.sort(key=lambda it: (it[0], it[1]), reverse=reverse)
        return items if limit is None else items[:limit]

    def count_delta(self, lo: Any, hi: Any) -> int:
        """How this overlay changes a snapshot count over ``[lo, hi)``. Every removed pair is a
        snapshot item. O(r + log a)."""
        hidden = sum(1 for p in self.removed if (lo is None or p >= lo) and (hi is None or p < hi))
        return len(self._added_within(lo, hi)) - hidden

    def _added_within(self, lo: Any, hi: Any) -> list[Item]:
        start = 0 if lo is None else self.added.bisect_key_left(lo)
        stop = len(self.added) if hi is None else self.added.bisect_key_left(hi)
        return list(self.added.islice(start, stop))


class Overlay:
    """Every index's overlay for one transaction."""

    __slots__ = ("by_index",)

    def __init__(self) -> None:
        self.by_index: dict[Index[Any], IndexOverlay] = {}

    def get(self, index: Index[Any]) -> IndexOverlay | None:
        return self.by_index.get(index)

    def replace(self, index: Index[Any], pk: Any, old: tuple[Any, ...], new: tuple[Any, ...],
                entry: Any) -> None:
        """Record that the object ``pk`` moved from index keys ``old`` to ``new``.
        O((|old| + |new|) log a)."""
        ov = self.by_index.get(index)
        if ov is None:
            ov = self.by_index[index] = IndexOverlay()
        for k in old:
            ov.remove(k, pk)
        for k in new:
            ov.add(k, pk, entry)
