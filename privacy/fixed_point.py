"""Fixed-point encoding of bounded float vectors into non-negative integers.

Additively homomorphic schemes (packed Paillier, additive secret sharing mod M) work on
non-negative integers. This codec maps a float in [-bound, bound] to
``q = round(x * 2**frac_bits) + offset`` with ``offset = ceil(bound * 2**frac_bits)``, so every
encoding lies in ``[0, 2 * offset]``. The sum of ``n`` encodings therefore lies in
``[0, n * 2 * offset]``: it never wraps as long as the container (a Paillier slot, or a modulus
M for secret sharing) holds ``bits_per_value(n)`` bits. ``decode_sum`` subtracts ``n * offset``
and rescales. Rounding error is at most ``2**-(frac_bits + 1)`` per summand.

Out-of-range input raises instead of wrapping or clipping: a silent wrap inside a packed slot
would corrupt the neighbouring slot of every other site's contribution.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

# bound * 2**frac_bits must stay exactly representable in float64 and far from int64 limits.
_MAX_SCALED_BOUND = 2**52


class FixedPointError(ValueError):
    """Base class of fixed-point codec errors."""


class EncodingOverflowError(FixedPointError):
    """A value is outside [-bound, bound], NaN or infinite, so it cannot be encoded safely."""


class DecodingRangeError(FixedPointError):
    """An encoded sum is outside the range possible for n_terms honest encodings."""


@dataclass(frozen=True, kw_only=True)
class FixedPointCodec:
    """Encode floats in ``[-bound, bound]`` as integers in ``[0, 2 * offset]``.

    Keyword-only so that ``frac_bits`` and ``bound`` can never be swapped by position.
    """

    frac_bits: int = 16
    bound: float

    def __post_init__(self) -> None:
        if isinstance(self.frac_bits, bool) or not isinstance(self.frac_bits, int):
            raise FixedPointError(f"frac_bits must be an int, got {self.frac_bits!r}")
        if not 0 <= self.frac_bits <= 52:
            raise FixedPointError(f"frac_bits must be in [0, 52], got {self.frac_bits}")
        bound = float(self.bound)
        if not math.isfinite(bound) or bound <= 0:
            raise FixedPointError(f"bound must be a positive finite float, got {self.bound!r}")
        if bound * (1 << self.frac_bits) > _MAX_SCALED_BOUND:
            raise FixedPointError(
                f"bound * 2**frac_bits = {bound * (1 << self.frac_bits):.3g} exceeds 2**52; "
                "lower bound or frac_bits"
            )
        object.__setattr__(self, "bound", bound)

    @property
    def scale(self) -> int:
        """Multiplier 2**frac_bits applied before rounding."""
        return 1 << self.frac_bits

    @property
    def offset(self) -> int:
        """Shift that makes every encoding non-negative."""
        return math.ceil(self.bound * self.scale)

    @property
    def max_encoded(self) -> int:
        """Largest possible single encoding (that of +bound)."""
        return 2 * self.offset

    def max_sum(self, n_terms: int) -> int:
        """Largest possible sum of ``n_terms`` encodings; a modulus must exceed it."""
        _check_terms(n_terms)
        return n_terms * self.max_encoded

    def bits_per_value(self, n_terms: int) -> int:
        """Bits needed to hold a sum of ``n_terms`` encodings without overflow."""
        return self.max_sum(n_terms).bit_length()

    def max_abs_error(self, n_terms: int) -> float:
        """Worst-case rounding error of a decoded sum of ``n_terms`` values."""
        _check_terms(n_terms)
        return n_terms * 2.0 ** -(self.frac_bits + 1)

    def encode(self, x: np.ndarray | Sequence[float]) -> list[int]:
        """Encode a 1-D vector into non-negative Python ints; raise on any unsafe value."""
        arr = np.asarray(x, dtype=np.float64)
        if arr.ndim != 1:
            raise FixedPointError(f"expected a 1-D vector, got shape {arr.shape}; ravel it first")
        bad = ~np.isfinite(arr) | (np.abs(arr) > self.bound)
        if bad.any():
            i = int(np.flatnonzero(bad)[0])
            n_bad = int(bad.sum())
            raise EncodingOverflowError(
                f"value at index {i} is {arr[i]!r}, outside [-{self.bound}, {self.bound}] "
                f"({n_bad} offending value(s) in total); clip before encoding"
            )
        # |x * scale| <= 2**52, so rint is exact and int64 cannot overflow.
        q = np.rint(arr * self.scale).astype(np.int64) + self.offset
        return q.tolist()

    def decode_sum(self, q_sum: Sequence[int] | np.ndarray, n_terms: int) -> np.ndarray:
        """Decode a sum of ``n_terms`` encodings (exact ints) back to float64."""
        _check_terms(n_terms)
        limit = self.max_sum(n_terms)
        shift = n_terms * self.offset
        scale = self.scale
        out = np.empty(len(q_sum), dtype=np.float64)
        for i, q in enumerate(q_sum):
            q = int(q)
            if not 0 <= q <= limit:
                raise DecodingRangeError(
                    f"encoded sum at index {i} is {q}, outside [0, {limit}] for {n_terms} "
                    "term(s): an input was out of range or the container overflowed"
                )
            out[i] = (q - shift) / scale  # int / int true division is correctly rounded
        return out


def _check_terms(n_terms: int) -> None:
    if isinstance(n_terms, bool) or not isinstance(n_terms, int) or n_terms < 1:
        raise FixedPointError(f"n_terms must be a positive int, got {n_terms!r}")
