"""Miras models (Moneta, Yaad, Memora; matrix memory): chunked vs recurrent, forward + backward,
and a task result on MQAR against the gated delta rule.

    python -m benchmarks.bench_miras             # T in {1024, 2048, 4096}
    python -m benchmarks.bench_miras --quick     # T in {1024}, 1 repeat
    python -m benchmarks.bench_miras --mqar      # MQAR: MON, YAAD, MEMORA vs D at two learning rates

For each model and length: median wall time of one jitted ``value_and_grad`` (loss through the
output and the final state, gradients w.r.t. every input) and XLA's planned temporary memory of
that executable, for the chunked form (gradients at the chunk start, chunk 16) and the
token-by-token recurrent form. The two forms are different algorithms for these nonlinear models
(as for Titans), so this compares costs, not a speed-up at equal output. Shapes: B = 1, H = 2,
K = V = 32, float32. Writes ``benchmarks/results/miras[_quick].json``.

``--mqar``: Zoology's MQAR generator (:class:`memjax.data.mqar.MQAR`), a 2-layer model of one
block type (``model.pattern=X,X``, no MLP, ``configs/mqar_tiny.py`` otherwise), the same width,
length, number of pairs, batch, steps, seed, data and learning-rate grid for every block; AdamW
(weight decay 0.1, gradient clip 1) with linear warm-up and cosine decay, the learning rate fed to
the compiled step so the rates share one compilation. Reports the accuracy of the answers on
held-out examples and the final training loss; ``train_s`` is the wall time of the training loop
(the first rate's includes compiling the step). Writes ``benchmarks/results/miras_mqar.json``.
"""
from __future__ import annotations

import argparse
import math
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

import memjax.nn.miras  # noqa: F401  (registers MON, YAAD, MEMORA)
from benchmarks.runner import Table, loss_and_grad, time_and_memory
from memjax.config import load_config
from memjax.data.mqar import MQAR
from memjax.memory.miras import PRESETS, miras
from memjax.model.lm import LM

B, H, K, V = 1, 2, 32, 32
CHUNK = 16
MODELS = ("moneta", "yaad", "memora")


def _unit(x):
    return x * jax.lax.rsqrt(jnp.sum(x * x, -1, keepdims=True))


def case_of(name):
    spec = PRESETS[name]

    def case(T, mode):
        ks = jax.random.split(jax.random.key(0), 6)
        q, k = _unit(jax.random.normal(ks[0], (2, B, T, H, K)))
        v = jax.random.normal(ks[1], (B, T, H, V))
        eta = 0.5 * jax.nn.sigmoid(jax.random.normal(ks[2], (B, T, H)))
        g = -0.05 * jax.nn.softplus(jax.random.normal(ks[3], (B, T, H)))
        delta = jax.nn.softplus(jax.random.normal(ks[4], (B, T, H)))
        if name == "yaad":
            fn = lambda q, k, v, e, g, d: miras(q, k, v, spec, eta=e, g=g, delta=d, mode=mode, chunk_size=CHUNK)
            return loss_and_grad(fn, tuple(range(6))), (q, k, v, eta, g, delta)
        fn = lambda q, k, v, e, g: miras(q, k, v, spec, eta=e, g=g, mode=mode, chunk_size=CHUNK)
        return loss_and_grad(fn, tuple(range(5))), (q, k, v, eta, g)

    return case


# ----------------------------------------------------------------------------- MQAR task result


def mqar_arrays(*, seq_len: int, kv: int, vocab: int, split: str, n: int, seed: int = 0) -> dict:
    """``n`` MQAR examples stacked: ``inputs``, ``targets`` ``[n, T]`` int32, ``mask`` float32."""
    src = MQAR(MQAR.Options(num_kv_pairs=kv), seq_len=seq_len, vocab_size=vocab, split=split, num_examples=n,
               seed=seed)
    items = [src[i] for i in range(n)]
    return {key: np.stack([it[key] for it in items]) for key in ("inputs", "targets", "mask")}


def train_lm(cfg, lrs, train: dict, evals: dict, *, steps: int, batch: int, warmup: int = 30, seed: int = 0,
             label: str = "") -> list[dict]:
    """Train ``LM(cfg.model)`` from the same initialisation once per learning rate in ``lrs`` on
    ``train`` (cycled in order, ``batch`` rows a step), evaluate on ``evals``: masked cross-entropy
    and argmax accuracy on the masked positions. ``inputs``, ``targets``, ``mask`` ``[N, T]`` and
    optionally ``segment_ids`` (packed documents). One compiled step serves every rate."""
    keys = ("inputs", "targets", "mask") + (("segment_ids",) if "segment_ids" in train else ())
    graphdef, params0, rest = nnx.split(LM(cfg.model, rngs=nnx.Rngs(seed)), nnx.Param, ...)
    tx = optax.chain(optax.clip_by_global_norm(1.0),
                     optax.inject_hyperparams(optax.adamw)(learning_rate=1.0, weight_decay=0.1))

    def loss_fn(params, x, y, m, seg=None):
        logits = nnx.merge(graphdef, params, rest)(x, segment_ids=seg).astype(jnp.float32)
        nll = -jnp.take_along_axis(jax.nn.log_softmax(logits), y[..., None], -1)[..., 0]
        hit = (jnp.argmax(logits, -1) == y).astype(jnp.float32)
        return jnp.sum(nll * m) / jnp.sum(m), jnp.sum(hit * m) / jnp.sum(m)

    @jax.jit
    def step(params, opt_state, lr, x, y, m, seg=None):
        (loss, _), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, x, y, m, seg)
        opt_state[1].hyperparams["learning_rate"] = lr
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    evaluate = jax.jit(loss_fn)
    n = train["inputs"].shape[0]
    rows = []
    for lr in lrs:
        params, opt_state = params0, tx.init(params0)
        t0, losses = time.perf_counter(), []
        for i in range(steps):
            sched = lr * min(1.0, (i + 1) / warmup) * 0.5 * (1.0 + math.cos(math.pi * i / steps))
            sl = slice((i * batch) % n, (i * batch) % n + batch)
            params, opt_state, loss = step(params, opt_state, jnp.float32(sched),
                                           *(jnp.asarray(train[key][sl]) for key in keys))
            if i % max(steps // 5, 1) == 0 or i == steps - 1:
                losses.append((i, round(float(loss), 4)))
        train_s = time.perf_counter() - t0
        ev = [evaluate(params, *(jnp.asarray(evals[key][j:j + batch]) for key in keys))
              for j in range(0, evals["inputs"].shape[0], batch)]
        row = {"block": label, "lr": lr, "eval_loss": float(np.mean([float(a) for a, _ in ev])),
               "accuracy": float(np.mean([float(b) for _, b in ev])), "final_train_loss": losses[-1][1],
               "losses": losses, "train_s": round(train_s, 1),
               "params": int(sum(x.size for x in jax.tree.leaves(params0)))}
        print(f"  {label} lr {lr:g}: accuracy {row['accuracy']:.3f}, eval loss {row['eval_loss']:.3f}, "
              f"{row['train_s']} s", flush=True)
        rows.append(row)
    return rows


MQAR_BLOCKS = {"MON": "MON", "YAAD": "YAAD", "YAAD_d6": "YAAD", "MEMORA": "MEMORA", "D": "D", "titans_mag_w8": "MAG"}
# YAAD_d6: Yaad with the threshold's bias initialised at 6 (delta ~ 6, the l2 branch at the start;
# see memjax.nn.miras.Yaad)
MQAR_BLOCK_OPTS = {"titans_mag_w8": {"titans_mag": {"window": 8}}, "YAAD_d6": {"yaad": {"delta_bias_init": 6.0}}}


def run_mqar(args) -> None:
    vocab = 128
    train = mqar_arrays(seq_len=args.seq_len, kv=args.kv, vocab=vocab, split="train", n=args.steps * args.batch)
    evals = mqar_arrays(seq_len=args.seq_len, kv=args.kv, vocab=vocab, split="eval", n=args.eval_examples)
    table = Table("miras_mqar", ["block", "lr", "accuracy", "eval_loss", "final_train_loss", "params", "train_s"],
                  out_dir=args.out_dir)
    for label in args.blocks:
        pattern = MQAR_BLOCKS[label]
        cfg = load_config("configs/mqar_tiny.py", [
            f"model.pattern={pattern},{pattern}", f"model.d_model={args.d_model}", "model.num_heads=2",
            f"model.vocab_size={vocab}", f"model.blocks={MQAR_BLOCK_OPTS.get(label, {})!r}",
            f"data.seq_len={args.seq_len}", f"data.options={{'num_kv_pairs': {args.kv}}}"])
        t0 = time.perf_counter()
        rows = train_lm(cfg, args.lrs, train, evals, steps=args.steps, batch=args.batch, label=label)
        for r in rows:
            table.add(r)
        print(f"  ({label}: {time.perf_counter() - t0:.0f} s with compilation)", flush=True)
    return table.finish({"task": "MQAR", "d_model": args.d_model, "seq_len": args.seq_len, "num_kv_pairs": args.kv,
                  "vocab": vocab, "steps": args.steps, "batch": args.batch, "eval_examples": args.eval_examples,
                  "note": "2 layers of one block, no MLP; Miras blocks chunked (chunk 16); same data, seed and "
                          "steps for every block"})


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("--mqar", action="store_true", help="the MQAR task result instead of the timings")
    ap.add_argument("--blocks", nargs="*", default=["MON", "YAAD", "MEMORA", "D"], choices=list(MQAR_BLOCKS))
    ap.add_argument("--lrs", nargs="*", type=float, default=[3e-3, 1e-2])
    ap.add_argument("--d-model", type=int, default=64)
    ap.add_argument("--seq-len", type=int, default=32)
    ap.add_argument("--kv", type=int, default=4)
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--eval-examples", type=int, default=256)
    ap.add_argument("--out-dir", default=None, help="where the JSON goes (default benchmarks/results)")
    ap.add_argument("--quick", action="store_true", help="T in {1024}, 1 repeat")
    ap.add_argument("--models", nargs="*", default=list(MODELS), choices=list(MODELS))
    ap.add_argument("--lengths", nargs="*", type=int, default=None, help="override the sequence lengths")
    ap.add_argument("--repeats", type=int, default=None)
    args = ap.parse_args(argv)
    if args.mqar:
        return run_mqar(args)
    lengths = args.lengths or ((1024,) if args.quick else (1024, 2048, 4096))
    repeats = args.repeats or (1 if args.quick else 3)
    cols = ["model", "T", "chunked_ms", "recurrent_ms", "speedup", "chunked_temp_MiB", "recurrent_temp_MiB"]
    table = Table("miras_quick" if args.quick else "miras", cols)
    for name in args.models:
        for T in lengths:
            c_ms, c_mem = time_and_memory(case_of(name), T, "chunked", repeats)
            r_ms, r_mem = time_and_memory(case_of(name), T, "recurrent", repeats)
            table.add({"model": name, "T": T, "chunked_ms": c_ms, "recurrent_ms": r_ms, "speedup": r_ms / c_ms,
                       "chunked_temp_MiB": c_mem, "recurrent_temp_MiB": r_mem})
    table.finish({"what": "forward + backward (value_and_grad), median wall time; temp memory of the executable",
                  "shapes": {"B": B, "H": H, "K": K, "V": V, "chunk": CHUNK},
                  "note": "matrix memory; chunked = gradients at the chunk start (Titans-style), a different "
                          "algorithm from recurrent for these nonlinear models"})


if __name__ == "__main__":
    main()
