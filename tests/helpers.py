"""Shared test helpers: error measures, random inputs and graph probes.

Import as ``from tests.helpers import rel_err, rand`` (pyproject puts the repository root on the
path). Test files never import each other; what two of them share lives here.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from memjax.train import compile as plan_lib

TOL64 = 1e-10  # float64 comparisons between forms and against naive references


def _f64(x) -> np.ndarray:
    """A float64 (or complex128) NumPy copy of an array of any dtype, bf16 included."""
    x = np.asarray(x)
    return x.astype(np.complex128 if np.iscomplexobj(x) else np.float64)


def rel_err(x, ref) -> float:
    """Relative max error ``max|x - ref| / max|ref|`` (NumPy in float64: eager jnp ops would each
    compile)."""
    x, ref = _f64(x), _f64(ref)
    return float(np.max(np.abs(x - ref)) / max(np.max(np.abs(ref)), 1e-300))


def rel_rmse(x, ref) -> float:
    """Relative RMS error ``||x - ref|| / ||ref||`` (Frobenius norms, float64)."""
    x, ref = _f64(x), _f64(ref)
    return float(np.linalg.norm(x - ref) / max(np.linalg.norm(ref), 1e-300))


def rng_of(key_or_seed) -> np.random.Generator:
    """A NumPy generator from a seed, a generator (returned as is) or a JAX key (its bits)."""
    if isinstance(key_or_seed, np.random.Generator):
        return key_or_seed
    if isinstance(key_or_seed, (int, np.integer)):
        return np.random.default_rng(int(key_or_seed))
    data = np.asarray(jax.random.key_data(key_or_seed) if jnp.issubdtype(key_or_seed.dtype, jax.dtypes.prng_key)
                      else key_or_seed).ravel()
    return np.random.default_rng([int(v) for v in data])


def rand(key_or_seed, shape, dtype=jnp.float32, *, scale: float = 1.0) -> jax.Array:
    """Standard normal numbers times ``scale`` of ``shape``, drawn in float64 and cast to ``dtype``
    (so the same seed gives the same numbers, rounded, in every dtype)."""
    return jnp.asarray(rng_of(key_or_seed).normal(size=shape) * scale).astype(dtype)


def uniform(key_or_seed, shape, low: float, high: float, dtype=jnp.float32) -> jax.Array:
    """Uniform numbers in ``[low, high)`` of ``shape``, drawn in float64 and cast to ``dtype``."""
    return jnp.asarray(rng_of(key_or_seed).uniform(low, high, size=shape)).astype(dtype)


def largest_intermediate(fn, *args) -> int:
    """The element count of the largest value any equation of ``fn``'s jaxpr (sub-jaxprs of scans,
    custom derivatives, ... included) produces: proves that no per-token state is formed."""
    def walk(jaxpr):
        best = 0
        for eqn in jaxpr.eqns:
            for var in eqn.outvars:
                best = max(best, int(np.prod(getattr(var.aval, "shape", ()))))
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        best = max(best, walk(inner))
        return best

    return walk(jax.make_jaxpr(fn)(*args).jaxpr)


def jaxpr_eqns(fn, *args, primitive: str | None = None) -> list:
    """Every equation of ``fn``'s jaxpr, sub-jaxprs included (optionally only ``primitive``)."""
    found = []

    def walk(jaxpr):
        for eqn in jaxpr.eqns:
            if primitive is None or eqn.primitive.name == primitive:
                found.append(eqn)
            for p in eqn.params.values():
                for sub in p if isinstance(p, (tuple, list)) else (p,):
                    inner = getattr(sub, "jaxpr", sub)
                    if hasattr(inner, "eqns"):
                        walk(inner)

    walk(jax.make_jaxpr(fn)(*args).jaxpr)
    return found


def compile_for_tpu(topology: str, f, args, inside=None):
    """``jax.jit(f)`` compiled for one compile-only TPU device of ``topology`` (libtpu, no TPU
    attached), ``args`` replicated on it; ``inside()`` runs under the same mesh first (a check
    of what the mesh's TPU target makes the library choose)."""
    mesh = jax.make_mesh((1,), ("x",), devices=plan_lib.topology_devices(topology)[:1],
                         axis_types=(jax.sharding.AxisType.Auto,))
    rep = NamedSharding(mesh, P())
    args = [jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=rep) for a in args]
    with jax.set_mesh(mesh):  # the mesh's (compile-only TPU) devices make the target a TPU
        if inside is not None:
            inside()
        return jax.jit(f).lower(*args).compile()


def assert_bf16_error_like(run, impl: str = "pallas_tpu", reference: str = "xla", *, max_err: float = 3e-2,
                           factor: float = 1.5, slack: float = 2e-3) -> None:
    """``run(impl, dtype)`` -> a pytree (outputs and gradients) from inputs cast to ``dtype``.
    Against the float64 ``"recurrent"`` run, every leaf of ``impl``'s bf16 run has a relative
    RMS error below ``max_err`` and within ``factor`` times ``reference``'s (plus ``slack``)."""
    with jax.enable_x64(True):
        ref = jax.tree.leaves(run("recurrent", jnp.float64))
    errs = {i: [rel_rmse(x, r) for x, r in zip(jax.tree.leaves(run(i, jnp.bfloat16)), ref)] for i in (impl, reference)}
    assert max(errs[impl]) < max_err, errs
    for e, w in zip(errs[impl], errs[reference]):
        assert e < factor * w + slack, errs


def assert_non_finite_like(loss, args, clean_args, first_bad: int, n_poisoned: int, impl: str = "pallas_tpu",
                           reference: str = "xla") -> None:
    """``loss(impl, *args) -> (scalar, (o, s))``; ``args`` hold non-finite entries, the first at time
    ``first_bad``, ``clean_args`` the same inputs without them. ``impl`` puts NaN exactly where
    ``reference`` does (``n_poisoned`` output entries), its outputs before ``first_bad`` are
    bit-identical to its clean run's, it agrees with ``reference`` elsewhere and on every gradient
    (w.r.t. all ``args``), and those are finite."""
    def grad(i):
        return jax.jit(jax.grad(functools.partial(loss, i), argnums=tuple(range(len(args))), has_aux=True))

    (grads, (o, _)), (grads_ref, (o_ref, _)) = grad(impl)(*args), grad(reference)(*args)
    _, (o_clean, _) = grad(impl)(*clean_args)
    np.testing.assert_array_equal(np.asarray(o)[:, :first_bad], np.asarray(o_clean)[:, :first_bad])
    np.testing.assert_array_equal(np.isfinite(o), np.isfinite(o_ref))
    assert np.isfinite(np.asarray(o)).sum() == o.size - n_poisoned
    assert rel_rmse(jnp.where(jnp.isfinite(o), o, 0), jnp.where(jnp.isfinite(o_ref), o_ref, 0)) < 1e-12
    for x, r in zip(grads, grads_ref):
        assert np.isfinite(np.asarray(x)).all()
        assert rel_rmse(x, r) < 1e-10


def pallas_calls(jaxpr):
    """The pallas_call equations of ``jaxpr`` and of every jaxpr nested in its equations (custom
    VJPs, shard_maps, ...)."""
    found = []
    for e in jaxpr.eqns:
        if e.primitive.name == "pallas_call":
            found.append(e)
            continue
        for p in e.params.values():
            for sub in (p if isinstance(p, (tuple, list)) else (p,)):
                inner = getattr(sub, "jaxpr", sub)
                if hasattr(inner, "eqns"):
                    found += pallas_calls(inner)
    return found
