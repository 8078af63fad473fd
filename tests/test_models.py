"""Every model trains through the same learner on the same interface, and learns."""

import numpy as np
import pytest
import torch

from stream.sample import Features
from stream.schema import load_schema
from trainer.batch import build_batch
from trainer.config import TrainerConfig
from trainer.learner import OnlineLearner
from trainer.models import build_model

MODELS = ["dlrm", "deepfm", "wide_deep", "dcn_v2"]


def separable_batches(schema, n_batches=60, size=128, seed=0):
    """Label = whether user id is even: learnable only through the embeddings."""
    rng = np.random.default_rng(seed)
    for _ in range(n_batches):
        users = rng.integers(0, 40, size)
        # sparse, in schema order: user_id, item_id, history, genres (absent), occupation
        feats = [Features((float(rng.normal()), 1.0), ((int(u),), (int(u) % 7,), (1, 2), (), (99,))) for u in users]
        yield build_batch(schema, feats, [int(u % 2 == 0) for u in users])


@pytest.mark.parametrize("model", MODELS)
def test_model_learns_an_embedding_only_signal(model):
    schema = load_schema("movielens")  # mixed table dims (16 and 8) and a shared table
    learner = OnlineLearner(schema, TrainerConfig(model=model, dense_lr=3e-3))
    for batch in separable_batches(schema):
        learner.learn(batch)
    assert learner.metrics.auc() > 0.9, f"{model} did not learn (progressive AUC {learner.metrics.auc():.3f})"


@pytest.mark.parametrize("model", MODELS)
def test_dense_state_round_trips_into_a_fresh_model(model):
    schema = load_schema("criteo")
    config = TrainerConfig(model=model)
    a, b = build_model(schema, config), build_model(schema, config.model_copy(update={"seed": 1}))
    b.load_state_dict({k: v.clone() for k, v in a.state_dict().items()}, strict=True)
    dense = torch.randn(4, 13)
    pooled = [torch.randn(4, 16) for _ in range(26)]
    torch.testing.assert_close(a(dense, pooled), b(dense, pooled))


def test_dlrm_interactions_are_the_dot_products_of_every_pair():
    """DLRM's interaction layer against its definition: <v_i, v_j> for i < j, row-major."""
    model = build_model(load_schema("criteo"), TrainerConfig(model="dlrm"))
    vectors = torch.randn(5, 27, 16, requires_grad=True)
    expected = torch.stack([(vectors[:, i] * vectors[:, j]).sum(-1) for i in range(27) for j in range(i + 1, 27)], 1)
    got = model.interactions(vectors)
    torch.testing.assert_close(got, expected)
    grad = torch.randn_like(expected)
    (want,) = torch.autograd.grad(expected, vectors, grad)
    (have,) = torch.autograd.grad(got, vectors, grad)
    torch.testing.assert_close(have, want)


@pytest.mark.parametrize("model", ["dlrm", "deepfm", "wide_deep"])
@pytest.mark.parametrize("schema_name", ["criteo", "movielens"])
def test_forward_shared_equals_forward_on_expanded_inputs(model, schema_name):
    """A ranking's shared inputs (one row) scored once equal the same inputs repeated per row,
    whichever inputs are shared, the dense ones included or not: probabilities to 1e-5, the
    serving parity bound (the FM's square of sums loses digits to cancellation, so logits of
    unit-scale inputs differ by up to ~3e-5)."""
    schema = load_schema(schema_name)  # movielens: mixed table dims, so projections are used
    m = build_model(schema, TrainerConfig(model=model)).eval()
    dims = [schema.table(f.table_name).dim for f in schema.sparse]
    n, rng = 37, np.random.default_rng(1)
    masks = [[True] + [False] * len(dims), [False] + [True] * (len(dims) - 1) + [False]]
    masks += [list(rng.random(len(dims) + 1) < 0.7) for _ in range(4)]
    with torch.no_grad():
        for shared in masks:
            if all(shared) or not any(shared):
                continue
            widths = [len(schema.dense), *dims]
            parts = [torch.randn(1 if one else n, w) for one, w in zip(shared, widths)]
            expanded = [p.expand(n, -1) for p in parts]
            want = torch.sigmoid(m(expanded[0], expanded[1:]))
            got = torch.sigmoid(m.forward_shared(parts[0], parts[1:]))
            assert got.shape == (n,)
            torch.testing.assert_close(got, want, rtol=0, atol=1e-5)
