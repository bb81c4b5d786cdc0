#!/usr/bin/env bash
# The GPU checks and timings of the fused kernels, as one command for a
# lent device (one call of at most ~8 minutes; the device's limit is 10):
#
#   bash bench/device_check.sh                     # 480 s at most
#   DEVICE_CHECK_SECONDS=300 bash bench/device_check.sh   # a shorter run
#   DEVICE_CHECK_ARGS=--dry-run OUT=/tmp/dc bash bench/device_check.sh  # CPU
#
# Runs from the repository root on a machine whose JAX sees a GPU (JAX 0.10
# or 0.11 with CUDA, flax, optax and pytest installed; nothing is installed:
# the package is put on PYTHONPATH). Writes to $OUT (or ./device_out):
#
#   env.log             versions, devices, nvidia-smi (clocks, power)
#   gpu_kernels.json    bench/gpu_kernels.py's results: correctness of each
#                       kernel per GPU backend (triton, mosaic_gpu), layer
#                       times at bench/roofline.py's sizes beside its
#                       estimates, model-step times as ratios over the base
#                       step beside the roofline's; what was skipped and why
#   gpu_kernels.md      the same as Markdown tables (for bench/RESULTS.md)
#   gpu_kernels.log     its log, one line per case
#   pytest_gpu.log      tests/test_kernels_gpu.py, with the time left
#
# Time: DEVICE_CHECK_SECONDS (default 480) in all. bench/gpu_kernels.py gets
# what is left after the environment check less DEVICE_CHECK_PYTEST_SECONDS
# (default 75) for pytest: its --budget stops starting cases 45 s before
# that, its --hard-limit aborts it cleanly (JSON kept, tables printed) 15 s
# before, and `timeout` kills it at the end. pytest then gets the time left
# (skipped under 30 s). The JSON is rewritten after every case, so whatever
# ends the run, what was measured is in $OUT.
# DEVICE_CHECK_ARGS: more arguments for bench/gpu_kernels.py.
# Exit status: that of the first failing part (bench/gpu_kernels.py: 1 a
# check failed, 3 aborted at the hard limit; 124/137 timeout).
set -u -o pipefail
out="${OUT:-device_out}"
total="${DEVICE_CHECK_SECONDS:-480}"
pytest_s="${DEVICE_CHECK_PYTEST_SECONDS:-75}"
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
left=$(( total - SECONDS - pytest_s ))
echo "device_check: ${SECONDS} s in; bench/gpu_kernels.py gets ${left} s" \
  "(budget $(( left - 45 )) s)" | tee -a "$out/env.log"
timeout -k 10 "$left" python bench/gpu_kernels.py --budget "$(( left - 45 ))" \
  --hard-limit "$(( left - 15 ))" --json "$out/gpu_kernels.json" \
  --markdown "$out/gpu_kernels.md" ${DEVICE_CHECK_ARGS:-} 2>&1 | tee "$out/gpu_kernels.log" \
  || status=$?
left=$(( total - SECONDS - 5 ))
if [ "$left" -ge 30 ]; then
  timeout -k 5 "$left" python -m pytest -v -rs --durations=10 -p no:cacheprovider \
    -W ignore::DeprecationWarning tests/test_kernels_gpu.py 2>&1 \
    | tee "$out/pytest_gpu.log" || { [ "$status" = 0 ] && status=$?; }
else
  echo "pytest skipped: ${left} s left of ${total}" | tee "$out/pytest_gpu.log"
fi
echo "device_check: ${SECONDS} s, exit status ${status}" | tee -a "$out/env.log"
exit "$status"
