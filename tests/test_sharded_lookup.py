"""Sharded embedding bags on the 8 fake CPU devices: equal to the unsharded lookup (forward and
gradients), 1/8 of the table per device, gradients of the table stay sharded.

Tolerance: float64 (x64 fixture) 1e-12 relative.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

from memjax.kernels.embedding_bag_ops import embedding_bag
from memjax.memory.sharded_lookup import axis_size, sharded_embedding_bag

AUTO = jax.sharding.AxisType.Auto
SPECS = {"rows": P("tensor", None), "cols": P(None, "tensor")}


def rel(x, ref):
    x, ref = np.asarray(x, np.float64), np.asarray(ref, np.float64)
    return float(np.max(np.abs(x - ref)) / np.max(np.abs(ref)))


def problem(n=64, d=16, bt=16, k=5, dtype=jnp.float64):
    rng = np.random.default_rng(0)  # NumPy data: no x64 RNG compilations
    values = jnp.asarray(rng.standard_normal((n, d)), dtype)
    idx = jnp.asarray(rng.integers(0, n, (bt, k)), jnp.int32).at[0, :2].set(3)  # a repeated row
    w = jnp.asarray(rng.standard_normal((bt, k)), dtype)
    g = jnp.asarray(rng.standard_normal((bt, d)), dtype)
    return values, idx, w, g


def value_and_grads(lookup, values, idx, w, g):
    return jax.jit(jax.value_and_grad(lambda v, w: jnp.sum(lookup(v, idx, w) * g), argnums=(0, 1)))(values, w)


def reference(values, idx, w, g):
    out = jnp.einsum("bk,bkd->bd", w, values[idx])
    loss, vjp = jax.vjp(lambda v, w: jnp.sum(jnp.einsum("bk,bkd->bd", w, v[idx]) * g), values, w)
    return loss, vjp(jnp.ones_like(loss)), out


@pytest.mark.parametrize("mesh_shape,names,axis_type", [
    ((8,), ("tensor",), AUTO), ((2, 4), ("data", "tensor"), AUTO),
    ((2, 4), ("data", "tensor"), jax.sharding.AxisType.Explicit)])
@pytest.mark.parametrize("scheme", ["rows", "cols"])
def test_matches_unsharded(x64, mesh_shape, names, axis_type, scheme):
    mesh = jax.make_mesh(mesh_shape, names, axis_types=(axis_type,) * len(names))
    values, idx, w, g = problem()
    loss_ref, (dv_ref, dw_ref), out_ref = reference(values, idx, w, g)
    with jax.set_mesh(mesh):
        vs = jax.device_put(values, NamedSharding(mesh, SPECS[scheme]))
        if "data" in names:  # the bags also split over the automatic data axis
            idx = jax.device_put(idx, NamedSharding(mesh, P("data")))
            w = jax.device_put(w, NamedSharding(mesh, P("data")))
        for bags in ("replicated", "sharded"):
            lookup = lambda v, i, w: sharded_embedding_bag(v, i, w, scheme=scheme, bags=bags)
            out = jax.jit(lookup)(vs, idx, w)
            loss, (dv, dw) = value_and_grads(lookup, vs, idx, w, g)
            assert rel(out, out_ref) < 1e-12 and abs(float(loss - loss_ref)) < 1e-10 * abs(float(loss_ref))
            assert rel(dv, dv_ref) < 1e-12 and rel(dw, dw_ref) < 1e-12, (scheme, bags)
            assert dv.sharding.spec == SPECS[scheme]  # the table's gradient stays sharded
            if bags == "sharded":
                assert out.sharding.spec[0] is not None and "tensor" in np.atleast_1d(out.sharding.spec[0])


@pytest.mark.parametrize("scheme", ["rows", "cols"])
def test_per_device_memory_is_one_eighth(scheme):
    n, d = 4096, 64
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AUTO,))
    values, idx, w, g = problem(n=n, d=d, dtype=jnp.float32)
    table_bytes = n * d * 4
    with jax.set_mesh(mesh):
        vs = jax.device_put(values, NamedSharding(mesh, SPECS[scheme]))
        shard = vs.addressable_shards[0].data
        assert shard.size * 8 == values.size and len(vs.addressable_shards) == 8
        grad = jax.jit(jax.value_and_grad(
            lambda v, w: jnp.sum(sharded_embedding_bag(v, idx, w, scheme=scheme) * g)))
        mem = grad.lower(vs, w).compile().memory_analysis()
        small = 4 * (idx.size + 2 * w.size + g.size) + 64  # bags, weights, cotangent, scalars
        # Per device: the table shard in, its gradient shard out, no full-table temporaries.
        assert table_bytes / 8 <= mem.argument_size_in_bytes <= table_bytes / 8 + small
        assert table_bytes / 8 <= mem.output_size_in_bytes <= table_bytes / 8 + small
        assert mem.temp_size_in_bytes < table_bytes / 4


@pytest.mark.parametrize("scheme,bags", [("rows", "replicated"), ("cols", "sharded")])
def test_pallas_kernel_inside_shard_map(x64, scheme, bags):
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AUTO,))
    values, idx, w, g = problem(n=32, d=8, bt=8, k=3)
    loss_ref, (dv_ref, dw_ref), _ = reference(values, idx, w, g)
    with jax.set_mesh(mesh):
        vs = jax.device_put(values, NamedSharding(mesh, SPECS[scheme]))
        lookup = lambda v, i, w: sharded_embedding_bag(v, i, w, scheme=scheme, bags=bags, impl="pallas_gpu",
                                                       interpret=True)
        loss, (dv, dw) = value_and_grads(lookup, vs, idx, w, g)
    assert rel(dv, dv_ref) < 1e-12 and rel(dw, dw_ref) < 1e-12


@pytest.mark.parametrize("scheme,bags", [("rows", "replicated"), ("cols", "sharded")])
def test_compiled_triton_kernel_lowers_inside_shard_map(monkeypatch, scheme, bags):
    """With the varying-axes check on (compiled kernels), forward + backward lower for CUDA."""
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AUTO,))

    def f(v, idx, w, g):
        lookup = lambda v, w: sharded_embedding_bag(v, idx, w, scheme=scheme, bags=bags, impl="pallas_gpu")
        return jax.value_and_grad(lambda v, w: jnp.sum(lookup(v, w).astype(jnp.float32) * g), argnums=(0, 1))(v, w)

    target = "__gpu$xla.gpu.triton"
    if hasattr(jax.sharding, "AbstractDevice"):
        # JAX >= 0.11 lowers Triton kernels for the GPU it reads off the mesh's devices: with
        # none present, an abstract mesh of H100s names the target.
        device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
        mesh = jax.sharding.AbstractMesh((8,), ("tensor",), (AUTO,), abstract_device=device)
    with jax.set_mesh(mesh) if isinstance(mesh, jax.sharding.Mesh) else jax.sharding.use_abstract_mesh(mesh):
        args = (jax.ShapeDtypeStruct((1024, 128), jnp.bfloat16, sharding=NamedSharding(mesh, SPECS[scheme])),
                jax.ShapeDtypeStruct((64, 8), jnp.int32), jax.ShapeDtypeStruct((64, 8), jnp.float32),
                jax.ShapeDtypeStruct((64, 128), jnp.float32))
        exp = jax.export.export(jax.jit(f), platforms=["cuda"],
                                disabled_checks=[jax.export.DisabledSafetyCheck.custom_call(target)])(*args)
    assert exp.mlir_module().count(target) == 3


def test_bfloat16_rows_accumulate_across_devices_in_float32():
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AUTO,))
    values, idx, w, _ = problem(dtype=jnp.float32)
    vb = values.astype(jnp.bfloat16)
    ref = embedding_bag(vb, idx, w, out_dtype=jnp.float32)
    with jax.set_mesh(mesh):
        out = jax.jit(lambda v: sharded_embedding_bag(v, idx, w, scheme="rows"))(
            jax.device_put(vb, NamedSharding(mesh, SPECS["rows"])))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_array_equal(np.asarray(out, np.float32), np.asarray(ref.astype(jnp.bfloat16), np.float32))


def test_validation_and_mesh_lookup():
    values, idx, w, _ = problem(n=60, d=12, bt=12, dtype=jnp.float32)
    with pytest.raises(ValueError, match="needs a mesh"):
        sharded_embedding_bag(values, idx, w)
    assert axis_size("tensor") == 1
    mesh = jax.make_mesh((8,), ("tensor",), axis_types=(AUTO,))
    with jax.set_mesh(mesh):
        assert axis_size("tensor") == 8 and axis_size("data") == 1
        with pytest.raises(ValueError, match="N=60 must be divisible"):
            sharded_embedding_bag(values, idx, w, scheme="rows")
        with pytest.raises(ValueError, match="D=12 must be divisible"):
            sharded_embedding_bag(values, idx, w, scheme="cols")
        with pytest.raises(ValueError, match="Bt=12 must be divisible"):
            sharded_embedding_bag(values[:56], idx, w, bags="sharded")
        with pytest.raises(ValueError, match="not a mesh axis"):
            sharded_embedding_bag(values[:56], idx, w, axis="model")
        with pytest.raises(ValueError, match="scheme must be"):
            sharded_embedding_bag(values[:56], idx, w, scheme="diag")
        with pytest.raises(ValueError, match="weights must be"):
            sharded_embedding_bag(values[:56], idx, w[:, :2])
