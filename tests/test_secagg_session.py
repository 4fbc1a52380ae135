"""Multi-round secure sum: correctness over rounds, permanent dropouts, and refused attacks."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

from privacy import secagg, secagg_session
from privacy.secagg import (
    SecAggDecryptionError,
    SecAggError,
    SecAggMessageError,
    SecAggProtocolError,
    SecAggSignatureError,
    SecAggThresholdError,
    SecAggUnknownSenderError,
    SecAggUnmaskRefusedError,
)
from privacy.secagg_session import (
    SecAggRoundError,
    SecAggSessionClient,
    SecAggSessionServer,
    SessionInbox,
    SessionMaskedInput,
    SessionUnmaskRequest,
    run_secure_sum_session,
)

BITS = 32
LENGTH = 48
JOB = "job-session-test"
MOD = np.uint64(2**BITS - 1)


def _rounds_of_vectors(n: int, rounds: int, seed: int = 0) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{f"site{i}": rng.integers(0, 2**BITS, LENGTH, dtype=np.uint64) for i in range(n)}
            for _ in range(rounds)]


def _plain_sum(vectors: dict[str, np.ndarray], sites) -> np.ndarray:
    total = np.zeros(LENGTH, dtype=np.uint64)
    for s in sites:
        total += vectors[s]
    return total & MOD


class Job:
    """Step-by-step session (live objects) so tests can inspect and tamper with messages."""

    def __init__(self, n: int, threshold: int, rounds: int = 4, seed: int = 0) -> None:
        self.x = _rounds_of_vectors(n, rounds, seed)
        self.sites = sorted(self.x[0])
        self.server = SecAggSessionServer(threshold, BITS, LENGTH, JOB, rounds, sites=self.sites)
        self.clients = {s: SecAggSessionClient(s, job_id=JOB, threshold=threshold, bits=BITS,
                                               vector_length=LENGTH, rounds=rounds)
                        for s in self.sites}
        self.adverts = {s: c.advertise() for s, c in self.clients.items()}
        self.directory = self.server.collect_keys(self.adverts.values())
        self.shares = {s: c.share(self.directory) for s, c in self.clients.items()}
        self.inboxes = self.server.route_shares(self.shares.values())
        self.masked: dict[int, dict[str, SessionMaskedInput]] = {}
        self.answers: dict[int, dict] = {}

    def mask(self, r: int, live=None) -> SessionUnmaskRequest:
        live = self.server.active if live is None else live
        self.masked[r] = {s: self.clients[s].masked_input(r, self.x[r - 1][s]) for s in live}
        return self.server.collect_masked(r, self.masked[r].values())

    def answer(self, r: int, request, who) -> dict:
        self.answers[r] = {s: self.clients[s].unmask(r, request, self.server.inbox(s))
                           for s in who}
        return self.answers[r]

    def round(self, r: int, live=None, answering=None) -> np.ndarray:
        request = self.mask(r, live)
        answers = self.answer(r, request, request.survivors if answering is None else answering)
        return self.server.unmask(r, answers.values())


def _rebuild(answers: dict, field: str, site: str, sites: list[str]) -> bytes:
    """What the server can rebuild from the unmask answers it received (any t of them)."""
    index = {s: i + 1 for i, s in enumerate(sites)}
    return secagg._combine32([(index[w], base64.b64decode(getattr(a, field)[site]))
                              for w, a in answers.items()])


def _pairwise_masks(y, site, r, s_sk, job: Job, peers) -> np.ndarray:
    """Remove `site`'s round-r pairwise masks given a candidate round-r secret key."""
    out = y.copy()
    for v in peers:
        pk = base64.b64decode(job.directory.keys[v]["s_pks"][r - 1])
        stream = secagg._prg_u64(secagg_session._pair_seed(s_sk, pk, JOB, r, site, v), LENGTH)
        if site < v:
            out -= stream
        else:
            out += stream
    return out & MOD


# ---------------------------------------------------------------- correctness


@pytest.mark.parametrize("n,threshold", [(3, 2), (5, 3)])
def test_every_round_equals_the_plain_sum(n: int, threshold: int) -> None:
    vectors = _rounds_of_vectors(n, 4, seed=n)
    sums = run_secure_sum_session(vectors, threshold, BITS)
    assert len(sums) == 4
    for r, got in enumerate(sums):
        assert np.array_equal(got, _plain_sum(vectors[r], vectors[r]))


def test_full_64_bit_modulus_wraps() -> None:
    vectors = [{f"s{i}": np.full(LENGTH, 2**64 - 1 - i, dtype=np.uint64) for i in range(3)}] * 2
    expected = np.full(LENGTH, (3 * (2**64 - 1) - 3) % 2**64, dtype=np.uint64)
    for got in run_secure_sum_session(vectors, 2, 64):
        assert np.array_equal(got, expected)


def test_dropout_in_round_2_is_permanent() -> None:
    vectors = _rounds_of_vectors(4, 4, seed=7)
    sums = run_secure_sum_session(vectors, 3, BITS, drop={2: {"site3"}})
    assert np.array_equal(sums[0], _plain_sum(vectors[0], vectors[0]))
    for r in (1, 2, 3):
        assert np.array_equal(sums[r], _plain_sum(vectors[r], ["site0", "site1", "site2"]))

    job = Job(4, 3, seed=7)
    job.round(1)
    job.round(2, live=["site0", "site1", "site2"])
    assert job.server.dropped == {"site3": 2}
    assert job.server.active == ["site0", "site1", "site2"]
    assert all(job.clients[s].dropped == {"site3": 2} for s in job.server.active)
    # the server no longer takes site3's input ...
    late = job.clients["site3"].masked_input(3, job.x[2]["site3"])
    with pytest.raises(SecAggUnknownSenderError, match="'site3' was dropped in round 2"):
        job.server.collect_masked(3, [late])
    # ... the others exclude it from their masks, the request says it is gone ...
    request = job.mask(3)
    assert all("site3" not in m.peers for m in job.masked[3].values())
    assert request.gone == ["site3"] and request.dropped == []
    # ... and every client refuses a request that calls site3 a survivor again
    revived = SessionUnmaskRequest(JOB, 3, job.sites, [], [])
    for s in job.server.active:
        with pytest.raises(SecAggUnmaskRefusedError, match="site3"):
            job.clients[s].unmask(3, revived, job.server.inbox(s))
    answers = job.answer(3, request, request.survivors)
    assert np.array_equal(job.server.unmask(3, answers.values()),
                          _plain_sum(job.x[2], job.server.active))


def test_site_that_missed_the_drop_notice_still_gets_unmasked() -> None:
    """site2 masks round 2 but misses its unmask request, so in round 3 it still masks with
    the dropped site3: the server then asks for site3's round-3 key as well."""
    vectors = _rounds_of_vectors(4, 4, seed=3)
    sums = run_secure_sum_session(vectors, 2, BITS, drop={2: {"site3"}},
                                  silent_in_unmask={2: {"site2"}})
    for r in (1, 2, 3):
        assert np.array_equal(sums[r], _plain_sum(vectors[r], ["site0", "site1", "site2"]))

    job = Job(4, 2, seed=3)
    job.round(1)
    job.round(2, live=job.sites[:3], answering=["site0", "site1"])
    assert job.clients["site2"].dropped == {}
    request = job.mask(3)
    assert job.masked[3]["site2"].peers == ["site0", "site1", "site3"]
    assert job.masked[3]["site0"].peers == ["site1", "site2"]
    assert request.dropped == ["site3"] and request.gone == []
    answers = job.answer(3, request, request.survivors)
    assert np.array_equal(job.server.unmask(3, answers.values()),
                          _plain_sum(job.x[2], job.sites[:3]))
    assert job.clients["site2"].dropped == {"site3": 3}
    assert job.mask(4).gone == ["site3"]


def test_more_dropouts_than_tolerated_is_a_clear_error() -> None:
    vectors = _rounds_of_vectors(4, 3)
    with pytest.raises(SecAggThresholdError,
                       match=r"only 2 of 4 sites answered, threshold is 3 "
                             r"\(step MaskedInput of round 2; silent: site0, site3\)"):
        run_secure_sum_session(vectors, 3, BITS, drop={2: {"site0", "site3"}})
    with pytest.raises(SecAggThresholdError, match="only 2 of 3 sites answered, threshold is 3 "
                                                   r"\(step MaskedInput of round 3"):
        run_secure_sum_session(vectors, 3, BITS, drop={2: {"site3"}, 3: {"site0"}})
    job = Job(4, 3)
    request = job.mask(1)
    answers = job.answer(1, request, ["site0", "site1"])
    with pytest.raises(SecAggThresholdError, match="step Unmasking of round 1; silent: "
                                                   "site2, site3"):
        job.server.unmask(1, answers.values())


def test_every_site_must_share_during_setup() -> None:
    job = Job(3, 2)
    server = SecAggSessionServer(2, BITS, LENGTH, JOB, 4)
    server.collect_keys(job.adverts.values())
    with pytest.raises(SecAggThresholdError, match=r"sites \['site2'\] advertised keys but did"):
        server.route_shares([job.shares["site0"], job.shares["site1"]])


# ---------------------------------------------------------------- privacy properties


def test_same_input_in_two_rounds_gives_unrelated_masked_vectors() -> None:
    job = Job(3, 2, rounds=2)
    for s in job.sites:
        job.x[1][s] = job.x[0][s]
    job.round(1)
    job.round(2)
    for s in job.sites:
        y1, y2 = job.masked[1][s].values(), job.masked[2][s].values()
        diff = (y1 - y2) & MOD
        assert np.count_nonzero(diff) == LENGTH
        assert np.count_nonzero((y1 - job.x[0][s]) & MOD == (y2 - job.x[0][s]) & MOD) == 0


def test_server_alone_cannot_unmask_one_site() -> None:
    job = Job(3, 2)
    total = job.round(1)
    r, target = 1, "site0"
    x0, y0 = job.x[0][target], job.masked[1][target].values()
    # everything the server holds or has seen: its state, all messages, rebuilt b_{site0,1}
    b0 = _rebuild(job.answers[1], "b_shares", target, job.sites)
    unself = (y0 - secagg._prg_u64(secagg_session._self_seed(b0, JOB, r, target), LENGTH)) & MOD
    assert np.count_nonzero(unself == x0) < 2  # pairwise masks with live peers remain
    # with a key it does not have (a fresh one, standing in for any guess) it gets noise too
    guess = _pairwise_masks(unself, target, r, X25519PrivateKey.generate(), job, ["site1", "site2"])
    assert np.count_nonzero(guess == x0) < 2
    # no secret of any site appears in the server's state
    state = job.server.export_state()
    for s in job.sites:
        st = json.loads(job.clients[s].export_state())
        for secret in [st["c_sk"], *st["s_sks"], *st["bs"]]:
            assert secret not in state
    # the only thing that works is what the sum itself gives away
    others = (job.x[0]["site1"] + job.x[0]["site2"]) & MOD
    assert np.array_equal((total - others) & MOD, x0)


def test_dropping_in_round_2_does_not_expose_round_1() -> None:
    """With one long-term mask key, the key revealed for a round-2 dropout would unmask the
    dropout's round-1 input (whose b the server rebuilt). Per-round keys prevent that."""
    job = Job(4, 3)
    job.round(1)
    job.round(2, live=["site0", "site1", "site2"])
    y1 = job.masked[1]["site3"].values()
    b1 = _rebuild(job.answers[1], "b_shares", "site3", job.sites)
    sk2 = X25519PrivateKey.from_private_bytes(
        _rebuild(job.answers[2], "sk_shares", "site3", job.sites))
    assert base64.b64encode(sk2.public_key().public_bytes_raw()).decode() == \
        job.directory.keys["site3"]["s_pks"][1]  # the server really holds the round-2 key
    unself = (y1 - secagg._prg_u64(secagg_session._self_seed(b1, JOB, 1, "site3"), LENGTH)) & MOD
    peers = ["site0", "site1", "site2"]
    attack = _pairwise_masks(unself, "site3", 1, sk2, job, peers)
    assert np.count_nonzero(attack == job.x[0]["site3"]) < 2
    # positive control: the same computation with the round-1 key (never revealed) works
    sk1 = X25519PrivateKey.from_private_bytes(
        base64.b64decode(json.loads(job.clients["site3"].export_state())["s_sks"][0]))
    assert np.array_equal(_pairwise_masks(unself, "site3", 1, sk1, job, peers), job.x[0]["site3"])


def test_client_refuses_to_reveal_both_seed_and_key_of_a_peer() -> None:
    job = Job(4, 2)
    job.mask(1)
    c, box = job.clients["site0"], job.server.inbox("site0")
    with pytest.raises(SecAggUnmaskRefusedError, match="site3"):
        c.unmask(1, SessionUnmaskRequest(JOB, 1, job.sites, ["site3"], []), box)
    # b of site3 revealed first: its round-1 key is then refused
    everyone = SessionUnmaskRequest(JOB, 1, job.sites, [], [])
    answer = c.unmask(1, everyone, box)
    assert c.unmask(1, everyone, box) == answer  # identical retry
    site3_dropped = SessionUnmaskRequest(JOB, 1, job.sites[:3], ["site3"], [])
    with pytest.raises(SecAggUnmaskRefusedError, match="site3"):
        c.unmask(1, site3_dropped, box)
    # and vice versa in the next round: key of site3 revealed first, then its b refused
    job.mask(2)
    answer = c.unmask(2, SessionUnmaskRequest(JOB, 2, job.sites[:3], ["site3"], []), box)
    assert set(answer.b_shares) == {"site0", "site1", "site2"} and set(answer.sk_shares) == {
        "site3"}
    resumed = SecAggSessionClient.from_state(c.export_state())  # refusal survives a restart
    with pytest.raises(SecAggUnmaskRefusedError, match="site3"):
        resumed.unmask(2, SessionUnmaskRequest(JOB, 2, job.sites, [], []), box)
    with pytest.raises(SecAggUnmaskRefusedError, match="site3"):  # "gone" and survivor at once
        resumed.unmask(2, SessionUnmaskRequest(JOB, 2, job.sites, [], ["site3"]), box)


# ---------------------------------------------------------------- client rules


def test_rounds_must_be_in_range_and_strictly_increase() -> None:
    job = Job(3, 2, rounds=4)
    c, x = job.clients["site0"], job.x[0]["site0"]
    for bad in (0, 5, -1, 1.0):
        with pytest.raises(SecAggRoundError, match="outside 1..4"):
            c.masked_input(bad, x)
    first = c.masked_input(2, x)  # skipping round 1 is allowed
    assert c.masked_input(2, x).to_str() == first.to_str()  # identical retry, identical message
    with pytest.raises(SecAggProtocolError, match="leak the difference"):
        c.masked_input(2, x ^ np.uint64(1))
    with pytest.raises(SecAggRoundError, match="round 1 is over"):
        c.masked_input(1, x)
    for bad in (0, 5):
        with pytest.raises(SecAggRoundError, match="outside 1..4"):
            job.server.collect_masked(bad, [])
    job.server.collect_masked(2, [job.clients[s].masked_input(2, job.x[0][s]) for s in job.sites])
    with pytest.raises(SecAggRoundError, match="strictly increase"):
        job.server.collect_masked(1, [])


def test_unmask_is_refused_for_a_round_not_masked_or_too_few_survivors() -> None:
    job = Job(4, 3)
    request = job.mask(1, live=job.sites[:3])
    box = job.server.inbox("site3")
    with pytest.raises(SecAggRoundError, match="did not mask round 1"):
        job.clients["site3"].unmask(1, request, box)
    c, box = job.clients["site0"], job.server.inbox("site0")
    with pytest.raises(SecAggRoundError, match="did not mask round 2"):
        c.unmask(2, SessionUnmaskRequest(JOB, 2, job.sites, [], []), box)
    with pytest.raises(SecAggMessageError, match="request is for round 1"):
        c.unmask(2, request, box)
    few = SessionUnmaskRequest(JOB, 1, ["site0", "site1"], ["site2", "site3"], [])
    with pytest.raises(SecAggThresholdError, match="only 2 survivors"):
        c.unmask(1, few, box)
    with pytest.raises(SecAggProtocolError, match="not listed as a survivor"):
        c.unmask(1, SessionUnmaskRequest(JOB, 1, job.sites[1:], ["site0"], []), box)
    with pytest.raises(SecAggMessageError, match="neither surviving nor dropped"):
        c.unmask(1, SessionUnmaskRequest(JOB, 1, job.sites[:3], [], []), box)
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        c.unmask(1, SessionUnmaskRequest(JOB, 1, [*job.sites[:3], "mallory"], ["site3"], []),
                 box)


def test_tampered_or_misrouted_inbox_is_rejected() -> None:
    job = Job(3, 2)
    request = job.mask(1)
    box = job.server.inbox("site2")
    c = job.clients["site2"]
    raw = bytearray(base64.b64decode(box.ciphertexts["site1"]))
    raw[30] ^= 0x01
    flipped = SessionInbox(JOB, "site2", box.senders,
                           {**box.ciphertexts, "site1": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(SecAggDecryptionError, match="from site 'site1' failed AES-GCM"):
        c.unmask(1, request, flipped)
    swapped = SessionInbox(JOB, "site2", box.senders,
                           {"site0": box.ciphertexts["site1"], "site1": box.ciphertexts["site0"]})
    with pytest.raises(SecAggDecryptionError):
        c.unmask(1, request, swapped)
    other = job.server.inbox("site1")  # site1's inbox, relabelled for site2
    with pytest.raises(SecAggDecryptionError):
        c.unmask(1, request, SessionInbox(JOB, "site2", other.senders,
                                          {"site0": other.ciphertexts["site0"],
                                           "site1": other.ciphertexts["site2"]}))
    with pytest.raises(SecAggMessageError, match="delivered to 'site2'"):
        c.unmask(1, request, other)
    with pytest.raises(SecAggMessageError, match="other-job"):
        c.unmask(1, request, SessionInbox("other-job", "site2", box.senders, box.ciphertexts))
    assert c.unmask(1, request, box).round == 1  # the genuine inbox still works


def test_sites_shown_different_directories_cannot_read_each_others_shares() -> None:
    clients = {s: SecAggSessionClient(s, job_id=JOB, threshold=2, bits=BITS,
                                      vector_length=LENGTH, rounds=4) for s in ("a", "b", "c")}
    server = SecAggSessionServer(2, BITS, LENGTH, JOB, 4)
    directory = server.collect_keys(c.advertise() for c in clients.values())
    forked = json.loads(directory.to_str())
    forked["keys"]["c"]["signature"] = base64.b64encode(b"x").decode()  # any difference
    server.route_shares([clients["a"].share(json.dumps(forked)), clients["b"].share(directory),
                         clients["c"].share(directory)])
    zeros = np.zeros(LENGTH, dtype=np.uint64)
    request = server.collect_masked(1, [c.masked_input(1, zeros) for c in clients.values()])
    with pytest.raises(SecAggDecryptionError, match="site 'a' failed.*another key directory"):
        clients["b"].unmask(1, request, server.inbox("b"))


def test_signed_key_adverts_are_checked() -> None:
    signers = {s: Ed25519PrivateKey.generate() for s in ("a", "b", "c")}

    def verify(site: str, payload: bytes, sig: bytes) -> bool:
        try:
            signers[site].public_key().verify(sig, payload)
        except Exception:
            return False
        return True

    clients = {s: SecAggSessionClient(s, job_id=JOB, threshold=2, bits=BITS,
                                      vector_length=LENGTH, rounds=3) for s in signers}
    server = SecAggSessionServer(2, BITS, LENGTH, JOB, 3)
    directory = server.collect_keys(c.advertise(sign=signers[s].sign) for s, c in clients.items())
    clients["a"].share(directory, verify=verify)
    forged = json.loads(directory.to_str())
    forged["keys"]["c"]["s_pks"][2] = forged["keys"]["b"]["s_pks"][2]  # swap one round's key
    with pytest.raises(SecAggSignatureError, match="'c'"):
        clients["b"].share(json.dumps(forged), verify=verify)


def test_server_checks_masked_inputs() -> None:
    job = Job(3, 2)
    good = job.clients["site0"].masked_input(1, job.x[0]["site0"])
    partial = SessionMaskedInput(JOB, "site0", 1, BITS, LENGTH, ["site1"], good.data)
    with pytest.raises(SecAggMessageError, match=r"left out \['site2'\]"):
        job.server.collect_masked(1, [partial])
    wrong_round = SessionMaskedInput(JOB, "site0", 2, BITS, LENGTH, good.peers, good.data)
    with pytest.raises(SecAggMessageError, match="sent round 2 in round 1"):
        job.server.collect_masked(1, [wrong_round])
    forged = SessionMaskedInput(JOB, "mallory", 1, BITS, LENGTH, good.peers, good.data)
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        job.server.collect_masked(1, [forged])
    with pytest.raises(SecAggRoundError, match="cannot unmask round 1"):
        job.server.unmask(1, [])


# ---------------------------------------------------------------- stateless calls


def test_state_export_import_between_every_call() -> None:
    job = Job(4, 3, rounds=3, seed=11)
    x, sites = job.x, job.sites
    srv_state = SecAggSessionServer(3, BITS, LENGTH, JOB, 3, sites=sites).export_state()
    states = {s: SecAggSessionClient(s, job_id=JOB, threshold=3, bits=BITS,
                                     vector_length=LENGTH, rounds=3).export_state()
              for s in sites}

    def serve(call):
        nonlocal srv_state
        srv = SecAggSessionServer.from_state(srv_state)
        out = call(srv)
        srv_state = srv.export_state()
        assert SecAggSessionServer.from_state(srv_state).export_state() == srv_state
        return out

    def site(s, call):
        c = SecAggSessionClient.from_state(states[s])
        out = call(c).to_str()
        states[s] = c.export_state()
        assert SecAggSessionClient.from_state(states[s]).export_state() == states[s]
        return out

    adverts = [site(s, lambda c: c.advertise()) for s in sites]
    directory = serve(lambda v: v.collect_keys(adverts).to_str())
    shares = [site(s, lambda c: c.share(directory)) for s in sites]
    assert [site(s, lambda c: c.share(directory)) for s in sites] == shares  # idempotent
    serve(lambda v: {k: m.to_str() for k, m in v.route_shares(shares).items()})
    for r, live in ((1, sites), (2, sites[:3]), (3, sites[:3])):
        masked = [site(s, lambda c, s=s, r=r: c.masked_input(r, x[r - 1][s])) for s in live]
        request = serve(lambda v, r=r, m=masked: v.collect_masked(r, m).to_str())
        answers = [site(s, lambda c, s=s, r=r, q=request: c.unmask(
            r, q, serve(lambda v: v.inbox(s).to_str()))) for s in live]
        total = serve(lambda v, r=r, a=answers: v.unmask(r, a))
        assert np.array_equal(total, _plain_sum(x[r - 1], live))
    assert serve(lambda v: v.dropped) == {"site3": 2}


def test_corrupt_state_and_messages_are_rejected() -> None:
    with pytest.raises(SecAggMessageError, match="state"):
        SecAggSessionClient.from_state('{"kind": "secagg_session_client_state"}')
    with pytest.raises(SecAggMessageError, match="state"):
        SecAggSessionServer.from_state("[]")
    with pytest.raises(SecAggMessageError, match="session_masked_input"):
        SessionMaskedInput.from_str('{"kind": "masked_input"}')
    with pytest.raises(SecAggRoundError):
        SecAggSessionServer(2, BITS, LENGTH, JOB, 0)
    assert issubclass(SecAggRoundError, SecAggError)


# ---------------------------------------------------------------- sizes


def test_message_sizes_are_reasonable() -> None:
    rounds, n = 10, 5
    job = Job(n, 3, rounds=rounds)
    advert = len(job.adverts["site0"].to_str())
    assert advert < 200 + 48 * (rounds + 1)  # base64 X25519 keys + JSON framing
    share = len(job.shares["site0"].to_str())
    per_recipient = 4 * (12 + 4 + 64 * rounds + 16) / 3  # base64(nonce | header | shares | tag)
    assert share < (n - 1) * (per_recipient + 20) + rounds * 48 + 200
    assert len(job.server.inbox("site0").to_str()) < (n - 1) * (per_recipient + 20) + 300
    request = job.mask(1)
    masked = len(job.masked[1]["site0"].to_str())
    assert masked < 4 * LENGTH * 4 / 3 + 300  # 4 bytes per value at 32 bits, base64
    answer = len(job.answer(1, request, ["site0"])["site0"].to_str())
    assert answer < n * 70 + 200
