"""A tiny "user application" built on txindex: stock items in warehouse bins."""

from __future__ import annotations

from dataclasses import dataclass, replace

import txindex
from txindex import Index


@txindex.model("items/", key="sku")
@dataclass(frozen=True)
class Item:
    sku: str
    name: str
    bin: str = ""
    qty: int = 0

    by_bin = Index("bin")
    by_name = Index("name", unique=True)


@txindex.model("bins/", key="code")
@dataclass(frozen=True)
class Bin:
    code: str
    capacity: int

    by_capacity = Index("capacity")


def stock(db: txindex.DB, item: Item) -> None:
    db.transact(lambda tx: tx.put(item))


def move(db: txindex.DB, sku: str, to_bin: str) -> None:
    """Move an item into a bin that must exist and have room for one more item."""

    def fn(tx: txindex.Transaction) -> None:
        item = tx.get(Item, sku)
        target = tx.get(Bin, to_bin)
        if item is None or target is None:
            raise KeyError(sku if item is None else to_bin)
        if tx.count(Item.by_bin, to_bin) >= target.capacity:
            raise ValueError(f"bin {to_bin} is full")
        tx.put(replace(item, bin=to_bin))

    db.transact(fn)
