"""Secure-sum session: correctness over rounds, permanent dropouts, and refused attacks."""

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
    SecAggReconstructionError,
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
    SessionMaskedSum,
    SessionOpenedSum,
    SessionRecoverRequest,
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

    def __init__(self, n: int, threshold: int, rounds: int = 4, seed: int = 0,
                 min_survivors: int = 0) -> None:
        self.x = _rounds_of_vectors(n, rounds, seed)
        self.sites = sorted(self.x[0])
        self.server = SecAggSessionServer(threshold, BITS, LENGTH, JOB, rounds, sites=self.sites)
        self.clients = {s: SecAggSessionClient(s, job_id=JOB, threshold=threshold, bits=BITS,
                                               vector_length=LENGTH, rounds=rounds,
                                               min_survivors=min_survivors)
                        for s in self.sites}
        self.adverts = {s: c.advertise() for s, c in self.clients.items()}
        self.directory = self.server.collect_keys(self.adverts.values())
        self.shares = {s: c.share(self.directory) for s, c in self.clients.items()}
        self.inboxes = self.server.route_shares(self.shares.values())
        self.masked: dict[int, dict[str, SessionMaskedInput]] = {}
        self.recovered: dict[int, dict] = {}
        self.sums: dict[int, np.ndarray] = {}
        self.previous: SessionMaskedSum | None = None

    def mask(self, r: int, live=None) -> SessionRecoverRequest | None:
        """One call per live site: open the previous sum, mask round r."""
        live = self.server.active if live is None else live
        if self.previous is not None:
            opened = [self.clients[s].open_sum(self.previous) for s in live]
            self.sums[self.previous.round] = self.server.collect_opened(self.previous.round,
                                                                        opened)
        self.masked[r] = {s: self.clients[s].masked_input(r, self.x[r - 1][s], self.inboxes[s])
                          for s in live}
        return self.server.collect_masked(r, self.masked[r].values())

    def recover(self, r: int, request, who) -> None:
        self.recovered[r] = {s: self.clients[s].recover(request) for s in who}
        self.server.recover(r, self.recovered[r].values())

    def round(self, r: int, live=None, answering=None) -> None:
        request = self.mask(r, live)
        if request is not None:
            self.recover(r, request, request.survivors if answering is None else answering)
        self.previous = self.server.masked_sum(r)

    def close(self) -> np.ndarray:
        r = self.previous.round
        opened = [self.clients[s].open_sum(self.previous) for s in self.server.survivors]
        self.sums[r] = self.server.collect_opened(r, opened)
        return self.sums[r]


def _rebuild(answers: dict, site: str, sites: list[str]) -> bytes:
    """What the server can rebuild from the recovery answers it received (any t of them)."""
    index = {s: i + 1 for i, s in enumerate(sites)}
    return secagg._combine32([(index[w], base64.b64decode(a.sk_shares[site]))
                              for w, a in answers.items()])


def _strip_pairwise(y, site, r, s_sk, job: Job, peers) -> np.ndarray:
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


def _self_mask(job: Job, site: str, r: int, holder: str = "site0") -> np.ndarray:
    """`site`'s round-r self-mask, as any member (holder of K) can compute it."""
    k = base64.b64decode(json.loads(job.clients[holder].export_state())["group_key"])
    return secagg._prg_u64(secagg_session._self_seed(k, JOB, r, site), LENGTH) & MOD


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


def test_one_call_per_site_per_round_without_dropouts() -> None:
    job = Job(3, 2)
    for r in (1, 2, 3):
        job.round(r)  # no recovery request: collect_masked returned None every round
        assert job.recovered == {}
    assert np.array_equal(job.close(), _plain_sum(job.x[2], job.sites))
    for r in (1, 2):
        assert np.array_equal(job.sums[r], _plain_sum(job.x[r - 1], job.sites))


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
    late = SecAggSessionClient.from_state(job.clients["site3"].export_state())
    with pytest.raises(SecAggUnknownSenderError, match="'site3' was dropped in round 2"):
        job.server.collect_masked(3, [late.masked_input(3, job.x[2]["site3"])])
    # ... the others exclude it from their masks ...
    assert job.mask(3) is None
    assert all("site3" not in m.peers for m in job.masked[3].values())
    # ... and every client refuses a masked sum that calls site3 a survivor again
    revived = SessionMaskedSum(JOB, 3, job.sites, BITS, LENGTH, job.server.masked_sum(3).data)
    for s in job.server.active:
        with pytest.raises(SecAggUnmaskRefusedError, match="site3"):
            SecAggSessionClient.from_state(job.clients[s].export_state()).open_sum(revived)
    job.previous = job.server.masked_sum(3)
    assert np.array_equal(job.close(), _plain_sum(job.x[2], job.server.active))


def test_site_silent_in_recovery_learns_of_the_drop_from_the_survivor_set() -> None:
    vectors = _rounds_of_vectors(4, 4, seed=3)
    sums = run_secure_sum_session(vectors, 2, BITS, drop={2: {"site3"}},
                                  silent_in_recovery={2: {"site2"}})
    for r in (1, 2, 3):
        assert np.array_equal(sums[r], _plain_sum(vectors[r], ["site0", "site1", "site2"]))

    job = Job(4, 2, seed=3)
    job.round(1)
    job.round(2, live=job.sites[:3], answering=["site0", "site1"])
    assert job.clients["site2"].dropped == {}
    job.mask(3)
    assert job.clients["site2"].dropped == {"site3": 2}
    assert job.masked[3]["site2"].peers == ["site0", "site1"]
    assert np.array_equal(job.sums[2], _plain_sum(job.x[1], job.sites[:3]))


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
    request = job.mask(1, live=job.sites[:3])
    with pytest.raises(SecAggThresholdError, match=r"step Recovery of round 1; silent: "
                                                   r"site1, site2"):
        job.recover(1, request, ["site0"])


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
        assert np.count_nonzero((y1 - y2) & MOD) == LENGTH
        assert np.count_nonzero((y1 - job.x[0][s]) & MOD == (y2 - job.x[0][s]) & MOD) == 0


def test_orchestrator_cannot_open_the_masked_sum_or_one_input() -> None:
    job = Job(3, 2)
    job.round(1)
    x0, y0 = job.x[0]["site0"], job.masked[1]["site0"].values()
    truth = _plain_sum(job.x[0], job.sites)
    masked_sum = _unpack_sum(job.server.masked_sum(1))
    assert np.count_nonzero(masked_sum == truth) < 2  # the self-masks are still on the sum
    assert np.count_nonzero(y0 == x0) < 2
    # with a key it does not have (a fresh one, standing in for any guess) it gets noise
    guess = _strip_pairwise(y0, "site0", 1, X25519PrivateKey.generate(), job, ["site1", "site2"])
    assert np.count_nonzero(guess == x0) < 2
    # no secret of any site appears in the server's state or in what it relayed
    seen = job.server.export_state() + "".join(m.to_str() for m in job.masked[1].values())
    for s in job.sites:
        st = json.loads(job.clients[s].export_state())
        for secret in [st["c_sk"], *st["s_sks"], st["k"], st["group_key"]]:
            assert secret not in seen
    # the sites open the sum; that, minus the others' inputs, is all that gives x0 away
    total = job.close()
    assert np.array_equal(total, truth)
    assert np.array_equal((total - job.x[0]["site1"] - job.x[0]["site2"]) & MOD, x0)


def _unpack_sum(msg: SessionMaskedSum) -> np.ndarray:
    return secagg._unpack(msg.data, msg.bits, msg.vector_length, "sum")


def test_late_input_of_a_dropped_site_stays_hidden_by_its_self_mask() -> None:
    """site3 masks round 2 but its reply is lost: the survivors reveal its round-2 key, the
    server strips its pairwise masks from the late reply, and the self-mask still hides it."""
    job = Job(4, 3)
    job.round(1)
    late = SecAggSessionClient.from_state(job.clients["site3"].export_state())
    late.open_sum(job.previous)
    y3 = late.masked_input(2, job.x[1]["site3"]).values()  # never delivered in time
    job.round(2, live=["site0", "site1", "site2"])
    sk = X25519PrivateKey.from_private_bytes(_rebuild(job.recovered[2], "site3", job.sites))
    assert base64.b64encode(sk.public_key().public_bytes_raw()).decode() == \
        job.directory.keys["site3"]["s_pks"][1]  # the server really holds the round-2 key
    stripped = _strip_pairwise(y3, "site3", 2, sk, job, ["site0", "site1", "site2"])
    assert np.count_nonzero(stripped == job.x[1]["site3"]) < 2
    # what a member colluding with the server would add (the README states this limit)
    assert np.array_equal((stripped - _self_mask(job, "site3", 2)) & MOD, job.x[1]["site3"])


def test_dropping_in_round_2_does_not_expose_round_1() -> None:
    """With one long-term mask key, the key revealed for a round-2 dropout would unmask the
    dropout's round-1 input. Per-round keys prevent that, even with the self-masks known."""
    job = Job(4, 3)
    job.round(1)
    job.round(2, live=["site0", "site1", "site2"])
    y1 = job.masked[1]["site3"].values()
    sk2 = X25519PrivateKey.from_private_bytes(_rebuild(job.recovered[2], "site3", job.sites))
    unself = (y1 - _self_mask(job, "site3", 1)) & MOD
    peers = ["site0", "site1", "site2"]
    assert np.count_nonzero(_strip_pairwise(unself, "site3", 1, sk2, job, peers)
                            == job.x[0]["site3"]) < 2
    # positive control: the same computation with the round-1 key (never revealed) works
    sk1 = X25519PrivateKey.from_private_bytes(
        base64.b64decode(json.loads(job.clients["site3"].export_state())["s_sks"][0]))
    assert np.array_equal(_strip_pairwise(unself, "site3", 1, sk1, job, peers), job.x[0]["site3"])


def test_sites_open_each_round_once_and_only_for_the_recovered_survivors() -> None:
    job = Job(4, 2)
    job.mask(1)
    c = job.clients["site0"]
    request = SessionRecoverRequest(JOB, 1, job.sites[:3], ["site3"])
    answer = c.recover(request)
    assert c.recover(request) == answer  # identical retry, identical answer
    with pytest.raises(SecAggUnmaskRefusedError, match="second, different split"):
        c.recover(SessionRecoverRequest(JOB, 1, ["site0", "site1"], ["site2", "site3"]))
    # its key revealed, site3 can no longer be called a survivor of round 1 ...
    sealed = np.arange(LENGTH, dtype=np.uint64)  # any masked sum
    everyone = SessionMaskedSum(JOB, 1, job.sites, BITS, LENGTH, secagg._pack(sealed, BITS))
    resumed = SecAggSessionClient.from_state(c.export_state())  # refusal survives a restart
    with pytest.raises(SecAggUnmaskRefusedError, match=r"revealed keys for survivors"):
        resumed.open_sum(everyone)
    # ... and once opened, round 1 is not opened again with another sum or survivor set
    three = SessionMaskedSum(JOB, 1, job.sites[:3], BITS, LENGTH, secagg._pack(sealed, BITS))
    first = resumed.open_sum(three)
    assert resumed.open_sum(three) == first  # identical retry
    other = SessionMaskedSum(JOB, 1, job.sites[:3], BITS, LENGTH,
                             secagg._pack(sealed + np.uint64(1), BITS))
    with pytest.raises(SecAggUnmaskRefusedError, match="already opened the sum of round 1"):
        resumed.open_sum(other)
    with pytest.raises(SecAggUnmaskRefusedError, match="already opened"):
        resumed.recover(request)


# ---------------------------------------------------------------- client rules


def test_rounds_must_be_in_range_and_strictly_increase() -> None:
    job = Job(3, 2, rounds=4)
    c, x, box = job.clients["site0"], job.x[0]["site0"], job.inboxes["site0"]
    with pytest.raises(SecAggProtocolError, match="first masked input needs its shares inbox"):
        c.masked_input(1, x)
    for bad in (0, 5, -1, 1.0):
        with pytest.raises(SecAggRoundError, match="outside 1..4"):
            c.masked_input(bad, x, box)
    first = c.masked_input(2, x)  # skipping round 1 is allowed
    assert c.masked_input(2, x).to_str() == first.to_str()  # identical retry, identical message
    with pytest.raises(SecAggProtocolError, match="leak the difference"):
        c.masked_input(2, x ^ np.uint64(1))
    with pytest.raises(SecAggRoundError, match="round 1 is over"):
        c.masked_input(1, x)
    for bad in (0, 5):
        with pytest.raises(SecAggRoundError, match="outside 1..4"):
            job.server.collect_masked(bad, [])
    job.server.collect_masked(2, [job.clients[s].masked_input(2, job.x[0][s], job.inboxes[s])
                                  for s in job.sites])
    with pytest.raises(SecAggRoundError, match="strictly increase"):
        job.server.collect_masked(1, [])


def test_open_and_recover_are_refused_outside_the_rules() -> None:
    job = Job(4, 3, min_survivors=4)  # the job's min_sites (4) is above the threshold (3)
    job.mask(1, live=job.sites[:3])
    data = secagg._pack(np.zeros(LENGTH, dtype=np.uint64), BITS)
    c = job.clients["site0"]
    with pytest.raises(SecAggRoundError, match="did not mask round 1"):
        job.clients["site3"].open_sum(SessionMaskedSum(JOB, 1, job.sites, BITS, LENGTH, data))
    with pytest.raises(SecAggRoundError, match="did not mask round 2"):
        c.open_sum(SessionMaskedSum(JOB, 2, job.sites, BITS, LENGTH, data))
    with pytest.raises(SecAggThresholdError, match="only 3 survivors.*at least 4"):
        c.open_sum(SessionMaskedSum(JOB, 1, job.sites[:3], BITS, LENGTH, data))
    with pytest.raises(SecAggProtocolError, match="not listed as a survivor"):
        c.open_sum(SessionMaskedSum(JOB, 1, job.sites[1:], BITS, LENGTH, data))
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        c.open_sum(SessionMaskedSum(JOB, 1, [*job.sites, "mallory"], BITS, LENGTH, data))
    with pytest.raises(SecAggMessageError, match="other-job"):
        c.open_sum(SessionMaskedSum("other-job", 1, job.sites, BITS, LENGTH, data))
    with pytest.raises(SecAggMessageError, match="split its peers"):
        c.recover(SessionRecoverRequest(JOB, 1, job.sites, []))


def test_tampered_or_misrouted_inbox_is_rejected() -> None:
    job = Job(3, 2)
    box = job.server.inbox("site2")
    c, x = job.clients["site2"], job.x[0]["site2"]
    raw = bytearray(base64.b64decode(box.ciphertexts["site1"]))
    raw[30] ^= 0x01
    flipped = SessionInbox(JOB, "site2", box.senders,
                           {**box.ciphertexts, "site1": base64.b64encode(bytes(raw)).decode()})
    with pytest.raises(SecAggDecryptionError, match="from site 'site1' failed AES-GCM"):
        c.masked_input(1, x, flipped)
    swapped = SessionInbox(JOB, "site2", box.senders,
                           {"site0": box.ciphertexts["site1"], "site1": box.ciphertexts["site0"]})
    with pytest.raises(SecAggDecryptionError):
        c.masked_input(1, x, swapped)
    other = job.server.inbox("site1")  # site1's inbox, relabelled for site2
    with pytest.raises(SecAggDecryptionError):
        c.masked_input(1, x, SessionInbox(JOB, "site2", other.senders,
                                          {"site0": other.ciphertexts["site0"],
                                           "site1": other.ciphertexts["site2"]}))
    with pytest.raises(SecAggMessageError, match="delivered to 'site2'"):
        c.masked_input(1, x, other)
    with pytest.raises(SecAggMessageError, match="other-job"):
        c.masked_input(1, x, SessionInbox("other-job", "site2", box.senders, box.ciphertexts))
    assert c.masked_input(1, x, box).round == 1  # the genuine inbox still works


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
    with pytest.raises(SecAggDecryptionError, match="site 'a' failed.*another key directory"):
        clients["b"].masked_input(1, zeros, server.inbox("b"))


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


def test_server_checks_masked_inputs_and_opened_sums() -> None:
    job = Job(3, 2)
    good = job.clients["site0"].masked_input(1, job.x[0]["site0"], job.inboxes["site0"])
    partial = SessionMaskedInput(JOB, "site0", 1, BITS, LENGTH, ["site1"], good.data)
    with pytest.raises(SecAggMessageError, match=r"left out \['site2'\]"):
        job.server.collect_masked(1, [partial])
    wrong_round = SessionMaskedInput(JOB, "site0", 2, BITS, LENGTH, good.peers, good.data)
    with pytest.raises(SecAggMessageError, match="sent round 2 in round 1"):
        job.server.collect_masked(1, [wrong_round])
    forged = SessionMaskedInput(JOB, "mallory", 1, BITS, LENGTH, good.peers, good.data)
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        job.server.collect_masked(1, [forged])
    with pytest.raises(SecAggRoundError, match="no pending recovery"):
        job.server.recover(1, [])
    job2 = Job(3, 2, seed=1)
    job2.round(1)
    opened = [job2.clients[s].open_sum(job2.previous) for s in job2.sites]
    liar = SessionOpenedSum(JOB, "site2", 1, job2.sites,
                            secagg._pack(np.ones(LENGTH, dtype=np.uint64), BITS))
    with pytest.raises(SecAggReconstructionError, match="opened different sums of round 1"):
        job2.server.collect_opened(1, [*opened[:2], liar])
    with pytest.raises(SecAggMessageError, match="over"):
        job2.server.collect_opened(1, [SessionOpenedSum(JOB, "site0", 1, job2.sites[:2],
                                                        opened[0].data)])
    assert np.array_equal(job2.server.collect_opened(1, opened), _plain_sum(job2.x[0], job2.sites))


# ---------------------------------------------------------------- stateless calls


def test_state_export_import_round_trips_mid_protocol() -> None:
    job = Job(4, 3, rounds=3, seed=11)
    job.round(1)
    job.round(2, live=job.sites[:3])
    for c in job.clients.values():
        state = c.export_state()
        assert SecAggSessionClient.from_state(state).export_state() == state
    state = job.server.export_state()
    resumed = SecAggSessionServer.from_state(state)
    assert resumed.export_state() == state and resumed.dropped == {"site3": 2}
    job.server = resumed
    assert np.array_equal(job.close(), _plain_sum(job.x[1], job.sites[:3]))


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
    per_recipient = 4 * (12 + 4 + 32 + 32 * rounds + 16) / 3  # base64(nonce|header|k|shares|tag)
    assert share < (n - 1) * (per_recipient + 20) + 200
    assert len(job.server.inbox("site0").to_str()) < (n - 1) * (per_recipient + 20) + 300
    job.round(1)
    masked = len(job.masked[1]["site0"].to_str())
    assert masked < 4 * LENGTH * 4 / 3 + 300  # 4 bytes per value at 32 bits, base64
    assert len(job.previous.to_str()) < 4 * LENGTH * 4 / 3 + 300


# ---------------------------------------------------------------- buffered sessions


class BufferedJob:
    """A buffered session (``buffered=True``): each round masks over the roster called."""

    def __init__(self, n: int = 4, threshold: int = 2, rounds: int = 4,
                 min_survivors: int = 3) -> None:
        self.x = _rounds_of_vectors(n, rounds)
        self.sites = sorted(self.x[0])
        self.server = SecAggSessionServer(threshold, BITS, LENGTH, JOB, rounds, sites=self.sites,
                                          min_survivors=min_survivors, buffered=True)
        self.clients = {s: SecAggSessionClient(s, job_id=JOB, threshold=threshold, bits=BITS,
                                               vector_length=LENGTH, rounds=rounds,
                                               min_survivors=min_survivors, buffered=True)
                        for s in self.sites}
        directory = self.server.collect_keys([c.advertise() for c in self.clients.values()])
        self.inboxes = self.server.route_shares([c.share(directory)
                                                 for c in self.clients.values()])

    def mask(self, r: int, roster: list[str], who: list[str] | None = None) -> dict:
        return {s: self.clients[s].masked_input(r, self.x[r - 1][s], self.inboxes[s],
                                                roster=roster)
                for s in (roster if who is None else who)}


def test_a_buffered_round_sums_its_roster_and_a_late_site_rejoins_the_next() -> None:
    """Round 1: site3 is called but too slow, so it is recovered for round 1 only; round 2
    calls the other three (site3 still computing): no peer of theirs is missing, no
    recovery; site3 opens both sums it did not add to; round 3 takes it back."""
    job = BufferedJob()
    everyone, fast = job.sites, job.sites[:3]
    masked = job.mask(1, everyone, who=fast)
    request = job.server.collect_masked(1, [m.to_str() for m in masked.values()], everyone)
    assert request is not None and request.dropped == ["site3"]
    revealed = [job.clients[s].recover(request) for s in fast]
    job.server.recover(1, revealed)
    opened = [job.clients[s].open_round(list(masked.values()), revealed) for s in fast]
    assert np.array_equal(job.server.collect_opened(1, opened), _plain_sum(job.x[0], fast))
    late = job.clients["site3"].masked_input(1, job.x[0]["site3"], job.inboxes["site3"],
                                             roster=everyone)  # its late call ends now
    caught = job.clients["site3"].open_round(list(masked.values()), revealed)
    assert np.array_equal(job.clients["site3"].opened_values(caught), _plain_sum(job.x[0], fast))
    # its late input, masked for a round summed without it, is of no use in any later sum
    with pytest.raises(SecAggRoundError):
        job.server.collect_masked(1, [late.to_str()], everyone)

    masked = job.mask(2, fast)
    assert job.server.collect_masked(2, [m.to_str() for m in masked.values()], fast) is None
    sums = {s: job.clients[s].open_round(list(masked.values())) for s in everyone}
    assert {job.clients[s].opened_values(o).tobytes() for s, o in sums.items()} == {
        _plain_sum(job.x[1], fast).tobytes()}

    masked = job.mask(3, everyone)
    assert job.server.collect_masked(3, [m.to_str() for m in masked.values()], everyone) is None
    opened = [job.clients[s].open_round(list(masked.values())) for s in everyone]
    assert np.array_equal(job.server.collect_opened(3, opened), _plain_sum(job.x[2], everyone))


def test_a_buffered_round_refuses_rosters_outside_the_rules() -> None:
    """The roster comes from the orchestrator: a site masks only with members, only if it is
    on it, only with at least min_survivors sites; the server takes inputs masked over
    exactly the roster; a synchronous session takes no roster at all."""
    job = BufferedJob()
    c = job.clients["site0"]
    x, box = job.x[0]["site0"], job.inboxes["site0"]
    with pytest.raises(SecAggUnknownSenderError, match="must list this site"):
        c.masked_input(1, x, box, roster=["site1", "site2", "site3"])
    with pytest.raises(SecAggUnknownSenderError, match="strangers: \\['mallory'\\]"):
        c.masked_input(1, x, box, roster=["site0", "site1", "mallory"])
    with pytest.raises(SecAggThresholdError, match="only 2 sites would mask"):
        c.masked_input(1, x, box, roster=["site0", "site1"])
    with pytest.raises(SecAggMessageError, match="distinct"):
        c.masked_input(1, x, box, roster=["site0", "site1", "site1"])
    with pytest.raises(SecAggMessageError, match="distinct"):
        c.masked_input(1, x, box)  # no roster in a buffered session
    masked = job.mask(1, ["site0", "site1", "site2"])
    with pytest.raises(SecAggMessageError, match="active but left out"):
        job.server.collect_masked(1, [m.to_str() for m in masked.values()], job.sites)
    with pytest.raises(SecAggProtocolError, match="needs its roster"):
        job.server.collect_masked(1, [m.to_str() for m in masked.values()])

    sync = Job(3, 2)
    with pytest.raises(SecAggProtocolError, match="takes no roster"):
        sync.clients["site0"].masked_input(1, sync.x[0]["site0"], sync.inboxes["site0"],
                                           roster=sync.sites)


def test_a_buffered_site_refuses_inputs_masked_over_different_rosters() -> None:
    """A malicious orchestrator shows two sites different rosters in one round: their
    pairwise masks do not cancel, and every site refuses to open what they would form."""
    job = BufferedJob(min_survivors=2)
    a = job.clients["site0"].masked_input(1, job.x[0]["site0"], job.inboxes["site0"],
                                          roster=["site0", "site1", "site2"])
    b = job.clients["site1"].masked_input(1, job.x[0]["site1"], job.inboxes["site1"],
                                          roster=["site0", "site1", "site3"])
    for s in ("site2", "site3"):
        with pytest.raises(SecAggMessageError, match="different rosters"):
            job.clients[s].open_round([a, b])


def test_a_survivor_that_revealed_keys_will_not_open_a_sum_leaving_it_out() -> None:
    """site0 revealed site3's round key as a survivor of {site0, site1, site2}; a masked sum
    of round 1 over {site1, site2, ...} without site0 is refused (it would tell the
    orchestrator a difference of inputs)."""
    job = BufferedJob(min_survivors=2)
    everyone, fast = job.sites, job.sites[:3]
    masked = job.mask(1, everyone, who=fast)
    request = job.server.collect_masked(1, [m.to_str() for m in masked.values()], everyone)
    revealed = [job.clients[s].recover(request) for s in fast]
    job.server.recover(1, revealed)
    without = SessionMaskedSum(JOB, 1, ["site1", "site2"], BITS, LENGTH,
                               job.server.masked_sum(1).data)
    with pytest.raises(SecAggUnmaskRefusedError, match="revealed keys as one of its survivors"):
        job.clients["site0"].open_sum(without)
