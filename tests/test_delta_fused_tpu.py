"""The fused Mosaic kernels of the (gated) delta rule (memjax.kernels.delta_fused_pallas_tpu: the UT
transform, the intra-chunk work and the state pass in one kernel each way): interpret mode on CPU
against the token-by-token float64 form and the XLA chunked form (outputs, final state,
gradients w.r.t. q, k, v, beta, g and the initial state; partial last chunk, one and two head
blocks, packed segments, beta up to 1.9 (negative eigenvalues), full decays, non-finite inputs,
grouped value heads, bf16), poisoned outputs, and (with libtpu) compiling forward and backward
through Mosaic for compile-only v5p / v5e devices. Nothing here has run on a TPU."""
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels import delta_fused_pallas_tpu as fk
from memjax.memory.delta import delta_rule
from tests.helpers import assert_bf16_error_like, assert_non_finite_like, compile_for_tpu, pallas_calls, rel_rmse

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")
SLOW = pytest.mark.slow


def _problem(rng, b, t, h, dk, dv, hv=None, dtype=jnp.float64, beta_range=(0.1, 1.9)):
    hv = hv or h
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jnp.asarray(rng.standard_normal((b, t, hv, dv)), dtype)
    beta = jnp.asarray(rng.uniform(*beta_range, (b, t, hv)), dtype)
    g = -jnp.asarray(rng.uniform(0.01, 0.5, (b, t, hv)), dtype)
    s0 = jnp.asarray(rng.standard_normal((b, hv, dk, dv)), dtype)
    return q, k, v, beta, g, s0


def _run(impl, q, k, v, beta, g, s0, seg, chunk=16):
    kw = dict(g=g, initial_state=s0, segment_ids=seg)
    if impl == "recurrent":
        return delta_rule(q, k, v, beta, mode="recurrent", **kw)
    return delta_rule(q, k, v, beta, chunk_size=chunk, impl=impl, interpret=True if impl == "pallas_tpu" else None,
                      **kw)


def _grads(impl, args, seg, argnums, chunk=16):
    def loss(*xs):
        o, s = _run(impl, *xs, seg, chunk=chunk)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s), (o, s)
    return jax.jit(jax.grad(loss, argnums=argnums, has_aux=True))(*args)


@pytest.mark.parametrize("gated,h,hv,reference", [
    (True, 3, 3, "recurrent"),
    pytest.param(False, 3, 3, "recurrent", marks=SLOW),
    pytest.param(True, 16, 16, "xla", marks=SLOW),  # two blocks of 8 heads
    pytest.param(True, 2, 4, "recurrent", marks=SLOW),  # grouped value heads
])
def test_delta_rule_with_the_fused_kernel_matches_float64(x64, gated, h, hv, reference):
    """delta_rule(impl='pallas_tpu', interpreted) at T = 37, chunk 16 (the last chunk partial),
    beta in (0.1, 1.9), an initial state and three packed segments == the token-by-token form
    (or the XLA chunked form): outputs, final state and every gradient."""
    rng = np.random.default_rng(7)
    q, k, v, beta, g, s0 = _problem(rng, 2, 37, h, 8, 16, hv)
    g = g if gated else None
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2]]), [10, 20, 7], axis=1).repeat(2, 0))
    argnums = (0, 1, 2, 3, 4, 5) if gated else (0, 1, 2, 3, 5)
    (grads, (o, s)), (grads_ref, (o_ref, s_ref)) = (_grads(impl, (q, k, v, beta, g, s0), seg, argnums)
                                                    for impl in ("pallas_tpu", reference))
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for i, x, r in zip(argnums, grads, grads_ref):
        assert rel_rmse(x, r) < 1e-10, "q k v beta g s0".split()[i]


def test_every_output_is_written(x64):
    """Forward and backward kernels with outputs pre-filled with NaN (5 chunks, 2 per step where
    they divide: here 1): nothing stays NaN."""
    rng = np.random.default_rng(1)
    q, k, v, beta, g, s0 = _problem(rng, 1, 40, 2, 8, 8)
    resets = jnp.asarray(rng.uniform(size=(1, 40, 2)) < 0.1)
    o, s, st = fk.forward(q, k, v, beta, g, resets, s0, 0.3, 8, save_states=True, interpret=True, poison=True)
    got = fk.backward(q, k, v, o, beta, g, resets, st, s, 0.3, 8, interpret=True, poison=True)
    for x in (o, s, st) + tuple(got):
        assert not np.isnan(np.asarray(x)).any()


@SLOW  # (the float64 tests check the final state and the initial state's gradient)
def test_initial_state_chaining(x64):
    rng = np.random.default_rng(3)
    q, k, v, beta, g, _ = _problem(rng, 1, 64, 2, 8, 8)
    o, s = _run("pallas_tpu", q, k, v, beta, g, None, None)
    sl = lambda x, a, b: x[:, a:b]  # noqa: E731
    o1, s1 = _run("pallas_tpu", *(sl(x, 0, 32) for x in (q, k, v, beta, g)), None, None)
    o2, s2 = _run("pallas_tpu", *(sl(x, 32, 64) for x in (q, k, v, beta, g)), s1, None)
    assert rel_rmse(jnp.concatenate([o1, o2], axis=1), o) < 1e-13 and rel_rmse(s2, s) < 1e-13


def test_full_decays_and_non_finite_inputs_match_the_xla_form(x64):
    """g = -inf (a reset of that head) and NaN / inf in k and q: the same outputs (NaN exactly
    where the XLA form has them) and the same finite gradients."""
    rng = np.random.default_rng(5)
    q, k, v, beta, g, _ = _problem(rng, 1, 40, 2, 8, 8)
    g = g.at[0, 9, 0].set(-jnp.inf)
    q0, k0 = q, k
    k = k.at[0, 30, 1, 2].set(jnp.nan)
    q = q.at[0, 5, 0, 1].set(jnp.inf)
    seg = jnp.asarray(np.repeat(np.array([[0, 1]]), [25, 15], axis=1))

    def loss(impl, q, k, v, beta, g):
        o, s = _run(impl, q, k, v, beta, g, None, seg)
        return jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0) ** 2), (o, s)

    # the first bad token: q at t = 5 (poisons itself); k at t = 30 (poisons the rest of its document)
    assert_non_finite_like(loss, (q, k, v, beta, g), (q0, k0, v, beta, g), 5, 8 * (1 + 10))


def test_bfloat16_error_is_that_of_the_xla_form():
    """bf16 inputs, chunk 32: the fused kernel's error against a float64 run is within 1.5x of
    the XLA chunked form's, outputs, state and every gradient (both round q, k, v, the inverse,
    U, W and the corrections to bf16 and accumulate in float32)."""
    rng = np.random.default_rng(11)
    q, k, v, beta, g, _ = _problem(rng, 1, 64, 2, 32, 32, dtype=jnp.float32, beta_range=(0.1, 0.9))

    def run(impl, dtype):
        def loss(q, k, v, beta, g):
            o, s = _run(impl, q.astype(dtype), k.astype(dtype), v.astype(dtype), beta, g, None, None, chunk=32)
            return jnp.sum(o.astype(jnp.float32) * v) + jnp.sum(s), (o, s)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, beta, g)

    assert_bf16_error_like(run)


@pytest.mark.parametrize("shape,ok", [
    ((1, 64, 4, 256, 256, 64), True),
    ((1, 64, 16, 256, 256, 64), False),  # 8 heads' [K, V] float32 states and temporaries
])
def test_supports_large_heads(shape, ok):  # (the common cases: tests/test_fused_tpu_dispatch.py)
    assert fk.supports(shape, jnp.bfloat16, "tpu") is ok


def test_head_dim_64_reads_the_flat_view_and_matches_float64(x64):
    """K = V = 64: the kernels read q, k, v as the flat ``[B, T, H K]`` view (a TPU pads a ``[.., H,
    64]`` tile to 128 lanes) and cut heads along the lanes; == the token-by-token form with packed
    segments, an initial state and a gate (outputs, final state, every gradient)."""
    rng = np.random.default_rng(8)
    q, k, v, beta, g, s0 = _problem(rng, 1, 40, 2, 64, 64)
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2]]), [10, 20, 10], axis=1))
    calls = pallas_calls(jax.make_jaxpr(lambda *a: _run("pallas_tpu", *a, seg))(q, k, v, beta, g, s0).jaxpr)
    assert calls and all(x.aval.shape == (1, 48, 128) for x in calls[0].invars[:3])  # T padded to 48
    argnums = (0, 1, 2, 3, 4, 5)
    (grads, (o, s)), (grads_ref, (o_ref, s_ref)) = (_grads(impl, (q, k, v, beta, g, s0), seg, argnums)
                                                    for impl in ("pallas_tpu", "recurrent"))
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for i, x, r in zip(argnums, grads, grads_ref):
        assert rel_rmse(x, r) < 1e-10, "q k v beta g s0".split()[i]


@needs_libtpu
@pytest.mark.parametrize("topology,h,dk", [pytest.param("v5p:1x1x1", 16, 128, marks=SLOW),  # (CI's time: KDA's
                                           pytest.param("v5p:1x1x1", 32, 64, marks=SLOW),  # compiles run by default)
                                           pytest.param("v5e:1x1", 16, 128, marks=SLOW)])
def test_delta_rule_compiles_through_mosaic(topology, h, dk):
    """delta_rule(impl='pallas_tpu') with a gate, forward and forward + backward, compiles for a
    TPU from this CPU host at K = V = 128 (16 heads) and 64 (32 heads: the flat view), chunk 64
    (Mosaic checks the in-VMEM transposes, the lane cuts, the batched [C, C] products and the
    VMEM limit as on hardware)."""
    b, t, dv = 1, 256, dk
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = [sd((b, t, h, dk), bf), sd((b, t, h, dk), bf), sd((b, t, h, dv), bf), sd((b, t, h), bf),
            sd((b, t, h), jnp.float32)]

    def fwd(q, k, v, beta, g):
        return delta_rule(q, k, v, beta, g=g, chunk_size=64, impl="pallas_tpu")

    def fwd_bwd(*xs):
        def loss(*xs):
            o, s = fwd(*xs)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=(0, 1, 2, 3, 4))(*xs)

    text = compile_for_tpu(topology, fwd, args).as_text()
    assert text.count("custom-call(") == 1 and "delta_fused_fwd_tpu" in text
    text = compile_for_tpu(topology, fwd_bwd, args).as_text()
    assert "delta_fused_fwd_tpu" in text and "delta_fused_bwd_tpu" in text and text.count("custom-call(") == 2
