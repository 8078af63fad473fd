"""The serving node's HTTP API (FastAPI).

    POST /predict   scores for examples, or for ranking candidates under shared context
    GET  /healthz   the process is up
    GET  /readyz    a version is loaded (503 until then)
    GET  /model     version, lag behind the head, age, table sizes, last error
"""

from __future__ import annotations

import time
from contextlib import asynccontextmanager
from typing import Annotated

from fastapi import Depends, FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse

from publisher.config import RedisConfig
from publisher.redis_store import RedisVersionStore
from serving.api import ModelInfo, PredictRequest, PredictResponse
from serving.config import ServingConfig
from serving.follower import VersionFollower
from serving.model import ServingModel
from stream.sample import InvalidSample, SampleCodec
from stream.schema import FeatureSchema
from trainer.config import TrainerConfig


def current_model(request: Request) -> ServingModel:
    """The version this request is answered from, taken once: later swaps do not affect it."""
    model = request.app.state.follower.current
    if model is None:
        raise HTTPException(503, "no model version loaded yet")
    return model


CurrentModel = Annotated[ServingModel, Depends(current_model)]


def create_app(schema: FeatureSchema, trainer_config: TrainerConfig, redis_config: RedisConfig,
               config: ServingConfig) -> FastAPI:
    follower = VersionFollower(RedisVersionStore(redis_config), schema, trainer_config, config.follow_block_ms)
    codec = SampleCodec(schema)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        follower.start()
        yield
        follower.stop()

    app = FastAPI(title="freshrec serving", lifespan=lifespan)
    app.state.follower = follower

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and length.isdigit() and int(length) > config.max_body_bytes:
            return JSONResponse({"detail": f"body of {length} bytes exceeds {config.max_body_bytes}"}, 413)
        return await call_next(request)

    @app.post("/predict", response_model=PredictResponse)
    def predict(request: PredictRequest, model: CurrentModel) -> PredictResponse:
        rows = request.feature_dicts()
        if len(rows) > config.max_examples:
            raise HTTPException(413, f"{len(rows)} examples exceed the limit of {config.max_examples}")
        features = []
        for i, row in enumerate(rows):
            try:
                features.append(codec.features(row))
            except InvalidSample as e:
                raise HTTPException(422, f"example {i}: {e}") from None
        scores = model.predict(features) if features else []
        m = model.manifest
        return PredictResponse(scores=[float(s) for s in scores], version=m.version, global_step=m.global_step,
                               watermark=m.watermark, model_age_s=time.time() - m.created_at)

    @app.get("/healthz")
    def healthz() -> dict:
        return {"status": "ok"}

    @app.get("/readyz")
    def readyz() -> JSONResponse:
        model = follower.current
        if model is None:
            return JSONResponse({"ready": False, "reason": follower.health.last_error or "loading"}, 503)
        return JSONResponse({"ready": True, "version": model.version})

    @app.get("/model", response_model=ModelInfo)
    def model_info() -> ModelInfo:
        model = follower.current
        head = follower.health.head
        m = model.manifest if model else None
        return ModelInfo(
            version=m.version if m else None,
            head=head,
            lag_versions=(head - m.version) if (m and head is not None) else None,
            global_step=m.global_step if m else None,
            watermark=m.watermark if m else None,
            model_age_s=(time.time() - m.created_at) if m else None,
            live_rows={k: len(t.keys) for k, t in model.tables.items()} if model else {},
            last_error=follower.health.last_error,
        )

    return app
