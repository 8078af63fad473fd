"""Embedding Variable: parity with torch's sparse embedding + optimizers, admission,
eviction, change tracking that never drops an update, and save/restore."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from trainer.embedding import (
    AdmissionConfig,
    EmbeddingVariable,
    EmbeddingVariableConfig,
    EvictionConfig,
    KeyIndex,
    SparseOptimizerConfig,
)
from trainer.embedding.admission import ExactAdmission

DIM = 4
FAST = settings(max_examples=40, deadline=None)


def make(dim: int = DIM, **kwargs) -> EmbeddingVariable:
    return EmbeddingVariable(EmbeddingVariableConfig(name="t", dim=dim, initial_capacity=16, **kwargs))


def train_step(ev: EmbeddingVariable, keys: np.ndarray, step: int, scale: float = 1.0,
               counts: np.ndarray | None = None) -> torch.Tensor:
    """One step of the trainer's protocol on unique keys, with a gradient derived from the keys."""
    keys = np.asarray(keys, dtype=np.int64)
    rows = ev.train_lookup(keys, counts)
    grads = np.cos(keys[:, None] * 0.37 + np.arange(ev.dim) + step).astype(np.float32) * scale
    ev.apply_gradients(keys, grads, step)
    return rows


# -- KeyIndex -------------------------------------------------------------------------------


@FAST
@given(st.lists(st.tuples(st.booleans(), st.lists(st.integers(-40, 200), max_size=60)), max_size=30))
def test_key_index_matches_a_dict(ops: list[tuple[bool, list[int]]]) -> None:
    index, ref = KeyIndex(16), {}
    for insert, keys in ops:
        keys = np.array(keys, dtype=np.int64)
        if insert:
            for key, slot in zip(keys.tolist(), index.put(keys).tolist()):
                assert ref.setdefault(key, slot) == slot
        else:
            for key, slot in zip(keys.tolist(), index.remove(keys).tolist()):
                assert slot == ref.pop(key, -1)
        probe = np.arange(-45, 205, dtype=np.int64)
        assert index.get(probe).tolist() == [ref.get(k, -1) for k in probe.tolist()]
        assert len(index) == len(ref) == len(set(ref.values()))
        assert sorted(index.items()[0].tolist()) == sorted(ref)


def test_key_index_handles_extreme_keys_and_growth() -> None:
    keys = np.array([np.iinfo(np.int64).min, -1, 0, np.iinfo(np.int64).max], dtype=np.int64)
    many = np.random.default_rng(0).integers(np.iinfo(np.int64).min, np.iinfo(np.int64).max, 50_000)
    index = KeyIndex(16)
    slots = index.put(np.concatenate([keys, many]))
    assert np.array_equal(index.get(keys), slots[:4])
    assert len(np.unique(slots)) == len(index) == len(np.unique(np.concatenate([keys, many])))


# -- parity with torch ----------------------------------------------------------------------


def _parity(optimizer: SparseOptimizerConfig, make_torch_opt, steps: int = 40) -> None:
    rng = np.random.default_rng(7)
    universe = rng.integers(-(2**62), 2**62, size=200)
    ev = make(dim=8, optimizer=optimizer)
    emb = torch.nn.Embedding(universe.size, 8, sparse=True)
    with torch.no_grad():
        emb.weight.copy_(torch.from_numpy(ev.initial_rows(universe)))
    opt = make_torch_opt(emb.parameters())
    for step in range(1, steps + 1):
        # Ids come from a growing prefix of the universe: repeats within a batch, and new ids.
        positions = rng.integers(0, min(universe.size, 20 + 5 * step), size=64)
        weight = torch.from_numpy(rng.normal(size=(64, 8)).astype(np.float32))
        target = torch.from_numpy(rng.normal(size=64).astype(np.float32))

        def loss_of(rows: torch.Tensor) -> torch.Tensor:
            return ((rows * weight).sum(1) - target).pow(2).mean()

        opt.zero_grad()
        loss_of(emb(torch.from_numpy(positions))).backward()
        opt.step()

        keys, inverse = np.unique(universe[positions], return_inverse=True)
        rows = ev.train_lookup(keys).requires_grad_()
        loss_of(rows[torch.from_numpy(inverse)]).backward()
        ev.apply_gradients(keys, rows.grad, step)

    seen = np.unique(np.concatenate([universe[: min(universe.size, 20 + 5 * steps)]]))
    keys, values = ev.export()
    position = {k: i for i, k in enumerate(universe.tolist())}
    expected = emb.weight.detach().numpy()[[position[k] for k in keys.tolist()]]
    assert set(keys.tolist()) <= set(seen.tolist())
    np.testing.assert_allclose(values, expected, atol=1e-6, rtol=0)


def test_adagrad_matches_torch() -> None:
    cfg = SparseOptimizerConfig(kind="adagrad", lr=0.1, eps=1e-10, initial_accumulator_value=0.1)
    _parity(cfg, lambda p: torch.optim.Adagrad(p, lr=0.1, eps=1e-10, initial_accumulator_value=0.1))


def test_lazy_adam_matches_torch_sparse_adam() -> None:
    cfg = SparseOptimizerConfig(kind="lazy_adam", lr=0.01, eps=1e-8, beta1=0.8, beta2=0.99)
    _parity(cfg, lambda p: torch.optim.SparseAdam(p, lr=0.01, eps=1e-8, betas=(0.8, 0.99)))


def test_sgd_matches_torch() -> None:
    _parity(SparseOptimizerConfig(kind="sgd", lr=0.1), lambda p: torch.optim.SGD(p, lr=0.1))


def test_rows_start_from_seeded_normal_independent_of_order() -> None:
    keys = np.arange(20_000, dtype=np.int64)
    a = make(init_std=0.5, seed=3).train_lookup(keys).numpy()
    b = make(init_std=0.5, seed=3).train_lookup(keys[::-1].copy()).numpy()[::-1]
    np.testing.assert_array_equal(a, b)
    assert abs(a.std() - 0.5) < 0.01 and abs(a.mean()) < 0.01
    assert not np.array_equal(a, make(init_std=0.5, seed=4).train_lookup(keys).numpy())


def test_lookup_is_read_only_and_shaped() -> None:
    ev = make(default_value=0.25)
    train_step(ev, np.array([1, 2]), step=1)
    out = ev.lookup(np.array([[1, 9], [2, 2]]))
    assert out.shape == (2, 2, DIM)
    assert torch.all(out[0, 1] == 0.25) and len(ev) == 2
    assert torch.equal(out[1, 0], out[1, 1])


# -- admission ------------------------------------------------------------------------------


@FAST
@given(
    freq=st.integers(2, 5),
    kind=st.sampled_from(["counter", "bloom"]),
    batches=st.lists(st.dictionaries(st.integers(0, 30), st.integers(1, 3), min_size=1), min_size=1, max_size=12),
)
def test_admission_after_filter_freq_sightings(freq: int, kind: str, batches: list[dict[int, int]]) -> None:
    ev = make(admission=AdmissionConfig(filter_freq=freq, kind=kind, bloom_capacity=10_000, bloom_fp_rate=1e-4),
              default_value=-1.0)
    seen: dict[int, int] = {}
    for step, batch in enumerate(batches, start=1):
        keys = np.array(sorted(batch), dtype=np.int64)
        counts = np.array([batch[k] for k in keys.tolist()], dtype=np.int64)
        was_live = {k for k in keys.tolist() if seen.get(k, 0) >= freq}
        for k, c in batch.items():
            seen[k] = seen.get(k, 0) + c
        rows = train_step(ev, keys, step, counts=counts).numpy()
        for i, k in enumerate(keys.tolist()):
            if seen[k] < freq:
                assert np.all(rows[i] == -1.0), "unadmitted keys read the default value"
            elif k not in was_live:
                np.testing.assert_array_equal(rows[i], ev.initial_rows(np.array([k]))[0])
        live = {k for k, n in seen.items() if n >= freq}
        assert set(ev.export()[0].tolist()) == live
        absent = np.array(sorted(set(seen) - live), dtype=np.int64)
        assert np.all(ev.lookup(absent).numpy() == -1.0), "no gradient reaches unadmitted keys"


@FAST
@given(
    freq=st.integers(2, 4),
    ops=st.lists(st.one_of(
        st.tuples(st.just("see"), st.dictionaries(st.integers(-3, 3000), st.integers(1, 2), max_size=400)),
        st.tuples(st.just("forget"), st.integers(0, 4)),
        st.tuples(st.just("restore"), st.none()),
    ), max_size=25),
)
def test_exact_counters_match_a_dict(freq: int, ops: list) -> None:
    """The counter table (16-byte buckets, backward-shift deletion, sweeps that delete while
    they scan, growth from 1k buckets) against a dict of (count, last step seen)."""
    admission, ref = ExactAdmission(freq), {}
    for step, (op, arg) in enumerate(ops, start=1):
        if op == "see":
            keys = np.array(list(arg), dtype=np.int64)
            counts = np.array(list(arg.values()), dtype=np.int64)
            admitted = admission.observe(keys, counts, step)
            for key, add, got in zip(keys.tolist(), counts.tolist(), admitted.tolist()):
                total = ref.pop(key, (0, 0))[0] + add
                assert got == (total >= freq)
                if total < freq:
                    ref[key] = (total, step)
        elif op == "forget":
            admission.forget_stale(step, arg)
            ref = {k: (c, seen) for k, (c, seen) in ref.items() if step - seen <= arg}
        else:
            restored = ExactAdmission(freq)
            restored.load_state_dict(admission.state_dict())
            admission = restored
        state = admission.state_dict()
        got = dict(zip(state["keys"].tolist(), zip(state["counts"].tolist(), state["last_seen"].tolist())))
        assert got == ref


def test_bloom_counters_saturate_instead_of_wrapping() -> None:
    ev = make(admission=AdmissionConfig(filter_freq=200, kind="bloom", bloom_capacity=1000))
    ev.train_lookup(np.array([5]), counts=np.array([199]))
    assert len(ev) == 0
    ev.train_lookup(np.array([6]), counts=np.array([10**6]))  # would wrap a uint8 to 64
    assert len(ev) == 1
    ev.train_lookup(np.array([5]), counts=np.array([1]))
    assert len(ev) == 2


# -- eviction -------------------------------------------------------------------------------


@FAST
@given(
    ttl=st.integers(1, 6),
    updates=st.lists(st.lists(st.integers(0, 20), unique=True, min_size=1), min_size=1, max_size=15),
)
def test_steps_to_live_eviction(ttl: int, updates: list[list[int]]) -> None:
    ev = make(eviction=EvictionConfig(steps_to_live=ttl, every_n_steps=1))
    last: dict[int, int] = {}
    cursor = ev.changes_since(0).cursor
    for step, keys in enumerate(updates, start=1):
        train_step(ev, np.array(keys), step)
        last.update({k: step for k in keys})
        evicted = ev.evict(step)
        expected = {k for k, s in last.items() if step - s > ttl}
        assert set(evicted.tolist()) == expected
        for k in expected:
            del last[k]
        assert set(ev.export()[0].tolist()) == set(last)
    changes = ev.changes_since(cursor)
    gone = set(range(21)) - set(last)
    touched = {k for keys in updates for k in keys}
    assert set(changes.tombstones.tolist()) == gone & touched


def test_l2_eviction_removes_small_rows() -> None:
    ev = make(optimizer=SparseOptimizerConfig(kind="sgd", lr=1.0), eviction=EvictionConfig(l2_threshold=0.5))
    keys = np.arange(10, dtype=np.int64)
    target = np.zeros((10, DIM), dtype=np.float32)
    target[:, 0] = np.where(keys % 2 == 0, 0.1, 2.0)
    rows = ev.train_lookup(keys).numpy()
    ev.apply_gradients(keys, rows - target, step=1)  # sgd with lr 1 sets rows to target
    cursor = ev.changes_since(0).cursor
    assert ev.maybe_evict(50) == 0, "every_n_steps (100) has not passed"
    assert ev.maybe_evict(100) == 5
    assert sorted(ev.export()[0].tolist()) == [1, 3, 5, 7, 9]
    assert sorted(ev.changes_since(cursor).tombstones.tolist()) == [0, 2, 4, 6, 8]


def test_exact_admission_counters_expire_with_steps_to_live() -> None:
    ev = make(admission=AdmissionConfig(filter_freq=2), eviction=EvictionConfig(steps_to_live=5))
    ev.train_lookup(np.array([1]))
    ev.evict(10)  # the single sighting of key 1 is forgotten
    ev.train_lookup(np.array([1]))
    assert len(ev) == 0
    ev.train_lookup(np.array([1]))
    assert len(ev) == 1


# -- change tracking ------------------------------------------------------------------------


def _apply(replica: dict[int, np.ndarray], changes) -> None:
    for key in changes.tombstones.tolist():
        replica.pop(key, None)
    replica.update(zip(changes.keys.tolist(), changes.values))


def _assert_same(replica: dict[int, np.ndarray], ev: EmbeddingVariable) -> None:
    keys, values = ev.export()
    assert set(replica) == set(keys.tolist())
    for key, value in zip(keys.tolist(), values):
        np.testing.assert_array_equal(replica[key], value)


OPS = st.lists(
    st.one_of(
        st.tuples(st.just("train"), st.lists(st.integers(0, 40), unique=True, min_size=1, max_size=20)),
        st.tuples(st.just("evict"), st.none()),
        st.tuples(st.just("cut_fast"), st.none()),
        st.tuples(st.just("cut_slow"), st.none()),
    ),
    max_size=40,
)


@FAST
@given(ops=OPS, freq=st.sampled_from([0, 2]))
def test_changes_since_never_drops_an_update(ops: list, freq: int) -> None:
    """Two consumers cutting at different rates both converge to the table at their cut."""
    ev = make(admission=AdmissionConfig(filter_freq=freq),
              eviction=EvictionConfig(steps_to_live=3, l2_threshold=0.004, every_n_steps=1))
    replicas = {"cut_fast": {}, "cut_slow": {}}
    cursors = {"cut_fast": 0, "cut_slow": 0}
    for step, (op, keys) in enumerate(ops, start=1):
        if op == "train":
            train_step(ev, np.array(keys), step, scale=0.01)
        elif op == "evict":
            ev.maybe_evict(step)
        else:
            changes = ev.changes_since(cursors[op])
            _apply(replicas[op], changes)
            cursors[op] = changes.cursor
            _assert_same(replicas[op], ev)
            ev.release(min(cursors.values()))
    for op in replicas:
        _apply(replicas[op], ev.changes_since(cursors[op]))
        _assert_same(replicas[op], ev)


def test_many_updates_between_cuts_are_all_reported() -> None:
    ev = make()
    cursor = ev.changes_since(0).cursor
    for step in range(1, 201):
        train_step(ev, np.arange(step * 50, step * 50 + 500), step)
    changes = ev.changes_since(cursor)
    assert changes.keys.size == len(ev) == 200 * 50 + 450
    assert ev.changes_since(changes.cursor).keys.size == 0


def test_tombstone_log_is_trimmed_by_release() -> None:
    ev = make(eviction=EvictionConfig(steps_to_live=1))
    first = ev.changes_since(0).cursor
    for step in range(1, 50):
        train_step(ev, np.arange(step * 100, step * 100 + 100), step)
        ev.evict(step)
        ev.changes_since(first)
    assert ev.changes_since(first).tombstones.size == 47 * 100
    cursor = ev.changes_since(first).cursor
    ev.release(cursor - 10)
    assert 0 < ev.state_dict()["tombstones.keys"].size < 47 * 100
    ev.release(cursor)
    assert ev.state_dict()["tombstones.keys"].size == 0


# -- save / restore -------------------------------------------------------------------------


CONFIGS = st.sampled_from([
    dict(optimizer=SparseOptimizerConfig(kind="adagrad")),
    dict(optimizer=SparseOptimizerConfig(kind="lazy_adam"), admission=AdmissionConfig(filter_freq=2)),
    dict(optimizer=SparseOptimizerConfig(kind="rowwise_adagrad"),
         admission=AdmissionConfig(filter_freq=3, kind="bloom", bloom_capacity=1000)),
    dict(optimizer=SparseOptimizerConfig(kind="adagrad_decay", accumulator_decay_step=3),
         eviction=EvictionConfig(steps_to_live=4, every_n_steps=2)),
])


def _run(ev: EmbeddingVariable, ops: list, first_step: int) -> None:
    for step, (op, keys) in enumerate(ops, start=first_step):
        if op == "train":
            train_step(ev, np.array(keys), step)
        elif op == "evict":
            ev.maybe_evict(step)
        else:
            ev.changes_since(0)


@FAST
@given(kwargs=CONFIGS, before=OPS, after=OPS)
def test_save_restore_round_trip(kwargs: dict, before: list, after: list) -> None:
    ev = make(**kwargs)
    _run(ev, before, 1)
    state = ev.state_dict()
    assert all(isinstance(v, np.ndarray) and v.dtype != object for v in state.values())
    restored = make(**kwargs)
    restored.load_state_dict({k: v.copy() for k, v in state.items()})
    for table in (ev, restored):
        _run(table, after, len(before) + 1)
    a, b = _canonical(ev.state_dict()), _canonical(restored.state_dict())
    assert a.keys() == b.keys()
    for name in a:
        np.testing.assert_array_equal(a[name], b[name], err_msg=name)


def _canonical(state: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Rows ordered by key: slots (hence row order) differ between a table and its restore."""
    out = dict(state)
    for prefix in ("", "admission."):
        if prefix + "keys" not in state:
            continue
        order = np.argsort(state[prefix + "keys"])
        for name, array in state.items():
            rest = name[len(prefix):]
            if name.startswith(prefix) and (prefix or "." not in name or name.startswith("optimizer.")) \
                    and array.ndim and array.shape[0] == order.size and not rest.startswith("tombstones"):
                out[name] = array[order]
    order = np.lexsort((state["tombstones.keys"], state["tombstones.stamps"]))
    for name in ("tombstones.keys", "tombstones.stamps"):
        out[name] = state[name][order]
    return out


def test_load_rejects_another_dim() -> None:
    with pytest.raises(ValueError):
        make(dim=3).load_state_dict(make(dim=4).state_dict())


# -- optimizers without a torch counterpart: against their published update rules ----------


def _rowwise_adagrad(row, state, g, step, c):
    state = state + np.mean(g * g)
    return row - c.lr * g / (np.sqrt(state) + c.eps), state


def _adagrad_decay(row, state, g, step, c):
    """DeepRec KvSparseApplyAdagradDecay: at most one decay per update, counted per row."""
    accum, power = state if state is not None else (np.full_like(row, c.initial_accumulator_value), 0)
    if step // c.accumulator_decay_step > power:
        accum, power = np.maximum(accum * c.accumulator_decay_rate, c.accumulator_baseline), power + 1
    accum = accum + g * g
    return row - c.lr * g / (np.sqrt(accum) + c.eps), (accum, power)


@pytest.mark.parametrize("config, rule", [
    (SparseOptimizerConfig(kind="rowwise_adagrad", lr=0.1, initial_accumulator_value=0.01), _rowwise_adagrad),
    (SparseOptimizerConfig(kind="adagrad_decay", lr=0.1, initial_accumulator_value=0.1, accumulator_decay_step=4,
                           accumulator_decay_rate=0.5, accumulator_baseline=0.05), _adagrad_decay),
])
def test_optimizer_follows_its_update_rule(config: SparseOptimizerConfig, rule) -> None:
    ev = make(optimizer=config)
    rng = np.random.default_rng(1)
    rows: dict[int, np.ndarray] = {}
    states: dict[int, object] = {}
    for step in range(1, 40):
        keys = np.unique(rng.integers(0, 30, size=12))
        grads = rng.normal(size=(keys.size, DIM)).astype(np.float32)
        ev.train_lookup(keys)
        ev.apply_gradients(keys, torch.from_numpy(grads), step)
        for key, g in zip(keys.tolist(), grads.astype(np.float64)):
            row = rows.get(key, ev.initial_rows(np.array([key]))[0].astype(np.float64))
            default = config.initial_accumulator_value if rule is _rowwise_adagrad else None
            rows[key], states[key] = rule(row, states.get(key, default), g, step, config)
    keys, values = ev.export()
    np.testing.assert_allclose(values, np.stack([rows[k] for k in keys.tolist()]), atol=1e-5, rtol=0)


def test_a_publisher_thread_cutting_during_training_misses_nothing() -> None:
    import threading

    ev = make(eviction=EvictionConfig(steps_to_live=2, every_n_steps=1))
    replica: dict[int, np.ndarray] = {}
    done = threading.Event()

    def publish() -> None:
        cursor = 0
        while not done.is_set():
            changes = ev.changes_since(cursor)
            _apply(replica, changes)
            cursor = changes.cursor
        _apply(replica, ev.changes_since(cursor))

    publisher = threading.Thread(target=publish)
    publisher.start()
    rng = np.random.default_rng(0)
    for step in range(1, 300):
        train_step(ev, np.unique(rng.integers(0, 200, 30)), step, scale=0.01)
        ev.maybe_evict(step)
    done.set()
    publisher.join()
    _assert_same(replica, ev)


@pytest.mark.parametrize("freq", [0, 2, 3])
def test_lookup_growing_mid_batch_admits_every_key_once(freq: int) -> None:
    """The table grows while a batch is being looked up (it starts tiny, batches bring
    hundreds of new keys): every key whose sightings reach filter_freq gets exactly one row,
    and the caller's counts are left alone."""
    ev = make(dim=3, admission=AdmissionConfig(filter_freq=freq))
    rng, seen = np.random.default_rng(1), {}
    for step in range(1, 20):
        keys = np.unique(rng.integers(0, 3000, 500))
        counts = rng.integers(1, 3, keys.size)
        given = counts.copy()
        rows = ev.train_lookup(keys, counts).numpy()
        np.testing.assert_array_equal(counts, given)
        for k, c in zip(keys.tolist(), counts.tolist()):
            seen[k] = seen.get(k, 0) + c
        live = {k for k, n in seen.items() if n >= max(freq, 1)}
        assert set(ev.export()[0].tolist()) == live
        admitted = np.array([k in live for k in keys.tolist()])
        np.testing.assert_array_equal(rows[admitted], ev.lookup(keys[admitted]).numpy())
        ev.apply_gradients(keys, np.ones((keys.size, 3), np.float32), step)
