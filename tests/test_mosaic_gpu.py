"""CPU-side checks of the Mosaic GPU versions (kernels/mosaic_gpu.py).

Mosaic GPU cannot run here: the tiles are checked against WGMMA's rules and
an sm_90 block's shared memory, the backend choice is checked, the CUDA
lowering (``jax.export`` for ``platforms=["cuda"]``) is checked to hold the
Mosaic GPU custom call, and on CPU the kernels still give the reference
(the interpreter of the Triton version). Compiling for an H100 is in
``tests/accel/test_compile_mosaic_gpu.py``.
"""
import itertools

import jax
from jax import export
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast.kernels import activation_jet, dense_jet, dense_jet_reference
from cdat_fast.kernels import lowering, mosaic_gpu

NAMES = ("x", "w", "dx", "dw", "ddx", "b", "db")
MOSAIC = "mosaic_gpu_v2"


def _subsets():
  optional = ("dx", "dw", "ddx", "b", "db")
  for r in range(len(optional) + 1):
    for extra in itertools.combinations(optional, r):
      yield ("x", "w") + extra


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16, jnp.float16])
def test_dense_tiles_fit_wgmma_registers_and_shared_memory(dtype):
  itemsize = jnp.dtype(dtype).itemsize
  for names in _subsets():
    for n_dim in (8, 100, 256, 4096):
      t = mosaic_gpu.dense_tiles(names, 4096, n_dim, dtype)
      assert t.block_m % 64 == 0
      assert t.block_n % 8 == 0 and t.block_n <= 256
      assert t.block_k * itemsize == 128  # one 128-byte swizzle
      acc = len(mosaic_gpu.accumulators(names))
      assert acc * t.block_m * t.block_n <= 128 * 128
      assert 1 <= t.stages <= 4
      assert t.smem_bytes <= mosaic_gpu.SMEM_BYTES


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("arrays", [5, 6])  # without and with ddx
def test_activation_tiles_split_the_program_rows_and_fit(arrays, dtype):
  itemsize = jnp.dtype(dtype).itemsize
  for block_rows in (1, 2, 8, 16, 64, 512, 4096):
    t = mosaic_gpu.activation_tiles(block_rows, arrays, dtype)
    assert t.step_rows * t.steps == block_rows
    assert t.step_rows <= 16  # float32 values a thread holds per array
    assert 1 <= t.stages <= min(2, t.steps)
    assert t.smem_bytes == arrays * t.stages * t.step_rows * 128 * itemsize
    assert t.smem_bytes <= mosaic_gpu.SMEM_BYTES // 2  # two programs an SM
  assert mosaic_gpu.activation_tiles(64, 6, jnp.float32) == (16, 4, 2, 98304)
  assert mosaic_gpu.activation_tiles(8, 6, jnp.float32) == (8, 1, 1, 24576)


def test_activation_tiles_shrink_stages_to_the_shared_memory():
  t = mosaic_gpu.activation_tiles(64, 6, jnp.float32, smem_bytes=2 * 60000)
  assert t.stages == 1 and t.smem_bytes == 6 * 16 * 128 * 4


def test_activation_jet_block_rows_are_checked():
  x = jnp.zeros((96, 128))
  with pytest.raises(ValueError, match="block_rows"):
    mosaic_gpu.activation_tiles(48, 6, jnp.float32)
  with pytest.raises(ValueError, match="block_rows"):
    mosaic_gpu.activation_jet(None, 64, x, x, None, name="t")


@pytest.mark.parametrize("has_ddx", [True, False])
def test_activation_jet_is_a_plgpu_kernel_not_a_pallas_call(has_ddx):
  """Traced on CPU: one Mosaic GPU kernel (``plgpu.kernel``), its outputs
  copied out by TMA, and no ``pl.pallas_call`` (deprecated on Mosaic GPU)."""
  x = jax.ShapeDtypeStruct((192, 128), jnp.bfloat16)

  def body(x_ref, dx_ref, *refs):  # y = x, dy = dx, ddy = x dx (+ ddx)
    *ddx_ref, y_ref, dy_ref, ddy_ref = refs
    y_ref[...] = x_ref[...]
    dy_ref[...] = dx_ref[...]
    ddy = x_ref[...] * dx_ref[...]
    ddy_ref[...] = (ddy + ddx_ref[0][...]) if ddx_ref else ddy

  def fn(x):
    return mosaic_gpu.activation_jet(body, 64, x, x, x if has_ddx else None,
                                     name="activation_jet_test")

  text = str(jax.make_jaxpr(fn)(x))
  assert "pallas_call[" not in text
  assert "copy_smem_to_gmem[" in text
  assert jax.eval_shape(fn, x) == [x] * 3


def test_accumulators_and_outputs():
  assert mosaic_gpu.accumulators(NAMES) == ("y", "dy", "ddy", "cross")
  assert mosaic_gpu.outputs(("x", "w")) == ("y",)
  assert mosaic_gpu.outputs(("x", "w", "db")) == ("y", "dy")
  assert mosaic_gpu.outputs(("x", "w", "dx", "dw")) == ("y", "dy", "ddy")


def test_gpu_backend_choice(monkeypatch):
  monkeypatch.delenv(lowering.GPU_BACKEND_ENV, raising=False)
  default = "triton" if lowering.pltriton is not None else "mosaic_gpu"
  assert lowering.gpu_backend() == default
  assert lowering.gpu_backend("mosaic_gpu") == "mosaic_gpu"
  monkeypatch.setenv(lowering.GPU_BACKEND_ENV, "mosaic_gpu")
  assert lowering.gpu_backend() == "mosaic_gpu"
  assert lowering.gpu_backend("triton") == "triton"
  with pytest.raises(ValueError, match="gpu_backend"):
    lowering.gpu_backend("cuda")


def _cuda_text(fn, *args):
  exp = export.export(
      jax.jit(fn), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(MOSAIC),
                       export.DisabledSafetyCheck.custom_call(
                           "__gpu$xla.gpu.triton")])(*args)
  return exp.mlir_module()


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_cuda_lowering_takes_mosaic_gpu_when_asked(dtype):
  x = jax.ShapeDtypeStruct((3, 70, 96), dtype)
  w = jax.ShapeDtypeStruct((96, 136), dtype)
  b = jax.ShapeDtypeStruct((136,), dtype)

  def mosaic(x, w, b):
    return dense_jet(x, w, b, x, w, b, x, gpu_backend="mosaic_gpu")

  def act(x):
    return activation_jet(x, x, x, activation="gelu",
                          gpu_backend="mosaic_gpu")

  text = _cuda_text(mosaic, x, w, b)
  assert text.count(MOSAIC) == 1 and "triton" not in text
  text = _cuda_text(act, x)
  assert text.count(MOSAIC) == 1 and "triton" not in text
  text = _cuda_text(lambda x, w, b: dense_jet(x, w, b, x, w, b, x,
                                               gpu_backend="triton"), x, w, b)
  assert MOSAIC not in text


def test_highest_precision_is_refused_for_mosaic_gpu():
  x = jax.ShapeDtypeStruct((64, 64), jnp.float32)
  with pytest.raises(NotImplementedError, match="TF32"):
    _cuda_text(lambda x: dense_jet(x, x, None, x, None, None, None,
                                    gpu_backend="mosaic_gpu",
                                    precision=jax.lax.Precision.HIGHEST), x)


def test_cpu_keeps_the_reference_with_mosaic_gpu_asked():
  keys = jax.random.split(jax.random.key(0), 6)
  x, dx, ddx = (jax.random.normal(k, (2, 5, 24)) for k in keys[:3])
  w, dw = (jax.random.normal(k, (24, 40)) for k in keys[3:5])
  b = jax.random.normal(keys[5], (40,))
  got = dense_jet(x, w, b, dx, dw, b, ddx, gpu_backend="mosaic_gpu")
  want = dense_jet_reference(x, w, b, dx, dw, b, ddx)
  for g, r in zip(got, want):
    np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)
  with pytest.raises(ValueError, match="gpu_backend"):
    dense_jet(x, w, b, dx, dw, b, ddx, gpu_backend="cuda")
