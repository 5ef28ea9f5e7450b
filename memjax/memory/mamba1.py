"""Mamba-1 selective scan (Gu & Dao 2023, "Mamba: Linear-Time Sequence Modeling with Selective
State Spaces"), with the semantics of ``mamba_ssm``'s ``selective_scan_ref``.

Per channel ``d`` (``D`` channels) and state dimension ``n`` (``N`` per channel)::

    delta_t = softplus(delta_t + delta_bias)            (bias and softplus optional)
    h_t[d, n] = exp(delta_t[d] A[d, n]) h_{t-1}[d, n] + delta_t[d] u_t[d] B_t[g(d), n]
    y_t[d] = sum_n h_t[d, n] C_t[g(d), n] + D[d] u_t[d]       (times silu(z_t[d]) if z is given)

``B, C`` are ``[batch, T, N]`` (shared by all channels) or ``[batch, T, G, N]``: channel ``d``
uses group ``g(d) = d // (D / G)`` (``mamba_ssm``'s ``repeat(B, "b g n l -> b (g h) n l")``).

Unlike Mamba-2 (:func:`memjax.memory.ssm.selective_scan`), the decay ``exp(delta_t A)`` differs
per channel *and* state dimension, so there is no scalar-decay matmul form: every form is an
element-wise recurrence over a ``[D, N]`` state per row.

Forms (all give the same result; :func:`mamba1_scan`'s ``mode``):

- ``"auto"`` (default): ``"recurrent"`` on CPU, ``"chunked"`` elsewhere. Measured on CPU (XLA, T = 4096,
  B = 1, D = 256, N = 16, chunk 16, forward + backward, a 2-core machine shared with other jobs):
  the general chunked form (below) took ~3.2 s against the recurrent form's ~0.4 s; the tame route
  (below) brings the chunked form to about the recurrent form's time (1.25x faster in CPU seconds,
  measured under load), not beyond: it still forms ``[batch, T, D, N]`` tensors, as many numbers
  as the recurrent form's states, with no matmul to win the element-wise work back. The bound,
  measured at those shapes: one fused pass of ``exp(delta A)`` over ``[T, D, N]`` (16.7M
  exponentials, reduced against ``C``, nothing stored) costs 1/8 of the recurrent form's forward +
  backward CPU time (60 ms vs 480 ms, loaded machine), and any chunked form needs at least two
  such passes (``exp(K)`` and ``exp(-K)``, or the pairwise ``exp(G_t - G_s)``) plus their
  transposes, so at most ~4x over the recurrent form on this CPU, never 10x. Accelerators (not
  measured here) keep the chunked form, which needs ``T / C`` sequential steps instead of ``T``.
- ``"chunked"`` (training on accelerators): chunks of ``C`` tokens, passing the ``[batch, D, N]``
  state, by one of two routes chosen for the whole call (``lax.cond``; one result up to round-off):

  - *tame* decays (the usual case): every chunk's total log decay ``|sum_t delta_t A[d, n]|``
    within ``TAME_SPAN * log(float max)`` (about 44 in float32). With ``K_t = A sum_{s <= t}
    delta_s`` (in chunk, restarted at a segment start) the chunk start is the reference point::

        h_t = exp(K_t) (sum_{s <= t} exp(-K_s) delta_s u_s B_s + [no reset in [0, t]] h_in)

    every factor a normal float, the in-chunk sum one ``[C, C]`` matmul per chunk, ``O(C D N)``
    work per chunk (the scan's), a hand-written backward (:func:`_tame_core`). Each term
    ``exp(K_t) exp(-K_s)`` carries about ``|K| eps`` of relative round-off (<= 44 eps).
  - otherwise (strong decays; a decay whose ``exp`` underflows): the general form. With
    ``G_t = sum_{s <= t} delta_s A`` the in-chunk cumulative log decay (float32)::

      h_t = exp(G_t) h_in + sum_{s <= t} exp(G_t - G_s) delta_s u_s B_s

    The exponent ``G_t - G_s`` is selected (``where``) for the kept pairs ``s <= t`` of one
    segment *before* the ``exp`` (0 elsewhere) and the ``exp`` is masked again after it, so no
    positive exponent is ever exponentiated and masked pairs get an exactly zero gradient. The
    chunk body is rematerialised (``jax.checkpoint``): the backward pass keeps one ``[batch, D, N]``
    state per chunk and recomputes the chunk's ``[batch, C, C, D, N]`` decay tensor, so memory is
    ``C^2 D N`` per row for the chunk in flight plus ``T D N / C`` saved states; the work is
    ``C`` times that of the scan. Small chunks suit large ``D * N``: the default ``C = 8`` was the
    fastest of 8, 16, 32, 64 on CPU for this form.
- ``"scan"``: :func:`memjax.memory.linear_scan.linear_scan` (``jax.lax.associative_scan``,
  O(log T) depth) over per-token ``[batch, T, D, N]`` decays and writes.
- ``"recurrent"``: ``lax.scan`` token by token (the decoding form).

Dtypes (:mod:`memjax.memory.contract`): ``delta``, ``A``, the decays and the state are float32
(float64 for float64 inputs). This is an element-wise recurrence (no matmul), so ``u``, ``B``
and ``C`` are promoted to the state's precision where they enter it (as :func:`rglru` does);
the output is returned in ``u``'s dtype, the final state ``[batch, D, N]`` in float32.

Non-finite inputs (:mod:`memjax.memory.nonfinite`): a NaN / inf in ``u``, ``delta`` or ``B`` at
token ``t`` poisons its channels (its group's, for ``B``) from ``t`` to the end of the document;
one in ``C`` or ``z`` only token ``t``. Earlier outputs and other documents are bit-identical to
those of the clean input, as are their gradients.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from memjax.memory import nonfinite
from memjax.memory.chunking import pad_time, segment_cumsum_matrix, to_chunks, tame_limit
from memjax.memory.contract import (check_chunk_size, check_floating, check_gate, check_mode, check_segment_ids,
                                    check_sequence, check_shape, check_state, output_dtype, state_dtype)
from memjax.memory.linear_scan import linear_scan
from memjax.memory.segments import segment_resets

__all__ = ["MODES", "mamba1_scan"]

MODES = ("auto", "chunked", "scan", "recurrent")


def mamba1_scan(u: jax.Array, delta: jax.Array, A: jax.Array, B: jax.Array, C: jax.Array,
                D: jax.Array | None = None, z: jax.Array | None = None, delta_bias: jax.Array | None = None,
                delta_softplus: bool = False, *, initial_state: jax.Array | None = None,
                segment_ids: jax.Array | None = None, mode: str = "auto",
                chunk_size: int = 8) -> tuple[jax.Array, jax.Array]:
    """Mamba-1 selective scan (equations in the module docstring); ``mamba_ssm``'s
    ``selective_scan_fn`` in the ``[batch, T, channels]`` layout.

    Args:
      u: ``[batch, T, D]`` inputs.
      delta: ``[batch, T, D]`` step sizes (before ``delta_bias`` / softplus).
      A: ``[D, N]`` real, negative (``-exp(A_log)``).
      B, C: ``[batch, T, N]`` or ``[batch, T, G, N]`` with ``D % G == 0`` (both the same rank).
      D: ``[D]`` skip connection or None.
      z: ``[batch, T, D]`` gate or None: the output is multiplied by ``silu(z)``.
      delta_bias: ``[D]`` added to ``delta`` or None.
      delta_softplus: apply softplus to ``delta (+ delta_bias)``.
      initial_state: ``[batch, D, N]`` state before ``t = 0`` (zeros if None); it reaches only the
        first segment of a packed row.
      segment_ids: ``[batch, T]`` int, packed documents: the state is reset to zero before the
        first token of each new segment.
      mode: ``"auto"`` (``"recurrent"`` on CPU, where it is the fastest, ``"chunked"`` elsewhere),
        ``"chunked"``, ``"scan"`` or ``"recurrent"`` (module docstring).
      chunk_size: ``C`` of ``"chunked"`` (capped at ``T``). ``T`` need not be a multiple: the tail
        is padded with ``u = delta = 0`` after the bias and softplus (decay 1, no write), so the
        final state is the state at ``T - 1``.

    Returns ``(y [batch, T, D]`` in u's dtype, ``final_state [batch, D, N]`` float32, or float64
    for float64 inputs).
    """
    fn = "mamba1_scan"
    check_mode(fn, mode, MODES)
    check_chunk_size(fn, chunk_size)
    if not isinstance(delta_softplus, bool):
        raise ValueError(f"{fn}: delta_softplus must be a bool, got {delta_softplus!r}")
    b, t, d = check_sequence(fn, "u", u, "[batch, T, D]")
    check_gate(fn, "delta", delta, (b, t, d), "[batch, T, D]", required=True)
    n = check_shape(fn, "A", A, (d, None), "[D, N]")[1]
    check_floating(fn, "A", A)
    grouped = getattr(B, "ndim", None) == 4
    if grouped:
        g = check_shape(fn, "B", B, (b, t, None, n), "[batch, T, G, N]")[2]
        check_floating(fn, "B", B)
        check_gate(fn, "C", C, (b, t, g, n), "[batch, T, G, N]", required=True)
        if g == 0 or d % g:
            raise ValueError(f"{fn}: the number of channels D = {d} (u.shape[2]) must be divisible by the "
                             f"number of groups G = {g} (B.shape[2])")
    else:
        g = 1
        check_gate(fn, "B", B, (b, t, n), "[batch, T, N]", required=True)
        check_gate(fn, "C", C, (b, t, n), "[batch, T, N]", required=True)
    check_gate(fn, "D", D, (d,), "[D]")
    check_gate(fn, "z", z, (b, t, d), "[batch, T, D]")
    check_gate(fn, "delta_bias", delta_bias, (d,), "[D]")
    check_state(fn, initial_state, (b, d, n), "[batch, D, N]")
    check_segment_ids(fn, segment_ids, (b, t), "[batch, T]")

    out_dtype = output_dtype(u)
    acc = state_dtype(u, delta, A, B, C, D, z, delta_bias, initial_state)
    if not grouped:
        B, C = B[:, :, None], C[:, :, None]  # [batch, T, 1, N]
    r = d // g
    # Sanitise per-token inputs; poison what the recurrence would have made non-finite.
    per_group = lambda m: jnp.repeat(m, r, axis=2)  # [batch, T, G] -> [batch, T, D]
    writes = nonfinite.either(nonfinite.bad(u, 3), nonfinite.bad(delta, 3), per_group(nonfinite.bad(B, 3)))
    reads = nonfinite.either(per_group(nonfinite.bad(C, 3)), nonfinite.bad(z, 3))
    mask = nonfinite.either(reads, nonfinite.running(writes, segment_ids))
    u, delta, B, C, z = (nonfinite.finite_or_zero(v) for v in (u, delta, B, C, z))

    uf = u.astype(acc)
    dt = delta.astype(acc)
    if delta_bias is not None:
        dt = dt + delta_bias.astype(acc)
    if delta_softplus:
        dt = jax.nn.softplus(dt)
    # Channels grouped as [G, R]: channel d = g * R + i uses group g.
    split = lambda v: v.reshape(v.shape[:2] + (g, r))  # [batch, T, D] -> [batch, T, G, R]
    Ag = A.astype(acc).reshape(g, r, n)
    Bf, Cf = B.astype(acc), C.astype(acc)  # [batch, T, G, N]
    s0 = jnp.zeros((b, g, r, n), acc) if initial_state is None else initial_state.astype(acc).reshape(b, g, r, n)
    resets = segment_resets(segment_ids)
    if mode == "auto":  # (measured on CPU: the token loop is 5x faster than the best chunk size)
        mode = "recurrent" if jax.default_backend() == "cpu" else "chunked"
    if mode == "recurrent":
        y, s = _recurrent(split(uf), split(dt), Ag, Bf, Cf, s0, resets)
    elif mode == "scan":
        y, s = _scan(split(uf), split(dt), Ag, Bf, Cf, s0, resets)
    else:
        y, s = _chunked(split(uf), split(dt), Ag, Bf, Cf, s0, segment_ids, chunk_size)
    y = y.reshape(b, t, d)
    if D is not None:
        y = y + D.astype(acc) * uf
    if z is not None:
        y = y * jax.nn.silu(z.astype(acc))
    return nonfinite.poison_outputs(y.astype(out_dtype), s.reshape(b, d, n), mask)


def _recurrent(u, dt, A, B, C, s0, resets):
    """``u, dt: [batch, T, G, R]``, ``A: [G, R, N]``, ``B, C: [batch, T, G, N]``, ``s0: [batch, G, R, N]``."""
    def step(s, inp):
        ut, dtt, Bt, Ct, rt = inp
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0, s)
        s = jnp.exp(dtt[..., None] * A) * s + (dtt * ut)[..., None] * Bt[:, :, None, :]
        return s, jnp.einsum("bgrn,bgn->bgr", s, Ct)

    tm = lambda v: None if v is None else jnp.swapaxes(v, 0, 1)
    s, y = jax.lax.scan(step, s0, (tm(u), tm(dt), tm(B), tm(C), tm(resets)))
    return jnp.swapaxes(y, 0, 1), s


def _scan(u, dt, A, B, C, s0, resets):
    a = jnp.exp(dt[..., None] * A)  # [batch, T, G, R, N]
    if resets is not None:
        a = jnp.where(resets[:, :, None, None, None], 0, a)
    w = (dt * u)[..., None] * B[:, :, :, None, :]
    h = linear_scan(a, w, s0, axis=1)
    return jnp.einsum("btgrn,btgn->btgr", h, C), h[:, -1]


def _chunked(u, dt, A, B, C, s0, segment_ids, chunk_size):
    """The chunked form: the chunk-start reference form (:func:`_chunked_tame`) where every chunk's
    total log decay stays within ``TAME_SPAN`` of the float range, else the general pairwise form
    (:func:`_chunked_general`); one ``lax.cond`` for the whole call (one result up to round-off)."""
    b, t = u.shape[:2]
    c = min(chunk_size, t)
    chunked = lambda v: to_chunks(pad_time(v, c), c)  # [batch, Z, c, ...]; padding dt = u = 0: no decay, no write
    seg, keep, lam, tame = _route(dt, A, segment_ids, c)
    tame_fn = lambda: _chunked_tame(lam, chunked(dt * u), A, chunked(B), chunked(C), keep, seg, s0)
    general_fn = lambda: _chunked_general(u, dt, A, B, C, s0, segment_ids, c)
    y, s = jax.lax.cond(tame, tame_fn, general_fn)
    return y.reshape((b, -1) + y.shape[3:])[:, :t], s


def _route(dt, A, segment_ids, c):
    """``(seg, keep, lam, tame)`` for chunks of ``c``: the chunked segment starts ``[batch, Z, c]``
    (or None), the in-chunk causal same-segment 0/1 matrix ``[batch, Z, c, c]``, the in-chunk sums
    of ``dt`` ``[batch, Z, c, G, R]`` (restarted at resets) and whether the tame route applies:
    every chunk's ``|log decay| = lam max_n |A|`` within ``TAME_SPAN * log(float max)`` and
    ``A <= 0`` (False for a NaN / inf as well)."""
    dtc = to_chunks(pad_time(dt, c), c)
    seg = None if segment_ids is None else to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)
    # (broadcast without resets: a batched matmul needs no transpose)
    keep = jnp.broadcast_to(segment_cumsum_matrix(seg, c, dt.dtype), dtc.shape[:3] + (c,))
    lam = _in_chunk_sums(keep, dtc)
    span = jnp.max(lam, axis=(0, 1, 2)) * jnp.max(-A, axis=-1)  # [G, R]
    limit = tame_limit(dt.dtype)
    return seg, keep, lam, jnp.all((span <= limit) & (jnp.max(A, axis=-1) <= 0))


def _in_chunk_sums(keep, v):
    """``sum_{s <= t, same segment} v_s`` within each chunk (``v [batch, Z, c, ...]``, ``keep
    [batch, Z, c, c]``) as one ``[c, c]`` matmul per chunk (cheaper than ``cumsum`` forward and
    backward on XLA:CPU), batched over (batch, chunk) so that ``v`` needs no transpose."""
    return jnp.einsum("bzts,bzs...->bzt...", keep, v)


def _chunked_tame(lam, w, A, B, C, keep, seg, s0):
    """Chunk-start reference form (tame decays): with ``K_t = A lam_t`` the in-chunk cumulative log
    decay per ``(d, n)`` (restarted at a segment start; ``-44 <= K_t <= 0`` in float32)::

        h_t = exp(K_t) (sum_{s <= t, same segment} exp(-K_s) w_s B_s + [no reset in [0, t]] h_in)

    ``w = dt u``. Every factor is a normal float (``exp(-K) <= exp(44)``), the cumulative sum is
    a ``[c, c]`` matmul per chunk and the state pass a ``lax.scan`` over chunks; ``O(c D N)`` per
    chunk instead of the general form's ``O(c^2 D N)``. Each term ``exp(K_t) exp(-K_s)`` carries
    a relative rounding error of about ``|K| eps`` (``<= 44 eps``). Returns ``y [batch, Z, c, G, R]``
    and the final state ``[batch, G, R, N]``."""
    b, z, c = lam.shape[:3]
    first = jnp.ones((b, z, c), lam.dtype) if seg is None else (jnp.cumsum(seg, axis=2) == 0).astype(lam.dtype)
    whole = None if seg is None else ~jnp.any(seg, axis=2)  # [batch, Z]: no reset in the chunk
    return _tame_core(lam, w, A, B, C, keep, first, whole, s0)


def _tame_forward(lam, w, A, B, C, keep, first, whole, s0):
    K = lam[..., None] * A  # [batch, Z, c, G, R, N], <= 0
    F, E = jnp.exp(K), jnp.exp(-K)
    S = _in_chunk_sums(keep, E * w[..., None] * B[:, :, :, :, None, :])  # sum_{s <= t, same segment} exp(-K_s) w_s B_s
    last = F[:, :, -1] * S[:, :, -1]  # [batch, Z, G, R, N]: the chunk's own contribution to its end state
    decay = F[:, :, -1] if whole is None else jnp.where(whole[..., None, None, None], F[:, :, -1], 0)

    def step(h, inp):
        a, l = inp
        return a * h + l, h

    tm = lambda v: jnp.moveaxis(v, 1, 0)
    s, h_in = jax.lax.scan(step, s0, (tm(decay), tm(last)))
    h_in = tm(h_in)  # [batch, Z, G, R, N]: the state entering each chunk
    P = S + first[..., None, None, None] * h_in[:, :, None]
    # (operands ordered so that every einsum here is a batched matmul in the arrays' own layout)
    y = jnp.einsum("bztgrn,bztgn->bztgr", F * P, C)
    return y, s, (F, E, S, P, decay, h_in)


@jax.custom_vjp
def _tame_core(lam, w, A, B, C, keep, first, whole, s0):
    y, s, _ = _tame_forward(lam, w, A, B, C, keep, first, whole, s0)
    return y, s


def _tame_core_fwd(lam, w, A, B, C, keep, first, whole, s0):
    y, s, (F, E, S, _, decay, h_in) = _tame_forward(lam, w, A, B, C, keep, first, whole, s0)
    # Saved: exp(K), exp(-K) and the in-chunk sums ([batch, T, D, N] each, as many numbers as the
    # recurrent form's per-token states); P is rebuilt from S and the chunk states.
    return (y, s), (lam, w, A, B, C, keep, first, whole, F, E, S, decay, h_in)


def _tame_core_bwd(res, cts):
    """Hand-written transpose. Every reduction is a matmul in the arrays' own layout (a
    contraction with the data or with a vector of ones): autodiff's transposes and fused
    multiply-then-reduce ran several times slower on XLA:CPU at these sizes."""
    lam, w, A, B, C, keep, first, whole, F, E, S, decay, h_in = res
    dy, ds = cts
    P = S + first[..., None, None, None] * h_in[:, :, None]
    b, z, c, n = *F.shape[:3], F.shape[-1]
    dC = jnp.einsum("bztgr,bztgrn->bztgn", dy, F * P)
    dP = (dy[..., None] * C[:, :, :, :, None, :]) * F
    dh_y = jnp.einsum("bzt,bztm->bzm", first, dP.reshape(b, z, c, -1)).reshape(h_in.shape)

    def back(gs, inp):  # gs: the gradient of the state after the chunk
        a, dh = inp
        return a * gs + dh, gs

    tm = lambda v: jnp.moveaxis(v, 1, 0)
    ds0, dlast = jax.lax.scan(back, ds, (tm(decay), tm(dh_y)), reverse=True)
    dlast = tm(dlast)  # [batch, Z, G, R, N]: the gradient of the state leaving each chunk
    ddecay = dlast * h_in
    if whole is not None:
        ddecay = jnp.where(whole[..., None, None, None], ddecay, 0)
    at_end = (jnp.arange(c) == c - 1)[:, None, None, None]  # the chunk's last position
    dS = dP + jnp.where(at_end, (dlast * F[:, :, -1])[:, :, None], 0)
    dF_end = jnp.where(at_end, (ddecay + dlast * S[:, :, -1])[:, :, None], 0)
    dXE = jnp.einsum("bzts,bztm->bzsm", keep, dS.reshape(b, z, c, -1)).reshape(F.shape) * E
    dwB = dXE * B[:, :, :, :, None, :]  # d/dw of the write, before the sum over n
    ones = lambda m: jnp.ones((m,), F.dtype)
    dw = jnp.einsum("bzsgrn,n->bzsgr", dwB, ones(n))
    dB = jnp.einsum("bzsgr,bzsgrn->bzsgn", w, dXE)
    # d exp(K) = exp(K) dK and d exp(-K) = -exp(-K) dK: dK = dF F - dX exp(-K) w B
    dK = (dy[..., None] * C[:, :, :, :, None, :] * P + dF_end) * F - dwB * w[..., None]
    dlam = jnp.einsum("bztgrn,n->bztgr", dK * A, ones(n))
    dA = jnp.einsum("m,mk->k", ones(b * z * c), (dK * lam[..., None]).reshape(b * z * c, -1)).reshape(A.shape)
    return dlam, dw, dA, dB, dC, None, None, None, ds0


_tame_core.defvjp(_tame_core_fwd, _tame_core_bwd)


def _chunked_general(u, dt, A, B, C, s0, segment_ids, chunk_size):
    """The general chunked form (any decay): the pairwise ``[c, c, D, N]`` decays (module docstring)."""
    t = u.shape[1]
    c = min(chunk_size, t)
    # Padding: dt = u = 0 (decay exp(0) = 1, no write) keeps the state of position T - 1.
    chunks = lambda v: jnp.moveaxis(to_chunks(pad_time(v, c), c), 1, 0)  # [Z, batch, c, ...]
    if segment_ids is None:
        rs = None
    else:  # edge padding starts no segment
        resets = to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)  # [batch, Z, c]
        rs = jnp.moveaxis(jnp.cumsum(resets, axis=2), 1, 0)  # [Z, batch, c]: resets in [0, t] of the chunk
    causal = jnp.arange(c)[:, None] >= jnp.arange(c)[None, :]  # [t, s]: s <= t

    @jax.checkpoint
    def body(s, inp):
        uc, dtc, Bc, Cc, rc = inp  # [batch, c, G, R], ..., [batch, c, G, N], rc: [batch, c] or None
        G = jnp.cumsum(dtc[..., None] * A, axis=1)  # [batch, c, G, R, N]: in-chunk log decay, <= 0
        keep = causal[None]
        if rc is not None:
            keep = keep & (rc[:, :, None] == rc[:, None, :])  # [batch, t, s]: same segment
        keep = keep[..., None, None, None]
        diff = jnp.where(keep, G[:, :, None] - G[:, None, :], 0)  # [batch, t, s, G, R, N]
        L = jnp.where(keep, jnp.exp(diff), 0)
        w = (dtc * uc)[..., None] * Bc[:, :, :, None, :]  # [batch, c, G, R, N]
        h = jnp.einsum("btsgrn,bsgrn->btgrn", L, w)
        carried = jnp.exp(G)
        if rc is not None:
            carried = jnp.where((rc == 0)[:, :, None, None, None], carried, 0)  # no reset in [0, t]
        h = h + carried * s[:, None]
        return h[:, -1], jnp.einsum("btgrn,btgn->btgr", h, Cc)

    s, y = jax.lax.scan(body, s0, (chunks(u), chunks(dt), chunks(B), chunks(C), rs))
    return jnp.moveaxis(y, 0, 1), s  # [batch, Z, c, G, R]
