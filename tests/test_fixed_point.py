import math

import numpy as np
import pytest

from privacy.fixed_point import (
    DecodingRangeError,
    EncodingOverflowError,
    FixedPointCodec,
    FixedPointError,
)


@pytest.fixture
def codec() -> FixedPointCodec:
    return FixedPointCodec(frac_bits=16, bound=4.0)


def test_offset_and_encodings_are_non_negative(codec):
    assert codec.offset == 4 * 2**16
    x = np.array([-4.0, -1.5, 0.0, 1e-9, 2.25, 4.0])
    q = codec.encode(x)
    assert all(isinstance(v, int) for v in q)
    assert min(q) == 0
    assert max(q) == codec.max_encoded
    assert all(0 <= v <= codec.max_encoded for v in q)


def test_round_trip_single_vector(codec):
    rng = np.random.default_rng(1)
    x = rng.uniform(-4, 4, size=500)
    back = codec.decode_sum(codec.encode(x), 1)
    assert np.max(np.abs(back - x)) <= codec.max_abs_error(1)


def test_sum_of_several_vectors_matches_plain_sum(codec):
    rng = np.random.default_rng(2)
    xs = [rng.uniform(-4, 4, size=300) for _ in range(7)]
    q_sum = [sum(col) for col in zip(*(codec.encode(x) for x in xs), strict=True)]
    got = codec.decode_sum(q_sum, 7)
    assert np.max(np.abs(got - np.sum(xs, axis=0))) <= 7 * 2.0**-16


def test_bits_per_value_holds_worst_case_sum(codec):
    for n in (1, 2, 3, 10, 1000):
        bits = codec.bits_per_value(n)
        assert n * codec.max_encoded < 2**bits
        assert n * codec.max_encoded >= 2 ** (bits - 1)
        assert codec.max_sum(n) == n * codec.max_encoded


def test_reusable_with_modular_arithmetic(codec):
    # Secure sum via additive shares mod M: sums never wrap when M >= 2**bits_per_value(n).
    n = 5
    modulus = 2 ** codec.bits_per_value(n)
    rng = np.random.default_rng(3)
    xs = [rng.uniform(-4, 4, size=50) for _ in range(n)]
    total = [0] * 50
    for x in xs:
        total = [(t + v) % modulus for t, v in zip(total, codec.encode(x), strict=True)]
    assert np.allclose(codec.decode_sum(total, n), np.sum(xs, axis=0), atol=n * 2.0**-16)


@pytest.mark.parametrize("bad", [4.0001, -4.5, 1e300, float("nan"), float("inf"), -float("inf")])
def test_out_of_range_raises_with_index_and_value(codec, bad):
    x = np.zeros(10)
    x[6] = bad
    with pytest.raises(EncodingOverflowError, match="index 6") as err:
        codec.encode(x)
    assert repr(float(bad)) in str(err.value)
    assert isinstance(err.value, ValueError)


def test_encode_accepts_lists_and_rejects_matrices(codec):
    assert codec.encode([1.0, -1.0]) == codec.encode(np.array([1.0, -1.0]))
    with pytest.raises(FixedPointError, match="1-D"):
        codec.encode(np.zeros((2, 2)))


def test_decode_sum_refuses_impossible_values(codec):
    with pytest.raises(DecodingRangeError, match="index 1"):
        codec.decode_sum([0, codec.max_sum(2) + 1], 2)
    with pytest.raises(DecodingRangeError):
        codec.decode_sum([-1], 1)
    with pytest.raises(FixedPointError):
        codec.decode_sum([0], 0)


def test_default_frac_bits_and_keyword_only():
    c = FixedPointCodec(bound=1.0)
    assert c.frac_bits == 16 and c.scale == 2**16
    with pytest.raises(TypeError):
        FixedPointCodec(16, 1.0)  # type: ignore[misc]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"bound": 0.0},
        {"bound": -1.0},
        {"bound": math.nan},
        {"bound": math.inf},
        {"bound": 1.0, "frac_bits": -1},
        {"bound": 1.0, "frac_bits": 53},
        {"bound": 2.0**40, "frac_bits": 16},
    ],
)
def test_invalid_parameters(kwargs):
    with pytest.raises(FixedPointError):
        FixedPointCodec(**kwargs)


def test_fractional_bound_offset_rounds_up():
    c = FixedPointCodec(frac_bits=2, bound=0.3)  # 0.3 * 4 = 1.2 -> offset 2
    assert c.offset == 2
    q = c.encode([0.3, -0.3])
    assert q == [3, 1]
    assert all(0 <= v <= c.max_encoded for v in q)
