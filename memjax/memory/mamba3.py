"""Mamba-3 selective SSM (Lahoti, Li, Chen, Wang, Bick, Kolter, Dao & Gu, "Mamba-3: Improved Sequence
Modeling using State Space Principles", ICLR 2026, arXiv:2603.15569).

Mamba-3 changes the Mamba-2 recurrence (:func:`memjax.memory.ssm.selective_scan`) in three ways; per
head (scalar ``A``), with the state ``h_t: [N, P]``, ``B_t, C_t: [N, R]`` and the input ``X_t: [P, R]``
(``R = 1``: single-input single-output, SISO; ``R > 1``: MIMO)::

    alpha_t = exp(dt_t A_t)                                 (A_t < 0; a scalar per head, [H] or per token)
    beta_t  = (1 - lam_t) dt_t alpha_t,   gamma_t = lam_t dt_t
    h_t = alpha_t R_t h_{t-1} + beta_t R_t B_{t-1} X_{t-1}^T + gamma_t B_t X_t^T
    Y_t = scale * h_t^T C_t + D X_t                         (Y_t: [P, R])

1. **Exponential-trapezoidal discretisation**: the input integral of the ODE is approximated by a
   convex combination (``lam_t`` in [0, 1]) of its two end points, so every token writes twice: with
   weight ``gamma_t`` at its own step and with ``beta_t`` (carried by that step's transition) at the
   next. ``lam = 1`` is Mamba-2's exponential-Euler rule (``lam = None`` here); ``lam = 1/2`` is the
   classical trapezoid.
2. **Complex state as data-dependent rotations**: ``R_t`` rotates the pairs ``(2m, 2m+1)``,
   ``m < M <= N/2``, of the state dimension by the angles ``dt_t theta_t`` (a complex diagonal
   ``A + i theta``). With the cumulative angle ``Phi_t = Phi_{t-1} + dt_t theta_t`` and
   ``Rot(Phi_t)`` the product of all rotations so far, the state in the rotating frame
   ``h'_t = Rot(Phi_t)^T h_t`` follows the *real* recurrence above with ``R_t = I`` and
   ``B_t, C_t`` replaced by ``Rot(Phi_t)^T B_t``, ``Rot(Phi_t)^T C_t`` (the paper's "RoPE trick"):
   the implementation rotates ``B`` and ``C`` once and runs a real scalar-decay recurrence.
3. **MIMO**: rank-``R`` writes ``B_t X_t^T`` and reads ``h_t^T C_t``; the state stays ``[N, P]``
   while each token does ``R`` times the work (the paper's way to use the tensor cores at decode).

Chunked form. Defining the state *with the next write already added*,
``S^_t = h'_t + delta_t B_t X_t^T`` with ``delta_t = (1 - lam_{t+1}) dt_{t+1}`` (0 for the last
token and before a segment start), the recurrence becomes plain scalar-decay linear attention::

    S^_t = alpha_t S^_{t-1} + (gamma_t + delta_t) B_t X_t^T,    h'_t = S^_t - delta_t B_t X_t^T

so within a chunk the score of query ``(i, r)`` and key ``(j, s)`` is
``(C_ir . B_js) exp(G_i - G_j) (gamma_j + delta_j [i > j])``: the Mamba-2 decay mask with weight
``gamma`` on the diagonal and ``gamma + delta`` below it (the product of the decay mask and a lower
bidiagonal matrix of ``gamma_j`` and ``beta_{j+1}``). The
chunk-to-chunk pass is :func:`memjax.kernels.chunk_pass.chunk_recurrence` on chunks of
``C * R`` (token, rank) rows; decays come from :func:`memjax.memory.chunking.chunk_decays` (log space,
masked before the ``exp``). ``"recurrent"`` is a ``lax.scan`` over tokens (the decoding form).

State (:class:`Mamba3State`), what decoding needs to continue exactly: ``ssm = h'_{T-1}`` (the
rotating frame), ``k`` = the last token's rotated ``B`` and ``x`` = its ``X`` (the trapezoid's pending
write, weighted by the next token's ``beta``) and ``angle = Phi_{T-1} mod 2 pi``.

Sequence parallelism (``seq_axis``, chunked mode; :mod:`memjax.memory.sequence_parallel`): on ``S^``
the recurrence is scalar-decay linear attention, so the shards exchange states as Mamba-2's do
(:func:`memjax.memory.sequence_parallel.sharded_chunk_recurrence`). What crosses a shard boundary
besides the state: the cumulative angle (an element-wise scan over the shards,
:func:`memjax.memory.sequence_parallel.sharded_linear_scan`), the next token's trapezoid weight
``delta`` of a shard's last token (one ``ppermute`` from the next shard), the first token's pending
write of ``initial_state`` (shard 0's ``lam_0, dt_0``) and the last token's ``k, x`` of the final state.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.memory import nonfinite
from memjax.memory.chunking import pad_time, to_chunks, to_head_chunks
from memjax.memory.contract import (check_chunk_size, check_floating, check_gate, check_impl, check_mode,
                                    check_scale, check_segment_ids, check_seq_axis, check_sequence, check_shape,
                                    check_state,
                                    operand_dtype, output_dtype, shape_of, state_dtype)
from memjax.memory.segments import segment_cumsum
from memjax.memory.chunk_products import head_chunk_decays, repeat_groups, times_cols, times_rows
from memjax.memory.sequence_parallel import (from_first_shard, from_last_shard, next_shard_first, sequence_resets,
                                             sharded_chunk_recurrence, sharded_linear_scan)

__all__ = ["MODES", "Mamba3State", "mamba3"]

MODES = ("chunked", "recurrent")


class Mamba3State(NamedTuple):
    """State of :func:`mamba3` after a token (float32, or float64 for float64 inputs).

    - ``ssm``: ``[B, H, P, N]``, ``h'`` in the rotating frame (``h^T`` of the module docstring, as
      Mamba-2's ``[B, H, P, N]`` state).
    - ``k``: ``[B, H, R, N]``, the token's rotated ``B`` (the pending trapezoid write).
    - ``x``: ``[B, H, R, P]``, the token's ``X``.
    - ``angle``: ``[B, H, M]``, the cumulative rotation angle ``Phi`` modulo ``2 pi`` (``M = 0``
      without ``theta``).
    """

    ssm: jax.Array
    k: jax.Array
    x: jax.Array
    angle: jax.Array

    @classmethod
    def zeros(cls, batch: int, heads: int, head_dim: int, state_dim: int, *, rank: int = 1, angles: int = 0,
              dtype=jnp.float32) -> "Mamba3State":
        """The empty state (nothing written, angle 0)."""
        z = lambda *shape: jnp.zeros((batch, heads) + shape, dtype)
        return cls(z(head_dim, state_dim), z(rank, state_dim), z(rank, head_dim), z(angles))


def mamba3(x: jax.Array, dt: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array, *, lam: jax.Array | None = None,
           theta: jax.Array | None = None, D: jax.Array | None = None, scale: float | None = None,
           initial_state: Mamba3State | None = None, segment_ids: jax.Array | None = None, mode: str = "chunked",
           chunk_size: int = 64, impl: str = "auto", interpret: bool | None = None,
           seq_axis: str | None = None) -> tuple[jax.Array, Mamba3State]:
    """Mamba-3 SSM: trapezoidal discretisation, rotations (complex state), optional MIMO rank.

    Args:
      x: ``[batch, T, H, P]`` (SISO) or ``[batch, T, H, R, P]`` (MIMO rank ``R``): the inputs ``X_t``.
      dt: ``[batch, T, H]`` positive step sizes (after softplus).
      A: ``[H]`` or ``[batch, T, H]`` (data dependent, as Mamba-3's block) negative scalars;
        ``dt * A`` is the log decay.
      B, C: ``[batch, T, G, N]`` (SISO) or ``[batch, T, G, R, N]`` (MIMO), ``H % G == 0``; heads
        ``g * H/G .. (g+1) * H/G - 1`` use group ``g``.
      lam: ``[batch, T, H]`` trapezoid weights in ``[0, 1]`` (``sigmoid`` of a projection in the
        paper); None: 1 everywhere, Mamba-2's exponential-Euler rule.
      theta: ``[batch, T, H, M]``, ``1 <= M <= N // 2``: angular speeds; the pairs ``(2m, 2m+1)``,
        ``m < M``, of the state dimension turn by ``dt_t theta_t`` per token (the rest do not).
        None: a real state (no rotation).
      D: ``[H]`` skip connection or None.
      scale: multiplies ``C`` (the read); default 1 (an SSM read is unscaled, as in the paper and
        :func:`memjax.memory.ssm.selective_scan`).
      initial_state: :class:`Mamba3State` before ``t = 0`` (zeros if None): ``ssm [batch, H, P, N]``,
        ``k [batch, H, R, N]``, ``x [batch, H, R, P]``, ``angle [batch, H, M]`` (``M = 0`` without
        ``theta``). It reaches only the first segment of a packed row.
      segment_ids: ``[batch, T]`` int, packed documents: at a segment start the state, the pending
        trapezoid write and the angle restart from zero.
      mode: ``"chunked"`` or ``"recurrent"`` (same result).
      chunk_size: tokens per chunk of ``"chunked"`` (capped at ``T``); a chunk holds ``chunk_size * R``
        (token, rank) rows, so MIMO wants ``64 / R``. ``T`` need not be a multiple.
      impl, interpret: the chunk-to-chunk pass (:mod:`memjax.kernels.chunk_pass`).
      seq_axis: sequence parallelism (chunked mode; see the module docstring): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's slice,
        ``initial_state`` the state before the whole sequence; returns this slice's outputs and the
        whole sequence's final state. Non-finite inputs poison the single-device positions.

    Returns:
      ``(y`` with x's shape and dtype, :class:`Mamba3State` ``)``. Dtypes follow
      :mod:`memjax.memory.contract`: x, B, C stay in their dtype for the matmuls (the rotated ``B``,
      ``C`` are rounded back to it), float32 accumulation; dt, A, lam, theta, the decays, angles and
      the state are float32 (float64 for float64 inputs).

    Non-finite inputs (:mod:`memjax.memory.nonfinite`): a NaN / inf in a token's ``x``, ``dt``, ``A``,
    ``B``, ``lam`` or ``theta`` poisons that head's outputs from that token to the end of its document
    (and the final state if that is the last one); one in ``C`` only that token.
    """
    fn = "mamba3"
    check_mode(fn, mode, MODES)
    check_chunk_size(fn, chunk_size)
    check_impl(fn, impl)
    check_scale(fn, scale)
    mimo = getattr(x, "ndim", None) == 5
    dims = "[batch, T, H, R, P]" if mimo else "[batch, T, H, P]"
    shape = check_sequence(fn, "x", x, dims)
    b, t, h = shape[:3]
    r, p = (shape[3], shape[4]) if mimo else (1, shape[3])
    if r == 0:
        raise ValueError(f"{fn}: x must have a MIMO rank R >= 1, got shape {shape}")
    check_gate(fn, "dt", dt, (b, t, h), "[batch, T, H]", required=True)
    if shape_of(A) not in ((h,), (b, t, h)):
        raise ValueError(f"{fn}: A must have shape [H] = ({h},) or [batch, T, H] = ({b}, {t}, {h}), got {shape_of(A)}")
    check_floating(fn, "A", A)
    bdims = "[batch, T, G, R, N]" if mimo else "[batch, T, G, N]"
    bshape = check_shape(fn, "B", B, (b, t, None, r, None) if mimo else (b, t, None, None), bdims)
    check_floating(fn, "B", B)
    g, n = bshape[2], bshape[-1]
    check_shape(fn, "C", C, bshape, bdims)
    check_floating(fn, "C", C)
    if g == 0 or h % g:
        raise ValueError(f"{fn}: the number of heads H = {h} (x.shape[2]) must be divisible by the number of "
                         f"groups G = {g} (B.shape[2])")
    check_gate(fn, "lam", lam, (b, t, h), "[batch, T, H]")
    m = 0
    if theta is not None:
        m = check_shape(fn, "theta", theta, (b, t, h, None), "[batch, T, H, M]")[3]
        check_floating(fn, "theta", theta)
        if not 1 <= m <= n // 2:
            raise ValueError(f"{fn}: theta must have 1 <= M <= N // 2 = {n // 2} angles (theta.shape[3]), got {m}")
    check_gate(fn, "D", D, (h,), "[H]")
    if initial_state is not None:
        if not isinstance(initial_state, Mamba3State):
            raise ValueError(f"{fn}: initial_state must be a Mamba3State (ssm, k, x, angle), got "
                             f"{type(initial_state).__name__}")
        for name, want, d in (("ssm", (b, h, p, n), "[batch, H, P, N]"), ("k", (b, h, r, n), "[batch, H, R, N]"),
                              ("x", (b, h, r, p), "[batch, H, R, P]"), ("angle", (b, h, m), "[batch, H, M]")):
            check_state(fn, getattr(initial_state, name), want, d, name=f"initial_state.{name}")
    check_segment_ids(fn, segment_ids, (b, t), "[batch, T]")
    check_seq_axis(fn, seq_axis, mode, ("chunked",))

    out_dtype = output_dtype(x)
    acc = state_dtype(x, dt, A, B, C, lam, theta, D, initial_state)
    md = operand_dtype(x, B, C)
    scale = 1.0 if scale is None else scale
    if not mimo:  # one code path: a rank axis of 1
        x, B, C = x[:, :, :, None], B[:, :, :, None], C[:, :, :, None]

    # A non-finite token poisons itself (C: a read) or the rest of its document (everything else).
    heads = lambda v: jnp.repeat(v, h // g, axis=2)  # [batch, T, G, ...] -> [batch, T, H, ...]
    # (for B and C, whose gradient sums the copies: repeat_groups, a sum of slices on the way back)
    heads_bc = lambda v: repeat_groups(v, h // g, axis=2)
    per_token_a = shape_of(A) != (h,)
    # (across shards under seq_axis: memjax.memory.nonfinite.running)
    writes = nonfinite.either(nonfinite.bad(x, 3), nonfinite.bad(dt, 3), nonfinite.bad(lam, 3),
                              nonfinite.bad(theta, 3), heads(nonfinite.bad(B, 3)),
                              nonfinite.bad(A, 3) if per_token_a else None)
    mask = nonfinite.either(heads(nonfinite.bad(C, 3)), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    x, B, C, dt, lam, theta = (None if v is None else nonfinite.finite_or_zero(v)
                               for v in (x, B, C, dt, lam, theta))
    A = nonfinite.finite_or_zero(A) if per_token_a else A
    x, B, C = (v.astype(md) for v in (x, B, C))
    dt, lam, theta = (None if v is None else v.astype(acc) for v in (dt, lam, theta))
    A = A.astype(acc)
    gate = dt * A  # log decay [batch, T, H]
    resets = sequence_resets(segment_ids, seq_axis)  # (a shard's first token too, under seq_axis)

    s0 = Mamba3State.zeros(b, h, p, n, rank=r, angles=m, dtype=acc) if initial_state is None else \
        Mamba3State(*(v.astype(acc) for v in initial_state))
    # Cumulative angles, restarted at each segment start; the carried-in angle reaches the first segment.
    if theta is None:
        phi = None
    elif seq_axis is not None:  # the angle carried over the shards: phi_t = [no reset at t] phi_{t-1} + dt_t theta_t
        keep = jnp.ones((b, t), acc) if resets is None else 1 - resets.astype(acc)
        phi, phi_last = sharded_linear_scan(jnp.broadcast_to(keep[..., None, None], theta.shape),
                                            dt[..., None] * theta, s0.angle, axis_name=seq_axis)
    else:
        phi = _segment_cumsum(dt[..., None] * theta, resets)
        first = None if resets is None else jnp.cumsum(resets, axis=1) == 0  # [batch, T]
        phi = phi + (s0.angle[:, None] if first is None else jnp.where(first[..., None, None], s0.angle[:, None], 0))
    k = _rotate(heads_bc(B), phi)  # [batch, T, H, R, N]: Rot(Phi)^T B, rounded back to the operand dtype
    q = _rotate(heads_bc(C), phi)

    if mode == "recurrent":
        y, ssm = _recurrent(x, gate, dt, lam, k, q, s0, resets, scale)
    else:
        y, ssm = _chunked(x, gate, dt, lam, k, q, s0, resets, scale, min(chunk_size, t), impl, interpret,
                          seq_axis=seq_axis)
    if D is not None:
        y = y.astype(acc) + D.astype(acc)[:, None, None] * x
    y = y.astype(out_dtype)
    if not mimo:
        y = y[:, :, :, 0]
    if seq_axis is None:
        angle = s0.angle if phi is None else jnp.mod(phi[:, -1], 2 * math.pi)
        state = Mamba3State(ssm, k[:, -1].astype(acc), x[:, -1].astype(acc), angle)
    else:  # the last token of the whole sequence is the last shard's
        angle = s0.angle if phi is None else jnp.mod(phi_last, 2 * math.pi)
        state = Mamba3State(ssm, from_last_shard(k[:, -1].astype(acc), seq_axis),
                            from_last_shard(x[:, -1].astype(acc), seq_axis), angle)
    return nonfinite.poison_outputs(y, state, mask, seq_axis)


def _segment_cumsum(v: jax.Array, resets: jax.Array | None) -> jax.Array:
    """Inclusive cumulative sum over time (axis 1) of ``v [batch, T, ...]``, restarted where
    ``resets [batch, T]`` is True (a document's angles never carry another's, nor its round-off)."""
    if resets is None:
        return jnp.cumsum(v, axis=1)
    return segment_cumsum(v, resets.reshape(resets.shape + (1,) * (v.ndim - 2)), axis=1)


def _rotate(v: jax.Array, phi: jax.Array | None) -> jax.Array:
    """``Rot(Phi)^T v``: the pairs ``(2m, 2m+1)``, ``m < M``, of ``v [batch, T, H, R, N]`` turned by
    ``-Phi_m`` (``phi [batch, T, H, M]``; the pairs ``m >= M`` get angle 0, i.e. cos 1 and sin 0),
    computed at the angles' precision and returned in v's dtype."""
    if phi is None:
        return v
    n, mm = v.shape[-1], phi.shape[-1]
    pad = [(0, 0)] * (phi.ndim - 1) + [(0, n // 2 - mm)]
    cos = jnp.pad(jnp.cos(phi), pad, constant_values=1)[:, :, :, None]  # [batch, T, H, 1, N/2]
    sin = jnp.pad(jnp.sin(phi), pad)[:, :, :, None]
    pairs = v[..., : n // 2 * 2].astype(phi.dtype).reshape(*v.shape[:-1], n // 2, 2)
    a, c = pairs[..., 0], pairs[..., 1]
    turned = jnp.stack([cos * a + sin * c, cos * c - sin * a], axis=-1).reshape(*v.shape[:-1], n // 2 * 2)
    if n % 2:  # an odd last dimension never turns
        turned = jnp.concatenate([turned, v[..., -1:].astype(phi.dtype)], axis=-1)
    return turned.astype(v.dtype)


def _weights(dt, lam, resets, acc, seq_axis=None):
    """``gamma_t = lam_t dt_t`` and ``delta_t = (1 - lam_{t+1}) dt_{t+1}`` (0 for the last token and
    where token ``t + 1`` starts a segment), both ``[batch, T, H]``. Under ``seq_axis`` the last
    token's ``t + 1`` is the next shard's first (0 on the last shard)."""
    if lam is None:
        return dt, jnp.zeros_like(dt)
    nxt = (1 - lam) * dt
    nxt = nxt if resets is None else jnp.where(resets[..., None], 0, nxt)
    after = jnp.zeros_like(nxt[:, :1]) if seq_axis is None else next_shard_first(nxt, seq_axis)[:, None]
    delta = jnp.concatenate([nxt[:, 1:], after], axis=1)
    return lam * dt, delta.astype(acc)


def _pending(s0: Mamba3State, dt, lam):
    """The carried-in state with the pending trapezoid write of the previous token added,
    ``h'_{-1} + (1 - lam_0) dt_0 k_{-1} x_{-1}^T`` (``[batch, H, N, P]``)."""
    s = jnp.swapaxes(s0.ssm, -1, -2)
    if lam is None:
        return s
    w = (1 - lam[:, 0]) * dt[:, 0]  # [batch, H]
    return s + w[..., None, None] * jnp.einsum("bhrn,bhrp->bhnp", s0.k, s0.x)


def _recurrent(x, gate, dt, lam, k, q, s0, resets, scale):
    """Token by token: ``h'_t = alpha_t h'_{t-1} + beta_t k_{t-1} x_{t-1}^T + gamma_t k_t x_t^T``."""
    acc = s0.ssm.dtype
    gamma = dt if lam is None else lam * dt
    beta = None if lam is None else (1 - lam) * dt * jnp.exp(gate)
    if beta is not None and resets is not None:
        beta = jnp.where(resets[..., None], 0, beta)  # the previous document's last write stays there
    k_prev = jnp.concatenate([s0.k[:, None].astype(k.dtype), k[:, :-1]], axis=1)
    x_prev = jnp.concatenate([s0.x[:, None].astype(x.dtype), x[:, :-1]], axis=1)

    def outer(kt, xt):
        return jnp.einsum("bhrn,bhrp->bhnp", kt.astype(acc), xt.astype(acc))

    def step(s, inp):
        xt, kt, qt, gt, gmt, bt, kp, xp, rt = inp
        s = s * jnp.exp(gt)[..., None, None]
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0, s)
        s = s + gmt[..., None, None] * outer(kt, xt)
        if bt is not None:
            s = s + bt[..., None, None] * outer(kp, xp)
        return s, scale * jnp.einsum("bhnp,bhrn->bhrp", s, qt.astype(acc))

    tm = lambda v: None if v is None else jnp.swapaxes(v, 0, 1)
    s, y = jax.lax.scan(step, jnp.swapaxes(s0.ssm, -1, -2),
                        tuple(tm(v) for v in (x, k, q, gate, gamma, beta, k_prev, x_prev, resets)))
    return jnp.swapaxes(y, 0, 1), jnp.swapaxes(s, -1, -2)


def _chunked(x, gate, dt, lam, k, q, s0, resets, scale, c, impl, interpret, seq_axis=None):
    """Scalar-decay linear attention on ``S^`` (module docstring) over chunks of ``c`` tokens, each
    ``c * R`` rows of the chunk pass (time split over ``seq_axis``, if given)."""
    b, t, h, r, p = x.shape
    acc, md = s0.ssm.dtype, x.dtype
    gamma, delta = _weights(dt, lam, resets, acc, seq_axis)
    rows = lambda v: to_head_chunks(v, c).reshape(b, h, -1, c * r, v.shape[-1])  # [b, H, Z, c R, .]
    qc, kc, xc = rows(q), rows(k), rows(x)
    nz = qc.shape[2]
    seg = None if resets is None else to_chunks(pad_time(resets, c), c)  # the padded tail starts nothing
    # (memjax.memory.ssm's helpers: decays, column and row scalings with dot-product transposes)
    dec = head_chunk_decays(to_head_chunks(gate, c), seg, acc)
    gc, dc = (to_head_chunks(v, c) for v in (gamma, delta))  # [b, H, Z, c]; padded tail: 0 (no write)
    # Token j's weight in the read at i: gamma_j at i = j, gamma_j + delta_j below (the banded mask).
    # (Selected, not gamma + delta - delta: a token's own read must not see its successor's gates,
    # not even as round-off, so a non-finite next token leaves it bit-identical.)
    w = gc + dc
    band = jnp.where(jnp.eye(c, dtype=bool), times_cols(dec.matrix, gc), times_cols(dec.matrix, w))  # [b, H, Z, c, c]
    expand = lambda v: jnp.repeat(v, r, axis=-1)  # token -> its R rows
    scores = jnp.einsum("bhzin,bhzjn->bhzij", qc, kc, preferred_element_type=acc)
    scores = scores * (expand(jnp.repeat(band, r, axis=-2)) * scale)
    qg = times_rows(qc, expand(dec.from_start) * scale)
    ke = times_rows(kc, expand(dec.to_end * w))
    pending = _pending(s0, dt, lam)
    if seq_axis is not None:  # the state before the whole sequence: shard 0's first token sees it
        pending = from_first_shard(pending, seq_axis)
    o, s = sharded_chunk_recurrence(qg.astype(md), scores.astype(md), xc, ke.astype(md), dec.chunk, pending,
                                    axis_name=seq_axis, impl=impl, interpret=interpret)
    # [b, H, Z, c R, P] -> [b, T, H, R, P]; the final S^ is h'_{T-1} (delta_{T-1} = 0; the padding keeps it)
    y = jnp.moveaxis(o.reshape(b, h, nz * c, r, p), 1, 2)[:, :t]
    return y, jnp.swapaxes(s, -1, -2)
