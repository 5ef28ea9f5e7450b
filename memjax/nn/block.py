"""The interface every model block implements (training, prefill and decoding)."""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
from flax import nnx


@dataclasses.dataclass
class NoOptions:
    """Blocks without options use this (any key given for them is rejected)."""


class Block(nnx.Module):
    """One residual sub-layer: ``x + block(norm(x))`` is applied by the model.

    Constructor: ``Block(cfg: ModelConfig, opts: Options, *, layer: int, shared: dict, rngs: nnx.Rngs)``.
    ``shared`` is one dict handed to every block of the model; a block may store a
    parameter there (e.g. a memory value pool) for later blocks to reuse.

    Methods:
      ``__call__(x [B, T, D], *, segment_ids [B, T] | None = None, tokens [B, T] | None = None)
        -> [B, T, D]``: training form. ``tokens`` are the input ids (for token-indexed blocks
        such as n-gram memory and STEM; other blocks ignore them).
        With ``segment_ids`` (packed documents, ids > 0; 0 = padding) no information may flow
        between different segments: attention is masked and recurrent states reset.
      ``init_state(batch_size, max_len) -> pytree``: decoding state (None if stateless).
      ``prefill(x [B, T, D], state, *, tokens=None) -> (y [B, T, D], state)``: a prompt from ``state``.
      ``step(x [B, D], state, *, token [B] | None = None) -> (y [B, D], state)``: one token
        (blocks that need the position, like attention with RoPE, keep a counter in their state).

    The defaults below are correct for position-wise blocks (MLP, memory layers) and
    give ``prefill`` as a scan of ``step`` for any block that does not override it.
    """

    Options = NoOptions
    name = "block"
    stateful = False  # True if the block carries information across positions

    def init_state(self, batch_size: int, max_len: int) -> Any:
        return None

    def step(self, x: jax.Array, state: Any, *, token: jax.Array | None = None):
        tokens = None if token is None else token[:, None]
        return self(x[:, None, :], tokens=tokens)[:, 0, :], state

    def prefill(self, x: jax.Array, state: Any, *, tokens: jax.Array | None = None):
        """Default: position-wise blocks run the training form; stateful ones scan ``step``.

        Stateful blocks should override this with their chunked form plus final state.
        """
        if not self.stateful:
            return self(x, tokens=tokens), state

        def body(st, inp):
            xt, tok = inp
            y, st = self.step(xt, st, token=tok)
            return st, y

        toks = None if tokens is None else jnp.swapaxes(tokens, 0, 1)
        state, ys = jax.lax.scan(body, state, (jnp.swapaxes(x, 0, 1), toks))
        return jnp.swapaxes(ys, 0, 1), state
