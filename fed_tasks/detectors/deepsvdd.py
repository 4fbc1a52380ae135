"""One-class Deep SVDD (Ruff et al., ICML 2018): map normal rows close to a fixed centre.

The centre is not a weight: it is fixed before training from the summed embeddings of the
initial net (:meth:`DeepSVDDDetector.embedding_sum` at every site, summed, then
:meth:`DeepSVDDDetector.center_from_sum`). Bias-free layers, a centre with no near-zero entry
and weight decay keep the net from the trivial solution of mapping every row onto c.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from fed_tasks.detectors._torch import TorchDetector, _single_thread
from fed_tasks.detectors.base import released
from fed_tasks.global_state import GlobalState
from fed_tasks.spec import JobSpec

CENTER_EPS = 0.1  # |c_j| below this is pushed to ±0.1: a zero centre is reachable by zero weights


class DeepSVDDDetector(TorchDetector):
    """Score = squared distance of the embedding φ(x) from the centre c.

    Federated rules: before the rounds, one summed ``center`` call: every site sends
    ``[Σ φ(x), n]`` of the *initial* net (which it builds from the spec itself); c follows
    from the sum alone and stays fixed; then FedAvg rounds as for any torch detector.
    """

    name = "deepsvdd"
    title = ("a Deep SVDD one-class model (rows mapped close to a centre fixed from your "
             "summed embeddings), trained by federated averaging")
    leaves = ("the sum of your rows' embeddings under the initial model (the centre), then "
              "per round the sample-weighted weight change, loss and row count")

    def __init__(self, n_features: int, hidden: tuple[int, ...] = (32, 16), latent: int = 4,
                 seed: int = 0, weight_decay: float = 1e-4) -> None:
        self.hidden = tuple(hidden)
        self.latent = latent
        self.weight_decay = weight_decay
        self.center: np.ndarray | None = None
        self._center_t: torch.Tensor | None = None
        super().__init__(n_features, seed)

    def _build(self) -> nn.Module:
        sizes = [self.n_features, *self.hidden, self.latent]
        layers: list[nn.Module] = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
            layers.append(nn.Linear(a, b, bias=False))
            if i < len(sizes) - 2:
                layers.append(nn.LeakyReLU())
        return nn.Sequential(*layers)

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=lr, weight_decay=self.weight_decay)

    # ---- federated rules ---------------------------------------------------------------
    @classmethod
    def phases(cls, spec: JobSpec) -> tuple:
        from fed_tasks.schedule import CENTER_CODEC, Phase

        return (Phase("center", 1, spec.latent + 1, CENTER_CODEC), *super().phases(spec))

    @classmethod
    def contribute(cls, spec: JobSpec, action: str, k: int, z: np.ndarray,
                   state: GlobalState) -> np.ndarray:
        if action != "center":
            return super().contribute(spec, action, k, z, state)
        model = cls.build(spec)
        model.set_weights(state.weights)  # the initial net: no round has moved it yet
        return model.embedding_sum(z)

    @classmethod
    def from_state(cls, spec: JobSpec, state: GlobalState) -> DeepSVDDDetector:
        model = super().from_state(spec, state)
        assert isinstance(model, DeepSVDDDetector)
        model.set_center(cls.center_from_sum(released(state, "center:1")))
        return model

    # ---- the centre --------------------------------------------------------------------
    def embedding_sum(self, x: np.ndarray) -> np.ndarray:
        """``[Σ φ(x_i), n]`` of the current net: what a site contributes to the centre."""
        self.net.eval()
        with torch.no_grad(), _single_thread():
            phi = self.net(self._as_tensor(x)).double().numpy()
        return np.concatenate([phi.sum(axis=0), [float(phi.shape[0])]])

    @staticmethod
    def center_from_sum(summed: np.ndarray) -> np.ndarray:
        """c = Σφ/n, with entries of magnitude below 0.1 pushed to ±0.1 (0 → +0.1)."""
        v = np.asarray(summed, dtype=np.float64)
        n = float(v[-1])
        if n <= 0:
            raise ValueError("the centre needs at least one row")
        c = v[:-1] / n
        small = np.abs(c) < CENTER_EPS
        c[small] = np.where(c[small] < 0, -CENTER_EPS, CENTER_EPS)
        return c

    def set_center(self, c: np.ndarray) -> None:
        c = np.asarray(c, dtype=np.float64).reshape(-1)
        if c.size != self.latent:
            raise ValueError(f"centre has {c.size} values, the embedding has {self.latent}")
        self.center = c.copy()
        self._center_t = torch.from_numpy(c).float()

    def _require_center(self) -> torch.Tensor:
        if self._center_t is None:
            raise ValueError("Deep SVDD has no centre yet: compute it with embedding_sum / "
                             "center_from_sum and call set_center before fit or scoring")
        return self._center_t

    # ---- loss, score, collapse -----------------------------------------------------------
    def _begin_fit(self, seed: int) -> None:
        self._require_center()

    def per_row_loss(self, batch: torch.Tensor) -> torch.Tensor:
        return torch.sum((self.net(batch) - self._require_center()) ** 2, dim=1)

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        self._require_center()
        return super().score_samples(x)

    def collapsed(self, x: np.ndarray) -> bool:
        """True if the net maps everything to one point: the scores then say nothing."""
        scores = self.score_samples(x)
        self.net.eval()
        with torch.no_grad(), _single_thread():
            phi = self.net(self._as_tensor(x)).double().numpy()
        return bool(np.var(scores) < 1e-12 or np.all(np.abs(phi - self.center) < 1e-6))
