"""Embedding bag: XLA reference and both Pallas kernel families (interpret mode) vs a naive loop.

Tolerances: float64 (x64 fixture) 1e-12 relative (max abs error / max abs reference);
bfloat16 tables with float32 accumulation: exact float32 sums up to 1e-6 relative, and the
bfloat16 output within one bfloat16 rounding (2^-8 relative) of the float32 result.
"""
import contextlib
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.experimental import pallas as pl

from memjax.kernels import embedding_bag_pallas as ebp
from memjax.kernels.embedding_bag_ops import embedding_bag, resolve_impl, supports, verified

PALLAS = ["pallas_gpu", "pallas_tpu"]
IMPLS = ["xla", *PALLAS]


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-300))


def naive(values, indices, weights, d_out):
    """Forward and both gradients by explicit loops over bags and slots (float64 NumPy)."""
    v, idx, w, g = (np.asarray(a, np.float64) for a in (values, indices, weights, d_out))
    idx = idx.astype(np.int64)
    out = np.zeros((idx.shape[0], v.shape[1]))
    d_v = np.zeros_like(v)
    d_w = np.zeros(idx.shape)
    for b in range(idx.shape[0]):
        for j in range(idx.shape[1]):
            out[b] += w[b, j] * v[idx[b, j]]
            d_v[idx[b, j]] += w[b, j] * g[b]
            d_w[b, j] = g[b] @ v[idx[b, j]]
    return out, d_v, d_w


def problem(n=37, d=24, bt=11, k=5, dtype=jnp.float64, seed=0):
    rng = np.random.default_rng(seed)  # NumPy data: no x64 RNG compilations
    values = jnp.asarray(rng.standard_normal((n, d)), dtype)
    idx = jnp.asarray(rng.integers(0, n, (bt, k)), jnp.int32)
    # Repeated rows inside a bag and across bags: the backward must accumulate them.
    idx = idx.at[0, 1].set(idx[0, 0]).at[1, 3].set(idx[0, 0]).at[2].set(n - 1)
    weights = jnp.asarray(rng.standard_normal((bt, k)), dtype)
    d_out = jnp.asarray(rng.standard_normal((bt, d)), dtype)
    return values, idx, weights, d_out


def run(impl, values, idx, weights, d_out, **kw):
    interpret = impl != "xla"

    def f(v, w):
        return embedding_bag(v, idx, w, impl=impl, interpret=interpret, **kw)

    out, vjp = jax.vjp(f, values, weights)
    d_v, d_w = vjp(d_out.astype(out.dtype))
    return out, d_v, d_w


@pytest.mark.parametrize("impl", IMPLS)
def test_matches_naive_loop_float64(x64, impl):
    values, idx, weights, d_out = problem()
    ref = naive(values, idx, weights, d_out)
    got = jax.jit(functools.partial(run, impl))(values, idx, weights, d_out)
    for name, g, r in zip(("out", "d_values", "d_weights"), got, ref):
        assert g.dtype == jnp.float64, name
        assert rel(g, r) < 1e-12, (impl, name, rel(g, r))
    # Rows nobody read get an exact zero gradient.
    unread = np.setdiff1d(np.arange(values.shape[0]), np.asarray(idx))
    assert unread.size and np.all(np.asarray(got[1])[unread] == 0)


def test_tpu_kernel_chunked_over_smem(x64, monkeypatch):
    """Force many SMEM chunks: a row's gradient run then spans chunk boundaries."""
    monkeypatch.setattr(ebp, "TPU_SMEM_ENTRIES", 8)  # k = 5 -> one bag per chunk
    values, idx, weights, d_out = problem(bt=6)
    ref = naive(values, idx, weights, d_out)
    got = jax.jit(functools.partial(run, "pallas_tpu"))(values, idx, weights, d_out)
    for g, r in zip(got, ref):
        assert rel(g, r) < 1e-12


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_table_accumulates_in_float32(impl):
    # 1 + 255 * 2^-9: a bfloat16 running sum would stay at 1.0 (spacing 2^-7 at 1).
    k = 256
    values = jnp.ones((3, 16), jnp.bfloat16)
    idx = jnp.zeros((2, k), jnp.int32).at[1].set(2)
    w = jnp.full((2, k), 2.0 ** -9, jnp.float32).at[:, 0].set(1.0)
    out = embedding_bag(values, idx, w, impl=impl, interpret=impl != "xla")
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), 1.5)  # bf16(1.498046875)
    exact = embedding_bag(values, idx, w, impl=impl, interpret=impl != "xla", out_dtype=jnp.float32)
    np.testing.assert_allclose(np.asarray(exact), 1 + 255 * 2.0 ** -9, rtol=1e-6)


@pytest.mark.parametrize("impl", IMPLS)
def test_bfloat16_vs_float32(impl):
    values, idx, weights, d_out = problem(dtype=jnp.float32, d=32)
    d_out = d_out.astype(jnp.bfloat16).astype(jnp.float32)  # the cotangent arrives in bf16
    ref = jax.jit(functools.partial(run, "xla"))(values.astype(jnp.bfloat16).astype(jnp.float32), idx, weights, d_out)
    got = jax.jit(functools.partial(run, impl))(values.astype(jnp.bfloat16), idx, weights, d_out)
    assert got[0].dtype == got[1].dtype == jnp.bfloat16 and got[2].dtype == jnp.float32
    assert rel(got[0], ref[0]) < 2 ** -8  # one bf16 rounding of the f32 sum
    assert rel(got[1], ref[1]) < 2 ** -8
    assert rel(got[2], ref[2]) < 1e-5  # d_weights: f32 dot of the (exactly upcast) rows


def test_out_of_range_indices():
    values = jnp.arange(12.0).reshape(4, 3)
    w = jnp.ones((1, 2))
    for bad in ([[0, 4]], [[-1, 0]]):
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 4\)"):
            embedding_bag(values, jnp.asarray(bad), w)
    # Under jit the check is impossible: indices are clamped to [0, N - 1].
    f = jax.jit(lambda i: embedding_bag(values, i, w))
    np.testing.assert_array_equal(f(jnp.asarray([[0, 9]]))[0], values[0] + values[3])
    np.testing.assert_array_equal(f(jnp.asarray([[-5, 1]]))[0], values[0] + values[1])
    g = jax.jit(jax.grad(lambda v, i: embedding_bag(v, i, w).sum()))(values, jnp.asarray([[7, 7]]))
    np.testing.assert_array_equal(g[3], 2.0)


def test_input_validation():
    v, i, w = jnp.zeros((4, 3)), jnp.zeros((2, 5), jnp.int32), jnp.zeros((2, 5))
    cases = [((jnp.zeros(4), i, w), "values must be"), ((v, jnp.zeros(5, jnp.int32), w[0]), "indices must be"),
             ((v, i.astype(jnp.float32), w), "indices must be integer"), ((v, i, jnp.zeros((2, 4))), "weights must be"),
             ((v.astype(jnp.int32), i, w), "values must be floating"), ((v, i, w.astype(jnp.int32)), "weights must be floating")]
    for args, msg in cases:
        with pytest.raises(ValueError, match=msg):
            embedding_bag(*args)
    with pytest.raises(ValueError, match="impl must be one of"):
        embedding_bag(v, i, w, impl="cuda")


def test_dispatch_is_fail_closed():
    shape = (1024, 128)
    assert resolve_impl("auto", shape, jnp.float32, None, backend="cpu") == ("xla", False)
    # auto takes the kernel only on a device where its hardware tests passed (an H100 so far).
    assert supports(shape, jnp.bfloat16, "gpu") == "pallas_gpu"
    assert supports(shape, jnp.float32, "tpu") == "pallas_tpu"
    h100, a100 = "NVIDIA H100 80GB HBM3", "NVIDIA A100-SXM4-80GB"
    assert verified("gpu", h100) and not verified("gpu", a100) and not verified("tpu", "TPU v5 lite")
    assert resolve_impl("auto", shape, jnp.float32, None, backend="gpu", device_kind=h100) == ("pallas_gpu", False)
    assert resolve_impl("auto", shape, jnp.bfloat16, None, backend="gpu", device_kind=a100) == ("xla", False)
    assert resolve_impl("auto", shape, jnp.float32, None, backend="tpu", device_kind="TPU v5 lite") == ("xla", False)
    assert resolve_impl("auto", shape, jnp.float16, None, backend="gpu", device_kind=h100) == ("xla", False)
    assert supports((1024, 100), jnp.float32, "gpu") is None  # D not a multiple of 16
    assert supports((1024, 64), jnp.float32, "tpu") is None  # D not lane-dense
    assert supports(shape, jnp.float32, "cpu") is None
    assert resolve_impl("pallas", shape, jnp.float32, True, backend="cpu") == ("pallas_gpu", True)
    assert resolve_impl("pallas", shape, jnp.float32, None, backend="tpu") == ("pallas_tpu", False)
    with pytest.raises(ValueError, match="interpret=True"):
        resolve_impl("pallas", shape, jnp.float32, None, backend="cpu")
    with pytest.raises(ValueError, match="explicit Pallas impl"):
        resolve_impl("auto", shape, jnp.float32, True, backend="cpu")
    with pytest.raises(ValueError, match="does not support"):
        resolve_impl("pallas_gpu", (1024, 100), jnp.float32, None, backend="gpu")


@pytest.mark.parametrize("tiles", [(ebp.Tile(4, 8), ebp.Tile(4, 8), ebp.Tile(4, 16)),
                                   (ebp.Tile(2, 32), ebp.Tile(16, 32), ebp.Tile(2, 8)),
                                   (ebp.Tile(16, 16), ebp.Tile(1, 16), ebp.Tile(16, 32))])
def test_gpu_kernel_tiles_and_poisoned_outputs(x64, tiles):
    """Every GPU tile shape computes the naive result, and writes every output element: the
    outputs start as NaN, aliased into the kernels, so a skipped row or column block shows
    up. n = 64 rows so that several rows share a d_values program; many repeats per row, most
    rows read once or never."""
    values, idx, weights, d_out = problem(n=64, d=32, bt=40, k=6)
    idx = idx.at[:, :3].set(idx[:, :3] % 5)
    ref_out, ref_dv, ref_dw = naive(values, idx, weights, d_out)
    fwd_tile, dv_tile, dw_tile = tiles
    out = ebp.gpu_forward(values, idx, weights, out_dtype=values.dtype, interpret=True, tile=fwd_tile, poison=True)
    dv, dw = ebp.gpu_backward(d_out, values, idx, weights, 64, out_dtype=values.dtype, acc_dtype=values.dtype,
                              interpret=True, tiles={"d_values": dv_tile, "d_weights": dw_tile}, poison=True)
    for x in (out, dv, dw):
        assert not np.isnan(np.asarray(x)).any()
    assert rel(out, ref_out) < 1e-12 and rel(dv, ref_dv) < 1e-12 and rel(dw, ref_dw) < 1e-12
    assert np.all(np.asarray(dv)[np.setdiff1d(np.arange(64), np.asarray(idx))] == 0)


def test_sort_by_row_groups_pairs_stably():
    """Rows ascending, ties in flattened (bag-major) order, row_start the run boundaries."""
    idx = jnp.asarray([[3, 1, 3], [0, 3, 1]], jnp.int32)
    w = jnp.arange(6, dtype=jnp.float32).reshape(2, 3)
    rows, bags, ws, row_start = ebp.sort_by_row(idx, w, 5)
    np.testing.assert_array_equal(rows, [0, 1, 1, 3, 3, 3])
    np.testing.assert_array_equal(bags, [1, 0, 1, 0, 0, 1])
    np.testing.assert_array_equal(ws, [3, 1, 5, 0, 2, 4])
    np.testing.assert_array_equal(row_start, [0, 1, 3, 3, 6, 6])


def test_poisoned_outputs_detect_unwritten_elements(x64):
    """The poison check itself can fail: kernels that skip their last grid block leave NaNs."""
    values, idx, weights, d_out = problem(n=64, d=32, bt=16, k=3)
    kernels = {name: getattr(ebp, name) for name in ("_gpu_fwd_kernel", "_gpu_dvalues_kernel", "_gpu_dweights_kernel")}

    def first_block_only(name, axis):
        def kernel(*refs, **kw):
            @pl.when(pl.program_id(axis) == 0)
            def _():
                kernels[name](*refs, **kw)
        return kernel

    tiles = {"d_values": ebp.Tile(8, 16), "d_weights": ebp.Tile(8, 32)}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ebp, "_gpu_fwd_kernel", first_block_only("_gpu_fwd_kernel", 1))  # column blocks
        mp.setattr(ebp, "_gpu_dweights_kernel", first_block_only("_gpu_dweights_kernel", 0))  # bag blocks
        out = ebp.gpu_forward(values, idx, weights, out_dtype=values.dtype, interpret=True, tile=ebp.Tile(8, 16),
                              poison=True)
        _, dw = ebp.gpu_backward(d_out, values, idx, weights, 64, out_dtype=values.dtype, acc_dtype=values.dtype,
                                 interpret=True, tiles=tiles, poison=True)
    assert np.isnan(np.asarray(out)[:, 16:]).all() and not np.isnan(np.asarray(out)[:, :16]).any()
    assert np.isnan(np.asarray(dw)[8:]).all() and not np.isnan(np.asarray(dw)[:8]).any()

    def dvalues_skipping_column_block_1(*refs, **kw):
        *inputs, o_ref = refs
        skip = pl.program_id(1) == 1  # read out here: interpret mode cannot read it inside a branch

        class SkippingRef:
            shape, dtype = o_ref.shape, o_ref.dtype

            def __setitem__(self, index, value):
                @pl.when(jnp.logical_not(skip))
                def _():
                    o_ref[index] = value

        kernels["_gpu_dvalues_kernel"](*inputs, SkippingRef(), **kw)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(ebp, "_gpu_dvalues_kernel", dvalues_skipping_column_block_1)
        dv, _ = ebp.gpu_backward(d_out, values, idx, weights, 64, out_dtype=values.dtype, acc_dtype=values.dtype,
                                 interpret=True, tiles=tiles, poison=True)
    assert np.isnan(np.asarray(dv)[:, 16:]).all() and not np.isnan(np.asarray(dv)[:, :16]).any()


@pytest.mark.parametrize("impl,platform,target,d,bt", [
    ("pallas_gpu", "cuda", "__gpu$xla.gpu.triton", 96, 40),
    ("pallas_tpu", "tpu", "tpu_custom_call", 256, 40),
    ("pallas_tpu", "tpu", "tpu_custom_call", 128, 2100),  # > TPU_SMEM_ENTRIES pairs: chunked
])
def test_kernels_lower_for_their_hardware(monkeypatch, impl, platform, target, d, bt):
    """Forward and backward lower to Triton / Mosaic from this CPU-only install (no run)."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu" if platform == "cuda" else platform)

    def f(v, idx, w, g):
        loss = lambda v, w: jnp.sum(embedding_bag(v, idx, w, impl=impl).astype(jnp.float32) * g)
        return jax.value_and_grad(loss, argnums=(0, 1))(v, w)

    args = (jax.ShapeDtypeStruct((1000, d), jnp.bfloat16), jax.ShapeDtypeStruct((bt, 7), jnp.int32),
            jax.ShapeDtypeStruct((bt, 7), jnp.float32), jax.ShapeDtypeStruct((bt, d), jnp.float32))
    with _abstract_target(platform):
        exp = jax.export.export(jax.jit(f), platforms=[platform],
                                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
    assert exp.mlir_module().count(target) == 3  # forward, d_values, d_weights


def _abstract_target(platform):
    """JAX >= 0.11 lowers Triton kernels for the GPU it reads off the device; with none present,
    an abstract H100 names the target (older JAX lowers without one)."""
    if platform != "cuda" or not hasattr(jax.sharding, "AbstractDevice"):
        return contextlib.nullcontext()
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    return jax.sharding.use_abstract_mesh(mesh)


@pytest.mark.gpu
@pytest.mark.skipif(jax.default_backend() not in ("gpu", "tpu"), reason="needs a GPU or TPU")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_hardware_kernel_matches_xla(dtype):
    """Compiled (not interpreted) kernel vs XLA; add the device to VERIFIED_DEVICES once green."""
    values, idx, weights, d_out = problem(n=4096, d=256, bt=512, k=32, dtype=jnp.float32)
    values = values.astype(dtype)
    ref = run("xla", values, idx, weights, d_out)
    got = jax.jit(lambda *a: embedding_bag(*a, impl="pallas"))(values, idx, weights)
    assert rel(got, ref[0]) < (2 ** -8 if dtype == jnp.bfloat16 else 1e-5)
    _, vjp = jax.vjp(lambda v, w: embedding_bag(v, idx, w, impl="pallas"), values, weights)
    d_v, d_w = vjp(d_out.astype(dtype))
    assert rel(d_v, ref[1]) < (2 ** -8 if dtype == jnp.bfloat16 else 1e-5)
    assert rel(d_w, ref[2]) < 1e-4
    d_v2, _ = vjp(d_out.astype(dtype))
    np.testing.assert_array_equal(np.asarray(d_v, np.float32), np.asarray(d_v2, np.float32))  # deterministic
