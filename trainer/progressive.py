"""Progressive validation, as River measures online learners: every example is scored by
the model as it stands, before the model learns from it. No holdout set is needed and the
figure tracks what serving would have seen.

Rolling AUC and log loss are computed over the last `window` examples.
"""

from __future__ import annotations

import numpy as np


class RollingMetrics:
    def __init__(self, window: int = 20_000) -> None:
        self.window = window
        self._scores = np.zeros(window, dtype=np.float64)
        self._labels = np.zeros(window, dtype=np.float64)
        self._next = 0
        self.seen = 0

    def update(self, probabilities: np.ndarray, labels: np.ndarray) -> None:
        p = np.asarray(probabilities, dtype=np.float64)[-self.window:]
        y = np.asarray(labels, dtype=np.float64)[-self.window:]
        idx = (self._next + np.arange(len(p))) % self.window
        self._scores[idx] = p
        self._labels[idx] = y
        self._next = int((self._next + len(p)) % self.window)
        self.seen += len(probabilities)

    def _filled(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.seen, self.window)
        return self._scores[:n], self._labels[:n]

    def auc(self) -> float:
        """ROC AUC via the rank-sum statistic (ties get average ranks); NaN until both classes seen."""
        return roc_auc(*self._filled())

    def log_loss(self) -> float:
        p, y = self._filled()
        if len(p) == 0:
            return float("nan")
        p = np.clip(p, 1e-7, 1 - 1e-7)
        return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def roc_auc(scores: np.ndarray, labels: np.ndarray) -> float:
    n_pos = float(labels.sum())
    n_neg = len(labels) - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    order = np.argsort(scores, kind="mergesort")
    sorted_scores = scores[order]
    ranks = np.empty(len(scores), dtype=np.float64)
    # average ranks over runs of tied scores
    boundaries = np.flatnonzero(np.diff(sorted_scores)) + 1
    starts = np.concatenate([[0], boundaries])
    ends = np.concatenate([boundaries, [len(scores)]])
    avg = (starts + ends + 1) / 2.0
    ranks[order] = np.repeat(avg, ends - starts)
    return float((ranks[labels == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
