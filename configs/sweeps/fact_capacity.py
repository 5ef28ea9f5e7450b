"""Fact capacity: memory layers vs dense FFNs at matched per-token FLOPs, as the number of facts grows.

The study of issue 20 item 3, run by ``python -m benchmarks.fact_capacity`` (which writes
``benchmarks/results/fact_capacity_names.{json,md,png}``; ``--subject-length 1``: the first
study's one-token subjects, ``benchmarks/results/fact_capacity.{json,md,png}``).

Task: ``fact_recall`` (:mod:`memjax.data.facts`) with ``num_facts = num_subjects x NUM_RELATIONS``
random ``(subject, relation) -> object`` facts (``NUM_OBJECTS`` objects: ``log2(64) = 6`` bits a
fact), stated in 6 training phrasings and asked in 2 held-out phrasings; the metric is eval
``fact_accuracy`` (chance ``1 / 64``), and, from the final checkpoint, the same facts asked in the
training phrasings (``train_phrasing_recall``: what the model stored, apart from carrying it over
to new phrasings). Subjects are named by ``SUBJECT_LENGTH = 2`` tokens of a ``SUBJECT_ALPHABET =
128``-token alphabet (``vocab = 2 + 128 + R + O + W`` = 206, padded to 256, at every number of
facts; ``W = 4`` filler words; held-out phrasings use only words some training phrasing has). With
one token per subject (the first study) the vocabulary grew with the facts and a model could keep a
subject's facts in its own embedding row, so the dense models' capacity grew with the number of
facts and no crossover could show; with names, the facts have to live in the weights that read
the name.

Model: ``pattern = "A,X"``: one attention block then one channel-mixing sub-layer ``X``, the only
thing that differs between variants (``d_model = 32``, 2 heads). Variants (``VARIANTS``):

- ``dense_f32 / dense_f64 / dense_f128``: SwiGLU FFN of hidden width ``f``.
- ``pkm``: product-key memory, ``n_keys = 64`` (4096 slots), 2 heads, ``knn = 8``.
- ``memory_plus``: Memory+, ``n_keys = 64``, 1 head, ``knn = 8``, gated output.
- ``memory_plus_shared``: ``pattern = "A,M,M"``, two Memory+ blocks reading one shared value
  pool (``shared_pool``; with a single block a shared pool is the same model as ``memory_plus``).
- ``ngram``: Engram hashed n-grams (orders 2-3, 2 heads each: 4 tables of >= 2053 rows x 16).
- ``ngram_one_bucket``: its 1-bucket control; ``ngram_random_ids``: its random-ids control
  (content-free position ids hashed instead of the tokens).

Per-token FLOPs of the sub-layer ``X`` (:func:`block_flops`; a multiply-add is 2 FLOPs; integer
hashing, top-k comparisons, norms, softmax and element-wise products are not counted):

- dense SwiGLU: ``6 d f`` (gate, up and down projections). d = 32: f = 32: 6,144;
  f = 64: 12,288; f = 128: 24,576.
- pkm: query ``2 d H k`` + sub-key scores ``2 H n k`` (two halves of ``k / 2``) + candidate sums
  ``H knn^2`` + weighted value read ``2 H knn d``: ``k = d = 32, H = 2, n = 64, knn = 8``:
  4,096 + 8,192 + 128 + 1,024 = 13,440 (matched to dense_f64, +9%).
- memory_plus: query + scores + candidates as pkm, value read ``2 H knn dv``, gate ``2 d dv``,
  output ``2 dv d``: ``H = 1, dv = 32``: 2,048 + 4,096 + 64 + 512 + 2,048 + 2,048 = 10,816
  (dense_f64, -12%); memory_plus_shared has two such blocks: 21,632 (dense_f128, -12%).
- ngram: key and value projections of the concatenated read, ``2 x 2 (h e) d``, + the gate's dot
  product ``2 d``: ``h e = 4 x 16 = 64``: 8,192 + 64 = 8,256 (between dense_f32 and dense_f64); its
  two controls cost the same.

:func:`model_flops` adds what every variant shares: attention projections ``8 d^2``, causal scores
and weighted values ``4 d ctx`` with the mean context ``ctx = (T + 1) / 2``, and the logits
``2 d V``. Parameters are counted from the built model (:func:`count_params`).

Steps: ``EPOCHS`` exposures of each fact (in a random training phrasing) on average:
``steps = ceil(EPOCHS x num_facts / (batch x facts per sequence))`` (facts per sequence measured
from the task: 7.2-7.9 at ``seq_len = 64`` with two-token names), at least ``MIN_STEPS``. Both
grids use 400 exposures (``EPOCHS``, ``CPU_EPOCHS``): at 100 exposures every variant was still near
chance in the one-token study (dense FFNs 0.03-0.035 at 1k facts). The full grid (GPU) has 1k-64k
facts (1.6k-116k steps); the CPU grid (``CPU_FACTS``: 512, 2k and 8k facts, 885-13k steps,
``CPU_VARIANTS``) takes a 2-core machine about two hours. The numbers compare variants at equal
exposures, not at convergence. Optimiser: AdamW at ``LEARNING_RATE`` (cosine, weight decay 0.1),
the sparse-read tables (product-key values, n-gram tables) at ``VALUES_LR`` without weight decay.
"""
from __future__ import annotations

import math

import numpy as np

from memjax.config import Config, ConfigError, validate
from memjax.data.facts import FactRecall

D_MODEL = 32
NUM_HEADS = 2
SEQ_LEN = 64
BATCH = 32
NUM_RELATIONS = 8
NUM_OBJECTS = 64
SUBJECT_LENGTH = 2  # tokens per subject name (1: one id per subject, the first study's world)
SUBJECT_ALPHABET = 128  # name tokens: 128 ** 2 = 16,384 subjects = 131,072 facts at R = 8
NUM_WORDS = 4  # filler words (fact_recall draws held-out phrasings from the training phrasings' words)
LEARNING_RATE = 1e-2  # picked by one probe run (dense_f64, 256 facts, 400 exposures)
# Sparse-read tables (product-key values, Engram's n-gram tables): their own constant learning rate and no weight decay
# (``optim.memory_values_lr``), as Memory Layers at Scale trains them: a row is read by a few
# tokens of a batch, and a decoupled weight decay applied at every step would shrink the rows
# between their rare updates (exp(-lr wd steps) = exp(-13) over 13k steps at wd 0.1).
VALUES_LR = 1e-2
FACTS = [1024, 4096, 16384, 65536]  # the full grid (GPU)
EPOCHS = 400
CPU_FACTS = [512, 2048, 8192]  # (the one-token study of 2026-12-07 ran 256 and 1,024)
CPU_EPOCHS = 400
MIN_STEPS = 200
MAX_VOCAB = 1 << 17  # the subject alphabet grows the vocabulary: 131,072 ids = ~1M facts at R = 8
EVAL_EXAMPLES = 256

PK = {"n_keys": 64, "knn": 8}
VARIANTS = {  # name -> (pattern, mlp_hidden (dense only), {block: options})
    "dense_f32": ("A,F", 32, {}),
    "dense_f64": ("A,F", 64, {}),
    "dense_f128": ("A,F", 128, {}),
    "pkm": ("A,P", 0, {"pkm": {**PK, "heads": 2}}),
    "memory_plus": ("A,M", 0, {"memory_plus": {**PK, "heads": 1}}),
    "memory_plus_shared": ("A,M,M", 0, {"memory_plus": {**PK, "heads": 1, "shared_pool": True}}),
    "ngram": ("A,N", 0, {"ngram_mem": {"table_size": 2053, "embed_dim": 16}}),
    "ngram_one_bucket": ("A,N", 0, {"ngram_mem": {"table_size": 2053, "embed_dim": 16, "one_bucket": True}}),
    "ngram_random_ids": ("A,N", 0, {"ngram_mem": {"table_size": 2053, "embed_dim": 16, "random_ids": True}}),
}
# The two dense models of the memory layers' FLOPs, product keys, Engram (its controls and Memory+: the
# full grid, and `--variants`; the one-token study ran all but memory_plus_shared)
CPU_VARIANTS = ["dense_f64", "dense_f128", "pkm", "ngram"]


def task_options(num_facts: int, subject_length: int = SUBJECT_LENGTH) -> dict:
    """``data.options`` for ``num_facts`` facts with ``subject_length``-token subject names;
    ``ConfigError`` if it cannot be laid out."""
    if not isinstance(num_facts, int) or num_facts <= 0 or num_facts % NUM_RELATIONS:
        raise ConfigError(f"num_facts must be a positive multiple of num_relations={NUM_RELATIONS} "
                          f"(num_facts = num_subjects x num_relations), got {num_facts!r}")
    opts = {"num_subjects": num_facts // NUM_RELATIONS, "num_relations": NUM_RELATIONS,
            "num_objects": NUM_OBJECTS, "num_words": NUM_WORDS, "max_words": 2, "num_templates": 8,
            "num_eval_templates": 2}
    if subject_length > 1:
        opts.update(subject_length=subject_length, subject_alphabet=SUBJECT_ALPHABET)
    need = FactRecall.Options(**opts).vocab_needed()
    if need > MAX_VOCAB:
        raise ConfigError(f"num_facts={num_facts} needs a vocabulary of {need} ids (2 + subjects + relations + "
                          f"objects + words), above MAX_VOCAB={MAX_VOCAB}")
    return opts


def vocab_size(num_facts: int, subject_length: int = SUBJECT_LENGTH) -> int:
    """The task's vocabulary rounded up to a multiple of 64 (unused ids are never targets)."""
    need = FactRecall.Options(**task_options(num_facts, subject_length)).vocab_needed()
    return -(-need // 64) * 64


def facts_per_sequence(num_facts: int, seq_len: int = SEQ_LEN, samples: int = 256,
                       subject_length: int = SUBJECT_LENGTH) -> float:
    """Mean number of facts stated in one training sequence (measured on ``samples`` examples)."""
    opts = FactRecall.Options(**task_options(num_facts, subject_length))
    ds = FactRecall(opts, seq_len=seq_len, vocab_size=vocab_size(num_facts, subject_length), split="train",
                    num_examples=samples, seed=0)
    return float(np.mean([ds[i]["fact_index"].max() for i in range(samples)]))


def steps_for(num_facts: int, epochs: int, batch: int = BATCH, subject_length: int = SUBJECT_LENGTH) -> int:
    """Steps giving each fact ``epochs`` exposures on average (at least ``MIN_STEPS``)."""
    per_seq = facts_per_sequence(num_facts, subject_length=subject_length)
    return max(MIN_STEPS, math.ceil(epochs * num_facts / (batch * per_seq)))


def make_config(variant: str, num_facts: int, *, steps: int, batch: int = BATCH, lr: float = LEARNING_RATE,
                seed: int = 0, subject_length: int = SUBJECT_LENGTH) -> Config:
    """The validated config of one run."""
    if variant not in VARIANTS:
        raise ConfigError(f"unknown fact-capacity variant {variant!r}; choose from {sorted(VARIANTS)}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    pattern, hidden, blocks = VARIANTS[variant]
    cfg = Config(name=f"fact_capacity_{variant}_{num_facts}_names{subject_length}")
    cfg.data.task = "fact_recall"
    cfg.data.seq_len = SEQ_LEN
    cfg.data.options = task_options(num_facts, subject_length)
    cfg.data.num_train_examples = steps * batch
    cfg.data.num_eval_examples = EVAL_EXAMPLES
    cfg.data.seed = seed
    cfg.model.vocab_size = vocab_size(num_facts, subject_length)
    cfg.model.d_model = D_MODEL
    cfg.model.num_heads = NUM_HEADS
    cfg.model.pattern = pattern
    cfg.model.mlp_hidden = hidden
    cfg.model.blocks = {k: dict(v) for k, v in blocks.items()}
    cfg.optim.learning_rate = lr
    if any(name in ("P", "M", "N") for name in pattern.split(",")):
        cfg.optim.memory_values_lr = VALUES_LR
    cfg.optim.warmup_steps = max(steps // 20, 1)
    cfg.train.steps = steps
    cfg.train.batch_size = batch
    cfg.train.eval_every = steps
    cfg.train.eval_batches = max(EVAL_EXAMPLES // batch, 1)
    cfg.train.log_every = max(steps // 4, 1)
    cfg.train.checkpoint_every = 10 * steps
    cfg.train.async_checkpointing = False
    cfg.train.progress = False
    cfg.train.seed = seed
    validate(cfg)
    return cfg


def block_flops(variant: str, d: int = D_MODEL) -> int:
    """Forward FLOPs per token of the variant's non-attention sub-layers (see the module docstring)."""
    pattern, hidden, blocks = VARIANTS[variant]
    names = pattern.split(",")[1:]
    total = 0
    for name in names:
        if name == "F":
            total += 6 * d * hidden
        elif name in ("P", "M"):
            o = blocks["pkm" if name == "P" else "memory_plus"]
            h, n, knn, k = o["heads"], o["n_keys"], o["knn"], (d // 2) * 2
            total += 2 * d * h * k + 2 * h * n * k + h * knn * knn
            if name == "P":
                total += 2 * h * knn * d
            else:
                dv = o.get("value_dim", 0) or d
                total += 2 * h * knn * dv + 2 * d * dv + 2 * dv * d
        elif name == "N":
            o = blocks["ngram_mem"]
            tables = (o.get("max_ngram", 3) - 1) * o.get("heads", 2)
            he = tables * (o.get("embed_dim", 0) or max(d // tables, 1))
            total += 2 * 2 * he * d + 2 * d
        else:
            raise ValueError(f"no FLOPs formula for block {name!r}")
    return total


def model_flops(variant: str, num_facts: int, d: int = D_MODEL, seq_len: int = SEQ_LEN,
                subject_length: int = SUBJECT_LENGTH) -> int:
    """Forward FLOPs per token of the whole model: attention, logits and :func:`block_flops`."""
    ctx = (seq_len + 1) / 2  # mean causal context
    return int(8 * d * d + 4 * d * ctx + 2 * d * vocab_size(num_facts, subject_length) + block_flops(variant, d))


def get_sweep(variants=None, facts=None, epochs: int = EPOCHS, steps: int | None = None, lr: float = LEARNING_RATE,
              subject_length: int = SUBJECT_LENGTH, seed: int = 0):
    """Entries ``(name, variant, num_facts, steps, lr, subject_length, seed)``, smallest number of facts
    first (one-token runs keep the first study's names; named-subject runs end in ``_names<L>``, and
    runs of a seed other than 0 in ``_seed<s>``)."""
    variants = list(variants or VARIANTS)
    for v in variants:
        if v not in VARIANTS:
            raise ConfigError(f"unknown fact-capacity variant {v!r}; choose from {sorted(VARIANTS)}")
    entries = []
    for n in sorted(facts or FACTS):
        task_options(n, subject_length)
        n_steps = steps or steps_for(n, epochs, subject_length=subject_length)
        tail = (f"_names{subject_length}" if subject_length > 1 else "") + (f"_seed{seed}" if seed else "")
        for v in variants:
            entries.append((f"{v}_facts{n}_steps{n_steps}_lr{lr:g}{tail}", v, n, n_steps, lr, subject_length, seed))
    return entries
