"""Blocks with a per-key-channel (vector) decay: GLA with its low-rank gate, HGRN2 and RWKV-6.

All three run :func:`memjax.memory.linear.linear_attention` with ``g: [B, T, H, K]``
(``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``; RWKV-6 with its bonus ``u``, read before the update)::

    gla_vec  q, k, v as the gla block (short conv, SiLU); g = logsigmoid(x W_1 W_2 + b) / tau
             (Yang et al. 2024, "Gated Linear Attention Transformers with Hardware-Efficient
             Training": rank-16 gate, tau = 16); y = (RMSNorm(o) * SiLU(x W_gate)) W_o
    hgrn2    f = lb + (1 - lb) sigmoid(x W_f) per channel (lb the lower bound), g = log f,
             k = 1 - f, q = SiLU(x W_q) (the output gate), v = x W_i (the input);
             h_t = diag(f_t) h_{t-1} + k_t v_t^T, o_t = h_t^T q_t (scale 1);
             y = RMSNorm(o) W_o  (Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion")
    rwkv6    time mix of RWKV-6 "Finch" (Peng et al. 2024, "Eagle and Finch"): token shift with
             data-dependent interpolation (a LoRA per r, k, v, g, w), data-dependent decay
             g = -exp(w_0 + tanh(x_w A) B) per channel, bonus u, o_t = (S_{t-1} + diag(u) k_t
             v_t^T)^T r_t (scale 1), per-head GroupNorm, y = (GroupNorm(o) * SiLU(x_g W_g)) W_o.
             The channel mix is the model's ``F`` MLP block.

Decoding caches: ``gla_vec`` and ``hgrn2`` use :class:`memjax.nn.associative.AssociativeCache`
(conv windows or None, memory ``[B, H, K, V]`` float32); ``rwkv6`` uses :class:`RWKV6Cache`
(the previous token's ``x`` for the token shift, and the memory). A call with a cache runs the
chunked form for ``T > 1`` (prefill) and the recurrent form for ``T = 1``.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.chunk_pass import IMPLS as CHUNK_IMPLS
from memjax.memory.linear import linear_attention
from memjax.nn.associative import MODES, AssociativeCache, LinearAttention, decoding_mode
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, param, token_shift
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_heads, check_no_segments, check_positive, check_range


def _uniform(low, high):
    return lambda key, shape, dtype: jax.random.uniform(key, shape, dtype, low, high)


@register_block("gla_vec", aliases=("GV",))
class GatedLinearAttentionVec(LinearAttention):
    """GLA with the paper's per-key-channel gate, ``S_t = diag(exp g_t) S_{t-1} + k_t v_t^T``,
    ``g_t = logsigmoid(x_t W_1 W_2 + b) / tau`` (``W_1: [d_model, gate_rank]``,
    ``W_2: [gate_rank, H K]``). The scalar-gate ``gla`` block is unchanged.

    Options: the common ones of :class:`memjax.nn.associative.LinearAttention` without the feature
    map (identity, as in the paper), ``gate_rank`` (16) and ``gate_temperature`` (``tau``, 16).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 64,
                 conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True, mode: str = "chunked",
                 kernel: str = "auto", gate_rank: int = 16, gate_temperature: float = 16.0, qk_norm: bool = False,
                 norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        check_positive(type(self).__name__, gate_rank=gate_rank, gate_temperature=gate_temperature)
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size,
                         conv_width=conv_width, expand_v=expand_v, output_gate=output_gate, mode=mode, kernel=kernel,
                         feature_map="identity", qk_norm=qk_norm, norm_eps=norm_eps, dtype=dtype,
                         seq_axis=seq_axis, rngs=rngs)
        self.wg1 = Linear(d_model, gate_rank, ("embed", None), rngs=rngs, dtype=self.dtype)
        self.wg2 = Linear(gate_rank, self.h * self.dk, (None, "heads"), rngs=rngs, dtype=self.dtype, use_bias=True)
        self.tau = float(gate_temperature)

    def _gates(self, x):
        b, t, _ = x.shape
        z = self.wg2(self.wg1(x)).astype(jnp.float32)
        return None, (jax.nn.log_sigmoid(z) / self.tau).reshape(b, t, self.h, self.dk)


class _VectorBlock(Block):
    """Shared options of hgrn2 / rwkv6: heads, chunking, mode, kernel, dtype."""

    stateful = True

    def _setup(self, d_model, num_heads, head_dim, chunk_size, mode, kernel, dtype, seq_axis=None):
        name = type(self).__name__
        self.h, self.dk = check_heads(name, d_model, num_heads, head_dim)
        check_positive(name, chunk_size=chunk_size)
        check_choice(name, "mode", mode, MODES)
        check_choice(name, "kernel", kernel, CHUNK_IMPLS)
        self.chunk_size, self.mode, self.kernel, self.seq_axis = chunk_size, mode, kernel, seq_axis
        self.dtype = jnp.dtype(dtype)

    def _memory(self, q, k, v, g, *, bonus=None, initial_state=None, segment_ids=None, mode=None, seq_axis=None):
        return linear_attention(q, k, v, g=g, bonus=bonus, scale=1.0, initial_state=initial_state,
                                segment_ids=segment_ids, mode=mode or self.mode, chunk_size=self.chunk_size,
                                impl=self.kernel, seq_axis=seq_axis)

    def _train_memory(self, q, k, v, g, segment_ids, bonus=None):
        """The memory over the whole sequence in training, time split over ``seq_axis`` if given."""
        return over_sequence(self._memory, dict(q=q, k=k, v=v, g=g, segment_ids=segment_ids), dict(bonus=bonus),
                             axis=self.seq_axis, enabled=self.mode == "chunked")


@register_block("hgrn2", aliases=("H2",))
class HGRN2(_VectorBlock):
    """HGRN2 (Qin et al. 2024): a gated linear RNN with outer-product state expansion,
    ``h_t = diag(f_t) h_{t-1} + (1 - f_t) i_t^T``, ``o_t = h_t^T q_t`` (see the module docstring).

    Args:
      d_model: model width; ``num_heads`` heads of ``head_dim`` (default ``d_model // num_heads``)
        forget-gate channels (the state expansion ``K``) and ``d_model // num_heads`` values.
      lower_bound: ``lb`` in ``[0, 1)``, the forget gate's lower bound (the paper learns one per
        layer, rising with depth; a constant here).
      chunk_size, mode, kernel: the memory's form (:func:`linear_attention`).
      norm_eps: epsilon of the output RMSNorm. dtype: compute dtype (the state is float32).
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, lower_bound: float = 0.0,
                 chunk_size: int = 64, mode: str = "chunked", kernel: str = "auto", norm_eps: float = 1e-6,
                 dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        self._setup(d_model, num_heads, head_dim, chunk_size, mode, kernel, dtype, seq_axis)
        check_range(type(self).__name__, "lower_bound", lower_bound, 0.0, 1.0, high_open=True)
        self.lower_bound = float(lower_bound)
        self.dv = d_model // self.h
        d, h, dt = d_model, self.h, self.dtype
        self.wq = Linear(d, h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wf = Linear(d, h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wi = Linear(d, h * self.dv, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.o_norm = RMSNorm(self.dv, rngs=rngs, eps=norm_eps, axes=("kv",))
        self.wo = Linear(h * self.dv, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _qkvg(self, x):
        b, t, _ = x.shape
        q = jax.nn.silu(self.wq(x)).reshape(b, t, self.h, self.dk)
        z = self.wf(x).astype(jnp.float32)
        lb = self.lower_bound
        # log f and 1 - f from the logit, without forming 1 - sigmoid (cancellation near f = 1)
        g = jax.nn.log_sigmoid(z) if lb == 0 else jnp.log(lb + (1 - lb) * jax.nn.sigmoid(z))
        k = ((1 - lb) * jax.nn.sigmoid(-z)).astype(q.dtype).reshape(b, t, self.h, self.dk)
        v = self.wi(x).reshape(b, t, self.h, self.dv)
        return q, k, v, g.reshape(b, t, self.h, self.dk)

    def _output(self, o):
        b, t = o.shape[:2]
        return self.wo(self.o_norm(o).reshape(b, t, self.h * self.dv))

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: AssociativeCache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache."""
        q, k, v, g = self._qkvg(x)
        if cache is None:
            return self._output(self._train_memory(q, k, v, g, segment_ids)[0])
        check_no_segments(type(self).__name__, segment_ids)
        o, mem = self._memory(q, k, v, g, initial_state=cache.memory, mode=decoding_mode(x))
        return self._output(o), AssociativeCache(None, mem.astype(jnp.float32))

    def init_cache(self, batch_size: int, max_length: int) -> AssociativeCache:
        return AssociativeCache(None, jnp.zeros((batch_size, self.h, self.dk, self.dv), jnp.float32))


class RWKV6Cache(NamedTuple):
    """Decoding cache of :class:`RWKV6`: ``shift`` the last token's input ``[B, d_model]`` (the
    token shift) in the compute dtype, ``memory`` the state ``[B, H, K, V]`` float32."""

    shift: jax.Array
    memory: jax.Array


_MIX = ("w", "k", "v", "r", "g")  # the five data-dependent token-shift interpolations


@register_block("rwkv6", aliases=("R6",))
class RWKV6(_VectorBlock):
    """RWKV-6 "Finch" time mixing (Peng et al. 2024), the channel mix left to the model's MLP.

    With ``x'`` the previous token's input (zero at a document start) and ``dx = x' - x``::

        m_* = x + dx * (mu_* + lora_*(x + dx * mu_x))        * in (w, k, v, r, g)
        r, k, v = m_r W_r, m_k W_k, m_v W_v;  gate = SiLU(m_g W_g)
        g = -exp(w_0 + tanh(m_w A) B)                          (log decay per channel)
        o_t = (S_{t-1} + diag(u) k_t v_t^T)^T r_t,  S_t = diag(exp g_t) S_{t-1} + k_t v_t^T
        y = (GroupNorm_H(o) * gate) W_o

    Args:
      d_model: model width (= ``num_heads * head_dim``; keys and values both ``head_dim``).
      mix_rank, decay_rank: ranks of the token-shift and decay LoRAs (32 and 64 in RWKV-6).
      chunk_size, mode, kernel: the memory's form. norm_eps: GroupNorm epsilon (RWKV-6:
      ``64e-5``). dtype: compute dtype (the state is float32).
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, mix_rank: int = 32,
                 decay_rank: int = 64, chunk_size: int = 64, mode: str = "chunked", kernel: str = "auto",
                 norm_eps: float = 64e-5, dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        self._setup(d_model, num_heads, head_dim, chunk_size, mode, kernel, dtype, seq_axis)
        name = type(self).__name__
        check_positive(name, mix_rank=mix_rank, decay_rank=decay_rank)
        if self.h * self.dk != d_model:
            raise ValueError(f"{name}: num_heads * head_dim must equal d_model, got {self.h} * {self.dk} != {d_model}")
        d, h, dt = d_model, self.h, self.dtype
        depth = jnp.arange(d, dtype=jnp.float32) / d  # RWKV-6's channel ramps (at mid depth)
        ramp = lambda p: (lambda key, shape, dtype: jnp.broadcast_to(1.0 - depth ** p, shape).astype(dtype))
        self.mu_x = param(rngs, ramp(0.5), (d,), ("embed",))
        self.mu = param(rngs, lambda key, shape, dtype: jnp.stack([1.0 - depth ** p for p in (0.5, 0.5, 0.35, 0.25,
                                                                                             0.25)]).astype(dtype),
                        (len(_MIX), d), (None, "embed"))
        self.mix_a = param(rngs, _uniform(-1e-2, 1e-2), (d, len(_MIX) * mix_rank), ("embed", None))
        self.mix_b = param(rngs, _uniform(-1e-2, 1e-2), (len(_MIX), mix_rank, d), (None, None, "embed"))
        n = jnp.arange(d, dtype=jnp.float32) / max(d - 1, 1)
        self.w0 = param(rngs, lambda key, shape, dtype: (-6.0 + 5.0 * n ** 1.35).astype(dtype), (d,), ("embed",))
        self.decay_a = param(rngs, _uniform(-1e-2, 1e-2), (d, decay_rank), ("embed", None))
        self.decay_b = param(rngs, _uniform(-1e-2, 1e-2), (decay_rank, d), (None, "embed"))
        self.u = param(rngs, lambda key, shape, dtype: (0.5 * (1 - n) + ((jnp.arange(d) + 1) % 3 - 1) * 0.1
                                                        ).reshape(shape).astype(dtype), (h, self.dk), ("heads", None))
        self.wr = Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wg = Linear(d, d, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(d, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.gn_scale = param(rngs, nnx.initializers.ones, (d,), ("heads",))
        self.gn_bias = param(rngs, nnx.initializers.zeros, (d,), ("heads",))
        self.mix_rank, self.eps = mix_rank, norm_eps

    def _time_mix(self, x, prev):
        b, t, d = x.shape
        dx = prev - x
        xf = x.astype(jnp.float32)
        dxf = dx.astype(jnp.float32)
        lora = jnp.tanh((xf + dxf * self.mu_x[...]) @ self.mix_a[...]).reshape(b, t, len(_MIX), self.mix_rank)
        lora = jnp.einsum("btfr,frd->fbtd", lora, self.mix_b[...])
        m = {name: (xf + dxf * (self.mu[...][i] + lora[i])).astype(self.dtype) for i, name in enumerate(_MIX)}
        split = lambda y: y.reshape(b, t, self.h, self.dk)
        r, k, v = split(self.wr(m["r"])), split(self.wk(m["k"])), split(self.wv(m["v"]))
        gate = jax.nn.silu(self.wg(m["g"]))
        w = self.w0[...] + jnp.tanh(m["w"].astype(jnp.float32) @ self.decay_a[...]) @ self.decay_b[...]
        return r, k, v, split(-jnp.exp(w)), gate

    def _output(self, o, gate):
        b, t = o.shape[:2]
        of = o.astype(jnp.float32)
        mean = of.mean(-1, keepdims=True)
        of = (of - mean) * jax.lax.rsqrt(((of - mean) ** 2).mean(-1, keepdims=True) + self.eps)
        of = of.reshape(b, t, -1) * self.gn_scale[...] + self.gn_bias[...]
        return self.wo((of * gate.astype(jnp.float32)).astype(self.dtype))

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: RWKV6Cache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache."""
        if cache is not None:
            check_no_segments(type(self).__name__, segment_ids)
        x = x.astype(self.dtype)
        prev = token_shift(x, segment_ids, None if cache is None else cache.shift)
        r, k, v, g, gate = self._time_mix(x, prev)
        u = self.u[...]
        if cache is None:
            return self._output(self._train_memory(r, k, v, g, segment_ids, bonus=u)[0], gate)
        o, mem = self._memory(r, k, v, g, bonus=u, initial_state=cache.memory, mode=decoding_mode(x))
        return self._output(o, gate), RWKV6Cache(x[:, -1], mem.astype(jnp.float32))

    def init_cache(self, batch_size: int, max_length: int) -> RWKV6Cache:
        return RWKV6Cache(jnp.zeros((batch_size, self.h * self.dk), self.dtype),
                          jnp.zeros((batch_size, self.h, self.dk, self.dk), jnp.float32))
