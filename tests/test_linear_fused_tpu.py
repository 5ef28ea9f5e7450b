"""The fused Mosaic kernels of scalar-decay linear attention (memjax.kernels.linear_fused_pallas_tpu:
the whole chunked pass in one kernel, forward and backward): interpret mode on CPU against the
XLA forms of memjax.memory.linear_vjp and the token-by-token float64 form (outputs, final state,
gradients w.r.t. every input, one and several head blocks, odd chunk counts, partial last chunk,
initial states, packed segments, full decays, non-finite inputs, bf16), poisoned outputs,
dispatch, and (with libtpu) compiling forward and backward through Mosaic for compile-only v5p /
v5e devices. Nothing here has run on a TPU."""
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels import linear_fused_pallas_tpu as fk
from memjax.kernels.fused_chunk_tpu import chunks_per_step
from memjax.memory import linear_vjp as lv
from memjax.memory.chunking import to_chunks
from memjax.memory.linear import linear_attention
from tests.helpers import assert_bf16_error_like, assert_non_finite_like, compile_for_tpu, pallas_calls, rel_rmse

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")
SLOW = pytest.mark.slow


def _inputs(rng, b, t, h, dk, dv, dtype=jnp.float64):
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
    return q, k, v


@pytest.mark.parametrize("b,t,h,dk,dv,c,chunks", [
    (2, 48, 3, 16, 24, 8, 2),  # 6 chunks, 3 steps of 2; 3 heads: one whole head block
    (1, 32, 2, 64, 64, 8, 2),  # K = V = 64: q, k, v, o read / written as the flat [B, T, H K] view
    pytest.param(1, 40, 16, 8, 16, 8, 4, marks=SLOW),  # 5 chunks (a prime: 1 per step), two blocks of 8 heads
    pytest.param(1, 64, 2, 128, 128, 16, 4, marks=SLOW),  # lane-dense K = V = 128
])
def test_kernels_match_the_xla_fused_form_float64(x64, b, t, h, dk, dv, c, chunks):
    """forward (output, final state, saved chunk-start states) and backward (dq, dk, dv, the
    decay's gradient, dS_0) of the kernels == the XLA fused scan they replace and its gate-gradient
    sum, with gates, resets and an initial state; outputs pre-filled with NaN, so every element
    must be written."""
    rng = np.random.default_rng(0)
    q, k, v = _inputs(rng, b, t, h, dk, dv)
    g = jnp.asarray(-rng.uniform(0, 1, (b, t, h)))
    resets = jnp.asarray(rng.uniform(size=(b, t, h)) < 0.1)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)))
    ch = lambda x: to_chunks(x, c)  # noqa: E731
    G, r = jax.jit(lv._gate_sums, static_argnums=2)(ch(g), ch(resets), jnp.float64)
    o_ref, sf_ref, st_ref = jax.jit(lv._fused_forward, static_argnums=(6, 7))(ch(q), ch(k), ch(v), G, r, s0, 0.3, True)
    fwd = jax.jit(functools.partial(fk.forward, scale=0.3, chunk_size=c, save_states=True, interpret=True,
                                    chunks=chunks, poison=True))
    o, sf, st = fwd(q, k, v, g, resets, s0)
    assert rel_rmse(o, o_ref.reshape(o.shape)) < 1e-13
    assert rel_rmse(sf, sf_ref) < 1e-13
    assert rel_rmse(st, jnp.moveaxis(st_ref, 0, 2)) < 1e-13
    do = jnp.asarray(rng.standard_normal(o.shape))
    dsf = jnp.asarray(rng.standard_normal(sf.shape))
    last = jnp.sum(dsf * sf, axis=(-2, -1))
    dq, dk_, dv_, dlam, ds0 = jax.jit(lv._fused_backward, static_argnums=(8, 9))(
        ch(q), ch(k), ch(v), ch(do), G, r, st_ref, dsf, 0.3, True)
    dg = jax.jit(lv._gate_gradient)(dlam, ch(resets), last).reshape(b, t, h)
    got = jax.jit(functools.partial(fk.backward, scale=0.3, chunk_size=c, interpret=True, chunks=chunks,
                                    poison=True))(q, k, v, do, g, resets, st, dsf, last)
    assert got[5] is None
    for name, x, ref in zip(("dq", "dk", "dv", "dg", "ds0"), got, (dq, dk_, dv_, dg, ds0)):
        assert not np.isnan(np.asarray(x)).any(), name
        assert rel_rmse(x, ref.reshape(x.shape)) < 1e-12, name


def _run(impl, q, k, v, g, s0, seg, chunk=16):
    kw = dict(g=g, initial_state=s0, segment_ids=seg)
    if impl == "recurrent":
        return linear_attention(q, k, v, mode="recurrent", **kw)
    return linear_attention(q, k, v, chunk_size=chunk, impl=impl, interpret=True if impl == "pallas_tpu" else None,
                            **kw)


@pytest.mark.parametrize("gated,reference", [
    (True, "recurrent"), pytest.param(False, "recurrent", marks=SLOW), pytest.param(True, "xla", marks=SLOW),
])
def test_linear_attention_with_the_fused_kernel_matches_float64(x64, gated, reference):
    """linear_attention(impl='pallas_tpu', interpreted) at T = 37, chunk 16 (the last chunk
    partial), with an initial state and three packed segments == the token-by-token form (or the
    XLA chunked form): outputs, final state and gradients w.r.t. q, k, v, g and the initial state."""
    rng = np.random.default_rng(7)
    b, t, h, dk, dv = 2, 37, 3, 8, 16
    q, k, v = _inputs(rng, b, t, h, dk, dv)
    g = -jnp.asarray(rng.uniform(0.01, 0.5, (b, t, h))) if gated else None
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)))
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2]]), [10, 20, 7], axis=1).repeat(b, 0))

    def loss(impl, q, k, v, g, s0):
        o, s = _run(impl, q, k, v, g, s0, seg)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s), (o, s)

    argnums = (0, 1, 2, 3, 4) if gated else (0, 1, 2, 4)
    results = {impl: jax.jit(jax.grad(functools.partial(loss, impl), argnums=argnums, has_aux=True))(q, k, v, g, s0)
               for impl in ("pallas_tpu", reference)}
    (grads, (o, s)), (grads_ref, (o_ref, s_ref)) = results["pallas_tpu"], results[reference]
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for i, x, r in zip(argnums, grads, grads_ref):
        assert rel_rmse(x, r) < 1e-10, "q k v g s0".split()[i]


@SLOW  # (the float64 tests check the final state and the initial state's gradient)
def test_initial_state_chaining(x64):
    """Two halves, the second started from the first's final state == the whole sequence."""
    rng = np.random.default_rng(3)
    q, k, v = _inputs(rng, 1, 64, 2, 8, 8)
    g = -jnp.asarray(rng.uniform(0.01, 0.5, (1, 64, 2)))
    o, s = _run("pallas_tpu", q, k, v, g, None, None)
    o1, s1 = _run("pallas_tpu", q[:, :32], k[:, :32], v[:, :32], g[:, :32], None, None)
    o2, s2 = _run("pallas_tpu", q[:, 32:], k[:, 32:], v[:, 32:], g[:, 32:], s1, None)
    assert rel_rmse(jnp.concatenate([o1, o2], axis=1), o) < 1e-13 and rel_rmse(s2, s) < 1e-13


def test_full_decays_and_non_finite_inputs_match_the_xla_form(x64):
    """A full decay (g = -inf: a reset of that head) and a NaN in k and in q: the fused kernel
    gives what the XLA form gives (the NaN poisons its own document's later outputs, nothing else),
    outputs and gradients, with nothing non-finite reaching a kept value."""
    rng = np.random.default_rng(5)
    b, t, h = 1, 40, 2
    q, k, v = _inputs(rng, b, t, h, 8, 8)
    g = -jnp.asarray(rng.uniform(0.01, 0.5, (b, t, h)))
    g = g.at[0, 9, 0].set(-jnp.inf)
    q0, k0 = q, k
    k = k.at[0, 30, 1, 2].set(jnp.nan)
    q = q.at[0, 5, 0, 1].set(jnp.inf)
    seg = jnp.asarray(np.repeat(np.array([[0, 1]]), [25, 15], axis=1))

    def loss(impl, q, k, v, g):
        o, s = _run(impl, q, k, v, g, None, seg)
        return jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0) ** 2), (o, s)

    # the first bad token: q at t = 5 (poisons itself); k at t = 30 (poisons the rest of its document)
    assert_non_finite_like(loss, (q, k, v, g), (q0, k0, v, g), 5, 8 * (1 + 10))


def test_bfloat16_error_is_that_of_the_xla_form():
    """bf16 inputs: the fused kernel's error against a float64 run is within 1.5x of the XLA
    chunked form's (both round the same operands to bf16 and accumulate in float32)."""
    rng = np.random.default_rng(11)
    b, t, h, dk, dv = 1, 64, 2, 32, 32
    q, k, v = _inputs(rng, b, t, h, dk, dv, jnp.float32)
    g = -jnp.asarray(rng.uniform(0.01, 0.3, (b, t, h)), jnp.float32)

    def run(impl, dtype):
        def loss(q, k, v, g):
            o, s = _run(impl, q.astype(dtype), k.astype(dtype), v.astype(dtype), g, None, None, chunk=32)
            return jnp.sum(o.astype(jnp.float32) * v[..., :dv]) + jnp.sum(s), (o, s)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, g)

    assert_bf16_error_like(run, max_err=2e-2, slack=1e-3)


def test_dispatch(monkeypatch):
    """The fused kernel is picked for impl='pallas_tpu' (interpreted on CPU here) and never by
    'xla' / 'auto' off a verified TPU; shapes it does not take leave the other paths."""
    shape = (2, 256, 16, 128)
    assert lv.fused_kernel("xla", shape, 128, jnp.bfloat16, 64, None) is None
    assert lv.fused_kernel("auto", shape, 128, jnp.bfloat16, 64, None) is None
    assert lv.fused_kernel("pallas_tpu", shape, 128, jnp.float64, 64, True) == ("pallas_tpu", True)
    with pytest.raises(ValueError, match="needs a TPU"):
        lv.fused_kernel("pallas_tpu", shape, 128, jnp.bfloat16, 64, None)
    calls = []
    monkeypatch.setattr(fk, "forward", lambda *a, **kw: calls.append(kw) or (_ for _ in ()).throw(RuntimeError("x")))
    q = jnp.zeros((1, 16, 2, 8))
    with pytest.raises(RuntimeError):
        linear_attention(q, q, q, g=jnp.zeros((1, 16, 2)), chunk_size=8, impl="pallas_tpu", interpret=True)
    assert calls and calls[0]["interpret"] is True


@pytest.mark.parametrize("shape,dtype,ok", [
    ((8, 4096, 16, 128, 128, 64), jnp.bfloat16, True),
    ((1, 64, 3, 64, 64, 64), jnp.float32, True),
    ((1, 64, 16, 128, 128, 64), jnp.float32, True),
    ((1, 64, 16, 256, 128, 32), jnp.bfloat16, True),
    ((1, 64, 16, 256, 128, 64), jnp.bfloat16, False),  # 8 heads at C = 64: over the VMEM budget
    ((1, 64, 4, 256, 256, 64), jnp.bfloat16, True),  # 4 heads (a whole-H block) fit
    ((1, 64, 16, 128, 128, 64), jnp.float16, False),  # Mosaic rejects float16 loads on v5
    ((1, 64, 16, 128, 128, 64), jnp.float64, False),
    ((1, 60, 16, 128, 128, 20), jnp.float32, False),  # C not a multiple of 8
])
def test_supports(shape, dtype, ok):
    assert fk.supports(shape, dtype, "tpu") is ok
    assert fk.supports(shape, dtype, "gpu") is False


def test_chunks_per_step_fit_vmem():
    assert fk.head_block(16) == 8 and fk.head_block(6) == 6 and fk.head_block(1) == 1
    # B=8 T=4096 H=16 K=V=128 bf16, chunk 64: 2 chunks of 8 heads per step (4 would not fit)
    steps = lambda *a: chunks_per_step(*a, fk.vmem_bytes, fk.VMEM_BUDGET)  # noqa: E731
    assert steps(64, 64, 8, 128, 128, 2, 4) == 2
    assert fk.vmem_bytes(64, 8, 128, 128, 2, 2) <= fk.VMEM_BUDGET < fk.vmem_bytes(64, 8, 128, 128, 2, 4)
    assert steps(64, 64, 2, 64, 64, 4, 8) == 8


# ----------------------------------------------------------------------------- Mosaic (libtpu)


@needs_libtpu
@pytest.mark.parametrize("topology,h,dk", [("v5p:1x1x1", 16, 128),
                                           pytest.param("v5p:1x1x1", 32, 64, marks=SLOW),  # (KDA's runs by default)
                                           pytest.param("v5e:1x1", 16, 128, marks=SLOW)])
@pytest.mark.parametrize("gated", [True, pytest.param(False, marks=SLOW)])
def test_linear_attention_compiles_through_mosaic(topology, h, dk, gated):
    """linear_attention(impl='pallas_tpu') forward and forward + backward compile for a TPU from
    this CPU host (Mosaic checks block shapes, the in-VMEM transposes, the lane cuts of the flat
    view at K = V = 64 and VMEM as on hardware): one fused kernel each way, carrying its
    CostEstimate (FLOPs of the chunked form)."""
    b, t, dv = 1, 512, dk
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = [sd((b, t, h, dk), bf), sd((b, t, h, dk), bf), sd((b, t, h, dv), bf), sd((b, t, h), jnp.float32)]

    def fwd(q, k, v, g):
        return linear_attention(q, k, v, g=g if gated else None, impl="pallas_tpu")

    def fwd_bwd(*xs):
        def loss(*xs):
            o, s = fwd(*xs)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(*xs)

    compiled = compile_for_tpu(topology, fwd, args)
    text = compiled.as_text()
    assert text.count("custom-call(") == 1 and "linear_fused_fwd_tpu" in text
    cost = compiled.cost_analysis()
    cost = cost[0] if isinstance(cost, list) else cost
    assert cost["flops"] >= 2 * b * h * t * (64 * dk + 64 * dv + 2 * dk * dv)
    compiled = compile_for_tpu(topology, fwd_bwd, args)
    text = compiled.as_text()
    assert "linear_fused_fwd_tpu" in text and "linear_fused_bwd_tpu" in text and text.count("custom-call(") == 2


# ----------------------------------------------------------------------------- Mamba-2 SSD on the kernel


def test_kernels_with_a_value_factor_and_shared_heads_match_xla_float64(x64):
    """The kernels with ``w`` (the write is ``k (w v)^T``, Mamba-2's ``dt x``) and one q / k head
    shared by every value head == the XLA fused scan on ``w v`` with q, k repeated, gradients
    included (the shared heads' gradients summed over heads and head blocks): 16 heads, two
    blocks of 8."""
    rng = np.random.default_rng(2)
    b, t, h, dk, dv, c = 1, 32, 16, 8, 8, 8
    q, k = (jnp.asarray(rng.standard_normal((b, t, 1, dk))) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)))
    w = jnp.asarray(rng.uniform(0.1, 1.0, (b, t, h)))
    g = jnp.asarray(-rng.uniform(0, 1, (b, t, h)))
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)))
    do = jnp.asarray(rng.standard_normal((b, t, h, dv)))
    dsf = jnp.asarray(rng.standard_normal((b, h, dk, dv)))

    def xla(q, k, v, g, w, s0):
        return lv.chunked_scalar_decay(q, k, v, g, None, s0, 0.5, c, w=w)

    def kernel(q, k, v, g, w, s0):
        return lv.chunked_scalar_decay(q, k, v, g, None, s0, 0.5, c, w=w, kernel=("pallas_tpu", True))

    def run(f, *args):
        out, vjp = jax.vjp(f, *args)
        return out, vjp((do, dsf))

    args = (q, k, v, g, w, s0)
    (o, s), grads = jax.jit(functools.partial(run, kernel))(*args)
    (o_ref, s_ref), grads_ref = jax.jit(functools.partial(run, xla))(*args)
    assert rel_rmse(o, o_ref) < 1e-13 and rel_rmse(s, s_ref) < 1e-13
    for name, x, ref in zip("q k v g w s0".split(), grads, grads_ref):
        assert x.shape == ref.shape, name
        assert rel_rmse(x, ref) < 1e-12, name


@pytest.mark.parametrize("groups,h,p", [(1, 2, 64),  # head dim 64: x, y, dx, dy as the flat [B, T, H P] view
                                         # x in place, [B, T, H, P] (by default: the shared-heads test above)
                                         pytest.param(1, 3, 8, marks=SLOW), pytest.param(3, 3, 8, marks=SLOW)])
def test_selective_scan_with_the_fused_kernel_matches_float64(x64, groups, h, p):
    """selective_scan(impl='pallas_tpu', interpreted) with one group (B, C read once for all heads)
    or one per head, D, an initial state and packed segments at T = 37, chunk 16 == the
    token-by-token form: outputs, final state, gradients w.r.t. x, dt, A, B, C, D, s0."""
    from memjax.memory.ssm import selective_scan

    rng = np.random.default_rng(0)
    b, t, n = 2, 37, 16
    x = jnp.asarray(rng.standard_normal((b, t, h, p)))
    dt = jnp.asarray(rng.uniform(0.1, 1, (b, t, h)))
    A = -jnp.asarray(rng.uniform(0.5, 2, (h,)))
    B, C = (jnp.asarray(rng.standard_normal((b, t, groups, n))) for _ in range(2))
    D = jnp.asarray(rng.standard_normal((h,)))
    s0 = jnp.asarray(rng.standard_normal((b, h, p, n)))
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2]]), [10, 20, 7], axis=1).repeat(b, 0))

    def loss(impl, *args):
        kw = dict(D=args[5], initial_state=args[6], segment_ids=seg)
        if impl == "recurrent":
            y, s = selective_scan(*args[:5], mode="recurrent", **kw)
        else:
            y, s = selective_scan(*args[:5], chunk_size=16, impl=impl, interpret=True, **kw)
        return jnp.sum(jnp.sin(y)) + jnp.sum(s * s), (y, s)

    args = (x, dt, A, B, C, D, s0)
    calls = pallas_calls(jax.make_jaxpr(functools.partial(loss, "pallas_tpu"))(*args).jaxpr)
    x_shape = (b, 48, h * p) if p == 64 else (b, 48, h, p)  # (T padded to 48)
    assert calls and calls[0].invars[2].aval.shape == x_shape
    got, want = (jax.jit(jax.grad(functools.partial(loss, impl), argnums=tuple(range(7)), has_aux=True))(*args)
                 for impl in ("pallas_tpu", "recurrent"))
    assert rel_rmse(got[1][0], want[1][0]) < 1e-12 and rel_rmse(got[1][1], want[1][1]) < 1e-12
    for name, x_, r in zip("x dt A B C D s0".split(), got[0], want[0]):
        assert rel_rmse(x_, r) < 1e-10, name


@pytest.mark.parametrize("p", [8, 64])  # 64: x, y as the flat [B, T, H P] view
def test_selective_scan_non_finite_inputs_match_the_xla_form(x64, p):
    """SSD on the fused kernel reads a non-finite x, B, C as 0 itself (no sanitised copy): a NaN in
    x at t = 20 and an inf in C at t = 7 give NaN exactly where the XLA form does, earlier outputs
    bit-identical to the clean run's, and the same finite gradients."""
    from memjax.memory.ssm import selective_scan

    rng = np.random.default_rng(6)
    b, t, h, n = 1, 40, 2, 8
    x0 = jnp.asarray(rng.standard_normal((b, t, h, p)))
    dt = jnp.asarray(rng.uniform(0.1, 1, (b, t, h)))
    B, C0 = (jnp.asarray(rng.standard_normal((b, t, 1, n))) for _ in range(2))
    x, C = x0.at[0, 20, 1, 3].set(jnp.nan), C0.at[0, 7, 0, 2].set(jnp.inf)
    seg = jnp.asarray(np.repeat(np.array([[0, 1]]), [30, 10], axis=1))

    def loss(impl, x, dt, B, C):
        y, s = selective_scan(x, dt, -jnp.asarray([0.5, 2.0]), B, C, segment_ids=seg, chunk_size=16, impl=impl,
                              interpret=True if impl == "pallas_tpu" else None)
        return jnp.sum(jnp.where(jnp.isfinite(y), y, 0.0) ** 2), (y, s)

    # C at t = 7 poisons that token in both heads; x at t = 20 head 1 poisons it to the end of its document (t < 30)
    assert_non_finite_like(loss, (x, dt, B, C), (x0, dt, B, C0), 7, p * (2 + 10))


@needs_libtpu
@pytest.mark.slow  # (the linear-attention and KDA kernels' Mosaic compiles run by default; CI's time)
def test_selective_scan_compiles_through_mosaic():
    """Mamba-2 SSD with one group on the fused kernels compiles for v5p, forward + backward."""
    from memjax.memory.ssm import selective_scan

    b, t, h, p, n = 1, 256, 16, 128, 128
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = [sd((b, t, h, p), bf), sd((b, t, h), jnp.float32), sd((b, t, 1, n), bf), sd((b, t, 1, n), bf)]

    def fwd_bwd(x, dt, B, C):
        def loss(*xs):
            y, s = selective_scan(xs[0], xs[1], -jnp.linspace(1.0, 4.0, h), xs[2], xs[3], impl="pallas_tpu")
            return jnp.sum(y.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(x, dt, B, C)

    text = compile_for_tpu("v5p:1x1x1", fwd_bwd, args).as_text()
    assert "linear_fused_fwd_tpu" in text and "linear_fused_bwd_tpu" in text


# ----------------------------------------------------------------------------- sharded programs


def _fused_memories():
    from memjax.memory.delta import delta_rule

    def gla(q, k, v, g, impl, interpret):
        return linear_attention(q, k, v, g=jnp.broadcast_to(g[..., None], q.shape), chunk_size=8, impl=impl,
                                interpret=interpret)

    def delta(q, k, v, g, impl, interpret):
        kn = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
        return delta_rule(q, kn, v, jax.nn.sigmoid(v[..., 0]), g=g, chunk_size=8, impl=impl, interpret=interpret)

    def scalar(q, k, v, g, impl, interpret):
        return linear_attention(q, k, v, g=g, chunk_size=8, impl=impl, interpret=interpret)

    return {"scalar": scalar, "gla": gla, "delta": delta}


@pytest.mark.parametrize("name", ["scalar", "delta", pytest.param("gla", marks=SLOW)])
def test_sharded_batch_equals_one_device(name):
    """A Mosaic call cannot be partitioned by XLA, so under a mesh the fused kernels run inside a
    shard_map over the batch (memjax.kernels.manual_axes.over_batch): with the batch split over 4
    CPU devices (interpreted kernels) outputs, final states and gradients equal the unsharded run."""
    from jax.sharding import NamedSharding, PartitionSpec as P

    fn = _fused_memories()[name]
    rng = np.random.default_rng(4)
    q, k, v = _inputs(rng, 4, 16, 2, 8, 8, jnp.float32)
    g = -jnp.asarray(rng.uniform(0.01, 0.5, (4, 16, 2)), jnp.float32)

    def loss(q, k, v, g):
        o, s = fn(q, k, v, g, "pallas_tpu", True)
        return jnp.sum(o * o) + jnp.sum(s), (o, s)

    step = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))
    want = step(q, k, v, g)
    mesh = jax.make_mesh((4,), ("data",), devices=jax.devices()[:4], axis_types=(jax.sharding.AxisType.Auto,))
    with jax.set_mesh(mesh):
        sharded = [jax.device_put(x, NamedSharding(mesh, P("data"))) for x in (q, k, v, g)]
        got = step(*sharded)
    for x, r in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        assert rel_rmse(x, r) < 1e-6


def _v5p_sharded_inputs():
    """A 4-chip v5p mesh over "data" and q, k, v ``[8, 256, 16, 128]`` bf16 and a gate ``[8, 256,
    16]`` with the batch sharded over it (compile-only devices)."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from memjax.train import compile as plan_lib

    mesh = jax.make_mesh((4,), ("data",), devices=plan_lib.topology_devices("v5p:2x2x1"),
                         axis_types=(jax.sharding.AxisType.Auto,))
    b, t, h, d = 8, 256, 16, 128
    sh = NamedSharding(mesh, P("data"))
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=sh) for _ in range(3)] + [
        jax.ShapeDtypeStruct((b, t, h), jnp.float32, sharding=sh)]
    return mesh, args, (b, t, h)


@needs_libtpu
def test_fused_kernels_compile_for_a_sharded_program():
    """On a 4-chip v5p slice with the batch sharded over the mesh, forward + backward of every fused
    kernel compiles (without the shard_map XLA refuses: "Mosaic kernels cannot be automatically
    partitioned"), with no all-gather of the inputs and each kernel on the per-device batch."""
    mesh, args, (b, t, h) = _v5p_sharded_inputs()
    for name, fn in _fused_memories().items():
        def loss(q, k, v, g, fn=fn):
            o, s = fn(q, k, v, g, "pallas_tpu", None)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

        with jax.set_mesh(mesh):
            text = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3))).lower(*args).compile().as_text()
        assert "all-gather" not in text, name
        calls = [line for line in text.splitlines() if "custom-call(" in line and "tpu_custom_call" in line]
        assert len(calls) == 2 and all(f"[{b // 4},{t}," in line for line in calls), name


@needs_libtpu
@SLOW  # (~35 s: KDA's XLA side compiles slowly)
def test_state_pass_kernel_compiles_for_a_sharded_program():
    """The state-pass kernel (KDA's chunk pass with impl="pallas_tpu") runs per device the same way
    on a 4-chip v5p slice with the batch sharded."""
    from memjax.memory.delta import delta_rule

    mesh, args, (b, t, h) = _v5p_sharded_inputs()

    def kda_loss(q, k, v, g):
        kn = k.astype(jnp.float32) / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True)
        gk = jnp.broadcast_to(g[..., None], q.shape)
        o, s = delta_rule(q, kn.astype(q.dtype), v, jax.nn.sigmoid(g), g=gk, chunk_size=64, impl="pallas_tpu")
        return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(kda_loss, argnums=(0, 1, 2, 3))).lower(*args).compile().as_text()
    calls = [line for line in text.splitlines() if "custom-call(" in line and "tpu_custom_call" in line]
    assert calls and all(f"[{b // 4},{h}," in line for line in calls)
