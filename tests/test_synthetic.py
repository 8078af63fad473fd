"""The synthetic stream: valid for any schema, deterministic, Zipf-skewed, growing, drifting."""

from __future__ import annotations

from collections import Counter, defaultdict
from itertools import islice

import numpy as np
import orjson
import pytest

from stream.sample import SampleCodec
from stream.schema import FeatureSchema, load_schema
from stream.synthetic import SyntheticEvent, SyntheticStream


def fixed_clock() -> float:
    return 1_700_000_000.0


def stream(schema: str = "criteo", **kw) -> SyntheticStream:
    return SyntheticStream(load_schema(schema), **{"seed": 11, "clock": fixed_clock, **kw})


def events(s: SyntheticStream, n: int) -> list[SyntheticEvent]:
    return list(islice(s.events(), n))


def log_loss(y: np.ndarray, p: np.ndarray) -> float:
    p = np.clip(p, 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def auc(y: np.ndarray, score: np.ndarray) -> float:
    ranks = np.empty(len(score))
    ranks[np.argsort(score, kind="stable")] = np.arange(1, len(score) + 1)
    pos = y == 1
    return float((ranks[pos].sum() - pos.sum() * (pos.sum() + 1) / 2) / (pos.sum() * (~pos).sum()))


@pytest.mark.parametrize("schema", ["criteo", "movielens"])
def test_every_sample_is_valid_for_its_schema(schema: str) -> None:
    s = stream(schema)
    codec = SampleCodec(s.schema)
    for sample in s.take(3000):
        decoded = codec.decode(orjson.dumps(sample))
        assert decoded.event_time == fixed_clock()
        for feat in s.schema.sparse:
            value = sample[feat.name]
            for x in (value or []) if feat.multi else ([] if value is None else [value]):
                assert isinstance(x, str if feat.id_type == "string" else int)


def test_a_user_schema_works_unchanged() -> None:
    schema = FeatureSchema.from_dict({
        "dense": [{"name": "price", "transform": "log1p"}],
        "sparse": [{"name": "shop"}, {"name": "tags", "multi": True, "max_ids": 3}],
        "default_dim": 8,
    })
    s = SyntheticStream(schema, seed=1)
    codec = SampleCodec(schema)
    samples = s.take(2000)
    for sample in samples:
        codec.from_dict(sample)
    assert max(len(x["tags"] or []) for x in samples) == 3


def test_same_seed_same_stream_other_seed_other_stream() -> None:
    assert stream().take(2500) == stream().take(2500)
    assert stream().take(50) != stream(seed=12).take(50)


def test_take_and_batches_continue_the_same_stream() -> None:
    whole = stream().take(3000)
    s = stream()
    parts = s.take(700) + [x for b in s.batches(500, n=1800) for x in b] + s.take(500)
    assert parts == whole
    assert [len(b) for b in stream().batches(400, n=1000)] == [400, 400, 200]


def test_ts_comes_from_the_clock_as_each_event_is_handed_out() -> None:
    ticks = iter(range(100))
    s = SyntheticStream(seed=1, clock=lambda: float(next(ticks)))
    assert [x["ts"] for x in s.take(5)] == [0.0, 1.0, 2.0, 3.0, 4.0]


def test_ids_are_zipf_skewed() -> None:
    samples = stream(new_id_rate=0.0).take(20_000)
    for name in ("C3", "C12", "C20"):
        counts = sorted(Counter(x[name] for x in samples if x[name] is not None).values(), reverse=True)
        top = max(1, len(counts) // 100)
        # Uniform ids would give the top 1% about 1% of the draws.
        assert sum(counts[:top]) / sum(counts) > 0.15, (name, len(counts))


def test_new_ids_keep_appearing() -> None:
    s = stream(new_id_rate=0.05)
    seen: set[str] = set()
    new_per_window = []
    for _ in range(4):
        window = s.take(10_000)
        ids = {x["C7"] for x in window if x["C7"] is not None}
        new_per_window.append(len(ids - seen))
        seen |= ids
    # After the popular ids are known, tens of never-seen ids still arrive in every window.
    assert min(new_per_window[1:]) > 40, new_per_window
    ml = stream("movielens", new_id_rate=0.05)
    first, later = ml.take(5000), (ml.take(20_000), ml.take(5000))[1]
    assert max(x["item_id"] or 0 for x in later) > max(x["item_id"] or 0 for x in first)


@pytest.mark.parametrize("target", [0.04, 0.2])
def test_ctr_is_calibrated_and_stays_there(target: float) -> None:
    ev = events(stream(ctr=target, drift_period=40_000), 40_000)
    labels = np.array([e.sample["label"] for e in ev])
    p = np.array([e.p_click for e in ev])
    for window in np.split(np.arange(len(ev)), 4):  # a full drift period
        assert abs(p[window].mean() - target) < 0.25 * target
    assert abs(labels.mean() - p.mean()) < 0.01  # labels are drawn from p


def test_click_probability_recomputes_p_click() -> None:
    s = stream("movielens")
    for e in events(s, 300)[::7]:
        assert s.click_probability(e.sample, e.index) == pytest.approx(e.p_click, rel=1e-9, abs=1e-12)


def test_hidden_weights_drift_a_quarter_period_apart() -> None:
    period = 100_000
    s = stream(drift_period=period, drift_share=0.5)
    ids = sorted({x["C5"] for x in s.take(5000) if x["C5"] is not None})
    assert len(ids) > 100
    now = s.hidden_weights("C5", ids, 1000)
    corr = lambda t: float(np.corrcoef(now, s.hidden_weights("C5", ids, t))[0, 1])
    # Half of each weight's variance rotates: a quarter turn leaves a correlation of about 1/2.
    assert 0.2 < corr(1000 + period // 4) < 0.8
    assert corr(1000 + period) > 0.999
    assert corr(1000 + 100) > 0.99  # slow: a model has time to follow
    frozen = stream(drift_period=period, drift_share=0.0)
    assert np.allclose(frozen.hidden_weights("C5", ids, 0), frozen.hidden_weights("C5", ids, period // 4))


def test_a_frozen_perfect_model_falls_behind_half_a_period_later() -> None:
    s = stream(drift_period=40_000)
    late = events(s, 22_000)[20_000:]
    y = np.array([e.sample["label"] for e in late])
    current = np.array([e.p_click for e in late])
    frozen = np.array([s.click_probability(e.sample, 0) for e in late])
    assert log_loss(y, current) < log_loss(y, frozen) - 0.05


def test_learning_online_matters_for_a_counting_model() -> None:
    """Per-id click-rate log-odds, fit on the stream's start and frozen, against the same
    model refit on the most recent events, both scored on later events."""
    s = stream(drift_period=80_000)
    ev = [e.sample for e in events(s, 50_000)]
    frozen, recent = CountingModel(ev[:10_000]), CountingModel(ev[30_000:40_000])
    test = ev[40_000:]
    y = np.array([x["label"] for x in test])
    auc_frozen, auc_recent = auc(y, frozen.scores(test)), auc(y, recent.scores(test))
    assert auc_recent > auc_frozen + 0.05, (auc_frozen, auc_recent)


class CountingModel:
    PRIOR = 20.0

    def __init__(self, samples: list[dict]) -> None:
        self.ctr = float(np.mean([x["label"] for x in samples]))
        self.shows: dict[tuple[str, object], int] = defaultdict(int)
        self.clicks: dict[tuple[str, object], int] = defaultdict(int)
        self.names = [k for k in samples[0] if k.startswith("C")]
        for x in samples:
            for name in self.names:
                self.shows[name, x[name]] += 1
                self.clicks[name, x[name]] += x["label"]

    def scores(self, samples: list[dict]) -> np.ndarray:
        base = np.log(self.ctr)
        return np.array([
            sum(np.log((self.clicks.get((n, x[n]), 0) + self.PRIOR * self.ctr)
                       / (self.shows.get((n, x[n]), 0) + self.PRIOR)) - base for n in self.names)
            for x in samples
        ])
