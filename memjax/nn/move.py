"""MoVE, Mixture of Value Embeddings: causal attention whose values read a global embedding bank.

"MoVE: Mixture of Value Embeddings -- A New Axis for Scaling Parametric Memory in Autoregressive
Models": a bank of learnable value embeddings shared by all attention layers of the model; at
every position a soft gate mixes concepts retrieved from the bank into the layer's value
projection, so parametric memory grows with the number of slots ``M`` at a fixed depth and an
almost fixed compute. (The seed text holds only the abstract; the router and gate below are this
library's reading of it.)

Per MoVE layer, for token ``x_t`` (``d_model``), ``Hkv`` key/value heads of width ``K``::

    bank      E [M, Hkv * K]                  one table for every ``move_attention`` block of a model
    router    r_t = x_t W_r                   [M] logits (W_r [d_model, M], per layer)
    weights   w_t = softmax(r_t)              top_k = 0: all M slots
              w_t = softmax(r_t[I_t]) on I_t   top_k > 0: I_t = the top_k slots, others 0
    gate      g_t = sigmoid(x_t W_g + b_g)    [Hkv], one per key/value head (per layer)
    values    v_t,h = x_t W_v,h + g_t,h * sum_m w_t,m E_m,h     (E_m,h: head h's K columns of row m)

then causal attention (RoPE, grouped-query heads, sliding window, packed documents) exactly as
:class:`memjax.nn.attention.Attention`. The mixture is position-wise (it reads only ``x_t``), so
the attention KV cache stores the mixed values and decoding equals the full forward.

Sharing: :meth:`MoVEAttention.shared_params` makes the bank once per model (``{"bank": E}``) and
the model passes it to every ``move_attention`` block; a block built alone makes its own. Blocks
holding a shared parameter are not stacked under the model's layer scan (``scannable = False``).
The bank carries ``optim_group="memory_values"`` (``optim.memory_values_lr`` applies, as to the
memory-layer value tables) and logical axes ``("memory_slots", "memory_dim")``.

An ablation partner of ``memory_plus`` with ``shared_pool=True`` (a product-key memory in the
residual stream, sparse reads) : MoVE reads densely (or top-k) into the attention values.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.nn.attention import Attention
from memjax.nn.layers import Linear, param
from memjax.nn.registry import register_block
from memjax.nn.validate import check_heads, check_nonnegative, check_positive


def _bank_param(rngs: nnx.Rngs, num_slots: int, width: int, init_scale: float) -> nnx.Param:
    return param(rngs, nnx.initializers.normal(init_scale), (num_slots, width), ("memory_slots", "memory_dim"),
                 optim_group="memory_values")


def _bank_shape(d_model: int, num_heads: int, head_dim: int | None, num_kv_heads: int | None,
                num_slots: int) -> tuple[int, int]:
    h, dk = check_heads("MoVEAttention", d_model, num_heads, head_dim)
    hkv = num_kv_heads or num_heads
    check_positive("MoVEAttention", num_slots=num_slots)
    return num_slots, hkv * dk


@register_block("move_attention", aliases=("MV",))
class MoVEAttention(Attention):
    """Causal attention with a Mixture of Value Embeddings (module docstring: equations).

    Args: those of :class:`memjax.nn.attention.Attention`, and

    - ``num_slots``: ``M``, rows of the value-embedding bank (the memory's capacity).
    - ``top_k``: 0 mixes all ``M`` slots (dense softmax); ``k > 0`` only the ``k`` highest-scoring
      (softmax over them; the bank's gradient then touches only those rows).
    - ``bank_init_scale``: standard deviation of the bank's initial entries.
    - ``bank``: the shared bank ``[M, Hkv * head_dim]`` (the model passes the one of
      :meth:`shared_params`); None: the block makes its own.

    Decoding cache: the attention :class:`memjax.nn.cache.KVCache` (it keeps the mixed values).
    """

    scannable = False  # the bank is one parameter shared by several layers

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 num_kv_heads: int | None = None, window: int = 0, qk_norm: bool = False, impl: str = "auto",
                 num_slots: int = 64, top_k: int = 0, bank_init_scale: float = 1.0, bank: nnx.Param | None = None,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, num_kv_heads=num_kv_heads, window=window,
                         qk_norm=qk_norm, impl=impl, rope_theta=rope_theta, norm_eps=norm_eps, dtype=dtype, rngs=rngs)
        shape = _bank_shape(d_model, num_heads, head_dim, num_kv_heads, num_slots)
        check_nonnegative("MoVEAttention", top_k=top_k)
        check_positive("MoVEAttention", bank_init_scale=bank_init_scale)
        if top_k > num_slots:
            raise ValueError(f"MoVEAttention: top_k ({top_k}) must be at most num_slots ({num_slots})")
        if bank is not None:
            if tuple(bank.shape) != shape:
                raise ValueError(f"MoVEAttention: bank has shape {tuple(bank.shape)}, this block needs {shape} "
                                 "(num_slots, num_kv_heads * head_dim)")
            self.bank = bank
        else:
            self.bank = _bank_param(rngs, *shape, bank_init_scale)
        self.num_slots, self.top_k = num_slots, top_k
        dt = jnp.dtype(dtype)
        # Router and gate read the block's input; zero-initialised gate weights start every head's
        # gate at sigmoid(0) = 1/2 whatever the input scale.
        self.router = Linear(d_model, num_slots, ("embed", "memory_slots"), rngs=rngs, dtype=dt)
        self.gate = Linear(d_model, self.hkv, ("embed", "heads"), rngs=rngs, dtype=dt, use_bias=True,
                           init=nnx.initializers.zeros)

    @classmethod
    def shared_params(cls, *, rngs: nnx.Rngs, d_model: int, num_heads: int = 4, head_dim: int | None = None,
                      num_kv_heads: int | None = None, num_slots: int = 64, bank_init_scale: float = 1.0,
                      **kwargs) -> dict:
        """``{"bank": E [num_slots, num_kv_heads * head_dim]}``: one bank for every MoVE block of a model."""
        check_positive("MoVEAttention", bank_init_scale=bank_init_scale)
        shape = _bank_shape(d_model, num_heads, head_dim, num_kv_heads, num_slots)
        return {"bank": _bank_param(rngs, *shape, bank_init_scale)}

    def _route(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        """``(w, idx)``: dense ``w [B, T, M]`` and ``idx = None`` (``top_k = 0``), else the top
        ``top_k`` slots ``idx [B, T, k]`` and their softmax weights ``w [B, T, k]`` (float32 or wider)."""
        logits = self.router(x)
        logits = logits.astype(jnp.promote_types(logits.dtype, jnp.float32))  # float64 stays float64
        if not self.top_k:
            return jax.nn.softmax(logits, axis=-1), None
        top, idx = jax.lax.top_k(logits, self.top_k)  # exactly k slots, ties broken by index
        return jax.nn.softmax(top, axis=-1), idx

    def mixture_weights(self, x: jax.Array) -> jax.Array:
        """``w [B, T, M]`` (float32 or wider), the slot weights of every token (0 outside the top ``top_k``)."""
        w, idx = self._route(x)
        if idx is None:
            return w
        return jnp.sum(jnp.where(idx[..., None] == jnp.arange(self.num_slots), w[..., None], 0.0), axis=-2)

    def value_mixture(self, x: jax.Array) -> jax.Array:
        """``g_t * sum_m w_t,m E_m`` as ``[B, T, Hkv, K]`` in the block's dtype."""
        b, t, _ = x.shape
        w, idx = self._route(x)
        bank = self.bank[...].astype(w.dtype)
        if idx is None:
            mix = jnp.einsum("btm,md->btd", w, bank)
        else:  # gather the k rows: k bank reads per token, and only they receive gradient
            mix = jnp.einsum("btk,btkd->btd", w, bank[idx])
        g = jax.nn.sigmoid(self.gate(x).astype(w.dtype))  # [B, T, Hkv]
        return (g[..., None] * mix.reshape(b, t, self.hkv, self.dk)).astype(self.wv.dtype)

    def _qkv(self, x, pos):
        q, k, v = super()._qkv(x, pos)
        return q, k, (v + self.value_mixture(x)).astype(v.dtype)
