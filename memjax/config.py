"""Typed experiment configuration: one dataclass per concern, CLI overrides, validation.

An experiment is a Python file in ``configs/`` whose ``get_config()`` returns a
:class:`Config`. ``--set model.d_model=128 train.steps=200`` overrides fields;
values are parsed as Python literals and checked against the field's type.
Every mistake (unknown key, wrong type, inconsistent values) raises
:class:`ConfigError` with one line that names the key and what is allowed,
before anything is compiled.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import importlib.util
import json
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable


class ConfigError(ValueError):
    """A configuration key, type or value that cannot work."""


def did_you_mean(name: str, allowed) -> str:
    """`` (did you mean 'x'?)`` for the closest of ``allowed``, or ``""``."""
    close = difflib.get_close_matches(name, list(allowed), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""


def _unknown_key(key: str, allowed) -> ConfigError:
    prefix, _, name = key.rpartition(".")
    hint = did_you_mean(name, allowed)
    if hint:
        hint = hint.replace("'", "'" + (prefix + "." if prefix else ""), 1)
    return ConfigError(f"unknown config key {key!r}{hint}; allowed here: {', '.join(sorted(allowed))}")


class _Section:
    """A config section: setting an attribute that is not a field is an error (a misspelled key
    in a config file, ``c.model.dmodel = 64``, must not be silently ignored)."""

    def __setattr__(self, name, value):
        names = [f.name for f in dataclasses.fields(self)]
        if name not in names:
            raise _unknown_key(f"{_SECTION_NAMES.get(type(self).__name__, '')}{name}", names)
        object.__setattr__(self, name, value)


@dataclass
class ModelConfig(_Section):
    """The decoder LM. ``pattern`` lists the residual sub-layers by block name."""

    vocab_size: int = 256
    d_model: int = 64
    num_heads: int = 2
    head_dim: int = 0  # 0: d_model // num_heads
    pattern: str = "A,F,A,F"  # comma-separated block names or aliases (see memjax.nn.registry)
    pattern_repeat: int = 1
    # Run the pattern_repeat groups under nnx.scan (compile time independent of depth); groups with
    # a block that cannot be stacked are unrolled. False: the unrolled layout of older checkpoints.
    scan_layers: bool = True
    remat: str = "none"  # what the backward recomputes in scanned groups: none, full, dots, dots_no_batch
    mlp_hidden: int = 0  # 0: 4 * d_model (gated MLP hidden width)
    max_seq_len: int = 2048
    rope_theta: float = 10000.0
    tie_embeddings: bool = True
    norm_eps: float = 1e-6
    compute_dtype: str = "float32"  # activations / matmuls; params stay float32
    param_dtype: str = "float32"
    # Per block-type options, validated against the block's Options dataclass:
    # {"gated_deltanet": {"chunk_size": 32}, "attention": {"window": 0}}
    blocks: dict = field(default_factory=dict)

    @property
    def resolved_head_dim(self) -> int:
        return self.head_dim or self.d_model // self.num_heads

    @property
    def resolved_mlp_hidden(self) -> int:
        return self.mlp_hidden or 4 * self.d_model


@dataclass
class DataConfig(_Section):
    """Which task feeds the loop and its knobs (validated by the task's own Options)."""

    task: str = "mqar"
    seq_len: int = 64  # model input length
    options: dict = field(default_factory=dict)  # task-specific, e.g. {"num_kv_pairs": 4}
    num_train_examples: int = 100_000
    num_eval_examples: int = 1_000
    seed: int = 0
    shuffle: bool = True
    worker_count: int = 0  # Grain worker processes (0: in-process)
    # Attach each example's cluster path for hierarchical memories (memjax.data.cluster_paths):
    # {"depth": 2, "branching": 4, ...}; empty: off.
    cluster_paths: dict = field(default_factory=dict)


@dataclass
class OptimConfig(_Section):
    learning_rate: float = 1e-3
    warmup_steps: int = 100
    end_lr_fraction: float = 0.0  # cosine decays to learning_rate * end_lr_fraction
    weight_decay: float = 0.1
    b1: float = 0.9
    b2: float = 0.95
    grad_clip_norm: float = 1.0
    # Sparse-read tables (product-key values, n-gram tables) get their own constant learning rate and no
    # weight decay (Memory Layers at Scale); 0: same as others.
    memory_values_lr: float = 0.0


@dataclass
class MeshConfig(_Section):
    """Device mesh. Sizes multiply to the device count; -1 takes the remaining devices."""

    data: int = -1
    fsdp: int = 1
    # Sequence (context) parallelism: the time axis of activations split over this many devices;
    # the recurrent memories exchange their states (memjax.memory.sequence_parallel).
    seq: int = 1
    tensor: int = 1
    # Logical axis -> mesh axis (or tuple of mesh axes, or None for replicated).
    rules: dict = field(
        default_factory=lambda: {
            "batch": ("data", "fsdp"),
            "embed": "fsdp",
            "heads": "tensor",
            "kv": None,
            "mlp": "tensor",
            "vocab": "tensor",
            "memory_slots": "tensor",
            "memory_dim": None,
            "length": "seq",
            "state": None,
            "conv": None,
            "layers": None,  # the stacked axis of scanned layers
        }
    )


@dataclass
class TrainConfig(_Section):
    steps: int = 1000
    batch_size: int = 32
    microbatches: int = 1  # gradient accumulation: batch_size is split into this many
    # Periodic actions every so many steps (None: off; the last step still logs, evaluates and
    # saves a checkpoint).
    eval_every: int | None = 250
    eval_batches: int = 8
    log_every: int | None = 25
    checkpoint_every: int | None = 250
    keep_checkpoints: int = 3
    async_checkpointing: bool = True
    seed: int = 0
    # Stop this invocation at this step (0: run to train.steps); the schedule still follows
    # train.steps, so a later run resumes as if never interrupted (time-limited jobs).
    stop_at_step: int = 0
    target_accuracy: float = 0.0  # stop early once eval accuracy reaches it (0: never)
    progress: bool = True
    # Test hook: make the loss NaN at this step (0: never) to exercise the NaN guard.
    inject_nan_at_step: int = 0
    # Where host-resident parameter tables (memjax.train.memory_bank) live: a directory, a
    # gs://bucket/path URL or a TensorStore kvstore spec; "" : <workdir>/host_tables.
    host_tables_dir: str = ""


@dataclass
class Config(_Section):
    name: str = "experiment"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    mesh: MeshConfig = field(default_factory=MeshConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_dict(cls, d: dict) -> "Config":
        return _from_dict(cls, d, "")


_SECTION_NAMES = {"ModelConfig": "model.", "DataConfig": "data.", "OptimConfig": "optim.", "MeshConfig": "mesh.",
                  "TrainConfig": "train.", "Config": ""}

# ----------------------------------------------------------------------------- loading


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    """Import ``path`` (a ``configs/*.py`` file), call ``get_config()``, apply overrides, validate."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    spec = importlib.util.spec_from_file_location(f"memjax_config_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {str(path)!r} defines no get_config()")
    cfg = module.get_config()
    apply_overrides(cfg, overrides or [])
    validate(cfg)
    return cfg


def apply_overrides(cfg: Config, overrides: list[str]) -> Config:
    """Apply ``key.path=value`` strings in place. Values are Python literals (strings may be bare)."""
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r} is not of the form key.path=value")
        key, raw = item.split("=", 1)
        set_by_path(cfg, key.strip(), _parse_literal(raw.strip()))
    return cfg


def set_by_path(cfg: Any, key: str, value: Any) -> None:
    parts = key.split(".")
    obj = cfg
    for i, part in enumerate(parts[:-1]):
        if dataclasses.is_dataclass(obj):
            _check_field(obj, part, ".".join(parts[: i + 1]))
            obj = getattr(obj, part)
        elif isinstance(obj, dict):
            obj = obj.setdefault(part, {})
        else:
            raise ConfigError(f"config key {key!r}: {'.'.join(parts[:i + 1])!r} is not a section")
    last = parts[-1]
    if dataclasses.is_dataclass(obj):
        f = _check_field(obj, last, key)
        hint = typing.get_type_hints(type(obj))[f.name]
        setattr(obj, last, _coerce(value, hint, key))
    elif isinstance(obj, dict):
        obj[last] = value  # free-form sections (block / task options) are checked in validate()
    else:
        raise ConfigError(f"config key {key!r} does not exist")


def _check_field(obj: Any, name: str, key: str) -> dataclasses.Field:
    fields = {f.name: f for f in dataclasses.fields(obj)}
    if name not in fields:
        raise _unknown_key(key, fields)
    return fields[name]


def _parse_literal(raw: str) -> Any:
    try:
        return ast.literal_eval(raw)
    except (ValueError, SyntaxError):
        if raw.lower() in ("true", "false"):
            return raw.lower() == "true"
        return raw  # bare string


def _coerce(value: Any, hint: Any, key: str) -> Any:
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        for arg in typing.get_args(hint):
            try:
                return _coerce(value, arg, key)
            except ConfigError:
                continue
        raise ConfigError(f"config key {key!r} expects {hint}, got {value!r}")
    if hint is type(None):
        if value is None:
            return None
        raise ConfigError(f"config key {key!r} expects None, got {value!r}")
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    base = origin or hint
    if base is bool and not isinstance(value, bool):
        raise ConfigError(f"config key {key!r} expects a bool (True/False), got {value!r}")
    if base is int and (isinstance(value, bool) or not isinstance(value, int)):
        raise ConfigError(f"config key {key!r} expects an int, got {value!r}")
    if isinstance(base, type) and not isinstance(value, base):
        raise ConfigError(
            f"config key {key!r} expects {base.__name__}, got {type(value).__name__} {value!r}"
        )
    return value


def _from_dict(cls: type, d: dict, prefix: str) -> Any:
    hints = typing.get_type_hints(cls)
    kwargs = {}
    names = {f.name for f in dataclasses.fields(cls)}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if k not in names:
            raise _unknown_key(key, names)
        hint = hints[k]
        if dataclasses.is_dataclass(hint):
            kwargs[k] = _from_dict(hint, v, key + ".")
        else:
            kwargs[k] = _coerce(v, hint, key)
    return cls(**kwargs)


def options_from_dict(options_cls: type, values: dict, where: str) -> Any:
    """Build a block's or task's Options dataclass from a dict, rejecting unknown keys."""
    if not isinstance(values, dict):
        raise ConfigError(f"config key {where!r} must be a dict, got {values!r}")
    return _from_dict(options_cls, values, where + ".")


# ----------------------------------------------------------------------------- validation


_DTYPES = ("float32", "bfloat16", "float16", "float64")

# Checks that need more than this module knows (the block registry, the task registry, the mesh):
# the packages that own that knowledge register them when imported (``import memjax`` imports
# them all), so that ``validate`` stays the one place every config passes through while this
# module imports nothing of memjax.
_CHECKS: list[Callable[["Config", int | None], None]] = []


def register_check(fn: Callable[["Config", int | None], None]):
    """Add ``fn(cfg, num_devices)`` to :func:`validate` (raises :class:`ConfigError`)."""
    if fn not in _CHECKS:
        _CHECKS.append(fn)
    return fn


def _type_problems(obj: Any, prefix: str) -> list[str]:
    """Every field whose value does not have its declared type (values set in a config file
    bypass ``--set``'s parsing)."""
    out = []
    hints = typing.get_type_hints(type(obj))
    for f in dataclasses.fields(obj):
        value, key = getattr(obj, f.name), f"{prefix}{f.name}"
        if dataclasses.is_dataclass(hints[f.name]):
            out += _type_problems(value, key + ".")
            continue
        try:
            _coerce(value, hints[f.name], key)
        except ConfigError as e:
            out.append(str(e))
    return out


def _value_problems(cfg: Config) -> list[str]:
    m, t, d = cfg.model, cfg.train, cfg.data
    out = []
    for key, value in {
        "model.d_model": m.d_model,
        "model.num_heads": m.num_heads,
        "model.vocab_size": m.vocab_size,
        "model.pattern_repeat": m.pattern_repeat,
        "model.max_seq_len": m.max_seq_len,
        "data.seq_len": d.seq_len,
        "train.batch_size": t.batch_size,
        "train.microbatches": t.microbatches,
        "train.steps": t.steps,
        "train.eval_batches": t.eval_batches,
        "train.keep_checkpoints": t.keep_checkpoints,
    }.items():
        if value <= 0:
            out.append(f"config key {key!r} must be positive, got {value}")
    for key in ("eval_every", "log_every", "checkpoint_every"):
        value = getattr(t, key)
        if value is not None and value <= 0:
            out.append(f"config key 'train.{key}' must be a positive number of steps, or None to switch it off; "
                       f"got {value}")
    for key, value in {"model.head_dim": m.head_dim, "model.mlp_hidden": m.mlp_hidden,
                       "optim.warmup_steps": cfg.optim.warmup_steps, "optim.weight_decay": cfg.optim.weight_decay,
                       "optim.memory_values_lr": cfg.optim.memory_values_lr, "train.stop_at_step": t.stop_at_step,
                       "train.inject_nan_at_step": t.inject_nan_at_step,
                       # (0: every window of the files, for the text tasks)
                       "data.num_train_examples": d.num_train_examples,
                       "data.num_eval_examples": d.num_eval_examples}.items():
        if value < 0:
            out.append(f"config key {key!r} must be >= 0, got {value}")
    if cfg.optim.learning_rate <= 0:
        out.append(f"config key 'optim.learning_rate' must be positive, got {cfg.optim.learning_rate}")
    for key in ("b1", "b2", "end_lr_fraction"):
        if not 0 <= getattr(cfg.optim, key) <= 1:
            out.append(f"config key 'optim.{key}' must be in [0, 1], got {getattr(cfg.optim, key)}")
    if cfg.optim.grad_clip_norm < 0:
        out.append(f"config key 'optim.grad_clip_norm' must be >= 0 (0: no clipping), got {cfg.optim.grad_clip_norm}")
    if m.head_dim == 0 and m.num_heads > 0 and m.d_model % m.num_heads:
        out.append(f"config key 'model.num_heads' ({m.num_heads}) must divide model.d_model ({m.d_model})")
    for key in ("compute_dtype", "param_dtype"):
        if getattr(m, key) not in _DTYPES:
            out.append(f"config key 'model.{key}' must be one of {_DTYPES}, got {getattr(m, key)!r}")
    if d.seq_len > m.max_seq_len:
        out.append(f"config key 'data.seq_len' ({d.seq_len}) exceeds model.max_seq_len ({m.max_seq_len})")
    if t.microbatches > 0 and t.batch_size % t.microbatches:
        out.append(f"config key 'train.microbatches' ({t.microbatches}) must divide train.batch_size ({t.batch_size})")
    if d.worker_count < 0:
        out.append(f"config key 'data.worker_count' must be >= 0 (0: in-process), got {d.worker_count}")
    if not 0 <= t.target_accuracy <= 1:
        out.append(f"config key 'train.target_accuracy' must be in [0, 1], got {t.target_accuracy}")
    for key, v in cfg.mesh.rules.items():
        axes = v if isinstance(v, (tuple, list)) else (v,)
        for a in axes:
            if a is not None and a not in ("data", "fsdp", "seq", "tensor"):
                out.append(f"config key 'mesh.rules.{key}': unknown mesh axis {a!r}; "
                           "allowed: data, fsdp, seq, tensor, None")
    return out


def validate(cfg: Config, num_devices: int | None = None) -> None:
    """Check every field's type, the values and their consistency across sections, then every
    registered check (blocks and their options, the task and its options, the mesh).
    ``num_devices`` enables the mesh checks. All problems are reported at once, one per line, in
    one :class:`ConfigError`."""
    problems = _type_problems(cfg, "")
    if not problems:  # (values of the wrong type would make the value checks fail obscurely)
        problems = _value_problems(cfg)
        for check in _CHECKS:
            try:
                check(cfg, num_devices)
            except ConfigError as e:
                problems.append(str(e))
            except Exception:
                if not problems:
                    raise
                # (a registered check tripping over a value already reported above)
    if len(problems) == 1:
        raise ConfigError(problems[0])
    if problems:
        raise ConfigError(f"{len(problems)} problems in the config:\n  " + "\n  ".join(problems))
