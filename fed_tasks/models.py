"""Anomaly detectors with a scikit-learn-like surface and flat weight vectors.

Federated averaging works on one flat float vector per model, so every detector exposes
``get_weights`` / ``set_weights`` besides ``fit`` and ``score_samples``.
"""

from __future__ import annotations

import threading

import numpy as np
import torch
from torch import nn

_INIT_LOCK = threading.Lock()


class _single_thread:
    """Small dense nets train fastest on one thread; extra threads only spin and contend."""

    def __enter__(self) -> None:
        self._prev = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc: object) -> None:
        torch.set_num_threads(self._prev)


def _mlp(sizes: list[int], last_activation: bool) -> nn.Sequential:
    layers: list[nn.Module] = []
    for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        layers.append(nn.Linear(a, b))
        if i < len(sizes) - 2 or last_activation:
            layers.append(nn.ReLU())
    return nn.Sequential(*layers)


class AutoencoderDetector:
    """Dense autoencoder; the anomaly score is the mean squared reconstruction error.

    ``score_samples`` returns higher values for more anomalous rows (unlike scikit-learn's
    IsolationForest, whose ``score_samples`` is higher for normal rows).
    """

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 16), latent: int = 4,
                 seed: int = 0) -> None:
        self.n_features = n_features
        enc = [n_features, *hidden, latent]
        with _INIT_LOCK:  # torch's global RNG: sites building in threads must not interleave
            torch.manual_seed(seed)
            self.net = nn.Sequential(_mlp(enc, last_activation=True),
                                     _mlp(enc[::-1], last_activation=False))
        self._shapes = [p.shape for p in self.net.parameters()]

    @property
    def n_params(self) -> int:
        return sum(int(np.prod(s)) for s in self._shapes)

    def get_weights(self) -> np.ndarray:
        with torch.no_grad():
            flat = torch.cat([p.detach().reshape(-1) for p in self.net.parameters()])
            return flat.double().numpy()

    def set_weights(self, flat: np.ndarray) -> None:
        flat = np.asarray(flat, dtype=np.float64)
        if flat.size != self.n_params:
            raise ValueError(f"weight vector has {flat.size} values, model needs {self.n_params}")
        offset = 0
        with torch.no_grad():
            for p in self.net.parameters():
                n = p.numel()
                p.copy_(torch.from_numpy(flat[offset:offset + n]).reshape(p.shape).float())
                offset += n

    def fit(self, x: np.ndarray, epochs: int = 1, batch_size: int = 256, lr: float = 1e-3,
            seed: int = 0, prox_mu: float = 0.0, trim: float = 0.0) -> float:
        """Train on standardized rows; returns the mean loss of the last epoch.

        ``trim`` drops that fraction of highest-error rows from each batch's loss: training
        tables are unlabeled and contain anomalies, which the model must not learn to
        reconstruct. ``prox_mu`` > 0 adds FedProx's proximal term towards the start weights.
        """
        if not 0.0 <= trim < 1.0:
            raise ValueError("trim must be in [0, 1)")
        with _single_thread():
            return self._fit(x, epochs, batch_size, lr, seed, prox_mu, trim)

    def _fit(self, x: np.ndarray, epochs: int, batch_size: int, lr: float, seed: int,
             prox_mu: float, trim: float) -> float:
        xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
        if xt.shape[0] == 0:
            raise ValueError("cannot fit on an empty table")
        gen = torch.Generator().manual_seed(seed)
        opt = torch.optim.Adam(self.net.parameters(), lr=lr)
        anchor = [p.detach().clone() for p in self.net.parameters()] if prox_mu else None
        self.net.train()
        last = 0.0
        for _ in range(epochs):
            perm = torch.randperm(xt.shape[0], generator=gen)
            total, count = 0.0, 0
            for start in range(0, xt.shape[0], batch_size):
                batch = xt[perm[start:start + batch_size]]
                per_row = torch.mean((self.net(batch) - batch) ** 2, dim=1)
                if trim:
                    keep = max(1, int(round(per_row.numel() * (1.0 - trim))))
                    per_row = torch.topk(per_row, keep, largest=False).values
                loss = per_row.mean()
                objective = loss
                if anchor is not None:
                    prox = sum(torch.sum((p - a) ** 2) for p, a in
                               zip(self.net.parameters(), anchor, strict=True))
                    objective = loss + 0.5 * prox_mu * prox
                opt.zero_grad()
                objective.backward()
                opt.step()
                total += float(loss.detach()) * per_row.numel()
                count += per_row.numel()
            last = total / count
        return last

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        self.net.eval()
        with torch.no_grad(), _single_thread():
            xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
            return torch.mean((self.net(xt) - xt) ** 2, dim=1).double().numpy()


def build_model(kind: str, n_features: int, hidden: tuple[int, ...], latent: int,
                seed: int) -> AutoencoderDetector:
    """Model factory keyed by ``JobSpec.model``."""
    if kind == "ae":
        return AutoencoderDetector(n_features, hidden=hidden, latent=latent, seed=seed)
    raise ValueError(f"unknown model kind {kind!r}; known: 'ae'")
