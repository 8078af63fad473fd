"""Samples: one labeled example per Kafka message (JSON, or the binary format of
`stream.binary`), validated against the schema.

The codec is the only place that turns untrusted bytes into numbers. Anything it cannot
accept raises `InvalidSample` with a reason short enough to be a metric label and precise
enough to fix the producer; the caller sends the message to the dead-letter topic.

`decode_batch` decodes a whole micro-batch into columns (numpy arrays) at once, which is what
the trainer reads: per field, one type check over the column and one conversion, instead of
39 Python checks per message. Its result is defined to be the per-message `decode`: rows the
column checks cannot vouch for go through `decode`'s own code (`from_dict`), so a message is
accepted, or refused with a reason, exactly as `decode` would.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from itertools import repeat
from operator import is_not, itemgetter
from typing import Sequence

import numpy as np
import orjson

from stream.binary import NOT_BINARY, REASONS, BinaryColumns, BinarySampleFormat
from stream.hashing import INT64_MAX, INT64_MIN, hash_string_id
from stream.schema import DenseTransform, FeatureSchema

DEFAULT_MAX_MESSAGE_BYTES = 64 * 1024
_FLOAT32_MAX = float(np.finfo(np.float32).max)


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

    def decode_batch(self, raws: Sequence[bytes]) -> "DecodedBatch":
        """Decode and validate many messages at once, JSON and binary alike; for JSON the same
        outcome per message as `decode`."""
        raws = list(raws)
        columns, status = self.binary.decode(raws)
        binary = self._from_binary(columns)
        binary.errors = [(i, InvalidSample(REASONS[code], self.binary.explain(raws[i], code)))
                         for i, code in zip(*_refused(status))]
        json_rows = np.flatnonzero(status == NOT_BINARY)
        if len(json_rows) == 0:
            return binary
        if len(json_rows) == len(raws):
            return _BatchDecoder(self).decode(raws)
        return _merge(binary, _BatchDecoder(self).decode([raws[i] for i in json_rows.tolist()]).at_rows(json_rows))

    def encode(self, obj: dict) -> bytes:
        """Serialise a sample dict as producers should (compact JSON)."""
        return orjson.dumps(obj)

    def encode_binary(self, obj: dict) -> bytes:
        """The same sample in the binary format (`stream.binary`); refuses what `decode` would
        refuse, so a producer cannot write a sample the trainer dead-letters."""
        sample = self.from_dict(obj)
        dense = [obj.get(name) for name, _, _ in self._dense]
        for (name, _, _), v in zip(self._dense, dense):
            if v is not None and abs(v) > _FLOAT32_MAX:
                raise InvalidSample("non_finite_dense", f"{name}={v!r} overflows float32")
        return self.binary.encode(sample.label, sample.event_time, dense, list(sample.features.sparse))

    def _from_binary(self, c: BinaryColumns) -> "DecodedBatch":
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

_NONE = type(None)
_INT_OR_FLOAT = {int, float}
_NUMBER_OR_NONE = {int, float, _NONE}
_STR_OR_NONE = {str, _NONE}
_INT_OR_NONE = {int, _NONE}
HASH_CACHE_MAX = 1 << 20  # string id -> key entries kept per codec (Zipf-hot ids hit it)


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


class _BatchDecoder:
    """Column checks decide the common case; any row they cannot vouch for is decided by
    `SampleCodec.from_dict`, the per-message definition, so outcomes never differ."""

    def __init__(self, codec: SampleCodec) -> None:
        self.codec = codec
        s = codec.schema
        self.names = [s.label, s.event_time, *(f.name for f in s.dense), *(f.name for f in s.sparse)]
        self.getter = itemgetter(*self.names)
        self.cache: dict[str, int] = getattr(codec, "_hash_cache", None) or {}
        codec._hash_cache = self.cache  # type: ignore[attr-defined]

    def decode(self, raws: Sequence[bytes]) -> DecodedBatch:
        codec = self.codec
        limit = codec.max_message_bytes
        errors: list[tuple[int, InvalidSample]] = []
        objs: list[dict] = []
        index: list[int] = []
        loads = orjson.loads
        for i, raw in enumerate(raws):  # parse_object's checks, inline: this is the per-message hot path
            if len(raw) > limit:
                errors.append((i, InvalidSample("oversized", f"{len(raw)} bytes > {limit}")))
                continue
            try:
                obj = loads(raw)
            except orjson.JSONDecodeError as e:
                errors.append((i, InvalidSample("malformed_json", str(e))))
                continue
            if type(obj) is not dict:  # orjson makes plain dicts only
                errors.append((i, InvalidSample("not_an_object", type(obj).__name__)))
                continue
            objs.append(obj)
            index.append(i)
        n = len(objs)
        schema = codec.schema
        n_dense, n_sparse = len(schema.dense), len(schema.sparse)
        if n == 0:
            errors.sort(key=lambda e: e[0])
            return DecodedBatch(np.zeros(0, np.int64), np.zeros(0, np.int64), np.zeros(0, np.float64),
                                np.zeros((0, n_dense), np.float32),
                                [SparseColumn(np.zeros(0, np.int64), np.zeros(0, np.int64)) for _ in range(n_sparse)],
                                errors)
        cols = self._columns(objs)
        suspect = np.zeros(n, dtype=bool)
        if codec._known is not None:  # unknown fields (zip gave tuples: every row has every field)
            self._mark_unknown(objs, suspect, all_present=type(cols[0]) is tuple)

        labels = self._ints(cols[0], suspect)
        suspect |= (labels != 0) & (labels != 1)
        times = self._floats(cols[1], suspect, _INT_OR_FLOAT)
        suspect |= ~np.isfinite(times)

        dense = np.empty((n, n_dense), dtype=np.float64)
        for j, (_, log1p, default) in enumerate(codec._dense):
            x = self._floats(cols[2 + j], suspect, _NUMBER_OR_NONE)
            suspect |= np.isinf(x)
            dense[:, j] = _transform_dense(x, log1p, default)

        sparse: list[list | tuple[np.ndarray, np.ndarray]] = []
        for j, (name, is_string, multi, max_ids) in enumerate(codec._sparse):
            col = cols[2 + n_dense + j]
            if multi:
                sparse.append(self._multi(name, col, is_string, max_ids, suspect))
            else:
                sparse.append(self._single(col, is_string, suspect))

        keep = ~suspect
        patches: dict[int, Sample] = {}
        for r in np.flatnonzero(suspect).tolist():
            try:
                patches[r] = codec.from_dict(objs[r])
            except InvalidSample as e:
                errors.append((index[r], e))
                continue
            keep[r] = True
        for r, sample in patches.items():  # rows the column checks could not vouch for, but valid
            labels[r] = sample.label
            times[r] = sample.event_time
            dense[r] = sample.features.dense
            for j, keys in enumerate(sample.features.sparse):
                if isinstance(sparse[j], list):
                    sparse[j][r] = keys
                else:
                    k, present = sparse[j]
                    present[r] = bool(keys)
                    k[r] = keys[0] if keys else 0

        columns = []
        for part in sparse:
            if isinstance(part, list):
                rows = [part[r] for r in np.flatnonzero(keep).tolist()]
                lengths = np.fromiter(map(len, rows), dtype=np.int64, count=len(rows))
                flat = [k for ks in rows for k in ks]
                columns.append(SparseColumn(np.array(flat, dtype=np.int64).reshape(-1), lengths))
            else:
                k, present = part
                present = present[keep]
                columns.append(SparseColumn(k[keep][present], present.astype(np.int64)))
        errors.sort(key=lambda e: e[0])
        return DecodedBatch(np.asarray(index, dtype=np.int64)[keep], labels[keep], times[keep],
                            dense[keep], columns, errors)

    def _columns(self, objs: list[dict]) -> list[tuple]:
        try:
            return list(zip(*map(self.getter, objs)))
        except KeyError:  # some message lacks a field (absent features are allowed)
            return [[o.get(name) for o in objs] for name in self.names]

    def _mark_unknown(self, objs: list[dict], suspect: np.ndarray, all_present: bool) -> None:
        """Rows with a field the schema does not name. When every row has every named field
        (the fast path's columns), a row has an unknown one exactly when it has more fields."""
        width = len(self.names)
        lengths = np.fromiter(map(len, objs), dtype=np.int64, count=len(objs))
        if all_present:
            suspect |= lengths > width
            return
        known = self.codec._known
        for r in np.flatnonzero(lengths > 0).tolist():
            if not known.issuperset(objs[r]):
                suspect[r] = True

    @staticmethod
    def _clean(col: Sequence, suspect: np.ndarray, allowed: set, placeholder: object) -> Sequence:
        """The column with values of an unexpected type replaced (their rows marked suspect)."""
        if set(map(type, col)) <= allowed:
            return col
        out = list(col)
        for r, v in enumerate(out):
            if type(v) not in allowed:
                suspect[r] = True
                out[r] = placeholder
        return out

    def _ints(self, col: Sequence, suspect: np.ndarray) -> np.ndarray:
        col = self._clean(col, suspect, {int}, 0)
        try:
            return np.array(col, dtype=np.int64)
        except OverflowError:
            out = np.zeros(len(col), dtype=np.int64)
            for r, v in enumerate(col):
                if -(1 << 63) <= v < (1 << 63):
                    out[r] = v
                else:
                    suspect[r] = True
            return out

    def _floats(self, col: Sequence, suspect: np.ndarray, allowed: set) -> np.ndarray:
        """float64; None (where allowed) becomes NaN, which JSON cannot otherwise produce."""
        col = self._clean(col, suspect, allowed, 0.0)
        try:
            return np.array(col, dtype=np.float64)
        except (OverflowError, TypeError, ValueError):
            out = np.zeros(len(col), dtype=np.float64)
            for r, v in enumerate(col):
                try:
                    out[r] = np.nan if v is None else float(v)
                except OverflowError:
                    suspect[r] = True
            return out

    def _single(self, col: Sequence, is_string: bool, suspect: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Keys [n] (0 where absent) and a presence mask."""
        n = len(col)
        col = self._clean(col, suspect, _STR_OR_NONE if is_string else _INT_OR_NONE, None)
        present = np.fromiter(map(is_not, col, repeat(None)), dtype=bool, count=n)
        if is_string:
            cache = self.cache
            try:
                return np.fromiter(map(cache.__getitem__, col), dtype=np.int64, count=n), present
            except KeyError:
                if len(cache) > HASH_CACHE_MAX:
                    cache.clear()
                for v in col:
                    if v not in cache:
                        cache[v] = 0 if v is None else hash_string_id(v)
                return np.fromiter(map(cache.__getitem__, col), dtype=np.int64, count=n), present
        values = [0 if v is None else v for v in col]
        try:
            return np.array(values, dtype=np.int64), present
        except OverflowError:
            out = np.zeros(n, dtype=np.int64)
            for r, v in enumerate(values):
                if INT64_MIN <= v <= INT64_MAX:
                    out[r] = v
                else:
                    suspect[r] = True
            return out, present

    def _multi(self, name: str, col: Sequence, is_string: bool, max_ids: int, suspect: np.ndarray) -> list:
        """Per row a tuple of keys; rows that are not a list of ids of the right type are suspect."""
        out: list[tuple[int, ...]] = []
        for r, v in enumerate(col):
            if v is None:
                out.append(())
                continue
            try:
                out.append(tuple(_key(name, x, is_string) for x in v) if type(v) is list and len(v) <= max_ids else None)
            except InvalidSample:
                out.append(None)
            if out[-1] is None:
                suspect[r] = True
                out[-1] = ()
        return out
