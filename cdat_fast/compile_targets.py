"""Accelerators to compile for from a host without them, and the compile.

XLA compiles ahead of time for a device that is not present from a
description of it (``jax.experimental.topologies``): an NVIDIA GPU from an
XLA ``GpuTargetConfigProto`` through the CUDA PJRT plugin, a TPU slice from
libtpu. This module holds those descriptions and the compile that the
compile-for-accelerators tests (``tests/accel``) and the benchmarks share:

* :func:`gpu_target_config` reads the ``GpuTargetConfigProto`` of an H100
  (``h100``, SXM, 80 GB) or an H200 (``h200``, 141 GB), both sm_90, shipped
  with the package (``cdat_fast/targets/*.txtpb``);
* :func:`gpu_devices` and :func:`tpu_devices` return the devices of a GPU
  or TPU topology, :func:`gpu_target` and :func:`tpu_target` one device of
  it as a :class:`Target`;
* :func:`compile_for` lowers and compiles a function for one device.

The GPU needs ``jax-cuda12-plugin`` with ptxas (``nvidia-cuda-nvcc-cu12``),
the TPU ``libtpu`` (``pip install '.[accel-compile]'``); run JAX itself on
the CPU (``JAX_PLATFORMS=cpu``), and set ``ALLOW_MULTIPLE_LIBTPU_LOAD=1``
where several processes may load libtpu.
"""
from __future__ import annotations

import functools
import importlib.resources
import re
import time
from collections.abc import Callable
from typing import Any, NamedTuple

#: The GPU descriptions shipped with the package.
GPU_TARGETS = ("h100", "h200")
#: XLA options for GPU compiles without a device: XLA's Triton gemm
#: autotiler fails on some shapes ("Couldn't find output tile sizes"), so
#: XLA's own matmuls go to cuBLAS; Pallas kernels are Triton regardless.
GPU_OPTIONS = {"xla_gpu_enable_triton_gemm": False}
#: A TPU v5e chip's HBM (the topology does not report it).
V5E_HBM_BYTES = 16 * 2**30


class Target(NamedTuple):
  """One device to compile for.

  Attributes:
    name: ``h100``, ``h200`` or ``v5e``.
    device: a device of a ``jax.experimental.topologies`` topology.
    memory_bytes: the device's memory.
    compiler_options: XLA options for compiles for it.
  """
  name: str
  device: Any
  memory_bytes: int
  compiler_options: dict[str, Any]


def gpu_target_config(name: str = "h100") -> str:
  """The ``GpuTargetConfigProto`` text of GPU ``name`` (:data:`GPU_TARGETS`).

  Raises:
    ValueError: naming ``name``, if no description of that GPU is shipped.
  """
  if name not in GPU_TARGETS:
    raise ValueError(f"gpu target name {name!r}: one of {GPU_TARGETS}")
  return (importlib.resources.files("cdat_fast") / "targets"
          / f"{name}.txtpb").read_text()


def gpu_devices(name: str = "h100", topology: str = "1x1x1") -> list:
  """The devices of a topology of GPUs ``name``: ``"1x1x8"`` is 8 in one
  host, ``"2x1x4"`` 2 hosts of 4."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  topo = topologies.get_topology_desc(
      name, "cuda", target_config=gpu_target_config(name), topology=topology)
  return list(topo.devices)


def tpu_devices(topology: str = "v5e:2x2") -> list:
  """The devices of a TPU slice, e.g. ``"v5e:2x2"`` or ``"v5e:4x4"``."""
  from jax.experimental import topologies  # pylint: disable=g-import-not-at-top
  return list(topologies.get_topology_desc(topology, "tpu").devices)


@functools.lru_cache(maxsize=None)
def gpu_target(name: str = "h100") -> Target:
  """One GPU ``name`` (:data:`GPU_TARGETS`), its memory from its description,
  with :data:`GPU_OPTIONS`."""
  text = gpu_target_config(name)
  memory = int(re.search(r"device_memory_size:\s*(\d+)", text).group(1))
  return Target(name, gpu_devices(name)[0], memory, GPU_OPTIONS)


@functools.lru_cache(maxsize=None)
def tpu_target() -> Target:
  """One chip of a TPU v5e 2x2."""
  return Target("v5e", tpu_devices("v5e:2x2")[0], V5E_HBM_BYTES, {})


def compile_for(device, fn: Callable[..., Any], args,
                compiler_options: dict[str, Any] | None = None
                ) -> tuple[Any, float]:
  """Compiles ``fn`` for ``device`` with arguments shaped like ``args``.

  Args:
    device: a device of a ``jax.experimental.topologies`` topology (or any
      device), or a :class:`Target` (whose options apply unless
      ``compiler_options`` is given).
    fn: the function to compile.
    args: a tuple of pytrees of arrays or ``jax.ShapeDtypeStruct`` (only
      shapes and dtypes matter), placed on ``device``.
    compiler_options: XLA options for this compile.

  Returns:
    ``(compiled, seconds)``: the ``jax.stages.Compiled`` (``as_text()``,
    ``memory_analysis()``) and the seconds lowering and compiling took.
  """
  import jax  # pylint: disable=g-import-not-at-top
  if isinstance(device, Target):
    if compiler_options is None:
      compiler_options = device.compiler_options
    device = device.device
  sharding = jax.sharding.SingleDeviceSharding(device)
  specs = jax.tree.map(
      lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
      args)
  start = time.perf_counter()
  compiled = jax.jit(fn).lower(*specs).compile(
      compiler_options=compiler_options or {})
  return compiled, time.perf_counter() - start
