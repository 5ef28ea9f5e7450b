"""Cluster paths for hierarchical memories: a Grain transform attaching ``cluster_path [depth]``.

The hierarchical memory bank (Pouransari et al., "Pretraining with hierarchical memories", 2025;
:mod:`memjax.nn.hierarchical_memory`) indexes its blocks by a document's path in a tree of
clusters of the training corpus (the paper clusters document embeddings hierarchically with
k-means). For the synthetic tasks here the clustering is a fixed, deterministic function of the
example's content, so the same document always reaches the same blocks (train, eval, resume):

1. features: hashed n-gram counts, ``f[h(g) mod F] += s(g)`` over every n-gram ``g`` (``n = 1 ..
   ngram``) of the example's tokens (``inputs``, padding positions ``segment_ids == 0`` left out),
   ``h`` and the sign ``s`` fixed polynomial hashes; ``f`` normalised to unit length;
2. descent: at level ``l`` below node ``m`` (the root at level 0), the node's ``branching``
   children have fixed random unit centroids ``C[l, m] ~ N(0, I)`` drawn from ``(seed, l, m)``;
   the example goes to the nearest child by cosine, ``c_l = argmax_j <C[l, m]_j, f>``.

``cluster_path = (c_0, ..., c_{depth-1})``, int32 in ``[0, branching)``. Enabled by
``data.cluster_paths = {"depth": 2, "branching": 4, ...}`` (:class:`ClusterPathOptions`).

``method="label"`` instead reads a precomputed cluster id (the paper clusters the corpus offline
and stores each document's cluster with it): the example's field ``key`` holds a leaf id
``c in [0, branching**depth)``, whose base-``branching`` digits, most significant first, are the
path: ``c_l = (c // branching**(depth-1-l)) mod branching``. Leaves ``c`` and ``c'`` then share
the level-``l`` block exactly when ``c // branching**(depth-1-l) == c' // branching**(depth-1-l)``.
"""
from __future__ import annotations

import dataclasses

import grain
import numpy as np

from memjax.config import Config, ConfigError, options_from_dict, register_check

# Odd 31-bit multipliers of the polynomial n-gram hash (the second set gives the sign).
_MULT = np.array([1_000_003, 2_654_435_761 % (1 << 31) | 1, 40_503, 97_943], np.int64)
_SIGN_MULT = np.array([7_919, 104_729, 1_299_709, 15_485_863], np.int64)
_MOD = (1 << 31) - 1
METHODS = ("ngram", "label")


@dataclasses.dataclass
class ClusterPathOptions:
    """``data.cluster_paths``: the tree (``depth`` levels, ``branching`` children per node, equal
    to the hierarchical memory block's), the features (``ngram`` <= 4, ``num_features`` buckets),
    the centroids' ``seed`` and the example field read (``key``). ``method``: ``"ngram"`` (hashed
    n-gram features, nearest random centroid per level) or ``"label"`` (``key`` holds a
    precomputed leaf id; see the module docstring)."""

    depth: int = 2
    branching: int = 4
    ngram: int = 2
    num_features: int = 256
    seed: int = 0
    key: str = "inputs"
    method: str = "ngram"

    def check(self) -> None:
        for name in ("depth", "branching", "num_features"):
            if getattr(self, name) < 1:
                raise ConfigError(f"config key 'data.cluster_paths.{name}' must be positive, got {getattr(self, name)}")
        if not 1 <= self.ngram <= len(_MULT):
            raise ConfigError(f"config key 'data.cluster_paths.ngram' must be in [1, {len(_MULT)}], got {self.ngram}")
        if self.method not in METHODS:
            raise ConfigError(f"config key 'data.cluster_paths.method' must be one of {METHODS}, got {self.method!r}")


def ngram_features(tokens, ngram: int, num_features: int, keep=None) -> np.ndarray:
    """Unit-norm signed hashed n-gram counts ``[num_features]`` float64 of ``tokens: [T]`` int
    (``keep: [T]`` bool, positions to use; an n-gram is used when all its positions are kept)."""
    tokens = np.asarray(tokens).astype(np.int64)
    keep = np.ones(tokens.shape, bool) if keep is None else np.asarray(keep, bool)
    f = np.zeros(num_features, np.float64)
    for n in range(1, ngram + 1):
        if len(tokens) < n:
            break
        windows = np.lib.stride_tricks.sliding_window_view(tokens, n)
        ok = np.lib.stride_tricks.sliding_window_view(keep, n).all(axis=1)
        h = (windows * _MULT[:n]).sum(axis=1) + n  # (+ n: the 1-gram "a" and 2-gram "0 a" differ)
        s = ((windows * _SIGN_MULT[:n]).sum(axis=1) % _MOD) % 2 * 2 - 1
        np.add.at(f, (h % _MOD % num_features)[ok], s[ok].astype(np.float64))
    norm = np.linalg.norm(f)
    return f / norm if norm > 0 else f


class ClusterPaths(grain.transforms.Map):
    """Grain map: ``example -> {**example, "cluster_path": [depth] int32}`` (module docstring)."""

    def __init__(self, opts: ClusterPathOptions | None = None, **kwargs):
        self.opts = opts if opts is not None else ClusterPathOptions(**kwargs)
        self.opts.check()
        self._centroids: dict[tuple[int, int], np.ndarray] = {}

    def centroids(self, level: int, node: int) -> np.ndarray:
        """Unit centroids ``[branching, num_features]`` of the children of ``node`` at ``level``."""
        key = (level, node)
        if key not in self._centroids:
            if len(self._centroids) > 4096:  # (bounded: a deep tree has more nodes than a cache should hold)
                self._centroids.clear()
            c = np.random.default_rng([self.opts.seed, level, node]).standard_normal(
                (self.opts.branching, self.opts.num_features))
            self._centroids[key] = c / np.linalg.norm(c, axis=1, keepdims=True)
        return self._centroids[key]

    def path(self, tokens, keep=None) -> np.ndarray:
        o = self.opts
        f = ngram_features(tokens, o.ngram, o.num_features, keep)
        out, node = np.zeros(o.depth, np.int32), 0
        for level in range(o.depth):
            child = int(np.argmax(self.centroids(level, node) @ f))
            out[level] = child
            node = node * o.branching + child
        return out

    def label_path(self, label) -> np.ndarray:
        """The path of leaf id ``label`` (``method="label"``): its base-``branching`` digits."""
        o = self.opts
        leaves = o.branching ** o.depth
        label = np.asarray(label)
        if label.size != 1 or not np.issubdtype(label.dtype, np.integer):
            raise ValueError(f"ClusterPaths: field {o.key!r} must hold one integer cluster id, got "
                             f"{label.dtype} {label.shape}")
        c = int(label.reshape(()))
        if not 0 <= c < leaves:
            raise ValueError(f"ClusterPaths: cluster id {c} (field {o.key!r}) must be in [0, branching**depth) = "
                             f"[0, {leaves})")
        return np.array([(c // o.branching ** (o.depth - 1 - l)) % o.branching for l in range(o.depth)], np.int32)

    def map(self, element: dict) -> dict:
        if self.opts.key not in element:
            raise KeyError(f"ClusterPaths: the example has no field {self.opts.key!r} (has {sorted(element)})")
        if self.opts.method == "label":
            return {**element, "cluster_path": self.label_path(element[self.opts.key])}
        seg = element.get("segment_ids")
        keep = None if seg is None else np.asarray(seg) != 0
        return {**element, "cluster_path": self.path(element[self.opts.key], keep)}


def cluster_path_transform(cfg: Config) -> ClusterPaths | None:
    """The transform ``data.cluster_paths`` asks for (``None`` when it is empty)."""
    if not cfg.data.cluster_paths:
        return None
    return ClusterPaths(options_from_dict(ClusterPathOptions, cfg.data.cluster_paths, "data.cluster_paths"))


def check_cluster_paths(cfg: Config, num_devices: int | None = None) -> None:
    if cfg.data.cluster_paths:
        options_from_dict(ClusterPathOptions, cfg.data.cluster_paths, "data.cluster_paths").check()


register_check(check_cluster_paths)
