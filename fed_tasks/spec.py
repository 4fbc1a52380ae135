"""What a data scientist asks every site to run, fixed at approval time."""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

ModelKind = Literal["ae", "vae", "deepsvdd", "pca", "hbos", "iforest"]
#: detectors trained by gradient rounds (the others are built from released sums)
NEURAL_MODELS = ("ae", "vae", "deepsvdd")
#: detectors with a summed phase that no site can noise yet: refused under DP (fail closed)
NO_DP_MODELS = ("deepsvdd", "pca", "hbos", "iforest")
#: detectors whose aggregate is pooled, not summed: plain mode only
PLAIN_ONLY_MODELS = ("iforest",)
Aggregation = Literal["plain", "paillier", "secagg"]


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
    hidden: tuple[int, ...] = (32, 16)
    latent: int = Field(default=4, ge=1)
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
    min_sites: int = Field(default=2, ge=1, le=1000)
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
    dp_epsilon: float | None = Field(default=None, gt=0, allow_inf_nan=False)
    dp_delta: float = Field(default=1e-5, gt=0, lt=1)
    dp_clip: float = Field(default=1.0, gt=0, allow_inf_nan=False)
    dp_sgd: bool = False

    @model_validator(mode="after")
    def _label_not_a_feature(self) -> JobSpec:
        # a label among the features would train on it and put it in every released update
        if self.label_column is not None and self.label_column in self.features:
            raise ValueError(f"label column {self.label_column!r} cannot also be a feature")
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
                             "differential privacy is available for ae and vae only")
        if self.dp_sgd and self.model != "ae":
            raise ValueError("dp_sgd=True is available for model 'ae' only; use client-level "
                             "DP (dp_sgd=False) for 'vae'")
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
