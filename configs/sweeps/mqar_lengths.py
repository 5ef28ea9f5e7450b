"""MQAR at Zoology's longer task sizes with a 4-point learning-rate sweep (CPU-sized).

    python -m benchmarks.sweep --sweep configs/sweeps/mqar_lengths.py --out runs/mqar_lengths
    python -m benchmarks.sweep --sweep configs/sweeps/mqar_lengths.py --out runs/mqar_lengths \
        --blocks A,D --grid 64,256,16          # a subset; finished runs are skipped on rerun

Zoology's Figure 2 pairs ``seq_len`` with the number of pairs: ``(64, 4), (128, 8), (256, 16),
(512, 64)``. This grid keeps its ``T = 256`` row and adds 64 pairs at ``T = 256`` (Zoology's
``4 * num_kv_pairs <= seq_len`` at its limit), at widths 64 and 128; ``configs/sweeps/mqar_blocks.py``
holds the ``T = 64`` points and ``configs/sweeps/zoology_full.py`` the full grid.

Learning rates: 4 log-spaced values, ``logspace(-3, -2, 4)`` = 1e-3, 2.15e-3, 4.6e-3, 1e-2. Zoology
sweeps ``logspace(-4, -2, 4)`` over 64 epochs; with the 1000-step CPU budget here no block learned
MQAR at 1e-4 or 4.6e-4 in our T = 64 runs, so the four points sit in the decade where they do. The
table reports the best accuracy over the four and the sweep's ``lr_sensitivity`` how many of them
come within 0.05 of it (recurrent models solve MQAR only in a narrow learning-rate window).

Trained on its single ``T = 256`` task for 1000 steps, no block left the loss plateau on a 2-core CPU;
``configs/sweeps/mqar_mixture.py`` trains on Zoology's task mixture instead (short tasks included) and
evaluates the same ``T = 256`` points.

Vocabulary 512: MQAR draws keys from the lower half and values from the upper half without
replacement, and memjax's generator needs ``vocab_size > seq_len + 1``; Zoology uses 8192.
Batch 64, 1000 steps, early stop at 0.99, 2 mixer layers without MLPs.
"""

import numpy as np

from benchmarks.sweep import grid_entries

BASE = "configs/mqar_tiny.py"
BLOCKS = ["A", "L", "D", "M2", "G", "DN", "R", "S"]
GRID = [  # (d_model, seq_len, num_kv_pairs)
    (64, 256, 16),
    (64, 256, 64),
    (128, 256, 16),
    (128, 256, 64),
]
LEARNING_RATES = [float(f"{x:.3g}") for x in np.logspace(-3, -2, 4)]  # 0.001, 0.00215, 0.00464, 0.01
STEPS = 1000
VOCAB = 512


def get_sweep(blocks=None, grid=None, learning_rates=None, steps=None):
    return grid_entries(
        base=BASE, blocks=blocks or BLOCKS, grid=grid or GRID, learning_rates=learning_rates or LEARNING_RATES,
        steps=steps or STEPS, block_overrides={}, size_tag="kv",
        task_overrides=lambda seq, kv: [f"model.vocab_size={VOCAB}",
                                        f"data.seq_len={seq}", f"data.options={{'num_kv_pairs': {kv}}}"])
