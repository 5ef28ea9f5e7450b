"""Faults a user meets on resume and eval: a changed config, a corrupted newest checkpoint, replayed
metrics, eval without a checkpoint or without write access. One small run is trained once; each
test works on its own copy of it."""
import json
import os
import shutil

import pytest
from tiny import tiny_config

from memjax.train import cli
from memjax.train.checkpoint import CheckpointError, steps_on_disk
from memjax.train.evaluate import evaluate_checkpoint
from memjax.train.loop import train_and_evaluate
from memjax.train.run_record import RunMismatch


def _config(steps=4):
    cfg = tiny_config("A,F", steps=steps)
    cfg.train.checkpoint_every, cfg.train.log_every, cfg.train.eval_every = 2, 1, None
    cfg.train.async_checkpointing = False
    return cfg


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    train_and_evaluate(_config(), str(workdir))
    return workdir


@pytest.fixture
def run(trained, tmp_path):
    dst = tmp_path / "run"
    shutil.copytree(trained, dst)
    return dst


def _files(directory):
    return {os.path.relpath(os.path.join(d, f), directory): os.path.getsize(os.path.join(d, f))
            for d, _, fs in os.walk(directory) for f in fs}


def _train_steps(workdir):
    lines = [json.loads(x) for x in open(workdir / "metrics.jsonl")]
    return [x["step"] for x in lines if "train/loss" in x]


def test_resume_with_another_architecture_is_refused_and_writes_nothing(run):
    before = _files(run)
    saved = (run / "config.json").read_text()
    cfg = _config(steps=6)
    cfg.model.num_heads, cfg.model.pattern = 4, "A,A,F"
    with pytest.raises(RunMismatch) as err:
        train_and_evaluate(cfg, str(run))
    msg = str(err.value)
    assert "resume refused" in msg and "in 3 key(s)" in msg
    for line in ("model.num_heads: trained with 2, now 4", "model.pattern: trained with 'A,F', now 'A,A,F'",
                 "train.steps: trained with 4, now 6"):
        assert line in msg
    assert "--allow-changed" in msg
    assert (run / "config.json").read_text() == saved and _files(run) == before


def test_allowed_change_resumes_and_is_recorded(run):
    cfg = _config(steps=6)
    cfg.train.log_every = 3  # intervals never need the flag
    with pytest.raises(RunMismatch, match="train.steps: trained with 4, now 6"):
        train_and_evaluate(cfg, str(run))
    out = train_and_evaluate(cfg, str(run), allow_changed=("train.steps",))
    assert out["step"] == 6
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 6
    changes = [json.loads(x) for x in open(run / "config_changes.jsonl")]
    assert changes == [{"step": 4, "changes": {"train.steps": [4, 6]}}]


def test_corrupted_newest_checkpoint_falls_back_to_the_previous_one(run):
    assert steps_on_disk(str(run / "checkpoints")) == [2, 4]
    for d, _, fs in os.walk(run / "checkpoints" / "4"):
        for f in fs:  # garble every file of the newest checkpoint
            with open(os.path.join(d, f), "r+b") as fh:
                fh.truncate(max(os.path.getsize(os.path.join(d, f)) // 2, 1))
                fh.seek(0)
                fh.write(b"\xff" * 8)
    with pytest.warns(RuntimeWarning, match=r"checkpoint step 4 in .* cannot be read"):
        out = train_and_evaluate(_config(), str(run))
    assert out["step"] == 4  # resumed from step 2 and trained steps 3 and 4 again
    assert _train_steps(run) == [1, 2, 3, 4]  # each step logged once (3 and 4 replayed)


def test_no_intact_checkpoint_is_one_clear_error(run):
    for step in (2, 4):
        shutil.rmtree(run / "checkpoints" / str(step) / "state")
        os.makedirs(run / "checkpoints" / str(step) / "state")
    with pytest.raises(CheckpointError) as err, pytest.warns(RuntimeWarning):
        train_and_evaluate(_config(), str(run))
    msg = str(err.value)
    assert msg.startswith(f"no intact checkpoint in {run / 'checkpoints'}: step 4 (") and "; step 2 (" in msg
    assert "\n" not in msg


def test_replayed_steps_are_logged_once(run):
    shutil.rmtree(run / "checkpoints" / "4")  # killed after logging steps 3 and 4, before saving 4
    assert _train_steps(run) == [1, 2, 3, 4]
    train_and_evaluate(_config(), str(run))
    assert _train_steps(run) == [1, 2, 3, 4]


def test_eval_without_checkpoint_is_one_line_and_creates_nothing(tmp_path, capsys):
    workdir = tmp_path / "never_trained"
    with pytest.raises(SystemExit) as exc:
        cli.eval_main(["--config", "configs/mqar_tiny.py", "--workdir", str(workdir)])
    assert exc.value.code == 2
    assert capsys.readouterr().err.strip() == f"error: no checkpoint in {workdir / 'checkpoints'}"
    assert not workdir.exists()


def test_eval_under_another_config_is_refused(run):
    cfg = _config()
    cfg.model.d_model = 48
    with pytest.raises(RunMismatch, match=r"eval refused.*\n  model.d_model: trained with 32, now 48"):
        evaluate_checkpoint(cfg, str(run), length_multiples=(1,))


def test_eval_of_a_read_only_workdir_writes_elsewhere(run, tmp_path, monkeypatch):
    real_access = os.access
    monkeypatch.setattr(os, "access", lambda p, mode: False if str(p).startswith(str(run)) and mode == os.W_OK
                        else real_access(p, mode))
    before = _files(run)
    with pytest.raises(PermissionError, match=r"cannot write to .*: pass --out DIR"):
        evaluate_checkpoint(_config(), str(run), length_multiples=(1,))
    out = tmp_path / "eval_out"
    metrics = evaluate_checkpoint(_config(), str(run), length_multiples=(1,), out_dir=str(out))
    assert metrics["step"] == 4 and json.loads((out / "eval_metrics.json").read_text())["step"] == 4
    assert _files(run) == before


# ----------------------------------------------------------------------------- bad indices


def test_out_of_range_ngram_hash_is_an_error_and_reads_nothing_under_jit():
    import jax
    import jax.numpy as jnp

    from memjax.memory.ngram_memory import make_hash_params, ngram_lookup

    params = make_hash_params(max_ngram=2, heads=2, table_size=5)
    table = jnp.arange(params.total_rows * 3, dtype=jnp.float32).reshape(params.total_rows, 3) + 1
    size0 = params.table_sizes[0]
    good = jnp.array([[0, 1]], jnp.int32)
    bad = jnp.array([[size0, 1]], jnp.int32)  # head 0's hash one past its table: head 1's first row
    assert ngram_lookup(table, good, params).shape == (1, 6)
    with pytest.raises(ValueError, match=rf"hashes\[..., 0\] must be in \[0, {size0}\)"):
        ngram_lookup(table, bad, params)
    out = jax.jit(lambda h: ngram_lookup(table, h, params))(bad)
    assert jnp.all(out[0, :3] == 0) and jnp.all(out[0, 3:] == table[params.offsets[1] + 1])


def test_slot_usage_drops_negative_and_too_large_indices():
    import jax.numpy as jnp

    from memjax.memory.product_keys import slot_usage

    assert float(slot_usage(jnp.array([-1, -1, 0]), 4)) == 0.25  # -1 is not slot 3
    assert float(slot_usage(jnp.array([4, 7, 1]), 4)) == 0.25


# ----------------------------------------------------------------------------- a full disk


@pytest.fixture
def small_disk(tmp_path):
    """A 16 MB tmpfs; skipped where mounting is not allowed (needs root)."""
    import subprocess

    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m", "tmpfs", str(mount)], capture_output=True).returncode:
        pytest.skip("cannot mount a tmpfs here (needs root) to fill a disk")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], capture_output=True)


def test_full_disk_during_a_save_is_one_error_and_the_previous_checkpoint_survives(small_disk):
    workdir = small_disk / "run"
    first = _config(steps=2)
    first.train.async_checkpointing = True
    train_and_evaluate(first, str(workdir))  # checkpoint 2 on disk
    # Fill the disk but for 64 KB (a checkpoint of the tiny model takes ~400 KB), then train on.
    free = os.statvfs(small_disk).f_bavail * os.statvfs(small_disk).f_frsize
    with open(small_disk / "filler", "wb") as f:
        f.write(b"\0" * (free - 64 * 1024))
    cfg = _config(steps=4)
    cfg.train.async_checkpointing = True
    with pytest.raises(CheckpointError, match=r"saving checkpoint step 4 in .* failed \(no space left on device\); "
                                              r"the last complete checkpoint is step 2: free space"):
        train_and_evaluate(cfg, str(workdir), allow_changed=("train.steps",))
    assert steps_on_disk(str(workdir / "checkpoints")) == [2]
    from memjax.train.evaluate import restore_state

    _, state, step = restore_state(cfg, str(workdir), allow_changed=("train.steps",))
    assert step == 2 and int(state["step"]) == 2
