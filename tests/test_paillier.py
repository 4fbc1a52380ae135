import base64
import json
import pickle

import gmpy2
import numpy as np
import pytest

from privacy.fixed_point import EncodingOverflowError, FixedPointCodec
from privacy.paillier import (
    CiphertextFormatError,
    CrtDecryptor,
    Decryptor,
    EncryptedVector,
    InsecureKeyError,
    KeyFormatError,
    KeyMismatchError,
    LayoutMismatchError,
    ObfuscatorPool,
    PackedPaillier,
    PaillierError,
    PlaintextOverflowError,
    SummandOverflowError,
    compute_obfuscators,
    decrypt_vector,
    fingerprint,
    generate_keypair,
    private_key_from_str,
    private_key_to_str,
    public_key_from_str,
    public_key_to_str,
)

BOUND = 4.0
MAX_SUMMANDS = 8


@pytest.fixture(scope="module")
def keys():
    return generate_keypair(1024, insecure_test_key=True)


@pytest.fixture(scope="module")
def other_keys():
    return generate_keypair(1024, insecure_test_key=True)


@pytest.fixture(scope="module")
def codec():
    return FixedPointCodec(frac_bits=16, bound=BOUND)


@pytest.fixture(scope="module")
def packer(keys, codec):
    return PackedPaillier(keys[0], codec, MAX_SUMMANDS)


def _vec(seed: int, size: int) -> np.ndarray:
    return np.random.default_rng(seed).uniform(-BOUND, BOUND, size=size)


# ------------------------------------------------------------------ keys


def test_small_keys_need_explicit_opt_in():
    with pytest.raises(InsecureKeyError, match="1024-bit"):
        generate_keypair(1024)
    with pytest.raises(InsecureKeyError):
        generate_keypair(256, insecure_test_key=True)


def test_key_serialization_round_trip(keys):
    pub, priv = keys
    pub2 = public_key_from_str(public_key_to_str(pub), insecure_test_key=True)
    assert pub2.n == pub.n
    priv2 = private_key_from_str(private_key_to_str(priv), insecure_test_key=True)
    assert (priv2.p, priv2.q) == (priv.p, priv.q)
    assert fingerprint(pub2) == fingerprint(pub)


def test_deserializing_short_key_without_flag_is_refused(keys):
    with pytest.raises(InsecureKeyError):
        public_key_from_str(public_key_to_str(keys[0]))
    with pytest.raises(InsecureKeyError):
        private_key_from_str(private_key_to_str(keys[1]))


def test_malformed_keys_are_refused(keys):
    pub, priv = keys
    with pytest.raises(KeyFormatError, match="JSON"):
        public_key_from_str("{not json", insecure_test_key=True)
    with pytest.raises(KeyFormatError):
        public_key_from_str(private_key_to_str(priv), insecure_test_key=True)
    bad = json.loads(private_key_to_str(priv))
    bad["p"] = str(priv.p + 2)
    with pytest.raises(KeyFormatError, match="inconsistent"):
        private_key_from_str(json.dumps(bad), insecure_test_key=True)
    even = json.dumps({"kind": "fedsyft-paillier-public", "v": 1, "n": str(pub.n + 1)})
    with pytest.raises(KeyFormatError):
        public_key_from_str(even, insecure_test_key=True)


def test_fingerprint_is_short_stable_and_key_specific(keys, other_keys):
    fp = fingerprint(keys[0])
    assert fp == fingerprint(keys[0]) and len(fp) == 32
    assert fp != fingerprint(other_keys[0])


# --------------------------------------------------------------- packing


def test_slot_arithmetic(keys, codec, packer):
    assert packer.slot_bits == codec.bits_per_value(MAX_SUMMANDS) + 2
    assert packer.slots_per_ciphertext == (keys[0].n.bit_length() - 2) // packer.slot_bits
    assert packer.slots_per_ciphertext >= 30
    assert packer.n_ciphertexts(packer.slots_per_ciphertext + 1) == 2


def test_layout_too_wide_for_key_is_refused(keys):
    wide = FixedPointCodec(frac_bits=52, bound=1.0)
    with pytest.raises(PaillierError, match="do not fit"):
        PackedPaillier(keys[0], wide, 2**1000)


@pytest.mark.parametrize("size", [1, 37, 100])
def test_round_trip(keys, packer, size):
    x = _vec(size, size)
    enc = packer.encrypt(x)
    assert enc.length == size and enc.n_summands == 1
    assert len(enc.ciphertexts) == packer.n_ciphertexts(size)
    got = packer.decrypt(keys[1], enc)
    assert got.shape == (size,)
    assert np.max(np.abs(got - x)) <= 2.0**-17


def test_sum_of_vectors_matches_plain_sum(keys, packer):
    xs = [_vec(s, 90) for s in range(5)]
    encs = [packer.encrypt(x) for x in xs]
    expected = np.sum(xs, axis=0)
    tol = 5 * 2.0**-17
    for total in (
        encs[0] + encs[1] + encs[2] + encs[3] + encs[4],
        sum(encs),
        EncryptedVector.sum(encs),
        packer.sum(encs),
        packer.add(packer.sum(encs[:2]), packer.sum(encs[2:])),
    ):
        assert total.n_summands == 5
        assert np.max(np.abs(packer.decrypt(keys[1], total) - expected)) <= tol


def test_extreme_values_at_max_summands_do_not_overflow(keys, packer):
    n = packer.slots_per_ciphertext + 3
    top = packer.encrypt(np.full(n, BOUND))
    bottom = packer.encrypt(np.full(n, -BOUND))
    assert np.array_equal(
        packer.decrypt(keys[1], sum([top] * MAX_SUMMANDS)), np.full(n, BOUND * MAX_SUMMANDS)
    )
    assert np.array_equal(
        packer.decrypt(keys[1], sum([bottom] * MAX_SUMMANDS)), np.full(n, -BOUND * MAX_SUMMANDS)
    )


def test_too_many_summands_raise(packer):
    enc = packer.encrypt(_vec(0, 10))
    full = sum([enc] * MAX_SUMMANDS)
    with pytest.raises(SummandOverflowError, match="max_summands=8"):
        full + enc
    with pytest.raises(SummandOverflowError):
        EncryptedVector.sum([enc] * (MAX_SUMMANDS + 1))


def test_out_of_range_input_raises(packer):
    x = _vec(1, 20)
    x[3] = BOUND * 2
    with pytest.raises(EncodingOverflowError, match="index 3"):
        packer.encrypt(x)
    with pytest.raises(EncodingOverflowError):
        packer.encrypt(np.array([np.nan]))
    with pytest.raises(PaillierError, match="empty"):
        packer.encrypt(np.array([]))


def test_encryption_is_randomized(packer):
    x = _vec(3, 10)
    assert packer.encrypt(x).ciphertexts != packer.encrypt(x).ciphertexts


def test_adding_incompatible_vectors_raises(keys, other_keys, codec, packer):
    a = packer.encrypt(_vec(0, 10))
    with pytest.raises(LayoutMismatchError, match="lengths"):
        a + packer.encrypt(_vec(0, 11))
    other_layout = PackedPaillier(keys[0], FixedPointCodec(bound=2.0), MAX_SUMMANDS)
    with pytest.raises(LayoutMismatchError):
        a + other_layout.encrypt(_vec(0, 10) / 2)
    other_key = PackedPaillier(other_keys[0], codec, MAX_SUMMANDS)
    with pytest.raises(KeyMismatchError):
        a + other_key.encrypt(_vec(0, 10))


def test_two_thousand_forty_eight_bit_round_trip():
    pub, priv = generate_keypair(2048)
    assert pub.n.bit_length() == 2048
    packer = PackedPaillier(pub, FixedPointCodec(bound=BOUND), 4)
    xs = [_vec(s, 150) for s in range(3)]
    total = packer.from_str(EncryptedVector.sum(packer.encrypt(x) for x in xs).to_str())
    got = packer.decrypt(private_key_from_str(private_key_to_str(priv)), total)
    assert np.max(np.abs(got - np.sum(xs, axis=0))) <= 3 * 2.0**-17


# --------------------------------------------------------- serialization


def test_string_round_trip_and_size(keys, packer):
    x = _vec(7, 100)
    enc = packer.encrypt(x)
    s = enc.to_str()
    assert isinstance(s, str)
    width = (keys[0].nsquare.bit_length() + 7) // 8
    body = base64.b64decode(json.loads(s)["ct"])
    assert len(body) == len(enc.ciphertexts) * width
    back = packer.from_str(s, expected_length=100)
    assert back.ciphertexts == enc.ciphertexts
    assert (back.length, back.n_summands, back.key_fingerprint) == (100, 1, enc.key_fingerprint)
    assert np.max(np.abs(packer.decrypt(keys[1], back) - x)) <= 2.0**-17


def test_wrong_key_is_refused(keys, other_keys, codec, packer):
    s = packer.encrypt(_vec(0, 10)).to_str()
    other = PackedPaillier(other_keys[0], codec, MAX_SUMMANDS)
    with pytest.raises(KeyMismatchError, match="encrypted under key"):
        other.from_str(s)
    with pytest.raises(KeyMismatchError, match="decryptor holds key"):
        packer.decrypt(other_keys[1], packer.from_str(s))


def _tamper(s: str, **changes) -> str:
    obj = json.loads(s)
    obj.update(changes)
    return json.dumps(obj)


def _body(cts: list[int], width: int) -> str:
    return base64.b64encode(b"".join(c.to_bytes(width, "big") for c in cts)).decode()


def test_corrupted_strings_are_refused(keys, packer):
    enc = packer.encrypt(_vec(0, 10))
    s = enc.to_str()
    ct = json.loads(s)["ct"]
    width = (keys[0].nsquare.bit_length() + 7) // 8
    n = keys[0].n
    cases = [
        ("not json", "not valid JSON"),
        (json.dumps({"scheme": "other"}), "not a"),
        (_tamper(s, ct="!" + ct[1:]), "corrupted base64"),
        (_tamper(s, ct=ct[:-8]), "truncated"),
        (_tamper(s, len=0), "positive int"),
        (_tamper(s, k=0), "summand count"),
        (_tamper(s, layout={"bound": 4.0}), "layout"),
        (_tamper(s, ct=_body([keys[0].nsquare], width)), r"not in \(0, n\^2\)"),
        (_tamper(s, ct=_body([0], width)), r"not in \(0, n\^2\)"),
        (_tamper(s, ct=_body([keys[1].p], width)), "not coprime"),
        (_tamper(s, ct=_body([n * 5], width)), "not coprime"),
    ]
    for bad, msg in cases:
        with pytest.raises(CiphertextFormatError, match=msg):
            packer.from_str(bad)
    with pytest.raises(SummandOverflowError):
        packer.from_str(_tamper(s, k=MAX_SUMMANDS + 1))
    with pytest.raises(LayoutMismatchError, match="expected 11"):
        packer.from_str(s, expected_length=11)
    with pytest.raises(LayoutMismatchError):
        packer.from_str(_tamper(s, layout={**json.loads(s)["layout"], "max_summands": 9}))


def test_out_of_range_plaintext_detected_on_decrypt(keys, packer):
    # A malicious contributor encrypts a value with bits beyond the packed slots.
    pub, priv = keys
    enc = packer.encrypt(_vec(0, 5))
    evil_m = 1 << (5 * packer.slot_bits + 3)
    evil = EncryptedVector(
        (gmpy2.mpz(pub.raw_encrypt(evil_m)),), 5, 1, enc.key_fingerprint, enc.layout, pub
    )
    with pytest.raises(PlaintextOverflowError, match="above its 5 packed slots"):
        packer.decrypt(priv, enc + evil)
    # A slot holding a value above the honest maximum is caught by the range check.
    big_slot = (1 << packer.slot_bits) - 1
    evil2 = EncryptedVector(
        (gmpy2.mpz(pub.raw_encrypt(big_slot)),), 5, 1, enc.key_fingerprint, enc.layout, pub
    )
    with pytest.raises(PlaintextOverflowError, match="out of range"):
        packer.decrypt(priv, evil2)


# ------------------------------------------------------- fast paths, API


def test_obfuscators_are_encryptions_of_zero(keys):
    pub, priv = keys
    for workers in (1, 2):
        obf = compute_obfuscators(pub, 6, workers=workers)
        assert len(set(obf)) == 6
        assert [priv.raw_decrypt(int(o)) for o in obf] == [0] * 6


def test_crt_decryptor_matches_phe(keys):
    pub, priv = keys
    rng = np.random.default_rng(0)
    plains = [int(v) for v in rng.integers(0, 2**62, size=9)] + [pub.n - 1]
    cts = [pub.raw_encrypt(m) for m in plains]
    assert CrtDecryptor(priv, workers=2).decrypt_raw(cts) == plains
    assert [priv.raw_decrypt(c) for c in cts] == plains


def test_obfuscator_pool(keys, codec):
    pub, priv = keys
    pool = ObfuscatorPool(pub, workers=2)
    assert pool.fill(5) == 5
    packer = PackedPaillier(pub, codec, MAX_SUMMANDS, pool=pool)
    x = _vec(4, packer.slots_per_ciphertext * 3)
    enc = packer.encrypt(x)
    assert len(pool) == 2
    assert np.max(np.abs(packer.decrypt(priv, enc) - x)) <= 2.0**-17
    # Shortfall is computed on the spot; the pool empties but encryption still works.
    enc2 = packer.encrypt(np.concatenate([x, x]))
    assert len(pool) == 0
    got = packer.decrypt(priv, enc2)
    assert np.max(np.abs(got - np.concatenate([x, x]))) <= 2.0**-17
    assert pool.refill_async(4).result(timeout=30) == 4
    pool.close()
    with pytest.raises(TypeError, match="pickled"):
        pickle.dumps(pool)


def test_pool_for_another_key_is_refused(keys, other_keys, codec):
    with pytest.raises(KeyMismatchError):
        PackedPaillier(keys[0], codec, 2, pool=ObfuscatorPool(other_keys[0]))


class _PheDecryptor:
    """A second, independent Decryptor (phe's own decrypt) to show the protocol is pluggable."""

    def __init__(self, priv):
        self._priv = priv

    @property
    def public_key(self):
        return self._priv.public_key

    def decrypt_raw(self, ciphertexts):
        return [self._priv.raw_decrypt(int(c)) for c in ciphertexts]


def test_decryptor_protocol_is_pluggable(keys, packer):
    dec = _PheDecryptor(keys[1])
    assert isinstance(dec, Decryptor)
    x = _vec(5, 50)
    assert np.max(np.abs(decrypt_vector(dec, packer.encrypt(x)) - x)) <= 2.0**-17
    with pytest.raises(TypeError):
        decrypt_vector("not a key", packer.encrypt(x))  # type: ignore[arg-type]
