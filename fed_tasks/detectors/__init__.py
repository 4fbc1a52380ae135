"""The detectors a job may name (``JobSpec.model``) and how each is trained federatedly.

Each entry is one class in one file; its *rules* say which summed phases the job runs
after the statistics, what a site contributes to each, and how the fitted detector
follows from the released sums (see :mod:`fed_tasks.detectors.base`).
"""

from __future__ import annotations

import importlib

from fed_tasks.spec import JobSpec

#: model name -> "module:Class" of its federated rules (imported on first use: torch is slow)
REGISTRY: dict[str, str] = {
    "ae": "fed_tasks.detectors.ae:AutoencoderDetector",
    "vae": "fed_tasks.detectors.vae:VAEDetector",
    "deepsvdd": "fed_tasks.detectors.deepsvdd:DeepSVDDDetector",
    "lstm-ae": "fed_tasks.detectors.lstm_ae:LSTMAutoencoder",
    "pca": "fed_tasks.detectors.pca:PCADetector",
    "hbos": "fed_tasks.detectors.hbos:HBOSDetector",
    "iforest": "fed_tasks.detectors.iforest:FederatedIsolationForest",
}


def rules_for(spec: JobSpec):
    """The federated rules of the job's detector."""
    return rules_by_name(spec.model)


def rules_by_name(name: str):
    target = REGISTRY.get(name)
    if target is None:
        raise ValueError(f"unknown model {name!r}; known: {sorted(REGISTRY)}")
    module, cls = target.split(":")
    return getattr(importlib.import_module(module), cls)
