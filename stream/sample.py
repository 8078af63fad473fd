"""Samples: one labeled example per Kafka message (JSON), validated against the schema.

The codec is the only place that turns untrusted bytes into numbers. Anything it cannot
accept raises `InvalidSample` with a reason short enough to be a metric label and precise
enough to fix the producer; the caller sends the message to the dead-letter topic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import orjson

from stream.hashing import INT64_MAX, INT64_MIN, hash_string_id
from stream.schema import DenseTransform, FeatureSchema

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024


class InvalidSample(ValueError):
    """A message that cannot become a sample. `reason` is a stable, low-cardinality code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True, slots=True)
class Features:
    """What a model reads: dense values (transformed) and sparse keys, in schema order."""

    dense: tuple[float, ...]
    # One tuple of int64 keys per sparse feature (empty when absent).
    sparse: tuple[tuple[int, ...], ...]


@dataclass(frozen=True, slots=True)
class Sample:
    label: int
    event_time: float
    features: Features


class SampleCodec:
    """Decodes and validates samples for one schema; encodes them for producers."""

    def __init__(self, schema: FeatureSchema, max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES) -> None:
        self.schema = schema
        self.max_message_bytes = max_message_bytes
        self._dense = [(f.name, f.transform is DenseTransform.LOG1P, f.default) for f in schema.dense]
        self._sparse = [(f.name, f.id_type == "string", f.multi, f.max_ids) for f in schema.sparse]

    def decode(self, raw: bytes) -> Sample:
        if len(raw) > self.max_message_bytes:
            raise InvalidSample("oversized", f"{len(raw)} bytes > {self.max_message_bytes}")
        try:
            obj = orjson.loads(raw)
        except orjson.JSONDecodeError as e:
            raise InvalidSample("malformed_json", str(e)) from None
        if not isinstance(obj, dict):
            raise InvalidSample("not_an_object", type(obj).__name__)
        return self.from_dict(obj)

    def from_dict(self, obj: dict) -> Sample:
        s = self.schema
        label = obj.get(s.label)
        if label is None:
            raise InvalidSample("missing_label", s.label)
        if isinstance(label, bool) or label not in (0, 1):
            raise InvalidSample("bad_label", f"{s.label}={label!r} is not 0 or 1")
        ts = obj.get(s.event_time)
        if ts is None:
            raise InvalidSample("missing_event_time", s.event_time)
        if isinstance(ts, bool) or not isinstance(ts, (int, float)) or not math.isfinite(ts):
            raise InvalidSample("bad_event_time", f"{s.event_time}={ts!r}")
        return Sample(int(label), float(ts), self.features(obj))

    def features(self, obj: dict) -> Features:
        """The model's input from a dict of feature values (a sample, or a serving request)."""
        return Features(self._dense_values(obj), self._sparse_keys(obj))

    def _dense_values(self, obj: dict) -> tuple[float, ...]:
        out = []
        for name, log1p, default in self._dense:
            v = obj.get(name)
            if v is None:
                out.append(default)
                continue
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise InvalidSample("bad_dense", f"{name}={v!r} is not a number")
            v = float(v)
            if not math.isfinite(v):
                raise InvalidSample("non_finite_dense", f"{name}={v!r}")
            out.append(math.copysign(math.log1p(abs(v)), v) if log1p else v)
        return tuple(out)

    def _sparse_keys(self, obj: dict) -> tuple[tuple[int, ...], ...]:
        out = []
        for name, is_string, multi, max_ids in self._sparse:
            v = obj.get(name)
            if v is None:
                out.append(())
                continue
            values = v if multi else (v,)
            if multi and not isinstance(v, list):
                raise InvalidSample("bad_sparse", f"{name} must be a list of ids")
            if len(values) > max_ids:
                raise InvalidSample("too_many_ids", f"{name} has {len(values)} ids > {max_ids}")
            out.append(tuple(_key(name, x, is_string) for x in values))
        return tuple(out)

    def encode(self, obj: dict) -> bytes:
        """Serialise a sample dict as producers should (compact JSON)."""
        return orjson.dumps(obj)


def _key(name: str, value: object, is_string: bool) -> int:
    if is_string:
        if isinstance(value, str):
            return hash_string_id(value)
        raise InvalidSample("bad_sparse", f"{name}={value!r} is not a string id")
    if isinstance(value, bool) or not isinstance(value, int):
        raise InvalidSample("bad_sparse", f"{name}={value!r} is not an integer id")
    if not INT64_MIN <= value <= INT64_MAX:
        raise InvalidSample("id_out_of_range", f"{name}={value} is outside int64")
    return value
