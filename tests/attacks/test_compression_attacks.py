"""A malicious data scientist (and a malicious member site) against compressed updates.

``JobSpec.compress`` (:mod:`fed_tasks.compression`) changes what a training round sends:
in plain mode the payload a member signs is quantized (``q8`` / ``q16``) or sparse
(``topk:K``) and every other site decodes it itself, strictly; in the secure modes a site
sends ``[w·Δ, w·loss, w]`` with ``w = n / N`` (N from the statistics the site verified
itself) in a fixed point of 8 / 16 bits, clipped and counted, and the secure sum masks each
session round modulo its own phase's width. What compression drops (rounding, the
coordinates top-k leaves out) is kept in the site's private job state and added to its next
update (error feedback).

Each test plays one attack against the real site code: in-process
:func:`datasites.runtime.direct.direct_federation` sites answering through the production
entry point ``run_approved``, with their real signing keys, real secure-sum sessions
(:class:`fed_tasks.aggregation.MaskedSum`). A malicious member signs with its own key
whatever it likes; the scientist relays whatever evidence it likes.

A test that passes documents a defence that holds. Two attacks here first succeeded and
were then fixed: a NaN training update was saved into a compressed secure job's residual,
after which the site's model-state file no longer loaded (the residual is now clipped as
the protection clips), and a member's well-formed plain payload whose row count cancelled
the others' made the aggregate's mean overflow to inf, which every honest site applied and
saved (a training update's row count must now be a whole number of rows, and a site refuses
any aggregate that would leave its model non-finite).
"""

from __future__ import annotations

import base64
import dataclasses
import json
import os
import stat
from contextlib import contextmanager
from typing import Any

import numpy as np
import pytest
from pydantic import ValidationError

from datasites.governance.guard import SiteGuard, register_guard
from datasites.runtime.direct import direct_federation
from datasites.runtime.federation_config import load_site_keys
from datasites.runtime.site_entry import _ModelCall, run_approved
from fed_tasks import compression, site_step
from fed_tasks.aggregation import MaskedSum, PlainSum, _plain_vector
from fed_tasks.codec import PayloadError, dumps, encode_array, loads
from fed_tasks.encoding import secagg_plan
from fed_tasks.interface import SiteRefusedError
from fed_tasks.schedule import fit_codec, phases
from fed_tasks.site_state import ModelStateError, SiteModelState
from fed_tasks.site_step import StepInput, initial_weights, vector_length
from fed_tasks.spec import JobSpec
from privacy.secagg import _pack
from privacy.secagg_session import SessionMaskedInput
from privacy.signing import SignedContribution


# ---------------------------------------------------------------------------- helpers
def _spec(schema, **kw) -> JobSpec:
    """A small, fast autoencoder job (full-batch local training), compressed."""
    base = {"features": schema.features, "label_column": schema.label, "hidden": (8, 4),
            "batch_size": 4096, "trim": 0.0, "local_epochs": 1, "min_local_steps": 5,
            "rounds": 3, "min_sites": 2, "seed": 5}
    return JobSpec(**(base | kw))


@pytest.fixture
def three(partitions):
    return {f"site-{i}": part for i, part in enumerate(partitions)}


def _statistics(spec: JobSpec, sites: list) -> dict[str, Any]:
    agg = PlainSum(spec.min_sites, spec)
    agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
    return agg.evidence()


def _plain_evidence(rnd: int, contributions: list[str]) -> dict[str, Any]:
    return {"kind": "plain", "action": "fit", "round": rnd, "contributions": contributions,
            "heads": []}


def _used(site, spec: JobSpec) -> int:
    return int(site.guard.approval(spec.job_id)["used"]["fit"])


def _model_file(site, spec: JobSpec):
    return site.guard.directory / f"model_{spec.job_id}.json"


def _state(site, spec: JobSpec) -> SiteModelState:
    return SiteModelState.load(spec, initial_weights(spec), _model_file(site, spec))


def _close(sites) -> None:
    for s in sites:
        s.close()


def _restart(site) -> None:
    """The site process stops and starts again on its directory (a new guard read back
    from disk; the model state, with the residual, is read per call)."""
    site.close()
    site.guard.audit.close()
    site.guard = SiteGuard(site.name, site.guard.directory)
    register_guard(site.guard)


def _resign(site, signed: str, payload: str) -> str:
    """``signed`` with another payload, signed by its member's own key (a malicious member
    may sign anything for its own slot)."""
    c = SignedContribution.from_str(signed)
    keys = load_site_keys(site.guard.directory, site.name)
    assert keys is not None
    return SignedContribution.create(keys.signing_key, c.site_id, c.job_id, c.round, payload,
                                     model=c.model).to_str()


def _raw(signed: str) -> bytearray:
    return bytearray(base64.b64decode(SignedContribution.from_str(signed).payload))


def _b64(raw: bytes | bytearray) -> str:
    return base64.b64encode(bytes(raw)).decode("ascii")


def _set(raw: bytearray, offset: int, value: bytes) -> bytearray:
    out = bytearray(raw)
    out[offset:offset + len(value)] = value
    return out


def _put(raw: bytearray, offset: int, value: bytes) -> str:
    return _b64(_set(raw, offset, value))


@contextmanager
def _umask(mask: int):
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


def _refused_unchanged(site, spec: JobSpec, rnd: int, evidence: dict[str, Any],
                       needle: str) -> str:
    """The call is refused with a one-line reason holding ``needle``, uncounted, and the
    site's model (and residual) stay exactly as they were."""
    before_used, before = _used(site, spec), _model_file(site, spec).read_bytes()
    with pytest.raises(SiteRefusedError) as err:
        site.call("fit", {"round": rnd, "previous": evidence})
    reason = str(err.value)
    assert needle in reason, reason
    assert "\n" not in reason and "Traceback" not in reason
    assert _used(site, spec) == before_used
    assert _model_file(site, spec).read_bytes() == before
    return reason


# ------------------------------------ (1) a member's malformed plain compressed payload
def _q_cases(setting: str, raw: bytearray, vec: np.ndarray) -> list[tuple[str, str, str]]:
    """(what, forged payload, the refusal's words) for a q8 / q16 job; raw: the genuine
    bytes ``[n·loss, n] (f8) | lo, step (f8) | codes (u1 / u2)``."""
    other = "q16" if setting == "q8" else "q8"
    f8 = lambda x: np.array([x], "<f8").tobytes()  # noqa: E731
    huge = _b64(bytes(raw) + b"\0" * (4 * 1024 * 1024))
    return [
        ("a NaN minimum", _put(raw, 16, f8(np.nan)), "non-finite or negative scale"),
        ("an infinite step", _put(raw, 24, f8(np.inf)), "non-finite or negative scale"),
        ("a negative step", _put(raw, 24, f8(-1e-3)), "non-finite or negative scale"),
        ("a step that overflows", _put(raw, 24, f8(1e308)), "NaN or infinity"),
        ("min and step that overflow", _put(_set(raw, 16, f8(1.7e308)), 24, f8(1e306)),
         "NaN or infinity"),
        ("a NaN row count", _put(raw, 8, f8(np.nan)), "NaN or infinity"),
        ("an infinite loss", _put(raw, 0, f8(-np.inf)), "NaN or infinity"),
        ("one byte more", _b64(bytes(raw) + b"\x01"), "bytes, expected"),
        ("one byte less", _b64(bytes(raw[:-1])), "bytes, expected"),
        (f"a {other} payload in a {setting} job", compression.encode(other, vec),
         "bytes, expected"),
        ("a top-k payload", compression.encode("topk:5", vec), "bytes, expected"),
        ("an uncompressed float64 update", encode_array(vec), "bytes, expected"),
        ("a single byte", "AA==", "bytes, expected"),
        ("4 MiB of padding", huge, "bytes, expected"),
        ("not base64", "%%% not base64 %%%", "not valid base64"),
        ("base64 with a newline", _b64(raw)[:8] + "\n" + _b64(raw)[8:], "not valid base64"),
        ("non-ASCII text", "é" + _b64(raw)[1:], "not valid base64"),
        ("padding in the middle", _b64(raw[:3]) + "=" + _b64(raw[3:]), "not valid base64"),
    ]


def _topk_cases(raw: bytearray, vec: np.ndarray, k: int, head: int
                ) -> list[tuple[str, str, str]]:
    """For a topk:k job; raw: ``[n·loss, n] (f8) | k indices (u4) | k values (f4)``."""
    idx = np.frombuffer(bytes(raw[16:16 + 4 * k]), "<u4").copy()
    u4 = lambda a: np.asarray(a, "<u4").tobytes()  # noqa: E731
    f4 = lambda x: np.array([x], "<f4").tobytes()  # noqa: E731
    swapped = idx.copy()
    swapped[[0, 1]] = swapped[[1, 0]]
    dup = idx.copy()
    dup[1] = dup[0]
    return [
        ("an index equal to the length", _put(raw, 16 + 4 * (k - 1), u4([head])),
         f"stay below {head}"),
        ("the largest u4 index", _put(raw, 16 + 4 * (k - 1), u4([2**32 - 1])),
         f"stay below {head}"),
        ("a duplicated index", _put(raw, 16, u4(dup)), "increase strictly"),
        ("unsorted indices", _put(raw, 16, u4(swapped)), "increase strictly"),
        ("a NaN value", _put(raw, 16 + 4 * k, f4(np.nan)), "NaN or infinity"),
        ("an infinite value", _put(raw, 16 + 4 * k + 4, f4(np.inf)), "NaN or infinity"),
        ("K + 1 pairs (a larger K than the spec's)", compression.encode(f"topk:{k + 1}", vec),
         "bytes, expected"),
        ("every coordinate (topk:K with K huge)", compression.encode("topk:999999999", vec),
         "bytes, expected"),
        ("K - 1 pairs", compression.encode(f"topk:{k - 1}", vec), "bytes, expected"),
        ("a q8 payload in a top-k job", compression.encode("q8", vec), "bytes, expected"),
    ]


def _round_one_replies(spec: JobSpec, sites: list) -> tuple[list[dict[str, Any]], int]:
    """Every site's genuine round-1 reply (after the statistics), and the fit length."""
    ev0 = _statistics(spec, sites)
    return ([s.call("fit", {"round": 1, "previous": ev0}) for s in sites],
            vector_length(spec, "fit"))


@pytest.mark.parametrize("setting", ["q8", "q16", "topk:5"])
def test_a_members_malformed_compressed_payload_is_refused_by_every_honest_site(
        tmp_path, schema, three, setting):
    """Attack: a malicious member (site-0) signs, for its own slot, a compressed payload
    crafted to crash, blow up or decode differently (NaN/inf/negative scales, overflowing
    min and step, a NaN count, a byte more or less, another setting's payload or K, an
    uncompressed update, 4 MiB of padding, non-base64 / non-ASCII / bad padding, top-k
    indices out of range, duplicated or unsorted, NaN/inf values); the scientist relays it
    in aggregate 1. Defence: each honest site decodes it itself, strictly, and refuses the
    aggregate in one line naming the fault, uncounted, with its model-state file (model and
    residual) byte for byte as before; the honest aggregate then goes through and every site
    holds the same model."""
    spec = _spec(schema, compress=setting)
    sites = direct_federation(tmp_path, spec, three)
    evil, honest = sites[0], sites[1:]
    try:
        r1, length = _round_one_replies(spec, sites)
        genuine = r1[0]["contribution"]
        vec = compression.decode(setting, SignedContribution.from_str(genuine).payload, length)
        raw = _raw(genuine)
        cases = (_topk_cases(raw, vec, 5, length - 2) if setting.startswith("topk")
                 else _q_cases(setting, raw, vec))
        others = [r["contribution"] for r in r1[1:]]
        for what, payload, needle in cases:
            forged = _plain_evidence(1, [_resign(evil, genuine, payload), *others])
            for s in honest:
                reason = _refused_unchanged(s, spec, 2, forged, needle)
                assert "'site-0' holds no valid vector" in reason, (what, reason)
        honest_agg = _plain_evidence(1, [genuine, *others])
        for s in sites:
            s.call("fit", {"round": 2, "previous": honest_agg})
        assert len({_state(s, spec).digest for s in sites}) == 1
    finally:
        _close(sites)


def test_an_odd_but_valid_payload_decodes_alike_at_every_site_and_the_orchestrator(
        tmp_path, schema, three):
    """Attack: a member signs a q8 payload that is valid but unusual (a subnormal step, a
    negative zero minimum, extreme codes, a non-canonical base64 tail: unused bits set, or
    padding after a whole quantum, which the decoder ignores), hoping that two
    sites (or a site and the orchestrator) decode it differently and so train on different
    models. Defence: decoding is a pure function of the payload bytes and the approved
    spec; the honest sites apply the same aggregate and hold the same model digest, and the
    orchestrator's decoding is bit for bit the sites'."""
    spec = _spec(schema, compress="q8")
    sites = direct_federation(tmp_path, spec, three)
    evil, honest = sites[0], sites[1:]
    try:
        r1, length = _round_one_replies(spec, sites)
        raw = _raw(r1[0]["contribution"])
        raw[16:32] = np.array([-0.0, 5e-324], "<f8").tobytes()  # lo = -0, a subnormal step
        raw[32:] = bytes([0, 255] * ((len(raw) - 32) // 2) + [255] * ((len(raw) - 32) % 2))
        text = _b64(raw)
        if text.endswith("="):  # flip unused bits of the last character (non-canonical)
            tail = text.rstrip("=")
            alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"
            text = (tail[:-1] + alphabet[alphabet.index(tail[-1]) | 1]
                    + "=" * (len(text) - len(tail)))
        else:  # padding after a whole quantum: ignored by the decoder
            text += "=="
        assert text != _b64(raw)
        forged = _resign(evil, r1[0]["contribution"], text)
        decoded = _plain_vector(spec, "fit", SignedContribution.from_str(forged).payload,
                                length)
        assert decoded.tobytes() == compression.decode("q8", _b64(raw), length).tobytes()
        agg = _plain_evidence(1, [forged, *(r["contribution"] for r in r1[1:])])
        for s in honest:
            s.call("fit", {"round": 2, "previous": agg})
        a, b = (_state(s, spec) for s in honest)
        assert a.digest == b.digest and a.state.weights.tobytes() == b.state.weights.tobytes()
    finally:
        _close(sites)


@pytest.mark.parametrize("setting", ["none", "q8"])
def test_a_valid_payload_cannot_overflow_an_honest_sites_model(tmp_path, schema, three,
                                                               setting):
    """Attack: a malicious member signs a well-formed payload (it passes every decoding
    check: finite values, exact length) with ``n = 0.5 − Σ honest n`` and every ``n·Δ``
    at 1e308 (q8: minimum 1e308, step 0); the aggregate's total weight is 0.5, so the mean
    Δ is +inf. (Top-k values are float32, at most 3.4e38: they cannot reach this, though
    they can push the weights past float32, after which every step fails, counted.)
    Defence expected: the honest site refuses an aggregate that does not leave its model
    finite, in one line, uncounted, with its model-state file unchanged (it can go on with
    an honest aggregate)."""
    spec = _spec(schema, compress=setting)
    sites = direct_federation(tmp_path, spec, three)
    evil, site = sites[0], sites[1]
    try:
        ev0 = _statistics(spec, sites)
        r1 = [s.call("fit", {"round": 1, "previous": ev0}) for s in sites]
        length = vector_length(spec, "fit")
        honest_n = sum(compression.decode(setting, SignedContribution.from_str(
            r["contribution"]).payload, length)[-1] for r in r1[1:])
        f8 = lambda *x: np.array(x, "<f8").tobytes()  # noqa: E731
        if setting == "none":
            payload = encode_array(np.r_[np.full(length - 2, 1e308), 0.0, 0.5 - honest_n])
        else:
            payload = _b64(f8(0.0, 0.5 - honest_n, 1e308, 0.0) + bytes(length - 2))
        decoded = compression.decode(setting, payload, length)  # well formed: it decodes
        assert np.all(np.isfinite(decoded))
        forged = _plain_evidence(1, [_resign(evil, r1[0]["contribution"], payload),
                                     *(r["contribution"] for r in r1[1:])])
        before_used, before = _used(site, spec), _model_file(site, spec).read_bytes()
        try:
            site.call("fit", {"round": 2, "previous": forged})
            refused = ""
        except SiteRefusedError as exc:
            refused = str(exc)
        try:
            weights = _state(site, spec).state.weights
            state = "finite" if np.all(np.isfinite(weights)) else "non-finite weights"
        except ModelStateError as exc:
            state = str(exc)
        assert state == "finite", f"{site.name}: {state} (reply: {refused or 'accepted'})"
        assert refused and "the call is counted" not in refused, refused
        assert _used(site, spec) == before_used
        assert _model_file(site, spec).read_bytes() == before
    finally:
        _close(sites)


# ------------------------------------------------------ (2) the error-feedback residual
def test_the_residual_is_released_once_never_twice_and_survives_a_restart(
        tmp_path, schema, three):
    """Attack: get a site to release (part of) its error-feedback residual twice — by an
    exact retry of a round, by replaying a round after the next one, by a fork of the
    previous aggregate — or to lose or duplicate it across a restart; and read it from the
    site's reply or a world-readable file. Defence: a retry returns the very same bytes and
    leaves the residual untouched; a replay is refused uncounted; each round's payload is
    exactly ``compress(Δ + residual_before)`` with ``residual_after = Δ + residual_before −
    sent`` (recomputed here from the site's own saved state: nothing is lost or counted
    twice); the residual survives a restart and is used once after it; it is never in a
    reply; the model-state file is 0600 even under umask 0."""
    spec = _spec(schema, compress="topk:5")
    sites = direct_federation(tmp_path, spec, three)
    site = sites[1]
    train = three[site.name][0]
    length = vector_length(spec, "fit")
    plain_spec = spec.model_copy(update={"compress": "none"})

    def residual_now() -> np.ndarray:
        path = _model_file(site, spec)
        if not path.exists():
            return np.zeros(length - 2)
        return _state(site, spec).private.get(compression.RESIDUAL, np.zeros(length - 2))

    def expect(rnd: int, residual: np.ndarray, reply: dict[str, Any]) -> np.ndarray:
        """The site's payload and new residual, recomputed from the model it holds (the
        aggregate before ``rnd``, which a fit call does not move) and its residual before."""
        held = _state(site, spec)
        assert held.applied == rnd - 1
        delta = site_step.fit(plain_spec, train, StepInput(rnd, held.state, None))["vector"]
        private = {compression.RESIDUAL: residual.copy()}
        again = site_step.fit(spec, train, StepInput(rnd, held.state, private))
        payload = SignedContribution.from_str(reply["contribution"]).payload
        assert again["payload"] == payload  # exactly compress(Δ + residual_before)
        sent = compression.decode(spec.compress, payload, length)
        after = held.private[compression.RESIDUAL]
        np.testing.assert_array_equal(after, private[compression.RESIDUAL])
        np.testing.assert_allclose(sent[:-2] + after, delta[:-2] + residual, atol=1e-3,
                                   rtol=1e-6)  # float32 values of the k kept coordinates
        assert np.count_nonzero(sent[:-2]) == 5
        return after

    try:
        with _umask(0):
            ev0 = _statistics(spec, sites)
            before = residual_now()
            r1 = [s.call("fit", {"round": 1, "previous": ev0}) for s in sites]
            res1 = expect(1, before, r1[1])
            agg1 = _plain_evidence(1, [r["contribution"] for r in r1])
            r2 = site.call("fit", {"round": 2, "previous": agg1})
            res2 = expect(2, res1, r2)
            assert not np.array_equal(res1, res2)
            # an exact retry (even with a forked previous aggregate): the same bytes
            saved = _model_file(site, spec).read_bytes()
            fork = _plain_evidence(1, [r1[0]["contribution"], r1[1]["contribution"]])
            for previous in (agg1, fork):
                assert site.call("fit", {"round": 2, "previous": previous}) == r2
            assert _model_file(site, spec).read_bytes() == saved and _used(site, spec) == 2
            # round 1 again after round 2: refused, uncounted, residual untouched
            with pytest.raises(SiteRefusedError, match="out of order"):
                site.call("fit", {"round": 1, "previous": ev0})
            assert _model_file(site, spec).read_bytes() == saved and _used(site, spec) == 2
            for reply in (*r1, r2):
                assert set(reply) <= {"contribution", "round", "audit_head"}, set(reply)
                assert "residual" not in json.dumps(reply)
            mode = stat.S_IMODE(os.stat(_model_file(site, spec)).st_mode)
            assert mode == 0o600, oct(mode)
            assert not list(site.guard.directory.glob("*.tmp"))
            # a restart: the residual comes back from the file, and is used once after it
            r2s = [sites[0].call("fit", {"round": 2, "previous": agg1}), r2,
                   sites[2].call("fit", {"round": 2, "previous": agg1})]
            _restart(site)
            np.testing.assert_array_equal(residual_now(), res2)
            r3 = site.call("fit", {"round": 3, "previous": _plain_evidence(
                2, [r["contribution"] for r in r2s])})
            expect(3, res2, r3)
            assert stat.S_IMODE(os.stat(_model_file(site, spec)).st_mode) == 0o600
    finally:
        _close(sites)


def test_the_message_cannot_set_the_weight_n_over_N_or_the_residual(tmp_path, schema, three):
    """Attack: in a compressed secure job the weight is ``w = n/N``; send N (or a weight, a
    residual, a compression setting) in the round message so that the site weighs its
    update differently, or releases a chosen residual. Defence: a round message carries only
    the round and evidence; any other field is refused by the message schema before
    anything is counted. (N is the count of the statistics the site opened itself.)"""
    spec = _spec(schema, aggregation="secagg", compress="q16")
    sites = direct_federation(tmp_path, spec, three)
    try:
        for extra in ({"rows": 1}, {"N": 10**9}, {"weight": 1.0}, {"residual": "AAAA"},
                      {"compress": "none"}, {"stats": [1.0]}):
            with pytest.raises(SiteRefusedError) as err:
                sites[0].call("fit", {"round": 1, "previous": {
                    "kind": "secagg", "action": "stats", "round": 0}, **extra})
            assert "Extra inputs are not permitted" in str(err.value), str(err.value)
            assert _used(sites[0], spec) == 0
    finally:
        _close(sites)


# --------------------------------------------------------------- (3) the secure modes
def test_secure_widths_hold_every_honest_sum_and_a_member_cannot_change_them(
        tmp_path, schema, three):
    """Attack: (a) a spec whose per-round secure-sum widths let an honest sum wrap
    silently; (b) a malicious member signs its round-1 masked input at another width (the
    statistics' 55 bits, 64 bits), with residues above the round's modulus, or of another
    length, so that sites (or the orchestrator) sum at different widths. Defence: each
    round's width holds ``max_sites`` maximal encodings of its phase, for every compressed
    setting and federation size; every honest site forms the sum itself and refuses an
    input of another width or with out-of-range residues in one line, uncounted, model
    unchanged; with the honest evidence the round goes on, the weights ``w = n/N`` sum to 1
    (N from the site's own statistics), nothing is clipped, and the residual holds only
    rounding (at most half a step: clipping is not carried)."""
    for setting in ("q8", "q16"):
        for mode in ("secagg", "paillier"):
            job = _spec(schema, aggregation=mode, compress=setting)
            assert fit_codec(job) == compression.secure_codec(setting)
            for n in (2, 3, 10, 1000):
                plan = secagg_plan(job, n)
                slots = [p for p in phases(job) for _ in range(p.count)]
                assert len(plan["round_bits"]) == plan["rounds"] == len(slots)
                for bits, p in zip(plan["round_bits"], slots, strict=True):
                    assert p.codec.max_sum(n) < 2 ** bits <= 2 ** plan["bits"] <= 2 ** 64
    spec = _spec(schema, aggregation="secagg", compress="q16")
    sites = direct_federation(tmp_path, spec, three)
    evil, honest = sites[0], sites[1:]
    try:
        agg = MaskedSum(spec, len(sites))
        agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
        agg.submit(sites, "fit", {"round": 1, "previous": agg.evidence()},
                   vector_length(spec, "fit"))
        ev1 = agg.evidence()
        assert [s["clipped"] for s in agg.sent.values()] == [0, 0, 0]
        width = secagg_plan(spec, 3)["round_bits"][1]
        assert width == 18
        inputs = list(ev1["inputs"])
        i = next(k for k, m in enumerate(inputs)
                 if SignedContribution.from_str(m).site_id == evil.name)
        msg = SessionMaskedInput.from_str(SignedContribution.from_str(inputs[i]).payload)
        values = msg.values()
        high = values.copy()
        high[0] |= np.uint64(1 << 20)  # fits the 3 bytes of an 18-bit value, not 2**18
        variants = [
            ("the statistics' width", dataclasses.replace(msg, bits=55,
                                                          data=_pack(values, 55)), "mod 2^18"),
            ("64 bits", dataclasses.replace(msg, bits=64, data=_pack(values, 64)), "mod 2^18"),
            ("residues above 2^18", dataclasses.replace(msg, data=_pack(high, 18)),
             "values >= 2^18"),
            ("another length", dataclasses.replace(msg, vector_length=msg.vector_length - 1,
                                                   data=_pack(values[:-1], 18)), "mod 2^18"),
        ]
        for what, forged, needle in variants:
            signed = _resign(evil, inputs[i], forged.to_str())
            evidence = {**ev1, "inputs": [*inputs[:i], signed, *inputs[i + 1:]]}
            for s in honest:
                reason = _refused_unchanged(s, spec, 2, evidence, needle)
                assert "the secure sum does not open" in reason, (what, reason)
        # the honest evidence still opens (the refusals changed nothing at the sites)
        (opened,) = agg.submit(sites, "fit", {"round": 2, "previous": ev1},
                               vector_length(spec, "fit"))
        step = 1 / compression.secure_codec("q16").scale
        assert abs(opened.vector[-1] - 1.0) <= 3 * step  # Σ n/N over the sites = 1
        for s in sites:
            residual = _state(s, spec).private[compression.RESIDUAL]
            assert np.all(np.abs(residual) <= step / 2 + 1e-12)
        assert [s["clipped"] for s in agg.sent.values()] == [0, 0, 0]
    finally:
        _close(sites)


class _Poisoner:
    """A malicious member with its real site directory, keys and secure-sum session: in
    training round ``rnd`` it runs the real site code up to the step (it opens and applies
    the previous sum like everyone), then masks and signs a crafted vector instead of its
    update (:meth:`_ModelCall.release`: the real protection, clipped to the public bound)."""

    def __init__(self, site, spec: JobSpec, rnd: int, craft) -> None:
        self.site, self.name, self.spec, self.rnd, self.craft = site, site.name, spec, rnd, craft

    def call(self, action: str, message: dict[str, Any]) -> dict[str, Any]:
        if action != "fit" or message.get("round") != self.rnd:
            return self.site.call(action, message)
        call = _ModelCall(self.site.guard, self.name, self.spec, action, loads(dumps(message)))
        return call.release({"vector": self.craft(), "round": self.rnd})

    def close(self) -> None:
        self.site.close()


@pytest.mark.parametrize("setting", ["none", "q16"])
def test_a_non_finite_update_never_poisons_the_saved_residual(tmp_path, schema, three,
                                                              setting):
    """Attack: a malicious member (site-0; its own key, its own secure-sum session) signs
    a round-1 input whose weight slot is one fixed-point step minus the honest sites'
    weights (q16: ``2^-15 − Σ honest n/N``; uncompressed: ``2^-16 − Σ honest n``), so the
    opened sum's total weight is one step and its (bounded) ``w·Δ`` slots become a huge
    mean Δ (q16: about 32,000 per weight). The honest sites verify and apply it (it is a
    valid sum of in-range encodings); their round-2 training from those weights overflows
    to NaN. Uncompressed (the control), the protection zeroes NaN and counts it
    (``clipped``) and the site's state stays readable. Defence expected: the same with
    compression — whatever the update, the residual a site saves is finite, so its
    model-state file stays readable and the job can go on (or stop by the owner's choice,
    not by a corrupt file)."""
    spec = _spec(schema, aggregation="secagg", compress=setting)
    frames = three
    sites = direct_federation(tmp_path, spec, frames)
    codec = fit_codec(spec)
    step = 1 / codec.scale
    rows = {name: len(train) for name, (train, _test) in frames.items()}
    total = sum(rows.values()) if setting != "none" else 1
    honest_w = sum(np.rint(rows[s.name] / total * codec.scale) / codec.scale
                   for s in sites[1:])
    length = vector_length(spec, "fit")

    def craft() -> np.ndarray:
        v = np.full(length, codec.bound)  # every w·Δ at the public bound
        v[-2], v[-1] = 0.0, step - honest_w
        return v

    evil = _Poisoner(sites[0], spec, 1, craft)
    members = [evil, *sites[1:]]
    try:
        agg = MaskedSum(spec, len(members))
        agg.submit(members, "stats", {}, vector_length(spec, "stats"))
        agg.submit(members, "fit", {"round": 1, "previous": agg.evidence()}, length)
        (round1,) = agg.submit(members, "fit", {"round": 2, "previous": agg.evidence()},
                               length)
        assert round1.vector[-1] == pytest.approx(step)  # the opened total weight
        # every honest site verified and applied it, trained round 2 from ~32,000 per weight
        # and released its update with the NaN values zeroed and counted ...
        clipped = {name: v["clipped"] for name, v in agg.sent.items()}
        assert all(clipped[s.name] > length // 2 for s in sites[1:]), clipped
        for s in sites[1:]:  # ... but what did it keep?
            try:
                residual = _state(s, spec).private.get(compression.RESIDUAL, np.zeros(1))
                readable, why = bool(np.all(np.isfinite(residual))), "a non-finite residual"
            except ModelStateError as exc:
                readable, why = False, str(exc)
            assert readable, f"{s.name}: {why}"
    finally:
        _close(sites)


# ----------------------------------------------------------------- (4) the spec's rules
def test_compress_is_refused_where_it_cannot_be_honoured(schema):
    """Attack: a spec that compresses where a site could not keep its promises — with DP
    (noise calibrated to the uncompressed update), SCAFFOLD (control variates in the
    update), a detector without training rounds, a sparse update in a secure sum — or a
    ``compress`` string that parses loosely (a leading zero, a space, a non-ASCII digit,
    a negative or zero K, a non-string). Defence: each is refused when the spec is built,
    in one line; a model-selection job's non-neural candidates run uncompressed; a huge K
    is capped by the update's length at the decoder (no allocation from K)."""
    refused = [
        ({"dp_epsilon": 1.0, "dp_delta": 1e-5, "dp_clip": 1.0}, "differential privacy"),
        ({"strategy": "scaffold"}, "scaffold"),
        ({"model": "pca"}, "no training rounds"),
        ({"model": "hbos"}, "no training rounds"),
        ({"model": "iforest"}, "no training rounds"),
        ({"aggregation": "secagg", "compress": "topk:3"}, "a secure sum needs dense"),
        ({"aggregation": "paillier", "compress": "topk:3"}, "a secure sum needs dense"),
    ]
    for fields, needle in refused:
        with pytest.raises(ValidationError, match=needle) as err:
            _spec(schema, **({"compress": "q8"} | fields))
        assert needle in str(err.value)
    for bad in ("topk:05", "topk:0", "topk:-3", "topk: 3", "q8 ", "Q8", "topk:３",
                "topk:1000000000", "topk:3\n", 8, None):
        with pytest.raises(ValidationError):
            _spec(schema, compress=bad)
    auto = _spec(schema, model="auto", candidates=("ae", "pca", "hbos"), compress="topk:7")
    assert [c.compress for c in auto.candidate_specs] == ["topk:7", "none", "none"]
    big = _spec(schema, compress="topk:999999999")
    length = vector_length(big, "fit")
    vec = np.arange(length, dtype=np.float64)
    assert compression.decode(big.compress, compression.encode(big.compress, vec),
                              length)[:-2].tolist() == vec[:-2].tolist()
    with pytest.raises(PayloadError, match="bytes, expected"):
        compression.decode(big.compress, _b64(b"\0" * (16 + 8 * 10**6)), length)


def test_a_compressed_jobs_spec_edited_at_the_site_is_refused(tmp_path, schema, three):
    """Attack: call the site's entry point with the approved q8 job's spec edited in its
    JSON — another ``compress`` (none, q16, a larger or smaller top-k), the field removed
    (the default), another aggregation — so that the site sends a different encoding than
    the one its owner approved (or decodes the others' payloads differently from them).
    Defence: the running spec must equal the approved one byte for byte; each edit is
    refused in one line before anything is counted or computed."""
    spec = _spec(schema, compress="q8")
    sites = direct_federation(tmp_path, spec, three)
    site = sites[0]
    train, test = three[site.name]
    try:
        approved = json.loads(spec.to_json())
        edits = [{"compress": "none"}, {"compress": "q16"}, {"compress": "topk:1"},
                 {"compress": "topk:100000"}, {"aggregation": "secagg"}]
        variants = [approved | e for e in edits]
        variants.append({k: v for k, v in approved.items() if k != "compress"})
        for edited in variants:
            for action, message in (("stats", {}), ("fit", {"round": 1, "previous": {
                    "kind": "plain", "action": "stats", "round": 0}})):
                envelope = loads(run_approved(
                    site=site.name, job_id=spec.job_id, spec=json.dumps(edited), train=train,
                    test=test, action=action, payload=dumps(message)))
                assert envelope["status"] == "refused", envelope
                assert "differs from the approved one" in envelope["reason"]
        assert site.guard.approval(spec.job_id)["used"].get("fit", 0) == 0
        assert site.guard.approval(spec.job_id)["used"].get("stats", 0) == 0
        assert not _model_file(site, spec).exists()
    finally:
        _close(sites)
