"""State-space blocks: S4D (diagonal, time invariant) and Mamba-2 (selective, SSD).

``s4d`` (:class:`S4D`, alias ``S``; Gu et al. 2022): each of the ``d_model`` channels is its own
diagonal SSM with ``d_state`` complex modes (:func:`memjax.memory.ssm.diagonal_ssm`), then GELU and
a gated linear unit::

    u = diagonal_ssm(x; A, B, C, dt) + D x                  A = f(w_re) + i A_im  (f: reparam)
    y = GLU(GELU(u) W_out)                                  GLU(a, b) = a * sigmoid(b)

``A`` starts at S4D-LegS (``init="legs"``), S4D-Lin or S4D-Inv (:mod:`memjax.memory.hippo`);
``Re(A) = f(w_re)`` with ``f`` from :mod:`memjax.memory.reparam` (``"exp"`` by default: always
stable). Training uses the FFT convolution; with ``segment_ids`` (packed documents) the chunked
form (masked Toeplitz matmuls per chunk), since a reset breaks time invariance. Decoding cache:
:class:`S4DCache` (``ssm: [B, d_model, d_state]`` complex64).

``mamba2`` (:class:`Mamba2`, alias ``M2``; Dao & Gu 2024)::

    z, x, BC, dt_raw = x W_z, x W_x, x W_bc, x W_dt            (d_inner = expand * d_model)
    x, B, C = SiLU(ShortConv(x)), SiLU(ShortConv(BC)) split   (causal depthwise, width conv_width)
    dt = softplus(dt_raw + dt_bias),  A = -exp(A_log)           (A: the "exp" reparam, or another)
    y = selective_scan(x, dt, A, B, C, D)                      (heads H = num_heads, G groups)
    out = RMSNorm(y * SiLU(z)) W_out                           (gated RMSNorm, Mamba-2's default)

Decoding cache: :class:`Mamba2Cache` (the two short-conv windows and ``ssm: [B, H, P, N]`` float32).

Both blocks decode with ``y, cache = block(x, cache=cache)``: ``T > 1`` tokens run the chunked
(or convolution) form from the cached state, ``T = 1`` the recurrent form.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.kernels.chunk_pass import IMPLS as CHUNK_IMPLS
from memjax.memory import hippo
from memjax.memory.reparam import REPARAMS, inverse, reparameterize
from memjax.memory.ssm import diagonal_ssm, selective_scan
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence
from memjax.nn.validate import check_choice, check_no_segments, check_positive


# ----------------------------------------------------------------------------- shared helpers


def log_uniform_init(lo: float, hi: float):
    """Initialiser: ``exp(U(log lo, log hi))`` (Mamba-style step sizes)."""
    def init(key, shape, dtype):
        return jnp.exp(jax.random.uniform(key, shape, dtype, math.log(lo), math.log(hi)))
    return init


def dt_bias_init(dt_min: float, dt_max: float, floor: float = 1e-4):
    """``dt_bias`` with ``softplus(dt_bias) = dt ~ logU(dt_min, dt_max)`` (Mamba-2's initialiser)."""
    def init(key, shape, dtype):
        dt = jnp.maximum(log_uniform_init(dt_min, dt_max)(key, shape, dtype), floor)
        return dt + jnp.log(-jnp.expm1(-dt))  # inverse softplus
    return init


def eigen_init(name: str, lo: float, hi: float, **kw):
    """Raw weights ``w`` with ``reparameterize(w, name) = -U(lo, hi)`` (decay rates ``|A|``)."""
    def init(key, shape, dtype):
        return inverse(-jax.random.uniform(key, shape, dtype, lo, hi), name, **kw).astype(dtype)
    return init


def decode_mode(x: jax.Array, parallel: str) -> str:
    """The form a call with a decoding cache runs: ``"recurrent"`` for one token (static
    ``x.shape[1] == 1``), else the block's parallel form ``parallel``."""
    return "recurrent" if x.shape[1] == 1 else parallel


# ----------------------------------------------------------------------------- S4D


class S4DCache(NamedTuple):
    """Decoding cache of :class:`S4D`: the diagonal SSM state ``ssm: [B, d_model, d_state]`` complex64."""

    ssm: jax.Array


@register_block("s4d", aliases=("S",))
class S4D(Block):
    """S4D layer: per-channel complex diagonal SSM, GELU, GLU output projection; ``[B, T, d_model] -> [B, T, d_model]``.

    Args:
      d_model: model width (= the number of SSM channels).
      d_state: complex modes per channel (a real state of ``2 * d_state``).
      init: ``"legs"``, ``"lin"`` or ``"inv"`` (:mod:`memjax.memory.hippo` S4D initialisers of ``A``).
      reparam: ``Re(A) = f(w)``: ``"exp"``, ``"softplus"``, ``"best"`` or ``"direct"`` (:mod:`memjax.memory.reparam`).
      dt_min, dt_max: step sizes start log-uniform in ``[dt_min, dt_max]``.
      mode: training form, ``"conv"``, ``"chunked"``, ``"scan"`` or ``"recurrent"`` (with
        ``segment_ids``, ``"conv"`` runs ``"chunked"``).
      chunk_size: ``C`` of the chunked form; with ``segment_ids`` its masked ``[C, C]`` matrices
        cost ``C`` per token and channel (16 measured fastest for packed training, CPU).
      dtype: compute dtype of the output projection.
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    stateful = True

    def __init__(self, d_model: int, *, d_state: int = 32, init: str = "legs", reparam: str = "exp",
                 dt_min: float = 1e-3, dt_max: float = 1e-1, mode: str = "conv", chunk_size: int = 16,
                 dtype=jnp.float32, seq_axis: str | None = None, rngs: nnx.Rngs):
        check_positive("S4D", d_model=d_model, d_state=d_state, dt_min=dt_min, dt_max=dt_max, chunk_size=chunk_size)
        check_choice("S4D", "init", init, sorted(hippo.S4D_INITS))
        check_choice("S4D", "reparam", reparam, REPARAMS)
        check_choice("S4D", "mode", mode, ("conv", "chunked", "scan", "recurrent"))
        if dt_min > dt_max:
            raise ValueError(f"S4D: dt_min ({dt_min}) exceeds dt_max ({dt_max})")
        self.reparam, self.mode, self.chunk_size, self.seq_axis = reparam, mode, chunk_size, seq_axis
        d, n = d_model, d_state
        self.d, self.n = d, n
        eig = hippo.S4D_INITS[init](n)  # [N] complex, Re = -1/2
        re = inverse(eig.real, reparam)
        axes = ("embed", "state")
        self.a_re = param(rngs, lambda k, s, dt: jnp.broadcast_to(jnp.asarray(re, dt), s), (d, n), axes)
        self.a_im = param(rngs, lambda k, s, dt: jnp.broadcast_to(jnp.asarray(eig.imag, dt), s), (d, n), axes)
        self.b_re = param(rngs, nnx.initializers.ones, (d, n), axes)
        self.b_im = param(rngs, nnx.initializers.zeros, (d, n), axes)
        self.c_re = param(rngs, nnx.initializers.normal(0.5 ** 0.5), (d, n), axes)
        self.c_im = param(rngs, nnx.initializers.normal(0.5 ** 0.5), (d, n), axes)
        self.log_dt = param(rngs, lambda k, s, dt: jnp.log(log_uniform_init(dt_min, dt_max)(k, s, dt)),
                            (d,), ("embed",))
        self.skip = param(rngs, nnx.initializers.ones, (d,), ("embed",))
        self.wo = Linear(d, 2 * d, ("embed", "mlp"), rngs=rngs, dtype=jnp.dtype(dtype))

    def _ssm_params(self):
        A = reparameterize(self.a_re[...], self.reparam) + 1j * self.a_im[...]
        B = self.b_re[...] + 1j * self.b_im[...]
        C = self.c_re[...] + 1j * self.c_im[...]
        return A, B, C, jnp.exp(self.log_dt[...])

    def _run(self, x, *, segment_ids=None, initial_state=None, mode):
        A, B, C, dt = self._ssm_params()
        if segment_ids is not None and mode == "conv":
            mode = "chunked"  # a reset breaks time invariance: no single convolution
        params = dict(A=A, B=B, C=C, dt=dt, D=self.skip[...], initial_state=initial_state)
        ssm = lambda x, segment_ids, seq_axis, **p: diagonal_ssm(
            x, **p, segment_ids=segment_ids, mode="scan" if seq_axis else mode, chunk_size=self.chunk_size,
            seq_axis=seq_axis)
        # training with time split over seq_axis, if any: the scan form exchanges states
        u, s = over_sequence(ssm, dict(x=x, segment_ids=segment_ids), params, axis=self.seq_axis,
                             enabled=initial_state is None and mode != "recurrent")
        a, g = jnp.split(self.wo(jax.nn.gelu(u)), 2, axis=-1)
        return a * jax.nn.sigmoid(g), s

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: S4DCache | None = None):
        if cache is None:
            return self._run(x, segment_ids=segment_ids, mode=self.mode)[0]
        check_no_segments("S4D", segment_ids)
        parallel = "conv" if self.mode == "recurrent" else self.mode
        y, s = self._run(x, initial_state=cache.ssm, mode=decode_mode(x, parallel))
        return y, S4DCache(s.astype(cache.ssm.dtype))

    def init_cache(self, batch_size: int, max_length: int) -> S4DCache:
        return S4DCache(jnp.zeros((batch_size, self.d, self.n), jnp.complex64))


# ----------------------------------------------------------------------------- Mamba-2


class Mamba2Cache(NamedTuple):
    """Decoding cache of :class:`Mamba2`: the last ``conv_width - 1`` inputs of the two short
    convolutions (``conv_x: [B, W-1, d_inner]``, ``conv_bc: [B, W-1, 2 G N]``, compute dtype) and
    the SSM state ``ssm: [B, H, P, N]`` float32."""

    conv_x: jax.Array
    conv_bc: jax.Array
    ssm: jax.Array


@register_block("mamba2", aliases=("M2",))
class Mamba2(Block):
    """Mamba-2 block (SSD): in-projections, short conv, selective scan, gated RMSNorm, out-projection.

    ``[B, T, d_model] -> [B, T, d_model]`` (equations in the module docstring).

    Args:
      d_model: model width; ``num_heads`` SSM heads of ``P = expand * d_model / num_heads`` channels.
      expand: ``d_inner = expand * d_model``.
      d_state: ``N``, the state size per head channel.
      n_groups: ``G``: B and C shared by ``num_heads / G`` heads.
      conv_width: width of the causal depthwise short convolutions.
      chunk_size: ``C`` of the chunked (SSD) form.
      dt_min, dt_max: ``softplus(dt_bias)`` starts log-uniform in ``[dt_min, dt_max]``.
      a_init_min, a_init_max: ``A = -U(a_init_min, a_init_max)`` at init.
      reparam: ``A = f(A_raw)``; ``"exp"`` is Mamba's ``A = -exp(A_log)`` (:mod:`memjax.memory.reparam`).
      mode: training form, ``"chunked"`` or ``"recurrent"``.
      kernel: chunk-to-chunk state pass, ``"auto"``, ``"xla"`` or ``"pallas"`` (:mod:`memjax.kernels.chunk_pass`).
      norm_eps, dtype: of the gated RMSNorm / the compute dtype.
      seq_axis: mesh axis that time is split over in training (``None``: no sequence parallelism).
    """

    stateful = True

    def __init__(self, d_model: int, *, num_heads: int = 4, expand: int = 2, d_state: int = 64, n_groups: int = 1,
                 conv_width: int = 4, chunk_size: int = 64, dt_min: float = 1e-3, dt_max: float = 1e-1,
                 a_init_min: float = 1.0, a_init_max: float = 16.0, reparam: str = "exp", mode: str = "chunked",
                 kernel: str = "auto", norm_eps: float = 1e-6, dtype=jnp.float32, seq_axis: str | None = None,
                 rngs: nnx.Rngs):
        check_positive("Mamba2", d_model=d_model, num_heads=num_heads, expand=expand, d_state=d_state,
                       n_groups=n_groups, conv_width=conv_width, chunk_size=chunk_size, dt_min=dt_min,
                       dt_max=dt_max, a_init_min=a_init_min)
        if num_heads % n_groups:
            raise ValueError(f"Mamba2: n_groups ({n_groups}) must divide num_heads ({num_heads})")
        if (expand * d_model) % num_heads:
            raise ValueError(f"Mamba2: expand: d_inner = {expand * d_model} must be divisible by num_heads "
                             f"({num_heads})")
        if a_init_max < a_init_min:
            raise ValueError(f"Mamba2: a_init_max ({a_init_max}) must be >= a_init_min ({a_init_min})")
        check_choice("Mamba2", "kernel", kernel, CHUNK_IMPLS)
        check_choice("Mamba2", "reparam", reparam, REPARAMS)
        if reparam == "best" and a_init_max > 2.0:
            raise ValueError(f"Mamba2: a_init_max must be <= 2 with reparam 'best' (its range is [-1/b, 0) = "
                             f"[-2, 0)), got {a_init_max}")
        check_choice("Mamba2", "mode", mode, ("chunked", "recurrent"))
        self.reparam, self.mode, self.chunk_size, self.kernel = reparam, mode, chunk_size, kernel
        self.seq_axis = seq_axis
        d = d_model
        self.h = num_heads
        self.d_inner = expand * d
        self.p = self.d_inner // self.h
        self.g, self.n = n_groups, d_state
        dt = jnp.dtype(dtype)
        self.dtype = dt
        self.wz = Linear(d, self.d_inner, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wx = Linear(d, self.d_inner, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wbc = Linear(d, 2 * self.g * self.n, ("embed", "state"), rngs=rngs, dtype=dt)
        self.wdt = Linear(d, self.h, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.conv_x = ShortConv(self.d_inner, conv_width, rngs=rngs, axes=("heads",))
        self.conv_bc = ShortConv(2 * self.g * self.n, conv_width, rngs=rngs, axes=("state",))
        self.a_raw = param(rngs, eigen_init(reparam, a_init_min, a_init_max), (self.h,), ("heads",))
        self.dt_bias = param(rngs, dt_bias_init(dt_min, dt_max), (self.h,), ("heads",))
        self.skip = param(rngs, nnx.initializers.ones, (self.h,), ("heads",))
        self.norm = RMSNorm(self.d_inner, rngs=rngs, eps=norm_eps, axes=("heads",))
        self.wo = Linear(self.d_inner, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _run(self, u, *, segment_ids=None, cache: Mamba2Cache | None = None, mode):
        b, t, _ = u.shape
        if cache is None:
            xs, bc = self.conv_x(self.wx(u), segment_ids), self.conv_bc(self.wbc(u), segment_ids)
        else:
            xs, conv_x = self.conv_x(self.wx(u), cache=cache.conv_x)
            bc, conv_bc = self.conv_bc(self.wbc(u), cache=cache.conv_bc)
        xs = jax.nn.silu(xs).reshape(b, t, self.h, self.p)
        Bm, Cm = jnp.split(jax.nn.silu(bc).reshape(b, t, 2 * self.g, self.n), 2, axis=2)
        dt = jax.nn.softplus(self.wdt(u).astype(jnp.float32) + self.dt_bias[...])
        A = reparameterize(self.a_raw[...], self.reparam)
        scan = lambda x, dt, B, C, segment_ids, A, D, initial_state, seq_axis: selective_scan(
            x, dt, A, B, C, D=D, initial_state=initial_state, segment_ids=segment_ids, mode=mode,
            chunk_size=self.chunk_size, impl=self.kernel, seq_axis=seq_axis)
        time_args = dict(x=xs, dt=dt, B=Bm, C=Cm, segment_ids=segment_ids)
        other_args = dict(A=A, D=self.skip[...], initial_state=None if cache is None else cache.ssm)
        # training (no cache): time split over seq_axis, if any
        y, s = over_sequence(scan, time_args, other_args, axis=self.seq_axis,
                             enabled=mode == "chunked" and cache is None)
        y = y.reshape(b, t, self.d_inner) * jax.nn.silu(self.wz(u)).astype(y.dtype)
        out = self.wo(self.norm(y))
        if cache is None:
            return out
        return out, Mamba2Cache(conv_x, conv_bc, s.astype(jnp.float32))

    def __call__(self, x, *, segment_ids=None, tokens=None, cache: Mamba2Cache | None = None):
        if cache is None:
            return self._run(x, segment_ids=segment_ids, mode=self.mode)
        check_no_segments("Mamba2", segment_ids)
        return self._run(x, cache=cache, mode=decode_mode(x, "chunked"))

    def init_cache(self, batch_size: int, max_length: int) -> Mamba2Cache:
        return Mamba2Cache(self.conv_x.init_cache(batch_size, self.dtype),
                           self.conv_bc.init_cache(batch_size, self.dtype),
                           jnp.zeros((batch_size, self.h, self.p, self.n), jnp.float32))
