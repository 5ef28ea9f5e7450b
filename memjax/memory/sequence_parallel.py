"""Sequence (context) parallelism for the recurrent memories: the time axis split over a mesh axis.

Inside ``jax.shard_map`` over a mesh axis ``axis_name`` of size ``P``, device ``i`` (its
``axis_index``) holds the contiguous slice ``[i T/P, (i + 1) T/P)`` of every ``[B, T, ...]``
input. Each memory here is *affine in its incoming state*: for a shard with incoming state
``S_in``, its outputs and final state are::

    o     = o_loc + O_phi S_in             S_out = Phi S_in + S_loc

where ``(o_loc, S_loc)`` is the shard's pass from a zero state and ``Phi`` / ``O_phi`` are the
linear maps from the incoming state. So (recurrentgemma's exact sequence-sharded scan, and
LASP's state exchange, generalised to the delta rule):

1. every device runs its local pass, carrying the maps alongside the state;
2. one ``all_gather`` of ``(S_loc, Phi)`` over the axis;
3. every device folds the ``P`` pairs, ``S_in(0) = initial_state``,
   ``S_in(j + 1) = Phi_j S_in(j) + S_loc_j`` (``P`` small products);
4. ``o = o_loc + O_phi S_in(i)``; the final state of the whole sequence, ``S_in(P)``, is the last
   shard's output state, shared with one ``psum`` of one state.

The result equals the single-device pass to round-off (tested in float64 with its gradients,
which JAX derives: the ``all_gather`` transposes to a reduce-scatter). What ``Phi`` costs:

- scalar-decay memories without the delta correction (linear attention, GLA, Mamba-2 SSD, and
  element-wise scans such as RG-LRU): ``Phi`` is the product of the decays, a scalar per head
  (per channel for element-wise scans), and ``O_phi`` the queries times the decay since the
  shard start. No extra pass; each shard contributes ``B H (K V + 1)`` numbers to the exchange.
- the delta rule: ``Phi = prod_n (a_n I - ke_n^T w_n)`` is a ``K x K`` matrix per head; the local
  chunk pass carries it as ``K`` extra value columns started from the identity (``V + K``
  columns instead of ``V``), and each shard contributes ``B H K (V + K)`` numbers to the exchange.

- memories whose map ``Phi`` is a ``K x K`` matrix acting alike on every value column (the
  delta rule with per-key-channel decays (KDA), GDN-2, the DPLR / RWKV-7 transition) or a
  diagonal one (per-key-channel decays, GLA, RWKV-6's bonus): :func:`sharded_columns` runs the
  memory's own local pass with ``K`` extra zero value columns started from the identity, whatever
  its chunked algorithm (the same trick as the delta rule above, one level up), so the extra
  columns' outputs are ``O_phi`` and their final state ``Phi``. ``B H K (V + K)`` numbers per
  shard; ``(V + K) / V`` times the local work.
- memories whose output is not linear in the state (mLSTM's normaliser ``max(|n^T q|, 1)``)
  fold their states (:func:`fold_states`, with the memory's own combine rule) and run their
  local pass a second time from the incoming state.

Packed sequences: a document that starts at a shard's first token must not see the previous
shard's state. :func:`sequence_resets` compares that token's segment id with the previous
shard's last one (one ``ppermute``); the reset zeroes ``Phi`` and ``O_phi`` of that shard.

Non-finite inputs: every memory sanitises its per-token inputs before its local pass and puts the
NaN back afterwards, exactly where the single-device pass does (:mod:`memjax.memory.nonfinite`;
``running(..., axis_name=)`` carries a bad write's poison over the shards its document spans, one
``all_gather`` of two booleans per row and head). So the states exchanged here are always finite:
a NaN on one shard never reaches an earlier token, another document or, through ``0 * NaN``, a
reset shard.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import chunk_recurrence
from memjax.kernels.manual_axes import common_varying
from memjax.memory.segments import segment_resets
from memjax.memory.linear_scan import linear_scan


def check_axis(fn: str, axis_name) -> int:
    """The size of the mapped axis ``axis_name``, or a ``ValueError`` when it is not bound here."""
    if not isinstance(axis_name, str):
        raise ValueError(f"{fn}: seq_axis must be a mesh axis name (str), got {axis_name!r}")
    try:
        return jax.lax.axis_size(axis_name)
    except NameError:
        raise ValueError(f"{fn}: seq_axis {axis_name!r} is not a mapped axis here; call {fn} inside "
                         f"jax.shard_map over a mesh with that axis (time sharded over it)") from None


def _previous_shard(x: jax.Array, axis_name: str) -> jax.Array:
    """``x`` of device ``i - 1`` on device ``i`` (device 0 receives zeros)."""
    n = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(x, axis_name, [(i, i + 1) for i in range(n - 1)])


def sequence_resets(segment_ids: jax.Array | None, axis_name: str | None) -> jax.Array | None:
    """:func:`memjax.memory.chunking.segment_resets` of the whole sequence, for this shard.

    ``segment_ids: [B, T_local]``. Position 0 of shard ``i > 0`` is a reset when its id differs
    from the last id of shard ``i - 1``; position 0 of shard 0 never is (``initial_state``
    applies there). ``axis_name = None``: the unsharded rule.
    """
    resets = segment_resets(segment_ids)
    if resets is None or axis_name is None:
        return resets
    before = _previous_shard(segment_ids[:, -1], axis_name)
    first = (segment_ids[:, 0] != before) & (jax.lax.axis_index(axis_name) > 0)
    return resets.at[:, 0].set(first)


def is_first_shard(axis_name: str | None) -> jax.Array | bool:
    """Whether this device holds the first slice of time along ``axis_name`` (always True without
    sequence parallelism): only that shard applies a user's ``initial_state``."""
    return True if axis_name is None else jax.lax.axis_index(axis_name) == 0


def _fold(s0: jax.Array, s_loc: jax.Array, phi: jax.Array, apply, axis_name: str):
    """All-gather the shards' ``(S_loc, Phi)`` and fold them from ``s0``.

    Returns ``(S_in of this shard, S_in(P) = the final state of the whole sequence)``; the final
    state is the last shard's output state, summed over the axis so that it is typed as the same
    on every device (shard_map ``out_specs=P()``)."""
    s_all = jax.lax.all_gather(s_loc, axis_name)  # [P, ...]
    phi_all = jax.lax.all_gather(phi, axis_name)
    (s0, _), _ = common_varying(s0, s_all)

    def step(s, inp):
        s_loc_j, phi_j = inp
        return apply(phi_j, s) + s_loc_j, s

    _, s_in_all = jax.lax.scan(step, s0, (s_all, phi_all))
    index = jax.lax.axis_index(axis_name)
    s_in = jax.lax.dynamic_index_in_dim(s_in_all, index, 0, keepdims=False)
    last = index == jax.lax.axis_size(axis_name) - 1
    final = jax.lax.psum(jnp.where(last, apply(phi, s_in) + s_loc, 0), axis_name)
    return s_in, final


def sharded_chunk_recurrence(qg, p, u, ke, a, s0, *, w=None, axis_name: str | None, impl: str = "auto",
                             interpret: bool | None = None):
    """:func:`memjax.kernels.chunk_pass.chunk_recurrence` with the chunks of the sequence
    split over ``axis_name`` (this device's chunks; shapes as there); ``axis_name = None``: plain
    ``chunk_recurrence`` on this device.

    ``s0: [B, H, K, V]`` is the state before the whole sequence (replicated; only shard 0's
    outputs see it directly). Returns ``(o [B, H, N_local, C, V]`` of this shard, the final state
    of the whole sequence ``[B, H, K, V]``, the same on every device).
    """
    if axis_name is None:
        return chunk_recurrence(qg, p, u, ke, a, s0, w=w, impl=impl, interpret=interpret)
    acc = s0.dtype
    b, h, k, v = s0.shape
    if w is None:
        # Phi is the product of the chunk decays; O_phi = qg times the decay since the shard start.
        o_loc, s_loc = chunk_recurrence(qg, p, u, ke, a, jnp.zeros_like(s0), impl=impl, interpret=interpret)
        # (remat=True: the default backward of the scan crashes XLA:CPU of JAX 0.11.2 inside shard_map)
        upto = linear_scan(a, jnp.zeros_like(a), jnp.ones_like(a[..., 0]), axis=-1, remat=True)  # prod_{m <= n} a_m
        before = jnp.concatenate([jnp.ones_like(a[..., :1]), upto[..., :-1]], axis=-1)
        s_in, final = _fold(s0, s_loc, upto[..., -1].astype(acc), lambda phi, s: phi[..., None, None] * s, axis_name)
        o_phi = qg * before[..., None, None]
    else:
        # K extra value columns started from the identity carry Phi (their final state) and
        # O_phi (their outputs) through the same chunk pass.
        u_ext = jnp.concatenate([u, jnp.zeros((*u.shape[:-1], k), u.dtype)], axis=-1)
        s0_ext = jnp.concatenate([jnp.zeros_like(s0), jnp.broadcast_to(jnp.eye(k, dtype=acc), (b, h, k, k))], axis=-1)
        o_ext, s_ext = chunk_recurrence(qg, p, u_ext, ke, a, s0_ext, w=w, impl=impl, interpret=interpret)
        o_loc, o_phi = o_ext[..., :v], o_ext[..., v:]
        s_in, final = _fold(s0, s_ext[..., :v], s_ext[..., v:],
                            lambda phi, s: jnp.einsum("bhij,bhjv->bhiv", phi, s), axis_name)
    o = o_loc.astype(acc) + jnp.einsum("bhnck,bhkv->bhncv", o_phi.astype(acc), s_in)
    return o.astype(u.dtype), final


def sharded_linear_scan(a: jax.Array, b: jax.Array, h0: jax.Array, *, axis_name: str) -> tuple[jax.Array, jax.Array]:
    """``h_t = a_t h_{t-1} + b_t`` (element-wise, time axis 1) with time split over ``axis_name``.

    ``a, b: [B, T_local, ...]``, ``h0: [B, ...]`` the state before the whole sequence. Returns
    ``(h [B, T_local, ...]`` of this shard, the final state of the whole sequence).
    """
    a = jnp.broadcast_to(a, b.shape)
    # (remat=True: the default backward of the scan crashes XLA:CPU of JAX 0.11.2 inside shard_map)
    h_loc = linear_scan(a, b, None, axis=1, remat=True)  # this shard from a zero state
    decay = linear_scan(a, jnp.zeros_like(b), jnp.ones_like(b[:, 0]), axis=1, remat=True)  # prod_{s <= t} a_s
    s_in, final = _fold(h0, h_loc[:, -1], decay[:, -1], lambda phi, s: phi * s, axis_name)
    return h_loc + decay * jnp.expand_dims(s_in, 1), final


def shard_starts_document(segment_ids: jax.Array | None, axis_name: str) -> jax.Array | None:
    """``[B]`` bool: whether this shard's first token starts a new document (its id differs from the
    previous shard's last one; never on shard 0, where ``initial_state`` applies). None without
    ``segment_ids``."""
    if segment_ids is None:
        return None
    return sequence_resets(segment_ids, axis_name)[:, 0]


def next_shard_first(x: jax.Array, axis_name: str) -> jax.Array:
    """``x[:, 0]`` of device ``i + 1`` on device ``i`` (the last device receives zeros)."""
    n = jax.lax.axis_size(axis_name)
    return jax.lax.ppermute(x[:, 0], axis_name, [(i + 1, i) for i in range(n - 1)])


def from_first_shard(x: jax.Array, axis_name: str) -> jax.Array:
    """Shard 0's ``x`` on every device (e.g. a quantity that only shard 0's inputs define)."""
    return jax.lax.psum(jnp.where(jax.lax.axis_index(axis_name) == 0, x, jnp.zeros_like(x)), axis_name)


def from_last_shard(x: jax.Array, axis_name: str) -> jax.Array:
    """The last shard's ``x`` on every device (e.g. the last token's part of a final state)."""
    last = jax.lax.axis_index(axis_name) == jax.lax.axis_size(axis_name) - 1
    return jax.lax.psum(jnp.where(last, x, jnp.zeros_like(x)), axis_name)


def identity_start(s0: jax.Array) -> jax.Array:
    """``[0 | I]``: the zero state ``[B, H, K, V]`` with ``K`` extra value columns holding the identity
    (``[B, H, K, V + K]``), the start of :func:`sharded_columns`' local pass."""
    b, h, k, _ = s0.shape
    return jnp.concatenate([jnp.zeros_like(s0), jnp.broadcast_to(jnp.eye(k, dtype=s0.dtype), (b, h, k, k))], axis=-1)


def extend_columns(x: jax.Array, k: int, fill: float = 0.0) -> jax.Array:
    """``x [..., V]`` with ``k`` extra trailing columns of ``fill`` (the value-side inputs of
    :func:`sharded_columns`' extended pass: zero values write nothing to the identity columns)."""
    return jnp.concatenate([x, jnp.full((*x.shape[:-1], k), fill, x.dtype)], axis=-1)


def sharded_columns(run, s0: jax.Array, segment_ids: jax.Array | None, *, axis_name: str):
    """Sequence parallelism for a matrix memory whose state update acts alike on every value column.

    For a memory with state ``S [B, H, K, V]`` whose homogeneous part (the map from the incoming
    state) is the same for every value column, e.g. ``S_t = A_t S_{t-1} + k_t u_t^T`` with any
    ``A_t [K, K]`` built from the inputs, and a read ``o_t = R_t^T S_t`` linear in the state
    (``R_t`` built from the inputs), the outputs and final state of a shard are
    ``o = o_loc + O_phi S_in``, ``S_out = Phi S_in + S_loc``.

    Args:
      run: ``run(start [B, H, K, V + K]) -> (o [B, T_local, H, V + K], S [B, H, K, V + K])``, the
        memory's local pass (any form) on this shard with its value-side inputs extended by ``K``
        zero columns (:func:`extend_columns`), started from ``start`` (:func:`identity_start`).
        Segment starts inside the shard are the pass's own business (its local ``segment_ids``).
      s0: ``[B, H, K, V]``, the state before the whole sequence (the same on every device).
      segment_ids: ``[B, T_local]`` or None: a document that starts at the shard's first token
        cuts the shard off from the incoming state.

    Returns ``(o [B, T_local, H, V]`` in the pass's output dtype, the final state of the whole
    sequence ``[B, H, K, V]`` in s0's dtype, the same on every device).
    """
    acc = s0.dtype
    v = s0.shape[-1]
    start = identity_start(s0)
    if axis_name not in jax.typeof(start).mat.varying:  # (a loop carry that meets per-device values)
        start = jax.lax.pcast(start, (axis_name,), to="varying")
    o_ext, s_ext = run(start)
    o_loc, o_phi = o_ext[..., :v], o_ext[..., v:]  # [B, T, H, V], [B, T, H, K]
    s_loc, phi = s_ext[..., :v].astype(acc), s_ext[..., v:].astype(acc)
    cut = shard_starts_document(segment_ids, axis_name)
    if cut is not None:  # a document starting at the first token: nothing from before reaches it
        phi = jnp.where(cut[:, None, None, None], jnp.zeros((), acc), phi)
    s_in, final = _fold(s0, s_loc, phi, lambda phi, s: jnp.einsum("bhij,bhjv->bhiv", phi, s), axis_name)
    if cut is not None:
        s_in = jnp.where(cut[:, None, None, None], jnp.zeros((), acc), s_in)
    o = o_loc.astype(acc) + jnp.einsum("bthi,bhiv->bthv", o_phi.astype(acc), s_in)
    return o.astype(o_loc.dtype), final


def fold_states(s0, s_loc, phi, combine, axis_name: str):
    """The fold of :func:`_fold` for pytree states and a general ``combine(phi_j, S_in(j), S_loc_j) ->
    S_in(j + 1)`` (e.g. a log-scaled state). Returns ``(S_in of this shard, the final state of the
    whole sequence, the same on every device)``."""
    s_all = jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name), s_loc)  # leaves [P, ...]
    phi_all = jax.tree.map(lambda x: jax.lax.all_gather(x, axis_name), phi)
    leaves, tree = jax.tree.flatten(s0)
    (cast, _) = common_varying(*leaves, *jax.tree.leaves(s_all))
    s0 = jax.tree.unflatten(tree, cast[:len(leaves)])

    def step(s, inp):
        s_loc_j, phi_j = inp
        return combine(phi_j, s, s_loc_j), s

    _, s_in_all = jax.lax.scan(step, s0, (s_all, phi_all))
    index = jax.lax.axis_index(axis_name)
    s_in = jax.tree.map(lambda x: jax.lax.dynamic_index_in_dim(x, index, 0, keepdims=False), s_in_all)
    # the last shard's output state, summed over the axis so that it is typed as the same on
    # every device (shard_map out_specs=P())
    final = jax.tree.map(lambda x: from_last_shard(x, axis_name), combine(phi, s_in, s_loc))
    return s_in, final


def fold_matrix(s0: jax.Array, s_loc: jax.Array, phi: jax.Array, axis_name: str):
    """The fold of the shards' ``(S_loc [B, H, M, V], Phi [B, H, M, M])`` from ``s0 [B, H, M, V]``:
    ``(S_in of this shard, the whole sequence's final state)`` (as inside :func:`sharded_columns`)."""
    return _fold(s0, s_loc, phi, lambda phi, s: jnp.einsum("bhij,bhjv->bhiv", phi, s), axis_name)
