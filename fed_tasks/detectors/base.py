"""What a detector must say to be trained through the approved-job path.

A detector is one class with a scikit-learn surface (``fit`` / ``score_samples``, higher =
more anomalous, ``predict`` against ``threshold_``) plus its federated *rules*, as class
methods that every party evaluates on the approved spec alone:

- :meth:`phases` — the summed calls the job runs after the statistics;
- :meth:`contribute` — what a site sends for one of them, from its standardized rows and
  the model state it verified itself (never from the message);
- :meth:`from_state` — the fitted detector that follows from the released sums.
"""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from fed_tasks.codec import PayloadError
from fed_tasks.global_state import GlobalState
from fed_tasks.spec import JobSpec


class FederatedDetector:
    """Defaults of the federated rules; subclasses override what they use."""

    name: ClassVar[str] = ""
    #: one line for the owner's review: what the job builds
    title: ClassVar[str] = ""
    #: what leaves a site beyond the statistics, in plain words (review and README)
    leaves: ClassVar[str] = ""
    threshold_: float | None = None

    @classmethod
    def phases(cls, spec: JobSpec) -> tuple:
        return ()

    @classmethod
    def initial_weights(cls, spec: JobSpec) -> np.ndarray:
        return np.zeros(0)

    @classmethod
    def contribute(cls, spec: JobSpec, action: str, k: int, z: np.ndarray,
                   state: GlobalState) -> np.ndarray:
        raise PayloadError(f"model {spec.model!r} has no {action!r} step")

    @classmethod
    def from_state(cls, spec: JobSpec, state: GlobalState) -> FederatedDetector:
        raise NotImplementedError

    @classmethod
    def check_contribution(cls, spec: JobSpec, action: str, vector: np.ndarray) -> None:
        """Refuse (PayloadError) another member's vector that is not well formed, before the
        site uses it; a sum needs no check beyond its length and finiteness."""
        return None

    def score_samples(self, z: np.ndarray) -> np.ndarray:
        raise NotImplementedError

    def predict(self, z: np.ndarray) -> np.ndarray:
        """1 where the score exceeds the calibrated threshold (an alarm), else 0."""
        if self.threshold_ is None:
            raise ValueError("this detector has no calibrated threshold (job target_fpr)")
        return (self.score_samples(z) > self.threshold_).astype(np.int64)


def released(state: GlobalState, key: str) -> np.ndarray:
    """A released sum the detector needs; a clear error if the job has not reached it."""
    value = state.extra.get(key)
    if value is None:
        raise PayloadError(f"the model needs the released {key.split(':')[0]!r} sum first")
    return value
