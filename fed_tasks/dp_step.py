"""Differential privacy inside the site step: what a site does to an update before it leaves.

Two granularities, chosen by the job (``JobSpec.dp_sgd``):

* **client-level DP-FedAvg** — the site clips its whole update Δ to L2 norm ``dp_clip`` and
  adds its share of Gaussian noise (:func:`privatize_update`); the job's noise multiplier z
  is calibrated before round 1 from ``(dp_epsilon, dp_delta, rounds)`` by ``dp_accounting``
  (:func:`client_plan`), identically at every site.
* **sample-level DP-SGD** — local training runs through Opacus with per-row gradient
  clipping to ``dp_clip`` and noise calibrated, at the site, for all the job's steps given
  the site's own row count (:func:`sgd_plan`, :func:`fit_dp_sgd`).

Either way the site contributes ``[Δ_private, 0, 1]``: unit weight (the sample count is not
released) and the training loss withheld (it is not privatized), which keeps the vector
layout of :func:`fed_tasks.strategy.pack_update` for every aggregation mode.

**Adaptive clipping** (``JobSpec.dp_adaptive_clip``, client-level DP-FedAvg only;
:class:`AdaptiveClip`): round t clips to ``C_t`` instead of ``dp_clip`` and the withheld loss
slot carries the site's noisy clipping bit instead of 0, so the vector is
``[Δ_private, b + noise, 1]``: same length, same codecs, summed like the loss in plain,
paillier and secagg alike, and the sum's slot is the noisy count of sites under the clip.
``C_t`` lives in ``GlobalState.server`` (:data:`CLIP_KEY`) and follows from the released sums
only, by the same rule at every party (the job's strategy applies it after each round), so
a site never takes the clip from a message, and a checkpoint or a restarted site resumes it.

The noise a site adds is seeded from :mod:`secrets` (never from the spec's public seed).
"""

from __future__ import annotations

import functools
import logging
import math
import secrets
import warnings
from dataclasses import dataclass

import numpy as np

from fed_tasks import dp_sums
from fed_tasks.codec import PayloadError
from fed_tasks.spec import JobSpec
from fed_tasks.strategy import SummedUpdate, pack_update
from privacy.dp import (
    DpConfig,
    DpPlan,
    adaptive_update_noise_multiplier,
    clip_bit_share,
    clip_l2,
    default_clip_count_std,
    epsilon_for,
    next_clip,
    noise_multiplier_for,
    site_noise,
)

#: Relative tolerance of the DP-SGD calibration (conservative: never below the target).
SGD_RTOL = 1e-4


class _DropExcludedOrders(logging.Filter):
    """dp_accounting warns when a subsampled-Gaussian RDP order does not converge (small
    noise multipliers probed while calibrating); it then excludes that order, which can only
    make epsilon larger, i.e. conservative. Not worth a screenful per job."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Excluding this order" not in str(record.msg)


logging.getLogger("absl").addFilter(_DropExcludedOrders())
# Opacus notes that its RNG is not a CSPRNG (we pass generators seeded from `secrets`) and
# torch that full backward hooks fire on inputs that need no gradient (the rows): both are
# expected here. Set once, globally: `catch_warnings` is not thread-safe and sites train in
# threads.
warnings.filterwarnings("ignore", message=r".*[Ss]ecure RNG")
warnings.filterwarnings("ignore", message=r"Full backward hook is firing")


# ---------------------------------------------------------------- client-level DP-FedAvg
@functools.lru_cache(maxsize=128)
def _client_plan(epsilon: float, delta: float, clip: float, rounds: int) -> DpPlan:
    return DpConfig(epsilon=epsilon, delta=delta, clip=clip).plan(rounds)


def client_plan(spec: JobSpec) -> DpPlan:
    """The job's DP-FedAvg plan: noise multiplier and per-round epsilon charges."""
    if spec.dp_epsilon is None or spec.dp_sgd or dp_sums.applies(spec):
        raise ValueError(f"job {spec.job_id!r} does not use client-level DP")
    return _client_plan(float(spec.dp_epsilon), float(spec.dp_delta), float(spec.dp_clip),
                        int(spec.rounds))


def noise_shares(spec: JobSpec, secure_floor: int | None = None) -> int:
    """Into how many shares the noise of one aggregate is split (``n`` of ``site_noise``).

    In ``plain`` mode the orchestrator sees every site's vector on its own, so each site adds
    the *full* noise (n = 1). In a secure mode only sums of at least ``spec.min_sites``
    contributions are revealed, so each site adds 1/n of the variance with
    n = ``spec.min_sites``, lowered to ``secure_floor`` (the smallest sum the site's secure
    aggregation can reveal) if that is smaller. More contributors only add noise.
    """
    if spec.aggregation == "plain":
        return 1
    n = spec.min_sites if secure_floor is None else min(spec.min_sites, secure_floor)
    return max(1, int(n))


def privatize_update(spec: JobSpec, delta: np.ndarray, shares: int,
                     rng: np.random.Generator | int | None = None,
                     site: str = "this site") -> np.ndarray:
    """Clip Δ to L2 norm ``dp_clip``, then add this site's share of N(0, (z·C)²).

    ``rng`` is for tests only; by default the noise generator is seeded from ``secrets``.
    """
    plan = client_plan(spec)
    clipped, _ = clip_l2(delta, spec.dp_clip, name=f"update of {site}")
    noise = site_noise(clipped.shape, spec.dp_clip, plan.noise_multiplier, shares, rng)
    return clipped + noise


def release(private_delta: np.ndarray) -> np.ndarray:
    """The vector a DP site contributes: ``[Δ_private, 0 (loss withheld), 1 (unit weight)]``."""
    return pack_update(private_delta, 0.0, 1)


# ---------------------------------------------------------------- adaptive clipping
#: where the current clip ``C_t`` lives in ``GlobalState.server`` (a 1-value array)
CLIP_KEY = "dp_clip"
#: ``C_t`` stays within ``dp_clip`` divided / multiplied by this, whatever the counts say:
#: a guard that keeps the clip finite and positive (a clip this far off is noise anyway)
CLIP_RANGE = 1e6


@dataclass(frozen=True)
class AdaptiveClip:
    """One job's adaptive clipping rule, from the approved spec alone (every party builds the
    same one); the clip itself is state, in ``GlobalState.server[CLIP_KEY]``."""

    initial: float  # C_0 = dp_clip
    quantile: float  # γ
    lr: float  # η_C
    count_std: float  # σ_b: std of the noise on the summed clipping count
    update_noise_multiplier: float  # z_Δ > z

    @property
    def bounds(self) -> tuple[float, float]:
        return self.initial / CLIP_RANGE, self.initial * CLIP_RANGE

    def current(self, server: dict[str, np.ndarray]) -> float:
        """``C_t``: ``dp_clip`` before the first released round, then what the sums gave."""
        saved = server.get(CLIP_KEY)
        if saved is None:
            return self.initial
        value = np.asarray(saved, dtype=np.float64).ravel()
        if value.size != 1 or not np.isfinite(value[0]) or value[0] <= 0:
            raise PayloadError(f"the held clip {saved!r} is not one positive number")
        return float(value[0])

    def advance(self, server: dict[str, np.ndarray], update: SummedUpdate) -> None:
        """Move ``C_t`` by one released round: ``b̄`` = the noisy count in the loss slot over
        the contributors (each DP site sends unit weight)."""
        count, n = float(update.vector[-2]), update.total_weight
        if not np.isfinite(count) or not np.isfinite(n) or n <= 0:
            raise PayloadError("a round's clipping count or weight is not a usable number")
        server[CLIP_KEY] = np.array([next_clip(self.current(server), count, n, self.quantile,
                                               self.lr, self.bounds)])


def clip_count_std(spec: JobSpec) -> float:
    """σ_b: the spec's ``dp_clip_count_std``, or :func:`privacy.dp.default_clip_count_std`
    for ``min_sites`` sites and the job's z."""
    if spec.dp_clip_count_std is not None:
        return float(spec.dp_clip_count_std)
    return default_clip_count_std(spec.min_sites, client_plan(spec).noise_multiplier)


@functools.lru_cache(maxsize=256)
def adaptive_clip(spec: JobSpec) -> AdaptiveClip | None:
    """The job's rule, or None when it clips to the fixed ``dp_clip`` (or has no
    client-level DP). Raises ValueError naming the field if σ_b leaves z_Δ undefined."""
    if not spec.dp_adaptive_clip:
        return None
    z = client_plan(spec).noise_multiplier
    sigma_b = clip_count_std(spec)
    try:
        z_update = adaptive_update_noise_multiplier(z, sigma_b)
    except ValueError as exc:
        raise ValueError(f"dp_clip_count_std: {exc}") from None
    return AdaptiveClip(float(spec.dp_clip), float(spec.dp_clip_quantile),
                        float(spec.dp_clip_lr), sigma_b, z_update)


def largest_clip(spec: JobSpec) -> float:
    """The largest clip any round of the job can use: ``dp_clip``, or under adaptive
    clipping ``dp_clip · e^(η·γ·(rounds − 1))`` (one round multiplies the clip by at most
    ``e^(ηγ)``, the noisy fraction being clamped at 0), known before the job runs: what an
    owner's bound on the clip can be checked against."""
    if not spec.dp_adaptive_clip:
        return float(spec.dp_clip)
    grown = float(spec.dp_clip) * math.exp(spec.dp_clip_lr * spec.dp_clip_quantile
                                           * (spec.rounds - 1))
    return min(grown, float(spec.dp_clip) * CLIP_RANGE)


def update_noise_multiplier(spec: JobSpec) -> float:
    """The noise multiplier on a client-level DP update: z, or z_Δ > z under adaptive
    clipping (the noise std is this times the round's clip)."""
    rule = adaptive_clip(spec)
    return client_plan(spec).noise_multiplier if rule is None else rule.update_noise_multiplier


def round_clip(spec: JobSpec, server: dict[str, np.ndarray]) -> float:
    """The clip of the round a site is about to release, from the state *it* holds."""
    rule = adaptive_clip(spec)
    return float(spec.dp_clip) if rule is None else rule.current(server)


def private_update(spec: JobSpec, delta: np.ndarray, shares: int,
                   server: dict[str, np.ndarray],
                   rng: np.random.Generator | int | None = None,
                   site: str = "this site") -> np.ndarray:
    """The whole vector a client-level DP site sends for a round.

    Fixed clip: ``[Δ clipped to dp_clip + noise, 0, 1]`` (:func:`privatize_update`).
    Adaptive: ``[Δ clipped to C_t + N(0, (z_Δ·C_t)²/shares), b + N(0, σ_b²/shares), 1]`` with
    ``C_t`` from ``server`` — the global state the site derived itself — never a message.
    ``rng`` is for tests only; by default one generator seeded from ``secrets``.
    """
    rule = adaptive_clip(spec)
    if rule is None:
        return release(privatize_update(spec, delta, shares, rng, site))
    gen = rng if isinstance(rng, np.random.Generator) else np.random.default_rng(
        secrets.randbits(128) if rng is None else rng)
    clip = rule.current(server)
    clipped, norm = clip_l2(delta, clip, name=f"update of {site}")
    noise = site_noise(clipped.shape, clip, rule.update_noise_multiplier, shares, gen)
    bit = clip_bit_share(norm, clip, rule.count_std, shares, gen)
    return pack_update(clipped + noise, bit, 1)


# ---------------------------------------------------------------- sample-level DP-SGD
@dataclass(frozen=True)
class SgdPlan:
    """DP-SGD noise for a whole job at one site (depends on the site's row count)."""

    noise_multiplier: float
    sampling_rate: float  # Poisson rate, = 1 / batches per epoch
    steps_per_round: int  # local_epochs x batches per epoch
    rounds: int
    delta: float
    epsilon_total: float  # dp_accounting's figure for all rounds, <= the target


def batches_per_epoch(spec: JobSpec, n_rows: int) -> int:
    if n_rows < 1:
        raise ValueError("DP-SGD needs at least one training row")
    return max(1, math.ceil(n_rows / spec.batch_size))


@functools.lru_cache(maxsize=128)
def _sgd_plan(epsilon: float, delta: float, rounds: int, steps_per_round: int,
              q: float) -> SgdPlan:
    steps = rounds * steps_per_round
    z = noise_multiplier_for(epsilon, steps, delta, q, rtol=SGD_RTOL)
    return SgdPlan(z, q, steps_per_round, rounds, delta, epsilon_for(z, steps, delta, q))


def sgd_plan(spec: JobSpec, n_rows: int) -> SgdPlan:
    """Noise multiplier so that ``rounds x local_epochs`` epochs of Poisson-sampled DP-SGD
    over ``n_rows`` rows stay within ``dp_epsilon`` (RDP, ``dp_accounting``)."""
    if spec.dp_epsilon is None or not spec.dp_sgd:
        raise ValueError(f"job {spec.job_id!r} does not use DP-SGD")
    nb = batches_per_epoch(spec, n_rows)
    return _sgd_plan(float(spec.dp_epsilon), float(spec.dp_delta), int(spec.rounds),
                     int(spec.local_epochs * nb), 1.0 / nb)


def fit_dp_sgd(model, x: np.ndarray, spec: JobSpec) -> None:
    """One round of local DP-SGD (``local_epochs`` epochs) on standardized rows, in place.

    Opacus's Poisson sampling and noise both use generators seeded from ``secrets``: the
    amplification by subsampling assumes the data scientist cannot predict which rows form
    a batch, so the spec's public seed must not drive either.
    """
    import torch
    from opacus import PrivacyEngine
    from torch.utils.data import DataLoader, TensorDataset

    from fed_tasks.detectors._torch import _single_thread

    plan = sgd_plan(spec, len(x))
    sampler_rng = torch.Generator().manual_seed(secrets.randbits(63))
    noise_rng = torch.Generator().manual_seed(secrets.randbits(63))
    loader = DataLoader(TensorDataset(torch.from_numpy(np.asarray(x, dtype=np.float32))),
                        batch_size=spec.batch_size, generator=sampler_rng)
    with _single_thread():
        optimizer = torch.optim.Adam(model.net.parameters(), lr=spec.lr)
        engine = PrivacyEngine(accountant="rdp")
        net, optimizer, loader = engine.make_private(
            module=model.net, optimizer=optimizer, data_loader=loader,
            noise_multiplier=plan.noise_multiplier, max_grad_norm=spec.dp_clip,
            poisson_sampling=True, noise_generator=noise_rng)
        net.train()
        for _ in range(spec.local_epochs):
            for (batch,) in loader:
                optimizer.zero_grad()
                per_row = torch.mean((net(batch) - batch) ** 2, dim=1)
                # an empty Poisson batch still takes its (noise-only) step, as accounted
                (per_row.mean() if len(batch) else per_row.sum()).backward()
                optimizer.step()


# ---------------------------------------------------------------- accounting per release
def cumulative_epsilon(spec: JobSpec, releases: int, n_rows: int | None = None) -> float:
    """Epsilon of the job at this site after ``releases`` training rounds (or, for pca and
    hbos, noised sums: :mod:`fed_tasks.dp_sums`) left it.

    The accountant's figure (``dp_accounting`` RDP, composed within the job), so the ledger's
    per-round charges ``cumulative(k) - cumulative(k-1)`` add up to exactly this. Releases
    beyond ``spec.rounds`` (retried rounds) keep composing. DP-SGD needs ``n_rows``.
    """
    if releases <= 0:
        return 0.0
    if spec.dp_epsilon is None:
        return math.inf
    if dp_sums.applies(spec):  # pca/hbos: per-row noise on each summed release
        return dp_sums.cumulative_epsilon(spec, releases)
    if spec.dp_sgd:
        if n_rows is None:
            raise ValueError("DP-SGD accounting needs the site's row count")
        plan = sgd_plan(spec, n_rows)
        return epsilon_for(plan.noise_multiplier, releases * plan.steps_per_round, spec.dp_delta,
                           plan.sampling_rate)
    return _client_cumulative(float(spec.dp_epsilon), float(spec.dp_delta), float(spec.dp_clip),
                              int(spec.rounds), int(releases))


@functools.lru_cache(maxsize=1024)
def _client_cumulative(epsilon: float, delta: float, clip: float, rounds: int,
                       releases: int) -> float:
    z = _client_plan(epsilon, delta, clip, rounds).noise_multiplier
    return epsilon_for(z, releases, delta)


def noise_multiplier(spec: JobSpec, n_rows: int | None = None) -> float | None:
    """The job's z (client-level, or row-level on sums), or this site's z (DP-SGD, needs
    ``n_rows``); None: no DP."""
    if spec.dp_epsilon is None:
        return None
    if dp_sums.applies(spec):
        return dp_sums.noise_multiplier(spec)
    if spec.dp_sgd:
        return sgd_plan(spec, n_rows).noise_multiplier if n_rows else None
    return client_plan(spec).noise_multiplier
