"""MQAR across block types, widths and numbers of key-value pairs (Zoology-style grid, CPU-sized).

Each entry: (name, base config, overrides). Every model is 2 mixer layers, no MLP, as in Zoology.
Zoology sweeps the learning rate and reports the best; ``LEARNING_RATES`` does that here.
"""

BASE = "configs/mqar_tiny.py"
BLOCKS = ["A", "L", "G", "DN", "D", "titans_mag", "mom", "S", "M2", "R", "E"]
GRID = [  # (d_model, seq_len, num_kv_pairs)
    (64, 64, 4),
    (64, 128, 8),
    (128, 128, 8),
]
LEARNING_RATES = [3e-3]
STEPS = 1000


def get_sweep(blocks=None, grid=None, learning_rates=None, steps=None):
    entries = []
    for block in blocks or BLOCKS:
        for d, seq, kv in grid or GRID:
            for lr in learning_rates or LEARNING_RATES:
                name = f"{block}_d{d}_T{seq}_kv{kv}_lr{lr:g}"
                entries.append((name, BASE, [
                    f"model.pattern={block},{block}", f"model.d_model={d}", "model.vocab_size=256",
                    f"data.seq_len={seq}", f"data.options={{'num_kv_pairs': {kv}}}",
                    f"optim.learning_rate={lr}", f"train.steps={steps or STEPS}",
                    "train.eval_every=200", "train.target_accuracy=0.99", "train.progress=False",
                    "train.log_every=100", "train.checkpoint_every=100000",
                ]))
    return entries
