"""Log-linear attention (Guo, Yang, Goel, Xing, Dao, Kim 2025, "Log-Linear Attention",
arXiv:2506.04761): gated linear attention whose past is split into ``O(log T)`` Fenwick buckets,
each read with its own data-dependent weight.

Per batch and head, with ``G = cumsum(g)`` (``g <= 0`` a log decay, Mamba-2 style) and
``lambda = level_scales``::

    o_t = scale * sum_{s <= t} lambda[t, level(t, s)] exp(G_t - G_s) (q_t . k_s) v_s

``level(t, s)`` is the Fenwick-tree (binary indexed tree) partition of the prefix ``[0, t]`` of
query ``t``: ``level(t, t) = 0`` (the token itself) and, for ``s < t``,
``level(t, s) = bit_length(t XOR s)``: key ``s`` lies in bucket ``l`` of ``t`` when ``s`` and
``t`` first differ at bit ``l - 1`` (``t`` has a 1 there, ``s`` a 0). Bucket ``l >= 1`` exists when
bit ``l - 1`` of ``t`` is set and is the aligned block of ``2^(l-1)`` positions just below ``t``
with its lowest ``l - 1`` bits cleared, e.g. ``t = 6 = 0b110``: ``{6}``, ``{4, 5}`` (level 2),
``{0..3}`` (level 3). Positions count from each document start (``segment_ids``), so the
partition restarts there, and no key crosses a document boundary. ``L = ceil(log2 T) + 1``
levels cover ``T`` positions; ``level_scales`` may have more. A position reached only through
chaining (``initial_state``) or decoding beyond ``2^(L-1)`` puts every older bucket into the top
level ``L - 1`` (levels are ``min(level, L - 1)``): the Fenwick tree stops growing there.
With ``lambda = 1`` everywhere this is gated linear attention (Mamba-2's SSD).

State (:class:`LogLinearState`): ``levels [B, H, L, K, V]`` and ``position [B]`` int32. After the
tokens ``0 .. p-1`` of the current document, ``position = p`` and ``levels[l]`` holds bucket ``l``
of the last query ``p - 1``, decayed to it: ``sum_{s in bucket l} exp(G_{p-1} - G_s) k_s v_s^T``
(level 0 is ``k_{p-1} v_{p-1}^T``; levels whose bucket is empty are zero). Position cannot be
implied by ``T`` because of ``initial_state`` and packed documents: it is carried. A state with
``position = 0`` is empty (a document starting there has no past; its levels are ignored), so
``initial_state=None`` is zeros at position 0. Chaining ``[0:t]`` then ``[t:T]`` from the first
call's final state equals one call.

Forms, one result:
  - ``"recurrent"`` (decoding): a Fenwick stack. Token ``t`` at position ``p >= 1`` first merges
    the buckets of ``p - 1`` into those of ``p``: with ``j = bit_length(p XOR (p - 1))`` (one more
    than the trailing ones of ``p - 1``, i.e. the binary carry), ``levels[j] <- sum_{i <= j}
    levels[i]`` and the levels below ``j`` become empty; then every level decays by ``exp(g_t)``,
    ``levels[0] = k_t v_t^T`` and ``o_t = scale * sum_l lambda[t, l] levels[l]^T q_t``.
    ``O(L K V)`` per token, ``L = O(log T)`` states.
  - ``"chunked"`` (training; ``O(T log T)``): chunks of ``C`` tokens. Within a chunk the quadratic
    form with the hierarchical mask ``lambda[i, level(i, j)] exp(G_i - G_j)`` (decays from
    :func:`memjax.memory.chunking.chunk_decays`, in log space, exponents ``<= 0``). Between chunks
    a ``lax.scan`` carries the level stack of the chunk's previous token ``p'``: each of its
    buckets (an aligned block not containing any later position) lies in one bucket of every
    later query ``p`` (level ``bit_length(p XOR start)``), so a query reads
    ``sum_l lambda[i, map_i(l)] exp(G_i) q_i^T levels[l]`` and the stack moves to the chunk's
    last token by a 0/1 level remap (buckets only merge) plus the chunk's own keys at their levels.
    This needs no alignment of chunks with Fenwick boundaries, so any ``chunk_size``, initial
    position and packing works: ``O(T C K + T L K V)`` work, ``T / C`` sequential steps on
    ``[L, K, V]`` states. With positions from 0 (no ``initial_state``, no ``segment_ids``) and a
    power-of-two ``C = 2^c`` the chunk boundaries are Fenwick boundaries (the paper's setting) and
    all level maps are static (:class:`AlignedLevels`): the stack carried into a chunk is taken as
    the buckets of its first query, which every query of the chunk reads at the same levels
    (only levels ``> c``), and a chunk's keys all enter one level, so the pass carries
    ``L - c - 1`` levels and adds one ``[K, V]`` term per chunk: ``O(T C K + T (L - c) K V)``.
  - ``"parallel"``: the quadratic ``T x T`` masked form (the chunked form with one chunk).

The chunk skeleton (:func:`level_pass`, :func:`fenwick_chunks`) is shared with the log-linear
gated delta rule, :mod:`memjax.memory.log_linear_delta`.

Sequence parallelism (``seq_axis``, chunked / parallel modes; :func:`sharded_levels`): given the
position at which a shard starts, its pass is affine in the incoming level stack and acts alike on
every value column. So the shards first fold their token counts (the position each one starts at:
the previous shard's, unless a document starts in it, plus its tokens since its last document
start), then each runs its chunked pass with ``L K`` extra zero value columns whose incoming levels
hold the identity; their outputs and final levels are the ``[L K] -> [L K]`` map from the incoming
stack, folded over the shards as the delta rule's ``K x K`` map is
(:mod:`memjax.memory.sequence_parallel`). ``(V + L K) / V`` times the local work.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from memjax.memory import nonfinite
from memjax.memory.chunking import chunk_decays, from_head_chunks, pad_time, to_chunks, to_head_chunks
from memjax.memory.contract import (check_floating, check_matrix_memory, check_shape, check_state, operand_dtype,
                                    output_dtype, resolve_scale, shape_of, state_dtype)
from memjax.memory.segments import positions_in_segment, segment_resets
from memjax.memory.sequence_parallel import extend_columns, fold_matrix, fold_states, sequence_resets

MODES = ("chunked", "recurrent", "parallel")


class LogLinearState(NamedTuple):
    """The Fenwick level stack of a log-linear memory (see the module docstring).

    ``levels``: ``[B, H, L, K, V]`` float32 (float64 for float64 inputs), bucket ``l`` of the last
    query, decayed to it. ``position``: ``[B]`` int32, the number of tokens of the current
    document seen so far (the next token's position); 0 means empty."""

    levels: jax.Array
    position: jax.Array


def num_levels(length: int) -> int:
    """``ceil(log2 length) + 1``: the Fenwick levels of ``length`` positions (1 for one token)."""
    return max(int(length) - 1, 0).bit_length() + 1


def bit_length(x: jax.Array) -> jax.Array:
    """``bit_length`` of non-negative int32 ``x`` (0 for 0)."""
    return 32 - jax.lax.clz(x.astype(jnp.int32))


def fenwick_level(t: jax.Array, s: jax.Array, levels: int) -> jax.Array:
    """The level of key position ``s`` for query position ``t >= s``: ``bit_length(t XOR s)``
    (0 for ``s = t``), capped at ``levels - 1``. Broadcasts."""
    return jnp.minimum(bit_length(jnp.bitwise_xor(t, s)), levels - 1)


def carried_levels(prev: jax.Array, t: jax.Array, levels: int) -> jax.Array:
    """``[..., L]``: the level, for a query at position ``t > prev``, of bucket ``l`` of query
    ``prev``. Bucket 0 is ``{prev}``; bucket ``l >= 1`` starts at ``prev`` with bit ``l - 1``
    flipped to 0 and the bits below cleared (an aligned block that ``t`` is not in, so all of it
    lands in one level of ``t``); the top level stays the top level. Entries for empty buckets
    are meaningless (their states are zero)."""
    lv = jnp.arange(levels, dtype=jnp.int32)
    prev = jnp.maximum(prev, 0)[..., None]
    sh = jnp.maximum(lv - 1, 0)
    start = jnp.where(lv == 0, prev, jnp.left_shift(jnp.bitwise_xor(jnp.right_shift(prev, sh), 1), sh))
    return jnp.where(lv == levels - 1, levels - 1, fenwick_level(t[..., None], start, levels))


def token_positions(batch: int, length: int, segment_ids: jax.Array | None, start: jax.Array) -> jax.Array:
    """``[B, T]`` int32 positions in the document: the first document continues from ``start [B]``
    (the initial state's position), later ones count from 0."""
    if segment_ids is None:
        return start[:, None] + jnp.arange(length, dtype=jnp.int32)[None, :]
    first = jnp.cumsum(segment_resets(segment_ids).astype(jnp.int32), axis=1) == 0
    return positions_in_segment(segment_ids) + jnp.where(first, start[:, None], 0)


def merge_levels(s: jax.Array, position: jax.Array) -> jax.Array:
    """The recurrent form's carry: the stack ``s [B, H, L, K, V]`` of query ``position - 1``
    becomes that of ``position`` (``[B]``): ``s[j] <- sum_{i <= j} s[i]`` with
    ``j = min(bit_length(position XOR (position - 1)), L - 1)``, levels below ``j`` empty; at
    ``position = 0`` (a document start) everything is cleared. Level 0 is left empty for the
    new token."""
    n = s.shape[2]
    p = position.astype(jnp.int32)
    j = jnp.where(p == 0, n, jnp.minimum(bit_length(jnp.bitwise_xor(p, p - 1)), n - 1))
    j = j[:, None, None, None, None]
    lv = jnp.arange(n)[None, None, :, None, None]
    return jnp.where(lv == j, jnp.cumsum(s, axis=2), jnp.where(lv > j, s, jnp.zeros((), s.dtype)))


class FenwickChunks(NamedTuple):
    """Level structure of chunked positions ``[B, N, C]`` (the tail edge-padded):

    - ``pairs``: ``[B, N, C, C]`` int, ``level(p_i, p_j)`` within the chunk (used for ``j <= i``);
    - ``read``: ``[B, N, C, L]`` int, the level for query ``i`` of bucket ``l`` of the carried stack
      (the stack of the chunk's previous token);
    - ``remap``: ``[B, N, L, L]`` 0/1, ``remap[l, m] = 1`` where the carried bucket ``l`` becomes
      level ``m`` of the chunk's last token;
    - ``keys``: ``[B, N, C, L]`` 0/1, one-hot level of each key for the chunk's last token.
    """

    pairs: jax.Array
    read: jax.Array
    remap: jax.Array
    keys: jax.Array


def fenwick_chunks(pos: jax.Array, start: jax.Array, levels: int, dtype) -> FenwickChunks:
    """:class:`FenwickChunks` of chunked positions ``pos [B, N, C]`` with ``start [B]`` the
    position of the first token (the previous token of chunk 0 is at ``start - 1``)."""
    pairs = fenwick_level(pos[..., :, None], pos[..., None, :], levels)
    prev = jnp.concatenate([start[:, None] - 1, pos[:, :-1, -1]], axis=1)  # [B, N]
    read = carried_levels(prev[..., None], pos, levels)
    last = pos[:, :, -1]
    remap = jax.nn.one_hot(carried_levels(prev, last, levels), levels, dtype=dtype)
    keys = jax.nn.one_hot(fenwick_level(last[..., None], pos, levels), levels, dtype=dtype)
    return FenwickChunks(pairs, read, remap, keys)


class AlignedLevels(NamedTuple):
    """Static level structure of chunks aligned with Fenwick boundaries (positions ``0 .. T-1``
    from 0, ``C = 2^c``; NumPy). The stack carried into chunk ``n`` is taken *eagerly*, as the
    buckets of its first query ``n C`` (keys ``< n C``): those are levels ``>= c + 1`` only, read
    by every query of the chunk at the same level (their lower ``c`` bits never matter), and all
    of chunk ``n``'s keys lie in one bucket of ``(n + 1) C``. So the pass carries ``L - c - 1``
    levels, adds one ``[K, V]`` term per chunk and needs no per-query level map.

    - ``first``: ``c + 1``, the lowest carried level (the carried stack holds levels ``first ..
      L - 1``, ``Lh`` of them);
    - ``pairs``: ``[C, C]``, ``level(i, j) = bit_length(i XOR j)`` inside any chunk;
    - ``remap``: ``[N, Lh, Lh]`` 0/1, the eager stack of ``n C`` as buckets of ``(n + 1) C``;
    - ``keys``: ``[N, Lh]`` 0/1, the level of ``(n + 1) C`` that holds chunk ``n``'s keys;
    - ``final``: ``[Lh, L]`` 0/1, the last chunk's carried stack as buckets of the last token;
    - ``last_keys``: ``[C, L]`` 0/1, the last chunk's keys (edge padded) at their levels for the
      last token.
    """

    first: int
    pairs: np.ndarray
    remap: np.ndarray
    keys: np.ndarray
    final: np.ndarray
    last_keys: np.ndarray


def is_aligned(chunk_size: int, length: int, segment_ids, initial_state) -> bool:
    """Whether the chunked form may use :class:`AlignedLevels`: several chunks, ``C`` a power of
    two, positions from 0 (no ``initial_state``) and one document per row (no ``segment_ids``)."""
    return (segment_ids is None and initial_state is None and length > chunk_size
            and chunk_size & (chunk_size - 1) == 0)


def aligned_levels(length: int, chunk_size: int, levels: int) -> AlignedLevels:
    """:class:`AlignedLevels` of ``length`` positions in chunks of ``chunk_size = 2^c``."""
    c, n = chunk_size, -(-length // chunk_size)
    first = c.bit_length()  # c + 1 for C = 2^c
    lh = levels - first
    cap = lambda x: min(x.bit_length(), levels - 1)

    def carried(q: int, t: int) -> np.ndarray:  # [Lh, L]: bucket l of query q as a level of t
        out = np.zeros((lh, levels))
        for i, lv in enumerate(range(first, levels)):
            if lv == levels - 1:
                out[i, lv] = 1.0
            elif (q >> (lv - 1)) & 1:
                out[i, cap(t ^ (((q >> (lv - 1)) ^ 1) << (lv - 1)))] = 1.0
            else:  # an empty bucket (zero state): keep its place
                out[i, lv] = 1.0
        return out

    idx = np.arange(c)
    pairs = np.vectorize(lambda x: min(int(x).bit_length(), levels - 1))(idx[:, None] ^ idx[None, :])
    remap = np.stack([carried(i * c, (i + 1) * c)[:, first:] for i in range(n)])
    keys = np.zeros((n, lh))
    for i in range(n - 1):  # (the last chunk's term is never read)
        keys[i, cap(((i + 1) * c) ^ (i * c)) - first] = 1.0
    last = length - 1
    final = carried((n - 1) * c, last)
    last_keys = np.zeros((c, levels))
    for j in range(c):
        last_keys[j, cap(last ^ min((n - 1) * c + j, last))] = 1.0
    return AlignedLevels(first, pairs, remap, keys, final, last_keys)


def gather_levels(lam: jax.Array, index: jax.Array) -> jax.Array:
    """``lam [B, H, N, C, L]`` at level indices ``index [B, N, C, X]`` (shared by the heads):
    ``[B, H, N, C, X]``, ``out[..., i, x] = lam[..., i, index[..., i, x]]``."""
    b, h, n, c, _ = lam.shape
    idx = jnp.broadcast_to(index[:, None], (b, h, n, c, index.shape[-1]))
    return jnp.take_along_axis(lam, idx, axis=-1)


def level_pass(s0: jax.Array, remap: jax.Array, u: jax.Array, *, decay: jax.Array | None = None,
               transition: jax.Array | None = None, u_level: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """The chunk-to-chunk pass of the level stack (per batch and head)::

        S_{n+1}[m] = sum_l remap_n[l, m] (A_n S_n[l]) + u_n[m]

    with ``A_n`` the scalar ``decay [B, H, N]`` or the matrix ``transition [B, H, N, K, K]``
    (the delta rule's chunk transition), applied to every level (it commutes with the remap).
    ``s0: [B, H, L, K, V]``, ``remap: [B, N, L, L]`` or ``[N, L, L]``, ``u: [B, H, N, L, K, V]``;
    or ``u: [B, H, N, K, V]`` with ``u_level [N, L]`` (0/1): all of chunk ``n``'s keys in the
    levels ``u_level[n]`` (the aligned case: one level). Returns ``(S_n for every chunk
    [B, H, N, L, K, V]`` (the stack entering chunk ``n``), ``S_N)``."""
    tm = lambda x: None if x is None else jnp.moveaxis(x, 2, 0)
    remap = jnp.moveaxis(remap, 1, 0) if remap.ndim == 4 else jnp.asarray(remap, s0.dtype)

    def step(s, x):
        r, un, a, m, ul = x
        new = s
        if a is not None:
            new = new * a[:, :, None, None, None]
        if m is not None:
            new = jnp.einsum("bhkj,bhljv->bhlkv", m, new)
        new = jnp.einsum("blm,bhlkv->bhmkv" if r.ndim == 3 else "lm,bhlkv->bhmkv", r, new)
        new = new + (un if ul is None else ul[:, None, None] * un[:, :, None])
        return new, s

    ul = None if u_level is None else jnp.asarray(u_level, s0.dtype)
    s, stack = jax.lax.scan(step, s0, (remap, tm(u), tm(decay), tm(transition), ul))
    return jnp.moveaxis(stack, 0, 2), s


def read_levels(qr: jax.Array, lam_read: jax.Array, stack: jax.Array, acc) -> jax.Array:
    """``sum_l lam_read[..., i, l] qr_i^T stack[l]``: ``qr [B, H, N, C, K]``, ``lam_read
    [B, H, N, C, L]``, ``stack [B, H, N, L, K, V]`` -> ``[B, H, N, C, V]`` in ``acc``; one matmul over
    the ``L K`` axis (operands in ``qr``'s dtype, accumulation in ``acc``)."""
    md = qr.dtype
    qw = (lam_read[..., :, None] * qr[..., None, :]).astype(md)  # [B, H, N, C, L, K]
    return jnp.einsum("bhnclk,bhnlkv->bhncv", qw, stack.astype(md), preferred_element_type=acc)


def key_levels(keys: jax.Array, ke: jax.Array, values: jax.Array, acc) -> jax.Array:
    """``u[l] = sum_j keys[j, l] ke_j values_j^T``: ``keys [B, N, C, L]``, ``ke [B, H, N, C, K]``,
    ``values [B, H, N, C, V]`` -> ``[B, H, N, L, K, V]`` (one matmul over the chunk)."""
    kw = (keys[:, None, ..., None] * ke[..., None, :]).astype(ke.dtype)  # [B, H, N, C, L, K]
    return jnp.einsum("bhnclk,bhncv->bhnlkv", kw, values, preferred_element_type=acc)


def check_log_linear(fn: str, q, k, v, level_scales, initial_state, *, gates: dict, required: tuple = (),
                     segment_ids, scale, mode, modes, chunk_size, seq_axis=None) -> tuple[int, int, int, int, int, int]:
    """The checks of a log-linear memory: those of :func:`memjax.memory.contract.check_matrix_memory`,
    ``level_scales [B, T, H, L]`` with ``L >= ceil(log2 T) + 1`` and ``initial_state`` a
    :class:`LogLinearState` ``(levels [B, H, L, K, V], position [B] int)``. Returns
    ``(B, T, H, K, V, L)``."""
    b, t, h, dk, dv = check_matrix_memory(fn, q, k, v, gates=gates, required=required, segment_ids=segment_ids,
                                          scale=scale, mode=mode, modes=modes, chunk_size=chunk_size,
                                          seq_axis=seq_axis)
    n = check_shape(fn, "level_scales", level_scales, (b, t, h, None), "[B, T, H, L]")[3]
    check_floating(fn, "level_scales", level_scales)
    need = num_levels(t)
    if n < need:
        raise ValueError(f"{fn}: level_scales must have L >= ceil(log2 T) + 1 = {need} levels (the Fenwick levels "
                         f"of T = {t} positions), got shape {shape_of(level_scales)}")
    if initial_state is not None:
        if not isinstance(initial_state, tuple) or len(initial_state) != 2:
            raise ValueError(f"{fn}: initial_state must be a LogLinearState(levels [B, H, L, K, V], position [B]), "
                             f"got {type(initial_state).__name__}")
        levels, position = initial_state
        check_state(fn, levels, (b, h, n, dk, dv), "[B, H, L, K, V]", name="initial_state.levels")
        check_shape(fn, "initial_state.position", position, (b,), "[B]")
        if not jnp.issubdtype(position.dtype, jnp.integer):
            raise TypeError(f"{fn}: initial_state.position must have an integer dtype, got {position.dtype}")
    return b, t, h, dk, dv, n


def initial_levels(initial_state, shape, acc) -> tuple[jax.Array, jax.Array]:
    """``(levels, position)`` to start from: zeros at position 0 without ``initial_state``; a
    state at position 0 is empty, so its levels are dropped (``where``, no NaN leaks)."""
    if initial_state is None:
        return jnp.zeros(shape, acc), jnp.zeros(shape[:1], jnp.int32)
    levels, position = initial_state
    position = position.astype(jnp.int32)
    levels = jnp.where((position > 0)[:, None, None, None, None], levels.astype(acc), jnp.zeros((), acc))
    return levels, position


def sharded_levels(run, s0: jax.Array, p0: jax.Array, segment_ids: jax.Array | None, length: int, *,
                   axis_name: str):
    """Sequence parallelism of a log-linear memory (module docstring).

    Args:
      run: ``run(levels [B, H, L, K, V + L K], position [B]) -> (o [B, T_local, H, V + L K], levels)``: the
        memory's local pass with its values extended by ``L K`` zero columns, from that stack at that
        position (token positions continuing from it).
      s0, p0: the state before the whole sequence, levels ``[B, H, L, K, V]`` and position ``[B]``.
      segment_ids: ``[B, T_local]`` or None. length: ``T_local``.

    Returns ``(o [B, T_local, H, V]``, the whole sequence's :class:`LogLinearState`, the same on every
    device).
    """
    b, h, n_lv, dk, dv = s0.shape
    acc, m = s0.dtype, n_lv * dk
    resets = sequence_resets(segment_ids, axis_name)
    # Positions: p_in(j + 1) = [no document start in shard j] p_in(j) + (its tokens since its last start).
    if resets is None:
        count, keep = jnp.full((b,), length, jnp.int32), jnp.ones((b,), jnp.int32)
    else:
        last = jnp.max(jnp.where(resets, jnp.arange(length, dtype=jnp.int32), -1), axis=1)  # -1: no start
        count, keep = length - jnp.maximum(last, 0), (last < 0).astype(jnp.int32)
    p_in, p_end = fold_states(p0, count, keep, lambda keep, s, c: keep * s + c, axis_name)
    start = p_in if resets is None else jnp.where(resets[:, 0], 0, p_in)  # a document starting at token 0
    eye = jnp.eye(m, dtype=acc).reshape(n_lv, dk, m)
    ident = jnp.concatenate([jnp.zeros_like(s0), jnp.broadcast_to(eye, (b, h, n_lv, dk, m))], axis=-1)
    ident = jnp.where((start > 0)[:, None, None, None, None], ident, jnp.zeros((), acc))  # position 0: empty
    if axis_name not in jax.typeof(ident).mat.varying:  # (a loop carry that meets per-device values)
        ident = jax.lax.pcast(ident, (axis_name,), to="varying")
    o_ext, s_ext = run(ident, start)
    flat = lambda x: x.reshape(b, h, m, x.shape[-1])  # [B, H, L, K, X] -> [B, H, L K, X]
    o_loc, o_phi = o_ext[..., :dv], o_ext[..., dv:]
    s_loc, phi = flat(s_ext[..., :dv].astype(acc)), flat(s_ext[..., dv:].astype(acc))
    s_in, final = fold_matrix(flat(s0), s_loc, phi, axis_name)
    s_in = jnp.where((start > 0)[:, None, None, None], s_in, jnp.zeros((), acc))
    o = o_loc.astype(acc) + jnp.einsum("bthi,bhiv->bthv", o_phi.astype(acc), s_in)
    return o.astype(o_loc.dtype), LogLinearState(final.reshape(s0.shape), p_end)


def log_linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, g: jax.Array | None, level_scales: jax.Array, *,
                         scale: float | None = None, initial_state: LogLinearState | None = None,
                         segment_ids: jax.Array | None = None, mode: str = "chunked",
                         chunk_size: int = 64, seq_axis: str | None = None) -> tuple[jax.Array, LogLinearState]:
    """Log-linear (gated linear) attention; see the module docstring for the equations and forms.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: ``[B, T, H]`` log decay (``<= 0``; ``-inf`` clears the state) or None (no decay).
      level_scales: ``[B, T, H, L]``, ``lambda[t, l]`` the weight of query ``t``'s bucket ``l``,
        ``L >= ceil(log2 T) + 1`` (more is fine; fewer raises).
      scale: read scale, default ``K ** -0.5``.
      initial_state: :class:`LogLinearState` ``(levels [B, H, L, K, V], position [B] int)`` or None
        (empty); it reaches only the first document of a packed row, whose positions continue
        from ``position``.
      segment_ids: ``[B, T]`` int, packed documents: positions (and so the Fenwick partition)
        restart at every document start and no key is read across a boundary.
      mode: ``"chunked"``, ``"recurrent"`` or ``"parallel"``.
      chunk_size: ``C`` of ``"chunked"`` (any positive int; ``T`` need not be a multiple).
      seq_axis: sequence parallelism (chunked / parallel modes; see the module docstring): call
        inside ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice, ``initial_state`` the state before the whole sequence (``L`` must cover the whole
        sequence's positions); returns this slice's outputs and the whole sequence's final state.
        Non-finite inputs poison the single-device positions (across shards).

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, :class:`LogLinearState` of the last document: levels
      float32 (float64 for float64 inputs), position int32). q, k, v stay in their dtype for the
      matmuls (float32 accumulation); decays, level scales and the states are float32 / float64.
    """
    fn = "log_linear_attention"
    b, t, h, dk, dv, n = check_log_linear(fn, q, k, v, level_scales, initial_state, gates={"g": g},
                                          segment_ids=segment_ids, scale=scale, mode=mode, modes=MODES,
                                          chunk_size=chunk_size, seq_axis=seq_axis)
    out_dtype = output_dtype(q)
    acc = state_dtype(q, k, v, g, level_scales, None if initial_state is None else initial_state[0])
    md = operand_dtype(q, k, v)
    scale = resolve_scale(scale, dk)
    q, k, v = (x.astype(md) for x in (q, k, v))
    g = None if g is None else g.astype(acc)
    lam = level_scales.astype(acc)
    s0, p0 = initial_levels(initial_state, (b, h, n, dk, dv), acc)
    c = t if mode == "parallel" else chunk_size
    # A non-finite token poisons only itself (q, level_scales: reads) or the rest of its document
    # (k, v, g: writes) (memjax.memory.nonfinite), across shards under seq_axis.
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(g, 3, gate=True))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.bad(lam, 3),
                            nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    q, k, v, lam = (nonfinite.finite_or_zero(x) for x in (q, k, v, lam))
    g = nonfinite.finite_gate(g)
    if seq_axis is not None:
        run = lambda lv, p: _chunked(q, k, extend_columns(v, n * dk), g, lam, lv, p,
                                     token_positions(b, t, segment_ids, p), segment_ids, scale, c)
        o, state = sharded_levels(run, s0, p0, segment_ids, t, axis_name=seq_axis)
        o, s = nonfinite.poison_outputs(o.astype(out_dtype), state.levels, mask, seq_axis)
        return o, LogLinearState(s, state.position)
    pos = token_positions(b, t, segment_ids, p0)
    if mode == "recurrent":
        o, s = _recurrent(q, k, v, g, lam, s0, pos, scale, out_dtype)
    else:
        o, s = _chunked(q, k, v, g, lam, s0, p0, pos, segment_ids, scale, c,
                        aligned=is_aligned(c, t, segment_ids, initial_state))
    o, s = nonfinite.poison_outputs(o.astype(out_dtype), s, mask)
    return o, LogLinearState(s, pos[:, -1] + 1)


def _recurrent(q, k, v, g, lam, s0, pos, scale, out_dtype):
    """Token-by-token Fenwick stack (see the module docstring); inputs enter the scan in their
    dtype and each token is promoted inside the step."""
    acc = s0.dtype

    def step(s, inp):
        qt, kt, vt, gt, lt, pt = inp
        s = merge_levels(s, pt)
        if gt is not None:
            s = s * jnp.exp(gt)[..., None, None, None]
        s = s.at[:, :, 0].set(kt.astype(acc)[..., :, None] * vt.astype(acc)[..., None, :])
        r = jnp.einsum("bhk,bhlkv->bhlv", qt.astype(acc), s)
        return s, (jnp.einsum("bhl,bhlv->bhv", lt, r) * scale).astype(out_dtype)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(g), tm(lam), tm(pos)))
    return jnp.swapaxes(o, 0, 1), s


def _chunked(q, k, v, g, lam, s0, p0, pos, segment_ids, scale, chunk_size, aligned=False):
    b, t, h, _ = q.shape
    c, n_lv = chunk_size, s0.shape[2]
    acc, md = s0.dtype, q.dtype
    qc, kc, vc = (to_head_chunks(x, c) for x in (q, k, v))  # [B, H, N, C, .]
    n = qc.shape[2]
    lc = to_head_chunks(lam, c)  # [B, H, N, C, L]
    gc = None if g is None else to_chunks(pad_time(g, c), c)
    resets = None if segment_ids is None else to_chunks(segment_resets(pad_time(segment_ids, c, mode="edge")), c)
    dec = chunk_decays(gc, resets, (b, n, c, h), acc).heads_major()
    qr = qc * (dec.from_start * scale)[..., None]
    ke = (kc * dec.to_end[..., None]).astype(md)
    if aligned:
        al = aligned_levels(t, c, n_lv)
        pairs = jnp.broadcast_to(jnp.asarray(al.pairs), (b, n, c, c))
    else:
        # Edge-padded positions: the padded tail (zero keys) shares the last real position, so
        # the final stack is that of the last real token.
        fw = fenwick_chunks(to_chunks(pad_time(pos, c, mode="edge"), c), p0, n_lv, acc)
        pairs = fw.pairs

    # Intra-chunk: the hierarchical mask lambda[i, level(i, j)] exp(G_i - G_j) (0 across resets).
    scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc, preferred_element_type=acc)
    scores = scores * dec.matrix * gather_levels(lc, pairs) * scale
    o = jnp.einsum("bhnij,bhnjv->bhniv", scores.astype(md), vc, preferred_element_type=acc)
    # Inter-chunk: the carried stack, read per level and moved on.
    if not aligned:  # the stack of the chunk's previous token, moved to its last token
        u = key_levels(fw.keys, ke, vc, acc)
        stack, s = level_pass(s0, fw.remap, u, decay=dec.chunk)
        o = o + read_levels(qr.astype(md), gather_levels(lc, fw.read), stack, acc)
        return from_head_chunks(o, t), s
    # Aligned: the eager stack of the chunk's first query (levels >= first), one term per chunk.
    u = jnp.einsum("bhnck,bhncv->bhnkv", ke, vc, preferred_element_type=acc)
    stack, _ = level_pass(s0[:, :, al.first:], al.remap, u, decay=dec.chunk, u_level=al.keys)
    o = o + read_levels(qr.astype(md), lc[..., al.first:], stack, acc)
    last = stack[:, :, -1] * dec.chunk[:, :, -1, None, None, None]  # the last chunk's carried stack, at its end
    s = jnp.einsum("lm,bhlkv->bhmkv", jnp.asarray(al.final, acc), last)
    s = s + key_levels(jnp.asarray(al.last_keys, acc)[None, None], ke[:, :, -1:], vc[:, :, -1:], acc)[:, :, 0]
    return from_head_chunks(o, t), s
