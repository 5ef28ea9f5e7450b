"""memjax-compile: TPU slice names, the missing-libtpu error, the target platform of the kernels,
and (with libtpu installed) compiling the real train step for a v5p-8 on this CPU host.

The tests that compile need the ``libtpu`` package (``pip install -e '.[tpu]'``); without it they
are skipped. Nothing runs on a TPU: the devices are compile-only.
"""
import importlib.util
import json
import os
import warnings

import jax
import jax.numpy as jnp
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.config import MeshConfig
from memjax.kernels.platform import target_device_kind, target_platform
from memjax.model.sharding import make_mesh
from memjax.train import cli
from memjax.train import compile as plan_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = os.path.join(ROOT, "configs", "mqar_tiny.py")
HAS_LIBTPU = importlib.util.find_spec("libtpu") is not None
needs_libtpu = pytest.mark.skipif(not HAS_LIBTPU, reason="needs libtpu (pip install -e '.[tpu]') to compile for TPU")


# ----------------------------------------------------------------------------- names (no libtpu)


@pytest.mark.parametrize("name,devices,topology", [
    ("v5p-8", 4, "v5p:2x2x1"),  # v4 / v5p names count TensorCores: 2 per chip
    ("v5p-128", 64, "v5p:4x4x4"),
    ("v4-32", 16, "v4:2x2x4"),
    ("v4-8", 4, "v4:2x2x1"),
    ("v5e-256", 256, "v5e:16x16"),  # v5e / v6e names count chips
    ("v5litepod-8", 8, "v5e:2x4"),
    ("v6e-64", 64, "v6e:8x8"),
    ("v6e-1", 1, "v6e:1x1"),
    ("v5p:2x2x1", 4, "v5p:2x2x1"),
    ("v5p:4x4x4", 64, "v5p:4x4x4"),
    ("v5e:16x16", 256, "v5e:16x16"),
    ("v4:2x2x4", 16, "v4:2x2x4"),
])
def test_parse_topology(name, devices, topology):
    t = plan_lib.parse_topology(name)
    assert (t.devices, t.topology_string) == (devices, topology)
    assert t.hbm_per_device_bytes == plan_lib.HBM_BYTES_PER_CHIP[t.generation]


def test_parse_topology_accelerator_type_and_peaks():
    t = plan_lib.parse_topology("v5p:2x2x2")
    assert (t.accelerator_type, t.chips, t.chip_config) == ("v5p-16", 8, "megacore")
    assert plan_lib.parse_topology("v5e-16").accelerator_type == "v5e-16"
    assert plan_lib.parse_topology("v5p-8").hbm_per_device_bytes == 95 * 2 ** 30
    assert plan_lib.parse_topology("v6e-8").peak_flops_per_device == 918e12


@pytest.mark.parametrize("name,match", [
    ("v5p-7", "multiple of 2"),
    ("v5p-24", "no standard v5p slice has 12 chips"),
    ("v5e-2", "no standard v5e slice"),
    ("v7-8", "unknown TPU generation"),
    ("v5p:2x2", "3 positive dimensions"),
    ("v5e:2x2x1", "2 positive dimensions"),
    ("tpu", "cannot read TPU topology"),
])
def test_parse_topology_errors(name, match):
    with pytest.raises(ValueError, match=match):
        plan_lib.parse_topology(name)


def test_missing_libtpu(monkeypatch, capsys):
    monkeypatch.setattr(plan_lib, "has_libtpu", lambda: False)
    with pytest.raises(plan_lib.MissingLibtpuError, match="needs libtpu"):
        plan_lib.topology_devices("v5p-8")
    with pytest.raises(SystemExit) as e:
        cli.compile_main(["--config", TINY, "--topology", "v5p-8"])
    assert e.value.code == 2
    assert capsys.readouterr().err.strip() == "memjax-compile needs libtpu: pip install -e '.[tpu]'"


def test_bad_topology_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.compile_main(["--config", TINY, "--topology", "v5p-7"])
    assert e.value.code == 2 and "topology error" in capsys.readouterr().err


def test_target_platform_follows_the_mesh():
    assert target_platform() == jax.default_backend()
    assert target_platform("tpu") == "tpu"  # explicit wins
    with jax.set_mesh(jax.make_mesh((1,), ("x",), devices=jax.devices()[:1])):
        assert target_platform() == "cpu" and target_device_kind("cpu") == jax.devices()[0].device_kind
    device = jax.sharding.AbstractDevice(device_kind="NVIDIA H100 80GB HBM3", num_cores=None, platform="cuda")
    mesh = jax.sharding.AbstractMesh((1,), ("x",), (jax.sharding.AxisType.Explicit,), abstract_device=device)
    with jax.sharding.use_abstract_mesh(mesh):
        assert target_platform() == "gpu"  # CUDA devices are the "gpu" backend
        assert target_device_kind("gpu") == "NVIDIA H100 80GB HBM3" and target_device_kind("tpu") is None


# ----------------------------------------------------------------------------- compiling (libtpu)


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
    if not HAS_LIBTPU:
        pytest.skip("needs libtpu (pip install -e '.[tpu]') to compile for TPU")
    path = tmp_path_factory.mktemp("compile") / "plan.json"
    cli.compile_main(["--config", TINY, "--topology", "v5p-8", "--json", str(path)])  # fits: returns
    with open(path) as f:
        return json.load(f)


@needs_libtpu
def test_topology_devices():
    devices = plan_lib.topology_devices("v5p-8")
    assert len(devices) == 4 and {d.platform for d in devices} == {"tpu"}
    assert devices[0].device_kind == "TPU v5"
    assert len(plan_lib.topology_devices("v5e:1x1")) == 1  # smaller than one default host


@needs_libtpu
def test_mesh_that_splits_a_torus_axis_is_laid_out_with_a_warning():
    """v5p-128 is a 4x4x4 torus: seq 8 is no product of whole torus axes, so JAX's own layout
    refuses it; the mesh splits a physical axis instead (and says so), seq 16 needs no split."""
    devices = plan_lib.topology_devices("v5p-128")
    with pytest.warns(UserWarning, match="splits a physical axis"):
        mesh = make_mesh(MeshConfig(data=8, fsdp=1, seq=8), devices)
    assert dict(mesh.shape) == {"data": 8, "fsdp": 1, "seq": 8, "tensor": 1}
    assert sorted(d.id for d in mesh.devices.flat) == sorted(d.id for d in devices)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert dict(make_mesh(MeshConfig(data=4, fsdp=1, seq=16), devices).shape)["seq"] == 16


@needs_libtpu
def test_compile_tiny_for_v5p_8(tiny_plan):
    p = tiny_plan
    assert set(plan_lib.RESULT_KEYS) <= set(p) and {"fits", "breakdown", "details"} <= set(p)
    assert p["topology"] == "v5p-8" and p["devices"] == 4
    assert p["hbm_per_device_bytes"] == 95 * 2 ** 30
    assert p["fits"] is True and 0 < p["memory_per_device_bytes"] < p["hbm_per_device_bytes"]
    assert p["flops_per_step"] > 0 and p["bytes_accessed_per_step"] > 0 and p["estimated_step_seconds"] > 0
    assert 0 < p["estimated_mfu"] < 1
    d, bd = p["details"], p["breakdown"]
    assert d["mesh"] == {"data": 4, "fsdp": 1, "seq": 1, "tensor": 1} and d["device_kind"] == "TPU v5"
    # Model FLOPs: 6 N D + attention, for the whole slice; XLA's count is per device and also
    # counts the softmax, norms, loss and optimizer, so it is somewhat above a quarter of it.
    assert p["model_flops_per_step"] == pytest.approx(d["model_flops_per_token"] * 64 * 64)
    assert 1.0 < p["flops_per_step"] / (p["model_flops_per_step"] / 4) < 1.6
    # Replicated (data-parallel) state: every device holds all parameters; AdamW keeps two moments.
    assert bd["parameters"] == 4 * d["params"] and bd["optimizer_state"] >= 2 * bd["parameters"]
    assert bd["temporaries"] > 0 and bd["arguments"] >= bd["parameters"] + bd["optimizer_state"]
    assert p["estimated_mfu"] == pytest.approx(
        p["model_flops_per_step"] / (p["estimated_step_seconds"] * 4 * plan_lib.PEAK_BF16_FLOPS_PER_CHIP["v5p"]))


@needs_libtpu
@pytest.mark.slow  # CI installs libtpu: keep its default TPU compiles few
def test_cost_analysis_is_per_device():
    """The same step on one chip: XLA's FLOPs are ~4x the 4-way data-parallel program's."""
    from memjax.config import load_config

    one = plan_lib.compile_plan(load_config(TINY, ["train.batch_size=16"]), "v5p:1x1x1")
    four = plan_lib.compile_plan(load_config(TINY, ["train.batch_size=16"]), "v5p-8")
    assert (one["devices"], four["devices"]) == (1, 4)
    assert one["flops_per_step"] / four["flops_per_step"] == pytest.approx(4.0, rel=0.02)
    assert one["model_flops_per_step"] == four["model_flops_per_step"]  # the whole slice's


@needs_libtpu
@pytest.mark.slow  # CI installs libtpu: keep its default TPU compiles few
def test_loop_correction_counts_every_scanned_group():
    """Scanned layers (one loop) after the correction cost what the unrolled step costs."""
    from memjax.config import load_config

    over = ["model.pattern_repeat=3", "train.batch_size=16", "model.d_model=32"]
    scanned = plan_lib.compile_plan(load_config(TINY, over + ["model.scan_layers=True"]), "v5p-8")
    unrolled = plan_lib.compile_plan(load_config(TINY, over + ["model.scan_layers=False"]), "v5p-8")
    assert scanned["details"]["scanned_layers"] and not unrolled["details"]["scanned_layers"]
    assert "extrapolated" in scanned["details"]["cost_source"]
    assert scanned["details"]["xla_cost_as_compiled"]["flops"] < 0.7 * scanned["flops_per_step"]
    assert scanned["flops_per_step"] == pytest.approx(unrolled["flops_per_step"], rel=0.01)


@needs_libtpu
@pytest.mark.slow  # CI installs libtpu: keep its default TPU compiles few
def test_plan_that_does_not_fit_exits_1(capsys, tmp_path):
    path = tmp_path / "big.json"
    with pytest.raises(SystemExit) as e:  # 2^20 x 8192 tied embedding: 34 GiB of fp32 parameters per device
        cli.compile_main(["--config", TINY, "--topology", "v5p-8", "--json", str(path), "--set",
                          "model.vocab_size=1048576", "model.d_model=8192", "model.num_heads=8"])
    assert e.value.code == 1
    out, err = capsys.readouterr()
    assert "DOES NOT FIT" in out
    assert "does not fit" in err and "95.00 GiB HBM" in err and "mesh.fsdp=4 mesh.data=1" in err
    assert "train.microbatches=2" in err and "model.remat" in err
    plan = json.loads(path.read_text())
    assert plan["fits"] is False and plan["memory_per_device_bytes"] > plan["hbm_per_device_bytes"]


@needs_libtpu
def test_mesh_that_does_not_match_the_slice_exits_2(capsys):
    with pytest.raises(SystemExit) as e:
        cli.compile_main(["--config", TINY, "--topology", "v5p-8", "--set", "mesh.data=3"])
    assert e.value.code == 2
    assert "topology v5p-8 has 4 devices" in capsys.readouterr().err


@needs_libtpu
@pytest.mark.slow  # CI installs libtpu: keep its default TPU compiles few
def test_pallas_tpu_embedding_bag_compiles_for_a_tpu_mesh():
    """Under a mesh of (compile-only) TPU devices the kernels target TPU: ``impl="pallas_tpu"``,
    refused on this CPU host without the mesh, lowers to Mosaic and compiles for the TPU."""
    from memjax.kernels.embedding_bag_ops import resolve_impl
    from memjax.memory.sharded_lookup import sharded_embedding_bag

    with pytest.raises(ValueError, match="needs a GPU or TPU"):
        resolve_impl("pallas_tpu", (1024, 256), jnp.bfloat16, None)
    mesh = jax.make_mesh((4,), ("tensor",), devices=plan_lib.topology_devices("v5p-8"),
                         axis_types=(jax.sharding.AxisType.Auto,))

    def f(v, idx, w, g):
        lookup = lambda v, w: sharded_embedding_bag(v, idx, w, scheme="rows", impl="pallas_tpu")  # noqa: E731
        return jax.value_and_grad(lambda v, w: jnp.sum(lookup(v, w).astype(jnp.float32) * g), argnums=(0, 1))(v, w)

    rep = NamedSharding(mesh, P())
    args = (jax.ShapeDtypeStruct((1024, 256), jnp.bfloat16, sharding=NamedSharding(mesh, P("tensor", None))),
            jax.ShapeDtypeStruct((40, 7), jnp.int32, sharding=rep),
            jax.ShapeDtypeStruct((40, 7), jnp.float32, sharding=rep),
            jax.ShapeDtypeStruct((40, 256), jnp.float32, sharding=rep))
    with jax.set_mesh(mesh):
        assert resolve_impl("pallas_tpu", (1024, 256), jnp.bfloat16, None) == ("pallas_tpu", False)
        lowered = jax.jit(f).lower(*args)
        assert lowered.as_text().count("tpu_custom_call") == 3  # forward, d_values, d_weights
        compiled = lowered.compile()
    assert compiled.as_text().count("tpu_custom_call") == 3
