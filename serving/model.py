"""Published versions as a serving node holds them: sparse and dense together, double-buffered.

A node keeps two full copies of the parameters (`_Buffer`: the embedding tables and a dense
module). Requests read the front buffer; each delta is applied to the back buffer, which no
request reads, then the two swap. The tables are written by a helper process at the lowest
CPU priority (`serving/applier.py`) in shared memory this process maps read-only, so
applying a version costs the request path only the swap and a copy of the (small) dense
parameters into the back buffer's module.

A request takes a `ServingModel` (a version and the buffer that holds it) and acquires it
before scoring: the buffer's reader count goes up only while the buffer still holds that
version, and the helper is asked to write a buffer only when its reader count is zero. So
every request is answered from exactly one version, sparse and dense together, while
deltas are being applied, and a reader never waits for a writer.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from publisher.config import RedisConfig
from publisher.manifest import Manifest
from publisher.payload import PayloadError
from serving.applier import Applied, Applier
from serving.shm import extended
from serving.table import PROBED_ARRAYS, TableView
from stream.sample import Features
from stream.schema import FeatureSchema
from trainer.config import TrainerConfig
from trainer.models import build_model, is_shared

@dataclass(frozen=True)
class SparseInput:
    """One sparse feature of a request. `offsets is None`: one bag shared by every row (the
    ranking context). Otherwise one bag per row; `single` when every bag has exactly one id."""

    keys: np.ndarray  # int64
    offsets: np.ndarray | None = None
    single: bool = False


@dataclass(frozen=True)
class Inputs:
    """A request as the model reads it: n rows, dense [n, n_dense] (or [1, n_dense]: the
    same for every row), one SparseInput per sparse feature in schema order."""

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


def _forward(model: nn.Module, n: int, dense: torch.Tensor, pooled: list[torch.Tensor]) -> torch.Tensor:
    """Logits of n rows from inputs of n rows or of one row shared by all (a ranking's
    context): computed once where all are shared, through the model's `forward_shared`
    where it has one, else on the shared inputs expanded to n rows."""
    shared = [is_shared(t) for t in (dense, *pooled)]
    if n == 1 or not any(shared):
        return model(dense, pooled)
    if all(shared):
        return model(dense, pooled).expand(n)
    if hasattr(model, "forward_shared"):
        return model.forward_shared(dense, pooled)
    return model(dense.expand(n, -1), [p.expand(n, -1) for p in pooled])


class StaleVersion(RuntimeError):
    """The buffer of this version was recycled for a newer one; take the current version again."""


class _Buffer:
    """One full copy of the parameters: tables mapped from the helper, and a dense module.
    `version` is what it holds (-1 while it is being written)."""

    def __init__(self, id: int, dense: nn.Module, version: int) -> None:
        self.id = id  # how the helper knows this buffer
        self.tables: dict[str, TableView] = {}
        self._arrays: dict[str, dict[str, np.ndarray]] = {}  # table -> its lookup arrays
        self.dense = dense.eval()
        # The dense parameters and buffers by state_dict name, as arrays over the module's own
        # memory: a version is copied into them in place (load_state_dict would hold the GIL
        # for ~1 ms of Python per version, a stall for the requests of the event loop).
        self.dense_state = {k: v.numpy() for k, v in dense.state_dict().items()}
        self.version = version
        self.readers = 0
        self.lock = threading.Lock()

    def take(self, applied: Applied, defaults: dict[str, float]) -> None:
        """The version the helper wrote into this buffer (nobody may be reading it): its
        newly allocated arrays, the new shapes of those that grew in place, and its dense
        parameters."""
        changed = set()
        for buffer, table, name, array in applied.arrays:
            if buffer == self.id:
                self._arrays.setdefault(table, {})[name] = array
                changed.add(table)
        for buffer, table, name, shape in applied.grown:
            if buffer == self.id:
                self._arrays[table][name] = extended(self._arrays[table][name], shape, name in PROBED_ARRAYS)
                changed.add(table)
        for table in changed:
            self.tables[table] = TableView(defaults[table], self._arrays[table])
        for name, target in self.dense_state.items():
            np.copyto(target, applied.dense[name], casting="same_kind")

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

    @torch.inference_mode()
    def score(self, inputs: Inputs) -> np.ndarray:
        """Click probabilities; the caller holds this version (acquire/release). Inference
        mode, not no_grad: no version counters or autograd metadata on its tensors (~4% of a
        100-candidate DLRM forward)."""
        b = self._buffer
        pooled = []
        for f, inp in zip(self.schema.sparse, inputs.sparse):
            rows = torch.from_numpy(b.tables[f.table_name].lookup(inp.keys))
            if inp.offsets is None:  # one row, shared by every row
                pooled.append(rows if len(inp.keys) == 1 else F.embedding_bag(
                    torch.arange(len(inp.keys)), rows, torch.zeros(1, dtype=torch.int64), mode=f.pooling))
            elif inp.single:
                pooled.append(rows)
            else:
                pooled.append(F.embedding_bag(torch.arange(len(inp.keys)), rows, torch.from_numpy(inp.offsets),
                                              mode=f.pooling))
        return torch.sigmoid(_forward(b.dense, inputs.n, inputs.dense, pooled)).numpy()

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
    """The two buffers of a node, the version it serves, and the helper that writes the
    tables. Written by one thread at a time (the follower); read by any number of request
    threads through `current`. A holder whose helper died (`ApplierDied`) can apply nothing
    more: the follower builds a new one while this one goes on serving."""

    DRAIN_TIMEOUT_S = 5.0

    def __init__(self, schema: FeatureSchema, trainer_config: TrainerConfig, redis_config: RedisConfig) -> None:
        self.schema = schema
        self.trainer_config = trainer_config
        self.current: ServingModel | None = None
        self._front: _Buffer | None = None
        self._back: _Buffer | None = None
        self._defaults: dict[str, float] = {}
        self._next_id = 0
        dense = build_model(schema, trainer_config).state_dict()
        self._applier = Applier(redis_config, {t.name: t.dim for t in schema.tables},
                                {k: (v.numpy().dtype.str, tuple(v.shape)) for k, v in dense.items()})

    def acquire(self) -> ServingModel | None:
        """The current version, acquired (release it after scoring); None before the first."""
        while True:
            model = self.current
            if model is None or model.acquire():
                return model

    def load_snapshot(self, manifest: Manifest) -> ServingModel:
        if manifest.snapshot is None:
            raise PayloadError(f"version {manifest.version} has no snapshot")
        front, back = self._new_buffer(), self._new_buffer()
        applied = self._applier.load_snapshot(manifest.version, manifest.snapshot, (front.id, back.id))
        self._defaults = applied.defaults
        for buffer in (front, back):
            buffer.take(applied, self._defaults)
            buffer.version = manifest.version
        self._front, self._back = front, back
        return self._publish(manifest, front, applied.live_rows)

    def apply_delta(self, manifest: Manifest) -> ServingModel:
        front = self._front
        if manifest.delta is None or front is None or manifest.base_version != front.version:
            have = front.version if front else None
            raise PayloadError(f"delta {manifest.version} applies on {manifest.base_version}, node has {have}")
        back = self._back
        if back is None or not back.claim_for_writing(self.DRAIN_TIMEOUT_S):
            back = self._new_buffer()  # a reader never let go: the helper fills a new buffer from the front
            self._back = back
        applied = self._applier.apply_delta(manifest.version, manifest.delta, back.id, front.id)
        back.take(applied, self._defaults)
        back.version = manifest.version
        self._front, self._back = back, front
        return self._publish(manifest, back, applied.live_rows)

    @property
    def lost(self) -> bool:
        """Its helper died, and the tables it wrote with it: this holder can apply nothing more."""
        return self._applier.lost

    def close(self) -> None:
        """Stops the helper; versions already handed out stay readable."""
        self._applier.close()

    def _new_buffer(self) -> _Buffer:
        self._next_id += 1
        return _Buffer(self._next_id, build_model(self.schema, self.trainer_config), -1)

    def _publish(self, manifest: Manifest, buffer: _Buffer, live_rows: dict[str, int]) -> ServingModel:
        model = ServingModel(manifest, self.schema, buffer, dict(live_rows), time.time())
        self.current = model  # one reference swap: requests see the old or the new version, whole
        return model
