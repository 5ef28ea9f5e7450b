"""Pallas (Triton lowering) kernels for the chunk-to-chunk state recurrence of the chunked
linear-attention family (see :mod:`memjax.kernels.chunk_pass` for the equations).

One program per (batch, head, block of ``bv`` value columns) walks the ``N`` chunks in order and
keeps the ``[K, bv]`` state in registers (float32; float64 for float64 inputs in interpret mode):
the sequential part that XLA runs as a ``lax.scan`` of a few small kernels per chunk becomes one
kernel with four ``[C or K] x [C or K] x bv`` matmuls per chunk. Value-column blocks are
independent (every product contracts over K or C, never over V), so no cross-program reduction
is needed.

Forward  (``n = 0 .. N-1``)::

    delta_n = u_n - w_n S_n              (w = None: delta_n = u_n)
    o_n     = qg_n S_n + p_n delta_n
    S_{n+1} = a_n S_n + ke_n^T delta_n

and, for the backward, the state entering every chunk, ``S_n`` (``[B, H, N, K, V]``).

Backward (``n = N-1 .. 0``, ``dS`` = gradient w.r.t. the state after chunk ``n``)::

    d_delta_n = p_n^T do_n + ke_n dS
    dS       <- a_n dS + qg_n^T do_n - w_n^T d_delta_n

It writes ``d_delta_n`` (the gradient of ``u_n``), the ``dS`` it entered chunk ``n`` with (all
the remaining gradients are batched products of these with saved tensors, formed in XLA by the
dispatcher) and the gradient of the initial state.

All blocks are powers of two for the Triton lowering (``supports``); interpret mode (CPU tests)
takes any size. Inputs keep their dtype in the matmuls (float32 operands may run as TF32 on a
GPU) and accumulate in float32.
"""
from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl

from memjax.kernels.pallas_common import is_pow2, merge_aliases, pallas_call, poison_output, pow2_divisor, triton_params

_NN = (((1,), (0,)), ((), ()))  # [m, k] x [k, n]
_TN = (((0,), (0,)), ((), ()))  # [k, m]^T x [k, n]


@dataclasses.dataclass(frozen=True)
class Tile:
    """Launch shape: ``bv`` value columns per program (a power of two, capped by the largest
    power of two dividing V), ``num_warps`` warps, ``num_stages`` software-pipeline stages."""

    bv: int = 64
    num_warps: int = 8
    num_stages: int = 1


# Not timed on hardware yet. Chosen from what Triton 3.6 compiles for sm_90 at C = 64,
# K = V = 128 (benchmarks/triton_resources.py, no GPU needed): with float32 chunk tensors two
# pipeline stages need 229-360 KiB of shared memory, over the H100's 227 KiB, so one stage;
# 8 warps keep the [128, 64] state and operands in registers (at most 24 bytes spilled, in the
# delta-rule backward), where 4 warps spill up to 1.4 KiB.
GPU_TILE = Tile()


def _dot(a, b, dims, acc):
    return jax.lax.dot_general(a, b, dims, preferred_element_type=acc)


def _fwd_kernel(*refs, has_w: bool, save_states: bool, num_chunks: int):
    it = iter(refs)
    qg_ref, p_ref, u_ref = next(it), next(it), next(it)
    w_ref = next(it) if has_w else None
    ke_ref, a_ref, s0_ref = next(it), next(it), next(it)
    rest = list(it)
    # Outputs come last (after the aliased NaN inputs when poisoned).
    o_ref, sf_ref = rest[-3:-1] if save_states else rest[-2:]
    sin_ref = rest[-1] if save_states else None
    acc = sf_ref.dtype

    def body(n, s):
        u = u_ref[n].astype(acc)
        delta = u - _dot(w_ref[n], s.astype(w_ref.dtype), _NN, acc) if has_w else u
        o = _dot(qg_ref[n], s.astype(qg_ref.dtype), _NN, acc) + _dot(p_ref[n], delta.astype(p_ref.dtype), _NN, acc)
        o_ref[n] = o.astype(o_ref.dtype)
        if save_states:
            sin_ref[n] = s
        return a_ref[n].astype(acc) * s + _dot(ke_ref[n], delta.astype(ke_ref.dtype), _TN, acc)

    sf_ref[...] = jax.lax.fori_loop(0, num_chunks, body, s0_ref[...].astype(acc))


def _bwd_kernel(*refs, has_w: bool, num_chunks: int):
    it = iter(refs)
    qg_ref, p_ref = next(it), next(it)
    w_ref = next(it) if has_w else None
    ke_ref, a_ref, do_ref, dsf_ref = next(it), next(it), next(it), next(it)
    dd_ref, dsn_ref, ds0_ref = list(it)[-3:]
    acc = ds0_ref.dtype

    def body(i, ds):
        n = num_chunks - 1 - i
        do = do_ref[n]
        dd = _dot(p_ref[n], do.astype(p_ref.dtype), _TN, acc) + _dot(ke_ref[n], ds.astype(ke_ref.dtype), _NN, acc)
        dd_ref[n] = dd.astype(dd_ref.dtype)
        dsn_ref[n] = ds
        ds = a_ref[n].astype(acc) * ds + _dot(qg_ref[n], do.astype(qg_ref.dtype), _TN, acc)
        if has_w:
            ds = ds - _dot(w_ref[n], dd.astype(w_ref.dtype), _TN, acc)
        return ds

    ds0_ref[...] = jax.lax.fori_loop(0, num_chunks, body, dsf_ref[...].astype(acc))


def _specs(b, h, n, c, k, v, bv):
    """BlockSpecs over the grid ``(B, H, V / bv)``; the batch and head dims are squeezed, so a
    kernel sees ``[N, C, .]`` chunk stacks, ``[N]`` chunk decays and ``[K, bv]`` states."""
    per_chunk = lambda width: pl.BlockSpec((None, None, n, c, width), lambda i, j, l: (i, j, 0, 0, 0))
    v_cols = pl.BlockSpec((None, None, n, c, bv), lambda i, j, l: (i, j, 0, 0, l))
    chunk_scalar = pl.BlockSpec((None, None, n), lambda i, j, l: (i, j, 0))
    state = pl.BlockSpec((None, None, k, bv), lambda i, j, l: (i, j, 0, l))
    states = pl.BlockSpec((None, None, n, k, bv), lambda i, j, l: (i, j, 0, 0, l))
    return per_chunk, v_cols, chunk_scalar, state, states


def _launch(kernel, name, inputs, specs, outs, grid, tile, interpret, poison):
    """``pallas_call`` of ``kernel`` with outputs ``outs = [(shape, dtype, spec), ...]``;
    ``poison`` (tests) pre-fills every output with NaN through an aliased input."""
    extra = merge_aliases(*(poison_output(poison, specs, inputs, spec, shape, dtype, output=i)
                            for i, (shape, dtype, spec) in enumerate(outs)))
    return pallas_call(
        kernel,
        grid=grid,
        in_specs=specs,
        out_specs=tuple(spec for _, _, spec in outs),
        out_shape=tuple((shape, dtype) for shape, dtype, _ in outs),
        interpret=interpret,
        compiler_params=None if interpret else triton_params(tile.num_warps, tile.num_stages),
        name=name,
        **extra,
    )(*inputs)


def forward(qg, p, u, w, ke, a, s0, *, save_states: bool, interpret: bool, tile: Tile | None = None,
            poison: bool = False):
    """``(o [B, H, N, C, V], s_final [B, H, K, V], s_in [B, H, N, K, V] or None)``; ``o`` in u's
    dtype, states in the accumulation dtype. ``poison`` (tests): outputs start as NaN."""
    tile = tile or GPU_TILE
    b, h, n, c, k = qg.shape
    v = u.shape[-1]
    acc = jnp.promote_types(u.dtype, jnp.float32)
    bv = pow2_divisor(v, tile.bv)
    per_chunk, v_cols, chunk_scalar, state, states = _specs(b, h, n, c, k, v, bv)
    has_w = w is not None
    inputs = [qg, p, u] + ([w] if has_w else []) + [ke, a, s0]
    specs = [per_chunk(k), per_chunk(c), v_cols] + ([per_chunk(k)] if has_w else []) + [per_chunk(k), chunk_scalar, state]
    outs = [((b, h, n, c, v), u.dtype, v_cols), ((b, h, k, v), acc, state)]
    if save_states:
        outs.append(((b, h, n, k, v), acc, states))
    kernel = functools.partial(_fwd_kernel, has_w=has_w, save_states=save_states, num_chunks=n)
    res = _launch(kernel, "chunk_recurrence_fwd", inputs, specs, outs, (b, h, v // bv), tile, interpret, poison)
    return res[0], res[1], (res[2] if save_states else None)


def backward(qg, p, w, ke, a, do, dsf, *, interpret: bool, tile: Tile | None = None, poison: bool = False):
    """``(d_delta [B, H, N, C, V], ds_next [B, H, N, K, V], ds0 [B, H, K, V])``: the gradient of
    each chunk's ``delta`` (= of ``u``), of the state after each chunk, and of the initial state.
    ``poison`` (tests): outputs start as NaN."""
    tile = tile or GPU_TILE
    b, h, n, c, k = qg.shape
    v = do.shape[-1]
    acc = jnp.promote_types(do.dtype, jnp.float32)
    bv = pow2_divisor(v, tile.bv)
    per_chunk, v_cols, chunk_scalar, state, states = _specs(b, h, n, c, k, v, bv)
    has_w = w is not None
    inputs = [qg, p] + ([w] if has_w else []) + [ke, a, do, dsf]
    specs = [per_chunk(k), per_chunk(c)] + ([per_chunk(k)] if has_w else []) + [per_chunk(k), chunk_scalar, v_cols, state]
    outs = [((b, h, n, c, v), acc, v_cols), ((b, h, n, k, v), acc, states), ((b, h, k, v), acc, state)]
    kernel = functools.partial(_bwd_kernel, has_w=has_w, num_chunks=n)
    return _launch(kernel, "chunk_recurrence_bwd", inputs, specs, outs, (b, h, v // bv), tile, interpret, poison)


def gpu_supports(shape, dtype, backend: str, *, vector_decay: bool = False) -> bool:
    """Triton kernel: CUDA / ROCm; float32 or bfloat16 chunk tensors; ``C``, ``K`` and ``V``
    powers of two, at least 16 (Triton's ``dot``); scalar chunk decays only (not
    ``vector_decay``). ``shape = (B, H, N, C, K, V)``."""
    if vector_decay or backend not in ("gpu", "cuda", "rocm") or len(shape) != 6:
        return False
    _, _, _, c, k, v = shape
    return (jnp.dtype(dtype) in (jnp.dtype(jnp.float32), jnp.dtype(jnp.bfloat16))
            and all(is_pow2(x) and x >= 16 for x in (c, k, v)))
