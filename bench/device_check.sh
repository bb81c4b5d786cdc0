#!/usr/bin/env bash
# The GPU checks and timings of the fused kernels, as one command for a
# lent device (one call of at most 9 minutes; the device's limit is 10):
#
#   bash bench/device_check.sh                            # 540 s at most
#   DEVICE_CHECK_SECONDS=300 bash bench/device_check.sh   # a shorter run
#   DEVICE_CHECK_ARGS="--interpret --dtypes f32" OUT=/tmp/dc \
#     bash bench/device_check.sh      # CPU: the gpu tests skip, tiny timings
#
# Runs from the repository root on a machine whose JAX sees a GPU (JAX 0.10
# or 0.11 with CUDA, flax, optax and pytest installed; nothing is installed:
# the package is put on PYTHONPATH). Two parts, each under `timeout`:
#
#   1. python -m pytest -m gpu tests/test_kernels_gpu.py: every fused kernel
#      against its pure-jnp reference per GPU backend (Triton; Mosaic GPU
#      where the kernel has it) at the compile tier's sizes, f32 and bf16;
#      the compiled-kernel and fused-model checks. At most
#      DEVICE_CHECK_PYTEST_SECONDS (default 300).
#   2. python bench/gpu_kernels.py: the fused kernels against XLA's
#      jvp-of-jvp and the MLP and NanoLM steps (base, exact, sub16_gn; fused
#      and XLA's), timed side by side; the time left.
#
# Writes to $OUT (or ./device_out):
#
#   env.log             versions, devices, nvidia-smi (clocks, power)
#   pytest_gpu.log      part 1, with the skips' reasons and the durations
#   gpu_kernels.md      part 2's tables (for bench/RESULTS.md), rewritten
#                       after each group: a run stopped by `timeout` keeps
#                       what it measured
#   gpu_kernels.log     part 2's log, one line per program timed
#
# Time: DEVICE_CHECK_SECONDS (default 540) in all.
# DEVICE_CHECK_ARGS: more arguments for bench/gpu_kernels.py.
# Exit status: that of the first failing part (pytest: 1 a test failed;
# bench/gpu_kernels.py: 1 a program did not compile or run; 124/137
# timeout).
set -u -o pipefail
out="${OUT:-device_out}"
total="${DEVICE_CHECK_SECONDS:-540}"
pytest_s="${DEVICE_CHECK_PYTEST_SECONDS:-300}"
mkdir -p "$out"
# The package without installing it: cdat_fast/ with kernels/ as its
# cdat_fast.kernels (what pyproject's package-dir does), through links.
shim="$(mktemp -d)"
mkdir "$shim/cdat_fast"
ln -s "$PWD"/cdat_fast/*.py "$shim/cdat_fast/"
for d in "$PWD"/cdat_fast/*/; do ln -s "${d%/}" "$shim/cdat_fast/"; done
ln -s "$PWD/kernels" "$shim/cdat_fast/kernels"
export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
{
  timeout 60 python - <<'PY'
import jax, jaxlib, sys
import cdat_fast.kernels, cdat_fast.harness.models
print("cdat_fast from", cdat_fast.__file__, "kernels from",
      cdat_fast.kernels.__file__)
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib",
      jaxlib.__version__, "backend", jax.default_backend(), jax.devices())
PY
  if command -v nvidia-smi >/dev/null; then
    timeout 20 nvidia-smi --query-gpu=name,driver_version,clocks.sm,clocks.max.sm,clocks.mem,power.draw,power.limit,temperature.gpu,memory.used,memory.total --format=csv
  fi
} 2>&1 | tee "$out/env.log"
status=0
left=$(( total - SECONDS - 60 ))
[ "$left" -lt "$pytest_s" ] && pytest_s="$left"
echo "device_check: ${SECONDS} s in; pytest -m gpu gets ${pytest_s} s" \
  | tee -a "$out/env.log"
# PYTHONSAFEPATH: not the repository root first on sys.path, whose
# cdat_fast/ has no kernels/ (the shim's has).
PYTHONSAFEPATH=1 timeout -k 10 "$pytest_s" python -m pytest -m gpu -v -rs \
  --durations=15 -p no:cacheprovider -W ignore::DeprecationWarning \
  tests/test_kernels_gpu.py 2>&1 | tee "$out/pytest_gpu.log" || status=$?
left=$(( total - SECONDS - 5 ))
if [ "$left" -ge 30 ]; then
  echo "device_check: ${SECONDS} s in; bench/gpu_kernels.py gets ${left} s" \
    | tee -a "$out/env.log"
  timeout -k 10 "$left" python bench/gpu_kernels.py \
    --markdown "$out/gpu_kernels.md" ${DEVICE_CHECK_ARGS:-} 2>&1 \
    | tee "$out/gpu_kernels.log" || { rc=$?; [ "$status" = 0 ] && status=$rc; }
else
  echo "bench/gpu_kernels.py skipped: ${left} s left of ${total}" \
    | tee "$out/gpu_kernels.log"
fi
echo "device_check: ${SECONDS} s, exit status ${status}" | tee -a "$out/env.log"
exit "$status"
