"""The batch codec (what the trainer reads) against the per-message codec (the definition):
for every message, the same outcome: the same sample, or a refusal with the same reason."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import orjson
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from stream.sample import InvalidSample, SampleCodec
from stream.schema import FeatureSchema, load_schema
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
        assert x.indices.tolist() == y.indices.tolist()
        assert (x.offsets is None) == (y.offsets is None)
        assert x.offsets is None or x.offsets.tolist() == y.offsets.tolist()
    # and the numpy-only form round-trips
    c = BatchArrays.from_batch(a).to_batch()
    assert c.labels.tolist() == a.labels.tolist()
    assert c.tables["item"].keys.tolist() == a.tables["item"].keys.tolist()


def test_dict_with_an_int_too_large_for_a_float_is_refused_not_a_crash():
    base = {"label": 0, "ts": 1.0, "user_id": 1, "item_id": 2}
    with pytest.raises(InvalidSample) as e:
        SampleCodec(MOVIELENS).from_dict({**base, "age": 10**400})
    assert e.value.reason == "non_finite_dense"


# -- the msgspec fast path against the definition, on hostile JSON -------------------------------

def edge_schema(unknown_fields: str) -> FeatureSchema:
    """Every kind of field, names that are not Python identifiers, and short id lists."""
    return FeatureSchema.from_dict({
        "name": f"edge-{unknown_fields}", "unknown_fields": unknown_fields,
        "dense": [{"name": "x"}, {"name": "log-x", "transform": "log1p", "default": 0.5}],
        "sparse": [{"name": "class"}, {"name": "user id", "id_type": "int"},
                   {"name": "tags", "multi": True, "max_ids": 3}, {"name": "hist", "id_type": "int", "multi": True,
                                                                   "max_ids": 3}],
        "tables": {"class": 4, "user id": 4, "tags": 4, "hist": 4}})


# JSON value texts, valid and not, that the fast path must judge exactly as orjson + from_dict do
EDGE_VALUES = [
    b"null", b"true", b"false", b"0", b"1", b"-0", b"-0.0", b"1.0", b"0.0", b"2", b"-1", b"0.5", b"1E2", b"1e-999",
    b"1e999", b"-1e999", b"1.7976931348623159e308", b"1e300", b"3.5e38", b"-3.5e38", b"3.4028234663852886e38", b"NaN", b"Infinity", b"-Infinity", b"01", b"1.", b"+1",
    b"9007199254740993", b"9223372036854775807", b"9223372036854775808", b"-9223372036854775808",
    b"-9223372036854775809", b"18446744073709551615", b"18446744073709551616", b"123456789012345678901234567890",
    b"1" + b"0" * 400, b'"a"', b'""', b'"7f"', b'"\\u00e9t\\u00e9"', b'"\xc3\xa9"', b'"\\ud83d\\ude00"', b'"\\u0000"',
    b'"a\\u0000b"', b'"\\ud800"', b'"\\udc00x"', b'"\xff"', b'"\xed\xa0\x80"', b'"a\x01"', b'"\\x"', b"[]", b"[1]",
    b"[1,2,3]", b"[1,2,3,4]", b"[true]", b"[1.0]", b"[9223372036854775808]", b'["a"]', b'["a","b","c"]',
    b'["a","b","c","d"]', b'["a",null]', b'["\\u0000",""]', b'["\xff"]', b"[1,]", b"{}", b'{"a":1,"a":2}',
    b"[" * 1100 + b"]" * 1100, b'{"a":' * 40 + b"1" + b"}" * 40, b"tru", b"",
]


def _json_number(x: float) -> bytes:
    return orjson.dumps(x) if math.isfinite(x) else b"1e999"


value_texts = st.one_of(
    st.sampled_from(EDGE_VALUES), st.sampled_from(EDGE_VALUES), st.sampled_from(EDGE_VALUES),
    st.integers(min_value=-(2**70), max_value=2**70).map(lambda i: str(i).encode()),
    st.floats(allow_nan=False, allow_infinity=False).map(_json_number),
    st.text(max_size=6).map(lambda t: json.dumps(t, ensure_ascii=False).encode("utf-8", "surrogatepass")),
    st.lists(st.one_of(st.integers(-(2**64), 2**64), st.text(max_size=3)), max_size=5).map(
        lambda v: json.dumps(v).encode()),
)


@st.composite
def hostile_messages(draw, schema: FeatureSchema) -> bytes:
    """A valid sample's fields as (key, JSON text) pairs, then hostile edits of values, keys,
    duplicates and unknown fields, sometimes of the message's bytes."""
    names = [schema.label, schema.event_time, *schema.dense_names, *schema.sparse_names]
    pairs = [(json.dumps(n).encode(), v) for n, v in zip(names, VALID_TEXTS)]
    for _ in range(draw(st.integers(0, 3))):
        edit = draw(st.sampled_from(["value", "drop", "duplicate", "unknown", "escaped key"]))
        at = draw(st.integers(0, len(pairs) - 1)) if pairs else 0
        if edit == "value" and pairs:
            pairs[at] = (pairs[at][0], draw(value_texts))
        elif edit == "drop" and pairs:
            pairs.pop(at)
        elif edit == "duplicate" and pairs:
            pairs.insert(draw(st.integers(0, len(pairs))), (pairs[at][0], draw(value_texts)))
        elif edit == "unknown":
            key = draw(st.sampled_from([b'"extra"', b'"\xff"', b'"lab\\u0065l"', b'"\\ud800"', b'""']))
            pairs.append((key, draw(value_texts)))
        elif edit == "escaped key" and pairs:  # a name written with escapes is the same name
            inner = pairs[at][0][1:-1]
            if inner.isascii() and b"\\" not in inner:
                pairs[at] = (b'"' + "".join(f"\\u{c:04x}" for c in inner).encode() + b'"', pairs[at][1])
    raw = message(pairs)
    damage = draw(st.sampled_from(["none"] * 6 + ["truncate", "bom", "trailing", "spaces", "array", "pad"]))
    if damage == "truncate":
        raw = raw[:draw(st.integers(0, len(raw)))]
    elif damage == "bom":
        raw = b"\xef\xbb\xbf" + raw
    elif damage == "trailing":
        raw += draw(st.sampled_from([b" x", b"\x00", b"{}", b"\n", b" \t\r\n"]))
    elif damage == "spaces":
        raw = b" \n" + raw.replace(b",", b" ,\t") + b"\r\n"
    elif damage == "array":
        raw = b"[" + raw + b"]"
    elif damage == "pad":  # past the small limit of the codec below
        raw = raw[:-1] + b',"pad":"' + b"x" * 3000 + b'"}'
    return raw


def error_outcome(codec: SampleCodec, raw: bytes):
    """The per-message outcome with everything that is compared: sample, or (reason, detail)."""
    try:
        return codec.decode(raw)
    except InvalidSample as e:
        return (e.reason, e.detail)


def assert_same_outcomes(codec: SampleCodec, raws: list[bytes]) -> None:
    expected = [error_outcome(codec, r) for r in raws]
    decoded = codec.decode_batch(raws)
    assert {i: (e.reason, e.detail) for i, e in decoded.errors} == {
        i: e for i, e in enumerate(expected) if isinstance(e, tuple)}
    valid = [(i, e) for i, e in enumerate(expected) if not isinstance(e, tuple)]
    assert decoded.rows.tolist() == [i for i, _ in valid]
    for got, (_, want) in zip(decoded.samples(), valid):
        assert (got.label, got.event_time, got.features.sparse) == (want.label, want.event_time, want.features.sparse)
        np.testing.assert_allclose(got.features.dense, want.features.dense, rtol=1e-12)


VALID_TEXTS = [b"1", b"1700000000.25", b"3", b"7.5", b'"abc"', b"42", b'["a","b"]', b"[1,2]"]


def message(pairs: list[tuple[bytes, bytes]]) -> bytes:
    return b"{" + b",".join(k + b":" + v for k, v in pairs) + b"}"


@pytest.mark.parametrize("unknown_fields", ["reject", "ignore"])
def test_batch_decode_equals_decode_for_every_edge_value_in_every_field(unknown_fields):
    """Exhaustive where the random test is thin: each edge value in each field, alone, before
    and after a duplicate of the field, and as an unknown field."""
    schema = edge_schema(unknown_fields)
    names = [schema.label, schema.event_time, *schema.dense_names, *schema.sparse_names]
    pairs = [(json.dumps(n).encode(), v) for n, v in zip(names, VALID_TEXTS)]
    raws = []
    for at, (key, valid) in enumerate(pairs):
        for value in EDGE_VALUES:
            raws.append(message(pairs[:at] + [(key, value)] + pairs[at + 1:]))
            raws.append(message(pairs + [(key, value)]))
            raws.append(message([(key, value)] + pairs))
    raws += [message(pairs + [(b'"extra"', value)]) for value in EDGE_VALUES]
    assert_same_outcomes(SampleCodec(schema, max_message_bytes=2048), raws)


@pytest.mark.parametrize("unknown_fields", ["reject", "ignore"])
@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_batch_decode_equals_decode_on_hostile_json(unknown_fields, data):
    schema = edge_schema(unknown_fields)
    raws = data.draw(st.lists(hostile_messages(schema), min_size=1, max_size=12))
    assert_same_outcomes(SampleCodec(schema, max_message_bytes=2048), raws)


def test_string_ids_with_nul_and_non_ascii_hash_like_decode():
    """Ids are hashed in one buffer split at NUL: an id holding a NUL must not shift the others."""
    codec = SampleCodec(edge_schema("reject"))
    base = {"label": 0, "ts": 1.0, "x": 1, "log-x": 2, "user id": 5, "hist": [1]}
    raws = [orjson.dumps({**base, "class": c, "tags": t})
            for c, t in [("a\x00b", ["", "\x00"]), ("été", ["😀", "x"]), ("", []), ("plain", ["a\x00", "b"])]]
    assert_same_outcomes(codec, raws)
    assert_same_outcomes(codec, raws[1:2] * 3)
