"""Host-resident parameter tables in TensorStore: the store, its snapshots, and the loop's runtime.

A *host table* is a parameter too large for the device (e.g. the hierarchical memory bank of
:mod:`memjax.nn.hierarchical_memory`, Pouransari et al. 2025): ``[num_rows, *row_shape]`` rows in a
zarr array, one row per chunk, so fetching or writing ``n`` rows touches exactly ``n`` chunk files.
Each step fetches the rows its batch needs host -> device, differentiates the loss with respect to
them, applies a row-wise Adam (:func:`row_adam`) and writes the updated rows back; rows that were
not fetched are never rewritten (their chunk files stay byte-identical).

Layout under ``root`` (a local directory, a ``gs://bucket/path`` URL, or any TensorStore kvstore
spec dict: every path goes through the same kvstore spec, so a bucket works like a disk)::

    live/<table>/{value,mu,nu,count}       the current rows, their Adam moments and step counts
    live/<table>/INITIALIZED               written once the initial values are complete
    snapshots/<step>/<table>/{...}         a copy of live/ taken when checkpoint <step> is saved
    snapshots/<step>/COMMITTED             written last: a snapshot without it is incomplete

Checkpointing is **copy-on-checkpoint** (:meth:`MemoryBank.snapshot` copies ``live/`` into
``snapshots/<step>/`` before the Orbax checkpoint of that step is started; resuming copies the
snapshot back). Why not versioned arrays: a snapshot is a plain, self-contained zarr array that
any reader (and ``rm``) understands, its lifetime follows the Orbax step exactly (deleted when
Orbax drops the step), and the live array has one writer and no version chain to garbage-collect.
The cost is a full copy of the bank per checkpoint (I/O proportional to the bank, not to the rows
touched since the last checkpoint); copying only the chunks dirtied since the previous snapshot is
the upgrade path when the bank grows to many GB.

The optimizer state of a table lives beside its rows (``mu``, ``nu``: Adam moments, ``count``:
how many updates each row has had, for bias correction), so it survives a resume with them.

The *module protocol* the loop relies on (no knowledge of any particular memory): a module holding
:class:`~memjax.nn.host_params.HostParam` variables (``[capacity, *row_shape]``: the window of
fetched rows; metadata ``num_rows`` and ``init_std``) also holds one
:class:`~memjax.nn.host_params.HostIndex` variable (``[B, L]`` int32: which fetched rows each
example uses) and a method ``host_row_ids(batch) -> [B, L]`` int (the global row ids each example
needs, computed on the host from the NumPy batch). :class:`HostTables` finds such modules,
fetches, and writes back.
"""
from __future__ import annotations

import dataclasses
import json
import os
import zlib
from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tensorstore as ts
from flax import nnx

from memjax.nn.host_params import HostIndex, HostParam

__all__ = [
    "BankError",
    "FetchPlan",
    "HostModule",
    "HostTables",
    "MemoryBank",
    "TableSpec",
    "TableStore",
    "discover",
    "kvstore_spec",
    "plan_fetch",
    "row_adam",
]

ARRAYS = ("value", "mu", "nu", "count")


class BankError(ValueError):
    """A host table that cannot be opened, read or written as asked (bad path, wrong shapes, ...)."""


# ----------------------------------------------------------------------------- kvstore paths


def kvstore_spec(root) -> dict:
    """A TensorStore kvstore spec (dict) of a directory: a local path, a URL (``gs://b/p``,
    ``file:///p``, ``memory://``) or a kvstore spec dict (returned as a copy). The path ends in
    ``/`` so that sub-paths can be appended."""
    if isinstance(root, dict):
        spec = dict(root)
    elif isinstance(root, str) and root:
        if "://" in root:
            try:
                spec = ts.KvStore.Spec(root).to_json()
            except Exception as e:
                raise BankError(f"memory bank: {root!r} is not a kvstore URL TensorStore can open ({e})") from e
        else:
            spec = {"driver": "file", "path": os.path.abspath(root)}
    else:
        raise BankError(f"memory bank: root must be a directory path, a URL or a kvstore spec dict, got {root!r}")
    path = spec.get("path", "")
    if path and not path.endswith("/"):
        spec["path"] = path + "/"
    return spec


def _join(spec: dict, *parts: str) -> dict:
    return {**spec, "path": spec.get("path", "") + "".join(p.strip("/") + "/" for p in parts)}


def _describe(spec: dict) -> str:
    return json.dumps({k: v for k, v in spec.items() if k in ("driver", "bucket", "path")}, sort_keys=True)


def _first_line(e: Exception) -> str:
    text = str(e).strip()
    return (text.splitlines()[0] if text else type(e).__name__).split(" [tensorstore_spec")[0][:300]


# ----------------------------------------------------------------------------- one table


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """A table: ``num_rows`` rows of ``row_shape``, initialised ``N(0, init_std^2)`` from ``seed``.
    ``name``: a path-safe identifier (``blocks.3.w1``)."""

    name: str
    num_rows: int
    row_shape: tuple
    dtype: str = "float32"
    init_std: float = 0.02
    seed: int = 0

    def __post_init__(self):
        if not self.name or "/" in self.name or self.name.startswith("."):
            raise BankError(f"TableSpec: name must be a non-empty path-safe identifier, got {self.name!r}")
        if isinstance(self.num_rows, bool) or not isinstance(self.num_rows, (int, np.integer)) or self.num_rows < 1:
            raise BankError(f"TableSpec {self.name}: num_rows must be a positive int, got {self.num_rows!r}")
        if any(not isinstance(d, (int, np.integer)) or d < 1 for d in self.row_shape):
            raise BankError(f"TableSpec {self.name}: row_shape must hold positive ints, got {self.row_shape!r}")
        if np.dtype(self.dtype).kind != "f":
            raise BankError(f"TableSpec {self.name}: dtype must be floating, got {self.dtype!r}")


def _array_spec(kv: dict, shape: tuple, dtype, chunks: tuple) -> dict:
    return {"driver": "zarr", "kvstore": kv,
            "metadata": {"shape": list(shape), "chunks": list(chunks), "dtype": np.dtype(dtype).str,
                         "compressor": None, "fill_value": 0}}


def _layouts(spec: TableSpec) -> dict[str, tuple]:
    """``array -> (shape, dtype, chunks)``: one row per chunk for the rows and their moments; the
    per-row counts in chunks of 4096 (tiny; one file per row would be wasteful)."""
    rows = (spec.num_rows, *spec.row_shape)
    one = (1, *spec.row_shape)
    return {"value": (rows, spec.dtype, one), "mu": (rows, np.float32, one), "nu": (rows, np.float32, one),
            "count": ((spec.num_rows,), np.int32, (min(spec.num_rows, 4096),))}


# (the live arrays are rewritten every step and restored from a snapshot after a crash: no fsync)
_LIVE_CONTEXT = {"file_io_sync": False}


class TableStore:
    """The four arrays of one table under the kvstore directory ``kv`` (see the module docstring).

    ``TableStore(kv, spec, create=True)``: opens the arrays, creating (and initialising) them if
    they do not exist; existing arrays of another shape or dtype raise :class:`BankError`.
    """

    def __init__(self, kv: dict, spec: TableSpec, *, create: bool = True, context: ts.Context | None = None):
        self.spec, self.kv = spec, kv
        self.context = context or ts.Context()
        self.arrays: dict[str, ts.TensorStore] = {}
        for name, (shape, dtype, chunks) in _layouts(spec).items():
            s = _array_spec(_join(kv, name), shape, dtype, chunks)
            try:
                self.arrays[name] = ts.open(s, create=create, open=True, context=self.context).result()
            except Exception as e:
                msg = _first_line(e)
                if "Expected" in msg:  # (TensorStore: Expected "shape" of [..] but received: [..])
                    raise BankError(f"memory bank table {spec.name!r} at {_describe(_join(kv, name))}: the stored "
                                    f"array does not match the model ({msg}); expected shape {list(shape)} "
                                    f"{np.dtype(dtype).name}: use the run's own config or another directory") from e
                raise BankError(f"memory bank table {spec.name!r}: cannot open {_describe(_join(kv, name))} "
                                f"({msg})") from e

    def _check_ids(self, ids) -> np.ndarray:
        ids = np.asarray(ids)
        if ids.ndim != 1 or not np.issubdtype(ids.dtype, np.integer):
            raise BankError(f"table {self.spec.name!r}: ids must be a 1-d integer array, got {ids.dtype} {ids.shape}")
        if ids.size and (ids.min() < 0 or ids.max() >= self.spec.num_rows):
            raise BankError(f"table {self.spec.name!r}: ids must be in [0, {self.spec.num_rows}), got "
                            f"[{ids.min()}, {ids.max()}]")
        return ids.astype(np.int64)

    def read(self, ids, arrays=ARRAYS) -> dict[str, np.ndarray]:
        """``{array: rows[ids]}`` (``ids: [n]`` int, any order; duplicates allowed)."""
        ids = self._check_ids(ids)
        futures = {a: self.arrays[a].oindex[ids].read() for a in arrays}  # (concurrent reads)
        return {a: f.result() for a, f in futures.items()}

    def write(self, ids, **values) -> None:
        """``rows[ids] = values[array]`` for each given array; ``ids`` must be unique (two writes to
        one row in one call would race)."""
        for f in self.write_async(ids, **values):
            f.result()

    def write_async(self, ids, **values) -> list:
        """:meth:`write`, returning the TensorStore write futures (checks are done before)."""
        ids = self._check_ids(ids)
        if len(np.unique(ids)) != len(ids):
            raise BankError(f"table {self.spec.name!r}: write ids must be unique")
        futures = []
        for a, v in values.items():
            if a not in self.arrays:
                raise BankError(f"table {self.spec.name!r}: unknown array {a!r}; have {ARRAYS}")
            want = (len(ids), *self.arrays[a].shape[1:])
            v = np.asarray(v)
            if v.shape != want:
                raise BankError(f"table {self.spec.name!r}: {a} rows must have shape {want}, got {v.shape}")
            futures.append(self.arrays[a].oindex[ids].write(v.astype(self.arrays[a].dtype.numpy_dtype)))
        return futures

    def initialise(self) -> None:
        """``value ~ N(0, init_std^2)``, deterministic in ``(seed, name, row)`` whatever the store;
        moments and counts zero (the fill value). Written in slabs of at most ~64 MiB of rows."""
        s = self.spec
        row_elems = int(np.prod(s.row_shape))
        slab = max(1, min(s.num_rows, (64 << 20) // (4 * row_elems)))
        name_key = zlib.crc32(s.name.encode())
        for start in range(0, s.num_rows, slab):
            stop = min(start + slab, s.num_rows)
            rng = np.random.default_rng([s.seed, name_key, start])
            vals = (rng.standard_normal((stop - start, *s.row_shape)) * s.init_std).astype(s.dtype)
            self.arrays["value"][start:stop].write(vals).result()
        for a in ("mu", "nu", "count"):  # (a re-initialisation must clear the moments too)
            self.arrays[a].write(np.zeros((), self.arrays[a].dtype.numpy_dtype)).result()

    def read_all(self) -> dict[str, np.ndarray]:
        return {a: self.arrays[a].read().result() for a in ARRAYS}


# ----------------------------------------------------------------------------- all tables + snapshots


class MemoryBank:
    """Every table of a run under ``root``, with snapshots tied to checkpoint steps.

    ``MemoryBank(root, specs, fresh=False)``: opens (creating and initialising what is missing)
    ``live/<table>``; ``fresh=True`` re-initialises the live tables (a run starting without a
    checkpoint must not inherit the rows a crashed earlier attempt wrote).
    """

    def __init__(self, root, specs: list[TableSpec], *, fresh: bool = False):
        self.root = kvstore_spec(root)
        names = [s.name for s in specs]
        if len(set(names)) != len(names):
            raise BankError(f"memory bank: table names must be unique, got {names}")
        self.specs = {s.name: s for s in specs}
        try:
            self.kv = ts.KvStore.open(self.root).result()
        except Exception as e:
            raise BankError(f"memory bank: cannot open {_describe(self.root)} ({_first_line(e)})") from e
        self._live_context = ts.Context(_LIVE_CONTEXT) if self.root.get("driver") == "file" else ts.Context()
        self.tables: dict[str, TableStore] = {}
        for s in specs:
            marker = f"live/{s.name}/INITIALIZED"
            done = self._exists(marker)
            store = TableStore(_join(self.root, "live", s.name), s, context=self._live_context)
            if fresh or not done:
                store.initialise()
                self._put(marker, json.dumps(dataclasses.asdict(s)).encode())
            self.tables[s.name] = store

    @classmethod
    def open_snapshot(cls, root, specs: list[TableSpec], step: int) -> MemoryBank:
        """A view of snapshot ``step`` (the bank as checkpoint ``step`` saved it) whose ``tables``
        read ``snapshots/<step>/`` directly: for evaluation, which must neither create nor change
        the live tables. Nothing is created; reading only (writing through it would change the
        snapshot). :class:`BankError` if the snapshot is missing or incomplete."""
        bank = cls.__new__(cls)
        bank.root = kvstore_spec(root)
        bank.specs = {s.name: s for s in specs}
        try:
            bank.kv = ts.KvStore.open(bank.root).result()
        except Exception as e:
            raise BankError(f"memory bank: cannot open {_describe(bank.root)} ({_first_line(e)})") from e
        if not bank._exists(f"snapshots/{int(step)}/COMMITTED"):
            raise BankError(f"memory bank: no complete snapshot of step {step} under {_describe(bank.root)} "
                            f"(complete ones: {bank.snapshot_steps()}); the checkpoint's bank rows are missing")
        bank.tables = {s.name: TableStore(_join(bank.root, "snapshots", str(int(step)), s.name), s, create=False)
                       for s in specs}
        return bank

    # -- kvstore helpers
    def _exists(self, key: str) -> bool:
        try:
            return self.kv.read(key).result().state == "value"
        except Exception as e:
            raise BankError(f"memory bank: cannot read {_describe(self.root)} key {key!r} ({_first_line(e)})") from e

    def _put(self, key: str, data: bytes) -> None:
        try:
            self.kv.write(key, data).result()
        except Exception as e:
            raise BankError(f"memory bank: cannot write {_describe(self.root)} key {key!r} ({_first_line(e)})") from e

    def _delete_prefix(self, prefix: str) -> None:
        self.kv.delete_range(ts.KvStore.KeyRange(prefix, prefix[:-1] + chr(ord(prefix[-1]) + 1))).result()

    # -- rows
    def read(self, table: str, ids, arrays=ARRAYS) -> dict[str, np.ndarray]:
        return self._table(table).read(ids, arrays)

    def write(self, table: str, ids, **values) -> None:
        self._table(table).write(ids, **values)

    def _table(self, name: str) -> TableStore:
        if name not in self.tables:
            raise BankError(f"memory bank: no table {name!r}; have {sorted(self.tables)}")
        return self.tables[name]

    # -- snapshots
    def snapshot_steps(self) -> list[int]:
        """Steps with a complete (committed) snapshot, ascending."""
        keys = self.kv.list(ts.KvStore.KeyRange("snapshots/", "snapshots0")).result()
        steps = set()
        for k in keys:
            parts = k.decode().split("/")
            if len(parts) == 3 and parts[2] == "COMMITTED" and parts[1].isdigit():
                steps.add(int(parts[1]))
        return sorted(steps)

    def snapshot(self, step: int) -> None:
        """Copy every live table to ``snapshots/<step>/`` (replacing an older snapshot of that step),
        then mark it committed. Synchronous: when it returns, the snapshot is durable."""
        prefix = f"snapshots/{int(step)}/"
        self._delete_prefix(prefix)
        for name, live in self.tables.items():
            dst = TableStore(_join(self.root, "snapshots", str(int(step)), name), live.spec)
            for a in ARRAYS:
                dst.arrays[a].write(live.arrays[a]).result()
        self._put(prefix + "COMMITTED", json.dumps({"step": int(step), "tables": sorted(self.tables)}).encode())

    def restore(self, step: int) -> None:
        """Make the live tables equal to snapshot ``step`` (:class:`BankError` if it is missing or
        incomplete)."""
        if not self._exists(f"snapshots/{int(step)}/COMMITTED"):
            raise BankError(f"memory bank: no complete snapshot of step {step} under {_describe(self.root)} "
                            f"(complete ones: {self.snapshot_steps()}); the checkpoint's bank rows are missing")
        for name, live in self.tables.items():
            src = TableStore(_join(self.root, "snapshots", str(int(step)), name), live.spec, create=False)
            for a in ARRAYS:
                live.arrays[a].write(src.arrays[a]).result()

    def retain(self, steps) -> None:
        """Delete the snapshots of steps not in ``steps`` (those whose checkpoint Orbax dropped)."""
        keep = {int(s) for s in steps}
        keys = self.kv.list(ts.KvStore.KeyRange("snapshots/", "snapshots0")).result()
        for s in sorted({int(k.decode().split("/")[1]) for k in keys if k.decode().split("/")[1].isdigit()}):
            if s not in keep:
                self._delete_prefix(f"snapshots/{s}/")


# ----------------------------------------------------------------------------- fetch plans and the optimizer


@dataclasses.dataclass(frozen=True)
class FetchPlan:
    """``unique [n]``: the distinct row ids a batch needs (sorted); ``padded [capacity]``: them
    followed by copies of the first (a fixed count, so the step never recompiles; the padding
    slots are never selected, get zero gradients and are not written back); ``row_index [B, L]``:
    each example's rows as positions in ``padded``."""

    unique: np.ndarray
    padded: np.ndarray
    row_index: np.ndarray


def plan_fetch(ids, capacity: int) -> FetchPlan:
    """The :class:`FetchPlan` of ``ids: [B, L]`` int global row ids for ``capacity`` fetch slots."""
    ids = np.asarray(ids)
    if ids.ndim != 2 or not np.issubdtype(ids.dtype, np.integer):
        raise BankError(f"plan_fetch: ids must be a [B, L] integer array, got {ids.dtype} {ids.shape}")
    unique, inverse = np.unique(ids, return_inverse=True)
    if len(unique) > capacity:
        raise BankError(f"plan_fetch: the batch needs {len(unique)} distinct rows but only {capacity} fetch "
                        "slots exist: raise the block's fetch capacity (e.g. fetch_rows) or lower the batch size")
    padded = np.concatenate([unique, np.full(capacity - len(unique), unique[0] if len(unique) else 0,
                                             unique.dtype)]).astype(np.int64)
    return FetchPlan(unique.astype(np.int64), padded, inverse.reshape(ids.shape).astype(np.int32))


def row_adam(rows, grads, mu, nu, count, *, lr, b1: float, b2: float, eps: float = 1e-8):
    """Adam on fetched rows with per-row moments and step counts (lazy / sparse Adam: a row's
    moments advance only when it is fetched, and its bias correction uses its own count).

    ``rows, grads: [N, ...]``, ``mu, nu: [N, ...]`` float32, ``count: [N]`` int32. Returns
    ``(rows', mu', nu', count')`` with ``mu' = b1 mu + (1-b1) g``, ``nu' = b2 nu + (1-b2) g^2``,
    ``c' = c + 1``, ``rows' = rows - lr (mu'/(1-b1^c')) / (sqrt(nu'/(1-b2^c')) + eps)``.
    """
    g = grads.astype(jnp.float32)
    mu = b1 * mu + (1 - b1) * g
    nu = b2 * nu + (1 - b2) * g * g
    count = count + 1
    c = count.astype(jnp.float32).reshape((-1,) + (1,) * (g.ndim - 1))
    mhat = mu / (1 - b1 ** c)
    vhat = nu / (1 - b2 ** c)
    new = rows.astype(jnp.float32) - lr * mhat / (jnp.sqrt(vhat) + eps)
    return new.astype(rows.dtype), mu, nu, count


# ----------------------------------------------------------------------------- the loop's runtime


@dataclasses.dataclass
class HostModule:
    """A module following the host-table protocol (module docstring), found by :func:`discover`."""

    path: tuple
    index_attr: str
    tables: dict  # attribute -> TableSpec
    capacity: int
    row_ids: Callable[[dict], Any]


def _table_name(path: tuple, attr: str) -> str:
    return ".".join(str(p) for p in (*path, attr))


def discover(model: nnx.Module, *, seed: int = 0) -> list[HostModule]:
    """Every module of ``model`` (abstract or concrete) holding :class:`HostParam` variables."""
    found = []
    for path, module in nnx.iter_modules(model):
        attrs = vars(module)
        params = {k: v for k, v in attrs.items() if isinstance(v, HostParam)}
        if not params:
            continue
        index = [k for k, v in attrs.items() if isinstance(v, HostIndex)]
        where = "/".join(map(str, path)) or "<root>"
        if len(index) != 1 or not callable(getattr(module, "host_row_ids", None)):
            raise BankError(f"{type(module).__name__} at {where}: a module with HostParam variables needs exactly "
                            "one HostIndex variable and a host_row_ids(batch) method")
        caps = {v.shape[0] for v in params.values()}
        if len(caps) != 1:
            raise BankError(f"{type(module).__name__} at {where}: its HostParams must share the fetch capacity "
                            f"(leading axis), got {sorted(caps)}")
        tables = {}
        for k, v in params.items():
            meta = v.get_metadata()
            tables[k] = TableSpec(_table_name(path, k), int(meta["num_rows"]), tuple(int(d) for d in v.shape[1:]),
                                  np.dtype(v.dtype).name, float(meta.get("init_std", 0.02)), seed)
        found.append(HostModule(tuple(path), index[0], tables, caps.pop(), module.host_row_ids))
    return found


def _nested_set(tree: dict, path: tuple, value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


class HostTables:
    """The loop's view of the host tables: fetch the rows a batch needs, write the updates back.

    ``fetch(batch) -> (host, plans)``: ``host`` is ``{"rows", "mu", "nu", "count", "index"}``, each
    a nested dict laid out like the model's state (``rows``: the :class:`HostParam` values;
    ``index``: the :class:`HostIndex` values), ready to be merged into the model inside the step.
    ``write(plans, new)`` stores the first ``len(plan.unique)`` rows of each table of ``new``
    (``{"rows", "mu", "nu", "count"}`` as returned by the step). ``load_into(model, batch)``
    fills a concrete model's windows (evaluation and decoding outside the loop).
    """

    def __init__(self, modules: list[HostModule], bank: MemoryBank):
        self.modules, self.bank = modules, bank

    @classmethod
    def open(cls, modules: list[HostModule], root, *, fresh: bool = False) -> HostTables:
        specs = [s for m in modules for s in m.tables.values()]
        return cls(modules, MemoryBank(root, specs, fresh=fresh))

    @classmethod
    def open_snapshot(cls, modules: list[HostModule], root, step: int) -> HostTables:
        """Read-only tables of checkpoint ``step`` (:meth:`MemoryBank.open_snapshot`): for evaluating
        a checkpoint without touching the live bank."""
        return cls(modules, MemoryBank.open_snapshot(root, [s for m in modules for s in m.tables.values()], step))

    def fetch(self, batch: dict, *, with_moments: bool = True):
        host = {k: {} for k in ("rows", "mu", "nu", "count", "index")}
        plans = []
        arrays = ARRAYS if with_moments else ("value",)
        reads = []
        for m in self.modules:
            plan = plan_fetch(m.row_ids(batch), m.capacity)
            plans.append(plan)
            _nested_set(host["index"], (*m.path, m.index_attr), plan.row_index)
            for attr, spec in m.tables.items():  # (all reads in flight at once)
                table = self.bank._table(spec.name)
                ids = table._check_ids(plan.padded)
                reads.append(((*m.path, attr), {a: table.arrays[a].oindex[ids].read() for a in arrays}))
        for key, futures in reads:
            got = {a: f.result() for a, f in futures.items()}
            _nested_set(host["rows"], key, got["value"])
            if with_moments:
                for a in ("mu", "nu", "count"):
                    _nested_set(host[a], key, got[a])
        return host, plans

    def load_into(self, model: nnx.Module, batch: dict) -> None:
        """Put the rows ``batch`` needs (``host_row_ids(batch)`` of each module) into ``model``'s
        :class:`HostParam` windows and :class:`HostIndex` variables, read only (no moments): for
        evaluation or decoding outside the train step. ``model`` is built like the loop's (its
        host modules at the same paths); afterwards ``model(inputs)`` and
        ``memjax.model.decode.generate(model, prompt, ...)`` use the bank for these ``B`` examples
        (``inputs``/``prompt`` must have the batch's ``B`` rows, or one row for a ``[1, L]`` index)."""
        host, _ = self.fetch(batch, with_moments=False)
        nnx.update(model, nnx.State(host["rows"]), nnx.State(host["index"]))

    def write(self, plans: list[FetchPlan], new: dict) -> None:
        new = jax.device_get(new)
        futures = []  # (every table's writes in flight at once: the file system's latency overlaps)
        for m, plan in zip(self.modules, plans):
            n = len(plan.unique)
            for attr, spec in m.tables.items():
                rows = {a: _nested_get(new[k], (*m.path, attr))[:n]
                        for a, k in (("value", "rows"), ("mu", "mu"), ("nu", "nu"), ("count", "count"))}
                futures += self.bank._table(spec.name).write_async(plan.unique, **rows)
        for f in futures:
            f.result()


def _nested_get(tree: dict, path: tuple):
    for p in path:
        tree = tree[p]
    return tree
