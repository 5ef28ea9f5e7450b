"""Titans neural long-term memory: an MLP whose weights are trained at test time.

Behrouz, Zhong, Mirrokni 2025, "Titans: Learning to Memorize at Test Time". Per batch element and
head the memory is an MLP ``M`` with ``L = depth`` bias-free layers::

    M(x) = phi(... phi(x W_1) ...) W_L        W_1: [K, D_1], ..., W_L: [D_{L-1}, V]

(``depth = 1`` is the linear map ``M(x) = x W``, ``W: [K, V]``; ``phi`` is SiLU or GELU between
layers). Each token writes the pair ``(k_t, v_t)`` with one step of gradient descent with momentum
and weight decay on the associative loss ``l(M; k, v) = ||M(k) - v||^2`` (no 1/2, no mean)::

    s_t = eta_t s_{t-1} - theta_t grad_W l(M_{t-1}; k_t, v_t)       (surprise / momentum)
    M_t = (1 - alpha_t) M_{t-1} + s_t                                 (forgetting)
    o_t = M_t(q_t)                                                    (read after the write, no update)

``theta >= 0`` (learning rate), ``eta in (0, 1]`` (momentum decay), ``alpha in [0, 1)`` (weight
decay) are data-dependent ``[B, T, H]``. The read has no scale factor. A residual memory
``M(x) = x + f(x)`` (K = V) is obtained by passing ``v - k`` and adding ``q`` to the output.

Two algorithms (``mode``), each exact for its own definition:

- ``"recurrent"``: the per-token update above (``lax.scan`` over tokens).
- ``"chunked"``: the paper's parallel training form (Section 3.2). Time is split into chunks of
  ``C`` tokens; inside a chunk every gradient is taken at the weights of the chunk start
  ``M_{t'}`` (``t'`` = last position before the chunk) instead of ``M_{t-1}``::

      u_t = grad_W l(M_{t'}; k_t, v_t)
      s_t = eta_t s_{t-1} - theta_t u_t ;  M_t = (1 - alpha_t) M_{t-1} + s_t ;  o_t = M_t(q_t)

  Per layer the per-token gradient is the outer product ``u_t = a_t^T delta_t`` (layer input times
  output error), so unrolling the two linear recurrences inside the chunk gives, for ``t`` in the
  chunk and ``A_t = prod (1 - alpha)``, ``E_t = prod eta`` since the chunk start::

      W_t = A_t W_{t'} + d_t s_{t'} - sum_{j<=t} c_tj theta_j a_j^T delta_j
      c_tj = sum_{j<=i<=t} (A_t / A_i)(E_i / E_j),   d_t = sum_{i<=t} (A_t / A_i) E_i

  and every layer of the read ``o_t = M_{W_t}(q_t)`` is evaluated without forming ``W_t``:
  ``x W_t = A_t x W_{t'} + d_t x s_{t'} - sum_j c_tj theta_j (x . a_j) delta_j`` (the "dual form"
  of test-time training). One batched forward/backward per chunk gives all ``a_j, delta_j``; the
  decay ratios are masked segment sums of ``log(1 - alpha)`` and ``log eta`` (every exponent
  ``<= 0``, so nothing overflows); weights and momentum advance once per chunk.
  ``chunk_size = 1`` reproduces ``"recurrent"`` exactly; larger chunks are a different (cheaper,
  more parallel) algorithm, not an approximation of a fixed target.

  For ``depth = 1``, ``eta = 0`` and ``alpha = 0`` the recurrent form is the delta rule with
  ``beta = 2 theta``; with ``eta = 0`` and any ``alpha`` it is the gated delta rule with
  ``g = log(1 - alpha)``, ``beta = 2 theta / (1 - alpha)`` and values ``(1 - alpha) v``. The chunked
  form equals the recurrent one whenever the gradient at the chunk start equals the gradient at
  ``M_{t-1}``: e.g. depth 1, ``eta = alpha = 0`` and keys mutually orthogonal inside each chunk.

State: :class:`TitansState` ``(weights, momentum)``, each a tuple of ``depth`` arrays
``[B, H, D_in, D_out]`` in float32 (float64 for float64 inputs). ``params0`` (a tuple of
``[H, D_in, D_out]``) are the initial weights — meta-learned by the caller — used when
``initial_state`` is None and wherever a packed document starts (momentum restarts at 0).
Without ``params0`` the initial weights are zero, which is only useful for ``depth = 1``
(an MLP with zero weights receives zero gradient), so ``depth >= 2`` requires one of the two.

Chunk alignment: ``"chunked"`` starts its chunks at position 0 of the call and, with
``segment_ids``, at the first token of every document (chunks are document-relative, so a packed
row gives the same result as its documents run one by one). ``T`` need not be a multiple of ``C``:
the tail is padded and masked (padded tokens are excluded from every sum, the final state is the
state after the last real token). With ``segment_ids`` a chunk may need gradients at up to three
weight sets (the chunk carried in, a document-relative chunk starting mid-block, a new document
starting from ``params0``); the extra passes run only in blocks that need them. The ``initial_state`` is taken to sit at a chunk boundary, so
two calls chained through the final state equal one call when the first call's length is a
multiple of ``C``; :func:`titans_decode` continues a chunked computation from any position
(it keeps the unfinished chunk in a buffer) and is the decoding form of the chunked algorithm.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.memory import nonfinite
from memjax.memory.contract import (check_chunk_size, check_floating, check_gate, check_mode, check_qkv,
                                    check_segment_ids, check_shape, operand_dtype, output_dtype, state_dtype)

MODES = ("chunked", "recurrent")
ACTIVATIONS = {"silu": jax.nn.silu, "gelu": jax.nn.gelu}


class TitansState(NamedTuple):
    """Memory weights and momentum, each a tuple of ``[B, H, D_in, D_out]`` (one per layer)."""

    weights: tuple
    momentum: tuple


class TitansCache(NamedTuple):
    """Decoding state of the chunked form (see :func:`titans_decode`).

    ``state``: :class:`TitansState` at the last chunk boundary. ``k [B, C, H, K]``,
    ``v [B, C, H, V]``, ``theta``, ``eta``, ``alpha [B, C, H]``: the tokens of the unfinished
    chunk (first ``count`` slots valid). ``count``: int32 scalar in ``[0, C)``.
    """

    state: TitansState
    k: jax.Array
    v: jax.Array
    theta: jax.Array
    eta: jax.Array
    alpha: jax.Array
    count: jax.Array


# ----------------------------------------------------------------------------- validation


def _check_common(fn, q, k, v, theta, eta, alpha):
    b, t, h, dk, dv = check_qkv(fn, q, k, v)
    for name, x in (("theta", theta), ("eta", eta), ("alpha", alpha)):
        check_gate(fn, name, x, (b, t, h), required=True)
    return b, t, h, dk, dv


def _check_memory(fn, b, h, dk, dv, depth, params0, initial_state):
    """Resolve the layer widths ``[K, D_1, ..., V]`` from params0 / initial_state / depth."""
    dims = None
    if params0 is not None:
        if not isinstance(params0, (tuple, list)) or len(params0) == 0:
            raise ValueError(f"{fn}: params0 must be a non-empty tuple of [H, D_in, D_out] arrays")
        for i, w in enumerate(params0):
            check_shape(fn, f"params0[{i}]", w, (h, None, None), "[H, D_in, D_out]")
            check_floating(fn, f"params0[{i}]", w)
        dims = [params0[0].shape[1]] + [w.shape[2] for w in params0]
        for i in range(1, len(params0)):
            if params0[i].shape[1] != params0[i - 1].shape[2]:
                raise ValueError(f"{fn}: params0[{i}] must have shape [H, D_in, D_out] = "
                                 f"({h}, {params0[i - 1].shape[2]}, D_out) to follow params0[{i - 1}], "
                                 f"got {params0[i].shape}")
    if initial_state is not None:
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError(f"{fn}: initial_state must be TitansState(weights, momentum)")
        ws, ms = initial_state
        if not isinstance(ws, (tuple, list)) or not isinstance(ms, (tuple, list)) or len(ws) != len(ms) or not ws:
            raise ValueError(f"{fn}: initial_state.weights and .momentum must be tuples of equal length")
        sdims = []
        for i, (w, m) in enumerate(zip(ws, ms)):
            check_shape(fn, f"initial_state.weights[{i}]", w, (b, h, None, None), "[B, H, D_in, D_out]")
            check_shape(fn, f"initial_state.momentum[{i}]", m, w.shape, "[B, H, D_in, D_out]")
            check_floating(fn, f"initial_state.weights[{i}]", w)
            check_floating(fn, f"initial_state.momentum[{i}]", m)
            if i and w.shape[2] != ws[i - 1].shape[3]:
                raise ValueError(f"{fn}: initial_state.weights[{i}] must have shape [B, H, D_in, D_out] = "
                                 f"({b}, {h}, {ws[i - 1].shape[3]}, D_out), got {w.shape}")
            sdims = [ws[0].shape[2]] + [w.shape[3] for w in ws]
        if dims is not None and sdims != dims:
            raise ValueError(f"{fn}: initial_state layer widths {sdims} differ from params0's {dims}")
        dims = sdims
    if dims is None:
        if depth not in (None, 1):
            raise ValueError(f"{fn}: depth={depth} needs params0 or initial_state (an MLP with zero "
                             f"weights receives zero gradient, so zero initial weights never learn)")
        dims = [dk, dv]
    if depth is not None and depth != len(dims) - 1:
        raise ValueError(f"{fn}: depth={depth} but the given weights have {len(dims) - 1} layers")
    if dims[0] != dk or dims[-1] != dv:
        raise ValueError(f"{fn}: memory weights map {dims[0]} -> {dims[-1]}, expected K={dk} -> V={dv}")
    return dims


def _check_options(fn, mode, chunk_size, activation):
    check_mode(fn, mode, MODES)
    check_chunk_size(fn, chunk_size)
    if activation not in ACTIVATIONS:
        raise ValueError(f"{fn}: activation must be one of {tuple(ACTIVATIONS)}, got {activation!r}")


# ----------------------------------------------------------------------------- public API


def titans(q: jax.Array, k: jax.Array, v: jax.Array, theta: jax.Array, eta: jax.Array,
           alpha: jax.Array, *, params0: tuple | None = None, initial_state: TitansState | None = None,
           depth: int | None = None, activation: str = "silu", segment_ids: jax.Array | None = None,
           mode: str = "chunked", chunk_size: int = 16) -> tuple[jax.Array, TitansState]:
    """Titans neural memory (see the module docstring for the equations and both algorithms).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      theta, eta, alpha: ``[B, T, H]``: learning rate ``>= 0``, momentum decay in ``(0, 1]``,
        weight decay in ``[0, 1)`` (in ``"chunked"`` mode ``eta`` and ``1 - alpha`` enter through
        their logarithms, clamped at the dtype's smallest normal number).
      params0: tuple of ``depth`` arrays ``[H, D_in, D_out]`` (``D_in`` of the first is ``K``,
        ``D_out`` of the last is ``V``): initial / reset weights. None: zeros (depth 1 only).
      initial_state: :class:`TitansState` with ``[B, H, D_in, D_out]`` weights and momentum;
        None: ``params0`` (broadcast over batch) and zero momentum.
      depth: number of layers; inferred from ``params0`` / ``initial_state`` when None.
      activation: ``"silu"`` or ``"gelu"`` between layers.
      segment_ids: ``[B, T]`` int; where the id changes, weights reset to ``params0`` (or zero)
        and momentum to zero before that token's update. Chunks restart at every document.
      mode: ``"chunked"`` or ``"recurrent"``.
      chunk_size: ``C`` for ``"chunked"``.

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``final_state`` :class:`TitansState` after the last token,
      float32, or float64 for float64 inputs). Dtypes follow :mod:`memjax.memory.contract`: q, k, v
      keep their dtype (``q k^T`` is a matmul in it, accumulating in float32; where they meet the
      float32 memory weights they are promoted, so the memory is never rounded); the gates, the
      decay sums and the memory are float32.
    """
    fn = "titans"
    _check_options(fn, mode, chunk_size, activation)
    b, t, h, dk, dv = _check_common(fn, q, k, v, theta, eta, alpha)
    dims = _check_memory(fn, b, h, dk, dv, depth, params0, initial_state)
    check_segment_ids(fn, segment_ids, (b, t))
    out_dtype = output_dtype(q)
    cd = state_dtype(q, k, v, theta, eta, alpha, params0, initial_state)
    md = operand_dtype(q, k, v)
    act = ACTIVATIONS[activation]
    # q, k, v keep their dtype (matmuls accumulate in cd); the gates and the memory are cd.
    q, k, v = (x.astype(md) for x in (q, k, v))
    theta, eta, alpha = (x.astype(cd) for x in (theta, eta, alpha))
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite).
    writes = nonfinite.either(*(nonfinite.bad(x, 3) for x in (k, v, theta, eta, alpha)))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids))  # [B, T, H]
    q, k, v, theta, eta, alpha = (nonfinite.finite_or_zero(x) for x in (q, k, v, theta, eta, alpha))
    reset_w = _reset_weights(params0, b, h, dims, cd)
    state = _initial(initial_state, reset_w, cd)
    if mode == "recurrent":
        o, state = _recurrent(q, k, v, theta, eta, alpha, state, reset_w, segment_ids, act)
    else:
        o, state = _chunked_padded(q, k, v, theta, eta, alpha, state, reset_w, segment_ids, act,
                                   chunk_size, t)
    return nonfinite.poison_outputs(o.astype(out_dtype), state, mask)


def titans_init_cache(batch_size: int, num_heads: int, key_dim: int, value_dim: int, *,
                      params0: tuple | None = None, chunk_size: int = 16,
                      dtype=jnp.float32) -> TitansCache:
    """An empty :class:`TitansCache` whose memory is ``params0`` (or zeros) with zero momentum."""
    dims = _check_memory("titans_init_cache", batch_size, num_heads, key_dim, value_dim, None, params0, None)
    w = _reset_weights(params0, batch_size, num_heads, dims, dtype)
    c, b, h = chunk_size, batch_size, num_heads
    z = jnp.zeros((b, c, h), dtype)
    return TitansCache(TitansState(w, tuple(jnp.zeros_like(x) for x in w)),
                       jnp.zeros((b, c, h, key_dim), dtype), jnp.zeros((b, c, h, value_dim), dtype),
                       z, jnp.ones((b, c, h), dtype), z, jnp.zeros((), jnp.int32))


def titans_decode(q: jax.Array, k: jax.Array, v: jax.Array, theta: jax.Array, eta: jax.Array,
                  alpha: jax.Array, cache: TitansCache, *, activation: str = "silu",
                  chunk_size: int = 16) -> tuple[jax.Array, TitansCache]:
    """Continue the chunked algorithm for ``T >= 1`` new tokens from ``cache``.

    The new tokens are appended to the unfinished chunk held in ``cache``; every chunk that
    becomes complete advances the weights, the rest stays buffered. Any split of a sequence into
    ``titans_decode`` calls (a prompt, then one token at a time) gives the outputs of one
    ``titans(..., mode="chunked")`` call over the whole sequence. Per call the work is that of
    ``ceil((T + C) / C)`` chunks. Shapes as in :func:`titans`; returns ``(o [B, T, H, V], cache)``.
    """
    fn = "titans_decode"
    _check_options(fn, "chunked", chunk_size, activation)
    b, t, h, dk, dv = _check_common(fn, q, k, v, theta, eta, alpha)
    if not isinstance(cache, TitansCache):
        raise ValueError(f"{fn}: cache must be a TitansCache (see titans_init_cache)")
    _check_memory(fn, b, h, dk, dv, None, None, cache.state)
    c = chunk_size
    for name, x, shape in (("k", cache.k, (b, c, h, dk)), ("v", cache.v, (b, c, h, dv)),
                           ("theta", cache.theta, (b, c, h)), ("eta", cache.eta, (b, c, h)),
                           ("alpha", cache.alpha, (b, c, h))):
        dims = "[B, chunk_size, H" + {"k": ", K]", "v": ", V]"}.get(name, "]")
        check_shape(fn, f"cache.{name}", x, shape, dims)
    cd = state_dtype(q, k, v, theta, eta, alpha, cache.state)
    act = ACTIVATIONS[activation]
    n0 = cache.count
    # Sequence seen by the chunked core: the buffered tokens at [0, n0), the new ones at
    # [n0, n0 + T), padding after. Its chunk boundaries are the true ones.
    length = c * (-(-(c + t) // c))
    i = jnp.arange(length)
    from_buf = i < n0
    src_new = jnp.clip(i - n0, 0, t - 1)
    src_buf = jnp.minimum(i, c - 1)
    valid = i < n0 + t

    def assemble(new, buf):
        new, buf = new.astype(cd), buf.astype(cd)
        return jnp.where(_bcast(from_buf, new), jnp.take(buf, src_buf, axis=1), jnp.take(new, src_new, axis=1))

    qa = jnp.where(_bcast(from_buf, q), 0.0, jnp.take(q.astype(cd), src_new, axis=1))
    ka, va = assemble(k, cache.k), assemble(v, cache.v)
    tha, eta_a, ala = assemble(theta, cache.theta), assemble(eta, cache.eta), assemble(alpha, cache.alpha)
    state = jax.tree.map(lambda x: x.astype(cd), cache.state)
    meta = _chunk_meta(None, valid, b, length, c, full_only=True)
    o, state = _chunked(qa, ka, va, tha, eta_a, ala, state, None, meta, act, c)
    o = jnp.take(o, jnp.arange(t) + n0, axis=1).astype(output_dtype(q))
    total = n0 + t
    start = (total // c) * c
    pad = lambda x: jnp.pad(x, [(0, 0), (0, c)] + [(0, 0)] * (x.ndim - 2))
    take = lambda x: jax.lax.dynamic_slice_in_dim(pad(x), start, c, axis=1)
    buf_dtype = cache.k.dtype
    new_cache = TitansCache(state, take(ka).astype(buf_dtype), take(va).astype(buf_dtype),
                            take(tha).astype(buf_dtype), take(eta_a).astype(buf_dtype),
                            take(ala).astype(buf_dtype), (total % c).astype(jnp.int32))
    return o, new_cache


# ----------------------------------------------------------------------------- helpers


def _bcast(mask, like):
    """``[T]`` mask -> broadcastable against ``[B, T, ...]``."""
    return mask.reshape((1, -1) + (1,) * (like.ndim - 2))


def _reset_weights(params0, b, h, dims, cd):
    """The weights a document starts from: ``params0`` broadcast over the batch, or zeros."""
    if params0 is None:
        return tuple(jnp.zeros((b, h, i, o), cd) for i, o in zip(dims[:-1], dims[1:]))
    return tuple(jnp.broadcast_to(w.astype(cd)[None], (b,) + w.shape) for w in params0)


def _initial(initial_state, reset_w, cd):
    if initial_state is None:
        return TitansState(reset_w, tuple(jnp.zeros_like(w) for w in reset_w))
    return TitansState(tuple(w.astype(cd) for w in initial_state[0]),
                       tuple(m.astype(cd) for m in initial_state[1]))


def _dot(spec, *xs):
    """``einsum`` accumulating in float32 (float64 for float64 operands) whatever the operands'
    dtype: ``q k^T`` of bf16 inputs is a bf16 matmul with a float32 result; a bf16 input meeting
    the float32 memory is promoted (the memory is never rounded)."""
    acc = jnp.promote_types(jnp.result_type(*xs), jnp.float32)
    return jnp.einsum(spec, *xs, preferred_element_type=acc)


def _mlp(ws, x, act):
    for i, w in enumerate(ws):
        x = _dot("bhnd,bhde->bhne", x, w)
        if i < len(ws) - 1:
            x = act(x)
    return x


def _key_grads(ws, k, v, act):
    """Factors of the per-token gradients of ``||M(k) - v||^2`` at weights ``ws``.

    ``k [B, H, N, K]``, ``v [B, H, N, V]`` -> ``(a, delta)``: per layer ``i`` the layer inputs
    ``a_i [B, H, N, D_in]`` and loss gradients w.r.t. the layer outputs ``delta_i [B, H, N, D_out]``;
    token ``n``'s weight gradient is ``a_i[n]^T delta_i[n]``. Hand-written backward pass so that
    per-token gradients are never materialised.
    """
    a, z = [], []
    x = k
    for i, w in enumerate(ws):
        a.append(x)
        zi = _dot("bhnd,bhde->bhne", x, w)
        z.append(zi)
        x = act(zi) if i < len(ws) - 1 else zi
    deltas = [2.0 * (x - v)]
    for i in range(len(ws) - 1, 0, -1):
        back = _dot("bhne,bhde->bhnd", deltas[0], ws[i])
        _, dact = jax.jvp(act, (z[i - 1],), (jnp.ones_like(z[i - 1]),))
        deltas.insert(0, back * dact)
    return a, deltas


def _recurrent(q, k, v, theta, eta, alpha, state, reset_w, segment_ids, act):
    resets = None
    if segment_ids is not None:
        resets = jnp.concatenate([jnp.zeros_like(segment_ids[:, :1], bool),
                                  segment_ids[:, 1:] != segment_ids[:, :-1]], axis=1)

    out_dtype = output_dtype(q)

    def step(st, inp):
        qt, kt, vt, tht, et, at, rt = inp
        qt, kt, vt = (x.astype(tht.dtype) for x in (qt, kt, vt))  # one token: promoted inside the step
        ws, ms = st
        if rt is not None:
            r = rt[:, None, None, None]
            ws = tuple(jnp.where(r, w0, w) for w0, w in zip(reset_w, ws))
            ms = tuple(jnp.where(r, 0.0, m) for m in ms)
        a, d = _key_grads(ws, kt[:, :, None], vt[:, :, None], act)
        e4, th4, al4 = (x[:, :, None, None] for x in (et, tht, at))
        ms = tuple(e4 * m - th4 * _dot("bhnd,bhne->bhde", ai, di) for m, ai, di in zip(ms, a, d))
        ws = tuple((1.0 - al4) * w + m for w, m in zip(ws, ms))
        return TitansState(ws, ms), _mlp(ws, qt[:, :, None], act)[:, :, 0].astype(out_dtype)

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)
    state, o = jax.lax.scan(step, state, tuple(map(tm, (q, k, v, theta, eta, alpha, resets))))
    return jnp.swapaxes(o, 0, 1), state


def _chunked_padded(q, k, v, theta, eta, alpha, state, reset_w, segment_ids, act, c, t):
    b = q.shape[0]
    length = c * (-(-t // c))
    pad = lambda x, val=0.0: jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2),
                                     constant_values=val)
    # Padded tokens are masked out of every sum; eta = 1 keeps their logarithm finite.
    q, k, v, theta, alpha = (pad(x) for x in (q, k, v, theta, alpha))
    eta = pad(eta, 1.0)
    seg = None if segment_ids is None else jnp.pad(segment_ids, ((0, 0), (0, length - t)), mode="edge")
    meta = _chunk_meta(seg, jnp.arange(length) < t, b, length, c, full_only=False)
    o, state = _chunked(q, k, v, theta, eta, alpha, state, reset_w, meta, act, c)
    return o[:, :t], state


class _Meta(NamedTuple):
    group: jax.Array  # [B, L] int: id of the token's group (tokens sharing a gradient base); -1 invalid
    base: jax.Array | None  # [B, L] int: 0 carried chunk, 1 chunk started mid-block, 2 new document
    part1_last: jax.Array | None  # [B, L] float one-hot per block: last token before a base-1 group
    end: jax.Array  # [B, L] float one-hot per block: the token whose state is carried out
    advance: jax.Array  # [L // C] bool: whether the block advances the carried state
    cont: jax.Array | None  # [B, L] float: 1 where the next token belongs to the same group


def _chunk_meta(seg, valid, b, length, c, *, full_only):
    """Per-token bookkeeping for :func:`_chunked` over blocks of ``c`` positions.

    Without segments a group is a block. With segments a group is a document-relative chunk
    (``c`` tokens from a document start or from the previous group of the same document); a
    block then holds at most: the rest of a group carried in from the previous block (base 0),
    the next group of the same document (base 1), and groups of documents starting inside the
    block (base 2, which start from the reset weights).
    """
    i = jnp.arange(length)
    valid_b = jnp.broadcast_to(valid, (b, length))
    nxt_valid = jnp.concatenate([valid_b[:, 1:], jnp.zeros_like(valid_b[:, :1])], axis=1)
    block_last = (i % c) == c - 1
    end = (valid_b & (block_last | ~nxt_valid)).astype(jnp.float32)
    nb = length // c
    vb = valid.reshape(nb, c)
    advance = vb.all(axis=1) if full_only else vb.any(axis=1)
    if seg is None:
        group = jnp.where(valid_b, (i // c) * c, -1)
        return _Meta(group, None, None, end, advance, None)
    starts = jnp.concatenate([jnp.ones_like(seg[:, :1], bool), seg[:, 1:] != seg[:, :-1]], axis=1)
    doc_start = jax.lax.cummax(jnp.where(starts, i, 0), axis=1)
    g0 = doc_start + ((i - doc_start) // c) * c
    bs = (i // c) * c
    base = jnp.where((doc_start >= bs) & (doc_start > 0), 2, jnp.where(g0 > bs, 1, 0))
    nxt_base = jnp.concatenate([base[:, 1:], jnp.zeros_like(base[:, :1])], axis=1)
    part1_last = ((base == 0) & (nxt_base == 1) & ~block_last).astype(jnp.float32)
    group = jnp.where(valid_b, g0, -1)
    nxt_group = jnp.concatenate([group[:, 1:], jnp.full_like(group[:, :1], -1)], axis=1)
    cont = (valid_b & (nxt_group == group)).astype(jnp.float32)
    return _Meta(group, base, part1_last, end, advance, cont)


def _log_clamped(x):
    return jnp.log(jnp.maximum(x, jnp.finfo(x.dtype).tiny))


def _chunked(q, k, v, theta, eta, alpha, state, reset_w, meta, act, c):
    """Blocks of ``c`` tokens via ``lax.scan``; inputs ``[B, L, H, .]`` with ``L`` a multiple of ``c``."""
    b, length, h, _ = q.shape
    nb = length // c
    segmented = meta.base is not None
    # [B, L, H, D] -> [N, B, H, C, D]; [B, L, H] -> [N, B, H, C]; [B, L] -> [N, B, C]
    blk4 = lambda x: jnp.moveaxis(x.reshape(b, nb, c, h, x.shape[-1]), (1, 3), (0, 2))
    blk3 = lambda x: jnp.moveaxis(x.reshape(b, nb, c, h), (1, 3), (0, 2))
    blk2 = lambda x: None if x is None else jnp.moveaxis(x.reshape(b, nb, c), 1, 0)
    xs = (blk4(q), blk4(k), blk4(v), blk3(theta), blk3(_log_clamped(1.0 - alpha)), blk3(_log_clamped(eta)),
          blk2(meta.group), blk2(meta.base), blk2(meta.part1_last), blk2(meta.end), meta.advance,
          blk2(meta.cont))
    # With segments a group may straddle two blocks, so the carry also holds the weights at
    # which the current group's gradients are taken.
    carry = (state, state.weights) if segmented else (state, None)

    def body(carry, inp):
        carry, o = _block(carry, inp, reset_w, act, c)
        return carry, o.astype(q.dtype)  # the inputs' dtype: the stacked outputs move those bytes

    (state, _), o = jax.lax.scan(body, carry, xs)
    o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(b, length, h, -1)
    return o, state


def _segsum_decay(x, mask):
    """``x [B, H, C]`` log factors ``<= 0`` -> ``[B, H, C, C]``: ``exp(sum_{j<m<=t} x_m)`` where
    ``mask[t, j]``, else 0. Sums of same-sign terms (no ``G_t - G_j`` cancellation)."""
    c = x.shape[-1]
    idx = jnp.arange(c)
    strict = idx[:, None] > idx[None, :]  # [m, j]: m > j
    terms = jnp.where(strict, x[..., :, None], 0.0)  # [B, H, m, j]
    sums = jnp.cumsum(terms, axis=-2)  # [t, j] = sum_{j < m <= t} x_m
    return jnp.exp(jnp.where(mask, sums, -jnp.inf))


def _block(carry, inp, reset_w, act, c):
    (state, gbase) = carry
    q, k, v, theta, la, le, group, base, part1_last, end, advance, cont = inp
    ws0, ms0 = state
    idx = jnp.arange(c)
    causal = idx[:, None] >= idx[None, :]
    mask = (causal & (group[:, :, None] == group[:, None, :]))[:, None]  # [B, 1, C, C]
    maskf = mask.astype(la.dtype)
    decay_a = _segsum_decay(la, mask)  # A_t / A_i
    decay_e = _segsum_decay(le, mask)  # E_i / E_j
    a_vec = jnp.exp(jnp.einsum("bxtj,bhj->bht", maskf, la))  # A_t since the group start
    e_vec = jnp.exp(jnp.einsum("bxtj,bhj->bht", maskf, le))  # E_t since the group start
    d_vec = jnp.einsum("bhti,bhi->bht", decay_a, e_vec)
    cmat = jnp.einsum("bhti,bhij->bhtj", decay_a, decay_e)
    cw = cmat * theta[:, :, None, :]  # c_tj theta_j
    ew = decay_e * theta[:, :, None, :]  # (E_t / E_j) theta_j

    def state_at(row, ws_base, ms_base, a, d):
        """State after token ``row`` (one-hot ``[B, C]``) of a group whose base is given."""
        pick = lambda m: jnp.einsum("bt,bht...->bh...", row, m)
        at, dt, et = (pick(x)[..., None, None] for x in (a_vec, d_vec, e_vec))
        cr, er = pick(cw), pick(ew)
        upd_w = [_dot("bhj,bhjd,bhje->bhde", cr, ai, di) for ai, di in zip(a, d)]
        upd_m = [_dot("bhj,bhjd,bhje->bhde", er, ai, di) for ai, di in zip(a, d)]
        ws = tuple(at * w + dt * m - u for w, m, u in zip(ws_base, ms_base, upd_w))
        ms = tuple(et * m - u for m, u in zip(ms_base, upd_m))
        return ws, ms

    if base is None:
        a, d = _key_grads(ws0, k, v, act)
        bases = [(ws0, ms0)]
        sel = None
    else:
        zeros_m = tuple(jnp.zeros_like(w) for w in reset_w)
        sel = base[:, None, :, None]  # [B, 1, C, 1]
        a0, d0 = _key_grads(gbase, k, v, act)
        # Blocks without a document start (or without a chunk starting mid-block) skip the
        # extra gradient passes at run time, so unpacked data costs about what it does
        # without segment_ids.
        grads_if = lambda pred, ws: jax.lax.cond(pred, lambda: _key_grads(ws, k, v, act),
                                                 lambda: jax.tree.map(jnp.zeros_like, (a0, d0)))
        a2, d2 = grads_if(jnp.any(base == 2), reset_w)
        a = [jnp.where(sel == 2, x2, x0) for x0, x2 in zip(a0, a2)]
        d = [jnp.where(sel == 2, x2, x0) for x0, x2 in zip(d0, d2)]
        # The group starting inside the block takes its gradients at the state reached after
        # the carried group's last token, which needs that group's gradients first.
        ws1, ms1 = state_at(part1_last, ws0, ms0, a, d)
        a1, d1 = grads_if(jnp.any(base == 1), ws1)
        a = [jnp.where(sel == 1, x1, x) for x1, x in zip(a1, a)]
        d = [jnp.where(sel == 1, x1, x) for x1, x in zip(d1, d)]
        bases = [(ws0, ms0), (ws1, ms1), (reset_w, zeros_m)]

    # Read o_t = M_{W_t}(q_t) layer by layer without forming W_t.
    x = q
    dense = lambda x, i, wb, mb: (a_vec[..., None] * _dot("bhtd,bhde->bhte", x, wb[i])
                                  + d_vec[..., None] * _dot("bhtd,bhde->bhte", x, mb[i]))
    for i in range(len(ws0)):
        z = dense(x, i, *bases[0])
        if sel is not None:
            def other_bases(z, x=x, i=i):
                for j in (1, 2):
                    z = jnp.where(sel == j, dense(x, i, *bases[j]), z)
                return z
            z = jax.lax.cond(jnp.any(base > 0), other_bases, lambda z: z, z)
        scores = _dot("bhtd,bhjd->bhtj", x, a[i]) * cw  # layer 0: q k^T in the inputs' dtype
        z = z - _dot("bhtj,bhje->bhte", scores, d[i])
        x = act(z) if i < len(ws0) - 1 else z

    if base is None:
        ws_end, ms_end = state_at(end, ws0, ms0, a, d)
        new_g = None
    else:
        end_base = jnp.einsum("bt,bt->b", end, base.astype(end.dtype)).astype(jnp.int32)
        pick_b = lambda xs: tuple(
            jnp.where((end_base == 1)[:, None, None, None], x1,
                      jnp.where((end_base == 2)[:, None, None, None], x2, x0)) for x0, x1, x2 in zip(*xs))
        ws_b = pick_b([bases[0][0], bases[1][0], bases[2][0]])
        ms_b = pick_b([bases[0][1], bases[1][1], bases[2][1]])
        ws_end, ms_end = state_at(end, ws_b, ms_b, a, d)
        # The next block's carried group is this block's last group if it goes on, else a group
        # starting at the block boundary, whose gradients are taken at the state reached there.
        goes_on = jnp.einsum("bt,bt->b", end, cont)[:, None, None, None] > 0
        new_g = tuple(jnp.where(goes_on, g, w) for g, w in zip(pick_b([gbase, ws1, reset_w]), ws_end))
    new_state = TitansState(ws_end, ms_end)
    keep = lambda new, old: jax.tree.map(lambda n_, o_: jnp.where(advance, n_, o_), new, old)
    state = keep(new_state, state)
    if gbase is not None:
        gbase = keep(new_g, gbase)
    return (state, gbase), x
