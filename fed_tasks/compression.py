"""Smaller training updates: quantization (8 / 16 bits) and top-k sparsification.

A job's ``compress`` setting (``JobSpec.compress``: ``none``, ``q8``, ``q16`` or ``topk:K``)
changes only the training rounds' contributions, and only in ways every party derives from
the approved spec, so that every party forming an aggregate decodes each contribution alike:

- **plain mode** — the payload that is signed and relayed is the compressed one. ``q8`` /
  ``q16``: the Δ part ``n·Δ`` of ``[n·Δ, n·loss, n]`` is quantized uniformly between its own
  minimum and maximum (carried in the payload) to 8 / 16 bits per value; ``topk:K``: the K
  largest ``|n·Δ|`` travel as (index, float32 value) pairs, the rest as zero. ``n·loss`` and
  ``n`` travel exactly (float64). Another site decodes the payload, so decoding is strict:
  an exact byte length, finite numbers, indices increasing and in range.
- **secure modes** (paillier, secagg) — a sum needs dense integers, so top-k is refused and
  q8 / q16 mean fewer fixed-point bits: the site sends ``[w·Δ, w·loss, w]`` with
  ``w = n / N`` (N: the federation's training rows, from the statistics every party derived
  itself), so every value is at most about 1 whatever a site's size, and encodes it with a
  codec whose single-site value fits 8 / 16 bits (:func:`secure_codec`). Values beyond the
  codec's public bound are clipped at the site and counted in its reply (``clipped``).
  ``w`` sums to 1 over the sites, so FedAvg's mean (sum / total weight) is unchanged.

Error feedback (Seide et al. 2014; Karimireddy et al. 2019): what the compression dropped
from a site's Δ part this round (rounding, the coordinates top-k left out) is kept in the
site's private job state (``SiteModelState.private["residual"]``, saved in the site
directory, never released) and added to its next update, so that it is delayed, not lost.
What the secure codec *clips* is counted, not carried: a value beyond the bound round after
round would otherwise pile up in the residual without limit (wind-up).
"""

from __future__ import annotations

import base64
import math
import re
from typing import Any, NamedTuple

import numpy as np

from fed_tasks.codec import PayloadError, decode_array, encode_array
from privacy.fixed_point import FixedPointCodec

#: the private-state key of a site's error-feedback residual (never released)
RESIDUAL = "residual"
_TOPK = re.compile(r"topk:([1-9][0-9]{0,8})")  # K a whole number >= 1
#: bits per value: plain mode's quantization levels (2**bits); in the secure modes a single
#: site's encoding fits them (the codec's 2·offset < 2**bits)
BITS = {"q8": 8, "q16": 16}
#: secure modes: fixed-point fraction bits; the bound is then (2**(bits-1) - 1) / 2**frac,
#: just under 1, because the weight slot w = n / N may approach 1 (a site with most rows).
#: Measured on shuttle (3 sites, ae): |Δ| per round stays below 0.15, so q16 keeps every
#: value at a step of 3e-5; q8's step of 1/128 is coarser than most coordinates of w·Δ
#: (median ~0.01·w), which reach the sum only through error feedback, a few rounds late.
SECURE_FRAC = {"q8": 7, "q16": 15}


class Compression(NamedTuple):
    """A parsed ``compress`` setting."""

    kind: str  # "none", "q8", "q16" or "topk"
    k: int = 0  # topk only

    @property
    def active(self) -> bool:
        return self.kind != "none"


def parse(setting: str) -> Compression:
    """``none`` | ``q8`` | ``q16`` | ``topk:K``; a ValueError of one line otherwise."""
    if setting in ("none", "q8", "q16"):
        return Compression(setting)
    match = _TOPK.fullmatch(setting) if isinstance(setting, str) else None
    if match is None:
        raise ValueError(f"compress must be none, q8, q16 or topk:K with K a whole number "
                         f"from 1, got {setting!r}")
    return Compression("topk", int(match.group(1)))


def words(setting: str, aggregation: str = "plain") -> str:
    """The setting in plain words (the owner's review)."""
    c = parse(setting)
    kept = ("; what it drops is kept at this site (never sent) and added to its next update")
    if c.kind == "none":
        return "none (every value as a 64-bit float)"
    if c.kind == "topk":
        return (f"top-{c.k}: only the {c.k} largest changes of each round's update leave, as "
                f"(position, 32-bit value) pairs, with the exact sample count and loss{kept}")
    bits = BITS[c.kind]
    if aggregation == "plain":
        return (f"{bits}-bit quantization: each value of the update leaves as one of "
                f"{1 << bits} levels between the update's own minimum and maximum, with the "
                f"exact sample count and loss{kept}")
    codec = secure_codec(setting)
    return (f"{bits}-bit fixed point: the update times this site's share n/N of the "
            f"federation's training rows, in steps of {1 / codec.scale:.2g}, "
            f"values beyond ±{codec.bound:.3g} clipped and the clipped count sent with "
            f"it{kept}")


def secure_codec(setting: str) -> FixedPointCodec:
    """The fit phase's fixed-point codec of a secure job with ``q8``/``q16``: one site's
    encoding ``[0, 2·offset]`` fits ``bits`` bits."""
    c = parse(setting)
    if c.kind not in BITS:
        raise ValueError(f"compress {setting!r} has no fixed-point codec (q8 or q16 only)")
    frac = SECURE_FRAC[c.kind]
    return FixedPointCodec(frac_bits=frac,
                           bound=(2 ** (BITS[c.kind] - 1) - 1) / 2 ** frac)


# ---- plain mode: the payload ------------------------------------------------------------
def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _raw(text: str) -> bytes:
    try:
        return base64.b64decode(text.encode("ascii"), validate=True)
    except (ValueError, UnicodeEncodeError) as exc:
        raise PayloadError(f"compressed payload is not valid base64: {exc}") from None


def _topk(setting: Compression, length: int) -> int:
    return min(setting.k, length)


def encode(setting: str, vector: np.ndarray) -> str:
    """A fit vector ``[Δ part…, n·loss, n]`` as the setting's payload (deterministic)."""
    c = parse(setting)
    v = np.asarray(vector, dtype=np.float64).ravel()
    if c.kind == "none":
        return encode_array(v)
    if v.size < 2 or not np.all(np.isfinite(v)):
        raise PayloadError("a fit vector needs finite values and its two trailing counts")
    head, tail = v[:-2], v[-2:]
    out = tail.astype("<f8").tobytes()
    if c.kind == "topk":
        k = _topk(c, head.size)
        idx = np.sort(np.argsort(-np.abs(head), kind="stable")[:k])
        return _b64(out + idx.astype("<u4").tobytes() + head[idx].astype("<f4").tobytes())
    levels = (1 << BITS[c.kind]) - 1
    lo = float(head.min()) if head.size else 0.0
    hi = float(head.max()) if head.size else 0.0
    step = (hi - lo) / levels
    codes = (np.zeros(head.size) if step == 0 else np.rint((head - lo) / step))
    dtype = "<u1" if c.kind == "q8" else "<u2"
    header = np.array([lo, step], dtype="<f8").tobytes()
    return _b64(out + header + np.clip(codes, 0, levels).astype(dtype).tobytes())


def decode(setting: str, text: str, length: int) -> np.ndarray:
    """The fit vector (``length`` values) a payload of :func:`encode` stands for; raises a
    one-line :class:`PayloadError` on anything another site could not have encoded."""
    c = parse(setting)
    if c.kind == "none":
        return decode_array(text, length)
    if not isinstance(text, str):
        raise PayloadError("compressed payload must be a string")
    raw, head_len = _raw(text), length - 2
    if head_len < 0:
        raise PayloadError(f"a fit vector has at least 2 values, expected {length}")
    if c.kind == "topk":
        k = _topk(c, head_len)
        want = 16 + 8 * k
    else:
        k, want = 0, 32 + head_len * (1 if c.kind == "q8" else 2)
    if len(raw) != want:
        raise PayloadError(f"{c.kind} payload has {len(raw)} bytes, expected {want} for "
                           f"{length} values")
    tail = np.frombuffer(raw[:16], dtype="<f8").astype(np.float64)
    if c.kind == "topk":
        idx = np.frombuffer(raw[16:16 + 4 * k], dtype="<u4").astype(np.int64)
        vals = np.frombuffer(raw[16 + 4 * k:], dtype="<f4").astype(np.float64)
        if k and (idx[-1] >= head_len or np.any(np.diff(idx) <= 0)):
            raise PayloadError(f"top-k indices must increase strictly and stay below "
                               f"{head_len}")
        head = np.zeros(head_len)
        head[idx] = vals
    else:
        lo, step = np.frombuffer(raw[16:32], dtype="<f8").astype(np.float64)
        if not (math.isfinite(lo) and math.isfinite(step) and step >= 0):
            raise PayloadError("quantized payload has a non-finite or negative scale")
        codes = np.frombuffer(raw[32:], dtype="<u1" if c.kind == "q8" else "<u2")
        with np.errstate(over="ignore"):  # an overflow is refused just below
            head = lo + codes.astype(np.float64) * step
    out = np.concatenate([head, tail])
    if not np.all(np.isfinite(out)):
        raise PayloadError(f"{c.kind} payload decodes to NaN or infinity")
    return out


def contribution_payload(spec: Any, action: str, vector: np.ndarray) -> str:
    """What a plain-mode site signs for ``action``: the compressed fit vector, else float64."""
    if action == "fit" and spec.aggregation == "plain":
        return encode(spec.compress, vector)
    return encode_array(vector)


def contribution_vector(spec: Any, action: str, payload: str, length: int) -> np.ndarray:
    """The inverse of :func:`contribution_payload`, used by every party that forms a plain
    aggregate (the sites and the orchestrator), so all of them decode alike."""
    if action == "fit" and spec.aggregation == "plain":
        return decode(spec.compress, payload, length)
    return decode_array(payload, length)


# ---- the site's side: error feedback ------------------------------------------------------
def compress_fit(spec: Any, vector: np.ndarray, rows: float,
                 private: dict[str, np.ndarray] | None) -> tuple[np.ndarray, dict[str, Any]]:
    """A site's fit vector as it will be sent under the job's setting, with error feedback.

    Plain mode: the returned vector is the decoded payload (what every party will sum) and
    ``extra["payload"]`` the payload itself. Secure modes: the vector is ``[w·Δ, w·loss, w]``
    plus the residual (the protection clips, counts and encodes it with
    :func:`secure_codec`; the residual kept is what that rounding will drop). ``rows``: N,
    the federation's training rows, for the secure weight ``w = n / N``.
    """
    c = parse(spec.compress)
    v = np.asarray(vector, dtype=np.float64).copy()
    if not c.active:
        return v, {}
    if spec.aggregation != "plain":
        if not rows >= v[-1] > 0:
            raise PayloadError("the secure weight n / N needs the federation's row count")
        v = v / rows
    residual = None if private is None else private.get(RESIDUAL)
    if residual is not None and residual.shape == v[:-2].shape:
        v[:-2] += residual
    if spec.aggregation == "plain":
        payload = encode(spec.compress, v)
        kept, extra = v, {"payload": payload}
        sent = decode(spec.compress, payload, v.size)
    else:
        codec = secure_codec(spec.compress)
        b = codec.bound  # as the protection clips (a non-finite value is 0 or ±bound): the
        # residual must stay finite, or the site's saved state could never be read again
        kept, extra = np.clip(np.nan_to_num(v, nan=0.0, posinf=b, neginf=-b), -b, b), {}
        sent = np.rint(kept * codec.scale) / codec.scale
    if private is not None:
        private[RESIDUAL] = kept[:-2] - sent[:-2]
    return (sent if spec.aggregation == "plain" else v), extra
