"""The binary sample format: the same samples as JSON, every malformed message refused with
its reason (never misread, never a crash), and JSON and binary mixed in one micro-batch."""

from __future__ import annotations

import math
import random
import struct

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.binary import HEAD_BYTES, MAGIC, REASONS
from stream.sample import InvalidSample, SampleCodec
from stream.schema import load_schema
from stream.synthetic import SyntheticStream

CRITEO = load_schema("criteo")
MOVIELENS = load_schema("movielens")


def movielens_samples(rng: random.Random, n: int) -> list[dict]:
    return [{"label": rng.randint(0, 1), "ts": 1.5 + i, "user_id": rng.randrange(100), "item_id": rng.randrange(50),
             "history": [rng.randrange(50) for _ in range(rng.randint(0, 4))] or None,
             "genres": [rng.choice("abcdef") for _ in range(rng.randint(1, 3))],
             "occupation": rng.choice(["x", "y", None]), "age": rng.choice([None, 20, 33.5])} for i in range(n)]


def assert_same(a, b) -> None:
    """Equal decoded batches; dense to float32 precision (the binary format carries float32)."""
    assert a.rows.tolist() == b.rows.tolist()
    assert a.labels.tolist() == b.labels.tolist() and a.event_times.tolist() == b.event_times.tolist()
    np.testing.assert_allclose(a.dense, b.dense, rtol=1e-6, atol=1e-6)
    for x, y in zip(a.sparse, b.sparse, strict=True):
        assert x.keys.tolist() == y.keys.tolist() and x.lengths.tolist() == y.lengths.tolist()


@pytest.mark.parametrize("schema", [CRITEO, MOVIELENS], ids=["criteo", "movielens"])
def test_binary_decodes_to_what_json_decodes_to(schema):
    codec = SampleCodec(schema)
    samples = (SyntheticStream(schema, seed=2, clock=lambda: 1.7e9).take(300) if schema is CRITEO
               else movielens_samples(random.Random(2), 300))
    from_json = codec.decode_batch([orjson.dumps(s) for s in samples])
    binary = [codec.encode_binary(s) for s in samples]
    from_binary = codec.decode_batch(binary)
    assert len(from_json) == 300 and not from_binary.errors
    assert_same(from_binary, from_json)
    assert sum(map(len, binary)) < sum(len(orjson.dumps(s)) for s in samples)


def test_json_and_binary_mixed_in_one_batch_keep_message_order():
    codec = SampleCodec(MOVIELENS)
    samples = movielens_samples(random.Random(4), 200)
    rng = random.Random(5)
    raws = [codec.encode_binary(s) if rng.random() < 0.5 else orjson.dumps(s) for s in samples]
    raws[7], raws[8] = b"{broken", codec.encode_binary(samples[8])[:-1]
    mixed = codec.decode_batch(raws)
    assert [(i, e.reason) for i, e in mixed.errors] == [(7, "malformed_json"), (8, "malformed_binary")]
    keep = [i for i in range(200) if i not in (7, 8)]
    assert_same(mixed, codec.decode_batch([orjson.dumps(samples[i]) for i in keep]).at_rows(np.array(keep)))


def patched(raw: bytes, offset: int, fmt: str, value) -> bytes:
    out = bytearray(raw)
    struct.pack_into(fmt, out, offset, value)
    return bytes(out)


def test_each_malformed_binary_sample_is_refused_with_its_reason():
    codec = SampleCodec(MOVIELENS)
    sample = {"label": 1, "ts": 10.0, "user_id": 3, "item_id": 4, "history": [1, 2], "genres": ["a"], "age": 30}
    good = codec.encode_binary(sample)
    dense_at = HEAD_BYTES
    counts_at = HEAD_BYTES + 4 * len(MOVIELENS.dense)
    user = MOVIELENS.sparse_names.index("user_id")
    history = MOVIELENS.sparse_names.index("history")
    cases = {
        "oversized": good + b"\0" * 70_000,
        "unsupported_format": patched(good, 1, "<B", 9),
        "schema_mismatch": SampleCodec(CRITEO).encode_binary(SyntheticStream(CRITEO, seed=1).take(1)[0]),
        "malformed_binary": good[:-8],
        "bad_label": patched(good, 6, "<B", 2),
        "bad_event_time": patched(good, 7, "<d", math.inf),
        "non_finite_dense": patched(good, dense_at, "<f", -math.inf),
        "bad_sparse": patched(good, counts_at + 2 * user, "<H", 2) + b"\0" * 8,
        "too_many_ids": patched(good, counts_at + 2 * history, "<H", 300) + b"\0" * 8 * 298,
    }
    assert set(cases) == set(REASONS.values())
    decoded = codec.decode_batch([good, *cases.values(), good[:1], bytes([MAGIC])])
    assert decoded.rows.tolist() == [0]
    reasons = [(i, e.reason) for i, e in decoded.errors]
    assert reasons == [*((i + 1, r) for i, r in enumerate(cases)), (10, "malformed_binary"), (11, "malformed_binary")]
    for _, e in decoded.errors[:-2]:
        assert e.detail  # says what is wrong, e.g. which field
    details = {e.reason: e.detail for _, e in decoded.errors}
    assert "user_id" in details["bad_sparse"] and "history" in details["too_many_ids"]
    assert "0x" in details["schema_mismatch"]


def test_encoding_refuses_what_decoding_would_refuse():
    codec = SampleCodec(MOVIELENS)
    base = {"label": 0, "ts": 1.0, "user_id": 1, "item_id": 2}
    for obj, reason in [({**base, "label": 3}, "bad_label"), ({**base, "colour": "red"}, "unknown_field"),
                        ({**base, "age": 1e300}, "non_finite_dense"), ({**base, "genres": "a"}, "bad_sparse")]:
        with pytest.raises(InvalidSample) as e:
            codec.encode_binary(obj)
        assert e.value.reason == reason


@settings(max_examples=300, deadline=None)
@given(st.binary(min_size=0, max_size=400), st.integers(0, 3))
def test_arbitrary_bytes_after_the_magic_byte_are_read_or_refused_never_misread(tail, prefix):
    codec = SampleCodec(MOVIELENS)
    good = codec.encode_binary({"label": 1, "ts": 2.0, "user_id": 5, "item_id": 6, "genres": ["a", "b"]})
    raw = good[:prefix * 2] + tail if prefix else bytes([MAGIC]) + tail
    decoded = codec.decode_batch([raw])
    if len(decoded):  # accepted: it must then be a well-formed sample of this schema
        assert decoded.labels[0] in (0, 1) and math.isfinite(decoded.event_times[0])
        assert len(raw) == HEAD_BYTES + 4 * len(MOVIELENS.dense) + 2 * len(MOVIELENS.sparse) + 8 * sum(int(c.lengths[0]) for c in decoded.sparse)
    else:
        assert decoded.errors[0][1].reason in REASONS.values()


def test_producers_write_binary_and_leave_invalid_samples_to_be_dead_lettered():
    from stream.producer import encode_samples

    good = {"label": 1, "ts": 2.0, "user_id": 5, "item_id": 6}
    bad = {**good, "label": 7}
    out = list(encode_samples(MOVIELENS, [good, bad, b"raw"], "binary"))
    assert out[0][0] == MAGIC and out[1] == bad and out[2] == b"raw"
    assert list(encode_samples(MOVIELENS, [good], "json")) == [good]
