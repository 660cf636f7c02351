"""Writes by another tool: the real ``etcdctl`` (v3 API) against the session server.

What etcdctl puts or deletes under the DB prefix shows up in (and vanishes from) a running DB's
``get`` and every index; bad values become ``DecodeError`` without hurting the watcher; keys no
model claims are ignored; and what txindex writes is plain JSON that etcdctl reads back.
"""

from __future__ import annotations

import base64
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import txindex
from txindex import DB, DecodeError
from txindex.fences import fence_root
from txindex.server import EtcdServer, find_etcd_binary

from .models import MODELS, Node, User

WAIT = 10.0


def etcdctl(server: EtcdServer, *args: str) -> dict[str, Any]:
    """Run the real etcdctl (next to the etcd binary) with JSON output; fails loudly if it is
    missing or exits non-zero."""
    binary = Path(find_etcd_binary()).parent / "etcdctl"
    assert binary.is_file(), f"etcdctl not found next to {find_etcd_binary()}"
    env = {**os.environ, "ETCDCTL_API": "3"}
    out = subprocess.run(
        [str(binary), f"--endpoints={server.endpoint}", "-w", "json", *args],
        env=env, capture_output=True, timeout=30, check=False,
    )
    assert out.returncode == 0, f"etcdctl {args}: {out.stderr.decode()}"
    return json.loads(out.stdout)  # type: ignore[no-any-return]


def put(server: EtcdServer, key: str, value: str) -> int:
    """``etcdctl put``; returns the revision it created."""
    return int(etcdctl(server, "put", key, value)["header"]["revision"])


def delete(server: EtcdServer, key: str, *flags: str) -> tuple[int, int]:
    """``etcdctl del``; returns (revision, number deleted)."""
    resp = etcdctl(server, "del", key, *flags)
    return int(resp["header"]["revision"]), int(resp.get("deleted", 0))


def node_json(id: str, user: str, ip: str, tags: list[str], seen: float) -> str:
    return json.dumps(
        {"id": id, "user": user, "ip": ip, "tags": tags, "last_seen": seen}, separators=(",", ":")
    )


@pytest.fixture
def db(etcd_url: str, prefix: str) -> Iterator[DB]:
    with txindex.open(etcd_url, models=MODELS, prefix=prefix) as d:
        yield d


def test_etcdctl_put_update_delete_reach_get_and_indexes(
    etcd_server: EtcdServer, db: DB, prefix: str
) -> None:
    rev = put(etcd_server, prefix + "nodes/n1", node_json("n1", "alice", "10.1.0.1", ["prod"], 5))
    assert db.wait_for(rev, WAIT)
    n1 = Node("n1", "alice", "10.1.0.1", ("prod",), 5.0)
    with db.read() as tx:
        assert tx.get(Node, "n1") == n1
        assert tx.find(Node.by_user, "alice") == [n1]
        assert tx.first(Node.by_ip, "10.1.0.1") == n1
        assert tx.count(Node.by_tag, "prod") == 1
        assert list(tx.range(Node.active)) == [n1]
        assert list(tx.range(Node.by_user_seen, ("alice", 0), ("alice", 10))) == [n1]

    # an update moves every index entry
    rev = put(etcd_server, prefix + "nodes/n1", node_json("n1", "bob", "10.1.0.2", ["dev"], 0))
    assert db.wait_for(rev, WAIT)
    n1b = Node("n1", "bob", "10.1.0.2", ("dev",), 0.0)
    with db.read() as tx:
        assert tx.get(Node, "n1") == n1b
        assert tx.find(Node.by_user, "alice") == []
        assert tx.find(Node.by_user, "bob") == [n1b]
        assert tx.first(Node.by_ip, "10.1.0.1") is None
        assert tx.count(Node.by_tag, "prod") == 0
        assert tx.count(Node.by_tag, "dev") == 1
        assert list(tx.range(Node.active)) == []  # partial index: last_seen 0 leaves it

    # a read-write transaction takes the foreign value as its base, and its unique check sees it
    with pytest.raises(txindex.UniqueViolation) as err, db.tx() as tx:
        tx.put(Node("n2", "carol", "10.1.0.2"))
    assert err.value.holder == "n1"

    # a snapshot taken before the delete keeps seeing the object; later ones do not
    with db.read() as before:
        assert before.get(Node, "n1") == n1b
        rev, deleted = delete(etcd_server, prefix + "nodes/n1")
        assert deleted == 1
        assert db.wait_for(rev, WAIT)
        assert before.get(Node, "n1") == n1b
        assert before.find(Node.by_user, "bob") == [n1b]
    with db.read() as tx:
        assert tx.get(Node, "n1") is None
        assert tx.find(Node.by_user, "bob") == []
        assert tx.first(Node.by_ip, "10.1.0.2") is None
        assert tx.count(Node.by_tag, "dev") == 0
    assert all(n == 0 for n in db.stats()["indexes"].values())
    assert db.stats()["keys"] == 0


def test_etcdctl_prefix_delete_empties_indexes(
    etcd_server: EtcdServer, db: DB, prefix: str
) -> None:
    with db.tx() as tx:
        for i in range(20):
            tx.put(Node(f"n{i:02}", "u", f"10.2.0.{i}", ("t",), float(i)))
            tx.put(User(f"u{i:02}", "team"))
    rev, deleted = delete(etcd_server, prefix + "nodes/", "--prefix")
    assert deleted == 20
    assert db.wait_for(rev, WAIT)
    with db.read() as tx:
        assert tx.find(Node.by_user, "u") == []
        assert tx.count(Node.by_tag, "t") == 0
        assert len(tx.find(User.by_team, "team")) == 20
    assert db.stats()["keys"] == 20
    assert db.stats()["indexes"]["Node.by_ip"] == 0


def test_etcdctl_invalid_json_is_a_decode_error_and_the_watcher_survives(
    etcd_server: EtcdServer, etcd_url: str, db: DB, prefix: str
) -> None:
    errors0 = db.stats()["decode_errors"]
    rev = put(etcd_server, prefix + "nodes/bad", '{"id": "bad", "user": ')
    assert db.wait_for(rev, WAIT)
    with db.read() as tx, pytest.raises(DecodeError) as err:
        tx.get(Node, "bad")
    assert err.value.key.endswith("nodes/bad")
    stats = db.stats()
    assert stats["decode_errors"] == errors0 + 1
    assert stats["watcher_alive"]
    # valid JSON that does not fit the model, and a body whose id contradicts its key
    rev = put(etcd_server, prefix + "nodes/short", '{"id": "short"}')
    rev = put(etcd_server, prefix + "nodes/liar", node_json("other", "x", "10.3.0.9", [], 0))
    assert db.wait_for(rev, WAIT)
    with db.read() as tx:
        for pk in ("short", "liar"):
            with pytest.raises(DecodeError):
                tx.get(Node, pk)
        assert tx.find(Node.by_ip, "10.3.0.9") == []  # a broken value holds no index entry
    assert db.stats()["decode_errors"] == errors0 + 3

    # later valid writes, from etcdctl and from txindex, still apply
    rev = put(etcd_server, prefix + "nodes/good", node_json("good", "dora", "10.3.0.1", [], 1))
    assert db.wait_for(rev, WAIT)
    with db.tx() as tx:
        assert tx.get(Node, "good") == Node("good", "dora", "10.3.0.1", (), 1.0)
        tx.put(User("dora", "ops"))
    with db.read() as tx:
        assert tx.find(User.by_team, "ops") == [User("dora", "ops")]
        assert tx.find(Node.by_user, "dora") == [Node("good", "dora", "10.3.0.1", (), 1.0)]

    # repairing the broken key with etcdctl makes it readable and indexed
    rev = put(etcd_server, prefix + "nodes/bad", node_json("bad", "eve", "10.3.0.2", [], 0))
    assert db.wait_for(rev, WAIT)
    with db.read() as tx:
        assert tx.get(Node, "bad") == Node("bad", "eve", "10.3.0.2")
        assert tx.first(Node.by_ip, "10.3.0.2") == Node("bad", "eve", "10.3.0.2")
    assert db.stats()["watcher_alive"]

    # a DB opened now loads the broken keys the same way (load path, not watch path)
    with txindex.open(etcd_url, models=MODELS, prefix=prefix) as fresh, fresh.read() as tx:
        assert fresh.stats()["decode_errors"] == 2
        with pytest.raises(DecodeError):
            tx.get(Node, "short")
        assert tx.get(Node, "bad") == Node("bad", "eve", "10.3.0.2")


def test_etcdctl_unclaimed_key_is_ignored(etcd_server: EtcdServer, db: DB, prefix: str) -> None:
    tx = db.tx()
    tx.put(User("u1", "a"))
    committed = tx.commit()
    assert committed is not None and db.wait_for(committed, WAIT)
    before = db.stats()
    rev = put(etcd_server, prefix + "misc/thing", "not json at all")
    rev = put(etcd_server, prefix + "nodesX", "{}")  # looks like a model prefix, is not one
    assert db.wait_for(rev, WAIT)
    after = db.stats()
    assert after["keys"] == before["keys"] == 1
    assert after["decode_errors"] == before["decode_errors"]
    assert after["unclaimed_keys"] == before["unclaimed_keys"] + 2
    assert after["indexes"] == before["indexes"]
    assert after["watcher_alive"]
    # a key outside the prefix is not even seen
    outside = put(etcd_server, prefix.rstrip("/") + "-outside/nodes/n1", "{}")
    with db.tx() as tx:
        tx.put(User("u2", "a"))
    with db.read() as tx:  # waits for this process's commit, which is after ``outside``
        assert [u.name for u in tx.find(User.by_team, "a")] == ["u1", "u2"]
    assert db.revision > outside
    assert db.stats()["unclaimed_keys"] == after["unclaimed_keys"]
    delete(etcd_server, prefix.rstrip("/") + "-outside/nodes/n1")


def test_etcdctl_reads_txindex_objects_as_json(
    etcd_server: EtcdServer, db: DB, prefix: str
) -> None:
    n = Node("n1", "alice", "10.4.0.1", ("prod", "eu"), 2.5)
    with db.tx() as tx:
        tx.put(n)
        tx.put(User("alice", "core", 3))
    def get_prefix(p: str) -> dict[str, bytes]:
        resp = etcdctl(etcd_server, "get", p, "--prefix")
        return {  # etcdctl's JSON leaves out an empty value (the fences are empty)
            base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", ""))
            for kv in resp.get("kvs", [])
        }

    root = fence_root(prefix)  # beside the prefix, outside the range its watchers see
    assert not root.startswith(prefix)
    fences = set(get_prefix(root))
    assert {root + "fence/nodes/", root + "fence/users/"} <= fences
    assert any(f.startswith(root + "bucket/nodes/by_ip/") for f in fences)
    kvs = {k: json.loads(v) for k, v in get_prefix(prefix).items()}
    assert kvs == {
        prefix + "nodes/n1": {
            "id": "n1", "user": "alice", "ip": "10.4.0.1", "tags": ["prod", "eu"], "last_seen": 2.5
        },
        prefix + "users/alice": {"name": "alice", "team": "core", "quota": 3},
    }
    # and the plain (non-JSON-wrapped) output is the same readable text
    binary = Path(find_etcd_binary()).parent / "etcdctl"
    out = subprocess.run(
        [str(binary), f"--endpoints={etcd_server.endpoint}", "get", prefix + "nodes/n1",
         "--print-value-only"],
        env={**os.environ, "ETCDCTL_API": "3"}, capture_output=True, timeout=30, check=True,
    )
    assert json.loads(out.stdout) == kvs[prefix + "nodes/n1"]


def test_etcdctl_overflowing_number_is_a_decode_error(
    etcd_server: EtcdServer, db: DB, prefix: str
) -> None:
    """``1e999`` is grammatical JSON but overflows to ``inf``, which the codec promises to
    reject ("NaN and infinities are rejected") and which txindex itself cannot write back: the
    stored value must be a DecodeError, not an object that fails on its next put."""
    errors0 = db.stats()["decode_errors"]
    rev = put(
        etcd_server, prefix + "nodes/big",
        '{"id":"big","user":"u","ip":"10.5.0.1","tags":[],"last_seen":1e999}',
    )
    assert db.wait_for(rev, WAIT)
    with db.read() as tx, pytest.raises(DecodeError):
        got = tx.get(Node, "big")
        # what happens instead: the object loads with last_seen=inf, and writing it back fails
        with db.tx() as wtx:
            wtx.put(got)  # type: ignore[arg-type]
    assert db.stats()["decode_errors"] == errors0 + 1
    assert db.stats()["watcher_alive"]
