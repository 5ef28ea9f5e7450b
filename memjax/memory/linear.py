"""Linear attention and gated (decaying) linear attention as one pure function.

Recurrence (per batch and head; ``S_t in R^{K x V}``, ``g_t <= 0`` a log decay)::

    S_t = exp(g_t) * S_{t-1} + k_t v_t^T          o_t = scale * S_t^T q_t

``g = None`` is plain linear attention (Katharopoulos et al. 2020); a per-head scalar ``g`` is
RetNet / Lightning Attention / simple GLA / Mamba-2-style gating. Feature maps (elu+1, Based's
Taylor map, ...) are applied to q and k by the caller (:mod:`memjax.memory.feature_maps`).

Three forms, one result:
  - ``"chunked"`` (training): chunks of ``C`` positions; within a chunk a masked ``C x C`` product
    with decay ``exp(G_i - G_j)``, between chunks one state update per chunk
    (:func:`memjax.kernels.chunk_pass`: a ``lax.scan``, or one Pallas kernel with
    ``impl="pallas"``). O(T C) work for the intra part, O(T/C) sequential steps, no per-token state.
  - ``"recurrent"``: token-by-token ``lax.scan`` (also the decoding form).
  - ``"parallel"``: the quadratic ``T x T`` form (one chunk covering the whole sequence); its
    decays use the cumulative ``g`` over the whole sequence, so for very long, strongly decaying
    sequences in float32 prefer ``"chunked"``.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import IMPLS
from memjax.memory.chunking import chunk_decays, from_head_chunks, pad_time, to_chunks, to_head_chunks
from memjax.memory.segments import segment_resets
from memjax.memory.sequence_parallel import check_axis, sequence_resets, sharded_chunk_recurrence

MODES = ("chunked", "recurrent", "parallel")


def check_inputs(fn: str, q, k, v, *, beta=None, g=None, initial_state=None, segment_ids=None,
                 mode: str, modes: tuple, chunk_size: int, scale=None, impl: str = "auto",
                 seq_axis: str | None = None) -> tuple[int, int, int, int, int]:
    """Validate the shared arguments of the matrix-memory functions; returns ``(B, T, H, K, V)``."""
    if mode not in modes:
        raise ValueError(f"{fn}: mode must be one of {modes}, got {mode!r}")
    if seq_axis is not None:
        if mode == "recurrent":
            forms = " or ".join(repr(m) for m in modes if m != "recurrent")
            raise ValueError(f"{fn}: seq_axis needs mode={forms} (the recurrent form is the single-device "
                             "decoding form)")
        check_axis(fn, seq_axis)
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")
    if getattr(q, "ndim", None) != 4:
        raise ValueError(f"{fn}: q must be [B, T, H, K], got shape {getattr(q, 'shape', None)}")
    b, t, h, dk = q.shape
    if t == 0:
        raise ValueError(f"{fn}: q has an empty time axis (T = 0)")
    if getattr(k, "shape", None) != q.shape:
        raise ValueError(f"{fn}: k must be [B, T, H, K] = {q.shape} like q, got {getattr(k, 'shape', None)}")
    if getattr(v, "ndim", None) != 4 or v.shape[:3] != (b, t, h):
        raise ValueError(f"{fn}: v must be [B, T, H, V] = [{b}, {t}, {h}, V], got {getattr(v, 'shape', None)}")
    dv = v.shape[3]
    for name, x in (("beta", beta), ("g", g)):
        if x is not None and getattr(x, "shape", None) != (b, t, h):
            raise ValueError(f"{fn}: {name} must be [B, T, H] = {(b, t, h)}, got {getattr(x, 'shape', None)}")
    if initial_state is not None and getattr(initial_state, "shape", None) != (b, h, dk, dv):
        raise ValueError(f"{fn}: initial_state must be [B, H, K, V] = {(b, h, dk, dv)}, "
                         f"got {getattr(initial_state, 'shape', None)}")
    if segment_ids is not None:
        if getattr(segment_ids, "shape", None) != (b, t):
            raise ValueError(f"{fn}: segment_ids must be [B, T] = {(b, t)}, got {getattr(segment_ids, 'shape', None)}")
        if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
            raise ValueError(f"{fn}: segment_ids must be an integer array, got dtype {segment_ids.dtype}")
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(f"{fn}: scale must be a scalar, got shape {jnp.shape(scale)}")
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")
    return b, t, h, dk, dv


def compute_dtype(*xs):
    """Float32 for bf16/f16/f32 inputs, float64 for float64 inputs (states and decays use it)."""
    return jnp.promote_types(jnp.result_type(*[x for x in xs if x is not None]), jnp.float32)


def linear_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, g: jax.Array | None = None,
                     scale: float | None = None, initial_state: jax.Array | None = None,
                     segment_ids: jax.Array | None = None, mode: str = "chunked",
                     chunk_size: int = 64, impl: str = "auto",
                     interpret: bool | None = None, seq_axis: str | None = None) -> tuple[jax.Array, jax.Array]:
    """(Gated) linear attention ``S_t = exp(g_t) S_{t-1} + k_t v_t^T``, ``o_t = scale * S_t^T q_t``.

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      g: ``[B, T, H]`` log decay (``<= 0`` for a contraction) or None (no decay).
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` state before ``t = 0`` (zeros if None).
      segment_ids: ``[B, T]`` int, packed documents: where the id changes the state is reset to
        zero before that token's update (``initial_state`` therefore only reaches the first one).
      mode: ``"chunked"``, ``"recurrent"`` or ``"parallel"`` (see the module docstring).
      chunk_size: ``C`` for ``"chunked"``. ``T`` need not be a multiple: the tail is padded with
        ``k = v = q = 0`` and ``g = 0`` (the state is unchanged) and the output sliced back.
      impl: the chunk-to-chunk state pass: ``"auto" | "xla" | "pallas"``
        (:mod:`memjax.kernels.chunk_pass`).
      interpret: run the Pallas kernel in interpret mode (CPU tests); only with ``impl="pallas"``.
      seq_axis: sequence parallelism (:mod:`memjax.memory.sequence_parallel`): call inside
        ``jax.shard_map`` with time split over this mesh axis; the inputs are this device's
        slice of the sequence, ``initial_state`` the state before the whole sequence. Returns
        this slice's outputs and the whole sequence's final state. Chunked / parallel modes.

    Returns:
      ``(o [B, T, H, V]`` in the inputs' dtype, ``final_state [B, H, K, V]`` float32, or float64
      for float64 inputs). All internal arithmetic and the state are in that dtype.
    """
    b, t, h, dk, dv = check_inputs("linear_attention", q, k, v, g=g, initial_state=initial_state,
                                   segment_ids=segment_ids, mode=mode, modes=MODES,
                                   chunk_size=chunk_size, scale=scale, impl=impl, seq_axis=seq_axis)
    out_dtype = jnp.result_type(q, k, v)
    cd = compute_dtype(q, k, v, g, initial_state)
    scale = dk ** -0.5 if scale is None else scale
    q, k, v = (x.astype(cd) for x in (q, k, v))
    g = None if g is None else g.astype(cd)
    s0 = jnp.zeros((b, h, dk, dv), cd) if initial_state is None else initial_state.astype(cd)
    if mode == "recurrent":
        o, s = _recurrent(q, k, v, g, s0, segment_resets(segment_ids), scale)
    else:
        o, s = _chunked(q, k, v, g, s0, segment_ids, scale, t if mode == "parallel" else chunk_size,
                        impl=impl, interpret=interpret, seq_axis=seq_axis)
    return o.astype(out_dtype), s


def _recurrent(q, k, v, g, s0, resets, scale):
    b, t, h, _ = q.shape

    def step(s, inp):
        qt, kt, vt, gt, rt = inp
        if gt is not None:
            s = s * jnp.exp(gt)[..., None, None]
        if rt is not None:
            s = jnp.where(rt[:, None, None, None], 0.0, s)
        s = s + kt[..., :, None] * vt[..., None, :]
        return s, jnp.einsum("bhk,bhkv->bhv", qt, s) * scale

    tm = lambda x: None if x is None else jnp.swapaxes(x, 0, 1)  # time-major for scan
    s, o = jax.lax.scan(step, s0, (tm(q), tm(k), tm(v), tm(g), tm(resets)))
    return jnp.swapaxes(o, 0, 1), s


def _chunked(q, k, v, g, s0, segment_ids, scale, chunk_size, *, impl, interpret, seq_axis=None):
    b, t, h, _ = q.shape
    c = chunk_size
    qc, kc, vc = (to_head_chunks(x, c) for x in (q, k, v))  # [B, H, N, C, .]
    n = qc.shape[2]
    gc = None if g is None else to_chunks(pad_time(g, c), c)
    resets = None if segment_ids is None else to_chunks(sequence_resets(pad_time(segment_ids, c, mode="edge"), seq_axis), c)
    dec = chunk_decays(gc, resets, (b, n, c, h), q.dtype).heads_major()

    # Parallel over chunks: causal, decayed, segment-masked scores (no softmax), queries
    # weighted by the decay since the chunk start, keys by the decay to the chunk end.
    scores = jnp.einsum("bhnik,bhnjk->bhnij", qc, kc) * dec.matrix * scale
    qg = qc * (dec.from_start * scale)[..., None]
    ke = kc * dec.to_end[..., None]
    o, s = sharded_chunk_recurrence(qg, scores, vc, ke, dec.chunk, s0, axis_name=seq_axis, impl=impl,
                                    interpret=interpret)
    return from_head_chunks(o, t), s
