"""The TPU (Mosaic) chunk-pass kernels (memjax.kernels.chunk_pass_pallas_tpu): interpret mode on
CPU against an independent float64 NumPy loop and the XLA scan (outputs, final state, gradients
w.r.t. every input, odd chunk counts, initial states, scalar and per-key-channel decays, with and
without the delta term, bf16), poisoned outputs, the memories on top with packed segments,
dispatch rules, and (with libtpu) compiling forward and backward through Mosaic for v5p and v5e
compile-only devices. Nothing here has run on a TPU."""
import functools
import json
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl
from jax.test_util import check_grads

from memjax.kernels import chunk_pass as cr
from memjax.kernels import chunk_pass_pallas_tpu as tpu
from memjax.kernels.chunk_pass import chunk_recurrence
from memjax.memory.delta import delta_rule
from memjax.memory.linear import linear_attention
from tests.helpers import compile_for_tpu, rel_rmse

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")
NAMES = ("qg", "p", "u", "ke", "a", "s0")


def problem(b=1, h=2, n=3, c=8, k=16, v=24, dtype=jnp.float64, vector=False, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, dtype)  # noqa: E731
    acc = jnp.promote_types(dtype, jnp.float32)
    a_shape = (b, h, n, k) if vector else (b, h, n)
    return dict(qg=f(b, h, n, c, k), p=f(b, h, n, c, c), u=f(b, h, n, c, v), ke=f(b, h, n, c, k),
                a=jnp.asarray(rng.uniform(0.3, 1.0, a_shape), acc),
                s0=jnp.asarray(rng.standard_normal((b, h, k, v)), acc), w=f(b, h, n, c, k))


def numpy_loop(x, with_w):
    """The recurrence chunk by chunk, per batch and head, in float64 NumPy."""
    qg, p, u, ke, a, s0, w = (np.asarray(x[k], np.float64) for k in NAMES + ("w",))
    b, h, n = a.shape[:3]
    o, s_out = np.zeros(u.shape), np.zeros(s0.shape)
    for i in range(b):
        for j in range(h):
            s = s0[i, j].copy()
            for m in range(n):
                delta = u[i, j, m] - (w[i, j, m] @ s if with_w else 0)
                o[i, j, m] = qg[i, j, m] @ s + p[i, j, m] @ delta
                decay = a[i, j, m][:, None] if a.ndim == 4 else a[i, j, m]
                s = decay * s + ke[i, j, m].T @ delta
            s_out[i, j] = s
    return o, s_out


@functools.partial(jax.jit, static_argnames=("impl", "with_w", "tile"))
def call(x, impl, with_w, tile=None):
    interpret = True if impl == "pallas_tpu" else None
    return chunk_recurrence(*(x[k] for k in NAMES), w=x["w"] if with_w else None, impl=impl, interpret=interpret,
                            tile=tile)


# ----------------------------------------------------------------------------- the kernel (interpreted)


SLOW = pytest.mark.slow


@pytest.mark.parametrize("n,v,tile,with_w,vector", [
    (5, 24, None, True, True),  # one grid step of 5 chunks
    pytest.param(6, 24, tpu.Tile(chunks=4), False, True, marks=SLOW),  # two steps of 3 chunks
    (3, 256, tpu.Tile(bv=128, chunks=1), True, False),  # 2 value tiles x 3 steps of one chunk
    pytest.param(1, 24, None, False, False, marks=SLOW),
    pytest.param(5, 24, tpu.Tile(chunks=1), False, True, marks=SLOW),
    pytest.param(7, 24, None, True, False, marks=SLOW),
    pytest.param(3, 256, tpu.Tile(bv=256), False, True, marks=SLOW),
])
def test_kernel_matches_numpy_loop_and_xla_float64(x64, with_w, vector, n, v, tile):
    """Odd chunk counts, an initial state, both decay forms, one or several chunks per grid step;
    V = 256 as two 128-column tiles or one of 256."""
    x = problem(n=n, v=v, vector=vector)
    o_ref, s_ref = numpy_loop(x, with_w)
    for impl in ("xla", "pallas_tpu"):
        o, s = call(x, impl, with_w, tile)
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert rel_rmse(o, o_ref) < 1e-13 and rel_rmse(s, s_ref) < 1e-13, impl


@pytest.mark.parametrize("with_w,vector", [(True, True), pytest.param(False, False, marks=SLOW),
                                           pytest.param(True, False, marks=SLOW),
                                           pytest.param(False, True, marks=SLOW)])
def test_kernel_gradients_match_xla_float64(x64, with_w, vector):
    """Gradients w.r.t. every input (both decay forms), through the outputs and the final state."""
    x = problem(n=6, vector=vector)
    names = list(NAMES) + (["w"] if with_w else [])
    rng = np.random.default_rng(1)
    wo, ws = (jnp.asarray(rng.standard_normal(x[k].shape)) for k in ("u", "s0"))

    def loss(impl, *args):
        o, s = call(dict(x, **dict(zip(names, args))), impl, with_w, tpu.Tile(chunks=2))  # 3 grid steps
        return jnp.sum(o * wo) + jnp.sum(jnp.sin(s) * ws)

    args = [x[k] for k in names]
    grad = lambda impl: jax.jit(jax.grad(lambda *a: loss(impl, *a), argnums=tuple(range(len(names)))))  # noqa: E731
    for name, r, g in zip(names, grad("xla")(*args), grad("pallas_tpu")(*args)):
        assert g.shape == r.shape and rel_rmse(g, r) < 1e-12, name


@SLOW
def test_kernel_gradients_are_true_derivatives(x64):
    """The custom backward against finite differences, not only against XLA's derivative."""
    x = problem(n=3, vector=True)

    def loss(a, w, s0):
        o, s = call(dict(x, a=a, w=w, s0=s0), "pallas_tpu", True)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s)

    check_grads(loss, (x["a"], x["w"], x["s0"]), order=1, modes=["rev"], eps=1e-6)


def test_initial_state_chaining(x64):
    """Chunks [0, 3) then [3, 6) from the first run's final state == one run over [0, 6)."""
    x = problem(n=6, vector=True)
    o, s = call(x, "pallas_tpu", True)
    def part(lo, hi, s0):
        return {k: (val if k == "s0" else val[:, :, lo:hi]) for k, val in dict(x, s0=s0).items()}

    o1, s1 = call(part(0, 3, x["s0"]), "pallas_tpu", True)
    o2, s2 = call(part(3, 6, s1), "pallas_tpu", True)
    assert rel_rmse(jnp.concatenate([o1, o2], axis=2), o) < 1e-14 and rel_rmse(s2, s) < 1e-14


def test_bfloat16_inputs_accumulate_in_float32():
    """bf16 chunk tensors: outputs (bf16) and state (float32) within bf16 rounding of a float32
    NumPy loop on the same (rounded) inputs and of the XLA path; gradients against the XLA path's."""
    x32 = problem(n=4, k=32, v=32, dtype=jnp.float32)
    x16 = {k: (val.astype(jnp.bfloat16) if k not in ("a", "s0") else val) for k, val in x32.items()}
    ref_o, ref_s = numpy_loop({k: val.astype(jnp.float32) for k, val in x16.items()}, True)

    @functools.partial(jax.jit, static_argnames="impl")
    def run(x, impl):
        def loss(u):
            o, s = call(dict(x, u=u), impl, True)
            return jnp.sum(o.astype(jnp.float32) ** 2) + jnp.sum(s), (o, s)
        return jax.grad(loss, has_aux=True)(x["u"])

    du, (o, s) = run(x16, "pallas_tpu")
    du_xla, (o_xla, s_xla) = run(x16, "xla")
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32 and du.dtype == jnp.bfloat16
    assert rel_rmse(o, ref_o) < 2 ** -7 and rel_rmse(s, ref_s) < 2 ** -7
    assert rel_rmse(o, o_xla) < 2 ** -7 and rel_rmse(s, s_xla) < 1e-5 and rel_rmse(du, du_xla) < 2 ** -6


@SLOW
def test_initial_state_keeps_its_dtype(x64):
    """float64 initial state, float32 chunk tensors: state and its gradient come back in float64."""
    x = {k: (val.astype(jnp.float32) if k != "s0" else val) for k, val in problem(n=3).items()}

    def grad(impl):
        def loss(s0):
            o, s = call(dict(x, s0=s0), impl, True)
            assert s.dtype == jnp.float64
            return jnp.sum(o.astype(jnp.float64)) + jnp.sum(s)
        return jax.grad(loss)(x["s0"])

    g_xla, g = grad("xla"), grad("pallas_tpu")
    assert g.dtype == jnp.float64 and rel_rmse(g, g_xla) < 1e-5


@SLOW  # (an unwritten block would also fail the value and gradient tests above)
@pytest.mark.parametrize("with_w", [True, False])
def test_poisoned_outputs_are_all_written(x64, with_w):
    x = problem(n=3, v=256, vector=with_w)
    w = x["w"] if with_w else None
    outs = tpu.forward(x["qg"], x["p"], x["u"], w, x["ke"], x["a"], x["s0"], save_states=True, interpret=True,
                       poison=True)
    outs += tpu.backward(x["qg"], x["p"], w, x["ke"], x["a"], x["u"], x["s0"], interpret=True, poison=True)
    for name, out in zip("o s s_in dd dsn ds0".split(), outs):
        assert not np.isnan(np.asarray(out)).any(), name


@SLOW
def test_poison_detects_an_unwritten_value_tile(x64):
    """The poison check can fail: a kernel whose writes to value tile 1 are dropped leaves NaN there."""
    x = problem(n=2, v=256)
    kernel = tpu._fwd_kernel

    class DroppingRef:  # an output ref that ignores the writes of value tile 1
        def __init__(self, ref, skip):
            self.ref, self.skip, self.dtype, self.shape = ref, skip, ref.dtype, ref.shape

        def __setitem__(self, index, value):
            self.ref[index] = jnp.where(self.skip, self.ref[index], value)

    def dropping(*refs, **kw):
        skip = pl.program_id(2) == 1
        refs = list(refs)
        refs[-3], refs[-2] = DroppingRef(refs[-3], skip), DroppingRef(refs[-2], skip)  # o, s (then the scratch)
        kernel(*refs, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tpu, "_fwd_kernel", dropping)
        o, s, _ = tpu.forward(x["qg"], x["p"], x["u"], None, x["ke"], x["a"], x["s0"], save_states=False,
                              interpret=True, poison=True)
    o, s = np.asarray(o), np.asarray(s)
    assert np.isnan(o[..., 128:]).all() and not np.isnan(o[..., :128]).any()
    assert np.isnan(s[..., 128:]).all() and not np.isnan(s[..., :128]).any()


# ----------------------------------------------------------------------------- the memories on top


@pytest.mark.parametrize("fn,reference", [
    ("gated_delta", "xla"), pytest.param("gla_channels", "xla", marks=SLOW),
    pytest.param("gated_delta", "recurrent", marks=SLOW), pytest.param("gla_channels", "recurrent", marks=SLOW),
    pytest.param("gla", "xla", marks=SLOW), pytest.param("gla", "recurrent", marks=SLOW),
])
def test_memories_with_the_kernel_match_float64(x64, fn, reference):
    """delta_rule (the w term) and linear_attention (per-key-channel or scalar gates) with
    impl='pallas_tpu' (interpreted) at T = 37, chunk 16 (three chunks, the last partial), with an
    initial state and three packed segments == the XLA chunk pass (or the token-by-token form):
    outputs, final state and gradients w.r.t. every input."""
    rng = np.random.default_rng(7)
    b, t, h, dk, dv = 1, 37, 2, 8, 16
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk))) for _ in range(2))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)))
    g = -jnp.asarray(rng.uniform(0.01, 0.5, (b, t, h, dk) if fn == "gla_channels" else (b, t, h)))
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, h)))
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)))
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2]]), [10, 20, 7], axis=1))

    def run(impl, q, k, v, g, s0):
        kw = dict(g=g, initial_state=s0, segment_ids=seg, mode="recurrent" if impl == "recurrent" else "chunked")
        if impl != "recurrent":
            kw.update(chunk_size=16, impl=impl, interpret=impl == "pallas_tpu" or None)
        if fn == "gated_delta":
            return delta_rule(q, k, v, beta, **kw)
        return linear_attention(q, k, v, **kw)

    def loss(impl, *args):
        o, s = run(impl, *args)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s), (o, s)

    args = (q, k, v, g, s0)
    results = {impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3, 4), has_aux=True))(*args)
               for impl in ("pallas_tpu", reference)}
    g_got, (o, s) = results["pallas_tpu"]
    g_ref, (o_ref, s_ref) = results[reference]
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for name, r, x in zip("q k v g s0".split(), g_ref, g_got):
        assert rel_rmse(x, r) < 1e-10, name


# ----------------------------------------------------------------------------- dispatch


def test_dispatch():
    shape = (2, 4, 8, 64, 128, 128)
    assert "tpu" not in cr.VERIFIED_DEVICES  # never run on a TPU: "auto" must not pick the kernel
    assert cr.resolve_impl("auto", shape, jnp.bfloat16, None, backend="tpu", device_kind="TPU v5p") == ("xla", False)
    assert cr.resolve_impl("auto", shape, jnp.bfloat16, None, backend="tpu", device_kind="TPU v5p",
                           vector_decay=True) == ("xla", False)
    assert cr.resolve_impl("pallas_tpu", shape, jnp.bfloat16, None, backend="tpu") == ("pallas_tpu", False)
    assert cr.resolve_impl("pallas_tpu", shape, jnp.float32, None, backend="tpu", vector_decay=True) \
        == ("pallas_tpu", False)
    assert cr.resolve_impl("pallas_tpu", shape, jnp.float64, True, backend="cpu") == ("pallas_tpu", True)
    with pytest.raises(ValueError, match="needs a TPU"):
        cr.resolve_impl("pallas_tpu", shape, jnp.float32, None, backend="cpu")
    with pytest.raises(ValueError, match="needs a TPU"):
        cr.resolve_impl("pallas_tpu", shape, jnp.float32, None, backend="gpu")
    with pytest.raises(ValueError, match="does not support"):
        cr.resolve_impl("pallas_tpu", shape, jnp.float16, None, backend="tpu")
    with pytest.raises(ValueError, match="does not support"):
        cr.resolve_impl("pallas_tpu", (2, 4, 8, 64, 2048, 1024), jnp.float32, None, backend="tpu")  # VMEM
    with pytest.raises(ValueError, match="does not support"):  # the Triton kernel does not serve a TPU
        cr.resolve_impl("pallas", shape, jnp.float32, None, backend="tpu")
    with pytest.raises(ValueError, match="interpret"):
        cr.resolve_impl("auto", shape, jnp.float32, True, backend="tpu")


def test_auto_picks_the_tpu_kernel_only_on_verified_devices(monkeypatch):
    shape = (2, 4, 8, 64, 128, 128)
    monkeypatch.setattr(cr, "VERIFIED_DEVICES", {"tpu": ("TPU v5p",)})
    assert cr.resolve_impl("auto", shape, jnp.bfloat16, None, backend="tpu", device_kind="TPU v5p") \
        == ("pallas_tpu", False)
    assert cr.resolve_impl("auto", shape, jnp.bfloat16, None, backend="tpu", device_kind="TPU v5 lite") \
        == ("xla", False)
    assert cr.resolve_impl("auto", shape, jnp.float16, None, backend="tpu", device_kind="TPU v5p") == ("xla", False)
    assert cr.resolve_impl("auto", shape, jnp.bfloat16, None, backend="gpu", device_kind="NVIDIA H100") \
        == ("xla", False)


@pytest.mark.parametrize("shape,dtype,ok", [
    ((1, 1, 1, 64, 128, 128), jnp.bfloat16, True),
    ((1, 1, 1, 64, 64, 64), jnp.float32, True),  # V < 128: one whole value tile
    ((1, 1, 1, 48, 96, 384), jnp.bfloat16, True),
    ((1, 1, 1, 64, 128, 128), jnp.float16, False),  # Mosaic rejects float16 loads on v5
    ((1, 1, 1, 64, 128, 128), jnp.float64, False),
    ((1, 1, 1, 20, 128, 128), jnp.float32, False),
    ((1, 1, 1, 64, 100, 128), jnp.float32, False),
    ((1, 1, 1, 64, 128, 1000), jnp.float32, True),  # one whole 1000-column tile
    ((1, 1, 1, 64, 128, 1004), jnp.float32, False),
    ((1, 1, 1, 64, 1024, 1000), jnp.float32, False),  # a whole [K, V] state tile: over the VMEM budget
])
def test_tpu_supports(shape, dtype, ok):
    assert tpu.tpu_supports(shape, dtype, "tpu") is ok
    assert tpu.tpu_supports(shape, dtype, "gpu") is False


def test_block_sizes():
    assert [tpu.value_block(v, 128) for v in (48, 128, 256, 384, 1000)] == [48, 128, 128, 128, 1000]
    assert [tpu.value_block(v, 256) for v in (256, 384, 512)] == [256, 128, 256]
    assert [tpu.chunk_block(n, 8) for n in (1, 5, 6, 7, 9, 64, 97)] == [1, 5, 6, 7, 3, 8, 1]
    # The chunk block shrinks to fit VMEM: 8 chunks at C = 256, K = V = 1024 would not.
    assert tpu._blocks(64, 64, 128, 128, 2, tpu.TPU_TILE) == (128, 8)
    bv, nb = tpu._blocks(64, 256, 1024, 1024, 4, tpu.TPU_TILE)
    assert nb < 8 and tpu.vmem_bytes(256, 1024, bv, 4, nb) <= tpu.VMEM_BUDGET


# ----------------------------------------------------------------------------- Mosaic (libtpu)


def _compile(topology, f, args):
    check = lambda: cr.resolve_impl("pallas_tpu", (1, 2, 3, 64, 128, 128), jnp.bfloat16, None) == ("pallas_tpu", False)  # noqa: E731
    checked = []
    compiled = compile_for_tpu(topology, f, args, inside=lambda: checked.append(check()))
    assert checked == [True]
    cost = compiled.cost_analysis()
    return compiled.as_text(), cost[0] if isinstance(cost, list) else cost


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p:1x1x1", pytest.param("v5e:1x1", marks=pytest.mark.slow)])
@pytest.mark.parametrize("with_w,vector", [(False, False), (True, True)])
def test_kernels_compile_through_mosaic(topology, with_w, vector):
    """chunk_recurrence(impl='pallas_tpu') forward and forward + backward compile for a TPU from
    this CPU host (Mosaic checks block shapes and VMEM as on hardware); the compiled program holds
    the kernels and XLA's cost analysis reads their cost estimates."""
    b, h, n, c, k, v = 1, 2, 4, 64, 128, 256
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = (sd((b, h, n, c, k), bf), sd((b, h, n, c, c), bf), sd((b, h, n, c, v), bf), sd((b, h, n, c, k), bf),
            sd((b, h, n, k) if vector else (b, h, n), jnp.float32), sd((b, h, k, v), jnp.float32),
            sd((b, h, n, c, k), bf))

    def fwd(qg, p, u, ke, a, s0, w):
        return chunk_recurrence(qg, p, u, ke, a, s0, w=w if with_w else None, impl="pallas_tpu",
                                tile=tpu.Tile(chunks=2))  # grid (1, 2, 2, 2)

    def fwd_bwd(*xs):
        def loss(*xs):
            o, s = fwd(*xs)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=tuple(range(7)))(*xs)

    text, cost = _compile(topology, fwd, args)
    assert text.count("tpu_custom_call") == 1
    kernel_flops = 2 * b * h * n * c * v * (2 * k + c + (k if with_w else 0))  # the kernel's CostEstimate
    assert cost["flops"] == pytest.approx(kernel_flops, rel=1e-6)
    assert cost["bytes accessed"] > 0
    text, cost = _compile(topology, fwd_bwd, args)
    assert text.count("tpu_custom_call") == 2  # the forward saving states, the backward
    assert cost["flops"] > 2 * kernel_flops  # both kernels plus the backward's batched products


@needs_libtpu
def test_mosaic_rejects_a_bad_block_shape(monkeypatch):
    """The compile test can fail: a 64-column value tile of a 128-wide V breaks Mosaic's (8, 128) rule."""
    monkeypatch.setattr(tpu, "value_block", lambda v, cap: 64)
    x = problem(n=2, c=64, k=128, v=128, dtype=jnp.float32)
    args = [x[k] for k in NAMES]
    with pytest.raises(Exception, match="divisible by 8 and 128"):
        _compile("v5p:1x1x1", lambda *a: chunk_recurrence(*a, impl="pallas_tpu"), args)


# ----------------------------------------------------------------------------- hardware (a TPU)


@pytest.mark.skipif(jax.default_backend() != "tpu", reason="needs a TPU")
@pytest.mark.parametrize("with_w,vector", [(False, False), (True, True)])
def test_hardware_kernel_matches_xla(with_w, vector):
    """Compiled (not interpreted) kernels vs the XLA scan on the TPU, with poisoned outputs; add
    the device kind to chunk_pass.VERIFIED_DEVICES["tpu"] once green. Not yet run anywhere."""
    x = problem(b=2, h=4, n=12, c=64, k=128, v=256, dtype=jnp.float32, vector=vector)
    w = x["w"] if with_w else None
    tile = tpu.Tile(chunks=4)  # 3 chunk blocks x 2 value tiles per (batch, head)
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda x: chunk_recurrence(*(x[k] for k in NAMES), w=w, impl="xla"))(x)
    o, s, s_in = jax.jit(lambda x: tpu.forward(x["qg"], x["p"], x["u"], w, x["ke"], x["a"], x["s0"], save_states=True,
                                               interpret=False, tile=tile, poison=True))(x)
    dd, dsn, ds0 = jax.jit(lambda x: tpu.backward(x["qg"], x["p"], w, x["ke"], x["a"], x["u"], x["s0"],
                                                  interpret=False, tile=tile, poison=True))(x)
    for out in (o, s, s_in, dd, dsn, ds0):
        assert not np.isnan(np.asarray(out)).any()
    assert rel_rmse(o, ref[0]) < 1e-2 and rel_rmse(s, ref[1]) < 1e-2  # default-precision MXU passes
    names = list(NAMES) + (["w"] if with_w else [])

    def loss(impl):
        def f(*args):
            y = dict(x, **dict(zip(names, args)))
            o, s = chunk_recurrence(*(y[k] for k in NAMES), w=y["w"] if with_w else None, impl=impl, tile=tile
                                    if impl == "pallas_tpu" else None)
            return jnp.sum(jnp.sin(o)) + jnp.sum(s * s)
        return jax.jit(jax.grad(f, argnums=tuple(range(len(names)))))

    with jax.default_matmul_precision("highest"):
        g_ref = loss("xla")(*[x[k] for k in names])
    for name, r, g in zip(names, g_ref, loss("pallas_tpu")(*[x[k] for k in names])):
        assert rel_rmse(g, r) < 1e-2, name


@needs_libtpu
@pytest.mark.slow
def test_tpu_cost_benchmark_smoke(tmp_path):
    """benchmarks/tpu_cost.py at a tiny shape: both impls compile for v5p, every row has bytes, the
    io ratio is the accessed bytes over the inputs + outputs (forward) or inputs + cotangents +
    gradients (backward)."""
    from benchmarks import tpu_cost

    out = tmp_path / "cost.json"
    rows = tpu_cost.main(["--B", "1", "--T", "128", "--H", "1", "--K", "128", "--V", "128", "--ops", "gla_scalar",
                          "--json", str(out)])
    assert [(r["impl"], r["pass"]) for r in rows] == [("xla", "fwd"), ("xla", "fwd+bwd"), ("pallas_tpu", "fwd"),
                                                      ("pallas_tpu", "fwd+bwd")]
    for r in rows:
        assert "error" not in r and r["bytes_accessed"] > r["io_bytes"] > 0
        assert r["ratio"] == pytest.approx(r["bytes_accessed"] / r["io_bytes"])
    # forward io: q, k, v (bf16 [1, 128, 1, 128]), g (f32 [1, 128, 1]); out (bf16) and the f32 state
    assert rows[0]["io_bytes"] == 3 * 128 * 128 * 2 + 128 * 4 + 128 * 128 * 2 + 128 * 128 * 4
    assert json.loads(out.read_text())["rows"][0]["memory"] == "gla_scalar"
