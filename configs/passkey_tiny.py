"""Pass-key retrieval (needle in a haystack) for a laptop CPU: 2-layer attention, T = 128.

Trained with the needle at a random depth; ``memjax-eval --needle-grid`` then measures accuracy
over context length (1x, 2x, 4x the training length) and needle depth.
"""
from memjax.config import Config


def get_config() -> Config:
    cfg = Config(name="passkey_tiny")
    cfg.model.vocab_size = 64
    cfg.model.d_model = 64
    cfg.model.num_heads = 4
    cfg.model.pattern = "A,A"
    cfg.model.max_seq_len = 1024
    cfg.data.task = "passkey"
    cfg.data.seq_len = 128
    cfg.data.options = {"key_length": 5, "key_symbols": 10, "depth": -1.0}
    cfg.data.num_train_examples = 100_000
    cfg.data.num_eval_examples = 512
    cfg.optim.learning_rate = 5e-3
    cfg.optim.warmup_steps = 50
    cfg.train.steps = 2000
    cfg.train.batch_size = 32
    cfg.train.eval_every = 500
    cfg.train.eval_batches = 8
    cfg.train.log_every = 100
    cfg.train.checkpoint_every = 500
    return cfg
