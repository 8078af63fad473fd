"""The binary payload of a snapshot or delta: a checked header over named arrays.

    header  magic "FRSH" | format u16 | kind u8 | reserved u8 | version u64 | base u64
            | sections u32 | body length u64 | xxh3-64 of body u64        (little-endian)
    section name length u16 | name (utf-8) | dtype u8 | ndim u8 | dims u64 x ndim | raw data

Arrays are read back with numpy.frombuffer: no pickle, no torch.load, nothing executable.
Every length is checked against the bytes actually there, so a truncated or tampered
payload is refused with a reason instead of producing a half-applied model.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass, field
from enum import IntEnum

import numpy as np
import xxhash

MAGIC = b"FRSH"
FORMAT_VERSION = 1
_HEADER = struct.Struct("<4sHBBQQIQQ")
_SECTION = struct.Struct("<H")
_DTYPE = struct.Struct("<BB")

_DTYPES: dict[int, np.dtype] = {
    1: np.dtype("<f4"), 2: np.dtype("<f2"), 3: np.dtype("i1"), 4: np.dtype("<i8"),
    5: np.dtype("<f8"), 6: np.dtype("<i4"), 7: np.dtype("u1"),
}
_CODES = {dt: code for code, dt in _DTYPES.items()}


class Kind(IntEnum):
    SNAPSHOT = 1
    DELTA = 2


class PayloadError(ValueError):
    """Bytes that are not a complete, intact payload."""


@dataclass
class Payload:
    kind: Kind
    version: int
    base_version: int  # the version a delta applies on top of (0 for a snapshot)
    arrays: dict[str, np.ndarray] = field(default_factory=dict)


def encode(payload: Payload) -> bytes:
    parts: list[bytes] = []
    for name, array in payload.arrays.items():
        a = np.require(array, requirements="C")
        dtype = a.dtype.newbyteorder("<") if a.dtype.byteorder == ">" else a.dtype
        code = _CODES.get(np.dtype(dtype))
        if code is None:
            raise TypeError(f"array {name!r} has unsupported dtype {a.dtype}")
        encoded_name = name.encode()
        parts += [_SECTION.pack(len(encoded_name)), encoded_name, _DTYPE.pack(code, a.ndim),
                  struct.pack(f"<{a.ndim}Q", *a.shape), a.astype(dtype, copy=False).tobytes()]
    body = b"".join(parts)
    header = _HEADER.pack(MAGIC, FORMAT_VERSION, int(payload.kind), 0, payload.version, payload.base_version,
                          len(payload.arrays), len(body), xxhash.xxh3_64_intdigest(body))
    return header + body


def decode(data: bytes | memoryview) -> Payload:
    view = memoryview(data)
    if len(view) < _HEADER.size:
        raise PayloadError(f"payload of {len(view)} bytes is shorter than its header")
    magic, fmt, kind, _, version, base, n_sections, body_len, checksum = _HEADER.unpack_from(view)
    if magic != MAGIC:
        raise PayloadError("not a freshrec payload (bad magic)")
    if fmt != FORMAT_VERSION:
        raise PayloadError(f"payload format {fmt} is not supported (expected {FORMAT_VERSION})")
    body = view[_HEADER.size:]
    if len(body) != body_len:
        raise PayloadError(f"body is {len(body)} bytes, header says {body_len}")
    if xxhash.xxh3_64_intdigest(body) != checksum:
        raise PayloadError("checksum mismatch")
    try:
        payload_kind = Kind(kind)
    except ValueError:
        raise PayloadError(f"unknown payload kind {kind}") from None
    return Payload(payload_kind, version, base, _read_sections(body, n_sections))


def _read_sections(body: memoryview, count: int) -> dict[str, np.ndarray]:
    arrays: dict[str, np.ndarray] = {}
    pos = 0
    for _ in range(count):
        (name_len,) = _take(_SECTION, body, pos)
        pos += _SECTION.size
        name = bytes(_slice(body, pos, name_len)).decode()
        pos += name_len
        code, ndim = _take(_DTYPE, body, pos)
        pos += _DTYPE.size
        dims = struct.unpack_from(f"<{ndim}Q", _slice(body, pos, 8 * ndim))
        pos += 8 * ndim
        dtype = _DTYPES.get(code)
        if dtype is None:
            raise PayloadError(f"section {name!r} has unknown dtype code {code}")
        nbytes = int(np.prod(dims, dtype=np.uint64)) * dtype.itemsize
        arrays[name] = np.frombuffer(_slice(body, pos, nbytes), dtype=dtype).reshape(dims)
        pos += nbytes
    if pos != len(body):
        raise PayloadError(f"{len(body) - pos} bytes after the last section")
    return arrays


def _slice(body: memoryview, pos: int, size: int) -> memoryview:
    if pos + size > len(body):
        raise PayloadError("section runs past the end of the payload")
    return body[pos:pos + size]


def _take(fmt: struct.Struct, body: memoryview, pos: int) -> tuple:
    return fmt.unpack(_slice(body, pos, fmt.size))
