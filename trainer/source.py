"""Micro-batches of valid samples from Kafka; everything else to the dead-letter topic.

The trainer is the only consumer of the samples topic, so partitions are assigned, not
group-managed: no rebalance pauses, and the starting offsets come from the newest
published version (that is how a restarted trainer resumes exactly).

Where the time goes, and what is done about it (README: Trainer performance and quality):

- Reading, decoding, validating and batching run in a separate *ingest process*
  (`ingest="process"`, the default) that works while the training process steps: the two
  overlap on two cores, and the GIL of one does not stall the other (a thread would: both
  sides are mostly Python). It writes each batch's arrays into a slot of a shared-memory
  ring (`trainer.handover`) and sends the slot's number through a pipe: the training
  process reads the arrays where they lie.
- A micro-batch is decoded as columns (`SampleCodec.decode_batch`), not message by message.
- The Kafka client is confluent-kafka (librdkafka, ~10x kafka-python's consume rate here),
  a dependency of freshrec; kafka-python where librdkafka cannot be imported.

Exactness does not depend on any of that: every message of a micro-batch is either in its
samples or dead-lettered with its reason (in this process, before the batch is returned),
and `next_offsets` only ever moves past messages that were handled that way.
"""

from __future__ import annotations

import copy
import logging
import multiprocessing as mp
import os
import time
import traceback
from collections import Counter
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Literal

import numpy as np
from kafka import KafkaConsumer, KafkaProducer, TopicPartition

from stream.config import KafkaConfig
from stream.sample import Features, Sample, SampleCodec
from stream.schema import FeatureSchema
from trainer.batch import FLAT_DTYPES, Batch, BatchArrays, SparseLayout, batch_from_flat
from trainer.handover import SLOT, Inbox, Outbox, SlotRing

log = logging.getLogger(__name__)

Client = Literal["auto", "confluent", "kafka-python"]
Ingest = Literal["process", "inline"]
PARTITION_WAIT_S = 30.0
SLOT_BYTES_PER_SAMPLE = 4096  # a batch whose arrays need more goes through the pipe, whole
RING_NAP_S = 0.001  # how long the ingest process naps when every ring slot is full or lent


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """A message that was refused, with what the dead-letter topic records about it."""

    value: bytes
    reason: str
    detail: str
    topic: str
    partition: int
    offset: int


class MicroBatch:
    """The valid samples of a run of messages, and how far the stream is read once learned.

    The trainer reads `batch` (decoded off the training thread, in the ingest process);
    `samples` shows the same samples as `Sample` objects, for tests and tools."""

    def __init__(self, next_offsets: dict[int, int], produced_ms: np.ndarray, *, batch: Batch | None,
                 event_times: np.ndarray) -> None:
        # Next offset to read per partition once this batch is learned (Kafka's commit convention).
        self.next_offsets: dict[int, int] = dict(next_offsets)
        # Kafka record timestamps (ms) of the batch's samples: when they were produced.
        self.produced_ms = np.asarray(produced_ms, dtype=np.int64)
        # The model's input with labels; None when every message was dead-lettered.
        self.batch = batch
        self.event_times = np.asarray(event_times, dtype=np.float64)

    def __len__(self) -> int:
        return len(self.event_times)

    def owned(self) -> "MicroBatch":
        """This micro-batch with arrays of its own: `next_batch` lends a batch's arrays until
        its next call (they lie in the ingest ring), so a caller that keeps batches takes this."""
        return MicroBatch(self.next_offsets, self.produced_ms.copy(), batch=copy.deepcopy(self.batch),
                          event_times=self.event_times.copy())

    @property
    def samples(self) -> list[Sample]:
        return [] if self.batch is None else _samples_from_arrays(BatchArrays.from_batch(self.batch), self.event_times)

    @property
    def watermark(self) -> float:
        """Newest event time in the batch (0 when empty)."""
        return float(self.event_times.max()) if len(self) else 0.0

    @property
    def newest_produced_ms(self) -> int:
        return int(self.produced_ms.max()) if len(self.produced_ms) else 0


def _samples_from_arrays(arrays: BatchArrays, event_times: np.ndarray) -> list[Sample]:
    n = len(arrays)
    per_feature = []
    for table, indices, offsets in zip(arrays.tables_of_bags, arrays.bag_indices, arrays.bag_offsets):
        keys = arrays.tables[table][0][indices].tolist()
        if offsets is None:
            per_feature.append([(k,) for k in keys])
            continue
        ends = [*offsets[1:].tolist(), len(keys)]
        per_feature.append([tuple(keys[a:b]) for a, b in zip(offsets.tolist(), ends)])
    sparse = list(zip(*per_feature)) if per_feature else [()] * n
    dense = arrays.dense.astype(np.float64).tolist()
    labels = arrays.labels.astype(np.int64).tolist() if arrays.labels is not None else [0] * n
    return [Sample(y, t, Features(tuple(d), tuple(s)))
            for y, t, d, s in zip(labels, event_times.tolist(), dense, sparse)]


# -- reading Kafka -----------------------------------------------------------------------------

@dataclass
class _Records:
    """Polled messages as columns: the hot path never builds an object per message."""

    values: list[bytes]
    partitions: np.ndarray  # int64
    offsets: np.ndarray  # int64
    timestamps_ms: np.ndarray  # int64

    def __len__(self) -> int:
        return len(self.values)

    @classmethod
    def of(cls, values: list[bytes], partitions: list[int], offsets: list[int], timestamps_ms: list[int]) -> "_Records":
        return cls(values, np.array(partitions, dtype=np.int64), np.array(offsets, dtype=np.int64),
                   np.array(timestamps_ms, dtype=np.int64))

    def __add__(self, other: "_Records") -> "_Records":
        return _Records(self.values + other.values, np.concatenate([self.partitions, other.partitions]),
                        np.concatenate([self.offsets, other.offsets]),
                        np.concatenate([self.timestamps_ms, other.timestamps_ms]))

    def next_offsets(self) -> dict[int, int]:
        """Per partition, the offset after the last message read (Kafka's commit convention)."""
        return {int(p): int(self.offsets[self.partitions == p].max()) + 1 for p in np.unique(self.partitions)}


def confluent_available() -> bool:
    try:
        import confluent_kafka  # noqa: F401
    except ImportError:
        return False
    return True


class _ConfluentReader:
    """librdkafka: batched consume, C-side fetch and decompression."""

    def __init__(self, kafka: KafkaConfig) -> None:
        from confluent_kafka import Consumer

        conf = {
            "bootstrap.servers": kafka.bootstrap_servers,
            "security.protocol": kafka.security_protocol,
            "group.id": "freshrec-trainer-assigned",  # required by the client; nothing is committed
            "enable.auto.commit": False,
            "enable.auto.offset.store": False,
            "enable.partition.eof": False,
            "fetch.min.bytes": 1,
            "fetch.wait.max.ms": 50,
            "queued.min.messages": 200_000,
        }
        optional = {"sasl.mechanism": kafka.sasl_mechanism, "sasl.username": kafka.sasl_username,
                    "sasl.password": kafka.sasl_password, "ssl.ca.location": kafka.ssl_cafile,
                    "ssl.certificate.location": kafka.ssl_certfile, "ssl.key.location": kafka.ssl_keyfile}
        conf.update({k: v for k, v in optional.items() if v is not None})
        self.topic = kafka.samples_topic
        self.consumer = Consumer(conf)
        self._partitions: list[int] = []

    def partitions(self) -> list[int] | None:
        meta = self.consumer.list_topics(self.topic, timeout=5)
        t = meta.topics.get(self.topic)
        if t is None or t.error is not None or not t.partitions:
            return None
        return sorted(t.partitions)

    def assign(self, partitions: list[int], start_offsets: dict[int, int]) -> None:
        from confluent_kafka import OFFSET_BEGINNING, TopicPartition as CTopicPartition

        self._partitions = partitions
        self.consumer.assign([CTopicPartition(self.topic, p, start_offsets.get(p, OFFSET_BEGINNING))
                              for p in partitions])

    def poll(self, max_records: int, timeout_s: float) -> _Records:
        messages = self.consumer.consume(num_messages=max_records, timeout=max(0.0, timeout_s))
        failed = [m for m in messages if m.error() is not None]
        if failed:
            for m in failed:
                log.warning("consume error: %s", m.error())
            messages = [m for m in messages if m.error() is None]
        return _Records.of([m.value() or b"" for m in messages], [m.partition() for m in messages],
                           [m.offset() for m in messages], [m.timestamp()[1] for m in messages])

    def highwater(self) -> dict[int, int]:
        from confluent_kafka import TopicPartition as CTopicPartition

        out = {}
        for p in self._partitions:
            try:  # cached: the high watermark of the last fetch response (no ListOffsets request)
                _low, high = self.consumer.get_watermark_offsets(CTopicPartition(self.topic, p), cached=True)
            except Exception:  # noqa: BLE001 - not known yet
                continue
            if high is not None and high >= 0:
                out[p] = high
        return out

    def close(self) -> None:
        self.consumer.close()


class _KafkaPythonReader:
    def __init__(self, kafka: KafkaConfig) -> None:
        self.topic = kafka.samples_topic
        self.consumer = KafkaConsumer(enable_auto_commit=False, group_id=None,
                                      max_partition_fetch_bytes=4 << 20, **kafka.client_kwargs())
        self._tps: list[TopicPartition] = []

    def partitions(self) -> list[int] | None:
        partitions = self.consumer.partitions_for_topic(self.topic)
        return sorted(partitions) if partitions else None

    def assign(self, partitions: list[int], start_offsets: dict[int, int]) -> None:
        self._tps = [TopicPartition(self.topic, p) for p in partitions]
        self.consumer.assign(self._tps)
        for tp in self._tps:
            if tp.partition in start_offsets:
                self.consumer.seek(tp, start_offsets[tp.partition])
            else:
                self.consumer.seek_to_beginning(tp)

    def poll(self, max_records: int, timeout_s: float) -> _Records:
        records = self.consumer.poll(timeout_ms=max(0, int(timeout_s * 1000)), max_records=max_records)
        messages = [(tp.partition, m) for tp, ms in records.items() for m in ms]
        return _Records.of([m.value or b"" for _, m in messages], [p for p, _ in messages],
                           [m.offset for _, m in messages], [m.timestamp for _, m in messages])

    def highwater(self) -> dict[int, int]:
        """From the fetch responses (Tansu's ListOffsets answer is not reliable; these are)."""
        out = {}
        for tp in self._tps:
            high = self.consumer.highwater(tp)
            if high is not None:
                out[tp.partition] = high
        return out

    def close(self) -> None:
        self.consumer.close()


def _reader(kafka: KafkaConfig, client: Client):
    if client == "confluent" or (client == "auto" and confluent_available()):
        return _ConfluentReader(kafka)
    return _KafkaPythonReader(kafka)


def _open(kafka: KafkaConfig, client: Client, start_offsets: dict[int, int]):
    reader = _reader(kafka, client)
    deadline = time.monotonic() + PARTITION_WAIT_S
    while True:
        partitions = reader.partitions()
        if partitions:
            break
        if time.monotonic() > deadline:
            reader.close()
            raise RuntimeError(f"topic {kafka.samples_topic!r} does not exist on {kafka.bootstrap_servers}")
        time.sleep(0.2)
    reader.assign(partitions, start_offsets)
    return reader, partitions


@dataclass
class _Chunk:
    """One micro-batch as it crosses from the ingest side to the training side."""

    flat: list[np.ndarray] | None  # the batch (`BatchArrays.flat`); None when no message was valid
    event_times: np.ndarray
    produced_ms: np.ndarray
    next_offsets: dict[int, int]  # past every message of the chunk
    dead: list[DeadLetter]
    highwater: dict[int, int]


# a chunk in a ring slot: its flat arrays, then event times, produced_ms, next offsets and
# high watermarks (the last two as partition, offset pairs)
_CHUNK_DTYPES = (*FLAT_DTYPES, *(np.dtype(t) for t in (np.float64, np.int64, np.int64, np.int64)))


def _chunk_arrays(chunk: _Chunk) -> list[np.ndarray]:
    return [*(chunk.flat or ()), chunk.event_times, chunk.produced_ms, _pairs(chunk.next_offsets),
            _pairs(chunk.highwater)]


def _chunk_from_arrays(arrays: list[np.ndarray], dead: list[DeadLetter] | None = None) -> _Chunk:
    *flat, event_times, produced_ms, next_offsets, highwater = arrays
    return _Chunk(flat or None, event_times, produced_ms, _unpair(next_offsets), dead or [], _unpair(highwater))


def _chunk_message(chunk: _Chunk) -> list:
    """A chunk that does not go through the ring, as msgpack carries it: its arrays' bytes
    (the batch's left out when no message was valid) and its dead letters' fields."""
    dead = [[d.value, d.reason, d.detail, d.topic, d.partition, d.offset] for d in chunk.dead]
    return [[a.tobytes() for a in _chunk_arrays(chunk)], dead]


def _chunk_from_message(message: list) -> _Chunk:
    data, dead = message
    dtypes = _CHUNK_DTYPES[-len(data):]  # the batch's flat arrays, when there is a batch, then the chunk's own
    arrays = [np.frombuffer(b, dtype).copy() for b, dtype in zip(data, dtypes, strict=True)]  # writable
    return _chunk_from_arrays(arrays, [DeadLetter(*fields) for fields in dead])


def _pairs(offsets: dict[int, int]) -> np.ndarray:
    return np.array([x for pair in offsets.items() for x in pair], dtype=np.int64)


def _unpair(pairs: np.ndarray) -> dict[int, int]:
    flat = pairs.tolist()
    return dict(zip(flat[::2], flat[1::2]))


class _Batcher:
    """Reads messages until `batch_size` of them, or until `max_wait_ms` after the first one."""

    def __init__(self, reader, codec: SampleCodec, batch_size: int, max_wait_ms: int, topic: str) -> None:
        self.reader = reader
        self.codec = codec
        self.batch_size = batch_size
        self.max_wait_s = max_wait_ms / 1000
        self.topic = topic

    def next_chunk(self, idle_timeout_s: float) -> _Chunk | None:
        """None when nothing arrived within idle_timeout_s."""
        records = self.reader.poll(self.batch_size, idle_timeout_s)
        if not len(records):
            return None
        deadline = time.monotonic() + self.max_wait_s
        while len(records) < self.batch_size:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            records += self.reader.poll(self.batch_size - len(records), remaining)
        return self.decode(records)

    def decode(self, records: _Records) -> _Chunk:
        decoded = self.codec.decode_batch(records.values)
        dead = [DeadLetter(records.values[i], e.reason, e.detail, self.topic, int(records.partitions[i]),
                           int(records.offsets[i])) for i, e in decoded.errors]
        flat = BatchArrays.from_decoded(self.codec.schema, decoded).flat() if len(decoded) else None
        return _Chunk(flat, decoded.event_times, records.timestamps_ms[decoded.rows], records.next_offsets(), dead,
                      self.reader.highwater())


def _ingest_main(kafka: KafkaConfig, schema: FeatureSchema, max_message_bytes: int, batch_size: int,
                 max_wait_ms: int, start_offsets: dict[int, int], client: Client, ring: tuple[str, int, int],
                 out: Connection, returned: Connection, stop: mp.Event, parent: int) -> None:
    """The ingest process: read, decode, validate, batch; hand chunks over through `out`.

    A chunk's arrays go into a free slot of the ring and `out` carries the slot's number; the
    training side writes the number back to `returned` (a byte) once the step that read it is
    over. A chunk with dead letters or too big for a slot goes whole, as ("chunk", its
    `_chunk_message`).
    Backpressure is the ring's free slots and the pipe's capacity.

    It ends with its trainer: `daemon` covers a clean exit only, so a trainer killed with
    SIGKILL is noticed by being re-parented (otherwise the child would read Kafka forever)."""
    import torch

    torch.set_num_threads(1)  # it builds no tensors; do not let OpenMP spin on the trainer's core

    outbox = Outbox(out)
    try:
        reader, partitions = _open(kafka, client, start_offsets)
    except Exception as e:  # noqa: BLE001 - reported to the training process, which raises it
        outbox.send(("error", f"{type(e).__name__}: {e}"))
        return
    slots = SlotRing(*ring)
    free = list(range(slots.n_slots))
    os.set_blocking(returned.fileno(), False)
    outbox.send(("ready", (partitions, type(reader).__name__)))
    batcher = _Batcher(reader, SampleCodec(schema, max_message_bytes), batch_size, max_wait_ms,
                       kafka.samples_topic)

    def running() -> bool:
        return not stop.is_set() and os.getppid() == parent

    def free_slot() -> int | None:
        """A slot the training side has handed back. With none free, this process naps and
        looks again rather than waiting on the pipe: waking a waiting reader made each
        hand-back cost the training thread 37-40 µs (a cross-core wake-up in a VM), and a
        nap delays only a refill that the batches already waiting cover."""
        while running():
            try:
                handed_back = os.read(returned.fileno(), 256)
            except BlockingIOError:
                handed_back = None
            if handed_back == b"":
                raise EOFError("the training process closed its end")
            free.extend(handed_back or ())
            if free:
                return free.pop()
            time.sleep(RING_NAP_S)
        return None

    try:
        while running():
            chunk = batcher.next_chunk(idle_timeout_s=0.1)
            if chunk is None:
                continue
            if chunk.flat is None or chunk.dead:  # rare: not worth a slot
                outbox.send(("chunk", _chunk_message(chunk)))
                continue
            slot = free_slot()
            if slot is None:
                break
            if slots.write(slot, _chunk_arrays(chunk)):
                outbox.send_slot(slot)
            else:
                free.append(slot)
                outbox.send(("chunk", _chunk_message(chunk)))
    except (BrokenPipeError, EOFError):  # the training process is gone: nobody to tell
        pass
    except Exception:  # noqa: BLE001
        outbox.send(("error", traceback.format_exc()))
    finally:
        reader.close()


def _widen_pipe(connection: Connection, size: int = 1 << 20) -> None:
    """Grows the pipe under a connection (Linux's default is 64 KiB) so that a whole encoded
    micro-batch (~280 KiB at Criteo shape, batch 512) goes through in one write and one read
    when it cannot take a slot: through 64 KiB the reader waited on the writer to be
    scheduled several times. Where F_SETPIPE_SZ is missing or the size is over the system's
    limit, the pipe works as is."""
    import fcntl

    if not hasattr(fcntl, "F_SETPIPE_SZ"):
        return
    try:
        fcntl.fcntl(connection.fileno(), fcntl.F_SETPIPE_SZ, size)
    except OSError:
        log.debug("could not widen the ingest pipe to %d bytes", size)


class KafkaSampleSource:
    """Micro-batches from the samples topic, bounded by `batch_size` messages and by
    `max_wait_ms` after the first message of the batch arrived.

    `ingest="process"` decodes in a separate process, `prefetch` micro-batches ahead of
    training; `"inline"` does everything on the caller's thread. `client` picks the Kafka
    client for reading ("auto": confluent-kafka when installed)."""

    def __init__(self, kafka: KafkaConfig, codec: SampleCodec, batch_size: int, max_wait_ms: int,
                 start_offsets: dict[int, int] | None = None, *, ingest: Ingest = "process",
                 client: Client = "auto", prefetch: int = 4) -> None:
        self.kafka = kafka
        self.codec = codec
        self.batch_size = batch_size
        self.max_wait_ms = max_wait_ms
        self.ingest = ingest
        self.dead_letters: Counter[str] = Counter()
        start_offsets = dict(start_offsets or {})
        self.positions: dict[int, int] = dict(start_offsets)
        self._highwater: dict[int, int] = {}
        self._closed = False
        self._process: mp.Process | None = None
        self._batcher: _Batcher | None = None
        self._lent: int | None = None  # the ring slot that the last batch's arrays lie in
        self._layout = SparseLayout.of(codec.schema)
        if ingest == "process":
            ctx = mp.get_context("spawn")  # the training process has threads (torch, numba): no fork
            # prefetch slots ahead, one lent to the step, one being filled
            self._ring = SlotRing.create(max(1, prefetch) + 2, batch_size * SLOT_BYTES_PER_SAMPLE)
            chunks_out, chunks_in = ctx.Pipe(duplex=False)
            returned, self._returns = ctx.Pipe(duplex=False)
            _widen_pipe(chunks_out)
            self._inbox = Inbox(chunks_out)
            self._stop = ctx.Event()
            self._process = ctx.Process(
                target=_ingest_main, name="freshrec-ingest", daemon=True,
                args=(kafka, codec.schema, codec.max_message_bytes, batch_size, max_wait_ms, start_offsets, client,
                      (self._ring.path, self._ring.n_slots, self._ring.slot_bytes), chunks_in, returned,
                      self._stop, os.getpid()))
            try:
                try:
                    self._process.start()
                finally:
                    chunks_in.close()  # the child's ends: a dead child is then an end of file here
                    returned.close()
                partitions, self.client_name = self._await_ready()
            finally:
                self._ring.unlink()  # mapped by both (or the child is gone, or never started): not needed
        elif ingest == "inline":
            reader, partitions = _open(kafka, client, start_offsets)
            self.client_name = type(reader).__name__
            self._batcher = _Batcher(reader, codec, batch_size, max_wait_ms, kafka.samples_topic)
        else:
            raise ValueError(f"ingest must be 'process' or 'inline', not {ingest!r}")
        self.partitions = [TopicPartition(kafka.samples_topic, p) for p in partitions]
        self.dead_letter_producer = KafkaProducer(acks="all", linger_ms=20, **kafka.client_kwargs())
        self._unflushed_dead_letters = False
        log.info("reading %s (%d partitions) with %s, ingest %s", kafka.samples_topic, len(partitions),
                 self.client_name, ingest)

    def _await_ready(self) -> tuple[list[int], str]:
        deadline = time.monotonic() + PARTITION_WAIT_S + 60  # + a cold interpreter's imports
        while time.monotonic() < deadline:
            message = self._receive(0.5)
            if message is None:
                continue
            kind, payload = message
            if kind == "ready":
                return payload
            self._shutdown_process()
            raise RuntimeError(f"ingest process: {payload}")
        self._shutdown_process()
        raise RuntimeError("the ingest process did not start")

    def next_batch(self) -> MicroBatch | None:
        """Up to batch_size messages' valid samples, or what arrived within max_wait_ms.

        None when no message arrived at all; a batch of only dead letters still comes back
        (with no samples) so that its offsets are published and not read again."""
        chunk = self._next_chunk()
        if chunk is None:
            return None
        for d in chunk.dead:
            self._dead_letter(d)
        self.positions.update(chunk.next_offsets)
        self._highwater.update(chunk.highwater)
        batch = None if chunk.flat is None or not len(chunk.event_times) else batch_from_flat(chunk.flat, self._layout)
        return MicroBatch(self.positions, chunk.produced_ms, batch=batch, event_times=chunk.event_times)

    def _next_chunk(self) -> _Chunk | None:
        if self._batcher is not None:
            return self._batcher.next_chunk(self.max_wait_ms / 1000)
        if self._lent is not None:  # the previous batch's step is over: its slot can be refilled
            try:
                os.write(self._returns.fileno(), bytes((self._lent,)))
            except BrokenPipeError:
                pass  # the ingest process is gone: _receive says so
            self._lent = None
        message = self._receive(self.max_wait_ms / 1000)
        if message is None:
            return None
        kind, payload = message
        if kind == "error":
            raise RuntimeError(f"ingest process: {payload}")
        return payload

    def _receive(self, timeout_s: float) -> tuple[str, object] | None:
        """The ingest process's next message, or None when none came within timeout_s."""
        try:
            frame = self._inbox.receive(timeout_s)
        except EOFError:
            self._process.join(timeout=5)
            raise RuntimeError(f"the ingest process exited with {self._process.exitcode}") from None
        if frame is None:
            return None
        kind, payload = frame
        if kind == SLOT:
            self._lent = payload
            return "chunk", _chunk_from_arrays(self._ring.read(payload, _CHUNK_DTYPES))
        kind, body = payload
        return kind, _chunk_from_message(body) if kind == "chunk" else body

    def lag(self) -> dict[int, int]:
        """Messages not yet learned per partition, from the high watermarks of the last fetch
        (Tansu's ListOffsets answer is not reliable; the fetch response's is)."""
        return {p: max(0, high - self.positions.get(p, 0)) for p, high in sorted(self._highwater.items())}

    def _dead_letter(self, d: DeadLetter) -> None:
        """Keep the original bytes, say why, and where they came from; never block training on it."""
        self.dead_letters[d.reason] += 1
        self._unflushed_dead_letters = True
        headers = [
            ("reason", d.reason.encode()),
            ("detail", d.detail[:500].encode()),
            ("source", f"{d.topic}/{d.partition}/{d.offset}".encode()),
        ]
        self.dead_letter_producer.send(self.kafka.dead_letter_topic, value=d.value, headers=headers)
        log.debug("dead letter %s at %s/%s: %s", d.reason, d.partition, d.offset, d.detail)

    def flush(self) -> None:
        """Dead letters must be acknowledged before the offsets that skip them are published."""
        if self._unflushed_dead_letters:
            self.dead_letter_producer.flush()
            self._unflushed_dead_letters = False

    def _shutdown_process(self) -> None:
        if self._process is None:
            return
        self._stop.set()
        deadline = time.monotonic() + 10
        while self._process.is_alive() and time.monotonic() < deadline:
            if not self._inbox.discard(0.05):  # so that a write blocked on a full pipe returns
                break
        if self._process.is_alive():
            self._process.terminate()
        self._process.join(timeout=5)
        self._inbox.close()
        self._returns.close()
        self._ring.close()
        self._process = None

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        self.flush()
        self.dead_letter_producer.close()
        if self._batcher is not None:
            self._batcher.reader.close()
        self._shutdown_process()


