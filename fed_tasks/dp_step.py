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
from fed_tasks.spec import JobSpec
from fed_tasks.strategy import pack_update
from privacy.dp import DpConfig, DpPlan, clip_l2, epsilon_for, noise_multiplier_for, site_noise

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
