"""Fixtures for integration tests, which run against real processes over real sockets.

The session's broker is a dedicated Tansu on a free port (never the developer's 19092), so
tests cannot disturb a running `freshrec stack`. Redis is the one on 6379 when it answers,
shared safely because every test gets its own key prefix; otherwise the session starts its
own redis-server. Tests that use these fixtures are marked `integration` automatically, so
`pytest -m "not integration"` runs the rest alone.
"""

from __future__ import annotations

import socket
import uuid
from collections.abc import Callable, Iterator

import pytest
import redis

from ops.config import StackConfig
from ops.stack import StackStatus, redis_answers, running_stack
from publisher.config import RedisConfig
from stream.config import KafkaConfig
from stream.topics import ensure_topics, samples_topics

INTEGRATION_FIXTURES = {"stack", "redis_config", "kafka_config"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if INTEGRATION_FIXTURES & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.integration)


def _free_port() -> int:
    """A port nothing listens on right now (the kernel's pick, so it is outside the ports
    a developer configures by hand)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def free_port() -> Callable[[], int]:
    return _free_port


@pytest.fixture(scope="session")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[StackStatus]:
    """The session's broker and Redis; stops on teardown only what it started."""
    redis_port = 6379 if redis_answers("127.0.0.1", 6379) else _free_port()
    cfg = StackConfig(kafka_port=_free_port(), redis_port=redis_port,
                      run_dir=tmp_path_factory.mktemp("stack"))
    with running_stack(cfg) as status:
        yield status


@pytest.fixture
def redis_config(stack: StackStatus) -> Iterator[RedisConfig]:
    """A key prefix of this test's own; its keys are deleted afterwards, nothing else is."""
    cfg = RedisConfig(url=stack.redis_url, prefix=f"freshrec-test-{uuid.uuid4().hex}", model="m")
    yield cfg
    client = redis.Redis.from_url(cfg.url)
    try:
        batch: list[bytes] = []
        for key in client.scan_iter(match=f"{cfg.prefix}:*", count=1000):
            batch.append(key)
            if len(batch) >= 1000:
                client.delete(*batch)
                batch.clear()
        if batch:
            client.delete(*batch)
    finally:
        client.close()


@pytest.fixture
def kafka_config(stack: StackStatus) -> KafkaConfig:
    """Topics of this test's own, created with 2 partitions, on the session's broker."""
    tag = uuid.uuid4().hex[:12]
    cfg = KafkaConfig(bootstrap_servers=stack.kafka_bootstrap, samples_topic=f"samples-{tag}",
                      dead_letter_topic=f"dead-letter-{tag}", impressions_topic=f"impressions-{tag}",
                      clicks_topic=f"clicks-{tag}", partitions=2)
    ensure_topics(cfg, samples_topics(cfg))
    return cfg
