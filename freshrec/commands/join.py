"""`freshrec join`: the stream joiner (impressions + clicks -> labeled samples)."""

from __future__ import annotations

import argparse
import logging

from freshrec.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("join", help="join impressions and clicks into labeled samples (faust app)")
    p.add_argument("--stats-file", help="write the joiner's counters there as JSON (default: joiner.stats_file)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stream.joiner import Joiner

    if not args.verbose:  # faust narrates every service start and stop at INFO
        for noisy in ("faust", "mode"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
    settings = load_settings(args.config)
    cfg = settings.joiner
    if args.stats_file:
        cfg = cfg.model_copy(update={"stats_file": args.stats_file})
    schema = settings.feature_schema()
    return Joiner(settings.kafka, cfg, label=schema.label, event_time=schema.event_time).run()
