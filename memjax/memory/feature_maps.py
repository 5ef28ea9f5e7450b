"""Feature maps ``phi`` applied to queries and keys before linear attention.

Linear attention with a feature map computes ``o_t = sum_{s<=t} (phi(q_t) . phi(k_s)) v_s``, a
kernel approximation of softmax attention. Every map acts on the last axis of ``x: [..., K]``
and returns ``[..., feature_dim(name, K)]``.

  - ``identity``: ``phi(x) = x`` (dim ``K``).
  - ``elu``: ``phi(x) = elu(x) + 1`` (dim ``K``; positive features, Katharopoulos et al. 2020).
  - ``relu``: ``phi(x) = max(x, 0)`` (dim ``K``).
  - ``taylor``: Based's 2nd-order Taylor map (Arora et al. 2024, "Simple linear attention language
    models balance the recall-throughput tradeoff"):
    ``phi(x) = [1, x / K^(1/4), vec(x x^T) / sqrt(2 K)]``, dimension ``1 + K + K^2``, so that
    ``phi(q) . phi(k) = 1 + (q.k)/sqrt(K) + (q.k)^2 / (2K)``, the 2nd-order Taylor expansion of
    ``exp(q.k / sqrt(K))``. Use it with ``scale=1`` to get exactly that kernel; keep ``K`` small
    (Based uses 16) since the state grows as ``K^2``.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp


def identity(x: jax.Array) -> jax.Array:
    """``phi(x) = x``: plain linear attention (Katharopoulos et al. 2020 without a feature map); shape kept."""
    return x


def elu_plus_one(x: jax.Array) -> jax.Array:
    """``phi(x) = elu(x) + 1 > 0`` (Katharopoulos et al. 2020, "Transformers are RNNs"); shape kept."""
    return jax.nn.elu(x) + 1.0


def relu(x: jax.Array) -> jax.Array:
    """``phi(x) = max(x, 0)``, element-wise; shape kept."""
    return jax.nn.relu(x)


def taylor(x: jax.Array) -> jax.Array:
    """``[..., K] -> [..., 1 + K + K^2]``: ``[1, x / K^(1/4), vec(x x^T) / sqrt(2K)]``."""
    if x.ndim < 1 or x.shape[-1] == 0:
        raise ValueError(f"taylor: x must be [..., K] with K > 0, got shape {x.shape}")
    d = x.shape[-1]
    outer = (x[..., :, None] * x[..., None, :]).reshape(*x.shape[:-1], d * d)
    return jnp.concatenate([jnp.ones_like(x[..., :1]), x / d ** 0.25, outer / (2.0 * d) ** 0.5], axis=-1)


FEATURE_MAPS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "identity": identity,
    "elu": elu_plus_one,
    "relu": relu,
    "taylor": taylor,
}


def get_feature_map(name: str) -> Callable[[jax.Array], jax.Array]:
    """The feature map registered as ``name`` in ``FEATURE_MAPS``; ``ValueError`` listing the names otherwise."""
    if name not in FEATURE_MAPS:
        raise ValueError(f"feature map must be one of {sorted(FEATURE_MAPS)}, got {name!r}")
    return FEATURE_MAPS[name]


def feature_dim(name: str, dim: int) -> int:
    """Output dimension of feature map ``name`` for inputs of dimension ``dim``."""
    get_feature_map(name)
    if dim <= 0:
        raise ValueError(f"feature_dim: dim must be positive, got {dim}")
    return 1 + dim + dim * dim if name == "taylor" else dim
