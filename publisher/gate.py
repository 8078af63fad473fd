"""The quality gate: a model that suddenly predicts worse is not pushed to serving.

The trainer keeps learning while the gate holds, and its changes accumulate in the
Embedding Variables' change stamps, so nothing is lost: the first version after the gate
reopens carries everything learned meanwhile.
"""

from __future__ import annotations

import logging
import math
import statistics
from collections import deque
from dataclasses import dataclass
from typing import Callable, Literal

from publisher.config import QualityGateConfig

log = logging.getLogger(__name__)

Override = Literal["open", "hold"] | None


@dataclass(frozen=True)
class GateVerdict:
    open: bool
    reason: str


class QualityGate:
    def __init__(self, config: QualityGateConfig, read_override: Callable[[], Override]) -> None:
        self.config = config
        self.read_override = read_override
        self._trailing: deque[float] = deque(maxlen=config.trailing_checks)
        self.verdict = GateVerdict(True, "not checked yet")

    def check(self, auc: float, samples_seen: int) -> GateVerdict:
        verdict = self._decide(auc, samples_seen)
        if verdict.open and not math.isnan(auc):
            self._trailing.append(auc)
        if verdict.open != self.verdict.open:
            log.warning("quality gate %s: %s", "opened" if verdict.open else "HOLDS publishing", verdict.reason)
        self.verdict = verdict
        return verdict

    def _decide(self, auc: float, samples_seen: int) -> GateVerdict:
        override = self.read_override()
        if override == "open":
            return GateVerdict(True, "operator override: open")
        if override == "hold":
            return GateVerdict(False, "operator override: hold")
        if not self.config.enabled:
            return GateVerdict(True, "gate disabled")
        if samples_seen < self.config.min_samples or math.isnan(auc) or not self._trailing:
            return GateVerdict(True, "warming up")
        floor = statistics.median(self._trailing) - self.config.auc_margin
        if auc < floor:
            return GateVerdict(False, f"progressive AUC {auc:.4f} is below its trailing level minus margin ({floor:.4f})")
        return GateVerdict(True, f"progressive AUC {auc:.4f} >= {floor:.4f}")
