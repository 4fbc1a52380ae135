import json
from dataclasses import replace

import gmpy2
import numpy as np
import pytest

from privacy import signing
from privacy.fixed_point import FixedPointCodec
from privacy.key_authority import (
    BadSignatureError,
    CopiedContributionError,
    DecryptionFailedError,
    DuplicateSiteError,
    InconsistentContributionsError,
    KeyAuthority,
    KeyAuthorityError,
    MalformedContributionError,
    PolicyConfigError,
    ReplayError,
    RequestMismatchError,
    SpentStoreError,
    TooFewSitesError,
    UnknownSiteError,
)
from privacy.paillier import EncryptedVector, PackedPaillier, generate_keypair
from privacy.signing import SignatureError, SignedContribution

BOUND = 2.0
SITES = ("a", "b", "c")


@pytest.fixture(scope="module")
def paillier_keys():
    return generate_keypair(1024, insecure_test_key=True)


@pytest.fixture(scope="module")
def site_keys():
    return {s: signing.generate_signing_key() for s in SITES}


@pytest.fixture(scope="module")
def packer(paillier_keys):
    return PackedPaillier(paillier_keys[0], FixedPointCodec(bound=BOUND), 8)


@pytest.fixture
def authority(paillier_keys, site_keys):
    pubs = {s: signing.public_key_to_str(k) for s, k in site_keys.items()}
    return KeyAuthority(paillier_keys[1], pubs, min_sites=2)


def _vec(seed: int, size: int = 40) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-BOUND, BOUND, size=size)


def _contrib(packer, site_keys, site, job="job-x", rnd=3, vec=None, signer=None) -> str:
    vec = _vec(ord(site)) if vec is None else vec
    payload = packer.encrypt(vec).to_str()
    key = site_keys[signer or site]
    return SignedContribution.create(key, site, job, rnd, payload).to_str()


# ------------------------------------------------------------------ signing


def test_sign_and_verify(site_keys):
    key = site_keys["a"]
    pub = signing.public_key_to_str(key)
    assert signing.public_key_to_str(signing.public_key_from_str(pub)) == pub
    sig = signing.sign(key, b"hello")
    signing.verify(pub, b"hello", sig)
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(pub, b"hellO", sig)
    with pytest.raises(SignatureError, match="does not verify"):
        signing.verify(signing.public_key_to_str(site_keys["b"]), b"hello", sig)
    with pytest.raises(SignatureError, match="missing"):
        signing.verify(pub, b"hello", "")
    with pytest.raises(SignatureError, match="base64"):
        signing.verify(pub, b"hello", "***")
    with pytest.raises(SignatureError, match="32 bytes"):
        signing.public_key_from_str("AAAA")
    restored = signing.private_key_from_str(signing.private_key_to_str(key))
    signing.verify(pub, b"x", signing.sign(restored, b"x"))


def test_signed_contribution_binds_every_field(site_keys):
    key = site_keys["a"]
    pub = signing.public_key_to_str(key)
    c = SignedContribution.create(key, "a", "job", 1, "payload")
    back = SignedContribution.from_str(c.to_str())
    assert back == c
    back.verify(pub)
    for change in ({"site_id": "b"}, {"job_id": "job2"}, {"round": 2}, {"payload": "payload2"}):
        with pytest.raises(SignatureError):
            replace(c, **change).verify(pub)
    assert (
        len(
            {
                replace(c, **ch).canonical_bytes()
                for ch in ({}, {"site_id": "b"}, {"job_id": "j"}, {"round": 9}, {"payload": "p"})
            }
        )
        == 5
    )


def test_malformed_contribution_strings():
    with pytest.raises(signing.ContributionFormatError):
        SignedContribution.from_str("[]")
    with pytest.raises(signing.ContributionFormatError, match="round"):
        SignedContribution.from_str(
            json.dumps(
                {"site_id": "a", "job_id": "j", "round": True, "payload": "p", "signature": ""}
            )
        )
    with pytest.raises(signing.ContributionFormatError, match="site_id"):
        SignedContribution("", "j", 0, "p")


# ---------------------------------------------------------------- happy path


def test_decrypts_sum_of_all_sites(authority, packer, site_keys):
    contribs = [_contrib(packer, site_keys, s) for s in SITES]
    got = authority.decrypt_sum("job-x", 3, contribs, expected_length=40)
    expected = sum(_vec(ord(s)) for s in SITES)
    assert got.shape == (40,)
    assert np.max(np.abs(got - expected)) <= 3 * 2.0**-17
    assert authority.is_spent("job-x", 3)


def test_minimum_sites_are_enough(authority, packer, site_keys):
    contribs = [_contrib(packer, site_keys, s) for s in ("a", "c")]
    got = authority.decrypt_sum("job-x", 3, contribs)
    assert np.allclose(got, _vec(ord("a")) + _vec(ord("c")), atol=1e-4)


# ---------------------------------------------------------------- attacks


def test_lone_ciphertext_is_refused(authority, packer, site_keys):
    with pytest.raises(
        TooFewSitesError, match="only 1 distinct site contributed, policy requires at least 2"
    ):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a")])
    with pytest.raises(TooFewSitesError):
        authority.decrypt_sum("job-x", 3, [])
    assert not authority.is_spent("job-x", 3)


def test_fewer_than_k_sites(paillier_keys, site_keys, packer):
    pubs = {s: signing.public_key_to_str(k) for s, k in site_keys.items()}
    auth = KeyAuthority(paillier_keys[1], pubs, min_sites=3)
    with pytest.raises(TooFewSitesError, match="only 2 distinct sites contributed.*at least 3"):
        auth.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, s) for s in ("a", "b")])


def test_duplicate_site_is_refused(authority, packer, site_keys):
    contribs = [
        _contrib(packer, site_keys, "a"),
        _contrib(packer, site_keys, "b", vec=_vec(1)),
        _contrib(packer, site_keys, "b", vec=_vec(2)),
    ]
    with pytest.raises(DuplicateSiteError, match="duplicate contribution from site 'b'"):
        authority.decrypt_sum("job-x", 3, contribs)


def test_unsigned_contribution_is_refused(authority, packer, site_keys):
    unsigned = SignedContribution("c", "job-x", 3, packer.encrypt(_vec(0)).to_str()).to_str()
    with pytest.raises(BadSignatureError, match="signature of site 'c' does not verify"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), unsigned])


def test_forged_signature_is_refused(authority, packer, site_keys):
    # Site b signs with its own key but claims to be site c (to reach k alone).
    forged = _contrib(packer, site_keys, "c", signer="b")
    with pytest.raises(BadSignatureError, match="site 'c'"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "b"), forged])


def test_swapped_payload_breaks_signature(authority, packer, site_keys):
    good = SignedContribution.from_str(_contrib(packer, site_keys, "c"))
    swapped = replace(good, payload=packer.encrypt(_vec(9)).to_str()).to_str()
    with pytest.raises(BadSignatureError, match="site 'c'"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), swapped])


def test_unknown_site_is_refused(authority, packer, site_keys):
    intruder = signing.generate_signing_key()
    rogue = SignedContribution.create(intruder, "z", "job-x", 3, packer.encrypt(_vec(0)).to_str())
    with pytest.raises(UnknownSiteError, match="unknown site 'z'"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), rogue.to_str()])


def test_replayed_round_is_refused(authority, packer, site_keys):
    contribs = [_contrib(packer, site_keys, s) for s in SITES]
    authority.decrypt_sum("job-x", 3, contribs)
    with pytest.raises(ReplayError, match="round 3 of job 'job-x' was already decrypted"):
        authority.decrypt_sum("job-x", 3, contribs)
    # A different subset of the same round (differencing attack) is refused too.
    with pytest.raises(ReplayError):
        authority.decrypt_sum("job-x", 3, contribs[:2])
    # The next round is fine.
    authority.decrypt_sum("job-x", 4, [_contrib(packer, site_keys, s, rnd=4) for s in SITES])


def test_contribution_for_another_job_or_round(authority, packer, site_keys):
    a = _contrib(packer, site_keys, "a")
    other_job = _contrib(packer, site_keys, "b", job="job-y")
    with pytest.raises(RequestMismatchError, match="site 'b' is for job 'job-y'"):
        authority.decrypt_sum("job-x", 3, [a, other_job])
    other_round = _contrib(packer, site_keys, "b", rnd=2)
    with pytest.raises(RequestMismatchError, match="round 2"):
        authority.decrypt_sum("job-x", 3, [a, other_round])
    assert not authority.is_spent("job-x", 3)


def test_copied_ciphertext_is_refused(authority, packer, site_keys):
    a = _contrib(packer, site_keys, "a")
    payload = SignedContribution.from_str(a).payload
    copy = SignedContribution.create(site_keys["b"], "b", "job-x", 3, payload).to_str()
    with pytest.raises(CopiedContributionError, match="'a' and 'b'"):
        authority.decrypt_sum("job-x", 3, [a, copy])


def test_pre_summed_contribution_is_refused(authority, packer, site_keys):
    double = (packer.encrypt(_vec(1)) + packer.encrypt(_vec(2))).to_str()
    c = SignedContribution.create(site_keys["b"], "b", "job-x", 3, double).to_str()
    with pytest.raises(InconsistentContributionsError, match="site 'b' claims 2 summands"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), c])


def test_inconsistent_lengths_are_refused(authority, packer, site_keys):
    short = _contrib(packer, site_keys, "b", vec=_vec(1, 39))
    with pytest.raises(InconsistentContributionsError, match="site 'b'"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), short])
    with pytest.raises(MalformedContributionError, match="expected 41"):
        authority.decrypt_sum(
            "job-x", 3, [_contrib(packer, site_keys, s) for s in SITES], expected_length=41
        )


def test_payload_under_wrong_key_or_garbage(authority, site_keys, packer):
    other_pub, _ = generate_keypair(1024, insecure_test_key=True)
    other = PackedPaillier(other_pub, FixedPointCodec(bound=BOUND), 8)
    wrong = _contrib(other, site_keys, "b")
    with pytest.raises(MalformedContributionError, match="payload of site 'b'.*encrypted under"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), wrong])
    junk = SignedContribution.create(site_keys["b"], "b", "job-x", 3, "junk").to_str()
    with pytest.raises(MalformedContributionError, match="site 'b'"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), junk])
    with pytest.raises(MalformedContributionError, match="#1"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), "{"])


def test_out_of_range_contribution_burns_the_round(authority, packer, site_keys, paillier_keys):
    pub = paillier_keys[0]
    ref = packer.encrypt(_vec(0))
    evil_ct = gmpy2.mpz(pub.raw_encrypt(1 << (pub.n.bit_length() - 3)))
    evil = EncryptedVector((evil_ct,), 40, 1, ref.key_fingerprint, ref.layout, pub)
    c = SignedContribution.create(site_keys["b"], "b", "job-x", 3, evil.to_str()).to_str()
    with pytest.raises(DecryptionFailedError, match="round is spent"):
        authority.decrypt_sum("job-x", 3, [_contrib(packer, site_keys, "a"), c])
    assert authority.is_spent("job-x", 3)


# ------------------------------------------------------- policy, persistence


def test_policy_configuration(paillier_keys, site_keys):
    pubs = {s: signing.public_key_to_str(k) for s, k in site_keys.items()}
    with pytest.raises(PolicyConfigError, match=">= 2"):
        KeyAuthority(paillier_keys[1], pubs, min_sites=1)
    with pytest.raises(PolicyConfigError, match="only 3 site key"):
        KeyAuthority(paillier_keys[1], pubs, min_sites=4)
    with pytest.raises(PolicyConfigError, match="site 'a'"):
        KeyAuthority(paillier_keys[1], {**pubs, "a": "bad"}, min_sites=2)


def test_spent_rounds_persist_across_restarts(tmp_path, paillier_keys, site_keys, packer):
    pubs = {s: signing.public_key_to_str(k) for s, k in site_keys.items()}
    path = tmp_path / "ka" / "spent.json"
    first = KeyAuthority(paillier_keys[1], pubs, 2, spent_path=path)
    contribs = [_contrib(packer, site_keys, s) for s in SITES]
    first.decrypt_sum("job-x", 3, contribs)
    restarted = KeyAuthority(paillier_keys[1], pubs, 2, spent_path=path)
    assert restarted.is_spent("job-x", 3)
    with pytest.raises(ReplayError):
        restarted.decrypt_sum("job-x", 3, contribs)
    path.write_text("{garbage")
    with pytest.raises(SpentStoreError, match="unreadable"):
        KeyAuthority(paillier_keys[1], pubs, 2, spent_path=path)


def test_errors_are_value_errors():
    for cls in (TooFewSitesError, ReplayError, BadSignatureError, SpentStoreError):
        assert issubclass(cls, KeyAuthorityError) and issubclass(cls, ValueError)
