"""MQAR across block types, widths and numbers of key-value pairs (Zoology-style grid, CPU-sized).

Each entry: ``(name, base config, overrides, label)``. Every model is 2 mixer layers, no MLP, as in
Zoology. Zoology sweeps the learning rate over ``logspace(-4, -2, 4)`` and reports the best;
on a 2-core CPU we sweep the top of that range (``LEARNING_RATES``), where every block here
learned fastest in our runs. Zoology's grid grows ``seq_len`` with the number of pairs; to keep
each run within minutes on a CPU we hold ``seq_len = 64`` (4 and 8 pairs both fit Zoology's
``4 * num_kv_pairs <= seq_len`` rule).

The two hybrids get a sliding window of 8 tokens, shorter than the 8-32 tokens of key-value
context, so recall must come from their recurrent memory rather than from exact attention.
"""

from benchmarks.sweep import grid_entries

BASE = "configs/mqar_tiny.py"
BLOCKS = ["A", "L", "G", "DN", "D", "titans_mag", "mom", "S", "M2", "R", "E"]
GRID = [  # (d_model, seq_len, num_kv_pairs): two task sizes at d=64, two widths at 8 pairs
    (64, 64, 4),
    (64, 64, 8),
    (128, 64, 8),
]
LEARNING_RATES = [1e-2, 3e-3]
STEPS = 1000
WINDOW = 8
BLOCK_OVERRIDES = {  # (label, extra overrides)
    "titans_mag": (f"titans_mag_w{WINDOW}", [f"model.blocks={{'titans_mag': {{'window': {WINDOW}}}}}"]),
    "E": (f"E_w{WINDOW}", [f"model.blocks={{'swa_ssm': {{'window': {WINDOW}}}}}"]),
}


def get_sweep(blocks=None, grid=None, learning_rates=None, steps=None):
    return grid_entries(
        base=BASE, blocks=blocks or BLOCKS, grid=grid or GRID, learning_rates=learning_rates or LEARNING_RATES,
        steps=steps or STEPS, block_overrides=BLOCK_OVERRIDES, size_tag="kv",
        task_overrides=lambda seq, kv: ["model.vocab_size=256", f"data.seq_len={seq}",
                                        f"data.options={{'num_kv_pairs': {kv}}}"])
