"""Secure aggregation: correctness, dropout recovery, and the attacks it must refuse."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from privacy import secagg
from privacy.secagg import (
    MaskedInput,
    SecAggClient,
    SecAggDecryptionError,
    SecAggError,
    SecAggLengthError,
    SecAggMessageError,
    SecAggModulusError,
    SecAggProtocolError,
    SecAggServer,
    SecAggSignatureError,
    SecAggThresholdError,
    SecAggUnknownSenderError,
    SecAggUnmaskRefusedError,
    SharesInbox,
    UnmaskRequest,
    bits_for_sum,
    default_threshold,
    run_secure_sum,
)

BITS = 32
LENGTH = 64
JOB = "job-test"


def _vectors(n: int, seed: int = 0, bits: int = BITS) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    return {f"site{i}": rng.integers(0, 2**bits, LENGTH, dtype=np.uint64) for i in range(n)}


def _plain_sum(vectors: dict[str, np.ndarray], bits: int = BITS) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint64)
    for v in vectors.values():
        total += v
    return total & np.uint64(2**bits - 1)


class Run:
    """Step-by-step protocol run so tests can inspect and tamper with relayed messages."""

    def __init__(self, n: int, threshold: int) -> None:
        self.x = _vectors(n)
        self.sites = sorted(self.x)
        self.server = SecAggServer(threshold, BITS, LENGTH, job_id=JOB, sites=self.sites)
        self.clients = {
            s: SecAggClient(s, job_id=JOB, threshold=threshold, bits=BITS, vector_length=LENGTH)
            for s in self.sites
        }

    def share(self) -> dict[str, SharesInbox]:
        directory = self.server.collect_keys(c.advertise_keys() for c in self.clients.values())
        self.directory = directory
        self.shares = {s: c.share_keys(directory) for s, c in self.clients.items()}
        self.inboxes = self.server.route_shares(self.shares.values())
        return self.inboxes

    def mask(self, live: list[str]) -> dict[str, MaskedInput]:
        self.masked = {s: self.clients[s].masked_input(self.inboxes[s], self.x[s]) for s in live}
        self.request = self.server.collect_masked(self.masked.values())
        return self.masked


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("n,threshold", [(3, 2), (5, 3)])
def test_sum_equals_plain_sum(n: int, threshold: int) -> None:
    vectors = _vectors(n, seed=n)
    assert np.array_equal(run_secure_sum(vectors, threshold, BITS), _plain_sum(vectors))


def test_sum_wraps_mod_2_to_bits_with_full_64_bit_modulus() -> None:
    vectors = {f"s{i}": np.full(LENGTH, 2**64 - 1 - i, dtype=np.uint64) for i in range(3)}
    expected = np.full(LENGTH, (3 * (2**64 - 1) - 3) % 2**64, dtype=np.uint64)
    assert np.array_equal(run_secure_sum(vectors, 2, 64), expected)


def test_one_dropout_after_sharekeys_gives_sum_of_survivors() -> None:
    vectors = _vectors(4, seed=7)
    result = run_secure_sum(vectors, 3, BITS, drop_after_sharing={"site2"})
    survivors = {s: v for s, v in vectors.items() if s != "site2"}
    assert np.array_equal(result, _plain_sum(survivors))


def test_more_dropouts_than_tolerated_is_a_clear_error() -> None:
    with pytest.raises(SecAggThresholdError, match="only 2 of 4 sites answered, threshold is 3"):
        run_secure_sum(_vectors(4), 3, BITS, drop_after_sharing={"site0", "site3"})


def test_too_few_unmask_answers_is_a_clear_error() -> None:
    run = Run(4, 3)
    run.share()
    run.mask(run.sites)
    answers = [run.clients[s].unmask(run.request) for s in run.sites[:2]]
    with pytest.raises(SecAggThresholdError, match="only 2 of 4 sites answered, threshold is 3"):
        run.server.unmask(answers)


def test_signed_key_adverts_are_checked() -> None:
    signers = {s: Ed25519PrivateKey.generate() for s in ("a", "b", "c")}
    pubs = {s: k.public_key() for s, k in signers.items()}

    def verify(site: str, payload: bytes, sig: bytes) -> bool:
        try:
            pubs[site].verify(sig, payload)
        except Exception:
            return False
        return True

    clients = {s: SecAggClient(s, job_id=JOB, threshold=2, bits=BITS, vector_length=LENGTH)
               for s in signers}
    server = SecAggServer(2, BITS, LENGTH, job_id=JOB)
    adverts = [c.advertise_keys(sign=signers[s].sign) for s, c in clients.items()]
    directory = server.collect_keys(adverts)
    clients["a"].share_keys(directory, verify=verify)  # all signatures good
    forged = json.loads(directory.to_str())
    forged["keys"]["c"]["s_pk"] = forged["keys"]["b"]["s_pk"]  # server swaps a key
    with pytest.raises(SecAggSignatureError, match="'c'"):
        clients["b"].share_keys(json.dumps(forged), verify=verify)


# ---------------------------------------------------------------- privacy properties


def test_masked_vector_differs_from_input_and_looks_uniform() -> None:
    zeros = {f"s{i}": np.zeros(4096, dtype=np.uint64) for i in range(3)}
    server = SecAggServer(2, BITS, 4096, job_id=JOB)
    clients = {s: SecAggClient(s, job_id=JOB, threshold=2, bits=BITS, vector_length=4096)
               for s in zeros}
    directory = server.collect_keys(c.advertise_keys() for c in clients.values())
    inboxes = server.route_shares([c.share_keys(directory) for c in clients.values()])
    masked = {s: c.masked_input(inboxes[s], zeros[s]).values() for s, c in clients.items()}
    for y in masked.values():
        assert np.count_nonzero(y) > 4090
        bit_freq = ((y[:, None] >> np.arange(BITS, dtype=np.uint64)) & np.uint64(1)).mean(axis=0)
        assert np.all(np.abs(bit_freq - 0.5) < 0.05)  # ~6 sigma at n=4096
    # what the server holds before unmasking says nothing: partial sums are still masked
    pair = (masked["s0"] + masked["s1"]) & np.uint64(2**BITS - 1)
    assert np.count_nonzero(pair) > 4090


def test_server_cannot_decrypt_relayed_shares() -> None:
    run = Run(3, 2)
    inboxes = run.share()
    blob = base64.b64decode(inboxes["site1"].ciphertexts["site0"])
    # the server knows both public keys but no secret key: any key it can derive is wrong
    server_sk = X25519PrivateKey.generate()
    c_pk0 = X25519PublicKey.from_public_bytes(
        base64.b64decode(run.directory.keys["site0"]["c_pk"]))
    guess = secagg._hkdf(server_sk.exchange(c_pk0), b"any")
    with pytest.raises(InvalidTag):
        AESGCM(guess).decrypt(blob[:12], blob[12:], secagg._share_aad(JOB, "site0", "site1"))
    # and a site other than the recipient cannot read it either (misrouted inbox)
    stolen = SharesInbox(JOB, "site2", inboxes["site1"].senders,
                         {"site0": inboxes["site1"].ciphertexts["site0"],
                          "site1": inboxes["site2"].ciphertexts["site1"]})
    with pytest.raises(SecAggDecryptionError, match="'site0'"):
        run.clients["site2"].masked_input(stolen, run.x["site2"])


def test_tampered_relayed_ciphertext_is_rejected() -> None:
    run = Run(3, 2)
    inboxes = run.share()
    box = inboxes["site2"]
    raw = bytearray(base64.b64decode(box.ciphertexts["site1"]))
    raw[20] ^= 0x01
    tampered = SharesInbox(JOB, "site2", box.senders,
                           {**box.ciphertexts, "site1": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(SecAggDecryptionError, match="site 'site1' failed AES-GCM"):
        run.clients["site2"].masked_input(tampered, run.x["site2"])
    # relabelling the sender (associated data) is caught as well
    swapped = SharesInbox(JOB, "site2", box.senders,
                          {"site0": box.ciphertexts["site1"], "site1": box.ciphertexts["site0"]})
    with pytest.raises(SecAggDecryptionError):
        run.clients["site2"].masked_input(swapped, run.x["site2"])


def test_client_refuses_to_reveal_both_seed_and_mask_key_of_a_peer() -> None:
    run = Run(4, 2)
    run.share()
    run.mask(run.sites)
    client = run.clients["site0"]
    both = UnmaskRequest(JOB, run.sites, ["site3"])
    with pytest.raises(SecAggUnmaskRefusedError, match="site3"):
        client.unmask(both)
    # one consistent request is answered ...
    first = UnmaskRequest(JOB, ["site0", "site1", "site2"], ["site3"])
    answer = client.unmask(first)
    assert set(answer.b_shares) == {"site0", "site1", "site2"}
    assert set(answer.sk_shares) == {"site3"}
    assert client.unmask(first) == answer  # idempotent retry
    # ... but a later request calling site3 a survivor would complete its unmasking
    second = UnmaskRequest(JOB, run.sites, [])
    with pytest.raises(SecAggUnmaskRefusedError, match="site3"):
        client.unmask(second)
    # the refusal survives a state round trip (each step is a separate call at the site)
    again = SecAggClient.from_state(client.export_state())
    with pytest.raises(SecAggUnmaskRefusedError):
        again.unmask(second)


def test_client_refuses_to_mask_a_second_different_input() -> None:
    run = Run(3, 2)
    run.share()
    client = run.clients["site0"]
    y1 = client.masked_input(run.inboxes["site0"], run.x["site0"])
    assert client.masked_input(run.inboxes["site0"], run.x["site0"]) == y1
    with pytest.raises(SecAggProtocolError, match="leak the difference"):
        client.masked_input(run.inboxes["site0"], run.x["site0"] ^ np.uint64(1))


# ---------------------------------------------------------------- stateless steps


def test_state_export_import_round_trip_mid_protocol() -> None:
    run = Run(4, 3)
    directory = run.server.collect_keys(c.advertise_keys().to_str()
                                        for c in run.clients.values())
    states = {}
    shares = []
    for s, c in run.clients.items():
        shares.append(c.share_keys(directory.to_str()).to_str())
        states[s] = c.export_state()
        assert SecAggClient.from_state(states[s]).export_state() == states[s]
    inboxes = run.server.route_shares(shares)
    live = run.sites[:3]  # site3 drops after sharing
    masked = []
    for s in live:
        c = SecAggClient.from_state(states[s])
        masked.append(c.masked_input(inboxes[s].to_str(), run.x[s]).to_str())
        states[s] = c.export_state()
    request = run.server.collect_masked(masked).to_str()
    assert run.server.dropped == ["site3"]
    answers = [SecAggClient.from_state(states[s]).unmask(request).to_str() for s in live]
    result = run.server.unmask(answers)
    assert np.array_equal(result, _plain_sum({s: run.x[s] for s in live}))


def test_corrupt_state_and_messages_are_rejected() -> None:
    with pytest.raises(SecAggMessageError, match="state"):
        SecAggClient.from_state('{"kind": "secagg_client_state"}')
    with pytest.raises(SecAggMessageError, match="masked_input"):
        MaskedInput.from_str('{"kind": "unmask_request"}')
    with pytest.raises(SecAggMessageError, match="JSON"):
        MaskedInput.from_str("not json")


# ---------------------------------------------------------------- validation


def test_wrong_vector_length_is_rejected_at_client_and_server() -> None:
    run = Run(3, 2)
    run.share()
    with pytest.raises(SecAggLengthError, match="site0"):
        run.clients["site0"].masked_input(run.inboxes["site0"], run.x["site0"][:-1])
    good = run.clients["site0"].masked_input(run.inboxes["site0"], run.x["site0"])
    short = MaskedInput(JOB, "site0", BITS, LENGTH - 1, good.data)
    with pytest.raises(SecAggLengthError, match="site0"):
        run.server.collect_masked([short])
    truncated = MaskedInput(JOB, "site0", BITS, LENGTH, good.data[:-8])
    with pytest.raises(SecAggLengthError, match="site0"):
        run.server.collect_masked([truncated])


def test_wrong_modulus_is_rejected_at_client_and_server() -> None:
    run = Run(3, 2)
    run.share()
    too_big = run.x["site0"].copy()
    too_big[5] = 2**BITS
    with pytest.raises(SecAggModulusError, match="index 5"):
        run.clients["site0"].masked_input(run.inboxes["site0"], too_big)
    with pytest.raises(SecAggModulusError, match="negative"):
        run.clients["site0"].masked_input(run.inboxes["site0"], -np.ones(LENGTH, dtype=np.int64))
    with pytest.raises(SecAggModulusError, match="float"):
        run.clients["site0"].masked_input(run.inboxes["site0"], np.zeros(LENGTH))
    good = run.clients["site0"].masked_input(run.inboxes["site0"], run.x["site0"])
    other = MaskedInput(JOB, "site0", 16, LENGTH, good.data)
    with pytest.raises(SecAggModulusError, match="2\\^16"):
        run.server.collect_masked([other])


def test_unknown_sender_is_rejected() -> None:
    run = Run(3, 2)
    run.share()
    good = run.clients["site0"].masked_input(run.inboxes["site0"], run.x["site0"])
    forged = MaskedInput(JOB, "mallory", BITS, LENGTH, good.data)
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        run.server.collect_masked([forged])
    outsider = SecAggClient("mallory", job_id=JOB, threshold=2, bits=BITS, vector_length=LENGTH)
    server = SecAggServer(2, BITS, LENGTH, job_id=JOB, sites=["a", "b"])
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        server.collect_keys([outsider.advertise_keys()])


def test_wrong_job_id_is_rejected() -> None:
    run = Run(3, 2)
    run.share()
    good = run.clients["site0"].masked_input(run.inboxes["site0"], run.x["site0"])
    with pytest.raises(SecAggMessageError, match="other-job"):
        run.server.collect_masked([MaskedInput("other-job", "site0", BITS, LENGTH, good.data)])


def test_all_errors_are_value_errors() -> None:
    assert issubclass(SecAggError, ValueError)
    assert issubclass(SecAggUnmaskRefusedError, SecAggProtocolError)


def test_bits_for_sum_and_default_threshold() -> None:
    assert bits_for_sum(16, 1) == 16
    assert bits_for_sum(16, 2) == 17
    assert bits_for_sum(16, 5) == 19
    assert bits_for_sum(32, 2**32) == 64
    with pytest.raises(SecAggModulusError, match="more than 64"):
        bits_for_sum(60, 100)
    assert [default_threshold(n) for n in (2, 3, 4, 5, 10)] == [2, 2, 3, 3, 6]
    # the chosen modulus really does hold the signed sum: 5 sites x int16 extremes
    bits = bits_for_sum(16, 5)
    vals = {f"s{i}": np.full(LENGTH, -(2**15), dtype=np.int64) for i in range(5)}
    enc = {s: (v % 2**bits).astype(np.uint64) for s, v in vals.items()}
    total = run_secure_sum(enc, 3, bits).astype(np.int64)
    decoded = np.where(total >= 2 ** (bits - 1), total - 2**bits, total)
    assert np.all(decoded == -5 * 2**15)
