"""The serving request parser: its msgspec fast path accepts exactly what the pydantic
request models accept, with the same values, and refuses the rest with their 422; and the
inputs it builds are the trainer codec's features of each row merged over the context."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.api import InvalidRequest, RequestParser, TooLarge
from stream.sample import SampleCodec
from stream.schema import load_schema

SCHEMA = load_schema("movielens")  # string and int ids, multi-valued features, log1p dense
PARSER = RequestParser(SCHEMA, max_examples=6)
CODEC = SampleCodec(SCHEMA)
NAMES = SCHEMA.dense_names + SCHEMA.sparse_names + [SCHEMA.label, SCHEMA.event_time, "bogus"]

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**64), 2**64), st.floats(allow_nan=False, allow_infinity=False),
    st.sampled_from([0, -0.0, 1.0, 2**63 - 1, -(2**63), 2**63, 1e308, 3.5e38, -3.5e38, 3.4028234663852886e38, "",
                     "7", "a\u0000b", "é"]),
    st.text(max_size=4))
values = st.one_of(scalars, st.lists(scalars, max_size=4), st.dictionaries(st.text(max_size=2), scalars, max_size=2))

def valid(name: str) -> st.SearchStrategy:
    """Values the request models accept for a field (None included)."""
    if name in SCHEMA.dense_names:
        return st.one_of(st.none(), st.integers(-1000, 10**6), st.floats(-1e6, 1e6, allow_nan=False))
    f = next(f for f in SCHEMA.sparse if f.name == name)
    one = st.text(max_size=3) if f.id_type == "string" else st.integers(-(2**63), 2**63 - 1)
    return st.one_of(st.none(), st.lists(one, max_size=f.max_ids) if f.multi else one)


fields = {n: valid(n) for n in SCHEMA.dense_names + SCHEMA.sparse_names}
fields.update({SCHEMA.label: scalars, SCHEMA.event_time: scalars})
good_rows = st.fixed_dictionaries({}, optional=fields)
# Mostly valid rows, some with one field of any type or an unknown field: the fast path and
# the pydantic models must agree on both sides of every boundary.
rows = st.one_of(good_rows, good_rows, good_rows, st.dictionaries(st.sampled_from(NAMES), values, max_size=5),
                 st.builds(lambda r, k, v: {**r, k: v}, good_rows, st.sampled_from(NAMES), values))
bodies = st.one_of(
    st.fixed_dictionaries({"candidates": st.lists(rows, max_size=7)}, optional={"context": rows}),
    st.fixed_dictionaries({"examples": st.lists(rows, max_size=7)}),
    st.dictionaries(st.sampled_from(["examples", "context", "candidates", "other"]),
                    st.one_of(st.none(), rows, st.lists(rows, max_size=7), scalars), max_size=3))


def bags(inputs) -> list[list[tuple[int, ...]]]:
    """Each feature's bag per row, whatever the representation (shared context bag or not)."""
    out = []
    for s in inputs.sparse:
        keys = s.keys.tolist()
        if s.offsets is None:
            out.append([tuple(keys)] * inputs.n)
            continue
        ends = [*s.offsets[1:].tolist(), len(keys)]
        out.append([tuple(keys[a:b]) for a, b in zip(s.offsets.tolist(), ends)])
    return out


def outcome(parse, body: bytes):
    try:
        inputs = parse(body)
    except InvalidRequest as e:
        return ("422", e.errors)
    except TooLarge as e:
        return ("413", str(e))
    return ("ok", inputs.n, inputs.dense.numpy().tobytes(), bags(inputs))


def pydantic_only(body: bytes):
    context, rows = PARSER._parse_pydantic(body)
    if len(rows) > PARSER.max_examples:
        raise TooLarge(f"{len(rows)} examples or candidates exceed the limit of {PARSER.max_examples}")
    return PARSER.inputs(context, rows)


def check(body: bytes) -> None:
    got = outcome(PARSER.parse, body)
    assert got == outcome(pydantic_only, body)
    if got[0] == "ok":  # the model's input is the trainer's features of each row over the context
        request = json.loads(body)
        context = request.get("context") or {}
        examples = request.get("examples")
        rows = examples if examples is not None else request["candidates"]
        merged = [{**context, **row} for row in rows]
        features = [CODEC.features(m) for m in merged]
        dense = torch.tensor([f.dense for f in features], dtype=torch.float32).reshape(len(merged), len(SCHEMA.dense))
        parsed = PARSER.parse(body).dense  # one row, every row's, unless a row sets a dense feature
        rows_set_dense = any(name in row for row in rows for name in SCHEMA.dense_names)
        assert len(parsed) == (len(merged) if rows_set_dense else 1)
        assert torch.equal(parsed.expand(len(merged), -1), dense)
        assert got[3] == [[f.sparse[j] for f in features] for j in range(len(SCHEMA.sparse))]


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(bodies)
def test_fast_path_accepts_and_refuses_as_the_pydantic_models_do(body):
    check(json.dumps(body).encode())


@given(st.lists(st.fixed_dictionaries({"user_id": st.integers(0, 50)}), max_size=6),
       st.sampled_from(["x", None]), st.integers(0, 99))
def test_ranking_bodies_build_the_trainers_features(candidates, genre, age):
    check(json.dumps({"context": {"genres": None if genre is None else [genre, "y"], "age": age},
                      "candidates": candidates}).encode())


@pytest.mark.parametrize("body", [
    b'{"candidates": [{"occupation": "a", "occupation": "b"}]}',  # duplicate keys: the last one counts
    b'{"candidates": [{"age": 1e400}]}',  # beyond float64
    b'{"candidates": [{"age": NaN}]}',
    b'{"candidates": [{"occupation": "\\ud800"}]}',  # a lone surrogate
    b'{"candidates": []} trailing',
    b'{"candidates": [], "candidates": null}',
    b'{"examples": [{"item_id": 9223372036854775808}]}',
    b'{"examples": [{"item_id": 1.0}]}',
    b'{"examples": [{"age": 3.5e38}]}', b'{"examples": [{"item_popularity": 1e300}]}',  # float32's range
    b'{"examples": [{}], "context": {}}', b'{"examples": [{}], "candidates": [{}]}', b'{"context": {}}',
    b'[]', b'', b'null',
])
def test_edge_bodies_get_the_pydantic_outcome(body):
    assert outcome(PARSER.parse, body) == outcome(pydantic_only, body)
