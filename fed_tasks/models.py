"""The torch detectors by job name; kept for imports from before :mod:`fed_tasks.detectors`."""

from __future__ import annotations

from fed_tasks.detectors._torch import _INIT_LOCK, TorchDetector, _single_thread
from fed_tasks.detectors.ae import AutoencoderDetector
from fed_tasks.detectors.deepsvdd import DeepSVDDDetector
from fed_tasks.detectors.lstm_ae import LSTMAutoencoder
from fed_tasks.detectors.vae import VAEDetector

__all__ = ["AutoencoderDetector", "TorchDetector", "_INIT_LOCK", "_single_thread", "build_model"]

KINDS: dict[str, type[TorchDetector]] = {
    "ae": AutoencoderDetector,
    "vae": VAEDetector,
    "deepsvdd": DeepSVDDDetector,
    "lstm-ae": LSTMAutoencoder,
}


def build_model(kind: str, n_features: int, hidden: tuple[int, ...], latent: int,
                seed: int) -> TorchDetector:
    """Model factory keyed by ``JobSpec.model`` (the torch detectors only)."""
    cls = KINDS.get(kind)
    if cls is None:
        raise ValueError(f"unknown model kind {kind!r}; known: {', '.join(map(repr, KINDS))}")
    return cls(n_features, hidden=hidden, latent=latent, seed=seed)
