"""State-space blocks: S4D (diagonal, time invariant) and Mamba-2 (selective, SSD).

``s4d`` (alias ``S``; Gu et al. 2022): each of the ``d_model`` channels is its own diagonal SSM
with ``d_state`` complex modes (:func:`memjax.memory.ssm.diagonal_ssm`), then GELU and a gated
linear unit::

    u = diagonal_ssm(x; A, B, C, dt) + D x                  A = f(w_re) + i A_im  (f: reparam)
    y = GLU(GELU(u) W_out)                                  GLU(a, b) = a * sigmoid(b)

``A`` starts at S4D-LegS (``init="legs"``), S4D-Lin or S4D-Inv (:mod:`memjax.memory.hippo`);
``Re(A) = f(w_re)`` with ``f`` from :mod:`memjax.memory.reparam` (``"exp"`` by default: always
stable). Training uses the FFT convolution; with ``segment_ids`` (packed documents) the chunked
form (masked Toeplitz matmuls per chunk), since a reset breaks time invariance. Decoding state
``{"ssm": [B, D, N] complex64}``.

``mamba2`` (alias ``M2``; Dao & Gu 2024)::

    z, x, BC, dt_raw = x W_z, x W_x, x W_bc, x W_dt            (d_inner = expand * d_model)
    x, B, C = SiLU(ShortConv(x)), SiLU(ShortConv(BC)) split   (causal depthwise, width conv_width)
    dt = softplus(dt_raw + dt_bias),  A = -exp(A_log)           (A: the "exp" reparam, or another)
    y = selective_scan(x, dt, A, B, C, D)                      (heads H = model.num_heads, G groups)
    out = RMSNorm(y * SiLU(z)) W_out                           (gated RMSNorm, Mamba-2's default)

Decoding state ``{"conv": {"x": [B, W-1, d_inner], "bc": [B, W-1, 2 G N]}, "ssm": [B, H, P, N] float32}``.
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from memjax.config import ConfigError
from memjax.kernels.chunk_pass import IMPLS as CHUNK_IMPLS
from memjax.memory import hippo
from memjax.memory.reparam import REPARAMS, inverse, reparameterize
from memjax.memory.ssm import diagonal_ssm, selective_scan
from memjax.nn.block import Block
from memjax.nn.layers import Linear, RMSNorm, ShortConv, param
from memjax.nn.registry import register_block
from memjax.nn.sequence_parallel import over_sequence


# ----------------------------------------------------------------------------- shared helpers


def conv_with_state(conv: ShortConv, y: jax.Array, segment_ids=None, state=None):
    """``ShortConv`` over ``y [B, T, C]``; with ``state [B, W-1, C]`` (the previous inputs) it
    continues a stream and returns the new state too, else ``(out, None)``."""
    if state is None:
        return conv(y, segment_ids), None
    w1 = conv.width - 1
    full = jnp.concatenate([state.astype(y.dtype), y], axis=1)
    return conv(full)[:, w1:], full[:, full.shape[1] - w1:].astype(state.dtype)


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


def _check_positive(where, **values):
    for k, v in values.items():
        if v <= 0:
            raise ConfigError(f"config key '{where}.{k}' must be positive, got {v}")


# ----------------------------------------------------------------------------- S4D


@register_block("s4d", aliases=("S",))
class S4D(Block):
    """S4D layer: per-channel complex diagonal SSM, GELU, GLU output projection."""

    @dataclasses.dataclass
    class Options:
        d_state: int = 32  # complex modes per channel (a real state of 2 * d_state)
        init: str = "legs"  # "legs" | "lin" | "inv" (memjax.memory.hippo S4D initialisers)
        reparam: str = "exp"  # Re(A) = f(w): "exp" | "softplus" | "best" | "direct" (memjax.memory.reparam)
        dt_min: float = 1e-3
        dt_max: float = 1e-1
        mode: str = "conv"  # training form: "conv" | "chunked" | "scan" | "recurrent" (packed: conv -> chunked)
        # C for the chunked form; with segment_ids its masked [C, C] matrices cost C per token and
        # channel: 16 measured fastest for packed training (2-layer d=64, 64 x 64 tokens, CPU).
        chunk_size: int = 16

        def validate(self, m, where):
            _check_positive(where, d_state=self.d_state, dt_min=self.dt_min, dt_max=self.dt_max,
                            chunk_size=self.chunk_size)
            if self.init not in hippo.S4D_INITS:
                raise ConfigError(f"config key '{where}.init' must be one of {sorted(hippo.S4D_INITS)}, got {self.init!r}")
            if self.reparam not in REPARAMS:
                raise ConfigError(f"config key '{where}.reparam' must be one of {REPARAMS}, got {self.reparam!r}")
            if self.dt_min > self.dt_max:
                raise ConfigError(f"config key '{where}.dt_min' ({self.dt_min}) exceeds dt_max ({self.dt_max})")
            if self.mode not in ("conv", "chunked", "scan", "recurrent"):
                raise ConfigError(f"config key '{where}.mode' must be 'conv', 'chunked', 'scan' or 'recurrent', "
                                  f"got {self.mode!r}")

    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.opts = opts
        d, n = cfg.d_model, opts.d_state
        self.d, self.n = d, n
        eig = hippo.S4D_INITS[opts.init](n)  # [N] complex, Re = -1/2
        re = inverse(eig.real, opts.reparam)
        axes = ("embed", "state")
        self.a_re = param(rngs, lambda k, s, dt: jnp.broadcast_to(jnp.asarray(re, dt), s), (d, n), axes)
        self.a_im = param(rngs, lambda k, s, dt: jnp.broadcast_to(jnp.asarray(eig.imag, dt), s), (d, n), axes)
        self.b_re = param(rngs, nnx.initializers.ones, (d, n), axes)
        self.b_im = param(rngs, nnx.initializers.zeros, (d, n), axes)
        self.c_re = param(rngs, nnx.initializers.normal(0.5 ** 0.5), (d, n), axes)
        self.c_im = param(rngs, nnx.initializers.normal(0.5 ** 0.5), (d, n), axes)
        self.log_dt = param(rngs, lambda k, s, dt: jnp.log(log_uniform_init(opts.dt_min, opts.dt_max)(k, s, dt)),
                            (d,), ("embed",))
        self.skip = param(rngs, nnx.initializers.ones, (d,), ("embed",))
        self.wo = Linear(d, 2 * d, ("embed", "mlp"), rngs=rngs, dtype=jnp.dtype(cfg.compute_dtype))

    def _ssm_params(self):
        A = reparameterize(self.a_re[...], self.opts.reparam) + 1j * self.a_im[...]
        B = self.b_re[...] + 1j * self.b_im[...]
        C = self.c_re[...] + 1j * self.c_im[...]
        return A, B, C, jnp.exp(self.log_dt[...])

    def _run(self, x, *, segment_ids=None, initial_state=None, mode):
        A, B, C, dt = self._ssm_params()
        if segment_ids is not None and mode == "conv":
            mode = "chunked"  # a reset breaks time invariance: no single convolution
        params = dict(A=A, B=B, C=C, dt=dt, D=self.skip[...], initial_state=initial_state)
        ssm = lambda x, segment_ids, seq_axis, **p: diagonal_ssm(
            x, **p, segment_ids=segment_ids, mode="scan" if seq_axis else mode, chunk_size=self.opts.chunk_size,
            seq_axis=seq_axis)
        # training with time split over the mesh's seq axis, if any: the scan form exchanges states
        u, s = over_sequence(ssm, dict(x=x, segment_ids=segment_ids), params,
                             enabled=initial_state is None and mode != "recurrent")
        a, g = jnp.split(self.wo(jax.nn.gelu(u)), 2, axis=-1)
        return a * jax.nn.sigmoid(g), s

    def __call__(self, x, *, segment_ids=None, tokens=None):
        return self._run(x, segment_ids=segment_ids, mode=self.opts.mode)[0]

    def init_state(self, batch_size: int, max_len: int):
        return {"ssm": jnp.zeros((batch_size, self.d, self.n), jnp.complex64)}

    def prefill(self, x, state, *, tokens=None):
        mode = "conv" if self.opts.mode == "recurrent" else self.opts.mode
        y, s = self._run(x, initial_state=state["ssm"], mode=mode)
        return y, {"ssm": s.astype(state["ssm"].dtype)}

    def step(self, x, state, *, token=None):
        y, s = self._run(x[:, None], initial_state=state["ssm"], mode="recurrent")
        return y[:, 0], {"ssm": s.astype(state["ssm"].dtype)}


# ----------------------------------------------------------------------------- Mamba-2


@register_block("mamba2", aliases=("M2",))
class Mamba2(Block):
    """Mamba-2 block (SSD): in-projections, short conv, selective scan, gated RMSNorm, out-projection."""

    @dataclasses.dataclass
    class Options:
        expand: int = 2  # d_inner = expand * d_model
        d_state: int = 64  # N
        n_groups: int = 1  # G: B and C shared by num_heads / G heads
        conv_width: int = 4
        chunk_size: int = 64
        dt_min: float = 1e-3
        dt_max: float = 1e-1
        a_init_min: float = 1.0  # A = -U(a_init_min, a_init_max) at init
        a_init_max: float = 16.0
        reparam: str = "exp"  # A = f(A_raw); "exp" is Mamba's A = -exp(A_log)
        mode: str = "chunked"  # training form: "chunked" | "recurrent"
        kernel: str = "auto"  # chunk-to-chunk state pass: "auto", "xla" or "pallas" (memjax.kernels.chunk_pass)

        def validate(self, m, where):
            _check_positive(where, expand=self.expand, d_state=self.d_state, n_groups=self.n_groups,
                            conv_width=self.conv_width, chunk_size=self.chunk_size, dt_min=self.dt_min,
                            dt_max=self.dt_max, a_init_min=self.a_init_min)
            if m.num_heads % self.n_groups:
                raise ConfigError(f"config key '{where}.n_groups' ({self.n_groups}) must divide model.num_heads ({m.num_heads})")
            if (self.expand * m.d_model) % m.num_heads:
                raise ConfigError(f"config key '{where}.expand': d_inner = {self.expand * m.d_model} must be "
                                  f"divisible by model.num_heads ({m.num_heads})")
            if self.a_init_max < self.a_init_min:
                raise ConfigError(f"config key '{where}.a_init_max' must be >= a_init_min")
            if self.kernel not in CHUNK_IMPLS:
                raise ConfigError(f"config key '{where}.kernel' must be one of {CHUNK_IMPLS}, got {self.kernel!r}")
            if self.reparam not in REPARAMS:
                raise ConfigError(f"config key '{where}.reparam' must be one of {REPARAMS}, got {self.reparam!r}")
            if self.reparam == "best" and self.a_init_max > 2.0:
                raise ConfigError(f"config key '{where}.a_init_max' must be <= 2 with reparam 'best' "
                                  f"(its range is [-1/b, 0) = [-2, 0)), got {self.a_init_max}")
            if self.mode not in ("chunked", "recurrent"):
                raise ConfigError(f"config key '{where}.mode' must be 'chunked' or 'recurrent', got {self.mode!r}")

    stateful = True

    def __init__(self, cfg, opts, *, layer: int, shared: dict, rngs: nnx.Rngs):
        self.opts = opts
        d = cfg.d_model
        self.h = cfg.num_heads
        self.d_inner = opts.expand * d
        self.p = self.d_inner // self.h
        self.g, self.n = opts.n_groups, opts.d_state
        dt = jnp.dtype(cfg.compute_dtype)
        self.dtype = dt
        self.wz = Linear(d, self.d_inner, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wx = Linear(d, self.d_inner, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.wbc = Linear(d, 2 * self.g * self.n, ("embed", "state"), rngs=rngs, dtype=dt)
        self.wdt = Linear(d, self.h, ("embed", "heads"), rngs=rngs, dtype=dt)
        self.conv_x = ShortConv(self.d_inner, opts.conv_width, rngs=rngs, axes=("heads",))
        self.conv_bc = ShortConv(2 * self.g * self.n, opts.conv_width, rngs=rngs, axes=("state",))
        self.a_raw = param(rngs, eigen_init(opts.reparam, opts.a_init_min, opts.a_init_max), (self.h,), ("heads",))
        self.dt_bias = param(rngs, dt_bias_init(opts.dt_min, opts.dt_max), (self.h,), ("heads",))
        self.skip = param(rngs, nnx.initializers.ones, (self.h,), ("heads",))
        self.norm = RMSNorm(self.d_inner, rngs=rngs, eps=cfg.norm_eps, axes=("heads",))
        self.wo = Linear(self.d_inner, d, ("heads", "embed"), rngs=rngs, dtype=dt)

    def _run(self, u, *, segment_ids=None, state=None, mode):
        b, t, _ = u.shape
        cs = None if state is None else state["conv"]
        xs, cx = conv_with_state(self.conv_x, self.wx(u), segment_ids, None if cs is None else cs["x"])
        bc, cbc = conv_with_state(self.conv_bc, self.wbc(u), segment_ids, None if cs is None else cs["bc"])
        xs = jax.nn.silu(xs).reshape(b, t, self.h, self.p)
        Bm, Cm = jnp.split(jax.nn.silu(bc).reshape(b, t, 2 * self.g, self.n), 2, axis=2)
        dt = jax.nn.softplus(self.wdt(u).astype(jnp.float32) + self.dt_bias[...])
        A = reparameterize(self.a_raw[...], self.opts.reparam)
        scan = lambda x, dt, B, C, segment_ids, A, D, initial_state, seq_axis: selective_scan(
            x, dt, A, B, C, D=D, initial_state=initial_state, segment_ids=segment_ids, mode=mode,
            chunk_size=self.opts.chunk_size, impl=self.opts.kernel, seq_axis=seq_axis)
        time_args = dict(x=xs, dt=dt, B=Bm, C=Cm, segment_ids=segment_ids)
        other_args = dict(A=A, D=self.skip[...], initial_state=None if state is None else state["ssm"])
        # training (no decoding state): time split over the mesh's seq axis, if any
        y, s = over_sequence(scan, time_args, other_args, enabled=mode == "chunked" and state is None)
        y = y.reshape(b, t, self.d_inner) * jax.nn.silu(self.wz(u)).astype(y.dtype)
        out = self.wo(self.norm(y))
        return out, {"conv": {"x": cx, "bc": cbc}, "ssm": s.astype(jnp.float32)}

    def __call__(self, x, *, segment_ids=None, tokens=None):
        return self._run(x, segment_ids=segment_ids, mode=self.opts.mode)[0]

    def init_state(self, batch_size: int, max_len: int):
        w1 = self.opts.conv_width - 1
        return {"conv": {"x": jnp.zeros((batch_size, w1, self.d_inner), self.dtype),
                         "bc": jnp.zeros((batch_size, w1, 2 * self.g * self.n), self.dtype)},
                "ssm": jnp.zeros((batch_size, self.h, self.p, self.n), jnp.float32)}

    def prefill(self, x, state, *, tokens=None):
        return self._run(x, state=state, mode="chunked")

    def step(self, x, state, *, token=None):
        y, state = self._run(x[:, None], state=state, mode="recurrent")
        return y[:, 0], state
