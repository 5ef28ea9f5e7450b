"""Checkpoint reliability: reshard on restore, SIGKILL during an async save, iterator state."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
import pytest
from tiny import tiny_config

from memjax.train.checkpoint import CheckpointMismatch, Checkpointer
from memjax.train.evaluate import restore_state
from memjax.train.loop import train_and_evaluate


def test_restore_onto_a_different_mesh(tmp_path):
    cfg = tiny_config("A,F", steps=4)
    cfg.mesh.data, cfg.mesh.fsdp, cfg.mesh.tensor = 8, 1, 1
    train_and_evaluate(cfg, str(tmp_path))
    _, saved, _ = restore_state(cfg, str(tmp_path))
    other = tiny_config("A,F", steps=4)
    other.mesh.data, other.mesh.fsdp, other.mesh.tensor = 2, 2, 2
    setup, state, step = restore_state(other, str(tmp_path))
    assert step == 4
    emb = state["params"]["embed"]
    assert emb.sharding.mesh.shape == {"data": 2, "fsdp": 2, "seq": 1, "tensor": 2}
    assert emb.sharding.spec == jax.P("tensor", "fsdp")
    for a, b in zip(jax.tree.leaves(saved), jax.tree.leaves(state)):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_sigkill_during_async_save_keeps_previous_checkpoint(tmp_path):
    script = tmp_path / "kill.py"
    script.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {os.path.dirname(__file__)!r})
        import jax, jax.numpy as jnp
        from memjax.train.checkpoint import Checkpointer
        ck = Checkpointer({str(tmp_path / 'ckpt')!r}, keep=3, async_save=True)
        small = {{"w": jnp.ones((4,))}}
        ck.save(1, small, {{"next_index": 1}}, force=True)
        ck.wait()
        big = {{"w": jnp.ones((64, 1024, 1024))}}   # 256 MiB: the save is still running when we die
        ck.save(2, big, {{"next_index": 2}}, force=True)
        os.kill(os.getpid(), signal.SIGKILL)
    """))
    proc = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    ck = Checkpointer(str(tmp_path / "ckpt"))
    assert ck.latest_step() == 1
    state, data, _ = ck.restore({"w": jax.ShapeDtypeStruct((4,), np.float32)})
    assert data == {"next_index": 1} and (np.asarray(state["w"]) == 1).all()
    ck.close()


@pytest.mark.slow
def test_keep_limits_the_number_of_checkpoints(tmp_path):
    cfg = tiny_config("A,F", steps=8, checkpoint_every=2, keep_checkpoints=2)
    train_and_evaluate(cfg, str(tmp_path))
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
    assert sorted(ck.manager.all_steps()) == [6, 8]
    ck.close()


def test_checkpoint_of_another_layout_or_architecture_is_a_clear_error(tmp_path):
    """An unrolled checkpoint (written before scanned layers, or with scan_layers=False) refuses to
    load into a scanned model, before any array is read, and says which flag restores it."""
    cfg = tiny_config("A,F", steps=2)
    cfg.model.pattern_repeat, cfg.model.scan_layers = 2, False
    train_and_evaluate(cfg, str(tmp_path))
    scanned = tiny_config("A,F", steps=2)
    scanned.model.pattern_repeat = 2
    with pytest.raises(CheckpointMismatch, match=r"(?s)unrolled \(blocks/<i>/...\), the model's scanned.*"
                                                 r"--set model.scan_layers=False"):
        restore_state(scanned, str(tmp_path), allow_changed=("model",))  # past the run-record check
    with pytest.raises(CheckpointMismatch, match=r"(?s)missing from the checkpoint: stack/"):
        train_and_evaluate(scanned, str(tmp_path), allow_changed=("model",))  # a resume meets the same check
    _, state, step = restore_state(cfg, str(tmp_path))  # the flag restores it
    assert step == 2
    wider = tiny_config("A,F", steps=2)
    wider.model.pattern_repeat, wider.model.scan_layers, wider.model.d_model = 2, False, 48
    with pytest.raises(CheckpointMismatch, match=r"(?s)20 of another shape: blocks/0/wk/kernel: saved \(32, 32\), model \(48, 48\)"
                                                 r".*use that run's config.json"):
        restore_state(wider, str(tmp_path), allow_changed=("model",))
