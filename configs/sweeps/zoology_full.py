"""Zoology's full MQAR grid (Arora et al. 2023, "Zoology", Figure 2), for machines larger than a laptop.

    python -m benchmarks.sweep --sweep configs/sweeps/zoology_full.py --out runs/zoology_full
    python -m benchmarks.sweep --sweep configs/sweeps/zoology_full.py --out runs/zoology_full \
        --blocks A,D --grid 64,64,4

The grid of the Zoology code (``zoology/experiments/paper_configs/iclr24_zoology_figure2/configs.py``):
``(seq_len, num_kv_pairs)`` in ``(64, 4), (128, 8), (256, 16), (512, 64)``, ``d_model`` in
``64, 128, 256, 512``, learning rates ``logspace(-4, -2, 4)``, vocabulary 8192, 100 000 training
and 3 000 test examples, batch size 512 (T <= 128), 256 (T = 256), 128 (T = 512), 64 epochs
(``train.steps = 64 * 100 000 / batch``), 2 mixer layers, no MLP, and ``random_non_queries=False``
(filler positions are token 0, as in that config). The table keeps the best learning rate per point
(``benchmarks.sweep.best_over_lr``); runs stop early at 0.99 accuracy. Zoology's attention uses
dropout 0.1 and one head; memjax's blocks keep their defaults (no dropout). 12 blocks x 16 points
x 4 learning rates = 768 runs of up to 12 500 steps: GPU hours, not CPU hours.
"""

import numpy as np

from benchmarks.sweep import grid_entries

BASE = "configs/mqar_tiny.py"
BLOCKS = ["A", "CA", "L", "G", "DN", "D", "titans_mag", "mom", "S", "M2", "R", "E"]
TASKS = [(64, 4), (128, 8), (256, 16), (512, 64)]  # (seq_len, num_kv_pairs), Zoology Figure 2
WIDTHS = [64, 128, 256, 512]
GRID = [(d, t, kv) for t, kv in TASKS for d in WIDTHS]  # (d_model, seq_len, num_kv_pairs)
LEARNING_RATES = [float(x) for x in np.logspace(-4, -2, 4)]  # 1e-4, 4.6e-4, 2.15e-3, 1e-2
VOCAB = 8192
NUM_TRAIN, NUM_TEST, EPOCHS = 100_000, 3_000, 64
WINDOW = 8
BLOCK_OVERRIDES = {  # (label, extra overrides)
    "titans_mag": (f"titans_mag_w{WINDOW}", [f"model.blocks={{'titans_mag': {{'window': {WINDOW}}}}}"]),
    "E": (f"E_w{WINDOW}", [f"model.blocks={{'swa_ssm': {{'window': {WINDOW}}}}}"]),
    # Zoology's attention model itself: a gated short conv layer, then one-head attention
    "CA": ("CA", ["model.pattern=C,A", "model.num_heads=1"]),
}


def batch_size(seq_len: int) -> int:
    """Zoology's batch size for a sequence length."""
    return 64 if seq_len >= 1024 else 128 if seq_len >= 512 else 256 if seq_len >= 256 else 512


def epoch_steps(seq_len: int) -> int:
    """``EPOCHS`` passes over the ``NUM_TRAIN`` examples at Zoology's batch size."""
    return EPOCHS * NUM_TRAIN // batch_size(seq_len)


def get_sweep(blocks=None, grid=None, learning_rates=None, steps=None):
    """``steps``: one step count for every run instead of Zoology's 64 epochs."""
    def task(seq, kv):
        return [f"model.vocab_size={VOCAB}", f"model.max_seq_len={max(seq, 2048)}", f"data.seq_len={seq}",
                f"data.options={{'num_kv_pairs': {kv}, 'random_non_queries': False}}",
                f"data.num_train_examples={NUM_TRAIN}", f"data.num_eval_examples={NUM_TEST}",
                f"train.batch_size={batch_size(seq)}", f"train.eval_batches={-(-NUM_TEST // batch_size(seq))}"]

    entries = grid_entries(base=BASE, blocks=blocks or BLOCKS, grid=grid or GRID,
                           learning_rates=learning_rates or LEARNING_RATES, steps=steps or 1,
                           block_overrides=BLOCK_OVERRIDES, size_tag="kv", task_overrides=task)
    if steps:
        return entries
    # grid_entries gives every run one step count; Zoology trains 64 epochs, which depends on T.
    out = []
    for name, base, overrides, label in entries:
        seq = int(next(o for o in overrides if o.startswith("data.seq_len=")).split("=", 1)[1])
        out.append((name, base, overrides + [f"train.steps={epoch_steps(seq)}", "train.eval_every=1000"], label))
    return out
