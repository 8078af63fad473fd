import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from publisher.payload import Kind, Payload, PayloadError, decode, encode


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
