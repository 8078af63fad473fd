"""Samples: one labeled example per Kafka message (JSON, or the binary format of
`stream.binary`), validated against the schema.

The codec is the only place that turns untrusted bytes into numbers. Anything it cannot
accept raises `InvalidSample` with a reason short enough to be a metric label and precise
enough to fix the producer; the caller sends the message to the dead-letter topic.

`decode_batch` decodes a whole micro-batch into columns (numpy arrays) at once, which is what
the trainer reads: msgspec parses each JSON message into a schema-derived struct, validating
types and ranges in C, and the columns are read off the structs, instead of 39 Python checks
per message. Its result is defined to be the per-message `decode`: a message msgspec refuses
goes through `decode` itself, so a message is accepted, or refused with a reason, exactly as
`decode` would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from functools import partial
from itertools import chain, repeat
from operator import attrgetter, is_not
from typing import Annotated, Sequence

import msgspec
import numpy as np
import orjson

from stream.binary import NOT_BINARY, REASONS, BinarySampleFormat
from stream.columns import FLOAT32_MAX, MessageBuffer, SampleColumns
from stream.hashing import INT64_MAX, INT64_MIN, hash_string_id, hash_string_ids
from stream.json_scan import JsonSampleScanner
from stream.schema import DenseFeature, DenseTransform, FeatureSchema

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024


class InvalidSample(ValueError):
    """A message that cannot become a sample. `reason` is a stable, low-cardinality code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


def parse_object(raw: bytes, max_bytes: int, error: type[InvalidSample] = InvalidSample) -> dict:
    """Untrusted bytes to a JSON object, or `error` saying why: oversized, malformed_json or
    not_an_object (shared by samples and the joiner's impressions and clicks)."""
    if len(raw) > max_bytes:
        raise error("oversized", f"{len(raw)} bytes > {max_bytes}")
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise error("malformed_json", str(e)) from None
    if not isinstance(obj, dict):
        raise error("not_an_object", type(obj).__name__)
    return obj


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
        self._dense_log1p = np.array([log1p for _, log1p, _ in self._dense], dtype=bool)
        self._dense_default = np.array([default for _, _, default in self._dense], dtype=np.float64)
        self._sparse = [(f.name, f.id_type == "string", f.multi, f.max_ids) for f in schema.sparse]
        self._known = None if schema.unknown_fields == "ignore" else frozenset(
            [schema.label, schema.event_time, *schema.dense_names, *schema.sparse_names])
        self.binary = BinarySampleFormat(schema, max_message_bytes)
        self._json_scanner = JsonSampleScanner(schema, max_message_bytes)
        self._json = _JsonBatchDecoder(self)

    def decode(self, raw: bytes) -> Sample:
        return self.from_dict(parse_object(raw, self.max_message_bytes))

    def from_dict(self, obj: dict) -> Sample:
        s = self.schema
        if self._known is not None and not self._known.issuperset(obj):
            unknown = sorted(str(k) for k in obj if k not in self._known)
            raise InvalidSample("unknown_field", ", ".join(unknown)[:200])
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
            try:
                v = float(v)
            except OverflowError:  # an int too large for a float (a dict, not JSON, can hold one)
                raise InvalidSample("non_finite_dense", f"{name} is too large") from None
            if not math.isfinite(v):
                raise InvalidSample("non_finite_dense", f"{name}={v!r}")
            if log1p:
                v = math.copysign(math.log1p(abs(v)), v)
            elif abs(v) > FLOAT32_MAX:  # the model reads float32: it would be inf, and poison the weights
                raise InvalidSample("non_finite_dense", f"{name}={v!r} overflows float32")
            out.append(v)
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

    def decode_batch(self, raws: Sequence[bytes]) -> "DecodedBatch":
        """Decode and validate many messages at once, JSON and binary alike; for JSON the same
        outcome per message as `decode`.

        Binary messages go through `stream.binary`'s compiled scan; JSON ones through
        `stream.json_scan`'s, and whatever it leaves (escapes, non-ASCII text, anything it
        does not accept) through msgspec structs, and what msgspec refuses through `decode`."""
        raws = list(raws)
        messages = MessageBuffer.of(raws)
        columns, status = self.binary.decode(messages)
        binary = self._from_columns(columns)
        binary.errors = [(i, InvalidSample(REASONS[code], self.binary.explain(raws[i], code)))
                         for i, code in zip(*_refused(status))]
        json_rows = np.flatnonzero(status == NOT_BINARY)
        if len(json_rows) == 0:
            return binary
        scanned, left = self._json_scanner.scan(messages, json_rows)
        parts = [binary, self._from_columns(scanned)]
        if len(left):
            parts.append(self._json.decode([raws[i] for i in left.tolist()]).at_rows(left))
        return _combine(parts)

    def encode(self, obj: dict) -> bytes:
        """Serialise a sample dict as producers should (compact JSON)."""
        return orjson.dumps(obj)

    def encode_binary(self, obj: dict) -> bytes:
        """The same sample in the binary format (`stream.binary`); refuses what `decode` would
        refuse, so a producer cannot write a sample the trainer dead-letters."""
        sample = self.from_dict(obj)
        dense = [obj.get(name) for name, _, _ in self._dense]
        for (name, _, _), v in zip(self._dense, dense):
            if v is not None and abs(v) > FLOAT32_MAX:
                raise InvalidSample("non_finite_dense", f"{name}={v!r} overflows float32")
        return self.binary.encode(sample.label, sample.event_time, dense, list(sample.features.sparse))

    def _from_columns(self, c: SampleColumns) -> "DecodedBatch":
        dense = _transform_dense(c.dense, self._dense_log1p, self._dense_default)
        return DecodedBatch(c.rows, c.labels, c.event_times, dense,
                            [SparseColumn(k, n) for k, n in zip(c.keys, c.lengths)])


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


# -- batch decoding --------------------------------------------------------------------------

@dataclass
class SparseColumn:
    """One sparse feature over the valid rows: flat keys and ids per row."""

    keys: np.ndarray  # int64 [total ids]
    lengths: np.ndarray  # int64 [rows]


@dataclass
class DecodedBatch:
    """Valid samples as columns, in message order, and the refused messages with their reason."""

    rows: np.ndarray  # int64 [n]: index of each valid sample in the decoded messages
    labels: np.ndarray  # int64 [n]
    event_times: np.ndarray  # float64 [n]
    dense: np.ndarray  # float64 [n, n_dense], transformed, defaults filled in
    sparse: list[SparseColumn]  # schema order
    errors: list[tuple[int, InvalidSample]] = field(default_factory=list)  # (message index, why)

    def __len__(self) -> int:
        return len(self.rows)

    def features(self) -> list[Features]:
        """Per-sample `Features` (what `decode` returns), for callers that want objects."""
        dense = [tuple(r) for r in self.dense.astype(np.float64).tolist()]
        per_feature = []
        for col in self.sparse:
            keys = col.keys.tolist()
            ends = np.cumsum(col.lengths).tolist()
            starts = [0, *ends[:-1]]
            per_feature.append([tuple(keys[a:b]) for a, b in zip(starts, ends)])
        sparse = list(zip(*per_feature)) if per_feature else [()] * len(self)
        return [Features(d, tuple(s)) for d, s in zip(dense, sparse)]

    def samples(self) -> list[Sample]:
        return [Sample(int(y), float(t), f)
                for y, t, f in zip(self.labels.tolist(), self.event_times.tolist(), self.features())]

    def at_rows(self, message_index: np.ndarray) -> "DecodedBatch":
        """This batch with message indices mapped through `message_index` (it decoded a subset)."""
        self.rows = message_index[self.rows]
        self.errors = [(int(message_index[i]), e) for i, e in self.errors]
        return self


def _refused(status: np.ndarray) -> tuple[list[int], list[int]]:
    at = np.flatnonzero(status > NOT_BINARY)
    return at.tolist(), status[at].tolist()


def _transform_dense(x: np.ndarray, log1p: np.ndarray | bool, default: np.ndarray | float) -> np.ndarray:
    """Dense values as the model reads them: NaN (absent) -> the default, then the transform.
    Works on one column (scalar flags) or on the matrix (a flag and a default per column)."""
    transformed = np.where(log1p, np.copysign(np.log1p(np.abs(x)), x), x)
    return np.where(np.isnan(x), default, transformed)


def _combine(parts: list[DecodedBatch]) -> DecodedBatch:
    """Batches decoded from disjoint messages of one micro-batch, as one, in message order
    (the common case, one part with anything in it, costs nothing)."""
    used = [p for p in parts if len(p) or p.errors] or parts[:1]
    combined = used[0]
    for part in used[1:]:
        combined = _merge(combined, part)
    return combined


def _merge(a: DecodedBatch, b: DecodedBatch) -> DecodedBatch:
    """Two batches decoded from disjoint messages of one micro-batch, in message order."""
    order = np.argsort(np.concatenate([a.rows, b.rows]), kind="stable")
    columns = []
    for ca, cb in zip(a.sparse, b.sparse):
        lengths = np.concatenate([ca.lengths, cb.lengths])
        starts = np.zeros(len(lengths), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        ordered = lengths[order]
        # keys of row r move from starts[r] to its place in the new order, ids in sequence
        moved = np.repeat(starts[order] - (np.cumsum(ordered) - ordered), ordered) + np.arange(ordered.sum())
        columns.append(SparseColumn(np.concatenate([ca.keys, cb.keys])[moved], ordered))
    return DecodedBatch(np.concatenate([a.rows, b.rows])[order], np.concatenate([a.labels, b.labels])[order],
                        np.concatenate([a.event_times, b.event_times])[order],
                        np.concatenate([a.dense, b.dense])[order], columns,
                        sorted(a.errors + b.errors, key=lambda e: e[0]))


_FLOAT32_RANGE = Annotated[float, msgspec.Meta(ge=-FLOAT32_MAX, le=FLOAT32_MAX)]


def dense_value_type(feature: DenseFeature) -> object:
    """A dense value as msgspec checks it: a float, which must fit float32 when the model
    reads it as it is (as inf it would poison the weights); log1p brings any float64 in range."""
    return float if feature.transform is DenseTransform.LOG1P else _FLOAT32_RANGE


def _row_type(schema: FeatureSchema) -> type[msgspec.Struct]:
    """The shape of a sample the fast path accepts, as a msgspec struct decoded in strict mode.

    Each field admits a subset of what `from_dict` accepts, read the same way: the label as
    the integer 0 or 1 (not a bool; a float 1.0, which `from_dict` takes, goes to the exact
    path), numbers for event time and dense features (ints read as floats, as `float()` reads
    them), ids of the declared type within int64, lists of at most `max_ids` ids. Unknown fields are forbidden under both schema policies, because msgspec skips an
    ignored field without validating it (it accepts 1e999 or bad UTF-8 there; orjson does
    not). Attributes are named f0, f1, ...: schema names need not be Python identifiers."""
    int64 = Annotated[int, msgspec.Meta(ge=INT64_MIN, le=INT64_MAX)]
    types: list[object] = [Annotated[int, msgspec.Meta(ge=0, le=1)], float]
    types += [dense_value_type(f) | None for f in schema.dense]
    for f in schema.sparse:
        one = str if f.id_type == "string" else int64
        types.append((Annotated[list[one], msgspec.Meta(max_length=f.max_ids)] if f.multi else one) | None)
    names = [schema.label, schema.event_time, *schema.dense_names, *schema.sparse_names]
    fields = [(f"f{i}", t) if i < 2 else (f"f{i}", t, None) for i, t in enumerate(types)]
    return msgspec.defstruct("JsonSample", fields, rename={f"f{i}": n for i, n in enumerate(names)},
                             forbid_unknown_fields=True, gc=False)


class _JsonBatchDecoder:
    """JSON micro-batches as columns. msgspec decodes each message into the schema's struct
    (`_row_type`), checking every type and range in C as it parses; the columns are then read
    off the structs with one pass per group of features. A message msgspec refuses (or that is
    oversized) is decided by `SampleCodec.decode`, the per-message definition, so every
    message is accepted, or refused with the same reason and detail, exactly as `decode` would."""

    def __init__(self, codec: SampleCodec) -> None:
        self.codec = codec
        s = codec.schema
        self.decoder = msgspec.json.Decoder(_row_type(s))
        self.n_dense = len(s.dense)
        self.numbers = attrgetter(*(f"f{i}" for i in range(2 + self.n_dense)))
        first_sparse = 2 + self.n_dense
        self.singles = [[j for j, f in enumerate(s.sparse) if not f.multi and (f.id_type == "string") == is_string]
                        for is_string in (False, True)]
        self.attr = [f"f{first_sparse + j}" for j in range(len(s.sparse))]
        self.multis = [(j, f.id_type == "string") for j, f in enumerate(s.sparse) if f.multi]

    def decode(self, raws: Sequence[bytes]) -> DecodedBatch:
        structs, index, slow = self._parse(raws)
        numbers = np.array(list(map(self.numbers, structs)), dtype=np.float64).reshape(len(structs), 2 + self.n_dense)
        finite = np.isfinite(numbers[:, 1]) & ~np.isinf(numbers[:, 2:]).any(axis=1)
        if not finite.all():  # msgspec refuses numbers beyond float64: a guard, not a path taken
            slow = sorted(slow + index[~finite].tolist())
            structs = [structs[r] for r in np.flatnonzero(finite).tolist()]
            index, numbers = index[finite], numbers[finite]
        fast = self._columns(structs, index, numbers)
        return _merge(fast, self._decide(raws, slow)) if slow else fast

    def _parse(self, raws: Sequence[bytes]) -> tuple[list, np.ndarray, list[int]]:
        """Structs of the messages msgspec accepts, their message indices, and the indices of
        the others. One `map` when the whole batch parses (the common case)."""
        decode, limit = self.decoder.decode, self.codec.max_message_bytes
        if max(map(len, raws), default=0) <= limit:
            try:
                return list(map(decode, raws)), np.arange(len(raws), dtype=np.int64), []
            except msgspec.DecodeError:
                pass
        structs, index, slow = [], [], []
        for i, raw in enumerate(raws):
            try:
                if len(raw) <= limit:
                    structs.append(decode(raw))
                    index.append(i)
                    continue
            except msgspec.DecodeError:
                pass
            slow.append(i)
        return structs, np.array(index, dtype=np.int64), slow

    def _columns(self, structs: list, index: np.ndarray, numbers: np.ndarray) -> DecodedBatch:
        codec = self.codec
        sparse: list[SparseColumn | None] = [None] * len(self.attr)
        for is_string, positions in enumerate(self.singles):
            if positions:
                for j, column in zip(positions, self._singles(structs, positions, bool(is_string))):
                    sparse[j] = column
        for j, is_string in self.multis:
            lists = [v or () for v in map(attrgetter(self.attr[j]), structs)]
            lengths = np.fromiter(map(len, lists), dtype=np.int64, count=len(lists))
            sparse[j] = SparseColumn(self._keys(list(chain.from_iterable(lists)), is_string), lengths)
        dense = _transform_dense(numbers[:, 2:], codec._dense_log1p, codec._dense_default)
        return DecodedBatch(index, numbers[:, 0].astype(np.int64), numbers[:, 1].copy(), dense, sparse)

    def _singles(self, structs: list, positions: list[int], is_string: bool) -> list[SparseColumn]:
        """Single-valued features of one id type in one row-major pass over the batch."""
        n, k = len(structs), len(positions)
        names = [self.attr[j] for j in positions]
        if k == 1:  # attrgetter of one name returns the value, not a 1-tuple
            flat = list(map(attrgetter(names[0]), structs))
        else:
            flat = list(chain.from_iterable(map(attrgetter(*names), structs)))
        present = np.fromiter(map(is_not, flat, repeat(None)), dtype=bool, count=n * k).reshape(n, k)
        keys = np.zeros((n, k), dtype=np.int64)
        keys[present] = self._keys(list(filter(partial(is_not, None), flat)), is_string)
        return [SparseColumn(keys[:, c][present[:, c]], present[:, c].astype(np.int64)) for c in range(k)]

    def _keys(self, ids: list, is_string: bool) -> np.ndarray:
        if is_string:
            return hash_string_ids(ids)
        return np.array(ids, dtype=np.int64).reshape(-1)  # msgspec checked the int64 range

    def _decide(self, raws: Sequence[bytes], indices: list[int]) -> DecodedBatch:
        """The per-message codec's outcome for each of these messages, as a batch."""
        codec = self.codec
        at: list[int] = []
        samples: list[Sample] = []
        errors: list[tuple[int, InvalidSample]] = []
        for i in indices:
            try:
                samples.append(codec.decode(raws[i]))
                at.append(i)
            except InvalidSample as e:
                errors.append((i, e))
        n = len(samples)
        sparse = []
        for j in range(len(self.attr)):
            per_row = [s.features.sparse[j] for s in samples]
            keys = np.fromiter(chain.from_iterable(per_row), dtype=np.int64)
            sparse.append(SparseColumn(keys, np.fromiter(map(len, per_row), dtype=np.int64, count=n)))
        dense = np.array([s.features.dense for s in samples], dtype=np.float64).reshape(n, self.n_dense)
        return DecodedBatch(np.array(at, dtype=np.int64), np.array([s.label for s in samples], dtype=np.int64),
                            np.array([s.event_time for s in samples], dtype=np.float64), dense, sparse, errors)
