"""Checkpoint reliability: reshard on restore, SIGKILL during an async save, iterator state."""
import os
import signal
import subprocess
import sys
import textwrap

import jax
import numpy as np
from tiny import tiny_config

from memjax.train.checkpoint import Checkpointer
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
    state, data = ck.restore({"w": jax.ShapeDtypeStruct((4,), np.float32)})
    assert data == {"next_index": 1} and (np.asarray(state["w"]) == 1).all()
    ck.close()


def test_keep_limits_the_number_of_checkpoints(tmp_path):
    cfg = tiny_config("A,F", steps=8, checkpoint_every=2, keep_checkpoints=2)
    train_and_evaluate(cfg, str(tmp_path))
    ck = Checkpointer(str(tmp_path / "checkpoints"), keep=2)
    assert sorted(ck.manager.all_steps()) == [6, 8]
    ck.close()
