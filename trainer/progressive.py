"""Progressive validation, as River measures online learners: every example is scored by
the model as it stands, before the model learns from it. No holdout set is needed and the
figure tracks what serving would have seen.

Rolling AUC and log loss are computed over two windows at once: the last `window`
examples, and the examples scored in the last `time_window_s` seconds (of the clock given,
wall time by default). The first says how good the model is on a fixed amount of evidence;
the second says how good it was lately, whatever the traffic.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

import numpy as np


TIME_SLICES = 60  # the time window moves in steps of time_window_s / TIME_SLICES
HIST_BINS = 4096  # score histogram bins (logit space, [-LOGIT_RANGE, LOGIT_RANGE]) for time-window AUC
LOGIT_RANGE = 12.0


class RollingMetrics:
    """Progressive AUC and log loss over the last `window` examples (exact), and over the
    last `time_window_s` seconds.

    The time window is kept as per-slice score histograms, so its memory and the cost of
    reading it do not grow with the traffic (a minute at 100k samples/s would be 6M
    scores to sort): log loss is exact, AUC is exact up to ties within one of 4096 bins of
    width 0.006 in logit space, and the window advances in steps of 1/60 of its length."""

    def __init__(self, window: int = 20_000, time_window_s: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if window < 1 or time_window_s <= 0:
            raise ValueError("window must be >= 1 and time_window_s > 0")
        self.window = window
        self.time_window_s = time_window_s
        self._clock = clock
        self._scores = np.zeros(window, dtype=np.float64)
        self._labels = np.zeros(window, dtype=np.float64)
        self._next = 0
        self.seen = 0
        self._slice_s = time_window_s / TIME_SLICES
        # [slice id, positives histogram, negatives histogram, loss sum, count], oldest first
        self._slices: deque[list] = deque()

    def update(self, probabilities: np.ndarray, labels: np.ndarray, at: float | None = None) -> None:
        """Record a scored batch (`at`: when it was scored, on the metrics' clock; now by default)."""
        p_all = np.asarray(probabilities, dtype=np.float64)
        y_all = np.asarray(labels, dtype=np.float64)
        p, y = p_all[-self.window:], y_all[-self.window:]
        idx = (self._next + np.arange(len(p))) % self.window
        self._scores[idx] = p
        self._labels[idx] = y
        self._next = int((self._next + len(p)) % self.window)
        self.seen += len(probabilities)

        now = self._clock() if at is None else at
        sid = int(now // self._slice_s)
        if not self._slices or self._slices[-1][0] != sid:
            self._slices.append([sid, np.zeros(HIST_BINS, np.int64), np.zeros(HIST_BINS, np.int64), 0.0, 0])
        current = self._slices[-1]
        bins = _bins(p_all)
        positive = y_all == 1
        current[1] += np.bincount(bins[positive], minlength=HIST_BINS)
        current[2] += np.bincount(bins[~positive], minlength=HIST_BINS)
        current[3] += log_loss(p_all, y_all) * len(p_all) if len(p_all) else 0.0
        current[4] += len(p_all)
        self._expire(now)

    def _expire(self, now: float) -> None:
        horizon = int((now - self.time_window_s) // self._slice_s)
        while self._slices and self._slices[0][0] <= horizon:
            self._slices.popleft()

    def time_window_count(self) -> int:
        """Examples scored within the time window."""
        self._expire(self._clock())
        return int(sum(s[4] for s in self._slices))

    def time_auc(self) -> float:
        """AUC over the examples scored in the last `time_window_s` seconds."""
        self._expire(self._clock())
        if not self._slices:
            return float("nan")
        pos = np.sum([s[1] for s in self._slices], axis=0)
        neg = np.sum([s[2] for s in self._slices], axis=0)
        return auc_from_histograms(pos, neg)

    def time_log_loss(self) -> float:
        self._expire(self._clock())
        n = sum(s[4] for s in self._slices)
        return float(sum(s[3] for s in self._slices) / n) if n else float("nan")

    def _filled(self) -> tuple[np.ndarray, np.ndarray]:
        n = min(self.seen, self.window)
        return self._scores[:n], self._labels[:n]

    def auc(self) -> float:
        """ROC AUC via the rank-sum statistic (ties get average ranks); NaN until both classes seen."""
        return roc_auc(*self._filled())

    def log_loss(self) -> float:
        return log_loss(*self._filled())


def log_loss(p: np.ndarray, y: np.ndarray) -> float:
    if len(p) == 0:
        return float("nan")
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def _bins(p: np.ndarray) -> np.ndarray:
    q = np.clip(p, 1e-12, 1 - 1e-12)
    logit = np.log(q) - np.log1p(-q)
    scaled = (logit + LOGIT_RANGE) * (HIST_BINS / (2 * LOGIT_RANGE))
    return np.clip(scaled.astype(np.int64), 0, HIST_BINS - 1)


def auc_from_histograms(pos: np.ndarray, neg: np.ndarray) -> float:
    """AUC from per-bin counts of positives and negatives (bins in increasing score order);
    a positive and a negative in the same bin count as a tie."""
    n_pos, n_neg = float(pos.sum()), float(neg.sum())
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    below = np.cumsum(neg) - neg
    return float((pos * (below + 0.5 * neg)).sum() / (n_pos * n_neg))


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
