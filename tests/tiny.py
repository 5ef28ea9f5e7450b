"""Small configs shared by the training tests."""
from memjax.config import Config


def tiny_config(pattern: str = "A,A", **train) -> Config:
    cfg = Config(name="tiny")
    cfg.model.vocab_size = 64
    cfg.model.d_model = 32
    cfg.model.num_heads = 2
    cfg.model.pattern = pattern
    cfg.data.seq_len = 32
    cfg.data.options = {"num_kv_pairs": 4}
    cfg.data.num_train_examples = 2_000
    cfg.data.num_eval_examples = 64
    cfg.optim.learning_rate = 3e-3
    cfg.optim.warmup_steps = 5
    cfg.train.batch_size = 16
    cfg.train.steps = 8
    cfg.train.eval_every = 1000
    cfg.train.eval_batches = 2
    cfg.train.log_every = 4
    cfg.train.checkpoint_every = 4
    cfg.train.progress = False
    for k, v in train.items():
        setattr(cfg.train, k, v)
    return cfg
