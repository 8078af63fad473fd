"""The serving node's HTTP API (FastAPI).

    POST /predict         scores for examples, or for ranking candidates under shared context
    GET  /healthz         the process is up
    GET  /readyz          a version is loaded and it is within the lag bound (503 otherwise)
    GET  /metrics         Prometheus
    GET  /model           version, head, lag, age, pin, table sizes, last error
    GET  /admin/versions  versions retained in Redis            (admin: Bearer token)
    POST /admin/pin       {"version": v|null}: serve v, stop following
    POST /admin/rollback  {"version": v}: go back to a retained version, and stay there
    POST /admin/unpin     follow the head again

/predict runs on the event loop: the body is validated from bytes in one pass, the version
is acquired, rows gathered (nogil kernels) and the dense net run, and the answer encoded
with orjson; no thread hand-off, no per-example dicts.
"""

from __future__ import annotations

import gc
import hmac
import time
from contextlib import asynccontextmanager

import orjson
import torch
from fastapi import FastAPI, HTTPException, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from publisher.config import RedisConfig
from publisher.redis_store import RedisVersionStore
from serving.api import InvalidRequest, ModelInfo, PredictResponse, RequestParser, TooLarge, VersionRequest
from serving.config import ServingConfig
from serving.follower import NotRetained, VersionFollower
from serving.metrics import ServingMetrics, readiness
from serving.shm import SharedArrays, map_read_only
from serving.table import RowTable, TableView
from stream.schema import FeatureSchema
from trainer.config import TrainerConfig
from trainer.models import build_model

PREDICT_EXAMPLE = {"context": {"I1": 3, "C2": "7a3e"}, "candidates": [{"C1": "a"}, {"C1": "b"}]}


def _json(content: object, status: int = 200) -> Response:
    return Response(orjson.dumps(content), status, media_type="application/json")


def create_app(schema: FeatureSchema, trainer_config: TrainerConfig, redis_config: RedisConfig,
               config: ServingConfig) -> FastAPI:
    metrics = ServingMetrics()
    follower = VersionFollower(RedisVersionStore(redis_config), schema, trainer_config, config.follow_block_ms,
                               on_apply=metrics.observe_apply, on_error=metrics.observe_error)
    metrics.watch(follower, config.max_lag_versions, config.max_lag_seconds)
    parser = RequestParser(schema, config.max_examples)
    max_body = config.max_body_bytes

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        torch.set_num_threads(config.torch_threads)
        _warm_up(schema, trainer_config)
        # The ~290 k objects of the imports, the app and the warm-up live as long as the
        # process. Frozen, the collector no longer walks them: a full collection took
        # ~200 ms here, a stall of every request in flight whenever one ran.
        gc.collect()
        gc.freeze()
        follower.start()
        yield
        await run_in_threadpool(follower.stop)

    app = FastAPI(title="freshrec serving", lifespan=lifespan)
    app.state.follower = follower
    app.state.metrics = metrics

    async def read_body(request: Request) -> bytes:
        length = request.headers.get("content-length")
        if length is not None and length.isdigit():
            if int(length) > max_body:
                raise TooLarge(f"body of {length} bytes exceeds {max_body}")
            return await request.body()
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > max_body:
                raise TooLarge(f"body exceeds {max_body} bytes")
        return bytes(body)

    request_schema = parser.model.model_json_schema(ref_template="#/components/schemas/{model}")

    @app.post("/predict", response_model=PredictResponse, openapi_extra={"requestBody": {
        "required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/PredictRequest"},
                                                           "example": PREDICT_EXAMPLE}}}},
              responses={413: {"description": "too many examples or candidates, or too large a body"},
                         422: {"description": "a field that does not fit the feature schema"},
                         503: {"description": "no version loaded yet"}})
    async def predict(request: Request) -> Response:
        started = time.perf_counter()
        try:
            inputs = parser.parse(await read_body(request))
        except TooLarge as e:
            metrics.observe("/predict", 413, time.perf_counter() - started)
            return _json({"detail": str(e)}, 413)
        except InvalidRequest as e:
            metrics.observe("/predict", 422, time.perf_counter() - started)
            return _json({"detail": e.errors}, 422)
        model = follower.acquire()
        if model is None:
            metrics.observe("/predict", 503, time.perf_counter() - started)
            return _json({"detail": "no model version loaded yet"}, 503)
        try:
            scores = model.score(inputs) if inputs.n else None
        finally:
            model.release()
        m = model.manifest
        body = orjson.dumps({"scores": scores.tolist() if scores is not None else [], "version": m.version,
                             "global_step": m.global_step, "watermark": m.watermark,
                             "model_age_s": time.time() - m.created_at})
        metrics.observe_predict(time.perf_counter() - started, inputs.n)
        return Response(body, media_type="application/json", headers={"x-model-version": str(m.version)})

    @app.get("/healthz")
    async def healthz() -> Response:
        return _json({"status": "ok"})

    @app.get("/readyz")
    async def readyz() -> Response:
        ready, reason, details = readiness(follower, config.max_lag_versions, config.max_lag_seconds)
        body = {"ready": ready, **details}
        if reason:
            body["reason"] = reason
        return _json(body, 200 if ready else 503)

    @app.get("/metrics")
    async def prometheus() -> Response:
        return Response(metrics.exposition(), media_type="text/plain; version=0.0.4; charset=utf-8")

    @app.get("/model", response_model=ModelInfo)
    async def model_info() -> ModelInfo:
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
            pinned=follower.pinned,
            live_rows=dict(model.live_rows) if model else {},
            last_error=follower.health.last_error,
        )

    # ---- admin ------------------------------------------------------------------------

    app.add_middleware(AdminTokenFirst, token=config.admin_token)

    def pinned_state() -> dict:
        model = follower.current
        return {"version": model.version if model else None, "pinned": follower.pinned,
                "head": follower.health.head}

    @app.get("/admin/versions")
    def admin_versions() -> JSONResponse:
        return JSONResponse({"retained": follower.retained_versions(), **pinned_state()})

    def change_version(version: int | None, rollback: bool) -> JSONResponse:
        try:
            follower.pin(version, rollback=rollback)
        except NotRetained as e:
            raise HTTPException(404, str(e)) from None
        except ValueError as e:
            raise HTTPException(409, str(e)) from None
        return JSONResponse(pinned_state())

    @app.post("/admin/pin")
    def admin_pin(body: VersionRequest | None = None) -> JSONResponse:
        return change_version(body.version if body else None, rollback=False)

    @app.post("/admin/rollback")
    def admin_rollback(body: VersionRequest) -> JSONResponse:
        if body.version is None:
            raise HTTPException(422, "rollback needs a version")
        return change_version(body.version, rollback=True)

    @app.post("/admin/unpin")
    def admin_unpin() -> JSONResponse:
        follower.unpin()
        return JSONResponse(pinned_state())

    def openapi() -> dict:
        if app.openapi_schema is None:
            from fastapi.openapi.utils import get_openapi

            spec = get_openapi(title=app.title, version=app.version, routes=app.routes)
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components.update(request_schema.pop("$defs", {}))
            components["PredictRequest"] = request_schema
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi
    return app


def _warm_up(schema: FeatureSchema, trainer_config: TrainerConfig) -> None:
    """Compile the kernels of the request path (or load them from numba's cache) before the
    first request, for the arrays it really gets: tables mapped read-only from the helper
    that writes them (numba compiles a kernel anew for read-only arrays, and a compile holds
    the GIL for ~0.2-0.5 s: requests would wait for it). The helper loads its own kernels, at
    its own priority."""
    import numpy as np

    alloc = SharedArrays()
    table = RowTable.build(np.arange(4, dtype=np.int64), np.zeros((4, 2), np.float32), 0.0, alloc)
    arrays = table.lookup_arrays()
    fds = alloc.take_new(list(arrays.values()))
    mapped = {name: map_read_only(fd, a.shape, a.dtype) for (name, a), fd in zip(arrays.items(), fds)}
    TableView(0.0, mapped).lookup(np.array([1, 9], np.int64))
    build_model(schema, trainer_config)  # imports the model code paths


def admin_refusal(token: str | None, authorization: str) -> HTTPException | None:
    """Why an admin request is refused (None: it may proceed)."""
    if token is None:
        return HTTPException(404, "the admin API is disabled (serving.admin_token is not set)")
    scheme, _, given = authorization.partition(" ")
    if scheme.lower() != "bearer" or not given:
        return HTTPException(401, "admin API: send Authorization: Bearer <token>", headers={"WWW-Authenticate": "Bearer"})
    if not hmac.compare_digest(given.encode(), token.encode()):
        return HTTPException(403, "admin API: wrong token")
    return None


class AdminTokenFirst:
    """Checks the admin token before anything reads the request body: an unauthenticated
    caller gets 401/403 whatever it sends, and learns nothing about the API's validation.
    Plain ASGI, so it costs /predict one string comparison."""

    def __init__(self, app, token: str | None) -> None:
        self.app = app
        self.token = token

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] == "http" and scope["path"].startswith("/admin"):
            headers = dict(scope["headers"])
            refusal = admin_refusal(self.token, headers.get(b"authorization", b"").decode("latin-1"))
            if refusal is not None:
                response = JSONResponse({"detail": refusal.detail}, refusal.status_code, headers=refusal.headers)
                await response(scope, receive, send)
                return
        await self.app(scope, receive, send)
