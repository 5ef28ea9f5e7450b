"""MQAR at ``T = 256`` trained on Zoology's task mixture, evaluated on one long task (CPU-sized).

    python -m benchmarks.sweep --sweep configs/sweeps/mqar_mixture.py --out runs/mqar_mixture
    python -m benchmarks.sweep --sweep configs/sweeps/mqar_mixture.py --out runs/mqar_mixture \
        --blocks A,D --grid 64,256,16 --lrs 0.01        # a subset; finished runs are skipped on rerun

Trained on a single ``T = 256`` task for 1000 steps (``configs/sweeps/mqar_lengths.py``), no block
left the loss plateau on this CPU. Zoology's Based-paper MQAR sweep
(``zoology/experiments/paper_configs/arxiv24_based_figure2/configs.py``) trains every model on a
mixture instead: ``(T, pairs) = (64, 4)`` with 100 000 examples and ``(128, 8)``, ``(256, 16)``,
``(256, 32)``, ``(256, 64)`` with 20 000 each, and tests each task separately. Here the same
mixture, weighted by those example counts, fills the training rows (``data.options.train_mixture``:
a row of 256 positions packs 4 examples of ``(64, 4)``, 2 of ``(128, 8)`` or 1 of a 256-task, one
segment each), and the run is evaluated on the grid point's own ``(256, pairs)`` task.

Learning rates ``logspace(-3, -2, 4)`` as in ``mqar_lengths.py`` (Zoology's sweep there is
``logspace(-3, -1.5, 4)``); vocabulary 512 (Zoology: 8192; memjax's generator needs
``vocab_size > seq_len + 1``), batch 64, at most 2000 steps, early stop at 0.99, 2 mixer layers
without MLPs.
"""

import numpy as np

from benchmarks.sweep import grid_entries

BASE = "configs/mqar_tiny.py"
BLOCKS = ["A", "CA", "L", "D", "M2", "G", "DN", "R", "S"]
# Zoology's attention model: a gated short conv layer, then one-head attention (Hybrid([BaseConv, MHA])
# over 2 layers in its configs); "A" is memjax's attention in both layers (2 heads, RoPE, no conv).
BLOCK_OVERRIDES = {"CA": ("CA", ["model.pattern=C,A", "model.num_heads=1"])}
GRID = [  # (d_model, seq_len, num_kv_pairs of the evaluated task)
    (64, 256, 16),
    (64, 256, 64),
    (128, 256, 16),
    (128, 256, 64),
]
# (length, num_kv_pairs, weight): Zoology's training tasks, weighted by their example counts.
MIXTURE = ((64, 4, 100_000), (128, 8, 20_000), (256, 16, 20_000), (256, 32, 20_000), (256, 64, 20_000))
LEARNING_RATES = [float(f"{x:.3g}") for x in np.logspace(-3, -2, 4)]  # 0.001, 0.00215, 0.00464, 0.01
STEPS = 2000
VOCAB = 512


def get_sweep(blocks=None, grid=None, learning_rates=None, steps=None):
    def task(seq, kv):
        mixture = tuple((min(length, seq), pairs, w) for length, pairs, w in MIXTURE)
        return [f"model.vocab_size={VOCAB}", f"data.seq_len={seq}",
                f"data.options={{'num_kv_pairs': {kv}, 'train_mixture': {mixture!r}}}"]

    return grid_entries(
        base=BASE, blocks=blocks or BLOCKS, grid=grid or GRID, learning_rates=learning_rates or LEARNING_RATES,
        steps=steps or STEPS, block_overrides=BLOCK_OVERRIDES, size_tag="kv", task_overrides=task)
