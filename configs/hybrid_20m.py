"""A ~20M-parameter hybrid LM (attention + gated delta rule + Mamba-2 + memory layer) on text.

Used by the throughput benchmark (``python -m benchmarks.bench_train --config configs/hybrid_20m.py``);
trains on the Python standard library sources like configs/text_stdlib.py.
"""
from memjax.config import Config
from memjax.data.text_stdlib import stdlib_options


def get_config() -> Config:
    cfg = Config(name="hybrid_20m")
    m = cfg.model
    m.vocab_size = 259  # bytes + BOS / EOS / PAD
    m.d_model = 512
    m.num_heads = 8
    m.pattern = "A,F,D,F,M2,F,A,M"
    m.max_seq_len = 4096
    m.blocks = {"memory_plus": {}}
    cfg.data.task = "text"
    cfg.data.seq_len = 512
    cfg.data.options = stdlib_options()
    cfg.optim.learning_rate = 1e-3
    cfg.optim.memory_values_lr = 1e-3
    cfg.train.steps = 2000
    cfg.train.batch_size = 16
    cfg.train.eval_every = 500
    cfg.train.checkpoint_every = 500
    return cfg
