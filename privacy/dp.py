"""Differential privacy for federated training: clipping, distributed noise, accounting.

Two granularities are offered and they protect different things:

* **Client-level DP (DP-FedAvg, McMahan et al. 2018)** -- the privacy unit is a whole site.
  Each site clips its model update to L2 norm ``C`` (:func:`clip_l2`) and adds its share of
  Gaussian noise (:func:`site_noise`), ``N(0, (z*C)^2 / n)`` per coordinate, so that the *sum*
  of the ``n`` noisy updates carries ``N(0, (z*C)^2)``: the Gaussian mechanism with
  sensitivity ``C`` under add/remove-one-site. Because each site noises its own update, this
  composes with secure aggregation: the orchestrator only ever sees the noisy sum.
  Neighbouring relation: "zero-out" -- one site's update replaced by the null (zero) update
  while every site still sends its noise share, so both worlds carry the full noise and the
  average's denominator ``n`` stays public and fixed. For Gaussian events dp_accounting's
  RDP is the same under zero-out and add/remove-one. Replacing a site's update by an
  *arbitrary* other one doubles the sensitivity (2C) and is not what is accounted here.
  Trust assumption: a site knows its own noise share, so ``t`` colluding sites leave only
  ``(n - t)/n`` of the variance against the others, and sites that drop out of a round lower
  the total noise the same way. Pass ``n_sites`` = the number of honest sites you rely on
  (<= the real count) to keep slack.
* **Adaptive clipping** (Andrew, Thakkar, McMahan, Ramaswamy, NeurIPS 2021; Flower's
  ``DifferentialPrivacy*AdaptiveClipping``) for client-level DP: each round every site also
  releases the bit ``b = 1[‖Δ‖ <= C_t]`` with its share of ``N(0, σ_b²)`` on the summed count
  (:func:`clip_bit_share`), and every party moves the clip geometrically towards the
  ``γ``-quantile of the update norms from the *released noisy* count (:func:`next_clip`;
  the noisy fraction clamped to [0, 1], as in the authors' TF Privacy implementation).
  The bit costs privacy, so the update's noise multiplier rises to
  ``z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2)`` (:func:`adaptive_update_noise_multiplier`) and the
  round's joint release is exactly a Gaussian mechanism with the job's ``z``
  (:func:`adaptive_joint_noise_multiplier`): with ``n`` public, releasing ``Σb`` is releasing
  ``Σ(b − 1/2)``, each term in ``{−1/2, 1/2}`` against the null contribution's 0, so the bit's
  sensitivity is 1/2 and its RDP ``α/(2(2σ_b)²)`` adds to the update's ``α/(2z_Δ²)``.
* **Sample-level DP-SGD** -- the privacy unit is one training row at one site, via Opacus
  (:func:`make_private_sgd`).

Accounting always goes through Google's ``dp_accounting`` RDP accountant, never a
hand-written formula. Noise is floating-point Gaussian from numpy's PCG64 seeded from
``secrets``: unpredictable, but not a constant-time or discrete sampler (see Mironov 2012 on
floating-point attacks), which is the standard DP-FedAvg practice.

This module imports neither syft nor anything from ``datasites``/``fed_tasks``.
"""

from __future__ import annotations

import math
import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

import dp_accounting
import numpy as np
from dp_accounting.rdp import RdpAccountant, compute_epsilon

if TYPE_CHECKING:  # torch/opacus are only needed for DP-SGD; keep the numpy path light.
    import torch
    from opacus import PrivacyEngine

__all__ = [
    "DpBudgetError",
    "DpConfig",
    "DpError",
    "DpParameterError",
    "DpPlan",
    "DpSgdError",
    "NonFiniteUpdateError",
    "PrivateSgd",
    "adaptive_joint_noise_multiplier",
    "adaptive_update_noise_multiplier",
    "clip_bit_share",
    "clip_l2",
    "default_clip_count_std",
    "epsilon_for",
    "make_private_sgd",
    "next_clip",
    "noise_multiplier_for",
    "site_noise",
]

#: Relative tolerance of :func:`noise_multiplier_for` on the noise multiplier.
NOISE_MULTIPLIER_RTOL = 1e-6
_MAX_NOISE_MULTIPLIER = 1e6
_MIN_NOISE_MULTIPLIER = 1e-4


class DpError(ValueError):
    """Base class for every differential-privacy error of this module."""


class DpParameterError(DpError):
    """A DP parameter (epsilon, delta, clip, rounds, sampling rate...) is out of range."""


class NonFiniteUpdateError(DpError):
    """A contribution contains NaN or inf; its norm (hence its sensitivity) is undefined."""


class DpBudgetError(DpError):
    """No noise multiplier in the searched range reaches the requested epsilon."""


class DpSgdError(DpError):
    """The model or data loader cannot be made private by Opacus."""


# --------------------------------------------------------------------------- validation


def _positive_finite(name: str, value: float) -> float:
    value = float(value)
    if not math.isfinite(value) or value <= 0:
        raise DpParameterError(f"{name} must be a finite number > 0, got {value!r}")
    return value


def _check_delta(delta: float) -> float:
    delta = float(delta)
    if not 0.0 < delta < 1.0:
        raise DpParameterError(f"delta must lie in (0, 1), got {delta!r}")
    return delta


def _check_rounds(rounds: int, name: str = "rounds") -> int:
    if isinstance(rounds, bool) or not isinstance(rounds, int | np.integer) or rounds < 1:
        raise DpParameterError(f"{name} must be an integer >= 1, got {rounds!r}")
    return int(rounds)


def _check_sampling_rate(sampling_rate: float) -> float:
    q = float(sampling_rate)
    if not 0.0 < q <= 1.0:
        raise DpParameterError(f"sampling_rate must lie in (0, 1], got {sampling_rate!r}")
    return q


def _check_noise_multiplier(noise_multiplier: float) -> float:
    z = float(noise_multiplier)
    if not math.isfinite(z) or z < 0:
        raise DpParameterError(f"noise_multiplier must be finite and >= 0, got {z!r}")
    return z


# --------------------------------------------------------------------------- clipping


def clip_l2(vec: np.ndarray, clip: float, *, name: str = "update") -> tuple[np.ndarray, float]:
    """Scale ``vec`` so its L2 norm is at most ``clip``; return ``(clipped, original_norm)``.

    Clipping is what bounds one contributor's sensitivity, so the bound must hold even for
    adversarially huge inputs: the norm is computed on ``vec / max|vec|`` so squares never
    overflow, and the result is nudged down if rounding left it a hair above ``clip``.
    The output is float64 with ``vec``'s shape; ``original_norm`` may be ``inf`` if the true
    norm exceeds the float64 range. ``name`` (e.g. the site) is quoted in error messages.
    """
    clip = _positive_finite("clip", clip)
    arr = np.asarray(vec)
    if arr.dtype.kind not in "biuf":
        raise DpParameterError(f"{name}: expected a real numeric array, got dtype {arr.dtype}")
    arr = arr.astype(np.float64, copy=True)
    if arr.size == 0:
        return arr, 0.0
    finite = np.isfinite(arr)
    if not finite.all():
        n_nan = int(np.isnan(arr).sum())
        n_inf = int(arr.size - finite.sum() - n_nan)
        first = int(np.flatnonzero(~finite.ravel())[0])
        raise NonFiniteUpdateError(
            f"{name} contains {n_nan} NaN and {n_inf} inf entries (first at flat index "
            f"{first}); refusing to clip a contribution whose norm is undefined"
        )
    scale = float(np.max(np.abs(arr)))
    if scale == 0.0:
        return arr, 0.0
    unit = arr / scale  # max |unit| == 1: no overflow or underflow in the squares
    unit_norm = float(np.linalg.norm(unit))
    with np.errstate(over="ignore"):
        norm = scale * unit_norm
    if norm <= clip:
        return arr, norm
    out = unit * (clip / unit_norm)
    shrink = 1.0
    while float(np.linalg.norm(out)) > clip:  # at most a couple of ulps to remove
        shrink *= 1.0 - 2.0**-40
        out = unit * (clip / unit_norm * shrink)
    return out, norm


# --------------------------------------------------------------------------- noise


def _make_rng(rng: np.random.Generator | int | None) -> np.random.Generator:
    if rng is None:
        return np.random.default_rng(secrets.randbits(128))
    if isinstance(rng, np.random.Generator):
        return rng
    if isinstance(rng, int | np.integer) and not isinstance(rng, bool):
        return np.random.default_rng(int(rng))
    raise DpParameterError(f"rng must be a numpy Generator, an int seed or None, got {rng!r}")


def site_noise(
    shape: int | Sequence[int],
    clip: float,
    noise_multiplier: float,
    n_sites: int,
    rng: np.random.Generator | int | None = None,
) -> np.ndarray:
    """One site's share of the distributed Gaussian noise: ``N(0, (z*C)^2 / n)`` per coordinate.

    Summing the shares of ``n_sites`` independent sites gives ``N(0, (z*C)^2)``, the noise of
    the Gaussian mechanism on a sum with sensitivity ``C``. ``rng`` defaults to a generator
    seeded with 128 bits from :mod:`secrets`; pass a seed or Generator only in tests.
    """
    clip = _positive_finite("clip", clip)
    z = _check_noise_multiplier(noise_multiplier)
    n = _check_rounds(n_sites, "n_sites")
    std = z * clip / math.sqrt(n)
    gen = _make_rng(rng)
    if std == 0.0:
        return np.zeros(shape, dtype=np.float64)
    return gen.normal(0.0, std, size=shape)


# --------------------------------------------------------------------------- adaptive clipping

#: the share of a round's privacy (in the Gaussian's ``1/z²`` units) that
#: :func:`default_clip_count_std` gives the clipping count at most
CLIP_COUNT_BUDGET_SHARE = 0.1


def adaptive_update_noise_multiplier(noise_multiplier: float, count_std: float) -> float:
    """``z_Δ = (z⁻² − (2σ_b)⁻²)^(-1/2)``: the update's noise multiplier that, with the clipping
    count's noise std ``σ_b`` (``count_std``), keeps the round a Gaussian mechanism with ``z``.

    Gaussian RDP is ``α/(2z²)`` per unit of sensitivity and adds up across the two releases
    (update: sensitivity C, noise ``z_Δ·C``; count: sensitivity 1/2, noise ``σ_b``), so
    ``z⁻² = z_Δ⁻² + (2σ_b)⁻²``. Refused when ``2σ_b <= z``: the count alone would spend the
    whole round. ``z = 0`` (no DP) stays 0.
    """
    z = _check_noise_multiplier(noise_multiplier)
    sigma_b = _positive_finite("count_std", count_std)
    if z == 0.0:
        return 0.0
    if 2.0 * sigma_b <= z:
        raise DpParameterError(
            f"count_std (σ_b) = {sigma_b:g} leaves no privacy for the update: adaptive clipping "
            f"needs 2·σ_b > the noise multiplier z = {z:.4g}, i.e. σ_b > {z / 2:.4g}")
    return 1.0 / math.sqrt(z ** -2 - (2.0 * sigma_b) ** -2)


def adaptive_joint_noise_multiplier(update_noise_multiplier: float, count_std: float) -> float:
    """``z = (z_Δ⁻² + (2σ_b)⁻²)^(-1/2)``: the noise multiplier of a round that releases the
    update with ``z_Δ`` and the clipping count with noise std ``σ_b`` (Andrew et al., Thm 1);
    the inverse of :func:`adaptive_update_noise_multiplier`."""
    z_update = _positive_finite("update_noise_multiplier", update_noise_multiplier)
    sigma_b = _positive_finite("count_std", count_std)
    return 1.0 / math.sqrt(z_update ** -2 + (2.0 * sigma_b) ** -2)


def default_clip_count_std(expected_sites: int, noise_multiplier: float) -> float:
    """``σ_b = max(m/20, z / (2·√0.1))``: the paper's ``m/20`` (a count of m sites known to
    ±5 % of m), unless that would spend more than :data:`CLIP_COUNT_BUDGET_SHARE` of the
    round's privacy on the count.

    Why the second term: with a handful of sites ``m/20`` is tiny (0.15 at m = 3) and
    ``2σ_b`` would fall below any useful ``z``, leaving nothing for the update. Giving the
    count at most a tenth of the ``1/z²`` budget, ``(z/2σ_b)² <= 0.1``, raises the update's
    noise by at most ``1/√0.9 − 1 ≈ 5.4 %``; the price is a noisy count when sites are few.
    """
    m = _check_rounds(expected_sites, "expected_sites")
    z = _check_noise_multiplier(noise_multiplier)
    return max(m / 20.0, z / (2.0 * math.sqrt(CLIP_COUNT_BUDGET_SHARE)))


def clip_bit_share(
    norm: float,
    clip: float,
    count_std: float,
    n_sites: int,
    rng: np.random.Generator | int | None = None,
) -> float:
    """One site's clipping bit ``1[norm <= clip]`` plus its share ``N(0, σ_b²/n)`` of the
    count's noise: summing ``n_sites`` shares gives the count with ``N(0, σ_b²)``.

    ``norm`` is the *unclipped* update norm (:func:`clip_l2` returns it; ``inf`` is above any
    clip). ``rng`` as for :func:`site_noise`: tests only.
    """
    clip = _positive_finite("clip", clip)
    sigma_b = _positive_finite("count_std", count_std)
    n = _check_rounds(n_sites, "n_sites")
    norm = float(norm)
    if math.isnan(norm) or norm < 0:
        raise DpParameterError(f"norm must be >= 0, got {norm!r}")
    bit = 1.0 if norm <= clip else 0.0
    return bit + float(_make_rng(rng).normal(0.0, sigma_b / math.sqrt(n)))


def next_clip(
    clip: float,
    noisy_count: float,
    n_contributors: float,
    quantile: float,
    lr: float,
    bounds: tuple[float, float] | None = None,
) -> float:
    """The geometric update ``C_{t+1} = C_t · exp(−η·(b̄ − γ))`` with ``b̄`` = the released
    noisy count / the number of contributors, clamped to [0, 1].

    Post-processing of a released sum, so it costs no privacy. When the fraction of sites
    under the clip exceeds ``γ`` the clip shrinks, else it grows: the clip settles where a
    fraction ``γ`` of the update norms lies below it. The clamp is the paper's reference
    implementation's (TF Privacy ``QuantileEstimatorQuery``, "protect against out-of-range
    estimates"): projecting onto [0, 1] never moves ``b̄`` away from the true fraction, and it
    bounds one round's step to a factor in ``[e^(−η(1−γ)), e^(ηγ)]`` — what keeps the clip
    from random-walking when σ_b is large against the number of sites (a few sites). It
    biases the fixed point towards the median only when the count is mostly noise.
    ``bounds`` (lo, hi), if given, keep the result within them; the step is computed in log
    space so no intermediate overflows.
    """
    clip = _positive_finite("clip", clip)
    n = _positive_finite("n_contributors", n_contributors)
    count = float(noisy_count)
    if not math.isfinite(count):
        raise DpParameterError(f"the released clipping count must be finite, got {count!r}")
    gamma = float(quantile)
    if not 0.0 < gamma < 1.0:
        raise DpParameterError(f"quantile must lie in (0, 1), got {quantile!r}")
    eta = _positive_finite("lr", lr)
    fraction = min(max(count / n, 0.0), 1.0)
    log_next = math.log(clip) - eta * (fraction - gamma)
    if bounds is not None:
        lo, hi = (_positive_finite("bounds", b) for b in bounds)
        log_next = min(max(log_next, math.log(lo)), math.log(hi))
    return math.exp(min(log_next, math.log(np.finfo(np.float64).max)))


# --------------------------------------------------------------------------- accounting


def _round_event(noise_multiplier: float, sampling_rate: float) -> dp_accounting.DpEvent:
    event: dp_accounting.DpEvent = dp_accounting.GaussianDpEvent(noise_multiplier)
    if sampling_rate < 1.0:
        event = dp_accounting.PoissonSampledDpEvent(sampling_rate, event)
    return event


def _one_round_accountant(noise_multiplier: float, sampling_rate: float) -> RdpAccountant:
    accountant = RdpAccountant()
    accountant.compose(_round_event(noise_multiplier, sampling_rate))
    return accountant


def epsilon_for(
    noise_multiplier: float, rounds: int, delta: float, sampling_rate: float = 1.0
) -> float:
    """Epsilon after ``rounds`` Gaussian releases with ``noise_multiplier``, at ``delta``.

    Computed by ``dp_accounting``'s RDP accountant (add/remove-one neighbouring relation) on
    ``GaussianDpEvent`` -- wrapped in ``PoissonSampledDpEvent`` when ``sampling_rate < 1`` --
    self-composed ``rounds`` times. A zero noise multiplier gives ``inf``.
    """
    z = _check_noise_multiplier(noise_multiplier)
    rounds = _check_rounds(rounds)
    delta = _check_delta(delta)
    q = _check_sampling_rate(sampling_rate)
    if z == 0.0:
        return math.inf
    accountant = RdpAccountant()
    accountant.compose(dp_accounting.SelfComposedDpEvent(_round_event(z, q), rounds))
    return float(accountant.get_epsilon(delta))


def _epsilon_curve(
    noise_multiplier: float, rounds: int, delta: float, sampling_rate: float
) -> list[float]:
    """Cumulative epsilon after rounds 1..R, from one accountant's per-round RDP curve.

    RDP composes additively per order, so r rounds have RDP ``r * rdp_1``: exactly what the
    accountant does for a self-composed event, without recomputing the (slow, when
    subsampled) per-round RDP R times.
    """
    accountant = _one_round_accountant(noise_multiplier, sampling_rate)
    orders, rdp_1 = accountant.orders, accountant.rdp
    return [float(compute_epsilon(orders, r * rdp_1, delta)[0]) for r in range(1, rounds + 1)]


def noise_multiplier_for(
    target_epsilon: float,
    rounds: int,
    delta: float,
    sampling_rate: float = 1.0,
    *,
    rtol: float = NOISE_MULTIPLIER_RTOL,
) -> float:
    """Smallest noise multiplier (up to ``rtol``) whose :func:`epsilon_for` is <= the target.

    Bisection on the accountant: epsilon is non-increasing in the noise multiplier, so we
    keep a bracket ``[lo, hi]`` with ``epsilon_for(hi) <= target < epsilon_for(lo)`` and
    stop when ``hi - lo <= rtol * hi``. Returning ``hi`` makes the result conservative: it
    always meets the target and over-estimates the exact minimal multiplier by at most a
    relative ``rtol`` (default 1e-6).
    """
    target = _positive_finite("target_epsilon", target_epsilon)
    rounds = _check_rounds(rounds)
    delta = _check_delta(delta)
    q = _check_sampling_rate(sampling_rate)
    rtol = _positive_finite("rtol", rtol)

    def eps(z: float) -> float:
        return epsilon_for(z, rounds, delta, q)

    hi = 1.0
    while eps(hi) > target:
        hi *= 2.0
        if hi > _MAX_NOISE_MULTIPLIER:
            raise DpBudgetError(
                f"epsilon={target} at delta={delta} over {rounds} rounds (sampling rate {q}) "
                f"needs a noise multiplier above {_MAX_NOISE_MULTIPLIER:g}; raise epsilon or "
                f"delta, or run fewer rounds"
            )
    lo = hi / 2.0
    while eps(lo) <= target:
        hi, lo = lo, lo / 2.0
        if lo < _MIN_NOISE_MULTIPLIER:
            raise DpBudgetError(
                f"epsilon={target} at delta={delta} over {rounds} rounds is met by a noise "
                f"multiplier below {_MIN_NOISE_MULTIPLIER:g}; such a target protects nothing"
            )
    while hi - lo > rtol * hi:
        mid = 0.5 * (lo + hi)
        if eps(mid) <= target:
            hi = mid
        else:
            lo = mid
    return hi


@dataclass(frozen=True)
class DpPlan:
    """Noise and budget for a whole job, as fixed before round 1.

    ``epsilon_per_round[r]`` is the *incremental* charge ``eps(r+1) - eps(r)`` (with
    ``eps(0) = 0``), so the ledger's per-round charges add up to ``epsilon_total`` (up to
    float rounding), the accountant's figure for all rounds. Without DP the noise multiplier
    is 0 and every charge is ``inf``: an un-noised release has unbounded privacy loss.
    """

    rounds: int
    delta: float
    clip: float
    sampling_rate: float
    target_epsilon: float | None
    noise_multiplier: float
    epsilon_total: float
    epsilon_per_round: tuple[float, ...]

    @property
    def enabled(self) -> bool:
        return self.target_epsilon is not None

    def site_noise_std(self, n_sites: int) -> float:
        """Per-coordinate std of one site's noise share: ``z * C / sqrt(n_sites)``."""
        return self.noise_multiplier * self.clip / math.sqrt(_check_rounds(n_sites, "n_sites"))


@dataclass(frozen=True)
class DpConfig:
    """Client-level DP settings of a job; ``epsilon=None`` means no DP.

    The noise multiplier is not a setting: :meth:`plan` derives it from epsilon, delta, the
    number of rounds and the site sampling rate (1.0 = every site in every round).
    """

    epsilon: float | None = None
    delta: float = 1e-5
    clip: float = 1.0
    sampling_rate: float = 1.0

    def __post_init__(self) -> None:
        if self.epsilon is not None:
            _positive_finite("epsilon", self.epsilon)
        _check_delta(self.delta)
        _positive_finite("clip", self.clip)
        _check_sampling_rate(self.sampling_rate)

    @property
    def enabled(self) -> bool:
        return self.epsilon is not None

    def plan(self, rounds: int) -> DpPlan:
        """Calibrate the noise multiplier for ``rounds`` and split epsilon into round charges."""
        rounds = _check_rounds(rounds)
        if self.epsilon is None:
            return DpPlan(
                rounds=rounds,
                delta=self.delta,
                clip=self.clip,
                sampling_rate=self.sampling_rate,
                target_epsilon=None,
                noise_multiplier=0.0,
                epsilon_total=math.inf,
                epsilon_per_round=(math.inf,) * rounds,
            )
        z = noise_multiplier_for(self.epsilon, rounds, self.delta, self.sampling_rate)
        curve = _epsilon_curve(z, rounds, self.delta, self.sampling_rate)
        charges = tuple(b - a for a, b in zip([0.0, *curve[:-1]], curve, strict=True))
        return DpPlan(
            rounds=rounds,
            delta=self.delta,
            clip=self.clip,
            sampling_rate=self.sampling_rate,
            target_epsilon=self.epsilon,
            noise_multiplier=z,
            epsilon_total=curve[-1],
            epsilon_per_round=charges,
        )


# --------------------------------------------------------------------------- DP-SGD


@dataclass
class PrivateSgd:
    """What :func:`make_private_sgd` hands back: train with these, not the originals.

    ``planned_epsilon`` is ``dp_accounting``'s RDP figure for all ``steps`` -- the number a
    ledger should charge; :meth:`epsilon` is Opacus's own running count of what has been
    spent so far.
    """

    model: torch.nn.Module
    optimizer: torch.optim.Optimizer
    data_loader: torch.utils.data.DataLoader
    engine: PrivacyEngine
    noise_multiplier: float
    sample_rate: float
    steps: int
    delta: float
    target_epsilon: float
    planned_epsilon: float

    def epsilon(self) -> float:
        """Epsilon spent so far, by Opacus's accountant, at ``delta``."""
        return float(self.engine.get_epsilon(self.delta))


def make_private_sgd(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    data_loader: torch.utils.data.DataLoader,
    target_epsilon: float,
    delta: float,
    epochs: int,
    max_grad_norm: float,
    *,
    accountant: Literal["rdp", "prv"] = "rdp",
    **opacus_kwargs: Any,
) -> PrivateSgd:
    """Wrap a local training loop in sample-level DP-SGD with Opacus.

    Uses ``PrivacyEngine.make_private_with_epsilon`` (Poisson sampling, flat per-sample
    clipping to ``max_grad_norm``). Opacus calibrates the noise with its own accountant
    (``"rdp"`` by default so it matches this module's ``dp_accounting`` ledger; ``"prv"`` is
    tighter). Extra keyword arguments go to ``make_private_with_epsilon``.
    """
    import warnings

    from opacus import PrivacyEngine
    from opacus.validators import ModuleValidator

    target = _positive_finite("target_epsilon", target_epsilon)
    delta = _check_delta(delta)
    epochs = _check_rounds(epochs, "epochs")
    max_grad_norm = _positive_finite("max_grad_norm", max_grad_norm)
    if accountant not in ("rdp", "prv"):
        raise DpParameterError(f"accountant must be 'rdp' or 'prv', got {accountant!r}")
    n_batches = len(data_loader)
    if n_batches == 0:
        raise DpSgdError("data_loader yields no batch; there is nothing to train privately")
    problems = ModuleValidator.validate(model, strict=False)
    if problems:
        listed = "; ".join(str(p) for p in problems)
        raise DpSgdError(
            f"model {type(model).__name__} is not DP-SGD compatible ({listed}); "
            "opacus.validators.ModuleValidator.fix(model) replaces e.g. BatchNorm by GroupNorm"
        )

    with warnings.catch_warnings():
        # Opacus warns that its default RNG is not a CSPRNG (secure_mode needs torchcsprng,
        # which is not installable here), and its calibration bisection probes huge noise
        # multipliers whose optimal RDP order sits at the edge of its grid. Neither concerns
        # the returned noise, whose epsilon dp_accounting re-derives below.
        warnings.filterwarnings("ignore", message=".*[Ss]ecure RNG.*")
        warnings.filterwarnings("ignore", message=".*Optimal order is the (largest|smallest)")
        engine = PrivacyEngine(accountant=accountant)
        priv_model, priv_opt, priv_loader = engine.make_private_with_epsilon(
            module=model,
            optimizer=optimizer,
            data_loader=data_loader,
            target_epsilon=target,
            target_delta=delta,
            epochs=epochs,
            max_grad_norm=max_grad_norm,
            **opacus_kwargs,
        )
    sample_rate = 1.0 / n_batches
    steps = epochs * n_batches
    z = float(priv_opt.noise_multiplier)
    return PrivateSgd(
        model=priv_model,
        optimizer=priv_opt,
        data_loader=priv_loader,
        engine=engine,
        noise_multiplier=z,
        sample_rate=sample_rate,
        steps=steps,
        delta=delta,
        target_epsilon=target,
        planned_epsilon=epsilon_for(z, steps, delta, sample_rate),
    )
