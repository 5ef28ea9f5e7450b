"""Model FLOPs and parameter counts of a config: the "useful work" that MFU divides by.

Used by ``memjax-compile`` (``memjax.train.compile``: estimated MFU of a compiled train step) and
``benchmarks/gpu_train.py`` (measured MFU). Counts come from the config alone (shapes through
``nnx.eval_shape``; nothing is allocated).

Model training FLOPs per token (:func:`flops_per_token`; forward + backward = 3 x forward), the
usual ``6 N D`` (``N`` parameters used in matmuls, ``D`` tokens) plus the sequence-mixing and
memory terms that ``6 N D`` leaves out::

    dense      = 6 * N_matmul                N_matmul: every parameter used in a matmul per token,
                                             i.e. all Linear kernels + the LM head (the tied
                                             embedding counts once, as the unembedding); not the
                                             input-embedding gather, not memory values, not norms,
                                             short-conv taps or per-head scalars
    attention  = 3 * 4 * H * Dh * k_avg      per attention layer; k_avg = T / 2 (causal) or
                                             w - w^2 / (2T) for a sliding window w < T;
                                             with H * Dh = d: 12 * T * d / 2 per layer
    delta rule = 3 * H * ceil(T / C) * F_C / T   per gated-DeltaNet / DeltaNet layer (chunked),
             F_C = 2C^2 K   (Q K^T)       + 2C^2 K   (K K^T)
                 + F_inv(C) ((I + L)^-1, the block forward substitution + block recursion of
                             delta_rule.unit_lower_inverse, counted as the dense matmuls it runs)
                 + 2C^2 (V+K) (UT transform: (I+L)^-1 [diag(beta) V, diag(beta gamma) K])
                 + 2CKV (W S) + 2CKV (K^T delta) + 2C^2 V (scores @ delta) + 2CKV (Q S)
             (``mode="recurrent"``: 3 * H * 6KV)
    memory     = 3 * 2 * heads * n_keys * k_dim   product-key scoring of both query halves
               + 3 * 2 * heads * knn * D_v        the weighted sum of the read rows (embedding bag)

Recomputation (``model.remat``) and padding are not counted: they are not useful work. Blocks of
other families contribute their projections (in ``dense``) only and are listed in
``uncounted_blocks``.
"""
from __future__ import annotations

import math
import types

from flax import nnx

from memjax.config import ModelConfig
from memjax.memory.chunking import delta_chunk_size
from memjax.model.lm import LM, block_names
from memjax.nn.registry import block_kwargs, get_block

_ATTENTION = ("attention",)
_DELTA = ("gated_deltanet", "deltanet")
_PRODUCT_KEYS = ("memory_plus", "pkm")
_POSITIONWISE = ("mlp",)  # all their work is in the dense term


def unit_lower_inverse_flops(c: int) -> int:
    """Matmul FLOPs of ``memjax.memory.delta.unit_lower_inverse`` on one ``C x C`` matrix.

    Forward substitution inside diagonal blocks of ``b = min(16, C)`` (rows 1..b-1, each a
    ``[1, b] @ [b, b]`` product), then one level of block recursion per doubling ``s`` up to the
    padded size ``P = b * 2^levels``: ``P / 2s`` products ``X22 @ A21 @ X11`` of ``s x s`` blocks.
    """
    if c <= 0:
        raise ValueError(f"chunk size must be positive, got {c}")
    base = min(16, c)
    nblk = -(-c // base)
    size = base << max(nblk - 1, 0).bit_length()
    flops = (base - 1) * 2 * base * base * (size // base)
    s = base
    while s < size:
        flops += (size // (2 * s)) * 2 * (2 * s ** 3)
        s *= 2
    return flops


def delta_chunk_flops(c: int, k: int, v: int) -> dict:
    """Forward FLOPs of one chunk of one head of the chunked (gated) delta rule, by matmul."""
    return {
        "qk": 2 * c * c * k, "kk": 2 * c * c * k, "inverse": unit_lower_inverse_flops(c),
        "ut_transform": 2 * c * c * (v + k), "w_s": 2 * c * k * v, "k_delta": 2 * c * k * v,
        "scores_delta": 2 * c * c * v, "q_s": 2 * c * k * v,
    }


def _block_options(cfg: ModelConfig, name: str) -> types.SimpleNamespace:
    """The block's options (its constructor's keyword arguments): defaults, then the config's values."""
    cls = get_block(name)
    _, options = block_kwargs(cls)
    return types.SimpleNamespace(**({k: p.default for k, p in options.items()} | cfg.blocks.get(cls.name, {})))


def flops_per_token(cfg: ModelConfig, seq_len: int, matmul_params: int, backend: str | None = None) -> dict:
    """Model training FLOPs per token (forward + backward) of ``cfg`` at sequence length ``seq_len``.

    ``matmul_params`` is the count of parameters used in a matmul per token (see
    :func:`param_counts`). Returns ``{"total", "terms": {name: flops}, "per_layer": [...],
    "uncounted_blocks": [...], "formulas": {...}}``; see the module docstring for the formulas.
    Blocks of other families contribute only their projections (in ``dense``) and are listed in
    ``uncounted_blocks``. ``backend``: the platform the model runs on, which sets a delta-rule
    block's chunk when its ``chunk_size`` is None (:func:`memjax.memory.chunking.delta_chunk_size`;
    None: the platform of the current mesh, else the default backend).
    """
    if seq_len <= 0:
        raise ValueError(f"seq_len must be positive, got {seq_len}")
    if matmul_params < 0:
        raise ValueError(f"matmul_params must be >= 0, got {matmul_params}")
    t, h, dh, d = seq_len, cfg.num_heads, cfg.resolved_head_dim, cfg.d_model
    terms = {"dense": 6.0 * matmul_params, "attention": 0.0, "delta_rule": 0.0, "memory_keys": 0.0,
             "memory_read": 0.0}
    per_layer, uncounted = [], []
    for i, name in enumerate(block_names(cfg)):
        if name in _ATTENTION:
            w = _block_options(cfg, name).window
            w = t if w <= 0 or w >= t else w
            k_avg = w - w * w / (2.0 * t)  # T / 2 for full causal attention
            f = 3.0 * 4.0 * h * dh * k_avg
            terms["attention"] += f
        elif name in _DELTA:
            o = _block_options(cfg, name)
            dv = int(dh * o.expand_v)
            if o.mode == "recurrent":
                f = 3.0 * h * 6.0 * dh * dv
            else:
                c = delta_chunk_size(o.chunk_size, backend)
                n_chunks = -(-t // c)
                per_chunk = sum(delta_chunk_flops(c, dh, dv).values())
                f = 3.0 * h * n_chunks * per_chunk / t
            terms["delta_rule"] += f
        elif name in _PRODUCT_KEYS:
            o = _block_options(cfg, name)
            k_dim = o.k_dim or (d // 2) * 2
            dv = getattr(o, "value_dim", 0) or d
            fk = 3.0 * 2.0 * o.heads * o.n_keys * k_dim
            fr = 3.0 * 2.0 * o.heads * o.knn * dv
            terms["memory_keys"] += fk
            terms["memory_read"] += fr
            f = fk + fr
        else:
            f = 0.0
            if name not in _POSITIONWISE:
                uncounted.append(f"{i}:{name}")
        per_layer.append({"layer": i, "block": name, "flops": f})
    formulas = {
        "dense": "6 * matmul_params (Linear kernels + LM head; no embedding gather, no memory values)",
        "attention": "per layer 3 * 4 * num_heads * head_dim * k_avg, k_avg = T/2 causal "
                     "(= 12 * T * d_model / 2 when num_heads * head_dim = d_model)",
        "delta_rule": "per layer 3 * num_heads * ceil(T/C) * F_C / T, F_C = 2C^2K (QK^T) + 2C^2K (KK^T) "
                      "+ F_inv(C) + 2C^2(V+K) (UT) + 2CKV (WS) + 2CKV (K^T delta) + 2C^2V (scores delta) "
                      "+ 2CKV (QS)",
        "memory_keys": "per layer 3 * 2 * heads * n_keys * k_dim",
        "memory_read": "per layer 3 * 2 * heads * knn * value_dim",
    }
    return {"total": sum(terms.values()), "terms": terms, "per_layer": per_layer,
            "uncounted_blocks": uncounted, "formulas": formulas}


def param_counts(cfg: ModelConfig) -> dict:
    """Parameter counts of ``LM(cfg)`` from ``nnx.eval_shape`` (nothing is allocated).

    ``matmul``: Linear kernels + the LM head (the tied embedding table counted once for the
    unembedding); ``embedding``: the input table; ``memory_values``: product-key value tables;
    ``non_embedding``: total - embedding - memory_values (a separate untied head stays in).
    """
    abs_model = nnx.eval_shape(lambda: LM(cfg, rngs=nnx.Rngs(0)))
    params = nnx.state(abs_model, nnx.Param)
    c = {"total": 0, "embedding": 0, "head": 0, "memory_values": 0, "kernels": 0, "memory_keys": 0, "other": 0}
    for path, var in nnx.to_flat_state(params):
        n = math.prod(var.shape)
        c["total"] += n
        if tuple(path) == ("embed",):
            c["embedding"] += n
        elif tuple(path) == ("head",):
            c["head"] += n
        elif var.get_metadata().get("optim_group") == "memory_values":
            c["memory_values"] += n
        elif path[-1] == "kernel":
            c["kernels"] += n
        elif path[-1] == "subkeys":
            c["memory_keys"] += n
        else:
            c["other"] += n
    c["matmul"] = c["kernels"] + c["head"] + (c["embedding"] if cfg.tie_embeddings else 0)
    c["non_embedding"] = c["total"] - c["embedding"] - c["memory_values"]
    return c
