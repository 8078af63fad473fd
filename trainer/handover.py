"""Micro-batches from the ingest process to the training process, without copying them.

Through a pipe, a batch (~280 KiB at Criteo shape, batch 512) is copied three times: into the
pipe, out of it, and into fresh arrays by unpickling; the training thread paid 0.39-0.47 ms a
batch for its two (6% of a Wide & Deep step), most of it on caches the step had just evicted.
Here the ingest process writes a batch's arrays once into a slot of a shared-memory ring,
with their lengths in the slot's header, and sends only the slot's number through a pipe
beside it (`Outbox` -> `Inbox`); the training process reads the arrays where they lie. The
bytes still come from the other core's cache, but the step reads them as it needs them, once.
The pipe orders the two: a slot's number is written after its arrays, and read before them.

A slot is lent, not given: its arrays are valid until the training side hands the slot back
(`KafkaSampleSource` does that on its next `next_batch`). Nothing in a training step keeps a
batch's arrays past the step; a caller that keeps micro-batches takes `MicroBatch.owned()`.

The pipe's frames are raw (kind and a number; a message's msgpack follows its frame) and the
training side reads whatever has arrived in one non-blocking read: between two steps, with
the step's data in the caches, `Connection.poll` + `recv` cost it 40 µs a batch, most of it
in Python (a selector built per poll), and this costs a few.
"""

from __future__ import annotations

import mmap
import os
import select
import struct
import tempfile
import time
from multiprocessing.connection import Connection
from typing import Any, Sequence

import msgspec
import numpy as np

ALIGN = 64  # a cache line: no two arrays share one


class SlotRing:
    """`n_slots` slots of `slot_bytes` each, in one file mapped by both processes.

    The training process creates it (`SlotRing.create`), the ingest process maps it
    (`SlotRing(path, ...)`), and the training process unlinks the file once it has
    (`unlink`): from then on nothing is left behind however either ends (a trainer killed
    in the seconds before leaves its file in /dev/shm)."""

    def __init__(self, path: str, n_slots: int, slot_bytes: int) -> None:
        """Maps the ring file at `path` (made by `create`)."""
        self.path = path
        self.n_slots = n_slots
        self.slot_bytes = slot_bytes
        fd = os.open(path, os.O_RDWR)
        try:
            self._map = mmap.mmap(fd, n_slots * slot_bytes)
        finally:
            os.close(fd)
        self._buffer = np.frombuffer(self._map, dtype=np.uint8)

    @classmethod
    def create(cls, n_slots: int, slot_bytes: int) -> "SlotRing":
        folder = "/dev/shm" if os.path.isdir("/dev/shm") else tempfile.gettempdir()
        fd, path = tempfile.mkstemp(prefix="freshrec-ring-", dir=folder)  # private: mode 0600
        try:
            os.ftruncate(fd, n_slots * slot_bytes)
        finally:
            os.close(fd)
        return cls(path, n_slots, slot_bytes)

    def unlink(self) -> None:
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass

    def write(self, slot: int, arrays: Sequence[np.ndarray]) -> bool:
        """Writes the 1-D arrays back to back into the slot, after a header with their
        lengths; False, the slot untouched, when they do not fit."""
        header = _padded(8 * len(arrays))
        if header + sum(_padded(a.nbytes) for a in arrays) > self.slot_bytes:
            return False
        at = slot * self.slot_bytes
        self._buffer[at:at + 8 * len(arrays)].view(np.int64)[:] = [a.size for a in arrays]
        at += header
        for a in arrays:
            self._buffer[at:at + a.nbytes] = a.view(np.uint8)
            at += _padded(a.nbytes)
        return True

    def read(self, slot: int, dtypes: Sequence[np.dtype]) -> list[np.ndarray]:
        """Views of the arrays that `write` put in the slot (valid while the slot is lent)."""
        at = slot * self.slot_bytes
        lengths = np.frombuffer(self._map, np.int64, len(dtypes), at).tolist()
        views, at = [], at + _padded(8 * len(dtypes))
        for n, dtype in zip(lengths, dtypes, strict=True):
            views.append(np.frombuffer(self._map, dtype, n, at))
            at += _padded(n * dtype.itemsize)
        return views

    def close(self) -> None:
        self._buffer = None
        try:
            self._map.close()
        except BufferError:  # views still alive: the mapping goes with the last of them
            pass


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN


# A frame: its kind, then a slot's number (SLOT) or the length of the msgpack that follows (OBJECT).
_FRAME = struct.Struct("<BI")
SLOT, OBJECT = 0, 1


class Outbox:
    """The ingest side of the pipe (one writer)."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection  # owns the descriptor
        self._fd = connection.fileno()

    def send_slot(self, slot: int) -> None:
        self._write(_FRAME.pack(SLOT, slot))

    def send(self, message: Any) -> None:
        """Any message msgpack can carry (lists, dicts, str, bytes, numbers; no pickle)."""
        data = msgspec.msgpack.encode(message)
        self._write(_FRAME.pack(OBJECT, len(data)) + data)

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view):]


class Inbox:
    """The training side of the pipe: it reads whatever has arrived, without blocking, and
    waits only when no whole frame is left."""

    def __init__(self, connection: Connection) -> None:
        self._connection = connection  # owns the descriptor
        self._fd = connection.fileno()
        os.set_blocking(self._fd, False)
        self._poll = select.poll()
        self._poll.register(self._fd, select.POLLIN)
        self._pending = bytearray()

    def receive(self, timeout_s: float) -> tuple[int, Any] | None:
        """(SLOT, slot number) or (OBJECT, the decoded message: tuples arrive as lists); None
        when no whole frame came within timeout_s. EOFError once the writer is gone and every
        frame was read."""
        deadline = None
        while (frame := self._take()) is None:
            try:
                data = os.read(self._fd, 1 << 20)
            except BlockingIOError:
                if deadline is None:
                    deadline = time.monotonic() + timeout_s
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not self._poll.poll(remaining * 1000):
                    return None
                continue
            if not data:
                raise EOFError("the writer closed the pipe")
            self._pending += data
        return frame

    def _take(self) -> tuple[int, Any] | None:
        if len(self._pending) < _FRAME.size:
            return None
        kind, value = _FRAME.unpack_from(self._pending)
        if kind == SLOT:
            del self._pending[:_FRAME.size]
            return SLOT, value
        end = _FRAME.size + value
        if len(self._pending) < end:
            return None
        message = msgspec.msgpack.decode(bytes(self._pending[_FRAME.size:end]))
        del self._pending[:end]
        return OBJECT, message

    def discard(self, timeout_s: float) -> bool:
        """Drops what has arrived or arrives within timeout_s, unread; False once the writer is gone."""
        self._pending.clear()
        try:
            if self._poll.poll(timeout_s * 1000):
                return os.read(self._fd, 1 << 20) != b""
        except BlockingIOError:
            pass
        return True

    def close(self) -> None:
        self._connection.close()
