"""Tiny MQAR run for a laptop CPU: 2-layer attention, Zoology-style MQAR (seq 64, 4 pairs)."""
from memjax.config import Config


def get_config() -> Config:
    cfg = Config(name="mqar_tiny")
    cfg.model.vocab_size = 256
    cfg.model.d_model = 64
    cfg.model.num_heads = 2
    cfg.model.pattern = "A,A"  # Zoology MQAR: two mixer layers, no MLP
    cfg.data.task = "mqar"
    cfg.data.seq_len = 64
    cfg.data.options = {"num_kv_pairs": 4}
    cfg.data.num_train_examples = 100_000
    cfg.data.num_eval_examples = 1_000
    cfg.optim.learning_rate = 3e-3
    cfg.optim.warmup_steps = 50
    cfg.optim.weight_decay = 0.1
    cfg.train.steps = 1000
    cfg.train.batch_size = 64
    cfg.train.eval_every = 200
    cfg.train.eval_batches = 8
    cfg.train.log_every = 50
    cfg.train.checkpoint_every = 200
    cfg.train.target_accuracy = 0.0  # run all steps (set 0.99 for Zoology-style early stopping)
    return cfg
