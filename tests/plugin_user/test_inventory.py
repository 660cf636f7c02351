"""A user's tests of their own code, run against a real etcd by the txindex pytest plugin."""

import pytest
from inventory import Bin, Item, move, stock

import txindex


def test_stock_and_move(txindex_db):
    db = txindex_db()  # models from conftest's txindex_models fixture
    with db.tx() as tx:
        tx.put(Bin("A1", capacity=1))
        tx.put(Bin("B2", capacity=5))
    stock(db, Item("s1", "bolt"))
    stock(db, Item("s2", "nut"))
    move(db, "s1", "A1")
    with pytest.raises(ValueError, match="full"):
        move(db, "s2", "A1")
    move(db, "s2", "B2")
    with db.read() as tx:
        assert [i.sku for i in tx.find(Item.by_bin, "A1")] == ["s1"]
        assert [i.sku for i in tx.find(Item.by_bin, "B2")] == ["s2"]


def test_two_handles_see_each_other(txindex_db):
    writer, reader = txindex_db(), txindex_db()
    with writer.tx() as tx:
        tx.put(Item("s1", "washer", qty=3))
        revision = tx.commit()
    assert reader.wait_for(revision, timeout=10)
    with reader.read() as tx:
        assert tx.first(Item.by_name, "washer") == Item("s1", "washer", qty=3)


def test_unique_name_across_handles(txindex_db):
    a, b = txindex_db(), txindex_db()
    stock(a, Item("s1", "gear"))
    with pytest.raises(txindex.UniqueViolation):
        stock(b, Item("s2", "gear"))


@pytest.mark.txindex_models([Item])
def test_marker_chooses_models(txindex_db):
    db = txindex_db()
    assert [m.cls for m in db.models] == [Item]


def test_fresh_prefix_per_test(txindex_db, txindex_prefix):
    db = txindex_db()
    assert db.prefix == txindex_prefix
    assert db.stats()["keys"] == 0  # nothing left over from the other tests


@pytest.mark.txindex_models(Bin, Item)
def test_marker_with_several_models(txindex_db):
    db = txindex_db()
    assert [m.cls for m in db.models] == [Bin, Item]
