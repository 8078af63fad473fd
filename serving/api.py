"""Request and response models of the serving API."""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator


class PredictRequest(BaseModel):
    """Either `examples` (each a full set of features), or ranking: `context` features shared
    by every one of `candidates` (a candidate's own fields win over the context's)."""

    model_config = ConfigDict(extra="forbid")

    examples: list[dict[str, Any]] | None = None
    context: dict[str, Any] | None = None
    candidates: list[dict[str, Any]] | None = None

    @model_validator(mode="after")
    def _one_form(self) -> "PredictRequest":
        if (self.examples is None) == (self.candidates is None):
            raise ValueError("give either `examples`, or `candidates` (with optional `context`)")
        if self.examples is not None and self.context is not None:
            raise ValueError("`context` goes with `candidates`, not with `examples`")
        return self

    def feature_dicts(self) -> list[dict[str, Any]]:
        if self.examples is not None:
            return self.examples
        context = self.context or {}
        return [{**context, **c} for c in self.candidates or []]


class PredictResponse(BaseModel):
    scores: list[float] = Field(description="click probability per example or candidate, in request order")
    version: int = Field(description="the model version every score came from")
    global_step: int
    watermark: float = Field(description="newest event time (unix s) the version has learned")
    model_age_s: float = Field(description="seconds since the version was cut by the trainer")


class ModelInfo(BaseModel):
    version: int | None
    head: int | None
    lag_versions: int | None
    global_step: int | None
    watermark: float | None
    model_age_s: float | None
    live_rows: dict[str, int]
    last_error: str | None
