"""The contract every block implements: a standalone NNX module, training and decoding.

A block is one residual sub-layer (the model applies ``x + block(norm(x))``), usable in anyone's
model without memjax's config::

    block = memjax.nn.GatedDeltaNet(d_model=512, num_heads=8, rngs=nnx.Rngs(0))
    y = block(x, segment_ids=None)                       # x, y: [B, T, d_model]
    cache = block.init_cache(batch_size, max_length)     # typed cache (a NamedTuple pytree)
    y, cache = block(x_new, cache=cache)                 # prefill (T > 1) or one step (T = 1)

Constructor: keyword arguments with defaults, ``d_model`` and ``rngs`` alone suffice. The model
passes its model-wide settings (``memjax.nn.registry.MODEL_SETTINGS``: ``d_model``,
``num_heads``, ``head_dim``, ``dtype``, ...) to every block whose constructor names them, and
``config.model.blocks[<name>]`` supplies the rest, so a block's options are exactly its
constructor's other keyword arguments.

``__call__(x, *, segment_ids=None, tokens=None, cache=None)``:
  * ``segment_ids: [B, T]`` int (packed documents; 0 = padding): no information flows between
    different segments: attention is masked and recurrent states reset.
  * ``tokens: [B, T]`` int, the input ids (token-indexed blocks such as n-gram memory and STEM
    read them; other blocks ignore them).
  * ``cache``: with a cache the call returns ``(y, cache)``; without, ``y``.
"""
from __future__ import annotations

import contextlib
import contextvars
from typing import Any

import jax
from flax import nnx

from memjax.nn.cache import NoCache


class Block(nnx.Module):
    """Base class of memjax blocks (see the module docstring for the contract).

    Class attributes:

    - ``stateful``: carries information across positions (needs a decoding cache).
    - ``scannable``: instances of one configuration may be stacked and run under ``nnx.scan``
      (False for blocks whose parameters are shared with other layers, or whose
      construction depends on the layer index).
    """

    stateful = False
    scannable = True

    def init_cache(self, batch_size: int, max_length: int) -> Any:
        """The decoding cache for ``batch_size`` rows of up to ``max_length`` tokens."""
        return NoCache()

    @classmethod
    def shared_params(cls, *, rngs: nnx.Rngs, **kwargs) -> dict:
        """Parameters that every instance of this block type in one model shares (e.g. one value
        pool for all memory layers). The model calls this once with the keyword arguments the
        instances get and passes the returned dict to each instance's constructor."""
        return {}


_LAYER_OFFSET: contextvars.ContextVar = contextvars.ContextVar("memjax_layer_offset", default=0)


@contextlib.contextmanager
def layer_offset(offset: int):
    """Blocks called inside report their layer as ``layer + offset`` (:func:`layer_index`).

    A scanned model builds its stacked groups with the first group's layer indices; when it runs
    them one by one (eager diagnostics such as slot recording) it sets the group's offset here.
    """
    token = _LAYER_OFFSET.set(offset)
    try:
        yield
    finally:
        _LAYER_OFFSET.reset(token)


def layer_index(layer: int) -> int:
    """The model-wide index of a block built with ``layer`` (see :func:`layer_offset`)."""
    return layer + _LAYER_OFFSET.get()


def position_wise_result(y: jax.Array, cache: Any):
    """What a position-wise block returns: ``y``, or ``(y, cache)`` when called with a cache."""
    return y if cache is None else (y, cache)
