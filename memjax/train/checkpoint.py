"""Orbax checkpointing of the train state and the data iterator position, in one place.

Each checkpoint is a ``Composite`` of ``state`` (params, optimizer state, step) and
``data`` (the Grain iterator state as JSON). Saves are asynchronous; a checkpoint
becomes visible only once complete, so a process killed mid-save leaves the previous
one restorable. Restoring uses an abstract target carrying the *current* shardings,
so a checkpoint written on one mesh restores onto another.
"""
from __future__ import annotations

import os

import jax
import orbax.checkpoint as ocp


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every: int = 0, async_save: bool = True):
        self.directory = os.path.abspath(directory)
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            enable_async_checkpointing=async_save,
            create=True,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        return self.manager.save(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
            force=force,
        )

    def restore(self, abstract_state, step: int | None = None):
        """Returns ``(state, data_state)`` of ``step`` (default: latest), laid out as ``abstract_state``."""
        step = self.latest_step() if step is None else step
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        return out["state"], out["data"]

    def wait(self) -> None:
        self.manager.wait_until_finished()

    def close(self) -> None:
        self.manager.wait_until_finished()
        self.manager.close()


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
