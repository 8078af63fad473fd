import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from publisher.payload import Compression, Kind, Payload, PayloadError, RowEncoding, decode, encode


def sample_payload() -> Payload:
    rng = np.random.default_rng(0)
    return Payload(Kind.DELTA, 7, 6, {
        "table/C1/keys": rng.integers(-2**63, 2**63 - 1, 50, dtype=np.int64),
        "table/C1/values": rng.normal(size=(50, 16)).astype(np.float32),
        "table/C1/tombstones": np.array([], dtype=np.int64),
        "dense/top.0.weight": rng.normal(size=(4, 3)).astype(np.float32),
        "table/C1/default": np.array(0.5, dtype=np.float32),
        "half": np.ones(3, dtype=np.float16),
        "int8": np.arange(-3, 3, dtype=np.int8),
    })


def test_round_trip_keeps_every_array_exactly():
    original = sample_payload()
    decoded = decode(encode(original))
    assert (decoded.kind, decoded.version, decoded.base_version) == (Kind.DELTA, 7, 6)
    assert decoded.arrays.keys() == original.arrays.keys()
    for name, array in original.arrays.items():
        assert decoded.arrays[name].dtype == array.dtype, name
        assert decoded.arrays[name].shape == array.shape, name
        np.testing.assert_array_equal(decoded.arrays[name], array)


def test_truncated_payload_is_refused():
    data = encode(sample_payload())
    for cut in (0, 10, len(data) // 2, len(data) - 1):
        with pytest.raises(PayloadError):
            decode(data[:cut])


@settings(max_examples=60, deadline=None)
@given(st.integers(min_value=0), st.integers(min_value=0, max_value=255))
def test_any_flipped_byte_is_refused(position, mask):
    data = bytearray(encode(sample_payload()))
    position %= len(data)
    data[position] ^= mask or 1
    with pytest.raises(PayloadError):
        decode(bytes(data))


def test_not_a_payload():
    with pytest.raises(PayloadError, match="magic"):
        decode(b"\x80\x04pickle-bytes-that-must-never-be-unpickled" + b"\0" * 64)


def test_unsupported_dtype_is_an_encoding_error():
    with pytest.raises(TypeError):
        encode(Payload(Kind.SNAPSHOT, 1, 0, {"x": np.array(["a"])}))


def rows_payload(n=500, dim=16):
    rng = np.random.default_rng(1)
    values = (rng.normal(size=(n, dim)) * rng.uniform(0.001, 1, size=(n, 1))).astype(np.float32)
    values[0] = 0.25  # a constant row
    keys = rng.integers(-2**63, 2**63 - 1, n, dtype=np.int64)
    return Payload(Kind.DELTA, 3, 2, {"table/t/keys": keys, "table/t/values": values},
                   lossy=frozenset({"table/t/values"}))


@pytest.mark.parametrize("rows", [RowEncoding.FP16, RowEncoding.INT8])
def test_lossy_row_encodings_decode_to_float32_within_their_precision(rows):
    original = rows_payload()
    decoded = decode(encode(original, rows=rows)).arrays
    np.testing.assert_array_equal(decoded["table/t/keys"], original.arrays["table/t/keys"])  # keys never lossy
    values, got = original.arrays["table/t/values"], decoded["table/t/values"]
    assert got.dtype == np.float32 and got.shape == values.shape
    if rows is RowEncoding.FP16:
        np.testing.assert_allclose(got, values, rtol=1e-3, atol=1e-7)
    else:
        half_step = (values.max(axis=1) - values.min(axis=1)) / 255 / 2
        assert (np.abs(got - values) <= half_step[:, None] * 1.001 + 1e-7).all()
    assert (got[0] == 0.25).all()


def test_lossy_encodings_shrink_the_values():
    p = rows_payload(n=2000)
    sizes = {r: len(encode(p, rows=r)) for r in RowEncoding}
    values_fp32 = p.arrays["table/t/values"].nbytes
    keys = p.arrays["table/t/keys"].nbytes
    assert sizes[RowEncoding.FP16] - keys < 0.51 * values_fp32 + 200
    assert sizes[RowEncoding.INT8] - keys < 0.26 * values_fp32 + 8 * 2000 + 200  # + per-row minimum and step


def test_zstd_round_trip_and_a_lying_raw_length_is_refused():
    p = sample_payload()
    data = encode(p, compression=Compression.ZSTD)
    for name, array in p.arrays.items():
        np.testing.assert_array_equal(decode(data).arrays[name], array)
    # A header that understates the decompressed size (a decompression bomb) is refused,
    # even with a checksum recomputed to match.

    from publisher import payload as fmt
    fields = list(fmt._HEADER.unpack_from(data))
    fields[7] = 10
    body = data[fmt._HEADER.size:]
    forged = fmt._HEADER.pack(*fields[:-1], fmt._checksum(fmt._HEADER.pack(*fields[:-1], 0), body)) + body
    with pytest.raises(PayloadError):
        decode(forged)
