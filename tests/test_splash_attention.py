"""The splash attention adapter (memjax.kernels.splash_attention) over JAX's TPU kernel:
interpret mode on CPU against an independent float64 NumPy attention (outputs) and the XLA form
of causal_attention (gradients), causal / sliding window / packed documents (a reused id is a
new document) / grouped-query heads, bf16 error, bad input, the ``supports`` rule, and (with
libtpu) compiling forward and forward + backward through Mosaic for v5e and v5p compile-only
devices, plus a smoke run of benchmarks/tpu_attention_cost.py. Nothing here has run on a TPU.

Tolerances: float32 kernel vs float64 NumPy, relative max error < 2e-6 (outputs); gradients vs
the float32 XLA form < 1e-5; bfloat16 inputs < 2^-7 relative RMS against float64 on the rounded
inputs.
"""
import functools
import importlib.util
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from memjax.kernels import splash_attention as sp
from memjax.memory.attention import causal_attention
from tests.helpers import compile_for_tpu, rand, rel_err, rel_rmse

HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")
SLOW = pytest.mark.slow


def numpy_attention(q, k, v, scale, window=0, segment_ids=None):
    """Token by token in float64: o_t = sum_{s visible} softmax(scale q_t.k_s) v_s, visible meaning
    s <= t, t - s < window (window > 0), and s in t's contiguous run of segment ids."""
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    b, t, h, _ = q.shape
    s_len, hkv = k.shape[1], k.shape[2]
    o = np.zeros((b, t, h, v.shape[-1]))
    for i in range(b):
        if segment_ids is not None:
            seg = np.asarray(segment_ids[i])
            doc = np.cumsum(np.concatenate([[0], seg[1:] != seg[:-1]]))
        for j in range(h):
            kh, vh = k[i, :, j // (h // hkv)], v[i, :, j // (h // hkv)]
            for tt in range(t):
                ss = np.arange(s_len)
                vis = ss <= tt
                if window:
                    vis &= ss > tt - window
                if segment_ids is not None:
                    vis &= doc[ss] == doc[tt]
                logits = scale * kh[vis] @ q[i, tt, j]
                p = np.exp(logits - logits.max())
                o[i, tt, j] = p @ vh[vis] / p.sum()
    return o


def problem(b=2, t=256, s=None, h=2, hkv=1, d=16, dv=None, dtype=jnp.float32, seed=0):
    s = s or t
    q = rand(seed, (b, t, h, d), dtype)
    k = rand(seed + 1, (b, s, hkv, d), dtype)
    v = rand(seed + 2, (b, s, hkv, dv or d), dtype)
    return q, k, v


def packed(b, t, seed=3):
    """Segment ids with several documents per row, one id reused after another (a new document)."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(b):
        cuts = np.sort(rng.choice(np.arange(1, t), 3, replace=False))
        ids = np.zeros(t, np.int32)
        for n, c in enumerate(cuts):
            ids[c:] = [5, 2, 5][n]  # 0, 5, 2, 5: the second run of 5 is its own document
        rows.append(ids)
    return jnp.asarray(np.stack(rows))


@functools.partial(jax.jit, static_argnames=("impl", "window"))
def value_and_grads(q, k, v, w, seg, impl, window):
    """Output and the gradients of sum(sin(o) * w) w.r.t. q, k, v."""
    scale = q.shape[-1] ** -0.5

    def f(q, k, v):
        if impl == "splash":
            o = sp.splash_attention(q, k, v, scale=scale, segment_ids=seg, window=window, interpret=True)
        else:
            o = causal_attention(q, k, v, scale=scale, segment_ids=seg, window=window, impl="xla")
        return jnp.sum(jnp.sin(o.astype(jnp.float32)) * w), o

    (_, o), g = jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(q, k, v)
    return o, g


def check_against_references(q, k, v, *, window=0, seg=None, tol=2e-6, gtol=1e-5):
    w = rand(9, q.shape[:3] + (v.shape[-1],))
    o, g = value_and_grads(q, k, v, w, seg, "splash", window)
    ref = numpy_attention(q, k, v, q.shape[-1] ** -0.5, window, seg)
    assert o.shape == ref.shape and o.dtype == q.dtype
    assert rel_err(o, ref) < tol
    o_xla, g_xla = value_and_grads(q, k, v, w, seg, "xla", window)
    assert rel_err(o_xla, ref) < tol  # the XLA form agrees with the NumPy loop: its gradients are the reference
    for name, a, r in zip("qkv", g, g_xla):
        assert a.shape == r.shape and rel_err(a, r) < gtol, name
    return o, ref


# ----------------------------------------------------------------------------- interpret mode (CPU)


def test_gqa_window_and_packed_documents():
    """The default check, one compile: three 128-row blocks (T = 384), two query heads reading one
    key/value head, a window of 150 (blocks wholly outside it are skipped by the kernel) and packed
    documents (ids 0, 5, 2, 5: the second 5 is a new document), batch of 2. The masks change the
    output (the comparison can fail)."""
    q, k, v = problem(t=384)
    seg = packed(2, 384)
    o, _ = check_against_references(q, k, v, window=150, seg=seg)
    scale = q.shape[-1] ** -0.5
    assert rel_err(o, numpy_attention(q, k, v, scale, 150, None)) > 0.1
    assert rel_err(o, numpy_attention(q, k, v, scale, 0, seg)) > 0.1


@SLOW
def test_causal_gqa():
    """Plain causal (the CausalMask tables), three blocks, two query heads per key/value head."""
    q, k, v = problem(t=384)
    check_against_references(q, k, v)


@SLOW
def test_documents_run_separately():
    """A packed row equals its documents run one by one (two documents of 128 tokens)."""
    q, k, v = problem(b=1, t=256, h=2, hkv=1)
    seg = jnp.asarray(np.repeat([[0, 1]], [128, 128], axis=1).astype(np.int32))
    o = jax.jit(lambda q, k, v: sp.splash_attention(q, k, v, scale=0.25, segment_ids=seg, interpret=True))(q, k, v)
    for lo in (0, 128):
        part = [x[:, lo:lo + 128] for x in (q, k, v)]
        alone = jax.jit(lambda q, k, v: sp.splash_attention(q, k, v, scale=0.25, interpret=True))(*part)
        assert rel_err(o[:, lo:lo + 128], alone) < 1e-6


@SLOW
@pytest.mark.parametrize("kw", [dict(h=2, hkv=2, window=128), dict(h=4, hkv=2, window=1000),
                                dict(h=2, hkv=1, t=128), dict(h=2, hkv=1, t=128, s=384)])
def test_more_shapes(kw):
    """Window of exactly one block, a window longer than T (plain causal), one block, S > T (keys
    0..S-1 against queries 0..T-1, as the XLA form's default positions)."""
    window = kw.pop("window", 0)
    q, k, v = problem(**kw, dv=24)
    check_against_references(q, k, v, window=window)


@SLOW
def test_bfloat16_error_is_bounded():
    q, k, v = problem(b=1, dtype=jnp.bfloat16)
    o = jax.jit(lambda q, k, v: sp.splash_attention(q, k, v, scale=0.25, interpret=True))(q, k, v)
    assert o.dtype == jnp.bfloat16
    assert rel_rmse(o, numpy_attention(q, k, v, 0.25)) < 2 ** -7


def test_bad_inputs_raise():
    q, k, v = problem(b=1, t=128)
    call = functools.partial(sp.splash_attention, scale=0.25, interpret=True)
    with pytest.raises(TypeError, match="q must be floating"):
        call(q.astype(jnp.int32), k, v)
    with pytest.raises(TypeError, match="share a dtype"):
        call(q, k.astype(jnp.bfloat16), v)
    with pytest.raises(ValueError, match="multiples of 128"):
        call(*problem(b=1, t=96))
    with pytest.raises(ValueError, match="H % Hkv"):
        call(*problem(b=1, t=128, h=3, hkv=2))
    with pytest.raises(ValueError, match=r"q must be 4-d \(\[B, T, H, K\]\)"):
        call(q[0], k, v)
    with pytest.raises(ValueError, match="window must be an int >= 0"):
        call(q, k, v, window=-1)
    with pytest.raises(ValueError, match=r"segment_ids must be \[B, T\]"):
        call(q, k, v, segment_ids=jnp.zeros((1, 64), jnp.int32))
    with pytest.raises(TypeError, match="segment_ids must be integer"):
        call(q, k, v, segment_ids=jnp.zeros((1, 128)))
    with pytest.raises(ValueError, match="self-attention"):
        call(*problem(b=1, t=128, s=256), segment_ids=jnp.zeros((1, 128), jnp.int32))
    with pytest.raises(TypeError, match="scale must be a Python float"):
        call(q, k, v, scale=None)


def test_supports_and_block_sizes():
    ok = (4, 8192, 8192, 16, 16, 128, 128)
    assert sp.supports(ok, jnp.bfloat16, "tpu") and sp.supports(ok, jnp.float32, "tpu")
    assert not sp.supports(ok, jnp.bfloat16, "gpu") and not sp.supports(ok, jnp.bfloat16, "cpu")
    assert not sp.supports(ok, jnp.float16, "tpu")
    assert not sp.supports((4, 8000, 8000, 16, 16, 128, 128), jnp.bfloat16, "tpu")
    assert not sp.supports((4, 8192, 8192, 16, 3, 128, 128), jnp.bfloat16, "tpu")
    assert not sp.supports((4, 8192, 8192, 16, 16, 512, 128), jnp.bfloat16, "tpu")
    assert sp.supports((1, 128, 384, 4, 2, 64, 24), jnp.float32, "tpu")
    assert [sp.block_size(n) for n in (128, 256, 384, 640, 1024, 131072)] == [128, 256, 128, 128, 512, 512]
    bs = sp.block_sizes(384, 1024)
    assert (bs.block_q, bs.block_kv, bs.block_q_dq, bs.block_kv_dkv) == (128, 512, 128, 512)
    q, k, v = problem(b=1, t=128)
    assert sp.unsupported(q, k, v) is None
    assert "platform" in sp.unsupported(q, k, v, platform="cpu")
    assert "dtypes" in sp.unsupported(q.astype(jnp.float16), k, v)
    assert sp.shape_of(q, k, v) == (1, 128, 128, 2, 1, 16, 16)


# ----------------------------------------------------------------------------- Mosaic (libtpu)


def _compile(topology, f, args):
    return compile_for_tpu(topology, f, args).as_text()


@needs_libtpu
@pytest.mark.parametrize("topology", ["v5p:1x1x1", pytest.param("v5e:1x1", marks=pytest.mark.slow)])
def test_compiles_through_mosaic(topology):
    """Forward and forward + backward (GQA, window, packed documents) compile for a TPU from this
    CPU host: Mosaic checks block shapes and VMEM as on hardware. One forward kernel; the backward
    adds the dq and dkv kernels."""
    b, t, h, hkv, d = 2, 1024, 4, 2, 128
    args = [jax.ShapeDtypeStruct((b, t, n, d), jnp.bfloat16) for n in (h, hkv, hkv)]
    seg = jnp.asarray(np.repeat([[0, 1]], [600, 424], axis=1).astype(np.int32).repeat(b, 0))

    def fwd(q, k, v):
        return sp.splash_attention(q, k, v, scale=d ** -0.5, segment_ids=seg, window=300)

    def fwd_bwd(q, k, v):
        return jax.grad(lambda *a: jnp.sum(fwd(*a).astype(jnp.float32)), argnums=(0, 1, 2))(q, k, v)

    assert sp.unsupported(*args, segment_ids=seg) is None
    assert _compile(topology, fwd, args).count("tpu_custom_call") == 1
    assert _compile(topology, fwd_bwd, args).count("tpu_custom_call") == 3


@needs_libtpu
@SLOW  # (minutes: the compiler works through the oversized tile before it gives up)
def test_mosaic_rejects_blocks_over_vmem(monkeypatch):
    """The compile test can fail: 4096 x 4096 blocks (a float32 logits tile of 64 MiB) pass the
    kernel's own checks but not the TPU compiler's VMEM budget; the adapter's blocks (<= 512) do."""
    t = 4096
    args = [jax.ShapeDtypeStruct((1, t, 1, 256), jnp.float32) for _ in range(3)]
    big = sp.sa.BlockSizes(block_q=t, block_kv=t, block_kv_compute=t)
    monkeypatch.setattr(sp, "block_sizes", lambda t, s: big)
    with pytest.raises(Exception, match="vmem"):
        _compile("v5p:1x1x1", lambda q, k, v: sp.splash_attention(q, k, v, scale=0.1), args)


@needs_libtpu
@SLOW
def test_cost_benchmark_smoke(tmp_path):
    from benchmarks import tpu_attention_cost  # noqa: PLC0415 - the benchmarks package, imported only with libtpu

    out = tmp_path / "cost.json"
    rows = tpu_attention_cost.main(["--T", "256", "--B", "1", "--H", "2", "--D", "128", "--impls", "xla", "splash",
                                    "--json", str(out)])
    assert [(r["impl"], r["pass"]) for r in rows] == [("xla", "fwd"), ("xla", "fwd+bwd"), ("splash", "fwd"),
                                                      ("splash", "fwd+bwd")]
    assert all("error" not in r and r["temp_bytes"] is not None and r["bytes_accessed"] > 0 for r in rows)
    assert [r["custom_calls"] for r in rows] == [0, 0, 1, 3]
    assert json.loads(out.read_text())["rows"][0]["impl"] == "xla"


def test_causal_attention_dispatches_to_splash():
    """``causal_attention(impl="splash")`` runs the adapter (interpreted here) and equals the XLA
    form; what splash cannot do (explicit positions, a forget gate) is refused by name, and
    ``auto`` never picks it off a verified TPU."""
    q, k, v = problem(b=1, t=128, h=2, hkv=1)
    seg = jnp.asarray(np.repeat([[1, 2]], [50, 78], axis=1).astype(np.int32))
    o = causal_attention(q, k, v, segment_ids=seg, window=40, impl="splash", interpret=True)
    ref = causal_attention(q, k, v, segment_ids=seg, window=40, impl="xla")
    assert rel_err(o, ref) < 2e-6
    pos = jnp.broadcast_to(jnp.arange(128), (1, 128))
    with pytest.raises(ValueError, match="q_positions"):
        causal_attention(q, k, v, q_positions=pos, impl="splash", interpret=True)
    with pytest.raises(ValueError, match="forget_gate"):
        causal_attention(q, k, v, forget_gate=jnp.zeros((1, 128, 2)), impl="splash", interpret=True)
    with pytest.raises(ValueError, match="platform 'cpu'"):
        causal_attention(q, k, v, impl="splash")
    np.testing.assert_array_equal(causal_attention(q, k, v, impl="auto"), causal_attention(q, k, v, impl="xla"))


@needs_libtpu
def test_compiles_for_a_sharded_program():
    """With the batch sharded over a 4-chip v5p slice the adapter runs the kernel per device inside
    a shard_map (XLA refuses to partition a Mosaic call: "Mosaic kernels cannot be automatically
    partitioned"): forward + backward with packed documents compiles, with no all-gather and every
    kernel on the per-device batch."""
    from jax.sharding import NamedSharding, PartitionSpec as P
    from memjax.train import compile as plan_lib

    mesh = jax.make_mesh((4,), ("data",), devices=plan_lib.topology_devices("v5p:2x2x1"),
                         axis_types=(jax.sharding.AxisType.Auto,))
    b, t, h, d = 8, 512, 4, 128
    sh = NamedSharding(mesh, P("data"))
    args = [jax.ShapeDtypeStruct((b, t, h, d), jnp.bfloat16, sharding=sh) for _ in range(3)] + [
        jax.ShapeDtypeStruct((b, t), jnp.int32, sharding=sh)]

    def loss(q, k, v, ids):
        return jnp.sum(sp.splash_attention(q, k, v, scale=d ** -0.5, segment_ids=ids).astype(jnp.float32))

    with jax.set_mesh(mesh):
        text = jax.jit(jax.grad(loss, argnums=(0, 1, 2))).lower(*args).compile().as_text()
    assert "all-gather" not in text
    calls = [line for line in text.splitlines() if "custom-call(" in line and "tpu_custom_call" in line]
    assert len(calls) == 3 and all(f"[{b // 4}," in line for line in calls)
