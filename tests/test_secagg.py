"""Secure-sum building blocks and input validation: bad vectors, moduli, senders, jobs."""

from __future__ import annotations

import json

import numpy as np
import pytest

from privacy import secagg
from privacy.secagg import (
    SecAggError,
    SecAggLengthError,
    SecAggMessageError,
    SecAggModulusError,
    SecAggProtocolError,
    SecAggThresholdError,
    SecAggUnknownSenderError,
    SecAggUnmaskRefusedError,
    bits_for_sum,
    default_threshold,
)
from privacy.secagg_session import (
    SecAggSessionClient,
    SecAggSessionServer,
    SessionMaskedInput,
    run_secure_sum_session,
)

BITS = 32
LENGTH = 64
JOB = "job-test"


class Started:
    """Three sites past key setup; each site's first masked input opens its inbox."""

    def __init__(self) -> None:
        self.sites = ["site0", "site1", "site2"]
        self.x = {s: np.arange(LENGTH, dtype=np.uint64) * (i + 1)
                  for i, s in enumerate(self.sites)}
        self.server = SecAggSessionServer(2, BITS, LENGTH, JOB, 3, sites=self.sites)
        self.clients = {s: SecAggSessionClient(s, job_id=JOB, threshold=2, bits=BITS,
                                               vector_length=LENGTH, rounds=3)
                        for s in self.sites}
        directory = self.server.collect_keys(c.advertise() for c in self.clients.values())
        self.inboxes = self.server.route_shares(c.share(directory)
                                                for c in self.clients.values())

    def masked(self, site: str = "site0", x: np.ndarray | None = None) -> SessionMaskedInput:
        return self.clients[site].masked_input(1, self.x[site] if x is None else x,
                                               self.inboxes[site])


def test_shamir_needs_threshold_shares() -> None:
    secret = bytes(range(32))
    shares = secagg._split32(secret, 3, 5)
    assert secagg._combine32([(i + 1, shares[i]) for i in (0, 2, 4)]) == secret
    assert secagg._combine32([(i + 1, shares[i]) for i in (0, 2)]) != secret


def test_prg_is_deterministic_per_seed_and_uniform_mod_2_bits() -> None:
    a = secagg.prg_vector(b"\x01" * 32, 20_000, 20)
    assert np.array_equal(a, secagg.prg_vector(b"\x01" * 32, 20_000, 20))
    assert not np.array_equal(a, secagg.prg_vector(b"\x02" * 32, 20_000, 20))
    assert a.max() < 2**20 and abs(a.mean() / 2**20 - 0.5) < 0.01
    with pytest.raises(SecAggError, match="32 bytes"):
        secagg.prg_vector(b"short", 4, 20)


def test_wrong_vector_length_is_rejected_at_client_and_server() -> None:
    job = Started()
    with pytest.raises(SecAggLengthError, match="site0"):
        job.masked(x=job.x["site0"][:-1])
    good = job.masked()
    short = SessionMaskedInput(JOB, "site0", 1, BITS, LENGTH - 1, good.peers, good.data)
    with pytest.raises(SecAggLengthError, match="site0"):
        job.server.collect_masked(1, [short])
    truncated = SessionMaskedInput(JOB, "site0", 1, BITS, LENGTH, good.peers, good.data[:-8])
    others = [job.masked(s) for s in ("site1", "site2")]
    with pytest.raises(SecAggLengthError, match="site0"):
        job.server.collect_masked(1, [truncated, *others])
    # the round was aborted cleanly: the genuine inputs still make the right sum
    assert job.server.round == 0 and job.server.collect_masked(1, [good, *others]) is None
    opened = [job.clients[s].open_sum(job.server.masked_sum(1)) for s in job.sites]
    assert np.array_equal(job.server.collect_opened(1, opened),
                          sum(job.x.values()) & np.uint64(2**BITS - 1))


def test_wrong_modulus_is_rejected_at_client_and_server() -> None:
    job = Started()
    too_big = job.x["site0"].copy()
    too_big[5] = 2**BITS
    with pytest.raises(SecAggModulusError, match="index 5"):
        job.masked(x=too_big)
    with pytest.raises(SecAggModulusError, match="negative"):
        job.masked(x=-np.ones(LENGTH, dtype=np.int64))
    with pytest.raises(SecAggModulusError, match="float"):
        job.masked(x=np.zeros(LENGTH))
    good = job.masked()
    other = SessionMaskedInput(JOB, "site0", 1, 16, LENGTH, good.peers, good.data)
    with pytest.raises(SecAggModulusError, match="2\\^16"):
        job.server.collect_masked(1, [other])


def test_unknown_sender_and_wrong_job_are_rejected() -> None:
    job = Started()
    good = job.masked()
    forged = SessionMaskedInput(JOB, "mallory", 1, BITS, LENGTH, good.peers, good.data)
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        job.server.collect_masked(1, [forged])
    with pytest.raises(SecAggMessageError, match="other-job"):
        job.server.collect_masked(1, [SessionMaskedInput("other-job", "site0", 1, BITS, LENGTH,
                                                         good.peers, good.data)])
    outsider = SecAggSessionClient("mallory", job_id=JOB, threshold=2, bits=BITS,
                                   vector_length=LENGTH, rounds=3)
    server = SecAggSessionServer(2, BITS, LENGTH, JOB, 3, sites=["a", "b"])
    with pytest.raises(SecAggUnknownSenderError, match="mallory"):
        server.collect_keys([outsider.advertise()])


def test_malformed_messages_are_rejected() -> None:
    with pytest.raises(SecAggMessageError, match="JSON"):
        SessionMaskedInput.from_str("not json")
    with pytest.raises(SecAggMessageError, match="missing"):
        SessionMaskedInput.from_str(json.dumps({"kind": "session_masked_input",
                                                "protocol": secagg.PROTOCOL}))
    with pytest.raises(SecAggMessageError, match="other"):
        SessionMaskedInput.from_str('{"kind": "session_masked_input", "protocol": "other"}')


def test_all_errors_are_value_errors() -> None:
    assert issubclass(SecAggError, ValueError)
    assert issubclass(SecAggUnmaskRefusedError, SecAggProtocolError)
    with pytest.raises(SecAggThresholdError, match=">= 2"):
        SecAggSessionServer(1, BITS, LENGTH, JOB, 3)


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
    total = run_secure_sum_session([enc], 3, bits)[0].astype(np.int64)
    decoded = np.where(total >= 2 ** (bits - 1), total - 2**bits, total)
    assert np.all(decoded == -5 * 2**15)
