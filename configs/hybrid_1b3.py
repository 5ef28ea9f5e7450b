"""A ~1.3B-parameter hybrid LM for TPU pod slices: gated DeltaNet, attention and Memory+ layers.

1.32B parameters (1.15B in matmul kernels, 67M embedding, 101M memory values). 24 mixer layers
in 6 scanned groups (``model.pattern_repeat = 6``; compile time does not grow with depth): three
gated DeltaNet mixers (``D``) per full-attention mixer (``A``), the 3:1 linear-to-full ratio of
recent published hybrids, and in each group one Memory+ layer (``M``, Memory Layers at Scale) in
place of an FFN::

    [D F D F D M A F] x 6        18 D, 6 A, 18 F, 6 M

d_model 2048, 16 heads of 128, SwiGLU hidden 5632 (2.75 d), vocab 32768 (tied embeddings),
sequence 4096; Memory+ reads 4 heads x 16 slots of a 128^2 = 16384-slot table per memory layer
(values 1024 wide: 16.8M per layer). bf16 activations and matmuls, float32 parameters and AdamW
state, sharded over ``mesh.fsdp`` (every device; batch over ``(data, fsdp)``).

Global batch 256 x 4096 = 1M tokens per step. Data: byte-level text of the running Python's
standard library (no download; set ``data.options.path`` to your corpus and ``model.vocab_size``
to match a tokenizer).

Plans (``memjax-compile --config configs/hybrid_1b3.py --topology v5p-64``, ``v5e-256``) are in
the README.
"""
from memjax.config import Config
from memjax.data.text_stdlib import stdlib_options


def get_config() -> Config:
    cfg = Config(name="hybrid_1b3")
    m = cfg.model
    m.vocab_size = 32768
    m.d_model = 2048
    m.num_heads = 16
    m.mlp_hidden = 5632
    m.pattern = "D,F,D,F,D,M,A,F"
    m.pattern_repeat = 6
    m.max_seq_len = 4096
    m.compute_dtype = "bfloat16"
    m.param_dtype = "float32"
    m.remat = "full"  # dots_no_batch plans 98.4 GiB per device on v5p-64 and 16.2 GiB on v5e-256
    m.blocks = {
        "gated_deltanet": {"chunk_size": 64},
        "memory_plus": {"n_keys": 128, "heads": 4, "knn": 16, "k_dim": 512, "value_dim": 1024},
    }
    cfg.data.task = "text"
    cfg.data.seq_len = 4096
    cfg.data.options = stdlib_options()
    cfg.data.num_train_examples = 0
    cfg.data.num_eval_examples = 256
    cfg.mesh.data = 1
    cfg.mesh.fsdp = -1
    cfg.optim.learning_rate = 3e-4
    cfg.optim.warmup_steps = 2000
    cfg.optim.memory_values_lr = 1e-3
    cfg.train.steps = 100_000
    cfg.train.batch_size = 256
    cfg.train.eval_every = 2000
    cfg.train.checkpoint_every = 1000
    return cfg
