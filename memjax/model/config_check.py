"""The model's part of config validation (registered with :func:`memjax.config.register_check`).

* ``model.pattern`` names registered blocks;
* ``model.blocks.<name>`` keys are keyword arguments of that block's constructor (model-wide
  settings excluded), with the closest valid key suggested for a typo, and values of the
  annotated types;
* the values themselves are checked by building every block type of the pattern abstractly
  (``nnx.eval_shape``: no array is allocated), so a constructor's ``ValueError`` becomes a
  :class:`ConfigError` naming the config key;
* the mesh fits the devices, ``mesh.seq`` divides the sequence and the data-parallel size divides
  the micro-batch.
"""
from __future__ import annotations

import difflib
import inspect
import types
import typing

from flax import nnx

from memjax.config import Config, ConfigError, register_check
from memjax.model.lm import REMAT_POLICIES, block_arguments, pattern_names
from memjax.model.sharding import mesh_shape
from memjax.nn.registry import block_kwargs, get_block, known_names


def _did_you_mean(key: str, allowed) -> str:
    close = difflib.get_close_matches(key, list(allowed), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _type_ok(value, annotation) -> bool:
    """Whether ``value`` fits ``annotation`` (an annotation string is resolved leniently)."""
    if annotation is inspect.Parameter.empty or isinstance(annotation, str):
        return True
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType):
        return any(_type_ok(value, a) for a in typing.get_args(annotation))
    if annotation is type(None):
        return value is None
    if annotation is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    if annotation is int:
        return isinstance(value, int) and not isinstance(value, bool)
    base = origin or annotation
    return not isinstance(base, type) or isinstance(value, base)


def check_block_options(cls: type, options: dict, where: str) -> None:
    if not isinstance(options, dict):
        raise ConfigError(f"config key {where!r} must be a dict of {cls.__name__} arguments, got {options!r}")
    model_args, allowed = block_kwargs(cls)
    hints = typing.get_type_hints(cls.__init__)
    for key, value in options.items():
        if key in model_args:
            raise ConfigError(f"config key '{where}.{key}' is a model-wide setting: set model.{key} instead")
        if key not in allowed:
            raise ConfigError(f"unknown config key '{where}.{key}'{_did_you_mean(key, allowed)}; "
                              f"{cls.__name__} takes: {', '.join(sorted(allowed)) or 'no options'}")
        hint = hints.get(key, allowed[key].annotation)
        if not _type_ok(value, hint):
            raise ConfigError(f"config key '{where}.{key}' expects {getattr(hint, '__name__', hint)}, "
                              f"got {type(value).__name__} {value!r}")


def check_model(cfg: Config, num_devices: int | None = None) -> None:
    m = cfg.model
    raw = [s.strip() for s in m.pattern.split(",") if s.strip()]
    if not raw:
        raise ConfigError("config key 'model.pattern' is empty")
    for name in raw:
        try:
            get_block(name)
        except KeyError:
            raise ConfigError(f"config key 'model.pattern': unknown block {name!r}{_did_you_mean(name, known_names())}; "
                              f"known: {', '.join(known_names())}") from None
    if m.remat not in REMAT_POLICIES:
        raise ConfigError(f"config key 'model.remat' must be one of {tuple(REMAT_POLICIES)}, got {m.remat!r}")
    if not isinstance(m.blocks, dict):
        raise ConfigError(f"config key 'model.blocks' must be a dict, got {m.blocks!r}")
    for block_name, opts in m.blocks.items():
        try:
            cls = get_block(block_name)
        except KeyError:
            raise ConfigError(f"config key 'model.blocks.{block_name}': unknown block"
                              f"{_did_you_mean(block_name, known_names())}; known: {', '.join(known_names())}") from None
        if cls.name != block_name:
            raise ConfigError(f"config key 'model.blocks.{block_name}': use the block's name {cls.name!r}, not an alias")
        check_block_options(cls, opts, f"model.blocks.{block_name}")
    for name in dict.fromkeys(pattern_names(m)):
        cls = get_block(name)
        kwargs = block_arguments(m, name)
        try:
            nnx.eval_shape(lambda: cls(**kwargs, **cls.shared_params(**kwargs, rngs=nnx.Rngs(0)), rngs=nnx.Rngs(0)))
        except ValueError as e:
            raise ConfigError(f"config key 'model.blocks.{name}' (or a model setting it uses): {e}") from None


def check_mesh(cfg: Config, num_devices: int | None = None) -> None:
    if num_devices is None:
        return
    d, t = cfg.data, cfg.train
    sizes = mesh_shape(cfg.mesh, num_devices)
    dp = sizes["data"] * sizes["fsdp"]
    if d.seq_len % sizes["seq"]:
        raise ConfigError(f"config key 'mesh.seq' ({sizes['seq']}) must divide data.seq_len ({d.seq_len}): "
                          "every device holds an equal slice of the sequence")
    per_micro = t.batch_size // t.microbatches
    if per_micro % dp:
        raise ConfigError(f"config key 'train.batch_size': the micro-batch {per_micro} is not divisible by the "
                          f"data-parallel size {dp} (mesh.data x mesh.fsdp)")


register_check(check_model)
register_check(check_mesh)
