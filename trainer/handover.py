"""Micro-batches from the ingest process to the training process, without copying them.

Through a pipe, a batch (~280 KiB at Criteo shape, batch 512) is copied three times: into the
pipe, out of it, and into fresh arrays by unpickling; the training thread paid 0.39-0.47 ms a
batch for its two (6% of a Wide & Deep step), most of it on caches the step had just evicted.
Here the ingest process writes a batch's arrays once into a slot of a shared-memory ring; only
the slot's number and the arrays' lengths (~64 bytes pickled) go through the pipe, and the
training process reads the arrays where they lie. The bytes still come from the other core's cache,
but the step reads them as it needs them, once.

A slot is lent, not given: its arrays are valid until the training side hands the slot back
(`KafkaSampleSource` does that on its next `next_batch`). Nothing in a training step keeps a
batch's arrays past the step; a caller that keeps micro-batches takes `MicroBatch.owned()`.
"""

from __future__ import annotations

import mmap
import os
import tempfile
from typing import Sequence

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

    def write(self, slot: int, arrays: Sequence[np.ndarray]) -> list[int] | None:
        """Writes the 1-D arrays back to back into the slot and returns their lengths (what
        `read` needs, with their dtypes); None, the slot untouched, when they do not fit."""
        if sum(_padded(a.nbytes) for a in arrays) > self.slot_bytes:
            return None
        at = slot * self.slot_bytes
        for a in arrays:
            self._buffer[at:at + a.nbytes] = a.view(np.uint8)
            at += _padded(a.nbytes)
        return [a.size for a in arrays]

    def read(self, slot: int, lengths: Sequence[int], dtypes: Sequence[type]) -> list[np.ndarray]:
        """Views of the arrays that `write` put in the slot (valid while the slot is lent)."""
        views, at = [], slot * self.slot_bytes
        for n, dtype in zip(lengths, dtypes, strict=True):
            view = np.frombuffer(self._map, dtype, n, at)
            views.append(view)
            at += _padded(view.nbytes)
        return views

    def close(self) -> None:
        self._buffer = None
        try:
            self._map.close()
        except BufferError:  # views still alive: the mapping goes with the last of them
            pass


def _padded(nbytes: int) -> int:
    return -(-nbytes // ALIGN) * ALIGN
