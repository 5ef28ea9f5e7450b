"""Autoregressive generation: prefill the prompt with each block's chunked form, then step.

Attention blocks keep a KV cache; memory blocks keep their recurrent state (matrix memory,
SSM state, conv window, ...). Logits of step-by-step decoding equal the full forward pass
(``tests/test_decoding.py`` checks every registered block).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx


def _sample(logits, key, temperature):
    if temperature <= 0:
        return jnp.argmax(logits, -1).astype(jnp.int32)
    return jax.random.categorical(key, logits / temperature, axis=-1).astype(jnp.int32)


def _generate(graphdef, state, prompt, key, *, max_new_tokens, temperature):
    model = nnx.merge(graphdef, state)
    b, t = prompt.shape
    cache = model.init_cache(b, t + max_new_tokens)
    logits, cache = model(prompt, cache=cache)
    keys = jax.random.split(key, max_new_tokens)
    first = _sample(logits[:, -1], keys[0], temperature)

    def body(carry, k):
        tok, cache = carry
        logits, cache = model(tok[:, None], cache=cache)
        nxt = _sample(logits[:, -1], k, temperature)
        return (nxt, cache), nxt

    _, rest = jax.lax.scan(body, (first, cache), keys[1:])  # the tokens after the first
    return jnp.concatenate([first[:, None], jnp.swapaxes(rest, 0, 1)], axis=1)


def generate(model, prompt: jax.Array, max_new_tokens: int, *, temperature: float = 0.0,
             key: jax.Array | None = None) -> jax.Array:
    """Continue ``prompt: [B, T] int`` by ``max_new_tokens``; returns ``[B, max_new_tokens]``.

    ``temperature = 0`` is greedy decoding; otherwise samples from ``softmax(logits / temperature)``.
    """
    if prompt.ndim != 2 or prompt.shape[1] < 1:
        raise ValueError(f"prompt must be [batch, seq] with seq >= 1, got shape {prompt.shape}")
    if max_new_tokens < 1:
        raise ValueError(f"max_new_tokens must be >= 1, got {max_new_tokens}")
    graphdef, state = nnx.split(model)
    key = jax.random.key(0) if key is None else key
    # The graph definition is closed over rather than hashed as a static argument: blocks may
    # hold unhashable option objects. One compilation per call; wrap in your own jit to reuse.
    fn = jax.jit(functools.partial(_generate, graphdef, max_new_tokens=max_new_tokens,
                                   temperature=float(temperature)))
    return fn(state, prompt, key)
