"""What runs at a site for one approved call: train, summarize or evaluate locally.

The functions take the site's private frames and return only what the job allows to
leave: a vector to be *summed* across sites (moment sums, a weight update with its sample
count, histogram counts; see :mod:`fed_tasks.schedule`) under key ``"vector"``, or metrics.
The site wrapper in ``datasites`` decides *whether* a call may run and how the vector is
protected (plain, Paillier, masked).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from fed_tasks import calibration, compression, dp_step, dp_sums
from fed_tasks.codec import PayloadError
from fed_tasks.detectors import rules_for
from fed_tasks.detectors._torch import TorchDetector
from fed_tasks.evaluation import detection_metrics
from fed_tasks.global_state import GlobalState, extra_key
from fed_tasks.preprocessing import Moments, Standardizer
from fed_tasks.schedule import SUMMED_ACTIONS, has_phase
from fed_tasks.schedule import vector_length as vector_length
from fed_tasks.spec import JobSpec
from fed_tasks.strategies import strategy_for
from fed_tasks.strategy import pack_update

ACTIONS = (*SUMMED_ACTIONS, "evaluate")


def in_order(spec: JobSpec, frame: pd.DataFrame) -> pd.DataFrame:
    """A series job's rows in time order (the site's own column); other jobs as they are."""
    if spec.time_column is None:
        return frame
    if spec.time_column not in frame.columns:
        raise PayloadError(f"table lacks the job's time column {spec.time_column!r}")
    return frame.sort_values(spec.time_column, kind="stable")


def feature_matrix(spec: JobSpec, frame: pd.DataFrame) -> np.ndarray:
    """The spec's feature columns as float64 (a series in time order); the label and the
    time never enter training."""
    missing = [c for c in spec.features if c not in frame.columns]
    if missing:
        raise PayloadError(f"table lacks the job's feature columns {missing}")
    return in_order(spec, frame).loc[:, list(spec.features)].to_numpy(dtype=np.float64)


def new_model(spec: JobSpec) -> TorchDetector:
    """The job's untrained neural model, built from the approved spec."""
    rules = rules_for(spec)
    if not issubclass(rules, TorchDetector):
        raise PayloadError(f"model {spec.model!r} is not trained by gradient rounds")
    return rules.build(spec)


def initial_weights(spec: JobSpec) -> np.ndarray:
    """The weights every party starts the job from (empty for detectors built from sums)."""
    return rules_for(spec).initial_weights(spec)


@dataclass(frozen=True)
class StepInput:
    """What a call computes from: the round and the model *the site itself* holds (see
    :mod:`fed_tasks.site_state`); never weights or scaling from the message."""

    round: int = 0
    model: GlobalState | None = None
    # the site's own state kept between rounds (SCAFFOLD's control variate); a step may
    # update it in place, and the site saves it with its model state, never releases it
    private: dict[str, np.ndarray] | None = None


def _state(given: StepInput) -> GlobalState:
    if given.model is None or given.model.norm is None:
        raise PayloadError("this call needs the federation's model and feature scaling, "
                           "which the site derives from the released statistics first")
    return given.model


def _model_at(spec: JobSpec, given: StepInput) -> tuple[TorchDetector, Standardizer]:
    """The neural model the site holds (weights, and e.g. a Deep SVDD centre)."""
    state = _state(given)
    model = rules_for(spec).from_state(spec, state)
    if not isinstance(model, TorchDetector):
        raise PayloadError(f"model {spec.model!r} is not trained by gradient rounds")
    assert state.norm is not None
    return model, state.norm


def detector(spec: JobSpec, state: GlobalState):
    """The fitted detector that follows from the released sums, with its threshold."""
    model = rules_for(spec).from_state(spec, state)
    model.threshold_ = calibration.threshold(spec, state.extra)
    return model


def contribute(spec: JobSpec, action: str, train: pd.DataFrame,
               given: StepInput, noise_shares: int | None = None) -> dict[str, Any]:
    """A summed phase other than training: moments, histograms, a centre, score counts.

    Under DP (pca, hbos) the sum carries this site's share of the release's Gaussian noise
    (see :mod:`fed_tasks.dp_sums`; ``noise_shares`` as for :func:`fit`); a DP job's sum no
    mechanism covers is refused, never released un-noised."""
    if not has_phase(spec, action):
        raise PayloadError(f"job {spec.job_id!r} ({spec.model}) has no {action!r} step")
    state = _state(given)
    assert state.norm is not None
    z = state.norm.transform(feature_matrix(spec, train))
    k = int(given.round)
    if action == "calibrate":
        scores = detector(spec, state).score_samples(z)
        vector = calibration.local_counts(spec, k, state.extra, scores)
    else:
        vector = rules_for(spec).contribute(spec, action, k, z, state)
    if spec.dp_enabled:
        if not dp_sums.covers(spec, action):  # fail closed
            raise PayloadError(f"job {spec.job_id!r} asks for {action!r} under differential "
                               "privacy, which no site can noise")
        shares = noise_shares or dp_step.noise_shares(spec)
        vector = dp_sums.privatize(spec, action, vector, shares)
    return {"vector": np.asarray(vector, dtype=np.float64), "round": k}


def stats(spec: JobSpec, train: pd.DataFrame) -> dict[str, Any]:
    """``[count, Σx, Σx²]`` of the training features (summed across sites)."""
    return {"vector": Moments.of(feature_matrix(spec, train)).to_vector()}


def fit(spec: JobSpec, train: pd.DataFrame, given: StepInput,
        noise_shares: int | None = None) -> dict[str, Any]:
    """Local epochs from the global weights; returns ``[n·Δ, n·loss, n]`` (see strategy).

    With DP the vector is ``[Δ_private, 0, 1]`` instead (see :mod:`fed_tasks.dp_step`):
    DP-SGD during training, or Δ clipped and noised afterwards (``noise_shares``: into how
    many shares the noise is split; default from the spec's aggregation mode). With
    adaptive clipping the clip is ``C_t`` of the site's own global state and the loss slot
    carries the noisy clipping bit: ``[Δ_private, b + noise, 1]``. With ``spec.compress``
    the vector is what will be summed (:func:`fed_tasks.compression.compress_fit`: in plain
    mode the decoded payload, also returned as ``payload``; in a secure mode
    ``[w·Δ, w·loss, w]``, w = n/N), what it drops kept in ``given.private``.
    """
    model, norm = _model_at(spec, given)
    start = model.get_weights()
    rnd = int(given.round)
    x = norm.transform(feature_matrix(spec, train))
    if spec.dp_sgd:
        dp_step.fit_dp_sgd(model, x, spec)
        return {"vector": dp_step.release(model.get_weights() - start), "round": rnd}
    if spec.strategy == "scaffold":
        return _fit_scaffold(spec, model, x, given, len(train))
    loss = _train(spec, model, x, spec.local_epochs, rnd, **strategy_for(spec).local_options())
    delta = model.get_weights() - start
    if spec.dp_enabled:  # the clip: dp_clip, or C_t from the state this site derived itself
        shares = noise_shares or dp_step.noise_shares(spec)
        server = _state(given).server
        return {"vector": dp_step.private_update(spec, delta, shares, server),
                "round": rnd}
    vector = pack_update(delta, loss, len(train))
    if spec.compress == "none":
        return {"vector": vector, "round": rnd}
    stats = _state(given).extra.get(extra_key("stats", 0))
    rows = float(stats[0]) if stats is not None and len(stats) else 0.0
    sent, extra = compression.compress_fit(spec, vector, rows, given.private)
    return {"vector": sent, "round": rnd, **extra}


def scored(labels: np.ndarray, scores: np.ndarray, threshold: float | None) -> dict[str, Any]:
    """ROC-AUC and PR-AUC (None for a one-class split), and counts at the threshold (a
    site's evaluation; the harness scores the pooled test rows alike)."""
    # a wrecked (e.g. noise-swamped) model may overflow: rank its inf/NaN scores as the
    # largest finite ones, so the metrics say how bad it is instead of failing
    big = float(np.finfo(np.float64).max)
    scores = np.nan_to_num(np.asarray(scores, dtype=np.float64), nan=big, posinf=big,
                           neginf=-big)
    metrics: dict[str, Any] = (detection_metrics(labels, scores) if len(set(labels)) == 2
                               else {"roc_auc": None, "pr_auc": None})  # one class: no ranking
    if threshold is not None:  # counts at the calibrated threshold: pooled by summing
        alarm = scores > threshold
        metrics |= {"tp": int(np.sum(alarm & (labels == 1))),
                    "fp": int(np.sum(alarm & (labels == 0))),
                    "fn": int(np.sum(~alarm & (labels == 1))),
                    "tn": int(np.sum(~alarm & (labels == 0)))}
    return metrics


def _train(spec: JobSpec, model: TorchDetector, x: np.ndarray, epochs: int, rnd: int,
           **options: Any) -> float:
    """The site's local training as the spec fixes it (batch, rate, trimming, step floor),
    seeded by the round; ``options`` are the strategy's (a proximal term, a correction)."""
    return model.fit(x, epochs=epochs, batch_size=spec.batch_size, lr=spec.lr,
                     seed=spec.seed * 100_003 + rnd, trim=spec.trim,
                     min_steps=spec.min_local_steps, **options)


def personalized(spec: JobSpec, model: TorchDetector, x_train: np.ndarray) -> TorchDetector:
    """The site's own copy of the global model, fine-tuned on its rows for
    ``personalize_epochs``; it never leaves the site (only its metrics do)."""
    _train(spec, model, x_train, spec.personalize_epochs, spec.rounds + 1)
    return model


def _fit_scaffold(spec: JobSpec, model: TorchDetector, x: np.ndarray, given: StepInput,
                  n_rows: int) -> dict[str, Any]:
    """A SCAFFOLD round (:mod:`fed_tasks.strategies.scaffold`): local steps corrected by
    ``c − c_i``, the site's new ``c_i`` kept at the site, its change sent with the update."""
    if given.private is None or given.model is None:
        raise PayloadError("a SCAFFOLD round needs the site's own state")
    start = model.get_weights()
    c = given.model.server.get("c", np.zeros_like(start))
    c_site = given.private.get("control", np.zeros_like(start))
    c_new = model.full_gradient(x)  # at the global model, before any local step
    loss = _train(spec, model, x, spec.local_epochs, int(given.round), correction=c - c_site)
    given.private["control"] = c_new
    vector = np.concatenate([n_rows * (model.get_weights() - start), c_new - c_site, [1.0],
                             [n_rows * loss, float(n_rows)]])
    return {"vector": vector, "round": int(given.round)}


def untrained_scores(spec: JobSpec, x: np.ndarray) -> np.ndarray:
    """Scores of the job's model before any data shaped it: the neural model at its
    initial weights, or, for a detector built from sums, the squared distance of the
    standardized row from the mean (an identity covariance). A DP model that ranks worse
    than this learned nothing but noise."""
    rules = rules_for(spec)
    if issubclass(rules, TorchDetector):
        return rules.build(spec).score_samples(x)
    return np.sum(np.square(x), axis=1)


def evaluate(spec: JobSpec, test: pd.DataFrame, given: StepInput,
             train: pd.DataFrame | None = None) -> dict[str, Any]:
    """Metrics of the site's verified model on its private test split; only numbers leave.

    With ``personalize_epochs``, also those of the site's fine-tuned copy, alarmed at its
    own threshold (the same target quantile of its own training rows' scores, kept local).
    """
    if spec.label_column is None or spec.label_column not in test.columns:
        raise PayloadError("evaluation needs the job's label column in the site's test split")
    state = _state(given)
    assert state.norm is not None
    model = detector(spec, state)
    x_test = state.norm.transform(feature_matrix(spec, test))
    labels = in_order(spec, test)[spec.label_column].to_numpy().astype(int)
    metrics = scored(labels, model.score_samples(x_test), model.threshold_)
    if spec.dp_enabled:  # is the noisy model better than none? (README: no silent garbage)
        metrics["untrained"] = scored(labels, untrained_scores(spec, x_test), None)
    if spec.personalize_epochs and train is not None and isinstance(model, TorchDetector):
        x_train = state.norm.transform(feature_matrix(spec, train))
        own = personalized(spec, model, x_train)
        threshold = (float(np.quantile(own.score_samples(x_train), 1.0 - spec.target_fpr))
                     if spec.target_fpr is not None else None)
        metrics["personalized"] = scored(labels, own.score_samples(x_test), threshold)
    return {**metrics, "n_test": int(len(test)), "n_pos": int(labels.sum())}


def run(spec: JobSpec, action: str, given: StepInput, train: pd.DataFrame,
        test: pd.DataFrame, *, noise_shares: int | None = None) -> dict[str, Any]:
    """Dispatch one approved call."""
    if action == "stats":
        return stats(spec, train)
    if action == "fit":
        return fit(spec, train, given, noise_shares)
    if action == "evaluate":
        return evaluate(spec, test, given, train)
    if action in ACTIONS:
        return contribute(spec, action, train, given, noise_shares)
    raise PayloadError(f"unknown action {action!r}; expected one of {ACTIONS}")
