"""The Mosaic GPU versions (kernels/mosaic_gpu.py) compiled for an H100.

Each compile must hold the kernel as one Mosaic GPU custom call
(``mosaic_gpu_v2``) and no Triton call, and the shared memory Mosaic GPU
allots the kernel (read while it is lowered) must fit an sm_90 block's
232448 bytes and agree with :func:`kernels.mosaic_gpu.dense_tiles`.

What this proves without a device: Pallas' Mosaic GPU lowering accepts the
kernels (WGMMA shapes and dtypes, layouts, the shared-memory check) and XLA
compiles the program around the custom call. Mosaic GPU compiles the
kernel's MLIR to PTX and SASS when the executable is loaded on a GPU, so
ptxas and the numbers are checked only on a device (``bench/device_check.sh``).
"""
from __future__ import annotations

import contextlib
import dataclasses

import jax.numpy as jnp
import pytest

from compile_cases import compile_for, DENSE, DTYPES

pytestmark = pytest.mark.accel

MAX_SMEM = 232448  # H100/H200 shared memory per block, opt-in
MOSAIC = 'custom_call_target="mosaic_gpu_v2"'
TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'
ACTIVATION = [("gelu", (8192, 4096)), ("silu", (4096, 1000))]


@contextlib.contextmanager
def _smem_allotted():
  """The shared-memory bytes of each Mosaic GPU kernel lowered inside."""
  from jax.experimental.mosaic.gpu import core  # pylint: disable=g-import-not-at-top
  sizes, original = [], core._smem_tree_size  # pylint: disable=protected-access

  def size(buffers):
    sizes.append(original(buffers))
    return sizes[-1]

  core._smem_tree_size = size  # pylint: disable=protected-access
  try:
    yield sizes
  finally:
    core._smem_tree_size = original  # pylint: disable=protected-access


def _compile(h100, fn, args):
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()  # Lower afresh, so the shared memory is read.
  with _smem_allotted() as sizes:
    compiled = compile_for(h100.device, fn, args, h100.compiler_options)
  return compiled, sizes


def _text(h100, fn, args):
  import jax  # pylint: disable=g-import-not-at-top
  specs = [jax.ShapeDtypeStruct(a.shape, a.dtype,
                                sharding=jax.sharding.SingleDeviceSharding(
                                    h100.device)) for a in args]
  return jax.jit(fn).lower(*specs).compile(h100.compiler_options).as_text()


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("mkn", DENSE, ids=lambda s: "x".join(map(str, s)))
def test_dense_jet_compiles_as_one_mosaic_gpu_kernel(mkn, dtype, h100,
                                                     record):
  import jax  # pylint: disable=g-import-not-at-top
  from cdat_fast.kernels import dense_jet, mosaic_gpu  # pylint: disable=g-import-not-at-top
  m, k, n = mkn
  dt = DTYPES[dtype]
  lhs, rhs, vec = ((m, k), dt), ((k, n), dt), ((n,), dt)
  args = [jax.ShapeDtypeStruct(*s) for s in (lhs, rhs, vec, lhs, rhs, vec,
                                             lhs)]

  def fn(*a):
    return dense_jet(*a, gpu_backend="mosaic_gpu")

  compiled, sizes = _compile(h100, fn, args)
  text = _text(h100, fn, args)
  record(h100, dataclasses.replace(compiled, kernels=text.count(MOSAIC)))
  assert text.count(MOSAIC) == 1 and TRITON not in text
  tiles = mosaic_gpu.dense_tiles(("x", "w", "dx", "dw", "ddx", "b", "db"),
                                 m, n, dt)
  assert sizes and max(sizes) <= MAX_SMEM
  assert max(sizes) >= tiles.smem_bytes  # The estimate is a lower bound.
  assert compiled.total_bytes < h100.memory_bytes


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("case", ACTIVATION, ids=lambda c: c[0])
def test_activation_jet_compiles_as_one_mosaic_gpu_kernel(case, dtype, h100,
                                                          record):
  import jax  # pylint: disable=g-import-not-at-top
  from cdat_fast.kernels import activation_jet  # pylint: disable=g-import-not-at-top
  activation, shape = case
  args = [jax.ShapeDtypeStruct(shape, DTYPES[dtype])] * 3

  def fn(x, dx, ddx):
    return activation_jet(x, dx, ddx, activation=activation,
                          gpu_backend="mosaic_gpu")

  compiled, sizes = _compile(h100, fn, args)
  text = _text(h100, fn, args)
  record(h100, dataclasses.replace(compiled, kernels=text.count(MOSAIC)))
  assert text.count(MOSAIC) == 1 and TRITON not in text
  assert sizes and max(sizes) <= MAX_SMEM
  assert compiled.total_bytes < h100.memory_bytes


def test_default_stays_triton(h100):
  import jax  # pylint: disable=g-import-not-at-top
  from cdat_fast.kernels import dense_jet  # pylint: disable=g-import-not-at-top
  args = [jax.ShapeDtypeStruct((2048, 256), jnp.bfloat16),
          jax.ShapeDtypeStruct((256, 256), jnp.bfloat16)]

  def fn(x, w):
    return dense_jet(x, w, None, x, w, None, x)

  text = _text(h100, fn, args)
  assert text.count(TRITON) == 1 and MOSAIC not in text


@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("present", [("x", "w"), ("x", "w", "dw", "db"),
                                     ("x", "w", "b", "dx", "ddx"),
                                     ("x", "w", "dx", "dw")],
                         ids=lambda p: "+".join(p))
def test_dense_jet_subsets_compile_as_one_mosaic_gpu_kernel(present, dtype,
                                                            h100, record):
  """Absent tangents and biases (the first layer's jet has no dx, ddx):
  fewer accumulators, SMEM blocks and bias copies, still one kernel."""
  import jax  # pylint: disable=g-import-not-at-top
  from cdat_fast.kernels import dense_jet, mosaic_gpu  # pylint: disable=g-import-not-at-top
  m, k, n = 2048, 512, 1024
  dt = DTYPES[dtype]
  shapes = dict(x=(m, k), w=(k, n), b=(n,), dx=(m, k), dw=(k, n), db=(n,),
                ddx=(m, k))
  order = ("x", "w", "b", "dx", "dw", "db", "ddx")
  names = [n_ for n_ in order if n_ in present]
  args = [jax.ShapeDtypeStruct(shapes[n_], dt) for n_ in names]

  def fn(*a):
    given = dict(zip(names, a))
    return dense_jet(*[given.get(n_) for n_ in order],
                     gpu_backend="mosaic_gpu")

  compiled, sizes = _compile(h100, fn, args)
  text = _text(h100, fn, args)
  record(h100, dataclasses.replace(compiled, kernels=text.count(MOSAIC)))
  assert text.count(MOSAIC) == 1 and TRITON not in text
  tiles = mosaic_gpu.dense_tiles(tuple(names), m, n, dt)
  assert sizes and tiles.smem_bytes <= max(sizes) <= MAX_SMEM
