"""The batch codec (what the trainer reads) against the per-message codec (the definition):
for every message, the same outcome: the same sample, or a refusal with the same reason."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest

from stream.sample import InvalidSample, SampleCodec
from stream.schema import load_schema
from stream.synthetic import SyntheticStream
from trainer.batch import BatchArrays, build_batch, build_batch_from_columns

CRITEO = load_schema("criteo")
MOVIELENS = load_schema("movielens")

BAD_VALUES = [None, True, False, 2, -1, 1.0, 0.0, 0.5, "1", "x", [], [1], {}, 2**63, -(2**63), 2**64 - 1,
              1e300, -0.0, 12, "7f"]


def mutate(rng: random.Random, sample: dict, schema) -> bytes:
    fields = [schema.label, schema.event_time, *schema.dense_names, *schema.sparse_names]
    kind = rng.random()
    if kind < 0.05:
        return b"{not json"
    if kind < 0.08:
        return b"[1, 2]"
    if kind < 0.10:
        return b'{"label": 1, "ts": 1, "I1": NaN}'
    if kind < 0.12:
        return orjson.dumps({**sample, "pad": "x" * 70_000})
    if kind < 0.14:  # an integer beyond 64 bits (orjson reads it as a float)
        name = rng.choice([*schema.dense_names, *schema.sparse_names, schema.label])
        return orjson.dumps({**sample, name: 0})[:-1] + b',"' + name.encode() + b'":123456789012345678901234567890}'
    s = dict(sample)
    for _ in range(rng.randint(1, 2)):
        name = rng.choice(fields)
        if rng.random() < 0.2:
            s.pop(name, None)
        else:
            s[name] = rng.choice(BAD_VALUES)
    return orjson.dumps(s)


def outcome(codec: SampleCodec, raw: bytes):
    try:
        return codec.decode(raw)
    except InvalidSample as e:
        return e.reason


def movielens_samples(rng: random.Random, n: int) -> list[dict]:
    return [{"label": rng.randint(0, 1), "ts": 1.5 + i, "user_id": rng.randrange(100), "item_id": rng.randrange(50),
             "history": [rng.randrange(50) for _ in range(rng.randint(0, 4))] or None,
             "genres": [rng.choice("abcdef") for _ in range(rng.randint(1, 3))],
             "occupation": rng.choice(["x", "y", None]), "age": rng.choice([None, 20, 33.5])} for i in range(n)]


@pytest.mark.parametrize("schema_name", ["criteo", "movielens"])
def test_batch_decode_has_the_outcome_of_decode_for_every_message(schema_name):
    schema = CRITEO if schema_name == "criteo" else MOVIELENS
    rng = random.Random(3)
    if schema is CRITEO:
        valid = SyntheticStream(schema, seed=3, clock=lambda: 1.7e9).take(600)
    else:
        valid = movielens_samples(rng, 600)
    raws = [orjson.dumps(s) if rng.random() < 0.6 else mutate(rng, s, schema) for s in valid]
    codec = SampleCodec(schema)
    expected = [outcome(codec, r) for r in raws]
    assert len({type(e) for e in expected}) == 2  # both outcomes occur
    reasons = {e for e in expected if isinstance(e, str)}
    assert {"malformed_json", "not_an_object", "oversized", "bad_label"} <= reasons

    decoded = codec.decode_batch(raws)
    got_errors = {i: e.reason for i, e in decoded.errors}
    assert got_errors == {i: e for i, e in enumerate(expected) if isinstance(e, str)}
    valid_expected = [(i, e) for i, e in enumerate(expected) if not isinstance(e, str)]
    assert decoded.rows.tolist() == [i for i, _ in valid_expected]
    for sample, (_, want) in zip(decoded.samples(), valid_expected):
        assert sample.label == want.label and sample.event_time == want.event_time
        assert sample.features.sparse == want.features.sparse
        np.testing.assert_allclose(sample.features.dense, want.features.dense, rtol=1e-12)


def test_batch_of_only_invalid_or_empty_messages():
    codec = SampleCodec(CRITEO)
    decoded = codec.decode_batch([b"", b"{", b"null"])
    assert len(decoded) == 0 and [e.reason for _, e in decoded.errors] == ["malformed_json"] * 2 + ["not_an_object"]
    assert decoded.dense.shape == (0, 13) and len(decoded.sparse) == 26
    assert len(codec.decode_batch([])) == 0


def test_batch_from_columns_equals_batch_from_features():
    rng = random.Random(5)
    codec = SampleCodec(MOVIELENS)
    raws = [orjson.dumps(s) for s in movielens_samples(rng, 200)]
    decoded = codec.decode_batch(raws)
    samples = [codec.decode(r) for r in raws]
    a = build_batch_from_columns(MOVIELENS, decoded)
    b = build_batch(MOVIELENS, [s.features for s in samples], [s.label for s in samples])
    np.testing.assert_allclose(a.dense.numpy(), b.dense.numpy())
    assert a.labels.tolist() == b.labels.tolist()
    assert a.tables.keys() == b.tables.keys()
    for name in a.tables:
        assert a.tables[name].keys.tolist() == b.tables[name].keys.tolist()
        assert a.tables[name].counts.tolist() == b.tables[name].counts.tolist()
    for x, y in zip(a.bags, b.bags):
        assert (x.table, x.mode) == (y.table, y.mode)
        assert x.indices.tolist() == y.indices.tolist() and x.offsets.tolist() == y.offsets.tolist()
    # and the numpy-only form round-trips
    c = BatchArrays.from_batch(a).to_batch()
    assert c.labels.tolist() == a.labels.tolist()
    assert c.tables["item"].keys.tolist() == a.tables["item"].keys.tolist()


def test_dict_with_an_int_too_large_for_a_float_is_refused_not_a_crash():
    base = {"label": 0, "ts": 1.0, "user_id": 1, "item_id": 2}
    with pytest.raises(InvalidSample) as e:
        SampleCodec(MOVIELENS).from_dict({**base, "age": 10**400})
    assert e.value.reason == "non_finite_dense"
