"""State tracking: which recurrent memories learn parity, and do they keep it at longer lengths?

    python -m benchmarks.bench_state_tracking                       # parity, every block below
    python -m benchmarks.bench_state_tracking --task word_problem --group S3 --blocks DN,DN_neg
    python -m benchmarks.bench_state_tracking --steps 300 --blocks DN_neg   # a quick look

Each block is trained alone (one mixer layer of it, ``d_model=64``, no MLP) on the running task
at length ``--seq-len``, then evaluated by ``memjax-eval``'s length extrapolation at 1x, 2x and
4x that length (same parameters; per-position accuracy, every position scored). The published
ordering (Grazzi et al., ICLR 2025; Siems et al. 2025): a delta rule whose ``beta`` reaches
``(0, 2]`` (transition eigenvalues in ``[-1, 1]``) and DeltaProduct with ``n_h >= 2`` solve
parity; ``beta in (0, 1)`` and diagonal non-negative decays (GLA, Mamba-2) do not; attention
fits the training length but does not extrapolate.

Writes ``<out>/results.json`` and prints a Markdown table. Finished runs are skipped on rerun.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import time

from memjax.config import load_config
from memjax.train.evaluate import evaluate_checkpoint
from memjax.train.loop import train_and_evaluate

BASE = "configs/mqar_tiny.py"

# label -> (pattern, model.blocks overrides)
BLOCKS = {
    "A": ("A", {}),
    "G": ("G", {}),
    "M2": ("M2", {}),
    "DN": ("DN", {}),
    "DN_neg": ("DN", {"deltanet": {"allow_neg_eigval": True}}),
    "D_neg": ("D", {"gated_deltanet": {"allow_neg_eigval": True}}),
    "DP2_neg": ("gated_deltaproduct", {"gated_deltaproduct": {"allow_neg_eigval": True, "num_householder": 2}}),
    "M3": ("M3", {}),  # Mamba-3: data-dependent rotations (complex eigenvalues) on half the state
    # Mamba-3 whose step sizes start in [0.5, 2] instead of [1e-3, 0.1]: the rotation per token is
    # dt * theta with |theta| <= pi, so parity's rotation by pi needs dt >= 1 (a probe of why M3 fails)
    "M3_dt": ("M3", {"mamba3": {"dt_min": 0.5, "dt_max": 2.0}}),
    "M3_dt_full": ("M3", {"mamba3": {"dt_min": 0.5, "dt_max": 2.0, "rope_fraction": 1.0}}),
    "R7": ("R7", {}),  # RWKV-7: DPLR transition
    "R": ("R", {}),  # RG-LRU: real diagonal decay in (0, 1)
    "PG": ("PG", {}),  # ParaRNN GRU: a nonlinear recurrence
    "KDA_neg": ("KDA", {"kda": {"allow_neg_eigval": True}}),  # delta rule with per-channel decay, beta in (0, 2)
    "mL": ("mL", {}),  # mLSTM: sigmoid forget gate, exponential input gate
    "GDN2_neg": ("GDN2", {"gdn2": {"allow_neg_eigval": True}}),  # channel-wise erase gate in (0, 2)
    "GV": ("GV", {}),  # GLA with per-key-channel decay
    "LLD_neg": ("LLD", {"log_linear_gdn": {"allow_neg_eigval": True}}),  # log-linear gated delta rule, beta in (0, 2)
    "LLM2": ("LLM2", {}),  # log-linear Mamba-2
    "PL": ("PL", {}),  # ParaRNN LSTM: a nonlinear recurrence
    "YAAD": ("YAAD", {}),  # Miras: Huber attentional bias, learned retention
    "MoM": ("MoM", {}),  # mixture of memories (routed linear-attention memories)
    "MAG": ("MAG", {}),  # Titans, memory as a gate (sliding-window attention + neural memory)
    "L": ("L", {}),  # linear attention: no decay, no delta rule
    "S": ("S", {}),  # S4D: linear time-invariant diagonal SSM
}


def overrides(pattern, blocks, *, task, group, seq_len, steps, lr, batch_size):
    task_opts = {"group": group} if task == "word_problem" else {}
    return [
        f"model.pattern={pattern}", "model.d_model=64", "model.num_heads=2", "model.vocab_size=128",
        f"model.blocks={blocks!r}", f"data.task='{task}'", f"data.seq_len={seq_len}",
        f"data.options={task_opts!r}", f"optim.learning_rate={lr}", f"train.steps={steps}",
        f"train.batch_size={batch_size}", "train.eval_every=100000", "train.log_every=100000",
        "train.checkpoint_every=100000", "train.progress=False", "train.target_accuracy=0.0",
    ]


def run(labels, out, **kw):
    os.makedirs(out, exist_ok=True)
    rows = []
    for label in labels:
        path = os.path.join(out, label, "row.json")
        if os.path.exists(path):
            rows.append(json.load(open(path)))
            continue
        pattern, blocks = BLOCKS[label]
        cfg = load_config(BASE, overrides(pattern, blocks, **kw))
        workdir = os.path.join(out, label)
        t0 = time.perf_counter()
        with contextlib.redirect_stdout(io.StringIO()):
            train_and_evaluate(cfg, workdir)
            metrics = evaluate_checkpoint(cfg, workdir, length_multiples=(1, 2, 4))
        row = {"block": label, "pattern": pattern, "blocks": blocks, "task": kw["task"], "group": kw["group"],
               "seq_len": kw["seq_len"], "steps": kw["steps"], "lr": kw["lr"],
               "accuracy": {"1x": metrics["accuracy"], "2x": metrics.get("len_x2/accuracy"),
                            "4x": metrics.get("len_x4/accuracy")},
               "wall_s": round(time.perf_counter() - t0, 1)}
        print(json.dumps(row), flush=True)
        with open(path, "w") as f:
            json.dump(row, f, indent=2)
        rows.append(row)
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump(rows, f, indent=2)
    return rows


def table(rows) -> str:
    fmt = lambda x: "" if x is None else f"{x:.3f}"
    t = rows[0]["seq_len"]
    lines = [f"| block | T={t} (trained) | T={2 * t} | T={4 * t} |", "|---|---|---|---|"]
    for r in rows:
        a = r["accuracy"]
        lines.append(f"| {r['block']} | {fmt(a['1x'])} | {fmt(a['2x'])} | {fmt(a['4x'])} |")
    return "\n".join(lines)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--task", default="parity", choices=["parity", "word_problem"])
    p.add_argument("--group", default="S3")
    p.add_argument("--blocks", default=",".join(BLOCKS))
    p.add_argument("--seq-len", type=int, default=64)
    p.add_argument("--steps", type=int, default=1500)
    p.add_argument("--lr", type=float, default=3e-3)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None)
    a = p.parse_args(argv)
    labels = [b.strip() for b in a.blocks.split(",") if b.strip()]
    unknown = [b for b in labels if b not in BLOCKS]
    if unknown:
        p.error(f"--blocks: unknown {unknown}; expected some of {sorted(BLOCKS)}")
    out = a.out or os.path.join("runs", f"state_tracking_{a.task}" + (f"_{a.group}" if a.task == "word_problem" else ""))
    rows = run(labels, out, task=a.task, group=a.group, seq_len=a.seq_len, steps=a.steps, lr=a.lr,
               batch_size=a.batch_size)
    print(table(rows))


if __name__ == "__main__":
    main()
