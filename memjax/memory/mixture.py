"""Mixture-of-memories (MoM; Du et al. 2025, "MoM: Linear Sequence Modeling with Mixture-of-Memories").

``M`` matrix memories (plus, optionally, one shared memory) per head. A router picks, per token,
the ``top_k`` memories with the largest logits; only those are written, and the output mixes their
reads with the router weights renormalised over the selected memories::

    sel_t   = top_k(router_logits_t)                  w_t^m = softmax_{m in sel_t}(router_logits_t^m)
    S_t^m   = update(S_{t-1}^m; k_t^m, v_t^m, beta_t^m, g_t^m)    if m in sel_t (or m is shared)
    S_t^m   = S_{t-1}^m                                          otherwise (no write AND no decay)
    o_t     = sum_{m in sel_t} w_t^m scale S_t^m^T q_t  (+ scale S_t^shared^T q_t)

``update`` is linear attention (``memory="linear"``: ``S = exp(g) S + k v^T``) or the (gated) delta
rule (``memory="delta"``: ``S = exp(g) S; S += k (beta (v - S^T k))^T``). As in the paper, a memory
that is not selected is untouched by the token — its decay does not apply either, so it behaves
as if the token had been routed past it (the paper gathers each memory's tokens into its own
sequence). The shared memory sees every token and is read with weight 1. Keys, values and gates
are per memory (each memory has its own projections in MoM); the query is shared.

Routing granularity: ``router_logits`` is ``[B, T, M]`` (per token, the paper's choice, the same
routing for every head) or ``[B, T, H, M]`` (per token and head). Ties in the top-k are broken
toward the lower memory index (``lax.top_k``). The selection is not differentiable; gradients
reach the router through the mixing weights ``w``. A load-balancing loss, if wanted, is the
caller's business (the router logits are in its hands).

Implementation: the memories are folded into the head axis and one call of
:func:`memjax.memory.linear.linear_attention` /
:func:`memjax.memory.delta.delta_rule` runs them all, with ``k = 0`` (linear) or
``beta = 0`` (delta) and ``g = 0`` for unselected (token, memory) pairs, so all forms
(``"chunked"``, ``"recurrent"``, and ``"parallel"`` for linear attention), ``segment_ids`` and
``initial_state`` behave exactly as there. Every memory is computed for every token (work grows
with ``M``, not ``top_k``); that keeps the chunks dense and identical across memories.

Shapes: ``q [B, T, H, K]``, ``k [B, T, M', H, K]``, ``v [B, T, M', H, V]``, ``beta, g [B, T, M', H]``,
state ``[B, M', H, K, V]`` with ``M' = M + 1`` when ``shared_memory`` (the shared memory is the
last, index ``M``) and ``M' = M`` otherwise.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.memory import delta, linear
from memjax.memory import nonfinite
from memjax.memory.contract import (check_chunk_size, check_floating, check_gate, check_mode, check_scale,
                                    check_segment_ids, check_seq_axis, check_sequence, check_shape, check_state,
                                    output_dtype, resolve_scale, shape_of)
from memjax.memory.delta import delta_rule
from memjax.memory.linear import linear_attention

MEMORIES = ("linear", "delta")
MODES = {"linear": linear.MODES, "delta": delta.MODES}

def mixture_of_memories(q: jax.Array, k: jax.Array, v: jax.Array, router_logits: jax.Array, *,
                        top_k: int, beta: jax.Array | None = None, g: jax.Array | None = None,
                        memory: str = "linear", shared_memory: bool = True, scale: float | None = None,
                        initial_state: jax.Array | None = None, segment_ids: jax.Array | None = None,
                        mode: str = "chunked", chunk_size: int = 64,
                        seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """Route each token into ``top_k`` of ``M`` matrix memories (plus a shared one) and mix reads.

    Args:
      q: ``[B, T, H, K]`` shared query.
      k: ``[B, T, M', H, K]``, v: ``[B, T, M', H, V]``: per-memory keys and values.
      router_logits: ``[B, T, M]`` (per-token routing) or ``[B, T, H, M]`` (per token and head).
      top_k: memories selected per token, ``1 <= top_k <= M``.
      beta: ``[B, T, M', H]`` write strength, required for ``memory="delta"`` (must be None for
        ``"linear"``).
      g: ``[B, T, M', H]`` log decay or None.
      memory: ``"linear"`` or ``"delta"``.
      shared_memory: add an always-written memory (index ``M``), read with weight 1.
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, M', H, K, V]`` or None (zeros).
      segment_ids: ``[B, T]`` int packed documents: every memory is reset at a new document.
      mode, chunk_size: as in the underlying memory function.
      seq_axis: sequence parallelism, as in the underlying memory function (inside
        ``jax.shard_map``, time split over this mesh axis; :mod:`memjax.memory.sequence_parallel`).

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``final_state [B, M', H, K, V]`` float32, or float64 for
      float64 inputs); dtypes as in :mod:`memjax.memory.contract`.
    """
    fn = "mixture_of_memories"
    if memory not in MEMORIES:
        raise ValueError(f"{fn}: memory must be one of {MEMORIES}, got {memory!r}")
    check_mode(fn, mode, MODES[memory])
    check_chunk_size(fn, chunk_size)
    check_scale(fn, scale)
    b, t, h, dk = check_sequence(fn, "q", q, "[B, T, H, K]")
    if getattr(router_logits, "ndim", None) not in (3, 4) or router_logits.shape[:2] != (b, t) or (
            router_logits.ndim == 4 and router_logits.shape[2] != h):
        raise ValueError(f"{fn}: router_logits must have shape [B, T, M] = ({b}, {t}, M) or [B, T, H, M] = "
                         f"({b}, {t}, {h}, M), got {shape_of(router_logits)}")
    check_floating(fn, "router_logits", router_logits)
    m = router_logits.shape[-1]
    if isinstance(top_k, bool) or not isinstance(top_k, int) or not 1 <= top_k <= m:
        raise ValueError(f"{fn}: top_k must be an int in [1, M={m}], got {top_k!r}")
    mp = m + 1 if shared_memory else m
    check_shape(fn, "k", k, (b, t, mp, h, dk), "[B, T, M', H, K]")
    check_floating(fn, "k", k)
    dv = check_shape(fn, "v", v, (b, t, mp, h, None), "[B, T, M', H, V]")[4]
    check_floating(fn, "v", v)
    check_gate(fn, "beta", beta, (b, t, mp, h), "[B, T, M', H]")
    check_gate(fn, "g", g, (b, t, mp, h), "[B, T, M', H]")
    if memory == "delta" and beta is None:
        raise ValueError(f"{fn}: memory='delta' needs beta [B, T, M', H] = {(b, t, mp, h)}")
    if memory == "linear" and beta is not None:
        raise ValueError(f"{fn}: beta is only used by memory='delta'; got beta with memory='linear'")
    check_state(fn, initial_state, (b, mp, h, dk, dv), "[B, M', H, K, V]")
    check_segment_ids(fn, segment_ids, (b, t))
    check_seq_axis(fn, seq_axis, mode, tuple(x for x in MODES[memory] if x != "recurrent"))

    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite);
    # the memories below then see finite inputs only. A bad key, value, gate or routing logit
    # poisons every memory of the head (the routing decides which memories a token writes).
    # Under seq_axis the poison crosses shards (memjax.memory.nonfinite.running).
    per_head = lambda m: None if m is None else jnp.any(m, axis=2)  # [B, T, M', H] -> [B, T, H]
    route_bad = nonfinite.bad(router_logits, 3 if router_logits.ndim == 4 else 2)
    writes = nonfinite.either(per_head(nonfinite.bad(k, 4)), per_head(nonfinite.bad(v, 4)),
                              per_head(nonfinite.bad(beta, 4)), per_head(nonfinite.bad(g, 4, gate=True)),
                              route_bad if route_bad.ndim == 3 else route_bad[..., None])
    writes = jnp.broadcast_to(writes, (b, t, h))  # (a [B, T, 1] routing flag: every head)
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids, axis_name=seq_axis))
    q, k, v, beta, router_logits = (nonfinite.finite_or_zero(x) for x in (q, k, v, beta, router_logits))
    g = nonfinite.finite_gate(g)
    weights, selected = route(router_logits, top_k, h)  # [B, T, H, M] each
    if shared_memory:
        pad = [(0, 0)] * 3 + [(0, 1)]
        selected = jnp.pad(selected, pad, constant_values=True)
        weights = jnp.pad(weights, pad, constant_values=1.0)
    sel = jnp.swapaxes(selected, 2, 3)  # [B, T, M', H]
    fold = lambda x: x.reshape(b, t, mp * h, *x.shape[4:])  # memories into the head axis
    kw = dict(scale=resolve_scale(scale, dk), segment_ids=segment_ids, mode=mode,
              chunk_size=chunk_size, seq_axis=seq_axis,
              initial_state=None if initial_state is None else initial_state.reshape(b, mp * h, dk, dv))
    if g is not None:
        kw["g"] = fold(jnp.where(sel, g, 0.0))
    qf = fold(jnp.broadcast_to(q[:, :, None], (b, t, mp, h, dk)))
    if memory == "linear":
        o, s = linear_attention(qf, fold(jnp.where(sel[..., None], k, 0.0)), fold(v), **kw)
    else:
        o, s = delta_rule(qf, fold(k), fold(v), fold(jnp.where(sel, beta, 0.0)), **kw)
    o = o.reshape(b, t, mp, h, dv)
    w = jnp.swapaxes(weights, 2, 3)[..., None]  # [B, T, M', H, 1], 0 if unselected; float32 / float64
    # The mix accumulates in the router weights' precision; the output is in q's dtype.
    o = jnp.sum(w * o.astype(w.dtype), axis=2).astype(output_dtype(q))
    s = s.reshape(b, mp, h, dk, dv)
    # (the state's [B, M', H]: every memory of a poisoned head)
    return nonfinite.poison(o, mask), nonfinite.poison(s, nonfinite.last_token(mask, seq_axis)[:, None])


def route(router_logits: jax.Array, top_k: int, num_heads: int) -> tuple[jax.Array, jax.Array]:
    """Top-k routing: ``router_logits [B, T, M]`` or ``[B, T, H, M]`` -> ``(weights, selected)``,
    both ``[B, T, H, M]``: softmax of the logits over the selected memories (0 elsewhere) and the
    selection mask."""
    logits = router_logits.astype(jnp.promote_types(router_logits.dtype, jnp.float32))
    if logits.ndim == 3:
        logits = jnp.broadcast_to(logits[:, :, None], (*logits.shape[:2], num_heads, logits.shape[-1]))
    top, idx = jax.lax.top_k(logits, top_k)
    m = logits.shape[-1]
    selected = jnp.any(idx[..., :, None] == jnp.arange(m), axis=-2)
    w = jax.nn.softmax(top, axis=-1)
    weights = jnp.sum(w[..., :, None] * (idx[..., :, None] == jnp.arange(m)), axis=-2)
    return weights, selected
