"""What a data scientist asks every site to run, fixed at approval time."""

from __future__ import annotations

import hashlib
import secrets
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

ModelKind = Literal["ae"]
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
    rounds: int = Field(default=10, ge=1, le=1000)
    evaluations: int = Field(default=1, ge=0, le=10)
    aggregation: Aggregation = "plain"
    min_sites: int = Field(default=2, ge=1, le=1000)
    update_bound: float = Field(default=2.0**24, gt=0)
    frac_bits: int = Field(default=16, ge=0, le=32)
    seed: int = 0

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
