"""Real-Gated Linear Recurrent Unit (RG-LRU; De et al. 2024 "Griffin", RecurrentGemma).

Per channel (elementwise over ``D``)::

    r_t = sigmoid(gate_a_t)                       recurrence gate
    i_t = sigmoid(gate_x_t)                       input gate
    log a_t = c * r_t * log sigmoid(Lambda)       = -c * r_t * softplus(-Lambda)   (log space)
    h_t = a_t * h_{t-1} + sqrt(1 - a_t^2) * (i_t * x_t)
    y_t = h_t

``a = sigmoid(Lambda)`` is the base decay (Griffin initialises it in ``[0.9, 0.999]``), ``c = 8``.
RecurrentGemma stores ``a_param = -Lambda`` (``log a_t = -c r_t softplus(a_param)``).

Numerics: ``a_t`` is formed from its logarithm; ``1 - a_t^2 = -expm1(2 log a_t)`` keeps full relative
precision when ``a_t`` is close to 1 (long memories), where ``1 - a*a`` would cancel; the square
root's derivative is capped at 1000 (as RecurrentGemma does) so that ``a_t -> 1`` gives no infinite
gradient. Both forms keep the state in float32 (float64 for float64 inputs).

Packed sequences: at a segment start the state is reset (``h_{t-1} := 0``). ``normalize_at_reset``
chooses what enters the state there: ``True`` (Griffin's equation, the default) applies the
``sqrt(1 - a_t^2)`` factor everywhere; ``False`` is RecurrentGemma's convention, where a token
that starts a document (``segment_pos == 0``) is written un-normalised, ``h_t = i_t x_t``: without
history there is no past variance to balance. In this mode ``t = 0`` also counts as a document
start when ``initial_state is None`` (RecurrentGemma: no cache), so chaining two halves (the second
with the first's final state) still equals one pass.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory import nonfinite
from memjax.memory.contract import (check_gate, check_mode, check_segment_ids, check_seq_axis, check_sequence,
                                    check_state, output_dtype, state_dtype)
from memjax.memory.linear_scan import linear_scan
from memjax.memory.sequence_parallel import is_first_shard, sequence_resets, sharded_linear_scan

MODES = ("scan", "recurrent")
MAX_SQRT_GRAD = 1000.0


@jax.custom_jvp
def sqrt_bounded_grad(x):
    """``sqrt(x)`` whose derivative is capped at :data:`MAX_SQRT_GRAD` (for ``x < 1 / (4 * 1000^2)``)."""
    return jnp.sqrt(x)


@sqrt_bounded_grad.defjvp
def _sqrt_bounded_grad_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    floor = 1.0 / (4.0 * MAX_SQRT_GRAD ** 2)
    return jnp.sqrt(x), dx * 0.5 / jnp.sqrt(jnp.maximum(x, floor))


def rglru_gates(gate_a, gate_x, lam, c: float = 8.0):
    """``(a_t, sqrt(1 - a_t^2), i_t)`` with ``a_t = exp(-c sigmoid(gate_a) softplus(-lam))`` and
    ``i_t = sigmoid(gate_x)``, in the dtype of the inputs (call with float32)."""
    log_a = -c * jax.nn.sigmoid(gate_a) * jax.nn.softplus(-lam)
    norm = sqrt_bounded_grad(-jnp.expm1(2.0 * log_a))
    return jnp.exp(log_a), norm, jax.nn.sigmoid(gate_x)


def rglru(x: jax.Array, gate_a: jax.Array, gate_x: jax.Array, lam: jax.Array, *, c: float = 8.0,
          initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
          mode: str = "scan", normalize_at_reset: bool = True,
          seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """RG-LRU over time (see the module docstring for the equations).

    Args:
      x: ``[batch, T, D]`` inputs.
      gate_a, gate_x: ``[batch, T, D]`` pre-activations of the recurrence and input gates
        (the block computes them from x, e.g. block-diagonal linear maps).
      lam: ``[D]`` the parameter ``Lambda``; the base decay is ``a = sigmoid(Lambda)``.
      c: the gate temperature (8 in Griffin).
      initial_state: ``[batch, D]`` state before ``t = 0`` (zeros if None).
      segment_ids: ``[batch, T]`` int; the state resets at every segment start.
      mode: ``"scan"`` (``jax.lax.associative_scan`` over ``(a_t, b_t)`` pairs: O(log T) depth)
        or ``"recurrent"`` (``lax.scan``; the decoding form).
      normalize_at_reset: see the module docstring (``False``: RecurrentGemma's convention).
      seq_axis: sequence parallelism (:mod:`memjax.memory.sequence_parallel`): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice, ``initial_state`` the state before the whole sequence; returns this slice's
        outputs and the whole sequence's final state. ``"scan"`` mode only.

    Returns ``(y [batch, T, D]`` in x's dtype, ``final_state [batch, D]`` float32 / float64).
    """
    fn = "rglru"
    check_mode(fn, mode, MODES)
    b, t, d = check_sequence(fn, "x", x, "[batch, T, D]")
    check_gate(fn, "gate_a", gate_a, (b, t, d), "[batch, T, D]", required=True)
    check_gate(fn, "gate_x", gate_x, (b, t, d), "[batch, T, D]", required=True)
    check_gate(fn, "lam", lam, (d,), "[D]", required=True)
    check_state(fn, initial_state, (b, d), "[batch, D]")
    check_segment_ids(fn, segment_ids, (b, t), "[batch, T]")
    if not c > 0:
        raise ValueError(f"{fn}: c must be > 0, got {c!r}")
    check_seq_axis(fn, seq_axis, mode, ("scan",))

    # Gates (decays) and the state in float32 (float64 for float64 inputs); x is promoted only
    # where it is multiplied into the state's write (an element-wise recurrence: no matmul).
    out_dtype = output_dtype(x)
    cd = state_dtype(x, gate_a, gate_x, lam, initial_state)
    gate_a, gate_x, lam = (v.astype(cd) for v in (gate_a, gate_x, lam))
    # A non-finite input poisons its channel from that token to the end of its document
    # (memjax.memory.nonfinite): reset or not, `a_t * h` would carry a NaN on (0 * NaN = NaN).
    # (across shards under seq_axis)
    mask = nonfinite.running(~(jnp.isfinite(x) & jnp.isfinite(gate_a) & jnp.isfinite(gate_x)), segment_ids,
                             axis_name=seq_axis)
    x, gate_a, gate_x = (nonfinite.finite_or_zero(v) for v in (x, gate_a, gate_x))
    a, norm, i = rglru_gates(gate_a, gate_x, lam, c)
    resets = sequence_resets(segment_ids, seq_axis)
    if not normalize_at_reset and initial_state is None:
        start = jnp.zeros((b, t), bool).at[:, 0].set(is_first_shard(seq_axis))
        resets = start if resets is None else resets | start
    if resets is not None:
        a = jnp.where(resets[..., None], 0.0, a)
        if not normalize_at_reset:
            norm = jnp.where(resets[..., None], 1.0, norm)
    u = (norm * i) * x.astype(cd)
    h0 = jnp.zeros((b, d), cd) if initial_state is None else initial_state.astype(cd)
    if seq_axis is not None:
        y, s = sharded_linear_scan(a, u, h0, axis_name=seq_axis)
    elif mode == "scan":
        y = linear_scan(a, u, h0, axis=1)
        s = y[:, -1]
    else:
        def step(h, inp):
            at, ut = inp
            h = at * h + ut
            return h, h

        s, y = jax.lax.scan(step, h0, (jnp.swapaxes(a, 0, 1), jnp.swapaxes(u, 0, 1)))
        y = jnp.swapaxes(y, 0, 1)
    return nonfinite.poison_outputs(y.astype(out_dtype), s, mask, seq_axis)
