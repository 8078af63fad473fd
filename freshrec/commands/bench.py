"""`freshrec bench <name> [options]`: benchmarks that print a table against a baseline
measured in the same run, and end with one JSON line. Each lives in
`freshrec/bench/<name>.py` with `add_arguments(parser)` and `run(args) -> int`; a module is
imported only when its benchmark runs."""

from __future__ import annotations

import argparse
import importlib
import pkgutil

import freshrec.bench


def register(subparsers: argparse._SubParsersAction) -> None:
    names = sorted(m.name for m in pkgutil.iter_modules(freshrec.bench.__path__))
    p = subparsers.add_parser("bench", help="benchmarks against baselines (see README: Results)")
    p.add_argument("benchmark", choices=names)
    p.add_argument("options", nargs=argparse.REMAINDER, help="the benchmark's own options (--help lists them)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    module = importlib.import_module(f"freshrec.bench.{args.benchmark}")
    parser = argparse.ArgumentParser(prog=f"freshrec bench {args.benchmark}", description=module.__doc__)
    module.add_arguments(parser)
    return int(module.run(parser.parse_args(args.options)) or 0)
