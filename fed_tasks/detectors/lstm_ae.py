"""LSTM autoencoder for one multivariate series: windows it cannot reconstruct are anomalous.

Rows are time steps in order (n × d, already standardized). Training units are sliding
windows of ``window`` rows with stride ``max(1, window // 4)`` (plus the window ending at the
last row, so every row is trained on); ``batch_size`` counts windows and ``trim`` drops
windows. A row's score is the mean, over every window at stride 1 that covers it, of its own
squared reconstruction error in that window. A series shorter than ``window`` is one window
of the whole series, in training and in scoring.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fed_tasks.detectors._torch import TorchDetector, _single_thread
from fed_tasks.spec import JobSpec

SCORE_CHUNK = 512  # windows per forward pass when scoring: bounds memory on long series


class _LSTMAENet(nn.Module):
    def __init__(self, n_features: int, width: int, latent: int) -> None:
        super().__init__()
        self.encoder = nn.LSTM(n_features, width, batch_first=True)
        self.to_latent = nn.Linear(width, latent)
        self.decoder = nn.LSTM(latent, width, batch_first=True)
        self.output = nn.Linear(width, n_features)

    def forward(self, w: torch.Tensor) -> torch.Tensor:
        _, (h, _) = self.encoder(w)
        z = self.to_latent(h[-1])
        out, _ = self.decoder(z.unsqueeze(1).expand(-1, w.shape[1], -1))
        return self.output(out)


class LSTMAutoencoder(TorchDetector):
    """Encoder LSTM (``hidden[0]`` units) → latent code → decoder LSTM → Linear to d.

    Only ``hidden[0]`` is used, so the spec's ``hidden`` means the same width for every model.
    Each series is scaled by its own mean and deviation first (devices of one fleet run at
    scales 1,000× apart; the shared model learns shapes, not levels): that scaling never
    leaves the site, and it makes the federation's standardization irrelevant here.

    ``latent`` is the code a window is squeezed through. The spec's default for this model
    is 32 (``fed_tasks.spec.MODEL_LATENT``; the dense models keep 4), because a federation of
    unlike devices needs a wide one: on NAB's ten server series (window 64, 12 rounds;
    ``benchmarks/detection.py``) the federated model's mean ROC-AUC rose 0.647 → 0.654 →
    0.659 with latent 4 → 16 → 32 (seed 0), while each device trained alone fell 0.651 →
    0.645 → 0.642: a wider code lets a lone model copy more of its own series, anomalies
    included. A spec that names its latent keeps it.
    """

    name = "lstm-ae"
    title = ("an LSTM autoencoder over sliding windows of your series (in time order), "
             "trained by federated averaging")

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 16), latent: int = 32,
                 seed: int = 0, window: int = 32) -> None:
        if window < 1:
            raise ValueError("window must be >= 1")
        self.hidden = tuple(hidden)
        self.latent = latent
        self.window = window
        super().__init__(n_features, seed)

    def _build(self) -> nn.Module:
        width = self.hidden[0] if self.hidden else self.latent
        return _LSTMAENet(self.n_features, width, self.latent)

    def _windows(self, xt: torch.Tensor, stride: int) -> torch.Tensor:
        n = xt.shape[0]
        w = min(self.window, n)
        if n == 0:
            return xt.reshape(0, 0, self.n_features)
        starts = list(range(0, n - w + 1, stride))
        if starts[-1] != n - w:
            starts.append(n - w)
        idx = torch.tensor(starts).unsqueeze(1) + torch.arange(w)
        return xt[idx]

    @classmethod
    def build(cls, spec: JobSpec) -> LSTMAutoencoder:
        return cls(len(spec.features), hidden=spec.hidden, latent=spec.latent, seed=spec.seed,
                   window=spec.window)

    def _series(self, x: np.ndarray) -> torch.Tensor:
        """The series scaled by its own mean and standard deviation (per feature)."""
        xt = self._as_tensor(x)
        if xt.shape[0] < 2:
            return xt
        std = xt.std(dim=0, keepdim=True)
        return (xt - xt.mean(dim=0, keepdim=True)) / torch.where(std > 1e-6, std, 1.0)

    def _units(self, x: np.ndarray) -> torch.Tensor:
        return self._windows(self._series(x), max(1, self.window // 4))

    def _position_errors(self, windows: torch.Tensor) -> torch.Tensor:
        return torch.mean((self.net(windows) - windows) ** 2, dim=2)

    def per_row_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return self._position_errors(batch).mean(dim=1)

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        xt = self._series(x)
        n = xt.shape[0]
        if n == 0:
            return np.zeros(0)
        windows = self._windows(xt, 1)
        w = windows.shape[1]
        total = torch.zeros(n, dtype=torch.float64)
        covered = torch.zeros(n, dtype=torch.float64)
        self.net.eval()
        with torch.no_grad(), _single_thread():
            for s in range(0, windows.shape[0], SCORE_CHUNK):
                err = self._position_errors(windows[s:s + SCORE_CHUNK]).double()
                rows = (torch.arange(s, s + len(err)).unsqueeze(1) + torch.arange(w)).reshape(-1)
                total.index_add_(0, rows, err.reshape(-1))
                covered.index_add_(0, rows, torch.ones(rows.numel(), dtype=torch.float64))
        return (total / covered).numpy()
