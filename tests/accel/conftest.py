"""The compile-for-accelerators tier: target devices, and a table of results.

Opt-in (``pytest --accel tests/accel``, ``.ci/run``'s last step): every test
here is marked ``accel``. The targets are described on this host, with no
device (``cdat_fast.compile_targets``): an H100 and an H200 (sm_90) from
the ``GpuTargetConfigProto`` files the package ships, through the CUDA PJRT
plugin, one chip of a TPU v5e 2x2 through libtpu. Where the plugin, ptxas
or libtpu is not installed the tests are skipped with the reason
(``pip install '.[accel-compile]'``).
The terminal summary lists each compile (kernels, memory, time);
``--accel-report=FILE`` also writes them as JSON.
"""
from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import os
import pathlib
from typing import Any

import pytest

from cdat_fast.compile_targets import Target, gpu_target, tpu_target

INSTALL = "pip install '.[accel-compile]'"

_RESULTS: list[dict[str, Any]] = []


def pytest_configure(config):
  if not config.getoption("--accel"):
    return
  # Before any backend starts: the tier compiles for devices that are not
  # here, so JAX itself runs on the CPU (with the plugins installed it would
  # otherwise try to start CUDA and a TPU, and fail loudly). libtpu takes a
  # host-wide lock file unless told that several processes may load it;
  # other processes (a second test run, a benchmark) may hold it.
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")


def _missing(*distributions: str) -> list[str]:
  """The named packages that are not installed."""
  missing = []
  for name in distributions:
    try:
      importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
      missing.append(name)
  return missing


def _gpu(name: str) -> Target:
  missing = _missing("jax-cuda12-plugin", "jax-cuda12-pjrt",
                     "nvidia-cuda-nvcc-cu12")
  if missing:
    pytest.skip(f"compiling for {name} needs the CUDA PJRT plugin and ptxas"
                f" ({', '.join(missing)} not installed: {INSTALL})")
  return gpu_target(name)


@pytest.fixture
def h100() -> Target:
  """One H100 (``cdat_fast/targets/h100.txtpb``)."""
  return _gpu("h100")


@pytest.fixture
def h200() -> Target:
  """One H200 (``cdat_fast/targets/h200.txtpb``): an H100's sm_90 with 141
  GB."""
  return _gpu("h200")


@pytest.fixture
def v5e() -> Target:
  """One chip of a TPU v5e 2x2."""
  if _missing("libtpu"):
    pytest.skip(f"compiling for TPU v5e needs libtpu (not installed:"
                f" {INSTALL})")
  return tpu_target()


@pytest.fixture
def record(request):
  """``record(target, compiled, label="")``: adds a compile to the summary
  table, as the test's case (and ``label``, for a test compiling several)."""
  def add(target: Target, compiled, label: str = "") -> None:
    case = (request.node.callspec.id if hasattr(request.node, "callspec")
            else request.node.name)
    _RESULTS.append(dict(target=target.name,
                         case=f"{case}/{label}" if label else case,
                         **dataclasses.asdict(compiled)))
  return add


def pytest_terminal_summary(terminalreporter, config):
  if not _RESULTS:
    return
  write = terminalreporter.write_line
  write("")
  write("compile-time results (XLA ahead of time, no device):")
  write(f"{'target':<7} {'case':<56} {'kernels':>7} {'temp MiB':>10} "
        f"{'total MiB':>10} {'compile s':>9}")
  for r in _RESULTS:
    write(f"{r['target']:<7} {r['case']:<56} {r['kernels']:>7} "
          f"{r['temp_bytes'] / 2**20:>10.1f} {r['total_bytes'] / 2**20:>10.1f}"
          f" {r['seconds']:>9.1f}")
  path = config.getoption("--accel-report", None)
  if path:
    pathlib.Path(path).write_text(json.dumps(_RESULTS, indent=1) + "\n")
