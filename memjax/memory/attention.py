"""Causal softmax attention (the exact-memory baseline) as a pure function, plus RoPE.

Shapes: ``q: [B, T, H, K]``, ``k: [B, S, Hkv, K]``, ``v: [B, S, Hkv, V]`` with ``H % Hkv == 0``
(grouped-query attention). ``o_t = sum_s softmax_s(scale * q_t . k_s + D_ts + mask_ts) v_s``.

Forgetting Attention (FoX, Lin et al. 2025): ``forget_gate = g: [B, T, H]``, per query head the
natural log of a forget gate ``f_t in (0, 1]`` (e.g. ``log_sigmoid`` of a projection), adds the
decay bias ``D_ts = G_t - G_s = sum_{s < l <= t} g_l`` with ``G = cumsum(g)`` (float32; float64
for float64 inputs) to the logits of every visible pair; ``g = 0`` is plain attention. A KV cache
carries ``G`` of every cached key instead (``q_gate_cumsum`` / ``k_gate_cumsum``), so a decoding
step adds ``G_t - G_s`` without the gates of the past. ``g = -inf`` is a full reset: a query
after it sees no key before it (computed as a mask, never as ``-inf - -inf``).

Implementations of :func:`causal_attention` (``impl``):

- ``"xla"`` the masked softmax written out here (forms the ``[B, H, T, S]`` logits; every case).
- ``"cudnn"`` cuDNN's fused flash attention through ``jax.nn.dot_product_attention`` (GPU, bf16 /
  f16, causal self-attention with an optional sliding window; no packed segments,
  explicit positions or cache masks). A forget gate goes in as a dense bias
  ``[B, H, T, T]`` in ``q``'s dtype (cuDNN's ``bias`` argument, differentiated by
  cuDNN's ``dbias``); only on request: bf16 rounds ``D`` by up to ``|D| / 256``.
- ``"chunked"`` the online-softmax recurrence over key/value blocks
  (:mod:`memjax.memory.flash_attention`, Rabe & Staats 2021 / FlashAttention-2): O(T)
  memory forward and backward (a ``custom_vjp`` that recomputes each block), every case
  the XLA form covers; with default positions it visits only the key blocks a query
  block can see (causal, window).
- ``"splash"`` JAX's own Pallas TPU splash-attention kernel through
  :mod:`memjax.kernels.splash_attention` (causal, window, packed segments, GQA; T and S
  multiples of 128; no explicit positions, cache masks or forget gate); TPU targets,
  on CPU only with ``interpret=True`` (tests).
- ``"auto"`` cuDNN (GPU) or splash (TPU) where it applies *and* the device is in ``VERIFIED_DEVICES`` (it has run this
  library's checks there); otherwise ``"chunked"`` when queries and keys both number at
  least ``CHUNKED_MIN_LENGTH`` (measured on XLA:CPU, benchmarks/bench_attention.py), XLA
  below. None is verified yet. With a forget gate cuDNN is never chosen by ``auto``
  (the XLA and chunked forms keep ``D`` in float32).
"""
from __future__ import annotations

import numbers

import jax
import jax.numpy as jnp

from memjax.kernels import splash_attention as splash
from memjax.kernels.pallas_common import on_verified_device
from memjax.kernels.platform import target_platform
from memjax.memory import nonfinite
from memjax.memory.contract import check_floating, check_gate, state_dtype
from memjax.memory.flash_attention import flash_attention
from memjax.memory.segments import document_ids, segment_cumsum, segment_starts

# Every implementation name in one tuple (a new kernel, e.g. "splash", is one entry here plus its branch).
IMPLS = ("auto", "xla", "cudnn", "chunked", "splash")
# "auto" takes the chunked path when T and S are both at least this long. XLA:CPU (2 loaded cores,
# benchmarks/bench_attention.py -> benchmarks/results/attention_cpu.json, B 1, H 8, K 64, f32): at
# T = 512 the chunked form is 3x faster forward, 2.4x forward + backward, with 3x fewer planned
# temporaries, and the gap grows with T (16x less memory at 2048). It also won at 256, but short
# sequences (tests, decoding steps) stay on the dense form, the simpler program to compile.
CHUNKED_MIN_LENGTH = 512
# backend -> device-kind prefixes where impl="cudnn" / "splash" has passed the GPU benchmark's comparison
# with the XLA form. Empty: cuDNN attention has not run under this library yet.
VERIFIED_DEVICES: dict[str, tuple[str, ...]] = {}


def rope(x: jax.Array, positions: jax.Array, theta: float = 10000.0) -> jax.Array:
    """Rotary embedding of ``x: [B, T, H, K]`` (K even) at ``positions: [B, T]`` (half-split layout)."""
    k = x.shape[-1]
    if k % 2:
        raise ValueError(f"rope needs an even head dim, got {k}")
    freqs = theta ** (-jnp.arange(0, k // 2, dtype=jnp.float32) * 2.0 / k)
    ang = positions.astype(jnp.float32)[..., None, None] * freqs  # [B, T, 1, K/2]
    cos, sin = jnp.cos(ang), jnp.sin(ang)
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., : k // 2], xf[..., k // 2:]
    return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def attention_mask(q_pos: jax.Array, k_pos: jax.Array, *, window: int = 0,
                   q_seg: jax.Array | None = None, k_seg: jax.Array | None = None,
                   k_valid: jax.Array | None = None) -> jax.Array:
    """``[B, T, S]`` bool: causal (``k_pos <= q_pos``), within ``window`` if > 0, same segment."""
    m = k_pos[:, None, :] <= q_pos[:, :, None]
    if window > 0:
        m &= k_pos[:, None, :] > q_pos[:, :, None] - window
    if q_seg is not None:
        m &= q_seg[:, :, None] == k_seg[:, None, :]
    if k_valid is not None:
        m &= k_valid[:, None, :]
    return m


def cudnn_unsupported(q, k, v, *, segment_ids=None, q_positions=None, k_positions=None,
                      k_valid=None, gate_cumsums: bool = False) -> str | None:
    """Why ``impl="cudnn"`` cannot run this call, or None if it can (``gate_cumsums``: the call
    passes ``q_gate_cumsum`` / ``k_gate_cumsum``)."""
    if segment_ids is not None:
        return "segment_ids (packed documents)"
    if q_positions is not None or k_positions is not None or k_valid is not None or gate_cumsums:
        return "explicit positions, k_valid or gate cumsums (decoding with a KV cache)"
    if q.shape[1] != k.shape[1]:
        return f"queries and keys of different lengths ({q.shape[1]} vs {k.shape[1]})"
    if not all(x.dtype in (jnp.bfloat16, jnp.float16) for x in (q, k, v)):
        return f"dtype {q.dtype} (cuDNN flash attention takes bfloat16 / float16)"
    if q.shape[3] % 8 or q.shape[3] > 128 or v.shape[3] != q.shape[3]:
        return f"head dims K = {q.shape[3]}, V = {v.shape[3]} (equal, a multiple of 8, at most 128)"
    return None


# A logit offset that removes a key (softmax weight exp(-1e4) = 0) yet is finite in float16 and
# bfloat16, so cuDNN never subtracts two infinities.
_FAR = 1e4


def gate_cumsums(g: jax.Array, dtype, segment_ids: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
    """``(G, n)`` of log forget gates ``g: [B, T, H]``: ``G = cumsum(g)`` over time in ``dtype``
    with every ``-inf`` (full reset) counted as 0, and ``n: [B, T, H]`` int32, the resets so far.
    ``D_ts = G_t - G_s`` holds where ``n_t == n_s``; elsewhere a reset lies in ``(s, t]`` and
    ``D_ts = -inf`` (the key is gone). Both are finite, so no ``-inf - -inf`` arises.
    With ``segment_ids [B, T]`` the sum restarts at each document (a segmented scan whose restart
    is a ``where``, not a subtraction), so one document's ``G`` is bit-independent of the others'
    gates; across documents attention is masked anyway."""
    reset = g == -jnp.inf
    x = jnp.where(reset, jnp.zeros((), dtype), g.astype(dtype))
    if segment_ids is None:
        cum = jnp.cumsum(x, axis=1)
    else:
        cum = segment_cumsum(x, segment_starts(segment_ids)[:, :, None], axis=1)
    return cum, jnp.cumsum(reset.astype(jnp.int32), axis=1)


def forget_bias(g: jax.Array, *, window: int = 0, dtype=None) -> jax.Array:
    """The dense ``[B, H, T, T]`` FoX bias of self-attention for ``jax.nn.dot_product_attention``:
    ``D_ts = G_t - G_s`` where ``s`` is visible (causal, in the window), ``max(D, -1e4)`` so it
    stays finite in 16-bit dtypes, ``-1e4`` behind a reset, 0 where the kernel masks anyway."""
    t = g.shape[1]
    cum, n = gate_cumsums(g, state_dtype(g))
    cum, n = jnp.swapaxes(cum, 1, 2), jnp.swapaxes(n, 1, 2)  # [B, H, T]
    i = jnp.arange(t)
    visible = i[None, :] <= i[:, None]
    if window > 0:
        visible &= i[None, :] > i[:, None] - window
    d = jnp.maximum(cum[..., :, None] - cum[..., None, :], -_FAR)
    bias = jnp.where(n[..., :, None] == n[..., None, :], d, -_FAR)
    return jnp.where(visible, bias, 0.0).astype(dtype or g.dtype)


def fused_attention(q, k, v, *, scale: float, window: int = 0, forget_gate: jax.Array | None = None,
                    implementation: str = "cudnn") -> jax.Array:
    """Causal (optionally sliding-window) self-attention through ``jax.nn.dot_product_attention``:
    the same function as the ``"xla"`` form of :func:`causal_attention` when ``segment_ids`` and
    positions are left out. ``forget_gate: [B, T, H]`` goes in as :func:`forget_bias` (in ``q``'s
    dtype). ``implementation="xla"`` runs anywhere (the tests check the argument mapping with it);
    ``"cudnn"`` is the fused GPU kernel."""
    bias = None if forget_gate is None else forget_bias(forget_gate, window=window, dtype=q.dtype)
    return jax.nn.dot_product_attention(q, k, v, bias, scale=scale, is_causal=True,
                                        local_window_size=(window - 1, 0) if window > 0 else None,
                                        implementation=implementation)


def _use_cudnn(impl: str, reason: str | None, forget: bool = False) -> bool:
    if impl == "cudnn":
        if reason is not None:
            raise ValueError(f"causal_attention: impl='cudnn' does not support {reason}; use impl='xla' or 'auto'")
        return True
    # With a forget gate, "auto" stays on XLA: cuDNN would take D as a dense bias in q's dtype
    # (bf16 rounds it by up to |D| / 256), and that form has not run on a device yet.
    return (impl == "auto" and reason is None and not forget
            and on_verified_device(VERIFIED_DEVICES, target_platform()))


def _check_forget(b, t, s, h, forget_gate, q_gate_cumsum, k_gate_cumsum) -> None:
    """Shapes and dtypes of the FoX arguments, before any compute."""
    fn = "causal_attention"
    if forget_gate is not None:
        if q_gate_cumsum is not None or k_gate_cumsum is not None:
            raise ValueError(f"{fn}: give forget_gate (self-attention) or q_gate_cumsum and k_gate_cumsum "
                             "(a KV cache), not both")
        check_gate(fn, "forget_gate", forget_gate, (b, t, h))
        if s != t:
            raise ValueError(f"{fn}: forget_gate needs keys of the queries' length (self-attention), got "
                             f"T = {t}, S = {s}; with a KV cache pass q_gate_cumsum and k_gate_cumsum")
    elif (q_gate_cumsum is None) != (k_gate_cumsum is None):
        raise ValueError(f"{fn}: q_gate_cumsum and k_gate_cumsum go together (got only one)")
    elif q_gate_cumsum is not None:
        check_gate(fn, "q_gate_cumsum", q_gate_cumsum, (b, t, h))
        check_gate(fn, "k_gate_cumsum", k_gate_cumsum, (b, s, h), "[B, S, H]")


def _use_splash(impl: str, q, k, v, *, segment_ids, interpret: bool, others: dict) -> bool:
    """Whether to run JAX's splash kernel: on request (then anything it cannot do is an error), or
    under ``auto`` where it applies on a TPU target that is in ``VERIFIED_DEVICES``."""
    if impl not in ("splash", "auto"):
        return False
    given = sorted(name for name, x in others.items() if x is not None)
    platform = "tpu" if interpret and impl == "splash" else target_platform()
    reason = (f"{', '.join(given)} (causal / window / segment_ids / GQA only)" if given
              else splash.unsupported(q, k, v, segment_ids=segment_ids, platform=platform))
    if impl == "splash":
        if reason:
            raise ValueError(f"causal_attention: impl='splash' does not support {reason}; use impl='xla' or 'auto'")
        return True
    return reason is None and platform == "tpu" and on_verified_device(VERIFIED_DEVICES, "tpu")


def causal_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float | None = None,
                     segment_ids: jax.Array | None = None, window: int = 0,
                     q_positions: jax.Array | None = None, k_positions: jax.Array | None = None,
                     k_valid: jax.Array | None = None, forget_gate: jax.Array | None = None,
                     q_gate_cumsum: jax.Array | None = None, k_gate_cumsum: jax.Array | None = None,
                     impl: str = "auto", interpret: bool = False) -> jax.Array:
    """Masked softmax attention; returns ``o: [B, T, H, V]`` (softmax in float32, float64 for float64 inputs).

    ``o_t = sum_s softmax_s(scale * q_t . k_s + D_ts) v_s`` over the visible keys ``s`` (causal,
    window, document, ``k_valid``), ``D = 0`` without a forget gate.
    ``forget_gate: [B, T, H]`` (self-attention, ``S = T``; per query head, any floating dtype):
    log forget gates ``g <= 0``, ``D_ts = G_t - G_s``, ``G = cumsum_t(g)`` in float32 (float64 if an
    input is float64). A ``g = -inf`` hides every earlier key from the queries from it on.
    ``q_gate_cumsum: [B, T, H]``, ``k_gate_cumsum: [B, S, H]`` (both or neither; not with
    ``forget_gate``): the cumulative gates ``G`` of the queries and of the keys themselves, as a
    KV cache keeps them (``D_ts = G_q,t - G_k,s``); entries must be finite.

    Default positions are ``0..T-1`` for queries and ``0..S-1`` for keys (self-attention).
    ``window > 0`` keeps only the last ``window`` keys (sliding-window attention); a negative
    ``window`` is a ``ValueError``.
    ``segment_ids: [B, T]`` (self-attention only) masks attention across packed documents; each
    contiguous run of an id is one document (:func:`memjax.memory.segments.document_ids`, the rule
    of the recurrent memories), so an id reused later in the row starts a new document.
    The XLA form keeps non-finite inputs causal (:mod:`memjax.memory.nonfinite`): a NaN key or
    value makes NaN exactly the rows that attend to it, a NaN query its own row.
    ``impl``: ``"auto" | "xla" | "cudnn" | "chunked" | "splash"`` (module docstring).
    ``interpret``: run the splash kernel in the Pallas interpreter (any backend; tests).
    """
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"q, k, v must be [B, T, H, D]; got q{q.shape} k{k.shape} v{v.shape}")
    b, t, h, dk = q.shape
    s, hkv = k.shape[1], k.shape[2]
    if k.shape[0] != b or k.shape[3] != dk or v.shape[:3] != k.shape[:3] or h % hkv:
        raise ValueError(f"k{k.shape} / v{v.shape} do not match q{q.shape}")
    for name, x in (("q", q), ("k", k), ("v", v)):
        check_floating("causal_attention", name, x)
    if impl not in IMPLS:
        raise ValueError(f"causal_attention: impl must be one of {IMPLS}, got {impl!r}")
    if isinstance(window, bool) or not isinstance(window, numbers.Integral) or window < 0:
        raise ValueError(f"causal_attention: window must be an int >= 0 (0: no window), got {window!r}")
    _check_forget(b, t, s, h, forget_gate, q_gate_cumsum, k_gate_cumsum)
    scale = dk ** -0.5 if scale is None else scale
    reason = cudnn_unsupported(q, k, v, segment_ids=segment_ids, q_positions=q_positions,
                               k_positions=k_positions, k_valid=k_valid, gate_cumsums=q_gate_cumsum is not None)
    if _use_cudnn(impl, reason, forget=forget_gate is not None):
        gate = {} if forget_gate is None else {"forget_gate": forget_gate}
        return fused_attention(q, k, v, scale=scale, window=window, **gate)
    if _use_splash(impl, q, k, v, segment_ids=segment_ids, interpret=interpret,
                   others=dict(q_positions=q_positions, k_positions=k_positions, k_valid=k_valid,
                               forget_gate=forget_gate, q_gate_cumsum=q_gate_cumsum)):
        return splash.splash_attention(q, k, v, scale=scale, segment_ids=segment_ids, window=window,
                                       interpret=interpret)
    if impl == "chunked" or (impl == "auto" and min(t, s) >= CHUNKED_MIN_LENGTH):
        return _chunked(q, k, v, scale=scale, segment_ids=segment_ids, window=window, q_positions=q_positions,
                        k_positions=k_positions, k_valid=k_valid, forget_gate=forget_gate,
                        q_gate_cumsum=q_gate_cumsum, k_gate_cumsum=k_gate_cumsum)
    if q_positions is None:
        q_positions = jnp.broadcast_to(jnp.arange(t), (b, t))
    if k_positions is None:
        k_positions = jnp.broadcast_to(jnp.arange(s), (b, s))
    # Each contiguous run of an id is its own document (the rule of every recurrent memory:
    # memjax.memory.segments), so [1, 1, 2, 2, 1, 1] is three documents, not two.
    seg = None if segment_ids is None else document_ids(segment_ids)
    mask = attention_mask(q_positions, k_positions, window=window, q_seg=seg, k_seg=seg, k_valid=k_valid)
    # A non-finite query poisons its own row, a non-finite key or value every row that sees it
    # (memjax.memory.nonfinite): `p @ v` would otherwise spread 0 * NaN to rows that mask it.
    r = h // hkv
    bad_kv = jnp.repeat(nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3)), r, axis=2)  # [B, S, H]
    bad_kv = nonfinite.either(bad_kv, nonfinite.bad(k_gate_cumsum, 3))
    seen = jnp.einsum("bts,bsh->bth", mask.astype(jnp.float32), bad_kv.astype(jnp.float32)) > 0
    poisoned = nonfinite.either(nonfinite.bad(q, 3), seen, nonfinite.bad(q_gate_cumsum, 3))  # [B, T, H]
    q, k, v = (nonfinite.finite_or_zero(x) for x in (q, k, v))
    qg = q.reshape(b, t, hkv, r, dk)
    acc = jnp.promote_types(q.dtype, jnp.float32)  # float32 softmax; float64 for float64 inputs
    logits = jnp.einsum("btgrk,bsgk->bgrts", qg, k, preferred_element_type=acc) * scale
    keep = mask[:, None, None]  # [B, 1, 1, T, S]
    if forget_gate is not None or q_gate_cumsum is not None:
        decay, same = _decay(b, t, s, hkv, r, forget_gate, q_gate_cumsum, k_gate_cumsum, segment_ids)
        if forget_gate is not None:  # a NaN / +inf gate poisons its head from there to the document's end
            poisoned = nonfinite.either(poisoned, nonfinite.running(nonfinite.bad(forget_gate, 3, gate=True),
                                                                    segment_ids))
        if same is not None:
            keep = keep & same
        # `where` on the sum: a masked pair never adds its (finite but meaningless) decay
        logits = jnp.where(keep, logits + decay.astype(acc), -1e30)
    else:
        logits = jnp.where(keep, logits, -1e30)
    p = jax.nn.softmax(logits, axis=-1)
    p = jnp.where(keep, p, 0.0)  # rows with no visible key give 0, not a uniform average
    o = jnp.einsum("bgrts,bsgv->btgrv", p.astype(v.dtype), v)
    return nonfinite.poison(o.reshape(b, t, h, v.shape[-1]), poisoned)


def _decay(b, t, s, hkv, r, forget_gate, q_gate_cumsum, k_gate_cumsum, segment_ids):
    """``(D, same)``: the FoX bias ``D_ts = G_t - G_s`` as ``[B, Hkv, r, T, S]`` (the logits'
    layout) from sanitised, finite cumulative gates (restarting at each document), and for
    ``forget_gate`` the bool mask of the pairs with no ``-inf`` gate between them (None for the
    cache's cumsums). Masked pairs hold a finite value that the caller's ``where`` discards."""
    if forget_gate is not None:
        cum, n = gate_cumsums(nonfinite.finite_gate(forget_gate), state_dtype(forget_gate), segment_ids)
        cq = ck = cum
    else:
        cq, ck = (nonfinite.finite_or_zero(x).astype(state_dtype(x)) for x in (q_gate_cumsum, k_gate_cumsum))
        n = None

    def heads(x, length):  # [B, L, H] -> [B, Hkv, r, L]
        return jnp.moveaxis(x.reshape(b, length, hkv, r), 1, 3)

    decay = heads(cq, t)[..., :, None] - heads(ck, s)[..., None, :]
    same = None if n is None else heads(n, t)[..., :, None] == heads(n, s)[..., None, :]
    return decay, same


def attention_inputs(q, k, v, *, segment_ids=None, forget_gate=None, q_gate_cumsum=None, k_gate_cumsum=None):
    """The sanitised arrays the blockwise kernels take (:mod:`memjax.memory.flash_attention`):
    ``(q, k, v, doc [B, T] | None, q_gate, k_gate, resets | None, bad_kv [B, S, H] | None,
    poisoned [B, T, H] | None)`` with non-finite ``q, k, v`` zeroed, the cumulative gates in
    float32 (float64 for float64 inputs) and the rows poisoned whatever they see (a bad query,
    query gate cumsum or, through :func:`memjax.memory.nonfinite.running`, forget gate); the
    rows that see a bad key are added from the kernel's ``seen``."""
    h, hkv = q.shape[2], k.shape[2]
    doc = None if segment_ids is None else document_ids(segment_ids)
    bad_kv = jnp.repeat(nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3)), h // hkv, axis=2)
    bad_kv = nonfinite.either(bad_kv, nonfinite.bad(k_gate_cumsum, 3))
    poisoned = nonfinite.either(nonfinite.bad(q, 3), nonfinite.bad(q_gate_cumsum, 3))
    qg = kg = resets = None
    if forget_gate is not None:
        qg, resets = gate_cumsums(nonfinite.finite_gate(forget_gate), state_dtype(forget_gate), segment_ids)
        kg = qg
        poisoned = nonfinite.either(poisoned, nonfinite.running(nonfinite.bad(forget_gate, 3, gate=True),
                                                                segment_ids))
    elif q_gate_cumsum is not None:
        qg, kg = (nonfinite.finite_or_zero(x).astype(state_dtype(x)) for x in (q_gate_cumsum, k_gate_cumsum))
    q, k, v = (nonfinite.finite_or_zero(x) for x in (q, k, v))
    return q, k, v, doc, qg, kg, resets, bad_kv, poisoned


def _chunked(q, k, v, *, scale, segment_ids, window, q_positions, k_positions, k_valid, forget_gate,
             q_gate_cumsum, k_gate_cumsum, block_q=None, block_k=None):
    """``impl="chunked"``: :func:`memjax.memory.flash_attention.flash_attention` on the sanitised
    inputs, with the XLA form's masks and non-finite rule; output in ``v``'s dtype."""
    b, t = q.shape[:2]
    s = k.shape[1]
    # default positions are aranges: the kernel may skip key blocks by index arithmetic
    causal_blocks = q_positions is None and k_positions is None
    q_pos = jnp.broadcast_to(jnp.arange(t), (b, t)) if q_positions is None else q_positions
    k_pos = jnp.broadcast_to(jnp.arange(s), (b, s)) if k_positions is None else k_positions
    dtype = v.dtype
    q, k, v, doc, qg, kg, resets, bad_kv, poisoned = attention_inputs(
        q, k, v, segment_ids=segment_ids, forget_gate=forget_gate, q_gate_cumsum=q_gate_cumsum,
        k_gate_cumsum=k_gate_cumsum)
    o, _, seen = flash_attention(q, k, v, scale=scale, q_pos=q_pos, k_pos=k_pos, window=window, q_seg=doc,
                                 k_seg=doc, k_valid=k_valid, q_gate=qg, k_gate=kg, q_resets=resets,
                                 k_resets=resets, bad_kv=bad_kv, causal_blocks=causal_blocks,
                                 block_q=block_q, block_k=block_k)
    return nonfinite.poison(o.astype(dtype), nonfinite.either(poisoned, seen))
