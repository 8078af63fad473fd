"""Bad events: a corpus of malformed inputs (broken JSON, wrong types, NaN and infinities,
missing label or ids, ids outside int64, unknown fields, oversized messages) goes through
the real trainer process on the real broker. Every one reaches the dead-letter topic with
its reason, the counts add up (learned + dead-lettered = produced), nothing crashes.

The codec is checked on the same corpus first: `decode` (the definition) and the trainer's
columnar `decode_batch` refuse each message with the same reason.
"""

from __future__ import annotations

import random
import signal
import time
from collections import Counter

import orjson
import pytest
from kafka import KafkaProducer

from publisher.redis_store import RedisVersionStore
from stream.sample import InvalidSample, SampleCodec
from stream.schema import FeatureSchema, load_schema
from tests.faults.harness import START_TIMEOUT_S, covered, free_port, metric, report, wait_for, write_settings
from tests.test_end_to_end import dead_letters
from tests.test_trainer_crash import learned_samples

SCHEMA = load_schema("movielens")  # int ids, string ids, multi-valued ids, dense with and without log1p


def good(rng: random.Random) -> dict:
    return {"label": int(rng.random() < 0.3), "ts": time.time(), "age": rng.randrange(18, 80),
            "item_popularity": rng.randrange(1000), "user_id": rng.randrange(1 << 40), "item_id": rng.randrange(500),
            "history": [rng.randrange(500) for _ in range(rng.randrange(5))],
            "genres": rng.sample(["drama", "comedy", "horror", "sf"], 2), "occupation": f"o{rng.randrange(20)}"}


def bad_corpus() -> list[tuple[str, bytes | None, str]]:
    """(what, raw message value, expected dead-letter reason)."""
    base = {"label": 1, "ts": 1_700_000_000.5, "age": 30, "item_popularity": 5, "user_id": 3, "item_id": 7,
            "history": [1, 2], "genres": ["drama"], "occupation": "x"}

    def with_(**changes) -> bytes:
        return orjson.dumps({**base, **changes})

    def without(*names: str) -> bytes:
        return orjson.dumps({k: v for k, v in base.items() if k not in names})

    def raw_json(field: str, literal: str) -> bytes:  # a literal orjson would not write (NaN, 1e999)
        return orjson.dumps(base).replace(f'"{field}":{orjson.dumps(base[field]).decode()}'.encode(),
                                          f'"{field}":{literal}'.encode())

    return [
        ("truncated JSON", b'{"label": 1, "ts": ', "malformed_json"),
        ("not UTF-8", b"\xff\xfe\x00\x01", "malformed_json"),
        ("empty message", b"", "malformed_json"),
        ("null record (Kafka tombstone)", None, "malformed_json"),
        ("NaN literal", raw_json("age", "NaN"), "malformed_json"),
        ("Infinity literal", raw_json("age", "Infinity"), "malformed_json"),
        ("1e999 (infinite as a double)", raw_json("item_popularity", "1e999"), "malformed_json"),
        ("10^400 integer", raw_json("age", "1" + "0" * 400), "malformed_json"),
        ("nested 5000 deep", b"[" * 5000 + b"]" * 5000, "malformed_json"),
        ("trailing garbage", orjson.dumps(base) + b"}", "malformed_json"),
        ("a JSON array", b"[1, 2, 3]", "not_an_object"),
        ("a JSON string", b'"label"', "not_an_object"),
        ("JSON null", b"null", "not_an_object"),
        ("missing label", without("label"), "missing_label"),
        ("null label", with_(label=None), "missing_label"),
        ("label 2", with_(label=2), "bad_label"),
        ("label as string", with_(label="1"), "bad_label"),
        ("label true", with_(label=True), "bad_label"),
        ("label 0.5", with_(label=0.5), "bad_label"),
        ("missing event time", without("ts"), "missing_event_time"),
        ("event time as text", with_(ts="yesterday"), "bad_event_time"),
        ("event time as list", with_(ts=[1]), "bad_event_time"),
        ("dense as text", with_(age="old"), "bad_dense"),
        ("dense as list", with_(age=[1]), "bad_dense"),
        ("dense true", with_(item_popularity=True), "bad_dense"),
        ("int id as string", with_(user_id="u1"), "bad_sparse"),
        ("int id as float", with_(user_id=1.5), "bad_sparse"),
        ("string id as int", with_(occupation=7), "bad_sparse"),
        ("string id as object", with_(occupation={"a": 1}), "bad_sparse"),
        ("multi-valued as scalar", with_(genres="drama"), "bad_sparse"),
        ("multi-valued with a wrong id", with_(history=[1, "x"]), "bad_sparse"),
        ("too many ids", with_(history=list(range(300))), "too_many_ids"),
        ("id 2^63 (int64 max + 1)", with_(user_id=1 << 63), "id_out_of_range"),
        ("id in a list 2^63", with_(history=[1, 1 << 63]), "id_out_of_range"),
        ("id -2^63-1 (JSON decodes it as a float)", raw_json("item_id", str(-(1 << 63) - 1)), "bad_sparse"),
        ("id 2^64 (JSON decodes it as a float)", raw_json("user_id", str(1 << 64)), "bad_sparse"),
        ("unknown field", with_(clicked=1), "unknown_field"),
        ("misspelled feature", orjson.dumps({**{k: v for k, v in base.items() if k != "user_id"}, "userid": 3}),
         "unknown_field"),
        ("oversized (100 kB)", with_(occupation="x" * 100_000), "oversized"),
    ]


def _reason(codec: SampleCodec, raw: bytes) -> str | None:
    try:
        codec.decode(raw)
    except InvalidSample as e:
        return e.reason
    return None


def test_the_codec_refuses_each_bad_event_with_its_reason_one_by_one_and_in_batches():
    codec = SampleCodec(SCHEMA)
    corpus = bad_corpus()
    for what, raw, reason in corpus:
        assert _reason(codec, raw or b"") == reason, what
    rng = random.Random(5)
    goods = [orjson.dumps(good(rng)) for _ in range(64)]
    mixed = goods[:32] + [raw or b"" for _, raw, _ in corpus] + goods[32:]
    decoded = codec.decode_batch(mixed)
    assert len(decoded) == len(goods)
    assert [(i, e.reason) for i, e in decoded.errors] == [(32 + k, r) for k, (_, _, r) in enumerate(corpus)]
    # The fast path (every message has every field): one extra field is caught there too.
    full = [orjson.dumps(good(rng)) for _ in range(16)]
    full[3] = orjson.dumps({**orjson.loads(full[3]), "extra": 1})
    assert [(i, e.reason) for i, e in codec.decode_batch(full).errors] == [(3, "unknown_field")]


def test_unknown_fields_can_be_ignored_by_the_schema():
    lenient = SampleCodec(FeatureSchema.model_validate({**SCHEMA.model_dump(), "unknown_fields": "ignore"}))
    strict = SampleCodec(SCHEMA)
    raw = orjson.dumps({**good(random.Random(1)), "request_id": "r1"})
    assert lenient.decode(raw).label in (0, 1)
    assert len(lenient.decode_batch([raw])) == 1
    assert _reason(strict, raw) == "unknown_field"
    with pytest.raises(ValueError):
        FeatureSchema.model_validate({**SCHEMA.model_dump(), "unknown_fields": "warn"})


def test_bad_events_reach_the_dead_letter_topic_and_the_counts_add_up(tmp_path, kafka_config, redis_config,
                                                                      processes):
    rng = random.Random(9)
    corpus = bad_corpus()
    goods = [orjson.dumps(good(rng)) for _ in range(3000)]
    messages: list[bytes | None] = list(goods)
    for _what, raw, _reason_ in corpus:  # scattered among the good ones
        messages.insert(rng.randrange(len(messages) + 1), raw)
    producer = KafkaProducer(acks="all", max_request_size=4 << 20, **kafka_config.client_kwargs())
    for m in messages:  # a null value needs a key (Kafka's tombstone)
        producer.send(kafka_config.samples_topic, m, key=b"tombstone" if m is None else None)
    producer.flush()
    producer.close()

    metrics_port = free_port()
    config = write_settings(tmp_path / "settings.yaml", kafka_config, redis_config, schema="movielens",
                            metrics_port=metrics_port)
    store = RedisVersionStore(redis_config)
    started = time.monotonic()
    trainer = processes.start(config, "train", name="trainer")
    wait_for(lambda: covered(store) == len(messages), START_TIMEOUT_S, "a version covering every message", [trainer])
    took = time.monotonic() - started

    samples, offsets = learned_samples(store)
    assert offsets == len(messages) and samples == len(goods), "learned + dead-lettered must equal produced"
    expected = Counter(reason for _, _, reason in corpus)
    letters = dead_letters(kafka_config, len(corpus))
    assert Counter(dict(m.headers)["reason"].decode() for m in letters) == expected
    assert all(dict(m.headers)["source"].decode().startswith(kafka_config.samples_topic) for m in letters)
    by_value = {m.value: dict(m.headers)["reason"].decode() for m in letters}
    for what, raw, reason in corpus:  # the original bytes are kept, beside their reason
        if raw:
            assert by_value.get(raw) == reason, what
    for reason, n in expected.items():
        assert metric(metrics_port, "freshrec_trainer_dead_letters_total", f'{{reason="{reason}"}}') == n
    assert metric(metrics_port, "freshrec_trainer_samples_total") == len(goods)
    trainer.send_signal(signal.SIGTERM)
    assert trainer.wait(timeout=60) == 0, "the trainer must survive every bad event and stop cleanly"
    report("bad events", f"{len(corpus)} kinds of bad event among {len(goods)} good: all dead-lettered with "
                         f"their reason, {samples} learned, 0 lost; trainer start to full coverage {took:.1f}s")


