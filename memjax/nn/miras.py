"""Miras blocks: Moneta, Yaad and Memora (Behrouz et al. 2025, "It's All Connected") with a
matrix-valued memory (:func:`memjax.memory.miras.miras`).

Layout of :mod:`memjax.nn.associative` (short convs, SiLU, L2-normalised q and k, per-head output
RMSNorm and SiLU gate)::

    q, k, v = SiLU(ShortConv(x W_q)), ..., per head;  q, k = L2norm(q), L2norm(k)
    eta     = lr * sigmoid(x W_b)                       learning rate of the inner optimiser
    g       = -exp(A_log) * softplus(x W_a + dt_bias)   log retention, alpha = exp(g) in (0, 1)
    delta   = softplus(x W_d + d_bias)                  (Yaad) data-dependent Huber threshold
    o       = miras(q, k, v, spec, eta=eta, g=g, delta=delta)
    y       = (RMSNorm(o) * SiLU(x W_gate)) W_o

``moneta`` (alias ``MON``): l_p bias, l_q retention (``p = 3``, ``q = 4`` by default, the paper's);
``yaad`` (``YAAD``): Huber bias, l2 retention; ``memora`` (``MEMORA``): l2 bias, KL retention
(memory columns on the simplex scaled by ``c``). The paper's models use a 2-layer MLP memory; these
blocks use the matrix memory (``W in R^{K x V}`` per head).

Decoding: :class:`MirasCache` holds the conv windows, the memory at the last chunk boundary and
the unfinished chunk's ``k, v`` and gates. With ``mode="chunked"`` each new token is appended to
the chunk and the chunk is re-evaluated from its start memory (the chunked form's gradients are
taken there), so any split into calls reproduces the forward pass; the memory advances when the
chunk is full. With ``mode="recurrent"`` the cache holds the memory after the last token.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.miras import PRESETS, miras, reset_memory
from memjax.nn.associative import _AssociativeBlock, conv_windows
from memjax.nn.layers import Linear, param
from memjax.nn.registry import register_block
from memjax.nn.validate import check_no_segments, check_positive, check_range


class MirasCache(NamedTuple):
    """Decoding cache of a Miras block.

    ``conv``: short-conv windows (or None). ``memory``: ``[B, H, K, V]`` float32 state at the last
    chunk boundary (``"chunked"``) or after the last token (``"recurrent"``). ``k [B, C, H, K]``,
    ``v [B, C, H, V]``, ``eta``, ``g``, ``delta [B, C, H]``: the unfinished chunk (the first
    ``count`` slots). ``count``: int32 scalar in ``[0, C)``.
    """

    conv: tuple | None
    memory: jax.Array
    k: jax.Array
    v: jax.Array
    eta: jax.Array
    g: jax.Array
    delta: jax.Array
    count: jax.Array


class _MirasBlock(_AssociativeBlock):
    """Shared body of the three blocks (options as :class:`memjax.nn.associative._AssociativeBlock`
    minus the kernel / sequence-parallel ones, plus ``lr``: the largest inner learning rate)."""

    uses_beta = True  # the sigmoid gate is the inner learning rate eta / lr
    uses_decay = True
    l2_qk = True
    preset_name = ""
    uses_delta = False

    def _setup(self, d_model, *, num_heads, head_dim, chunk_size, conv_width, expand_v, output_gate, mode, lr,
               norm_eps, dtype, rngs, **spec_fields):
        name = type(self).__name__
        check_positive(name, lr=lr)
        self.lr = float(lr)
        self.spec = PRESETS[self.preset_name]._replace(**spec_fields)
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size,
                         conv_width=conv_width, expand_v=expand_v, output_gate=output_gate, mode=mode,
                         norm_eps=norm_eps, dtype=dtype, rngs=rngs)
        if self.uses_delta:
            self.wd = Linear(d_model, self.h, ("embed", "heads"), rngs=rngs, dtype=self.dtype)
            init = nnx.initializers.constant(self.delta_bias_init)
            self.d_bias = param(rngs, init, (self.h,), ("heads",))
        else:
            self.wd = self.d_bias = None

    def _all_gates(self, x):
        beta, g = self._gates(x)
        eta = self.lr * beta
        delta = None
        if self.uses_delta:
            delta = jax.nn.softplus(self.wd(x).astype(jnp.float32) + self.d_bias[...])
        return eta, g, delta

    def _run(self, q, k, v, eta, g, delta, *, initial_state=None, segment_ids=None, mode=None):
        return miras(q, k, v, self.spec, eta=eta, g=g, delta=delta, initial_state=initial_state,
                     segment_ids=segment_ids, mode=mode or self.mode, chunk_size=self.chunk_size)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: MirasCache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache (any ``T >= 1``)."""
        if cache is None:
            q, k, v, _ = self._project(x, segment_ids)
            eta, g, delta = self._all_gates(x)
            o, _ = self._run(q, k, v, eta, g, delta, segment_ids=segment_ids)
            return self._output(o, x)
        check_no_segments(type(self).__name__, segment_ids)
        q, k, v, conv = self._project(x, windows=cache.conv)
        eta, g, delta = self._all_gates(x)
        if delta is None:
            delta = jnp.zeros_like(eta)
        if self.mode == "recurrent":
            o, mem = self._run(q, k, v, eta, g, None if not self.uses_delta else delta,
                               initial_state=cache.memory, mode="recurrent")
            new = cache._replace(conv=conv, memory=mem.astype(jnp.float32))
        else:
            o, new = self._decode_chunked(q, k, v, eta, g, delta, cache)
            new = new._replace(conv=conv)
        return self._output(o.astype(x.dtype), x), new

    def _decode_chunked(self, q, k, v, eta, g, delta, cache):
        """Token by token: write the token into the chunk buffer, evaluate the chunk from its start
        memory (causal, so slots after ``count`` do not matter), advance when it is full."""
        c = self.chunk_size
        f32 = lambda x: x.astype(jnp.float32)

        def one(carry, inp):
            mem, kb, vb, eb, gb, db, n = carry
            qt, kt, vt, et, gt, dt = inp
            put = lambda buf, val: jax.lax.dynamic_update_index_in_dim(buf, f32(val), n, axis=1)
            kb, vb, eb, gb, db = put(kb, kt), put(vb, vt), put(eb, et), put(gb, gt), put(db, dt)
            qw = put(jnp.zeros_like(kb), qt)
            o, mem_end = miras(qw, kb, vb, self.spec, eta=eb, g=gb, delta=db if self.uses_delta else None,
                               initial_state=mem, mode="chunked", chunk_size=c)
            ot = jax.lax.dynamic_index_in_dim(o, n, axis=1, keepdims=False)
            full = n == c - 1
            mem = jnp.where(full, mem_end, mem)
            return (mem, kb, vb, eb, gb, db, jnp.where(full, 0, n + 1).astype(jnp.int32)), ot

        tm = lambda x: jnp.swapaxes(x, 0, 1)
        carry = (cache.memory, cache.k, cache.v, cache.eta, cache.g, cache.delta, cache.count)
        carry, o = jax.lax.scan(one, carry, tuple(map(tm, (q, k, v, eta, g, delta))))
        mem, kb, vb, eb, gb, db, n = carry
        return tm(o), MirasCache(None, mem, kb, vb, eb, gb, db, n)

    def init_cache(self, batch_size: int, max_length: int) -> MirasCache:
        """Conv windows, the reset memory and an empty chunk (``max_length`` is not needed)."""
        b, c, h = batch_size, self.chunk_size, self.h
        z = jnp.zeros((b, c, h), jnp.float32)
        return MirasCache(conv_windows(self.convs, b, self.dtype),
                          reset_memory(self.spec, (b, h, self.dk, self.dv), jnp.float32),
                          jnp.zeros((b, c, h, self.dk), jnp.float32), jnp.zeros((b, c, h, self.dv), jnp.float32),
                          z, z, z, jnp.zeros((), jnp.int32))


@register_block("moneta", aliases=("MON",))
class Moneta(_MirasBlock):
    """Moneta: l_p attentional bias with l_q retention,
    ``A_t = alpha_t A_{t-1} - eta_t p (sign(e) |e|^(p-1)) k_t^T``, ``W_t = A_t / ||A_t||_q^(q-2)``.

    Options: the common ones, ``lr``, ``p`` (``>= 1``), ``q`` (``>= 2``), ``eps`` (norm floor).
    """

    preset_name = "moneta"

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 16,
                 conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True, mode: str = "chunked",
                 lr: float = 0.5, p: float = 3.0, q: float = 4.0, eps: float = 1.0, norm_eps: float = 1e-6,
                 dtype=jnp.float32, rngs: nnx.Rngs):
        check_range(type(self).__name__, "p", p, 1.0, float("inf"))
        check_range(type(self).__name__, "q", q, 2.0, float("inf"))
        check_positive(type(self).__name__, eps=eps)
        self._setup(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, conv_width=conv_width,
                    expand_v=expand_v, output_gate=output_gate, mode=mode, lr=lr, norm_eps=norm_eps, dtype=dtype,
                    rngs=rngs, p=float(p), q=float(q), eps=float(eps))


@register_block("yaad", aliases=("YAAD",))
class Yaad(_MirasBlock):
    """Yaad: Huber attentional bias with a data-dependent threshold ``delta_t`` and l2 retention,
    ``W_t = alpha_t W_{t-1} - eta_t k_t u_t^T``, ``u = e`` if ``||e|| <= delta_t`` else
    ``delta_t sign(e)``.

    Options: the common ones, ``lr`` and ``delta_bias_init``: the initial bias of the threshold,
    ``delta_t = softplus(x W_d + b_d)`` (default 0: ``delta ~ 0.69``). Outside the threshold the
    write ``delta_t sign(e)`` has no gradient with respect to ``k`` and ``v`` (only ``delta_t``
    gets one), so a threshold far below the typical ``||e||`` (about ``||v||``) starts training in
    a regime where the write projections learn nothing from the memory; a larger bias (e.g. 6)
    starts in the l2 branch.
    """

    preset_name = "yaad"
    uses_delta = True

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 16,
                 conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True, mode: str = "chunked",
                 lr: float = 1.0, delta_bias_init: float = 0.0, norm_eps: float = 1e-6, dtype=jnp.float32,
                 rngs: nnx.Rngs):
        self.delta_bias_init = float(delta_bias_init)
        self._setup(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, conv_width=conv_width,
                    expand_v=expand_v, output_gate=output_gate, mode=mode, lr=lr, norm_eps=norm_eps, dtype=dtype,
                    rngs=rngs)


@register_block("memora", aliases=("MEMORA",))
class Memora(_MirasBlock):
    """Memora: l2 attentional bias with KL retention,
    ``W_t = c Softmax_K(alpha_t log W_{t-1} - eta_t k_t e_t^T)`` (columns on the ``c``-simplex).

    Options: the common ones, ``lr`` and ``c`` (simplex scale).
    """

    preset_name = "memora"

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 16,
                 conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True, mode: str = "chunked",
                 lr: float = 1.0, c: float = 1.0, norm_eps: float = 1e-6, dtype=jnp.float32, rngs: nnx.Rngs):
        check_positive(type(self).__name__, c=c)
        self._setup(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size, conv_width=conv_width,
                    expand_v=expand_v, output_gate=output_gate, mode=mode, lr=lr, norm_eps=norm_eps, dtype=dtype,
                    rngs=rngs, c=float(c))
