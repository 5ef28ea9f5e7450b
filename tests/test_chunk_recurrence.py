"""The chunk-to-chunk state pass (memjax.kernels.chunk_pass): Pallas kernels (interpret
mode on CPU) against the XLA scan and an independent NumPy loop in float64, gradients through the
outputs and the final state, poisoned outputs, dispatch rules, and lowering to Triton for a GPU."""
import contextlib
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.test_util import check_grads

from memjax.kernels import chunk_pass as cr
from memjax.kernels import chunk_pass_pallas as crp
from memjax.kernels.chunk_pass import chunk_recurrence
from memjax.memory import delta_rule, linear_attention, selective_scan
from tests.helpers import rel_rmse


def problem(b=2, h=2, n=3, c=8, k=16, v=48, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)
    f = lambda *s: jnp.asarray(rng.standard_normal(s) * 0.3, dtype)
    return dict(qg=f(b, h, n, c, k), p=f(b, h, n, c, c), u=f(b, h, n, c, v), ke=f(b, h, n, c, k),
                a=jnp.asarray(rng.uniform(0.3, 1.0, (b, h, n)), jnp.promote_types(dtype, jnp.float32)),
                s0=jnp.asarray(rng.standard_normal((b, h, k, v)), jnp.promote_types(dtype, jnp.float32)),
                w=f(b, h, n, c, k))


def numpy_loop(qg, p, u, ke, a, s0, w=None):
    """The recurrence written out chunk by chunk, per batch and head, in float64 NumPy."""
    qg, p, u, ke, a, s0 = (np.asarray(x, np.float64) for x in (qg, p, u, ke, a, s0))
    w = None if w is None else np.asarray(w, np.float64)
    b, h, n = a.shape
    o = np.zeros(u.shape)
    s_out = np.zeros(s0.shape)
    for i in range(b):
        for j in range(h):
            s = s0[i, j].copy()
            for m in range(n):
                delta = u[i, j, m] - (0 if w is None else w[i, j, m] @ s)
                o[i, j, m] = qg[i, j, m] @ s + p[i, j, m] @ delta
                s = a[i, j, m] * s + ke[i, j, m].T @ delta
            s_out[i, j] = s
    return o, s_out


def call(x, impl, with_w, tile=None):
    interpret = True if impl == "pallas" and jax.default_backend() == "cpu" else None
    return chunk_recurrence(x["qg"], x["p"], x["u"], x["ke"], x["a"], x["s0"], w=x["w"] if with_w else None,
                            impl=impl, interpret=interpret, tile=tile)


@pytest.mark.parametrize("with_w", [False, True])
@pytest.mark.parametrize("n,tile", [(1, None), (3, crp.Tile(bv=16)), (5, crp.Tile(bv=64))])
def test_kernel_matches_numpy_loop_and_xla_float64(x64, with_w, n, tile):
    # V = 48: 3 value blocks of 16 with bv=16, one block of 16 when capped at 64 (pow2 divisor).
    x = problem(n=n)
    o_ref, s_ref = numpy_loop(**{k: x[k] for k in ("qg", "p", "u", "ke", "a", "s0")}, w=x["w"] if with_w else None)
    for impl in ("xla", "pallas"):
        o, s = call(x, impl, with_w, tile)
        assert o.dtype == jnp.float64 and s.dtype == jnp.float64
        assert rel_rmse(o, o_ref) < 1e-13 and rel_rmse(s, s_ref) < 1e-13, impl


@pytest.mark.parametrize("with_w", [False, True])
def test_kernel_gradients_match_xla_float64(x64, with_w):
    """Gradients w.r.t. every input, through the outputs and the final state at once."""
    x = problem(n=4)
    names = ["qg", "p", "u", "ke", "a", "s0"] + (["w"] if with_w else [])
    rng = np.random.default_rng(1)
    wo = jnp.asarray(rng.standard_normal(x["u"].shape))
    ws = jnp.asarray(rng.standard_normal(x["s0"].shape))

    def loss(impl, *args):
        y = dict(x, **dict(zip(names, args)))
        o, s = call(y, impl, with_w, crp.Tile(bv=16))
        return jnp.sum(o * wo) + jnp.sum(jnp.sin(s) * ws)

    args = [x[k] for k in names]
    ref = jax.grad(lambda *a: loss("xla", *a), argnums=tuple(range(len(names))))(*args)
    got = jax.grad(lambda *a: loss("pallas", *a), argnums=tuple(range(len(names))))(*args)
    for name, r, g in zip(names, ref, got):
        assert rel_rmse(g, r) < 1e-12, name
    # The custom backward is a true derivative, not only consistent with the XLA one.
    check_grads(lambda qg, u, a, s0: loss("pallas", qg, x["p"], u, x["ke"], a, s0, *([x["w"]] if with_w else [])),
                (x["qg"], x["u"], x["a"], x["s0"]), order=1, modes=["rev"], eps=1e-6)


def test_bfloat16_inputs_accumulate_in_float32():
    x32 = problem(n=4, dtype=jnp.float32)
    x16 = {k: (v.astype(jnp.bfloat16) if k not in ("a", "s0") else v) for k, v in x32.items()}
    ref_o, ref_s = numpy_loop(*(x16[k].astype(jnp.float32) for k in ("qg", "p", "u", "ke", "a", "s0")),
                              w=x16["w"].astype(jnp.float32))
    o, s = call(x16, "pallas", True)
    assert o.dtype == jnp.bfloat16 and s.dtype == jnp.float32
    assert rel_rmse(o, ref_o) < 2 ** -7 and rel_rmse(s, ref_s) < 2 ** -7
    o32, _ = call(x32, "pallas", True)
    assert rel_rmse(o, o32) < 2 ** -6  # bf16 vs float32 inputs: one bf16 rounding of each operand


def test_initial_state_keeps_its_dtype(x64):
    """A float64 initial state with float32 chunk tensors: both implementations return the state
    and its gradient in float64 (the kernels run in float32)."""
    x = {k: (v.astype(jnp.float32) if k != "s0" else v) for k, v in problem(n=3).items()}
    grads = {}
    for impl in ("xla", "pallas"):
        def loss(s0, impl=impl):
            o, s = call(dict(x, s0=s0), impl, True)
            assert s.dtype == jnp.float64
            return jnp.sum(o.astype(jnp.float64)) + jnp.sum(s)
        grads[impl] = jax.grad(loss)(x["s0"])
        assert grads[impl].dtype == jnp.float64
    assert rel_rmse(grads["pallas"], grads["xla"]) < 1e-5  # float32 kernels vs a float64 scan


@pytest.mark.parametrize("with_w", [False, True])
def test_poisoned_outputs_are_all_written(x64, with_w):
    x = problem(n=3)
    w = x["w"] if with_w else None
    o, s, s_in = crp.forward(x["qg"], x["p"], x["u"], w, x["ke"], x["a"], x["s0"], save_states=True,
                             interpret=True, tile=crp.Tile(bv=16), poison=True)
    dd, dsn, ds0 = crp.backward(x["qg"], x["p"], w, x["ke"], x["a"], x["u"], x["s0"], interpret=True,
                                tile=crp.Tile(bv=16), poison=True)
    for name, out in dict(o=o, s=s, s_in=s_in, dd=dd, dsn=dsn, ds0=ds0).items():
        assert not np.isnan(np.asarray(out)).any(), name


def test_poison_detects_an_unwritten_value_block(x64):
    """The poison check can fail: a kernel that skips value block 1 leaves NaN there."""
    x = problem(n=2)
    kernel = crp._fwd_kernel

    def skipping(*refs, **kw):
        from jax.experimental import pallas as pl
        skip = pl.program_id(2) == 1

        @pl.when(jnp.logical_not(skip))
        def _():
            kernel(*refs, **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(crp, "_fwd_kernel", skipping)
        o, s, _ = crp.forward(x["qg"], x["p"], x["u"], None, x["ke"], x["a"], x["s0"], save_states=False,
                              interpret=True, tile=crp.Tile(bv=16), poison=True)
    o, s = np.asarray(o), np.asarray(s)
    assert np.isnan(o[..., 16:32]).all() and not np.isnan(o[..., :16]).any()
    assert np.isnan(s[..., 16:32]).all() and not np.isnan(s[..., 32:]).any()


# ----------------------------------------------------------------------------- the memories on top


@pytest.mark.parametrize("t", [1, pytest.param(63, marks=pytest.mark.slow), pytest.param(100, marks=pytest.mark.slow)])
@pytest.mark.slow  # (tests/test_chunk_pass_tpu.py runs memories through a kernel in interpret mode by default)
@pytest.mark.parametrize("fn", ["gla", "gated_delta", "ssd"])
def test_memories_with_the_kernel_match_recurrent_float64(x64, fn, t):
    """linear_attention / delta_rule / selective_scan with impl='pallas' (interpreted) == the
    token-by-token form: outputs, final state and gradients, with a decay, an initial state and
    packed segments (SSD: 2 heads sharing one B/C group)."""
    rng = np.random.default_rng(t)
    b, h, dk, dv = 2, 2, 8, 16
    q, k = (jnp.asarray(rng.standard_normal((b, t, h, dk))) for _ in range(2))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = jnp.asarray(rng.standard_normal((b, t, h, dv)))
    g = -jnp.asarray(rng.uniform(0.01, 0.5, (b, t, h)))
    beta = jnp.asarray(rng.uniform(0.1, 0.9, (b, t, h)))
    s0 = jnp.asarray(rng.standard_normal((b, h, dk, dv)))
    seg = jnp.asarray(np.sort(rng.integers(0, 3, (b, t)), axis=1))

    def run(mode, impl, q, k, v, g, s0):
        kw = dict(g=g, initial_state=s0, segment_ids=seg, mode=mode)
        if mode == "chunked":
            kw.update(chunk_size=16, impl=impl, interpret=impl == "pallas" or None)
        if fn == "gla":
            return linear_attention(q, k, v, **kw)
        if fn == "ssd":  # q = C, k = B (one group), v = x, dt from g; state [P, N] = s0^T
            del kw["g"]
            kw["initial_state"] = jnp.swapaxes(s0, -1, -2)
            return selective_scan(v, -g, -jnp.ones(h), k[:, :, :1], q[:, :, :1], **kw)
        return delta_rule(q, k, v, beta, **kw)

    def loss(mode, impl, *args):
        o, s = run(mode, impl, *args)
        return jnp.sum(jnp.sin(o)) + jnp.sum(s * s)

    args = (q, k, v, g, s0)
    o_ref, s_ref = run("recurrent", None, *args)
    o, s = run("chunked", "pallas", *args)
    assert rel_rmse(o, o_ref) < 1e-12 and rel_rmse(s, s_ref) < 1e-12
    g_ref = jax.grad(lambda *a: loss("recurrent", None, *a), argnums=(0, 1, 2, 3, 4))(*args)
    g_got = jax.grad(lambda *a: loss("chunked", "pallas", *a), argnums=(0, 1, 2, 3, 4))(*args)
    for name, r, x in zip("q k v g s0".split(), g_ref, g_got):
        assert rel_rmse(x, r) < 1e-10, name


def test_associative_block_kernel_option_reaches_the_memory(monkeypatch):
    from tiny import tiny_config
    from memjax.config import ConfigError, validate
    from memjax.model import LM
    from flax import nnx

    seen = []
    real = cr.chunk_recurrence

    def spy(*a, impl="auto", **kw):
        seen.append(impl)
        return real(*a, impl="xla")

    # (every memory reaches the chunk pass through memjax.memory.sequence_parallel)
    monkeypatch.setattr(sys.modules["memjax.memory.sequence_parallel"], "chunk_recurrence", spy)
    cfg = tiny_config(pattern="D")
    cfg.model.blocks = {"gated_deltanet": {"kernel": "pallas", "chunk_size": 4}}
    model = LM(cfg.model, rngs=nnx.Rngs(0))
    nnx.eval_shape(lambda m, x: m(x), model, jnp.zeros((1, 8), jnp.int32))  # tracing reaches the chunk pass
    assert seen == ["pallas"]
    cfg.model.blocks = {"gated_deltanet": {"kernel": "triton"}}
    with pytest.raises(ConfigError, match=r"gated_deltanet.*kernel"):
        validate(cfg)


# ----------------------------------------------------------------------------- dispatch and errors


def test_dispatch_is_fail_closed(monkeypatch):
    shape = (2, 4, 8, 64, 128, 128)
    assert cr.resolve_impl("auto", shape, jnp.float32, None, backend="cpu") == ("xla", False)
    # Supported on a GPU, but no device has passed the hardware tests yet.
    monkeypatch.setattr(cr, "VERIFIED_DEVICES", {})
    assert cr.resolve_impl("auto", shape, jnp.float32, None, backend="gpu", device_kind="NVIDIA H100") == ("xla", False)
    monkeypatch.setattr(cr, "VERIFIED_DEVICES", {"gpu": ("NVIDIA H100",)})
    assert cr.resolve_impl("auto", shape, jnp.float32, None, backend="gpu", device_kind="NVIDIA H100 80GB HBM3") \
        == ("pallas", False)
    assert cr.resolve_impl("auto", shape, jnp.float32, None, backend="gpu", device_kind="NVIDIA A100") == ("xla", False)
    assert cr.resolve_impl("auto", (2, 4, 8, 48, 128, 128), jnp.float32, None, backend="gpu",
                           device_kind="NVIDIA H100") == ("xla", False)  # C = 48: not a power of two
    assert cr.resolve_impl("pallas", shape, jnp.float32, True, backend="cpu") == ("pallas", True)
    with pytest.raises(ValueError, match="needs a GPU"):
        cr.resolve_impl("pallas", shape, jnp.float32, None, backend="cpu")
    with pytest.raises(ValueError, match="does not support"):
        cr.resolve_impl("pallas", (2, 4, 8, 64, 96, 128), jnp.float32, None, backend="gpu")
    with pytest.raises(ValueError, match="does not support"):
        cr.resolve_impl("pallas", shape, jnp.float64, None, backend="gpu")
    with pytest.raises(ValueError, match="interpret"):
        cr.resolve_impl("auto", shape, jnp.float32, True, backend="cpu")
    with pytest.raises(ValueError, match="interpret"):
        cr.resolve_impl("xla", shape, jnp.float32, True, backend="cpu")
    with pytest.raises(ValueError, match="impl must be one of"):
        cr.resolve_impl("triton", shape, jnp.float32, None, backend="cpu")


def test_input_validation():
    x = problem(n=2, dtype=jnp.float32)
    with pytest.raises(ValueError, match=r"qg must be \[B, H, N, C, K\]"):
        chunk_recurrence(x["qg"][0], x["p"], x["u"], x["ke"], x["a"], x["s0"])
    with pytest.raises(ValueError, match="p must have shape"):
        chunk_recurrence(x["qg"], x["p"][..., :3], x["u"], x["ke"], x["a"], x["s0"])
    with pytest.raises(ValueError, match="s0 must have shape"):
        chunk_recurrence(x["qg"], x["p"], x["u"], x["ke"], x["a"], x["s0"][..., :5])
    with pytest.raises(ValueError, match="w must have shape"):
        chunk_recurrence(x["qg"], x["p"], x["u"], x["ke"], x["a"], x["s0"], w=x["w"][:, :1])
    with pytest.raises(ValueError, match="u must be"):
        chunk_recurrence(x["qg"], x["p"], x["u"][:, :, :1], x["ke"], x["a"], x["s0"])
    q = jnp.zeros((1, 4, 2, 8))
    with pytest.raises(ValueError, match="impl must be one of"):
        linear_attention(q, q, q, impl="cuda")
    with pytest.raises(ValueError, match="needs a GPU"):
        delta_rule(q, q, q, jnp.zeros((1, 4, 2)), impl="pallas")


# ----------------------------------------------------------------------------- hardware


def _abstract_h100():
    """JAX >= 0.11 lowers Triton kernels for the GPU it reads off the device; with none present,
    an abstract H100 names the target (older JAX lowers without one)."""
    if not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.parametrize("with_w", [False, True])
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_kernels_lower_to_triton(monkeypatch, with_w, dtype):
    """Forward and backward lower to Triton IR from this CPU-only install, at the benchmark's
    head sizes (C = 64, K = V = 128): catches unsupported ops and non-power-of-two blocks."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    b, h, n, c, k, v = 1, 2, 3, 64, 128, 128
    sd = lambda *s, dt=dtype: jax.ShapeDtypeStruct(s, dt)
    args = (sd(b, h, n, c, k), sd(b, h, n, c, c), sd(b, h, n, c, v), sd(b, h, n, c, k), sd(b, h, n, dt=jnp.float32),
            sd(b, h, k, v, dt=jnp.float32), sd(b, h, n, c, k))

    def f(*xs):
        def loss(*xs):
            o, s = chunk_recurrence(*xs[:6], w=xs[6] if with_w else None, impl="pallas")
            return jnp.sum(o.astype(jnp.float32)) + jnp.sum(s)
        return jax.grad(loss, argnums=tuple(range(7)))(*xs)

    target = "__gpu$xla.gpu.triton"
    with _abstract_h100():
        exp = jax.export.export(jax.jit(f), platforms=["cuda"],
                                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
    assert exp.mlir_module().count(target) == 2  # forward (saving states) and backward


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() != "gpu", reason="needs a GPU")
@pytest.mark.parametrize("with_w", [False, True])
def test_hardware_kernel_matches_xla(with_w):
    """Compiled kernels vs the XLA scan on the device, with poisoned outputs; add the device to
    VERIFIED_DEVICES once green (and the GPU benchmark agrees)."""
    x = problem(b=2, h=4, n=8, c=64, k=128, v=128, dtype=jnp.float32)
    w = x["w"] if with_w else None
    with jax.default_matmul_precision("highest"):
        ref = jax.jit(lambda x: call(x, "xla", with_w))(x)
    o, s, s_in = jax.jit(lambda x: crp.forward(x["qg"], x["p"], x["u"], w, x["ke"], x["a"], x["s0"],
                                               save_states=True, interpret=False, poison=True))(x)
    assert rel_rmse(o, ref[0]) < 1e-2 and rel_rmse(s, ref[1]) < 1e-2  # float32 operands may run as TF32
    dd, dsn, ds0 = jax.jit(lambda x: crp.backward(x["qg"], x["p"], w, x["ke"], x["a"], x["u"], x["s0"],
                                                  interpret=False, poison=True))(x)
    for out in (o, s, s_in, dd, dsn, ds0):
        assert not np.isnan(np.asarray(out)).any()
    names = ["qg", "p", "u", "ke", "a", "s0"]
    loss = lambda impl: lambda *a: jnp.sum(jnp.sin(call(dict(x, **dict(zip(names, a))), impl, with_w)[0]))
    with jax.default_matmul_precision("highest"):
        g_ref = jax.jit(jax.grad(loss("xla"), argnums=tuple(range(6))))(*[x[n] for n in names])
    g = jax.jit(jax.grad(lambda *a: loss("pallas")(*a), argnums=tuple(range(6))))(*[x[n] for n in names])
    for name, r, got in zip(names, g_ref, g):
        assert rel_rmse(got, r) < 1e-2, name
