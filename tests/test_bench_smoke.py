"""Smoke test of the benchmark runner: ``bench/run.py --smoke`` runs every registered metric
(real etcd included) and ends with one JSON line describing each. No timing assertions."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EXPECTED = {
    "get_vs_etcd",
    "commit_vs_raw",
    "unique_lookup_vs_sqlite",
    "range200_vs_sqlite",
    "readtx_overhead",
    "false_conflict_rate",
}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
    )


def test_smoke_run_ends_with_one_json_line_per_metric() -> None:
    proc = _run("--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    assert set(report) >= EXPECTED, sorted(report)
    for name, r in report.items():
        for field in ("value", "baseline", "ratio", "unit"):
            assert field in r, (name, field, r)
        assert isinstance(r["unit"], str) and r["unit"], (name, r)
        for field in ("value", "baseline"):
            assert isinstance(r[field], (int, float)), (name, field, r)
            assert math.isfinite(r[field]) and r[field] >= 0, (name, field, r)
        assert r["ratio"] is None or r["ratio"] >= 0, (name, r)
    # the table names every metric before the JSON line
    table = "\n".join(lines[:-1])
    for name in report:
        assert name in table


def test_only_selects_metrics_and_rejects_unknown_names() -> None:
    proc = _run("--smoke", "--only", "readtx_overhead")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == {"readtx_overhead"}
    bad = _run("--smoke", "--only", "no_such_metric")
    assert bad.returncode == 2
    assert "no_such_metric" in bad.stderr
