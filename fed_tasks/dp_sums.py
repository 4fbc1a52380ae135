"""Row-level differential privacy for the detectors built from sums (``pca``, ``hbos``).

These detectors release only sums over a site's rows, so each release can be a Gaussian
mechanism on the sum itself: one row changes the sum by at most a known L2 sensitivity Δ,
and the site adds N(0, (z·Δ)²) to it. The privacy unit is **one row** of a site's table
(add/remove one row), as for DP-SGD; a site's aggregate properties are not hidden.

Releases, and one row's L2 sensitivity in each:

* ``hist`` (hbos) — one count per feature: Δ = √d;
* ``moments2`` (pca) — ``[triu(zzᵀ), z, 1]`` of the standardized row, the row first clipped
  to L2 norm B = ``spec.dp_row_clip``: the upper triangle of zzᵀ has norm at most
  ‖zzᵀ‖_F = ‖z‖² ≤ B², so Δ = √(B⁴ + B² + 1);
* ``calibrate`` (the alarm threshold, either detector) — one count: Δ = 1.

The job's R releases (its detector phase, plus the threshold's passes when ``target_fpr``
is set) share one noise multiplier z, calibrated before the first by ``dp_accounting``'s RDP
accountant from ``(dp_epsilon, dp_delta, R)`` at sampling rate 1; after k releases the job
has spent ``epsilon_for(z, k, delta)``, which the site's ledger charges release by release.
The noise of one release is split across sites as for DP-FedAvg
(:func:`fed_tasks.dp_step.noise_shares`), and seeded from :mod:`secrets`.

The feature scaling of a DP job comes from the published mocks (free), so a standardized
row is a fixed function of that row alone, which is what the sensitivities above assume.
"""

from __future__ import annotations

import functools
import math

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.spec import ROW_DP_MODELS, JobSpec
from privacy.dp import epsilon_for, noise_multiplier_for, site_noise

#: the detector's own summed release, per model
DETECTOR_ACTION = {"pca": "moments2", "hbos": "hist"}


def applies(spec: JobSpec) -> bool:
    """Whether the job's releases are noised per row (a DP pca or hbos job)."""
    return spec.dp_enabled and spec.model in ROW_DP_MODELS


def covers(spec: JobSpec, action: str) -> bool:
    """Whether a site noises and charges ``action`` of this job (anything else a DP job
    asks for stays refused unless another mechanism covers it: fail closed)."""
    return applies(spec) and action in (DETECTOR_ACTION[spec.model], "calibrate")


def releases(spec: JobSpec) -> int:
    """R: how many noised releases the job makes (its schedule, after the statistics)."""
    from fed_tasks.schedule import phases

    return sum(p.count for p in phases(spec) if covers(spec, p.action))


def sensitivity(spec: JobSpec, action: str) -> float:
    """One row's largest L2 effect on the site's sum for ``action``."""
    if not covers(spec, action):
        raise PayloadError(f"job {spec.job_id!r} ({spec.model}) has no row-level DP release "
                           f"{action!r}")
    if action == "hist":
        return math.sqrt(len(spec.features))
    if action == "moments2":
        b = float(spec.dp_row_clip)
        return math.sqrt(b**4 + b**2 + 1.0)
    return 1.0  # calibrate: one count


@functools.lru_cache(maxsize=256)
def _noise_multiplier(epsilon: float, delta: float, count: int) -> float:
    return noise_multiplier_for(epsilon, count, delta)


def noise_multiplier(spec: JobSpec) -> float:
    """z of the job: R Gaussian releases together stay within ``dp_epsilon``."""
    if not applies(spec):
        raise ValueError(f"job {spec.job_id!r} does not use row-level DP on sums")
    return _noise_multiplier(float(spec.dp_epsilon), float(spec.dp_delta), releases(spec))


def noise_std(spec: JobSpec, action: str) -> float:
    """Std of the noise on the released sum (all shares together): z·Δ."""
    return noise_multiplier(spec) * sensitivity(spec, action)


@functools.lru_cache(maxsize=1024)
def _cumulative(epsilon: float, delta: float, count: int, done: int) -> float:
    return epsilon_for(_noise_multiplier(epsilon, delta, count), done, delta)


def cumulative_epsilon(spec: JobSpec, done: int) -> float:
    """The job's epsilon after ``done`` releases (the accountant's figure; releases beyond R,
    e.g. a retried call, keep composing)."""
    if done <= 0:
        return 0.0
    noise_multiplier(spec)  # refuses a job without row-level DP
    return _cumulative(float(spec.dp_epsilon), float(spec.dp_delta), releases(spec), int(done))


def clip_rows(z: np.ndarray, bound: float) -> np.ndarray:
    """Each row scaled to L2 norm at most ``bound`` (rows within it are unchanged)."""
    z = np.asarray(z, dtype=np.float64)
    norms = np.linalg.norm(z, axis=1, keepdims=True)
    scale = np.minimum(1.0, bound / np.maximum(norms, np.finfo(np.float64).tiny))
    out = z * scale
    # rounding may leave a row a hair above the bound: shrink those by a few ulps
    over = np.linalg.norm(out, axis=1) > bound
    out[over] *= 1.0 - 1e-12
    return out


def privatize(spec: JobSpec, action: str, vector: np.ndarray, shares: int,
              rng: np.random.Generator | int | None = None) -> np.ndarray:
    """The site's sum plus its share of N(0, (z·Δ)²): 1/``shares`` of the variance.

    ``rng`` is for tests only; by default the generator is seeded from :mod:`secrets`."""
    vector = np.asarray(vector, dtype=np.float64)
    noise = site_noise(vector.shape, sensitivity(spec, action), noise_multiplier(spec),
                       shares, rng)
    return vector + noise
