"""Applies versions to a serving node's tables in a helper process, so that following the
version stream costs the node's request path only ~0.5-0.6 ms of CPU per version (its
manifest, the helper's reply, the dense parameters copied), not the apply (measured with a
100k-row delta into 1M rows).

Why a process: applying a 100k-row delta to 1M rows was ~20 ms of CPU per table buffer,
twice per version (double buffering). Done by the node (at its priority, with GIL hand-offs
between the kernels), that stalled requests: p99 while deltas landed every second was
1.8-5.7x the idle p99 in `freshrec bench serving`, even after payload reading had moved to a
helper. Applied here it is 1.02-1.30x in full runs, no worse than with the apply skipped
altogether (1.2-1.6x in short runs on a busy 2-core machine). The helper reads the payload
(`RedisVersionStore.read_payload`: manifest size and checksum), verifies it
(`payload.verify`: header, xxh3, zstd), checks every section against the schema, and only
then writes the rows into the tables of the buffer the node names. The tables live in
shared memory (`serving/shm.py`) that the node maps read-only, and once the node serves, the
helper runs only on a core with nothing else to do (SCHED_IDLE): requests, the kernel and
Redis run first.

Protocol, over a SOCK_SEQPACKET socket pair. First the node sends its configuration (Redis,
table dims, dense parameter names, dtypes and shapes) as JSON: the password goes over the
socket, not the command line. Then one request and one reply per version:

    node   {"op": "snapshot", "version", "ref", "buffers": [a, b]}       build a; b = a copy
           {"op": "delta", "version", "ref", "buffer": b, "base": a}     a holds the base version
    helper {"live_rows", "defaults", "arrays": [[buffer, table, name, shape, dtype], ...],
            "grown": [[buffer, table, name, shape], ...], "fds": n}
           or {"error": "payload" | "redis", "message"}

followed by messages carrying the n descriptors (SCM_RIGHTS, at most `_FDS_PER_MESSAGE`
each): first a memory file holding the version's dense parameters (raw, back to back, in the
order, dtypes and shapes of the configuration's "dense": nothing to parse or verify), then
one per entry of "arrays": the lookup arrays (`table.LOOKUP_ARRAYS`) allocated since the
previous reply (all of them after a snapshot; after a delta, those of a table that grew past
its memory files' reserve, or whose buckets were rehashed). "grown" names the arrays the node
has mapped already that grew in place (`shm.SharedArrays.extend`): their new shapes, no
descriptor.

The node writes neither buffer and reads only its front one; it asks for a delta to be
applied to the other (back) buffer only when no request reads it. Buffers are named by the
node. For a delta, the helper brings buffer b to the base version first: with the delta it
applied last (the one that made the base), or, if b is not one step behind (the node gave
up waiting for a request and named a new buffer), as a copy of the base buffer. The helper
keeps only the two buffers of the last request.

A payload that fails a check changes nothing: both buffers stay as they were. If the helper
dies, its tables go with it (the node's mappings stay valid: a version being served is
never torn); the node then rebuilds from the newest snapshot with a new helper.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import socket
import subprocess
import sys
import threading
from dataclasses import dataclass

import numpy as np
import redis

from publisher.config import RedisConfig
from publisher.manifest import PayloadRef
from publisher.payload import Kind, Payload, PayloadError, verify, read_body
from publisher.redis_store import RedisVersionStore
from serving.shm import SharedArrays, map_read_only, memory_file
from serving.table import RowTable

# The helper's CPU priority once the node serves: it runs when the request path does not
# need the CPU. Until then (start-up, or a rebuild with a new helper) it runs at the node's
# priority: a node without a version answers nothing but 503s, and at nice 19 on a busy
# machine its restart to ready took 14-17 s (5-9 s at the node's priority).
NICE = 19
_MESSAGE_BYTES = 1 << 20  # JSON control messages only; arrays travel as memory files
_FDS_PER_MESSAGE = 64  # well under the kernel's limit per message (SCM_MAX_FD, 253)
_REPLY_TIMEOUT_S = 600.0  # a snapshot of many GB still fits; a hung helper is killed after it

DenseSpec = dict[str, tuple[str, tuple[int, ...]]]  # name -> (dtype, shape)


class ApplierDied(RuntimeError):
    """The helper process exited or stopped answering: its tables are gone with it."""


@dataclass(frozen=True)
class Applied:
    """What the node needs of a version the helper applied: the dense parameters, the lookup
    arrays it has not mapped yet, the new shapes of those that grew in place, rows per table,
    and (after a snapshot) default values."""

    dense: dict[str, np.ndarray]
    arrays: list[tuple[int, str, str, np.ndarray]]  # (buffer, table, LOOKUP_ARRAYS name, array)
    grown: list[tuple[int, str, str, tuple[int, ...]]]  # (buffer, table, LOOKUP_ARRAYS name, shape)
    live_rows: dict[str, int]
    defaults: dict[str, float]


class Applier:
    """The node's side: one request at a time (thread-safe), the helper started on first use.
    Its methods raise PayloadError (bad bytes), redis.ConnectionError (Redis failed in the
    helper) or ApplierDied."""

    def __init__(self, redis_config: RedisConfig, dims: dict[str, int], dense: DenseSpec) -> None:
        self._config = json.dumps({"redis": redis_config.model_dump(mode="json"), "dims": dims,
                                   "dense": dense}).encode()
        self._dense = dense
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None
        self._started = False

    def load_snapshot(self, version: int, ref: PayloadRef, buffers: tuple[int, int]) -> Applied:
        """Snapshot `version` into two buffers."""
        return self._call({"op": "snapshot", "version": version, "ref": ref.model_dump(), "buffers": list(buffers)})

    def apply_delta(self, version: int, ref: PayloadRef, buffer: int, base: int) -> Applied:
        """Delta `version` into `buffer`; `base` holds the version it applies on."""
        return self._call({"op": "delta", "version": version, "ref": ref.model_dump(), "buffer": buffer,
                           "base": base})

    @property
    def lost(self) -> bool:
        """The helper was started and is gone (died, or closed)."""
        return self._started and self._socket is None

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _call(self, request: dict) -> Applied:
        with self._lock:
            if self._socket is None:
                if self._started:  # a new helper would have no tables: only the caller can rebuild them
                    raise ApplierDied("the table helper is gone, and its tables with it")
                self._start()
            assert self._socket is not None
            try:
                self._socket.sendall(json.dumps(request).encode())
                return self._receive()
            except (PayloadError, redis.ConnectionError):
                raise  # the helper refused the payload or lost Redis, and goes on
            except (OSError, ValueError) as e:  # includes the timeout and a reply that does not add up
                self._stop()
                raise ApplierDied(f"table helper: {e}") from None

    def _receive(self) -> Applied:
        assert self._socket is not None
        message = self._socket.recv(_MESSAGE_BYTES)
        if not message:
            raise ValueError("the table helper exited")
        reply = json.loads(message)
        if "error" in reply:
            if reply["error"] == "payload":
                raise PayloadError(reply["message"])
            raise redis.ConnectionError(reply["message"])
        fds: list[int] = []
        try:
            while len(fds) < reply["fds"]:
                _, received, _, _ = socket.recv_fds(self._socket, 16, _FDS_PER_MESSAGE)
                if not received:
                    raise ValueError("the table helper sent too few descriptors")
                fds += received
            if len(fds) != 1 + len(reply["arrays"]):
                raise ValueError(f"the table helper sent {len(fds)} descriptors for {len(reply['arrays'])} arrays")
            dense = dense_views(_read_only_file(fds.pop(0)), self._dense)
            arrays = [(buffer, table, name, map_read_only(fds.pop(0), tuple(shape), dtype))
                      for buffer, table, name, shape, dtype in reply["arrays"]]
        finally:
            for fd in fds:
                os.close(fd)
        grown = [(buffer, table, name, tuple(shape)) for buffer, table, name, shape in reply["grown"]]
        return Applied(dense, arrays, grown, reply["live_rows"], reply["defaults"])

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The helper imports the same code as this process, whatever put it on sys.path.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
        try:
            self._process = subprocess.Popen([sys.executable, "-m", "serving.applier", str(theirs.fileno())],
                                             pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        self._started = True
        ours.settimeout(_REPLY_TIMEOUT_S)
        ours.sendall(self._config)
        self._socket = ours

    def _stop(self) -> None:
        if self._socket is not None:
            self._socket.close()  # the helper sees EOF and exits
            self._socket = None
        if self._process is not None:
            try:
                self._process.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
            self._process = None


def dense_views(data: memoryview, spec: DenseSpec) -> dict[str, np.ndarray]:
    """The dense parameters in a memory file the helper wrote: raw arrays back to back, in the
    order of `spec`. Decoding them as a payload (header, checksum, sections) was most of the
    worker's ~1 ms of CPU per version; the helper checked them against the spec already."""
    views, offset = {}, 0
    for name, (dtype, shape) in spec.items():
        dtype, count = np.dtype(dtype), math.prod(shape)
        views[name] = np.frombuffer(data, dtype, count=count, offset=offset).reshape(shape)
        offset += count * dtype.itemsize
    if len(data) < offset:  # (a file is never empty: one spare byte when there are no parameters)
        raise ValueError(f"dense parameters of {len(data)} bytes, expected {offset}")
    return views


def _read_only_file(fd: int) -> memoryview:
    """The whole of memory file `fd`, mapped read-only (the descriptor is closed)."""
    try:
        return memoryview(mmap.mmap(fd, os.fstat(fd).st_size, prot=mmap.PROT_READ))
    finally:
        os.close(fd)


# ---- the helper process ------------------------------------------------------------------


@dataclass
class _Buffer:
    version: int  # -1 while being written
    tables: dict[str, RowTable]


class _Tables:
    """The helper's state: the two buffers of the last request and the delta it applied last."""

    def __init__(self, dims: dict[str, int], dense: DenseSpec, alloc: SharedArrays) -> None:
        self.dims = dims
        self.dense = dense
        self.alloc = alloc
        self.buffers: dict[int, _Buffer] = {}
        self.last_delta: Payload | None = None  # what made the newer buffer's version
        self.sent: dict[tuple[int, str, str], tuple[int, ...]] = {}  # lookup array -> shape the node knows

    def load_snapshot(self, payload: Payload, version: int, ids: list[int]) -> dict:
        _expect(payload, Kind.SNAPSHOT, version)
        dense = self._dense(payload)
        tables, defaults = {}, {}
        for name, dim in self.dims.items():
            keys = _array(payload, f"table/{name}/keys")
            values = _rows(payload, f"table/{name}/values", len(keys), dim)
            defaults[name] = float(_array(payload, f"table/{name}/default"))
            tables[name] = (keys, values)
        self.buffers, self.last_delta = {}, None  # the old tables are freed once the node lets go of them
        first = _Buffer(version, {name: RowTable.build(keys, values, defaults[name], self.alloc)
                                  for name, (keys, values) in tables.items()})
        self.buffers = {ids[0]: first, ids[1]: _copy(first)}
        return self._reply(payload, dense, first, defaults)

    def apply_delta(self, payload: Payload, version: int, buffer: int, base_id: int) -> dict:
        _expect(payload, Kind.DELTA, version)
        base = self.buffers.get(base_id)
        if base is None or payload.base_version != base.version:
            raise PayloadError(f"delta {version} applies on {payload.base_version}, "
                               f"buffer {base_id} holds {base.version if base else None}")
        # Check everything before writing anything: a bad delta must leave both buffers usable.
        changes = [self._changes(payload, name) for name in self.dims]
        dense = self._dense(payload)
        target = self.buffers.get(buffer)
        last = self.last_delta
        behind = [] if target is not None and target.version == base.version else (
            [last] if target is not None and last is not None and last.version == base.version
            and target.version == last.base_version else None)
        if behind is None:  # not one step behind: a copy of the base
            target, behind = _copy(base), []
        target.version = -1
        for delta in behind:
            for name in self.dims:
                target.tables[name].apply(*self._changes(delta, name))
        for name, (keys, values, tombstones) in zip(self.dims, changes):
            target.tables[name].apply(keys, values, tombstones)
        target.version = version
        self.buffers, self.last_delta = {base_id: base, buffer: target}, payload
        return self._reply(payload, dense, target, {})

    def _changes(self, payload: Payload, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        keys = _array(payload, f"table/{name}/keys")
        return keys, _rows(payload, f"table/{name}/values", len(keys), self.dims[name]), \
            _array(payload, f"table/{name}/tombstones")

    def _dense(self, payload: Payload) -> dict[str, np.ndarray]:
        """The payload's dense parameters, checked against the node's (names, shapes, dtypes)."""
        state = {k[len("dense/"):]: v for k, v in payload.arrays.items() if k.startswith("dense/")}
        if state.keys() != self.dense.keys():
            missing, extra = sorted(self.dense.keys() - state.keys()), sorted(state.keys() - self.dense.keys())
            raise PayloadError(f"payload {payload.version}: dense parameters differ "
                               f"(missing {missing}, unexpected {extra})")
        for k, v in state.items():
            dtype, shape = self.dense[k]
            if v.shape != tuple(shape) or not np.can_cast(v.dtype, dtype, "same_kind"):
                raise PayloadError(f"payload {payload.version}: dense/{k} is {v.dtype}{list(v.shape)}, "
                                   f"expected {np.dtype(dtype)}{list(shape)}")
        return state

    def _reply(self, payload: Payload, dense: dict[str, np.ndarray], written: _Buffer,
               defaults: dict[str, float]) -> tuple[dict, list[int]]:
        """The reply and its descriptors: the dense file, then the lookup arrays the node has not
        mapped; and the new shapes of those it has that grew in place."""
        entries = [(b, name, field, array) for b, buffer in sorted(self.buffers.items())
                   for name, table in buffer.tables.items() for field, array in table.lookup_arrays().items()]
        fds = self.alloc.take_new([e[3] for e in entries])
        new = [(entry, fd) for entry, fd in zip(entries, fds) if fd is not None]
        grown = [[b, name, field, list(a.shape)] for (b, name, field, a), fd in zip(entries, fds)
                 if fd is None and self.sent[b, name, field] != a.shape]
        self.sent = {(b, name, field): a.shape for b, name, field, a in entries}
        raw = b"".join(np.ascontiguousarray(dense[name], dtype).tobytes() for name, (dtype, _) in self.dense.items())
        dense_fd = memory_file(max(1, len(raw)))
        os.pwrite(dense_fd, raw, 0)
        reply = {"defaults": defaults,
                 "live_rows": {name: len(t) for name, t in written.tables.items()},
                 "arrays": [[b, name, field, list(a.shape), a.dtype.str] for (b, name, field, a), _ in new],
                 "grown": grown, "fds": 1 + len(new)}
        return reply, [dense_fd] + [fd for _, fd in new]


def _copy(buffer: _Buffer) -> _Buffer:
    return _Buffer(buffer.version, {name: t.copy() for name, t in buffer.tables.items()})


def _expect(payload: Payload, kind: Kind, version: int) -> None:
    if payload.kind is not kind or payload.version != version:
        raise PayloadError(f"expected {kind.name.lower()} {version}, got {payload.kind.name.lower()} {payload.version}")


def _array(payload: Payload, name: str) -> np.ndarray:
    try:
        return payload.arrays[name]
    except KeyError:
        raise PayloadError(f"payload {payload.version} has no section {name!r}") from None


def _rows(payload: Payload, name: str, n: int, dim: int) -> np.ndarray:
    values = _array(payload, name)
    if values.ndim != 2 or values.shape != (n, dim):
        raise PayloadError(f"payload {payload.version}: {name} has shape {values.shape}, expected ({n}, {dim})")
    return values


def _yield_the_cpu() -> None:
    """From now on run only where a core has nothing else to do (SCHED_IDLE; nice 19 where
    there is no such policy). At nice 19 the helper still took time slices beside the
    worker: requests sent in the 50 ms after a version was published were slower than those
    later in the second by a median of 1.8-1.9 ms over 24 versions; as SCHED_IDLE, 0.6-0.7
    (two alternating pairs of runs, 2026-12-06). A non-root process cannot undo either."""
    os.nice(NICE)
    if hasattr(os, "SCHED_IDLE"):
        try:
            os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
        except OSError:  # not allowed here (RLIMIT_NICE, a container's seccomp): nice 19 it is
            pass


class _DeltaBuffers:
    """Two buffers that deltas are read into in turn. Fresh memory is what reading cost most
    here: a new 7.2 MB buffer per delta was ~1,760 page faults (~4 ms of CPU, and in a VM each
    one an exit to the host), where reusing one is a copy. The delta applied last stays in its
    buffer (`_Tables.last_delta` brings the other table buffer up to date with it), so the
    next delta goes to the other one."""

    def __init__(self) -> None:
        self._buffers = [bytearray(), bytearray()]

    def free(self, size: int) -> bytearray:
        """The buffer not holding the last applied delta, at least `size` bytes."""
        if len(self._buffers[0]) < size:
            self._buffers[0] = bytearray(size + size // 4)  # room for deltas a little larger
        return self._buffers[0]

    def taken(self) -> None:
        """The delta in the free buffer was applied: it is the one to keep now."""
        self._buffers.reverse()


def _serve(sock: socket.socket) -> None:
    config = json.loads(sock.recv(_MESSAGE_BYTES))
    store = RedisVersionStore(RedisConfig.model_validate(config["redis"]))
    alloc = SharedArrays()
    tables = _Tables(config["dims"], {k: (d, tuple(s)) for k, (d, s) in config["dense"].items()}, alloc)
    yielded = False
    spare = _DeltaBuffers()
    while message := sock.recv(_MESSAGE_BYTES):
        request = json.loads(message)
        kind = Kind.SNAPSHOT if request["op"] == "snapshot" else Kind.DELTA
        ref = PayloadRef.model_validate(request["ref"])
        try:
            if kind is Kind.SNAPSHOT:
                payload = read_body(verify(store.read_payload(kind, request["version"], ref)))
                reply, fds = tables.load_snapshot(payload, request["version"], request["buffers"])
            else:
                payload = read_body(verify(store.read_payload(kind, request["version"], ref,
                                                              into=spare.free(ref.bytes))))
                reply, fds = tables.apply_delta(payload, request["version"], request["buffer"], request["base"])
                spare.taken()
        except PayloadError as e:
            sock.sendall(json.dumps({"error": "payload", "message": str(e)}).encode())
            continue
        except (redis.RedisError, OSError) as e:
            sock.sendall(json.dumps({"error": "redis", "message": f"{type(e).__name__}: {e}"}).encode())
            continue
        if not yielded:  # before the reply: the node serves as soon as it has it
            _yield_the_cpu()
            yielded = True
        try:
            sock.sendall(json.dumps(reply).encode())
            for i in range(0, len(fds), _FDS_PER_MESSAGE):
                socket.send_fds(sock, [b"f"], fds[i:i + _FDS_PER_MESSAGE])
        finally:
            for fd in fds:
                os.close(fd)


def main() -> None:
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        _serve(sock)
    except (ConnectionError, EOFError):
        pass  # the node went away
    finally:
        sock.close()


if __name__ == "__main__":
    main()
