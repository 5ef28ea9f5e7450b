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
STEPS=${STEPS:-"versions tests embedding_bag torch linear_attention train train_kernels"}  # run in this order
run_step() {  # run_step NAME: one benchmark under its own time limit
  local name=$1 t0=$SECONDS limit
  case $name in
    versions) limit=60; set -- bash -c "nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.max.sm --format=csv; \
      $PY -c 'import jax, flax, sys; print(sys.version); print(\"jax\", jax.__version__, \"flax\", flax.__version__, jax.devices())'; \
      $PY -m pip list 2>/dev/null | grep -iE '^(torch|triton|jax|jaxlib|flax|optax|orbax-checkpoint|grain|fla-core|flash-linear-attention|jax-linear-attention|equinox) '" ;;
    tests) limit=${TESTS_LIMIT:-150}; set -- env JAX_PLATFORMS=cuda,cpu $PY -m pytest -q -p no:cacheprovider \
      tests/test_embedding_bag.py tests/test_chunk_recurrence.py::test_hardware_kernel_matches_xla \
      tests/test_attention.py::test_hardware_cudnn_matches_xla ;;
    embedding_bag) limit=${EB_LIMIT:-150}; set -- $PY -m benchmarks.gpu_embedding_bag ${EB_ARGS:-} ;;
    torch) limit=${TORCH_LIMIT:-200}; set -- $PY -m benchmarks.gpu_torch ${TORCH_ARGS:-} ;;
    linear_attention) limit=${LA_LIMIT:-300}; set -- $PY -m benchmarks.gpu_linear_attention ${LA_ARGS:-} ;;
    train) limit=${TRAIN_LIMIT:-300}; set -- $PY -m benchmarks.gpu_train --budget-s $((limit - 10)) ${TRAIN_ARGS:-} ;;
    train_kernels) limit=${TRAIN_LIMIT:-300}; set -- $PY -m benchmarks.gpu_train --budget-s $((limit - 10)) \
      --out "$OUT/train_kernels" --set model.blocks.gated_deltanet.kernel=pallas model.blocks.attention.impl=cudnn \
      ${TRAIN_ARGS:-} ;;  # the same run with the Pallas chunk recurrence and cuDNN attention
    *) echo "unknown step $name"; return 1 ;;
  esac
  echo "=== $name (limit ${limit}s) $(date -u +%T)"
  timeout "$limit" "$@"
  echo "=== $name rc=$? in $((SECONDS - t0))s"
}
for name in $STEPS; do run_step "$name"; done 2>&1 | tee "$OUT/log.txt"
