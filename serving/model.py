"""Published versions as a serving node holds them: sparse and dense together, double-buffered.

A node keeps two full copies of the parameters (`_Buffer`: one `RowTable` per embedding
table and one dense module). Requests read the front buffer; the follower applies each
delta to the back buffer, which no request reads, then swaps. Applying a version costs
O(rows in the delta), not O(table): each delta is applied twice (once to each buffer),
never the whole table rebuilt, and the dense module is loaded in place, not deep-copied.

A request takes a `ServingModel` (a version and the buffer that holds it) and acquires it
before scoring: the buffer's reader count goes up only while the buffer still holds that
version, and the follower writes a buffer only when its reader count is zero. So every
request is answered from exactly one version, sparse and dense together, while deltas
are being applied, and a reader never waits for a writer.
"""

from __future__ import annotations

import copy
import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from publisher.manifest import Manifest
from publisher.payload import Kind, Payload, PayloadError
from serving.table import RowTable
from stream.sample import Features
from stream.schema import FeatureSchema
from trainer.config import TrainerConfig
from trainer.models import build_model


@dataclass(frozen=True)
class SparseInput:
    """One sparse feature of a request. `offsets is None`: one bag shared by every row (the
    ranking context). Otherwise one bag per row; `single` when every bag has exactly one id."""

    keys: np.ndarray  # int64
    offsets: np.ndarray | None = None
    single: bool = False


@dataclass(frozen=True)
class Inputs:
    """A request as the model reads it: n rows, dense [n, n_dense], one SparseInput per
    sparse feature in schema order."""

    n: int
    dense: torch.Tensor
    sparse: tuple[SparseInput, ...]

    @classmethod
    def from_features(cls, schema: FeatureSchema, features: Sequence[Features]) -> "Inputs":
        n = len(features)
        dense = torch.tensor([f.dense for f in features], dtype=torch.float32).reshape(n, len(schema.dense))
        sparse = []
        for i in range(len(schema.sparse)):
            lengths = np.fromiter((len(f.sparse[i]) for f in features), dtype=np.int64, count=n)
            keys = np.fromiter((k for f in features for k in f.sparse[i]), dtype=np.int64, count=int(lengths.sum()))
            offsets = np.zeros(n, dtype=np.int64)
            np.cumsum(lengths[:-1], out=offsets[1:])
            sparse.append(SparseInput(keys, offsets, bool((lengths == 1).all())))
        return cls(n, dense, tuple(sparse))


class StaleVersion(RuntimeError):
    """The buffer of this version was recycled for a newer one; take the current version again."""


class _Buffer:
    """One full copy of the parameters. `version` is what it holds (-1 while being written)."""

    def __init__(self, tables: dict[str, RowTable], dense: nn.Module, version: int) -> None:
        self.tables = tables
        self.dense = dense.eval()
        # The dense parameters and buffers by state_dict name, as arrays over the module's own
        # memory: a version is copied into them in place (load_state_dict would hold the GIL
        # for ~1 ms of Python per version, a stall for the requests of the event loop).
        self.dense_state = {k: v.numpy() for k, v in dense.state_dict().items()}
        self.version = version
        self.readers = 0
        self.lock = threading.Lock()

    def clone(self) -> "_Buffer":
        return _Buffer({k: t.copy() for k, t in self.tables.items()}, copy.deepcopy(self.dense), self.version)

    def load_dense(self, state: dict[str, np.ndarray]) -> None:
        """Copy a checked `_dense_state` into the module (nobody may be reading this buffer)."""
        for name, target in self.dense_state.items():
            np.copyto(target, state[name], casting="same_kind")

    def claim_for_writing(self, timeout_s: float) -> bool:
        """Marks the buffer as being written once no request reads it (new ones cannot start)."""
        deadline = time.monotonic() + timeout_s
        while True:
            with self.lock:
                if self.readers == 0:
                    self.version = -1
                    return True
            if time.monotonic() > deadline:
                return False
            time.sleep(0.0002)


@dataclass(frozen=True)
class ServingModel:
    """One version as requests see it. `acquire()` before reading, `release()` after."""

    manifest: Manifest
    schema: FeatureSchema
    _buffer: _Buffer = field(repr=False)
    live_rows: dict[str, int] = field(default_factory=dict)
    applied_at: float = 0.0

    @property
    def version(self) -> int:
        return self.manifest.version

    def acquire(self) -> bool:
        b = self._buffer
        with b.lock:
            if b.version != self.manifest.version:
                return False
            b.readers += 1
            return True

    def release(self) -> None:
        b = self._buffer
        with b.lock:
            b.readers -= 1

    @torch.no_grad()
    def score(self, inputs: Inputs) -> np.ndarray:
        """Click probabilities; the caller holds this version (acquire/release)."""
        b = self._buffer
        pooled = []
        for f, inp in zip(self.schema.sparse, inputs.sparse):
            rows = torch.from_numpy(b.tables[f.table_name].lookup(inp.keys))
            if inp.offsets is None:
                one = rows if len(inp.keys) == 1 else F.embedding_bag(
                    torch.arange(len(inp.keys)), rows, torch.zeros(1, dtype=torch.int64), mode=f.pooling)
                pooled.append(one.expand(inputs.n, rows.shape[1]))
            elif inp.single:
                pooled.append(rows)
            else:
                pooled.append(F.embedding_bag(torch.arange(len(inp.keys)), rows, torch.from_numpy(inp.offsets),
                                              mode=f.pooling))
        return torch.sigmoid(b.dense(inputs.dense, pooled)).numpy()

    def predict(self, features: Sequence[Features]) -> np.ndarray:
        """Scores for decoded examples (tests, tools). Raises StaleVersion if recycled."""
        if not self.acquire():
            raise StaleVersion(f"version {self.version} is no longer held")
        try:
            return self.score(Inputs.from_features(self.schema, features))
        finally:
            self.release()

    def lookup(self, table: str, keys: np.ndarray) -> np.ndarray:
        if not self.acquire():
            raise StaleVersion(f"version {self.version} is no longer held")
        try:
            return self._buffer.tables[table].lookup(keys)
        finally:
            self.release()


class ModelHolder:
    """The two buffers of a node and the version it serves. Written by one thread at a time
    (the follower); read by any number of request threads through `current`."""

    DRAIN_TIMEOUT_S = 5.0

    def __init__(self, schema: FeatureSchema, trainer_config: TrainerConfig) -> None:
        self.schema = schema
        self.trainer_config = trainer_config
        self.current: ServingModel | None = None
        self._front: _Buffer | None = None
        self._back: _Buffer | None = None
        self._pending: list[Payload] = []  # deltas the back buffer has not had yet

    def acquire(self) -> ServingModel | None:
        """The current version, acquired (release it after scoring); None before the first."""
        while True:
            model = self.current
            if model is None or model.acquire():
                return model

    def load_snapshot(self, manifest: Manifest, payload: Payload) -> ServingModel:
        _expect(payload, Kind.SNAPSHOT, manifest.version)
        tables = {}
        for spec in self.schema.tables:
            keys = _array(payload, f"table/{spec.name}/keys")
            values = _rows(payload, f"table/{spec.name}/values", len(keys), spec.dim)
            default = float(_array(payload, f"table/{spec.name}/default"))
            tables[spec.name] = RowTable.build(keys, values, default)
        front = _Buffer(tables, build_model(self.schema, self.trainer_config), manifest.version)
        front.load_dense(_dense_state(front, payload))
        # The second buffer now, not at the first delta: copying the tables then would stall requests.
        self._front, self._back, self._pending = front, front.clone(), []
        return self._publish(manifest, front)

    def apply_delta(self, manifest: Manifest, payload: Payload) -> ServingModel:
        _expect(payload, Kind.DELTA, manifest.version)
        front = self._front
        if front is None or payload.base_version != front.version:
            have = front.version if front else None
            raise PayloadError(f"delta {payload.version} applies on {payload.base_version}, node has {have}")
        # Check everything before writing anything: a bad delta must leave both buffers usable.
        changes = [self._table_changes(payload, spec.name, spec.dim) for spec in self.schema.tables]
        dense_state = _dense_state(front, payload)

        back = self._back
        if back is None or not back.claim_for_writing(self.DRAIN_TIMEOUT_S):
            back = front.clone()  # first delta after a snapshot (or a reader that never let go)
            back.version = -1
            self._pending = []
        self._back = None  # until written through, it is neither front nor a known version
        for delta in self._pending:
            for spec in self.schema.tables:
                back.tables[spec.name].apply(*self._table_changes(delta, spec.name, spec.dim))
        for spec, (keys, values, tombstones) in zip(self.schema.tables, changes):
            back.tables[spec.name].apply(keys, values, tombstones)
        back.load_dense(dense_state)
        back.version = manifest.version
        self._front, self._back, self._pending = back, front, [payload]
        return self._publish(manifest, back)

    def _publish(self, manifest: Manifest, buffer: _Buffer) -> ServingModel:
        model = ServingModel(manifest, self.schema, buffer, {k: len(t) for k, t in buffer.tables.items()},
                             time.time())
        self.current = model  # one reference swap: requests see the old or the new version, whole
        return model

    @staticmethod
    def _table_changes(payload: Payload, name: str, dim: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = _array(payload, f"table/{name}/keys")
        return keys, _rows(payload, f"table/{name}/values", len(keys), dim), _array(payload, f"table/{name}/tombstones")


def _expect(payload: Payload, kind: Kind, version: int) -> None:
    if payload.kind is not kind or payload.version != version:
        raise PayloadError(f"expected {kind.name.lower()} {version}, got {payload.kind.name.lower()} {payload.version}")


def _array(payload: Payload, name: str) -> np.ndarray:
    try:
        return payload.arrays[name]
    except KeyError:
        raise PayloadError(f"payload {payload.version} has no section {name!r}") from None


def _rows(payload: Payload, name: str, n: int, dim: int) -> np.ndarray:
    values = _array(payload, name)
    if values.ndim != 2 or values.shape != (n, dim):
        raise PayloadError(f"payload {payload.version}: {name} has shape {values.shape}, expected ({n}, {dim})")
    return values


def _dense_state(buffer: _Buffer, payload: Payload) -> dict[str, np.ndarray]:
    """The payload's dense parameters, checked against the buffer's (names, shapes, dtypes)."""
    state = {k[len("dense/"):]: v for k, v in payload.arrays.items() if k.startswith("dense/")}
    expected = buffer.dense_state
    if state.keys() != expected.keys():
        missing, extra = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
        raise PayloadError(f"payload {payload.version}: dense parameters differ (missing {missing}, unexpected {extra})")
    for k, v in state.items():
        if v.shape != expected[k].shape or not np.can_cast(v.dtype, expected[k].dtype, "same_kind"):
            raise PayloadError(f"payload {payload.version}: dense/{k} is {v.dtype}{list(v.shape)}, "
                               f"expected {expected[k].dtype}{list(expected[k].shape)}")
    return state
