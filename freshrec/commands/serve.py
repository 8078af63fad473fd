"""`freshrec serve`: a serving node (uvicorn + FastAPI). Each worker process follows Redis
on its own (its own follower, its own two buffers); run several nodes the same way."""

from __future__ import annotations

import argparse
import os

import uvicorn

from freshrec.settings import load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("serve", help="serve predictions from the newest published version")
    p.add_argument("--host", help="default: serving.host")
    p.add_argument("--port", type=int, help="default: serving.port")
    p.add_argument("--workers", type=int, default=1, help="worker processes; each follows Redis on its own")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if args.config:
        os.environ["FRESHREC_CONFIG"] = args.config  # workers build their app from the environment
    settings = load_settings()
    # uvloop and httptools when installed (they are dependencies); no access log on the hot path.
    uvicorn.run("freshrec.pipeline:serving_app_from_env", factory=True, host=args.host or settings.serving.host,
                port=args.port or settings.serving.port, workers=args.workers, log_level="warning",
                access_log=False, loop="auto", http="auto", timeout_keep_alive=30)
    return 0
