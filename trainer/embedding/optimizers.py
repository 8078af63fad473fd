"""Sparse optimizers whose state lives with the row: the state arrays are indexed by the
same slots as the values, so a row, its state and its bookkeeping move (and are evicted,
saved and restored) together."""

from __future__ import annotations

import math

import numpy as np

from trainer.embedding import kernels
from trainer.embedding.config import SparseOptimizerConfig


class SparseOptimizer:
    def __init__(self, config: SparseOptimizerConfig, dim: int) -> None:
        self.config = config
        self.dim = dim
        # Updates applied so far: lazy Adam's bias correction is global, as in torch.
        self.step_count = 0
        self._lr = np.float32(config.lr)
        self._eps = np.float32(config.eps)

    def layout(self) -> dict[str, tuple[tuple[int, ...], type]]:
        """Per-row state: name -> (shape of one row's state, dtype)."""
        c, d = self.config, (self.dim,)
        return {
            "sgd": {},
            "adagrad": {"accum": (d, np.float32)},
            "rowwise_adagrad": {"accum": ((), np.float32)},
            "adagrad_decay": {"accum": (d, np.float32), "decay_power": ((), np.int32)},
            "lazy_adam": {"m": (d, np.float32), "v": (d, np.float32)},
        }[c.kind]

    def bytes_per_row(self) -> int:
        return sum(int(np.prod(shape)) * np.dtype(dtype).itemsize for shape, dtype in self.layout().values())

    def init_rows(self, state: dict[str, np.ndarray], slots: np.ndarray) -> None:
        """State of fresh rows: the accumulator's initial value; zero moments and decay count."""
        for name, array in state.items():
            kernels.fill_rows(array, slots, self.config.initial_accumulator_value if name == "accum" else 0)

    def update(self, values: np.ndarray, state: dict[str, np.ndarray], slots: np.ndarray,
               grads: np.ndarray, step: int, last_step: np.ndarray, stamps: np.ndarray, stamp: int) -> None:
        """Updates rows `slots` (< 0: skipped) and, in the same pass, records the update:
        last_step[s] = step mod 2^32 and stamps[s] = stamp (one visit per row, not two)."""
        self.step_count += 1
        c, lr, eps = self.config, self._lr, self._eps
        touch = (last_step, stamps, np.uint32(step & 0xFFFFFFFF), stamp)
        if c.kind == "sgd":
            kernels.sgd(slots, grads, values, lr, *touch)
        elif c.kind == "adagrad":
            kernels.adagrad(slots, grads, values, state["accum"], lr, eps, *touch)
        elif c.kind == "rowwise_adagrad":
            kernels.rowwise_adagrad(slots, grads, values, state["accum"], lr, eps, *touch)
        elif c.kind == "adagrad_decay":
            kernels.adagrad_decay(slots, grads, values, state["accum"], state["decay_power"], step, lr,
                                  eps, np.float32(c.accumulator_decay_rate), c.accumulator_decay_step,
                                  np.float32(c.accumulator_baseline), *touch)
        else:
            t = self.step_count
            step_size = c.lr * math.sqrt(1 - c.beta2**t) / (1 - c.beta1**t)
            kernels.lazy_adam(slots, grads, values, state["m"], state["v"], np.float32(c.beta1),
                              np.float32(c.beta2), np.float32(step_size), eps, *touch)
