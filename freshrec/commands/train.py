"""`freshrec train`: the streaming trainer with its publisher."""

from __future__ import annotations

import argparse
import logging
import signal
import threading

from freshrec.settings import load_settings

log = logging.getLogger("freshrec.train")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("train", help="consume samples, learn online, publish versions to Redis")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from freshrec.pipeline import train

    settings = load_settings(args.config)
    stop = threading.Event()

    def on_signal(signum: int, _frame) -> None:
        log.info("signal %d: publishing a final version, then stopping", signum)
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    loop = train(settings, stop)
    log.info("stopped after %d samples, %d steps", loop.learner.samples_seen, loop.learner.global_step)
    return 0
