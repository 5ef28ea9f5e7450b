"""Byte-level LM on the running Python's standard library sources (no download needed).

Held-out files (by path hash, ~10%) form the eval split. 2 attention layers, d=128,
seq 256, 0.56M parameters. On a 2-core CPU (~5k tokens/s) 300 steps take ~4 minutes and
reach eval loss 1.99 nats/byte (from ln 259 = 5.56); the full 2000 steps ~25 minutes. ``--set data.options.tokenizer=bpe``
switches to a BPE trained on the training files (needs ``pip install tokenizers``; also
raise model.vocab_size, e.g. 4096).
"""
from memjax.config import Config
from memjax.data.text_stdlib import stdlib_options


def get_config() -> Config:
    cfg = Config(name="text_stdlib")
    cfg.model.vocab_size = 264  # 259 byte-level ids (256 bytes + BOS, EOS, PAD), padded to a multiple of 8
    cfg.model.d_model = 128
    cfg.model.num_heads = 4
    cfg.model.pattern = "A,F,A,F"
    cfg.model.max_seq_len = 256
    cfg.data.task = "text"
    cfg.data.seq_len = 256
    cfg.data.options = stdlib_options()
    cfg.data.num_train_examples = 0  # 0: every window of the training files
    cfg.data.num_eval_examples = 128  # = eval_batches x batch_size windows, spread over all held-out files
    cfg.optim.learning_rate = 1e-3
    cfg.optim.warmup_steps = 100
    cfg.optim.weight_decay = 0.1
    cfg.train.steps = 2000
    cfg.train.batch_size = 16
    cfg.train.eval_every = 500
    cfg.train.eval_batches = 8
    cfg.train.log_every = 50
    cfg.train.checkpoint_every = 500
    return cfg
