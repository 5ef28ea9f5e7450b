"""Mixture-of-memories block (MoM; Du et al. 2025), alias ``MoM``.

Per token a router picks ``top_k`` of ``num_memories`` matrix memories (plus an always-on shared
memory); each memory has its own key/value projections and gates, the query is shared::

    q          = L2(SiLU(ShortConv(x W_q)))                                   [B, T, H, K]
    k^m, v^m   = L2(SiLU(ShortConv(x W_k)))^m, SiLU(ShortConv(x W_v))^m       per memory m
    beta^m     = sigmoid(x W_b)^m                                             (memory = "delta")
    g^m        = -exp(A_log^m) softplus(x W_a + dt_bias)^m                    (decay = True)
    logits     = x W_r                                                        [B, T, M] (per token)
    o          = mixture_of_memories(q, k, v, logits, top_k, beta, g)        [B, T, H, V]
    y          = (RMSNorm(o) * SiLU(x W_gate)) W_o

The memory is the gated delta rule (``memory="delta"``, the paper's strongest variant) or gated
linear attention (``memory="linear"``). Decoding cache:
:class:`memjax.nn.associative.AssociativeCache` with the short-conv windows and the memories
``[B, M', H, K, V]`` float32 (``M' = num_memories + shared_memory``); ``block(x, cache=cache)``
runs the chunked form for ``T > 1`` and the recurrent one for ``T = 1``.
No load-balancing loss is added (the block interface has no auxiliary-loss channel).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.mixture import MEMORIES, mixture_of_memories
from memjax.nn.associative import (MODES, AssociativeCache, a_log_init, conv_windows, decoding_mode, dt_bias_init,
                                   log_decay, short_convs)
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_heads, check_no_segments, check_nonnegative, \
    check_positive


@register_block("mom", aliases=("MoM",))
class MixtureOfMemories(Block):
    """Mixture of memories, ``[B, T, d_model] -> [B, T, d_model]`` (equations in the module docstring).

    Args:
      d_model: model width.
      num_heads, head_dim: heads and the head dim of q, k and v (``None``: ``d_model // num_heads``).
      num_memories: routed memories ``M``.
      top_k: memories each token writes to and reads from, ``1 <= top_k <= num_memories``.
      memory: ``"delta"`` (gated delta rule) or ``"linear"`` (gated linear attention).
      shared_memory: add an always-on memory (``M' = M + 1``).
      decay: data-dependent per-memory log decay ``g``.
      chunk_size: chunk length of the chunked (training / prefill) form.
      conv_width: causal depthwise short conv on q, k, v; 0: none.
      mode: training form, ``"chunked"`` or ``"recurrent"``.
      norm_eps: epsilon of the output RMSNorm.
      dtype: compute dtype (parameters stay float32; the memory state is float32).
      seq_axis: mesh axis that time is split over (sequence parallelism); ``None``: never.
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, num_memories: int = 4,
                 top_k: int = 2, memory: str = "delta", shared_memory: bool = True, decay: bool = True,
                 chunk_size: int = 64, conv_width: int = 4, mode: str = "chunked", norm_eps: float = 1e-6,
                 dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        name = "MixtureOfMemories"
        self.h, self.dk = check_heads(name, d_model, num_heads, head_dim)
        check_positive(name, num_memories=num_memories, top_k=top_k, chunk_size=chunk_size)
        if top_k > num_memories:
            raise ValueError(f"{name}: top_k ({top_k}) must be <= num_memories ({num_memories})")
        check_choice(name, "memory", memory, MEMORIES)
        check_nonnegative(name, conv_width=conv_width)
        check_choice(name, "mode", mode, MODES)
        self.top_k, self.memory, self.shared_memory = top_k, memory, bool(shared_memory)
        self.chunk_size, self.conv_width, self.mode, self.seq_axis = chunk_size, conv_width, mode, seq_axis
        self.m, self.mp = num_memories, num_memories + int(shared_memory)
        d, h, dk, mp = d_model, self.h, self.dk, self.mp
        dt = jnp.dtype(dtype)
        self.dtype = dt
        self.wq = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, mp * h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, mp * h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.router = Linear(d, self.m, ("embed", None), rngs=rngs, dtype=jnp.float32,
                             init=nnx.initializers.normal(d ** -0.5))
        w = conv_width
        self.convs = nnx.Dict({n: ShortConv(c, w, rngs=rngs, axes=("heads",))
                               for n, c in (("q", h * dk), ("k", mp * h * dk), ("v", mp * h * dk))}
                              ) if w > 0 else None
        self.wb = Linear(d, mp * h, ("embed", "heads"), rngs=rngs, dtype=dt) if memory == "delta" else None
        if decay:
            self.wa = Linear(d, mp * h, ("embed", "heads"), rngs=rngs, dtype=dt)
            self.a_log = param(rngs, a_log_init, (mp * h,), ("heads",))
            self.dt_bias = param(rngs, dt_bias_init, (mp * h,), ("heads",))
        else:
            self.wa = self.a_log = self.dt_bias = None
        self.o_norm = RMSNorm(dk, rngs=rngs, eps=norm_eps, axes=("kv",))
        self.wg = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(h * dk, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _project(self, x, segment_ids=None, windows=None):
        b, t, _ = x.shape
        raw, windows = short_convs(self.convs, {"q": self.wq(x), "k": self.wk(x), "v": self.wv(x)}, segment_ids,
                                   windows)
        q = l2_normalize(jax.nn.silu(raw["q"]).reshape(b, t, self.h, self.dk))
        k = l2_normalize(jax.nn.silu(raw["k"]).reshape(b, t, self.mp, self.h, self.dk))
        v = jax.nn.silu(raw["v"]).reshape(b, t, self.mp, self.h, self.dk)
        return q, k, v, windows

    def _gates(self, x):
        b, t, _ = x.shape
        shape = (b, t, self.mp, self.h)
        beta = None if self.wb is None else jax.nn.sigmoid(self.wb(x).astype(jnp.float32)).reshape(shape)
        g = None if self.wa is None else log_decay(self.wa, self.a_log, self.dt_bias, x).reshape(shape)
        return beta, g, self.router(x.astype(jnp.float32))

    def _mix(self, q, k, v, logits, beta, g, segment_ids, initial_state, seq_axis, *, mode):
        return mixture_of_memories(q, k, v, logits, top_k=self.top_k, beta=beta, g=g, memory=self.memory,
                                   shared_memory=self.shared_memory, initial_state=initial_state,
                                   segment_ids=segment_ids, mode=mode, chunk_size=self.chunk_size, seq_axis=seq_axis)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: AssociativeCache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache (any ``T >= 1``)."""
        if cache is not None:
            check_no_segments("MixtureOfMemories", segment_ids)
        q, k, v, conv = self._project(x, segment_ids, None if cache is None else cache.conv)
        beta, g, logits = self._gates(x)
        if cache is None:
            time_args = dict(q=q, k=k, v=v, logits=logits, beta=beta, g=g, segment_ids=segment_ids)
            # training: time split over mesh axis seq_axis, if given
            o, _ = over_sequence(lambda **kw: self._mix(**kw, mode=self.mode), time_args,
                                 dict(initial_state=None), axis=self.seq_axis, enabled=self.mode == "chunked")
        else:
            o, s = self._mix(q, k, v, logits, beta, g, None, cache.memory, None, mode=decoding_mode(x))
        b, t = x.shape[:2]
        o = self.o_norm(o) * jax.nn.silu(self.wg(x)).reshape(b, t, self.h, self.dk).astype(o.dtype)
        y = self.wo(o.reshape(b, t, self.h * self.dk))
        return y if cache is None else (y, AssociativeCache(conv, s.astype(jnp.float32)))

    def init_cache(self, batch_size: int, max_length: int) -> AssociativeCache:
        """Zero conv windows and memories ``[B, M', H, K, K]`` float32 (``max_length`` unused)."""
        return AssociativeCache(conv_windows(self.convs, batch_size, self.dtype),
                                jnp.zeros((batch_size, self.mp, self.h, self.dk, self.dk), jnp.float32))
