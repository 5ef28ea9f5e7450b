"""What every fused TPU kernel pair shares (memjax.kernels.{linear,gla,delta,kda,mlstm}_fused_pallas_tpu):
``impl`` resolution (the kernel for impl='pallas_tpu', interpreted on CPU here; never for 'xla',
nor for 'auto' off a verified TPU; a clear error for an explicit 'pallas_tpu' without a TPU
target) and the ``supports`` predicate's common cases. Kernel-specific cases are in each
kernel's test file."""
import jax.numpy as jnp
import pytest

from memjax.kernels import (delta_fused_pallas_tpu, gla_fused_pallas_tpu, kda_fused_pallas_tpu,
                            linear_fused_pallas_tpu, mlstm_fused_pallas_tpu)
from memjax.memory.delta_kernel import delta_kernel
from memjax.memory.gla_kernel import gla_kernel
from memjax.memory.kda_kernel import kda_kernel
from memjax.memory.linear_vjp import fused_kernel
from memjax.memory.mlstm_kernel import mlstm_kernel

CHOICES = {"linear": fused_kernel, "gla": gla_kernel, "delta": delta_kernel, "kda": kda_kernel, "mlstm": mlstm_kernel}
MODULES = {"linear": linear_fused_pallas_tpu, "gla": gla_fused_pallas_tpu, "delta": delta_fused_pallas_tpu,
           "kda": kda_fused_pallas_tpu, "mlstm": mlstm_fused_pallas_tpu}


@pytest.mark.parametrize("name", sorted(CHOICES))
def test_dispatch(name):
    choose = CHOICES[name]
    shape = (2, 256, 16, 128)
    assert choose("xla", shape, 128, jnp.bfloat16, 64, None) is None
    assert choose("auto", shape, 128, jnp.bfloat16, 64, None) is None
    assert choose("pallas_tpu", shape, 128, jnp.float64, 64, True) == ("pallas_tpu", True)
    with pytest.raises(ValueError, match="needs a TPU"):
        choose("pallas_tpu", shape, 128, jnp.bfloat16, 64, None)


@pytest.mark.parametrize("name", sorted(MODULES))
@pytest.mark.parametrize("shape,dtype,ok", [
    ((8, 4096, 16, 128, 128, 64), jnp.bfloat16, True),  # the benchmark shape
    ((1, 64, 16, 128, 128, 64), jnp.float32, True),
    ((1, 64, 16, 128, 128, 64), jnp.float16, False),  # Mosaic rejects float16 loads on v5
    ((1, 60, 16, 128, 128, 20), jnp.float32, False),  # C not a multiple of 8
])
def test_supports(name, shape, dtype, ok):
    supports = MODULES[name].supports
    assert supports(shape, dtype, "tpu") is ok
    assert supports(shape, dtype, "cpu") is False and supports(shape, dtype, "gpu") is False
