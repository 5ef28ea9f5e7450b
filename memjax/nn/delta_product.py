"""Gated DeltaProduct block (Siems et al. 2025): ``n_h`` Householder (delta-rule) writes per token.

The layout of :class:`memjax.nn.associative.GatedDeltaNet` with ``n_h = num_householder`` keys,
values and betas per token (flash-linear-attention's ``GatedDeltaProduct``)::

    q           = SiLU(ShortConv(x W_q))                         [B, T, H, K]
    k_j, v_j    = SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))  [B, T, n_h, H, K / V]
    q, k_j      = L2-normalised per head (and per sub-step)
    beta_j      = sigmoid(x W_b)  (2 sigmoid(.) with allow_neg_eigval)   [B, T, n_h, H]
    g           = -exp(A_log) * softplus(x W_a + dt_bias)        [B, T, H] (decay once per token)
    o           = delta_product(q, k, v, beta, g)                (state [B, H, K, V])
    y           = (RMSNorm(o) * SiLU(x W_gate)) W_o

``num_householder = 1`` is Gated DeltaNet. With ``allow_neg_eigval`` every factor
``I - beta k k^T`` has eigenvalues in ``(-1, 1]``, so the per-token transition
``prod_j (I - beta_j k_j k_j^T)`` can be, e.g., a rotation (two reflections): what state tracking
beyond parity needs (Grazzi et al. 2025; Siems et al. 2025).

Decoding cache: :class:`memjax.nn.associative.AssociativeCache`, conv windows over
``(q, k, v)`` (``k`` and ``v`` windows hold all ``n_h`` sub-steps' channels) and the state
``[B, H, K, V]``; prefill runs the chunked form, single steps the recurrent one.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.delta_product import delta_product
from memjax.nn.associative import _AssociativeBlock, short_convs
from memjax.nn.layers import Linear, ShortConv, l2_normalize
from memjax.nn.registry import register_block


@register_block("gated_deltaproduct", aliases=("DP",))
class GatedDeltaProduct(_AssociativeBlock):
    """Gated DeltaProduct: per token, decay ``exp(g_t)`` then ``num_householder`` delta-rule writes.

    Options: the common ones of :class:`memjax.nn.associative._AssociativeBlock` (``chunk_size``
    counts tokens; None: :func:`memjax.memory.delta_product.delta_product`'s default, 32 sub-steps
    a chunk on CPU (16 tokens with ``n_h = 2``, measured fastest there) and 64 on GPU / TPU;
    ``allow_neg_eigval`` doubles every beta) and ``num_householder`` (``n_h >= 1`` keys, values
    and betas per token).
    """

    uses_beta = True
    uses_decay = True
    l2_qk = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 chunk_size: int | None = None,
                 conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True, mode: str = "chunked",
                 kernel: str = "auto", norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None,
                 allow_neg_eigval: bool = False, num_householder: int = 2, rngs: nnx.Rngs):
        if isinstance(num_householder, bool) or not isinstance(num_householder, int) or num_householder < 1:
            raise ValueError(f"{type(self).__name__}: num_householder must be a positive int, got {num_householder!r}")
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size,
                         conv_width=conv_width, expand_v=expand_v, output_gate=output_gate, mode=mode, kernel=kernel,
                         norm_eps=norm_eps, dtype=dtype, seq_axis=seq_axis, allow_neg_eigval=allow_neg_eigval,
                         rngs=rngs)
        # The common constructor built one key / value / beta per token; widen them to n_h.
        self.nh = n = num_householder
        d, h, dt = d_model, self.h, self.dtype
        self.wk = Linear(d, n * h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, n * h * self.dv, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wb = Linear(d, n * h, ("embed", "heads"), rngs=rngs, dtype=dt)
        if conv_width > 0:
            self.convs = nnx.Dict({nm: ShortConv(c, conv_width, rngs=rngs, axes=("heads",))
                                   for nm, c in (("q", h * self.dk), ("k", n * h * self.dk), ("v", n * h * self.dv))})

    def _project(self, x, segment_ids=None, windows=None):
        """``q [B, T, H, K]``, ``k [B, T, n_h, H, K]`` (both L2-normalised), ``v [B, T, n_h, H, V]``
        and the new conv windows (with ``windows``)."""
        b, t, _ = x.shape
        raw, windows = short_convs(self.convs, {"q": self.wq(x), "k": self.wk(x), "v": self.wv(x)}, segment_ids,
                                   windows)
        q, k, v = (jax.nn.silu(raw[n]) for n in ("q", "k", "v"))
        q = l2_normalize(q.reshape(b, t, self.h, self.dk))
        k = l2_normalize(k.reshape(b, t, self.nh, self.h, self.dk))
        v = v.reshape(b, t, self.nh, self.h, self.dv)
        return q, k, v, windows

    def _gates(self, x):
        beta, g = super()._gates(x)
        return beta.reshape(*x.shape[:2], self.nh, self.h), g

    def _memory(self, q, k, v, beta, g, *, initial_state=None, segment_ids=None, mode=None, seq_axis=None):
        return delta_product(q, k, v, beta, g, initial_state=initial_state, segment_ids=segment_ids,
                             mode=mode or self.mode, chunk_size=self.chunk_size, impl=self.kernel, seq_axis=seq_axis)
