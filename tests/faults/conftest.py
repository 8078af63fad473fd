"""Fixtures of the fault-injection suite: real processes (trainer, serving node, producer,
broker, Redis) that the tests kill, pause and restart.

Anything destructive happens to PRIVATE instances started here: a `redis-server` on a free
port (restartable on the same port, empty or from its own dump), and, for the broker
faults, a private Tansu. The session's shared Redis and broker are only used the way every
other test uses them (a key prefix, topics of one's own).

Every test here measures how long recovery took and records it with `report()`; the
figures are printed at the end of the session (the README's Faults table quotes them).
Nothing asserts on them beyond generous timeouts for waiting.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from ops.config import StackConfig
from ops.stack import StackStatus, running_stack
from tests.faults.harness import REPORTS, Processes, RedisServer, free_port


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[RedisServer]:
    server = RedisServer(tmp_path / "redis")
    server.start()
    yield server
    server.stop()


@pytest.fixture
def private_stack(tmp_path: Path) -> Iterator[StackStatus]:
    """A Tansu broker and a Redis of this test's own (both on free ports): it may SIGSTOP them."""
    cfg = StackConfig(kafka_port=free_port(), redis_port=free_port(), run_dir=tmp_path / "stack")
    with running_stack(cfg) as status:
        assert status.started_kafka and status.started_redis
        yield status


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[Processes]:
    procs = Processes(tmp_path)
    yield procs
    procs.stop_all()


def pytest_terminal_summary(terminalreporter) -> None:
    if REPORTS:
        terminalreporter.section("fault injection: measured recovery")
        for fault, text in REPORTS:
            terminalreporter.write_line(f"{fault}: {text}")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if {"private_redis", "private_stack"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)
