"""Trainer throughput from Kafka against the bare in-memory training step, per model.

For each model (DLRM, DeepFM, Wide & Deep, DCN-v2), on the same N synthetic Criteo-shaped
samples, in one run, with the samples on Kafka in each format (`--formats`: JSON, the
default contract, and the binary format of `stream.binary`):

- in memory: the training step alone (`OnlineLearner.learn`, progressive metrics included)
  on micro-batches decoded before the clock starts;
- from Kafka: the whole path (consume, decode, validate, batch, step, track offsets and
  watermark, dead letters, Prometheus metrics) reading the samples from a fresh topic on a
  Tansu broker this benchmark starts on a free port.

Both start timing after `--warmup` micro-batches, each pass with a fresh model, and time
full micro-batches only (from Kafka, the topic's tail would wait `--max-wait-ms` for
messages that never come). Passes alternate: in memory, then from Kafka in each format,
then in memory again, `--rounds` times.
A round's ratio is its Kafka rate over the mean of the in-memory passes on either side of it,
and each figure reported is the median over rounds: on a shared, noisy machine a burst of
load then spoils one round, not one side. The last line is a JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import tempfile
import time
from pathlib import Path

import numpy as np

MODELS = ["dlrm", "deepfm", "wide_deep", "dcn_v2"]
FORMATS = ["json", "binary"]
log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small run (seconds), for smoke tests")
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated, from " + ",".join(MODELS))
    parser.add_argument("--samples", type=int, default=100_000, help="samples produced and learned per pass")
    parser.add_argument("--batch", type=int, default=512, help="micro-batch size")
    parser.add_argument("--max-wait-ms", type=int, default=100, help="micro-batch time bound")
    parser.add_argument("--warmup", type=int, default=5, help="untimed micro-batches first")
    parser.add_argument("--rounds", type=int, default=5, help="alternating in-memory / Kafka rounds per model")
    parser.add_argument("--partitions", type=int, default=2)
    parser.add_argument("--formats", default=",".join(FORMATS),
                        help="sample formats on Kafka, comma-separated, from " + ",".join(FORMATS))
    parser.add_argument("--ingest", choices=["process", "inline"], default="process",
                        help="decode in a separate process (default) or on the training thread")
    parser.add_argument("--client", choices=["auto", "confluent", "kafka-python"], default="auto",
                        help="Kafka client that reads (auto: confluent-kafka when installed)")
    parser.add_argument("--threads", type=int, default=1,
                        help="torch threads; >1 on a shared 2-core machine makes OpenMP spin and figures erratic")
    parser.add_argument("--bootstrap", default=None, help="use this broker instead of starting Tansu")
    parser.add_argument("--seed", type=int, default=7)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _produce(kafka, messages: list[bytes]) -> float:
    """All messages to the samples topic; returns messages/s."""
    started = time.perf_counter()
    try:
        from confluent_kafka import Producer
    except ImportError:
        from stream.producer import produce

        produce(kafka, messages)
    else:
        producer = Producer({"bootstrap.servers": kafka.bootstrap_servers, "linger.ms": 20,
                             "batch.size": 1 << 20, "acks": "all"})
        for i, value in enumerate(messages):
            while True:
                try:
                    producer.produce(kafka.samples_topic, value, partition=i % kafka.partitions)
                    break
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0)
        if producer.flush(60) != 0:
            raise RuntimeError("messages were not all acknowledged")
    return len(messages) / (time.perf_counter() - started)


def _in_memory(schema, config, batches, warmup: int) -> float:
    from trainer.learner import OnlineLearner

    learner = OnlineLearner(schema, config)
    for b in batches[:warmup]:
        learner.learn(b)
    timed = [b for b in batches[warmup:] if len(b) == config.batch_size]  # as from Kafka: full batches
    started = time.perf_counter()
    for b in timed:
        learner.learn(b)
    return sum(len(b) for b in timed) / (time.perf_counter() - started)


def _from_kafka(schema, config, kafka, total: int, args) -> dict:
    from stream.sample import SampleCodec
    from trainer.learner import OnlineLearner
    from trainer.loop import Position
    from trainer.metrics import MetricsHook
    from trainer.source import KafkaSampleSource

    learner = OnlineLearner(schema, config)
    opened = time.perf_counter()
    source = KafkaSampleSource(kafka, SampleCodec(schema), config.batch_size, config.max_batch_wait_ms,
                               ingest=args.ingest, client=args.client)
    startup_s = time.perf_counter() - opened
    hook = MetricsHook(source, learner, log_every_s=3600)
    position = Position(topic=kafka.samples_topic)
    steps = learned = timed_samples = 0
    started = stopped = None
    try:
        while (read := sum(source.positions.values())) < total:
            if total - read < args.batch and started is not None and stopped is None:
                # The topic's tail cannot fill a micro-batch: it waits max_wait_ms for messages
                # that never come (~5% of a pass), which a live stream does not do.
                stopped = time.perf_counter()
            micro = source.next_batch()
            if micro is None:
                continue
            batch = micro.batch
            if batch is not None:
                learner.learn(batch)
                position.watermark = max(position.watermark, micro.watermark)
                position.newest_produced_ms = max(position.newest_produced_ms, micro.newest_produced_ms)
                learned += len(batch)
                if started is not None and stopped is None:
                    timed_samples += len(batch)
            position.offsets = micro.next_offsets
            source.flush()
            hook.after_step(learner, position)
            steps += 1
            if steps == args.warmup:
                started = time.perf_counter()
        elapsed = (stopped or time.perf_counter()) - started
        client = source.client_name
        dead = sum(source.dead_letters.values())
    finally:
        source.close()
    return {"rate": timed_samples / elapsed, "learned": learned, "dead_letters": dead, "startup_s": startup_s,
            "client": client, "auc": learner.metrics.auc()}


def _row(model: str, memory: list[float], runs: dict[str, list[dict]]) -> dict:
    """Medians over rounds; round r's in-memory rate is the mean of the passes before and after it."""
    around = [(a + b) / 2 for a, b in zip(memory[:-1], memory[1:])]
    row = {"model": model, "in_memory_per_s": round(float(np.median(memory))),
           "in_memory_by_pass": [round(m) for m in memory]}
    for fmt, passes in runs.items():
        ratios = [p["rate"] / m for p, m in zip(passes, around)]
        row[fmt] = {"kafka_per_s": round(float(np.median([p["rate"] for p in passes]))),
                    "ratio": round(float(np.median(ratios)), 3), "ratio_by_round": [round(r, 3) for r in ratios],
                    "learned": [p["learned"] for p in passes], "dead_letters": sum(p["dead_letters"] for p in passes),
                    "client": passes[0]["client"], "source_startup_s": round(max(p["startup_s"] for p in passes), 2)}
    return row


def run(args: argparse.Namespace) -> int:
    import torch

    from ops.config import StackConfig
    from ops.stack import redis_answers, running_stack
    from stream.config import KafkaConfig
    from stream.sample import SampleCodec
    from stream.schema import load_schema
    from stream.synthetic import SyntheticStream
    from stream.topics import ensure_topics
    from trainer.batch import build_batch_from_columns
    from trainer.config import TrainerConfig

    if args.quick:
        args.samples, args.warmup, args.rounds = min(args.samples, 6000), min(args.warmup, 2), 1
    torch.set_num_threads(args.threads)
    models = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(models) - set(MODELS))
    if unknown:
        raise SystemExit(f"unknown models: {unknown}")
    formats = [f.strip() for f in args.formats.split(",") if f.strip()]
    if not formats or set(formats) - set(FORMATS):
        raise SystemExit(f"formats must be from {FORMATS}")
    schema = load_schema("criteo")
    samples = SyntheticStream(schema, seed=args.seed).take(args.samples)
    codec = SampleCodec(schema)
    encoded = {"json": [codec.encode(s) for s in samples]} if "json" in formats else {}
    if "binary" in formats:
        encoded["binary"] = [codec.encode_binary(s) for s in samples]
    first = encoded[formats[0]]
    batches = [build_batch_from_columns(schema, codec.decode_batch(first[i:i + args.batch]))
               for i in range(0, len(first), args.batch)]

    def bench(kafka: KafkaConfig) -> list[dict]:
        topics = {}
        for fmt in formats:
            topic = f"bench-trainer-{fmt}-{int(time.time() * 1000)}"
            topics[fmt] = kafka.model_copy(update={"samples_topic": topic, "dead_letter_topic": topic + "-dead",
                                                   "partitions": args.partitions})
            ensure_topics(topics[fmt], [topic, topic + "-dead"])
            messages = encoded[fmt]
            rate = _produce(topics[fmt], messages)
            print(f"{len(messages)} samples as {fmt} ({np.mean([len(m) for m in messages]):.0f} bytes each) "
                  f"produced to {topic} at {rate:,.0f}/s", flush=True)
        print(f"batch {args.batch}, torch threads {args.threads}, ingest {args.ingest}", flush=True)
        rows = []
        for model in models:
            config = TrainerConfig(model=model, batch_size=args.batch, max_batch_wait_ms=args.max_wait_ms,
                                   metrics_port=0, seed=args.seed)
            memory = [_in_memory(schema, config, batches, args.warmup)]
            runs: dict[str, list[dict]] = {fmt: [] for fmt in formats}
            for _ in range(max(1, args.rounds)):
                for fmt in formats:
                    runs[fmt].append(_from_kafka(schema, config, topics[fmt], len(samples), args))
                memory.append(_in_memory(schema, config, batches, args.warmup))
            rows.append(_row(model, memory, runs))
            print(f"  {model:<10} in memory {rows[-1]['in_memory_per_s']:>9,}/s   from Kafka " + "   ".join(
                f"{fmt} {rows[-1][fmt]['kafka_per_s']:>8,}/s (ratio {rows[-1][fmt]['ratio']:.2f}, rounds "
                f"{', '.join(f'{x:.2f}' for x in rows[-1][fmt]['ratio_by_round'])})" for fmt in formats), flush=True)
        return rows

    if args.bootstrap:
        rows = bench(KafkaConfig(bootstrap_servers=args.bootstrap))
    else:
        redis_port = 6379 if redis_answers("127.0.0.1", 6379) else _free_port()
        with tempfile.TemporaryDirectory() as run_dir:
            cfg = StackConfig(kafka_port=_free_port(), redis_port=redis_port, run_dir=Path(run_dir))
            with running_stack(cfg) as status:
                rows = bench(KafkaConfig(bootstrap_servers=status.kafka_bootstrap))

    print()
    print("| model | in-memory step (samples/s) | " + " | ".join(
        f"from Kafka, {fmt} (samples/s) | ratio {fmt}" for fmt in formats) + " |")
    print("|---|---:|" + "---:|---:|" * len(formats))
    for r in rows:
        print(f"| {r['model']} | {r['in_memory_per_s']:,} | " + " | ".join(
            f"{r[fmt]['kafka_per_s']:,} | {r[fmt]['ratio']:.2f}" for fmt in formats) + " |")
    result = {"benchmark": "trainer", "samples": len(samples), "batch": args.batch, "ingest": args.ingest,
              "threads": args.threads, "rounds": max(1, args.rounds), "models": rows,
              "min_ratio": {fmt: min(r[fmt]["ratio"] for r in rows) for fmt in formats} if rows else None}
    print(json.dumps(result))
    ok = all(n == len(samples) for r in rows for fmt in formats for n in r[fmt]["learned"])
    return 0 if ok else 1
