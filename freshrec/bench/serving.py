"""Serving throughput and latency: ranking requests (shared context + N candidates) against a
running freshrec node, beside a naive FastAPI handler (JSON -> merged dict per candidate ->
SampleCodec -> build_batch -> Python dict lookups -> the same torch model), both measured in
this run on the same versions and the same requests.

Versions are written straight to Redis with the publisher's payload format and store: a
snapshot of `--rows` rows (Criteo schema: 26 tables, dim 16), and while deltas are applied,
one delta of `--delta-rows` changed rows (+ tombstones) every `--delta-interval` seconds.

Phases: closed-loop load at fixed concurrency levels (QPS, p50, p99), for both servers;
then open-loop load at half of freshrec's peak QPS (latency counted from each request's
scheduled start, so a stall is never hidden): `--rounds` windows while deltas are applied,
each between two idle windows, the requests of each kind of window pooled (`_pooled`), with
the freshrec worker's CPU in each window (a share of one core: how close to saturation). The
load generator's garbage collector is off while it measures (its pauses would count as the
server's latency).
Both servers run as uvicorn subprocesses with one worker each; the load generator is a
minimal keep-alive HTTP/1.1 client on loopback. The last line printed is one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

NAIVE_ENV = "FRESHREC_BENCH_NAIVE"  # the naive server reads its settings from here


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--quick", action="store_true", help="a small, short run (smoke test)")
    parser.add_argument("--redis-url", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rows", type=int, default=1_000_000, help="rows in the snapshot (all tables)")
    parser.add_argument("--delta-rows", type=int, default=100_000, help="changed rows per delta (all tables)")
    parser.add_argument("--delta-interval", type=float, default=1.0, help="seconds between deltas")
    parser.add_argument("--candidates", type=int, default=100)
    parser.add_argument("--candidate-features", type=int, default=2,
                        help="sparse features each candidate sets (C1..Ck); the context sets the rest")
    parser.add_argument("--concurrency", default="1,4,16,64", help="closed-loop levels")
    parser.add_argument("--duration", type=float, default=8.0, help="seconds per measurement")
    parser.add_argument("--warmup", type=float, default=1.5, help="seconds of unmeasured load first")
    parser.add_argument("--paced-connections", type=int, default=32, help="connections of the open-loop phase")
    parser.add_argument("--rounds", type=int, default=5,
                        help="open-loop windows with deltas, each between two idle ones; requests pooled by kind")
    parser.add_argument("--naive-threads", type=int, default=1, help="torch threads of the naive server")
    parser.add_argument("--seed", type=int, default=0)


def _quick(args: argparse.Namespace) -> argparse.Namespace:
    small = dict(rows=20_000, delta_rows=5_000, concurrency="1,8", duration=1.5, warmup=0.5,
                 paced_connections=8, delta_interval=0.5, rounds=1)
    return argparse.Namespace(**{**vars(args), **small})


# ---- the naive handler -------------------------------------------------------------


def naive_app_from_env():
    """The baseline server (uvicorn --factory): what a first FastAPI version looks like."""
    import torch
    from fastapi import FastAPI

    from freshrec.settings import load_settings
    from publisher.payload import Kind, decode
    from publisher.redis_store import RedisVersionStore
    from stream.sample import SampleCodec
    from trainer.batch import build_batch
    from trainer.models import build_model
    from trainer.sparse import pool_from

    settings = load_settings(os.environ[NAIVE_ENV])
    torch.set_num_threads(int(os.environ.get("FRESHREC_BENCH_NAIVE_THREADS", "1")))
    schema = settings.feature_schema()
    store = RedisVersionStore(settings.redis)
    version = store.newest_snapshot()
    manifest = store.manifest(version)
    payload = decode(store.read_payload(Kind.SNAPSHOT, version, manifest.snapshot))
    model = build_model(schema, settings.trainer)
    model.load_state_dict({k[6:]: torch.from_numpy(v.copy()) for k, v in payload.arrays.items()
                           if k.startswith("dense/")})
    model.eval()
    tables: dict[str, tuple[dict[int, int], np.ndarray, np.ndarray]] = {}
    for spec in schema.tables:
        keys = payload.arrays[f"table/{spec.name}/keys"]
        values = payload.arrays[f"table/{spec.name}/values"].copy()
        default = np.full(spec.dim, float(payload.arrays[f"table/{spec.name}/default"]), np.float32)
        tables[spec.name] = ({int(k): i for i, k in enumerate(keys)}, values, default)
    codec = SampleCodec(schema)

    def rows(name: str, keys: np.ndarray) -> torch.Tensor:
        index, values, default = tables[name]
        return torch.from_numpy(np.stack([values[i] if (i := index.get(int(k))) is not None else default
                                          for k in keys]) if len(keys) else np.zeros((0, len(default)), np.float32))

    app = FastAPI()

    @app.post("/predict")
    def predict(request: dict) -> dict:
        context = request.get("context") or {}
        features = [codec.features({**context, **c}) for c in request["candidates"]]
        batch = build_batch(schema, features)
        with torch.no_grad():
            scores = torch.sigmoid(model(batch.dense, pool_from(batch, rows))).tolist()
        return {"scores": scores, "version": version}

    @app.get("/readyz")
    def readyz() -> dict:
        return {"ready": True, "version": version}

    return app


# ---- data ---------------------------------------------------------------------------


class Versions:
    """Writes a snapshot and prepared deltas to Redis in the publisher's format."""

    def __init__(self, args: argparse.Namespace, redis_config, schema, trainer_config) -> None:
        import torch

        from publisher.redis_store import RedisVersionStore
        from stream.hashing import hash_string_id
        from trainer.models import build_model

        self.args = args
        self.schema = schema
        self.store = RedisVersionStore(redis_config)
        self.rng = np.random.default_rng(args.seed)
        self.per_table = max(1, args.rows // len(schema.tables))
        # Ids are strings "<table>-<i>", keys their stable hashes: requests can name them.
        self.keys = {t.name: np.array([hash_string_id(f"{t.name}-{i}") for i in range(self.per_table)], np.int64)
                     for t in schema.tables}
        torch.manual_seed(args.seed)
        self.dense = {f"dense/{k}": v.detach().numpy().copy()
                      for k, v in build_model(schema, trainer_config).state_dict().items()}
        self.version = 0
        self.next_new = self.per_table

    def _manifest(self, version: int, base: int, rows: int = 0, tombstones: int = 0):
        from publisher.manifest import Manifest

        now = time.time()
        return Manifest(model=self.store.config.model, version=version, base_version=base, global_step=version,
                        topic="bench", offsets={0: version}, watermark=now, newest_produced_ms=int(now * 1000),
                        created_at=now, rows_changed=rows, tombstones=tombstones,
                        live_rows={t.name: self.per_table for t in self.schema.tables})

    def write_snapshot(self) -> None:
        from publisher.payload import Kind, Payload, encode

        arrays = dict(self.dense)
        for t in self.schema.tables:
            arrays[f"table/{t.name}/keys"] = self.keys[t.name]
            arrays[f"table/{t.name}/values"] = (self.rng.standard_normal((self.per_table, t.dim)) * 0.1).astype(
                np.float32)
            arrays[f"table/{t.name}/default"] = np.array(0.0, np.float32)
        self.version = 1
        manifest = self._manifest(1, 0)
        manifest.snapshot = self.store.write_payload(Kind.SNAPSHOT, 1, encode(Payload(Kind.SNAPSHOT, 1, 0, arrays)),
                                                     8 << 20)
        self.store.commit(manifest)

    def prepare_delta(self) -> tuple[int, bytes, int, int]:
        """(version, encoded payload, rows, tombstones): 90% updates of existing rows, 10% new
        rows, and tombstones for 5% as many rows."""
        from publisher.payload import Kind, Payload, encode
        from stream.hashing import hash_string_id

        self.version += 1
        version = self.version
        per = max(1, self.args.delta_rows // len(self.schema.tables))
        arrays = dict(self.dense)
        for name in list(arrays):
            arrays[name] = arrays[name] + np.float32(1e-4 * version)
        rows = tombstones = 0
        for t in self.schema.tables:
            n_new = per // 10
            existing = self.rng.choice(self.keys[t.name], per - n_new, replace=False)
            new = np.array([hash_string_id(f"{t.name}-new-{self.next_new + i}") for i in range(n_new)], np.int64)
            gone = self.rng.choice(self.keys[t.name], per // 20, replace=False)
            keys = np.concatenate([existing, new])
            arrays[f"table/{t.name}/keys"] = keys
            arrays[f"table/{t.name}/values"] = (self.rng.standard_normal((len(keys), t.dim)) * 0.1).astype(np.float32)
            arrays[f"table/{t.name}/tombstones"] = np.setdiff1d(gone, existing)
            rows += len(keys)
            tombstones += len(arrays[f"table/{t.name}/tombstones"])
        self.next_new += per
        return version, encode(Payload(Kind.DELTA, version, version - 1, arrays)), rows, tombstones

    def write_delta(self, prepared: tuple[int, bytes, int, int]) -> None:
        from publisher.payload import Kind

        version, data, rows, tombstones = prepared
        manifest = self._manifest(version, version - 1, rows, tombstones)
        manifest.delta = self.store.write_payload(Kind.DELTA, version, data, 8 << 20)
        self.store.commit(manifest)

    def requests(self, n: int) -> list[bytes]:
        """Ranking bodies: context (dense + the other sparse features) and candidates; ids
        mostly known to the tables, 10% unknown (they read the default row)."""
        import orjson

        a = self.args
        sparse = [f.name for f in self.schema.sparse]
        per_candidate, shared = sparse[:a.candidate_features], sparse[a.candidate_features:]
        table_of = {f.name: f.table_name for f in self.schema.sparse}

        def some_id(feature: str) -> str:
            i = int(self.rng.integers(0, self.per_table * 10 // 9 + 1))
            return f"{table_of[feature]}-{i}"

        bodies = []
        for _ in range(n):
            context = {f.name: int(self.rng.integers(0, 1000)) for f in self.schema.dense}
            context.update({name: some_id(name) for name in shared})
            candidates = [{name: some_id(name) for name in per_candidate} for _ in range(a.candidates)]
            bodies.append(orjson.dumps({"context": context, "candidates": candidates}))
        return bodies

    def cleanup(self) -> None:
        keys = list(self.store.redis.scan_iter(match=f"{self.store.config.prefix}:*", count=1000))
        for i in range(0, len(keys), 1000):
            self.store.redis.delete(*keys[i:i + 1000])


class DeltaWriter:
    """Publishes deltas at a fixed interval from a process of its own (so its GIL and CPU
    time never delay the load generator's clock) while started, and none while paused; the
    deltas are prepared before it first starts."""

    def __init__(self, args: argparse.Namespace, redis_config, n_deltas: int) -> None:
        import multiprocessing

        ctx = multiprocessing.get_context("spawn")
        self.ready, self.go, self.stop_event = ctx.Event(), ctx.Event(), ctx.Event()
        self.written = ctx.Value("i", 0)
        self.process = ctx.Process(target=_write_deltas, daemon=True, args=(
            vars(args), redis_config.model_dump_json(), n_deltas, self.ready, self.go, self.stop_event,
            self.written))
        self.process.start()

    def wait_prepared(self, timeout_s: float = 600) -> None:
        if not self.ready.wait(timeout_s):
            raise RuntimeError("the delta writer did not prepare its deltas in time")

    def start(self) -> None:
        self.go.set()

    def pause(self) -> None:
        self.go.clear()

    def stop(self) -> int:
        self.stop_event.set()
        self.process.join(60)
        return self.written.value


def _write_deltas(args: dict, redis_json: str, n: int, ready, go, stop, written) -> None:
    from publisher.config import RedisConfig
    from stream.schema import load_schema
    from trainer.config import TrainerConfig

    a = argparse.Namespace(**args)
    versions = Versions(a, RedisConfig.model_validate_json(redis_json), load_schema("criteo"), TrainerConfig())
    versions.version = 1  # the snapshot the parent wrote
    prepared = [versions.prepare_delta() for _ in range(n)]  # a chain: written in order
    ready.set()
    next_at = None
    while prepared and not stop.is_set():
        if not go.wait(0.05):
            next_at = None  # paused: the next start begins a schedule of its own
            continue
        next_at = time.monotonic() if next_at is None else next_at
        if stop.wait(max(0.0, next_at - time.monotonic())):
            return
        if go.is_set():
            versions.write_delta(prepared.pop(0))
            with written.get_lock():
                written.value += 1
            next_at += a.delta_interval


# ---- load ---------------------------------------------------------------------------


class Connection:
    """One keep-alive HTTP/1.1 connection with pre-encoded requests."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer

    @classmethod
    async def open(cls, port: int) -> "Connection":
        return cls(*await asyncio.open_connection("127.0.0.1", port))

    async def call(self, request: bytes) -> int:
        self.writer.write(request)
        head = await self.reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length = 0
        for line in head.split(b"\r\n"):
            if line[:15].lower() == b"content-length:":
                length = int(line[15:])
        await self.reader.readexactly(length)
        return status

    def close(self) -> None:
        self.writer.close()


def http_requests(bodies: list[bytes], port: int) -> list[bytes]:
    return [b"POST /predict HTTP/1.1\r\nhost: 127.0.0.1:%d\r\ncontent-type: application/json\r\n"
            b"content-length: %d\r\n\r\n%s" % (port, len(b), b) for b in bodies]


async def closed_loop(port: int, requests: list[bytes], concurrency: int, warmup: float, duration: float) -> dict:
    latencies: list[float] = []
    errors = 0
    start = time.perf_counter()
    measure_from, end = start + warmup, start + warmup + duration

    async def worker(seed: int) -> None:
        nonlocal errors
        conn = await Connection.open(port)
        i = seed * 7919
        try:
            while (now := time.perf_counter()) < end:
                status = await conn.call(requests[i % len(requests)])
                i += 1
                done = time.perf_counter()
                if now >= measure_from:
                    latencies.append(done - now)
                    errors += status != 200
        finally:
            conn.close()

    await asyncio.gather(*(worker(s) for s in range(concurrency)))
    return _summary(latencies, errors, duration)


async def open_loop(port: int, requests: list[bytes], rate: float, connections: int, warmup: float,
                    duration: float, server_pid: int | None = None) -> dict:
    """Requests scheduled at `rate`/s over `connections`; latency from the scheduled start.
    With `server_pid`, also the server's CPU over the measured part, as a share of one core."""
    latencies: list[float] = []
    late: list[float] = []  # how long after its scheduled start a request was sent
    errors = 0
    start = time.perf_counter() + 0.05
    measure_from, end = start + warmup, start + warmup + duration
    interval = connections / rate

    async def worker(k: int) -> None:
        nonlocal errors
        conn = await Connection.open(port)
        n = 0
        try:
            while True:
                scheduled = start + (k / connections) * interval + n * interval
                if scheduled >= end:
                    return
                delay = scheduled - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                sent = time.perf_counter()
                status = await conn.call(requests[(k * 7919 + n) % len(requests)])
                done = time.perf_counter()
                if scheduled >= measure_from:
                    latencies.append(done - scheduled)
                    late.append(sent - scheduled)
                    errors += status != 200
                n += 1
        finally:
            conn.close()

    async def server_busy() -> float:
        await asyncio.sleep(max(0.0, measure_from - time.perf_counter()))
        before = _cpu_seconds(server_pid)
        await asyncio.sleep(max(0.0, end - time.perf_counter()))
        return (_cpu_seconds(server_pid) - before) / duration

    busy = asyncio.ensure_future(server_busy()) if server_pid is not None else None
    await asyncio.gather(*(worker(k) for k in range(connections)))
    summary = _summary(latencies, errors, duration)
    if busy is not None:
        # At "half the peak" the server is busier than half (spaced-out requests cost more):
        # a window near 1.0 queued its requests, whatever else happened.
        summary["server_cpu"] = await busy
    summary["target_qps"] = rate
    summary["latencies_ms"] = np.array(latencies) * 1000  # pooled over windows by _pooled; not printed
    # A request sent late was delayed by this process (or the machine stopping it), not by
    # the server: a window whose worst lateness is near its p99 measured the machine.
    summary["late_max_ms"] = 1000 * max(late, default=0.0)
    return summary


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process, all its threads (/proc/<pid>/stat)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _summary(latencies: list[float], errors: int, duration: float) -> dict:
    a = np.array(latencies) * 1000 if latencies else np.zeros(1)
    return {"qps": len(latencies) / duration, "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "requests": len(latencies), "errors": errors}


# ---- servers ------------------------------------------------------------------------


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_ready(port: int, process: subprocess.Popen, timeout_s: float = 180) -> None:
    import httpx

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"server on port {port} exited with {process.returncode}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/readyz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.2)
    raise RuntimeError(f"server on port {port} not ready after {timeout_s}s")


def _model_version(port: int) -> int | None:
    import httpx

    return httpx.get(f"http://127.0.0.1:{port}/model", timeout=5).json()["version"]


def run(args: argparse.Namespace) -> int:
    import yaml

    if args.quick:
        args = _quick(args)
    from freshrec.settings import Settings
    from publisher.config import RedisConfig
    from serving.config import ServingConfig
    from trainer.config import TrainerConfig

    try:
        import uvloop

        uvloop.install()
    except ImportError:
        pass
    levels = [int(c) for c in args.concurrency.split(",")]
    redis_config = RedisConfig(url=args.redis_url, prefix=f"freshrec-bench-{uuid.uuid4().hex[:12]}", model="bench")
    trainer_config = TrainerConfig()
    fresh_port, naive_port = _free_port(), _free_port()
    settings = Settings(redis=redis_config, trainer=trainer_config,
                        serving=ServingConfig(port=fresh_port, max_examples=max(1024, args.candidates),
                                              follow_block_ms=1000, max_lag_versions=None))
    schema = settings.feature_schema()
    workdir = Path(tempfile.mkdtemp(prefix="freshrec-bench-serving-"))
    config_file = workdir / "settings.yaml"
    config_file.write_text(yaml.safe_dump(settings.model_dump(mode="json", by_alias=True)))

    versions = Versions(args, redis_config, schema, trainer_config)
    processes: list[subprocess.Popen] = []
    print(f"writing a snapshot of {versions.per_table * len(schema.tables):,} rows to Redis ...", flush=True)
    versions.write_snapshot()
    n_deltas = args.rounds * (int((args.warmup + args.duration) / args.delta_interval) + 2)
    print(f"preparing {n_deltas} deltas of {args.delta_rows:,} rows (in the delta writer's process) ...", flush=True)
    writer = DeltaWriter(args, redis_config, n_deltas)
    bodies = versions.requests(64 if args.quick else 256)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(Path(__file__).resolve().parents[2]),
                                                                       os.environ.get("PYTHONPATH")]))}
    try:
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "freshrec.cli", "--config", str(config_file), "serve", "--port", str(fresh_port)],
            env=env, stdout=(workdir / "freshrec.log").open("wb"), stderr=subprocess.STDOUT))
        processes.append(subprocess.Popen(
            [sys.executable, "-m", "uvicorn", "freshrec.bench.serving:naive_app_from_env", "--factory",
             "--host", "127.0.0.1", "--port", str(naive_port), "--log-level", "warning"],
            env={**env, NAIVE_ENV: str(config_file), "FRESHREC_BENCH_NAIVE_THREADS": str(args.naive_threads)},
            stdout=(workdir / "naive.log").open("wb"), stderr=subprocess.STDOUT))
        for port, p in zip((fresh_port, naive_port), processes):
            _wait_ready(port, p)
        writer.wait_prepared()
        gc.collect()
        gc.disable()  # a collection in the load generator would delay requests it then blames on the server
        try:
            results = asyncio.run(_measure(args, levels, fresh_port, naive_port, bodies, writer, processes[0].pid))
        finally:
            gc.enable()
    finally:
        writer.stop()
        for p in processes:
            p.terminate()
        for p in processes:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
        versions.cleanup()

    _report(args, results)
    return 0


async def _measure(args, levels, fresh_port, naive_port, bodies, writer: DeltaWriter, fresh_pid: int) -> dict:
    fresh_req, naive_req = http_requests(bodies, fresh_port), http_requests(bodies, naive_port)
    out: dict = {"closed": {}, "config": {k: getattr(args, k) for k in (
        "rows", "delta_rows", "delta_interval", "candidates", "candidate_features", "duration", "quick")}}
    for c in levels:
        print(f"closed loop, concurrency {c} ...", flush=True)
        fresh = await closed_loop(fresh_port, fresh_req, c, args.warmup, args.duration)
        naive = await closed_loop(naive_port, naive_req, c, args.warmup, args.duration)
        out["closed"][c] = {"freshrec": fresh, "naive": naive}
    peak = max(v["freshrec"]["qps"] for v in out["closed"].values())
    naive_peak = max(v["naive"]["qps"] for v in out["closed"].values())
    half = peak / 2
    conns = args.paced_connections
    out["naive_paced"] = await open_loop(naive_port, naive_req, naive_peak / 2, conns, args.warmup, args.duration)
    print(f"open loop at {half:.0f} req/s (half of freshrec's peak): {args.rounds} windows while a delta of "
          f"{args.delta_rows:,} rows lands every {args.delta_interval}s, each between two idle windows ...", flush=True)
    before = _model_version(fresh_port)

    def paced():
        return open_loop(fresh_port, fresh_req, half, conns, args.warmup, args.duration, server_pid=fresh_pid)

    out["paced_idle"] = [await paced()]
    out["paced_deltas"] = []
    for _ in range(args.rounds):
        writer.start()
        out["paced_deltas"].append(await paced())
        writer.pause()
        out["paced_idle"].append(await paced())
    published = writer.stop()
    await asyncio.sleep(min(3.0, 2 * args.delta_interval))
    after = _model_version(fresh_port)
    out["deltas"] = {"published": published, "served_before": before, "served_after": after,
                     "applied": (after or 0) - (before or 0)}
    out["peak_qps"] = {"freshrec": peak, "naive": naive_peak}
    return out


def _pooled(windows: list[dict]) -> dict:
    """Latency percentiles over the requests of all these windows together: "p99 while deltas
    are applied" is the p99 of every request answered while they were. Per window, one stall of
    the machine (here, 25-100 ms a few times a minute, idle windows as much as delta ones:
    40-50 slow requests) owns the window's p99 (its 40th worst of ~4,000); pooled over five
    windows it is 1% of the tail, not all of it."""
    a = np.concatenate([w["latencies_ms"] for w in windows])
    return {"qps": float(np.mean([w["qps"] for w in windows])), "p50_ms": float(np.percentile(a, 50)),
            "p99_ms": float(np.percentile(a, 99)), "requests": int(a.size),
            "target_qps": float(np.mean([w["target_qps"] for w in windows]))}


def _printable(window: dict) -> dict:
    return {k: v for k, v in window.items() if k != "latencies_ms"}


def _report(args, r: dict) -> None:
    rows = []
    for c, v in r["closed"].items():
        f, n = v["freshrec"], v["naive"]
        rows.append((f"closed c={c}", f, n))
    print()
    print(f"ranking, {args.candidates} candidates, {args.rows:,} rows; freshrec vs naive (same run, 1 worker each)")
    header = f"{'load':<22}{'freshrec qps':>13}{'p50 ms':>8}{'p99 ms':>8}{'naive qps':>11}{'p50 ms':>8}{'p99 ms':>8}" \
             f"{'qps x':>7}{'p99 /':>7}"
    print(header)
    print("-" * len(header))
    for name, f, n in rows:
        print(f"{name:<22}{f['qps']:>13.0f}{f['p50_ms']:>8.2f}{f['p99_ms']:>8.2f}{n['qps']:>11.0f}"
              f"{n['p50_ms']:>8.2f}{n['p99_ms']:>8.2f}{f['qps'] / max(n['qps'], 1e-9):>7.2f}"
              f"{f['p99_ms'] / max(n['p99_ms'], 1e-9):>7.2f}")
    idle, deltas, nv = r["paced_idle"], r["paced_deltas"], _printable(r["naive_paced"])
    i, d = _pooled(idle), _pooled(deltas)
    print(f"{'open, half peak, idle':<22}{i['qps']:>13.0f}{i['p50_ms']:>8.2f}{i['p99_ms']:>8.2f}{nv['qps']:>11.0f}"
          f"{nv['p50_ms']:>8.2f}{nv['p99_ms']:>8.2f}")
    print(f"{'open, half, deltas':<22}{d['qps']:>13.0f}{d['p50_ms']:>8.2f}{d['p99_ms']:>8.2f}")
    print(f"open loop, requests of {len(idle)} idle and {len(deltas)} delta windows (interleaved) pooled; "
          "p99 ms by window: idle " + " ".join(f"{w['p99_ms']:.2f}" for w in idle)
          + ", deltas " + " ".join(f"{w['p99_ms']:.2f}" for w in deltas))
    print("load generator's worst lateness (request sent after its scheduled start) by window, ms: idle "
          + " ".join(f"{w['late_max_ms']:.1f}" for w in idle) + ", deltas "
          + " ".join(f"{w['late_max_ms']:.1f}" for w in deltas))
    print("freshrec worker's CPU by window (share of one core): idle "
          + " ".join(f"{w['server_cpu']:.2f}" for w in idle) + ", deltas "
          + " ".join(f"{w['server_cpu']:.2f}" for w in deltas))
    dl = r["deltas"]
    ratio_qps = r["peak_qps"]["freshrec"] / max(r["peak_qps"]["naive"], 1e-9)
    ratio_p99 = d["p99_ms"] / max(i["p99_ms"], 1e-9)
    print(f"peak QPS freshrec/naive: {ratio_qps:.2f}x (target >= 2); p99 at half peak: {i['p99_ms']:.2f} ms "
          f"(target <= 10); p99 applying deltas / idle: {ratio_p99:.2f} (target <= 1.2); "
          f"deltas applied during the run: {dl['applied']} of {dl['published']} published")
    summary = {
        "benchmark": "serving", **r["config"],
        "peak_qps": r["peak_qps"], "peak_qps_ratio": ratio_qps,
        "half_peak_idle": i, "half_peak_deltas": d, "naive_half_peak": nv,
        "p99_ms_by_window": {"idle": [w["p99_ms"] for w in idle], "deltas": [w["p99_ms"] for w in deltas]},
        "generator_late_max_ms_by_window": {"idle": [w["late_max_ms"] for w in idle],
                                            "deltas": [w["late_max_ms"] for w in deltas]},
        "server_cpu_by_window": {"idle": [w["server_cpu"] for w in idle], "deltas": [w["server_cpu"] for w in deltas]},
        "p99_deltas_over_idle": ratio_p99, "deltas": dl,
        "closed": {str(c): v for c, v in r["closed"].items()},
        "targets_met": {"qps_2x": ratio_qps >= 2, "p99_10ms_half_peak": i["p99_ms"] <= 10,
                        "p99_deltas_1_2x": ratio_p99 <= 1.2},
    }
    print(json.dumps(summary))
