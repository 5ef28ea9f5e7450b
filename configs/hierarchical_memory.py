"""Hierarchical memory bank on cluster-specific fact recall, for a laptop CPU (a minute or two).

Pattern ``A,HM``: one attention block, then a gated FFN (``mlp_hidden = 4 d``) whose hidden units are
extended per document by the memory blocks on its cluster path (Pouransari et al. 2025;
:mod:`memjax.nn.hierarchical_memory`). The bank (a tree of ``4 + 16`` blocks of 32 units per table)
lives in TensorStore under ``<workdir>/host_tables`` (``train.host_tables_dir`` for a bucket) and is
snapshotted with every checkpoint. Data: :mod:`memjax.data.clustered_facts`: 16 document clusters,
each with its own table of 32 x 4 facts; the cluster id each document carries is its path in the
tree (``data.cluster_paths.method = "label"``: one leaf per cluster). The control without the bank
is the same config with ``--set model.pattern=A,F`` (see benchmarks/hierarchical_memory_study.py).

    memjax-train --config configs/hierarchical_memory.py --workdir runs/hm
"""
# (the block and the task register themselves on import; the package __init__s may not list them yet)
import memjax.data.clustered_facts
import memjax.nn.hierarchical_memory  # noqa: F401
from memjax.config import Config

BRANCHING, DEPTH = 4, 2


def get_config() -> Config:
    cfg = Config(name="hierarchical_memory")
    cfg.model.vocab_size = 128
    cfg.model.d_model = 64
    cfg.model.num_heads = 2
    cfg.model.pattern = "A,HM"
    cfg.model.blocks = {"hierarchical_memory": {"branching": BRANCHING, "depth": DEPTH, "block_hidden": 32,
                                                "fetch_rows": 32 * DEPTH}}  # (>= distinct blocks of a batch)
    cfg.data.task = "clustered_facts"
    cfg.data.seq_len = 64
    cfg.data.options = {"num_clusters": BRANCHING ** DEPTH, "num_subjects": 32, "num_relations": 4,
                        "num_objects": 32, "num_words": 16, "max_words": 2, "eval_phrasings": "train"}
    cfg.data.cluster_paths = {"method": "label", "key": "cluster", "branching": BRANCHING, "depth": DEPTH}
    cfg.data.num_train_examples = 100_000
    cfg.data.num_eval_examples = 512
    cfg.optim.learning_rate = 3e-3
    cfg.optim.warmup_steps = 50
    cfg.train.steps = 800
    cfg.train.batch_size = 32
    cfg.train.eval_every = 400
    cfg.train.eval_batches = 16
    cfg.train.log_every = 100
    cfg.train.checkpoint_every = 400
    return cfg
