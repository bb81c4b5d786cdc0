"""Second-order forward pass (jet) of elementwise activations, one Pallas pass.

For an elementwise :math:`f` moved along :math:`\\dot x` with second-order
input tangent :math:`\\ddot x`:

.. math::

  y = f(x), \\qquad
  \\dot y = f'(x)\\, \\dot x, \\qquad
  \\ddot y = f''(x)\\, \\dot x^2 + f'(x)\\, \\ddot x.

Under jvp-of-jvp XLA streams :math:`(x, \\dot x, \\ddot x)` through several
fusions; :func:`activation_jet` reads them once and writes
:math:`(y, \\dot y, \\ddot y)` once, computing in float32.

Supported activations (derivatives in closed form, :math:`s = \\sigma(x)`,
:math:`t = \\tanh`):

* ``relu``: :math:`f' = [x > 0]` (0 at 0, like ``jax.nn.relu``),
  :math:`f'' = 0`.
* ``tanh``: :math:`f' = 1 - t^2`, :math:`f'' = -2 t (1 - t^2)`.
* ``silu``: :math:`f' = s (1 + x (1 - s))`,
  :math:`f'' = s (1 - s) (2 + x (1 - 2 s))`.
* ``gelu`` (tanh approximation, ``jax.nn.gelu(approximate=True)``):
  :math:`f = x c`, :math:`c = \\tfrac12 (1 + \\tanh u)`,
  :math:`u = k (x + a x^3)`, :math:`k = \\sqrt{2/\\pi}`, :math:`a = 0.044715`;
  :math:`f' = c + x c'`, :math:`f'' = 2 c' + x c''` with
  :math:`c' = \\tfrac12 (1 - t^2) u'` and
  :math:`c'' = \\tfrac12 (1 - t^2) (u'' - 2 t u'^2)`.

The array is flattened and viewed as ``(rows, 128)``; rows are tiled by
``block_rows`` and zero-padded to a multiple of it: a power of two (64 by
default) for Triton and the interpreter, a multiple of Mosaic's 8 (16 for
16-bit types) sublanes (512 by default) for TPU (:mod:`.lowering` keeps the
version of the platform lowered for). With ``gpu_backend="mosaic_gpu"`` (or
``CDAT_FAST_GPU_BACKEND=mosaic_gpu``) CUDA gets the same body under Mosaic
GPU (:mod:`.mosaic_gpu`; tiles as Triton's).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from . import lowering
from . import mosaic_gpu
from .lowering import next_power_of_2 as _next_power_of_2
from .lowering import round_up as _round_up

__all__ = ["ACTIVATIONS", "activation_jet", "activation_jet_reference"]

_LANES = 128
# Default rows of 128 per tile: Triton/interpreter, TPU (6 buffers of
# 256 KiB in float32, double-buffered: 3 MiB of VMEM).
_BLOCK_ROWS = {lowering.TRITON: 64, lowering.TPU: 512}
_GELU_A = 0.044715
_GELU_K = math.sqrt(2.0 / math.pi)


def _relu_derivs(x):
  y = jnp.maximum(x, 0.0)
  d1 = jnp.where(x > 0, 1.0, 0.0).astype(x.dtype)
  return y, d1, jnp.zeros_like(x)


def _tanh_derivs(x):
  t = jnp.tanh(x)
  d1 = 1.0 - t * t
  return t, d1, -2.0 * t * d1


def _silu_derivs(x):
  s = jax.nn.sigmoid(x)
  sp = s * (1.0 - s)
  return x * s, s + x * sp, sp * (2.0 + x * (1.0 - 2.0 * s))


def _gelu_derivs(x):
  x2 = x * x
  u = _GELU_K * (x + _GELU_A * x2 * x)
  du = _GELU_K * (1.0 + 3.0 * _GELU_A * x2)
  ddu = _GELU_K * 6.0 * _GELU_A * x
  t = jnp.tanh(u)
  sech2 = 1.0 - t * t
  c = 0.5 * (1.0 + t)
  dc = 0.5 * sech2 * du
  ddc = 0.5 * sech2 * (ddu - 2.0 * t * du * du)
  return x * c, c + x * dc, 2.0 * dc + x * ddc


# name -> (f, f', f'') in closed form, for the kernel.
_DERIVS: dict[str, Callable[[jax.Array], tuple[jax.Array, ...]]] = {
    "relu": _relu_derivs,
    "tanh": _tanh_derivs,
    "silu": _silu_derivs,
    "gelu": _gelu_derivs,
}

#: The plain activations, as flax/JAX define them.
ACTIVATIONS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "relu": jax.nn.relu,
    "tanh": jnp.tanh,
    "silu": jax.nn.silu,
    "gelu": functools.partial(jax.nn.gelu, approximate=True),
}


class _Config(NamedTuple):
  activation: str
  block_rows: int | None
  interpret: Any
  num_warps: int | None
  gpu_backend: str = lowering.TRITON





def _check_activation(activation: str) -> None:
  if activation not in _DERIVS:
    raise ValueError(
        f"activation must be one of {sorted(_DERIVS)}, got {activation!r}")


def _activation_jet_kernel(*refs, activation, has_ddx):
  if has_ddx:
    x_ref, dx_ref, ddx_ref, y_ref, dy_ref, ddy_ref = refs
  else:
    x_ref, dx_ref, y_ref, dy_ref, ddy_ref = refs
  x = x_ref[...].astype(jnp.float32)
  dx = dx_ref[...].astype(jnp.float32)
  y, d1, d2 = _DERIVS[activation](x)
  ddy = d2 * dx * dx
  if has_ddx:
    ddy = ddy + d1 * ddx_ref[...].astype(jnp.float32)
  y_ref[...] = y.astype(y_ref.dtype)
  dy_ref[...] = (d1 * dx).astype(dy_ref.dtype)
  ddy_ref[...] = ddy.astype(ddy_ref.dtype)


def _tile_rows(config: _Config, target, rows: int, dtype) -> int:
  """Rows of 128 elements per tile for ``target``."""
  block_rows = config.block_rows or _BLOCK_ROWS.get(target.kind, 64)
  if target.kind == lowering.TPU:
    sub = lowering.sublanes(dtype)
    return min(_round_up(block_rows, sub), _round_up(rows, sub))
  return min(block_rows, _next_power_of_2(rows))


def _activation_jet_pallas(config: _Config, target, x, dx, ddx):
  shape, dtype, size = x.shape, x.dtype, x.size
  rows = -(-size // _LANES)
  block_rows = _tile_rows(config, target, rows, dtype)
  rows_p = _round_up(rows, block_rows)

  def tile(a):
    a = a.reshape(-1)
    pad = rows_p * _LANES - size
    if pad:
      a = jnp.pad(a, (0, pad))
    return a.reshape(rows_p, _LANES)

  args = [tile(x), tile(dx)] + ([tile(ddx)] if ddx is not None else [])
  spec = pl.BlockSpec((block_rows, _LANES), lambda i: (i, 0))
  kernel = functools.partial(
      _activation_jet_kernel, activation=config.activation,
      has_ddx=ddx is not None)
  if target.kind == lowering.MOSAIC_GPU:
    outs = mosaic_gpu.activation_jet(
        kernel, block_rows, *args[:2], args[2] if ddx is not None else None,
        name=f"activation_jet_{config.activation}")
    return tuple(o.reshape(-1)[:size].reshape(shape) for o in outs)
  outs = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((rows_p, _LANES), dtype)] * 3,
      grid=(rows_p // block_rows,),
      in_specs=[spec] * len(args),
      out_specs=[spec] * 3,
      # In place: each program reads its block of x, dx, ddx before writing
      # y, dy, ddy there, so the outputs take the inputs' buffers (XLA copies
      # an input first if it is still needed after the call).
      input_output_aliases={i: i for i in range(len(args))},
      interpret=target.interpret,
      compiler_params=lowering.compiler_params(
          target, num_warps=config.num_warps,
          dimension_semantics=("parallel",)),
      name=f"activation_jet_{config.activation}",
  )(*args)
  return tuple(o.reshape(-1)[:size].reshape(shape) for o in outs)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _activation_jet_call(config, x, dx, ddx):
  if x.size == 0:
    return activation_jet_reference(x, dx, ddx, activation=config.activation)
  return lowering.per_platform(
      lambda target: functools.partial(_activation_jet_pallas, config, target),
      config.interpret, x, dx, ddx,
      name=f"activation_jet_{config.activation}",
      rows=((True, True, True), x.ndim), cuda=config.gpu_backend)


@_activation_jet_call.defjvp
def _activation_jet_call_jvp(config, primals, tangents):
  # Explicit rule: Pallas' automatic JVP breaks on zero tangents.
  ref = functools.partial(
      activation_jet_reference, activation=config.activation)
  return jax.jvp(ref, primals, tangents)


def _promote(x, dx, ddx):
  if dx.shape != x.shape or (ddx is not None and ddx.shape != x.shape):
    raise ValueError(
        f"x, dx, ddx must share one shape, got {x.shape}, {dx.shape}, "
        f"{None if ddx is None else ddx.shape}")
  present = [a for a in (x, dx, ddx) if a is not None]
  dtype = jnp.result_type(*present)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(dtype, jnp.float32)
  return tuple(None if a is None else jnp.asarray(a, dtype)
               for a in (x, dx, ddx))


@functools.partial(
    jax.jit,
    static_argnames=("activation", "interpret", "block_rows", "num_warps",
                     "gpu_backend"))
def activation_jet(
    x: jax.Array,
    dx: jax.Array,
    ddx: jax.Array | None = None,
    *,
    activation: str,
    interpret: Any = None,
    block_rows: int | None = None,
    num_warps: int | None = None,
    gpu_backend: str | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fused second-order jet of an elementwise activation.

  .. math::

    y = f(x), \\quad \\dot y = f'(x) \\dot x, \\quad
    \\ddot y = f''(x) \\dot x^2 + f'(x) \\ddot x.

  Args:
    x: inputs, any shape.
    dx: first-order tangent, same shape as ``x``.
    ddx: second-order tangent, same shape, or None for zero.
    activation: one of ``"relu"``, ``"gelu"`` (tanh approximation),
      ``"tanh"``, ``"silu"``.
    interpret: None (default): Pallas' interpreter on CPU, compiled for the
      GPU or TPU lowered for; True/False: interpret/compile everywhere; a
      ``pallas.tpu.InterpretParams``: the TPU version, interpreted.
    block_rows: rows of 128 elements per tile, a power of two (None: 64;
      the TPU version rounds it up to Mosaic's sublanes, None: 512).
    num_warps: Triton warps per tile on GPU (None: the lowering's default).
    gpu_backend: the version built for CUDA: ``"triton"`` or
      ``"mosaic_gpu"`` (:mod:`.mosaic_gpu`); None: ``$CDAT_FAST_GPU_BACKEND``,
      else Triton (:func:`.lowering.gpu_backend`).

  Returns:
    ``(y, dy, ddy)`` with the shape and (common) dtype of the inputs.
  """
  _check_activation(activation)
  if block_rows is not None and (block_rows < 1 or
                                 block_rows & (block_rows - 1)):
    raise ValueError(f"block_rows must be a power of two, got {block_rows}")
  x, dx, ddx = _promote(x, dx, ddx)
  config = _Config(activation, block_rows, lowering.check_interpret(interpret),
                   num_warps, lowering.gpu_backend(gpu_backend))
  return _activation_jet_call(config, x, dx, ddx)


def activation_jet_reference(
    x: jax.Array,
    dx: jax.Array,
    ddx: jax.Array | None = None,
    *,
    activation: str,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Reference: jvp-of-jvp of the plain activation (``ACTIVATIONS``) in float32.

  Independent of the closed-form derivatives the kernel uses.
  """
  _check_activation(activation)
  x, dx, ddx = _promote(x, dx, ddx)
  dtype = x.dtype
  f = ACTIVATIONS[activation]
  x32, dx32 = x.astype(jnp.float32), dx.astype(jnp.float32)
  ddx32 = jnp.zeros_like(x32) if ddx is None else ddx.astype(jnp.float32)

  def first_order(a, da):
    return jax.jvp(f, (a,), (da,))

  (y, dy), (_, ddy) = jax.jvp(first_order, (x32, dx32), (dx32, ddx32))
  return y.astype(dtype), dy.astype(dtype), ddy.astype(dtype)
