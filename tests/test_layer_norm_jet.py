"""Tests for kernels/layer_norm_jet.py: the Pallas kernel vs jvp-of-jvp refs."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from cdat_fast.kernels import layer_norm_jet
from cdat_fast.kernels import layer_norm_jet_reference as _reference

# Jitted: eager dispatch of the reference's many small ops is slow.
layer_norm_jet_reference = jax.jit(_reference, static_argnames="epsilon")

BATCH, N = (2, 37), 53  # 53 features: padded to 64 and masked in the kernel.
NAMES = ("x", "scale", "bias", "dx", "dscale", "dbias", "ddx")


def _inputs(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)  # numpy's generator compiles nothing.
  shapes = [BATCH + (N,), (N,), (N,), BATCH + (N,), (N,), (N,), BATCH + (N,)]
  args = [rng.standard_normal(s) for s in shapes]
  args[0] = 2.0 + 3.0 * args[0]  # Offset and spread: the statistics matter.
  return [jnp.asarray(a, jnp.float32).astype(dtype) for a in args]


def _assert_close(actual, expected, rtol, atol):
  for a, e in zip(actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("block_rows", [None, 16])
def test_matches_reference(block_rows):
  args = _inputs(0)
  out = layer_norm_jet(*args, interpret=True, block_rows=block_rows)
  _assert_close(out, layer_norm_jet_reference(*args), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("absent", [
    ("scale", "bias", "dscale", "dbias"),  # Plain normalisation.
    ("dx", "ddx"),  # Only the parameters move: dy = x̂ dγ + dβ, ddy = 0.
    ("dscale", "ddx"),
])
def test_optional_inputs(absent):
  args = [None if n in absent else a for n, a in zip(NAMES, _inputs(1))]
  out = layer_norm_jet(*args, interpret=True, epsilon=1e-5)
  ref = layer_norm_jet_reference(*args, epsilon=1e-5)
  _assert_close(out, ref, rtol=1e-4, atol=1e-4)


def test_second_order_scale_term():
  """The bilinear term 2·(dx̂)·dγ of ddy is present and right."""
  x, scale, bias, dx, dscale, dbias, _ = _inputs(2)
  with_dscale = layer_norm_jet(x, scale, bias, dx, dscale, dbias, None,
                               interpret=True)[2]
  without = layer_norm_jet(x, scale, bias, dx, None, dbias, None,
                           interpret=True)[2]
  diff = np.asarray(with_dscale - without)
  assert np.abs(diff).max() > 1e-2  # dγ changes ddy, through 2·(dx̂)·dγ.
  ref = layer_norm_jet_reference(x, scale, bias, dx, dscale, dbias, None)[2]
  np.testing.assert_allclose(with_dscale, ref, rtol=1e-4, atol=1e-4)


def test_bf16_inputs():
  args = _inputs(3, jnp.bfloat16)
  out = layer_norm_jet(*args, interpret=True)
  assert all(o.dtype == jnp.bfloat16 for o in out)
  ref = layer_norm_jet_reference(*(a.astype(jnp.float32) for a in args))
  _assert_close([o.astype(jnp.float32) for o in out], ref, rtol=3e-2,
                atol=1e-1)


def test_jvp_of_kernel_with_zero_tangent():
  primals = tuple(_inputs(4))
  tangents = list(_inputs(5))
  tangents[2] = jnp.zeros_like(tangents[2])
  fn = lambda *a: layer_norm_jet(*a, interpret=True)
  out, tan = jax.jvp(fn, primals, tuple(tangents))
  ref_out, ref_tan = jax.jvp(layer_norm_jet_reference, primals,
                             tuple(tangents))
  _assert_close(out, ref_out, rtol=1e-4, atol=1e-4)
  _assert_close(tan, ref_tan, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("platform, calls", [("cpu", 0), ("cuda", 1),
                                             ("tpu", 1)])
def test_lowered_for_the_platform_lowered_for(platform, calls, kernel_calls):
  assert kernel_calls(layer_norm_jet, *_inputs(8), platform=platform) == calls


@pytest.mark.parametrize("dtype, block_rows, tol", [
    (jnp.float32, None, 1e-4),  # One tile of 80 rows (74 padded).
    (jnp.float32, 8, 1e-4),  # Ten tiles, the last padded.
    (jnp.bfloat16, 16, 5e-2)])
def test_tpu_version_matches_reference(dtype, block_rows, tol):
  # Mosaic TPU's tiles (features padded to 128 lanes and masked, rows a
  # multiple of 8 or 16) under Pallas' TPU interpreter.
  args = _inputs(9, dtype)
  out = layer_norm_jet(*args, block_rows=block_rows,
                       interpret=pltpu.InterpretParams())
  ref = layer_norm_jet_reference(*[a.astype(jnp.float32) for a in args])
  _assert_close([o.astype(jnp.float32) for o in out], ref, rtol=tol, atol=tol)
