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
sanitised: a non-finite one is non-finite everywhere, as it should be.

Under sequence parallelism (``seq_axis``: inside ``jax.shard_map`` with time split over a mesh axis,
:mod:`memjax.memory.sequence_parallel`) the guard is the same, and so is its result: a poison must
cross shards when a document does, so :func:`running` with ``axis_name`` adds to each shard's own
running mask a flag carried from the earlier shards. Shard ``j`` contributes ``last_j`` per
``[B, ...]`` entry (its own running mask at its last token: its last document went bad inside it)
and ``through_j`` per row (no document starts anywhere in it, its first token included, so a
poison that enters it reaches its end); one ``all_gather`` of both, and shard ``i`` receives

    carried_i = OR_{j < i} last_j AND through_m for every j < m < i

(a poison from shard ``j`` reaches shard ``i`` unless a document starts in a shard between), which
poisons its tokens before its first document start. The final state, the last shard's, is poisoned
where the last token of the whole sequence is (:func:`last_token`, one ``psum``). The poisoned
positions are exactly the single-device ones, and the sharded passes see finite inputs only.

Cost: one ``isfinite`` / ``where`` per input entry and a cumulative sum over ``[B, T, H]``:
element-wise work that XLA fuses into the consumers; under ``seq_axis`` also one ``all_gather`` of
``B H + B`` booleans per shard (``H``: channels for the element-wise memories), one ``psum`` of
``B H`` and, with ``segment_ids``, one ``ppermute`` of ``B`` ids.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory.segments import segment_starts
from memjax.memory.sequence_parallel import from_last_shard, sequence_resets


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


def running(bad_writes: jax.Array | None, segment_ids: jax.Array | None, *,
            axis_name: str | None = None) -> jax.Array | None:
    """``[B, T, ...]`` bool: True from the first True of ``bad_writes`` (time on axis 1) to the end
    of its document (``segment_ids [B, T]``; each contiguous run is a document).

    ``axis_name``: inside ``jax.shard_map`` with time split over that mesh axis, ``bad_writes`` and
    ``segment_ids`` are this device's slice and the result is this slice of the whole sequence's
    mask: a bad write on an earlier shard poisons this shard's tokens up to its first document
    start (the module docstring; one ``all_gather``)."""
    if bad_writes is None:
        return None
    n = jnp.cumsum(bad_writes.astype(jnp.int32), axis=1)
    if segment_ids is not None:
        starts = segment_starts(segment_ids).reshape(segment_ids.shape + (1,) * (bad_writes.ndim - 2))
        before = n - bad_writes.astype(jnp.int32)  # count before each token
        n = n - jax.lax.cummax(jnp.where(starts, before, 0), axis=1)  # counts are monotone in t
    local = n > 0
    if axis_name is None:
        return local
    return local | _carried(local, segment_ids, axis_name)


def _carried(local: jax.Array, segment_ids: jax.Array | None, axis_name: str) -> jax.Array:
    """``[B, T_local, ...]`` bool: this shard's tokens that a bad write on an earlier shard reaches
    (``local``: the shard's own running mask; see the module docstring)."""
    b, t = local.shape[:2]
    extra = (1,) * (local.ndim - 2)
    if segment_ids is None:
        open_doc = jnp.ones((b, t), bool)
    else:  # before the shard's first document start (its first token too, by the whole sequence's rule)
        open_doc = jnp.cumsum(sequence_resets(segment_ids, axis_name), axis=1) == 0
    last, through = local[:, -1], open_doc[:, -1]  # [B, ...], [B]
    last, through = (x if axis_name in jax.typeof(x).mat.varying else jax.lax.pcast(x, (axis_name,), to="varying")
                     for x in (last, through))
    last_all = jax.lax.all_gather(last, axis_name)  # [P, B, ...]
    cut = ~jax.lax.all_gather(through, axis_name)  # [P, B]: a document starts in shard j
    index = jax.lax.axis_index(axis_name)
    shard = jnp.arange(cut.shape[0])[:, None]
    # shard j's poison reaches shard i > j when no shard strictly between starts a document: the
    # cut count up to j equals the one up to i - 1
    upto = jnp.cumsum(cut, axis=0, dtype=jnp.int32)  # [P, B], inclusive
    before = jnp.sum(jnp.where(shard < index, cut, False), axis=0, dtype=jnp.int32)  # [B]
    reach = (shard < index) & (upto == before)  # [P, B]
    carried = jnp.any(last_all & reach.reshape(reach.shape + extra), axis=0)  # [B, ...]
    return carried[:, None] & open_doc.reshape(open_doc.shape + extra)


def last_token(mask: jax.Array | None, axis_name: str | None = None) -> jax.Array | None:
    """``mask [B, T, ...]`` at the last token of the whole sequence (``[B, ...]``): the mask of a final
    state. ``axis_name``: time split over that mesh axis; the last shard's, the same on every device."""
    if mask is None:
        return None
    last = mask[:, -1]
    if axis_name is None:
        return last
    return from_last_shard(last.astype(jnp.int32), axis_name) > 0


def poison(y, mask: jax.Array | None):
    """``y`` (an array or a pytree of arrays whose leading axes are ``mask``'s) with NaN where
    ``mask`` is True."""
    if mask is None:
        return y

    def one(x):
        m = mask.reshape(mask.shape + (1,) * (x.ndim - mask.ndim))
        return jnp.where(m, jnp.asarray(jnp.nan, x.dtype), x)

    return jax.tree.map(one, y)


def poison_outputs(o: jax.Array, s, mask: jax.Array | None, axis_name: str | None = None):
    """``(o, s)`` of a ``[B, T, H, ...]`` memory with its ``[B, H, ...]`` final state ``s`` (an
    array or pytree): NaN where ``mask [B, T, H]`` is True, and in ``s`` where the mask of the last
    token (of the whole sequence: :func:`last_token` over ``axis_name``) is."""
    if mask is None:
        return o, s
    return poison(o, mask), poison(s, last_token(mask, axis_name))
