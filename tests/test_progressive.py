import numpy as np
from hypothesis import given, settings, strategies as st

from trainer.progressive import RollingMetrics, roc_auc


def brute_force_auc(scores, labels):
    pos = [s for s, y in zip(scores, labels) if y == 1]
    neg = [s for s, y in zip(scores, labels) if y == 0]
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@settings(max_examples=80, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 5), st.integers(0, 1)), min_size=2, max_size=60))
def test_auc_matches_pairwise_definition_with_ties(pairs):
    scores = np.array([p[0] for p in pairs], dtype=float)
    labels = np.array([p[1] for p in pairs], dtype=float)
    if labels.min() == labels.max():
        assert np.isnan(roc_auc(scores, labels))
    else:
        assert np.isclose(roc_auc(scores, labels), brute_force_auc(scores, labels))


def test_rolling_window_forgets_old_examples():
    m = RollingMetrics(window=100)
    m.update(np.linspace(0, 1, 100), (np.linspace(0, 1, 100) > 0.5).astype(float))  # perfect
    assert m.auc() == 1.0
    m.update(np.linspace(1, 0, 100), (np.linspace(0, 1, 100) > 0.5).astype(float))  # perfectly wrong
    assert m.auc() == 0.0
    assert m.seen == 200


def test_log_loss_of_calibrated_constant():
    m = RollingMetrics(window=1000)
    labels = np.array([1] * 250 + [0] * 750, dtype=float)
    m.update(np.full(1000, 0.25), labels)
    expected = -(0.25 * np.log(0.25) + 0.75 * np.log(0.75))
    assert np.isclose(m.log_loss(), expected)


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_time_window_forgets_what_was_scored_before_it():
    clock = FakeClock()
    m = RollingMetrics(window=10_000, time_window_s=60.0, clock=clock)
    labels = (np.linspace(0, 1, 200) > 0.5).astype(float)
    m.update(np.linspace(0.01, 0.99, 200), labels)  # perfect
    clock.now += 30
    assert m.time_auc() == 1.0 and m.time_window_count() == 200
    m.update(np.linspace(0.99, 0.01, 200), labels)  # perfectly wrong
    assert abs(m.time_auc() - 0.5) < 0.01 and m.time_window_count() == 400
    clock.now += 45  # the first batch is now 75 s old, the second 45 s
    assert m.time_auc() == 0.0 and m.time_window_count() == 200
    assert abs(m.auc() - 0.5) < 0.01 and m.seen == 400  # the sample window still holds both
    wrong = np.linspace(0.99, 0.01, 200)
    expected = -np.mean(labels * np.log(wrong) + (1 - labels) * np.log(1 - wrong))
    assert np.isclose(m.time_log_loss(), expected)  # the second batch's alone
    clock.now += 100
    assert np.isnan(m.time_auc()) and np.isnan(m.time_log_loss()) and m.time_window_count() == 0


def test_time_window_auc_is_close_to_the_exact_auc():
    rng = np.random.default_rng(0)
    p = 1 / (1 + np.exp(-rng.normal(-1.5, 1.5, 20_000)))
    y = (rng.random(20_000) < p).astype(float)
    m = RollingMetrics(window=20_000, clock=lambda: 5.0)
    for i in range(0, 20_000, 500):
        m.update(p[i:i + 500], y[i:i + 500])
    assert abs(m.time_auc() - roc_auc(p, y)) < 1e-3
    assert np.isclose(m.time_log_loss(), m.log_loss())
