"""Orbax checkpointing of the train state and the data iterator position, in one place.

Each checkpoint is a ``Composite`` of ``state`` (params, optimizer state, step) and
``data`` (the Grain iterator state as JSON). Saves are asynchronous; a checkpoint
becomes visible only once complete, so a process killed mid-save leaves the previous
one restorable. Restoring uses an abstract target carrying the *current* shardings,
so a checkpoint written on one mesh restores onto another.

Host-resident tables (``bank``: a :class:`memjax.train.memory_bank.MemoryBank`) are part of a
checkpoint too: saving step ``s`` first snapshots them synchronously (so a complete Orbax step
always has its snapshot), snapshots of steps Orbax no longer keeps are deleted, and restoring
step ``s`` copies its snapshot back into the live tables (a step whose snapshot is missing counts
as unreadable: the previous one is tried).
"""
from __future__ import annotations

import contextlib
import os
import warnings

import jax
import orbax.checkpoint as ocp


class CheckpointError(RuntimeError):
    """No checkpoint that can be read."""


def steps_on_disk(directory: str) -> list[int]:
    """Steps of the complete checkpoints in ``directory`` (ascending; none if it does not exist).

    Creates nothing. Orbax writes a step into a temporary directory and renames it when complete,
    so an interrupted save is never listed.
    """
    if not os.path.isdir(directory):
        return []
    return sorted(int(n) for n in os.listdir(directory)
                  if n.isdigit() and os.path.isdir(os.path.join(directory, n)))


class Checkpointer:
    def __init__(self, directory: str, *, keep: int = 3, every: int = 0, async_save: bool = True,
                 read_only: bool = False, bank=None):
        self.directory = os.path.abspath(directory)
        self.bank = bank  # host tables saved and restored with each step (None: none)
        self._pending = None  # the step of a save still being written
        if read_only and not steps_on_disk(self.directory):
            raise CheckpointError(f"no checkpoint in {self.directory}")
        options = ocp.CheckpointManagerOptions(
            max_to_keep=keep,
            save_interval_steps=max(every, 1),
            enable_async_checkpointing=async_save,
            create=not read_only,
            read_only=read_only,
        )
        # (handlers named up front so that item_metadata works before the first save / restore)
        self.manager = ocp.CheckpointManager(
            self.directory, options=options,
            item_handlers={"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()})

    def latest_step(self) -> int | None:
        return self.manager.latest_step()

    def save(self, step: int, state, data_state: dict, *, force: bool = False) -> bool:
        """Start saving ``step`` (asynchronously by default). A failed write (a full disk, a lost
        mount) surfaces here or in :meth:`wait` as :class:`CheckpointError`; the half-written
        step stays in Orbax's temporary directory and the previous checkpoint stays restorable."""
        with self._failures(step):
            if self.bank is not None and (force or self.manager.should_save(step)):
                self.bank.snapshot(step)
            started = self.manager.save(
                step,
                args=ocp.args.Composite(state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)),
                force=force,
            )
            if self.bank is not None:
                self.bank.retain(set(self.manager.all_steps()) | {step})
        if started:
            self._pending = step
        return started

    @contextlib.contextmanager
    def _failures(self, step: int):
        try:
            yield
        except Exception as e:  # noqa: BLE001 (Orbax / TensorStore raise ValueError, OSError, ...)
            failed = self._pending or step
            text = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
            cause = "no space left on device" if "No space left" in str(e) or "os_error_code='28'" in str(e) else text
            intact = [s for s in steps_on_disk(self.directory) if s != failed]
            last = f"the last complete checkpoint is step {intact[-1]}" if intact else "no complete checkpoint yet"
            raise CheckpointError(f"saving checkpoint step {failed} in {self.directory} failed ({cause[:300]}); "
                                  f"{last}: free space or use another --workdir, then rerun to resume") from e

    def restore(self, abstract_state, step: int | None = None):
        """Returns ``(state, data_state, step)`` of ``step``, laid out as ``abstract_state``.

        Default: the newest checkpoint that reads back; an unreadable one (truncated or garbled
        files) is skipped with a warning naming it, and :class:`CheckpointError` says so if none is
        intact. Raises :class:`CheckpointMismatch` (before reading any array) when the saved
        parameters do not have the paths and shapes of ``abstract_state["params"]``.
        """
        if step is not None:
            return (*self._restore(abstract_state, step), step)
        steps = sorted(self.manager.all_steps(), reverse=True)
        if not steps:
            raise CheckpointError(f"no checkpoint in {self.directory}")
        failures = []
        for s in steps:
            try:
                out = self._restore(abstract_state, s)
            except CheckpointMismatch:
                raise
            except Exception as e:  # noqa: BLE001 (any read failure: fall back to an older one)
                reason = f"{type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
                failures.append(f"step {s} ({reason})")
                warnings.warn(f"checkpoint step {s} in {self.directory} cannot be read ({reason}); "
                              "trying the previous one", RuntimeWarning, stacklevel=2)
                continue
            return (*out, s)
        raise CheckpointError(f"no intact checkpoint in {self.directory}: " + "; ".join(failures))

    def _restore(self, abstract_state, step: int):
        if isinstance(abstract_state, dict) and "params" in abstract_state:
            saved = self.manager.item_metadata(step)["state"]
            saved = getattr(saved, "tree", saved)
            if isinstance(saved, dict) and "params" in saved:
                check_same_parameters(_shapes(saved["params"]), _shapes(abstract_state["params"]),
                                      f"checkpoint step {step} in {self.directory}")
        out = self.manager.restore(
            step,
            args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()),
        )
        if self.bank is not None:
            self.bank.restore(step)
        return out["state"], out["data"]

    def wait(self) -> None:
        with self._failures(self._pending or 0):
            self.manager.wait_until_finished()
        self._pending = None

    def close(self) -> None:
        self.wait()
        self.manager.close()


class CheckpointMismatch(ValueError):
    """The checkpoint's parameters are not the model's (another architecture or layer layout)."""


def _key(k) -> str:
    for attr in ("key", "idx", "name"):
        if hasattr(k, attr):
            return str(getattr(k, attr))
    return str(k)


def _shapes(tree) -> dict[str, tuple]:
    """``{"a/b/0/c": shape}`` of a tree of arrays, ShapeDtypeStructs or Orbax array metadata."""
    leaves = jax.tree_util.tree_flatten_with_path(tree, is_leaf=lambda x: hasattr(x, "shape"))[0]
    return {"/".join(_key(k) for k in path): tuple(x.shape) for path, x in leaves}


def check_same_parameters(saved: dict, expected: dict, what: str) -> None:
    """Raise :class:`CheckpointMismatch` naming the differing parameters of ``saved`` vs ``expected``
    (``{path: shape}``), with the likely cause when only the layer layout differs."""
    if saved == expected:
        return
    missing = sorted(set(expected) - set(saved))
    extra = sorted(set(saved) - set(expected))
    reshaped = sorted(k for k in set(saved) & set(expected) if saved[k] != expected[k])
    lines = [f"{what} does not hold this model's parameters:"]
    for label, keys, show in (("missing from the checkpoint", missing, lambda k: f"{k} {expected[k]}"),
                              ("in the checkpoint but not in the model", extra, lambda k: f"{k} {saved[k]}"),
                              ("of another shape", reshaped, lambda k: f"{k}: saved {saved[k]}, model {expected[k]}")):
        if keys:
            lines.append(f"  {len(keys)} {label}: " + ", ".join(show(k) for k in keys[:4])
                         + (", ..." if len(keys) > 4 else ""))
    layout = lambda paths: ("scanned (stack/...)" if any(k.startswith("stack/") for k in paths) else
                            "unrolled (blocks/<i>/...)" if any(k.startswith("blocks/") for k in paths) else None)
    if layout(saved) and layout(expected) and layout(saved) != layout(expected):
        flag = "False" if layout(saved).startswith("unrolled") else "True"
        lines.append(f"  The checkpoint's layers are {layout(saved)}, the model's {layout(expected)}: "
                     f"restore it with --set model.scan_layers={flag} (checkpoints written before scanned "
                     "layers, or with model.scan_layers=False, are unrolled).")
    else:
        lines.append("  The model's config (pattern, d_model, heads, block options) differs from the one the "
                     "checkpoint was trained with: use that run's config.json.")
    raise CheckpointMismatch("\n".join(lines))


def abstract_like(tree):
    """ShapeDtypeStructs (with shardings) of a tree of arrays: the restore target."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)
