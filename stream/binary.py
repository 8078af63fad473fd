"""The binary sample format: the same sample as the JSON one, in a fixed little-endian layout
that a micro-batch decodes in one compiled pass instead of one JSON parse per message.

JSON is the default and stays the contract for producers that write by hand; this format is
for producers that want the trainer's fastest path (it decodes ~8x faster than JSON here,
and is ~40% smaller on the Criteo shape). Both may share a topic: the first byte tells them
apart (0xF5 never starts JSON text, nor any UTF-8 text).

Layout (n_dense, n_sparse from the schema):

    0       u8       0xF5 (magic)
    1       u8       format version (1)
    2       u32      schema fingerprint (`schema_fingerprint`): a producer built for another
                     schema is refused (schema_mismatch), not misread
    6       u8       label (0 or 1)
    7       f64      event time (unix seconds)
    15      f32[n_dense]   raw dense values, before the schema's transform; NaN = absent
    ..      u16[n_sparse]  number of ids of each sparse feature (0 = absent)
    ..      i64[sum]       the ids, feature after feature; string ids already hashed with
                           `stream.hashing.hash_string_id` (the key the JSON path would make)

A binary sample is validated like a JSON one and refused with the same reason codes where
they apply (bad_label, bad_event_time, non_finite_dense, too_many_ids, bad_sparse,
oversized), plus its own: unsupported_format, schema_mismatch, malformed_binary. Dense
values travel as float32, which is what the model reads.
"""

from __future__ import annotations

import math
import struct

import numpy as np
import xxhash
from numba import njit

from stream.columns import MessageBuffer, SampleColumns
from stream.schema import FeatureSchema

MAGIC = 0xF5
FORMAT_VERSION = 1
_HEAD = struct.Struct("<BBIBd")  # magic, version, fingerprint, label, event time
HEAD_BYTES = _HEAD.size  # 15

# Outcome of a message in `_scan`; OK and NOT_BINARY are not refusals.
OK, NOT_BINARY = 0, 1
REASONS = {
    2: "oversized",
    3: "unsupported_format",
    4: "schema_mismatch",
    5: "malformed_binary",
    6: "bad_label",
    7: "bad_event_time",
    8: "non_finite_dense",
    9: "too_many_ids",
    10: "bad_sparse",
}


def schema_fingerprint(schema: FeatureSchema) -> int:
    """What the layout depends on: field order and names, and which features are multi-valued."""
    parts = [schema.label, schema.event_time, *schema.dense_names,
             *(f"{f.name}:{'multi' if f.multi else 'single'}" for f in schema.sparse)]
    return xxhash.xxh32_intdigest("\x1f".join(parts).encode())


class BinarySampleFormat:
    """Encodes samples of one schema in the binary layout, and decodes micro-batches of them."""

    def __init__(self, schema: FeatureSchema, max_message_bytes: int) -> None:
        self.schema = schema
        self.max_message_bytes = max_message_bytes
        self.fingerprint = schema_fingerprint(schema)
        self.n_dense = len(schema.dense)
        self.n_sparse = len(schema.sparse)
        self._max_ids = np.array([f.max_ids if f.multi else 1 for f in schema.sparse], dtype=np.int64)
        self._multi = np.array([f.multi for f in schema.sparse], dtype=np.bool_)
        self._head = _HEAD.pack(MAGIC, FORMAT_VERSION, self.fingerprint, 0, 0.0)[:6]

    def encode(self, label: int, event_time: float, dense: list[float | None],
               sparse: list[tuple[int, ...]]) -> bytes:
        """One sample from values already validated (`SampleCodec.encode_binary` validates)."""
        raw_dense = np.array([math.nan if v is None else v for v in dense], dtype="<f4")
        counts = np.array([len(ids) for ids in sparse], dtype="<u2")
        keys = np.fromiter((k for ids in sparse for k in ids), dtype="<i8", count=int(counts.sum()))
        return b"".join((self._head, struct.pack("<Bd", label, event_time), raw_dense.tobytes(),
                         counts.tobytes(), keys.tobytes()))

    def decode(self, messages: MessageBuffer) -> tuple[SampleColumns, np.ndarray]:
        """The accepted messages as columns, and every message's outcome code (`REASONS`;
        NOT_BINARY for messages that are not in this format, e.g. JSON)."""
        n = len(messages)
        buf, starts, lengths = messages.data, messages.starts, messages.lengths
        status = np.empty(n, dtype=np.int8)
        counts = np.zeros((n, self.n_sparse), dtype=np.int64)
        _scan(buf, starts, lengths, self.n_dense, self.fingerprint, self.max_message_bytes, self._max_ids,
              status, counts)
        rows = np.flatnonzero(status == OK)
        counts = counts[rows]
        bounds = np.zeros(self.n_sparse + 1, dtype=np.int64)
        np.cumsum(counts.sum(axis=0), out=bounds[1:])
        keys = np.empty(int(bounds[-1]), dtype=np.int64)
        labels = np.empty(len(rows), dtype=np.int64)
        times = np.empty(len(rows), dtype=np.float64)
        dense = np.empty((len(rows), self.n_dense), dtype=np.float64)
        _fill(buf, starts[rows], self.n_dense, counts, bounds, labels, times, dense, keys)
        return SampleColumns(rows, labels, times, dense, [keys[a:b] for a, b in zip(bounds[:-1], bounds[1:])],
                             list(counts.T)), status

    def explain(self, raw: bytes, code: int) -> str:
        """A refusal's detail (refusals are rare: this runs in Python, per refused message)."""
        if code == 2:
            return f"{len(raw)} bytes > {self.max_message_bytes}"
        if code == 3:
            return f"binary format version {raw[1] if len(raw) > 1 else None}, this trainer reads {FORMAT_VERSION}"
        if code == 4:
            got = struct.unpack_from("<I", raw, 2)[0]
            return (f"written for schema fingerprint {got:#010x}; schema {self.schema.name!r} "
                    f"is {self.fingerprint:#010x}")
        if code == 5:
            return f"{len(raw)} bytes do not match the layout of schema {self.schema.name!r}"
        if code == 6:
            return f"{self.schema.label}={raw[6]} is not 0 or 1"
        if code == 7:
            return f"{self.schema.event_time}={struct.unpack_from('<d', raw, 7)[0]!r}"
        dense = np.frombuffer(raw, dtype="<f4", count=self.n_dense, offset=HEAD_BYTES)
        counts = np.frombuffer(raw, dtype="<u2", count=self.n_sparse, offset=HEAD_BYTES + 4 * self.n_dense)
        if code == 8:
            j = int(np.flatnonzero(np.isinf(dense))[0])
            return f"{self.schema.dense[j].name}={float(dense[j])!r}"
        j = int(np.flatnonzero(counts > self._max_ids)[0])
        f = self.schema.sparse[j]
        if code == 9:
            return f"{f.name} has {int(counts[j])} ids > {f.max_ids}"
        return f"{f.name} is single-valued but has {int(counts[j])} ids"


@njit(cache=True)
def _scan(buf, starts, lengths, n_dense, fingerprint, max_bytes, max_ids, status, counts):
    """Each message's outcome, and for accepted ones the id count of each sparse feature."""
    n_sparse = max_ids.size
    fixed = HEAD_BYTES + 4 * n_dense + 2 * n_sparse
    for i in range(starts.size):
        o, size = starts[i], lengths[i]
        if size == 0 or buf[o] != MAGIC:
            status[i] = NOT_BINARY
            continue
        if size > max_bytes:
            status[i] = 2
            continue
        if size >= 2 and buf[o + 1] != FORMAT_VERSION:
            status[i] = 3
            continue
        if size < 6:
            status[i] = 5
            continue
        if buf[o + 2:o + 6].view(np.uint32)[0] != fingerprint:
            status[i] = 4
            continue
        if size < fixed:
            status[i] = 5
            continue
        if buf[o + 6] > 1:
            status[i] = 6
            continue
        if not np.isfinite(buf[o + 7:o + 15].view(np.float64)[0]):
            status[i] = 7
            continue
        dense = buf[o + HEAD_BYTES:o + HEAD_BYTES + 4 * n_dense].view(np.float32)
        code = 0
        for j in range(n_dense):
            if np.isinf(dense[j]):
                code = 8
                break
        c = buf[o + HEAD_BYTES + 4 * n_dense:o + fixed].view(np.uint16)
        total = 0
        for j in range(n_sparse):
            if code == 0 and c[j] > max_ids[j]:
                code = 9 if max_ids[j] > 1 else 10
            counts[i, j] = c[j]
            total += c[j]
        if code == 0 and size != fixed + 8 * total:
            code = 5
        status[i] = code


@njit(cache=True)
def _fill(buf, starts, n_dense, counts, bounds, labels, times, dense, keys):
    """Columns of the accepted messages (`starts` of those only, `counts` from `_scan`); the
    ids of sparse feature j go to keys[bounds[j]:bounds[j + 1]]."""
    n_sparse = counts.shape[1]
    fixed = HEAD_BYTES + 4 * n_dense + 2 * n_sparse
    at = bounds[:-1].copy()
    for r in range(starts.size):
        o = starts[r]
        labels[r] = buf[o + 6]
        times[r] = buf[o + 7:o + 15].view(np.float64)[0]
        d = buf[o + HEAD_BYTES:o + HEAD_BYTES + 4 * n_dense].view(np.float32)
        for j in range(n_dense):
            dense[r, j] = d[j]
        ids = buf[o + fixed:o + fixed + 8 * counts[r].sum()].view(np.int64)
        k = 0
        for j in range(n_sparse):
            for _ in range(counts[r, j]):
                keys[at[j]] = ids[k]
                at[j] += 1
                k += 1
