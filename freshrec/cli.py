"""The `freshrec` command line. Each subcommand lives in `freshrec/commands/<name>.py` and
exposes `register(subparsers)`, which adds its parser and sets `func(args) -> int`.
Command modules import heavy parts (torch, Kafka clients) inside `func`, so that every
command starts quickly."""

from __future__ import annotations

import argparse
import importlib
import logging
import sys

COMMANDS = ["run", "stack", "produce", "join", "train", "serve", "gate", "bench"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="freshrec", description=__doc__.split("\n")[0])
    parser.add_argument("--config", help="YAML configuration file (also FRESHREC_CONFIG)")
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"freshrec.commands.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    if not args.verbose:  # client libraries narrate every connection at INFO
        for noisy in ("kafka", "httpx", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
