"""Shared pytest configuration: markers for slow and GPU-only tests.

Slow tests run only with ``--runslow``; GPU tests run only when JAX sees a GPU;
the compile-for-accelerators tier (``accel``, ``tests/accel``) only with
``--accel``. All are reported as skipped otherwise, never silently passing. The
``kernel_calls`` fixture counts the kernels a function lowers to for a
platform, with no device (``jax.export``).
"""
import jax
from jax import export
import pytest

# Custom-call targets of compiled Pallas kernels, by platform.
KERNEL_TARGETS = {"cuda": "__gpu$xla.gpu.triton", "rocm": "__gpu$xla.gpu.triton",
                  "tpu": "tpu_custom_call"}


def pytest_addoption(parser):
  parser.addoption(
      "--runslow", action="store_true", default=False, help="run tests marked slow"
  )
  parser.addoption(
      "--accel", action="store_true", default=False,
      help="run the compile-for-accelerators tier (tests marked accel)")
  parser.addoption(
      "--accel-report", default=None, metavar="FILE",
      help="with --accel: write each compile's results to FILE as JSON")


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
  skip_gpu = pytest.mark.skip(reason="gpu: no GPU visible to JAX")
  skip_accel = pytest.mark.skip(
      reason="accel: compile-for-accelerators tier, run with --accel")
  has_gpu = None
  for item in items:
    if "slow" in item.keywords and not config.getoption("--runslow"):
      item.add_marker(skip_slow)
    if "accel" in item.keywords and not config.getoption("--accel"):
      item.add_marker(skip_accel)
    if "gpu" in item.keywords:
      if has_gpu is None:
        has_gpu = _has_gpu()
      if not has_gpu:
        item.add_marker(skip_gpu)


def _kernel_calls(fn, *args, platform: str) -> int:
  """Kernel custom calls in ``fn`` lowered for ``platform`` (0 on CPU)."""
  avals = [jax.ShapeDtypeStruct(a.shape, a.dtype) if a is not None else None
           for a in args]
  checks = [export.DisabledSafetyCheck.custom_call(t)
            for t in sorted(set(KERNEL_TARGETS.values()))]
  exported = export.export(jax.jit(fn), platforms=[platform],
                           disabled_checks=checks)(*avals)
  text = exported.mlir_module()
  return sum(text.count(f"custom_call @{t}(") for t in
             set(KERNEL_TARGETS.values()))


@pytest.fixture
def kernel_calls():
  """``kernel_calls(fn, *args, platform=...)``: kernels ``fn`` lowers to."""
  return _kernel_calls
