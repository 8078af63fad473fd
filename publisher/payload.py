"""The binary payload of a snapshot or delta: a checked header over named arrays.

    header   magic "FRSH" | format u16 | kind u8 | compression u8 | version u64 | base u64
             | sections u32 | raw body length u64 | stored body length u64
             | xxh3-64 of everything before it and the stored body u64     (little-endian)
    section  name length u16 | name (utf-8) | dtype u8 | ndim u8 | dims u64 x ndim
             | encoding u8 | data

A section's encoding says how its data is stored: raw, or for float32 row matrices
(embedding rows) fp16 or row-wise int8 (a float32 minimum and step per row). Lossy sections
decode back to float32, so readers never see the difference in type, only in precision.
The body may be zstd-compressed as a whole.

Arrays are read back with numpy.frombuffer: no pickle, no torch.load, nothing executable.
Every length is checked against the bytes actually there (and the decompressed size
against the header's), so a truncated, tampered or hostile payload is refused with a
reason instead of producing a half-applied model.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import xxhash
import zstandard

MAGIC = b"FRSH"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHBBQQIQQQ")
_NAME_LEN = struct.Struct("<H")
_DTYPE = struct.Struct("<BB")
_ENCODING = struct.Struct("<B")

_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("<f2"), 3: np.dtype("i1"), 4: np.dtype("<i8"),
    5: np.dtype("<f8"), 6: np.dtype("<i4"), 7: np.dtype("u1"), 8: np.dtype("<u4"), 9: np.dtype("<u2"),
    10: np.dtype("<i2"), 11: np.dtype("<u8"), 12: np.dtype("?"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}
_F32 = np.dtype("<f4")


class Kind(IntEnum):
    SNAPSHOT = 1  # what serving needs: rows and dense weights
    DELTA = 2
    TRAIN_SNAPSHOT = 3  # what the trainer needs to resume exactly (trainer/checkpoint.py)
    TRAIN_DELTA = 4


class RowEncoding(IntEnum):
    """How float32 row matrices are stored. Raw for everything else."""

    FP32 = 0
    FP16 = 1
    INT8 = 2  # row-wise affine: value = minimum + step * (q + 128)


class Compression(IntEnum):
    NONE = 0
    ZSTD = 1


class PayloadError(ValueError):
    """Bytes that are not a complete, intact payload."""


@dataclass
class Payload:
    kind: Kind
    version: int
    base_version: int  # the version a delta applies on top of (0 for a snapshot)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)
    # Sections that may be stored with a lossy row encoding (embedding rows, not keys).
    lossy: frozenset[str] = frozenset()


def encode(payload: Payload, rows: RowEncoding = RowEncoding.FP32,
           compression: Compression = Compression.NONE, level: int = 1) -> bytearray:
    """One buffer, filled once: raw arrays are copied straight from their memory into it."""
    parts: list[bytes | memoryview] = []
    for name, array in payload.arrays.items():
        a = np.require(array, requirements="C")
        encoding = rows if name in payload.lossy and a.dtype == _F32 and a.ndim == 2 else RowEncoding.FP32
        parts += [_section_header(name, a), _ENCODING.pack(int(encoding)), _encode_data(a, encoding)]
    raw_len = sum(len(p) for p in parts)
    out = bytearray(_HEADER.size + raw_len)
    pos = _HEADER.size
    for part in parts:
        out[pos:pos + len(part)] = part
        pos += len(part)
    if compression is Compression.ZSTD:
        body = zstandard.ZstdCompressor(level=level).compress(memoryview(out)[_HEADER.size:])
        out = bytearray(_HEADER.size) + body
    fields = (MAGIC, FORMAT_VERSION, int(payload.kind), int(compression), payload.version,
              payload.base_version, len(payload.arrays), raw_len, len(out) - _HEADER.size)
    checksum = _checksum(_HEADER.pack(*fields, 0), memoryview(out)[_HEADER.size:])
    _HEADER.pack_into(out, 0, *fields, checksum)
    return out


@dataclass(frozen=True)
class Body:
    """A payload whose header and checksum are verified and whose body is decompressed, its
    sections not yet read. Verifying and reading are separate so that a serving node can do
    the first (CPU-heavy, per byte) in a helper process and only the second in its own."""

    kind: Kind
    version: int
    base_version: int
    sections: int
    raw: memoryview


def decode(data: bytes | memoryview) -> Payload:
    return read_body(verify(data))


def verify(data: bytes | memoryview) -> Body:
    """Header, checksum and decompression: the body of an intact payload, or PayloadError."""
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise PayloadError(f"payload of {len(view)} bytes is shorter than its header")
    magic, fmt, kind, compression, version, base, n_sections, raw_len, body_len, checksum = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError("not a freshrec payload (bad magic)")
    if fmt != FORMAT_VERSION:
        raise PayloadError(f"payload format {fmt} is not supported (expected {FORMAT_VERSION})")
    body = view[_HEADER.size:]
    if len(body) != body_len:
        raise PayloadError(f"body is {len(body)} bytes, header says {body_len}")
    if _checksum(bytes(view[:_HEADER.size - 8]) + bytes(8), body) != checksum:
        raise PayloadError("checksum mismatch")
    try:
        payload_kind = Kind(kind)
    except ValueError:
        raise PayloadError(f"unknown payload kind {kind}") from None
    return Body(payload_kind, version, base, n_sections, _decompress(body, compression, raw_len))


def read_body(body: Body) -> Payload:
    """The named arrays of a verified body (views of its memory, not copies)."""
    return Payload(body.kind, body.version, body.base_version, _read_sections(body.raw, body.sections))


def _checksum(header_with_zero_checksum: bytes, body: bytes | memoryview) -> int:
    """Covers the header's fields too: a flipped version or kind is as fatal as a flipped row."""
    h = xxhash.xxh3_64(header_with_zero_checksum)
    h.update(body)
    return h.intdigest()


def _section_header(name: str, a: np.ndarray) -> bytes:
    code = _CODES.get(a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype)
    if code is None:
        raise TypeError(f"array {name!r} has unsupported dtype {a.dtype}")
    encoded_name = name.encode()
    return (_NAME_LEN.pack(len(encoded_name)) + encoded_name + _DTYPE.pack(code, a.ndim)
            + struct.pack(f"<{a.ndim}Q", *a.shape))


def _encode_data(a: np.ndarray, encoding: RowEncoding) -> bytes | memoryview:
    if encoding is RowEncoding.FP16:
        return _bytes_of(a.astype("<f2"))
    if encoding is RowEncoding.INT8:
        minimum, step, q = quantize_rows(a)
        return minimum.tobytes() + step.tobytes() + q.tobytes()
    return _bytes_of(np.require(a.astype(a.dtype.newbyteorder("<"), copy=False), requirements="C"))


def _bytes_of(a: np.ndarray) -> memoryview:
    """The array's own memory as bytes, without a copy."""
    return memoryview(a.reshape(-1)).cast("B") if a.size else memoryview(b"")


def quantize_rows(a: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Row-wise affine int8: each row's range in 256 steps (error at most half a step)."""
    minimum = a.min(axis=1) if a.shape[1] else np.zeros(len(a), _F32)
    maximum = a.max(axis=1) if a.shape[1] else np.zeros(len(a), _F32)
    step = ((maximum - minimum) / 255).astype(_F32)
    step[step == 0] = 1.0  # a constant row: every q is -128, decodes to the minimum
    q = np.rint((a - minimum[:, None]) / step[:, None]) - 128
    return minimum.astype(_F32), step, np.clip(q, -128, 127).astype(np.int8)


def _decompress(body: memoryview, compression: int, raw_len: int) -> memoryview:
    if compression == Compression.NONE:
        if raw_len != len(body):
            raise PayloadError(f"raw length {raw_len} differs from body length {len(body)}")
        return body
    if compression != Compression.ZSTD:
        raise PayloadError(f"unknown compression {compression}")
    try:
        raw = zstandard.ZstdDecompressor().decompress(body, max_output_size=raw_len)
    except zstandard.ZstdError as e:
        raise PayloadError(f"zstd: {e}") from None
    if len(raw) != raw_len:
        raise PayloadError(f"decompressed {len(raw)} bytes, header says {raw_len}")
    return memoryview(raw)


def _read_sections(body: memoryview, count: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for _ in range(count):
        (name_len,) = _take(_NAME_LEN, body, pos)
        pos += _NAME_LEN.size
        name = bytes(_slice(body, pos, name_len)).decode(errors="replace")
        pos += name_len
        code, ndim = _take(_DTYPE, body, pos)
        pos += _DTYPE.size
        dims = struct.unpack_from(f"<{ndim}Q", _slice(body, pos, 8 * ndim))
        pos += 8 * ndim
        (encoding,) = _take(_ENCODING, body, pos)
        pos += _ENCODING.size
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise PayloadError(f"section {name!r} has unknown dtype code {code}")
        arrays[name], pos = _read_data(body, pos, name, dtype, dims, encoding)
    if pos != len(body):
        raise PayloadError(f"{len(body) - pos} bytes after the last section")
    return arrays


def _read_data(body: memoryview, pos: int, name: str, dtype: np.dtype, dims: tuple[int, ...],
               encoding: int) -> tuple[np.ndarray, int]:
    count = math.prod(dims)  # exact (no wrap-around): a hostile size runs past the end instead
    if encoding == RowEncoding.FP32:
        nbytes = count * dtype.itemsize
        return np.frombuffer(_slice(body, pos, nbytes), dtype=dtype).reshape(dims), pos + nbytes
    if dtype != _F32 or len(dims) != 2:
        raise PayloadError(f"section {name!r}: row encoding {encoding} on a {dtype} array of {len(dims)} dims")
    if encoding == RowEncoding.FP16:
        nbytes = count * 2
        half = np.frombuffer(_slice(body, pos, nbytes), dtype="<f2").reshape(dims)
        return half.astype(_F32), pos + nbytes
    if encoding == RowEncoding.INT8:
        rows = dims[0]
        minimum = np.frombuffer(_slice(body, pos, 4 * rows), dtype=_F32)
        step = np.frombuffer(_slice(body, pos + 4 * rows, 4 * rows), dtype=_F32)
        q = np.frombuffer(_slice(body, pos + 8 * rows, count), dtype=np.int8).reshape(dims)
        values = minimum[:, None] + step[:, None] * (q.astype(_F32) + 128)
        return values.astype(_F32, copy=False), pos + 8 * rows + count
    raise PayloadError(f"section {name!r} has unknown encoding {encoding}")


def _slice(body: memoryview, pos: int, size: int) -> memoryview:
    if pos + size > len(body):
        raise PayloadError("section runs past the end of the payload")
    return body[pos:pos + size]


def _take(fmt: struct.Struct, body: memoryview, pos: int) -> tuple:
    return fmt.unpack(_slice(body, pos, fmt.size))
