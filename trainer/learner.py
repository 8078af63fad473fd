"""One online learner: a dense network, its Embedding Variables, and their optimizers.

`learn` is a progressive-validation step: the batch's forward pass is its score under the
current model, taken before the update that the same pass feeds.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from stream.schema import FeatureSchema
from trainer.batch import Batch
from trainer.config import TrainerConfig
from trainer.models import build_model
from trainer.progressive import RollingMetrics
from trainer.sparse import SparseArch, pool_from


class OnlineLearner:
    def __init__(self, schema: FeatureSchema, config: TrainerConfig) -> None:
        self.schema = schema
        self.config = config
        self.model = build_model(schema, config)
        self.sparse = SparseArch(schema, config.embedding, seed=config.seed)
        self.dense_optimizer = torch.optim.Adam(self.model.parameters(), lr=config.dense_lr)
        self.metrics = RollingMetrics(config.metrics_window)
        self.global_step = 0
        self.samples_seen = 0
        self.rows_evicted = 0

    def learn(self, batch: Batch) -> np.ndarray:
        """Score the batch, then learn from it. Returns the pre-update probabilities."""
        assert batch.labels is not None, "learning needs labels"
        self.model.train()
        pooled, sparse_step = self.sparse.train_forward(batch)
        logits = self.model(batch.dense, pooled)
        loss = F.binary_cross_entropy_with_logits(logits, batch.labels)
        self.dense_optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.dense_optimizer.step()
        self.global_step += 1
        self.sparse.apply_gradients(sparse_step, self.global_step)
        self.rows_evicted += self.sparse.maybe_evict(self.global_step)

        probabilities = torch.sigmoid(logits.detach()).numpy()
        self.metrics.update(probabilities, batch.labels.numpy())
        self.samples_seen += len(batch)
        return probabilities

    @torch.no_grad()
    def predict(self, batch: Batch) -> np.ndarray:
        """Scores without learning: read-only lookups, unknown keys read the default row."""
        self.model.eval()
        logits = self.model(batch.dense, pool_from(batch, self.sparse.lookup))
        return torch.sigmoid(logits).numpy()
