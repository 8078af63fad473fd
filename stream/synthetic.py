"""A seeded synthetic event stream for any feature schema, with a hidden click model that drifts.

Real click logs cannot ship with the project and do not say how fast the world changes, so
the pipeline is exercised on a stream whose truth is known:

- Sparse ids are Zipf-distributed over a per-table vocabulary, and a fraction of draws
  (`new_id_rate`) come from *fresh* ids whose index keeps growing with the event count. Each
  fresh id is drawn about `FRESH_REUSE` times, then never again: the admission filter, the
  growing Embedding Variable and eviction all have work to do.
- The click probability is sigmoid(bias + sum of per-id hidden weights + dense weights).
  A hidden weight is a deterministic function of (seed, feature, id) with a static part and a
  part that rotates: w = s * (sqrt(1 - drift_share) * c + sqrt(drift_share) * r * cos(phi - theta)),
  theta = 2*pi * event_index / drift_period. A model frozen at event i is, half a period
  later, wrong about the drifting half of every weight: learning online measurably matters.
- Per feature, the Zipf-expected weight is subtracted, so the popular ids' rotation does not
  swing the click-through rate; the bias is calibrated once so the CTR sits near `ctr`.

Everything is vectorised by blocks of `BLOCK` events (the generator is not the bottleneck
of the pipeline); only building the per-event dicts is per-event Python. The stream is a
pure function of the seed: the event time `ts` is the only thing read from outside (`clock`,
called as each event is handed out, so `ts` is "now" even when a producer paces slowly).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from itertools import count, islice
from typing import NamedTuple

import numpy as np

from stream.schema import FeatureSchema, SparseFeature, load_schema

BLOCK = 1024  # events generated per vectorised step; part of the seed -> stream contract
FRESH_REUSE = 8.0  # mean number of draws a fresh id receives before it falls out of use
FRESH_WINDOW = 64  # fresh draws pick among this many most recent ids
MULTI_MEAN_LEN = 3.0  # multi-valued lists hold 1 + Poisson(MULTI_MEAN_LEN - 1) ids,
MULTI_MAX_LEN = 10  # at most this many (and at most the feature's max_ids)
SIGNAL = 1.5  # standard deviation of the hidden logit around its bias

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_U32 = np.uint64(0xFFFFFFFF)


class SyntheticEvent(NamedTuple):
    sample: dict
    # The true click probability the label was drawn from: the Bayes-optimal prediction.
    p_click: float
    # Position in the stream; the drift phase is a function of it.
    index: int


@dataclass(frozen=True, slots=True)
class _Block:
    """The ids of a block as flat "entries" (one per id occurrence), in feature-major order."""

    start: int
    size: int
    entry_feature: np.ndarray  # int64 (E,): sparse feature position in the schema
    entry_event: np.ndarray  # int64 (E,): event position within the block
    entry_index: np.ndarray  # int64 (E,): vocabulary index of the id
    counts: np.ndarray  # int64 (n_sparse, size): ids per feature and event, 0 = missing
    dense: np.ndarray  # float64 (size, n_dense): raw counts, NaN = missing


class SyntheticStream:
    """An endless, deterministic stream of labeled samples for `schema` (Criteo by default)."""

    def __init__(
        self,
        schema: FeatureSchema | None = None,
        seed: int = 7,
        *,
        drift_period: int = 1_000_000,
        drift_share: float = 0.5,
        new_id_rate: float = 0.02,
        zipf_a: float = 1.2,
        max_vocab: int = 100_000,
        ctr: float = 0.2,
        missing_rate: float = 0.02,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not 0.0 <= drift_share <= 1.0:
            raise ValueError("drift_share must be in [0, 1]")
        if not 0.0 < ctr < 1.0:
            raise ValueError("ctr must be in (0, 1)")
        if drift_period < 1 or max_vocab < 10:
            raise ValueError("drift_period must be >= 1 and max_vocab >= 10")
        self.schema = schema or load_schema("criteo")
        self.drift_period = drift_period
        self.drift_share = drift_share
        self.new_id_rate = new_id_rate
        self.missing_rate = missing_rate
        self._clock = clock
        self._sparse: tuple[SparseFeature, ...] = self.schema.sparse

        setup = np.random.default_rng([seed, 1])
        tables = sorted({f.table_name for f in self._sparse})
        log_vocab = setup.uniform(math.log(10), math.log(max_vocab), len(tables))
        self._vocab = {t: int(math.exp(v)) for t, v in zip(tables, log_vocab)}
        self._cdf = {t: _zipf_cdf(v, zipf_a) for t, v in self._vocab.items()}
        self._table_key = {t: int(k) for t, k in zip(tables, setup.integers(0, 1 << 32, len(tables)))}
        self._feature_key = setup.integers(0, 1 << 63, len(self._sparse), dtype=np.uint64)
        n_dense = len(self.schema.dense)
        self._scale = SIGNAL / math.sqrt(len(self._sparse) + n_dense)
        self._dense_mu = setup.uniform(0.5, 4.0, n_dense)
        self._dense_sigma = setup.uniform(0.5, 1.5, n_dense)
        self._dense_w = setup.normal(0.0, self._scale, n_dense)
        self._center = self._zipf_expected_weights()
        self._bias = self._calibrate_bias(ctr, np.random.default_rng([seed, 2]))

        self._rng = np.random.default_rng([seed, 0])
        self._events = self._generate()

    # -- public API ---------------------------------------------------------------------------

    def events(self) -> Iterator[SyntheticEvent]:
        """The stream itself (shared: every consumer advances the same position)."""
        return self._events

    def __iter__(self) -> Iterator[dict]:
        return (e.sample for e in self._events)

    def take(self, n: int) -> list[dict]:
        return [e.sample for e in islice(self._events, n)]

    def batches(self, size: int, n: int | None = None) -> Iterator[list[dict]]:
        """Lists of `size` samples, `n` samples in all (forever when None)."""
        remaining = n
        while remaining is None or remaining > 0:
            k = size if remaining is None else min(size, remaining)
            yield self.take(k)
            if remaining is not None:
                remaining -= k

    def hidden_weights(self, feature: str, ids: Sequence[str | int], event_index: int) -> np.ndarray:
        """True weights of emitted ids of one feature at one point of the stream (uncentered)."""
        f = self.schema.sparse_names.index(feature)
        index = np.array([self._id_index(self._sparse[f], x) for x in ids], dtype=np.int64)
        theta = np.full(len(index), self._theta(event_index))
        return self._weights(np.full(len(index), f), index, theta)

    def click_probability(self, sample: dict, event_index: int) -> float:
        """The true click probability of a sample dict at a point of the stream.

        With the index the event was generated at, this equals its `p_click`; with an earlier
        index, it is what a perfect model frozen at that point would predict."""
        counts = np.zeros((len(self._sparse), 1), dtype=np.int64)
        feats: list[int] = []
        index: list[int] = []
        for f, feat in enumerate(self._sparse):
            value = sample.get(feat.name)
            values = [] if value is None else (value if feat.multi else [value])
            counts[f, 0] = len(values)
            feats += [f] * len(values)
            index += [self._id_index(feat, v) for v in values]
        dense = np.array([[np.nan if (v := sample.get(n)) is None else float(v) for n in self.schema.dense_names]])
        block = _Block(event_index, 1, np.array(feats, dtype=np.int64), np.zeros(len(feats), dtype=np.int64),
                       np.array(index, dtype=np.int64), counts, dense)
        return float(_sigmoid(self._bias + self._logits(block))[0])

    # -- generation ---------------------------------------------------------------------------

    def _generate(self) -> Iterator[SyntheticEvent]:
        names = [self.schema.label, *self.schema.dense_names, *self.schema.sparse_names]
        ts_name = self.schema.event_time
        clock = self._clock
        for start in count(0, BLOCK):
            block = self._draw(self._rng, start, BLOCK)
            p = _sigmoid(self._bias + self._logits(block))
            labels = (self._rng.random(BLOCK) < p).astype(np.int64)
            columns = [labels.tolist(), *self._dense_columns(block), *self._sparse_columns(block)]
            for i, (row, p_i) in enumerate(zip(zip(*columns), p.tolist())):
                sample = dict(zip(names, row))
                sample[ts_name] = clock()
                yield SyntheticEvent(sample, p_i, block.start + i)

    def _draw(self, rng: np.random.Generator, start: int, size: int) -> _Block:
        counts = np.empty((len(self._sparse), size), dtype=np.int64)
        feats, events, index = [], [], []
        for f, feat in enumerate(self._sparse):
            if feat.multi:
                cap = min(feat.max_ids, MULTI_MAX_LEN)
                c = np.clip(1 + rng.poisson(MULTI_MEAN_LEN - 1, size), 1, cap)
            else:
                c = np.ones(size, dtype=np.int64)
            c[rng.random(size) < self.missing_rate] = 0
            counts[f] = c
            ev = np.repeat(np.arange(size), c)
            feats.append(np.full(len(ev), f))
            events.append(ev)
            index.append(self._draw_ids(rng, feat.table_name, start + ev))
        dense = np.floor(np.exp(self._dense_mu + self._dense_sigma * rng.standard_normal((size, len(self._dense_mu)))))
        dense[rng.random(dense.shape) < self.missing_rate] = np.nan
        return _Block(start, size, np.concatenate(feats), np.concatenate(events), np.concatenate(index), counts, dense)

    def _draw_ids(self, rng: np.random.Generator, table: str, event_index: np.ndarray) -> np.ndarray:
        """Zipf ranks over the base vocabulary, or (with `new_id_rate`) one of the newest ids."""
        n = len(event_index)
        vocab = self._vocab[table]
        ids = np.minimum(np.searchsorted(self._cdf[table], rng.random(n), side="right"), vocab - 1)
        fresh = rng.random(n) < self.new_id_rate
        recent = rng.integers(0, FRESH_WINDOW, n)
        frontier = (event_index * (self.new_id_rate / FRESH_REUSE)).astype(np.int64)
        return np.where(fresh, vocab + frontier + recent, ids).astype(np.int64)

    # -- the hidden click model ---------------------------------------------------------------

    def _theta(self, event_index: np.ndarray | int) -> np.ndarray | float:
        return 2.0 * np.pi * np.asarray(event_index, dtype=np.float64) / self.drift_period

    def _weights(self, feature: np.ndarray, index: np.ndarray, theta: np.ndarray) -> np.ndarray:
        static, radius, phase = self._id_params(feature, index)
        rho = self.drift_share
        return self._scale * (math.sqrt(1 - rho) * static + math.sqrt(rho) * radius * np.cos(phase - theta))

    def _id_params(self, feature: np.ndarray, index: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per-id hidden parameters from a hash of (seed, feature, id): no table to store."""
        h = _splitmix64(index.astype(np.uint64) * _GOLDEN ^ self._feature_key[feature])
        u = []
        for _ in range(4):
            h = _splitmix64(h)
            u.append(((h >> np.uint64(11)).astype(np.float64) + 0.5) * 2.0**-53)
        radius = np.sqrt(-2.0 * np.log(u[0]))  # Box-Muller: (radius, phase) is a 2-d normal
        static = np.sqrt(-2.0 * np.log(u[2])) * np.cos(2.0 * np.pi * u[3])
        return static, radius, 2.0 * np.pi * u[1]

    def _zipf_expected_weights(self) -> np.ndarray:
        """Per feature, E[w] under the id distribution, as (static, cos theta, sin theta) terms."""
        center = np.zeros((len(self._sparse), 3))
        share = 1.0 - self.new_id_rate  # fresh ids have expected weight 0
        rho = self.drift_share
        for f, feat in enumerate(self._sparse):
            vocab = self._vocab[feat.table_name]
            p = np.diff(self._cdf[feat.table_name], prepend=0.0)
            static, radius, phase = self._id_params(np.full(vocab, f), np.arange(vocab))
            center[f] = share * self._scale * np.array([
                math.sqrt(1 - rho) * p @ static,
                math.sqrt(rho) * p @ (radius * np.cos(phase)),
                math.sqrt(rho) * p @ (radius * np.sin(phase)),
            ])
        return center

    def _logits(self, block: _Block) -> np.ndarray:
        """The hidden logit minus the bias."""
        f, ev = block.entry_feature, block.entry_event
        theta = self._theta(block.start + ev)
        c = self._center[f]
        w = self._weights(f, block.entry_index, theta) - (c[:, 0] + c[:, 1] * np.cos(theta) + c[:, 2] * np.sin(theta))
        w /= block.counts[f, ev]  # multi-valued features: mean pooling
        sparse = np.bincount(ev, weights=w, minlength=block.size)
        g = (np.log1p(block.dense) - self._dense_mu) / self._dense_sigma
        dense = np.where(np.isnan(g), 0.0, g) @ self._dense_w
        return sparse + dense

    def _calibrate_bias(self, ctr: float, rng: np.random.Generator) -> float:
        """Bisection on a calibration block (own RNG, so the stream does not depend on it)."""
        logits = self._logits(self._draw(rng, 0, 8 * BLOCK))
        lo, hi = -20.0, 20.0
        for _ in range(60):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if _sigmoid(logits + mid).mean() < ctr else (lo, mid)
        return (lo + hi) / 2

    # -- ids as emitted -----------------------------------------------------------------------

    def _dense_columns(self, block: _Block) -> list[list]:
        out = []
        for j in range(block.dense.shape[1]):
            x = block.dense[:, j]
            col = np.nan_to_num(x).astype(np.int64).astype(object)
            col[np.isnan(x)] = None
            out.append(col.tolist())
        return out

    def _sparse_columns(self, block: _Block) -> list[list]:
        out = []
        bounds = np.concatenate([[0], np.cumsum(block.counts.sum(axis=1))])
        for f, feat in enumerate(self._sparse):
            ids = self._emit(feat, block.entry_index[bounds[f]:bounds[f + 1]])
            counts = block.counts[f]
            if feat.multi:
                ends = np.cumsum(counts).tolist()
                out.append([ids[e - c:e] if c else None for e, c in zip(ends, counts.tolist())])
            else:
                col = np.full(block.size, None, dtype=object)
                col[counts > 0] = ids
                out.append(col.tolist())
        return out

    def _emit(self, feat: SparseFeature, index: np.ndarray) -> list:
        """Int ids are the vocabulary index; string ids are 8 hex digits of a 32-bit bijection of
        it, keyed per table, so they look like Criteo's hashed categoricals and map back."""
        if feat.id_type == "int":
            return index.tolist()
        key = np.uint64(self._table_key[feat.table_name])
        mixed = _mix32((index.astype(np.uint64) + key) & _U32).astype(">u4")
        text = mixed.tobytes().hex()
        return [text[i:i + 8] for i in range(0, len(text), 8)]

    def _id_index(self, feat: SparseFeature, value: str | int) -> int:
        if feat.id_type == "int":
            return int(value)
        key = np.uint64(self._table_key[feat.table_name])
        return int((_unmix32(np.array([int(value, 16)], dtype=np.uint64)) - key)[0] & _U32)


def _zipf_cdf(n: int, a: float) -> np.ndarray:
    p = np.arange(1, n + 1, dtype=np.float64) ** -a
    cdf = np.cumsum(p)
    return cdf / cdf[-1]


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return 1.0 / (1.0 + np.exp(-x))


def _splitmix64(x: np.ndarray) -> np.ndarray:
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


# A 32-bit invertible mixer (Wellons' lowbias32) and its inverse, on uint64 arrays < 2**32.
_M1, _M2 = 0x7FEB352D, 0x846CA68B


def _mix32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(_M1)) & _U32
    x = x ^ (x >> np.uint64(15))
    x = (x * np.uint64(_M2)) & _U32
    return x ^ (x >> np.uint64(16))


def _unmix32(x: np.ndarray) -> np.ndarray:
    x = x ^ (x >> np.uint64(16))
    x = (x * np.uint64(pow(_M2, -1, 1 << 32))) & _U32
    x = x ^ (x >> np.uint64(15)) ^ (x >> np.uint64(30))
    x = (x * np.uint64(pow(_M1, -1, 1 << 32))) & _U32
    return x ^ (x >> np.uint64(16))
