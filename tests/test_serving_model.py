import numpy as np
from hypothesis import given, settings, strategies as st

from serving.model import ServingTable


def table(keys, dim=2, default=0.0):
    keys = np.array(sorted(keys), dtype=np.int64)
    return ServingTable(keys, np.repeat(keys[:, None].astype(np.float32), dim, axis=1), default)


def test_lookup_reads_rows_and_default_for_absent_keys():
    t = table([5, -3, 2**62], default=0.25)
    out = t.lookup(np.array([5, 7, -3, 2**62], dtype=np.int64)).numpy()
    np.testing.assert_array_equal(out[:, 0], [5, 0.25, -3, np.float32(2**62)])


def test_empty_table_reads_default():
    t = ServingTable(np.array([], dtype=np.int64), np.zeros((0, 3), np.float32), 1.5)
    assert (t.lookup(np.array([1, 2], dtype=np.int64)).numpy() == 1.5).all()


@settings(max_examples=100, deadline=None)
@given(st.sets(st.integers(-50, 50)), st.sets(st.integers(-50, 50)), st.sets(st.integers(-50, 50)))
def test_apply_matches_a_dict_model(initial, upserts, tombstones):
    """Tombstones first, then upserts: same as replaying the delta on a dict."""
    expected = {k: float(k) for k in initial}
    for k in tombstones:
        expected.pop(k, None)
    for k in upserts:
        expected[k] = k + 1000.0
    up = np.array(sorted(upserts), dtype=np.int64)
    t = table(initial).apply(up, np.repeat((up + 1000)[:, None].astype(np.float32), 2, axis=1),
                             np.array(sorted(tombstones), dtype=np.int64))
    assert list(t.keys) == sorted(expected)
    assert list(t.values[:, 0]) == [expected[k] for k in sorted(expected)]
