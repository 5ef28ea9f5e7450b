"""Non-finite inputs stay causal: a NaN / inf token never changes an earlier output or another
document's, in the forward pass or the gradient.

Why masking alone does not do it: a chunked form multiplies a whole chunk of values by a masked
score matrix (``P V`` with ``P_ij = 0`` for ``j > i``), and ``0 * NaN = NaN`` in a matmul; and
reverse mode multiplies the (exactly zero) cotangent of a later token by a NaN Jacobian
(``exp(g_t) * dS_t`` with ``g_t = NaN``), which poisons the gradient of every earlier token even
in the token-by-token form. So the sequence memories run on *sanitised* inputs and put the NaN
back where the recurrence would have carried it:

  1. every non-finite entry of a per-token input is replaced by 0 before any arithmetic
     (:func:`finite_or_zero`; a log decay keeps ``-inf``, a full reset, see :func:`finite_gate`);
  2. a boolean *poison* ``[B, T, ...]`` marks the tokens whose output the recurrence would have
     made non-finite: a non-finite *write* (key, value, gate, input) at ``t`` poisons ``t`` and
     every later token of its document (:func:`running`), a non-finite *read* (query) only ``t``;
  3. the outputs (and the final state) are set to NaN where poisoned (:func:`poison`).

The result: outputs before the bad token and in other documents are bit-identical to those of
the clean input, as are their gradients (the ``where`` of step 3 passes a zero cotangent into
the poisoned positions and step 1 a zero gradient to the non-finite entries). Poison is per head
(per channel for the element-wise memories); a ``NaN`` anywhere in a token's key or value poisons
that head's outputs from that token to the end of the document (the recurrent form may leave some
value columns finite: they are NaN here, which only makes a broken input louder). Inputs that are
not per token (parameters such as ``A``, ``lam``, ``params0``) and ``initial_state`` are not
sanitised: a non-finite one is non-finite everywhere, as it should be. Under sequence parallelism
(``seq_axis``) the memories skip this guard (a poison would have to cross shards).

Cost: one ``isfinite`` / ``where`` per input entry and a cumulative sum over ``[B, T, H]``:
element-wise work that XLA fuses into the consumers.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory.segments import segment_starts


def finite_or_zero(x: jax.Array | None) -> jax.Array | None:
    """``x`` with every NaN / inf replaced by 0 (None in, None out)."""
    if x is None:
        return None
    return jnp.where(jnp.isfinite(x), x, jnp.zeros((), x.dtype))


def finite_gate(g: jax.Array | None) -> jax.Array | None:
    """A log decay with NaN and ``+inf`` replaced by 0; ``-inf`` (a full reset) is kept."""
    if g is None:
        return None
    return jnp.where(jnp.isnan(g) | (g == jnp.inf), jnp.zeros((), g.dtype), g)


def bad(x: jax.Array | None, ndim: int, *, gate: bool = False) -> jax.Array | None:
    """``[x.shape[:ndim]]`` bool: True where any entry of ``x`` beyond the first ``ndim`` axes is
    NaN or inf (``gate``: NaN or ``+inf``; ``-inf`` is a valid log decay)."""
    if x is None:
        return None
    m = (jnp.isnan(x) | (x == jnp.inf)) if gate else ~jnp.isfinite(x)
    return jnp.any(m, axis=tuple(range(ndim, x.ndim))) if x.ndim > ndim else m


def either(*masks: jax.Array | None) -> jax.Array | None:
    """The element-wise OR of the masks that are not None (broadcast), or None."""
    out = None
    for m in masks:
        if m is not None:
            out = m if out is None else out | m
    return out


def running(bad_writes: jax.Array | None, segment_ids: jax.Array | None) -> jax.Array | None:
    """``[B, T, ...]`` bool: True from the first True of ``bad_writes`` (time on axis 1) to the end
    of its document (``segment_ids [B, T]``; each contiguous run is a document)."""
    if bad_writes is None:
        return None
    n = jnp.cumsum(bad_writes.astype(jnp.int32), axis=1)
    if segment_ids is not None:
        starts = segment_starts(segment_ids).reshape(segment_ids.shape + (1,) * (bad_writes.ndim - 2))
        before = n - bad_writes.astype(jnp.int32)  # count before each token
        n = n - jax.lax.cummax(jnp.where(starts, before, 0), axis=1)  # counts are monotone in t
    return n > 0


def poison(y, mask: jax.Array | None):
    """``y`` (an array or a pytree of arrays whose leading axes are ``mask``'s) with NaN where
    ``mask`` is True."""
    if mask is None:
        return y

    def one(x):
        m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
        return jnp.where(m, jnp.asarray(jnp.nan, x.dtype), x)

    return jax.tree.map(one, y)


def poison_outputs(o: jax.Array, s, mask: jax.Array | None):
    """``(o, s)`` of a ``[B, T, H, ...]`` memory with its ``[B, H, ...]`` final state ``s`` (an
    array or pytree): NaN where ``mask [B, T, H]`` is True, and in ``s`` where ``mask[:, -1]`` is."""
    if mask is None:
        return o, s
    return poison(o, mask), poison(s, mask[:, -1])
