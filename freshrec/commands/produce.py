"""`freshrec produce`: send synthetic or replayed samples to the samples topic, or (with
`--events raw`) the synthetic stream as raw impressions and clicks for `freshrec join`."""

from __future__ import annotations

import argparse
import signal
import threading
from collections.abc import Iterable

from freshrec.settings import Settings, load_settings


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("produce", help="send synthetic or replayed samples to Kafka")
    p.add_argument("--rate", type=float,
                   help="events per second; 0 = as fast as possible (default: producer.rate)")
    p.add_argument("--count", type=int, help="stop after this many events (default: producer.max_events, "
                                             "else forever / to the end of the file)")
    p.add_argument("--source", default="synthetic", help="'synthetic' or the path of a file to replay")
    p.add_argument("--format", choices=["criteo", "jsonl"], help="file format (default: from the extension)")
    p.add_argument("--sample-format", choices=["json", "binary"],
                   help="how samples are written (default: producer.sample_format); the trainer reads both")
    p.add_argument("--topic", help="target topic (default: kafka.samples_topic)")
    p.add_argument("--seed", type=int, help="synthetic stream seed (default: producer.seed)")
    p.add_argument("--events", choices=["samples", "raw"], default="samples",
                   help="samples: labeled samples to the samples topic; raw: synthetic impressions and "
                        "clicks (from the hidden click model) to their topics, for `freshrec join`")
    p.add_argument("--click-delay", type=float, default=5.0,
                   help="raw events: mean delay of a click after its impression, seconds (exponential)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from stream.producer import produce
    from stream.topics import ensure_topics

    settings = load_settings(args.config)
    if args.events == "raw":
        return _run_raw(args, settings)
    topic = args.topic or settings.kafka.samples_topic
    rate = settings.producer.rate if args.rate is None else args.rate
    count = settings.producer.max_events if args.count is None else args.count
    ensure_topics(settings.kafka, [topic], settings.kafka.partitions)
    stop = _stop_on_signals()
    stats = produce(settings.kafka, _source(args, settings), topic=topic, rate=rate or None,
                    max_events=count, stop=stop, max_block=settings.producer.batch_size)
    print(f"produced {stats.sent} events to {topic} ({stats.errors} failed) in {stats.elapsed_s:.1f}s: "
          f"{stats.rate:,.0f} events/s", flush=True)
    return 1 if stats.errors else 0


def _run_raw(args: argparse.Namespace, settings: Settings) -> int:
    """Impressions and clicks; `--count` counts impressions, `--rate` all messages."""
    from stream.producer import produce
    from stream.topics import ensure_topics

    if args.source != "synthetic" or args.topic:
        raise SystemExit("--events raw makes synthetic impressions and clicks (no --source file, no --topic)")
    kafka = settings.kafka
    rate = settings.producer.rate if args.rate is None else args.rate
    count = settings.producer.max_events if args.count is None else args.count
    ensure_topics(kafka, [kafka.impressions_topic, kafka.clicks_topic], kafka.partitions)
    stop = _stop_on_signals()
    stats = produce(kafka, raw_events(settings, args.seed, count, args.click_delay), rate=rate or None,
                    stop=stop, max_block=settings.producer.batch_size)
    print(f"produced {stats.sent} impressions and clicks to {kafka.impressions_topic} and {kafka.clicks_topic} "
          f"({stats.errors} failed) in {stats.elapsed_s:.1f}s: {stats.rate:,.0f} events/s", flush=True)
    return 1 if stats.errors else 0


def raw_events(settings: Settings, seed: int | None, count: int | None, click_delay_s: float) -> Iterable:
    """The synthetic stream as impressions and clicks (clicks delayed, in event-time order)."""
    from itertools import islice

    from stream.events import impressions_and_clicks
    from stream.synthetic import SyntheticStream

    seed = settings.producer.seed if seed is None else seed
    schema = settings.feature_schema()
    events = SyntheticStream(schema, seed=seed).events()
    if count is not None:
        events = islice(events, count)
    return impressions_and_clicks(events, settings.kafka.impressions_topic, settings.kafka.clicks_topic,
                                  label=schema.label, event_time=schema.event_time,
                                  click_delay_s=click_delay_s, seed=seed)


def _source(args: argparse.Namespace, settings: Settings) -> Iterable[dict | bytes]:
    from stream.producer import encode_samples

    schema = settings.feature_schema()
    if args.source == "synthetic":
        from stream.synthetic import SyntheticStream

        seed = settings.producer.seed if args.seed is None else args.seed
        samples = SyntheticStream(schema, seed=seed)
    else:
        from stream.replay import replay

        samples = replay(args.source, args.format, schema=schema)
    return encode_samples(schema, samples, args.sample_format or settings.producer.sample_format)


def _stop_on_signals() -> threading.Event:
    """Ctrl-C or SIGTERM end the loop; the producer then flushes, so nothing queued is lost."""
    stop = threading.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda *_: stop.set())
    return stop
