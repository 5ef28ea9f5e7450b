"""Titans MAG and MAL blocks: neural long-term memory with attention (Behrouz et al. 2025).

``titans_mag`` and ``titans_mal`` have two branches over the block input ``x`` (already
RMS-normalised by the model):

- neural memory (:class:`NeuralMemory`): ``q, k, v = SiLU(ShortConv(x W))`` per head, ``q, k``
  L2-normalised; data-dependent gates ``theta = theta_max * sigmoid(x w_theta + b)``,
  ``eta = sigmoid(x w_eta + b)``, ``alpha = sigmoid(x w_alpha + b)`` per head; the memory MLP
  (``depth`` layers, initial weights ``params0`` learned by the outer loop) is written with
  :func:`memjax.memory.neural_memory.titans` (chunked form) and read at ``q``; per-head RMSNorm.
- sliding-window attention (:class:`SlidingWindowAttention`): causal softmax attention over the
  last ``window`` tokens, RoPE, per-head RMSNorm.

``titans_mag`` (memory as a gate, alias ``MAG``)::

    gate = sigmoid(x W_g)                         (per channel)
    y    = W_o(gate * swa(x) + (1 - gate) * memory(x))

The paper writes MAG as ``y ⊗ M(x)`` with normalised branches and a non-linearity; here the two
normalised branches are mixed by a data-dependent gate, so either branch can carry the output.

``titans_mal`` (memory as a layer, alias ``MAL``): the memory layer, then the attention layer,
each with its own residual::

    m = memory(x) W_m ;  h = x + m ;  y = m + W_o swa(RMSNorm(h))

so the model's ``x + y`` equals ``h + swa(RMSNorm(h))``.

``titans_mac`` (memory as context) lives in :mod:`memjax.nn.titans_mac`; it uses the same
:class:`NeuralMemory` through its public methods (``project``, ``query``, ``update``,
``retrieve``, ``initial_state``), so the memory's logic exists once.

Decoding (MAG, MAL): ``y, cache = block(x, cache=cache)`` with :class:`TitansBlockCache`: the
memory's :class:`NeuralMemoryCache` (short-conv windows and a
:class:`memjax.memory.neural_memory.TitansCache`: memory weights and momentum at the last chunk
boundary plus the tokens of the unfinished chunk) and the attention's
:class:`memjax.nn.cache.WindowKVCache` (ring of the last ``window`` rotated keys and values). For
any ``T >= 1`` the memory continues the chunked algorithm with
:func:`memjax.memory.neural_memory.titans_decode`, which advances the weights exactly where the
training form does (every ``chunk_size`` tokens from the start of the sequence), so a prompt
prefilled in any pieces and then decoded token by token reproduces the call on the whole
sequence. ``chunk_size = 1`` is the exact per-token update (then the training call uses the
recurrent form, which gives the same result faster).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.attention import causal_attention, rope
from memjax.memory.neural_memory import ACTIVATIONS, TitansCache, TitansState, titans, titans_decode, titans_init_cache
from memjax.memory.segments import positions
from memjax.nn.block import Block
from memjax.nn.cache import WindowKVCache
from memjax.nn.layers import Linear, RMSNorm, ShortConv, l2_normalize, param
from memjax.nn.registry import register_block
from memjax.nn.validate import check_choice, check_heads, check_no_segments, check_nonnegative, check_positive


def check_memory_options(block: str, *, chunk_size: int, depth: int, memory_expansion: int, activation: str,
                         conv_width: int, theta_max: float) -> None:
    """The neural memory's constructor checks, with errors naming ``block``."""
    check_positive(block, chunk_size=chunk_size, depth=depth, memory_expansion=memory_expansion)
    check_nonnegative(block, conv_width=conv_width, theta_max=theta_max)
    check_choice(block, "activation", activation, tuple(ACTIVATIONS))


def _const(value):
    return lambda key, shape, dtype: jnp.full(shape, value, dtype)


# ----------------------------------------------------------------------------- neural memory


class MemoryInputs(NamedTuple):
    """What the memory reads and writes per token (the arguments of
    :func:`memjax.memory.neural_memory.titans`, in its order): ``q, k: [B, T, H, K]``
    (L2-normalised), ``v: [B, T, H, K]``, ``theta, eta, alpha: [B, T, H]`` float32."""

    q: jax.Array
    k: jax.Array
    v: jax.Array
    theta: jax.Array
    eta: jax.Array
    alpha: jax.Array


class NeuralMemoryCache(NamedTuple):
    """Decoding cache of :class:`NeuralMemory`: ``conv``, the last ``conv_width - 1`` inputs of the
    q, k, v short convolutions (three ``[B, conv_width - 1, H K]``; ``None`` without conv), and
    ``titans``, the chunked memory's :class:`memjax.memory.neural_memory.TitansCache`."""

    conv: tuple | None
    titans: TitansCache


class NeuralMemory(nnx.Module):
    """The Titans long-term memory: ``x [B, T, d_model] -> RMSNorm(M_t(q_t)) [B, T, H, K]`` per head.

    ``q, k, v = SiLU(ShortConv(x W))`` per head (``q, k`` L2-normalised), gates
    ``theta = theta_max sigmoid(x w_theta + b_theta)``, ``eta = sigmoid(x w_eta + b_eta)``,
    ``alpha = sigmoid(x w_alpha + b_alpha)`` (``[B, T, H]``); the memory MLP (``depth`` layers
    ``[H, D_in, D_out]``, hidden width ``K * memory_expansion``, initial weights ``params0`` learned
    by the outer loop) is written with :func:`memjax.memory.neural_memory.titans` (chunks of
    ``chunk_size``) and read at ``q``.

    Public pieces (used by the Titans blocks, MAC included): :meth:`project` (x -> the memory's
    :class:`MemoryInputs`), :meth:`query` (the read query alone, through a caller's short conv),
    :meth:`update` (write and read over a sequence), :meth:`retrieve` (read given weights, no
    write), :meth:`decode` (continue the chunked form from a cache), :meth:`initial_weights`,
    :meth:`initial_state`, and ``o_norm`` (the per-head RMSNorm of the reads).

    Args:
      d_model: input width; ``num_heads`` heads of ``head_dim`` (``None``: ``d_model // num_heads``).
      chunk_size: tokens per chunk of the memory's training form (1: exact per-token updates).
      depth: memory MLP layers (1: linear memory ``K -> K``).
      memory_expansion: hidden width of the memory MLP = ``head_dim * memory_expansion``.
      activation: between memory MLP layers, ``"silu"`` or ``"gelu"``.
      conv_width: causal depthwise short conv on q, k, v; 0: none.
      theta_max: upper bound of the learning rate ``theta``; 0: 0.5 for a linear memory (for a
        repeated unit key the momentum update is stable iff ``2 theta < (1 + eta)(2 - alpha)``,
        true for any eta, alpha), 0.1 for an MLP memory (0.5 diverged within a few training steps
        on MQAR).
      eta_bias, alpha_bias: initial momentum decay ``sigmoid(eta_bias)`` and weight decay
        ``sigmoid(alpha_bias)``.
      norm_eps, dtype: RMSNorm epsilon, compute dtype of the projections.
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 16,
                 depth: int = 1, memory_expansion: int = 2, activation: str = "silu", conv_width: int = 4,
                 theta_max: float = 0.0, eta_bias: float = 0.0, alpha_bias: float = -5.0, norm_eps: float = 1e-6,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        self.h, self.dk = check_heads("NeuralMemory", d_model, num_heads, head_dim)
        check_memory_options("NeuralMemory", chunk_size=chunk_size, depth=depth, memory_expansion=memory_expansion,
                             activation=activation, conv_width=conv_width, theta_max=theta_max)
        self.chunk_size, self.activation = chunk_size, activation
        d, h, dk = d_model, self.h, self.dk
        dt = jnp.dtype(dtype)
        self.dtype = dt
        self.wq = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d, h * dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.convs = nnx.Dict({n: ShortConv(h * dk, conv_width, rngs=rngs, axes=("heads",)) for n in ("q", "k", "v")}
                              ) if conv_width > 0 else None
        self.theta_max = theta_max or (0.5 if depth == 1 else 0.1)
        self.w_gates = Linear(d, 3 * h, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.b_theta = param(rngs, _const(0.0), (h,), ("heads",))
        self.b_eta = param(rngs, _const(eta_bias), (h,), ("heads",))
        self.b_alpha = param(rngs, _const(alpha_bias), (h,), ("heads",))
        # Initial memory weights, learned by the outer loop. A linear memory starts empty; an
        # MLP needs non-zero weights to receive any gradient.
        hidden = dk * memory_expansion
        dims = [dk] + [hidden] * (depth - 1) + [dk]
        axes = lambda i: ("heads", "kv" if i == 0 else "mlp", "kv" if i == depth - 1 else "mlp")
        init = (nnx.initializers.zeros if depth == 1 else
                nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=1, out_axis=2,
                                                    batch_axis=0))
        self.params0 = nnx.List([param(rngs, init, (h, i, o), axes(n))
                                 for n, (i, o) in enumerate(zip(dims[:-1], dims[1:]))])
        self.o_norm = RMSNorm(dk, rngs=rngs, eps=norm_eps, axes=("kv",))

    # ------------------------------------------------------------------ public pieces

    def initial_weights(self) -> tuple:
        """``params0``: the memory's initial weights, ``depth`` arrays ``[H, D_in, D_out]``."""
        return tuple(p[...] for p in self.params0)

    def initial_state(self, batch_size: int) -> TitansState:
        """The memory before any token: ``params0`` broadcast to ``[B, H, D_in, D_out]`` (float32)
        with zero momentum."""
        w = tuple(jnp.broadcast_to(p.astype(jnp.float32)[None], (batch_size,) + p.shape)
                  for p in self.initial_weights())
        return TitansState(w, tuple(jnp.zeros_like(x) for x in w))

    def _branch(self, x, linear, conv, segment_ids, cache, normalize):
        """``SiLU(conv(x W))`` per head ``[B, T, H, K]`` (L2-normalised if ``normalize``); with a
        conv window ``cache`` also the new window, else ``None``."""
        b, t, _ = x.shape
        raw, window = linear(x), None
        if conv is not None:
            if cache is None:
                raw = conv(raw, segment_ids)
            else:
                raw, window = conv(raw, cache=cache)
        z = jax.nn.silu(raw).reshape(b, t, self.h, self.dk)
        return (l2_normalize(z) if normalize else z), window

    def query(self, x, *, conv: ShortConv | None = None, segment_ids=None, cache=None):
        """The read query ``l2norm(SiLU(conv(x W_q)))``: ``x [B, T, d_model] -> [B, T, H, K]``,
        through the caller's short conv ``conv`` (``None``: none). Returns ``(q, window)``, the
        conv's new window when a window ``cache [B, W - 1, H K]`` is given, else ``None``."""
        return self._branch(x, self.wq, conv, segment_ids, cache, True)

    def gates(self, x):
        """``(theta, eta, alpha)``, each ``[B, T, H]`` float32, from ``x [B, T, d_model]``."""
        z = self.w_gates(x).astype(jnp.float32)
        zt, ze, za = jnp.split(z, 3, axis=-1)
        theta = self.theta_max * jax.nn.sigmoid(zt + self.b_theta[...])
        eta = jax.nn.sigmoid(ze + self.b_eta[...])
        alpha = jax.nn.sigmoid(za + self.b_alpha[...])
        return theta, eta, alpha

    def project(self, x, *, segment_ids=None, conv: tuple | None = None) -> tuple[MemoryInputs, tuple | None]:
        """``x [B, T, d_model]`` -> ``(MemoryInputs, conv)``: q, k, v through this memory's short
        convs (with ``segment_ids``, none reaches into a previous document) and the gates. With
        ``conv`` (the three q, k, v windows of :class:`NeuralMemoryCache`) the convs continue from
        them and the new windows are returned; else ``None``."""
        convs = (None,) * 3 if self.convs is None else (self.convs["q"], self.convs["k"], self.convs["v"])
        caches = (None,) * 3 if conv is None else conv
        out = [self._branch(x, w, c, segment_ids, cache, norm)
               for w, c, cache, norm in zip((self.wq, self.wk, self.wv), convs, caches, (True, True, False))]
        windows = None if conv is None else tuple(window for _, window in out)
        return MemoryInputs(*(z for z, _ in out), *self.gates(x)), windows

    def update(self, inputs: MemoryInputs, *, initial_state: TitansState | None = None,
               segment_ids=None) -> tuple[jax.Array, TitansState]:
        """Write the sequence into the memory and read it: :func:`memjax.memory.neural_memory.titans`
        with this memory's ``params0``, activation and chunks (``chunk_size = 1``: the recurrent
        form). ``initial_state`` (``None``: :meth:`initial_state`) sits at a chunk boundary; chunks
        restart at every document of ``segment_ids``. Returns ``(o [B, T, H, K]`` (not normalised),
        final :class:`TitansState`)."""
        c = self.chunk_size
        return titans(*inputs, params0=self.initial_weights(), initial_state=initial_state,
                      activation=self.activation, segment_ids=segment_ids,
                      mode="recurrent" if c == 1 else "chunked", chunk_size=c)

    def retrieve(self, q: jax.Array, weights: tuple | None = None) -> jax.Array:
        """``M_W(q)`` without a write: ``q [B, N, H, K]``, ``weights`` the layers ``[B, H, D_in,
        D_out]`` (a state's ``weights``) or ``[H, D_in, D_out]`` (``None``: ``params0``). Float32
        inside, output in ``q``'s dtype."""
        ws = self.initial_weights() if weights is None else weights
        act = ACTIVATIONS[self.activation]
        z = q.astype(jnp.float32)
        for i, w in enumerate(ws):
            z = jnp.einsum("bnhd,bhde->bnhe" if w.ndim == 4 else "bnhd,hde->bnhe", z, w.astype(jnp.float32))
            if i < len(ws) - 1:
                z = act(z)
        return z.astype(q.dtype)

    def decode(self, inputs: MemoryInputs, cache: TitansCache) -> tuple[jax.Array, TitansCache]:
        """Continue the chunked form for ``T >= 1`` tokens from ``cache``
        (:func:`memjax.memory.neural_memory.titans_decode`); returns ``(o [B, T, H, K], cache)``."""
        return titans_decode(*inputs, cache, activation=self.activation, chunk_size=self.chunk_size)

    # ------------------------------------------------------------------ module API

    def __call__(self, x, segment_ids=None, *, cache: NeuralMemoryCache | None = None):
        """``RMSNorm(M_t(q_t)) [B, T, H, K]``; with a cache, ``(reads, cache)``."""
        if cache is None:
            inputs, _ = self.project(x, segment_ids=segment_ids)
            return self.o_norm(self.update(inputs, segment_ids=segment_ids)[0])
        inputs, conv = self.project(x, conv=cache.conv)
        o, memory = self.decode(inputs, cache.titans)
        return self.o_norm(o), NeuralMemoryCache(conv, memory)

    def init_cache(self, batch_size: int) -> NeuralMemoryCache:
        conv = None if self.convs is None else tuple(self.convs[n].init_cache(batch_size, self.dtype)
                                                     for n in ("q", "k", "v"))
        memory = titans_init_cache(batch_size, self.h, self.dk, self.dk, params0=self.initial_weights(),
                                   chunk_size=self.chunk_size)
        return NeuralMemoryCache(conv, memory)


# ----------------------------------------------------------------------------- sliding window


class SlidingWindowAttention(nnx.Module):
    """Causal attention over the last ``window`` tokens (RoPE): ``[B, T, d_model] -> [B, T, H, K]``
    per-head outputs, RMS-normalised per head.

    Decoding cache: :class:`memjax.nn.cache.WindowKVCache` of ``window`` rotated keys and values.
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, window: int = 64,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        self.h, self.dk = check_heads("SlidingWindowAttention", d_model, num_heads, head_dim)
        check_positive("SlidingWindowAttention", window=window, rope_theta=rope_theta)
        self.window, self.theta = window, rope_theta
        dt = jnp.dtype(dtype)
        self.wq = Linear(d_model, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wk = Linear(d_model, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wv = Linear(d_model, self.h * self.dk, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.o_norm = RMSNorm(self.dk, rngs=rngs, eps=norm_eps, axes=("kv",))

    def _qkv(self, x, pos):
        b, t, _ = x.shape
        q, k, v = (w(x).reshape(b, t, self.h, self.dk) for w in (self.wq, self.wk, self.wv))
        return rope(q, pos, self.theta), rope(k, pos, self.theta), v

    def __call__(self, x, segment_ids=None, *, cache: WindowKVCache | None = None):
        b, t, _ = x.shape
        if cache is None:  # RoPE positions restart at each packed document
            q, k, v = self._qkv(x, positions(b, t, segment_ids))
            return self.o_norm(causal_attention(q, k, v, segment_ids=segment_ids, window=self.window))
        q_pos = cache.positions(t)
        q, k, v = self._qkv(x, q_pos)
        cache, keys, vals, k_pos, valid = cache.update(k, v)
        o = causal_attention(q, keys, vals, window=self.window, q_positions=q_pos, k_positions=k_pos, k_valid=valid)
        return self.o_norm(o), cache

    def init_cache(self, batch_size: int) -> WindowKVCache:
        return WindowKVCache.init(batch_size, self.window, self.h, self.dk, self.wk.dtype)


# ----------------------------------------------------------------------------- MAG, MAL


class TitansBlockCache(NamedTuple):
    """Decoding cache of :class:`TitansMAG` and :class:`TitansMAL`."""

    memory: NeuralMemoryCache
    attn: WindowKVCache


class _TitansBlock(Block):
    """MAG and MAL: one constructor (their options), each builds its layers in :meth:`_build`.

    Args:
      d_model: model width; ``num_heads`` heads of ``head_dim`` (``None``: ``d_model // num_heads``).
      chunk_size, depth, memory_expansion, activation, conv_width, theta_max, eta_bias,
        alpha_bias: of the neural memory (see :class:`NeuralMemory`).
      window: sliding-window attention span.
      rope_theta, norm_eps, dtype: RoPE base, RMSNorm epsilon, compute dtype.
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 16,
                 window: int = 64, depth: int = 1, memory_expansion: int = 2, activation: str = "silu",
                 conv_width: int = 4, theta_max: float = 0.0, eta_bias: float = 0.0, alpha_bias: float = -5.0,
                 rope_theta: float = 10000.0, norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        name = type(self).__name__
        h, dk = check_heads(name, d_model, num_heads, head_dim)
        check_memory_options(name, chunk_size=chunk_size, depth=depth, memory_expansion=memory_expansion,
                             activation=activation, conv_width=conv_width, theta_max=theta_max)
        check_positive(name, window=window)
        heads = dict(num_heads=num_heads, head_dim=head_dim, norm_eps=norm_eps, dtype=dtype)
        memory = lambda: NeuralMemory(d_model, **heads, chunk_size=chunk_size, depth=depth,
                                      memory_expansion=memory_expansion, activation=activation, conv_width=conv_width,
                                      theta_max=theta_max, eta_bias=eta_bias, alpha_bias=alpha_bias, rngs=rngs)
        attn = lambda: SlidingWindowAttention(d_model, **heads, window=window, rope_theta=rope_theta, rngs=rngs)
        self._build(d_model, h * dk, memory, attn, norm_eps, jnp.dtype(dtype), rngs)

    def _build(self, d, hd, memory, attn, norm_eps, dt, rngs):
        """Each variant (MAG, MAL) creates its own layers from the ``memory`` and ``attn`` factories;
        the private base class itself is never registered or built."""
        raise NotImplementedError(f"{type(self).__name__} must define _build (use TitansMAG or TitansMAL)")

    def init_cache(self, batch_size: int, max_length: int) -> TitansBlockCache:
        return TitansBlockCache(self.memory.init_cache(batch_size), self.attn.init_cache(batch_size))


@register_block("titans_mag", aliases=("MAG",))
class TitansMAG(_TitansBlock):
    """Memory as a gate: sliding-window attention and neural memory mixed by a learned gate,
    ``y = W_o(g * swa(x) + (1 - g) * memory(x))``, ``g = sigmoid(x W_g)``; ``[B, T, d_model] -> [B, T, d_model]``.
    Constructor arguments: those of :class:`_TitansBlock` (shared with :class:`TitansMAL`).
    Decoding cache: :class:`TitansBlockCache`."""

    def _build(self, d, hd, memory, attn, norm_eps, dt, rngs):
        self.memory = memory()
        self.attn = attn()
        self.wg = Linear(d, hd, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wo = Linear(hd, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _combine(self, ya, ym, x):
        b, t = x.shape[:2]
        g = jax.nn.sigmoid(self.wg(x)).reshape(ya.shape)
        y = g * ya + (1.0 - g) * ym.astype(ya.dtype)
        return self.wo(y.reshape(b, t, -1))

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: TitansBlockCache | None = None):
        if cache is None:
            return self._combine(self.attn(x, segment_ids), self.memory(x, segment_ids), x)
        check_no_segments("TitansMAG", segment_ids)
        ya, attn = self.attn(x, cache=cache.attn)
        ym, memory = self.memory(x, cache=cache.memory)
        return self._combine(ya, ym, x), TitansBlockCache(memory, attn)


@register_block("titans_mal", aliases=("MAL",))
class TitansMAL(_TitansBlock):
    """Memory as a layer: ``m = memory(x) W_m``, ``h = x + m``, ``y = m + W_o swa(RMSNorm(h))``;
    ``[B, T, d_model] -> [B, T, d_model]``. Constructor arguments: those of :class:`_TitansBlock`
    (shared with :class:`TitansMAG`). Decoding cache: :class:`TitansBlockCache`."""

    def _build(self, d, hd, memory, attn, norm_eps, dt, rngs):
        self.memory = memory()
        self.wm = Linear(hd, d, ("heads", "embed"), rngs=rngs, dtype=dt)
        self.norm = RMSNorm(d, rngs=rngs, eps=norm_eps)
        self.attn = attn()
        self.wo = Linear(hd, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _mem_out(self, ym, x):
        return self.wm(ym.reshape(*x.shape[:2], -1)).astype(x.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: TitansBlockCache | None = None):
        if cache is None:
            m = self._mem_out(self.memory(x, segment_ids), x)
            ya = self.attn(self.norm(x + m), segment_ids)
            return m + self.wo(ya.reshape(*x.shape[:2], -1))
        check_no_segments("TitansMAL", segment_ids)
        ym, memory = self.memory(x, cache=cache.memory)
        m = self._mem_out(ym, x)
        ya, attn = self.attn(self.norm(x + m), cache=cache.attn)
        return m + self.wo(ya.reshape(*x.shape[:2], -1)), TitansBlockCache(memory, attn)
