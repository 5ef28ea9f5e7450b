"""The fused Mosaic kernels of the channel-wise delta rule (Kimi Delta Attention through
delta_rule(g [B, T, H, K]), GDN-2; memjax.kernels.kda_fused_pallas_tpu: the sub-chunked solve and
the state pass in one kernel each way): interpret mode on CPU against the token-by-token float64
form and the XLA chunked form (outputs, final state, gradients w.r.t. q, k, v, beta / b, w, g and
the initial state; strong decays that overflow the textbook factorisation, a per-channel -inf
reset, packed segments, a partial last chunk, 4 sub-chunks, two head blocks, grouped value heads,
non-finite inputs, bf16), poisoned outputs, and (with libtpu) compiling forward and backward
through Mosaic for compile-only v5p / v5e devices. Nothing here has run on a TPU."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels import kda_fused_pallas_tpu as fk
from memjax.memory.delta import delta_rule
from memjax.memory.gdn2 import gdn2
from tests.helpers import assert_bf16_error_like, assert_non_finite_like, compile_for_tpu, pallas_calls, rel_rmse

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")
SLOW = pytest.mark.slow


def _problem(rng, b, t, h, dk, dv, hv=None, dtype=jnp.float64, strength=3.0):
    hv = hv or h
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    k = k / jnp.linalg.norm(k.astype(jnp.float32), axis=-1, keepdims=True).astype(dtype)
    v = jnp.asarray(rng.standard_normal((b, t, hv, dv)), dtype)
    beta = jnp.asarray(rng.uniform(0.1, 1.9, (b, t, hv)), dtype)
    g = -jnp.asarray(rng.uniform(0.01, strength, (b, t, hv, dk)), jnp.float64 if dtype == jnp.float64 else jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, hv, dk, dv)), dtype)
    return q, k, v, beta, g, s0


def _run(impl, q, k, v, beta, g, s0, seg, chunk=32):
    kw = dict(g=g, initial_state=s0, segment_ids=seg)
    if impl == "recurrent":
        return delta_rule(q, k, v, beta, mode="recurrent", **kw)
    return delta_rule(q, k, v, beta, chunk_size=chunk, impl=impl, interpret=True if impl == "pallas_tpu" else None,
                      **kw)


def _seg(b, lengths):
    return jnp.asarray(np.repeat(np.arange(len(lengths))[None], lengths, axis=1).repeat(b, 0))


@pytest.mark.parametrize("h,hv,chunk,reference", [
    (3, 3, 32, "recurrent"),  # two sub-chunks per chunk, the last chunk partial
    pytest.param(16, 16, 64, "xla", marks=SLOW),  # four sub-chunks, two blocks of 8 heads
    pytest.param(2, 4, 8, "recurrent", marks=SLOW),  # a chunk shorter than a sub-chunk; grouped value heads
])
def test_kda_with_the_fused_kernel_matches_float64(x64, h, hv, chunk, reference):
    """delta_rule(g [B, T, HV, K], impl='pallas_tpu', interpreted) at T = 37, beta in (0.1, 1.9),
    decays up to 3 per token per channel (e^-96 over a chunk: exp(-G) of the factorisation through
    the chunk start overflows), a -inf in one channel, an initial state and three packed segments
    == the token-by-token form (or the XLA chunked form): outputs, final state, every gradient."""
    rng = np.random.default_rng(0)
    q, k, v, beta, g, s0 = _problem(rng, 2, 37, h, 8, 16, hv=hv)
    g = g.at[0, 12, 1, 3].set(-jnp.inf)
    seg = _seg(2, [10, 20, 7])

    def loss(impl, *args):
        o, s = _run(impl, *args, seg, chunk=chunk)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s), (o, s)

    (grads, (o, s)), (grads_ref, (o_ref, s_ref)) = (
        jax.jit(jax.grad(lambda *a, i=impl: loss(i, *a), argnums=tuple(range(6)), has_aux=True))(q, k, v, beta, g, s0)
        for impl in ("pallas_tpu", reference))
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for name, x, r in zip("q k v beta g s0".split(), grads, grads_ref):
        assert np.isfinite(np.asarray(x)).all(), name
        assert rel_rmse(x, r) < 1e-10, name


@SLOW  # (the default suite's KDA test runs the same kernel; this one the general erase / write gates)
def test_gdn2_with_the_fused_kernel_matches_float64(x64):
    """gdn2(impl='pallas_tpu', interpreted) with channel-wise erase and write gates, grouped value
    heads, chunk 64 (four sub-chunks) at T = 70 and three segments == the token-by-token form."""
    rng = np.random.default_rng(2)
    q, k, v, _, g, s0 = _problem(rng, 1, 70, 2, 8, 16, hv=4)
    b = jnp.asarray(rng.uniform(0.1, 1.9, g.shape))
    w = jnp.asarray(rng.uniform(0.1, 1.0, v.shape))
    seg = _seg(1, [10, 50, 10])

    def loss(impl, *xs):
        kw = dict(initial_state=xs[-1], segment_ids=seg, mode="recurrent" if impl == "recurrent" else "chunked")
        if impl != "recurrent":
            kw.update(chunk_size=64, impl=impl, interpret=True)
        o, s = gdn2(*xs[:-1], **kw)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s), (o, s)

    args = (q, k, v, g, b, w, s0)
    (grads, (o, s)), (grads_ref, (o_ref, s_ref)) = (
        jax.grad(lambda *a, i=impl: loss(i, *a), argnums=tuple(range(7)), has_aux=True)(*args)
        for impl in ("pallas_tpu", "recurrent"))
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for name, x, r in zip("q k v g b w s0".split(), grads, grads_ref):
        assert rel_rmse(x, r) < 1e-10, name


@SLOW  # (the float64 tests fail on any output left unwritten as well; this one shows it as NaN)
def test_every_output_is_written(x64):
    rng = np.random.default_rng(1)
    q, k, v, beta, g, s0 = _problem(rng, 1, 64, 2, 8, 8)
    a, u = beta[..., None] * k, beta[..., None] * v
    seg = jnp.asarray(rng.uniform(size=(1, 64, 2)) < 0.1)
    o, s, st = fk.forward(q, k, a, u, g, seg, s0, 0.3, 32, save_states=True, interpret=True, poison=True)
    last = jnp.sum(s * s, axis=-1)
    got = fk.backward(q, k, a, u, o, g, seg, st, s, last, 0.3, 32, interpret=True, poison=True)
    for x in (o, s, st) + tuple(got):
        assert not np.isnan(np.asarray(x)).any()


@SLOW  # (the float64 tests check the final state and the initial state's gradient)
def test_initial_state_chaining(x64):
    rng = np.random.default_rng(3)
    q, k, v, beta, g, _ = _problem(rng, 1, 64, 2, 8, 8)
    o, s = _run("pallas_tpu", q, k, v, beta, g, None, None)
    first = [x[:, :32] for x in (q, k, v, beta, g)]
    o1, s1 = _run("pallas_tpu", *first, None, None)
    o2, s2 = _run("pallas_tpu", *(x[:, 32:] for x in (q, k, v, beta, g)), s1, None)
    assert rel_rmse(jnp.concatenate([o1, o2], axis=1), o) < 1e-13 and rel_rmse(s2, s) < 1e-13


@SLOW  # (the kernel reads non-finite entries as the GLA and delta kernels do, tested there by default)
@pytest.mark.parametrize("memory", ["kda", "gdn2"])
def test_non_finite_inputs_match_the_xla_form(x64, memory):
    """NaN / inf in k, q and the gates: NaN exactly where the XLA form has them, the same finite
    gradients (q, k, v, the gates and GDN-2's b, w reach the kernel unsanitised: it reads them as 0)."""
    rng = np.random.default_rng(5)
    q, k, v, beta, g, _ = _problem(rng, 1, 40, 2, 8, 8, strength=0.5)
    q0, k0, g0 = q, k, g
    k = k.at[0, 30, 1, 2].set(jnp.nan)
    q = q.at[0, 5, 0, 1].set(jnp.inf)
    g = g.at[0, 20, 0, 3].set(jnp.nan).at[0, 12, 1, 4].set(jnp.inf)
    seg = _seg(1, [25, 15])

    def loss(impl, q, k, v, beta, g):
        if memory == "kda":
            o, s = _run(impl, q, k, v, beta, g, None, seg, chunk=16)
        else:
            bb = jnp.broadcast_to(beta[..., None], g.shape)
            o, s = gdn2(q, k, v, g, bb, jnp.sqrt(v * v + 1.0) / 2, segment_ids=seg, chunk_size=16, impl=impl,
                        interpret=True if impl == "pallas_tpu" else None)
        return jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0) ** 2), (o, s)

    # the first bad token: q at t = 5 (poisons itself); k at t = 30 and the gates at t = 20 (head 0)
    # and t = 12 (head 1) poison the rest of their document in their head
    assert_non_finite_like(loss, (q, k, v, beta, g), (q0, k0, v, beta, g0), 5, 8 * (1 + 10 + 5 + 13))


@SLOW  # (the GLA and delta kernels' bf16 tests run by default; CI's time)
def test_bfloat16_error_is_that_of_the_xla_form():
    """bf16 q, k, v: the fused kernel's error against a float64 run is within 1.5x of the XLA
    chunked form's, outputs, state and every gradient."""
    rng = np.random.default_rng(11)
    q, k, v, beta, g, _ = _problem(rng, 1, 64, 2, 32, 32, dtype=jnp.float32, strength=0.3)

    def run(impl, dtype):
        def loss(q, k, v, beta, g):
            o, s = _run(impl, q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, g, None, None)
            return jnp.sum(o.astype(jnp.float32) * v) + jnp.sum(s), (o, s)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, beta, g)

    assert_bf16_error_like(run)


@pytest.mark.parametrize("shape,ok", [
    ((1, 64, 12, 64, 64, 64), True),  # 12 heads in one block (Mosaic: within the 64 MiB limit)
    ((1, 64, 12, 128, 128, 64), True),  # (Mosaic allocated 40.0 MiB for the backward)
    ((1, 64, 4, 256, 256, 64), True),
    ((1, 64, 8, 256, 256, 64), False),
])
def test_supports_head_blocks(shape, ok):  # (the common cases: tests/test_fused_tpu_dispatch.py)
    assert fk.supports(shape, jnp.bfloat16, "tpu") is ok


@needs_libtpu
@pytest.mark.parametrize("topology,h,dk", [("v5p:1x1x1", 16, 128), ("v5p:1x1x1", 32, 64),
                                           pytest.param("v5e:1x1", 16, 128, marks=SLOW)])
def test_kda_compiles_through_mosaic(topology, h, dk):
    """delta_rule(g [B, T, H, K], impl='pallas_tpu'), forward + backward, compiles for a TPU from
    this CPU host at K = V = 128 (16 heads) and K = V = 64 (32 heads, read as the flat view and
    cut into heads along the lanes), chunk 64: one kernel each way."""
    b, t, dv = 1, 256, dk
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = [sd((b, t, h, dk), bf), sd((b, t, h, dk), bf), sd((b, t, h, dv), bf), sd((b, t, h), bf),
            sd((b, t, h, dk), jnp.float32)]

    def fwd(q, k, v, beta, g):
        return delta_rule(q, k, v, beta, g=g, chunk_size=64, impl="pallas_tpu")

    def fwd_bwd(*xs):
        def loss(*xs):
            o, s = fwd(*xs)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*xs)

    # (one program holds both kernels: the forward compiled alone is the same kernel)
    text = compile_for_tpu(topology, fwd_bwd, args).as_text()
    assert "kda_fused_fwd_tpu" in text and "kda_fused_bwd_tpu" in text and text.count("custom-call(") == 2


@pytest.mark.parametrize("kind", ["kda", pytest.param("gdn2", marks=SLOW)])
def test_head_dim_64_reads_the_flat_view_and_matches_float64(x64, kind):
    """K = V = 64: the kernels read q, k, v, the gates (and GDN-2's b, w) as the flat ``[B, T, H K]``
    view (a TPU pads a ``[.., H, 64]`` tile to 128 lanes) and cut heads along the lanes; KDA and
    GDN-2 with packed segments, an initial state and strong decays == the token-by-token form."""
    rng = np.random.default_rng(7)
    q, k, v, beta, g, s0 = _problem(rng, 1, 40, 2, 64, 64)
    b = jnp.asarray(rng.uniform(0.1, 1.9, g.shape))
    w = jnp.asarray(rng.uniform(0.1, 1.0, v.shape))
    seg = _seg(1, [10, 20, 10])

    def loss(impl, kind, *xs):
        kw = dict(initial_state=xs[-1], segment_ids=seg)
        kw.update(mode="recurrent") if impl == "recurrent" else kw.update(chunk_size=16, impl=impl, interpret=True)
        o, s = delta_rule(*xs[:4], g=xs[4], **kw) if kind == "kda" else gdn2(*xs[:-1], **kw)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s), (o, s)

    args = {"kda": (q, k, v, beta, g, s0), "gdn2": (q, k, v, g, b, w, s0)}[kind]
    calls = pallas_calls(jax.make_jaxpr(lambda *a: loss("pallas_tpu", kind, *a))(*args).jaxpr)
    assert calls and all(x.aval.shape == (1, 48, 128) for x in calls[0].invars[:2])  # T padded to 48
    (grads, (o, s)), (grads_ref, (o_ref, s_ref)) = (
        jax.grad(lambda *a, i=impl: loss(i, kind, *a), argnums=tuple(range(len(args))), has_aux=True)(*args)
        for impl in ("pallas_tpu", "recurrent"))
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for x, r in zip(grads, grads_ref):
        assert rel_rmse(x, r) < 1e-10

