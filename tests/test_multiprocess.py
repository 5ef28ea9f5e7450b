"""Multi-process JAX on one machine: 2 CPU processes x 4 devices == 1 process x 8 devices.

The 2-process job is started with ``launch/local.py`` (coordinator on 127.0.0.1, Gloo CPU
collectives, the default of jax 0.10's CPU backend); each process reads its own strided
slice of the data and the loop assembles the global batch with
``jax.make_array_from_process_local_data``; both processes take part in every Orbax save.
"""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest
from tiny import tiny_config

from memjax.data.pipeline import make_dataset
from memjax.train import distributed
from memjax.train.checkpoint import Checkpointer, abstract_like
from memjax.train.loop import build, train_and_evaluate

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from launch import local  # noqa: E402

STEPS = 8


def _metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
        return [json.loads(line) for line in f]


def _train_losses(workdir):
    return {r["step"]: r["train/loss"] for r in _metrics(workdir) if "train/loss" in r}


def _restore(workdir, cfg):
    setup = build(cfg)
    with jax.set_mesh(setup.mesh):
        target = setup.init_fn()
    ckpt = Checkpointer(os.path.join(workdir, "checkpoints"))
    state, data, _ = ckpt.restore(abstract_like(target))
    ckpt.close()
    return jax.tree.map(np.asarray, state), data


def test_processes_read_disjoint_strided_slices():
    cfg = tiny_config()
    whole = next(iter(make_dataset(cfg, "train", process_index=0, process_count=1)))
    parts = [next(iter(make_dataset(cfg, "train", process_index=i, process_count=2))) for i in range(2)]
    for k in ("inputs", "targets", "mask", "segment_ids"):
        assert parts[0][k].shape[0] == parts[1][k].shape[0] == cfg.train.batch_size // 2
        np.testing.assert_array_equal(parts[0][k], whole[k][0::2])
        np.testing.assert_array_equal(parts[1][k], whole[k][1::2])
    rows0 = {r.tobytes() for r in parts[0]["inputs"]}
    rows1 = {r.tobytes() for r in parts[1]["inputs"]}
    assert not rows0 & rows1
    with pytest.raises(ValueError, match="not divisible by the process count 3"):
        make_dataset(cfg, "train", process_index=0, process_count=3)


def test_resolve_reads_arguments_then_environment(monkeypatch):
    monkeypatch.setenv(distributed.ENV_COORDINATOR, "10.0.0.1:1234")
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "4")
    monkeypatch.setenv(distributed.ENV_PROCESS_ID, "3")
    assert distributed.resolve() == {"coordinator_address": "10.0.0.1:1234", "num_processes": 4,
                                     "process_id": 3}
    assert distributed.resolve("h:1", 2, 0) == {"coordinator_address": "h:1", "num_processes": 2,
                                                "process_id": 0}
    for name, kwargs in [("coordinator", {"coordinator": "nohost"}),
                         ("num_processes", {"num_processes": 0}),
                         ("process_id", {"process_id": 4}),
                         ("process_id", {"process_id": -1})]:
        with pytest.raises(ValueError, match=name):
            distributed.resolve(**kwargs)
    monkeypatch.setenv(distributed.ENV_NUM_PROCESSES, "two")
    with pytest.raises(ValueError, match=distributed.ENV_NUM_PROCESSES):
        distributed.resolve()


def test_maybe_initialize_is_a_noop_for_a_single_process(monkeypatch):
    for v in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        monkeypatch.delenv(v, raising=False)
    assert distributed.maybe_initialize() is False
    assert distributed.maybe_initialize(num_processes=1) is False
    assert not jax.distributed.is_initialized()
    with pytest.raises(ValueError, match="local_device_count"):
        distributed.maybe_initialize(local_device_count=0)
    jax.devices()  # backends exist now: changing the device count must fail loudly
    flags = os.environ.get("XLA_FLAGS")
    with pytest.raises(RuntimeError, match="before JAX initializes"):
        distributed.maybe_initialize(local_device_count=4)
    assert os.environ.get("XLA_FLAGS") == flags


def _launch(cfg_path, workdir, log_dir, *overrides):
    argv = ["--config", str(cfg_path), "--workdir", str(workdir), "--num-processes", "2",
            "--local-device-count", "4"]
    if overrides:
        argv += ["--set", *overrides]
    cmds = local.build_commands(local.build_parser().parse_args(argv))
    for env, _ in cmds:
        # Overrides the 8 devices conftest put in this process's XLA_FLAGS.
        assert env["XLA_FLAGS"] == "--xla_force_host_platform_device_count=4"
        assert env["JAX_PLATFORMS"] == "cpu"
    return local.start(cmds, log_dir=str(log_dir), log_first=True)


def _finish(job):
    try:
        codes = job.wait(timeout=150)
    finally:
        job.stop()
    logs = [open(job.log_path(i)).read() for i in range(len(job.procs))]
    assert codes == [0] * len(logs), "\n".join(f"--- process {i}:\n{t[-3000:]}" for i, t in enumerate(logs))
    return logs


def test_local_device_count_overrides_xla_flags_in_a_fresh_process():
    code = ("from memjax.train.distributed import maybe_initialize\n"
            "assert maybe_initialize(local_device_count=3) is False\n"
            "import jax, os\n"
            "print(jax.device_count(), jax.process_count(), os.environ['XLA_FLAGS'])\n")
    env = {**os.environ, "XLA_FLAGS": "--xla_force_host_platform_device_count=8", "JAX_PLATFORMS": "cpu"}
    for v in (distributed.ENV_COORDINATOR, distributed.ENV_NUM_PROCESSES, distributed.ENV_PROCESS_ID):
        env.pop(v, None)
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.split() == ["3", "1", "--xla_force_host_platform_device_count=3"]


@pytest.mark.slow
def test_two_processes_match_one_process_across_a_resume(tmp_path):
    """2 processes x 4 devices, stopped at step 4 and resumed to 8, == 1 process x 8 devices."""
    cfg_path = tmp_path / "cfg.py"
    cfg_path.write_text(
        "import sys\nsys.path.insert(0, %r)\nfrom tiny import tiny_config\n"
        "def get_config():\n    return tiny_config(steps=%d)\n" % (os.path.dirname(__file__), STEPS))
    two, one = tmp_path / "two", tmp_path / "one"
    job = _launch(cfg_path, two, tmp_path / "logs_a", f"train.stop_at_step={STEPS // 2}")
    try:
        # The 1-process reference (this process: 8 devices, same global batch) while the job runs.
        cfg = tiny_config(steps=STEPS)
        assert jax.process_count() == 1 and jax.device_count() == 8
        ref = train_and_evaluate(cfg, str(one))
    finally:
        first = _finish(job)
    for t in first:  # each process has 4 local devices; the mesh spans all 8
        assert "mesh {'data': 8, 'fsdp': 1, 'seq': 1, 'tensor': 1}" in t
    # Second invocation: every process restores the collective checkpoint of step 4
    # (parameters, optimizer state and its own data-iterator position) and goes on.
    second = _finish(_launch(cfg_path, two, tmp_path / "logs_b"))
    assert f"resumed from step {STEPS // 2}" in second[0]

    l1, l2 = _train_losses(one), _train_losses(two)
    assert sorted(l1) == sorted(l2) == [4, 8]
    # Same examples per step; only the order of rows in the global batch (and so the
    # float32 summation order) differs: agreement to float32 round-off.
    for s in l1:
        np.testing.assert_allclose(l2[s], l1[s], rtol=1e-5)
    assert abs(l1[STEPS] - l1[4]) > 1e-3  # the runs trained, so the comparison means something
    final2 = json.loads((two / "final_metrics.json").read_text())
    np.testing.assert_allclose(final2["loss"], ref["loss"], rtol=1e-5)
    assert final2["step"] == ref["step"] == STEPS

    # The checkpoint saved collectively by both processes restores here (1 process, 8 devices).
    s1, d1 = _restore(one, cfg)
    s2, d2 = _restore(two, cfg)
    assert int(s2["step"]) == STEPS and d1 == d2
    for a, b in zip(jax.tree.leaves(s1["params"]), jax.tree.leaves(s2["params"])):
        np.testing.assert_allclose(b, a, rtol=1e-4, atol=1e-6)
    init = jax.tree.leaves(_restore_init(cfg))
    assert any(not np.allclose(a, b) for a, b in zip(jax.tree.leaves(s2["params"]), init))


def _restore_init(cfg):
    setup = build(cfg)
    with jax.set_mesh(setup.mesh):
        return jax.tree.map(np.asarray, setup.init_fn()["params"])
