"""Micro-batches of valid samples from Kafka; everything else to the dead-letter topic.

The trainer is the only consumer of the samples topic, so partitions are assigned, not
group-managed: no rebalance pauses, and the starting offsets come from the newest
published version (that is how a restarted trainer resumes exactly).
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field

from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from stream.config import KafkaConfig
from stream.sample import InvalidSample, Sample, SampleCodec

log = logging.getLogger(__name__)


@dataclass
class MicroBatch:
    samples: list[Sample]
    # Next offset to read per partition once this batch is learned (Kafka's commit convention).
    next_offsets: dict[int, int]
    # Kafka record timestamps (ms) of the batch's samples: when they were produced.
    produced_ms: list[int] = field(default_factory=list)


class KafkaSampleSource:
    def __init__(self, kafka: KafkaConfig, codec: SampleCodec, batch_size: int, max_wait_ms: int,
                 start_offsets: dict[int, int] | None = None) -> None:
        self.kafka = kafka
        self.codec = codec
        self.batch_size = batch_size
        self.max_wait_ms = max_wait_ms
        self.dead_letters: Counter[str] = Counter()
        self.consumer = KafkaConsumer(enable_auto_commit=False, group_id=None,
                                      max_partition_fetch_bytes=4 << 20, **kafka.client_kwargs())
        partitions = self._wait_for_partitions()
        self.partitions = [TopicPartition(kafka.samples_topic, p) for p in partitions]
        self.consumer.assign(self.partitions)
        start_offsets = start_offsets or {}
        for tp in self.partitions:
            if tp.partition in start_offsets:
                self.consumer.seek(tp, start_offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)
        self.positions: dict[int, int] = dict(start_offsets)
        self.dead_letter_producer = KafkaProducer(acks="all", linger_ms=20, **kafka.client_kwargs())
        self._unflushed_dead_letters = False

    def _wait_for_partitions(self, timeout_s: float = 30.0) -> list[int]:
        deadline = time.monotonic() + timeout_s
        while True:
            partitions = self.consumer.partitions_for_topic(self.kafka.samples_topic)
            if partitions:
                return sorted(partitions)
            if time.monotonic() > deadline:
                raise RuntimeError(f"topic {self.kafka.samples_topic!r} does not exist on {self.kafka.bootstrap_servers}")
            time.sleep(0.2)

    def next_batch(self) -> MicroBatch | None:
        """Up to batch_size valid samples, or what arrived within max_wait_ms.

        None when no message arrived at all; a batch of only dead letters still comes back
        (with no samples) so that its offsets are published and not read again.
        """
        samples: list[Sample] = []
        produced: list[int] = []
        consumed = 0
        deadline = time.monotonic() + self.max_wait_ms / 1000
        while len(samples) < self.batch_size:
            remaining_ms = int((deadline - time.monotonic()) * 1000)
            if remaining_ms <= 0:
                break
            records = self.consumer.poll(timeout_ms=remaining_ms, max_records=self.batch_size - len(samples))
            for tp, messages in records.items():
                for m in messages:
                    try:
                        samples.append(self.codec.decode(m.value or b""))
                        produced.append(m.timestamp)
                    except InvalidSample as e:
                        self._dead_letter(m, e)
                consumed += len(messages)
                self.positions[tp.partition] = messages[-1].offset + 1
        if consumed == 0:
            return None
        return MicroBatch(samples, dict(self.positions), produced)

    def lag(self) -> dict[int, int]:
        """Messages not yet read per partition, from the high watermarks of the last fetch
        (Tansu's ListOffsets answer is not reliable; the fetch response's is)."""
        out = {}
        for tp in self.partitions:
            high = self.consumer.highwater(tp)
            if high is not None:
                out[tp.partition] = max(0, high - self.positions.get(tp.partition, 0))
        return out

    def _dead_letter(self, message, error: InvalidSample) -> None:
        """Keep the original bytes, say why, and where they came from; never block training on it."""
        self.dead_letters[error.reason] += 1
        self._unflushed_dead_letters = True
        headers = [
            ("reason", error.reason.encode()),
            ("detail", error.detail[:500].encode()),
            ("source", f"{message.topic}/{message.partition}/{message.offset}".encode()),
        ]
        self.dead_letter_producer.send(self.kafka.dead_letter_topic, value=message.value, headers=headers)
        log.debug("dead letter %s at %s/%s: %s", error.reason, message.partition, message.offset, error.detail)

    def flush(self) -> None:
        """Dead letters must be acknowledged before the offsets that skip them are published."""
        if self._unflushed_dead_letters:
            self.dead_letter_producer.flush()
            self._unflushed_dead_letters = False

    def close(self) -> None:
        self.flush()
        self.dead_letter_producer.close()
        self.consumer.close()

