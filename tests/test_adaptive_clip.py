"""Adaptive clipping for client-level DP-FedAvg (Andrew et al., NeurIPS 2021).

What the README claims, each tested on real code and real rows: the clip tracks the target
quantile of the sites' update norms; the release costs exactly the fixed-clip job's epsilon;
a site takes the clip only from the state it derived itself, never from a message; every
party of a secure-sum job derives the same clip; and the spec refuses what it cannot do.
"""

from __future__ import annotations

import math

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant
from pydantic import ValidationError

from fed_tasks import dp_step
from fed_tasks.aggregation import MaskedSum, PlainSum
from fed_tasks.codec import decode_array
from fed_tasks.interface import SiteRefusedError
from fed_tasks.local import LocalSite
from fed_tasks.orchestrator import FederatedTrainer
from fed_tasks.site_state import SiteModelState
from fed_tasks.site_step import initial_weights, vector_length
from fed_tasks.spec import JobSpec
from privacy.dp import (
    DpParameterError,
    adaptive_joint_noise_multiplier,
    adaptive_update_noise_multiplier,
    clip_bit_share,
    default_clip_count_std,
    next_clip,
)
from privacy.signing import SignedContribution

FEATURES = ("f1", "f2")


def _spec(schema=None, **kw) -> JobSpec:
    cols = {"features": schema.features, "label_column": schema.label} if schema else \
        {"features": FEATURES}
    return JobSpec(**cols, **kw)


def _payload(contribution: str) -> np.ndarray:
    return decode_array(SignedContribution.from_str(contribution).payload)


def _paper_step(spec: JobSpec, clip: float, summed: np.ndarray) -> float:
    """The paper's geometric step from one released round, written out here (b̄ clamped to
    [0, 1] as in the authors' TF Privacy code)."""
    fraction = min(max(summed[-2] / summed[-1], 0.0), 1.0)
    return clip * math.exp(-spec.dp_clip_lr * (fraction - spec.dp_clip_quantile))


# ------------------------------------------------------------------ (1) quantile tracking
@pytest.mark.parametrize("gamma", [0.2, 0.5, 0.8])
@pytest.mark.parametrize("start", [1e-2, 1e2])
def test_the_clip_converges_to_the_target_quantile_of_the_update_norms(gamma, start):
    """100 sites with fixed update norms, the paper's σ_b = m/20, noisy counts summed from
    each site's share: from far below or above, the clip settles where a fraction γ of the
    norms lies under it."""
    rng = np.random.default_rng(7)
    norms = rng.lognormal(0.0, 1.0, size=100)
    sigma_b = default_clip_count_std(100, 1.0)
    assert sigma_b == 5.0  # m/20 when that is dearer than a tenth of the round's privacy
    clip, covered = start, []
    for t in range(400):
        count = sum(clip_bit_share(x, clip, sigma_b, len(norms), rng) for x in norms)
        if t >= 300:
            covered.append(np.mean(norms <= clip))
        clip = next_clip(clip, count, len(norms), gamma, 0.2)
    assert np.mean(covered) == pytest.approx(gamma, abs=0.05)
    assert np.quantile(norms, gamma - 0.1) < clip < np.quantile(norms, gamma + 0.1)


def test_one_round_moves_the_clip_by_a_bounded_factor_whatever_the_count():
    """A count that is mostly noise (few sites, large σ_b) cannot throw the clip far: the
    noisy fraction is clamped to [0, 1], so one round multiplies C by e^(−η(1−γ))..e^(ηγ)."""
    for count in (-1e6, -40.0, 0.0, 3.0, 45.0, 1e6):
        step = next_clip(1.0, count, 3, 0.5, 0.2)
        assert math.exp(-0.1) - 1e-12 <= step <= math.exp(0.1) + 1e-12
    assert next_clip(1.0, 1.5, 3, 0.5, 0.2) == 1.0  # b̄ = γ: stays
    assert next_clip(1.0, -1e6, 3, 0.5, 0.2, bounds=(0.5, 1.05)) == 1.05
    spec = _spec(dp_epsilon=1.0, rounds=11, dp_clip=0.5, dp_adaptive_clip=True)
    assert dp_step.largest_clip(spec) == pytest.approx(0.5 * math.exp(0.2 * 0.5 * 10))


def test_real_sites_move_the_clip_to_their_update_norms(partitions, schema):
    """Three in-memory sites on shuttle: from a clip far below their updates, the released
    bits move every party's clip until the share of sites under it matches γ."""
    late: dict[float, tuple[float, float]] = {}
    for gamma in (0.2, 0.8):
        spec = _spec(schema, rounds=16, local_epochs=1, min_local_steps=5, min_sites=3,
                     dp_epsilon=1e5, dp_clip=0.05, dp_adaptive_clip=True,
                     dp_clip_quantile=gamma, dp_clip_lr=1.0, dp_clip_count_std=0.01)
        sites = [LocalSite(f"s{i}", spec, tr, te) for i, (tr, te) in enumerate(partitions)]
        agg = PlainSum(3)
        agg.spec = spec
        agg.submit(sites, "stats", {}, vector_length(spec, "stats"))
        clips, bits = [], []
        for rnd in range(1, spec.rounds + 1):
            agg.submit(sites, "fit", {"round": rnd, "previous": agg.evidence()},
                       vector_length(spec, "fit"))
            clips.append(dp_step.round_clip(spec, sites[0].model.state.server))
            # σ_b = 0.01: the released slot rounds to the site's bit
            bits.append([round(_payload(c)[-2]) for c in agg.evidence()["contributions"]])
            assert len({dp_step.round_clip(spec, s.model.state.server) for s in sites}) == 1
        assert clips[0] == spec.dp_clip and max(clips) > 2 * spec.dp_clip  # it moved up
        assert max(clips) <= dp_step.largest_clip(spec)  # the bound known before the job
        late[gamma] = (float(np.mean(bits[-8:])), float(np.exp(np.mean(np.log(clips[-8:])))))
        assert late[gamma][0] == pytest.approx(gamma, abs=0.2)
    assert late[0.8][1] > late[0.2][1]  # a higher quantile of the same norms


# ------------------------------------------------------------------ (2) accounting
def test_the_release_is_accounted_exactly_as_fixed_clip_dp():
    fixed = _spec(rounds=5, dp_epsilon=3.0, dp_clip=0.5, min_sites=3, aggregation="secagg")
    adaptive = fixed.model_copy(update={"dp_adaptive_clip": True})
    adaptive = JobSpec.model_validate(adaptive.model_dump())
    z = dp_step.client_plan(fixed).noise_multiplier
    rule = dp_step.adaptive_clip(adaptive)
    assert rule is not None and rule.count_std == pytest.approx(z / (2 * math.sqrt(0.1)))
    assert rule.update_noise_multiplier > z  # the bit is paid for with update noise
    assert adaptive_joint_noise_multiplier(rule.update_noise_multiplier,
                                           rule.count_std) == pytest.approx(z, rel=1e-12)
    for k in range(1, 6):
        # the two Gaussian releases of each round (update: sensitivity C, noise z_Δ·C; count:
        # sensitivity 1/2, noise σ_b), composed by dp_accounting, cost what the ledger charges
        acc = RdpAccountant()
        acc.compose(dp_accounting.SelfComposedDpEvent(dp_accounting.ComposedDpEvent([
            dp_accounting.GaussianDpEvent(rule.update_noise_multiplier),
            dp_accounting.GaussianDpEvent(2 * rule.count_std)]), k))
        charged = dp_step.cumulative_epsilon(adaptive, k)
        assert charged == dp_step.cumulative_epsilon(fixed, k)
        assert acc.get_epsilon(fixed.dp_delta) == pytest.approx(charged, rel=1e-9)
    assert dp_step.cumulative_epsilon(adaptive, 5) <= 3.0


def test_a_site_adds_the_update_noise_of_z_delta_and_the_count_noise_of_sigma_b():
    spec = _spec(rounds=3, dp_epsilon=2.0, dp_clip=0.3, min_sites=3, aggregation="paillier",
                 dp_adaptive_clip=True)
    rule = dp_step.adaptive_clip(spec)
    assert rule is not None
    server = {dp_step.CLIP_KEY: np.array([0.7])}  # C_t as the site's own state holds it
    rng = np.random.default_rng(3)
    vecs = np.stack([dp_step.private_update(spec, np.zeros(400), 3, server, rng=rng)
                     for _ in range(400)])
    assert np.all(vecs[:, -1] == 1.0)  # unit weight
    assert np.std(vecs[:, :-2]) == pytest.approx(rule.update_noise_multiplier * 0.7
                                                 / math.sqrt(3), rel=0.02)
    assert np.mean(vecs[:, -2]) == pytest.approx(1.0, abs=0.3 * rule.count_std)  # ‖0‖ <= C
    assert np.std(vecs[:, -2]) == pytest.approx(rule.count_std / math.sqrt(3), rel=0.1)


# ------------------------------------------------------------------ (3) the message
def _held_clip(site, spec) -> float:
    """The clip a real site holds, read from its own state file."""
    state = SiteModelState.load(spec, initial_weights(spec),
                                site.guard.directory / f"model_{spec.job_id}.json")
    return float(state.state.server[dp_step.CLIP_KEY][0])


def test_a_message_cannot_set_the_clip(tmp_path, partitions, schema, dp_sites):
    """Real site entry points (plain mode): a message naming a clip is refused, evidence
    forged to move the clip is refused, and the update a site releases is clipped to the
    C_t that the released sums give — far below the clip the attacker wanted."""
    spec = _spec(schema, rounds=3, dp_epsilon=1e4, dp_clip=1e-3, min_sites=2,
                 dp_adaptive_clip=True, dp_clip_lr=1.0)
    sites = dp_sites(tmp_path, spec, {f"clip-{i}": p for i, p in enumerate(partitions[:2])},
                     schema)
    try:
        agg = PlainSum(2)
        agg.spec = spec
        released = [agg.submit(sites, "stats", {}, vector_length(spec, "stats"))]
        for rnd in (1, 2):
            released.append(agg.submit(sites, "fit", {"round": rnd, "previous": agg.evidence()},
                                       vector_length(spec, "fit")))
        evidence = agg.evidence()
        with pytest.raises(SiteRefusedError, match="clip"):
            sites[0].call("fit", {"round": 3, "previous": evidence, "clip": 100.0})
        with pytest.raises(SiteRefusedError, match="weights"):
            sites[0].call("fit", {"round": 3, "previous": evidence, "weights": "AAAA"})
        forged = dict(evidence)  # site 1's round-2 bit rewritten: a sum that blows up C
        c = SignedContribution.from_str(evidence["contributions"][1])
        vec = _payload(evidence["contributions"][1])
        vec[-2] = -1e4
        from fed_tasks.codec import encode_array

        forged["contributions"] = [evidence["contributions"][0], SignedContribution(
            c.site_id, c.job_id, c.round, encode_array(vec), c.signature, c.model).to_str()]
        with pytest.raises(SiteRefusedError):
            sites[0].call("fit", {"round": 3, "previous": forged})

        reply = sites[0].call("fit", {"round": 3, "previous": evidence})
        clip = spec.dp_clip  # C_2 by the paper's formula, from the two released sums
        for (rel,) in released[1:]:
            clip = _paper_step(spec, clip, rel.vector)
        assert _held_clip(sites[0], spec) == pytest.approx(clip, rel=1e-12)
        assert 2 * spec.dp_clip < clip < 10 * spec.dp_clip  # it moved, and not by a message
        # the site clipped to C_2: its released norm is C_2 with the noise z_Δ·C_2 per value
        out = _payload(reply["contribution"])
        p = out.size - 2
        z_update = dp_step.update_noise_multiplier(spec)
        expected = clip * math.sqrt(1 + z_update ** 2 * p)
        assert np.linalg.norm(out[:-2]) == pytest.approx(expected, rel=0.1)
        assert np.linalg.norm(out[:-2]) < 1e-3 * 100.0
    finally:
        for s in sites:
            s.close()


# ------------------------------------------------------------------ (4) secure sum
class RecordingMaskedSum(MaskedSum):
    """The job's secure sum, keeping every sum it releases (what the orchestrator sees)."""

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self.released: list = []

    def submit(self, *args, **kw):
        out = super().submit(*args, **kw)
        self.released += out
        return out

    def finish(self, sites):
        out = super().finish(sites)
        self.released += out
        return out


def test_every_party_of_a_secure_sum_job_derives_the_same_clip(tmp_path, partitions, schema,
                                                             dp_sites):
    """secagg through the real site entry points: the orchestrator and each site hold the
    same C_t after the job, the one the released counts give by the paper's formula, and
    the ledgers charged exactly the fixed-clip job's epsilon."""
    spec = _spec(schema, rounds=3, dp_epsilon=5e3, dp_clip=0.01, min_sites=3,
                 aggregation="secagg", dp_adaptive_clip=True, dp_clip_lr=0.5)
    sites = dp_sites(tmp_path, spec, {f"sec-{i}": p for i, p in enumerate(partitions[:3])},
                     schema)
    try:
        secure = RecordingMaskedSum(spec, len(sites))
        result = FederatedTrainer(spec, sites, progress=False, secure_sum=secure).fit()
        assert result.rounds_completed == 3 and result.state is not None
        clip = float(result.state.server[dp_step.CLIP_KEY][0])
        sums = [rel.vector for rel in secure.released if rel.action == "fit"]
        assert len(sums) == 3 and all(v[-1] == pytest.approx(3.0) for v in sums)
        expected = spec.dp_clip
        for v in sums:
            expected = _paper_step(spec, expected, v)
        assert clip == pytest.approx(expected, rel=1e-9) and clip > 1.1 * spec.dp_clip
        assert {_held_clip(s, spec) for s in sites} == {clip}
        fixed = spec.model_copy(update={"dp_adaptive_clip": False})
        for s in sites:
            assert s.guard.privacy.job_epsilon(spec.job_id) == pytest.approx(
                dp_step.cumulative_epsilon(fixed, 3), rel=1e-12)
    finally:
        for s in sites:
            s.close()


# ------------------------------------------------------------------ (5) validation
@pytest.mark.parametrize(("kw", "match"), [
    ({"dp_adaptive_clip": True}, "needs dp_epsilon"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "dp_sgd": True, "trim": 0.0}, "dp_sgd=False"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "model": "pca"}, "pca/hbos"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "model": "hbos"}, "pca/hbos"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "strategy": "scaffold"}, "scaffold"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "strategy": "median"}, "median"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "dp_clip_quantile": 1.0},
     "dp_clip_quantile"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "dp_clip_quantile": 0.0},
     "dp_clip_quantile"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "dp_clip_lr": 0.0}, "dp_clip_lr"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "dp_clip_lr": 5.0}, "dp_clip_lr"),
    ({"dp_adaptive_clip": True, "dp_epsilon": 1.0, "rounds": 10, "dp_clip_count_std": 1.0},
     r"dp_clip_count_std=1: .*2·σ_b > the noise multiplier z = 12\.79"),
    ({"dp_epsilon": 1.0, "dp_clip_count_std": 10.0}, "set dp_adaptive_clip=True"),
])
def test_the_spec_refuses_what_adaptive_clipping_cannot_do(kw, match):
    with pytest.raises(ValidationError, match=match):
        _spec(**kw)


def test_sigma_b_must_leave_room_for_the_update():
    assert adaptive_update_noise_multiplier(0.0, 1.0) == 0.0
    with pytest.raises(DpParameterError, match="count_std"):
        adaptive_update_noise_multiplier(2.0, 1.0)  # 2σ_b == z: z_Δ infinite
    assert adaptive_update_noise_multiplier(2.0, 1.0 + 1e-9) > 1e3
    ok = _spec(dp_epsilon=1.0, rounds=10, dp_adaptive_clip=True, dp_clip_count_std=6.5,
               strategy="fedadam", aggregation="secagg")
    assert dp_step.adaptive_clip(ok).count_std == 6.5  # type: ignore[union-attr]
    assert dp_step.adaptive_clip(_spec(dp_epsilon=1.0)) is None


def test_the_owner_reads_adaptive_clipping_in_plain_words():
    from datasites.governance.review import _privacy

    spec = _spec(dp_epsilon=2.0, rounds=4, dp_clip=0.3, dp_adaptive_clip=True,
                 dp_clip_quantile=0.7, min_sites=3, aggregation="secagg")
    words = _privacy(spec)
    rule = dp_step.adaptive_clip(spec)
    assert rule is not None
    for part in ("starts at 0.3", "70%", "learning rate 0.2", f"{rule.count_std:.3g}",
                 "released noisy counts only"):
        assert part in words
    assert "adaptive" not in _privacy(spec.model_copy(update={"dp_adaptive_clip": False}))
