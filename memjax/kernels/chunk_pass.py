"""The chunk-to-chunk state recurrence shared by the chunked linear-attention family.

Chunked linear attention, gated linear attention, Mamba-2 SSD, DeltaNet and the gated delta
rule all split into (i) work that is parallel over chunks (masked decayed scores, the UT
transform, decay factors: batched matmuls XLA runs well) and (ii) one sequential pass over the
``N`` chunks that carries the ``[K, V]`` state. This module is (ii). Per batch and head, with
``S_0`` the initial state::

    delta_n = u_n - w_n S_n                      (w = None: delta_n = u_n)
    o_n     = qg_n S_n + p_n delta_n
    S_{n+1} = a_n S_n + ke_n^T delta_n

Shapes (heads-major chunk stacks): ``qg, ke, w: [B, H, N, C, K]``, ``p: [B, H, N, C, C]``,
``u: [B, H, N, C, V]``, ``a: [B, H, N]`` (a scalar decay per chunk) or ``[B, H, N, K]`` (a decay
per key channel, ``S_{n+1} = diag(a_n) S_n + ke_n^T delta_n``: GLA / HGRN2 / RWKV-6; XLA and the
TPU kernel, the GPU kernel takes scalar decays), ``s0: [B, H, K, V]``; returns ``(o [B, H, N, C, V]``
in u's dtype, ``S_N [B, H, K, V]`` float32, or float64 for float64 inputs).

Dtypes (both implementations): the chunk tensors keep their dtype (bf16 for bf16 models) and
every matmul accumulates in the state's dtype (float32, or float64); the state is carried in
that dtype, and where it (or ``delta_n``) is the operand of a matmul with 16-bit chunk tensors
it is rounded to their dtype for that product only (:func:`as_operand`), as
flash-linear-attention does.

For gated linear attention ``qg = scale exp(G_i) q_i`` (queries times the decay from the chunk
start), ``p = scale (Q K^T * D)`` (causal decayed scores), ``u = V``, ``ke = exp(G_last - G_j) k_j``
and ``a = exp(G_last)``; for the gated delta rule ``u = T V`` and ``w = T diag(gamma) K`` (the UT
transform) and ``delta_n`` are the per-token corrections.

Implementations (``impl``):

- ``"xla"``     ``lax.scan`` over chunks, differentiated by JAX (the reference).
- ``"pallas"``  one Triton-lowered Pallas kernel for the forward pass and one for the backward
  (:mod:`memjax.kernels.chunk_pass_pallas`); on CPU only with
  ``interpret=True`` (tests).
- ``"pallas_tpu"``  the Mosaic-lowered TPU kernels (:mod:`memjax.kernels.chunk_pass_pallas_tpu`),
  scalar or per-key-channel decays; for a TPU target (the platform of the mesh's
  devices, so a CPU host compiling for compile-only TPU devices gets them), on CPU
  only with ``interpret=True`` (tests).
- ``"auto"``    the platform's kernel only where ``supports(shape, dtype, backend)`` holds *and*
  the device is in ``VERIFIED_DEVICES`` (it has passed its tests on that hardware);
  XLA otherwise. No device is verified yet, so ``auto`` is XLA everywhere until a
  GPU session has run ``tests/test_chunk_recurrence.py`` and the GPU benchmark (or
  a TPU session ``tests/test_chunk_pass_tpu.py``).

Both Pallas paths share one ``custom_vjp`` (the two kernel families take and return the same
arrays): the backward kernel returns the gradient of every
``delta_n`` and of the state after every chunk; the remaining gradients are batched products::

    d qg_n = do_n S_n^T      d p_n = do_n delta_n^T     d ke_n = delta_n dS_{n+1}^T
    d w_n  = -d_delta_n S_n^T     d a_n = <dS_{n+1}, S_n>     d u_n = d_delta_n

with ``S_n`` saved by the forward kernel (``[B, H, N, K, V]`` float32, what the XLA scan's
autodiff saves as well).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp

from memjax.kernels import chunk_pass_pallas as crp
from memjax.kernels import chunk_pass_pallas_tpu as crpt
from memjax.kernels.pallas_common import on_verified_device
from memjax.kernels.manual_axes import common_varying, over_batch
from memjax.kernels.platform import target_platform

IMPLS = ("auto", "xla", "pallas", "pallas_tpu")
# Devices on which the compiled kernels passed tests/test_chunk_recurrence.py and the GPU
# benchmark's float64 / poisoned-output checks (a TPU: tests/test_chunk_pass_tpu.py's hardware
# test): backend -> device-kind prefixes. Empty: the GPU kernels have so far run in interpret
# mode and been lowered to Triton IR only, the TPU kernels interpreted and compiled for
# compile-only TPU devices, never run on one.
VERIFIED_DEVICES: dict[str, tuple[str, ...]] = {}
# The kernel family ``"auto"`` picks on each backend.
_KERNEL_OF_BACKEND = {"gpu": "pallas", "cuda": "pallas", "rocm": "pallas", "tpu": "pallas_tpu"}


def supports(shape, dtype, backend: str, *, vector_decay: bool = False) -> bool:
    """Whether the backend's Pallas kernel handles ``shape = (B, H, N, C, K, V)`` chunk tensors of
    ``dtype`` (``vector_decay``: per-key-channel chunk decays ``a [B, H, N, K]``, which only the
    TPU kernel takes)."""
    if backend == "tpu":
        return crpt.tpu_supports(tuple(shape), dtype, backend, vector_decay=vector_decay)
    return crp.gpu_supports(tuple(shape), dtype, backend, vector_decay=vector_decay)


def verified(backend: str, device_kind: str | None = None) -> bool:
    return on_verified_device(VERIFIED_DEVICES, backend, device_kind)


def runs_xla(impl: str, shape, dtype, interpret: bool | None, *, vector_decay: bool = False) -> bool:
    """Whether the chunk pass would run its XLA scan for these arguments, for callers that have
    a faster XLA-only form of the whole chunked computation. Never raises: an explicit kernel
    ``impl`` (valid or not) answers False and is left to :func:`chunk_recurrence` to run or refuse."""
    if impl == "xla":
        return not interpret
    if impl != "auto" or interpret:
        return False
    return resolve_impl(impl, shape, dtype, interpret, vector_decay=vector_decay)[0] == "xla"


def resolve_impl(impl: str, shape, dtype, interpret: bool | None, backend: str | None = None,
                 device_kind: str | None = None, *, vector_decay: bool = False) -> tuple[str, bool]:
    """``("xla" | "pallas" | "pallas_tpu", interpret flag)`` for a call; see the module docstring.
    Per-key-channel decays (``vector_decay``): ``"pallas"`` refuses them, ``"pallas_tpu"`` takes
    them."""
    if impl not in IMPLS:
        raise ValueError(f"impl must be one of {IMPLS}, got {impl!r}")
    if vector_decay and impl == "pallas":
        raise ValueError("impl='pallas' does not support per-key-channel chunk decays a [B, H, N, K] (the kernel "
                         "carries a scalar decay per chunk); use impl='auto' or 'xla'")
    backend = target_platform(backend)  # the mesh's devices when a mesh is set, else the default backend
    if impl == "xla":
        if interpret:
            raise ValueError("interpret=True needs impl='pallas' or 'pallas_tpu'")
        return "xla", False
    if impl == "auto":
        if interpret:
            raise ValueError("interpret=True needs impl='pallas' or 'pallas_tpu' (auto never interprets)")
        kernel = _KERNEL_OF_BACKEND.get(backend)
        ok = kernel and supports(shape, dtype, backend, vector_decay=vector_decay) and verified(backend, device_kind)
        return (kernel, False) if ok else ("xla", False)
    if impl == "pallas_tpu":
        return _resolve_tpu(shape, dtype, interpret, backend, vector_decay)
    if interpret:
        return "pallas", True
    if backend == "cpu":
        raise ValueError("impl='pallas' needs a GPU; on CPU pass interpret=True (tests) or use impl='xla'/'auto'")
    if not crp.gpu_supports(tuple(shape), dtype, backend):
        raise ValueError(f"impl='pallas' does not support chunk tensors (B, H, N, C, K, V) = {tuple(shape)} of dtype "
                         f"{jnp.dtype(dtype)} on backend {backend!r} ({crp.gpu_supports.__doc__.strip()}); "
                         "use impl='auto' or 'xla'")
    return "pallas", False


def fused_choice(impl: str, q_shape, v_dim: int, dtype, chunk_size: int, interpret: bool | None,
                 supports) -> tuple[str, bool] | None:
    """For a memory with a fused TPU kernel (the whole chunked pass in one kernel each way): the
    ``kernel`` argument its chunked form takes, ``("pallas_tpu", interpret)``, when ``impl``
    resolves to ``"pallas_tpu"`` (explicitly, or ``"auto"`` on a verified TPU; :func:`resolve_impl`
    refuses a kernel impl that cannot run) and ``supports((B, T_padded, H, K, V, C), dtype,
    "tpu")`` holds (always in interpret mode), else None (the caller's other paths: an explicit
    ``"pallas_tpu"`` outside the fused kernel's shapes runs the state-pass kernel).
    ``q_shape = (B, T, H, K)``."""
    if impl not in ("auto", "pallas_tpu"):  # (other impls are resolved, or refused, by the chunk pass)
        return None
    b, t, h, k = q_shape
    n = -(-t // chunk_size)
    name, interp = resolve_impl(impl, (b, h, n, chunk_size, k, v_dim), dtype, interpret)
    if name != "pallas_tpu":
        return None
    if interp or supports((b, n * chunk_size, h, k, v_dim, chunk_size), dtype, "tpu"):
        return ("pallas_tpu", interp)
    return None


def _resolve_tpu(shape, dtype, interpret, backend, vector_decay):
    if interpret:
        return "pallas_tpu", True
    if backend != "tpu":
        raise ValueError(f"impl='pallas_tpu' needs a TPU target (the mesh's devices, or the default backend), got "
                         f"backend {backend!r}; on CPU pass interpret=True (tests) or use impl='xla'/'auto'")
    if not crpt.tpu_supports(shape, dtype, backend, vector_decay=vector_decay):
        raise ValueError(f"impl='pallas_tpu' does not support chunk tensors (B, H, N, C, K, V) = {tuple(shape)} of "
                         f"dtype {jnp.dtype(dtype)} ({crpt.tpu_supports.__doc__.strip()}); use impl='auto' or 'xla'")
    return "pallas_tpu", False


# ----------------------------------------------------------------------------- reference (XLA)


def as_operand(x: jax.Array, like: jax.Array) -> jax.Array:
    """``x`` (the float32 state, or the per-chunk corrections) as the other operand of a matmul
    with ``like``: in ``like``'s dtype when that is a 16-bit float (as the Pallas kernels and
    flash-linear-attention round it for the tensor cores; the product still accumulates in
    float32), unchanged otherwise (float32 / float64 chunk tensors read it at full precision)."""
    if jnp.dtype(like.dtype).itemsize < 4 and jnp.dtype(like.dtype).itemsize < jnp.dtype(x.dtype).itemsize:
        return x.astype(like.dtype)
    return x


def _decay(a_n, acc):
    """A chunk's decay ``[B, H]`` (scalar) or ``[B, H, K]`` (per key channel) as a factor of the
    ``[B, H, K, V]`` state."""
    return (a_n[..., None, None] if a_n.ndim == 2 else a_n[..., :, None]).astype(acc)


def _states_xla(u, w, ke, a, s0):
    """``(S_N, S_n for every chunk [B, H, N, K, V], delta [B, H, N, C, V])`` by ``lax.scan``.
    The state is carried in ``s0``'s dtype (float32 or float64); every matmul accumulates in it."""
    acc = s0.dtype
    chunk_major = lambda x: jnp.moveaxis(x, 2, 0)
    if w is None:
        # Every chunk's own write is known up front: the scan only adds.
        ds = jnp.einsum("bhnck,bhncv->bhnkv", ke, as_operand(u, ke), preferred_element_type=acc)

        def carry(s, inp):
            ds_n, a_n = inp
            return _decay(a_n, acc) * s + ds_n, s

        s, s_in = jax.lax.scan(carry, s0, (chunk_major(ds), chunk_major(a)))
        return s, jnp.moveaxis(s_in, 0, 2), u

    def carry(s, inp):
        u_n, w_n, k_n, a_n = inp
        ws = jnp.einsum("bhck,bhkv->bhcv", w_n, as_operand(s, w_n), preferred_element_type=acc)
        delta = u_n.astype(acc) - ws
        s_next = (_decay(a_n, acc) * s
                  + jnp.einsum("bhck,bhcv->bhkv", k_n, as_operand(delta, k_n), preferred_element_type=acc))
        return s_next, (s, delta)

    s, (s_in, delta) = jax.lax.scan(carry, s0, tuple(chunk_major(x) for x in (u, w, ke, a)))
    return s, jnp.moveaxis(s_in, 0, 2), jnp.moveaxis(delta, 0, 2)


def _outputs(qg, p, s_in, delta, acc):
    return (jnp.einsum("bhnck,bhnkv->bhncv", qg, as_operand(s_in, qg), preferred_element_type=acc)
            + jnp.einsum("bhnij,bhnjv->bhniv", p, as_operand(delta, p), preferred_element_type=acc))


def xla_chunk_recurrence(qg, p, u, w, ke, a, s0):
    # Inside shard_map a replicated s0 must vary like the chunk tensors to be a scan carry.
    (s0, *_), _ = common_varying(s0, qg, p, u, ke, a, *([] if w is None else [w]))
    s, s_in, delta = _states_xla(u, w, ke, a, s0)
    return _outputs(qg, p, s_in, delta, s0.dtype).astype(u.dtype), s


# ----------------------------------------------------------------------------- Pallas (custom_vjp)


_KERNELS = {"pallas": crp, "pallas_tpu": crpt}  # impl -> module with forward / backward


@functools.partial(jax.custom_vjp, nondiff_argnums=(7, 8, 9))
def _pallas(qg, p, u, w, ke, a, s0, kernel, interpret, tile):
    o, s, _ = _KERNELS[kernel].forward(qg, p, u, w, ke, a, s0, save_states=False, interpret=interpret, tile=tile)
    return o, s


def _pallas_fwd(qg, p, u, w, ke, a, s0, kernel, interpret, tile):
    o, s, s_in = _KERNELS[kernel].forward(qg, p, u, w, ke, a, s0, save_states=True, interpret=interpret, tile=tile)
    return (o, s), (qg, p, u, w, ke, a, s_in)


def _pallas_bwd(kernel, interpret, tile, res, cts):
    qg, p, u, w, ke, a, s_in = res
    do, dsf = cts
    acc = s_in.dtype
    dd, dsn, ds0 = _KERNELS[kernel].backward(qg, p, w, ke, a, do, dsf.astype(acc), interpret=interpret, tile=tile)
    delta = u.astype(acc)
    if w is not None:
        delta = delta - jnp.einsum("bhnck,bhnkv->bhncv", w, s_in, preferred_element_type=acc)
    do = do.astype(acc)
    d_qg = jnp.einsum("bhncv,bhnkv->bhnck", do, s_in)
    d_p = jnp.einsum("bhniv,bhnjv->bhnij", do, delta)
    d_ke = jnp.einsum("bhncv,bhnkv->bhnck", delta, dsn)
    d_w = None if w is None else -jnp.einsum("bhncv,bhnkv->bhnck", dd, s_in).astype(w.dtype)
    # d a_n = <dS_{n+1}, S_n> summed over the whole state (scalar decay) or over V (per key channel).
    d_a = jnp.einsum("bhnkv,bhnkv->bhn" if a.ndim == 3 else "bhnkv,bhnkv->bhnk", dsn, s_in)
    return (d_qg.astype(qg.dtype), d_p.astype(p.dtype), dd.astype(u.dtype), d_w, d_ke.astype(ke.dtype),
            d_a.astype(a.dtype), ds0)


_pallas.defvjp(_pallas_fwd, _pallas_bwd)


# ----------------------------------------------------------------------------- public API


def _validate(qg, p, u, w, ke, a, s0):
    shape = lambda x: getattr(x, "shape", None)
    if getattr(qg, "ndim", None) != 5:
        raise ValueError(f"chunk_recurrence: qg must be [B, H, N, C, K], got shape {shape(qg)}")
    b, h, n, c, k = qg.shape
    if shape(u) is None or len(u.shape) != 5 or u.shape[:4] != (b, h, n, c):
        raise ValueError(f"chunk_recurrence: u must be [B, H, N, C, V] = [{b}, {h}, {n}, {c}, V], got shape {shape(u)}")
    v = u.shape[4]
    expected = {"p": (p, (b, h, n, c, c)), "ke": (ke, (b, h, n, c, k)), "s0": (s0, (b, h, k, v))}
    if shape(a) not in ((b, h, n), (b, h, n, k)):
        raise ValueError(f"chunk_recurrence: a must have shape {(b, h, n)} (scalar decays) or {(b, h, n, k)} "
                         f"(per key channel), got {shape(a)}")
    if w is not None:
        expected["w"] = (w, (b, h, n, c, k))
    for name, (x, want) in expected.items():
        if shape(x) != want:
            raise ValueError(f"chunk_recurrence: {name} must have shape {want}, got {shape(x)}")
    return b, h, n, c, k, v


def chunk_recurrence(qg: jax.Array, p: jax.Array, u: jax.Array, ke: jax.Array, a: jax.Array, s0: jax.Array, *,
                     w: jax.Array | None = None, impl: str = "auto", interpret: bool | None = None,
                     tile: crp.Tile | crpt.Tile | None = None) -> tuple[jax.Array, jax.Array]:
    """Run the state recurrence over chunks (equations and shapes in the module docstring).

    Args:
      qg, p, u, ke, a, s0, w: the chunk tensors (``w = None``: no delta correction); ``a`` scalar
        ``[B, H, N]`` or per key channel ``[B, H, N, K]`` (XLA or ``"pallas_tpu"``).
      impl: ``"auto" | "xla" | "pallas" | "pallas_tpu"``.
      interpret: run the Pallas kernels in interpret mode (CPU tests); only with ``impl="pallas"``
        or ``"pallas_tpu"``.
      tile: Pallas launch shape (benchmarks sweep it): a ``chunk_pass_pallas.Tile`` for
        ``"pallas"``, a ``chunk_pass_pallas_tpu.Tile`` for ``"pallas_tpu"``.

    Returns:
      ``(o [B, H, N, C, V]`` in u's dtype, ``S_N [B, H, K, V]`` in s0's dtype).
    """
    shape = _validate(qg, p, u, w, ke, a, s0)
    name, interp = resolve_impl(impl, shape, u.dtype, interpret, vector_decay=a.ndim == 4)
    if name == "xla":
        return xla_chunk_recurrence(qg, p, u, w, ke, a, s0)
    # The kernels carry the state in the accumulation dtype; casting here (not inside the
    # custom_vjp) gives the initial state's gradient its own dtype through the cast.
    acc = jnp.promote_types(u.dtype, jnp.float32)
    # (under a mesh the kernel runs per device: XLA cannot partition a Pallas call)
    run = over_batch(lambda *xs: _pallas(*xs, name, interp, tile), qg.shape[0], check_vma=not interp)
    o, s = run(qg, p, u, w, ke, a, s0.astype(acc))
    return o, s.astype(s0.dtype)
