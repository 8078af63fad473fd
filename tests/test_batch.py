import numpy as np
import torch

from stream.sample import Features
from stream.schema import load_schema
from trainer.batch import build_batch
from trainer.sparse import pool


def test_shared_table_keys_are_deduplicated_and_bags_point_into_them():
    schema = load_schema("movielens")  # item_id and history share the "item" table
    features = [
        Features((30.0, 1.0), ((1,), (10,), (10, 11), (), (7,))),
        Features((40.0, 2.0), ((2,), (11,), (), (), (7,))),
    ]
    batch = build_batch(schema, features, [1, 0])
    assert list(batch.tables["item"].keys) == [10, 11]
    assert list(batch.tables["item"].counts) == [2, 2]
    history = batch.bags[2]
    assert history.offsets.tolist() == [0, 2] and history.indices.tolist() == [0, 1]

    rows = {name: torch.tensor(t.keys, dtype=torch.float32)[:, None].repeat(1, schema.table(name).dim)
            for name, t in batch.tables.items()}
    pooled = pool(batch, rows)
    assert pooled[1][:, 0].tolist() == [10.0, 11.0]  # item_id
    assert pooled[2][:, 0].tolist() == [10.5, 0.0]  # history, mean pooling; empty bag pools to zero
    assert pooled[3].shape == (2, 8)  # genres: absent everywhere
    np.testing.assert_array_equal(batch.labels.numpy(), [1.0, 0.0])
