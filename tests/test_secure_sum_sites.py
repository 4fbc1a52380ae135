"""The secure sum through the real site code: masking, dropouts, what the orchestrator sees.

The 4-site dropout tests run the sites' real entry point (guard, approval, fed_tasks step,
masking with state kept in the site directory) in-process without syft transport, so that a
fourth site costs nothing; the 3-site dropout test goes through real PySyft datasites.
"""

from __future__ import annotations

import numpy as np
import pytest

from datasites.runtime.direct import direct_federation
from fed_tasks.aggregation import MaskedSum, PlainSum, TooFewSitesError
from fed_tasks.encoding import codec_for, secagg_plan
from fed_tasks.interface import SiteRefusedError
from fed_tasks.local import LocalSite
from fed_tasks.site_step import vector_length
from fed_tasks.spec import JobSpec
from privacy.secagg_session import SessionMaskedInput
from privacy.signing import SignedContribution


@pytest.fixture()
def four_sites(tmp_path, shuttle_small, schema):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=2,
                   aggregation="secagg")
    shuffled = shuttle_small.sample(frac=1.0, random_state=5)
    frames = {f"edge-{i}": (shuffled.iloc[i::4].iloc[:-60].reset_index(drop=True),
                            shuffled.iloc[i::4].iloc[-60:].reset_index(drop=True))
              for i in range(4)}
    sites = direct_federation(tmp_path, spec, frames)
    yield spec, sites
    for s in sites:
        s.close()


def _plain_round_one(spec, frames, survivors):
    """Round 1's plain sum over ``survivors``, after the statistics of every site in
    ``frames`` (name -> (train, test)), by in-memory sites."""
    local = [LocalSite(name, spec, tr, te) for name, (tr, te) in frames.items()]
    agg = PlainSum()
    agg.submit(local, "stats", {}, vector_length(spec, "stats"))
    total, _ = agg.sum([s for s in local if s.name in survivors], "fit",
                       {"round": 1, "previous": agg.evidence()}, vector_length(spec, "fit"))
    return total


def _round_one(agg):
    return {"round": 1, "previous": agg.evidence()}


def test_dropout_after_key_sharing_sums_the_survivors(four_sites):
    spec, sites = four_sites
    agg = MaskedSum(spec, n_sites=4)
    agg.submit(sites, "stats", {}, vector_length(spec, "stats"))  # keys shared
    sites[2].offline = True  # stops answering after key sharing
    agg.submit(sites, "fit", _round_one(agg), vector_length(spec, "fit"))
    (got,) = agg.finish(sites)
    want = _plain_round_one(spec, {s.name: (s.train, s.test) for s in sites},
                            [s.name for s in sites if not s.offline])
    assert got.action == "fit" and got.round == 1
    assert np.max(np.abs(got.vector - want)) <= codec_for(spec, "fit").max_abs_error(3)
    assert "edge-2" in agg.dropped and agg.server.dropped == {"edge-2": 2}


def test_more_dropouts_than_tolerated_is_a_clear_error(four_sites):
    spec, sites = four_sites
    agg = MaskedSum(spec, n_sites=4)
    assert secagg_plan(spec, 4)["threshold"] == 3
    agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
    sites[0].offline = sites[3].offline = True
    with pytest.raises(TooFewSitesError, match="threshold is 3"):
        agg.submit(sites, "fit", _round_one(agg), vector_length(spec, "fit"))
    # the statistics the two survivors opened before the round failed are still released
    assert [r.action for r in agg.finish(sites)] == ["stats"]


def test_orchestrator_sees_masked_vectors_only(four_sites):
    spec, sites = four_sites
    agg = MaskedSum(spec, n_sites=4)
    agg._setup(sites)
    inbox = agg.server.inbox(sites[0].name).to_str()
    reply = sites[0].call("stats", {"inbox": inbox})
    assert set(reply) == {"masked", "opened", "clipped", "audit_head"} and reply["opened"] is None
    masked = SessionMaskedInput.from_str(SignedContribution.from_str(reply["masked"]).payload
                                         ).values()
    plain = LocalSite("x", spec, sites[0].train, sites[0].test).call("stats", {})
    from fed_tasks.codec import decode_array

    encoded = np.asarray(codec_for(spec, "stats").encode(decode_array(
        SignedContribution.from_str(plain["contribution"]).payload,
        vector_length(spec, "stats"))), dtype=np.uint64)
    n = encoded.size
    assert np.mean(masked[:n] == encoded) < 0.01  # the statistics are not visible
    # the masked vector looks uniform over the modulus, unlike the encoded one
    bits = secagg_plan(spec, 4)["bits"]
    assert masked.max() > 2 ** (bits - 2) and np.std(masked / 2.0**bits) > 0.2


def test_site_refuses_to_open_a_sum_of_fewer_sites_than_the_threshold(four_sites):
    """The orchestrator relays the signed masked statistics of only one or two sites as the
    round's 'sum' (the others declared dropped without a recovery): the site refuses, and
    nothing is counted."""
    spec, sites = four_sites
    agg = MaskedSum(spec, n_sites=4)
    agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
    genuine = agg.evidence()
    mine = [m for m in genuine["inputs"]
            if SignedContribution.from_str(m).site_id == sites[1].name]
    other = [m for m in genuine["inputs"]
             if SignedContribution.from_str(m).site_id == sites[0].name]
    for inputs, why in ((mine, "holds 1 sites"), (mine + other, "3 needed")):
        message = {"round": 1, "previous": {**genuine, "inputs": inputs}}
        with pytest.raises(SiteRefusedError, match=why):
            sites[1].call("fit", message)
    with pytest.raises(SiteRefusedError, match="field 'previous'"):
        sites[1].call("fit", {"round": 1})
    assert sites[1].guard.approval(spec.job_id)["used"]["fit"] == 0


def test_secure_sum_through_syft_survives_a_site_dropping(federation, partitions, schema):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=2,
                   aggregation="secagg")
    federation.approve_all(federation.submit(spec))
    conns = federation.connections(spec)
    agg = federation.secure_sum(spec)
    agg.submit(conns, "stats", {}, vector_length(spec, "stats"))

    class Offline:
        name = conns[1].name

        def call(self, action, message):
            raise ConnectionError("site went offline")

    live = [conns[0], Offline(), conns[2]]
    agg.submit(live, "fit", _round_one(agg), vector_length(spec, "fit"))
    (got,) = agg.finish(live)
    frames = {c.name: partitions[i] for i, c in enumerate(conns)}
    want = _plain_round_one(spec, frames, [conns[0].name, conns[2].name])
    assert np.max(np.abs(got.vector - want)) <= codec_for(spec, "fit").max_abs_error(2)


def test_secure_sum_refuses_fewer_survivors_than_the_jobs_minimum(tmp_path, shuttle_small,
                                                                   schema):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=1,
                   aggregation="secagg", min_sites=4)
    frames = {f"mini-{i}": (shuttle_small.iloc[i::4].iloc[:-40].reset_index(drop=True),
                            shuttle_small.iloc[i::4].iloc[-40:].reset_index(drop=True))
              for i in range(4)}
    sites = direct_federation(tmp_path, spec, frames)
    try:
        agg = MaskedSum(spec, n_sites=4)
        agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
        sites[1].offline = True
        with pytest.raises(TooFewSitesError, match="needs at least 4"):
            agg.submit(sites, "fit", _round_one(agg), vector_length(spec, "fit"))
    finally:
        for s in sites:
            s.close()
