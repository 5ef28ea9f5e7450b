"""Channel-wise delta-rule blocks: Kimi Delta Attention (KDA) and GDN-2.

Both share the layout of Kimi Linear's KDA layer (Kimi team 2025, "Kimi Linear: An Expressive,
Efficient Attention Architecture"), ``H`` q/k heads of dim ``K`` and ``HV`` (``num_v_heads``, a
multiple of ``H``) value heads of dim ``V``::

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))
    q, k    = L2-normalised per head                                    [B, T, H, K]
    g       = -exp(A_log) * softplus(x W_f1 W_f2 + dt_bias)             [B, T, HV, K] (rank-r gate;
              A = exp(A_log) per value head in [1, 16], dt_bias per channel as Mamba's step size)
    kda:    beta = sigmoid(x W_b)                                       [B, T, HV]
            o = delta_rule(q, k, v, beta, g=g)    S_t = S'_t + k_t (beta_t (v_t - S'_t^T k_t))^T
    gdn2:   b = sigmoid(x W_b) [B, T, HV, K] (erase), w = sigmoid(x W_w) [B, T, HV, V] (write)
            o = gdn2(q, k, v, g, b, w)            S_t = S'_t + k_t (w_t * v_t - S'_t^T (b_t * k_t))^T
            (S'_t = diag(exp g_t) S_{t-1} in both)
    y       = (RMSNorm(o) * sigmoid(x W_g1 W_g2 + b_g)) W_o              (per-head RMSNorm over V)

``allow_neg_eigval`` doubles ``beta`` (kda) or the erase gate ``b`` (gdn2): with a unit key the
transition ``I - k (b * k)^T`` then has an eigenvalue in ``(-1, 1)`` instead of ``(0, 1)`` (Grazzi
et al., ICLR 2025), as in :mod:`memjax.nn.associative`. The gate rank ``r`` defaults to the value
head dim (Kimi Linear's choice).

The projections, short convs, decoding (prefill with the chunked form, single steps with the
recurrent one) and the cache (:class:`memjax.nn.associative.AssociativeCache`: conv windows and the
memory ``[B, HV, K, V]`` float32) are :class:`memjax.nn.associative._AssociativeBlock`'s, and so is
sequence parallelism (``seq_axis``: time split over that mesh axis in training; GDN-2's erase and
write gates travel to the memory as one ``[B, T, HV, K + V]`` array there).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.delta import delta_rule
from memjax.memory.gdn2 import gdn2
from memjax.nn.associative import AssociativeCache, _AssociativeBlock, a_log_init, conv_windows, dt_bias_init, \
    short_convs
from memjax.nn.layers import Linear, ShortConv, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_positive


class _ChannelDeltaBlock(_AssociativeBlock):
    """The shared KDA / GDN-2 skeleton (see the module docstring).

    Args (beyond :class:`memjax.nn.associative._AssociativeBlock`'s ``d_model``, ``num_heads``,
    ``head_dim``, ``chunk_size``, ``conv_width``, ``expand_v``, ``mode``, ``kernel``, ``norm_eps``,
    ``dtype``, ``allow_neg_eigval``):
      num_v_heads: value heads ``HV`` (a multiple of ``num_heads``; None: ``num_heads``). Each
        group of ``HV / H`` value heads shares one q/k head (grouped value heads).
      gate_rank: rank of the decay and output-gate projections (None: the value head dim).
      output_gate: ``RMSNorm(o) * sigmoid(x W_g1 W_g2 + b_g)``; False: ``RMSNorm(o)`` only.
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    l2_qk = True
    uses_beta = True  # (the common constructor's W_b is replaced by one of the right width)
    channel_gates = False  # gdn2: per-key-channel erase gate and per-value-channel write gate

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 num_v_heads: int | None = None, chunk_size: int | None = None, conv_width: int = 4,
                 expand_v: float = 1.0,
                 gate_rank: int | None = None, output_gate: bool = True, mode: str = "chunked", kernel: str = "auto",
                 norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None,
                 allow_neg_eigval: bool = False, rngs: nnx.Rngs):
        name = type(self).__name__
        if kernel == "pallas":
            raise ValueError(f"{name}: kernel='pallas' is not available with per-key-channel decays (the Pallas "
                             "chunk pass carries scalar decays); use 'auto' or 'xla'")
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size,
                         conv_width=conv_width, expand_v=expand_v, output_gate=False, mode=mode, kernel=kernel,
                         norm_eps=norm_eps, dtype=dtype, seq_axis=seq_axis, allow_neg_eigval=allow_neg_eigval,
                         rngs=rngs)
        h = self.h
        hv = h if num_v_heads is None else num_v_heads
        if isinstance(hv, bool) or not isinstance(hv, int) or hv < 1 or hv % h:
            raise ValueError(f"{name}: num_v_heads must be a positive multiple of num_heads ({h}), got {num_v_heads!r}")
        rank = self.dv if gate_rank is None else gate_rank
        if isinstance(rank, bool) or not isinstance(rank, int):
            raise ValueError(f"{name}: gate_rank must be a positive int, got {gate_rank!r}")
        check_positive(name, gate_rank=rank)
        self.hv = hv
        d, dk, dv, dt = d_model, self.dk, self.dv, self.dtype
        # The common constructor built H value heads; widen v (and its conv) and W_o to HV.
        self.wv = Linear(d, hv * dv, ("embed", "heads"), rngs=rngs, dtype=dt)
        if conv_width > 0:
            self.convs["v"] = ShortConv(hv * dv, conv_width, rngs=rngs, axes=("heads",))
        self.wo = Linear(hv * dv, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.wb = Linear(d, hv * (dk if self.channel_gates else 1), ("embed", "heads"), rngs=rngs, dtype=dt)
        self.ww = Linear(d, hv * dv, ("embed", "heads"), rngs=rngs, dtype=dt) if self.channel_gates else None
        self.wf1 = Linear(d, rank, ("embed", None), rngs=rngs, dtype=dt)
        self.wf2 = Linear(rank, hv * dk, (None, "heads"), rngs=rngs, dtype=dt)
        # (nnx.data: the common constructor left these None, i.e. static, without a scalar decay)
        self.a_log = nnx.data(param(rngs, a_log_init, (hv,), ("heads",)))
        self.dt_bias = nnx.data(param(rngs, dt_bias_init, (hv * dk,), ("heads",)))
        if output_gate:
            self.wg1 = Linear(d, rank, ("embed", None), rngs=rngs, dtype=dt)
            self.wg2 = Linear(rank, hv * dv, (None, "heads"), rngs=rngs, dtype=dt, use_bias=True)
        else:
            self.wg1 = self.wg2 = None

    def _project(self, x, segment_ids=None, windows=None):
        """q, k ``[B, T, H, K]`` (SiLU, L2-normalised), v ``[B, T, HV, V]`` and the new conv windows."""
        b, t, _ = x.shape
        raw, windows = short_convs(self.convs, {"q": self.wq(x), "k": self.wk(x), "v": self.wv(x)}, segment_ids,
                                   windows)
        q, k, v = (jax.nn.silu(raw[n]) for n in ("q", "k", "v"))
        q = l2_normalize(q.reshape(b, t, self.h, self.dk))
        k = l2_normalize(k.reshape(b, t, self.h, self.dk))
        return q, k, v.reshape(b, t, self.hv, self.dv), windows

    def _decay(self, x):
        """``g = -exp(A_log) * softplus(x W_f1 W_f2 + dt_bias)``, float32 ``[B, T, HV, K]``."""
        b, t, _ = x.shape
        z = (self.wf2(self.wf1(x)).astype(jnp.float32) + self.dt_bias[...]).reshape(b, t, self.hv, self.dk)
        return -jnp.exp(self.a_log[...])[:, None] * jax.nn.softplus(z)

    def _output(self, o, x):
        b, t = o.shape[:2]
        o = self.o_norm(o)
        if self.wg2 is not None:
            gate = jax.nn.sigmoid(self.wg2(self.wg1(x))).reshape(b, t, self.hv, self.dv)
            o = o * gate.astype(o.dtype)
        return self.wo(o.reshape(b, t, self.hv * self.dv))

    def init_cache(self, batch_size: int, max_length: int) -> AssociativeCache:
        """Zero conv windows and memory ``[B, HV, K, V]`` (``max_length`` is not needed)."""
        return AssociativeCache(conv_windows(self.convs, batch_size, self.dtype),
                                jnp.zeros((batch_size, self.hv, self.dk, self.dv), jnp.float32))


@register_block("kda", aliases=("KDA",))
class KimiDeltaAttention(_ChannelDeltaBlock):
    """Kimi Delta Attention: a per-key-channel decay, then a delta-rule write,
    ``S_t = (I - beta_t k_t k_t^T) diag(exp g_t) S_{t-1} + beta_t k_t v_t^T``.

    Options: see :class:`_ChannelDeltaBlock`.
    """

    def _gates(self, x):
        b, t, _ = x.shape
        return self._beta(self.wb(x)).reshape(b, t, self.hv), self._decay(x)

    def _memory(self, q, k, v, beta, g, *, initial_state=None, segment_ids=None, mode=None, seq_axis=None):
        return delta_rule(q, k, v, beta, g=g, initial_state=initial_state, segment_ids=segment_ids,
                          mode=mode or self.mode, chunk_size=self.chunk_size, impl=self.kernel, seq_axis=seq_axis)


@register_block("gdn2", aliases=("GDN2",))
class GatedDeltaNet2(_ChannelDeltaBlock):
    """GDN-2: a per-key-channel decay, then an erase with the gated key ``b_t * k_t`` and a write of
    the gated value ``w_t * v_t``, ``S_t = (I - k_t (b_t * k_t)^T) diag(exp g_t) S_{t-1} + k_t (w_t * v_t)^T``
    (KDA when ``b_t = w_t = beta_t``).

    Options: see :class:`_ChannelDeltaBlock` (``allow_neg_eigval`` doubles the erase gate).
    """

    channel_gates = True

    def _gates(self, x):
        b, t, _ = x.shape
        erase = self._beta(self.wb(x)).reshape(b, t, self.hv, self.dk)
        write = jax.nn.sigmoid(self.ww(x).astype(jnp.float32)).reshape(b, t, self.hv, self.dv)
        return (erase, write), self._decay(x)

    def _memory(self, q, k, v, beta, g, *, initial_state=None, segment_ids=None, mode=None, seq_axis=None):
        # beta: the (erase, write) pair, or both as one [B, T, HV, K + V] array (see __call__)
        erase, write = beta if isinstance(beta, tuple) else (beta[..., :self.dk], beta[..., self.dk:])
        return gdn2(q, k, v, g, erase, write, initial_state=initial_state, segment_ids=segment_ids,
                    mode=mode or self.mode, chunk_size=self.chunk_size, impl=self.kernel, seq_axis=seq_axis)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: AssociativeCache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache (any ``T >= 1``)."""
        if cache is not None or self.seq_axis is None:
            return super().__call__(x, segment_ids=segment_ids, tokens=tokens, cache=cache)
        # training with time split over seq_axis: the erase and write gates travel as one
        # [B, T, HV, K + V] array (over_sequence splits arrays, not pairs, along time)
        q, k, v, _ = self._project(x, segment_ids)
        (erase, write), g = self._gates(x)
        o, _ = over_sequence(self._memory, dict(q=q, k=k, v=v, beta=jnp.concatenate([erase, write], axis=-1), g=g,
                                                segment_ids=segment_ids), {},
                             axis=self.seq_axis, enabled=self.mode == "chunked")
        return self._output(o, x)
