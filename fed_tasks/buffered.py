"""Asynchronous buffered rounds (FedBuff, Nguyen et al. 2022): stale updates, down-weighted.

With ``JobSpec.async_k`` the orchestrator forms a round's aggregate as soon as ``async_k``
updates are in, instead of waiting for every site; a slow site's update, computed from an
older model, joins a later aggregate. An update computed for training slot ``s`` and
applied in the aggregate of slot ``t`` is ``t − s`` rounds stale; it weighs
``(1 + staleness)^-½`` of a fresh one (FedBuff's polynomial rule), and one staler than
``max_staleness`` is never applied.

Every party forming a buffered aggregate — the orchestrator and each site checking it —
derives the staleness from the slot each contribution is *signed* with, never from a
message, so all of them apply the same weights. In a Paillier job the key authority forms
the buffer: it weighs each ciphertext by a whole-number weight and attests each
contribution's slot and model, which every site checks as in plain mode.
"""

from __future__ import annotations

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.schedule import slot_at
from fed_tasks.spec import JobSpec


def staleness_weight(staleness: int) -> float:
    """How much an update ``staleness`` rounds old counts against a fresh one (≤ 1)."""
    if staleness < 0:
        raise PayloadError(f"an update cannot be computed for a later round ({staleness})")
    return float((1.0 + staleness) ** -0.5)


def staleness_of(spec: JobSpec, index: int, computed_for: int) -> int:
    """Rounds between the slot an update was computed for and the aggregate applying it;
    refuses one from the future, one staler than the job allows, and one computed for
    another phase's slot (a signature covers the slot, not what was computed for it, so a
    Deep SVDD centre must never be read as a training update)."""
    staleness = index - computed_for
    if staleness < 0 or staleness > spec.max_staleness:
        raise PayloadError(f"an update computed for aggregate {computed_for} cannot join "
                           f"aggregate {index}: the job allows updates at most "
                           f"{spec.max_staleness} rounds stale")
    action, phase = slot_at(spec, computed_for)[0], slot_at(spec, index)[0]
    if action != phase:
        raise PayloadError(f"the contribution for aggregate {computed_for} is a {action!r} "
                           f"contribution, not a training update" if phase == "fit" else
                           f"the contribution for aggregate {computed_for} is a {action!r} "
                           f"contribution, not a {phase!r} one")
    return staleness


def weighted(vectors: dict[str, np.ndarray], staleness: dict[str, int]) -> dict[str, np.ndarray]:
    """Each site's ``[n·Δ, n·loss, n]`` scaled by its staleness weight: the weighted mean
    Δ of the scaled sum down-weights stale updates, whatever their row counts."""
    return {name: staleness_weight(staleness.get(name, 0)) * np.asarray(v, dtype=np.float64)
            for name, v in vectors.items()}


def staleness_in(spec: JobSpec, action: str, index: int,
                 slots: dict[str, int]) -> dict[str, int]:
    """Each contributor's staleness in the aggregate of slot ``index`` from the slots its
    update is signed for; empty unless the job buffers its training rounds."""
    if spec.async_k is None or action != "fit":
        return {}
    return {name: staleness_of(spec, index, slot) for name, slot in slots.items()}


#: a secure sum adds whole numbers: there a staleness weight is ``round(W·(1+τ)^-½)``, the
#: key authority raising each ciphertext to it (a fresh update weighs W; the ratio FedAvg
#: takes cancels W)
WEIGHT_SCALE = 256


def whole_weight(staleness: int) -> int:
    """:func:`staleness_weight` in units of 1/``WEIGHT_SCALE`` (at least 1)."""
    return max(1, round(WEIGHT_SCALE * staleness_weight(staleness)))


def summands(spec: JobSpec, action: str, max_sites: int) -> int:
    """How many single-site encodings one slot of a secure sum must hold: the sites, or, in
    a buffered round of a Paillier job, the sites at a fresh update's weight each."""
    if spec.async_k is not None and action == "fit" and spec.aggregation == "paillier":
        return max_sites * WEIGHT_SCALE
    return max_sites
