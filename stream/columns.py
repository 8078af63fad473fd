"""A micro-batch's messages in one buffer, and samples as columns: what the compiled
scanners of both sample formats (`stream.binary`, `stream.json_scan`) read and write."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import numpy as np

# The largest dense value the model can read as it is: it reads float32, and beyond this a
# value is inf, which poisons the weights.
FLOAT32_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class MessageBuffer:
    """Messages joined into one byte buffer (one copy), so that a compiled scan walks them all
    without a Python call per message."""

    blob: bytes
    data: np.ndarray  # uint8 view of blob
    starts: np.ndarray  # int64 [n]: where message i begins
    lengths: np.ndarray  # int64 [n]

    @classmethod
    def of(cls, raws: Sequence[bytes]) -> "MessageBuffer":
        lengths = np.fromiter(map(len, raws), dtype=np.int64, count=len(raws))
        starts = np.zeros(len(raws), dtype=np.int64)
        np.cumsum(lengths[:-1], out=starts[1:])
        blob = b"".join(raws)
        return cls(blob, np.frombuffer(blob, dtype=np.uint8), starts, lengths)

    def __len__(self) -> int:
        return len(self.starts)


@dataclass(frozen=True)
class SampleColumns:
    """The accepted messages of a micro-batch, as columns (dense values not yet transformed)."""

    rows: np.ndarray  # int64 [n]: message index of each accepted sample
    labels: np.ndarray  # int64 [n]
    event_times: np.ndarray  # float64 [n]
    dense: np.ndarray  # float64 [n, n_dense], raw, NaN where absent
    keys: list[np.ndarray]  # per sparse feature: int64 [total ids]
    lengths: list[np.ndarray]  # per sparse feature: int64 [n]

    @classmethod
    def empty(cls, n_dense: int, n_sparse: int) -> "SampleColumns":
        none = np.zeros(0, dtype=np.int64)
        return cls(none, none, np.zeros(0), np.zeros((0, n_dense)), [none] * n_sparse, [none] * n_sparse)
