"""Miras: associative memories as (memory architecture, attentional bias, retention gate, optimizer).

Behrouz, Razaviyayn, Zhong, Mirrokni 2025, "It's All Connected: A Journey Through Test-Time
Memorization, Attentional Bias, Retention, and Online Optimization" (arXiv:2504.13173).

Per batch element and head the memory is a matrix ``W in R^{K x V}`` read as ``M(x) = W^T x``
(the layout of :func:`memjax.memory.linear_attention`). Every token writes ``(k_t, v_t)`` with one
step of an online optimiser on the attentional bias ``l(W; k, v)`` under a retention gate, and the
output is the read after the write, ``o_t = scale * M_{W_t}(q_t)``. With ``e_t = W^T k_t - v_t``
the bias gradient is ``grad_W l = k_t u_t^T`` with (``bias``)::

    ``"dot"``    l = -<M(k), v>                 u = -v                          (linear attention)
    ``"l2"``     l = 1/2 ||M(k) - v||_2^2        u = e                           (delta rule, Titans)
    ``"lp"``     l = ||M(k) - v||_p^p            u = p sign(e) |e|^(p-1)          (Moneta, Eq. 25)
    ``"huber"``  l2 inside ||e||_2 <= delta_t,   u = e             if ||e||_2 <= delta_t
                 delta_t * l1 outside            u = delta_t sign(e) otherwise    (Yaad, Eq. 26)

Retention (``retention``) with ``alpha_t = exp(g_t)`` (``g <= 0`` a log gate, None: ``alpha = 1``)
and learning rate ``eta_t`` (optimizer ``"gd"``)::

    "none" / "l2":  W_t = alpha_t W_{t-1} - eta_t grad l(W_{t-1})                   (Titans, Yaad)
    "lq":           A_t = alpha_t A_{t-1} - eta_t grad l_p(W_{t-1}),
                    W_t = A_t / ||A_t||_q^(q-2)                                     (Moneta, Eq. 24)
    "kl":           W_t = c Softmax(alpha_t log W_{t-1} - eta_t grad l(W_{t-1}))    (Memora, Eq. 27)

``"none"`` takes no ``g``. ``||A||_q`` is the entrywise q-norm of the head's ``K x V``
accumulator; since ``A / ||A||_q^(q-2)`` is unbounded near ``A = 0`` for ``q > 2`` we use
``(sum |A|^q + eps)^((q-2)/q)`` with ``eps = spec.eps`` (default 1: the map is the identity near
zero and the paper's normalisation for large ``A``; ``eps -> 0`` recovers Eq. 24). The state of an
``"lq"`` memory is the accumulator ``A`` (see :func:`memory_of`). Memora's softmax runs over the
key axis for every value column, so each column of ``W`` lies on the simplex scaled by
``c = spec.c`` and ``M(k)`` is a ``c``-weighted convex combination of the entries of ``k``; its
initial / reset memory is the uniform ``c / K``. Its state is ``W`` itself (strictly positive).

Optimizer ``"momentum"`` (Titans)::  ``S_t = mu_t S_{t-1} - eta_t grad l(W_{t-1})``,
``W_t = alpha_t W_{t-1} + S_t``; the state is ``(W, S)``.

The delta rule is the ``"l2"`` bias with the gradient taken at the *retained* memory
(``spec.retain_first``): ``W_t = alpha_t W_{t-1} - eta_t grad l(alpha_t W_{t-1})`` with
``eta = beta``: exactly :func:`memjax.memory.delta_rule`.

Presets (:data:`PRESETS`, :func:`preset`): ``linear_attention`` (dot, l2 retention with optional
``g``, ``eta = 1``), ``delta_rule`` (l2, none, retain first), ``gated_delta_rule`` (l2, l2, retain
first), ``titans`` (matrix memory, l2, l2, momentum: :func:`memjax.memory.neural_memory.titans`
with depth 1 and ``theta = eta / 2``, ``alpha_titans = 1 - exp(g)``, ``eta_titans = mu``,
``scale = 1``), ``moneta`` (lp with p = 3, lq with q = 4), ``yaad`` (huber, l2), ``memora``
(l2, kl). The paper's three models use a 2-layer MLP memory; here they are matrix-valued
(``memory="matrix"``); a deep memory is available for the Titans combination only (pass
``params0`` through :func:`memjax.memory.neural_memory.titans`).

Forms (``mode``):

- ``"recurrent"``: the per-token update above (``lax.scan``).
- ``"chunked"``: the paper's parallel training form (as Titans, Section 3.2 there). Every document
  is cut into chunks of ``C`` tokens from its own first token; inside a chunk every gradient is
  taken at the memory of the chunk start ``W_{t'}`` instead of ``W_{t-1}``, so all ``u_j`` come
  from one batched read, and the accumulator unrolls to
  ``A_t = (prod_{t'<i<=t} alpha_i) A_{t'} - sum_{j<=t} (prod_{j<i<=t} alpha_i) eta_j k_j u_j^T``
  (decay ratios as masked sums of ``g``, every exponent ``<= 0``). For ``"dot"``/``"l2"`` with
  ``"none"``/``"l2"`` retention the read is linear in ``A_t`` and costs a masked ``C x C`` product;
  ``"lq"`` and ``"kl"`` apply a nonlinear map to ``A_t`` per token, so the chunk forms its ``C``
  accumulators (``[C, K, V]`` per head, never one per token of the sequence). For ``"kl"`` the
  recurrence runs on the logits: ``log W_t`` and ``L_t = alpha_t L_{t-1} - eta_t k_t u_t^T``
  differ by a per-column constant, which the softmax ignores. ``chunk_size = 1`` is the recurrent
  form exactly; for ``"dot"`` (gradient independent of ``W``) every chunk size gives the
  recurrent result. The ``retain_first`` presets (delta rule) are affine in the state and run the
  exact chunked UT-transform algorithm of :func:`memjax.memory.delta_rule`; ``"momentum"`` runs
  :func:`memjax.memory.neural_memory.titans` (``mode="chunked"``, its own chunk semantics).

  The computation runs over blocks of ``C`` tokens at absolute positions, which a document's own
  chunks need not line up with. In a block, the document carried in from the previous block (the
  only one that can have a chunk start ``r`` strictly inside the block: its chunks are ``C`` long,
  and a document starting in the block has its next chunk start beyond it) takes its gradients
  before ``r`` at the carried chunk-start memory; ``W_r`` is formed from those writes (one
  ``[K, V]`` product per head) and the tokens from ``r`` on take their gradients at ``W_r``;
  documents starting in the block take theirs at the reset memory. The carry between blocks is
  ``(A, the chunk-start memory of the block's last token)``.

Segments: where ``segment_ids`` changes the memory resets (to zero, uniform for ``"kl"``; the
momentum to zero) before that token's write; ``initial_state`` reaches only the first document.
In both generic forms a packed row equals its documents run one by one, wherever they start
(chunks are counted from each document's first token; tested with starts at odd offsets).
``initial_state`` is taken to sit at a chunk start: two calls chained through the final state
equal one call when the carried document's length in the first call is a multiple of ``C``.

Non-finite inputs (:mod:`memjax.memory.nonfinite`; the delegated presets guard themselves): a
NaN / inf in ``k``, ``v``, ``eta``, ``g`` (NaN or ``+inf``; ``-inf`` is a full decay) or
``delta`` at token ``t`` makes that head's outputs NaN from ``t`` to the end of its document, one
in ``q`` only at ``t``; every other output and its gradient is bit-identical to that of the clean
input (the memory runs on the inputs with non-finite entries set to zero). An infinite Huber
threshold counts as non-finite: use a large finite ``delta`` for the pure l2 bias.

Dtypes: the output keeps q's dtype; gates, decays and states are float32 (float64 for float64
inputs); q, k, v enter the matmuls in their dtype with float32 accumulation.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from memjax.memory import nonfinite
from memjax.memory.contract import (check_chunk_size, check_floating, check_gate, check_mode, check_qkv,
                                    check_scale, check_segment_ids, check_shape, operand_dtype, output_dtype,
                                    resolve_scale, state_dtype)
from memjax.memory.delta import delta_rule
from memjax.memory.neural_memory import TitansState, titans
from memjax.memory.segments import positions_in_segment, segment_resets

__all__ = ["BIASES", "MODES", "OPTIMIZERS", "PRESETS", "RETENTIONS", "MirasSpec", "memory_of", "miras",
           "preset", "reset_memory"]

MODES = ("chunked", "recurrent")
BIASES = ("dot", "l2", "lp", "huber")
RETENTIONS = ("none", "l2", "lq", "kl")
OPTIMIZERS = ("gd", "momentum")


class MirasSpec(NamedTuple):
    """One point of the Miras design space (see the module docstring).

    ``memory``: ``"matrix"`` (the only architecture of the generic path). ``bias``: one of
    :data:`BIASES`; ``p`` the exponent of ``"lp"`` (``>= 1``). ``retention``: one of
    :data:`RETENTIONS`; ``q`` the exponent of ``"lq"`` (``>= 2``), ``eps`` its norm floor, ``c`` the
    simplex scale of ``"kl"``. ``optimizer``: ``"gd"`` or ``"momentum"``. ``retain_first``: take
    the gradient at ``alpha_t W_{t-1}`` (the delta rule's order) instead of ``W_{t-1}``.
    """

    memory: str = "matrix"
    bias: str = "l2"
    retention: str = "l2"
    optimizer: str = "gd"
    p: float = 2.0
    q: float = 2.0
    c: float = 1.0
    eps: float = 1.0
    retain_first: bool = False


PRESETS = {
    "linear_attention": MirasSpec(bias="dot", retention="l2"),
    "delta_rule": MirasSpec(bias="l2", retention="none", retain_first=True),
    "gated_delta_rule": MirasSpec(bias="l2", retention="l2", retain_first=True),
    "titans": MirasSpec(bias="l2", retention="l2", optimizer="momentum"),
    "moneta": MirasSpec(bias="lp", retention="lq", p=3.0, q=4.0),
    "yaad": MirasSpec(bias="huber", retention="l2"),
    "memora": MirasSpec(bias="l2", retention="kl"),
}


def preset(name: str, **overrides) -> MirasSpec:
    """The :data:`PRESETS` spec called ``name`` with fields replaced by ``overrides``
    (e.g. ``preset("moneta", p=4.0)``)."""
    if name not in PRESETS:
        raise ValueError(f"miras.preset: name must be one of {tuple(PRESETS)}, got {name!r}")
    return PRESETS[name]._replace(**overrides)


# ----------------------------------------------------------------------------- validation


def _check_spec(fn, spec):
    if not isinstance(spec, MirasSpec):
        raise TypeError(f"{fn}: spec must be a MirasSpec (see miras.PRESETS), got {type(spec).__name__}")
    for field, allowed in (("memory", ("matrix",)), ("bias", BIASES), ("retention", RETENTIONS),
                           ("optimizer", OPTIMIZERS)):
        if getattr(spec, field) not in allowed:
            raise ValueError(f"{fn}: spec.{field} must be one of {allowed}, got {getattr(spec, field)!r}")
    if not spec.p >= 1.0:
        raise ValueError(f"{fn}: spec.p must be >= 1, got {spec.p!r}")
    if not spec.q >= 2.0:
        raise ValueError(f"{fn}: spec.q must be >= 2, got {spec.q!r}")
    if not spec.c > 0.0:
        raise ValueError(f"{fn}: spec.c must be > 0, got {spec.c!r}")
    if not spec.eps > 0.0:
        raise ValueError(f"{fn}: spec.eps must be > 0, got {spec.eps!r}")
    if spec.retain_first and (spec.bias != "l2" or spec.retention not in ("none", "l2") or spec.optimizer != "gd"):
        raise ValueError(f"{fn}: spec.retain_first (the delta rule's order) needs bias='l2', retention 'none' or "
                         f"'l2' and optimizer='gd', got {spec}")
    if spec.optimizer == "momentum" and (spec.bias != "l2" or spec.retention not in ("none", "l2")):
        raise ValueError(f"{fn}: optimizer='momentum' (Titans) is implemented for bias='l2' with retention "
                         f"'none' or 'l2', got {spec}")


def _check_state(fn, spec, initial_state, b, h, dk, dv):
    if initial_state is None:
        return
    want = (b, h, dk, dv)
    if spec.optimizer == "momentum":
        if not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2:
            raise ValueError(f"{fn}: initial_state of a momentum memory must be (memory, momentum), each "
                             f"[B, H, K, V] = {want}")
        for name, x in zip(("initial_state[0]", "initial_state[1]"), initial_state):
            check_shape(fn, name, x, want, "[B, H, K, V]")
            check_floating(fn, name, x)
    else:
        check_shape(fn, "initial_state", initial_state, want, "[B, H, K, V]")
        check_floating(fn, "initial_state", initial_state)


# ----------------------------------------------------------------------------- the maps


def _lq_norm(a, q, eps):
    """``(sum |A|^q + eps)^((q-2)/q)`` over the last two axes (kept), the Moneta denominator."""
    s = jnp.sum(jnp.abs(a) ** q, axis=(-2, -1), keepdims=True)
    return (s + eps) ** ((q - 2.0) / q)


def memory_of(state: jax.Array, spec: MirasSpec) -> jax.Array:
    """The memory ``W`` a generic state holds: ``A / ||A||_q^(q-2)`` (floored, see the module
    docstring) for ``"lq"``, the state itself otherwise (the ``"kl"`` state is ``W``)."""
    if spec.retention == "lq":
        return state / _lq_norm(state, spec.q, spec.eps)
    return state


def _mem(acc, spec):
    """Memory from a carried state: ``"kl"`` carries ``log W`` (normalised after every write, and
    the caller's ``initial_state`` as given, so ``W_0`` is exactly that state)."""
    if spec.retention == "kl":
        return jnp.exp(acc)
    return memory_of(acc, spec)


def reset_memory(spec: MirasSpec, shape, dtype) -> jax.Array:
    """The state a document starts from: zeros, or the uniform ``c / K`` for ``"kl"``."""
    if spec.retention == "kl":
        return jnp.full(shape, spec.c / shape[-2], dtype)
    return jnp.zeros(shape, dtype)


def _bias_u(spec, e, v, delta):
    """``u`` with ``grad_W l = k u^T`` from the error ``e = M(k) - v`` (``[..., V]``)."""
    if spec.bias == "dot":
        return -v
    if spec.bias == "l2":
        return e
    if spec.bias == "lp":
        if spec.p == 1.0:
            return jnp.sign(e)
        ae = jnp.abs(e)
        # where() before the power: |e|^(p-1) has an infinite derivative at 0 for p < 2
        safe = jnp.where(ae > 0, ae, 1.0)
        return spec.p * jnp.sign(e) * jnp.where(ae > 0, safe ** (spec.p - 1.0), 0.0)
    # huber: the squared norm is compared (no sqrt, whose derivative at 0 is infinite)
    d = delta[..., None]
    inside = jnp.sum(e * e, axis=-1, keepdims=True) <= d * d
    return jnp.where(inside, e, d * jnp.sign(e))


# ----------------------------------------------------------------------------- public API


def miras(q: jax.Array, k: jax.Array, v: jax.Array, spec: MirasSpec, *, eta: jax.Array | None = None,
          g: jax.Array | None = None, momentum: jax.Array | None = None, delta: jax.Array | None = None,
          scale: float | None = None, initial_state=None, segment_ids: jax.Array | None = None,
          mode: str = "chunked", chunk_size: int = 16):
    """A Miras associative memory (see the module docstring for the equations and both forms).

    Args:
      q, k: ``[B, T, H, K]``; v: ``[B, T, H, V]``.
      spec: :class:`MirasSpec` (e.g. ``PRESETS["moneta"]``).
      eta: ``[B, T, H]`` learning rate ``>= 0`` (the delta rule's ``beta``); None: ones.
      g: ``[B, T, H]`` log retention ``alpha_t = exp(g_t)``, ``<= 0``; None: ``alpha = 1``. Not
        accepted with ``retention="none"``.
      momentum: ``[B, T, H]`` momentum decay ``mu`` in ``(0, 1]``; required by (only)
        ``optimizer="momentum"``.
      delta: ``[B, T, H]`` Huber threshold ``>= 0``; required by (only) ``bias="huber"``.
      scale: read scale, default ``K ** -0.5``.
      initial_state: ``[B, H, K, V]`` (the accumulator ``A`` for ``"lq"``, the positive memory
        ``W`` for ``"kl"``), or ``(memory, momentum)`` for ``"momentum"``; None: the reset state.
      segment_ids: ``[B, T]`` int, packed documents (see the module docstring).
      mode: ``"chunked"`` or ``"recurrent"``.
      chunk_size: ``C`` of ``"chunked"``; ``T`` need not be a multiple (the tail is padded with
        ``eta = 0, g = 0`` tokens, which leave the state unchanged).

    Returns:
      ``(o [B, T, H, V]`` in q's dtype, ``final_state``) with the state as ``initial_state``,
      float32 (float64 for float64 inputs).
    """
    fn = "miras"
    _check_spec(fn, spec)
    check_mode(fn, mode, MODES)
    check_chunk_size(fn, chunk_size)
    check_scale(fn, scale)
    b, t, h, dk, dv = check_qkv(fn, q, k, v)
    for name, x, required in (("eta", eta, False), ("g", g, False),
                              ("momentum", momentum, spec.optimizer == "momentum"),
                              ("delta", delta, spec.bias == "huber")):
        check_gate(fn, name, x, (b, t, h), required=required)
    if spec.retention == "none" and g is not None:
        raise ValueError(f"{fn}: retention='none' takes no g (use retention='l2' for a decay)")
    if momentum is not None and spec.optimizer != "momentum":
        raise ValueError(f"{fn}: momentum is only used by optimizer='momentum', got optimizer={spec.optimizer!r}")
    if delta is not None and spec.bias != "huber":
        raise ValueError(f"{fn}: delta is only used by bias='huber', got bias={spec.bias!r}")
    _check_state(fn, spec, initial_state, b, h, dk, dv)
    check_segment_ids(fn, segment_ids, (b, t))
    scale = resolve_scale(scale, dk)
    out_dtype = output_dtype(q)
    cd = state_dtype(q, k, v, eta, g, momentum, delta, initial_state)
    md = operand_dtype(q, k, v)
    q, k, v = (x.astype(md) for x in (q, k, v))
    eta = jnp.ones((b, t, h), cd) if eta is None else eta.astype(cd)
    g = jnp.zeros((b, t, h), cd) if g is None else g.astype(cd)

    if spec.optimizer == "momentum":
        return _titans(q, k, v, eta, g, momentum.astype(cd), scale, initial_state, segment_ids, mode,
                       chunk_size, cd, out_dtype)
    if spec.retain_first and mode == "chunked":
        # Affine in the state: the exact chunked algorithm of the delta rule (UT transform).
        s0 = None if initial_state is None else initial_state.astype(cd)
        return delta_rule(q, k, v, eta, g=None if spec.retention == "none" else g, scale=scale,
                          initial_state=s0, segment_ids=segment_ids, mode="chunked", chunk_size=chunk_size)
    delta = None if delta is None else delta.astype(cd)
    # A non-finite token poisons only itself and the rest of its document (memjax.memory.nonfinite).
    writes = nonfinite.either(nonfinite.bad(k, 3), nonfinite.bad(v, 3), nonfinite.bad(eta, 3),
                              nonfinite.bad(g, 3, gate=True), nonfinite.bad(delta, 3))
    mask = nonfinite.either(nonfinite.bad(q, 3), nonfinite.running(writes, segment_ids))  # [B, T, H]
    q, k, v, eta, delta = (nonfinite.finite_or_zero(x) for x in (q, k, v, eta, delta))
    g = nonfinite.finite_gate(g)
    s0 = reset_memory(spec, (b, h, dk, dv), cd) if initial_state is None else initial_state.astype(cd)
    # "kl" runs on the log-memory (its softmax logits up to a per-column constant).
    acc0 = jnp.log(s0) if spec.retention == "kl" else s0
    if mode == "recurrent":
        o, acc = _recurrent(spec, q, k, v, eta, g, delta, acc0, segment_ids, scale, cd)
    else:
        o, acc = _chunked(spec, q, k, v, eta, g, delta, acc0, segment_ids, scale, chunk_size, cd)
    state = jnp.exp(acc) if spec.retention == "kl" else acc
    return nonfinite.poison_outputs(o.astype(out_dtype), state, mask)


def _titans(q, k, v, eta, g, mu, scale, initial_state, segment_ids, mode, chunk_size, cd, out_dtype):
    """The momentum combination through :func:`memjax.memory.neural_memory.titans` (depth 1):
    ``l2`` here is ``1/2 ||e||^2``, Titans' is ``||e||^2``, so ``theta = eta / 2``."""
    st = None
    if initial_state is not None:
        st = TitansState((initial_state[0].astype(cd),), (initial_state[1].astype(cd),))
    o, st = titans((q.astype(cd) * scale), k, v, eta / 2.0, mu, -jnp.expm1(g), initial_state=st,
                   segment_ids=segment_ids, mode=mode, chunk_size=chunk_size)
    return o.astype(out_dtype), (st.weights[0], st.momentum[0])


def _dot(spec_str, *xs):
    """``einsum`` accumulating in float32 (float64 for float64 operands)."""
    acc = jnp.promote_types(jnp.result_type(*xs), jnp.float32)
    return jnp.einsum(spec_str, *xs, preferred_element_type=acc)


def _recurrent(spec, q, k, v, eta, g, delta, acc0, segment_ids, scale, cd):
    b, t, h, dk = q.shape
    resets = segment_resets(segment_ids)
    reset_acc = jnp.log(reset_memory(spec, acc0.shape, cd)) if spec.retention == "kl" else jnp.zeros_like(acc0)
    if resets is None:
        resets = jnp.zeros((b, t), bool)
    if delta is None:
        delta = jnp.zeros((b, t, h), cd)

    def step(acc, inp):
        qt, kt, vt, et, gt, dt, rt = inp
        qt, kt, vt = (x.astype(cd) for x in (qt, kt, vt))  # one token: promoted inside the step
        acc = jnp.where(rt[:, None, None, None], reset_acc, acc)
        alpha = jnp.exp(gt)[..., None, None]
        w = _mem(acc, spec)
        if spec.retain_first:
            w = alpha * w
        e = jnp.einsum("bhkv,bhk->bhv", w, kt) - vt
        grad = jnp.einsum("bhk,bhv->bhkv", kt, _bias_u(spec, e, vt, dt))
        if spec.retain_first:
            acc = w - et[..., None, None] * grad
        else:
            acc = alpha * acc - et[..., None, None] * grad
        if spec.retention == "kl":
            acc = jnp.log(spec.c) + jax.nn.log_softmax(acc, axis=-2)
        o = scale * jnp.einsum("bhkv,bhk->bhv", _mem(acc, spec), qt)
        return acc, o

    tm = lambda x: jnp.swapaxes(x, 0, 1)
    acc, o = jax.lax.scan(step, acc0, tuple(map(tm, (q, k, v, eta, g, delta, resets))))
    return tm(o), acc


def _chunked(spec, q, k, v, eta, g, delta, acc0, segment_ids, scale, c, cd):
    b, t, h, dk = q.shape
    dv = v.shape[-1]
    length = c * (-(-t // c))
    pad = lambda x: jnp.pad(x, [(0, 0), (0, length - t)] + [(0, 0)] * (x.ndim - 2))
    # Padded tokens: eta = 0 and g = 0 leave the accumulator unchanged; they follow the last document.
    q, k, v, eta, g = (pad(x) for x in (q, k, v, eta, g))
    delta = jnp.zeros((b, length, h), cd) if delta is None else pad(delta)
    seg = jnp.zeros((b, length), jnp.int32) if segment_ids is None else jnp.pad(
        segment_ids, ((0, 0), (0, length - t)), mode="edge")
    resets = segment_resets(seg)
    # A document's chunks start at its own multiples of C (not the absolute block grid).
    starts = positions_in_segment(seg) % c == 0  # [B, L]
    nb = length // c
    blk4 = lambda x: jnp.moveaxis(x.reshape(b, nb, c, h, x.shape[-1]), (1, 3), (0, 2))  # [N, B, H, C, D]
    blk3 = lambda x: jnp.moveaxis(x.reshape(b, nb, c, h), (1, 3), (0, 2))  # [N, B, H, C]
    blk2 = lambda x: jnp.moveaxis(x.reshape(b, nb, c), 1, 0)  # [N, B, C]
    xs = (blk4(q), blk4(k), blk4(v), blk3(eta), blk3(g), blk3(delta), blk2(seg), blk2(resets), blk2(starts))
    w_reset = reset_memory(spec, (b, h, dk, dv), cd)
    idx = jnp.arange(c)
    causal = idx[:, None] >= idx[None, :]
    strict = idx[:, None] > idx[None, :]
    linear_read = spec.retention in ("none", "l2")

    def chunk_mem(x):
        """The memory of an in-chunk accumulator (``"kl"``: unnormalised logits)."""
        return spec.c * jax.nn.softmax(x, axis=-2) if spec.retention == "kl" else _mem(x, spec)

    def body(carry, inp):
        acc, base = carry  # accumulator at the block start; chunk-start memory of the carried document
        qc, kc, vc, ec, gc, dc, sc, rc, bc = inp
        # keep0[t]: no document starts in [block start, t], so token t continues the carried memory.
        keep0 = jnp.cumsum(rc.astype(jnp.int32), axis=-1) == 0  # [B, C]
        # r: the carried document's chunk start inside this block (C if it has none here).
        at_r = keep0 & bc
        r = jnp.where(jnp.any(at_r, axis=-1), jnp.argmax(at_r, axis=-1), c)  # [B]
        old = keep0 & (idx[None] < r[:, None])  # gradients at the carried chunk-start memory
        same = (sc[:, :, None] == sc[:, None, :]) & causal  # [B, t, j]
        # Decay ratios prod_{j<i<=t} alpha_i as masked sums of g (all terms <= 0; where before exp).
        sums = jnp.cumsum(jnp.where(strict[None, None], gc[:, :, :, None], 0.0), axis=-2)  # [B, H, t, j]
        dmat = jnp.exp(jnp.where(same[:, None], sums, -jnp.inf))
        a0 = jnp.where(keep0[:, None], jnp.exp(jnp.cumsum(gc, axis=-1)), 0.0)  # [B, H, C]
        kf, vf, qf = (x.astype(cd) for x in (kc, vc, qc))
        read = lambda w: _dot("bhkv,bhck->bhcv", w, kc) - vf  # e = W^T k - v for every token
        # Stage 1: the writes before r (carried chunk-start memory) and of documents starting here.
        e_old, e_reset = read(base), read(w_reset)
        u1 = _bias_u(spec, jnp.where(old[:, None, :, None], e_old, e_reset), vf, dc) * ec[..., None]
        # W_r: the accumulator before token r, A_{r-1} (row r - 1 of the unrolled sum; A itself if r = 0).
        sel = (idx[None] == r[:, None] - 1).astype(cd)  # [B, C]
        a_r = _dot("bt,bht->bh", sel, a0) + (r == 0).astype(cd)[:, None]
        acc_r = a_r[..., None, None] * acc - _dot("bhj,bhjk,bhjv->bhkv", _dot("bt,bhtj->bhj", sel, dmat), kf, u1)
        # (r = 0: the carried memory itself; for "kl" exp(A), which is the caller's initial W exactly)
        w_r = jnp.where((r == 0)[:, None, None, None], _mem(acc, spec), chunk_mem(acc_r))
        # Stage 2: the carried document's tokens from r on take their gradients at W_r.
        new_chunk = (keep0 & ~old)[:, None, :, None]
        u = jnp.where(new_chunk, _bias_u(spec, read(w_r), vf, dc) * ec[..., None], u1)  # eta_j u_j
        wts = dmat  # [B, H, t, j]
        if linear_read:
            scores = _dot("bhtk,bhjk->bhtj", qc, kc) * wts
            o = a0[..., None] * _dot("bhtk,bhkv->bhtv", qf, acc) - _dot("bhtj,bhjv->bhtv", scores, u)
            acc_end = a0[..., -1, None, None] * acc - _dot("bhj,bhjk,bhjv->bhkv", wts[:, :, -1], kf, u)
        else:
            # Nonlinear read: the chunk's C accumulators, [B, H, C, K, V].
            acc_t = (a0[..., None, None] * acc[:, :, None]
                     - _dot("bhtj,bhjk,bhjv->bhtkv", wts, kf, u))
            o = _dot("bhtkv,bhtk->bhtv", chunk_mem(acc_t), qf)
            acc_end = acc_t[:, :, -1]
        if spec.retention == "kl":
            acc_end = jnp.log(spec.c) + jax.nn.log_softmax(acc_end, axis=-2)
        # The last token's chunk-start memory: W_r if it continues the carried document (which then
        # has its chunk start r in the block), else the reset memory (a document started here).
        base_end = jnp.where(keep0[:, -1, None, None, None], w_r, w_reset)
        return (acc_end, base_end), scale * o

    (acc, _), o = jax.lax.scan(body, (acc0, _mem(acc0, spec)), xs)
    o = jnp.moveaxis(o, (0, 2), (1, 3)).reshape(b, length, h, dv)
    return o[:, :t], acc
