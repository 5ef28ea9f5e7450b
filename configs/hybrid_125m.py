"""A ~125M-parameter hybrid LM for the GPU training-throughput benchmark (``benchmarks/gpu_train.py``).

12 mixer layers, each followed by a gated MLP: gated DeltaNet (``D``) mixers with full causal
attention (``A``) at every fourth mixer, and one Memory+ layer (``M``) after the sixth mixer's MLP::

    [D F D F D F A F] [D F D F M D F A F] [D F D F D F A F]      (9 D, 3 A, 12 F, 1 M)

d_model 768, 12 heads of 64, SwiGLU hidden 2048 (8/3 d), vocab 32768 (tied embeddings), seq 2048.
bf16 activations and matmuls (``model.compute_dtype``; parameters and AdamW state stay float32:
``model.param_dtype`` is float32 and no layer reads it yet). Memory+ reads 4 heads x 8 slots from a
128^2 = 16384 x 768 value table (12.6M parameters), with 256-wide product keys.

Batch: 16 x 2048 = 32768 tokens per step, as two gradient-accumulation micro-batches of 8 x 2048
(``train.microbatches = 2``): XLA:CPU plans 92 GiB of temporaries for one 16 x 2048 step
(47 GiB for 8 x 2048, mostly fp32 logits / attention probabilities / delta-rule intermediates),
more than an 80 GB H100 holds. Override with ``--set train.batch_size=8 train.microbatches=1``
(or the benchmark's ``--batch``).

Parameter counts (computed with ``nnx.eval_shape`` by ``benchmarks.gpu_train.param_counts``;
checked in tests/test_gpu_train_script.py):

    total                                          130,358,808
    input embedding (tied with the LM head)         25,165,824   (32768 x 768)
    memory-layer values                             12,582,912   (16384 x 768)
    total - embedding - memory values               92,610,072
    matmul parameters (Linear kernels + tied LM head; the FLOP count's N)
                                                   117,540,864

Model FLOPs per token at seq 2048 (``benchmarks.gpu_train.flops_per_token``, fwd + bwd):
756.7M = 6N 705.2M + attention 28.3M (3 layers) + gated delta rule 22.2M (9 layers, C = 64)
+ memory key scoring 0.79M + memory read 0.15M; 24.8 TFLOP per 32768-token step.

The data are synthetic (Zoology MQAR, 64 key-value pairs, generated from a seed: no files):
the throughput benchmark does not depend on what the tokens are.
"""
from memjax.config import Config


def get_config() -> Config:
    cfg = Config(name="hybrid_125m")
    m = cfg.model
    m.vocab_size = 32768
    m.d_model = 768
    m.num_heads = 12
    m.mlp_hidden = 2048
    group = "D,F,D,F,D,F,A,F"
    m.pattern = ",".join([group, "D,F,D,F,M,D,F,A,F", group])
    m.max_seq_len = 2048
    m.compute_dtype = "bfloat16"
    m.param_dtype = "float32"
    m.blocks = {
        "gated_deltanet": {"chunk_size": 64},
        "memory_plus": {"n_keys": 128, "heads": 4, "knn": 8, "k_dim": 256},
    }
    cfg.data.task = "mqar"
    cfg.data.seq_len = 2048
    cfg.data.options = {"num_kv_pairs": 64}
    cfg.data.num_train_examples = 100_000
    cfg.data.num_eval_examples = 1_000
    cfg.optim.learning_rate = 3e-4
    cfg.optim.warmup_steps = 100
    cfg.optim.memory_values_lr = 1e-3
    cfg.train.steps = 1000
    cfg.train.batch_size = 16
    cfg.train.microbatches = 2  # 2 x (8 x 2048): one 16 x 2048 pass needs > 80 GB
    cfg.train.eval_every = 500
    cfg.train.checkpoint_every = 500
    return cfg
