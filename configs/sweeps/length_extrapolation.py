"""Length extrapolation: every mixer trained at length ``L``, evaluated at ``L``, ``2L`` and ``4L``.

    python -m benchmarks.length_extrapolation --out runs/length_extrapolation              # MQAR, every block
    python -m benchmarks.length_extrapolation --grid 64,32,4 --lrs 0.01 --steps 800 \
        --out runs/length_extrapolation_mqar_T32            # the CPU run (README): every block at lr 0.01,
    # then the same command with --lrs 0.003 (and 0.001) --blocks <those below 0.99> into the same --out
    python -m benchmarks.length_extrapolation --study text --steps 1000 --lrs 0.003 \
        --out runs/length_extrapolation_text_T128           # the text corpus, every block (README)

Each entry: ``(name, base config, overrides, label)`` as in ``benchmarks.sweep``; 2 layers of one
block, no MLP, as in Zoology. The evaluation at ``m L`` keeps the trained parameters and changes only
the data (``benchmarks.length_extrapolation.longer_config``):

- MQAR ``same_pairs``: the same number of pairs, the queries spread over an ``m`` times longer
  query region (power-law gaps over more positions), so queries sit further from their keys and at
  positions never seen in training;
- MQAR ``scaled_pairs``: ``m`` times as many pairs in ``m L`` tokens (the same density; Zoology's
  newer sweeps test this way, e.g. 64 tokens / 4 pairs up to 1024 / 256), which also asks the
  fixed-size states to hold ``m`` times more;
- text (``--study text``): the held-out corpus in ``m L``-token windows; loss per token.

The attention block applies RoPE with absolute positions computed on the fly, so at ``m L`` it
sees rotation angles never seen in training (no position table caps the length); the
sliding-window hybrids (``E``, ``titans_mag``) only ever attend ``WINDOW`` tokens back.
MQAR needs ``vocab_size > m L + 1`` at the longest length (its generator's rule), so the
vocabulary grows with ``L``: 256 for ``L = 32``, 512 for ``L = 64``. A larger vocabulary makes MQAR
slower to learn: at ``L = 64``, 8 pairs, vocabulary 512, attention (lr 3e-3) was still at 0.11
accuracy after 800 steps on the CPU, hence ``STEPS = 2000`` for the default point; the CPU run
used ``L = 32``, 4 pairs, vocabulary 256.
"""

from benchmarks.sweep import grid_entries

STUDIES = {
    "mqar": {"base": "configs/mqar_tiny.py", "seq_len": 64, "d_model": 64, "num_kv_pairs": 8,
             "modes": ("same_pairs", "scaled_pairs"), "metric": "accuracy"},
    "text": {"base": "configs/text_stdlib.py", "seq_len": 128, "d_model": 64, "num_kv_pairs": None,
             "modes": ("same",), "metric": "loss", "learning_rates": [3e-3, 1e-3]},
}
# Every sequence mixer of the registry (memory layers and MLPs are not mixers and are left out).
BLOCKS = ["A", "L", "G", "GV", "DN", "D", "DP", "GDN2", "KDA", "H2", "FoX", "mL", "LLD", "LLM2",
          "S", "M1", "M2", "M3", "R", "R6", "R7", "MoM", "E", "titans_mag"]
SMALL_BLOCKS = ["A", "D", "L", "M2"]  # a quick subset (the first CPU run)
MULTIPLES = (1, 2, 4)
LEARNING_RATES = [1e-2, 3e-3]  # MQAR (a study may set its own)
STEPS = 2000
WINDOW = 8
BLOCK_OVERRIDES = {  # (label, extra overrides)
    "titans_mag": (f"titans_mag_w{WINDOW}", [f"model.blocks={{'titans_mag': {{'window': {WINDOW}}}}}"]),
    "E": (f"E_w{WINDOW}", [f"model.blocks={{'swa_ssm': {{'window': {WINDOW}}}}}"]),
}


def mqar_vocab(seq_len: int) -> int:
    """The smallest power of two >= 256 above the longest evaluated MQAR sequence (``vocab > m L + 1``)."""
    v = 256
    while v <= max(MULTIPLES) * seq_len + 1:
        v *= 2
    return v


def get_sweep(blocks=None, grid=None, learning_rates=None, steps=None, study="mqar"):
    """``grid``: ``(d_model, seq_len, num_kv_pairs)`` triples (default: the study's one point);
    for ``study="text"`` the third entry is ignored."""
    if study not in STUDIES:
        raise ValueError(f"study must be one of {sorted(STUDIES)}, got {study!r}")
    s = STUDIES[study]
    grid = grid or [(s["d_model"], s["seq_len"], s["num_kv_pairs"] or 0)]
    if study == "mqar":
        def task(seq, kv):
            return [f"model.vocab_size={mqar_vocab(seq)}", f"data.seq_len={seq}",
                    f"data.options={{'num_kv_pairs': {kv}}}"]
        tag = "kv"
    else:
        def task(seq, _):
            # grid_entries sets the pattern to 2 mixer layers, no MLP (the base config interleaves MLPs).
            return [f"data.seq_len={seq}", f"model.max_seq_len={seq}", "model.num_heads=2"]
        tag = "text_"
    entries = grid_entries(base=s["base"], blocks=blocks or BLOCKS, grid=grid,
                           learning_rates=learning_rates or s.get("learning_rates", LEARNING_RATES),
                           steps=steps or STEPS,
                           block_overrides=BLOCK_OVERRIDES, size_tag=tag, task_overrides=task)
    if study == "text":  # no accuracy target on text: train every step, evaluate once at the end
        entries = [(n, b, o + ["train.target_accuracy=0.0", "train.eval_every=100000"], lab)
                   for n, b, o, lab in entries]
    return entries
