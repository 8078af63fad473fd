"""Reads, verifies and decompresses payloads in a helper process, so that applying a version
costs the serving process almost no GIL time and no CPU at its own priority.

Why a process: reading a 7 MB delta from Redis with redis-py (a pure-Python reply parser)
holds the GIL for ~50 ms in thousands of pieces, and the request thread then waits for it
after every event-loop wake-up: p99 while 100k-row deltas landed every second was 4x the
idle p99. A thread cannot fix that (lowering its priority while it holds the GIL stalls the
requests even longer). In a helper process the GIL is not shared, and the process runs at
the lowest CPU priority (nice 19), so the request thread, the kernel and Redis run first.

Protocol, over a SOCK_SEQPACKET socket pair (one message each way per payload): the node
sends `{"kind", "version", "ref"}` as JSON; the helper reads the chunks
(`RedisVersionStore.read_payload`: manifest size and checksum), verifies the payload
(`payload.verify`: header, xxh3, zstd), writes the raw body to an anonymous memory file and
answers `{"kind", "version", "base_version", "sections", "bytes"}` with the file's
descriptor attached (SCM_RIGHTS), or `{"error": "payload" | "redis", "message"}`. The node
maps the file read-only and reads the sections in place (`payload.read_body`): nothing is
copied, nothing is unpickled, and the memory is freed when the last array over it goes,
whichever process dies first (the file has no name to leak).

The helper exits when the node closes its end (or dies); a helper that died is restarted on
the next fetch.
"""

from __future__ import annotations

import json
import mmap
import os
import socket
import subprocess
import sys
import threading

import redis

from publisher.config import RedisConfig
from publisher.manifest import PayloadRef
from publisher.payload import Body, Kind, Payload, PayloadError, read_body, verify
from publisher.redis_store import RedisVersionStore

NICE = 19  # the helper's CPU priority: it runs when the request path does not need the CPU
_MESSAGE_BYTES = 64 * 1024  # JSON control messages only; payload bytes travel in the memory file
_REPLY_TIMEOUT_S = 600.0  # a snapshot of many GB still fits; a hung helper is killed after it


class FetcherDied(RuntimeError):
    """The helper process exited or stopped answering (it is restarted on the next fetch)."""


class PayloadFetcher:
    """The node's side: `fetch()` one payload at a time (thread-safe), the helper started on
    first use."""

    def __init__(self, redis_config: RedisConfig) -> None:
        self.redis_config = redis_config
        self._lock = threading.Lock()
        self._process: subprocess.Popen | None = None
        self._socket: socket.socket | None = None

    def fetch(self, kind: Kind, version: int, ref: PayloadRef) -> Payload:
        """The payload, verified against its manifest reference and its own checksum. Raises
        PayloadError (bad bytes), redis.ConnectionError (Redis failed in the helper) or
        FetcherDied."""
        request = json.dumps({"kind": kind.name.lower(), "version": version, "ref": ref.model_dump()}).encode()
        with self._lock:
            if self._socket is None:
                self._start()
            assert self._socket is not None
            try:
                self._socket.sendall(request)
                message, fds, _flags, _addr = socket.recv_fds(self._socket, _MESSAGE_BYTES, 1)
            except OSError as e:  # includes the timeout
                self._stop()
                raise FetcherDied(f"payload helper: {e}") from None
            if not message:
                self._stop()
                raise FetcherDied("payload helper exited")
        reply = json.loads(message)
        if "error" in reply:
            for fd in fds:
                os.close(fd)
            if reply["error"] == "payload":
                raise PayloadError(reply["message"])
            raise redis.ConnectionError(reply["message"])
        return read_body(Body(Kind(reply["kind"]), reply["version"], reply["base_version"], reply["sections"],
                              _map(fds, reply["bytes"])))

    def close(self) -> None:
        with self._lock:
            self._stop()

    def _start(self) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        # The helper imports the same code as this process, whatever put it on sys.path.
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p and os.path.isdir(p))}
        try:
            self._process = subprocess.Popen([sys.executable, "-m", "serving.fetcher", str(theirs.fileno())],
                                             pass_fds=[theirs.fileno()], env=env, stdin=subprocess.DEVNULL)
        finally:
            theirs.close()
        ours.settimeout(_REPLY_TIMEOUT_S)
        # The configuration (it may hold a password) goes over the socket, not the command line.
        ours.sendall(self.redis_config.model_dump_json().encode())
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


def _map(fds: list[int], size: int) -> memoryview:
    if size == 0:
        for fd in fds:
            os.close(fd)
        return memoryview(b"")
    if len(fds) != 1:
        raise FetcherDied(f"payload helper sent {len(fds)} descriptors for {size} bytes")
    try:
        if os.fstat(fds[0]).st_size != size:
            raise FetcherDied("payload helper sent a memory file of the wrong size")
        return memoryview(mmap.mmap(fds[0], size, prot=mmap.PROT_READ))  # read-only arrays over it
    finally:
        os.close(fds[0])


# ---- the helper process ------------------------------------------------------------------


def _serve(sock: socket.socket) -> None:
    store = RedisVersionStore(RedisConfig.model_validate_json(sock.recv(_MESSAGE_BYTES)))
    while message := sock.recv(_MESSAGE_BYTES):
        request = json.loads(message)
        try:
            kind = Kind[request["kind"].upper()]
            data = store.read_payload(kind, request["version"], PayloadRef.model_validate(request["ref"]))
            body = verify(data)
        except PayloadError as e:
            sock.sendall(json.dumps({"error": "payload", "message": str(e)}).encode())
            continue
        except (redis.RedisError, OSError) as e:
            sock.sendall(json.dumps({"error": "redis", "message": f"{type(e).__name__}: {e}"}).encode())
            continue
        reply = json.dumps({"kind": int(body.kind), "version": body.version, "base_version": body.base_version,
                            "sections": body.sections, "bytes": len(body.raw)}).encode()
        if not len(body.raw):
            sock.sendall(reply)
            continue
        fd = _memory_file(body.raw)
        try:
            socket.send_fds(sock, [reply], [fd])
        finally:
            os.close(fd)
        del data, body  # the node has its own mapping now


def _memory_file(raw: memoryview) -> int:
    """An anonymous file holding `raw` (memfd on Linux; an unlinked temporary file elsewhere)."""
    if hasattr(os, "memfd_create"):
        fd = os.memfd_create("freshrec-payload", os.MFD_CLOEXEC)
    else:
        import tempfile

        fd = os.dup(tempfile.TemporaryFile().fileno())
    view = raw.cast("B")
    written = 0
    while written < len(view):
        written += os.write(fd, view[written:])
    return fd


def main() -> None:
    os.nice(NICE)
    sock = socket.socket(fileno=int(sys.argv[1]))
    try:
        _serve(sock)
    except (ConnectionError, EOFError):
        pass  # the node went away
    finally:
        sock.close()


if __name__ == "__main__":
    main()
