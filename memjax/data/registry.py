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

import importlib

_TASKS: dict[str, type] = {}

TASK_MODULES = (
    "memjax.data.mqar",
    "memjax.data.copying",
    "memjax.data.passkey",
    "memjax.data.facts",
    "memjax.data.induction",
    "memjax.data.text",
)


def register_task(name: str):
    def deco(cls):
        if name in _TASKS:
            raise ValueError(f"task {name!r} is registered twice")
        cls.task_name = name
        _TASKS[name] = cls
        return cls

    return deco


def _load_all() -> None:
    for mod in TASK_MODULES:
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as e:
            if e.name != mod:
                raise


def get_task(name: str) -> type:
    _load_all()
    return _TASKS[name]


def known_tasks() -> list[str]:
    _load_all()
    return sorted(_TASKS)
