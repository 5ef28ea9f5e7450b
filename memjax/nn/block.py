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
      ``__call__(x [B, T, D], *, segment_ids [B, T] | None) -> [B, T, D]``: training form.
        With ``segment_ids`` (packed documents, ids > 0; 0 = padding) no information may flow
        between different segments: attention is masked and recurrent states reset.
      ``init_state(batch_size, max_len) -> pytree``: decoding state (None if stateless).
      ``prefill(x [B, T, D], state) -> (y [B, T, D], state)``: process a prompt from ``state``.
      ``step(x [B, D], state) -> (y [B, D], state)``: one token (blocks that need the
        position, like attention with RoPE, keep a counter in their state).

    The defaults below are correct for position-wise blocks (MLP, memory layers) and
    give ``prefill`` as a scan of ``step`` for any block that does not override it.
    """

    Options = NoOptions
    name = "block"
    stateful = False  # True if the block carries information across positions

    def init_state(self, batch_size: int, max_len: int) -> Any:
        return None

    def step(self, x: jax.Array, state: Any):
        return self(x[:, None, :])[:, 0, :], state

    def prefill(self, x: jax.Array, state: Any):
        """Default: position-wise blocks run the training form; stateful ones scan ``step``.

        Stateful blocks should override this with their chunked form plus final state.
        """
        if not self.stateful:
            return self(x), state

        def body(st, xt):
            y, st = self.step(xt, st)
            return st, y

        state, ys = jax.lax.scan(body, state, jnp.swapaxes(x, 0, 1))
        return jnp.swapaxes(ys, 0, 1), state
