"""What a data scientist asks every site to run, fixed at approval time."""

from __future__ import annotations

import functools
import hashlib
import secrets
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelKind = Literal["ae", "vae", "deepsvdd", "lstm-ae", "pca", "hbos", "iforest", "auto"]
#: detectors trained by gradient rounds (the others are built from released sums)
NEURAL_MODELS = ("ae", "vae", "deepsvdd", "lstm-ae")
#: detectors of one series in time order (they need the job's time column)
SERIES_MODELS = ("lstm-ae",)
#: detectors with a summed phase that no site can noise yet: refused under DP (fail closed)
NO_DP_MODELS = ("deepsvdd", "iforest")
#: detectors built from sums alone whose every summed release a DP site noises per row
#: (row-level Gaussian mechanism on the sum, fed_tasks/dp_sums.py)
ROW_DP_MODELS = ("pca", "hbos")
#: detectors that sample-level DP-SGD (Opacus, per-row gradients) can train
DP_SGD_MODELS = ("ae",)
#: detectors whose aggregate is pooled, not summed: plain mode only
PLAIN_ONLY_MODELS = ("iforest",)
#: the latent code's size when the spec does not give one: 4 for the dense models, wider for
#: the series model, whose one shared code must encode the windows of unlike devices (NAB's
#: ten server series: fed_tasks/detectors/lstm_ae.py). Filled in before validation, so the
#: spec, its JSON and its fingerprint always carry the number the sites will build.
DEFAULT_LATENT = 4
MODEL_LATENT = {"lstm-ae": 32}
#: what ``model="auto"`` compares when the spec names no candidates
DEFAULT_CANDIDATES = ("pca", "hbos", "ae", "iforest")
Aggregation = Literal["plain", "paillier", "secagg"]
StrategyName = Literal["fedavg", "fedprox", "median", "trimmed-mean", "krum", "fedadam",
                       "fedyogi", "scaffold"]
#: strategies that need every site's update in clear (plain mode only)
INDIVIDUAL_STRATEGIES = ("median", "trimmed-mean", "krum")


class JobSpec(BaseModel):
    """One federated training job.

    The spec is embedded verbatim in the code each data owner approves, so every field
    here is something an owner can read and a site can enforce (e.g. ``rounds``).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    job_id: str = Field(default_factory=lambda: secrets.token_hex(4), pattern=r"^[a-z0-9]{4,32}$")
    model: ModelKind = "ae"
    features: tuple[str, ...] = Field(min_length=1)
    label_column: str | None = None
    # a series job's time column: each site orders its rows by it (never a feature)
    time_column: str | None = None
    window: int = Field(default=32, ge=2, le=1024)  # rows per window of a series model
    # model="auto": train each candidate, score each on a private validation split of
    # val_fraction of every site's training rows (only metrics leave), keep the best
    candidates: tuple[str, ...] | None = None
    val_fraction: float = Field(default=0.2, ge=0.05, le=0.5)
    hidden: tuple[int, ...] = (32, 16)
    # default: MODEL_LATENT[model], else DEFAULT_LATENT (filled in by _latent_for_model)
    latent: int = Field(default=DEFAULT_LATENT, ge=1)
    local_epochs: int = Field(default=2, ge=1, le=100)
    batch_size: int = Field(default=256, ge=1)
    lr: float = Field(default=1e-3, gt=0, le=1)
    trim: float = Field(default=0.2, ge=0.0, lt=1.0)
    rounds: int = Field(default=10, ge=1, le=1000)  # at most: see patience
    # each round runs at least this many minibatch steps (whole epochs), so that a site with
    # a few hundred rows trains as much per round as a large one (DP-SGD: local_epochs only)
    min_local_steps: int = Field(default=20, ge=0, le=100_000)
    # early stopping: stop training once the federated loss improved by less than
    # min_delta (relative) for `patience` rounds in a row; 0 runs every round (always under
    # DP, where the loss is withheld)
    patience: int = Field(default=0, ge=0, le=1000)
    min_delta: float = Field(default=0.01, ge=0.0, lt=1.0)
    evaluations: int = Field(default=1, ge=0, le=10)
    aggregation: Aggregation = "plain"
    # how a round's updates are combined (fed_tasks/strategies): every party applies it
    strategy: StrategyName = "fedavg"
    prox_mu: float = Field(default=0.01, ge=0.0, le=10.0, allow_inf_nan=False)  # fedprox
    trim_ratio: float = Field(default=0.2, ge=0.0, lt=0.5)  # trimmed-mean: cut per side
    krum_byzantine: int = Field(default=1, ge=0, le=100)  # krum: sites that may be malicious
    server_lr: float = Field(default=0.01, gt=0.0, le=10.0, allow_inf_nan=False)  # fedadam/yogi
    # after the global rounds each site fine-tunes its own copy for this many epochs and
    # reports global and personalized metrics (the copy never leaves the site)
    personalize_epochs: int = Field(default=0, ge=0, le=100)
    min_sites: int = Field(default=2, ge=1, le=1000)
    # unreliable federations (fed_tasks/orchestrator.py): each training round calls a seeded
    # ``fraction`` of the sites (at least min_sites; plain mode only), and a site silent for
    # round_timeout seconds is skipped for that round; in plain mode a skipped site catches up
    # on the aggregates it missed at its next call. In paillier and secagg a site left out of
    # a round stays out of the job (secagg: a dropout the secure sum recovers from).
    fraction: float = Field(default=1.0, gt=0.0, le=1.0, allow_inf_nan=False)
    round_timeout: float | None = Field(default=None, gt=0.0, le=86_400.0, allow_inf_nan=False)
    # asynchronous buffered rounds (FedBuff; fed_tasks/buffered.py): a round's aggregate is
    # formed once async_k updates are in; a slow site's update joins a later aggregate,
    # weighted (1 + staleness)^-1/2, and never once it is more than max_staleness rounds old.
    # In secagg each round masks over the sites it calls; a late update is masked again
    # into a later round by its site (privacy/secagg_session.py, "Buffered rounds").
    async_k: int | None = Field(default=None, ge=1, le=1000)
    max_staleness: int = Field(default=4, ge=0, le=100)
    # smaller training updates (fed_tasks/compression.py): "none", "q8" / "q16" (8 / 16 bits
    # per value: plain mode quantizes each update between its own min and max, the secure
    # modes use fewer fixed-point bits) or "topk:K" (the K largest changes; plain mode only)
    compress: str = "none"
    update_bound: float = Field(default=2.0**24, gt=0)
    frac_bits: int = Field(default=16, ge=0, le=32)
    seed: int = 0
    # the alarm threshold: the score a target fraction of the training rows exceeds, from
    # summed score histograms (fed_tasks/calibration.py); None: no threshold, ranking only
    target_fpr: float | None = Field(default=None, gt=0, lt=0.5, allow_inf_nan=False)
    # Differential privacy (see privacy/dp.py and README "Privacy model"). dp_epsilon=None: off.
    # dp_sgd=False: client-level DP-FedAvg, each site clips its update to L2 norm dp_clip and
    # adds its share of Gaussian noise. dp_sgd=True: sample-level DP-SGD (Opacus) during local
    # training, dp_clip bounding each row's gradient norm. Either way the site charges the
    # job's epsilon to the dataset's ledger round by round, and withholds the loss.
    # pca/hbos (ROW_DP_MODELS): per row, Gaussian noise on each summed release (moments or
    # histograms, then the threshold's counts), charged release by release; dp_clip unused.
    dp_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    dp_clip: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    dp_sgd: bool = False
    # pca under DP: each standardized row is clipped to this L2 norm before its moments are
    # summed, which bounds one row's effect on the sum (fed_tasks/dp_sums.py); 3 is about the
    # norm of a typical row of 9 standardized features
    dp_row_clip: float = Field(default=3.0, gt=0, le=100, allow_inf_nan=False)
    # client-level DP-FedAvg with adaptive clipping (Andrew et al. 2021; fed_tasks/dp_step.py):
    # round t clips to C_t, starting at dp_clip, and each site also sends a noisy bit "my
    # update was under C_t"; every party moves C_t towards the dp_clip_quantile of the sites'
    # update norms from the released noisy count, at rate dp_clip_lr. dp_clip_count_std: the
    # noise std σ_b on that summed count (None: max(min_sites/20, z/(2·√0.1)), so the count
    # takes at most a tenth of each round's privacy); the epsilon and its charges are unchanged
    dp_adaptive_clip: bool = False
    dp_clip_quantile: float = Field(default=0.5, gt=0, lt=1, allow_inf_nan=False)
    dp_clip_lr: float = Field(default=0.2, gt=0, le=1, allow_inf_nan=False)
    dp_clip_count_std: float | None = Field(default=None, gt=0, le=1e6, allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def _latent_for_model(cls, data: Any) -> Any:
        # a per-model default: only when the caller gave no latent (an explicit one wins)
        if isinstance(data, dict) and "latent" not in data and data.get("model") in MODEL_LATENT:
            return {**data, "latent": MODEL_LATENT[data["model"]]}
        return data

    @model_validator(mode="after")
    def _label_not_a_feature(self) -> JobSpec:
        # a label among the features would train on it and put it in every released update
        if self.label_column is not None and self.label_column in self.features:
            raise ValueError(f"label column {self.label_column!r} cannot also be a feature")
        if self.time_column is not None and self.time_column in (*self.features,
                                                                 self.label_column):
            raise ValueError(f"time column {self.time_column!r} cannot also be a feature or "
                             "the label")
        if self.model in SERIES_MODELS and self.time_column is None:
            raise ValueError(f"model {self.model!r} reads one series in time order: give the "
                             "job's time column")
        return self

    @model_validator(mode="after")
    def _selection_fits_aggregation(self) -> JobSpec:
        if self.fraction < 1.0 and self.aggregation != "plain":
            raise ValueError("fraction < 1 needs aggregation 'plain': in a secure mode a site "
                             "left out of a round stays out of the job (were it to rejoin, "
                             "two sums would differ by its update alone)")
        return self

    @model_validator(mode="after")
    def _async_fits(self) -> JobSpec:
        if self.async_k is None:
            return self
        if self.model not in NEURAL_MODELS:
            raise ValueError(f"async_k buffers training rounds; model {self.model!r} has none")
        if self.async_k < self.min_sites:
            raise ValueError(f"async_k={self.async_k} is below min_sites={self.min_sites}: "
                             "every aggregate must hold at least min_sites updates")
        if self.strategy not in ("fedavg", "fedprox", "fedadam", "fedyogi"):
            raise ValueError(f"async_k weighs stale updates in an average; strategy "
                             f"{self.strategy!r} does not average (use fedavg, fedprox, "
                             "fedadam or fedyogi)")
        if self.dp_enabled:
            raise ValueError("async_k is not available with differential privacy: weighting "
                             "a stale update would also scale its noise below the calibrated "
                             "level")
        if self.fraction < 1.0:
            raise ValueError("async_k calls every idle site each round: leave fraction at 1")
        return self

    @model_validator(mode="after")
    def _dp_consistent(self) -> JobSpec:
        if self.dp_sgd and self.dp_epsilon is None:
            raise ValueError("dp_sgd=True needs dp_epsilon (the sample-level budget of the job)")
        if self.dp_sgd and self.trim > 0:
            raise ValueError("dp_sgd=True needs trim=0: trimming the highest-error rows of a "
                             "batch couples rows, which doubles DP-SGD's per-row sensitivity")
        if self.dp_enabled and self.model in NO_DP_MODELS:
            raise ValueError(f"model {self.model!r} releases sums that no site can noise yet: "
                             "differential privacy is available for ae, vae and lstm-ae "
                             "(per site or DP-SGD) and for pca and hbos (per row) only")
        if self.dp_sgd and self.model not in DP_SGD_MODELS:
            raise ValueError("sample-level DP-SGD is available for model 'ae' only; use "
                             "client-level DP for 'vae' and 'lstm-ae'")
        return self

    @model_validator(mode="after")
    def _adaptive_clip_consistent(self) -> JobSpec:
        if not self.dp_adaptive_clip:
            if self.dp_clip_count_std is not None:
                raise ValueError("dp_clip_count_std is the noise on adaptive clipping's count: "
                                 "set dp_adaptive_clip=True or leave it unset")
            return self
        if self.dp_epsilon is None or self.dp_sgd or self.model in ROW_DP_MODELS:
            raise ValueError("dp_adaptive_clip adapts the clip of client-level DP-FedAvg: it "
                             "needs dp_epsilon, dp_sgd=False and a model trained in rounds "
                             "(not pca/hbos, whose rows are clipped by dp_row_clip)")
        if self.strategy == "scaffold" or self.strategy in INDIVIDUAL_STRATEGIES:
            raise ValueError(f"dp_adaptive_clip is not available with strategy "
                             f"{self.strategy!r}: the clip follows the *sum* of the sites' "
                             "clipping bits, which scaffold's layout and the robust strategies' "
                             "per-site statistics do not release")
        if self.dp_clip_count_std is not None:
            from privacy.dp import adaptive_update_noise_multiplier, noise_multiplier_for

            z = noise_multiplier_for(self.dp_epsilon, self.rounds, self.dp_delta)
            try:
                adaptive_update_noise_multiplier(z, self.dp_clip_count_std)
            except ValueError as exc:
                raise ValueError(f"dp_clip_count_std={self.dp_clip_count_std:g}: {exc}") from None
        return self

    @model_validator(mode="after")
    def _selection_consistent(self) -> JobSpec:
        if self.model != "auto":
            if self.candidates is not None:
                raise ValueError("candidates are for model 'auto' only")
            return self
        if len(self.job_id) > 29:
            raise ValueError("a model-selection job id has at most 29 characters (each "
                             "candidate's job id appends 'c' and its index)")
        names = self.candidate_models
        unknown = [c for c in names if c not in SELECTABLE]
        if unknown or len(set(names)) != len(names) or not 2 <= len(names) <= 8:
            raise ValueError(f"candidates must be 2 to 8 different models of {SELECTABLE}; "
                             f"got {list(names)}")
        if self.dp_enabled:
            raise ValueError("model 'auto' is not available with differential privacy yet "
                             "(the validation metrics are not noised): choose one model")
        if self.aggregation != "plain" and any(c in PLAIN_ONLY_MODELS for c in names):
            raise ValueError(f"candidates {[c for c in names if c in PLAIN_ONLY_MODELS]} pool "
                             "trees, which a secure sum cannot do: drop them or use 'plain'")
        return self

    @property
    def candidate_models(self) -> tuple[str, ...]:
        """The models ``auto`` compares (defaults: those the aggregation mode can train)."""
        if self.candidates is not None:
            return tuple(self.candidates)
        return tuple(c for c in DEFAULT_CANDIDATES
                     if self.aggregation == "plain" or c not in PLAIN_ONLY_MODELS)

    @property
    def candidate_specs(self) -> tuple[JobSpec, ...]:
        """Every candidate of a model-selection job as its own job, in order."""
        return tuple(self.candidate_spec(i) for i in range(len(self.candidate_models)))

    def candidate_spec(self, index: int) -> JobSpec:
        """Candidate ``index`` of a model-selection job, as its own job: what every party
        derives from the approved spec (never from a message) for that candidate's calls."""
        if self.model != "auto":
            raise ValueError(f"job {self.job_id!r} trains one model, it has no candidates")
        names = self.candidate_models
        if type(index) is not int or not 0 <= index < len(names):
            raise ValueError(f"candidate {index!r} is outside 0..{len(names) - 1}")
        return _candidate_spec(self, index)

    @model_validator(mode="after")
    def _strategy_fits(self) -> JobSpec:
        if self.personalize_epochs and self.model not in (*NEURAL_MODELS, "auto"):
            raise ValueError(f"personalization fine-tunes a model trained in rounds; model "
                             f"{self.model!r} has none")
        if self.strategy == "fedavg":
            return self
        if self.model not in NEURAL_MODELS and self.model != "auto":
            raise ValueError(f"strategy {self.strategy!r} combines training rounds; model "
                             f"{self.model!r} has none (use strategy 'fedavg')")
        if self.strategy in INDIVIDUAL_STRATEGIES and self.aggregation != "plain":
            raise ValueError(f"strategy {self.strategy!r} needs every site's update in clear, "
                             f"which {self.aggregation!r} never shows: use aggregation "
                             "'plain', or 'fedavg'/'fedprox' (in the secure modes each site "
                             "bounds only its own update)")
        if self.strategy == "scaffold" and self.dp_enabled:
            raise ValueError("strategy 'scaffold' sends control variates that no site can "
                             "noise yet: not available with differential privacy")
        if self.strategy == "krum" and self.min_sites < self.krum_byzantine + 3:
            raise ValueError(f"strategy 'krum' with krum_byzantine={self.krum_byzantine} "
                             f"needs min_sites >= {self.krum_byzantine + 3}")
        return self

    @field_validator("compress")
    @classmethod
    def _known_compression(cls, value: str) -> str:
        from fed_tasks.compression import parse

        try:
            parse(value)
        except ValueError:
            raise ValueError("must be none, q8, q16 or topk:K (K a whole number from 1)"
                             ) from None
        return value

    @model_validator(mode="after")
    def _compression_fits(self) -> JobSpec:
        if self.compress == "none":
            return self
        if self.model not in NEURAL_MODELS and self.model != "auto":
            raise ValueError(f"compress {self.compress!r} shrinks training updates; model "
                             f"{self.model!r} has no training rounds (use compress 'none')")
        if self.dp_enabled:
            raise ValueError("compress is not available with differential privacy yet (each "
                             "site's noise is calibrated to the uncompressed update)")
        if self.strategy == "scaffold":
            raise ValueError("compress is not available with strategy 'scaffold' (its control "
                             "variates travel in the update)")
        if self.compress.startswith("topk") and self.aggregation != "plain":
            raise ValueError(f"compress {self.compress!r} sends a sparse update, which "
                             f"{self.aggregation!r} cannot add (a secure sum needs dense "
                             "vectors): use aggregation 'plain', or q8 / q16")
        return self

    @model_validator(mode="after")
    def _aggregation_fits_model(self) -> JobSpec:
        if self.model in PLAIN_ONLY_MODELS and self.aggregation != "plain":
            raise ValueError(f"model {self.model!r} pools each site's trees, which a secure sum "
                             "cannot do: use aggregation 'plain' (or a model built from sums: "
                             "pca, hbos)")
        return self

    @property
    def dp_enabled(self) -> bool:
        """True if the job's releases carry a differential-privacy guarantee."""
        return self.dp_epsilon is not None

    @field_validator("features")
    @classmethod
    def _unique_features(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        if len(set(value)) != len(value):
            raise ValueError("feature names must be unique")
        return value

    def to_json(self) -> str:
        return self.model_dump_json()

    @classmethod
    def from_json(cls, text: str) -> JobSpec:
        return cls.model_validate_json(text)

    @property
    def fingerprint(self) -> str:
        """Short hash binding audit entries and approvals to this exact spec."""
        return hashlib.sha256(self.to_json().encode()).hexdigest()[:16]


#: models ``auto`` may compare (a series model needs its rows in order, not a random split)
SELECTABLE = ("ae", "vae", "deepsvdd", "pca", "hbos", "iforest")


@functools.lru_cache(maxsize=256)
def _candidate_spec(spec: JobSpec, index: int) -> JobSpec:
    model = spec.candidate_models[index]
    rounds_only = {} if model in NEURAL_MODELS else {"strategy": "fedavg",
                                                     "personalize_epochs": 0,
                                                     "compress": "none"}
    return JobSpec.model_validate({**spec.model_dump(), "model": model,
                                   "job_id": f"{spec.job_id}c{index}", "candidates": None,
                                   **rounds_only})
