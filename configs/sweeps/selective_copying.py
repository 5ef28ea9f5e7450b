"""Selective copying (Gu & Dao 2023, Mamba Sec. 3.1) across block types, CPU-sized.

``num_tokens`` symbols (16 possible) sit at random positions among noise tokens; after the
delimiter the model must emit them in order. Mamba uses T = 4096 and 16 tokens; here T = 128
and 8 tokens so a run takes minutes on a CPU. Linear time-invariant memories (``S``, S4D)
cannot select by content, which is what the task isolates; input-dependent ones (``M2``,
``R``, the gated associative memories) can. Every model is 2 mixer layers, no MLP.
Accuracy is per answer token (``sequence_accuracy`` in the run's metrics is whole-sequence).
"""

from benchmarks.sweep import grid_entries

BASE = "configs/mqar_tiny.py"
BLOCKS = ["A", "D", "S", "M2", "R", "E"]
GRID = [(64, 128, 8)]  # (d_model, seq_len, num_tokens)
LEARNING_RATES = [1e-2]
STEPS = 1000
SIZE_KEY = "num_tokens"
METRIC = "selective-copying token accuracy"
WINDOW = 8
BLOCK_OVERRIDES = {  # (label, extra overrides)
    "E": (f"E_w{WINDOW}", [f"model.blocks={{'swa_ssm': {{'window': {WINDOW}}}}}"]),
}


def get_sweep(blocks=None, grid=None, learning_rates=None, steps=None):
    return grid_entries(
        base=BASE, blocks=blocks or BLOCKS, grid=grid or GRID, learning_rates=learning_rates or LEARNING_RATES,
        steps=steps or STEPS, block_overrides=BLOCK_OVERRIDES, size_tag="copy",
        task_overrides=lambda seq, n: ["model.vocab_size=32", "data.task='selective_copying'", f"data.seq_len={seq}",
                                       f"data.options={{'num_tokens': {n}, 'num_symbols': 16}}"])
