"""Shared machinery of the detectors trained by gradient steps (flat weights, one loop).

Federated averaging works on one flat float vector per model, so every torch detector
exposes ``get_weights`` / ``set_weights`` besides ``fit`` and ``score_samples``. A subclass
only builds its net (:meth:`TorchDetector._build`) and says what one training unit costs
(:meth:`TorchDetector.per_row_loss`); trimming, FedProx and the step budget live here once.
"""

from __future__ import annotations

import functools
import threading
from abc import ABC, abstractmethod
from typing import ClassVar

import numpy as np
import torch
from torch import nn

from fed_tasks.detectors.base import FederatedDetector
from fed_tasks.global_state import GlobalState
from fed_tasks.spec import JobSpec

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


@functools.lru_cache(maxsize=256)
def _n_params(cls: type[TorchDetector], spec: JobSpec) -> int:
    """Cached per (frozen) spec: every side asks on every call, and the answer otherwise
    builds a whole torch model each time."""
    return cls.build(spec).n_params


class TorchDetector(FederatedDetector, ABC):
    """Base of the torch detectors: ``score_samples`` is higher for more anomalous rows.

    (Unlike scikit-learn's IsolationForest, whose ``score_samples`` is higher for normal rows.)
    Subclasses set their own attributes, then call ``super().__init__``, which builds the net
    under the global seed and lock: sites build models in threads, and torch's global RNG
    must not interleave between them.

    Federated rules: ``spec.rounds`` FedAvg rounds (phase ``fit``), each site sending
    ``[n·Δw, n·loss, n]`` (:mod:`fed_tasks.strategy`); the step itself, with its DP
    variants, is :func:`fed_tasks.site_step.fit`.
    """

    net: nn.Module
    leaves: ClassVar[str] = "per round the sample-weighted weight change, loss and row count"

    def __init__(self, n_features: int, seed: int = 0) -> None:
        self.n_features = n_features
        self.seed = seed
        with _INIT_LOCK:
            torch.manual_seed(seed)
            self.net = self._build()
        self._shapes = [p.shape for p in self.net.parameters()]

    # ---- federated rules ---------------------------------------------------------------
    @classmethod
    def build(cls, spec: JobSpec) -> TorchDetector:
        """The job's untrained model: architecture and seed from the approved spec."""
        return cls(len(spec.features), hidden=spec.hidden, latent=spec.latent, seed=spec.seed)

    @classmethod
    def phases(cls, spec: JobSpec) -> tuple:
        from fed_tasks.schedule import Phase, fit_codec

        n = _n_params(cls, spec)  # SCAFFOLD sends its control variate's change and a count too
        length = 2 * n + 3 if spec.strategy == "scaffold" else n + 2
        return (Phase("fit", spec.rounds, length, fit_codec(spec)),)

    @classmethod
    def initial_weights(cls, spec: JobSpec) -> np.ndarray:
        return cls.build(spec).get_weights()

    @classmethod
    def from_state(cls, spec: JobSpec, state: GlobalState) -> TorchDetector:
        model = cls.build(spec)
        model.set_weights(state.weights)
        return model

    # ---- what a subclass defines -----------------------------------------------------
    @abstractmethod
    def _build(self) -> nn.Module:
        """The float32 net; parameters in creation order define the flat weight layout."""

    @abstractmethod
    def per_row_loss(self, batch: torch.Tensor) -> torch.Tensor:
        """Training loss of each unit of ``batch`` (one value per row, or per window)."""

    def per_row_score(self, batch: torch.Tensor) -> torch.Tensor:
        """Anomaly score of each row; called in eval mode without gradients."""
        return self.per_row_loss(batch)

    def _units(self, x: np.ndarray) -> torch.Tensor:
        """The training units of ``x`` (rows here; windows for sequence models)."""
        return self._as_tensor(x)

    def _optimizer(self, lr: float) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.net.parameters(), lr=lr)

    def _begin_fit(self, seed: int) -> None:
        """Hook run before training, e.g. to check a prerequisite or seed a noise source."""
        return None

    # ---- weights ---------------------------------------------------------------------
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

    # ---- training and scoring --------------------------------------------------------
    def fit(self, x: np.ndarray, epochs: int = 1, batch_size: int = 256, lr: float = 1e-3,
            seed: int = 0, prox_mu: float = 0.0, trim: float = 0.0,
            min_steps: int = 0, correction: np.ndarray | None = None) -> float:
        """Train on standardized rows; returns the mean loss of the last epoch.

        ``trim`` drops that fraction of highest-loss units from each batch's loss: training
        tables are unlabeled and contain anomalies, which the model must not learn to
        reconstruct. ``prox_mu`` > 0 adds FedProx's proximal term towards the start weights.
        ``min_steps`` > 0 runs further whole epochs until at least that many minibatch
        steps ran: a site with 160 rows at batch 256 would otherwise take one step an epoch.
        ``correction`` (flat, like the weights) is added to every gradient: SCAFFOLD's
        ``c − c_i``, which steers a site's steps towards the federation's direction.
        """
        if not 0.0 <= trim < 1.0:
            raise ValueError("trim must be in [0, 1)")
        if min_steps < 0:
            raise ValueError("min_steps must be >= 0")
        with _single_thread():
            self._begin_fit(seed)
            units = self._units(x)
            if units.shape[0] == 0:
                raise ValueError("cannot fit on an empty table")
            return self._fit(units, epochs, batch_size, lr, seed, prox_mu, trim, min_steps,
                             self._shaped(correction))

    def _shaped(self, flat: np.ndarray | None) -> list[torch.Tensor] | None:
        """A flat vector as one tensor per parameter (the weights' layout)."""
        if flat is None:
            return None
        flat = np.asarray(flat, dtype=np.float64)
        if flat.size != self.n_params:
            raise ValueError(f"correction has {flat.size} values, model needs {self.n_params}")
        out, offset = [], 0
        for shape in self._shapes:
            n = int(np.prod(shape))
            out.append(torch.from_numpy(flat[offset:offset + n]).reshape(shape).float())
            offset += n
        return out

    def full_gradient(self, x: np.ndarray) -> np.ndarray:
        """The gradient of the mean training loss over all of ``x`` at the current weights
        (flat): SCAFFOLD's control variate of a site (option I of Karimireddy et al.)."""
        with _single_thread():
            units = self._units(x)
            self.net.train()
            for p in self.net.parameters():
                p.grad = None
            total = len(units)
            for start in range(0, total, 1024):
                loss = self.per_row_loss(units[start:start + 1024]).sum() / total
                loss.backward()
            grads = [p.grad if p.grad is not None else torch.zeros_like(p)
                     for p in self.net.parameters()]
            flat = torch.cat([g.detach().reshape(-1) for g in grads]).double().numpy()
            for p in self.net.parameters():
                p.grad = None
            return flat

    def _fit(self, xt: torch.Tensor, epochs: int, batch_size: int, lr: float, seed: int,
             prox_mu: float, trim: float, min_steps: int,
             correction: list[torch.Tensor] | None = None) -> float:
        gen = torch.Generator().manual_seed(seed)
        opt = self._optimizer(lr)
        anchor = [p.detach().clone() for p in self.net.parameters()] if prox_mu else None
        self.net.train()
        last, epoch, steps = 0.0, 0, 0
        while epoch < epochs or steps < min_steps:
            perm = torch.randperm(xt.shape[0], generator=gen)
            total, count = 0.0, 0
            for start in range(0, xt.shape[0], batch_size):
                per_row = self.per_row_loss(xt[perm[start:start + batch_size]])
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
                if correction is not None:
                    for p, corr in zip(self.net.parameters(), correction, strict=True):
                        p.grad.add_(corr)
                opt.step()
                total += float(loss.detach()) * per_row.numel()
                count += per_row.numel()
                steps += 1
            last = total / count
            epoch += 1
        return last

    def score_samples(self, x: np.ndarray) -> np.ndarray:
        self.net.eval()
        with torch.no_grad(), _single_thread():
            return self.per_row_score(self._as_tensor(x)).double().numpy()

    def _as_tensor(self, x: np.ndarray) -> torch.Tensor:
        xt = torch.from_numpy(np.asarray(x, dtype=np.float32))
        if xt.ndim != 2 or xt.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got shape "
                             f"{tuple(xt.shape)}")
        return xt
