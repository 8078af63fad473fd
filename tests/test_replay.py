"""Replaying Criteo TSV and JSON-lines files: samples out, bad lines forwarded as raw bytes."""

from __future__ import annotations

import gzip
from pathlib import Path

import orjson
import pytest

from stream.replay import detect_format, replay
from stream.sample import InvalidSample, SampleCodec
from stream.schema import load_schema

CRITEO = load_schema("criteo")


def criteo_row(label: str = "1", dense: list[str] | None = None, sparse: list[str] | None = None) -> str:
    dense = dense if dense is not None else [str(i) for i in range(13)]
    sparse = sparse if sparse is not None else [f"{i:08x}" for i in range(26)]
    return "\t".join([label, *dense, *sparse])


def test_formats_come_from_the_extension(tmp_path: Path) -> None:
    assert detect_format("day_0.tsv") == "criteo"
    assert detect_format("train.txt.gz") == "criteo"
    assert detect_format("samples.JSONL") == "jsonl"
    assert detect_format("dump.json.gz") == "jsonl"
    with pytest.raises(ValueError, match="criteo or jsonl"):
        detect_format(tmp_path / "events.csv")


def test_criteo_rows_become_samples_with_missing_fields_as_none(tmp_path: Path) -> None:
    path = tmp_path / "day.tsv"
    dense = ["5", "", "-1", *[str(i) for i in range(10)]]
    sparse = ["68fd1e64", "", *[f"{i:08x}" for i in range(24)]]
    path.write_text(criteo_row("0", dense, sparse) + "\n" + criteo_row() + "\r\n\n")
    rows = list(replay(path, start_ts=1000.0, ts_rate=10.0))
    assert len(rows) == 2
    first = rows[0]
    assert (first["label"], first["ts"], rows[1]["ts"]) == (0, 1000.0, 1000.1)
    assert (first["I1"], first["I2"], first["I3"]) == (5, None, -1)
    assert (first["C1"], first["C2"], first["C26"]) == ("68fd1e64", None, f"{23:08x}")
    codec = SampleCodec(CRITEO)
    for row in rows:
        codec.decode(orjson.dumps(row))


def test_criteo_ts_is_the_clock_by_default(tmp_path: Path) -> None:
    path = tmp_path / "day.tsv"
    path.write_text(criteo_row() + "\n" + criteo_row() + "\n")
    ticks = iter([5.0, 6.0])
    assert [r["ts"] for r in replay(path, clock=lambda: next(ticks))] == [5.0, 6.0]


def test_bad_criteo_lines_are_forwarded_raw_for_the_dead_letter_topic(tmp_path: Path) -> None:
    path = tmp_path / "day.txt.gz"
    short = b"1\t2\t3"
    not_utf8 = criteo_row().encode()[:-2] + b"\xff\xfe"
    with gzip.open(path, "wb") as f:
        f.write(b"\n".join([short, criteo_row().encode(), not_utf8, criteo_row(label="yes").encode()]) + b"\n")
    rows = list(replay(path))
    assert rows[0] == short and rows[2] == not_utf8
    assert isinstance(rows[1], dict)
    # Kept as text, so the trainer can name what is wrong.
    with pytest.raises(InvalidSample) as bad:
        SampleCodec(CRITEO).decode(orjson.dumps(rows[3]))
    assert bad.value.reason == "bad_label"


def test_criteo_layout_follows_the_schema(tmp_path: Path) -> None:
    schema = load_schema("movielens")  # label, age, item_popularity, user_id, item_id, history, genres, occupation
    path = tmp_path / "ml.tsv"
    path.write_text("1\t31\t\t42\t7\t7,8,9\tdrama,comedy\tengineer\n")
    (row,) = replay(path, schema=schema, start_ts=0.0)
    assert row == {"label": 1, "ts": 0.0, "age": 31, "item_popularity": None, "user_id": 42, "item_id": 7,
                   "history": [7, 8, 9], "genres": ["drama", "comedy"], "occupation": "engineer"}
    SampleCodec(schema).from_dict(row)


def test_jsonl_objects_pass_through_and_other_lines_stay_raw(tmp_path: Path) -> None:
    path = tmp_path / "samples.jsonl"
    good = {"label": 1, "ts": 12.5, "C1": "a", "I1": None}
    path.write_bytes(orjson.dumps(good) + b"\n\n{not json\n[1, 2]\n" + orjson.dumps(good) + b"\r\n")
    assert list(replay(path)) == [good, b"{not json", b"[1, 2]", good]


def test_the_format_flag_overrides_the_extension(tmp_path: Path) -> None:
    path = tmp_path / "samples.txt"
    path.write_text('{"label": 0, "ts": 1.0}\n')
    assert list(replay(path, "jsonl")) == [{"label": 0, "ts": 1.0}]
