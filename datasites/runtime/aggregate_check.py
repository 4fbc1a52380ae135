"""A site checks every aggregate before its model follows from it.

The evidence comes through the data scientist, so the site trusts only signatures it can
verify with keys from its *own* federation config (written by the owners, never by the
scientist): each member site's Ed25519 key and the key authority's. Every contribution in an
aggregate must be for this job and this aggregate, come from a distinct member, and have
been computed from the very model this site holds (the chain digest of
:mod:`fed_tasks.site_state`); the aggregate must hold at least the job's minimum number of
sites, this site among them (in a plain job that asks for it, a site skipped for a round
catches up on an aggregate without it: :func:`may_leave_out`). In a buffered round
(``JobSpec.async_k``) an update may be a few rounds stale: then it must have been computed
from the model this site held before the update's own slot (:func:`check_buffered`).
The secure-sum evidence is checked in :mod:`datasites.runtime.protection`, where the site's
session keys live.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from datasites.governance.guard import CallRefused
from datasites.runtime.federation_config import read_config
from fed_tasks.buffered import staleness_in, staleness_of
from fed_tasks.codec import PayloadError, decode_array
from fed_tasks.compression import contribution_vector
from fed_tasks.detectors import rules_for
from fed_tasks.messages import AggregateEvidence
from fed_tasks.schedule import combine, vector_length
from fed_tasks.site_state import SiteModelState, aggregate_index
from fed_tasks.spec import JobSpec
from privacy import signing


class AggregateRefused(CallRefused):
    """The evidence of an aggregate does not verify; the site will not train on it."""


def federation_config(directory: Path) -> dict[str, Any]:
    config = read_config(directory)
    if config is None:
        raise CallRefused("site has no federation configuration (member keys)")
    return config


def _signed(config: dict[str, Any], spec: JobSpec, evidence: AggregateEvidence
            ) -> dict[str, signing.SignedContribution]:
    """Parse the aggregate's contributions and verify each member's signature; one each."""
    members: dict[str, str] = config["sites"]
    out: dict[str, signing.SignedContribution] = {}
    raw_list = evidence.contributions if evidence.kind == "plain" else evidence.inputs
    for i, raw in enumerate(raw_list):
        try:
            c = signing.SignedContribution.from_str(raw)
        except signing.ContributionFormatError:
            raise AggregateRefused(f"contribution #{i} of the aggregate is malformed") from None
        key = members.get(c.site_id)
        if key is None:
            raise AggregateRefused(f"contribution #{i} comes from {c.site_id!r}, not a member")
        try:
            c.verify(key)
        except signing.SignatureError:
            raise AggregateRefused(f"the contribution of {c.site_id!r} is not signed by it"
                                   ) from None
        if c.job_id != spec.job_id:
            raise AggregateRefused(f"the contribution of {c.site_id!r} is for job "
                                   f"{c.job_id!r}, not job {spec.job_id!r}")
        if c.site_id in out:
            raise AggregateRefused(f"site {c.site_id!r} contributes twice to the aggregate")
        out[c.site_id] = c
    return out


def check_contributions(config: dict[str, Any], spec: JobSpec, evidence: AggregateEvidence,
                        site: str, model: str) -> dict[str, signing.SignedContribution]:
    """Parse and verify signed contributions of one aggregate; sender -> contribution."""
    index = aggregate_index(spec, evidence.action, evidence.round)
    out = _signed(config, spec, evidence)
    for c in out.values():
        if c.round != index:
            raise AggregateRefused(f"the contribution of {c.site_id!r} is for job {c.job_id!r} "
                                   f"aggregate {c.round}, not job {spec.job_id!r} aggregate "
                                   f"{index}")
        if c.model != model:
            raise AggregateRefused(f"the contribution of {c.site_id!r} was computed from another "
                                   "model than this site's (sites were sent different models)")
    _check_members(sorted(out), spec, config, site, evidence.action)
    return out


def check_buffered(config: dict[str, Any], spec: JobSpec, evidence: AggregateEvidence,
                   site: str, state: SiteModelState) -> dict[str, signing.SignedContribution]:
    """:func:`check_contributions` for a buffered round (``JobSpec.async_k``): a member's
    update may have been computed for an earlier training slot, at most ``max_staleness``
    rounds back, and then from the very model *this* site held before that slot; each
    member's slots only ever increase, so no update is applied twice. At least
    ``min_sites`` updates must be of this very round, so stale ones never carry a history
    (say, one site shown another aggregate) that too few sites hold."""
    index = aggregate_index(spec, evidence.action, evidence.round)
    out = _signed(config, spec, evidence)
    _check_parts(spec, index, [(c.site_id, c.round, c.model) for c in out.values()], state,
                 _need(spec, config))
    _check_members(sorted(out), spec, config, site, evidence.action)
    return out


def _check_parts(spec: JobSpec, index: int, parts: list[tuple[str, int, str]],
                 state: SiteModelState, need: int) -> None:
    """The buffered-round rules over (site, slot it was computed for, model digest) of each
    contribution to aggregate ``index``, whoever reports them (the signed updates in plain
    mode, the key authority's signed attestation in a Paillier job)."""
    for name, slot, model in parts:
        try:
            staleness_of(spec, index, slot)
        except PayloadError as exc:
            raise AggregateRefused(f"the contribution of {name!r}: {exc}") from None
        if slot <= state.used.get(name, 0):
            raise AggregateRefused(f"the update of {name!r} for aggregate {slot} was "
                                   "already applied, or is older than one that was")
        if model != state.model_before(slot):
            raise AggregateRefused(f"the contribution of {name!r} was computed from another "
                                   f"model than this site held before aggregate {slot}")
    fresh = sum(slot == index for _, slot, _ in parts)
    if fresh < need:
        raise AggregateRefused(f"the aggregate holds {fresh} updates of this round, the job "
                               f"needs at least {need} (stale ones only add to them)")


def _need(spec: JobSpec, config: dict[str, Any]) -> int:
    """Sites an aggregate must hold: the federation's floor binds the secure modes (plain
    mode shows each update anyway)."""
    floor = int(config.get("min_sites", 1)) if spec.aggregation != "plain" else 1
    return max(spec.min_sites, floor)


def _check_members(contributors: list[str], spec: JobSpec, config: dict[str, Any],
                   site: str, action: str) -> None:
    need = _need(spec, config)
    if len(contributors) < need:
        raise AggregateRefused(f"the aggregate holds {len(contributors)} sites, the job needs "
                               f"at least {need}")
    if site not in contributors and not may_leave_out(spec, action):
        raise AggregateRefused(f"the aggregate leaves out this site ({site!r}); only a plain "
                               "job that calls a fraction of the sites or skips slow ones may")


def may_leave_out(spec: JobSpec, action: str = "fit") -> bool:
    """Whether a site may apply an aggregate it is not in, to catch up after a round it was
    not selected for or too slow for: only in plain mode, where every update is seen anyway,
    and only for a job whose approved spec asks for it (``fraction`` < 1 or a
    ``round_timeout``). In a secure mode a site that could leave and rejoin would let two
    sums differ by its update alone (one round with it, the next without), so there a site
    left out stays out — except in a buffered secure job, whose every sum is by design
    whoever answered first: there each update is in one sum only (the key authority
    decrypts each once; a secure-sum site masks its late update again only while no
    aggregate holds it), with at least ``min_sites`` updates of the round (README: what
    that leaves)."""
    if spec.async_k is not None and action == "fit":  # a buffer: whoever answered first
        return True
    return spec.aggregation == "plain" and (spec.fraction < 1.0 or
                                            spec.round_timeout is not None)


def plain_sum(directory: Path, site: str, spec: JobSpec, evidence: AggregateEvidence,
              state: SiteModelState) -> np.ndarray:
    """The sum of every member's signed vector, formed by this site itself (a buffered
    round: stale updates down-weighted, each member's slot recorded in ``state.used``)."""
    config = federation_config(directory)
    staleness: dict[str, int] = {}
    if spec.async_k is not None and evidence.action == "fit":
        contributions = check_buffered(config, spec, evidence, site, state)
        index = aggregate_index(spec, evidence.action, evidence.round)
        staleness = staleness_in(spec, evidence.action, index,
                                 {name: c.round for name, c in contributions.items()})
    else:
        contributions = check_contributions(config, spec, evidence, site, state.digest)
    length = vector_length(spec, evidence.action)
    vectors = {}
    for sender, c in contributions.items():
        try:  # a member's vector must be well formed (e.g. trees), checked before any use
            vectors[sender] = contribution_vector(spec, evidence.action, c.payload, length)
            rules_for(spec).check_contribution(spec, evidence.action, vectors[sender])
            if evidence.action == "fit":
                _check_rows(vectors[sender][-1])
        except PayloadError as exc:
            raise AggregateRefused(f"the signed contribution of {sender!r} holds no valid "
                                   f"vector: {exc}") from None
    summed = combine(evidence.action, vectors, spec, staleness)
    if staleness:
        state.used.update({name: c.round for name, c in contributions.items()})
    return summed


def _check_rows(n: float) -> None:
    """A training update's row count is a whole number of rows, at least 1 (1 under DP):
    a negative or fractional count could cancel the others' and blow the mean up."""
    if not (np.isfinite(n) and n >= 1 and float(n).is_integer()):
        raise PayloadError(f"its row count {n!r} is not a whole number of rows")


def authority_sum(directory: Path, site: str, spec: JobSpec, evidence: AggregateEvidence,
                  state: SiteModelState) -> np.ndarray:
    """The key authority's decrypted sum, accepted only with its valid signature (a
    buffered round: with each contribution's slot and model attested and checked here as
    in plain mode, each member's slot recorded in ``state.used``)."""
    model = state.digest
    config = federation_config(directory)
    key = config.get("authority_signing_key")
    if not key:
        raise CallRefused("site has no key authority signing key in its federation config")
    if evidence.sum is None or evidence.attestation is None:
        raise AggregateRefused("a Paillier aggregate needs the sum and the authority's signature")
    try:
        attested = signing.SignedAggregate.from_str(evidence.attestation)
        attested.verify(key, evidence.sum)
    except (signing.ContributionFormatError, signing.SignatureError):
        raise AggregateRefused("the aggregate is not signed by the federation's key authority"
                               ) from None
    index = aggregate_index(spec, evidence.action, evidence.round)
    if attested.job_id != spec.job_id or attested.round != index:
        raise AggregateRefused(f"the signed aggregate is job {attested.job_id!r} aggregate "
                               f"{attested.round}, not job {spec.job_id!r} aggregate {index}")
    if attested.model != model:
        raise AggregateRefused("the signed aggregate was computed from another model than "
                               "this site's")
    strangers = sorted(set(attested.contributors) - set(config["sites"]))
    if strangers:
        raise AggregateRefused(f"the signed aggregate lists non-members {strangers}")
    buffered = spec.async_k is not None and evidence.action == "fit"
    parts = [tuple(p) for p in attested.parts]
    if buffered and sorted(p[0] for p in parts) != sorted(attested.contributors):
        raise AggregateRefused("the signed buffered aggregate does not attest each "
                               "contributor's round and model once")
    if not buffered and parts:
        raise AggregateRefused("the signed aggregate mixes rounds, which this job does not")
    if buffered:
        _check_parts(spec, index, parts, state, _need(spec, config))  # type: ignore[arg-type]
    _check_members(list(attested.contributors), spec, config, site, evidence.action)
    try:
        summed = decode_array(evidence.sum, vector_length(spec, evidence.action))
    except PayloadError as exc:
        raise AggregateRefused(f"the signed sum is not a valid vector: {exc}") from None
    if buffered:
        state.used.update({name: slot for name, slot, _ in parts})  # type: ignore[misc]
    return summed
