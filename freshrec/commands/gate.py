"""`freshrec gate open|hold|auto`: override the publisher's quality gate, or hand it back."""

from __future__ import annotations

import argparse

from freshrec.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("gate", help="override the publisher's quality gate (open|hold), or restore it (auto)")
    p.add_argument("action", choices=["open", "hold", "auto"])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from publisher.redis_store import RedisVersionStore

    settings = load_settings(args.config)
    store = RedisVersionStore(settings.redis)
    store.set_gate_override(None if args.action == "auto" else args.action)
    print(f"quality gate of {settings.redis.model!r}: {args.action}")
    return 0
