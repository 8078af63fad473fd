"""The compiled JSON scanner (stream/json_scan.py): it must take the JSON producers write, read
every number to the double the definition reads, and leave everything else to the msgspec
and per-message paths (tests/test_ingest_decode.py checks the outcome of the whole batch
decoder against the definition)."""

from __future__ import annotations

import random

import numpy as np
import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from stream.columns import MessageBuffer
from stream.json_scan import JsonSampleScanner
from stream.sample import SampleCodec
from stream.schema import FeatureSchema, load_schema
from stream.synthetic import SyntheticStream
from tests.test_ingest_decode import movielens_samples

CRITEO = load_schema("criteo")
SCHEMA = FeatureSchema.from_dict({
    "name": "scan", "dense": [{"name": "x"}, {"name": "y", "transform": "log1p"}],
    "sparse": [{"name": "s"}, {"name": "i", "id_type": "int"}, {"name": "tags", "multi": True, "max_ids": 3},
               {"name": "hist", "id_type": "int", "multi": True, "max_ids": 3}],
    "tables": {"s": 4, "i": 4, "tags": 4, "hist": 4}})


def scan(schema: FeatureSchema, raws: list[bytes]):
    scanner = JsonSampleScanner(schema, 64 * 1024)
    return scanner.scan(MessageBuffer.of(raws), np.arange(len(raws), dtype=np.int64))


def test_what_producers_write_is_scanned_whole():
    """Criteo samples as `freshrec produce` writes them (17-digit timestamps, nulls) and
    MovieLens ones (multi-valued ids, absent fields): none is left to the slower paths, and
    the columns are the definition's."""
    criteo = [orjson.dumps(s) for s in SyntheticStream(CRITEO, seed=4).take(300)]
    movielens = [orjson.dumps(s) for s in movielens_samples(random.Random(4), 300)]
    for schema, raws in [(CRITEO, criteo), (load_schema("movielens"), movielens)]:
        columns, left = scan(schema, raws)
        assert left.tolist() == []
        codec = SampleCodec(schema)
        want = [codec.decode(r) for r in raws]
        assert columns.labels.tolist() == [s.label for s in want]
        assert columns.event_times.tolist() == [s.event_time for s in want]
        for j in range(len(schema.sparse)):
            assert columns.lengths[j].tolist() == [len(s.features.sparse[j]) for s in want]
            assert columns.keys[j].tolist() == [k for s in want for k in s.features.sparse[j]]
        raw_dense = [[float(v) if (v := orjson.loads(r).get(name)) is not None else np.nan
                      for name in schema.dense_names] for r in raws]
        np.testing.assert_array_equal(columns.dense, np.array(raw_dense).reshape(len(raws), len(schema.dense)))


NUMBERS = [b"0", b"-0", b"0.0", b"-0.0", b"0e5", b"1", b"-1", b"1.5", b"0.1", b"1e22", b"1e23", b"1E+2", b"1e-2",
           b"123456789012345", b"1234567890123456", b"123456789012345678", b"1234567890123456789",
           b"9007199254740993", b"0.30000000000000004", b"1796583632.9448745", b"1700000000", b"5e-324",
           b"2.2250738585072011e-308", b"1.7976931348623157e308", b"3.4028234663852886e38", b"1e-400",
           b"123.456e-7", b"0.000001234567890123456789"]


def number_messages(text: bytes) -> list[bytes]:
    base = b'"label":1,"s":"a","i":1,"tags":[],"hist":null'
    return [b'{' + base + b',"ts":' + text + b',"x":1,"y":2}', b'{' + base + b',"ts":1,"x":' + text + b',"y":' + text
            + b'}']


@pytest.mark.parametrize("text", NUMBERS)
def test_every_number_reads_as_the_definition_reads_it_bit_for_bit(text):
    check_number(text)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.floats(allow_nan=False, allow_infinity=False).map(orjson.dumps),
                 st.floats(allow_nan=False, allow_infinity=False).map(lambda f: repr(f).encode()),
                 st.integers(-(2**70), 2**70).map(lambda i: str(i).encode()),
                 st.tuples(st.integers(0, 10**20), st.integers(0, 10**20), st.integers(-330, 330)).map(
                     lambda t: f"{t[0]}.{t[1]}e{t[2]}".encode())))
def test_random_numbers_read_as_the_definition_reads_them(text):
    check_number(text)


def check_number(text: bytes) -> None:
    """A number as the event time and as both dense values: taken and read to the bits
    `SampleCodec.decode` gives, or left when the definition refuses it (not finite, or beyond
    float32 on a feature the model reads as it is)."""
    codec = SampleCodec(SCHEMA)
    raws = number_messages(text)
    columns, left = scan(SCHEMA, raws)
    for i, raw in enumerate(raws):
        try:
            want = codec.decode(raw)
        except ValueError:
            assert i in left.tolist()
            continue
        at = columns.rows.tolist().index(i)
        if i == 0:
            assert columns.event_times[at].tobytes() == np.float64(want.event_time).tobytes()
        else:
            assert columns.dense[at, 0].tobytes() == np.float64(want.features.dense[0]).tobytes()
            assert columns.dense[at, 1].tobytes() == np.float64(float(orjson.loads(text))).tobytes()


def test_json_whitespace_and_any_field_order_are_scanned():
    """Whitespace between tokens, and messages whose fields come in different orders (the
    scanner first tries the order of the message before)."""
    a = b'{"label":0,"ts":1.5,"x":1,"y":2,"s":"p","i":7,"tags":["a","b"],"hist":[1,2]}'
    b = b' {\n "hist" : [ 3 ] ,\t"tags":[ ],"s":"q", "i":-8,"y":null,"x":3.25,"ts":2,"label":1 }\r\n'
    c = b'{"ts":3,"label":1}'
    columns, left = scan(SCHEMA, [a, b, c, a, b])
    assert left.tolist() == []
    codec = SampleCodec(SCHEMA)
    decoded = codec.decode_batch([a, b, c, a, b])
    for got, want in zip(decoded.samples(), [codec.decode(r) for r in [a, b, c, a, b]]):
        assert (got.label, got.event_time, got.features.sparse) == (want.label, want.event_time, want.features.sparse)
        # log1p: numpy's (vectorised) and math's may differ in the last bit of a float64
        np.testing.assert_allclose(got.features.dense, want.features.dense, rtol=1e-15)
    assert columns.lengths[2].tolist() == [2, 0, 0, 2, 0] and columns.keys[3].tolist() == [1, 2, 3, 1, 2, 3]


LEFT_ALONE = {
    "escape in an id": b'{"label":1,"ts":1,"s":"a\\u0062"}',
    "escaped key": b'{"label":1,"ts":1,"\\u0073":"a"}',
    "non-ASCII id": '{"label":1,"ts":1,"s":"été"}'.encode(),
    "control byte in an id": b'{"label":1,"ts":1,"s":"a\x01"}',
    "repeated field": b'{"label":1,"ts":1,"x":1,"x":2}',
    "unknown field": b'{"label":1,"ts":1,"z":1}',
    "bool label": b'{"label":true,"ts":1}',
    "label 1.0": b'{"label":1.0,"ts":1}',
    "label 2": b'{"label":2,"ts":1}',
    "null label": b'{"label":null,"ts":1}',
    "no event time": b'{"label":1}',
    "string dense": b'{"label":1,"ts":1,"x":"1"}',
    "dense beyond float32": b'{"label":1,"ts":1,"x":3.5e38}',
    "event time not finite": b'{"label":1,"ts":1e999}',
    "19-digit int id": b'{"label":1,"ts":1,"i":1234567890123456789}',
    "float int id": b'{"label":1,"ts":1,"i":1.0}',
    "int for a string id": b'{"label":1,"ts":1,"s":1}',
    "list for a single id": b'{"label":1,"ts":1,"s":["a"]}',
    "too many ids": b'{"label":1,"ts":1,"tags":["a","b","c","d"]}',
    "null in a list": b'{"label":1,"ts":1,"tags":["a",null]}',
    "trailing comma": b'{"label":1,"ts":1,}',
    "leading zero": b'{"label":1,"ts":01}',
    "bare dot": b'{"label":1,"ts":1.}',
    "trailing bytes": b'{"label":1,"ts":1} x',
    "two objects": b'{"label":1,"ts":1}{}',
    "truncated": b'{"label":1,"ts":1',
    "array": b'[{"label":1,"ts":1}]',
    "empty": b"",
    "byte order mark": b'\xef\xbb\xbf{"label":1,"ts":1}',
}


def test_what_the_scanner_does_not_take_is_left_to_the_definition():
    raws = list(LEFT_ALONE.values())
    columns, left = scan(SCHEMA, raws)
    assert [list(LEFT_ALONE)[i] for i in columns.rows.tolist()] == []
    assert left.tolist() == list(range(len(raws)))


def test_non_ascii_field_names_are_left_to_the_other_paths():
    """The scanner reads keys of printable ASCII only; a schema may still name a field in any
    language, and such messages are decided by the msgspec path."""
    schema = FeatureSchema.from_dict({"name": "ü", "sparse": [{"name": "städte"}], "tables": {"städte": 4}})
    raws = ['{"label":1,"ts":1,"städte":"köln"}'.encode(), b'{"label":0,"ts":2}']
    columns, left = scan(schema, raws)
    assert columns.rows.tolist() == [1] and left.tolist() == [0]
    codec = SampleCodec(schema)
    assert codec.decode_batch(raws).samples() == [codec.decode(r) for r in raws]
