"""The development stack against real processes: Tansu, redis-server, sockets."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis
from kafka import KafkaAdminClient, KafkaConsumer, KafkaProducer, TopicPartition

from freshrec import cli
from ops.config import StackConfig
from ops.stack import (STATE_FILE, StackError, StackStatus, kafka_answers, redis_answers, running_stack,
                       stack_down, stack_status, stack_up)
from stream.config import KafkaConfig
from stream.topics import ensure_topics, samples_topics

pytestmark = pytest.mark.integration


@pytest.fixture
def cfg(tmp_path: Path, free_port: Callable[[], int]) -> Iterator[StackConfig]:
    """A stack of this test's own: free ports for both services, so it starts both."""
    cfg = StackConfig(kafka_port=free_port(), redis_port=free_port(), run_dir=tmp_path / "stack")
    yield cfg
    stack_down(cfg)  # a test that failed halfway must not leave processes behind


def _pids_listening_with(arg: str) -> list[int]:
    """Processes whose command line contains `arg`: counts brokers independently of the
    state file under test."""
    pids = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            if arg in cmdline.read_bytes().replace(b"\0", b" ").decode(errors="replace"):
                pids.append(int(cmdline.parent.name))
        except OSError:
            continue
    return pids


def _roundtrip(bootstrap: str) -> bytes:
    topic = f"t-{uuid.uuid4().hex[:8]}"
    ensure_topics(KafkaConfig(bootstrap_servers=bootstrap), [topic], partitions=1)
    producer = KafkaProducer(bootstrap_servers=[bootstrap])
    producer.send(topic, b"hello").get(timeout=10)
    producer.close()
    consumer = KafkaConsumer(bootstrap_servers=[bootstrap], consumer_timeout_ms=10_000,
                             auto_offset_reset="earliest")
    consumer.assign([TopicPartition(topic, 0)])
    try:
        return next(iter(consumer)).value
    finally:
        consumer.close()


def _write_state(cfg: StackConfig, pid: int) -> None:
    """A state file claiming that this stack started a broker with `pid`."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    state = {"kafka": {"port": cfg.kafka_port, "started": True, "pid": pid, "name": "tansu"}}
    (cfg.run_dir / STATE_FILE).write_text(json.dumps(state))


def test_up_starts_a_broker_and_redis_that_work(cfg: StackConfig) -> None:
    status = stack_up(cfg)

    assert status.kafka_bootstrap == f"127.0.0.1:{cfg.kafka_port}"
    assert status.redis_url == f"redis://127.0.0.1:{cfg.redis_port}/0"
    assert status.kafka_running and status.redis_running
    assert status.started_kafka and status.started_redis
    assert _roundtrip(status.kafka_bootstrap) == b"hello"
    client = redis.Redis.from_url(status.redis_url)
    client.set("k", "v")
    assert client.get("k") == b"v"
    client.close()
    assert (cfg.run_dir / "kafka.log").exists() and (cfg.run_dir / "redis.log").exists()


def test_up_twice_starts_nothing_new(cfg: StackConfig) -> None:
    first = stack_up(cfg)
    second = stack_up(cfg)

    assert (second.kafka_pid, second.redis_pid) == (first.kafka_pid, first.redis_pid)
    assert second.started_kafka and second.started_redis
    assert _pids_listening_with(f"tcp://127.0.0.1:{cfg.kafka_port}") == [first.kafka_pid]
    assert _pids_listening_with(f"127.0.0.1:{cfg.redis_port}") == [first.redis_pid]


def test_started_processes_outlive_the_command_and_a_later_down_stops_them(cfg: StackConfig) -> None:
    # `up` in a process of its own, as `freshrec stack up` would run; `down` from this one,
    # which is not the parent of what it stops.
    up = f"from ops.stack import stack_up; from ops.config import StackConfig; " \
         f"stack_up(StackConfig.model_validate_json({cfg.model_dump_json()!r}))"
    subprocess.run([sys.executable, "-c", up], check=True, timeout=60,
                   env={**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])})

    status = stack_status(cfg)
    assert status.started_kafka and status.kafka_running
    assert status.started_redis and status.redis_running

    down = stack_down(cfg)
    assert not (down.kafka_running or down.redis_running)


def test_status_follows_up_and_down(cfg: StackConfig) -> None:
    before = stack_status(cfg)
    assert not (before.kafka_running or before.redis_running or before.started_kafka
                or before.started_redis)

    up = stack_up(cfg)
    assert stack_status(cfg) == up

    down = stack_down(cfg)
    assert down == StackStatus(up.kafka_bootstrap, up.redis_url, False, False, False, False)
    assert not kafka_answers(up.kafka_bootstrap)
    assert not (cfg.run_dir / STATE_FILE).exists()


def test_down_leaves_services_it_did_not_start(cfg: StackConfig, tmp_path: Path,
                                               free_port: Callable[[], int]) -> None:
    # "Somebody else's" Redis and broker: another stack with its own run_dir.
    other = StackConfig(kafka_port=free_port(), redis_port=free_port(), run_dir=tmp_path / "other")
    try:
        stack_up(other)
        mine = cfg.model_copy(update={"redis_port": other.redis_port})
        status = stack_up(mine)
        assert status.started_kafka and not status.started_redis and status.redis_running

        after = stack_down(mine)

        assert not after.kafka_running
        assert after.redis_running and redis_answers("127.0.0.1", other.redis_port)
        shared = cfg.model_copy(update={"kafka_port": other.kafka_port})
        assert not stack_up(shared).started_kafka
        stack_down(shared)
        assert kafka_answers(f"127.0.0.1:{other.kafka_port}")
    finally:
        stack_down(other)
    assert not redis_answers("127.0.0.1", other.redis_port)


def test_stale_state_of_a_dead_process_is_replaced(cfg: StackConfig) -> None:
    gone = subprocess.Popen(["true"])
    gone.wait()
    _write_state(cfg, gone.pid)

    assert not stack_status(cfg).started_kafka
    status = stack_up(cfg)

    assert status.started_kafka and status.kafka_pid != gone.pid
    assert _roundtrip(status.kafka_bootstrap) == b"hello"


def test_recorded_pid_reused_by_another_process_is_never_signalled(cfg: StackConfig) -> None:
    stranger = subprocess.Popen(["sleep", "60"], start_new_session=True)
    try:
        _write_state(cfg, stranger.pid)
        assert not stack_status(cfg).started_kafka
        stack_down(cfg)
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_running_stack_stops_only_what_the_block_started(cfg: StackConfig) -> None:
    with running_stack(cfg) as status:
        assert status.started_kafka and status.kafka_running
    assert not stack_status(cfg).kafka_running

    outer = stack_up(cfg)
    with running_stack(cfg) as inner:
        assert inner.kafka_pid == outer.kafka_pid
    assert stack_status(cfg) == outer


def test_port_held_by_something_else_is_a_clear_error(cfg: StackConfig) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", cfg.kafka_port))
        squatter.listen()
        with pytest.raises(StackError, match=f"127.0.0.1:{cfg.kafka_port} is taken"):
            stack_up(cfg)
    assert not (cfg.run_dir / STATE_FILE).exists()


def test_missing_broker_binary_is_a_clear_error(cfg: StackConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CALF_TANSU_BIN", "/nonexistent/tansu")
    with pytest.raises(StackError, match="Tansu broker binary is missing"):
        stack_up(cfg)


def test_missing_redis_server_is_a_clear_error(cfg: StackConfig, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PATH", "/nonexistent")
    no_install = cfg.model_copy(update={"install_redis": False})
    with pytest.raises(StackError, match="redis-server is not installed"):
        stack_up(no_install)
    # The broker came up before Redis failed; it is recorded, so down stops it.
    assert stack_status(no_install).started_kafka
    assert not stack_down(no_install).kafka_running


def test_ensure_topics_is_idempotent(kafka_config: KafkaConfig) -> None:
    names = samples_topics(kafka_config)
    assert ensure_topics(kafka_config, names) == []  # the fixture created them

    extra = f"extra-{uuid.uuid4().hex[:8]}"
    assert ensure_topics(kafka_config, [extra, extra], partitions=3) == [extra]
    admin = KafkaAdminClient(**kafka_config.client_kwargs())
    described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics(names + [extra])}
    admin.close()
    assert described == {**{n: 2 for n in names}, extra: 3}


def test_cli_up_status_down(cfg: StackConfig, monkeypatch: pytest.MonkeyPatch,
                            capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("FRESHREC_CONFIG", raising=False)
    bootstrap = f"127.0.0.1:{cfg.kafka_port}"
    for key, value in {"STACK__KAFKA_PORT": cfg.kafka_port, "STACK__REDIS_PORT": cfg.redis_port,
                       "STACK__RUN_DIR": cfg.run_dir, "KAFKA__BOOTSTRAP_SERVERS": bootstrap,
                       "KAFKA__PARTITIONS": 3, "KAFKA__SAMPLES_TOPIC": "cli-samples",
                       "REDIS__URL": f"redis://127.0.0.1:{cfg.redis_port}/0"}.items():
        monkeypatch.setenv(f"FRESHREC_{key}", str(value))

    assert cli.main(["stack", "up"]) == 0
    out = capsys.readouterr().out
    assert bootstrap in out and "started by this stack" in out and "note:" not in out
    admin = KafkaAdminClient(bootstrap_servers=[bootstrap])
    described = {t["name"]: len(t["partitions"]) for t in admin.describe_topics()}
    admin.close()
    assert described == {"cli-samples": 3, "freshrec.dead-letter": 3, "freshrec.impressions": 3,
                         "freshrec.clicks": 3}

    assert cli.main(["stack", "status"]) == 0
    assert capsys.readouterr().out.count("running, started by this stack") == 2

    assert cli.main(["stack", "down"]) == 0
    assert cli.main(["stack", "status"]) == 1
    assert not kafka_answers(bootstrap) and not redis_answers("127.0.0.1", cfg.redis_port)
