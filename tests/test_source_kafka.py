"""The Kafka source against a real broker: micro-batches bounded by size, every invalid
message on the dead-letter topic with its reason, offsets past handled messages only, and a
restart from given offsets; with the ingest process and inline, with both Kafka clients."""

from __future__ import annotations

import time

import orjson
import pytest
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from stream.sample import SampleCodec
from stream.schema import load_schema
from stream.synthetic import SyntheticStream
from trainer.source import KafkaSampleSource, confluent_available

SCHEMA = load_schema("criteo")


def produce(kafka_config, messages: list[bytes]) -> None:
    producer = KafkaProducer(acks="all", **kafka_config.client_kwargs())
    for i, m in enumerate(messages):
        producer.send(kafka_config.samples_topic, m, partition=i % 2)
    producer.flush()
    producer.close()


def read_dead_letters(kafka_config, expected: int) -> list:
    consumer = KafkaConsumer(**kafka_config.client_kwargs())
    consumer.assign([TopicPartition(kafka_config.dead_letter_topic, p)
                     for p in consumer.partitions_for_topic(kafka_config.dead_letter_topic)])
    consumer.seek_to_beginning()
    found: list = []
    deadline = time.monotonic() + 20
    while len(found) < expected and time.monotonic() < deadline:
        for records in consumer.poll(timeout_ms=300).values():
            found += records
    consumer.close()
    return found


def drain(source: KafkaSampleSource, total: int) -> list:
    batches = []
    deadline = time.monotonic() + 60
    while sum(source.positions.values()) < total:
        assert time.monotonic() < deadline, f"stuck at {source.positions}"
        micro = source.next_batch()
        if micro is not None:
            batches.append(micro.owned())
    return batches


CLIENTS = [("inline", "kafka-python"), ("process", "auto")]
if confluent_available():
    CLIENTS.append(("inline", "confluent"))


@pytest.mark.parametrize("ingest, client", CLIENTS)
def test_every_message_is_learned_or_dead_lettered_with_its_reason(kafka_config, ingest, client):
    samples = SyntheticStream(SCHEMA, seed=11, clock=lambda: 1.7e9).take(700)
    codec = SampleCodec(SCHEMA)
    # JSON and the binary format share the topic; both kinds of refusal are dead-lettered
    messages = [codec.encode_binary(s) if i % 3 == 0 else orjson.dumps(s) for i, s in enumerate(samples)]
    other_schema = bytearray(codec.encode_binary(samples[50]))
    other_schema[2] ^= 0xFF
    bad = {3: (b"{oops", "malformed_json"), 10: (orjson.dumps({**samples[10], "label": 2}), "bad_label"),
           20: (orjson.dumps({**samples[20], "I2": "many"}), "bad_dense"),
           31: (orjson.dumps({**samples[31], "C3": 5}), "bad_sparse"),
           40: (b"x" * 70_000, "oversized"), 41: (b"[]", "not_an_object"),
           45: (codec.encode_binary(samples[45])[:-3], "malformed_binary"), 50: (bytes(other_schema), "schema_mismatch")}
    for i, (raw, _) in bad.items():
        messages[i] = raw
    produce(kafka_config, messages)

    source = KafkaSampleSource(kafka_config, codec, batch_size=128, max_wait_ms=100, ingest=ingest, client=client)
    try:
        batches = drain(source, len(messages))
        assert all(len(b) <= 128 for b in batches)  # bounded by size
        assert source.positions == {0: 350, 1: 350}
        assert batches[-1].next_offsets == {0: 350, 1: 350}
        assert source.lag() == {0: 0, 1: 0}
        assert sorted(source.dead_letters.elements()) == sorted(r for _, r in bad.values())
        # the samples are those of the valid messages, decoded as the per-message codec does
        learned = [s for b in batches for s in b.samples]
        want = [codec.from_dict(s) for i, s in enumerate(samples) if i not in bad]
        key = lambda s: (s.features.sparse, s.label)  # noqa: E731 - order across partitions is not defined
        assert sorted(map(key, learned)) == sorted(map(key, want))
        assert sum(len(b.batch) for b in batches if b.batch is not None) == len(want)
        assert max(b.newest_produced_ms for b in batches) > 0 and batches[-1].watermark == 1.7e9
        source.flush()
    finally:
        source.close()
    letters = read_dead_letters(kafka_config, len(bad))
    by_source = {dict(m.headers)["source"].decode(): dict(m.headers)["reason"].decode() for m in letters}
    assert sorted(by_source.values()) == sorted(r for _, r in bad.values())
    for i, (raw, reason) in bad.items():  # the original bytes, and where they came from
        where = f"{kafka_config.samples_topic}/{i % 2}/{i // 2}"
        assert by_source[where] == reason
    assert sorted(m.value for m in letters) == sorted(raw for raw, _ in bad.values())


def test_restart_from_offsets_reads_only_the_rest(kafka_config):
    samples = SyntheticStream(SCHEMA, seed=12, clock=lambda: 1.7e9).take(300)
    produce(kafka_config, [orjson.dumps(s) for s in samples])
    source = KafkaSampleSource(kafka_config, SampleCodec(SCHEMA), batch_size=64, max_wait_ms=50,
                               start_offsets={0: 100, 1: 120}, ingest="inline", client="kafka-python")
    try:
        batches = drain(source, 300)
        assert sum(len(b) for b in batches) == 50 + 30
        assert source.positions == {0: 150, 1: 150}
        first = batches[0].samples[0]
        assert first.features.sparse in {
            SampleCodec(SCHEMA).decode(orjson.dumps(samples[2 * 100])).features.sparse,
            SampleCodec(SCHEMA).decode(orjson.dumps(samples[2 * 120 + 1])).features.sparse}
    finally:
        source.close()


def test_nothing_to_read_returns_none(kafka_config):
    source = KafkaSampleSource(kafka_config, SampleCodec(SCHEMA), batch_size=64, max_wait_ms=50, ingest="inline")
    try:
        assert source.next_batch() is None
        assert source.positions == {} and source.lag() in ({}, {0: 0, 1: 0})
    finally:
        source.close()


@pytest.mark.parametrize("slot_bytes_per_sample", [4096, 8])
def test_the_ingest_process_hands_over_every_batch_in_order(kafka_config, monkeypatch, slot_bytes_per_sample):
    """Through ring slots (more batches than slots, so each is reused) or, when a batch does
    not fit its slot, whole through the pipe (msgpack): the same samples, in each partition's order,
    and a lent batch is intact until the next call."""
    import trainer.source

    monkeypatch.setattr(trainer.source, "SLOT_BYTES_PER_SAMPLE", slot_bytes_per_sample)
    samples = SyntheticStream(SCHEMA, seed=13, clock=lambda: 1.7e9).take(1200)
    codec = SampleCodec(SCHEMA)
    produce(kafka_config, [codec.encode_binary(s) for s in samples])
    source = KafkaSampleSource(kafka_config, codec, batch_size=50, max_wait_ms=50, prefetch=2)
    try:
        learned: list = []
        deadline = time.monotonic() + 60
        while sum(source.positions.values()) < len(samples):
            assert time.monotonic() < deadline, f"stuck at {source.positions}"
            micro = source.next_batch()
            if micro is not None:
                kept = micro.owned()
                time.sleep(0.002)  # the ingest process works ahead meanwhile
                assert [s.features for s in micro.samples] == [s.features for s in kept.samples]
                learned += kept.samples
    finally:
        source.close()
    want = [codec.from_dict(s) for s in samples]
    for partition in (0, 1):  # produced round-robin: message i went to partition i % 2
        got = [s.features.sparse for s in learned if s.features.sparse in {w.features.sparse for w in want[partition::2]}]
        assert got == [w.features.sparse for w in want[partition::2]]
    assert len(learned) == len(samples)
