"""`freshrec bench <name>`: benchmarks that print a table against a baseline measured in the
same run, and end with one JSON line. Each lives in `freshrec/bench/<name>.py` with
`add_arguments(parser)` and `run(args) -> int`."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import freshrec.bench


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("bench", help="benchmarks against baselines (see README: Results)")
    names = sorted(m.name for m in pkgutil.iter_modules(freshrec.bench.__path__))
    sub = p.add_subparsers(dest="benchmark", required=True)
    for name in names:
        module = importlib.import_module(f"freshrec.bench.{name}")
        bp = sub.add_parser(name, help=(module.__doc__ or "").strip().split("\n")[0])
        module.add_arguments(bp)
        bp.set_defaults(func=module.run)
