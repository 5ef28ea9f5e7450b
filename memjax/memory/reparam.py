"""Stable reparameterisations of continuous-time SSM eigenvalues (StableSSM, Wang & Li 2023).

A diagonal SSM ``h' = lambda h + b x`` is stable iff ``Re(lambda) < 0``; discretised with step
``dt`` its transition ``exp(dt lambda)`` then has modulus ``< 1``. Training ``lambda`` directly
("direct", ``lambda = w``) lets a gradient step push it across 0, after which ``|exp(dt lambda)|^T``
explodes over a long sequence; and eigenvalues that learn long memories crowd the stability
boundary, where the loss is steep in ``lambda`` ("curse of memory"). A stable reparameterisation
``lambda = f(w)`` maps every raw weight ``w in R`` into ``lambda < 0``:

=============  ================================  ===============================================
name           ``lambda = f(w)``                  notes
=============  ================================  ===============================================
``exp``        ``-exp(w)``                        S4 / S4D / Mamba (``A = -exp(A_log)``)
``softplus``   ``-softplus(w)``                   S5
``best``       ``-1 / (a w^2 + b)``               StableSSM's "best": the gradient-over-weight
                                                  ratio ``|f'(w)| / f(w)^2 = 2 a |w|`` is linear in
                                                  ``|w|``, balanced across timescales. Range
                                                  ``[-1/b, 0)``; defaults ``a = 1``, ``b = 0.5``.
``direct``     ``w``                              the naive one (not stable; for comparison)
=============  ================================  ===============================================

All functions are elementwise over arrays of any shape (JAX or NumPy); :func:`inverse` gives the
raw weight for a target eigenvalue (for initialisation).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

REPARAMS = ("exp", "softplus", "best", "direct")
STABLE = ("exp", "softplus", "best")


def _check_name(fn: str, name: str) -> None:
    if name not in REPARAMS:
        raise ValueError(f"{fn}: name must be one of {REPARAMS}, got {name!r}")


def _check_ab(fn: str, a: float, b: float) -> None:
    if not a > 0:
        raise ValueError(f"{fn}: a must be > 0 for the 'best' reparameterisation, got {a!r}")
    if not b > 0:
        raise ValueError(f"{fn}: b must be > 0 for the 'best' reparameterisation (b = 0 maps w = 0 to -inf), got {b!r}")


def reparameterize(w, name: str = "exp", *, a: float = 1.0, b: float = 0.5):
    """``lambda = f_name(w)``, elementwise; ``w`` a real array of any shape (the result has its
    shape and dtype). Every ``name`` in :data:`STABLE` gives ``lambda < 0`` for all finite ``w``."""
    _check_name("reparameterize", name)
    w = jnp.asarray(w)
    if jnp.iscomplexobj(w):
        raise ValueError(f"reparameterize: w must be real (it parameterises Re(lambda)), got dtype {w.dtype}")
    if name == "exp":
        return -jnp.exp(w)
    if name == "softplus":
        return -jax.nn.softplus(w)
    if name == "best":
        _check_ab("reparameterize", a, b)
        return -1.0 / (a * w * w + b)
    return w


def inverse(lam, name: str = "exp", *, a: float = 1.0, b: float = 0.5):
    """The raw weight ``w`` with ``f_name(w) = lam`` (for initialisers).

    NumPy input: returns float64 NumPy and raises ``ValueError`` if ``lam`` is outside the range of
    ``f_name`` (``lam < 0`` for the stable ones, ``-1/b <= lam < 0`` for ``best``, which returns the
    ``w >= 0`` root). JAX input (also traced, inside an initialiser under ``jit``): returns a JAX
    array; the range cannot be checked there, so the caller guarantees it.
    """
    _check_name("inverse", name)
    if isinstance(lam, jax.Array):
        xp = jnp
    else:
        xp = np
        lam = np.asarray(lam, np.float64)
        if name != "direct" and not np.all(lam < 0):
            raise ValueError(f"inverse: lam must be < 0 for the {name!r} reparameterisation, got max {lam.max()}")
        if name == "best":
            _check_ab("inverse", a, b)
            if not np.all(-1.0 / lam - b >= 0):
                raise ValueError(f"inverse: lam must be in [-1/b, 0) = [{-1.0 / b}, 0) for 'best', got min {lam.min()}")
    if name == "direct":
        return lam
    if name == "exp":
        return xp.log(-lam)
    if name == "softplus":  # w = log(exp(-lam) - 1), written to stay finite for large |lam|
        return -lam + xp.log(-xp.expm1(lam))
    return xp.sqrt(xp.maximum(-1.0 / lam - b, 0.0) / a)


def get_reparam(name: str, **kw):
    """``w -> lambda`` for ``name`` (with ``a``, ``b`` for ``best``), for use as a callable."""
    _check_name("get_reparam", name)
    return lambda w: reparameterize(w, name, **kw)
