"""Mamba-3 block (Lahoti et al., "Mamba-3: Improved Sequence Modeling using State Space Principles",
ICLR 2026, arXiv:2603.15569), alias ``M3``, on :func:`memjax.memory.mamba3.mamba3`.

Per token (``d_inner = expand * d_model`` split into ``H = num_heads`` heads of ``P`` channels;
``N = d_state``; ``R = mimo_rank``; ``G = n_groups``)::

    z, x = u W_z, u W_x                                         ([H, P] each)
    B, C = RMSNorm(u W_B), RMSNorm(u W_C)                       ([R, G, N]: normalised over N, the
           (+ b_B, + b_C per head and rank, init 1)              "QK-norm" of the paper, then biases)
    dt = softplus(u W_dt + dt_bias),  A = -max(softplus(u W_A), a_floor)     (per head, data dependent)
    lam = sigmoid(u W_lam)                                      (trapezoid weight, per head)
    theta = pi tanh(u W_theta)                                  (M = rope_fraction * N / 2 angles,
                                                                  shared by the heads)
    X_r = x * w_x[r]                                            (MIMO up-projection; R = 1: X = x)
    Y = mamba3(X, dt, A, B, C, lam, theta, D)                   ([H, R, P])
    out = (sum_r w_o[r] * Y_r * SiLU(z * w_z[r])) W_out         (R = 1: (Y * SiLU(z)) W_out)

What this follows: the paper's three changes (trapezoid, rotations, MIMO) and its architectural
changes as the authors' reference module (``state-spaces/mamba``, ``mamba_ssm/modules/mamba3.py``)
makes them: **no short convolution** (the trapezoid's two-tap write replaces it), RMSNorm on ``B``
and ``C`` followed by learned per-head biases initialised to 1, a data-dependent ``A`` with a floor,
``theta`` from ``pi tanh`` of a projection shared by the heads and rotating the first
``rope_fraction`` of the state dimensions, MIMO up/down projections as element-wise per-rank weights
(``w_x = w_o = 1/R``, ``w_z = 1`` at init), and a SiLU(z) output gate without the post-gate RMSNorm
(the reference's default, ``is_outproj_norm=False``). Departures: the rotation pairs are adjacent
state dimensions ``(2m, 2m+1)`` (a fixed permutation of ``B``/``C``'s learned coordinates, so the same
model class); ``D`` skips each rank's ``X_r`` (a scalar per head).

Decoding cache: :class:`Mamba3Cache`, the memory function's state (no convolution windows): the
SSM state ``[B, H, P, N]``, the last token's rotated ``B`` ``[B, H, R, N]`` and ``X`` ``[B, H, R, P]``
(the trapezoid's pending write) and the cumulative angles ``[B, H, M]``, all float32.
``T > 1`` tokens with a cache run the chunked form from the cached state, ``T = 1`` the recurrent form.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.chunk_pass import IMPLS as CHUNK_IMPLS
from memjax.memory.mamba3 import MODES, Mamba3State, mamba3
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, param
from memjax.nn.registry import register_block
from memjax.nn.ssm_blocks import decode_mode, dt_bias_init
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_no_segments, check_positive, check_range


class Mamba3Cache(NamedTuple):
    """Decoding cache of :class:`Mamba3` (float32): ``ssm [B, H, P, N]``, ``k [B, H, R, N]``,
    ``x [B, H, R, P]``, ``angle [B, H, M]`` (the fields of :class:`memjax.memory.mamba3.Mamba3State`)."""

    ssm: jax.Array
    k: jax.Array
    x: jax.Array
    angle: jax.Array


@register_block("mamba3", aliases=("M3",))
class Mamba3(Block):
    """Mamba-3 block: projections, B/C norm and biases, trapezoidal rotating SSM, gated output.

    ``[B, T, d_model] -> [B, T, d_model]`` (equations in the module docstring).

    Args:
      d_model: model width; ``num_heads`` heads of ``P = expand * d_model / num_heads`` channels.
      num_heads, expand: as in :class:`memjax.nn.ssm_blocks.Mamba2`.
      d_state: ``N``, state size per channel (even when ``rope_fraction > 0``).
      n_groups: ``G`` groups of ``B, C`` projections before the per-head biases.
      mimo_rank: ``R``; 1 is SISO.
      rope_fraction: fraction of the state dimensions that rotate (``0.5`` or ``1.0`` in the
        paper; ``0``: a real state).
      chunk_size: tokens per chunk of the chunked form (``64 / R`` keeps the chunk pass's rows at 64).
      dt_min, dt_max: ``softplus(dt_bias)`` starts log-uniform in ``[dt_min, dt_max]``. A token
        turns the state by ``dt * theta`` with ``|theta| <= pi``, so from the default start a turn by
        ``pi`` (what parity needs) takes ``dt`` grown ten-fold or more: one layer did not learn parity
        in 1500 steps from ``[1e-3, 0.1]`` and did from ``[0.5, 2]`` (README, state tracking).
      a_floor: ``A <= -a_floor`` (a minimum decay rate).
      mode: training form, ``"chunked"`` or ``"recurrent"``.
      kernel: chunk-to-chunk pass, ``"auto"``, ``"xla"`` or ``"pallas"``.
      norm_eps: of the B/C RMSNorms.
      dtype: compute dtype of the projections and the SSM's matmul operands.
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism;
        :func:`memjax.memory.mamba3.mamba3`'s ``seq_axis``).
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, expand: int = 2, d_state: int = 64, n_groups: int = 1,
                 mimo_rank: int = 1, rope_fraction: float = 0.5, chunk_size: int = 64, dt_min: float = 1e-3,
                 dt_max: float = 1e-1, a_floor: float = 1e-4, mode: str = "chunked", kernel: str = "auto",
                 norm_eps: float = 1e-5, dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        check_positive("Mamba3", d_model=d_model, num_heads=num_heads, expand=expand, d_state=d_state,
                       n_groups=n_groups, chunk_size=chunk_size, dt_min=dt_min, dt_max=dt_max, norm_eps=norm_eps)
        if isinstance(mimo_rank, bool) or not isinstance(mimo_rank, int) or mimo_rank < 1:
            raise ValueError(f"Mamba3: mimo_rank must be a positive int, got {mimo_rank!r}")
        if num_heads % n_groups:
            raise ValueError(f"Mamba3: n_groups ({n_groups}) must divide num_heads ({num_heads})")
        if (expand * d_model) % num_heads:
            raise ValueError(f"Mamba3: expand: d_inner = {expand * d_model} must be divisible by num_heads "
                             f"({num_heads})")
        if dt_min > dt_max:
            raise ValueError(f"Mamba3: dt_min ({dt_min}) exceeds dt_max ({dt_max})")
        check_range("Mamba3", "rope_fraction", rope_fraction, 0.0, 1.0)
        check_range("Mamba3", "a_floor", a_floor, 0.0, math.inf, high_open=True)
        check_choice("Mamba3", "mode", mode, MODES)
        check_choice("Mamba3", "kernel", kernel, CHUNK_IMPLS)
        self.mode, self.chunk_size, self.kernel, self.a_floor = mode, chunk_size, kernel, a_floor
        self.seq_axis = seq_axis
        d = d_model
        self.h, self.r, self.g, self.n = num_heads, mimo_rank, n_groups, d_state
        self.d_inner = expand * d
        self.p = self.d_inner // self.h
        self.m = int(d_state * rope_fraction) // 2  # rotated pairs (2m, 2m+1), m < M
        dt = jnp.dtype(dtype)
        self.dtype = dt
        bc = self.r * self.g * self.n
        self.wz = Linear(d, self.d_inner, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wx = Linear(d, self.d_inner, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wbc = Linear(d, 2 * bc, ("embed", "state"), rngs=rngs, dtype=dt)
        self.wgates = Linear(d, 3 * self.h, ("embed", "heads"), rngs=rngs, dtype=dt)  # dt, A, lam
        self.wtheta = Linear(d, self.m, ("embed", "state"), rngs=rngs, dtype=dt) if self.m else None
        self.b_norm = RMSNorm(self.n, rngs=rngs, eps=norm_eps, axes=("state",))
        self.c_norm = RMSNorm(self.n, rngs=rngs, eps=norm_eps, axes=("state",))
        shape_hrn, axes_hrn = (self.h, self.r, self.n), ("heads", None, "state")
        self.b_bias = param(rngs, nnx.initializers.ones, shape_hrn, axes_hrn)
        self.c_bias = param(rngs, nnx.initializers.ones, shape_hrn, axes_hrn)
        self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (self.h,), ("heads",))
        self.skip = param(rngs, nnx.initializers.ones, (self.h,), ("heads",))
        if self.r > 1:
            const = lambda v: (lambda k, s, dt_: jnp.full(s, v, dt_))
            shape_hrp, axes_hrp = (self.h, self.r, self.p), ("heads", None, None)
            self.mimo_x = param(rngs, const(1.0 / self.r), shape_hrp, axes_hrp)
            self.mimo_z = param(rngs, const(1.0), shape_hrp, axes_hrp)
            self.mimo_o = param(rngs, const(1.0 / self.r), shape_hrp, axes_hrp)
        self.wo = Linear(self.d_inner, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _inputs(self, u):
        """The SSM's inputs from ``u [B, T, d_model]``."""
        b, t, _ = u.shape
        h, r, n = self.h, self.r, self.n
        x = self.wx(u).reshape(b, t, h, self.p)
        Bm, Cm = jnp.split(self.wbc(u).reshape(b, t, 2 * r, self.g, n), 2, axis=2)  # [B, T, R, G, N]
        per_head = lambda v, norm, bias: (jnp.repeat(jnp.swapaxes(norm(v), 2, 3), h // self.g, axis=2)
                                          + bias[...].astype(v.dtype))  # [B, T, H, R, N]
        Bm, Cm = per_head(Bm, self.b_norm, self.b_bias), per_head(Cm, self.c_norm, self.c_bias)
        dd_dt, dd_a, trap = jnp.split(self.wgates(u).astype(jnp.float32), 3, axis=-1)
        dt = jax.nn.softplus(dd_dt + self.dt_bias[...])
        A = jnp.minimum(-jax.nn.softplus(dd_a), -self.a_floor)
        lam = jax.nn.sigmoid(trap)
        theta = None
        if self.m:
            theta = jnp.broadcast_to(math.pi * jnp.tanh(self.wtheta(u).astype(jnp.float32))[:, :, None],
                                     (b, t, h, self.m))
        if r > 1:
            x = x[:, :, :, None] * self.mimo_x[...].astype(x.dtype)  # [B, T, H, R, P]
        else:
            Bm, Cm = Bm[:, :, :, 0], Cm[:, :, :, 0]
        return x, dt, A, Bm, Cm, lam, theta

    def _run(self, u, *, segment_ids=None, cache: Mamba3Cache | None = None, mode):
        b, t, _ = u.shape
        x, dt, A, Bm, Cm, lam, theta = self._inputs(u)
        state = None if cache is None else Mamba3State(*cache)
        ssm = lambda seq_axis, D, initial_state, **a: mamba3(**a, D=D, initial_state=initial_state, mode=mode,
                                                             chunk_size=self.chunk_size, impl=self.kernel,
                                                             seq_axis=seq_axis)
        # training (no cache): time split over mesh axis seq_axis, if given
        y, s = over_sequence(ssm, dict(x=x, dt=dt, A=A, B=Bm, C=Cm, lam=lam, theta=theta, segment_ids=segment_ids),
                             dict(D=self.skip[...], initial_state=state), axis=self.seq_axis,
                             enabled=cache is None and mode == "chunked")
        z = self.wz(u).reshape(b, t, self.h, self.p)
        if self.r > 1:  # per-rank gates, then the down-projection over ranks
            gate = jax.nn.silu(z[:, :, :, None] * self.mimo_z[...].astype(z.dtype))
            y = jnp.sum(y * gate.astype(y.dtype) * self.mimo_o[...].astype(y.dtype), axis=3)
        else:
            y = y * jax.nn.silu(z).astype(y.dtype)
        out = self.wo(y.reshape(b, t, self.d_inner))
        if cache is None:
            return out
        return out, Mamba3Cache(*(v.astype(jnp.float32) for v in s))

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: Mamba3Cache | None = None):
        if cache is None:
            return self._run(x, segment_ids=segment_ids, mode=self.mode)
        check_no_segments("Mamba3", segment_ids)
        return self._run(x, cache=cache, mode=decode_mode(x, "chunked"))

    def init_cache(self, batch_size: int, max_length: int) -> Mamba3Cache:
        return Mamba3Cache(*Mamba3State.zeros(batch_size, self.h, self.p, self.n, rank=self.r, angles=self.m,
                                              dtype=jnp.float32))
