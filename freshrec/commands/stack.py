"""`freshrec stack up|down|status`: the local Kafka-compatible broker (Tansu) and Redis."""

from __future__ import annotations

import argparse
import sys
from urllib.parse import urlsplit

from kafka.errors import KafkaError

from freshrec.settings import Settings, load_settings
from ops.stack import StackError, StackStatus, stack_down, stack_status, stack_up
from stream.topics import ensure_topics, samples_topics


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "stack", help="start, stop or inspect the local broker and Redis",
        description="up: start what is not running and create the freshrec topics; "
                    "down: stop what `up` started; status: exit code 0 only if both answer.")
    parser.add_argument("action", choices=["up", "down", "status"])
    parser.add_argument("--timeout", type=float, default=30.0, help="seconds to wait for start-up")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    settings = load_settings(args.config)
    try:
        if args.action == "up":
            status = stack_up(settings.stack, args.timeout)
            _print_status(status)
            _create_topics(settings, status)
            _warn_on_mismatch(settings, status)
        elif args.action == "down":
            _print_status(stack_down(settings.stack))
        else:
            status = stack_status(settings.stack)
            _print_status(status)
            return 0 if status.kafka_running and status.redis_running else 1
    except (StackError, KafkaError) as e:
        print(f"freshrec stack {args.action}: {e}", file=sys.stderr)
        return 1
    return 0


def _create_topics(settings: Settings, status: StackStatus) -> None:
    """Topics go to the stack's own broker, which is plain-text on loopback whatever
    `kafka.*` says about security."""
    local = settings.kafka.model_copy(update={"bootstrap_servers": status.kafka_bootstrap,
                                              "security_protocol": "PLAINTEXT"})
    names = samples_topics(local)
    created = ensure_topics(local, names)
    print(f"topics {', '.join(names)} ({len(created)} created with {local.partitions} partitions)")


def _print_status(status: StackStatus) -> None:
    print(_line("kafka", status.kafka_bootstrap, status.kafka_running, status.started_kafka, status.kafka_pid))
    print(_line("redis", status.redis_url, status.redis_running, status.started_redis, status.redis_pid))


def _line(name: str, address: str, running: bool, started: bool, pid: int | None) -> str:
    if started:
        state = f"running, started by this stack (pid {pid})"
    elif running:
        state = "running, was there before this stack (down leaves it alone)"
    else:
        state = "not running"
    return f"{name:<6} {address}  {state}"


def _warn_on_mismatch(settings: Settings, status: StackStatus) -> None:
    """The stack's ports and the clients' addresses are separate settings; say so when they
    disagree, or the pipeline would quietly talk to something else."""
    if settings.kafka.bootstrap_servers != status.kafka_bootstrap:
        print(f"note: kafka.bootstrap_servers is {settings.kafka.bootstrap_servers}; "
              f"set FRESHREC_KAFKA__BOOTSTRAP_SERVERS={status.kafka_bootstrap} to use this stack")
    configured, local = urlsplit(settings.redis.url), urlsplit(status.redis_url)
    if (configured.hostname, configured.port or 6379) != (local.hostname, local.port):
        print(f"note: redis.url is {settings.redis.url}; set FRESHREC_REDIS__URL={status.redis_url} "
              "to use this stack")
