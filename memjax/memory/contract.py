"""The contract every sequence memory of :mod:`memjax.memory` keeps, and the checks that enforce it.

Signature (the matrix memories ``linear_attention`` and ``delta_rule``; the others below map
onto it)::

    fn(q, k, v, <gates>, *, initial_state=None, segment_ids=None, scale=None,
       mode="chunked", chunk_size=64, impl="auto", seq_axis=None) -> (output, final_state)

Layout: ``[batch, time, heads, dim]``: ``q, k: [B, T, H, K]``, ``v: [B, T, H, V]``; the state is
``[B, H, K, V]`` (``S_t^T q_t`` is the read). ``T`` need not be a multiple of ``chunk_size``.

Gates, by keyword, under flash-linear-attention's names:
  - ``g``: ``[B, T, H]`` log decay per head (``exp(g_t) <= 1`` multiplies the state before token
    ``t`` is written); ``None``: no decay. ``linear_attention`` also takes ``[B, T, H, K]``, a
    log decay per key channel (GLA / HGRN2 / RWKV-6: ``diag(exp g_t)`` multiplies the state),
    and grouped value heads (``v``, ``g`` and the state with ``HV``, a multiple of ``H``, heads).
  - ``beta``: ``[B, T, H]`` write strength of the delta rule (``delta_rule``'s 4th positional
    argument, as in flash-linear-attention).

Keywords:
  - ``initial_state``: the state before ``t = 0`` (zeros if None); it reaches only the first
    segment of a packed row.
  - ``segment_ids``: ``[B, T]`` integer ids of packed documents; the state is reset to zero
    where the id changes.
  - ``scale``: a scalar multiplying ``q`` (the read), default ``K ** -0.5``.
  - ``mode``: ``"chunked"`` (training), ``"recurrent"`` (token by token; the decoding form) and
    ``"parallel"`` where a quadratic form exists.
  - ``chunk_size``: a positive int; ``impl``: the chunk-to-chunk state pass
    (``"auto" | "xla" | "pallas"``, :mod:`memjax.kernels.chunk_pass`); ``seq_axis``: sequence
    parallelism (:mod:`memjax.memory.sequence_parallel`).

Dtypes (no blanket upcast):
  - ``q, k, v`` stay in their dtype for the matmuls, which accumulate in float32
    (``preferred_element_type``); so bf16 training moves bf16 bytes.
  - Decays and cumulative gates (``g``, their cumulative sums and exponentials), ``beta`` and
    every state (the carried ``S``, ``initial_state``, ``final_state``) are float32.
  - Per-chunk intermediates that only feed a further matmul (decayed scores, decayed queries and
    keys, the delta rule's UT-transformed values) are cast back to the input dtype, as
    flash-linear-attention and the Pallas chunk pass do; so is the state where it is the operand
    of a bf16 matmul (it is carried in float32).
  - The output is returned in ``q``'s dtype, the final state in float32.
  - float64 inputs stay float64 throughout (state, decays and matmuls); :func:`state_dtype` is
    the rule: float32 for 16/32-bit inputs, float64 if any input is float64.

Errors, raised before any compute by the checks below: a ``ValueError`` naming the function, the
argument and the expected shape (``delta_rule: beta must have shape [B, T, H] = (2, 16, 4), got
(2, 16)``), a ``TypeError`` naming the argument and its dtype for a non-floating ``q`` / ``k`` /
``v`` / gate / state or a non-integer ``segment_ids`` (never a silent cast or truncation).

Non-finite inputs (:mod:`memjax.memory.nonfinite`): a NaN / inf in a token's ``q`` makes NaN that
token's output, in its ``k``, ``v`` or a gate that head's outputs from that token to the end of
its document (and the final state if that is the last document); every other output, and every
gradient of those outputs, is bit-identical to what the clean input gives, in every mode. A log
decay ``g = -inf`` is not an error but a full reset (``exp(g) S = 0``), equal across modes.

How the other memories map onto it:
  - ``selective_scan(x, dt, A, B, C)`` (Mamba-2 SSD): ``q = C``, ``k = B``, ``v = x``,
    ``g = dt * A`` (``[batch, T, H]``); state ``[batch, H, P, N]``; modes chunked / recurrent.
  - ``diagonal_ssm(x, A, B, C, dt)`` and ``rglru(x, gate_a, gate_x, lam)``: element-wise
    (per-channel) recurrences on ``x: [batch, T, channels]``; no ``q, k``; the same keywords
    where they apply (``mode`` ``"scan"`` / ``"conv"`` instead of ``"chunked"``).
  - ``titans(q, k, v, theta, eta, alpha)``: gates ``[B, T, H]``; the state is a
    :class:`memjax.memory.neural_memory.TitansState` of MLP weights and momentum; no ``scale``.
  - ``mixture_of_memories(q, k, v, router_logits)``: ``k, v`` and gates carry a memory axis,
    ``[B, T, M', H, .]``; runs ``linear_attention`` / ``delta_rule`` underneath.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from memjax.kernels.chunk_pass import IMPLS
from memjax.memory.sequence_parallel import check_axis

__all__ = [
    "IMPLS", "check_chunk_size", "check_floating", "check_gate", "check_impl", "check_matrix_memory", "check_mode",
    "check_qkv", "check_scale", "check_segment_ids", "check_seq_axis", "check_sequence", "check_shape", "check_state",
    "check_vector_gate",
    "operand_dtype", "output_dtype", "resolve_scale", "shape_of", "state_dtype",
]


def shape_of(x) -> tuple | None:
    """``x.shape`` as a tuple, or None for something that is not an array (e.g. None)."""
    shape = getattr(x, "shape", None)
    return None if shape is None else tuple(shape)


def _render(expected: tuple, dims: str) -> str:
    """``(2, 16, 4, V)``: the expected shape with the names of its free (None) dims."""
    names = [n.strip() for n in dims.strip("[]").split(",")]
    if len(names) != len(expected):
        names = ["?"] * len(expected)
    items = [n if e is None else str(e) for e, n in zip(expected, names)]
    return "(" + ", ".join(items) + ("," if len(items) == 1 else "") + ")"


def check_shape(fn: str, name: str, x, expected: tuple, dims: str) -> tuple:
    """``ValueError`` unless ``x`` has ``expected`` shape (``None`` entries: any size); ``dims``
    names the axes, e.g. ``"[B, T, H, V]"``. Returns the shape."""
    got = shape_of(x)
    if got is None or len(got) != len(expected) or any(e is not None and e != g for e, g in zip(expected, got)):
        want = dims if all(e is None for e in expected) else f"{dims} = {_render(expected, dims)}"
        raise ValueError(f"{fn}: {name} must have shape {want}, got {got}")
    return got


def check_floating(fn: str, name: str, x, *, complex_ok: bool = False) -> None:
    """``TypeError`` unless ``x`` has a real floating dtype (bfloat16, float16, float32, float64),
    or a complex one with ``complex_ok``. Integer and boolean inputs are refused, never cast."""
    dtype = getattr(x, "dtype", None)
    ok = dtype is not None and (jnp.issubdtype(dtype, jnp.floating)
                                or (complex_ok and jnp.issubdtype(dtype, jnp.complexfloating)))
    if not ok:
        kinds = "a floating or complex" if complex_ok else "a floating"
        raise TypeError(f"{fn}: {name} must have {kinds} dtype (bfloat16, float16, float32 or float64"
                        f"{', complex64 or complex128' if complex_ok else ''}), got "
                        f"{dtype if dtype is not None else type(x).__name__}")


def check_sequence(fn: str, name: str, x, dims: str) -> tuple:
    """The leading input of a memory (``q``, or ``x`` of the element-wise ones): the rank of
    ``dims`` (e.g. ``"[batch, T, H]"``), a floating dtype and a non-empty time axis (axis 1).
    Returns the shape."""
    shape = check_shape(fn, name, x, (None,) * len(dims.split(",")), dims)
    check_floating(fn, name, x)
    if shape[1] == 0:
        raise ValueError(f"{fn}: {name} has an empty time axis (T = 0)")
    return shape


def check_qkv(fn: str, q, k, v, *, grouped: bool = False) -> tuple[int, int, int, int, int]:
    """``q, k: [B, T, H, K]``, ``v: [B, T, H, V]`` with ``T > 0``, floating dtypes.
    ``grouped``: ``v`` may have ``HV`` heads, a positive multiple of ``H`` (grouped value heads:
    each q/k head serves ``HV / H`` value heads). Returns ``(B, T, H, K, V)``."""
    b, t, h, dk = check_sequence(fn, "q", q, "[B, T, H, K]")
    check_shape(fn, "k", k, (b, t, h, dk), "[B, T, H, K]")
    check_floating(fn, "k", k)
    if grouped:
        got = shape_of(v)
        if got is None or len(got) != 4 or got[:2] != (b, t):
            raise ValueError(f"{fn}: v must have shape [B, T, H, V] = ({b}, {t}, {h}, V) (or HV, a multiple of H, "
                             f"value heads), got {got}")
        if got[2] == 0 or got[2] % h:
            raise ValueError(f"{fn}: v must have a positive multiple of H = {h} heads (grouped value heads), "
                             f"got shape {got}")
    dv = check_shape(fn, "v", v, (b, t, None if grouped else h, None), "[B, T, H, V]")[3]
    check_floating(fn, "v", v)
    return b, t, h, dk, dv


def check_vector_gate(fn: str, name: str, x, b: int, t: int, h: int, dk: int, *, required: bool = False) -> None:
    """A per-head or per-key-channel log decay: ``[B, T, H]`` or ``[B, T, H, K]`` (``h`` the
    value heads when they are grouped), floating; None unless ``required``."""
    if x is None and not required:
        return
    got = shape_of(x)
    if got not in ((b, t, h), (b, t, h, dk)):
        raise ValueError(f"{fn}: {name} must have shape [B, T, H] = ({b}, {t}, {h}), got {got} (or per key "
                         f"channel [B, T, H, K] = ({b}, {t}, {h}, {dk}))")
    check_floating(fn, name, x)


def check_gate(fn: str, name: str, x, expected: tuple, dims: str = "[B, T, H]", *, required: bool = False) -> None:
    """A gate (``g``, ``beta``, ``dt``, ...): ``expected`` shape, floating dtype; None is
    allowed unless ``required``."""
    if x is None and not required:
        return
    check_shape(fn, name, x, expected, dims)
    check_floating(fn, name, x)


def check_segment_ids(fn: str, segment_ids, expected: tuple, dims: str = "[B, T]") -> None:
    """``segment_ids``: None or ``expected`` (``(B, T)``) shaped integers (``TypeError`` otherwise)."""
    if segment_ids is None:
        return
    check_shape(fn, "segment_ids", segment_ids, expected, dims)
    if not jnp.issubdtype(segment_ids.dtype, jnp.integer):
        raise TypeError(f"{fn}: segment_ids must have an integer dtype, got {segment_ids.dtype}")


def check_state(fn: str, initial_state, expected: tuple, dims: str = "[B, H, K, V]", *,
                name: str = "initial_state", complex_ok: bool = False) -> None:
    """``initial_state``: None or an ``expected`` shaped floating array."""
    if initial_state is None:
        return
    check_shape(fn, name, initial_state, expected, dims)
    check_floating(fn, name, initial_state, complex_ok=complex_ok)


def check_mode(fn: str, mode, allowed: tuple) -> None:
    """``ValueError`` naming ``fn`` unless ``mode`` is one of ``allowed`` (e.g. ``("chunked", "recurrent")``)."""
    if mode not in allowed:
        raise ValueError(f"{fn}: mode must be one of {allowed}, got {mode!r}")


def check_chunk_size(fn: str, chunk_size) -> None:
    """``ValueError`` naming ``fn`` unless ``chunk_size`` is a positive ``int`` (a ``bool`` is refused)."""
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size <= 0:
        raise ValueError(f"{fn}: chunk_size must be a positive int, got {chunk_size!r}")


def check_impl(fn: str, impl) -> None:
    """``ValueError`` naming ``fn`` unless ``impl`` is one of :data:`IMPLS` (``"auto"``, ``"xla"``, the kernels)."""
    if impl not in IMPLS:
        raise ValueError(f"{fn}: impl must be one of {IMPLS}, got {impl!r}")


def check_scale(fn: str, scale) -> None:
    """``ValueError`` naming ``fn`` unless ``scale`` is ``None`` (meaning ``K ** -0.5``) or a scalar."""
    if scale is not None and jnp.ndim(scale) != 0:
        raise ValueError(f"{fn}: scale must be a scalar, got shape {jnp.shape(scale)}")


def check_seq_axis(fn: str, seq_axis, mode: str, allowed: tuple) -> None:
    """``seq_axis`` (sequence parallelism) only with the modes in ``allowed`` and only inside a
    ``shard_map`` that binds it."""
    if seq_axis is None:
        return
    if mode not in allowed:
        forms = " or ".join(repr(m) for m in allowed)
        why = " (the recurrent form is the single-device decoding form)" if mode == "recurrent" else ""
        raise ValueError(f"{fn}: seq_axis needs mode={forms}, got mode={mode!r}{why}")
    check_axis(fn, seq_axis)


def resolve_scale(scale, dk: int):
    """The read scale: ``scale``, or ``K ** -0.5`` when None."""
    return dk ** -0.5 if scale is None else scale


def check_matrix_memory(fn: str, q, k, v, *, gates: dict, required: tuple = (), initial_state=None,
                        segment_ids=None, scale=None, mode: str, modes: tuple, chunk_size, impl="auto",
                        seq_axis=None, seq_modes: tuple | None = None, vector_gates: tuple = (),
                        grouped: bool = False) -> tuple[int, int, int, int, int]:
    """Every check of a ``[B, T, H, .]`` matrix memory (``linear_attention``, ``delta_rule``):
    ``gates`` maps names to ``[B, T, H]`` arrays (or None unless named in ``required``); those
    named in ``vector_gates`` may also be ``[B, T, H, K]`` (per key channel). ``grouped``: ``v``
    may have ``HV`` (a multiple of ``H``) heads, and then the gates and the state
    (``[B, HV, K, V]``) have ``HV`` heads too. Returns ``(B, T, H, K, V)`` (``H`` of q and k)."""
    check_mode(fn, mode, modes)
    check_chunk_size(fn, chunk_size)
    check_impl(fn, impl)
    check_scale(fn, scale)
    b, t, h, dk, dv = check_qkv(fn, q, k, v, grouped=grouped)
    hv = v.shape[2]
    for name, x in gates.items():
        if name in vector_gates:
            check_vector_gate(fn, name, x, b, t, hv, dk, required=name in required)
        else:
            check_gate(fn, name, x, (b, t, hv), required=name in required)
    check_state(fn, initial_state, (b, hv, dk, dv))
    check_segment_ids(fn, segment_ids, (b, t))
    check_seq_axis(fn, seq_axis, mode, seq_modes or tuple(m for m in modes if m != "recurrent"))
    return b, t, h, dk, dv


def state_dtype(*xs):
    """The dtype of states, decays and accumulation: float32 for 16/32-bit float inputs, float64
    when any input is float64 (complex inputs count as their real part). ``xs`` may hold
    ``None`` and pytrees."""
    leaves = [x for x in jax.tree.leaves(xs) if x is not None]
    dt = jnp.result_type(*leaves)
    if jnp.issubdtype(dt, jnp.complexfloating):
        dt = jnp.finfo(dt).dtype
    return jnp.promote_types(dt, jnp.float32)


def output_dtype(x):
    """The dtype of a memory's output: its first input's (``q``, or ``x``), canonical (a NumPy
    float64 array gives float32 when float64 is disabled)."""
    return jax.dtypes.canonicalize_dtype(x.dtype)


def operand_dtype(*xs):
    """The dtype the matmul operands keep: the common dtype of the inputs (bf16 for bf16 inputs)."""
    return jnp.result_type(*[x for x in xs if x is not None])
