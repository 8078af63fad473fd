"""The never-ending loop: micro-batch in, progressive step, hooks out.

Hooks run on the training thread between steps, when the model is at one global step and
nothing is changing it: that is where the publisher cuts a consistent version. A hook that
is slow makes training wait (bounded memory) rather than letting changes pile up unseen.
"""

from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field
from typing import Protocol

from trainer.learner import OnlineLearner
from trainer.source import KafkaSampleSource

log = logging.getLogger(__name__)


@dataclass
class Position:
    """How far the stream has been learned: part of every published version."""

    topic: str
    offsets: dict[int, int] = field(default_factory=dict)  # partition -> next offset to read
    watermark: float = 0.0  # newest event time learned
    newest_produced_ms: int = 0  # newest Kafka timestamp learned (for freshness)


class StepHook(Protocol):
    def after_step(self, learner: OnlineLearner, position: Position) -> None: ...

    def close(self, learner: OnlineLearner, position: Position) -> None: ...


class TrainingLoop:
    def __init__(self, source: KafkaSampleSource, learner: OnlineLearner, hooks: list[StepHook],
                 position: Position) -> None:
        self.source = source
        self.learner = learner
        self.hooks = hooks
        self.position = position
        self.started = time.monotonic()

    def run(self, stop: threading.Event) -> None:
        try:
            while not stop.is_set():
                self.step_once()
        finally:
            self.source.flush()
            for hook in self.hooks:
                hook.close(self.learner, self.position)
            self.source.close()

    def step_once(self) -> None:
        micro = self.source.next_batch()
        if micro is not None:
            batch = micro.batch  # built off the training thread; None if every message was dead-lettered
            if batch is not None:
                self.learner.learn(batch)
                self.position.watermark = max(self.position.watermark, micro.watermark)
                self.position.newest_produced_ms = max(self.position.newest_produced_ms, micro.newest_produced_ms)
            self.position.offsets = micro.next_offsets
        self.source.flush()
        for hook in self.hooks:
            hook.after_step(self.learner, self.position)
