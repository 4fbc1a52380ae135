"""Secure aggregation through real datasites: the same model, and the attacks refused."""

from __future__ import annotations

import numpy as np
import pytest

from fed_tasks.aggregation import KeyAuthoritySum
from fed_tasks.interface import SiteRefusedError
from fed_tasks.site_step import vector_length
from fed_tasks.spec import JobSpec
from privacy.signing import SignedContribution


def _spec(schema, **kw) -> JobSpec:
    return JobSpec(features=schema.features, label_column=schema.label, **kw)


@pytest.fixture(scope="module")
def trained(federation, schema):
    """The same seeded job trained with plain, Paillier and secure-sum aggregation."""
    out = {}
    for agg in ("plain", "paillier", "secagg"):
        spec = _spec(schema, rounds=3, aggregation=agg, evaluations=1)
        federation.approve_all(federation.submit(spec))
        trainer = federation.trainer(spec, progress=False)
        result = trainer.fit()
        out[agg] = (result, trainer.evaluate(result))
    return out


@pytest.mark.parametrize("mode", ["paillier", "secagg"])
def test_secure_modes_give_the_plain_model(trained, mode):
    (plain, plain_eval), (enc, enc_eval) = trained["plain"], trained[mode]
    assert np.max(np.abs(plain.weights - enc.weights)) < 1e-4
    assert np.allclose(plain.norm.mean, enc.norm.mean) and np.allclose(plain.norm.std, enc.norm.std)
    for a, b in zip(plain_eval, enc_eval, strict=True):
        assert round(a["roc_auc"], 3) == round(b["roc_auc"], 3)


def _after_stats(spec, sites, authority):
    """Round 1's message: the sites' statistics summed and signed by the key authority."""
    agg = KeyAuthoritySum(authority)
    agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
    return {"round": 1, "previous": agg.evidence()}


@pytest.fixture()
def paillier_job(federation, schema):
    spec = _spec(schema, rounds=4, aggregation="paillier")  # 5 decryptions, one per test step
    federation.approve_all(federation.submit(spec))
    sites = federation.connections(spec)
    authority = federation.authority_session().connection(spec)
    return spec, sites, authority, _after_stats(spec, sites, authority)


def _decrypt(authority, spec, contributions, rnd=1):
    return authority.call("decrypt", {"action": "fit", "round": rnd,
                                      "length": vector_length(spec, "fit"),
                                      "contributions": contributions})


def test_site_reply_is_a_signed_ciphertext_not_the_update(paillier_job):
    spec, sites, _, msg = paillier_job
    reply = sites[0].call("fit", msg)
    assert set(reply) == {"contribution", "round", "clipped", "audit_head"}
    signed = SignedContribution.from_str(reply["contribution"])
    assert signed.site_id == sites[0].name and signed.round == 1
    assert "ciphertexts" in signed.payload or len(signed.payload) > 1000


def test_authority_refuses_a_lone_ciphertext_and_too_few_sites(paillier_job):
    spec, sites, authority, msg = paillier_job
    one = sites[0].call("fit", msg)["contribution"]
    with pytest.raises(SiteRefusedError, match="at least 2"):
        _decrypt(authority, spec, [one])


def test_authority_refuses_duplicate_unsigned_and_replayed(paillier_job):
    spec, sites, authority, msg = paillier_job
    c = [s.call("fit", msg)["contribution"] for s in sites]
    with pytest.raises(SiteRefusedError, match="[Dd]uplicate"):
        _decrypt(authority, spec, [c[0], c[0], c[1]])
    forged = SignedContribution.from_str(c[2])
    unsigned = SignedContribution(forged.site_id, forged.job_id, forged.round, forged.payload,
                                  "A" * 86 + "==", model=forged.model)
    with pytest.raises(SiteRefusedError, match="[Ss]ignature"):
        _decrypt(authority, spec, [c[0], c[1], unsigned.to_str()])
    total = _decrypt(authority, spec, c)  # a proper set decrypts, once
    assert len(total["sum"]) > 0
    with pytest.raises(SiteRefusedError, match="already"):
        _decrypt(authority, spec, c)


def test_authority_refuses_a_contribution_for_another_round(paillier_job):
    spec, sites, authority, msg = paillier_job
    c = [s.call("fit", msg)["contribution"] for s in sites]
    with pytest.raises(SiteRefusedError, match="round"):
        _decrypt(authority, spec, c, rnd=2)


def test_corrupted_ciphertext_is_refused(paillier_job):
    spec, sites, authority, msg = paillier_job
    c = [s.call("fit", msg)["contribution"] for s in sites]
    bad = SignedContribution.from_str(c[1])
    tampered = bad.payload[:-40] + ("A" if bad.payload[-40] != "A" else "B") + bad.payload[-39:]
    resigned = SignedContribution(bad.site_id, bad.job_id, bad.round, tampered, bad.signature,
                                  model=bad.model)
    with pytest.raises(SiteRefusedError, match="[Ss]ignature"):
        _decrypt(authority, spec, [c[0], resigned.to_str(), c[2]])


def test_value_beyond_the_encoding_bound_is_clipped_and_counted(federation, schema):
    """No free query: a private value over the bound is clipped at the site and the clipping
    stated in the reply, instead of an error that would answer "is some value large?"."""
    spec = _spec(schema, rounds=2, aggregation="paillier", update_bound=1.0)
    federation.approve_all(federation.submit(spec))
    sites = federation.connections(spec)
    authority = federation.authority_session().connection(spec)
    msg = _after_stats(spec, sites, authority)
    replies = [s.call("fit", msg) for s in sites]
    assert all(r["clipped"] > 0 for r in replies)  # n·Δ of hundreds of rows exceeds 1.0
    for site in federation.sites:
        assert site.guard.approval(spec.job_id)["used"]["fit"] == 1  # counted, not refunded


def test_orchestrator_holds_no_decryption_key(federation):
    import stat

    key_file = federation.authority.directory / "paillier_private_key.json"
    assert stat.S_IMODE(key_file.stat().st_mode) == 0o600
    for site in federation.sites:
        assert not (site.directory / "paillier_private_key.json").exists()


def test_ciphertext_under_a_wrong_key_is_refused(paillier_job, federation):
    """A misconfigured site (or an attacker holding its signing key) using another key."""
    from privacy import signing
    from privacy.fixed_point import FixedPointCodec
    from privacy.paillier import PackedPaillier, generate_keypair

    spec, sites, authority, msg = paillier_job
    c = [s.call("fit", msg)["contribution"] for s in sites]
    other_pub, _ = generate_keypair(1024, insecure_test_key=True)
    packer = PackedPaillier(other_pub, FixedPointCodec(frac_bits=spec.frac_bits,
                                                       bound=spec.update_bound), 3)
    payload = packer.encrypt(np.zeros(vector_length(spec, "fit"))).to_str()
    key = signing.private_key_from_str(
        (federation.sites[2].directory / "contribution_key.pem").read_text())
    wrong = SignedContribution.create(key, sites[2].name, spec.job_id, 1, payload,
                                      model=SignedContribution.from_str(c[0]).model)
    with pytest.raises(SiteRefusedError, match="key"):
        _decrypt(authority, spec, [c[0], c[1], wrong.to_str()])
