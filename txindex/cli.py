"""The ``txindex`` command line: ``demo``, ``stats`` and ``query``.

``stats`` and ``query`` load the whole prefix before answering; while they do, a progress line
goes to stderr (``--progress`` / ``--no-progress``; default: only when stderr is a terminal).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
import time
from collections.abc import Sequence
from typing import IO, Any

import txindex
from txindex.model import info_of


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="txindex", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    demo = sub.add_parser("demo", help="a small control plane on an embedded etcd")
    demo.add_argument("--dir", help="data directory (default: a temporary one)")
    demo.add_argument("--nodes", type=int, default=40, help="nodes per worker process")
    for name, text in (("stats", "keys, revision, index sizes"), ("query", "query an index")):
        p = sub.add_parser(name, help=text)
        p.add_argument("--url", required=True, help="etcd://host:port[,...] or file://DIR")
        p.add_argument("--prefix", default="", help="the database's key prefix")
        p.add_argument("--model", action="append", required=True,
                       help="pkg.module:Class (repeatable)")
        p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                       help="show load progress on stderr (default: when stderr is a terminal)")
    query = sub.choices["query"]
    query.add_argument("--index", required=True, help="Class.index")
    query.add_argument("--key", help="a JSON value: find objects with this index key")
    query.add_argument("--lo", help="a JSON value: lower bound (inclusive)")
    query.add_argument("--hi", help="a JSON value: upper bound (exclusive)")
    query.add_argument("--limit", type=int)
    args = parser.parse_args(argv)
    if args.command == "demo":
        from txindex import demo as demo_module

        demo_module.run(args.dir, args.nodes)
        return 0
    models = [_load(spec) for spec in args.model]
    plan = _plan(models, args) if args.command == "query" else None  # checked before the load
    show = sys.stderr.isatty() if args.progress is None else args.progress
    try:
        progress = LoadProgress(sys.stderr) if show else None
        with _open(args.url, models, args.prefix, progress) as db:
            if plan is None:
                print(json.dumps(db.stats(), indent=2, sort_keys=True))
            else:
                _query(db, plan)
    except (txindex.TxIndexError, ValueError) as exc:  # one line, no traceback
        raise SystemExit(f"txindex: {type(exc).__name__}: {exc}") from None
    return 0


class LoadProgress:
    """A plain stderr progress line for the initial load, redrawn in place (``\\r``) at most
    every ``interval`` seconds. Call it as ``progress(loaded_keys)`` or
    ``progress(loaded_keys, total_keys)`` (a bar when the total is known); :meth:`done` ends
    the line with the final count."""

    WIDTH = 30

    def __init__(self, stream: IO[str], *, interval: float = 0.1) -> None:
        self._stream = stream
        self._interval = interval
        self._start = time.monotonic()
        self._last = -interval
        self._drawn = False
        self.loaded = 0
        self.total: int | None = None

    def __call__(self, loaded_keys: int, total_keys: int | None = None) -> None:
        self.loaded = loaded_keys
        if total_keys is not None:
            self.total = total_keys
        now = time.monotonic()
        if now - self._last >= self._interval:
            self._last = now
            self._draw(now)

    def line(self, now: float | None = None) -> str:
        elapsed = max((time.monotonic() if now is None else now) - self._start, 1e-9)
        rate = f"{self.loaded / elapsed:,.0f} keys/s"
        if self.total:
            frac = min(self.loaded / self.total, 1.0)
            filled = int(frac * self.WIDTH)
            bar = "#" * filled + "." * (self.WIDTH - filled)
            return (
                f"loading [{bar}] {frac:4.0%} {self.loaded:,}/{self.total:,} keys, {rate}"
            )
        return f"loading {self.loaded:,} keys, {rate}"

    def _draw(self, now: float) -> None:
        self._stream.write("\r" + self.line(now) + "\x1b[K")
        self._stream.flush()
        self._drawn = True

    def abort(self) -> None:
        """End a drawn line (the load failed; its error follows on its own line)."""
        if self._drawn:
            self._stream.write("\n")
            self._stream.flush()

    def done(self, keys: int) -> None:
        self.loaded = max(self.loaded, keys)
        elapsed = time.monotonic() - self._start
        prefix = "\r" if self._drawn else ""
        self._stream.write(f"{prefix}loaded {keys:,} keys in {elapsed:.1f}s\x1b[K\n")
        self._stream.flush()


def _open(
    url: str, models: list[type[Any]], prefix: str, progress: LoadProgress | None
) -> txindex.DB:
    if progress is None:
        return txindex.open(url, models=models, prefix=prefix)
    try:
        db = txindex.open(url, models=models, prefix=prefix, on_load_progress=progress)
    except BaseException:
        progress.abort()
        raise
    progress.done(int(db.stats()["keys"]))
    return db


def _load(spec: str) -> type[Any]:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--model {spec!r}: expected pkg.module:Class")
    try:
        cls: type[Any] = getattr(importlib.import_module(module), name)
        info_of(cls)
    except (ImportError, AttributeError, txindex.ModelError) as exc:
        raise SystemExit(f"--model {spec!r}: {exc}") from None
    return cls


@dataclasses.dataclass(frozen=True)
class _Plan:
    index: txindex.Index[Any]
    key: Any  # _NONE: no --key (a range)
    lo: Any
    hi: Any
    limit: int | None


_NONE: Any = object()


def _plan(models: list[type[Any]], args: argparse.Namespace) -> _Plan:
    """The query the arguments ask for, checked before the (possibly long) load."""
    cls_name, _, index_name = args.index.partition(".")
    by_name = {m.__name__: m for m in models}
    if cls_name not in by_name or not index_name:
        raise SystemExit(f"--index {args.index!r}: expected Class.index of a --model class")
    info = info_of(by_name[cls_name])
    index = next((i for i in info.indexes if i.name == index_name), None)
    if index is None:
        raise SystemExit(
            f"--index {args.index!r}: {cls_name} has no index {index_name!r} "
            f"(indexes: {', '.join(i.name for i in info.indexes) or 'none'})"
        )
    if args.key is not None and (args.lo is not None or args.hi is not None):
        raise SystemExit("--key finds one index key; --lo/--hi give a range: use one or the other")
    if args.limit is not None and args.limit < 0:
        raise SystemExit(f"--limit {args.limit}: must be >= 0")
    key = _NONE if args.key is None else _value("--key", args.key)
    lo = None if args.lo is None else _value("--lo", args.lo)
    hi = None if args.hi is None else _value("--hi", args.hi)
    try:
        if key is _NONE:
            index.range_bounds(lo, hi)
        else:
            index.eq_bounds(key)
    except (txindex.TxIndexError, TypeError, ValueError) as exc:
        raise SystemExit(f"--index {args.index}: {exc}") from None
    return _Plan(index, key, lo, hi, args.limit)


def _query(db: txindex.DB, plan: _Plan) -> None:
    with db.read() as tx:
        if plan.key is not _NONE:
            objs: Any = tx.find(plan.index, plan.key)[: plan.limit]
        else:
            objs = tx.range(plan.index, plan.lo, plan.hi, limit=plan.limit)
        for obj in objs:
            sys.stdout.write(info_of(obj).encode(obj).decode() + "\n")


def _value(option: str, text: str) -> Any:
    try:
        value = json.loads(text)
    except json.JSONDecodeError:
        raise SystemExit(
            f"{option} {text!r} is not JSON (a string needs quotes: {option} '\"{text}\"')"
        ) from None
    return tuple(value) if isinstance(value, list) else value


if __name__ == "__main__":
    raise SystemExit(main())
