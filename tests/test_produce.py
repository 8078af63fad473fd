"""The producer: block pacing (unit) and delivery to a real Kafka-compatible broker."""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest
from kafka import KafkaConsumer, TopicPartition
from kafka.consumer.fetcher import ConsumerRecord

from freshrec.cli import main
from stream.config import KafkaConfig
from stream.producer import Pacer, pacing_block, produce
from stream.sample import SampleCodec
from stream.schema import load_schema
from stream.synthetic import SyntheticStream


class FakeTime:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


def test_pacer_sleeps_once_per_block_to_hold_the_rate() -> None:
    t = FakeTime()
    pacer = Pacer(rate=1000.0, block=10, clock=t.clock, sleep=t.sleep)
    for _ in range(100):
        pacer.acquire()  # sending is instantaneous here: all the time is the pacer's
    assert t.now == pytest.approx(0.99)  # the first block goes at once
    assert len(t.sleeps) == 99


def test_pacer_does_not_burst_after_a_stall() -> None:
    t = FakeTime()
    pacer = Pacer(rate=100.0, block=5, clock=t.clock, sleep=t.sleep)
    pacer.acquire()
    t.now += 60.0  # e.g. the broker was unreachable for a minute
    pacer.acquire()
    assert t.sleeps == []
    pacer.acquire()
    assert t.sleeps == [pytest.approx(0.05)]


def test_pacing_block_is_about_ten_milliseconds_of_events() -> None:
    assert pacing_block(2000.0, 500) == 20
    assert pacing_block(1e6, 500) == 500
    assert pacing_block(5.0, 500) == 1


def consume_all(cfg: KafkaConfig, topic: str, expected: int, timeout_s: float = 30.0) -> list[ConsumerRecord]:
    """assign() + seek_to_beginning, not end_offsets(): Tansu reports wrong end offsets."""
    consumer = KafkaConsumer(**cfg.client_kwargs(), enable_auto_commit=False)
    try:
        parts = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or [])]
        assert parts, f"topic {topic} has no partitions"
        consumer.assign(parts)
        consumer.seek_to_beginning(*parts)
        values: list[ConsumerRecord] = []
        deadline = time.monotonic() + timeout_s
        while len(values) < expected and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                values += records
        # One more poll: nothing beyond what was produced.
        for records in consumer.poll(timeout_ms=500).values():
            values += records
        return values
    finally:
        consumer.close()


def test_synthetic_samples_and_raw_lines_all_arrive(kafka_config: KafkaConfig) -> None:
    samples = SyntheticStream(seed=5).take(3000)
    raw = b"1\tnot\ta\tcriteo\trow"
    source = [*samples[:1000], raw, *samples[1000:]]
    before_ms = time.time() * 1000
    stats = produce(kafka_config, source)
    after_ms = time.time() * 1000
    assert (stats.sent, stats.errors) == (3001, 0)
    records = consume_all(kafka_config, kafka_config.samples_topic, 3001)
    got = [r.value for r in records]
    assert sorted(got) == sorted([orjson.dumps(s) for s in samples] + [raw])
    # Freshness is measured from the message timestamp: it must be the produce time.
    assert all(before_ms - 1 <= r.timestamp <= after_ms + 1 for r in records)
    assert len({r.partition for r in records}) == kafka_config.partitions
    codec = SampleCodec(load_schema("criteo"))
    assert sum(1 for v in got if v != raw and codec.decode(v)) == 3000


def test_paced_run_stops_at_the_count_and_at_stop(kafka_config: KafkaConfig) -> None:
    stream = SyntheticStream(seed=6)
    stats = produce(kafka_config, stream, rate=5000.0, max_events=700)
    assert (stats.sent, stats.errors) == (700, 0)
    stop = threading.Event()
    threading.Timer(0.5, stop.set).start()
    stats = produce(kafka_config, stream, rate=200.0, stop=stop)
    assert stats.errors == 0 and 0 < stats.sent < 1000
    assert len(consume_all(kafka_config, kafka_config.samples_topic, 700 + stats.sent)) == 700 + stats.sent


@pytest.fixture
def restore_signals() -> Iterator[None]:
    """The command installs SIGINT/SIGTERM handlers: give pytest its own back."""
    saved = {s: signal.getsignal(s) for s in (signal.SIGINT, signal.SIGTERM)}
    yield
    for s, handler in saved.items():
        signal.signal(s, handler)


def test_the_produce_command(kafka_config: KafkaConfig, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                             capsys: pytest.CaptureFixture[str], restore_signals: None) -> None:
    monkeypatch.setenv("FRESHREC_KAFKA__BOOTSTRAP_SERVERS", kafka_config.bootstrap_servers)
    monkeypatch.delenv("FRESHREC_CONFIG", raising=False)
    assert main(["produce", "--count", "400", "--rate", "0", "--topic", kafka_config.samples_topic]) == 0
    assert "produced 400 events" in capsys.readouterr().out

    replayed = tmp_path / "two.jsonl"
    replayed.write_bytes(b'{"label": 1, "ts": 3.0, "C1": "x"}\nnot json\n')
    topic = kafka_config.samples_topic + "-replay"  # created by the command
    assert main(["produce", "--source", str(replayed), "--topic", topic]) == 0
    assert "produced 2 events" in capsys.readouterr().out
    assert sorted(r.value for r in consume_all(kafka_config, topic, 2)) == [b"not json", b'{"label":1,"ts":3.0,"C1":"x"}']
