"""The ``txindex`` command line: ``demo``, ``stats`` and ``query``."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
import json
import sys
from collections.abc import Sequence
from typing import Any

import txindex


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
    with txindex.open(args.url, models=models, prefix=args.prefix) as db:
        if args.command == "stats":
            print(json.dumps(db.stats(), indent=2, sort_keys=True))
        else:
            _query(db, models, args)
    return 0


def _load(spec: str) -> type[Any]:
    module, _, name = spec.partition(":")
    if not name:
        raise SystemExit(f"--model {spec!r}: expected pkg.module:Class")
    cls: type[Any] = getattr(importlib.import_module(module), name)
    return cls


def _query(db: txindex.DB, models: list[type[Any]], args: argparse.Namespace) -> None:
    cls_name, _, index_name = args.index.partition(".")
    by_name = {m.__name__: m for m in models}
    if cls_name not in by_name or not index_name:
        raise SystemExit(f"--index {args.index!r}: expected Class.index of a --model class")
    index = getattr(by_name[cls_name], index_name)
    with db.read() as tx:
        if args.key is not None:
            objs: Any = tx.find(index, _value(args.key))
        else:
            lo = None if args.lo is None else _value(args.lo)
            hi = None if args.hi is None else _value(args.hi)
            objs = tx.range(index, lo, hi, limit=args.limit)
        for obj in objs:
            sys.stdout.write(json.dumps(dataclasses.asdict(obj)) + "\n")


def _value(text: str) -> Any:
    value = json.loads(text)
    return tuple(value) if isinstance(value, list) else value


if __name__ == "__main__":
    raise SystemExit(main())
