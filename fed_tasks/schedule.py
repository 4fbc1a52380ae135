"""The job's aggregates in order, derived from the approved spec alone.

Every party (each site, the orchestrator, the key authority, the secure-sum session) must
agree on which summed call comes when, how long its vector is and how it is encoded, without
trusting a message for it. So the schedule is a pure function of the spec: the statistics,
then the detector's own phases (training rounds, moment or histogram sums), then the alarm
threshold's calibration passes.

A phase's calls are numbered by *pass* ``k`` (``fit`` pass k is training round k, as every
message, DP charge and report says); the statistics are pass 0. Across the job, each summed
call has one *slot*: its place in the order. The slot is what contributions are signed with,
what the key authority's replay guard spends and what the secure-sum session counts.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.spec import JobSpec
from privacy.fixed_point import FixedPointCodec

#: counts, sums and sums of squares of raw features: large but need little precision
STATS_CODEC = FixedPointCodec(frac_bits=8, bound=2.0**44)
#: histogram counts are integers
COUNT_CODEC = FixedPointCodec(frac_bits=0, bound=2.0**32)
#: sums of products of standardized values (sites clip z to ±Z_CLIP, so each term ≤ 2,500)
MOMENT_CODEC = FixedPointCodec(frac_bits=16, bound=2.0**36)
#: a Deep SVDD embedding sum (bounded activations of standardized rows)
CENTER_CODEC = FixedPointCodec(frac_bits=16, bound=2.0**36)

#: a site's isolation trees travel as they are (plain mode only): the bound only refuses garbage
TREE_CODEC = FixedPointCodec(frac_bits=32, bound=2.0**20)

#: every summed action a site may be asked for, in any job
SUMMED_ACTIONS = ("stats", "fit", "moments2", "hist", "center", "trees", "calibrate")


@dataclass(frozen=True)
class Phase:
    """``count`` summed calls of ``action``, each a vector of ``length`` values."""

    action: str
    count: int
    length: int
    codec: FixedPointCodec


def fit_codec(spec: JobSpec) -> FixedPointCodec:
    """The training rounds' encoding: the spec's, or fewer bits for a compressed secure job
    (:func:`fed_tasks.compression.secure_codec`; plain mode sends no fixed point)."""
    if spec.compress in ("q8", "q16") and spec.aggregation != "plain":
        from fed_tasks.compression import secure_codec

        return secure_codec(spec.compress)
    return FixedPointCodec(frac_bits=spec.frac_bits, bound=spec.update_bound)


def stats_phase(spec: JobSpec) -> Phase:
    return Phase("stats", 1, 1 + 2 * len(spec.features), STATS_CODEC)


@functools.lru_cache(maxsize=256)
def phases(spec: JobSpec) -> tuple[Phase, ...]:
    """The job's phases in order (cached: every call on every side asks)."""
    from fed_tasks import calibration
    from fed_tasks.detectors import rules_for

    if spec.model == "auto":
        raise PayloadError(f"job {spec.job_id!r} selects a model: each candidate "
                           "(JobSpec.candidate_spec) has its own schedule")
    out = [stats_phase(spec), *rules_for(spec).phases(spec)]
    if calibration.enabled(spec):
        out.append(calibration.phase(spec))
    return tuple(out)


def phase(spec: JobSpec, action: str) -> Phase:
    for p in phases(spec):
        if p.action == action:
            return p
    raise PayloadError(f"job {spec.job_id!r} ({spec.model}) has no {action!r} aggregate")


def has_phase(spec: JobSpec, action: str) -> bool:
    return any(p.action == action for p in phases(spec))


def vector_length(spec: JobSpec, action: str) -> int:
    return phase(spec, action).length


def codec_for(spec: JobSpec, action: str) -> FixedPointCodec:
    return phase(spec, action).codec


def total_slots(spec: JobSpec) -> int:
    return sum(p.count for p in phases(spec))


def slot_index(spec: JobSpec, action: str, k: int) -> int:
    """The slot of pass ``k`` of ``action`` (statistics: k = 0); refuses what the job lacks."""
    start = 0
    for p in phases(spec):
        if p.action == action:
            low = 0 if action == "stats" else 1
            high = 0 if action == "stats" else p.count
            if not low <= int(k) <= high:
                raise PayloadError(f"{action} pass {k} is outside this job's {low}..{high}")
            return start + max(int(k) - 1, 0)
        start += p.count
    raise PayloadError(f"job {spec.job_id!r} ({spec.model}) has no {action!r} aggregate")


def slot_at(spec: JobSpec, index: int) -> tuple[str, int]:
    """(action, pass) of a slot: the inverse of :func:`slot_index`."""
    start = 0
    for p in phases(spec):
        if start <= index < start + p.count:
            return p.action, (0 if p.action == "stats" else index - start + 1)
        start += p.count
    raise PayloadError(f"aggregate {index} is outside this job's 0..{start - 1}")


def end_of(spec: JobSpec, action: str) -> int:
    """The first slot after ``action``'s phase."""
    return slot_index(spec, action, phase(spec, action).count) + 1


def may_follow(spec: JobSpec, previous: int, index: int) -> bool:
    """Whether summed call ``index`` may come right after call ``previous`` (-1: none yet).

    The next slot, always. Training rounds are a maximum, not a quota: once training stops
    early (:func:`training_done`), the job goes on with the first slot after the rounds.
    Nothing else is skipped, and nothing repeats."""
    if index == previous + 1:
        return True
    if previous < 0 or index <= previous or not has_phase(spec, "fit"):
        return False
    return slot_at(spec, previous)[0] == "fit" and index == end_of(spec, "fit")


def training_done(spec: JobSpec, losses: list[float]) -> bool:
    """Early stopping: the federated loss improved by less than ``min_delta`` (relative to
    the best loss before) in each of the last ``patience`` rounds. Never under DP (the loss
    is withheld) nor with ``patience`` 0; a pure function of the released losses, so a
    resumed job stops where the uninterrupted one would have."""
    if spec.patience <= 0 or spec.dp_enabled or len(losses) <= spec.patience:
        return False
    best_before = min(losses[:-spec.patience])
    return bool(min(losses[-spec.patience:]) > best_before * (1.0 - spec.min_delta))


def max_length(spec: JobSpec) -> int:
    return max(p.length for p in phases(spec))


def combine(action: str, vectors: dict[str, np.ndarray], spec: JobSpec | None = None,
            staleness: dict[str, int] | None = None) -> np.ndarray:
    """The aggregate of one call from each contributor's vector: their sum, except for a
    forest's trees, which are pooled (concatenated in site order, so every party forms the
    same forest), and a training round, which the job's strategy combines (a robust one
    from the individual updates; a buffered round's stale updates down-weighted first, see
    :mod:`fed_tasks.buffered`). Only plain mode can pool: a secure sum can only add."""
    if not vectors:
        raise PayloadError("an aggregate needs at least one contribution")
    if action == "trees":
        return np.concatenate([np.asarray(vectors[s], dtype=np.float64)
                               for s in sorted(vectors)])
    if action == "fit" and spec is not None:
        from fed_tasks.buffered import weighted
        from fed_tasks.strategies import strategy_for

        if staleness:
            vectors = weighted(vectors, staleness)
        return strategy_for(spec).aggregate(vectors)
    return np.sum([np.asarray(v, dtype=np.float64) for v in vectors.values()], axis=0)
