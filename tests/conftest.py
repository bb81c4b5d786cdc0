"""Shared pytest configuration: markers for slow and GPU-only tests.

Slow tests run only with ``--runslow``; GPU tests run only when JAX sees a GPU.
Both are reported as skipped otherwise, never silently passing.
"""
import jax
import pytest


def pytest_addoption(parser):
  parser.addoption(
      "--runslow", action="store_true", default=False, help="run tests marked slow"
  )


def _has_gpu() -> bool:
  try:
    return any(d.platform == "gpu" for d in jax.devices())
  except RuntimeError:
    return False


def pytest_collection_modifyitems(config, items):
  skip_slow = pytest.mark.skip(reason="slow: run with --runslow")
  skip_gpu = pytest.mark.skip(reason="gpu: no GPU visible to JAX")
  has_gpu = None
  for item in items:
    if "slow" in item.keywords and not config.getoption("--runslow"):
      item.add_marker(skip_slow)
    if "gpu" in item.keywords:
      if has_gpu is None:
        has_gpu = _has_gpu()
      if not has_gpu:
        item.add_marker(skip_gpu)
