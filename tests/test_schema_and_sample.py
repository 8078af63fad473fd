import math

import orjson
import pytest

from stream.hashing import hash_string_id
from stream.sample import InvalidSample, SampleCodec
from stream.schema import FeatureSchema, load_schema


@pytest.fixture
def criteo():
    return load_schema("criteo")


def criteo_sample(**overrides):
    sample = {"label": 1, "ts": 1700000000.5, **{f"I{i}": i for i in range(1, 14)},
              **{f"C{i}": f"{i:08x}" for i in range(1, 27)}}
    sample.update(overrides)
    return sample


def test_builtin_schemas_load():
    criteo = load_schema("criteo")
    assert (len(criteo.dense), len(criteo.sparse), len(criteo.tables)) == (13, 26, 26)
    movielens = load_schema("movielens")
    assert [f.table_name for f in movielens.sparse].count("item") == 2  # shared table


def test_schema_rejects_undeclared_tables_and_duplicates():
    with pytest.raises(ValueError, match="not declared"):
        FeatureSchema.from_dict({"sparse": [{"name": "a"}], "tables": {}})
    with pytest.raises(ValueError, match="used twice"):
        FeatureSchema.from_dict({"dense": [{"name": "a"}], "sparse": [{"name": "a"}], "tables": {"a": 4}})


@pytest.mark.parametrize("name", ['a"b', "a\\nb", "tab\there"])
def test_schema_refuses_field_names_json_writes_only_with_escapes(name):
    """Such a name broke the codec's msgspec struct at start-up (ValueError from defstruct);
    now the schema says which name and why."""
    with pytest.raises(ValueError, match="quote, a backslash or a control character"):
        FeatureSchema.from_dict({"sparse": [{"name": name}], "tables": {name: 4}})
    with pytest.raises(ValueError, match="quote, a backslash or a control character"):
        FeatureSchema.from_dict({"label": name, "sparse": [{"name": "s"}], "tables": {"s": 4}})


def test_decode_valid_sample(criteo):
    s = SampleCodec(criteo).decode(orjson.dumps(criteo_sample(I1=None)))
    assert s.label == 1 and s.event_time == 1700000000.5
    assert s.features.dense[0] == 0.0  # null dense reads the feature's default
    assert s.features.dense[1] == pytest.approx(math.log1p(2))
    assert s.features.sparse[0] == (hash_string_id("00000001"),)


def test_string_ids_hash_stably_to_int64():
    # xxh64 of "a" with seed 0 is 0xd24ec4f1a98c6e5b; as signed int64:
    assert hash_string_id("a") == 0xD24EC4F1A98C6E5B - (1 << 64)


@pytest.mark.parametrize("raw, reason", [
    (b"{not json", "malformed_json"),
    (b"[1, 2]", "not_an_object"),
    (orjson.dumps(criteo_sample(label=2)), "bad_label"),
    (orjson.dumps(criteo_sample(label=True)), "bad_label"),
    (orjson.dumps({k: v for k, v in criteo_sample().items() if k != "label"}), "missing_label"),
    (orjson.dumps({k: v for k, v in criteo_sample().items() if k != "ts"}), "missing_event_time"),
    (orjson.dumps(criteo_sample(I3="many")), "bad_dense"),
    (b'{"label": 0, "ts": 1, "I1": NaN}', "malformed_json"),
    (orjson.dumps(criteo_sample(C1=12)), "bad_sparse"),
    (b"x" * 70_000, "oversized"),
])
def test_invalid_samples_say_why(criteo, raw, reason):
    with pytest.raises(InvalidSample) as e:
        SampleCodec(criteo).decode(raw)
    assert e.value.reason == reason


def test_non_finite_dense_and_int64_range():
    schema = load_schema("movielens")
    codec = SampleCodec(schema)
    base = {"label": 0, "ts": 1.0, "user_id": 1, "item_id": 2, "history": [1, 2], "genres": ["a"], "occupation": "x"}
    with pytest.raises(InvalidSample) as e:
        codec.from_dict({**base, "age": float("inf")})
    assert e.value.reason == "non_finite_dense"
    # finite as float64, inf as the float32 the model reads: one such sample made every
    # dense weight NaN after one step. A log1p feature brings any float64 into range.
    with pytest.raises(InvalidSample) as e:
        codec.from_dict({**base, "age": 1e300})
    assert e.value.reason == "non_finite_dense" and "float32" in e.value.detail
    assert codec.from_dict({**base, "item_popularity": 1e300}).features.dense[1] == pytest.approx(690.7755)
    with pytest.raises(InvalidSample) as e:
        codec.from_dict({**base, "user_id": 2**63})
    assert e.value.reason == "id_out_of_range"
    with pytest.raises(InvalidSample) as e:
        codec.from_dict({**base, "history": 5})
    assert e.value.reason == "bad_sparse"
    assert codec.from_dict(base).features.sparse[2] == (1, 2)
