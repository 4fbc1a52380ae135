"""Variational autoencoder: the score is the negative ELBO, so rows the model finds
improbable rank high even where a plain autoencoder would reconstruct them."""

from __future__ import annotations

import torch
from torch import nn

from fed_tasks.detectors._torch import TorchDetector, _mlp

LOGVAR_CLAMP = 10.0  # exp(±10): keeps a diverging round from producing inf before averaging


class _VAENet(nn.Module):
    def __init__(self, n_features: int, hidden: tuple[int, ...], latent: int) -> None:
        super().__init__()
        self.encoder = _mlp([n_features, *hidden], last_activation=True)
        self.mu = nn.Linear(hidden[-1] if hidden else n_features, latent)
        self.logvar = nn.Linear(hidden[-1] if hidden else n_features, latent)
        self.decoder = _mlp([latent, *hidden[::-1], n_features], last_activation=False)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        h = self.encoder(x)
        return self.mu(h), torch.clamp(self.logvar(h), -LOGVAR_CLAMP, LOGVAR_CLAMP)


class VAEDetector(TorchDetector):
    """VAE with a unit Gaussian prior; per row loss = MSE (mean over features) + β·KL/d.

    The KL is divided by the feature count so its weight relative to the reconstruction term
    does not change with the table's width. Training noise comes from a generator seeded by
    ``fit``'s ``seed``, so a round is reproducible; scores use the mean code, no noise.
    """

    name = "vae"
    title = "a variational autoencoder, trained by federated averaging"

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 16), latent: int = 4,
                 seed: int = 0, beta: float = 1.0) -> None:
        self.hidden = tuple(hidden)
        self.latent = latent
        self.beta = beta
        super().__init__(n_features, seed)
        self._noise = torch.Generator().manual_seed(seed)

    def _build(self) -> nn.Module:
        return _VAENet(self.n_features, self.hidden, self.latent)

    def _begin_fit(self, seed: int) -> None:
        # not ``seed`` itself: the loop's permutation generator already starts from it
        self._noise = torch.Generator().manual_seed((seed * 0x9E3779B1 + 1) % 2**63)

    def _kl(self, mu: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
        kl = -0.5 * torch.sum(1.0 + logvar - mu ** 2 - torch.exp(logvar), dim=1)
        return self.beta * kl / self.n_features

    def per_row_loss(self, batch: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.net.encode(batch)
        eps = torch.randn(mu.shape, generator=self._noise)
        recon = self.net.decoder(mu + torch.exp(0.5 * logvar) * eps)
        return torch.mean((recon - batch) ** 2, dim=1) + self._kl(mu, logvar)

    def per_row_score(self, batch: torch.Tensor) -> torch.Tensor:
        mu, logvar = self.net.encode(batch)
        return torch.mean((self.net.decoder(mu) - batch) ** 2, dim=1) + self._kl(mu, logvar)
