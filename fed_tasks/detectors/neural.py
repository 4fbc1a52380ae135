"""Federated rules shared by the detectors trained by gradient steps (``ae`` ...).

Their phase is ``fit``: ``spec.rounds`` FedAvg rounds of local epochs, each site sending
``[n·Δw, n·loss, n]`` (:mod:`fed_tasks.strategy`); the step itself, with its DP variants,
is :func:`fed_tasks.site_step.fit`.
"""

from __future__ import annotations

import functools

import numpy as np

from fed_tasks.detectors.base import FederatedDetector
from fed_tasks.global_state import GlobalState
from fed_tasks.spec import JobSpec


@functools.lru_cache(maxsize=256)
def _n_params(spec: JobSpec) -> int:
    from fed_tasks.site_step import new_model

    return new_model(spec).n_params


class NeuralRules(FederatedDetector):
    """The rules of a neural detector; the model itself is :func:`build_model`'s."""

    name = "ae"
    title = "a dense autoencoder, trained by federated averaging"
    leaves = "per round the sample-weighted weight change, loss and row count"

    @classmethod
    def phases(cls, spec: JobSpec) -> tuple:
        from fed_tasks.schedule import Phase, fit_codec

        return (Phase("fit", spec.rounds, _n_params(spec) + 2, fit_codec(spec)),)

    @classmethod
    def initial_weights(cls, spec: JobSpec) -> np.ndarray:
        from fed_tasks.site_step import new_model

        return new_model(spec).get_weights()

    @classmethod
    def from_state(cls, spec: JobSpec, state: GlobalState):
        from fed_tasks.site_step import new_model

        model = new_model(spec)
        model.set_weights(state.weights)
        return model
