"""Dense autoencoder: rows it cannot reconstruct are anomalous."""

from __future__ import annotations

import torch
from torch import nn

from fed_tasks.detectors._torch import TorchDetector, _mlp


class AutoencoderDetector(TorchDetector):
    """Dense autoencoder; the anomaly score is the mean squared reconstruction error."""

    name = "ae"
    title = "a dense autoencoder, trained by federated averaging"

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 16), latent: int = 4,
                 seed: int = 0) -> None:
        self.hidden = tuple(hidden)
        self.latent = latent
        super().__init__(n_features, seed)

    def _build(self) -> nn.Module:
        enc = [self.n_features, *self.hidden, self.latent]
        return nn.Sequential(_mlp(enc, last_activation=True),
                             _mlp(enc[::-1], last_activation=False))

    def per_row_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.mean((self.net(batch) - batch) ** 2, dim=1)
