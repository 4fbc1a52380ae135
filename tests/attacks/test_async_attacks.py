"""A malicious data scientist (and a colluding member site) against buffered rounds (FedBuff).

In a job with ``JobSpec.async_k`` a training aggregate may hold updates computed for
earlier slots. A site applies such a stale update only if it was computed from the model
*that site* held right before the update's slot (``SiteModelState.model_before``), at most
``max_staleness`` rounds old, and only if the member's slot is past the last one it applied
from that member (``SiteModelState.used``, kept in the model-state file with ``past``); the
staleness weight ``(1 + staleness)^-½`` comes from the signed slot and the site's own
position (:mod:`datasites.runtime.aggregate_check`, :mod:`fed_tasks.buffered`).

Each test plays one attack against the real site code: in-process
:func:`datasites.runtime.direct.direct_federation` sites answering through the production
entry point ``run_approved``, with their real signing keys. "Stale" updates are simply the
signed replies of earlier calls, relayed later, which is all a slow site's update is. The
scientist forms every aggregate here itself (it controls every message), with the helpers
of ``tests/attacks/test_catch_up_attacks.py``.

A test that passes documents a defence that holds. Two attacks here first succeeded and
were then fixed: a member's signed Deep SVDD centre read as its training update (a stale
contribution must now be for a training slot), and one site kept training on a fork of its
own, padded with other members' stale updates (an aggregate now needs ``min_sites`` updates
of its very round).
"""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from datasites.governance.guard import SiteGuard, register_guard
from datasites.runtime.direct import direct_federation
from datasites.runtime.site_entry import run_approved
from fed_tasks.aggregation import PlainSum
from fed_tasks.codec import decode_array, dumps, encode_array, loads
from fed_tasks.compression import decode
from fed_tasks.interface import SiteRefusedError
from fed_tasks.schedule import combine
from fed_tasks.site_state import SiteModelState, aggregate_index
from fed_tasks.site_step import initial_weights, vector_length
from fed_tasks.spec import JobSpec
from privacy.signing import SignedContribution


# ---------------------------------------------------------------------------- helpers
# (the helpers of tests/attacks/test_catch_up_attacks.py, with a buffered job's spec)
def _spec(schema, **kw) -> JobSpec:
    """A small, fast, buffered autoencoder job: aggregates once 2 updates are in, an update
    may be at most 3 rounds stale."""
    base = {"features": schema.features, "label_column": schema.label, "hidden": (8, 4),
            "batch_size": 4096, "trim": 0.0, "local_epochs": 1, "min_local_steps": 5,
            "rounds": 6, "min_sites": 2, "seed": 5, "async_k": 2, "max_staleness": 3}
    return JobSpec(**(base | kw))


def _statistics(spec: JobSpec, sites: list) -> dict[str, Any]:
    """Every site's statistics summed in plain mode: the evidence of aggregate 0."""
    agg = PlainSum(spec.min_sites, spec)
    agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
    return agg.evidence()


def _plain_evidence(action: str, rnd: int, replies: list[dict[str, Any]]) -> dict[str, Any]:
    """A plain aggregate's evidence over exactly these replies (the scientist's choice)."""
    return {"kind": "plain", "action": action, "round": rnd,
            "contributions": [r["contribution"] for r in replies], "heads": []}


def _used(site, spec: JobSpec, action: str = "fit") -> int:
    return int(site.guard.approval(spec.job_id)["used"][action])


def _state(site, spec: JobSpec) -> SiteModelState:
    return SiteModelState.load(spec, initial_weights(spec),
                               site.guard.directory / f"model_{spec.job_id}.json")


def _close(*groups) -> None:
    for group in groups:
        for s in group:
            s.close()


def _fit(site, rnd: int, previous: dict[str, Any] | None = None,
         catch_up: list[dict[str, Any]] | None = None) -> dict[str, Any]:
    message: dict[str, Any] = {"round": rnd}
    if previous is not None:
        message["previous"] = previous
    if catch_up:
        message["catch_up"] = catch_up
    return site.call("fit", message)


def _slot(reply: dict[str, Any]) -> int:
    return SignedContribution.from_str(reply["contribution"]).round


def _restart(site) -> None:
    """The site process stops and starts again on its directory: a new guard (approvals,
    audit log, privacy ledger) read back from disk; the model state is read per call."""
    site.close()
    site.guard.audit.close()
    site.guard = SiteGuard(site.name, site.guard.directory)
    register_guard(site.guard)


def _refused_uncounted(site, spec: JobSpec, match: str, rnd: int, previous=None,
                       catch_up=None) -> None:
    """The call is refused with a reason matching ``match``, before anything is counted."""
    before = _used(site, spec)
    with pytest.raises(SiteRefusedError, match=match):
        _fit(site, rnd, previous, catch_up)
    assert _used(site, spec) == before


def _round_one(spec: JobSpec, sites: list) -> tuple[dict, list[dict], dict]:
    """Statistics from all; every site computes round 1 from aggregate 0; aggregate 1 holds
    the first two sites' updates only (the other two are "slow"): (ev0, replies, agg1)."""
    ev0 = _statistics(spec, sites)
    r1 = [_fit(s, 1, ev0) for s in sites]
    return ev0, r1, _plain_evidence("fit", 1, r1[:2])


# ------------------------------------------- (1) a stale update counts once, everywhere
def test_a_stale_update_counts_once_even_across_a_restart_and_a_catch_up(
        tmp_path, schema, four_sites):
    """Attack: a slow site's update (inst-2's, for slot 1) legitimately joins aggregate 2;
    relay it again in aggregate 3 so that it counts twice, at a site that applied aggregate 2
    and was then restarted (``used`` must come back from the model-state file), and at a
    site that catches up on aggregates 2 and 3 in one call (``used`` must bind between two
    catch-up entries). Also relay inst-3's slot-1 update after its slot-2 update was applied
    (older than one applied). Defence: a member's applied slots strictly increase at every
    site; each refusal is uncounted and leaves the model where it was."""
    spec = _spec(schema)
    sites = direct_federation(tmp_path, spec, four_sites)
    a, b, c, d = sites
    try:
        ev0, (a1, b1, c1, d1), agg1 = _round_one(spec, sites)
        a2, b2, d2 = (_fit(s, 2, agg1) for s in (a, b, d))
        agg2 = _plain_evidence("fit", 2, [a2, b2, c1])  # c1: one round stale, from model 0
        a3, b3 = _fit(a, 3, agg2), _fit(b, 3, agg2)
        assert _state(a, spec).used == {"inst-0": 2, "inst-1": 2, "inst-2": 1}
        twice = _plain_evidence("fit", 3, [a3, b3, c1])
        _refused_uncounted(a, spec, "already applied", 4, twice)
        agg3 = _plain_evidence("fit", 3, [a3, b3, d2])  # d2: one round stale
        a4 = _fit(a, 4, agg3)
        older = _plain_evidence("fit", 4, [a4, d1])  # d1 (slot 1) after d2 (slot 2)
        _refused_uncounted(a, spec, "older than one that was", 5, older)

        # a restart: the guard and the model state are read back from the site directory
        _restart(a)
        saved = json.loads((a.guard.directory / f"model_{spec.job_id}.json").read_text())
        assert saved["used"] == {"inst-0": 3, "inst-1": 3, "inst-2": 1, "inst-3": 2}
        assert {int(k) for k in saved["past"]} >= {0, 1, 2, 3}
        for replayed in (c1, d1, d2, b3):
            _refused_uncounted(a, spec, "already applied", 5,
                               _plain_evidence("fit", 4, [a4, replayed]))
        assert _state(a, spec).applied == 3

        # a catch-up of two missed aggregates, the second relaying c1 again: d applied
        # aggregate 1 only (it computed slot 2 from it)
        assert _state(d, spec).applied == 1
        _refused_uncounted(d, spec, "already applied", 4, twice, catch_up=[agg2])
        state_d = _state(d, spec)  # aggregate 2 verified and kept; the forged 3 not applied
        assert state_d.applied == 2 and state_d.used["inst-2"] == 1
        # the same update twice in one aggregate: refused as a double contribution
        _refused_uncounted(d, spec, "contributes twice", 4,
                           _plain_evidence("fit", 3, [a3, c1, c1]))
        _fit(d, 4, agg3)  # the honest aggregate 3 goes through, and both models agree
        assert _state(d, spec).digest == _state(a, spec).digest
    finally:
        _close(sites)


# ------------------------- (1) a stale update only from a model the checking site held
def test_a_stale_update_must_come_from_a_model_the_checking_site_held(
        tmp_path, schema, four_sites):
    """Attack: relay to inst-0 (a) a stale update computed from a model inst-0 never held
    (inst-2 was shown a different aggregate 1 and trained on it), (b) one more than
    ``max_staleness`` rounds old, (c) one computed for a later slot than the aggregate's.
    Defence: each is refused by name, uncounted; inst-0's model does not move."""
    spec = _spec(schema, max_staleness=1)
    sites = direct_federation(tmp_path, spec, four_sites)
    a, b, c, d = sites
    try:
        ev0, (a1, b1, c1, d1), agg1 = _round_one(spec, sites)
        fork1 = _plain_evidence("fit", 1, [c1, d1])  # valid: two members, one model, signed
        c2_fork = _fit(c, 2, fork1)
        a2, b2 = _fit(a, 2, agg1), _fit(b, 2, agg1)
        # (a) slot 2 from the fork's model: not what inst-0 held before aggregate 2
        _refused_uncounted(a, spec, "another model than this site held before aggregate 2",
                           3, _plain_evidence("fit", 2, [a2, b2, c2_fork]))
        agg2 = _plain_evidence("fit", 2, [a2, b2])
        a3, b3 = _fit(a, 3, agg2), _fit(b, 3, agg2)
        _refused_uncounted(a, spec, "another model than this site held before aggregate 2",
                           4, _plain_evidence("fit", 3, [a3, b3, c2_fork]))
        # (b) d1 is two rounds stale in aggregate 3; the job allows one
        _refused_uncounted(a, spec, "at most 1 rounds stale", 4,
                           _plain_evidence("fit", 3, [a3, b3, d1]))
        # (c) an update for slot 3 in the aggregate of slot 2, at a site still holding 1
        d2 = _fit(d, 2, agg1)
        _refused_uncounted(d, spec, "cannot join aggregate 2", 3,
                           _plain_evidence("fit", 2, [a3, b2, d2]))
        assert _state(a, spec).applied == 2 and _state(d, spec).applied == 1
    finally:
        _close(sites)


# ---------------------------------------- (2) sites shown different buffers never mix
def test_sites_shown_different_buffers_are_never_summed_together(tmp_path, schema, four_sites):
    """Attack: show inst-0/inst-1 aggregate 1 = {inst-0, inst-1} and inst-2/inst-3 the
    equally valid {inst-2, inst-3}, then, at the next aggregate (and, as a stale update, at
    the one after), mix updates computed on the two histories, or move a forked site back
    onto the other history. Defence: every update is bound to the digest of the model it was
    computed from; each site refuses an update computed from any model it did not hold
    itself, fresh or stale, on both sides of the fork."""
    spec = _spec(schema)
    sites = direct_federation(tmp_path, spec, four_sites)
    a, b, c, d = sites
    try:
        ev0, (a1, b1, c1, d1), agg1 = _round_one(spec, sites)
        fork1 = _plain_evidence("fit", 1, [c1, d1])
        a2, b2 = _fit(a, 2, agg1), _fit(b, 2, agg1)
        c2, d2 = _fit(c, 2, fork1), _fit(d, 2, fork1)
        assert _state(a, spec).digest != _state(c, spec).digest
        mixed = _plain_evidence("fit", 2, [a2, b2, c2, d2])
        for s in sites:  # the next aggregate: every site, on either side, refuses the mix
            _refused_uncounted(s, spec, "another model than this site held before "
                               "aggregate 2", 3, mixed)
        # each side's own aggregate 2 goes through; a fork's update is no more welcome later,
        # as a stale update in aggregate 3
        main2, side2 = (_plain_evidence("fit", 2, [a2, b2]),
                        _plain_evidence("fit", 2, [c2, d2]))
        a3, b3 = _fit(a, 3, main2), _fit(b, 3, main2)
        c3 = _fit(c, 3, side2)
        _refused_uncounted(a, spec, "another model", 4, _plain_evidence("fit", 3, [a3, b3, c2]))
        _refused_uncounted(c, spec, "another model", 4, _plain_evidence("fit", 3, [c3, a2]))
        # nor can the forked site be moved back onto the main history
        _refused_uncounted(d, spec, "another model", 4, _plain_evidence("fit", 3, [a3, b3]),
                           catch_up=[main2])
        assert _state(d, spec).applied == 1
    finally:
        _close(sites)


def test_one_forked_site_is_not_kept_going_on_stale_padding(tmp_path, schema, four_sites):
    """Attack: show inst-2 alone a different aggregate 1 ({inst-2, inst-0}), then give it
    aggregates that each hold only its own fresh update and one pre-fork update of another
    member (computed from model 0, which every site held, and never applied at inst-2).
    In a synchronous job the fork dies at the next aggregate: it would need an update of
    another site computed from inst-2's forked model. Expected defence: inst-2 refuses an
    aggregate in which it is the only member on its own history."""
    spec = _spec(schema)
    sites = direct_federation(tmp_path, spec, four_sites)
    a, b, c, d = sites
    try:
        ev0, (a1, b1, c1, d1), agg1 = _round_one(spec, sites)
        alone1 = _plain_evidence("fit", 1, [a1, c1])  # nobody else holds this aggregate 1
        c2 = _fit(c, 2, alone1)
        padded2 = _plain_evidence("fit", 2, [b1, c2])  # b1: pre-fork, one round stale
        refused = []
        try:
            c3 = _fit(c, 3, padded2)
        except SiteRefusedError as exc:
            refused.append(str(exc))
        else:  # and once more: d1, two rounds stale, pads aggregate 3
            _fit(c, 4, _plain_evidence("fit", 3, [c3, d1]))
        assert refused, (f"inst-2 trained alone on its fork up to aggregate "
                         f"{_state(c, spec).applied}: its fit calls {_used(c, spec)}")
    finally:
        _close(sites)


# --------------------------- (3) no slot twice, no unverified model, no recycled reply
def test_a_buffered_job_computes_each_slot_once_from_a_verified_model(
        tmp_path, schema, four_sites):
    """Attack: inst-2's slot-1 update was left out of aggregate 1; ask it for slot 1 again
    (with and without aggregate 1) to get a second update for that slot, after slot 2 ask
    for slot 1 once more, make it compute from an aggregate it cannot verify (a tampered
    vector, a relabelled slot) or from one it does not hold next, and replay inst-0's own
    old reply (and its statistics reply) as a new contribution to a later aggregate.
    Defence: a retry gets the very same bytes, uncounted; an earlier slot is out of order;
    a tampered or relabelled contribution is not signed; a replayed reply was already
    applied. Nothing is counted twice."""
    spec = _spec(schema)
    sites = direct_federation(tmp_path, spec, four_sites)
    a, b, c, d = sites
    try:
        agg = PlainSum(spec.min_sites, spec)
        agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
        ev0 = agg.evidence()
        stats_reply_a = next(x for x in ev0["contributions"]
                             if SignedContribution.from_str(x).site_id == "inst-0")
        r1 = [_fit(s, 1, ev0) for s in sites]
        a1, b1, c1, d1 = r1
        agg1 = _plain_evidence("fit", 1, [a1, b1])
        assert _used(c, spec) == 1
        for previous in (ev0, agg1):  # the retry check comes first: the same reply
            assert _fit(c, 1, previous) == c1
        assert _used(c, spec) == 1 and _state(c, spec).applied == 0
        c2 = _fit(c, 2, agg1)
        assert _slot(c2) == 2 and _used(c, spec) == 2
        _refused_uncounted(c, spec, "out of order", 1, agg1)
        _refused_uncounted(c, spec, "out of order", 1, ev0)

        # an aggregate inst-0 cannot verify: a tampered vector, a relabelled slot
        a2, b2 = _fit(a, 2, agg1), _fit(b, 2, agg1)
        cc = SignedContribution.from_str(c1["contribution"])
        vec = decode_array(cc.payload)
        tampered = SignedContribution(cc.site_id, cc.job_id, cc.round,
                                      encode_array(vec * 10.0), cc.signature, cc.model)
        fresher = SignedContribution(cc.site_id, cc.job_id, 2, cc.payload, cc.signature,
                                     cc.model)  # "fresh": no staleness discount
        for forged in (tampered, fresher):
            _refused_uncounted(a, spec, "not signed by it", 3,
                               _plain_evidence("fit", 2, [a2, b2, {"contribution":
                                                                    forged.to_str()}]))
        # an aggregate it does not hold next: aggregate 2 to a site holding model 0
        agg2 = _plain_evidence("fit", 2, [a2, b2, c1])
        _refused_uncounted(d, spec, "not the next one", 3, agg2)
        assert _state(a, spec).applied == 1 and _state(d, spec).applied == 0

        # inst-0's own old replies as new contributions: slot 1 (applied), statistics
        a3 = _fit(a, 3, agg2)
        for old in (a1, {"contribution": stats_reply_a}):  # (or, the statistics: not a
            _refused_uncounted(a, spec, "already applied|not a training", 4,  # training slot)
                               _plain_evidence("fit", 3, [old, d1]))
        # and the exact retry of slot 3 is the same bytes, whatever evidence it carries
        assert _fit(a, 3, _plain_evidence("fit", 2, [a2, b2])) == a3
        assert _used(a, spec) == 3 and _state(a, spec).applied == 2
    finally:
        _close(sites)


def test_a_contribution_of_another_phase_never_joins_a_training_buffer(
        tmp_path, schema, four_sites):
    """Attack (Deep SVDD: statistics slot 0, center slot 1, training from slot 2): relay a
    site's signed *center* contribution (slot 1, computed from model 0 like any slot-1
    update) or its statistics contribution (slot 0) as a stale update in training aggregate
    2. The signature has no action: only the slot and the vector's length tell them apart.
    Defence: the statistics slot is below every member's first training slot; the center
    vector has another length than a training update and is refused by name."""
    spec = _spec(schema, model="deepsvdd", rounds=2)
    assert aggregate_index(spec, "center", 1) == 1 and aggregate_index(spec, "fit", 1) == 2
    sites = direct_federation(tmp_path, spec, dict(list(four_sites.items())[:3]))
    a, b, c = sites
    try:
        ev0 = _statistics(spec, sites)
        centers = [s.call("center", {"round": 1, "previous": ev0}) for s in sites]
        ev1 = _plain_evidence("center", 1, centers)
        f1 = [_fit(s, 1, ev1) for s in sites]
        stats_c = next(x for x in ev0["contributions"]
                       if SignedContribution.from_str(x).site_id == "inst-2")
        for stale, why in ((centers[2], "holds no valid vector|not a training"),
                           ({"contribution": stats_c}, "already applied|not a training")):
            _refused_uncounted(a, spec, why, 2, _plain_evidence("fit", 1, [f1[0], f1[1],
                                                                             stale]))
        _fit(a, 2, _plain_evidence("fit", 1, f1))  # the honest training aggregate
        assert _state(a, spec).applied == 2
    finally:
        _close(sites)


def test_a_center_contribution_is_not_reread_as_a_compressed_training_update(
        tmp_path, schema, four_sites):
    """Attack: Deep SVDD, hidden (1,), latent 7, compress q16: a site's center contribution
    ``[Σφ(x) (7 values), n]`` is 64 bytes, exactly a q16 training update of the 16-weight
    net (16 bytes of n·loss and n, 16 of scale, 2 per weight). With seed 1 every site's
    center decodes, with a positive "row count" and weight changes up to ~1e6. Relay
    inst-2's center contribution (slot 1, from model 0 as any slot-1 update is) as a stale
    update in training aggregate 2: nobody computed that update, and no member colluded.
    Expected defence: the site refuses it as not a training update (the signature carries
    the slot, and slot 1 is the center's)."""
    spec = _spec(schema, model="deepsvdd", hidden=(1,), latent=7, compress="q16", rounds=2,
                 seed=1)
    length = vector_length(spec, "fit")
    sites = direct_federation(tmp_path, spec, dict(list(four_sites.items())[:3]))
    a, b, c = sites
    try:
        ev0 = _statistics(spec, sites)
        centers = [s.call("center", {"round": 1, "previous": ev0}) for s in sites]
        center_c = SignedContribution.from_str(centers[2]["contribution"])
        as_update = decode(spec.compress, center_c.payload, length)  # what a site will read
        assert as_update[-1] > 0 and np.abs(as_update[:-2]).max() > 1e3
        ev1 = _plain_evidence("center", 1, centers)
        f1 = [_fit(s, 1, ev1) for s in sites]
        _fit(b, 2, _plain_evidence("fit", 1, f1))  # inst-1: the honest aggregate 2
        refused = ""
        try:
            _fit(a, 2, _plain_evidence("fit", 1, [f1[0], f1[1], centers[2]]))
        except SiteRefusedError as exc:
            refused = str(exc)
        off = float(np.abs(_state(a, spec).state.weights - _state(b, spec).state.weights).max())
        assert refused, (f"inst-0 applied inst-2's center vector as its training update "
                         f"(aggregate {_state(a, spec).applied}); its weights are up to "
                         f"{off:.3g} away from the honest aggregate's")
    finally:
        _close(sites)


# ------------------------------- (4) async only for averaging strategies, never with DP
@pytest.mark.parametrize("change, why", [
    ({"dp_epsilon": 3.0}, "not available with differential privacy"),
    ({"dp_epsilon": 3.0, "dp_sgd": True}, "not available with differential privacy"),
    ({"strategy": "scaffold"}, "does not average"),
    ({"strategy": "krum"}, "does not average"),
    ({"model": "iforest"}, "has none"),
    ({"model": "auto"}, "has none"),
    ({"fraction": 0.5}, "leave fraction at 1"),
    ({"async_k": 1}, "below min_sites"),
])
def test_a_spec_that_buffers_outside_plain_fedavg_without_dp_is_refused_at_the_site(
        tmp_path, schema, four_sites, change, why):
    """Attack: submit (or hand a site, as the spec string its approved code pins) a
    buffered spec in a secure mode, with DP, with a non-averaging strategy or model, or a
    buffer below min_sites. Defence: the spec does not validate, neither as keyword
    arguments nor as the JSON the site parses in ``run_approved``; the site refuses the
    call before anything is counted."""
    with pytest.raises(ValueError, match=why):
        _spec(schema, **change)
    honest = _spec(schema)
    sites = direct_federation(tmp_path, honest, dict(list(four_sites.items())[:2]))
    try:
        raw = json.loads(honest.to_json()) | change  # the same job id, edited
        with pytest.raises(ValueError, match=why):
            JobSpec.from_json(json.dumps(raw))
        a = sites[0]
        envelope = loads(run_approved(site=a.name, job_id=honest.job_id,
                                      spec=json.dumps(raw), train=a.train, test=a.test,
                                      action="stats", payload=dumps({})))
        assert envelope["status"] != "ok" and why in envelope["reason"]
        assert _used(a, honest, "stats") == 0
    finally:
        _close(sites)


def test_a_synchronous_job_accepts_no_stale_update(tmp_path, schema, four_sites):
    """Attack: a plain job approved *without* ``async_k`` (but allowed to catch up, with a
    round timeout): relay a slow site's slot-1 update in aggregate 2, as the buffered
    orchestrator would. Defence: the site applies buffered rules only for a job whose
    approved spec asks for them; here each update must be for this very aggregate."""
    spec = _spec(schema, async_k=None, round_timeout=30.0)
    sites = direct_federation(tmp_path, spec, four_sites)
    a, b, c, d = sites
    try:
        ev0, (a1, b1, c1, d1), agg1 = _round_one(spec, sites)
        a2, b2 = _fit(a, 2, agg1), _fit(b, 2, agg1)
        _refused_uncounted(a, spec, "aggregate 1, not job .* aggregate 2", 3,
                           _plain_evidence("fit", 2, [a2, b2, c1]))
        assert _state(a, spec).used == {} and _state(a, spec).past == {}
    finally:
        _close(sites)


# ----------------------------------------- (5) the staleness weight is the signed slot's
def test_the_staleness_weight_follows_the_signed_slot_and_nothing_else(
        tmp_path, schema, four_sites):
    """Attack: change the weight a stale update gets: relabel its slot (to count it fresh),
    add a ``staleness`` of the scientist's choice to the evidence, or present the buffer as
    a later aggregate (to discount an honest site's update more). Defence: the slot is
    signed, the evidence has no room for a weight, and the aggregate's slot must be the
    next one the site holds; two sites applying the same buffer form exactly the weighted
    sum ``(1 + 1)^-½`` of the one-round-stale update, and the same model."""
    spec = _spec(schema)
    sites = direct_federation(tmp_path, spec, four_sites)
    a, b, c, d = sites
    try:
        ev0, (a1, b1, c1, d1), agg1 = _round_one(spec, sites)
        a2, b2 = _fit(a, 2, agg1), _fit(b, 2, agg1)
        agg2 = _plain_evidence("fit", 2, [a2, b2, c1])
        before = _state(a, spec), _state(a, spec)  # two copies of the model after 1
        # a weight of the scientist's choice: the evidence has no such field
        with pytest.raises(SiteRefusedError, match="[Ee]xtra inputs"):
            _fit(a, 3, {**agg2, "staleness": {"inst-2": 0}})
        # the buffer presented as aggregate 3: inst-0 holds aggregate 1
        _refused_uncounted(a, spec, "not the next one", 4, {**agg2, "round": 3})
        a3, b3 = _fit(a, 3, agg2), _fit(b, 3, agg2)
        length = vector_length(spec, "fit")
        vectors = {p.site_id: decode_array(p.payload, length) for p in
                   (SignedContribution.from_str(x) for x in agg2["contributions"])}
        weighted = combine("fit", vectors, spec, {"inst-2": 1})
        unweighted = combine("fit", vectors, spec)
        assert not np.allclose(weighted, unweighted)
        before[0].apply("fit", 2, weighted)
        before[1].apply("fit", 2, unweighted)
        after_a, after_b = _state(a, spec), _state(b, spec)
        assert after_a.digest == after_b.digest == before[0].digest != before[1].digest
        assert np.array_equal(after_a.state.weights, before[0].state.weights)
        assert _slot(a3) == _slot(b3) == 3
    finally:
        _close(sites)


# ------------------------------------------------ (6) a buffered sum in a Paillier job
def test_the_authority_decrypts_each_buffered_update_once_and_only_beside_fresh_ones(
        tmp_path, schema, four_sites):
    """Attack (paillier, --async 2): the buffer is one sum the key authority forms, weighing
    each stale ciphertext itself. Hold inst-2's round-1 update back and put it, stale, in
    round 2's sum (allowed, and every site, inst-2 catching up, accepts the attested parts);
    then put the same ciphertext into round 3's sum too, to difference two sums that share
    it; then form round 3 from one fresh update padded with a stale one. Defence: the
    authority decrypts each (site, slot) once and only with min_sites updates of the round
    itself, refusing before it spends the round; the honest round 3 then goes through."""
    from datasites.runtime.direct import direct_paillier_federation
    from fed_tasks.aggregation import KeyAuthoritySum

    spec = _spec(schema, aggregation="paillier", rounds=6)  # refused calls count too
    sites, authority, _ = direct_paillier_federation(tmp_path, spec,
                                                     dict(list(four_sites.items())[:3]))
    a, b, c = sites
    length = vector_length(spec, "fit")
    try:
        agg = KeyAuthoritySum(authority)
        agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
        ev0 = agg.evidence()

        def fit(site, rnd, previous, catch_up=()):
            message = {"round": rnd, "previous": previous, "catch_up": list(catch_up)}
            return site.call("fit", message)["contribution"]

        def decrypt(rnd, contributions):
            out = authority.call("decrypt", {"action": "fit", "round": rnd, "length": length,
                                             "contributions": contributions})
            return {"kind": "paillier", "action": "fit", "round": rnd, "sum": out["sum"],
                    "attestation": out["attestation"], "heads": []}

        r1 = {s.name: fit(s, 1, ev0) for s in sites}
        ev1 = decrypt(1, [r1["inst-0"], r1["inst-1"]])  # inst-2's update held back
        ev2 = decrypt(2, [fit(a, 2, ev1), fit(b, 2, ev1), r1["inst-2"]])  # ... used, stale
        r3 = {"inst-0": fit(a, 3, ev2), "inst-1": fit(b, 3, ev2),
              "inst-2": fit(c, 3, ev2, catch_up=[ev1])}  # inst-2 checks both, catches up
        with pytest.raises(SiteRefusedError, match="already decrypted"):
            decrypt(3, [r3["inst-0"], r3["inst-1"], r1["inst-2"]])
        with pytest.raises(SiteRefusedError, match="only 1 update"):
            decrypt(3, [r3["inst-0"], r1["inst-1"]])
        ev3 = decrypt(3, [r3["inst-0"], r3["inst-2"]])  # the round was not spent by either
        for s in sites:
            fit(s, 4, ev3)
        assert len({_state(s, spec).digest for s in sites}) == 1
    finally:
        _close([*sites, authority])


def test_two_decryptions_in_flight_never_spend_one_round_twice(tmp_path, schema, four_sites,
                                                                monkeypatch):
    """Attack: send the key authority two decrypt calls for the same round at once, one sum
    with a held-back update and one without it, timed so that both pass the spent check
    before either records the round: their difference would be that site's update.
    Defence: the authority decrypts one sum of a job at a time, its spent store read and
    written under a file lock; the second call finds the round spent."""
    import threading

    from datasites.runtime.direct import direct_paillier_federation
    from fed_tasks.aggregation import KeyAuthoritySum
    from privacy.key_authority import KeyAuthority

    spec = _spec(schema, aggregation="paillier", async_k=None, rounds=3)
    sites, authority, _ = direct_paillier_federation(tmp_path, spec,
                                                     dict(list(four_sites.items())[:3]))
    try:
        agg = KeyAuthoritySum(authority)
        agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
        r1 = [s.call("fit", {"round": 1, "previous": agg.evidence()})["contribution"]
              for s in sites]
        both_inside = threading.Barrier(2)
        parse = KeyAuthority._parse_payloads

        def wait_for_the_other(self, *args, **kwargs):  # widen the window to certainty
            try:
                both_inside.wait(timeout=3)
            except threading.BrokenBarrierError:
                pass  # the other call is held outside: the lock works
            return parse(self, *args, **kwargs)

        monkeypatch.setattr(KeyAuthority, "_parse_payloads", wait_for_the_other)
        out: dict[str, Any] = {}

        def decrypt(name: str, contributions: list[str]) -> None:
            try:
                out[name] = authority.call("decrypt", {"action": "fit", "round": 1,
                                                       "contributions": contributions})
            except SiteRefusedError as exc:
                out[name] = exc

        calls = [threading.Thread(target=decrypt, args=("all", r1)),
                 threading.Thread(target=decrypt, args=("two", r1[:2]))]
        for t in calls:
            t.start()
        for t in calls:
            t.join(60)
        refused = [v for v in out.values() if isinstance(v, SiteRefusedError)]
        assert len(out) == 2 and len(refused) == 1, out  # one sum decrypted, never two
        assert "already decrypted" in str(refused[0])
    finally:
        _close([*sites, authority])
