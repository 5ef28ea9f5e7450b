"""Long-context hybrid byte-level LM with sequence parallelism: 32768 bytes per sequence.

Time is split over every device (``mesh.seq = -1``, ``mesh.data = 1``): each device holds 32768 / P
positions of every activation, the recurrent blocks exchange their states between devices
(:mod:`memjax.memory.sequence_parallel`), the attention layer is ring attention (keys and values
go round the devices, zig-zag load-balanced: :mod:`memjax.memory.ring_attention`, O(T / P)
memory per device), and XLA partitions the MLPs. Gated DeltaNet (``D``), Mamba-2 (``M2``),
RG-LRU (``R``) mixers and one global softmax attention layer (``A``, 8 heads, 2 KV heads)::

    [D F M2 F R F] [D F A F R F]          d_model 512, 8 heads of 64

Data: the running Python's standard library sources, packed into 32768-byte rows with segment
ids (documents cross device boundaries; every memory resets at document starts), so nothing is
downloaded. On 8 accelerators::

    memjax-train --config configs/long_context.py --workdir runs/long_context

On a CPU, try it at a small length with fake devices:
``XLA_FLAGS=--xla_force_host_platform_device_count=8 memjax-train --config configs/long_context.py
--workdir runs/lc --set data.seq_len=1024 model.max_seq_len=1024 train.steps=20``.
Memory: for the all-recurrent pattern ``[D F M2 F R F] x 2`` XLA:CPU planned 26.2 GiB of
temporaries for one train step on a single device and 3.6 GiB per device with time split over 8
(``compiled.memory_analysis()`` of the compiled step, 2026-11-24; parameters and AdamW state,
306 MiB, are replicated: add ``mesh.fsdp`` to shard them too). The attention layer's plan with
ring attention has not been re-measured at 32768 (its per-device temporaries are O(T / P), the
blockwise kernel's, not the ``[T, T]`` logits of the XLA form).
"""
from memjax.config import Config
from memjax.data.text_stdlib import stdlib_options


def get_config() -> Config:
    cfg = Config(name="long_context")
    m = cfg.model
    m.vocab_size = 264  # 259 byte-level ids, padded to a multiple of 8
    m.d_model = 512
    m.num_heads = 8
    m.pattern = "D,F,M2,F,R,F,D,F,A,F,R,F"
    m.blocks = {"attention": {"num_kv_heads": 2}}
    m.max_seq_len = 32768
    cfg.data.task = "text"
    cfg.data.seq_len = 32768
    cfg.data.options = stdlib_options()
    cfg.data.num_train_examples = 0  # every window of the training files
    cfg.data.num_eval_examples = 8
    cfg.mesh.data = 1
    cfg.mesh.seq = -1  # every device on the time axis
    cfg.optim.learning_rate = 1e-3
    cfg.optim.warmup_steps = 100
    cfg.train.steps = 2000
    cfg.train.batch_size = 1
    cfg.train.eval_every = 500
    cfg.train.eval_batches = 8
    cfg.train.log_every = 10
    cfg.train.checkpoint_every = 250
    return cfg
