"""Log-linear blocks (Guo, Yang, Goel, Xing, Dao, Kim 2025, "Log-Linear Attention",
arXiv:2506.04761): Mamba-2 and Gated DeltaNet with their single state replaced by a Fenwick
stack of ``O(log T)`` states, each read with a data-dependent weight per head and level::

    lambda = softplus(x W_l + b_l)                          [B, T, H, L]   (L = num_levels)

``b_l`` starts at ``softplus^{-1}(1)``, so at initialisation every level has weight about 1 and the
block starts close to its linear-time parent (with ``lambda = 1`` exactly, log-linear Mamba-2 is
Mamba-2 and log-linear Gated DeltaNet is Gated DeltaNet).

``log_linear_mamba2`` (:class:`LogLinearMamba2`, alias ``LLM2``): :class:`memjax.nn.ssm_blocks.Mamba2`
(its projections, short convs, ``dt`` / ``A`` parameterisation, skip ``D``, gated RMSNorm) with the
SSD replaced by :func:`memjax.memory.log_linear.log_linear_attention` under Mamba-2's mapping
``q = C``, ``k = B``, ``v = dt x``, ``g = dt A``, ``scale = 1`` (``B``, ``C`` repeated over the heads
of their group), plus ``D x``.

``log_linear_gdn`` (:class:`LogLinearGatedDeltaNet`, alias ``LLD``):
:class:`memjax.nn.associative.GatedDeltaNet` (projections, short convs, L2-normalised q / k,
``beta``, decay, output norm and gate) with the memory
:func:`memjax.memory.log_linear_delta.log_linear_delta_rule`: every Fenwick level follows the
gated delta-rule transition. Both forms (chunked and recurrent) exist.

``num_levels`` (default 16) fixes the projection width: sequences of up to ``2^(num_levels - 1)``
positions per document are partitioned exactly in training (a longer one raises); decoding past
that puts every older bucket into the top level (:mod:`memjax.memory.log_linear`). A training call
uses only the ``ceil(log2 T) + 1`` levels its length needs (the others never hold a key there, so
the result is the same, and cheaper).

Decoding caches: :class:`LogLinearMamba2Cache` (the two conv windows and the level stack) and
:class:`memjax.nn.associative.AssociativeCache` whose ``memory`` is a
:class:`memjax.memory.log_linear.LogLinearState` (levels ``[B, H, L, K, V]`` float32 and position
``[B]`` int32). ``T > 1`` tokens with a cache run the chunked form, one token the recurrent one.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.memory.log_linear import LogLinearState, log_linear_attention, num_levels as levels_for
from memjax.memory.log_linear_delta import log_linear_delta_rule
from memjax.memory.reparam import reparameterize
from memjax.nn.associative import AssociativeCache, GatedDeltaNet, conv_windows, decoding_mode
from memjax.nn.layers import Linear, param
from memjax.nn.registry import register_block
from memjax.nn.ssm_blocks import Mamba2, decode_mode
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_no_segments

_SOFTPLUS_INV_1 = math.log(math.e - 1.0)  # softplus(b) = 1


class LevelScales(nnx.Module):
    """``lambda = softplus(x W_l + b_l)``: ``[B, T, d_model] -> [B, T, H, L]`` float32, the weight of
    each head's Fenwick level (the paper's parameterisation); ``b_l`` starts at ``softplus^{-1}(1)``."""

    def __init__(self, d_model: int, num_heads: int, num_levels: int, *, rngs: nnx.Rngs, dtype=jnp.float32):
        self.h, self.levels = num_heads, num_levels
        self.w = Linear(d_model, num_heads * num_levels, ("embed", "heads"), rngs=rngs, dtype=dtype)
        self.bias = param(rngs, nnx.initializers.constant(_SOFTPLUS_INV_1), (num_heads * num_levels,), ("heads",))

    def __call__(self, x: jax.Array, used: int | None = None) -> jax.Array:
        """The scales of the first ``used`` levels (all with None)."""
        b, t, _ = x.shape
        lam = jax.nn.softplus(self.w(x).astype(jnp.float32) + self.bias[...]).reshape(b, t, self.h, self.levels)
        return lam if used is None else lam[..., :used]


def _check_levels(name: str, num_levels) -> None:
    if isinstance(num_levels, bool) or not isinstance(num_levels, int) or num_levels < 1:
        raise ValueError(f"{name}: num_levels must be a positive int, got {num_levels!r}")


def _training_levels(name: str, num_levels: int, length: int) -> int:
    """The levels a training call of ``length`` tokens needs; raises if the block has fewer."""
    need = levels_for(length)
    if need > num_levels:
        raise ValueError(f"{name}: a sequence of T = {length} tokens needs num_levels >= ceil(log2 T) + 1 = {need}, "
                         f"got num_levels = {num_levels}")
    return need


def _empty_state(batch_size: int, heads: int, levels: int, dk: int, dv: int) -> LogLinearState:
    return LogLinearState(jnp.zeros((batch_size, heads, levels, dk, dv), jnp.float32),
                          jnp.zeros((batch_size,), jnp.int32))


def _f32_state(s: LogLinearState) -> LogLinearState:
    return LogLinearState(s.levels.astype(jnp.float32), s.position.astype(jnp.int32))


# ----------------------------------------------------------------------------- log-linear Mamba-2


class LogLinearMamba2Cache(NamedTuple):
    """Decoding cache of :class:`LogLinearMamba2`: the short-conv windows of :class:`Mamba2`
    (``conv_x: [B, W-1, d_inner]``, ``conv_bc: [B, W-1, 2 G N]``) and the level stack
    ``memory``: :class:`LogLinearState` (levels ``[B, H, L, N, P]`` float32, position ``[B]``)."""

    conv_x: jax.Array
    conv_bc: jax.Array
    memory: LogLinearState


@register_block("log_linear_mamba2", aliases=("LLM2",))
class LogLinearMamba2(Mamba2):
    """Log-linear Mamba-2: :class:`memjax.nn.ssm_blocks.Mamba2` with its SSD replaced by
    log-linear attention (module docstring).

    Args: those of :class:`Mamba2` (no ``kernel``: the level pass has no Pallas kernel; ``seq_axis``
    splits time over that mesh axis in training, each shard carrying ``L N`` extra value columns,
    :func:`memjax.memory.log_linear.sharded_levels`) and ``num_levels``, the Fenwick levels ``L`` of
    the level-scale projection (documents of up to ``2^(L-1)`` tokens in training).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, expand: int = 2, d_state: int = 64, n_groups: int = 1,
                 conv_width: int = 4, chunk_size: int = 64, num_levels: int = 16, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, a_init_min: float = 1.0, a_init_max: float = 16.0, reparam: str = "exp",
                 mode: str = "chunked", norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None,
                 rngs: nnx.Rngs):
        _check_levels("LogLinearMamba2", num_levels)
        check_choice("LogLinearMamba2", "mode", mode, ("chunked", "recurrent"))
        super().__init__(d_model, num_heads=num_heads, expand=expand, d_state=d_state, n_groups=n_groups,
                         conv_width=conv_width, chunk_size=chunk_size, dt_min=dt_min, dt_max=dt_max,
                         a_init_min=a_init_min, a_init_max=a_init_max, reparam=reparam, mode=mode, norm_eps=norm_eps,
                         dtype=dtype, rngs=rngs)
        self.num_levels, self.seq_axis = num_levels, seq_axis
        self.level_scales = LevelScales(d_model, self.h, num_levels, rngs=rngs, dtype=self.dtype)

    def _run(self, u, *, segment_ids=None, cache: LogLinearMamba2Cache | None = None, mode):
        b, t, _ = u.shape
        if cache is None:
            xs, bc = self.conv_x(self.wx(u), segment_ids), self.conv_bc(self.wbc(u), segment_ids)
            lam = self.level_scales(u, _training_levels("LogLinearMamba2", self.num_levels, t))
        else:
            xs, conv_x = self.conv_x(self.wx(u), cache=cache.conv_x)
            bc, conv_bc = self.conv_bc(self.wbc(u), cache=cache.conv_bc)
            lam = self.level_scales(u)
        xs = jax.nn.silu(xs).reshape(b, t, self.h, self.p)
        Bm, Cm = (jnp.repeat(z, self.h // self.g, axis=2)  # group -> heads
                  for z in jnp.split(jax.nn.silu(bc).reshape(b, t, 2 * self.g, self.n), 2, axis=2))
        dt = jax.nn.softplus(self.wdt(u).astype(jnp.float32) + self.dt_bias[...])  # [B, T, H]
        A = reparameterize(self.a_raw[...], self.reparam)
        # SSD as attention: q = C, k = B, v = dt x, log decay dt A (memjax.memory.contract)
        v = (xs * dt[..., None].astype(xs.dtype)).astype(xs.dtype)
        memory = lambda seq_axis, initial_state, **a: log_linear_attention(
            **a, scale=1.0, initial_state=initial_state, mode=mode, chunk_size=self.chunk_size, seq_axis=seq_axis)
        # training (no cache): time split over mesh axis seq_axis, if given
        y, s = over_sequence(memory, dict(q=Cm, k=Bm, v=v, g=dt * A, level_scales=lam, segment_ids=segment_ids),
                             dict(initial_state=None if cache is None else cache.memory), axis=self.seq_axis,
                             enabled=cache is None and mode == "chunked")
        y = y + xs * self.skip[...][:, None].astype(xs.dtype)
        y = y.reshape(b, t, self.d_inner) * jax.nn.silu(self.wz(u)).astype(y.dtype)
        out = self.wo(self.norm(y))
        if cache is None:
            return out
        return out, LogLinearMamba2Cache(conv_x, conv_bc, _f32_state(s))

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: LogLinearMamba2Cache | None = None):
        if cache is None:
            return self._run(x, segment_ids=segment_ids, mode=self.mode)
        check_no_segments("LogLinearMamba2", segment_ids)
        return self._run(x, cache=cache, mode=decode_mode(x, "chunked"))

    def init_cache(self, batch_size: int, max_length: int) -> LogLinearMamba2Cache:
        """Zero windows and an empty stack (any ``max_length``: past ``2^(L-1)`` the top level
        collects the older buckets)."""
        return LogLinearMamba2Cache(self.conv_x.init_cache(batch_size, self.dtype),
                                    self.conv_bc.init_cache(batch_size, self.dtype),
                                    _empty_state(batch_size, self.h, self.num_levels, self.n, self.p))


# ----------------------------------------------------------------------------- log-linear Gated DeltaNet


@register_block("log_linear_gdn", aliases=("LLD",))
class LogLinearGatedDeltaNet(GatedDeltaNet):
    """Log-linear Gated DeltaNet: :class:`memjax.nn.associative.GatedDeltaNet` whose memory is a
    Fenwick stack of gated delta-rule states (module docstring).

    Args: the common ones of :class:`memjax.nn.associative._AssociativeBlock` (no ``kernel``;
    ``seq_axis`` as :class:`LogLinearMamba2`'s) and ``num_levels`` (the Fenwick levels ``L`` of the
    level-scale projection).
    """

    def __init__(self, d_model: int, *, num_heads: int = 4, head_dim: int | None = None, chunk_size: int = 64,
                 conv_width: int = 4, expand_v: float = 1.0, output_gate: bool = True, mode: str = "chunked",
                 num_levels: int = 16, norm_eps: float = 1e-6, dtype=jnp.float32, allow_neg_eigval: bool = False,
                 seq_axis: str | None = None, rngs: nnx.Rngs):
        _check_levels("LogLinearGatedDeltaNet", num_levels)
        super().__init__(d_model, num_heads=num_heads, head_dim=head_dim, chunk_size=chunk_size,
                         conv_width=conv_width, expand_v=expand_v, output_gate=output_gate, mode=mode,
                         norm_eps=norm_eps, dtype=dtype, allow_neg_eigval=allow_neg_eigval, seq_axis=seq_axis,
                         rngs=rngs)
        self.num_levels = num_levels
        self.level_scales = LevelScales(d_model, self.h, num_levels, rngs=rngs, dtype=self.dtype)

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: AssociativeCache | None = None):
        """``x: [B, T, d_model]`` -> ``y``, or ``(y, cache)`` with a cache (any ``T >= 1``)."""
        if cache is None:
            q, k, v, _ = self._project(x, segment_ids)
            beta, g = self._gates(x)
            lam = self.level_scales(x, _training_levels("LogLinearGatedDeltaNet", self.num_levels, x.shape[1]))
            memory = lambda seq_axis, **a: log_linear_delta_rule(**a, mode=self.mode, chunk_size=self.chunk_size,
                                                                 seq_axis=seq_axis)
            # (time split over mesh axis seq_axis, if given)
            o, _ = over_sequence(memory, dict(q=q, k=k, v=v, beta=beta, level_scales=lam, g=g,
                                              segment_ids=segment_ids), {},
                                 axis=self.seq_axis, enabled=self.mode == "chunked")
            return self._output(o, x)
        check_no_segments("LogLinearGatedDeltaNet", segment_ids)
        q, k, v, conv = self._project(x, windows=cache.conv)
        beta, g = self._gates(x)
        o, mem = log_linear_delta_rule(q, k, v, beta, self.level_scales(x), g=g, initial_state=cache.memory,
                                       mode=decoding_mode(x), chunk_size=self.chunk_size)
        return self._output(o, x), AssociativeCache(conv, _f32_state(mem))

    def init_cache(self, batch_size: int, max_length: int) -> AssociativeCache:
        """Zero conv windows and an empty level stack ``[B, H, L, K, V]`` at position 0."""
        return AssociativeCache(conv_windows(self.convs, batch_size, self.dtype),
                                _empty_state(batch_size, self.h, self.num_levels, self.dk, self.dv))
