"""The fused Mosaic kernels of linear attention with a decay per key channel (GLA / HGRN2;
memjax.kernels.gla_fused_pallas_tpu: sub-chunked intra-chunk work and the state pass in one
kernel each way): interpret mode on CPU against the token-by-token float64 form and the XLA
chunked form (outputs, final state, gradients w.r.t. q, k, v, g and the initial state; strong
decays that overflow the textbook factorisation, a per-channel -inf reset, packed segments, a
partial last chunk, one and two head blocks, non-finite inputs, bf16), poisoned outputs, and
(with libtpu) compiling forward and backward through Mosaic for compile-only v5p / v5e devices.
Nothing here has run on a TPU."""
import functools
import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels import gla_fused_pallas_tpu as fk
from memjax.memory.linear import linear_attention
from tests.helpers import assert_bf16_error_like, assert_non_finite_like, compile_for_tpu, rel_rmse

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")
SLOW = pytest.mark.slow


def _problem(rng, b, t, h, dk, dv, dtype=jnp.float64, strength=3.0):
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk)), dtype) for _ in range(2))
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)), dtype)
    g = -jnp.asarray(rng.uniform(0.01, strength, (b, t, h, dk)), jnp.float64 if dtype == jnp.float64 else jnp.float32)
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)), dtype)
    return q, k, v, g, s0


def _run(impl, q, k, v, g, s0, seg, chunk=32):
    kw = dict(g=g, initial_state=s0, segment_ids=seg)
    if impl == "recurrent":
        return linear_attention(q, k, v, mode="recurrent", **kw)
    return linear_attention(q, k, v, chunk_size=chunk, impl=impl, interpret=True if impl == "pallas_tpu" else None,
                            **kw)


@pytest.mark.parametrize("h,chunk,reference,d", [
    (3, 32, "recurrent", None),  # two sub-chunks per chunk
    pytest.param(16, 32, "xla", None, marks=SLOW),  # two blocks of 8 heads
    pytest.param(2, 8, "recurrent", None, marks=SLOW),  # a chunk shorter than a sub-chunk
    pytest.param(2, 32, "recurrent", 64, marks=SLOW),  # K = V = 64: the flat [B, T, H K] view
])
def test_gla_with_the_fused_kernel_matches_float64(x64, h, chunk, reference, d):
    """linear_attention(g [B, T, H, K], impl='pallas_tpu', interpreted) at T = 37 with decays up to
    3 per token (a 32-token chunk decays by up to e^-96: exp(-G) of the textbook factorisation
    overflows), a -inf in one channel, an initial state and three packed segments == the
    token-by-token form (or the XLA chunked form): outputs, final state and every gradient."""
    rng = np.random.default_rng(0)
    q, k, v, g, s0 = _problem(rng, 2, 37, h, d or 8, d or 16)
    g = g.at[0, 12, 1, 3].set(-jnp.inf)
    seg = jnp.asarray(np.repeat(np.array([[0, 1, 2]]), [10, 20, 7], axis=1).repeat(2, 0))

    def loss(impl, *args):
        o, s = _run(impl, *args, seg, chunk=chunk)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s), (o, s)

    (grads, (o, s)), (grads_ref, (o_ref, s_ref)) = (
        jax.jit(jax.grad(functools.partial(loss, impl), argnums=(0, 1, 2, 3, 4), has_aux=True))(q, k, v, g, s0)
        for impl in ("pallas_tpu", reference))
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    for name, x, r in zip("q k v g s0".split(), grads, grads_ref):
        assert np.isfinite(np.asarray(x)).all(), name
        assert rel_rmse(x, r) < 1e-10, name


def test_every_output_is_written(x64):
    rng = np.random.default_rng(1)
    q, k, v, g, s0 = _problem(rng, 1, 64, 2, 8, 8)
    seg = jnp.asarray(rng.uniform(size=(1, 64, 2)) < 0.1)
    o, s, st = fk.forward(q, k, v, g, seg, s0, 0.3, 32, save_states=True, interpret=True, poison=True)
    last = jnp.sum(s * s, axis=-1)
    got = fk.backward(q, k, v, o, g, seg, st, s, last, 0.3, 32, interpret=True, poison=True)
    for x in (o, s, st) + tuple(got):
        assert not np.isnan(np.asarray(x)).any()


@SLOW  # (the float64 tests check the final state and the initial state's gradient)
def test_initial_state_chaining(x64):
    rng = np.random.default_rng(3)
    q, k, v, g, _ = _problem(rng, 1, 64, 2, 8, 8)
    o, s = _run("pallas_tpu", q, k, v, g, None, None)
    o1, s1 = _run("pallas_tpu", q[:, :32], k[:, :32], v[:, :32], g[:, :32], None, None)
    o2, s2 = _run("pallas_tpu", q[:, 32:], k[:, 32:], v[:, 32:], g[:, 32:], s1, None)
    assert rel_rmse(jnp.concatenate([o1, o2], axis=1), o) < 1e-13 and rel_rmse(s2, s) < 1e-13


def test_non_finite_inputs_match_the_xla_form(x64):
    """NaN / inf in k, q and the gates: NaN exactly where the XLA form has them, the same finite
    gradients (the kernel reads a NaN or +inf gate as 0 itself, as the XLA form's finite_gate)."""
    rng = np.random.default_rng(5)
    q, k, v, g, _ = _problem(rng, 1, 40, 2, 8, 8, strength=0.5)
    q0, k0, g0 = q, k, g
    k = k.at[0, 30, 1, 2].set(jnp.nan)
    q = q.at[0, 5, 0, 1].set(jnp.inf)
    g = g.at[0, 20, 0, 3].set(jnp.nan).at[0, 12, 1, 4].set(jnp.inf)
    seg = jnp.asarray(np.repeat(np.array([[0, 1]]), [25, 15], axis=1))

    def loss(impl, q, k, v, g):
        o, s = _run(impl, q, k, v, g, None, seg, chunk=16)
        return jnp.sum(jnp.where(jnp.isfinite(o), o, 0.0) ** 2), (o, s)

    # the first bad token: q at t = 5 (poisons itself); k at t = 30 and the gates at t = 20 (head 0)
    # and t = 12 (head 1) poison the rest of their document in their head
    assert_non_finite_like(loss, (q, k, v, g), (q0, k0, v, g0), 5, 8 * (1 + 10 + 5 + 13))


def test_bfloat16_error_is_that_of_the_xla_form():
    """bf16 q, k, v: the fused kernel's error against a float64 run is within 1.5x of the XLA
    chunked form's, outputs, state and every gradient."""
    rng = np.random.default_rng(11)
    q, k, v, g, _ = _problem(rng, 1, 64, 2, 32, 32, dtype=jnp.float32, strength=0.3)

    def run(impl, dtype):
        def loss(q, k, v, g):
            o, s = _run(impl, q.astype(dtype), k.astype(dtype), v.astype(dtype), g, None, None)
            return jnp.sum(o.astype(jnp.float32) * v) + jnp.sum(s), (o, s)
        return jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3), has_aux=True))(q, k, v, g)

    assert_bf16_error_like(run)


@pytest.mark.parametrize("shape,ok", [
    ((1, 64, 12, 128, 128, 64), True),  # 12 heads in one block (Mosaic: 31.5 MiB for the backward)
    ((1, 64, 8, 256, 256, 64), False),
])
def test_supports_head_blocks(shape, ok):  # (the common cases: tests/test_fused_tpu_dispatch.py)
    assert fk.supports(shape, jnp.bfloat16, "tpu") is ok


def test_sub_chunk():
    assert [fk.sub_chunk(c) for c in (8, 16, 24, 64)] == [8, 16, 24, 16]


@needs_libtpu
@pytest.mark.parametrize("topology,h,dk", [pytest.param("v5p:1x1x1", 16, 128, marks=SLOW),  # (CI's time: KDA's
                                           pytest.param("v5p:1x1x1", 32, 64, marks=SLOW),  # compiles run by default)
                                           pytest.param("v5e:1x1", 16, 128, marks=SLOW)])
def test_gla_compiles_through_mosaic(topology, h, dk):
    """linear_attention(g [B, T, H, K], impl='pallas_tpu'), forward and forward + backward,
    compiles for a TPU from this CPU host at K = V = 128 (16 heads) and 64 (32 heads: the flat
    view), chunk 64."""
    b, t, dv = 1, 256, dk
    sd = jax.ShapeDtypeStruct
    bf = jnp.bfloat16
    args = [sd((b, t, h, dk), bf), sd((b, t, h, dk), bf), sd((b, t, h, dv), bf), sd((b, t, h, dk), jnp.float32)]

    def fwd(q, k, v, g):
        return linear_attention(q, k, v, g=g, chunk_size=64, impl="pallas_tpu")

    def fwd_bwd(*xs):
        def loss(*xs):
            o, s = fwd(*xs)
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=(0, 1, 2, 3))(*xs)

    text = compile_for_tpu(topology, fwd, args).as_text()
    assert text.count("custom-call(") == 1 and "gla_fused_fwd_tpu" in text
    text = compile_for_tpu(topology, fwd_bwd, args).as_text()
    assert "gla_fused_fwd_tpu" in text and "gla_fused_bwd_tpu" in text and text.count("custom-call(") == 2
