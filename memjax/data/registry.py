"""Task registry: ``config.data.task`` names a registered task class.

A task is a deterministic random-access source (one example per index, generated
from ``(seed, split, index)``), so Grain can shuffle, shard and checkpoint it::

    @register_task("mqar")
    class MQAR:
        @dataclasses.dataclass
        class Options: ...                       # knobs under config.data.options
            def validate(self, data_cfg, model_cfg): ...   # raise ConfigError naming the key
        def __init__(self, opts, *, seq_len, vocab_size, split, num_examples, seed): ...
        def __len__(self): ...
        def __getitem__(self, i) -> dict:        # numpy arrays, each [seq_len]:
            # inputs int32, targets int32, mask float32 (1 on scored positions), segment_ids int32
        def metrics(self, batch, predictions) -> dict   # optional: extra eval metrics (numpy)
"""
from __future__ import annotations

from memjax.config import Config, ConfigError, options_from_dict, register_check

_TASKS: dict[str, type] = {}

def register_task(name: str):
    def deco(cls):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.task_name = name
        _TASKS[name] = cls
        return cls

    return deco


def get_task(name: str) -> type:
    return _TASKS[name]


def known_tasks() -> list[str]:
    return sorted(_TASKS)


def check_task(cfg: Config, num_devices: int | None = None) -> None:
    """``data.task`` is registered and ``data.options`` fit its Options (registered with
    :func:`memjax.config.register_check`)."""
    d = cfg.data
    try:
        task_cls = get_task(d.task)
    except KeyError:
        raise ConfigError(f"config key 'data.task': unknown task {d.task!r}; known: {', '.join(known_tasks())}") from None
    opts = options_from_dict(task_cls.Options, d.options, "data.options")
    if hasattr(opts, "validate"):
        opts.validate(d, cfg.model)


register_check(check_task)
