"""Before training: will the DP noise leave a model worth having?

Every DP release adds Gaussian noise of a known size to something whose size the job
bounds. The **noise-to-signal ratio** of a release is the expected L2 norm of its noise
divided by the largest L2 norm its signal can have, computed from the spec (and, for a
per-row unit, the site's row count) before anything runs:

* client-level DP-FedAvg: the round's averaged update. n sites (``min_sites``, the fewest
  an aggregate may hold) each send Δ clipped to C; the average's signal is at most C, its
  noise has norm ``z·C·√P·√(n/shares)/n`` (P parameters; ``shares`` = 1 in plain mode,
  where each site adds the full noise, n in a secure mode). Ratio ``z·√P/√(n·shares)``.
* sample-level DP-SGD: one round of a site's local training, k noisy steps on batches of
  ``B = q·rows`` rows. Each step's mean gradient has signal at most C and noise norm
  ``z·C·√P/B``; over the k steps the signal adds up (k·C at most) and the noise only as √k.
  Ratio ``z·√P/(B·√k)``.
* row-level DP on sums (pca, hbos): the sum over n sites of ``rows`` rows each; its noise
  has norm ``σ·√L·√(n/shares)`` (L values) against a signal of n times one site's: counts
  of h histograms have norm about ``rows·√h·0.27`` (each spread like a standard normal over
  the fixed bins: :data:`NORMAL_SPREAD`), the pca moments at least ``rows·√d`` (their
  trace is ``rows·d``).

Ratio 1 means the noise alone is as large as everything the sites could say in one release:
each step is then a random walk the data barely steers, and at 3 sites the README's
privacy/utility table shows what follows (ROC-AUC from 0.23 to 0.99 run to run). So
:data:`USEFUL_RATIO` = 1 is the default limit of the owner's policy; the site refuses a job
above it (or runs it with a warning if the policy says so), naming what would bring the
ratio under it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from fed_tasks import dp_step, dp_sums
from fed_tasks.spec import DP_SGD_MODELS, JobSpec
from privacy.dp import epsilon_for

#: the default largest noise-to-signal ratio of a release (the owner's policy may change it)
USEFUL_RATIO = 1.0


def _normal_spread() -> float:
    """‖counts‖₂ / rows of a histogram of standard-normal values in the fixed HBOS bins:
    the signal assumed for a count release (the site may not look at its own counts to
    decide). Measured on the bundled tables' standardized features: 0.28–0.85, never below
    it; a uniform spread over all bins (0.12) would be needlessly pessimistic."""
    from fed_tasks import histograms

    cdf = [0.5 * (1.0 + math.erf(math.sinh(u) / math.sqrt(2.0)))
           for u in histograms.edges()]
    probs = [cdf[0], *(b - a for a, b in zip(cdf, cdf[1:], strict=False)), 1.0 - cdf[-1]]
    return math.sqrt(sum(p * p for p in probs))


#: see :func:`_normal_spread` (≈ 0.27)
NORMAL_SPREAD = _normal_spread()
#: remedies beyond these are not worth naming (no epsilon above it protects much; no
#: detector is that small)
MAX_SUGGESTED_EPSILON = 50.0
MIN_SUGGESTED_PARAMETERS = 16


@dataclass(frozen=True)
class NoiseEstimate:
    """The noise-to-signal ratio of the job's noisiest release, and what it is."""

    ratio: float
    unit: str  # "site" (client-level) or "row" (DP-SGD, sums)
    release: str  # the release, in words
    formula: str  # the figures it follows from

    def words(self) -> str:
        return (f"noise-to-signal ratio {self.ratio:.3g} on {self.release} "
                f"({self.formula})")


def parameters(spec: JobSpec) -> int:
    """P: how many numbers one model update holds, read from the job's (cached) schedule —
    a site judges this on every call, so no model is built for it. A round's vector is
    ``[Δ, loss, weight]`` for every strategy that DP allows (scaffold is refused)."""
    from fed_tasks.schedule import has_phase, vector_length

    return vector_length(spec, "fit") - 2 if has_phase(spec, "fit") else 0


def _client(spec: JobSpec) -> NoiseEstimate:
    # adaptive clipping: the update's own z_Δ > z (the clip itself cancels out of the ratio)
    z = dp_step.update_noise_multiplier(spec)
    n, shares, p = spec.min_sites, dp_step.noise_shares(spec), parameters(spec)
    ratio = z * math.sqrt(p) / math.sqrt(n * shares)
    who = "each site adds all the noise" if shares == 1 else "the secure sum carries it once"
    return NoiseEstimate(ratio, "site", f"each round's average of {n} sites' updates (the "
                         "fewest an aggregate may hold)",
                         f"noise multiplier z={z:.3g}, {p:,} parameters, {who}")


def _sgd(spec: JobSpec, rows: int) -> NoiseEstimate:
    plan = dp_step.sgd_plan(spec, rows)
    p, batch, k = parameters(spec), plan.sampling_rate * rows, plan.steps_per_round
    ratio = plan.noise_multiplier * math.sqrt(p) / (batch * math.sqrt(k))
    return NoiseEstimate(ratio, "row", f"one round of local DP-SGD at {rows:,} rows",
                         f"z={plan.noise_multiplier:.3g}, {p:,} parameters, batches of "
                         f"{batch:.0f} rows, {k} steps a round")


def _sums(spec: JobSpec, rows: int) -> NoiseEstimate:
    from fed_tasks.schedule import phases

    worst: NoiseEstimate | None = None
    d = len(spec.features)
    # the model uses the sum over >= min_sites sites: n sites' rows, n noise shares
    pooled = math.sqrt(spec.min_sites * dp_step.noise_shares(spec))
    for phase in phases(spec):
        if not dp_sums.covers(spec, phase.action):
            continue
        noise = dp_sums.noise_std(spec, phase.action) * math.sqrt(phase.length)
        if phase.action == "moments2":
            signal = rows * math.sqrt(d)
        else:  # counts: one histogram per feature (hist) or one of the scores (calibrate)
            h = d if phase.action == "hist" else 1
            signal = rows * math.sqrt(h) * NORMAL_SPREAD
        est = NoiseEstimate(noise / (signal * pooled), "row",
                            f"the summed {phase.action} of {spec.min_sites} sites of "
                            f"{rows:,} rows", f"noise std "
                            f"{dp_sums.noise_std(spec, phase.action):.3g} on each of "
                            f"{phase.length} values")
        worst = est if worst is None or est.ratio > worst.ratio else worst
    assert worst is not None
    return worst


def estimate(spec: JobSpec, rows: int | None = None) -> NoiseEstimate | None:
    """The ratio of the job's noisiest release; None without DP, or when it depends on a
    row count (per-row DP) that is not given. ``rows``: the smallest site's training rows."""
    if not spec.dp_enabled or spec.model == "auto":
        return None
    if not dp_sums.applies(spec) and not spec.dp_sgd:
        return _client(spec)
    if rows is None or rows < 1:
        return None
    return _sums(spec, rows) if dp_sums.applies(spec) else _sgd(spec, rows)


def remedies(spec: JobSpec, rows: int | None, limit: float = USEFUL_RATIO) -> list[str]:
    """What would bring the ratio under ``limit``, each in a few words."""
    est = estimate(spec, rows)
    if est is None:
        return []
    if est.unit == "row" and not spec.dp_sgd:
        return ["a larger epsilon", "more rows per site", "fewer features"]
    if est.unit == "row":
        assert rows is not None
        plan = dp_step.sgd_plan(spec, rows)
        batch, k = plan.sampling_rate * rows, plan.steps_per_round
        z_ok = limit * batch * math.sqrt(k) / math.sqrt(parameters(spec))
        eps = (epsilon_for(z_ok, spec.rounds * k, spec.dp_delta, plan.sampling_rate)
               if z_ok >= 1e-3 else math.inf)
        return [f"epsilon {eps:.3g} or more" if eps <= MAX_SUGGESTED_EPSILON
                else "a larger epsilon", "fewer rounds", "more rows per site",
                "fewer model parameters"]
    z = dp_step.update_noise_multiplier(spec)
    p, n, shares = parameters(spec), spec.min_sites, dp_step.noise_shares(spec)
    need = z * math.sqrt(p) / limit  # = √(n·shares) at the limit
    secure = f"at least {math.ceil(need):,} sites in every aggregate with a secure sum"
    out = [secure if shares > 1 else f"{secure} ({math.ceil(need**2):,} in plain mode)"]
    z_ok = limit * math.sqrt(n * shares / p)
    # (adaptive clipping: σ_b depends on z, so the epsilon it needs is not named here)
    eps = (epsilon_for(z_ok, spec.rounds, spec.dp_delta)
           if z_ok >= 1e-3 and not spec.dp_adaptive_clip else math.inf)
    if eps <= MAX_SUGGESTED_EPSILON:
        out.append(f"epsilon {eps:.3g} or more")
    largest = math.floor((limit / z) ** 2 * n * shares)
    if largest >= MIN_SUGGESTED_PARAMETERS:
        out.append(f"a model of at most {largest:,} parameters (this one has {p:,})")
    if spec.model in DP_SGD_MODELS:
        row = estimate(spec.model_copy(update={"dp_sgd": True, "trim": 0.0}), rows)
        out.append("sample-level DP-SGD (--dp-unit row; dp_sgd=True)"
                   + (f": ratio {row.ratio:.2g} at {rows:,} rows" if row else ""))
    return out


def useless(spec: JobSpec, rows: int | None, limit: float = USEFUL_RATIO) -> str | None:
    """Why the job's noise would swamp its signal (one line), or None if it would not."""
    est = estimate(spec, rows)
    if est is None or est.ratio <= limit:
        return None
    return (f"the DP noise would swamp the signal: {est.words()} exceeds {limit:g}, so the "
            f"model would be noise; would work: {'; or '.join(remedies(spec, rows, limit))}")


def default_unit(spec: JobSpec, limit: float = USEFUL_RATIO) -> tuple[JobSpec, str | None]:
    """The job ``--epsilon`` means when no DP unit is named, and why (None: as given).

    Client-level DP protects a whole site, which is what a federation would like, but with
    few sites its noise swamps every round (see :func:`estimate`). Then a model that DP-SGD
    can train protects each row instead, whose noise is averaged over a batch of rows; a
    model it cannot train keeps client-level DP (and the policy judges its noise)."""
    if not spec.dp_enabled or spec.dp_sgd or dp_sums.applies(spec) or spec.model == "auto":
        return spec, None
    est = estimate(spec)
    if est is None or est.ratio <= limit or spec.model not in DP_SGD_MODELS:
        return spec, None
    row = JobSpec.model_validate({**spec.model_dump(), "dp_sgd": True, "trim": 0.0})
    return row, (f"--epsilon {spec.dp_epsilon:g}: with as few as {spec.min_sites} sites in an "
                 f"aggregate, client-level DP would put noise {est.ratio:.3g}x the largest "
                 f"update on every round's average (limit {limit:g}), so this job trains "
                 "with sample-level DP-SGD: "
                 f"epsilon {spec.dp_epsilon:g} for each row of each site's table, not for a "
                 "site as a whole (--dp-unit site insists on client-level DP)")
