"""The UT transform's triangular inverse: ``(I + L)^{-1}`` for a strictly lower-triangular ``L``,
with matmuls only.

The chunked delta rules (:mod:`memjax.memory.delta`, :mod:`memjax.memory.gdn2`) turn a chunk's
token-by-token corrections into one unit lower-triangular system per chunk (the UT transform,
Joffrain et al. 2006, as used by Yang et al. 2024 "Parallelizing Linear Transformers with the
Delta Rule over Sequence Length"); this module inverts it. No LAPACK call: XLA:CPU's
``triangular_solve`` goes through OpenBLAS, which was seen to hang when XLA runs several solves on
its thread pool at once; the matmul form is as fast on CPU and maps to the MXU / tensor cores
elsewhere.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.manual_axes import common_varying


@jax.custom_jvp
def unit_lower_inverse(lower: jax.Array) -> jax.Array:
    """``(I + L)^{-1}`` for strictly lower-triangular ``L: [..., C, C]`` (entries on and above the
    diagonal are ignored), with matmuls only (no LAPACK call).

    Forward substitution row by row inside diagonal blocks of up to ``16`` (a ``fori_loop``, so it
    compiles to one small loop), then block recursion up to ``C``: with the inverses ``X11, X22``
    of two neighbouring diagonal blocks, ``[[A11, 0], [A21, A22]]^{-1} = [[X11, 0],
    [-X22 A21 X11, X22]]`` (the recursive triangular inversion of LAPACK's ``trtri``). Round-off
    stays at float precision for the well-conditioned systems of the delta rule
    (``|L_ij| <= beta_i |k_i| |k_j|`` times a decay <= 1). ``C`` need not be a power of two.
    Derivative (forward and reverse mode): ``d(A^{-1}) = -A^{-1} dA A^{-1}``, two matmuls, instead
    of differentiating through the loop.
    """
    c = lower.shape[-1]
    if lower.ndim < 2 or lower.shape[-2] != c:
        raise ValueError(f"unit_lower_inverse: lower must be [..., C, C], got shape {lower.shape}")
    base = min(16, c)
    nblk = -(-c // base)
    levels = max(nblk - 1, 0).bit_length()
    size = base << levels  # padded size: base * 2^levels >= C; padding rows/cols are identity
    a = jnp.tril(lower, -1)
    if size != c:
        a = jnp.pad(a, [(0, 0)] * (a.ndim - 2) + [(0, size - c), (0, size - c)])
    inv = _diagonal_block_inverses(a, base)  # [..., size / base, base, base]
    s = base
    while s < size:
        a21 = _diagonal_blocks(a, 2 * s)[..., s:, :s]  # lower-left quarter of each 2s x 2s block
        x11, x22 = inv[..., 0::2, :, :], inv[..., 1::2, :, :]
        x21 = -(x22 @ a21 @ x11)
        top = jnp.concatenate([x11, jnp.zeros_like(x11)], axis=-1)
        bottom = jnp.concatenate([x21, x22], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)  # [..., size / 2s, 2s, 2s]
        s *= 2
    return inv[..., 0, :c, :c]


@unit_lower_inverse.defjvp
def _unit_lower_inverse_jvp(primals, tangents):
    x = unit_lower_inverse(primals[0])
    return x, -(x @ jnp.tril(tangents[0], -1) @ x)


def _diagonal_block_inverses(a: jax.Array, base: int) -> jax.Array:
    """Inverses of the ``base x base`` diagonal blocks of ``I + a`` (``a`` strictly lower),
    ``[..., size / base, base, base]``, by forward substitution: row ``i`` of ``X`` is
    ``e_i - a[i, :i] X[:i]`` (rows below ``i`` are still identity rows and ``a[i, i:] = 0``)."""
    blocks = _diagonal_blocks(a, base)
    eye = jnp.eye(base, dtype=a.dtype)

    def row(i, x):
        a_i = jax.lax.dynamic_index_in_dim(blocks, i, axis=-2, keepdims=True)  # [..., m, 1, base]
        r = jax.lax.dynamic_index_in_dim(eye, i, axis=0, keepdims=True) - a_i @ x
        return jax.lax.dynamic_update_index_in_dim(x, r, i, axis=-2)

    # (inside shard_map the identity start must vary like the blocks to be a loop carry)
    (x0, _), _ = common_varying(jnp.broadcast_to(eye, blocks.shape), blocks)
    return jax.lax.fori_loop(1, base, row, x0)


def _diagonal_blocks(a: jax.Array, s: int) -> jax.Array:
    """The ``s x s`` diagonal blocks of ``a: [..., n s, n s]`` as ``[..., n, s, s]``: a transpose
    to ``[..., n * n, s, s]`` and every ``(n + 1)``-th block (a strided slice compiles much faster
    than a diagonal gather)."""
    n = a.shape[-1] // s
    blocks = jnp.swapaxes(a.reshape(*a.shape[:-2], n, s, n, s), -3, -2)
    return blocks.reshape(*a.shape[:-2], n * n, s, s)[..., :: n + 1, :, :]
