"""The Mosaic GPU versions (kernels/mosaic_gpu.py) compiled for an H100.

Each compile must hold the kernel as one Mosaic GPU custom call
(``mosaic_gpu_v2``) and no Triton call, and the shared memory Mosaic GPU
allots the kernel (read while it is lowered) must fit an sm_90 block's
232448 bytes and agree with :func:`kernels.mosaic_gpu.dense_tiles` and
:func:`kernels.mosaic_gpu.activation_tiles`. Lowering must raise no
``DeprecationWarning`` (``pl.pallas_call`` on Mosaic GPU raises one).

What this proves without a device: Pallas' Mosaic GPU lowering accepts the
kernels (WGMMA shapes and dtypes, layouts, the shared-memory check) and XLA
compiles the program around the custom call. Mosaic GPU compiles the
kernel's MLIR to PTX and SASS when the executable is loaded on a GPU, so
ptxas and the numbers are checked only on a device (``bench/device_check.sh``).
"""
from __future__ import annotations

import contextlib
import dataclasses
import warnings

import jax.numpy as jnp
import pytest

from compile_cases import compile_for, DENSE, DTYPES

pytestmark = pytest.mark.accel

MAX_SMEM = 232448  # H100/H200 shared memory per block, opt-in
MOSAIC = 'custom_call_target="mosaic_gpu_v2"'
TRITON = 'custom_call_target="__gpu$xla.gpu.triton"'
# (activation, shape, ddx given): every activation; 1000x999 and 5x100 are
# zero-padded to the tiles (7808 and 64 rows of 128 for the kernel).
ACTIVATION = [("gelu", (8192, 4096), True), ("silu", (4096, 1000), True),
              ("relu", (8192, 1024), True), ("tanh", (1000, 999), True),
              ("gelu", (1000, 999), False), ("silu", (5, 100), True)]


def _activation_id(case):
  activation, shape, has_ddx = case
  return "-".join([activation, "x".join(map(str, shape))]
                  + ([] if has_ddx else ["no_ddx"]))


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


@contextlib.contextmanager
def _deprecations():
  """The DeprecationWarnings raised inside, every time.

  ``pl.pallas_call``'s Mosaic GPU lowering warns only until Pallas has
  registered its Mosaic GPU rule (the first Mosaic GPU kernel lowered in
  the process, ``plgpu.kernel``'s too); the rule is taken out meanwhile so
  that a ``pallas_call`` warns whatever was lowered before.
  """
  from jax._src.pallas import core as pallas_core  # pylint: disable=g-import-not-at-top
  from jax.experimental.pallas import mosaic_gpu as plgpu  # pylint: disable=g-import-not-at-top
  rules = pallas_core._backend_lowering_rules  # pylint: disable=protected-access
  rule = rules.pop(plgpu.CompilerParams, None)
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always")
      yield caught
  finally:
    if rule is not None:
      rules[plgpu.CompilerParams] = rule


def _compile(h100, fn, args):
  import jax  # pylint: disable=g-import-not-at-top
  jax.clear_caches()  # Lower afresh, so the shared memory is read.
  with _smem_allotted() as sizes, _deprecations() as caught:
    compiled = compile_for(h100.device, fn, args, h100.compiler_options)
  deprecated = [str(w.message) for w in caught
                if issubclass(w.category, DeprecationWarning)]
  assert not deprecated, deprecated
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
@pytest.mark.parametrize("case", ACTIVATION, ids=_activation_id)
def test_activation_jet_compiles_as_one_mosaic_gpu_kernel(case, dtype, h100,
                                                          record):
  import jax  # pylint: disable=g-import-not-at-top
  from cdat_fast.kernels import activation_jet, mosaic_gpu  # pylint: disable=g-import-not-at-top
  activation, shape, has_ddx = case
  dt = DTYPES[dtype]
  args = [jax.ShapeDtypeStruct(shape, dt)] * (3 if has_ddx else 2)

  def fn(*a):
    return activation_jet(*a, activation=activation,
                          gpu_backend="mosaic_gpu")

  compiled, sizes = _compile(h100, fn, args)
  text = _text(h100, fn, args)
  record(h100, dataclasses.replace(compiled, kernels=text.count(MOSAIC)))
  assert text.count(MOSAIC) == 1 and TRITON not in text
  rows = -(-shape[0] * shape[1] // 128)
  block_rows = min(64, 1 << (rows - 1).bit_length())  # the Triton tiles
  tiles = mosaic_gpu.activation_tiles(block_rows, len(args) + 3, dt)
  assert sizes and tiles.smem_bytes <= max(sizes) <= MAX_SMEM // 2
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
