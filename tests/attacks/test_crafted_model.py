"""A hostile data scientist tries to make sites train on a model of her choosing.

The attack ("imprint" / binning, after Fowl et al., ICLR 2022): a first layer whose units
all read one feature, with increasing thresholds as biases, and a second layer that weighs
every unit alike. The gradient of unit i minus that of unit i+1 is then the sum of the rows
whose feature falls between the two thresholds, divided by their count: a row verbatim when
one row falls in the bin, even after a secure sum. The positive control shows that this
decoder recovers real private rows from such a model's update; the attack tests show that no
channel lets the scientist put that model (or any other) into a site, and that nothing she
receives from the sites decodes to a training row.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from fed_tasks.aggregation import KeyAuthoritySum, PlainSum
from fed_tasks.interface import SiteRefusedError
from fed_tasks.preprocessing import Standardizer
from fed_tasks.site_step import feature_matrix, new_model, vector_length
from fed_tasks.spec import JobSpec
from privacy import signing
from privacy.signing import SignedAggregate, SignedContribution

HIDDEN = (1024, 8)  # a first layer wider than a site's table: one bin per row


def _spec(schema, **kw) -> JobSpec:
    return JobSpec(features=schema.features, label_column=schema.label, hidden=HIDDEN,
                   trim=0.0, batch_size=4096, local_epochs=1, rounds=2, **kw)


def _crafted(spec: JobSpec, rows: np.ndarray) -> np.ndarray:
    """The imprint model for standardized ``rows``: every first-layer unit reads the same
    random direction u, unit i fires when u·x exceeds the i-th threshold. The attack gets its
    best chance: the thresholds lie between the private rows' own projections."""
    model = new_model(spec)
    w = model.get_weights()
    k, d = HIDDEN[0], len(spec.features)
    rng = np.random.default_rng(0)
    u = rng.normal(size=d)
    u /= np.linalg.norm(u)
    proj = np.unique(rows @ u)
    mids = (proj[:-1] + proj[1:]) / 2  # one threshold between each two rows
    cuts = np.sort(np.concatenate([mids, np.full(max(0, k - len(mids)), proj[-1] + 1.0)]))[:k]
    w2 = np.tile(rng.normal(0, 0.1, (HIDDEN[1], 1)), (1, k))
    w[:k * d] = np.tile(u, k)
    w[k * d:k * d + k] = -cuts
    w[k * d + k:k * d + k + HIDDEN[1] * k] = w2.ravel()
    return w


def _decoded_rows(first_layer_update: np.ndarray, spec: JobSpec) -> np.ndarray:
    """The imprint decoder: (ΔW_i − ΔW_i+1) / (Δb_i − Δb_i+1) for consecutive units."""
    k, d = HIDDEN[0], len(spec.features)
    dw = first_layer_update[:k * d].reshape(k, d)
    db = first_layer_update[k * d:k * d + k]
    gap = db[:-1] - db[1:]
    ok = np.abs(gap) > 1e-12
    return (dw[:-1] - dw[1:])[ok] / gap[ok, None]


def _recovered(decoded: np.ndarray, rows: np.ndarray) -> int:
    """How many private rows appear among the decoded vectors (to 1e-4 in every feature)."""
    if len(decoded) == 0:
        return 0
    close = np.all(np.abs(decoded[:, None, :] - rows[None, :, :]) < 1e-4, axis=2)
    return int(np.count_nonzero(close.any(axis=0)))


def _standardized(spec, train):
    x = feature_matrix(spec, train)
    return Standardizer.fit(x).transform(x).astype(np.float64)


def test_the_decoder_recovers_rows_from_a_crafted_models_gradient(partitions, schema):
    """Positive control: with the crafted model, one gradient holds private rows verbatim."""
    spec = _spec(schema)
    rows = _standardized(spec, partitions[0][0])
    model = new_model(spec)
    model.set_weights(_crafted(spec, rows))
    net = model.net.double()
    x = torch.from_numpy(rows)
    torch.mean((net(x) - x) ** 2).backward()
    grad = torch.cat([p.grad.reshape(-1) for p in net.parameters()]).numpy()
    assert _recovered(_decoded_rows(grad, spec), rows) >= len(rows) // 2


def _assert_no_row_decodes(spec, encoded_sum: str, partitions) -> None:
    """Nothing decodes to any site's training row from a released sum ``[n·Δ, n·loss, n]``."""
    from fed_tasks.codec import decode_array

    total = decode_array(encoded_sum, vector_length(spec, "fit"))
    decoded = _decoded_rows(total[:-2] / total[-1], spec)
    for train, _ in partitions:
        assert _recovered(decoded, _standardized(spec, train)) == 0


def _approved(federation, spec):
    federation.approve_all(federation.submit(spec))
    return federation.connections(spec)


def _used(federation, spec):
    return [s.guard.approval(spec.job_id)["used"]["fit"] for s in federation.sites]


def test_plain_mode_sites_refuse_a_crafted_model_and_leak_no_row(federation, partitions,
                                                                 schema):
    spec = _spec(schema)
    conns = _approved(federation, spec)
    agg = PlainSum(2)
    agg.submit(conns, "stats", {}, vector_length(spec, "stats"))
    stats = agg.evidence()
    rows = _standardized(spec, partitions[0][0])
    crafted = _crafted(spec, rows)
    from fed_tasks.codec import encode_array

    # 1. the weights (and scaling) in the round message, as the old protocol took them
    for extra in ({"weights": encode_array(crafted)}, {"norm": {"mean": [0.0], "std": [1.0]}}):
        with pytest.raises(SiteRefusedError, match="Extra inputs are not permitted"):
            conns[0].call("fit", {"round": 1, "previous": stats, **extra})
    # 2. a forged aggregate that would move the model to the crafted weights: the scientist
    #    signs it with her own key, or alters a genuine signed contribution
    fake = np.concatenate([crafted, [0.0, 1.0]])
    own_key = signing.generate_signing_key()
    forged = SignedContribution.create(own_key, conns[1].name, spec.job_id, 0,
                                       encode_array(fake), model=SignedContribution.from_str(
                                           stats["contributions"][0]).model).to_str()
    genuine = SignedContribution.from_str(stats["contributions"][1])
    altered = SignedContribution(genuine.site_id, genuine.job_id, genuine.round,
                                 encode_array(fake[:vector_length(spec, "stats")]),
                                 genuine.signature, model=genuine.model).to_str()
    for bad in (forged, altered):
        evidence = {**stats, "contributions": [stats["contributions"][0], bad]}
        with pytest.raises(SiteRefusedError, match="not signed by it"):
            conns[0].call("fit", {"round": 1, "previous": evidence})
    # 3. a statistics "aggregate" of this site alone (an isolation attempt)
    with pytest.raises(SiteRefusedError, match="holds 1 sites"):
        conns[0].call("fit", {"round": 1, "previous": {**stats, "contributions":
                                                       stats["contributions"][:1]}})
    assert _used(federation, spec) == [0, 0, 0]  # refused before any private value
    # the honest round: nothing the scientist now holds decodes to a training row
    agg.submit(conns, "fit", {"round": 1, "previous": stats}, vector_length(spec, "fit"))
    n_fit = vector_length(spec, "fit")
    for signed, (train, _) in zip(agg.evidence()["contributions"], partitions, strict=True):
        from fed_tasks.codec import decode_array

        update = decode_array(SignedContribution.from_str(signed).payload, n_fit)
        own = _standardized(spec, train)
        assert _recovered(_decoded_rows(update[:-2] / update[-1], spec), own) == 0


def test_paillier_sites_accept_only_the_authoritys_signed_sum(federation, partitions, schema):
    spec = _spec(schema, aggregation="paillier")
    conns = _approved(federation, spec)
    agg = KeyAuthoritySum(federation.authority_session().connection(spec))
    agg.submit(conns, "stats", {}, vector_length(spec, "stats"))
    stats = agg.evidence()
    rows = _standardized(spec, partitions[0][0])
    crafted = _crafted(spec, rows)
    from fed_tasks.codec import encode_array

    # a sum of the scientist's making, "attested" with a key of her own
    fake_sum = encode_array(np.zeros(vector_length(spec, "stats")))
    claim = signing.SignedAggregate.from_str(stats["attestation"])
    own = SignedAggregate.create(signing.generate_signing_key(), spec.job_id, 0,
                                 list(claim.contributors), claim.model, fake_sum).to_str()
    for evidence in ({**stats, "sum": fake_sum},  # the authority's signature, another sum
                     {**stats, "sum": fake_sum, "attestation": own}):
        with pytest.raises(SiteRefusedError, match="not signed by the federation's key"):
            conns[0].call("fit", {"round": 1, "previous": evidence})
    with pytest.raises(SiteRefusedError, match="Extra inputs"):
        conns[1].call("fit", {"round": 1, "previous": stats, "weights": encode_array(crafted)})
    assert _used(federation, spec) == [0, 0, 0]
    # isolation: the authority decrypts no sum of one site, and each round only once
    replies = [c.call("fit", {"round": 1, "previous": stats}) for c in conns]
    authority = federation.authority_session().connection(spec)
    with pytest.raises(SiteRefusedError, match="at least 2"):
        authority.call("decrypt", {"action": "fit", "round": 1, "contributions":
                                   [replies[1]["contribution"]]})
    # all the scientist gets is the sum of the honest round: no training row decodes from it
    total = authority.call("decrypt", {"action": "fit", "round": 1, "contributions":
                                       [r["contribution"] for r in replies]})
    _assert_no_row_decodes(spec, total["sum"], partitions)


def test_secure_sum_sites_refuse_a_sum_the_orchestrator_altered(federation, partitions, schema):
    spec = _spec(schema, aggregation="secagg")
    conns = _approved(federation, spec)
    agg = federation.secure_sum(spec)
    agg.submit(conns, "stats", {}, vector_length(spec, "stats"))
    stats = agg.evidence()
    first = SignedContribution.from_str(stats["inputs"][0])
    from privacy.secagg_session import SessionMaskedInput

    masked = SessionMaskedInput.from_str(first.payload)
    values = masked.values()
    values[0] += np.uint64(1)  # the orchestrator shifts the sum it relays
    from privacy.secagg import _pack

    shifted = SessionMaskedInput(masked.job_id, masked.sender, masked.round, masked.bits,
                                 masked.vector_length, masked.peers,
                                 _pack(values, masked.bits)).to_str()
    resent = SignedContribution(first.site_id, first.job_id, first.round, shifted,
                                first.signature, model=first.model).to_str()
    with pytest.raises(SiteRefusedError, match="not signed by it"):
        conns[1].call("fit", {"round": 1, "previous": {**stats, "inputs":
                                                       [resent, *stats["inputs"][1:]]}})
    # leaving a site out without the others revealing its keys does not open either
    with pytest.raises(SiteRefusedError, match="needed|holds"):
        conns[1].call("fit", {"round": 1, "previous": {**stats, "inputs": stats["inputs"][1:]}})
    assert _used(federation, spec) == [0, 0, 0]
    # the untouched relay still trains (the refusals spent nothing)
    agg.submit(conns, "fit", {"round": 1, "previous": stats}, vector_length(spec, "fit"))
    assert _used(federation, spec) == [1, 1, 1]
    (released,) = agg.finish(conns)  # the sites open round 1: all the scientist ever sees
    from fed_tasks.codec import encode_array

    _assert_no_row_decodes(spec, encode_array(released.vector), partitions)


def test_a_replayed_or_skipped_round_is_refused(federation, schema, drive):
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=3)
    conns = _approved(federation, spec)
    agg = drive(conns, spec, 1)
    first = {"round": 1, "previous": agg.evidence()}
    with pytest.raises(SiteRefusedError, match="out of order"):
        conns[0].call("fit", {**first, "round": 3})  # skips round 2
    reply = conns[0].call("fit", {**first, "round": 2})
    again = conns[0].call("fit", {**first, "round": 2})  # an exact retry: the same bytes
    assert again == reply
    with pytest.raises(SiteRefusedError, match="out of order"):
        conns[0].call("fit", {**first, "round": 1})  # a replay of an earlier round
    assert _used(federation, spec)[0] == 2


def test_evaluation_scores_only_the_sites_own_model(federation, schema, drive):
    """The scientist cannot have a site score a model of her choosing either."""
    spec = JobSpec(features=schema.features, label_column=schema.label, rounds=1)
    conns = _approved(federation, spec)
    drive(conns, spec, 1)
    from fed_tasks.codec import encode_array

    with pytest.raises(SiteRefusedError, match="Extra inputs"):
        conns[0].call("evaluate", {"weights": encode_array(new_model(spec).get_weights())})
