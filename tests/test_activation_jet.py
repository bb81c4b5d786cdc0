"""Tests for kernels/activation_jet.py: the Pallas kernel vs jvp-of-jvp refs."""

import jax
import jax.numpy as jnp
from jax.experimental.pallas import tpu as pltpu
import numpy as np
import pytest

from cdat_fast.kernels import ACTIVATIONS
from cdat_fast.kernels import activation_jet
from cdat_fast.kernels import activation_jet_reference as _reference

# Jitted: eager dispatch of the reference's many small ops is slow.
activation_jet_reference = jax.jit(_reference, static_argnames="activation")

SHAPE = (3, 37, 19)  # 2109 elements: not a multiple of the 128-lane rows.
# gelu's f'' at |x| ~ 5-9 cancels in float32: the kernel and the autodiff
# reference both sit ~1e-4 from a float64 evaluation there.
ATOL = {"gelu": 3e-4}


def _inputs(seed, dtype=jnp.float32):
  rng = np.random.default_rng(seed)  # numpy's generator compiles nothing.
  x = 3.0 * rng.standard_normal(SHAPE)  # Covers both tails of each f.
  dx, ddx = rng.standard_normal((2,) + SHAPE)
  return tuple(jnp.asarray(a, jnp.float32).astype(dtype) for a in (x, dx, ddx))


def _assert_close(actual, expected, rtol, atol):
  for a, e in zip(actual, expected):
    assert a.shape == e.shape and a.dtype == e.dtype
    np.testing.assert_allclose(np.asarray(a, np.float32),
                               np.asarray(e, np.float32), rtol=rtol, atol=atol)


@pytest.mark.parametrize("activation", sorted(ACTIVATIONS))
def test_matches_reference(activation):
  x, dx, ddx = _inputs(0)
  out = activation_jet(x, dx, ddx, activation=activation, interpret=True,
                       block_rows=8)  # Several tiles plus a padded one.
  ref = activation_jet_reference(x, dx, ddx, activation=activation)
  _assert_close(out, ref, rtol=1e-5, atol=ATOL.get(activation, 1e-5))
  np.testing.assert_allclose(out[0], ACTIVATIONS[activation](x), rtol=1e-6,
                             atol=1e-6)


@pytest.mark.parametrize("activation", ["gelu", "tanh"])
def test_without_second_order_input(activation):
  x, dx, _ = _inputs(1)
  out = activation_jet(x, dx, None, activation=activation, interpret=True)
  ref = activation_jet_reference(x, dx, jnp.zeros_like(x),
                                 activation=activation)
  _assert_close(out, ref, rtol=1e-5, atol=ATOL.get(activation, 1e-5))


def test_bf16_inputs():
  x, dx, ddx = _inputs(2, jnp.bfloat16)
  out = activation_jet(x, dx, ddx, activation="silu", interpret=True)
  assert all(o.dtype == jnp.bfloat16 for o in out)
  ref = activation_jet_reference(*(a.astype(jnp.float32) for a in (x, dx, ddx)),
                                 activation="silu")
  _assert_close([o.astype(jnp.float32) for o in out], ref, rtol=2e-2,
                atol=2e-2)


def test_jvp_of_kernel_with_zero_tangent():
  x, dx, ddx = _inputs(3)
  tx, tdx, _ = _inputs(4)
  fn = lambda a, b, c: activation_jet(a, b, c, activation="gelu",
                                      interpret=True)
  ref = lambda a, b, c: activation_jet_reference(a, b, c, activation="gelu")
  tangents = (tx, tdx, jnp.zeros_like(ddx))
  out, tan = jax.jvp(fn, (x, dx, ddx), tangents)
  ref_out, ref_tan = jax.jvp(ref, (x, dx, ddx), tangents)
  _assert_close(out, ref_out, rtol=1e-5, atol=ATOL["gelu"])
  _assert_close(tan, ref_tan, rtol=1e-4, atol=1e-3)


def test_rejects_unknown_activation():
  x, dx, ddx = _inputs(5)
  with pytest.raises(ValueError, match="activation"):
    activation_jet(x, dx, ddx, activation="softplus", interpret=True)


@pytest.mark.parametrize("with_ddx, aliased", [(True, 3), (False, 2)])
def test_gpu_version_writes_in_place(with_ddx, aliased):
  # y, dy, ddy take the buffers of x, dx, ddx (elementwise, block by block):
  # in a jet chain the outputs then need no buffers of their own.
  from jax import export  # pylint: disable=g-import-not-at-top
  a = jax.ShapeDtypeStruct((64, 256), jnp.float32)
  fn = jax.jit(lambda x, dx, *ddx: activation_jet(x, dx, *ddx,
                                                  activation="gelu"))
  exported = export.export(
      fn, platforms=["cuda"], disabled_checks=[
          export.DisabledSafetyCheck.custom_call("__gpu$xla.gpu.triton")])(
              a, a, *([a] if with_ddx else []))
  text = exported.mlir_module()
  assert text.count("custom_call @__gpu$xla.gpu.triton(") == 1
  assert text.count("stablehlo.output_operand_alias<") == aliased


@pytest.mark.parametrize("platform, calls", [("cpu", 0), ("cuda", 1),
                                             ("tpu", 1)])
def test_lowered_for_the_platform_lowered_for(platform, calls, kernel_calls):
  fn = lambda *a: activation_jet(*a, activation="gelu")
  assert kernel_calls(fn, *_inputs(6), platform=platform) == calls


@pytest.mark.parametrize("dtype, block_rows", [(jnp.float32, None),
                                               (jnp.bfloat16, 8)])
def test_tpu_version_matches_reference(dtype, block_rows):
  # Mosaic TPU's tiles (rows a multiple of 8, 16 in bf16) under Pallas' TPU
  # interpreter; block_rows=8 becomes 16 in bf16: two tiles, one padded.
  x, dx, ddx = _inputs(7, dtype)
  out = activation_jet(x, dx, ddx, activation="tanh", block_rows=block_rows,
                       interpret=pltpu.InterpretParams())
  ref = activation_jet_reference(*(a.astype(jnp.float32) for a in (x, dx, ddx)),
                                 activation="tanh")
  tol = 1e-5 if dtype == jnp.float32 else 2e-2
  _assert_close([o.astype(jnp.float32) for o in out], ref, rtol=tol, atol=tol)
