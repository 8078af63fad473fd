"""One published version as a serving node holds it: immutable, sparse and dense together.

A request takes a reference to the current `ServingModel` and is answered from it alone;
applying a delta builds a new `ServingModel` and swaps the reference. So no request ever
sees a half-applied version, and no lock is held while scoring.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from publisher.manifest import Manifest
from publisher.payload import Kind, Payload, PayloadError
from stream.sample import Features
from stream.schema import FeatureSchema
from trainer.batch import build_batch
from trainer.config import TrainerConfig
from trainer.models import build_model
from trainer.sparse import pool_from


@dataclass(frozen=True)
class ServingTable:
    """Rows by key: sorted keys and their rows; absent keys read the trainer's default value."""

    keys: np.ndarray  # int64 [n], sorted ascending
    values: np.ndarray  # float32 [n, dim]
    default_value: float

    @property
    def dim(self) -> int:
        return self.values.shape[1]

    def lookup(self, keys: np.ndarray) -> torch.Tensor:
        out = np.full((len(keys), self.dim), self.default_value, dtype=np.float32)
        if len(self.keys):
            idx = np.minimum(np.searchsorted(self.keys, keys), len(self.keys) - 1)
            found = self.keys[idx] == keys
            out[found] = self.values[idx[found]]
        return torch.from_numpy(out)

    def apply(self, upserts: np.ndarray, values: np.ndarray, tombstones: np.ndarray) -> "ServingTable":
        """Tombstones first, then upserts (a key evicted and re-admitted since the last version
        appears in both and must end up live)."""
        drop = np.isin(self.keys, tombstones) | np.isin(self.keys, upserts)
        keys = np.concatenate([self.keys[~drop], upserts])
        rows = np.concatenate([self.values[~drop], values.astype(np.float32, copy=False)])
        order = np.argsort(keys, kind="stable")
        return ServingTable(keys[order], rows[order], self.default_value)


@dataclass(frozen=True)
class ServingModel:
    manifest: Manifest
    schema: FeatureSchema
    dense: nn.Module
    tables: dict[str, ServingTable]

    @property
    def version(self) -> int:
        return self.manifest.version

    @torch.no_grad()
    def predict(self, features: list[Features]) -> np.ndarray:
        batch = build_batch(self.schema, features)
        logits = self.dense(batch.dense, pool_from(batch, lambda name, keys: self.tables[name].lookup(keys)))
        return torch.sigmoid(logits).numpy()

    @classmethod
    def from_snapshot(cls, manifest: Manifest, payload: Payload, schema: FeatureSchema,
                      trainer_config: TrainerConfig) -> "ServingModel":
        _expect(payload, Kind.SNAPSHOT, manifest.version)
        tables = {}
        for spec in schema.tables:
            keys = _array(payload, f"table/{spec.name}/keys")
            order = np.argsort(keys, kind="stable")
            default = float(_array(payload, f"table/{spec.name}/default"))
            tables[spec.name] = ServingTable(keys[order], _array(payload, f"table/{spec.name}/values")[order], default)
        dense = build_model(schema, trainer_config)
        _load_dense(dense, payload)
        return cls(manifest, schema, dense, tables)

    def apply_delta(self, manifest: Manifest, payload: Payload) -> "ServingModel":
        _expect(payload, Kind.DELTA, manifest.version)
        if payload.base_version != self.version:
            raise PayloadError(f"delta {payload.version} applies on {payload.base_version}, node has {self.version}")
        tables = {
            name: t.apply(_array(payload, f"table/{name}/keys"), _array(payload, f"table/{name}/values"),
                          _array(payload, f"table/{name}/tombstones"))
            for name, t in self.tables.items()
        }
        dense = copy.deepcopy(self.dense)
        _load_dense(dense, payload)
        return ServingModel(manifest, self.schema, dense, tables)


def _expect(payload: Payload, kind: Kind, version: int) -> None:
    if payload.kind is not kind or payload.version != version:
        raise PayloadError(f"expected {kind.name.lower()} {version}, got {payload.kind.name.lower()} {payload.version}")


def _array(payload: Payload, name: str) -> np.ndarray:
    try:
        return payload.arrays[name]
    except KeyError:
        raise PayloadError(f"payload {payload.version} has no section {name!r}") from None


def _load_dense(model: nn.Module, payload: Payload) -> None:
    state = {k[len("dense/"):]: torch.from_numpy(v.copy()) for k, v in payload.arrays.items() if k.startswith("dense/")}
    model.load_state_dict(state, strict=True)
    model.eval()
