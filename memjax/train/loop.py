"""The one train/eval loop: ``train_and_evaluate(config, workdir)``.

Sections: setup (mesh, model, optimizer, shardings) -> jitted steps -> restore ->
loop (train, log, eval, checkpoint, NaN guard, SIGTERM) -> final eval. The loop
knows nothing about any particular memory: the model comes from the config's block
pattern and the data from the task registry.

Host-resident tables (parameters too large for the device, :mod:`memjax.train.memory_bank`):
a model whose modules hold ``HostParam`` windows gets them as a step *input*, not as train
state. ``run_steps`` fetches the rows the batch needs (with their Adam moments) from the
TensorStore bank, the step differentiates the loss w.r.t. them and applies a row-wise Adam
(``memjax.train.memory_bank.row_adam``; ``optim.memory_values_lr`` when set, else the schedule; no
weight decay, no clipping), and the updated rows are written back; each checkpoint snapshots the
bank (``Checkpointer(bank=...)``). One process, ``train.microbatches == 1``.
"""
from __future__ import annotations

import dataclasses
import json
import os
import signal
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.config import Config, ConfigError, validate
from memjax.data.pipeline import make_dataset, make_task
from memjax.model.lm import LM
from memjax.model.sharding import axis_rules, batch_spec, make_mesh, param_specs
from memjax.nn.dense import materialized_inputs
from memjax.nn.host_params import HostIndex, HostParam
from memjax.nn.layers import logical_axes
from memjax.train import run_record
from memjax.train.checkpoint import Checkpointer, abstract_like, steps_on_disk
from memjax.train.memory_bank import HostTables, discover, row_adam
from memjax.train.metrics import MetricWriter
from memjax.train.optimizer import learning_rate_schedule, make_optimizer


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/inf loss or gradient; the last good checkpoint is kept."""


BATCH_KEYS = ("inputs", "targets", "mask", "segment_ids")


# ----------------------------------------------------------------------------- losses


def masked_xent(logits: jax.Array, targets: jax.Array, mask: jax.Array):
    """Sum of token cross-entropies and of correct predictions over ``mask``; and the mask count."""
    logp = jax.nn.log_softmax(logits.astype(jnp.float32), axis=-1)
    nll = -jnp.take_along_axis(logp, targets[..., None], axis=-1)[..., 0]
    correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
    return jnp.sum(nll * mask), jnp.sum(correct * mask), jnp.sum(mask)


# ----------------------------------------------------------------------------- setup


@dataclasses.dataclass
class Setup:
    cfg: Config
    mesh: jax.sharding.Mesh
    graphdef: Any
    state_shardings: Any
    batch_sharding: NamedSharding
    tx: optax.GradientTransformation
    init_fn: Any
    train_step: Any
    eval_step: Any
    # Host-resident parameter tables (memjax.train.memory_bank): the modules using them, and the
    # opened store (train_and_evaluate opens it; a caller of run_steps sets it with open_host_tables).
    host_modules: list = dataclasses.field(default_factory=list)
    host: HostTables | None = None


def _param_metadata(abs_params: nnx.State, key: str, default):
    def get(path, var):
        return var.get_metadata().get(key, default)

    return nnx.map_state(get, abs_params).to_pure_dict()


def matrix_mask(abs_params: nnx.State):
    """True for the parameters weight decay applies to: matrices, counting the logical axes other
    than the stacked ``layers`` axis of scanned layers (a stacked norm scale is still a vector)."""

    def is_matrix(path, var):
        axes = logical_axes(var)
        return var.ndim >= 2 if axes is None else sum(a != "layers" for a in axes) >= 2

    return nnx.map_state(is_matrix, abs_params).to_pure_dict()


def build(cfg: Config, devices=None) -> Setup:
    """Mesh, model definition, optimizer and the jitted init / train / eval steps."""
    devices = jax.devices() if devices is None else devices
    validate(cfg, num_devices=len(devices))
    mesh = make_mesh(cfg.mesh, devices)
    rules = cfg.mesh.rules
    mcfg = cfg.model

    # Sequence parallelism is explicit: the blocks get the mesh axis that time is split over.
    seq_axis = "seq" if mesh.shape["seq"] > 1 else None
    abs_model = nnx.eval_shape(lambda: LM(mcfg, seq_axis=seq_axis, rngs=nnx.Rngs(cfg.train.seed)))
    # Host-table windows (HostParam / HostIndex) are step inputs, not part of the train state:
    # the store holds them (and their optimizer state), fetched before and written after each step.
    host_modules = discover(abs_model, seed=cfg.train.seed)
    has_host = bool(host_modules)

    def split(model):
        """``(graphdef, params, rest)`` of ``model``, host-table windows left out."""
        if not has_host:
            return nnx.split(model, nnx.Param, ...)
        graphdef, params, _, rest = nnx.split(model, nnx.Param, (HostParam, HostIndex), ...)
        return graphdef, params, rest

    graphdef, abs_params, abs_rest = split(abs_model)
    p_specs = param_specs(abs_params, rules, mesh).to_pure_dict()
    labels = _param_metadata(abs_params, "optim_group", "default")
    decay = matrix_mask(abs_params)
    abs_pure = jax.tree.map(lambda v: jax.ShapeDtypeStruct(v.shape, v.dtype), abs_params.to_pure_dict())
    tx = make_optimizer(cfg.optim, cfg.train.steps, abs_pure, labels, decay_mask=decay)

    def init_fn():
        model = LM(mcfg, seq_axis=seq_axis, rngs=nnx.Rngs(cfg.train.seed))
        _, params, rest = split(model)
        params = params.to_pure_dict()
        return {"step": jnp.zeros((), jnp.int32), "bad_step": jnp.zeros((), jnp.int32),
                "params": params, "opt_state": tx.init(params), "rest": rest.to_pure_dict()}

    abs_state = jax.eval_shape(init_fn)
    replicated = P()
    # optax.multi_transform (memory values in their own group) leaves MaskedNode placeholders
    # where a group's state has no parameter: keep them (they hold no array).
    masked = lambda x: isinstance(x, optax.MaskedNode)
    opt_specs = optax.tree_map_params(tx, lambda p, s: p if masked(p) else s, abs_state["opt_state"], p_specs,
                                      transform_non_params=lambda _: replicated, is_leaf=masked)
    specs = {"step": replicated, "bad_step": replicated, "params": p_specs, "opt_state": opt_specs,
             "rest": jax.tree.map(lambda _: replicated, abs_state["rest"])}
    state_shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs,
                                   is_leaf=lambda x: isinstance(x, P))
    batch_sharding = NamedSharding(mesh, batch_spec(rules, mesh))

    micro = cfg.train.microbatches
    inject = cfg.train.inject_nan_at_step

    # XLA:CPU writes a projection's transposed gradient operand from inside its producer with
    # strided stores; materialising projection inputs avoids it (memjax.nn.dense).
    on_cpu = mesh.devices.flat[0].platform == "cpu"

    def apply(params, rest, batch, host=None):
        states = [nnx.State(params), nnx.State(rest)]
        if host is not None:
            states += [nnx.State(host["rows"]), nnx.State(host["index"])]
        model = nnx.merge(graphdef, *states)
        with materialized_inputs(on_cpu):
            logits = model(batch["inputs"], segment_ids=batch["segment_ids"])
        _, _, new_rest = split(model)
        return logits, new_rest.to_pure_dict()

    def loss_sums(params, rest, batch, host=None):
        logits, new_rest = apply(params, rest, batch, host)
        nll, correct, count = masked_xent(logits, batch["targets"], batch["mask"])
        return nll, (correct, count, new_rest)

    ocfg = cfg.optim
    schedule = learning_rate_schedule(ocfg, cfg.train.steps)

    def train_step(state, batch, host=None):
        params, rest = state["params"], state["rest"]
        grad_fn = jax.value_and_grad(loss_sums, has_aux=True)
        if host is not None:
            # Gradients w.r.t. the fetched rows too (the window is an input of the step).
            host_loss = lambda p, rows, r, b: loss_sums(p, r, b, {"rows": rows, "index": host["index"]})
            (nll, (correct, count, rest)), (grads, row_grads) = jax.value_and_grad(
                host_loss, argnums=(0, 1), has_aux=True)(params, host["rows"], rest, batch)
        elif micro == 1:
            (nll, (correct, count, rest)), grads = grad_fn(params, rest, batch)
        else:
            # Sum per-micro-batch gradients of the *summed* loss, then divide by the total
            # token count: identical to the large-batch gradient of the mean loss.
            mb = jax.tree.map(lambda x: x.reshape(micro, x.shape[0] // micro, *x.shape[1:]), batch)

            def body(carry, b):
                g_acc, nll_acc, c_acc, n_acc, rest = carry
                (nll, (c, n, rest)), g = grad_fn(params, rest, b)
                return (jax.tree.map(jnp.add, g_acc, g), nll_acc + nll, c_acc + c, n_acc + n, rest), None

            zeros = jax.tree.map(jnp.zeros_like, params)
            (grads, nll, correct, count, rest), _ = jax.lax.scan(
                body, (zeros, 0.0, 0.0, 0.0, rest), mb)
        denom = jnp.maximum(count, 1.0)
        grads = jax.tree.map(lambda g: g / denom, grads)
        loss = nll / denom
        if inject:
            loss = jnp.where(state["step"] + 1 == inject, jnp.nan, loss)
        grad_norm = optax.global_norm(grads)
        updates, opt_state = tx.update(grads, state["opt_state"], params)
        new_params = optax.apply_updates(params, updates)
        # NaN guard: a non-finite step leaves the state untouched and records where it happened.
        ok = jnp.isfinite(loss) & jnp.isfinite(grad_norm) & (state["bad_step"] == 0)
        if host is not None:
            row_grads = jax.tree.map(lambda g: g / denom, row_grads)
            row_norm = optax.global_norm(row_grads)
            ok = ok & jnp.isfinite(row_norm)
            # Row-wise Adam with the moments fetched beside the rows; the memory-values learning
            # rate when set (memory tables train at a constant rate), else the schedule.
            lr = ocfg.memory_values_lr if ocfg.memory_values_lr > 0 else schedule(state["step"])
            treedef = jax.tree.structure(host["rows"])
            flat = {k: treedef.flatten_up_to(host[k]) for k in ("rows", "mu", "nu", "count")}
            upd = [row_adam(r, g, m, n, c, lr=lr, b1=ocfg.b1, b2=ocfg.b2) for r, g, m, n, c in zip(
                flat["rows"], treedef.flatten_up_to(row_grads), flat["mu"], flat["nu"], flat["count"])]
            new_host = {k: treedef.unflatten([jnp.where(ok, u[i], flat[k][j]) for j, u in enumerate(upd)])
                        for i, k in enumerate(("rows", "mu", "nu", "count"))}
        keep = lambda new, old: jax.tree.map(lambda a, b: jnp.where(ok, a, b), new, old)
        new_state = {
            "step": state["step"] + jnp.where(ok, 1, 0),
            "bad_step": jnp.where(ok | (state["bad_step"] > 0), state["bad_step"], state["step"] + 1),
            "params": keep(new_params, params),
            "opt_state": keep(opt_state, state["opt_state"]),
            "rest": keep(rest, state["rest"]),
        }
        metrics = {"loss": loss, "accuracy": correct / denom, "grad_norm": grad_norm,
                   "tokens": count}
        if host is not None:
            metrics["host_grad_norm"] = row_norm
            return new_state, metrics, new_host
        return new_state, metrics

    def eval_step(state, batch, host=None):
        logits, _ = apply(state["params"], state["rest"], batch, host)
        nll, correct, count = masked_xent(logits, batch["targets"], batch["mask"])
        return {"nll": nll, "correct": correct, "count": count}, jnp.argmax(logits, -1)

    rep = NamedSharding(mesh, replicated)
    with jax.set_mesh(mesh), axis_rules(rules):
        init_j = jax.jit(init_fn, out_shardings=state_shardings)
        if has_host:  # (the fetched rows, their moments and indices: replicated step inputs)
            train_j = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding, rep),
                              out_shardings=(state_shardings, rep, rep), donate_argnums=0)
            eval_j = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding, rep),
                             out_shardings=(rep, batch_sharding))
        else:
            train_j = jax.jit(train_step, in_shardings=(state_shardings, batch_sharding),
                              out_shardings=(state_shardings, rep), donate_argnums=0)
            eval_j = jax.jit(eval_step, in_shardings=(state_shardings, batch_sharding),
                             out_shardings=(rep, batch_sharding))
    return Setup(cfg, mesh, graphdef, state_shardings, batch_sharding, tx, init_j, train_j, eval_j,
                 host_modules=host_modules)


def open_host_tables(setup: Setup, root, *, fresh: bool = False) -> HostTables | None:
    """Open (creating what is missing) the store of the model's host tables under ``root`` and
    attach it to ``setup``; ``None`` for a model without host tables. ``fresh``: re-initialise."""
    if not setup.host_modules:
        return None
    if jax.process_count() > 1:
        raise ConfigError("host-resident tables (e.g. hierarchical_memory) run in one process only: the fetch "
                          "plan of a batch is made on one host")
    setup.host = HostTables.open(setup.host_modules, root, fresh=fresh)
    return setup.host


def _need_host(setup: Setup) -> HostTables:
    if setup.host is None:
        raise RuntimeError("the model has host-resident tables: open their store first with "
                           "memjax.train.loop.open_host_tables(setup, root)")
    return setup.host


def to_global(setup: Setup, batch: dict) -> dict:
    """Host batch (this process's rows) -> global sharded arrays."""
    return {k: jax.make_array_from_process_local_data(setup.batch_sharding, np.asarray(batch[k]))
            for k in BATCH_KEYS}


def run_steps(setup: Setup, state, batch):
    """One train step; with host tables: fetch the batch's rows, step, write the updated rows back."""
    if not setup.host_modules:
        with jax.set_mesh(setup.mesh), axis_rules(setup.cfg.mesh.rules):
            return setup.train_step(state, to_global(setup, batch))
    tables = _need_host(setup)
    host, plans = tables.fetch(batch)
    with jax.set_mesh(setup.mesh), axis_rules(setup.cfg.mesh.rules):
        state, metrics, new = setup.train_step(state, to_global(setup, batch), host)
    tables.write(plans, new)  # (a host sync per step: the next batch may need these rows)
    return state, metrics


def evaluate(setup: Setup, state, *, num_batches: int | None = None, task=None) -> dict:
    """Loss, accuracy on scored positions, and the task's own metrics over the eval split."""
    cfg = setup.cfg
    task = task if task is not None else make_task(cfg, "eval")
    ds = make_dataset(cfg, "eval", task=task)
    num_batches = cfg.train.eval_batches if num_batches is None else num_batches
    totals = {"nll": 0.0, "correct": 0.0, "count": 0.0}
    extra: dict[str, list] = {}
    with jax.set_mesh(setup.mesh), axis_rules(cfg.mesh.rules):
        for i, batch in enumerate(ds):
            if i >= num_batches:
                break
            if setup.host_modules:
                host, _ = _need_host(setup).fetch(batch, with_moments=False)
                sums, preds = setup.eval_step(state, to_global(setup, batch),
                                              {"rows": host["rows"], "index": host["index"]})
            else:
                sums, preds = setup.eval_step(state, to_global(setup, batch))
            for k in totals:
                totals[k] += float(sums[k])
            if hasattr(task, "metrics"):
                if jax.process_count() > 1:
                    # Task metrics see the whole global batch: every process gathers all rows
                    # (process order matches the global batch layout built by to_global).
                    from jax.experimental import multihost_utils

                    preds = multihost_utils.process_allgather(preds, tiled=True)
                    batch = {k: multihost_utils.process_allgather(np.asarray(v), tiled=True)
                             for k, v in batch.items()}
                for k, v in task.metrics(batch, np.asarray(preds)).items():
                    extra.setdefault(k, []).append(v)
    if totals["count"] == 0:  # no batch, or no scored position: a 0.0 accuracy would be a lie
        raise ConfigError(
            f"evaluation scored no position: config key 'data.num_eval_examples' "
            f"({cfg.data.num_eval_examples}) must give at least one batch of 'train.batch_size' "
            f"({cfg.train.batch_size}) with answer positions")
    n = totals["count"]
    out = {"loss": totals["nll"] / n, "accuracy": totals["correct"] / n}
    out.update({k: float(np.mean(v)) for k, v in extra.items()})
    return out


# ----------------------------------------------------------------------------- the loop


class _Preemption:
    """SIGTERM sets a flag; the loop saves a checkpoint and returns at the next step."""

    def __init__(self):
        self.requested = False
        self._prev = None

    def __enter__(self):
        try:
            self._prev = signal.signal(signal.SIGTERM, self._handle)
        except ValueError:  # not the main thread: no handler, nothing to restore
            self._prev = None
        return self

    def _handle(self, signum, frame):
        self.requested = True

    def __exit__(self, *exc):
        if self._prev is not None:
            signal.signal(signal.SIGTERM, self._prev)


def _due(step: int, every: int | None) -> bool:
    """A periodic action (``every`` steps; None: off) is due at ``step``."""
    return every is not None and step % every == 0


def train_and_evaluate(cfg: Config, workdir: str, *, allow_changed: tuple[str, ...] = ()) -> dict:
    """Train ``cfg`` in ``workdir`` (resuming from its latest intact checkpoint) and return final eval
    metrics. A resume whose config differs from the run's saved one (``memjax.train.run_record``)
    is refused before anything is built or written, unless the keys are in ``allow_changed``."""
    tcfg = cfg.train
    ckpt_dir = os.path.join(workdir, "checkpoints")
    resuming = bool(steps_on_disk(ckpt_dir))
    changes = run_record.check_same_run(cfg, workdir, allow_changed=allow_changed) if resuming else {}
    setup = build(cfg)
    # Host tables live beside the checkpoints; each checkpoint snapshots them (a fresh start
    # re-initialises rows an earlier, checkpoint-less attempt may have written).
    tables = open_host_tables(setup, tcfg.host_tables_dir or os.path.join(workdir, "host_tables"),
                              fresh=not resuming)
    ckpt = Checkpointer(ckpt_dir, keep=tcfg.keep_checkpoints, every=tcfg.checkpoint_every or 0,
                        async_save=tcfg.async_checkpointing, bank=None if tables is None else tables.bank)
    train_ds = make_dataset(cfg, "train")
    it = iter(train_ds)
    eval_task = make_task(cfg, "eval")

    with jax.set_mesh(setup.mesh):
        state = setup.init_fn()
    start = None
    if resuming:
        state, data_state, start = ckpt.restore(abstract_like(state))
        it.set_state(data_state)
        print(f"resumed from step {start} in {workdir}", flush=True)
    if jax.process_index() == 0 and (not resuming or changes or run_record.saved_config(workdir) is None):
        run_record.record(cfg, workdir, step=start or 0, changes=changes)
    # metrics.jsonl keeps one line per step: lines past the restored step (written before a
    # crash, replayed now) are dropped.
    writer = MetricWriter(workdir, resume_step=start)
    step = int(state["step"])
    n_params = sum(x.size for x in jax.tree.leaves(state["params"]))
    print(f"model: {n_params:,} parameters; pattern {cfg.model.pattern!r} x{cfg.model.pattern_repeat}; "
          f"mesh {dict(setup.mesh.shape)}", flush=True)

    tokens_per_step = tcfg.batch_size * cfg.data.seq_len
    bar = None
    if tcfg.progress and jax.process_index() == 0:
        from tqdm import tqdm

        bar = tqdm(total=tcfg.steps, initial=step, unit="step", dynamic_ncols=True, mininterval=1.0)
    final: dict = {}
    last_eval: dict | None = None
    eval_at = -1  # the step last_eval belongs to
    t_last, step_last = time.perf_counter(), step
    pending = None  # metrics of the last dispatched step (read lazily: no per-step host sync)

    def check_finite(st):
        bad = int(st["bad_step"])
        if bad:
            ckpt.wait()
            good = ckpt.latest_step()
            raise NonFiniteLossError(
                f"non-finite loss or gradient at step {bad}; training stopped. "
                f"Last good checkpoint: step {good} in {ckpt.directory}. "
                "Lower optim.learning_rate or check the data.")

    try:
        with _Preemption() as preempt:
            last = min(tcfg.steps, tcfg.stop_at_step) if tcfg.stop_at_step > 0 else tcfg.steps
            while step < last:
                batch = next(it)
                state, pending = run_steps(setup, state, batch)
                step += 1
                if bar is not None:
                    bar.update(1)
                if _due(step, tcfg.log_every) or step == last:
                    check_finite(state)
                    m = {k: float(v) for k, v in pending.items() if k != "tokens"}
                    now = time.perf_counter()
                    m["tokens_per_sec"] = tokens_per_step * (step - step_last) / max(now - t_last, 1e-9)
                    t_last, step_last = now, step
                    writer.write(step, m, prefix="train/", echo=bar is None)
                    if bar is not None:
                        bar.set_postfix(loss=f"{m['loss']:.4f}", tok_s=f"{m['tokens_per_sec']:.0f}")
                if _due(step, tcfg.eval_every) or step == last:
                    check_finite(state)
                    last_eval, eval_at = evaluate(setup, state, task=eval_task), step
                    writer.write(step, last_eval, prefix="eval/", echo=bar is None)
                    if bar is not None:
                        bar.write(f"[step {step}] eval " + " ".join(f"{k}={v:.4f}" for k, v in last_eval.items()))
                if _due(step, tcfg.checkpoint_every):
                    check_finite(state)
                    ckpt.save(step, state, it.get_state())
                if tcfg.target_accuracy and last_eval and last_eval["accuracy"] >= tcfg.target_accuracy:
                    print(f"reached target accuracy {tcfg.target_accuracy} at step {step}", flush=True)
                    break
                if preempt.requested:
                    check_finite(state)
                    ckpt.save(step, state, it.get_state(), force=True)
                    ckpt.wait()
                    print(f"SIGTERM: saved checkpoint at step {step}; exiting", flush=True)
                    return {"preempted_at": step}
            check_finite(state)
            if ckpt.latest_step() != step:
                ckpt.save(step, state, it.get_state(), force=True)
            if eval_at != step:
                last_eval = evaluate(setup, state, task=eval_task)
                writer.write(step, last_eval, prefix="eval/", echo=False)
            final = {"step": step, **last_eval}
    finally:
        if bar is not None:
            bar.close()
        writer.close()
        ckpt.close()
    if jax.process_index() == 0:
        with open(os.path.join(workdir, "final_metrics.json"), "w") as f:
            json.dump(final, f, indent=2)
    return final
