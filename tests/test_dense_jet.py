"""Tests for kernels/dense_jet.py: the Pallas kernel (interpreted) vs refs."""

import jax
from jax import export
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from cdat_fast.kernels import dense_jet
from cdat_fast.kernels import dense_jet_reference as _reference

# Jitted: eager dispatch of the reference's many small ops is slow.
dense_jet_reference = jax.jit(_reference)

# Awkward sizes: rows 2*37, contraction 19, outputs 53 (none a block multiple).
BATCH, K, N = (2, 37), 19, 53


def _inputs(seed, dtype=jnp.float32):
  """Fresh normal (x, w, b, dx, dw, db, ddx), from numpy: nothing to compile."""
  rng = np.random.default_rng(seed)
  shapes = [BATCH + (K,), (K, N), (N,), BATCH + (K,), (K, N), (N,),
            BATCH + (K,)]
  return [jnp.asarray(rng.standard_normal(s), jnp.float32).astype(dtype)
          for s in shapes]


def _assert_close(actual, expected, rtol, atol):
  for a, e in zip(actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("blocks", [(64, 64, 32), (16, 16, 16)])
def test_matches_reference_f32(blocks):
  args = _inputs(0)
  bm, bn, bk = blocks
  out = dense_jet(*args, interpret=True, block_m=bm, block_n=bn, block_k=bk)
  _assert_close(out, dense_jet_reference(*args), rtol=1e-5, atol=1e-5)


# Contractions past whole blocks: 24 is padded to 32; 48 = 32 + 16;
# 112 = 3·32 + 16; 240 = 3·64 + 32 + 16 (two tail pieces).
@pytest.mark.parametrize("k, block_k", [(24, 32), (48, 32), (112, 32),
                                        (240, 64)])
def test_contraction_tail_pieces(k, block_k):
  rng = np.random.default_rng(k)
  shapes = [(40, k), (k, 24), (24,), (40, k), (k, 24), (24,), (40, k)]
  args = [jnp.asarray(rng.standard_normal(s), jnp.float32) for s in shapes]
  out = dense_jet(*args, interpret=True, block_k=block_k)
  _assert_close(out, dense_jet_reference(*args), rtol=1e-5, atol=1e-4)


def test_gpu_version_does_not_pad_the_contraction():
  # 784 = 24·32 + 16: lowered for CUDA, the Triton kernel reads x and W as
  # they are (a padded copy would be temporary memory for the whole step).
  shapes = [(128, 784), (784, 64), (64,), None, (784, 64), None, None]
  avals = [None if s is None else jax.ShapeDtypeStruct(s, jnp.float32)
           for s in shapes]
  exported = export.export(
      jax.jit(dense_jet), platforms=["cuda"],
      disabled_checks=[export.DisabledSafetyCheck.custom_call(
          "__gpu$xla.gpu.triton")])(*avals)
  text = exported.mlir_module()
  assert text.count("custom_call @__gpu$xla.gpu.triton(") == 1
  assert "stablehlo.pad" not in text


def test_matches_jvp_of_jvp_of_plain_layer():
  x, w, b, dx, dw, db, ddx = _inputs(1)
  plain = lambda x, w, b: x @ w + b
  first = lambda p, t: jax.jvp(plain, p, t)
  (y, dy), (_, ddy) = jax.jvp(
      first, ((x, w, b), (dx, dw, db)),
      ((dx, dw, db), (ddx, jnp.zeros_like(dw), jnp.zeros_like(db))))
  out = dense_jet(x, w, b, dx, dw, db, ddx, interpret=True)
  _assert_close(out, (y, dy, ddy), rtol=1e-5, atol=1e-4)


# Which of (b, dx, dw, db, ddx) are None; the kernel skips those products.
@pytest.mark.parametrize("absent", [("b", "db"), ("dx", "ddx"), ("dw", "db")])
def test_optional_inputs(absent):
  names = ("x", "w", "b", "dx", "dw", "db", "ddx")
  args = [None if name in absent else a
          for name, a in zip(names, _inputs(2))]
  out = dense_jet(*args, interpret=True, block_k=16)
  ref = dense_jet_reference(*args)
  _assert_close(out, ref, rtol=1e-5, atol=1e-5)
  if "dx" in absent:  # ddy = ddx w + 2 dx dw vanishes.
    assert not np.any(np.asarray(out[2]))


def test_bf16_inputs():
  args = _inputs(3, jnp.bfloat16)
  out = dense_jet(*args, interpret=True)
  assert all(o.dtype == jnp.bfloat16 for o in out)
  # Reference in float32 from the same bf16 values; bf16 output rounding.
  ref = dense_jet_reference(*[a.astype(jnp.float32) for a in args])
  _assert_close([o.astype(jnp.float32) for o in out], ref, rtol=2e-2,
                atol=5e-2)


def test_jvp_of_kernel_uses_explicit_rule():
  x, w, b, dx, dw, db, ddx = _inputs(4)
  t = _inputs(5)
  t[2] = jnp.zeros_like(t[2])  # A zero tangent: breaks Pallas' automatic rule.
  fn = lambda *a: dense_jet(*a, interpret=True)
  out, tan = jax.jvp(fn, (x, w, b, dx, dw, db, ddx), tuple(t))
  ref_out, ref_tan = jax.jvp(dense_jet_reference, (x, w, b, dx, dw, db, ddx),
                             tuple(t))
  _assert_close(out, ref_out, rtol=1e-5, atol=1e-5)
  _assert_close(tan, ref_tan, rtol=1e-5, atol=1e-4)


def test_rejects_mismatched_shapes():
  x, w, b, dx, dw, db, ddx = _inputs(6)
  with pytest.raises(ValueError, match="last dimension"):
    dense_jet(x[..., :-1], w, b, dx, dw, db, ddx, interpret=True)
  with pytest.raises(ValueError, match="dw"):
    dense_jet(x, w, b, dx, dw[:-1], db, ddx, interpret=True)


@pytest.mark.parametrize("platform, calls", [("cpu", 0), ("cuda", 1),
                                             ("tpu", 1)])
def test_lowered_for_the_platform_lowered_for(platform, calls, kernel_calls):
  # The default picks the version by the platform being lowered for, not by
  # the host's backend: one Triton or Mosaic TPU kernel, the interpreter on
  # CPU. jax.export lowers for CUDA and TPU without either present.
  assert kernel_calls(dense_jet, *_inputs(7), platform=platform) == calls


@pytest.mark.parametrize("dtype, tol", [(jnp.float32, 1e-5),
                                        (jnp.bfloat16, 5e-2)])
def test_tpu_version_matches_reference(dtype, tol):
  # The Mosaic TPU version (its own tiles: the contraction as grid steps
  # accumulating in VMEM) under Pallas' TPU interpreter. 600 contraction
  # steps span two of its 512-deep blocks; 300 columns three 256-wide ones.
  rng = np.random.default_rng(8)
  shapes = [(74, 600), (600, 300), (300,), (74, 600), (600, 300), (300,),
            (74, 600)]
  args = [jnp.asarray(rng.standard_normal(s) / np.sqrt(s[0]), dtype)
          for s in shapes]
  out = dense_jet(*args, interpret=pltpu.InterpretParams())
  ref = dense_jet_reference(*[a.astype(jnp.float32) for a in args])
  _assert_close([o.astype(jnp.float32) for o in out], ref, rtol=tol,
                atol=tol)


def test_tpu_version_optional_inputs():
  args = list(_inputs(9))
  args[2] = args[3] = args[6] = None  # No bias, dx or ddx.
  out = dense_jet(*args, interpret=pltpu.InterpretParams())
  _assert_close(out, dense_jet_reference(*args), rtol=1e-5, atol=1e-5)


def test_exported_for_several_platforms_runs_on_cpu():
  # One artifact for CPU, CUDA and TPU: each platform's version is in it,
  # and the CPU one runs here.
  args = _inputs(10)
  fn = jax.jit(dense_jet)
  exported = export.export(fn, platforms=["cpu", "cuda", "tpu"],
                           disabled_checks=[
                               export.DisabledSafetyCheck.custom_call(
                                   "__gpu$xla.gpu.triton")])(*args)
  text = exported.mlir_module()
  assert text.count("custom_call @__gpu$xla.gpu.triton(") == 1
  assert text.count("custom_call @tpu_custom_call(") == 1
  _assert_close(exported.call(*args), dense_jet_reference(*args), rtol=1e-5,
                atol=1e-5)


def test_runs_outside_jit():
  # Under jax.disable_jit() the per-platform call evaluates the version of
  # the default backend (here the interpreter) instead of staging it out.
  args = _inputs(11)
  with jax.disable_jit():
    out = dense_jet(*args)
  _assert_close(out, dense_jet_reference(*args), rtol=1e-5, atol=1e-5)
