"""``model="auto"``: train each candidate detector, keep the one that validates best.

One approval covers the whole selection. Each candidate runs as its own job, derived by
every party from the approved spec (:meth:`JobSpec.candidate_spec`); every call of the
selection names its candidate, and a site answers it under that derived spec, never under
anything the message says. Sites hold back a validation split of their training rows
(:func:`validation_split`, the same rows for every candidate), score each trained
candidate on it (action ``validate``), and only the metrics leave. The data scientist
picks the best by pooled validation ROC-AUC; ``evaluate`` then scores that one on the
sites' test splits.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fed_tasks.codec import PayloadError
from fed_tasks.interface import SiteConnection, call_all
from fed_tasks.spec import JobSpec


def candidate_job(spec: JobSpec, candidate: Any) -> JobSpec:
    """The spec a call runs under: a selection job's candidate, or the job itself."""
    if spec.model != "auto":
        if candidate is not None:
            raise PayloadError(f"job {spec.job_id!r} trains one model; a call names no "
                               "candidate")
        return spec
    if candidate is None:
        raise PayloadError(f"every call of model-selection job {spec.job_id!r} names its "
                           "candidate")
    try:
        return spec.candidate_spec(candidate)
    except ValueError as exc:
        raise PayloadError(str(exc)) from None


def validation_split(spec: JobSpec, train: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(rows the candidates train on, rows they are validated on): the same split for every
    candidate and every call, from the spec's seed and the rows' positions alone."""
    rng = np.random.default_rng([spec.seed, 0x5E1EC7])
    held = rng.random(len(train)) < spec.val_fraction
    if held.all() or not held.any():  # a tiny table: keep at least one row on each side
        held = np.zeros(len(train), dtype=bool)
        held[-1:] = True
    return train.loc[~held], train.loc[held]


def pooled_validation_auc(metrics: list[dict[str, Any]]) -> float | None:
    """ROC-AUC over the pairs (anomaly, normal row) *within* each site, from each site's
    AUC and class counts: Σ AUC_s·P_s·N_s / Σ P_s·N_s (the pooled AUC over all pairs would
    need the scores themselves). None if no site's validation split holds both classes."""
    num = den = 0.0
    for m in metrics:
        if m.get("roc_auc") is None:
            continue
        pairs = float(m["n_pos"]) * float(m["n_test"] - m["n_pos"])
        num += float(m["roc_auc"]) * pairs
        den += pairs
    return num / den if den else None


class CandidateConnection:
    """A site connection whose every message names one candidate of a selection job."""

    def __init__(self, conn: SiteConnection, index: int) -> None:
        self.conn, self.index, self.name = conn, index, conn.name

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        return self.conn.call(action, {**message, "candidate": self.index})


def for_candidate(secure_sum: Any, sub: JobSpec, index: int) -> Any:
    """The candidate's own secure sum: a new session (secagg) or the key authority's calls
    naming the candidate (paillier)."""
    from fed_tasks.aggregation import KeyAuthoritySum, MaskedSum, PlainSum

    if isinstance(secure_sum, PlainSum):
        return PlainSum(secure_sum.min_sites)
    if isinstance(secure_sum, KeyAuthoritySum):
        return KeyAuthoritySum(CandidateConnection(secure_sum.key_authority, index))
    if isinstance(secure_sum, MaskedSum):
        return MaskedSum(sub, secure_sum.n_sites)
    raise TypeError(f"no candidate form of {type(secure_sum).__name__}")


@dataclass
class Candidate:
    """One trained candidate and what its validation said."""

    model: str
    trainer: Any  # the candidate's FederatedTrainer (its sites and secure sum)
    result: Any  # its TrainingResult
    validation: list[dict[str, Any]]
    auc: float | None


def select(spec: JobSpec, sites: list[SiteConnection], secure_sum: Any,
           make_trainer: Any) -> list[Candidate]:
    """Train and validate every candidate in turn (``make_trainer(sub, conns, secure_sum)``
    builds each one's trainer)."""
    out = []
    for i, sub in enumerate(spec.candidate_specs):
        conns = [CandidateConnection(s, i) for s in sites]
        trainer = make_trainer(sub, conns, for_candidate(secure_sum, sub, i))
        result = trainer.fit()
        validation = [{"site": c.name, **r} for c, r in zip(
            conns, call_all(conns, "validate", {"previous": trainer.secure_sum.evidence()}),
            strict=True)]
        out.append(Candidate(sub.model, trainer, result, validation,
                             pooled_validation_auc(validation)))
    return out


def best(candidates: list[Candidate]) -> Candidate:
    """The candidate with the highest pooled validation ROC-AUC (the first on a tie)."""
    scored = [c for c in candidates if c.auc is not None]
    if not scored:
        raise PayloadError("no site's validation split holds both normal and anomalous "
                           "rows: the candidates cannot be compared")
    return max(scored, key=lambda c: c.auc)
