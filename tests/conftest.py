"""Test setup: 8 fake CPU devices (set before JAX is imported) and float64 helpers."""
import os

# The tests' programs are tiny, so their time goes to compiling: without LLVM's backend
# optimisation (the generated code is the same arithmetic, only less tuned) the default run
# compiles ~25% faster (tests/test_mlstm.py: 49 -> 38 CPU s). Notebook kernels and other
# subprocesses the tests start inherit the flags. Set XLA_FLAGS yourself to override the level.
_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = (_flags + " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# XLA's CPU triangular solve calls LAPACK/BLAS from every fake device's thread at once; a
# multi-threaded OpenBLAS then starves some devices past the collective rendezvous timeout
# (seen as a deadlock in the sharded delta-rule step). One BLAS thread per caller avoids it.
os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def x64():
    """Run the test body with float64 enabled, restoring the flag afterwards.

    Comparisons between forms (chunked vs recurrent vs reference) use this so
    that differences are algorithmic, not float32 round-off.
    """
    with jax.enable_x64(True):
        yield
