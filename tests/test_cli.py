"""The command line: the demo end to end, and stats/query against a live etcd."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import txindex

from .models import Node

ROOT = Path(__file__).resolve().parent.parent


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "txindex.cli", *args], capture_output=True,
                          text=True, timeout=180, cwd=ROOT)


def test_demo_hands_out_every_address_once(tmp_path: Path) -> None:
    done = run_cli("demo", "--nodes", "15", "--dir", str(tmp_path / "data"))
    assert done.returncode == 0, done.stderr
    assert "every address was handed out once" in done.stdout
    assert "nodes         30" in done.stdout
    again = run_cli("demo", "--nodes", "5", "--dir", str(tmp_path / "data"))  # reuses the data
    assert again.returncode == 0, again.stderr
    assert "nodes         10" in again.stdout


def test_stats_and_query(etcd_url: str, prefix: str) -> None:
    with txindex.open(etcd_url, models=[Node], prefix=prefix) as db, db.tx() as tx:
        tx.put(Node("a", "alice", "ip-a", ("prod",), 1.0))
        tx.put(Node("b", "bob", "ip-b", (), 2.0))
        tx.put(Node("c", "alice", "ip-c", (), 3.0))
    model = ["--url", etcd_url, "--prefix", prefix, "--model", "tests.models:Node"]
    stats = run_cli("stats", *model)
    assert stats.returncode == 0, stats.stderr
    parsed = json.loads(stats.stdout)
    assert parsed["keys"] == 3 and parsed["indexes"]["Node.by_user"] == 3
    found = run_cli("query", *model, "--index", "Node.by_user", "--key", '"alice"')
    assert found.returncode == 0, found.stderr
    assert [json.loads(line)["id"] for line in found.stdout.splitlines()] == ["a", "c"]
    ranged = run_cli("query", *model, "--index", "Node.by_user_seen", "--lo", '["alice", 2]',
                     "--hi", '["bob", 9]')
    assert [json.loads(line)["id"] for line in ranged.stdout.splitlines()] == ["c", "b"]


def test_bad_arguments_get_one_line_before_any_load() -> None:
    """Checked before the database is opened (the URL here serves nothing): one line on
    stderr, exit status non-zero, no traceback."""
    model = ["--url", "etcd://127.0.0.1:1", "--model", "tests.models:Node"]
    cases = {
        ("--index", "Node.by_user", "--key", "alice"): "is not JSON",
        ("--index", "Node.nope", "--key", '"x"'): "has no index 'nope'",
        ("--index", "Node.user", "--key", '"x"'): "has no index 'user'",
        ("--index", "Node.by_user", "--key", "NaN"): "cannot be ordered",
        ("--index", "Node.by_user", "--limit", "-1"): "must be >= 0",
        ("--index", "Node.by_user", "--key", '"a"', "--lo", '"a"'): "one or the other",
    }
    for args, message in cases.items():
        done = run_cli("query", *model, *args)
        assert done.returncode != 0, args
        assert message in done.stderr and "Traceback" not in done.stderr, (args, done.stderr)
    missing = run_cli("stats", "--url", "etcd://127.0.0.1:1", "--model", "tests.models:Nope")
    assert missing.returncode != 0 and "Traceback" not in missing.stderr, missing.stderr


def test_python_dash_m_txindex_is_the_cli() -> None:
    done = subprocess.run([sys.executable, "-m", "txindex", "--help"], capture_output=True,
                          text=True, timeout=60, cwd=ROOT)
    assert done.returncode == 0 and "demo" in done.stdout, done.stderr
