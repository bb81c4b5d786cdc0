#!/usr/bin/env bash
# The GPU checks of the fused kernels, as one command for a lent device:
#
#   bash bench/device_check.sh            # at most 9 minutes (its timeouts)
#
# Runs from the repository root on a machine whose JAX sees a GPU (JAX 0.10
# or 0.11 with CUDA, flax and optax installed; nothing is installed: the
# package is put on PYTHONPATH). Writes the logs to $OUT (or
# ./device_out): the compiled-kernel tests, then bench/gpu_kernels.py
# (correctness, timing, TFLOP/s and GB/s, the fused layers and a whole CDAT
# step on the paper's NanoLM). Exit status: that of the first failing part.
set -u -o pipefail
out="${OUT:-device_out}"
mkdir -p "$out"
# The package without installing it: cdat_fast/ with kernels/ as its
# cdat_fast.kernels (what pyproject's package-dir does), through links.
shim="$(mktemp -d)"
mkdir "$shim/cdat_fast"
ln -s "$PWD"/cdat_fast/*.py "$shim/cdat_fast/"
ln -s "$PWD/kernels" "$shim/cdat_fast/kernels"
export PYTHONPATH="$shim:$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
python - <<'PY' 2>&1 | tee "$out/env.log"
import jax, jaxlib, sys
import cdat_fast.kernels
print("cdat_fast from", cdat_fast.__file__)
print("python", sys.version.split()[0], "jax", jax.__version__, "jaxlib",
      jaxlib.__version__, "backend", jax.default_backend(), jax.devices())
PY
status=0
timeout 200 python -m pytest -q -p no:cacheprovider -W ignore::DeprecationWarning \
  tests/test_kernels_gpu.py 2>&1 | tee "$out/pytest_gpu.log" || status=$?
timeout 330 python bench/gpu_kernels.py --budget 240 2>&1 \
  | tee "$out/gpu_kernels.log" || { [ "$status" = 0 ] && status=$?; }
exit "$status"
