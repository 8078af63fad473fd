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
