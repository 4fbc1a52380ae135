"""Federated isolation forest: each site grows trees whose splits never come from its rows.

The federation first releases summed per-feature histograms (:mod:`fed_tasks.histograms`).
From them every party builds the same :class:`QuantileMap`, z → q ∈ [0, 1] (the federated
CDF). A site grows isolation trees on subsamples of its rows in q-coordinates, drawing each
split *uniformly in the node's box* (the root box is [0, 1]^d), from uniforms fixed per node
position by the site's seed. So a split value is a function of the public histogram and the
RNG only; what a tree says about rows is its shape and leaf sizes (see :data:`REVEALS`).
The global forest is the concatenation of every site's trees, each normalised by its own ψ.

``splits="local"`` (sklearn-style: uniform between the node's local min and max) is kept as
a benchmark ablation only: its split values lie between actual rows' values.
"""

from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Literal

import numpy as np

from fed_tasks import histograms
from fed_tasks.codec import PayloadError
from fed_tasks.detectors.base import FederatedDetector, released
from fed_tasks.global_state import GlobalState
from fed_tasks.spec import JobSpec

#: the overflow bins' mass is spread over one more u-unit beyond ±U_MAX; u is clamped there
U_EXT = 1.0
#: features whose box is narrower than this in q are not split any further
MIN_WIDTH = 1e-9
HEADER = 1  # per tree: psi
FIELDS = 3  # per node: feature (-1 = leaf / unused), split q, leaf size
_ROW_CHUNK = 8192
N_TREES = 50  # trees each site grows: the forest of S sites has 50·S trees
MAX_SAMPLES = 256  # ψ, the subsample of a tree (as in Liu et al. and scikit-learn)

Splits = Literal["box", "local"]

REVEALS = (
    "Each tree is grown on a random sample of at most 256 of the site's rows. Its split "
    "points are drawn at random from the federation's shared histogram, never from a row, "
    "but its shape still shows which of those random boxes held two or more sampled rows, "
    "and each leaf states exactly how many sampled rows fell in its box. A row that sits "
    "alone in a small leaf is thereby placed in a box: a range per split feature, up to "
    "8 features deep, coarse where data is dense and wide where it is sparse. Fifty trees "
    "are fifty such coarse count tables over overlapping random samples, so an unusual row "
    "can be localised more tightly by combining them; nothing in a tree is an exact value."
)


# ---- the shared quantile map ----------------------------------------------------------------
@dataclass(frozen=True)
class QuantileMap:
    """Per-feature monotone piecewise-linear map z ↔ q from the summed histogram.

    Knots sit at the histogram's bin edges in u = asinh(z); the underflow / overflow bins
    span u ∈ [-U_MAX-U_EXT, -U_MAX] / [U_MAX, U_MAX+U_EXT] and u is clamped beyond, so every
    z has a finite q. Linear in u inside a bin; an empty bin is a flat step (q constant), so a
    feature with all its mass in one bin maps everything outside that bin to 0 or 1.
    """

    u_knots: np.ndarray  # (K,) shared by all features, K = bins + 3
    q_knots: np.ndarray  # (d, K) non-decreasing, from 0 to 1

    @classmethod
    def from_counts(cls, counts: np.ndarray, bins: int = histograms.BINS, mix: float = 0.0,
                    space: str = "z") -> QuantileMap:
        """From the summed ``(d, bins + 2)`` counts (flat is accepted); negatives count as 0."""
        c = np.asarray(counts, dtype=np.float64)
        if c.size == 0 or c.size % (bins + 2):
            raise ValueError(f"counts must hold d × {bins + 2} values, got shape {c.shape}")
        c = c.reshape(-1, bins + 2)
        if not np.all(np.isfinite(c)):
            raise ValueError("counts contain NaN or infinity")
        c = np.maximum(c, 0.0)
        total = c.sum(axis=1, keepdims=True)
        if np.any(total <= 0):
            raise ValueError("every feature's histogram needs some mass")
        e = histograms.edges(bins)
        u = np.concatenate([[e[0] - U_EXT], e, [e[-1] + U_EXT]])
        w = np.diff(histograms.from_u(u)) if space == "z" else np.diff(u)
        occupied = c > 0
        first = occupied.argmax(axis=1)
        last = c.shape[1] - 1 - occupied[:, ::-1].argmax(axis=1)
        ks = np.arange(c.shape[1])[None, :]
        sup = (ks >= first[:, None]) & (ks <= last[:, None])
        wm = np.where(sup, w[None, :], 0.0)
        wm = wm / wm.sum(axis=1, keepdims=True)
        pr = (1 - mix) * c / total + mix * wm
        q = np.concatenate([np.zeros((c.shape[0], 1)), np.cumsum(pr, axis=1)], axis=1)
        q[:, -1] = 1.0
        return cls(u, np.minimum(q, 1.0))

    @property
    def n_features(self) -> int:
        return int(self.q_knots.shape[0])

    def _check(self, x: np.ndarray) -> np.ndarray:
        x = np.atleast_2d(np.asarray(x, dtype=np.float64))
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise ValueError(f"expected rows of {self.n_features} features, got {x.shape}")
        return x

    def to_q(self, z: np.ndarray) -> np.ndarray:
        """Federated CDF coordinate of each standardized value (n × d → n × d in [0, 1])."""
        z = self._check(z)
        uk = self.u_knots
        u = np.clip(histograms.to_u(z), uk[0], uk[-1])
        k = np.clip(np.searchsorted(uk, u, side="right") - 1, 0, len(uk) - 2)
        frac = (u - uk[k]) / (uk[k + 1] - uk[k])
        cols = np.arange(self.n_features)[None, :]
        lo, hi = self.q_knots[cols, k], self.q_knots[cols, k + 1]
        return lo + frac * (hi - lo)

    def from_q(self, q: np.ndarray) -> np.ndarray:
        """The smallest z whose q reaches the given value (the generalized inverse)."""
        q = np.clip(self._check(q), 0.0, 1.0)
        uk = self.u_knots
        u = np.empty_like(q)
        for j in range(self.n_features):
            qk = self.q_knots[j]
            k = np.clip(np.searchsorted(qk, q[:, j], side="left") - 1, 0, len(uk) - 2)
            width = qk[k + 1] - qk[k]
            frac = np.divide(q[:, j] - qk[k], width, out=np.zeros_like(width), where=width > 0)
            u[:, j] = uk[k] + np.clip(frac, 0.0, 1.0) * (uk[k + 1] - uk[k])
        return histograms.from_u(u)


# ---- trees and their flat encoding ----------------------------------------------------------
def depth_limit(psi: int) -> int:
    """L = ceil(log2 psi): the expected depth of an unsuccessful search in a random tree."""
    return int(math.ceil(math.log2(psi))) if psi > 1 else 0


def n_nodes(max_samples: int) -> int:
    """Nodes of the complete heap of depth ceil(log2 max_samples): every tree's fixed size."""
    return 2 ** (depth_limit(max_samples) + 1) - 1


def tree_length(max_samples: int = 256) -> int:
    """Floats per encoded tree: the ψ header plus (feature, split, size) per heap node."""
    return HEADER + FIELDS * n_nodes(max_samples)


@dataclass(frozen=True)
class Tree:
    """A heap-indexed isolation tree (children of node i at 2i+1 (q < split) and 2i+2)."""

    psi: int
    feature: np.ndarray  # (N,) int64: split feature, -1 for a leaf or an unused node
    split: np.ndarray  # (N,) float64: split value in q (0 where not internal)
    size: np.ndarray  # (N,) int64: sampled rows reaching a leaf (0 elsewhere)


def encode_trees(trees: list[Tree]) -> np.ndarray:
    """One flat float64 vector, ``tree_length`` per tree: [ψ, (f, s, n) × N]."""
    if not trees:
        return np.zeros(0)
    blocks = []
    for t in trees:
        nodes = np.stack([t.feature.astype(np.float64), t.split, t.size.astype(np.float64)], 1)
        blocks.append(np.concatenate([[float(t.psi)], nodes.ravel()]))
    return np.concatenate(blocks)


def _integral(x: np.ndarray) -> bool:
    return bool(np.all(x == np.round(x)))


def decode_trees(vec: np.ndarray, n_features: int, max_samples: int = 256) -> list[Tree]:
    """Trees from a vector another site sent: every field and the heap structure is checked.

    ``n_features`` and ``max_samples`` come from the receiver's own spec, never the vector.
    """
    vec = np.asarray(vec, dtype=np.float64)
    size, n = tree_length(max_samples), n_nodes(max_samples)
    if vec.ndim != 1 or vec.size == 0 or vec.size % size:
        raise ValueError(f"tree vector has length {vec.size}; expected a positive multiple of "
                         f"{size} (ψ header + 3 × {n} nodes per tree, max_samples={max_samples})")
    if not np.all(np.isfinite(vec)):
        raise ValueError("tree vector contains NaN or infinity")
    blocks = vec.reshape(-1, size)
    psi, nodes = blocks[:, 0], blocks[:, HEADER:].reshape(-1, n, FIELDS)
    feat, split, leaf = nodes[..., 0], nodes[..., 1], nodes[..., 2]
    if not _integral(psi) or psi.min() < 1 or psi.max() > max_samples:
        raise ValueError(f"tree ψ must be an integer in [1, {max_samples}]")
    if not _integral(feat) or feat.min() < -1 or feat.max() >= n_features:
        raise ValueError(f"feature index must be an integer in [-1, {n_features - 1}]")
    if not _integral(leaf) or leaf.min() < 0:
        raise ValueError("leaf sizes must be non-negative integers")
    if split.min() < 0.0 or split.max() > 1.0:
        raise ValueError("split values must lie in [0, 1]")
    feat, leaf = feat.astype(np.int64), leaf.astype(np.int64)
    _check_structure(psi.astype(np.int64), feat, split, leaf, n_features)
    return [Tree(int(p), f.copy(), s.copy(), c.copy())
            for p, f, s, c in zip(psi, feat, split, leaf, strict=True)]


def _check_structure(psi: np.ndarray, feat: np.ndarray, split: np.ndarray, leaf: np.ndarray,
                     d: int) -> None:
    """Reachable nodes form a tree within each ψ's depth limit, splits strictly inside boxes."""
    t, n = feat.shape
    depth = np.floor(np.log2(np.arange(n) + 1)).astype(np.int64)
    internal = feat >= 0
    reach = np.zeros((t, n), dtype=bool)
    reach[:, 0] = True
    parent = (np.arange(1, n) - 1) // 2
    reach[:, 1:] = internal[:, parent]  # filled top-down below, since parents precede children
    for i in range(1, n):
        reach[:, i] &= reach[:, parent[i - 1]]
    limit = np.array([depth_limit(int(p)) for p in psi])
    if np.any(internal & ~reach):
        raise ValueError("a split node lies below a leaf")
    if np.any(internal & (depth[None, :] >= limit[:, None])):
        raise ValueError("a tree is deeper than its depth limit ceil(log2 ψ)")
    if np.any(internal & (leaf != 0)) or np.any(~reach & (leaf != 0)):
        raise ValueError("only leaves may carry a size")
    if np.any(~internal & (split != 0.0)):
        raise ValueError("only split nodes may carry a split value")
    if np.any(np.where(reach & ~internal, leaf, 0).sum(axis=1) != psi):
        raise ValueError("leaf sizes of a tree must add up to its ψ")
    lo, hi = node_boxes(feat, split, d)
    f = np.maximum(feat, 0)[..., None]
    blo = np.take_along_axis(lo, f, axis=2)[..., 0]
    bhi = np.take_along_axis(hi, f, axis=2)[..., 0]
    if np.any(internal & ~((split > blo) & (split < bhi))):
        raise ValueError("a split value lies outside its node's box")


def node_boxes(feat: np.ndarray, split: np.ndarray, d: int) -> tuple[np.ndarray, np.ndarray]:
    """Each node's box [lo, hi) in q (trees × nodes × d), implied by its ancestors' splits."""
    t, n = feat.shape
    lo, hi = np.zeros((t, n, d)), np.ones((t, n, d))
    rows = np.arange(t)
    for i in range((n - 1) // 2):
        f = feat[:, i]
        ok = f >= 0
        fc = np.maximum(f, 0)
        for child, side in ((2 * i + 1, hi), (2 * i + 2, lo)):
            lo[:, child], hi[:, child] = lo[:, i], hi[:, i]
            side[rows[ok], child, fc[ok]] = split[ok, i]
    return lo, hi


# ---- growing a tree -------------------------------------------------------------------------
def grow_tree(q: np.ndarray, rng: np.random.Generator, max_samples: int = 256,
              splits: Splits = "box") -> Tree:
    """One tree on a ψ-subsample of rows ``q`` (n × d, in q-coordinates).

    The node uniforms are drawn for every heap position *before* the subsample, so a split
    depends on the seed and the node's box only: the same seed on other rows gives the same
    split wherever the same node exists (``splits="box"``).
    """
    n_rows, d = q.shape
    n = n_nodes(max_samples)
    pick, pos = rng.random(n), rng.random(n) + 2.0 ** -54  # pos in (0, 1]
    psi = min(max_samples, n_rows)
    sample = q[rng.choice(n_rows, psi, replace=False)]
    limit = depth_limit(psi)
    feat = np.full(n, -1, dtype=np.int64)
    split, size = np.zeros(n), np.zeros(n, dtype=np.int64)
    stack = [(0, 0, np.arange(psi), np.zeros(d), np.ones(d))]
    while stack:
        node, depth, idx, lo, hi = stack.pop()
        pts = sample[idx]
        if len(idx) > 1 and depth < limit:
            if splits == "box":
                a, b = lo, hi
                eligible = np.flatnonzero(hi - lo > MIN_WIDTH)
            else:
                a, b = pts.min(axis=0), pts.max(axis=0)
                eligible = np.flatnonzero(b > a)
            if eligible.size:
                f = int(eligible[min(int(pick[node] * eligible.size), eligible.size - 1)])
                s = a[f] + pos[node] * (b[f] - a[f])
                s = float(np.clip(s, np.nextafter(a[f], b[f]), np.nextafter(b[f], a[f])))
                feat[node], split[node] = f, s
                left = pts[:, f] < s
                lhi, rlo = hi.copy(), lo.copy()
                lhi[f], rlo[f] = s, s
                stack.append((2 * node + 2, depth + 1, idx[~left], rlo, hi))
                stack.append((2 * node + 1, depth + 1, idx[left], lo, lhi))
                continue
        size[node] = len(idx)
    return Tree(psi, feat, split, size)


def average_path_length(size: np.ndarray) -> np.ndarray:
    """c(n) = 2 H(n-1) - 2 (n-1)/n, the mean depth of an unsuccessful BST search (c(0)=0)."""
    size = np.asarray(size, dtype=np.int64)
    m = max(int(size.max(initial=1)), 1)
    harmonic = np.concatenate([[0.0], np.cumsum(1.0 / np.arange(1, m + 1))])
    n = np.maximum(size, 1)
    return np.where(size > 0, 2.0 * harmonic[n - 1] - 2.0 * (n - 1) / n, 0.0)


# ---- the forest -----------------------------------------------------------------------------
class FederatedIsolationForest(FederatedDetector):
    """Isolation forest as the union of every site's trees; scores standardized rows z.

    Federated rules: the summed per-feature histograms (``hist``), from which every party
    builds the same quantile map, then each site's trees (``trees``), pooled, not summed:
    a plain-mode model only (a secure sum cannot concatenate).
    """

    name = "iforest"
    title = (f"an isolation forest: {N_TREES} trees per site grown on random samples of "
             "your rows, with split points drawn from the federation's shared histogram")
    leaves = (f"per feature, how many of your rows fall in each of {histograms.BINS + 2} fixed "
              f"bins, then {N_TREES} isolation trees (their shapes and leaf sizes describe "
              "random samples of your rows; see the README)")

    def __init__(self, n_trees: int = 50, max_samples: int = 256, seed: int = 0,
                 splits: Splits = "box") -> None:
        if splits not in ("box", "local"):
            raise ValueError(f"splits must be 'box' or 'local', got {splits!r}")
        if n_trees < 1 or max_samples < 1:
            raise ValueError("n_trees and max_samples must be positive")
        self.n_trees, self.max_samples, self.seed, self.splits = n_trees, max_samples, seed, splits
        self.qmap_: QuantileMap | None = None
        self.trees_: list[Tree] = []

    def fit_site(self, z: np.ndarray, qmap: QuantileMap, rng_seed: int) -> np.ndarray:
        """This site's ``n_trees`` trees on its standardized rows, encoded (forest unchanged)."""
        q = qmap.to_q(z)
        if q.shape[0] < 1:
            raise ValueError("a site needs at least one row to grow trees")
        trees = [grow_tree(q, np.random.default_rng([self.seed, rng_seed, t]),
                           self.max_samples, self.splits) for t in range(self.n_trees)]
        return encode_trees(trees)

    def set_forest(self, vec: np.ndarray, qmap: QuantileMap) -> FederatedIsolationForest:
        """Adopt the concatenated trees of all sites (validated: they come from other sites)."""
        self.trees_ = decode_trees(vec, qmap.n_features, self.max_samples)
        self.qmap_ = qmap
        self._tables()
        return self

    @classmethod
    def from_vectors(cls, vectors: list[np.ndarray], qmap: QuantileMap,
                     **kwargs) -> FederatedIsolationForest:
        """The global forest from each site's encoded trees."""
        return cls(**kwargs).set_forest(np.concatenate([np.ravel(v) for v in vectors]), qmap)

    def fit(self, z: np.ndarray, rng_seed: int = 0) -> FederatedIsolationForest:
        """Centralized convenience: the map from ``z``'s own histogram, one site's trees."""
        qmap = QuantileMap.from_counts(histograms.counts(z))
        return self.set_forest(self.fit_site(z, qmap, rng_seed), qmap)

    def get_weights(self) -> np.ndarray:
        return encode_trees(self.trees_)

    def _tables(self) -> None:
        """Flat per-node arrays for vectorized descent; a leaf's value is depth + c(size)."""
        feat = np.stack([t.feature for t in self.trees_])
        n = feat.shape[1]
        depth = np.floor(np.log2(np.arange(n) + 1))
        size = np.stack([t.size for t in self.trees_])
        self._feat = feat.ravel()
        self._split = np.stack([t.split for t in self.trees_]).ravel()
        self._value = (depth[None, :] + average_path_length(size)).ravel()
        psi = np.array([t.psi for t in self.trees_])
        self._norm = average_path_length(psi)
        self._norm[self._norm == 0] = 1.0  # ψ = 1: a single leaf, every h is 0
        self._offset = np.arange(len(self.trees_)) * n
        self._levels = max(depth_limit(t.psi) for t in self.trees_)

    def score_samples(self, z: np.ndarray) -> np.ndarray:
        """2^(-mean_t h_t(x) / c(ψ_t)) per row: higher = more anomalous (in (0, 1])."""
        if self.qmap_ is None:
            raise ValueError("set the forest first (set_forest / from_vectors / fit)")
        q = self.qmap_.to_q(z)
        out = np.empty(q.shape[0])
        for start in range(0, q.shape[0], _ROW_CHUNK):
            out[start:start + _ROW_CHUNK] = self._score_chunk(q[start:start + _ROW_CHUNK])
        return out

    def _score_chunk(self, q: np.ndarray) -> np.ndarray:
        node = np.broadcast_to(self._offset, (q.shape[0], self._offset.size)).copy()
        for _ in range(self._levels):
            f = self._feat[node]
            inner = f >= 0
            x = np.take_along_axis(q, np.maximum(f, 0), axis=1)
            local = node - self._offset
            child = 2 * local + 1 + (x >= self._split[node])
            node = np.where(inner, self._offset + child, node)
        h = self._value[node] / self._norm
        return np.exp2(-h.mean(axis=1))

    # ---- federated rules ---------------------------------------------------------------
    @classmethod
    def phases(cls, spec: JobSpec) -> tuple:
        from fed_tasks.schedule import COUNT_CODEC, TREE_CODEC, Phase

        return (Phase("hist", 1, len(spec.features) * (histograms.BINS + 2), COUNT_CODEC),
                Phase("trees", 1, N_TREES * tree_length(MAX_SAMPLES), TREE_CODEC))

    @classmethod
    def contribute(cls, spec: JobSpec, action: str, k: int, z: np.ndarray,
                   state: GlobalState) -> np.ndarray:
        if action == "hist":
            return histograms.counts(z).ravel()
        if action == "trees":
            qmap = QuantileMap.from_counts(released(state, "hist:1"))
            # the site's own randomness, never the spec's seed: a data scientist who chose
            # the seed could search for one whose split points cut where he wants to look
            return cls(N_TREES, MAX_SAMPLES).fit_site(z, qmap, secrets.randbits(64))
        return super().contribute(spec, action, k, z, state)

    @classmethod
    def check_contribution(cls, spec: JobSpec, action: str, vector: np.ndarray) -> None:
        if action != "trees":
            return
        try:
            decode_trees(vector, len(spec.features), MAX_SAMPLES)
        except ValueError as exc:
            raise PayloadError(f"malformed trees: {exc}") from None

    @classmethod
    def from_state(cls, spec: JobSpec, state: GlobalState) -> FederatedIsolationForest:
        qmap = QuantileMap.from_counts(released(state, "hist:1"))
        try:  # the other sites' trees: every field and the structure checked
            return cls(N_TREES, MAX_SAMPLES).set_forest(released(state, "trees:1"), qmap)
        except ValueError as exc:
            raise PayloadError(f"the released forest is malformed: {exc}") from None
