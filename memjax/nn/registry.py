"""Block registry: the model's pattern string names blocks; each block class registers itself.

A block is a standalone NNX module (:mod:`memjax.nn.block`) used as one pre-norm residual
sub-layer of the model: ``x = x + block(rmsnorm(x))``. Register a class with::

    @register_block("gated_deltanet", aliases=("D",))
    class GatedDeltaNet(Block): ...

and the pattern ``"A,D,F"`` can use it without touching the model file. The registry maps names
to classes and nothing else: a block's options are its constructor's keyword arguments, and
:func:`block_kwargs` splits them into the model-wide settings the model passes and the rest.
"""
from __future__ import annotations

import inspect

_BLOCKS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}

# Model-wide settings the model passes to every block whose constructor has an argument of that
# name (``config.model.<name>``; ``layer`` is the block's index in the pattern, ``seq_axis`` the
# mesh axis that time is split over, ``None`` without sequence parallelism).
MODEL_SETTINGS = ("d_model", "num_heads", "head_dim", "mlp_hidden", "vocab_size", "max_seq_len", "rope_theta",
                  "norm_eps", "dtype", "param_dtype", "layer", "seq_axis")


def register_block(name: str, aliases: tuple[str, ...] = ()):
    """Class decorator: make ``cls`` available in model patterns as ``name`` (and ``aliases``)."""

    def deco(cls):
        for n in (name, *aliases):
            if n in _BLOCKS or n in _ALIASES:
                raise ValueError(f"block name {n!r} is registered twice")
        cls.name = name
        _BLOCKS[name] = cls
        for a in aliases:
            _ALIASES[a] = name
        return cls

    return deco


def canonical_name(name: str) -> str:
    if name in _BLOCKS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise KeyError(name)


def get_block(name: str) -> type:
    """The block class registered under ``name`` or one of its aliases (``"D"`` -> ``GatedDeltaNet``)."""
    return _BLOCKS[canonical_name(name)]


def known_names() -> list[str]:
    """Every registered block name, sorted, then every alias as ``"alias=name"``."""
    return sorted(_BLOCKS) + sorted(f"{a}={n}" for a, n in _ALIASES.items())


def block_kwargs(cls: type) -> tuple[dict[str, inspect.Parameter], dict[str, inspect.Parameter]]:
    """``(model_settings, options)``: the constructor's keyword arguments, split into those the
    model fills from its own settings (:data:`MODEL_SETTINGS`) and the block's own options."""
    params = {n: p for n, p in inspect.signature(cls.__init__).parameters.items()
              if n not in ("self", "rngs") and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
    model = {n: p for n, p in params.items() if n in MODEL_SETTINGS}
    options = {n: p for n, p in params.items() if n not in MODEL_SETTINGS}
    return model, options
