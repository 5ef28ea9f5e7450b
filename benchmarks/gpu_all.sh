#!/usr/bin/env bash
# Every GPU benchmark of issue 8 in one go (one call of a lent GPU machine), from the repo root:
#
#     bash benchmarks/gpu_all.sh            # results in $OUT (device tool) or benchmarks/results/gpu
#     STEPS="embedding_bag torch" bash benchmarks/gpu_all.sh
#
# Optional wheels in .whl/ (flash-linear-attention, fla-core, jax-linear-attention, a flax that
# matches the machine's JAX) are installed into /tmp/site first. Each step has its own time limit
# and writes its own JSON, so one failing step does not lose the others. Log: $OUT/log.txt.
set -u
export OUT=${OUT:-benchmarks/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.85}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" > /dev/null; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
STEPS=${STEPS:-"versions tests embedding_bag torch linear_attention train"}
step() {  # step NAME SECONDS COMMAND...
  local name=$1 limit=$2; shift 2
  case " $STEPS " in *" $name "*) ;; *) return 0 ;; esac
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  local t0=$SECONDS
  timeout "$limit" "$@"
  echo "=== $name rc=$? in $((SECONDS - t0))s"
}
{
  step versions 60 bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; \
    $PY -c 'import jax, flax, sys; print(sys.version); print(\"jax\", jax.__version__, \"flax\", flax.__version__, jax.devices())'; \
    $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|jax|jaxlib|flax|optax|orbax-checkpoint|grain|fla-core|flash-linear-attention|jax-linear-attention|equinox) '"
  step tests 60 env JAX_PLATFORMS=cuda,cpu $PY -m pytest -q -p no:cacheprovider tests/test_embedding_bag.py
  step embedding_bag "${EB_LIMIT:-150}" $PY -m benchmarks.gpu_embedding_bag
  step torch "${TORCH_LIMIT:-80}" $PY -m benchmarks.gpu_torch
  step linear_attention "${LA_LIMIT:-140}" $PY -m benchmarks.gpu_linear_attention ${LA_ARGS:-}
  step train "${TRAIN_LIMIT:-130}" $PY -m benchmarks.gpu_train --budget-s $((${TRAIN_LIMIT:-130} - 10)) ${TRAIN_ARGS:-}
} 2>&1 | tee "$OUT/log.txt"
