"""Stream joiner throughput: events/s through `freshrec join` (faust app, state table with a
changelog, at-least-once commits) against a plain consume-and-produce loop (aiokafka, the
client faust uses: decode each event, write one sample per impression, no join, no state),
on the same raw impressions and clicks, in the same run, on the same broker.

The events are pre-produced (synthetic stream, hidden click model, clicks delayed by a
random amount, event time simulated at `--event-rate` events per second so windows close).
Each pipeline then drains the same backlog; its rate is events over the time from its first
to its last event processed, so start-up and group joins are not counted. The joiner's
output is checked against the join logic run in-process on the same events (also reported:
the join logic alone, without Kafka).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from contextlib import ExitStack
from itertools import islice
from pathlib import Path

import orjson
import yaml

RESULT_TIMEOUT_S = 600


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run (seconds), for smoke tests")
    parser.add_argument("--impressions", type=int, default=40_000, help="impressions (clicks come on top)")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--window", type=float, default=10.0, help="attribution window, seconds of event time")
    parser.add_argument("--click-delay", type=float, default=3.0, help="mean click delay, seconds of event time")
    parser.add_argument("--event-rate", type=float, default=200.0, help="impressions per second of event time")
    parser.add_argument("--seed", type=int, default=3)
    parser.add_argument("--no-stack", action="store_true",
                        help="use the configured Kafka (--config / FRESHREC_*) instead of a private Tansu")
    parser.add_argument("--bootstrap", help="use the Kafka at HOST:PORT instead of a private Tansu")
    parser.add_argument("--config", help="settings YAML (for --no-stack)")


def run(args: argparse.Namespace) -> int:
    if args.quick:
        args.impressions = min(args.impressions, 4000)
    from freshrec.settings import load_settings

    settings = load_settings(args.config)
    with ExitStack() as stack:
        tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="freshrec-bench-joiner-")))
        if args.bootstrap:
            settings.kafka.bootstrap_servers = args.bootstrap
        elif not args.no_stack:
            settings.kafka.bootstrap_servers = _private_broker(stack, tmp)
        tag = uuid.uuid4().hex[:10]
        kafka = settings.kafka.model_copy(update=dict(
            impressions_topic=f"bench-imp-{tag}", clicks_topic=f"bench-clk-{tag}",
            samples_topic=f"bench-samples-{tag}", dead_letter_topic=f"bench-dlq-{tag}",
            partitions=args.partitions))
        joiner = settings.joiner.model_copy(update=dict(
            app_id=f"bench-joiner-{tag}", window_s=args.window, allowed_lateness_s=1.0, idle_input_s=None,
            session_timeout_s=6.0, stats_interval_s=0.25, stats_file=str(tmp / "stats.json")))
        schema = settings.feature_schema()

        events = _events(args, kafka, schema)
        n = len(events)
        print(f"{n:,} events ({args.impressions:,} impressions, {n - args.impressions:,} clicks), "
              f"{args.partitions} partitions, window {args.window:g}s", flush=True)
        expected, core_rate = _offline_join(events, kafka, joiner, schema)
        _produce(kafka, events)

        base_rate, base_samples = asyncio.run(_plain_loop(kafka, n, f"bench-plain-{tag}"))
        join_rate, join_samples = _joiner(settings, kafka, joiner, tmp, n)

    ok = join_samples == expected
    rows = [("freshrec-joiner (faust, tables, at-least-once)", join_rate, join_samples),
            ("plain consume-and-produce loop (aiokafka)", base_rate, base_samples),
            ("join logic alone, in-process (no Kafka)", core_rate, expected)]
    print()
    print(f"| {'pipeline':<48} | {'events/s':>9} | {'samples':>8} | {'vs plain loop':>13} |")
    print(f"|{'-' * 50}|{'-' * 11}|{'-' * 10}|{'-' * 15}|")
    for name, rate, samples in rows:
        print(f"| {name:<48} | {rate:>9,.0f} | {samples:>8,} | {rate / base_rate:>12.2f}x |")
    print(f"\njoiner samples {'match' if ok else 'DO NOT match'} the in-process join ({expected:,})")
    print(json.dumps({"benchmark": "joiner", "events": n, "partitions": args.partitions,
                      "joiner_events_per_s": round(join_rate), "plain_loop_events_per_s": round(base_rate),
                      "ratio": round(join_rate / base_rate, 3), "join_logic_events_per_s": round(core_rate),
                      "joiner_samples": join_samples, "expected_samples": expected, "samples_match": ok}))
    return 0 if ok else 1


def _private_broker(stack: ExitStack, tmp: Path) -> str:
    import socket

    from ops.config import StackConfig
    from ops.stack import redis_answers, running_stack

    def free_port() -> int:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            return s.getsockname()[1]

    # The stack also wants a Redis: the one on 6379 when it answers (used, never touched).
    cfg = StackConfig(kafka_port=free_port(), redis_port=6379 if redis_answers("127.0.0.1", 6379) else free_port(),
                      run_dir=tmp / "stack")
    return stack.enter_context(running_stack(cfg)).kafka_bootstrap


def _events(args: argparse.Namespace, kafka, schema) -> list:
    from stream.events import impressions_and_clicks, simulated_clock
    from stream.synthetic import SyntheticStream

    clock = simulated_clock(1_700_000_000.0, args.event_rate)
    synthetic = SyntheticStream(schema, seed=args.seed, clock=clock)
    raw = impressions_and_clicks(islice(synthetic.events(), args.impressions), kafka.impressions_topic,
                                 kafka.clicks_topic, label=schema.label, event_time=schema.event_time,
                                 click_delay_s=args.click_delay, request_prefix="b", seed=args.seed)
    return [(m.topic, m.key, orjson.dumps(m.value)) for m in raw]


def _partition(key: bytes, n: int) -> int:
    from kafka.partitioner.default import murmur2

    return (murmur2(key) & 0x7FFFFFFF) % n


def _offline_join(events: list, kafka, joiner, schema) -> tuple[int, float]:
    """The join logic on the same events, each in the partition the producer will pick."""
    from stream.joiner import JoinCore

    class Count:
        samples = 0

        def sample(self, value, key, label, on_ack):
            self.samples += 1
            on_ack()

        def dead_letter(self, value, reason, detail, source, on_ack):
            if on_ack:
                on_ack()

        def persist(self, partition, key, state):
            pass

    sink = Count()
    core = JoinCore(joiner, sink, {}, label=schema.label, event_time=schema.event_time)
    placed = [(topic == kafka.impressions_topic, _partition(key, kafka.partitions), key, value)
              for topic, key, value in events]
    started = time.perf_counter()
    for offset, (is_imp, p, key, value) in enumerate(placed):
        (core.impression if is_imp else core.click)(p, offset, key, value)
    return sink.samples, len(placed) / (time.perf_counter() - started)


def _produce(kafka, events: list) -> None:
    from kafka import KafkaProducer

    from stream.topics import ensure_topics

    ensure_topics(kafka, [kafka.impressions_topic, kafka.clicks_topic, kafka.samples_topic,
                          kafka.dead_letter_topic], kafka.partitions)
    producer = KafkaProducer(**kafka.client_kwargs(), acks="all", linger_ms=5, batch_size=256 * 1024)
    for topic, key, value in events:
        producer.send(topic, value, key=key)
    producer.flush()
    producer.close()


async def _plain_loop(kafka, n: int, out_topic: str) -> tuple[float, int]:
    """Consume every event, decode it, produce one message per impression; nothing else."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    from stream.joiner import _aiokafka_kwargs
    from stream.topics import ensure_topics

    ensure_topics(kafka, [out_topic], kafka.partitions)
    consumer = AIOKafkaConsumer(enable_auto_commit=False, auto_offset_reset="earliest", **_aiokafka_kwargs(kafka))
    producer = AIOKafkaProducer(acks="all", **_aiokafka_kwargs(kafka))
    await consumer.start()
    await producer.start()
    try:
        consumer.assign([TopicPartition(t, p) for t in (kafka.impressions_topic, kafka.clicks_topic)
                         for p in range(kafka.partitions)])
        await consumer.seek_to_beginning()
        impressions = kafka.impressions_topic
        seen = samples = 0
        first = None
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        while seen < n and time.monotonic() < deadline:
            batches = await consumer.getmany(timeout_ms=500)
            if first is None and batches:
                first = time.perf_counter()
            for records in batches.values():
                for m in records:
                    seen += 1
                    obj = orjson.loads(m.value)
                    if m.topic == impressions:
                        await producer.send(out_topic, orjson.dumps({**obj["features"], "label": 0, "ts": obj["ts"]}))
                        samples += 1
        await producer.flush()
        if seen < n:
            raise SystemExit(f"plain loop: only {seen} of {n} events arrived")
        return (seen - 1) / (time.perf_counter() - first), samples
    finally:
        await consumer.stop()
        await producer.stop()


def _joiner(settings, kafka, joiner, tmp: Path, n: int) -> tuple[float, int]:
    config = tmp / "settings.yaml"
    data = settings.model_copy(update=dict(kafka=kafka, joiner=joiner)).model_dump(mode="json", by_alias=True)
    config.write_text(yaml.safe_dump(data))
    log = (tmp / "joiner.log").open("wb")
    child = subprocess.Popen([sys.executable, "-m", "freshrec.cli", "--config", str(config), "join"],
                             stdout=log, stderr=subprocess.STDOUT, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    stats_path = Path(joiner.stats_file)
    try:
        deadline = time.monotonic() + RESULT_TIMEOUT_S
        stats: dict = {}
        while stats.get("events", 0) < n:
            if child.poll() is not None or time.monotonic() > deadline:
                raise SystemExit(f"the joiner stopped or stalled at {stats.get('events', 0)} of {n} events; "
                                 f"log: {(tmp / 'joiner.log').read_text()[-3000:]}")
            time.sleep(0.2)
            if stats_path.exists():
                stats = json.loads(stats_path.read_text())
        rate = (stats["events"] - 1) / (stats["last_event_at"] - stats["first_event_at"])
    finally:
        if child.poll() is None:
            child.send_signal(signal.SIGTERM)
            try:
                child.wait(timeout=60)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()
    return rate, _count(kafka, kafka.samples_topic)


def _count(kafka, topic: str) -> int:
    """Messages in a topic, counted by consuming it to its high watermark (end_offsets() is
    not reliable on Tansu)."""
    from kafka import KafkaConsumer, TopicPartition

    consumer = KafkaConsumer(**kafka.client_kwargs(), enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(consumer.partitions_for_topic(topic) or ())]
        consumer.assign(tps)
        consumer.seek_to_beginning()
        count = 0
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=200).values():
                count += len(records)
            high = [consumer.highwater(tp) for tp in tps]
            if all(h is not None for h in high) and all(consumer.position(tp) >= h for tp, h in zip(tps, high)):
                return count
        raise SystemExit(f"could not read {topic} to its end")
    finally:
        consumer.close()
