"""Send events to Kafka at a chosen rate, and account for every one of them.

Samples carry no key: kafka-python then spreads them over the topic's partitions. Samples
need no per-key ordering, and keying by an id would pile the Zipf-hot ids (and their
traffic) onto one partition, i.e. onto one trainer consumer. The Kafka message timestamp is
the produce time (the client's default), which is what freshness is measured from.
Raw impressions and clicks (`stream.events`) come as `Keyed` items: each names its topic and
carries its request id as the key, so that an impression and its clicks share a partition.

Every send is counted exactly once, when the broker answers: `sent` (acknowledged by all
in-sync replicas) or `errors`. `flush()` runs before returning, so the two add up to the
number of messages attempted.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from itertools import islice
from typing import NamedTuple

import orjson
from kafka import KafkaProducer
from kafka.errors import KafkaError

from stream.config import KafkaConfig
from stream.sample import InvalidSample, SampleCodec
from stream.schema import FeatureSchema

log = logging.getLogger(__name__)

PRODUCER_SETTINGS = {
    "acks": "all",
    "linger_ms": 5,
    "batch_size": 256 * 1024,  # 16 KiB (the default) holds only ~15 Criteo samples
}
PACING_SLICE_S = 0.01  # a pacing block is about this much time's worth of events
REPORT_EVERY_S = 10.0


class Keyed(NamedTuple):
    """A message for a given topic, with a key (the default partitioner hashes it: murmur2)."""

    topic: str
    key: bytes
    value: bytes | dict


@dataclass(frozen=True, slots=True)
class ProduceStats:
    sent: int
    errors: int
    elapsed_s: float

    @property
    def rate(self) -> float:
        return self.sent / self.elapsed_s if self.elapsed_s > 0 else 0.0


class Pacer:
    """A token bucket that is asked once per block of messages, not once per message: one
    sleep per block keeps the rate without spending a syscall on each send.

    The bucket holds at most one block, so after a stall the producer does not burst to
    catch up: it resumes at `rate`."""

    def __init__(self, rate: float, block: int, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], object] = time.sleep) -> None:
        if rate <= 0 or block < 1:
            raise ValueError("rate must be > 0 and block >= 1")
        self.rate = rate
        self.block = block
        self._clock = clock
        self._sleep = sleep
        self._tokens = float(block)
        self._last = clock()

    def acquire(self) -> None:
        """Wait until a block's worth of tokens is there, then take them."""
        now = self._clock()
        self._tokens = min(float(self.block), self._tokens + (now - self._last) * self.rate)
        self._last = now
        if self._tokens < self.block:
            self._sleep((self.block - self._tokens) / self.rate)
            self._tokens = float(self.block)
            self._last = self._clock()
        self._tokens -= self.block


def pacing_block(rate: float, max_block: int) -> int:
    return max(1, min(max_block, int(rate * PACING_SLICE_S)))


class _Outcomes:
    """Broker answers, counted from kafka-python's I/O thread."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.errors = 0

    def ok(self, _metadata: object) -> None:
        with self._lock:
            self.sent += 1

    def failed(self, exc: BaseException) -> None:
        with self._lock:
            self.errors += 1
            first = self.errors == 1
        if first:
            log.error("a send failed (further failures are only counted): %r", exc)


def encode_samples(schema: FeatureSchema, source: Iterable[bytes | dict], sample_format: str) -> Iterable[bytes | dict]:
    """Sample dicts in `sample_format`; bytes pass as they are. A dict the binary format cannot
    hold (it is invalid) goes as JSON, so that the trainer dead-letters it with its reason."""
    if sample_format == "json":
        yield from source
        return
    codec = SampleCodec(schema)
    for item in source:
        if isinstance(item, dict):
            try:
                item = codec.encode_binary(item)
            except InvalidSample:
                pass
        yield item


def produce(
    kafka: KafkaConfig,
    source: Iterable[bytes | dict | Keyed],
    *,
    topic: str | None = None,
    rate: float | None = None,
    max_events: int | None = None,
    stop: threading.Event | None = None,
    max_block: int = 500,
) -> ProduceStats:
    """Send `source` to `topic` (the samples topic by default): dicts as JSON, bytes as they are,
    `Keyed` items to their own topic with their key.

    Runs until the source ends, `max_events` were sent, or `stop` is set; `rate` is events
    per second (None: as fast as the client goes), paced in blocks of at most `max_block`."""
    topic = topic or kafka.samples_topic
    pacer = Pacer(rate, pacing_block(rate, max_block)) if rate else None
    outcomes = _Outcomes()
    producer = KafkaProducer(**kafka.client_kwargs(), **PRODUCER_SETTINGS)
    items = source if max_events is None else islice(source, max_events)
    started = last_report = time.monotonic()
    attempted = 0
    try:
        for item in items:
            if stop is not None and stop.is_set():
                break
            if pacer is not None and attempted % pacer.block == 0:
                pacer.acquire()
            key = None
            target = topic
            if isinstance(item, Keyed):
                target, key, item = item
            value = item if isinstance(item, bytes) else orjson.dumps(item)
            attempted += 1
            try:
                producer.send(target, value, key=key).add_callback(outcomes.ok).add_errback(outcomes.failed)
            except KafkaError as e:  # raised before the message was queued (metadata, buffer full)
                outcomes.failed(e)
            if time.monotonic() - last_report >= REPORT_EVERY_S:
                last_report = time.monotonic()
                log.info("produced %d (%d errors) to %s, %.0f events/s", outcomes.sent, outcomes.errors,
                         topic if key is None else "their topics", outcomes.sent / (last_report - started))
        producer.flush()
    finally:
        producer.close()
    return ProduceStats(outcomes.sent, outcomes.errors, time.monotonic() - started)
