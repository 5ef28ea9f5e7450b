"""Associative matrix-memory blocks: linear attention, GLA, DeltaNet, Gated DeltaNet.

All four share one layout (the form of current linear-attention layers, e.g. Gated DeltaNet)::

    q, k, v = SiLU(ShortConv(x W_q)), SiLU(ShortConv(x W_k)), SiLU(ShortConv(x W_v))   per head
    q, k    = phi(q), phi(k)              (linear_attn / gla: feature map; delta blocks: L2 norm)
    beta    = sigmoid(x W_b)                                       (deltanet, gated_deltanet)
              (2 sigmoid(x W_b) with allow_neg_eigval: transition eigenvalues in (-1, 1), Grazzi et al. 2025)
    g       = -exp(A_log) * softplus(x W_a + dt_bias)              (gla, gated_deltanet; log decay)
    o       = memory(q, k, v, beta, g)                             ([B, T, H, V], state [B, H, K, V])
    y       = (RMSNorm(o) * SiLU(x W_gate)) W_o                    (per-head RMSNorm over V)

``g`` is the Mamba-2 / Gated DeltaNet parameterisation of a per-head scalar data-dependent decay
(``A = exp(A_log) > 0`` initialised in [1, 16], ``softplus`` step size initialised in
[1e-3, 0.1]), always ``< 0`` so ``exp(g)`` is in (0, 1) whatever the weights: the simple-GLA
gate. ``num_heads`` heads; q/k head dim ``head_dim`` (default ``d_model // num_heads``, or
``qk_dim`` for the feature-map blocks), value head dim ``int(head_dim * expand_v)``.

Decoding cache: :class:`AssociativeCache` ``(conv, memory)``: the short-conv windows
``(q, k, v)``, each ``[B, conv_width - 1, channels]`` (``None`` with ``conv_width=0``), and the
memory ``[B, H, K', V]`` float32 (``K'`` the feature dim of ``phi``). ``block(x, cache=cache)``
runs the chunked form from the cache for ``T > 1`` (prefill) and the recurrent form for
``T = 1`` (a decoding step).

The pieces shared with :mod:`memjax.nn.mixture` (decay parameters, the short convs on q, k, v,
the cache type) live here: :func:`log_decay`, :func:`short_convs`, :class:`AssociativeCache`.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.chunk_pass import IMPLS as CHUNK_IMPLS
from memjax.memory.delta import delta_rule
from memjax.memory.feature_maps import FEATURE_MAPS, feature_dim, get_feature_map
from memjax.memory.linear import linear_attention
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_heads, check_no_segments, check_nonnegative, \
    check_positive

MODES = ("chunked", "recurrent")


class AssociativeCache(NamedTuple):
    """Decoding cache of a matrix-memory block (also :class:`memjax.nn.mixture.MixtureOfMemories`).

    ``conv``: the ``(q, k, v)`` short-conv windows ``[B, conv_width - 1, channels]`` in the
    compute dtype, or ``None`` without short convs. ``memory``: the state, float32
    (``[B, H, K, V]``; ``[B, M', H, K, V]`` for the mixture of memories).
    """

    conv: tuple | None
    memory: jax.Array


# ----------------------------------------------------------------------------- shared pieces


def a_log_init(key, shape, dtype):
    """``A_log`` with ``A = exp(A_log)`` uniform in [1, 16]."""
    return jnp.log(jax.random.uniform(key, shape, dtype, 1.0, 16.0))


def dt_bias_init(key, shape, dtype, dt_min=1e-3, dt_max=0.1):
    """``dt_bias`` with ``softplus(dt_bias)`` log-uniform in ``[dt_min, dt_max]``."""
    dt = jnp.exp(jax.random.uniform(key, shape, dtype, math.log(dt_min), math.log(dt_max)))
    return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus: softplus(dt_bias) = dt


def log_decay(wa: Linear, a_log: nnx.Param, dt_bias: nnx.Param, x: jax.Array) -> jax.Array:
    """``g = -exp(A_log) * softplus(x W_a + dt_bias)``, float32 ``[B, T, n]`` (``n`` = width of ``W_a``)."""
    a = wa(x).astype(jnp.float32) + dt_bias[...]
    return -jnp.exp(a_log[...]) * jax.nn.softplus(a)


def short_convs(convs: nnx.Dict | None, raw: dict, segment_ids=None, windows: tuple | None = None):
    """The short convs named like ``raw``'s entries (``{"q": [B, T, C_q], ...}``) applied to them.

    Returns ``(outputs: dict, windows)``: without ``windows`` (training) the convs mask across
    ``segment_ids`` and the returned windows are ``None``; with ``windows`` (a tuple in ``raw``'s
    order, :meth:`ShortConv.init_cache`) they continue from them and return the new ones.
    Without convs (``convs is None``) ``raw`` and ``windows`` pass through.
    """
    if convs is None:
        return raw, windows
    if windows is None:
        return {n: convs[n](y, segment_ids) for n, y in raw.items()}, None
    outs = [convs[n](y, cache=w) for (n, y), w in zip(raw.items(), windows, strict=True)]
    return {n: y for n, (y, _) in zip(raw, outs)}, tuple(w for _, w in outs)


def conv_windows(convs: nnx.Dict | None, batch_size: int, dtype, names=("q", "k", "v")) -> tuple | None:
    """Zero windows for :func:`short_convs`, one per conv in the order of ``names`` (``None``
    without convs)."""
    return None if convs is None else tuple(convs[n].init_cache(batch_size, dtype) for n in names)


def decoding_mode(x: jax.Array) -> str:
    """The memory form for a call with a cache: chunked for a prefill (``T > 1``), recurrent for one step."""
    return "chunked" if x.shape[1] > 1 else "recurrent"


# ----------------------------------------------------------------------------- blocks


class _AssociativeBlock(Block):
    """Shared projections, short conv, output norm/gate and decoding; subclasses pick the memory.

    Args (common to the four blocks):
      d_model: model width; ``x, y: [B, T, d_model]``.
      num_heads, head_dim: heads and q/k head dim (``None``: ``d_model // num_heads``).
      chunk_size: chunk length of the chunked (training / prefill) form; None: the memory
        function's default (the delta rules: 32 on CPU, 64 on GPU / TPU; linear attention: 64).
      conv_width: causal depthwise short conv on q, k, v; 0: none.
      expand_v: value head dim = ``int(head_dim * expand_v)``.
      output_gate: ``RMSNorm(o) * SiLU(x W_gate)``; False: ``RMSNorm(o)`` only.
      mode: training form, ``"chunked"`` or ``"recurrent"`` (same result, slower).
      kernel: chunk-to-chunk state pass, ``"auto"``, ``"xla"``, ``"pallas"`` or ``"pallas_tpu"``
        (:mod:`memjax.kernels.chunk_pass`; with ``"pallas_tpu"`` the linear-attention and delta-rule
        cores with a per-head gate run their fused Mosaic kernels).
      norm_eps: epsilon of the output RMSNorm.
      dtype: compute dtype (parameters stay float32; the memory state is float32).
      seq_axis: mesh axis that time is split over (sequence parallelism); ``None``: never.
      allow_neg_eigval: (delta-rule blocks) ``beta = 2 sigmoid(.)`` in ``(0, 2)`` instead of
        ``sigmoid(.)``: the eigenvalues of ``I - beta k k^T`` then reach into ``(-1, 0)``, which
        state tracking (e.g. parity) needs (Grazzi et al., ICLR 2025).
    """

    stateful = True
    uses_beta = False
    uses_decay = False
    l2_qk = False  # delta-rule blocks always L2-normalise q and k
    feature_map = "identity"
    qk_dim = 0

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None,
                 chunk_size: int | None = None, conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True,
                 mode: str = "chunked", kernel: str = "auto", norm_eps: float = 1e-6, dtype=jnp.float32,
                 seq_axis: str | None = None, allow_neg_eigval: bool = False, rngs: nnx.Rngs):
        name = type(self).__name__
        self.allow_neg_eigval = bool(allow_neg_eigval)
        self.h, head = check_heads(name, d_model, num_heads, head_dim)
        check_positive(name, expand_v=expand_v)
        if chunk_size is not None:
            check_positive(name, chunk_size=chunk_size)
        check_nonnegative(name, conv_width=conv_width)
        if int(head * expand_v) < 1:
            raise ValueError(f"{name}: expand_v must give a value head dim >= 1, got {expand_v} (head_dim {head})")
        check_choice(name, "mode", mode, MODES)
        check_choice(name, "kernel", kernel, CHUNK_IMPLS)
        self.chunk_size, self.mode, self.conv_width, self.kernel = chunk_size, mode, conv_width, kernel
        self.seq_axis = seq_axis
        self.dk = self.qk_dim or head
        self.dv = int(head * expand_v)
        self.dphi = feature_dim(self.feature_map, self.dk)
        dt = jnp.dtype(dtype)
        d, h = d_model, self.h
        self.wq = Linear(d, h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, h * self.dv, ("embed", "heads"), rngs=rngs, dtype=dt)
        w = conv_width
        self.convs = nnx.Dict({n: ShortConv(c, w, rngs=rngs, axes=("heads",))
                               for n, c in (("q", h * self.dk), ("k", h * self.dk), ("v", h * self.dv))}
                              ) if w > 0 else None
        self.wb = Linear(d, h, ("embed", "heads"), rngs=rngs, dtype=dt) if self.uses_beta else None
        if self.uses_decay:
            self.wa = Linear(d, h, ("embed", "heads"), rngs=rngs, dtype=dt)
            self.a_log = param(rngs, a_log_init, (h,), ("heads",))
            self.dt_bias = param(rngs, dt_bias_init, (h,), ("heads",))
        else:
            self.wa = self.a_log = self.dt_bias = None
        self.o_norm = RMSNorm(self.dv, rngs=rngs, eps=norm_eps, axes=("kv",))
        self.wg = Linear(d, h * self.dv, ("embed", "heads"), rngs=rngs, dtype=dt) if output_gate else None
        self.wo = Linear(h * self.dv, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.dtype = dt

    def _feature_options(self, feature_map: str, qk_dim: int, qk_norm: bool) -> None:
        """Set the feature-map options of linear_attn / gla (before the common constructor)."""
        name = type(self).__name__
        check_choice(name, "feature_map", feature_map, sorted(FEATURE_MAPS))
        check_nonnegative(name, qk_dim=qk_dim)
        self.feature_map, self.qk_dim, self.l2_qk = feature_map, qk_dim, bool(qk_norm)

    # ------------------------------------------------------------------ pieces

    def _project(self, x, segment_ids=None, windows=None):
        """q, k, v after conv + SiLU (+ L2 norm) and the feature map, ``[B, T, H, .]``, and the
        new conv windows (with ``windows``)."""
        b, t, _ = x.shape
        raw, windows = short_convs(self.convs, {"q": self.wq(x), "k": self.wk(x), "v": self.wv(x)}, segment_ids,
                                   windows)
        q, k, v = (jax.nn.silu(raw[n]) for n in ("q", "k", "v"))
        q = q.reshape(b, t, self.h, self.dk)
        k = k.reshape(b, t, self.h, self.dk)
        v = v.reshape(b, t, self.h, self.dv)
        if self.l2_qk:
            q, k = l2_normalize(q), l2_normalize(k)
        phi = get_feature_map(self.feature_map)
        return phi(q), phi(k), v, windows

    def _gates(self, x):
        beta = self._beta(self.wb(x)) if self.uses_beta else None
        g = log_decay(self.wa, self.a_log, self.dt_bias, x) if self.uses_decay else None
        return beta, g

    def _beta(self, logits):
        """``sigmoid(logits)`` in float32, times 2 with ``allow_neg_eigval``."""
        beta = jax.nn.sigmoid(logits.astype(jnp.float32))
        return 2.0 * beta if self.allow_neg_eigval else beta

    def _memory(self, q, k, v, beta, g, *, initial_state=None, segment_ids=None, mode=None, seq_axis=None):
        kw = dict(g=g, initial_state=initial_state, segment_ids=segment_ids,
                  mode=mode or self.mode, impl=self.kernel, seq_axis=seq_axis)
        if self.chunk_size is not None:  # (None: the memory function's own default)
            kw["chunk_size"] = self.chunk_size
        if self.uses_beta:
            return delta_rule(q, k, v, beta, **kw)
        return linear_attention(q, k, v, **kw)

    def _output(self, o, x):
        b, t = o.shape[:2]
        o = self.o_norm(o)
        if self.wg is not None:
            o = o * jax.nn.silu(self.wg(x)).reshape(b, t, self.h, self.dv).astype(o.dtype)
        return self.wo(o.reshape(b, t, self.h * self.dv))

    # ------------------------------------------------------------------ Block interface

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: AssociativeCache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache (any ``T >= 1``)."""
        if cache is None:
            q, k, v, _ = self._project(x, segment_ids)
            beta, g = self._gates(x)
            # (time split over mesh axis seq_axis, if given)
            o, _ = over_sequence(self._memory, dict(q=q, k=k, v=v, beta=beta, g=g, segment_ids=segment_ids), {},
                                 axis=self.seq_axis, enabled=self.mode == "chunked")
            return self._output(o, x)
        check_no_segments(type(self).__name__, segment_ids)
        q, k, v, conv = self._project(x, windows=cache.conv)
        beta, g = self._gates(x)
        o, mem = self._memory(q, k, v, beta, g, initial_state=cache.memory, mode=decoding_mode(x))
        return self._output(o, x), AssociativeCache(conv, mem.astype(jnp.float32))

    def init_cache(self, batch_size: int, max_length: int) -> AssociativeCache:
        """Zero conv windows and memory (``max_length`` is not needed: the state has a fixed size)."""
        return AssociativeCache(conv_windows(self.convs, batch_size, self.dtype),
                                jnp.zeros((batch_size, self.h, self.dphi, self.dv), jnp.float32))


@register_block("linear_attn", aliases=("L",))
class LinearAttention(_AssociativeBlock):
    """Linear attention ``S_t = S_{t-1} + phi(k_t) v_t^T``, ``o_t = S_t^T phi(q_t) / sqrt(K)``
    (Katharopoulos et al. 2020); default ``phi`` = elu + 1.

    Options beyond the common ones (see :class:`_AssociativeBlock`): ``feature_map`` (one of
    :data:`memjax.memory.feature_maps.FEATURE_MAPS`), ``qk_dim`` (per-head q/k dim before the
    feature map; 0: ``head_dim``), ``qk_norm`` (L2-normalise q and k before the feature map).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 64,
                 conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True, mode: str = "chunked",
                 kernel: str = "auto", feature_map: str = "elu", qk_dim: int = 0, qk_norm: bool = False,
                 norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        self._feature_options(feature_map, qk_dim, qk_norm)
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size,
                         conv_width=conv_width, expand_v=expand_v, output_gate=output_gate, mode=mode, kernel=kernel,
                         norm_eps=norm_eps, dtype=dtype, seq_axis=seq_axis, rngs=rngs)


@register_block("gla", aliases=("G",))
class GatedLinearAttention(LinearAttention):
    """Gated linear attention with a scalar per-head decay, ``S_t = exp(g_t) S_{t-1} + phi(k_t) v_t^T``
    (simple GLA / Mamba-2 / RetNet-style with a data-dependent ``g``); default ``phi`` = identity.

    Options as :class:`LinearAttention` (the constructor is its, with ``feature_map="identity"``).
    """

    uses_decay = True
    __init__ = functools.partialmethod(LinearAttention.__init__, feature_map="identity")


@register_block("deltanet", aliases=("DN",))
class DeltaNet(_AssociativeBlock):
    """DeltaNet: ``S_t = S_{t-1} + k_t (beta_t (v_t - S_{t-1}^T k_t))^T`` with L2-normalised q, k.

    Options: the common ones (see :class:`_AssociativeBlock`).
    """

    uses_beta = True
    l2_qk = True


@register_block("gated_deltanet", aliases=("D",))
class GatedDeltaNet(_AssociativeBlock):
    """Gated DeltaNet (Yang, Kautz, Hatamizadeh 2024): decay ``exp(g_t)`` then a delta-rule write,
    ``S_t = exp(g_t) S_{t-1} + k_t (beta_t (v_t - exp(g_t) S_{t-1}^T k_t))^T``.

    Options: the common ones (see :class:`_AssociativeBlock`).
    """

    uses_beta = True
    uses_decay = True
    l2_qk = True
