"""ParaRNN: nonlinear RNNs evaluated in parallel over time by Newton's method (Danieli et al. 2025,
"ParaRNN: Unlocking Parallel Training of Nonlinear RNNs").

A recurrence ``h_t = f(h_{t-1}, x_t)`` over ``T`` steps is one system of equations
``F(h)_t = h_t - f(h_{t-1}, x_t) = 0``. Newton's method linearises it at the current guess
``h^(k)`` and solves the linear (block bidiagonal) system exactly::

    h^(k+1)_t = f(h^(k)_{t-1}, x_t) + J_t (h^(k+1)_{t-1} - h^(k)_{t-1}),   J_t = df/dh (h^(k)_{t-1}, x_t)

which is the *linear* recurrence ``h_t = J_t h_{t-1} + b_t`` with ``b_t = f_t - J_t h^(k)_{t-1}``:
one parallel scan per iteration (chunked, like the paper's hierarchical reduction: an associative
scan inside chunks of :data:`CHUNK` tokens, a short pass over the chunk summaries, then every
token from its chunk's start state; see :func:`_affine_scan`). The system is lower
triangular, so iteration ``k`` makes the first ``k`` positions exact and ``T`` iterations solve
it exactly whatever the start; in practice a handful suffice (quadratic convergence).

The cells here have *diagonal* recurrent interactions (ParaRNN's adaptation of GRU and LSTM:
every recurrent matrix replaced by a diagonal one), so ``J_t`` is block diagonal over channels
with ``k x k`` blocks, ``k`` the state components per channel (1 for the GRU, 2 for the LSTM's
``(c, h)``), and the scan combines ``k x k`` matrices channel by channel. ``J_t`` comes from
``k`` Jacobian-vector products of the cell (column ``j`` of every block at once, which is exact
because channels do not interact), so any cell with that structure can be plugged in.

Backward (``custom_vjp``, never through the Newton iterations): at the converged solution ``h``
the adjoint ``lam_t = dL/dh_t + J_{t+1}^T lam_{t+1}`` is the same linear recurrence run backwards
in time (the same scan, reversed), and the parameter, input and initial-state gradients
are one vector-Jacobian product of the cell at every step with cotangent ``lam_t``.

Cells (``x`` holds the input pre-activations of the gates, biases included; ``a_*`` are
per-channel recurrent weights; ``s = sigmoid``):

  :data:`GRU` (gates ``z, r, c``; state ``h``)::

      z_t = s(x^z_t + a_z h_{t-1})      r_t = s(x^r_t + a_r h_{t-1})
      c_t = tanh(x^c_t + a_c (r_t h_{t-1}))
      h_t = (1 - z_t) h_{t-1} + z_t c_t

  :data:`LSTM` (gates ``f, i, o, c``; state ``(c, h)``, the output is ``h``)::

      f_t = s(x^f_t + a_f h_{t-1})  i_t = s(x^i_t + a_i h_{t-1})  o_t = s(x^o_t + a_o h_{t-1})
      u_t = tanh(x^c_t + a_c h_{t-1})
      c_t = f_t c_{t-1} + i_t u_t        h_t = o_t tanh(c_t)

Layout (the contract's element-wise style): ``x: [B, T, H, G*D]`` or ``[B, T, G*D]``, the ``G``
gates' pre-activations concatenated along the last axis in the cell's gate order, ``D`` state
channels; parameters ``[H, D]`` (``[D]``); state ``[B, H, D]`` for ``k = 1`` and
``[B, H, k, D]`` for ``k > 1`` (the LSTM: index 0 is ``c``, 1 is ``h``); outputs
``[B, T, H, D]`` (``[B, T, D]``) in ``x``'s dtype; states and all arithmetic in float32
(float64 for float64 inputs). Packed ``segment_ids`` reset ``h_{t-1}`` to zero at every segment
start (``initial_state`` reaches only the first segment).
"""
from __future__ import annotations

import functools
from typing import Callable, NamedTuple

import jax
import jax.numpy as jnp

from memjax.memory.contract import (check_floating, check_mode, check_segment_ids, check_sequence, check_shape,
                                    check_state, output_dtype, state_dtype)
from memjax.memory.segments import segment_resets

__all__ = ["Cell", "GRU", "LSTM", "CELLS", "pararnn", "pararnn_gru", "pararnn_lstm", "cell_step", "state_shape"]

MODES = ("newton", "sequential")
CHUNK = 16  # tokens per chunk of the affine scan


class Cell(NamedTuple):
    """A recurrence with per-channel (block-diagonal) state interactions.

    ``step(params, x, h) -> h_new``: ``x: [..., G, D]`` gate pre-activations, ``h: [..., k, D]``
    the previous state, ``params`` a dict of ``[..., D]`` arrays named by ``params``; channel ``d``
    of ``h_new`` may depend only on channel ``d`` of ``h`` (the Jacobian's block structure).
    ``output``: index of the state component that is the output."""

    name: str
    gates: int
    state_size: int
    params: tuple
    step: Callable
    output: int


def _gru_step(p, x, h):
    hp = h[..., 0, :]
    z = jax.nn.sigmoid(x[..., 0, :] + p["a_z"] * hp)
    r = jax.nn.sigmoid(x[..., 1, :] + p["a_r"] * hp)
    c = jnp.tanh(x[..., 2, :] + p["a_c"] * (r * hp))
    return ((1 - z) * hp + z * c)[..., None, :]


def _lstm_step(p, x, h):
    cp, hp = h[..., 0, :], h[..., 1, :]
    f = jax.nn.sigmoid(x[..., 0, :] + p["a_f"] * hp)
    i = jax.nn.sigmoid(x[..., 1, :] + p["a_i"] * hp)
    o = jax.nn.sigmoid(x[..., 2, :] + p["a_o"] * hp)
    u = jnp.tanh(x[..., 3, :] + p["a_c"] * hp)
    c = f * cp + i * u
    return jnp.stack([c, o * jnp.tanh(c)], axis=-2)


GRU = Cell("gru", 3, 1, ("a_z", "a_r", "a_c"), _gru_step, 0)
LSTM = Cell("lstm", 4, 2, ("a_f", "a_i", "a_o", "a_c"), _lstm_step, 1)
CELLS = {"gru": GRU, "lstm": LSTM}


def state_shape(cell: Cell, batch: int, features: tuple, d: int) -> tuple:
    """The external state shape: ``[B, *features, D]`` (``k = 1``) or ``[B, *features, k, D]``."""
    return (batch, *features, d) if cell.state_size == 1 else (batch, *features, cell.state_size, d)


# ----------------------------------------------------------------------------------------------
# block-diagonal affine scan


def _matmul(a2, a1):
    """Per-channel ``a2 @ a1`` of ``[..., k, k, D]`` blocks (element-wise products, no dot: for
    small ``k`` the unrolled form is what XLA runs fastest; ``k = 1`` is a plain product)."""
    k = a2.shape[-3]
    if k == 1:
        return a2 * a1
    rows = [jnp.stack([sum(a2[..., i, m, :] * a1[..., m, j, :] for m in range(k)) for j in range(k)], axis=-2)
            for i in range(k)]
    return jnp.stack(rows, axis=-3)


def _matvec(a, b):
    """Per-channel ``a @ b``: ``a [..., k, k, D]``, ``b [..., k, D]``."""
    k = a.shape[-3]
    if k == 1:
        return a[..., 0, :] * b
    return jnp.stack([sum(a[..., i, m, :] * b[..., m, :] for m in range(k)) for i in range(k)], axis=-2)


def _transpose(a):
    return jnp.swapaxes(a, -3, -2)


def _combine(e1, e2):
    """``e1`` then ``e2`` for the affine maps ``h -> A h + b`` with restart flags. A restart
    (``r2``) drops what came before by ``where``, never by a product with zero, so a NaN in one
    document cannot reach another."""
    r1, a1, b1 = e1
    r2, a2, b2 = e2
    return r1 | r2, jnp.where(r2[..., None], a2, _matmul(a2, a1)), jnp.where(r2, b2, _matvec(a2, b1) + b2)


def _affine_scan(restart, a, b, reverse=False, chunk=CHUNK):
    """All ``h_t = A_t h_{t-1} + b_t`` along axis 1 (``h_{-1} = 0``; a ``restart`` drops the
    previous state). ``restart``: bool of ``b``'s rank. ``reverse``: ``h_t = A_t h_{t+1} + b_t``.

    Chunked: an associative scan inside chunks of ``chunk`` tokens (all chunks at once), then a
    ``lax.scan`` over the ``T / chunk`` chunk summaries carrying the state into each chunk, then
    every token's state from its chunk's start state (parallel again). Work ``O(T)``, depth
    ``O(log chunk + T / chunk)``, and, unlike one associative scan over ``T``, a compiled size
    that does not grow with ``T`` (XLA:CPU took 30 s to compile one Newton step at ``T = 1024``
    as a single ``associative_scan``)."""
    if reverse:
        flip = lambda v: jnp.flip(v, axis=1)
        return flip(_affine_scan(flip(restart), flip(a), flip(b), chunk=chunk))
    bsz, t = b.shape[:2]
    c = min(chunk, t)
    n = -(-t // c)
    pad = n * c - t
    if pad:  # padded at the end: later tokens never reach earlier ones in a forward scan
        widths = lambda v: [(0, 0), (0, pad)] + [(0, 0)] * (v.ndim - 2)
        restart, a, b = (jnp.pad(v, widths(v)) for v in (restart, a, b))
    split = lambda v: v.reshape(bsz, n, c, *v.shape[2:])
    rc, ac, bc = jax.lax.associative_scan(_combine, (split(restart), split(a), split(b)), axis=2)

    def carry_in(h, summary):
        r, a_last, b_last = summary
        return jnp.where(r, b_last, _matvec(a_last, h) + b_last), h

    last = lambda v: jnp.moveaxis(v[:, :, -1], 1, 0)  # [N, B, ...]: each chunk's full summary
    _, h_start = jax.lax.scan(carry_in, jnp.zeros_like(b[:, 0]), (last(rc), last(ac), last(bc)))
    h_start = jnp.moveaxis(h_start, 0, 1)[:, :, None]  # [B, N, 1, ...]: the state before each chunk
    h = jnp.where(rc, bc, _matvec(ac, h_start) + bc)
    return h.reshape(bsz, n * c, *b.shape[2:])[:, :t]


# ----------------------------------------------------------------------------------------------
# Newton solve with a custom VJP


def _expand(m, ndim):
    """``[B, T]`` -> ``[B, T, 1, ...]`` of rank ``ndim``."""
    return m.reshape(m.shape + (1,) * (ndim - 2))


def _previous(h, h0, reset):
    """``h_{t-1}`` for every ``t``: ``h0`` at ``t = 0``, zero at segment starts (``where``, so a
    non-finite state of the previous document is dropped, not multiplied by zero)."""
    prev = jnp.concatenate([h0[:, None], h[:, :-1]], axis=1)
    return jnp.where(_expand(reset, prev.ndim), 0, prev)


def _first(reset):
    """``[B, T]``: positions whose previous state is a constant (``t = 0`` and segment starts)."""
    return reset.at[:, 0].set(True)


def _f_and_jacobian(cell, params, xs, hp):
    """``f(h_{t-1}, x_t)`` and its ``[.., k, k, D]`` Jacobian blocks w.r.t. ``h_{t-1}``, from ``k``
    JVPs (column ``j`` of every block at once: channels do not interact)."""
    f, lin = jax.linearize(lambda h: cell.step(params, xs, h), hp)
    k = cell.state_size
    # e_j: 1 on state component j of every channel (a broadcast constant, not a scatter)
    unit = lambda j: jnp.broadcast_to((jnp.arange(k) == j).astype(hp.dtype)[:, None], hp.shape)
    cols = [lin(unit(j)) for j in range(k)]
    return f, jnp.stack(cols, axis=-2)  # [..., i, j, D] = d f_i / d h_j


def _linear_system(cell, params, xs, h, h0, reset):
    """``(J, b, first)`` of the linearisation at ``h`` (``J`` zeroed where the previous state is a
    constant)."""
    hp = _previous(h, h0, reset)
    f, jac = _f_and_jacobian(cell, params, xs, hp)
    first = _first(reset)
    jac = jnp.where(_expand(first, jac.ndim), 0, jac)
    return jac, f - _matvec(jac, hp), first


def _newton_solve(cell, max_iters, tol, params, xs, h0, reset):
    def update(h):
        jac, b, first = _linear_system(cell, params, xs, h, h0, reset)
        return _affine_scan(_expand(first, b.ndim), jac, b)

    h = jnp.zeros(xs.shape[:-2] + (cell.state_size, xs.shape[-1]), h0.dtype)
    if tol is None:  # a fixed number of iterations
        return jax.lax.fori_loop(0, max_iters, lambda _, h: update(h), h), jnp.asarray(max_iters, jnp.int32)

    def body(carry):
        i, h, _ = carry
        new = update(h)
        change = jnp.abs(new - h)
        # a non-finite document must not stop (NaN > tol is False) or prolong the others' solve
        err = jnp.max(jnp.where(jnp.isfinite(change), change, 0))
        return i + 1, new, err

    init = (jnp.asarray(0, jnp.int32), h, jnp.asarray(jnp.inf, h.dtype))
    iters, h, _ = jax.lax.while_loop(lambda c: (c[0] < max_iters) & (c[2] > tol), body, init)
    return h, iters


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _newton(cell, max_iters, tol, params, xs, h0, reset):
    return _newton_solve(cell, max_iters, tol, params, xs, h0, reset)


def _newton_fwd(cell, max_iters, tol, params, xs, h0, reset):
    h, iters = _newton_solve(cell, max_iters, tol, params, xs, h0, reset)
    return (h, iters), (params, xs, h0, reset, h)


def _newton_bwd(cell, max_iters, tol, res, cts):
    params, xs, h0, reset, h = res
    dh = cts[0]
    hp = _previous(h, h0, reset)
    _, jac = _f_and_jacobian(cell, params, xs, hp)
    first = _first(reset)
    jac = jnp.where(_expand(first, jac.ndim), 0, jac)
    # lam_t = dh_t + J_{t+1}^T lam_{t+1}: the flow from t+1 stops where t+1 starts a segment or t = T-1
    a = jnp.concatenate([_transpose(jac[:, 1:]), jnp.zeros_like(jac[:, :1])], axis=1)
    stop = jnp.concatenate([first[:, 1:], jnp.ones_like(first[:, :1])], axis=1)
    lam = _affine_scan(_expand(stop, dh.ndim), a, dh, reverse=True)
    _, vjp = jax.vjp(lambda p, x, hprev: cell.step(p, x, hprev), params, xs, hp)
    dparams, dxs, dhp = vjp(lam)
    return dparams, dxs, dhp[:, 0], None


_newton.defvjp(_newton_fwd, _newton_bwd)


def _sequential(cell, params, xs, h0, reset):
    """``lax.scan`` of the cell, token by token (the decoding form and the reference)."""
    def step(h, inp):
        x_t, r_t = inp
        h = cell.step(params, x_t, jnp.where(r_t.reshape((-1,) + (1,) * (h.ndim - 1)), 0, h))
        return h, h

    tm = lambda v: jnp.swapaxes(v, 0, 1)
    _, hs = jax.lax.scan(step, h0, (tm(xs), tm(reset)))
    return tm(hs)


# ----------------------------------------------------------------------------------------------
# public function


def _check(fn, cell, params, x, initial_state, segment_ids, mode, max_iters, tol):
    if not isinstance(cell, Cell):
        raise TypeError(f"{fn}: cell must be a memjax.memory.pararnn.Cell (e.g. GRU, LSTM), got {type(cell).__name__}")
    check_mode(fn, mode, MODES)
    if isinstance(max_iters, bool) or not isinstance(max_iters, int) or max_iters <= 0:
        raise ValueError(f"{fn}: max_iters must be a positive int, got {max_iters!r}")
    if tol is not None and (isinstance(tol, bool) or not isinstance(tol, (int, float)) or not tol >= 0):
        raise ValueError(f"{fn}: tol must be None or a non-negative number, got {tol!r}")
    if getattr(x, "ndim", None) not in (3, 4):
        raise ValueError(f"{fn}: x must have shape [B, T, H, G*D] or [B, T, G*D], got {getattr(x, 'shape', None)}")
    dims = "[B, T, H, G*D]" if x.ndim == 4 else "[B, T, G*D]"
    shape = check_sequence(fn, "x", x, dims)
    g = cell.gates
    if shape[-1] == 0 or shape[-1] % g:
        raise ValueError(f"{fn}: x's last axis must be a positive multiple of the {cell.name} cell's {g} gates "
                         f"(G*D), got shape {shape}")
    b, t, feats, d = shape[0], shape[1], tuple(shape[2:-1]), shape[-1] // g
    if not isinstance(params, dict) or set(params) != set(cell.params):
        got = sorted(params) if isinstance(params, dict) else type(params).__name__
        raise ValueError(f"{fn}: params must be a dict with the keys {list(cell.params)}, got {got}")
    pdims = "[H, D]" if feats else "[D]"
    for name in cell.params:
        check_shape(fn, f"params[{name!r}]", params[name], (*feats, d), pdims)
        check_floating(fn, f"params[{name!r}]", params[name])
    sdims = ("[B, H, " if feats else "[B, ") + ("D]" if cell.state_size == 1 else f"{cell.state_size}, D]")
    check_state(fn, initial_state, state_shape(cell, b, feats, d), sdims)
    check_segment_ids(fn, segment_ids, (b, t))
    return b, t, feats, d


def pararnn(cell: Cell, params: dict, x: jax.Array, *, initial_state: jax.Array | None = None,
            segment_ids: jax.Array | None = None, mode: str = "newton", max_iters: int = 32,
            tol: float | None = None, return_iters: bool = False):
    """Run a diagonal nonlinear RNN over ``x`` (module docstring for the cells and shapes).

    Args:
      cell: :data:`GRU`, :data:`LSTM` or another :class:`Cell`.
      params: dict of the cell's per-channel parameters, each ``[H, D]`` (``[D]``).
      x: ``[B, T, H, G*D]`` or ``[B, T, G*D]`` gate pre-activations (gate order of the cell).
      initial_state: ``[B, H, D]`` (``k = 1``) or ``[B, H, k, D]``; zeros if None.
      segment_ids: ``[B, T]`` int; the state resets to zero where the id changes.
      mode: ``"newton"`` (parallel over time: Newton iterations, each a chunked parallel scan) or
        ``"sequential"`` (``lax.scan`` token by token; the decoding form).
      max_iters: Newton iterations (the exact solution is reached after at most ``T``).
      tol: None: exactly ``max_iters`` iterations (``fori_loop``); else stop early once no state
        moved by more than ``tol`` in an iteration (``while_loop``), at most ``max_iters``.
      return_iters: also return the number of Newton iterations run (an int32 scalar; 0 in
        sequential mode).

    Returns ``(outputs [B, T, H, D] in x's dtype, final_state)`` (float32 / float64), plus the
    iteration count if ``return_iters``. Gradients of the Newton form are the adjoint recurrence
    at the solution (``custom_vjp``): exact to the extent the forward pass converged.
    """
    fn = "pararnn"
    b, t, feats, d = _check(fn, cell, params, x, initial_state, segment_ids, mode, max_iters, tol)
    sd = state_dtype(x, params, initial_state)
    xs = x.astype(sd).reshape(b, t, *feats, cell.gates, d)
    p = {k: params[k].astype(sd) for k in cell.params}
    k = cell.state_size
    if initial_state is None:
        h0 = jnp.zeros((b, *feats, k, d), sd)
    else:
        h0 = initial_state.astype(sd).reshape(b, *feats, k, d)
    reset = segment_resets(segment_ids)
    if reset is None:
        reset = jnp.zeros((b, t), bool)
    if mode == "newton":
        hs, iters = _newton(cell, max_iters, tol, p, xs, h0, reset)
    else:
        hs, iters = _sequential(cell, p, xs, h0, reset), jnp.asarray(0, jnp.int32)
    out = hs[..., cell.output, :].astype(output_dtype(x))
    final = hs[:, -1]
    final = final[..., 0, :] if k == 1 else final
    return (out, final, iters) if return_iters else (out, final)


def pararnn_gru(x, params, **kwargs):
    """:func:`pararnn` with the :data:`GRU` cell (``x: [B, T, H, 3D]``, params ``a_z, a_r, a_c``)."""
    return pararnn(GRU, params, x, **kwargs)


def pararnn_lstm(x, params, **kwargs):
    """:func:`pararnn` with the :data:`LSTM` cell (``x: [B, T, H, 4D]``, params ``a_f, a_i, a_o,
    a_c``; state ``[B, H, 2, D]`` = ``(c, h)``)."""
    return pararnn(LSTM, params, x, **kwargs)


def cell_step(cell: Cell, params: dict, x_t: jax.Array, state: jax.Array) -> tuple[jax.Array, jax.Array]:
    """One token (decoding): ``x_t [B, H, G*D]`` (or ``[B, G*D]``), ``state`` in the external
    layout; returns ``(output [B, H, D] in x_t's dtype, new state)`` in the state's dtype."""
    sd = state_dtype(x_t, params, state)
    d = x_t.shape[-1] // cell.gates
    xs = x_t.astype(sd).reshape(*x_t.shape[:-1], cell.gates, d)
    h = state.astype(sd).reshape(*x_t.shape[:-1], cell.state_size, d)
    new = cell.step({k: params[k].astype(sd) for k in cell.params}, xs, h)
    out = new[..., cell.output, :].astype(output_dtype(x_t))
    return out, (new[..., 0, :] if cell.state_size == 1 else new)
