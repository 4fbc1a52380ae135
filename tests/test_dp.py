"""Tests for privacy.dp: accounting against dp_accounting/Opacus, clipping, distributed noise."""

from __future__ import annotations

import math
import warnings

import dp_accounting
import numpy as np
import pytest
from dp_accounting.rdp import RdpAccountant

from privacy.dp import (
    NOISE_MULTIPLIER_RTOL,
    DpBudgetError,
    DpConfig,
    DpParameterError,
    DpSgdError,
    NonFiniteUpdateError,
    clip_l2,
    epsilon_for,
    make_private_sgd,
    noise_multiplier_for,
    site_noise,
)

DELTA = 1e-5


def _library_epsilon(z: float, rounds: int, delta: float, q: float = 1.0) -> float:
    """dp_accounting called directly (compose with a count, not a SelfComposedDpEvent)."""
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    accountant = RdpAccountant()
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


# --------------------------------------------------------------------------- accounting


@pytest.mark.parametrize(
    ("z", "rounds", "q"),
    [(0.8, 1, 1.0), (1.1, 10, 1.0), (4.7, 20, 1.0), (2.0, 30, 0.05), (1.1, 40, 0.01)],
)
def test_epsilon_for_equals_dp_accounting(z: float, rounds: int, q: float) -> None:
    assert epsilon_for(z, rounds, DELTA, q) == pytest.approx(
        _library_epsilon(z, rounds, DELTA, q), rel=1e-12
    )


def test_epsilon_for_zero_noise_is_infinite() -> None:
    assert epsilon_for(0.0, 5, DELTA) == math.inf


@pytest.mark.parametrize("target", [1.0, 3.0, 10.0])
@pytest.mark.parametrize("rounds", [10, 20])
def test_noise_multiplier_for_inverts_epsilon_for(target: float, rounds: int) -> None:
    z = noise_multiplier_for(target, rounds, DELTA)
    assert epsilon_for(z, rounds, DELTA) <= target  # conservative side
    # minimal up to the documented relative tolerance
    assert epsilon_for(z * (1 - 2 * NOISE_MULTIPLIER_RTOL), rounds, DELTA) > target
    assert epsilon_for(z, rounds, DELTA) == pytest.approx(target, rel=1e-4)


def test_noise_multiplier_for_with_site_sampling() -> None:
    z = noise_multiplier_for(2.0, 30, DELTA, sampling_rate=0.05, rtol=1e-4)
    eps = _library_epsilon(z, 30, DELTA, 0.05)
    assert eps <= 2.0
    assert _library_epsilon(z * (1 - 2e-4), 30, DELTA, 0.05) > 2.0
    # subsampling amplifies privacy: far less noise than with every site in every round
    assert z < noise_multiplier_for(2.0, 30, DELTA)


def test_noise_multiplier_for_unreachable_budget() -> None:
    with pytest.raises(DpBudgetError, match="noise multiplier above"):
        noise_multiplier_for(1e-7, 1000, 1e-12)


@pytest.mark.parametrize(
    "kwargs",
    [
        {"epsilon": 0.0},
        {"epsilon": -1.0},
        {"epsilon": math.inf},
        {"epsilon": 1.0, "delta": 0.0},
        {"epsilon": 1.0, "delta": 1.0},
        {"epsilon": 1.0, "clip": 0.0},
        {"epsilon": 1.0, "clip": math.nan},
        {"epsilon": 1.0, "sampling_rate": 0.0},
        {"epsilon": 1.0, "sampling_rate": 1.5},
    ],
)
def test_dp_config_rejects_bad_parameters(kwargs: dict) -> None:
    with pytest.raises(DpParameterError):
        DpConfig(**kwargs)


def test_plan_round_charges_sum_to_total() -> None:
    config = DpConfig(epsilon=3.0, delta=DELTA, clip=0.5)
    plan = config.plan(20)
    assert plan.enabled and plan.rounds == 20 == len(plan.epsilon_per_round)
    assert plan.noise_multiplier == noise_multiplier_for(3.0, 20, DELTA)
    total = _library_epsilon(plan.noise_multiplier, 20, DELTA)
    assert plan.epsilon_total == pytest.approx(total, rel=1e-12)
    assert plan.epsilon_total <= 3.0
    assert math.fsum(plan.epsilon_per_round) == pytest.approx(plan.epsilon_total, rel=1e-12)
    assert sum(plan.epsilon_per_round) == pytest.approx(plan.epsilon_total, rel=1e-12)
    assert all(c >= 0 for c in plan.epsilon_per_round)
    # each charge is the increment of the accountant's cumulative figure
    for r in (1, 2, 7, 20):
        prev = 0.0 if r == 1 else _library_epsilon(plan.noise_multiplier, r - 1, DELTA)
        now = _library_epsilon(plan.noise_multiplier, r, DELTA)
        assert plan.epsilon_per_round[r - 1] == pytest.approx(now - prev, rel=1e-9, abs=1e-12)
    assert plan.site_noise_std(4) == pytest.approx(plan.noise_multiplier * 0.5 / 2)


def test_plan_with_site_sampling_charges_sum_to_total() -> None:
    plan = DpConfig(epsilon=1.0, sampling_rate=0.05).plan(30)
    assert plan.epsilon_total == pytest.approx(
        _library_epsilon(plan.noise_multiplier, 30, DELTA, 0.05), rel=1e-12
    )
    assert sum(plan.epsilon_per_round) == pytest.approx(plan.epsilon_total, rel=1e-12)


def test_plan_without_dp() -> None:
    plan = DpConfig(epsilon=None).plan(5)
    assert not plan.enabled
    assert plan.noise_multiplier == 0.0 and plan.site_noise_std(3) == 0.0
    assert plan.epsilon_total == math.inf and plan.epsilon_per_round == (math.inf,) * 5


# --------------------------------------------------------------------------- clipping


def test_clip_bounds_norm_of_random_vectors() -> None:
    rng = np.random.default_rng(20240601)
    for case in range(600):
        size = int(rng.integers(1, 2000))
        magnitude = 10.0 ** rng.uniform(-300, 300)
        vec = rng.standard_normal(size) * magnitude
        if case % 5 == 0:  # heavy tails: one coordinate dominating the others
            vec[rng.integers(size)] = magnitude * 1e6 if magnitude < 1e290 else magnitude
        clip = 10.0 ** rng.uniform(-6, 6)
        out, norm = clip_l2(vec, clip)
        assert out.shape == vec.shape
        assert np.all(np.isfinite(out))
        assert np.linalg.norm(out) <= clip
        if norm <= clip:
            np.testing.assert_array_equal(out, vec)
        else:
            # same direction, norm (essentially) clip
            cos = np.dot(out / clip, vec / np.max(np.abs(vec))) / np.linalg.norm(
                vec / np.max(np.abs(vec))
            )
            assert cos == pytest.approx(1.0, abs=1e-9)
            assert np.linalg.norm(out) == pytest.approx(clip, rel=1e-12)


def test_clip_handles_values_near_float_max() -> None:
    vec = np.full(10_000, np.finfo(np.float64).max / 2)
    vec[::2] *= -1
    out, norm = clip_l2(vec, 1.0)
    assert norm == math.inf  # the true norm exceeds float64: reported, not hidden
    assert np.linalg.norm(out) <= 1.0
    assert np.linalg.norm(out) == pytest.approx(1.0)
    assert np.all(np.sign(out) == np.sign(vec))


def test_clip_reports_original_norm_and_keeps_small_vectors() -> None:
    vec = np.array([[3.0, 4.0]], dtype=np.float32)
    out, norm = clip_l2(vec, 10.0)
    assert norm == 5.0 and out.dtype == np.float64
    np.testing.assert_array_equal(out, vec)
    out, norm = clip_l2(vec, 1.0)
    assert norm == 5.0
    np.testing.assert_allclose(out, [[0.6, 0.8]])
    out, norm = clip_l2(np.zeros(3), 1.0)
    assert norm == 0.0 and not out.any()


@pytest.mark.parametrize("bad", [math.nan, math.inf, -math.inf])
def test_clip_rejects_non_finite(bad: float) -> None:
    vec = np.ones(6)
    vec[4] = bad
    with pytest.raises(NonFiniteUpdateError, match=r"site-b.*flat index 4"):
        clip_l2(vec, 1.0, name="site-b")


def test_clip_rejects_bad_clip() -> None:
    with pytest.raises(DpParameterError, match="clip"):
        clip_l2(np.ones(3), -1.0)


# --------------------------------------------------------------------------- noise


def test_sum_of_site_noise_has_central_variance() -> None:
    z, clip, n_sites, dim = 1.3, 0.7, 5, 40_000
    seeds = np.random.SeedSequence(7).spawn(n_sites)
    shares = [site_noise(dim, clip, z, n_sites, np.random.default_rng(s)) for s in seeds]
    central_var = (z * clip) ** 2
    for share in shares:
        assert share.shape == (dim,)
        assert np.var(share) == pytest.approx(central_var / n_sites, rel=0.05)
    total = np.sum(shares, axis=0)
    # sample variance has relative sd sqrt(2/dim) ~ 0.7 %; 5 % is a generous bound
    assert np.var(total) == pytest.approx(central_var, rel=0.05)
    assert abs(np.mean(total)) < 5 * z * clip / math.sqrt(dim)


def test_site_noise_seeding() -> None:
    a = site_noise((3, 4), 1.0, 1.0, 2, rng=123)
    np.testing.assert_array_equal(a, site_noise((3, 4), 1.0, 1.0, 2, rng=123))
    # default: fresh generator seeded from secrets, so two draws differ
    assert not np.array_equal(site_noise(64, 1.0, 1.0, 2), site_noise(64, 1.0, 1.0, 2))
    assert not site_noise(8, 1.0, 0.0, 3).any()
    with pytest.raises(DpParameterError, match="n_sites"):
        site_noise(8, 1.0, 1.0, 0)


# --------------------------------------------------------------------------- Opacus


@pytest.mark.parametrize(
    ("z", "q", "steps"),
    [(1.1, 1.0, 20), (1.1, 0.01, 1000), (2.0, 0.05, 200), (4.0, 0.1, 50)],
)
def test_opacus_rdp_agrees_with_dp_accounting(z: float, q: float, steps: int) -> None:
    from opacus.accountants import RDPAccountant

    opacus_acc = RDPAccountant()
    opacus_acc.history = [(z, q, steps)]
    # same RDP orders: the two libraries must agree to numerical precision
    event = dp_accounting.GaussianDpEvent(z)
    if q < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(q, event)
    same_orders = RdpAccountant(orders=RDPAccountant.DEFAULT_ALPHAS)
    same_orders.compose(event, steps)
    assert same_orders.get_epsilon(DELTA) == pytest.approx(opacus_acc.get_epsilon(DELTA), rel=1e-6)
    # our default (dp_accounting's wider order grid) is never looser than Opacus
    ours = epsilon_for(z, steps, DELTA, q)
    assert ours <= opacus_acc.get_epsilon(DELTA) * (1 + 1e-6)
    assert ours == pytest.approx(opacus_acc.get_epsilon(DELTA), rel=1e-3)


@pytest.mark.filterwarnings("ignore:Optimal order is the largest alpha")
def test_opacus_prv_agrees_with_dp_accounting_pld() -> None:
    from opacus.accountants import PRVAccountant

    prv = PRVAccountant()
    prv.history = [(4.0, 0.1, 50)]
    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(0.1, dp_accounting.GaussianDpEvent(4.0)), 50)
    # both are numerical (discretised) accountants with their own error margins
    assert prv.get_epsilon(DELTA) == pytest.approx(pld.get_epsilon(DELTA), rel=0.03)
    assert prv.get_epsilon(DELTA) <= epsilon_for(4.0, 50, DELTA, 0.1)  # tighter than RDP


def _toy_autoencoder_data(n: int = 64, dim: int = 8):
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    torch.manual_seed(0)
    x = torch.randn(n, dim)
    model = torch.nn.Sequential(torch.nn.Linear(dim, 3), torch.nn.Tanh(), torch.nn.Linear(3, dim))
    loader = DataLoader(TensorDataset(x), batch_size=16)
    return model, loader


def test_dp_sgd_with_opacus_stays_within_target() -> None:
    import torch

    model, loader = _toy_autoencoder_data()
    before = [p.detach().clone() for p in model.parameters()]
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    target, epochs = 3.0, 2
    private = make_private_sgd(model, optimizer, loader, target, DELTA, epochs, 1.0)
    assert private.sample_rate == 0.25 and private.steps == epochs * len(loader)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # torch's full-backward-hook notice
        for _ in range(epochs):
            for (xb,) in private.data_loader:
                private.optimizer.zero_grad()
                loss = torch.nn.functional.mse_loss(private.model(xb), xb)
                loss.backward()
                private.optimizer.step()
    spent = private.epsilon()
    assert 0 < spent <= target
    assert private.engine.accountant.history == [(private.noise_multiplier, 0.25, private.steps)]
    # the ledger's figure (dp_accounting) agrees with Opacus's for the same run
    assert private.planned_epsilon == pytest.approx(
        epsilon_for(private.noise_multiplier, private.steps, DELTA, 0.25), rel=1e-12
    )
    assert private.planned_epsilon == pytest.approx(spent, rel=1e-3)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters(), strict=True))


def test_dp_sgd_rejects_batchnorm_model() -> None:
    import torch

    _, loader = _toy_autoencoder_data()
    model = torch.nn.Sequential(torch.nn.Linear(8, 4), torch.nn.BatchNorm1d(4))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    with pytest.raises(DpSgdError, match="ModuleValidator.fix"):
        make_private_sgd(model, optimizer, loader, 3.0, DELTA, 1, 1.0)
