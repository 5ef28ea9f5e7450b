"""Block registry: the model's pattern string names blocks; each family registers its own.

A block is an NNX module used as one pre-norm residual sub-layer of the model:
``x = x + block(rmsnorm(x))``. Register a class with::

    @register_block("gated_deltanet", aliases=("D",))
    class GatedDeltaNetBlock(Block): ...

and the pattern ``"A,D,F"`` can use it without touching the model file.
"""
from __future__ import annotations

import importlib

_BLOCKS: dict[str, type] = {}
_ALIASES: dict[str, str] = {}

# Modules that register blocks when imported. The model imports them all once, so
# a pattern string can name any block of any family.
BLOCK_MODULES = (
    "memjax.nn.attention",
    "memjax.nn.mlp",
    "memjax.nn.associative",
    "memjax.nn.titans",
    "memjax.nn.titans_mac",
    "memjax.nn.mixture",
    "memjax.nn.hopfield",
    "memjax.nn.ssm_blocks",
    "memjax.nn.rglru_block",
    "memjax.nn.hybrid",
    "memjax.nn.memory_layers",
    "memjax.nn.ngram",
)


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


def load_all() -> None:
    for mod in BLOCK_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:  # a family not built yet in this checkout
            if e.name != mod:
                raise


def canonical_name(name: str) -> str:
    load_all()
    if name in _BLOCKS:
        return name
    if name in _ALIASES:
        return _ALIASES[name]
    raise KeyError(name)


def get_block(name: str) -> type:
    return _BLOCKS[canonical_name(name)]


def known_names() -> list[str]:
    load_all()
    return sorted(_BLOCKS) + sorted(f"{a}={n}" for a, n in _ALIASES.items())
