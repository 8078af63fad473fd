"""Replay a file of events into the pipeline: Criteo TSV or JSON lines, optionally gzipped.

Validation lives in the trainer (it owns the dead-letter topic and its reasons), so a line
this module cannot turn into a sample dict is not dropped: it is yielded as the raw bytes it
was, and the trainer dead-letters it with a reason. Only blank lines are skipped.
"""

from __future__ import annotations

import gzip
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import BinaryIO, Literal

import orjson

from stream.schema import FeatureSchema, load_schema

Format = Literal["criteo", "jsonl"]

_SUFFIX_FORMATS: dict[str, Format] = {".tsv": "criteo", ".txt": "criteo", ".jsonl": "jsonl", ".json": "jsonl"}


def detect_format(path: str | Path) -> Format:
    """By extension, looking through a trailing .gz."""
    suffixes = [s.lower() for s in Path(path).suffixes]
    if suffixes and suffixes[-1] == ".gz":
        suffixes.pop()
    fmt = _SUFFIX_FORMATS.get(suffixes[-1]) if suffixes else None
    if fmt is None:
        raise ValueError(f"cannot tell the format of {path} from its extension: pass criteo or jsonl")
    return fmt


def replay(
    path: str | Path,
    fmt: Format | None = None,
    *,
    schema: FeatureSchema | None = None,
    start_ts: float | None = None,
    ts_rate: float = 1000.0,
    clock: Callable[[], float] = time.time,
) -> Iterator[dict | bytes]:
    """Yield the file's events in order: sample dicts, or raw bytes for lines that are not.

    Criteo rows carry no time, so they get one: `clock()` as each row is read, or, with
    `start_ts`, `start_ts + row_number / ts_rate` (a reproducible event-time axis).
    JSON lines are passed through as they are, event time included."""
    fmt = fmt or detect_format(path)
    with _open(Path(path)) as f:
        if fmt == "jsonl":
            yield from _jsonl(f)
        else:
            schema = schema or load_schema("criteo")
            ts_of = clock if start_ts is None else _steady_clock(start_ts, ts_rate)
            yield from _criteo(f, schema, ts_of)


def _open(path: Path) -> BinaryIO:
    return gzip.open(path, "rb") if path.suffix.lower() == ".gz" else path.open("rb")


def _steady_clock(start: float, rate: float) -> Callable[[], float]:
    n = -1

    def tick() -> float:
        nonlocal n
        n += 1
        return start + n / rate

    return tick


def _jsonl(f: BinaryIO) -> Iterator[dict | bytes]:
    for line in f:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError:
            yield line
            continue
        yield obj if isinstance(obj, dict) else line


def _criteo(f: BinaryIO, schema: FeatureSchema, ts_of: Callable[[], float]) -> Iterator[dict | bytes]:
    """Columns in schema order: label, dense features, sparse features. Empty = missing; a
    multi-valued feature's column holds comma-separated ids."""
    dense = schema.dense_names
    sparse = [(s.name, s.id_type == "int", s.multi) for s in schema.sparse]
    width = 1 + len(dense) + len(sparse)
    for line in f:
        line = line.rstrip(b"\r\n")
        if not line.strip():
            continue
        try:
            fields = line.decode("utf-8").split("\t")
        except UnicodeDecodeError:
            yield line
            continue
        if len(fields) != width:
            yield line
            continue
        sample: dict = {schema.label: _number(fields[0]), schema.event_time: ts_of()}
        for name, text in zip(dense, fields[1:]):
            sample[name] = _number(text)
        for (name, is_int, multi), text in zip(sparse, fields[1 + len(dense):]):
            if not text:
                sample[name] = None
            elif multi:
                sample[name] = [_number(t) if is_int else t for t in text.split(",")]
            else:
                sample[name] = _number(text) if is_int else text
        yield sample


def _number(text: str) -> int | float | str | None:
    """An int or float; text that is neither is kept so the trainer can say why it is bad."""
    if not text:
        return None
    try:
        return int(text)
    except ValueError:
        try:
            return float(text)
        except ValueError:
            return text
