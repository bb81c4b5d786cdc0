"""Second-order forward pass (jet) of layer normalisation as a Pallas kernel.

Layer norm over the last axis (``n`` features) with scale :math:`\\gamma` and
bias :math:`\\beta`:

.. math::

  \\mu = \\overline{x}, \\quad x_c = x - \\mu, \\quad
  r = (\\overline{x_c^2} + \\epsilon)^{-1/2}, \\quad
  \\hat x = r x_c, \\quad y = \\hat x \\gamma + \\beta,

where :math:`\\overline{v}` is the mean over the feature axis. Move
:math:`(x, \\gamma, \\beta)` along :math:`(\\dot x, \\dot\\gamma, \\dot\\beta)`
with second-order tangent :math:`\\ddot x` for ``x`` (the parameters'
second-order tangents are zero, as in jvp-of-jvp along a fixed direction).
With :math:`a = r (\\dot x - \\overline{\\dot x})`,
:math:`b = r (\\ddot x - \\overline{\\ddot x})`,
:math:`p = \\overline{\\hat x a}`,
:math:`q = \\overline{\\hat x b}` and :math:`m = \\overline{a^2}`:

.. math::

  \\dot{\\hat x} = a - p \\hat x, \\qquad
  \\ddot{\\hat x} = b - 2 p a - (q + m - 3 p^2) \\hat x,

  \\dot y = \\dot{\\hat x} \\gamma + \\hat x \\dot\\gamma + \\dot\\beta, \\qquad
  \\ddot y = \\ddot{\\hat x} \\gamma + 2 \\dot{\\hat x} \\dot\\gamma.

(From :math:`\\dot r = -r p` and :math:`\\dot a = b - p a`.) The scale enters
the second-order term bilinearly, through :math:`2 \\dot{\\hat x} \\dot\\gamma`;
the bias only at first order.

The kernel's grid runs over blocks of rows; each tile holds whole rows (the
feature axis zero-padded and masked out of the statistics), reads
:math:`x, \\dot x, \\ddot x` once and writes :math:`y, \\dot y, \\ddot y`
once, computing in float32. Statistics are two-pass (mean, then centred
variance). The Triton and interpreter version pads the features to a power
of two and takes power-of-two row blocks; the Mosaic TPU version pads them
to a multiple of 128 lanes and takes row blocks that are multiples of 8 (16
for 16-bit types) sublanes (:mod:`.lowering` keeps the version of the
platform lowered for).
"""

from __future__ import annotations

import functools
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from . import lowering
from .lowering import next_power_of_2 as _next_power_of_2
from .lowering import round_up as _round_up

__all__ = ["layer_norm_jet", "layer_norm_jet_reference"]

# Elements per tile: a GPU tile's registers (Triton, interpreter); a TPU
# tile's VMEM (6 blocks of 256 KiB in float32, double-buffered, and the
# kernel's float32 temporaries).
_TILE_ELEMENTS = {lowering.TRITON: 4096, lowering.TPU: 65536}


class _Config(NamedTuple):
  epsilon: float
  block_rows: int | None
  interpret: Any
  num_warps: int | None





def _layer_norm_jet_kernel(*refs, names, n, epsilon):
  """One tile of whole rows: statistics, then y, dy, ddy."""
  r = dict(zip(names + ("y", "dy", "ddy"), refs))
  has = r.__contains__

  def load(name):
    return r[name][...].astype(jnp.float32)

  x = load("x")
  mask = lax.broadcasted_iota(jnp.int32, x.shape, 1) < n

  def mean(v):  # Over the n true features (padding holds zeros).
    return jnp.sum(v, axis=1, keepdims=True) * (1.0 / n)

  def centre(v):
    return jnp.where(mask, v - mean(v), 0.0)

  xc = centre(x)  # Padded features are zero on input, so the mean is exact.
  rstd = lax.rsqrt(mean(xc * xc) + epsilon)
  xhat = xc * rstd
  gamma = load("scale") if has("scale") else None

  def scaled(v):  # v γ, or v itself without a scale.
    return v if gamma is None else v * gamma

  y = scaled(xhat)
  if has("bias"):
    y = y + load("bias")
  dy = jnp.zeros_like(x)
  ddy = jnp.zeros_like(x)
  if has("dx"):
    a = centre(load("dx")) * rstd
    p = mean(xhat * a)
    dxhat = a - p * xhat
    ddxhat = -2.0 * p * a - (mean(a * a) - 3.0 * p * p) * xhat
    if has("ddx"):
      b = centre(load("ddx")) * rstd
      ddxhat = ddxhat + b - mean(xhat * b) * xhat
    dy = scaled(dxhat)
    ddy = scaled(ddxhat)
    if has("dscale"):
      ddy = ddy + 2.0 * dxhat * load("dscale")
  elif has("ddx"):
    b = centre(load("ddx")) * rstd
    ddy = scaled(b - mean(xhat * b) * xhat)
  if has("dscale"):
    dy = dy + xhat * load("dscale")
  if has("dbias"):
    dy = dy + load("dbias")
  r["y"][...] = y.astype(r["y"].dtype)
  r["dy"][...] = dy.astype(r["dy"].dtype)
  r["ddy"][...] = ddy.astype(r["ddy"].dtype)


def _tiles(config: _Config, target, rows: int, n: int, dtype):
  """(rows per block, padded feature width) for ``target``."""
  block_rows = config.block_rows
  if target.kind == lowering.TPU:
    sub = lowering.sublanes(dtype)
    n_p = _round_up(n, 128)
    if block_rows is None:
      block_rows = max(sub, _TILE_ELEMENTS[target.kind] // n_p // sub * sub)
    return min(_round_up(block_rows, sub), _round_up(rows, sub)), n_p
  n_p = _next_power_of_2(n)
  if block_rows is None:
    block_rows = max(1, _TILE_ELEMENTS[target.kind] // n_p)
  return min(block_rows, _next_power_of_2(rows)), n_p


def _layer_norm_jet_pallas(config: _Config, target, x, scale, bias, dx,
                           dscale, dbias, ddx):
  shape, dtype = x.shape, x.dtype
  n = shape[-1]
  rows = x.size // n
  block_rows, n_p = _tiles(config, target, rows, n, dtype)
  rows_p = _round_up(rows, block_rows)

  def as_rows(a):
    a = a.reshape(rows, n)
    if rows_p != rows or n_p != n:
      a = jnp.pad(a, ((0, rows_p - rows), (0, n_p - n)))
    return a

  def as_vector(a):
    a = a.reshape(1, n)
    return jnp.pad(a, ((0, 0), (0, n_p - n))) if n_p != n else a

  row_spec = pl.BlockSpec((block_rows, n_p), lambda i: (i, 0))
  vec_spec = pl.BlockSpec((1, n_p), lambda i: (0, 0))
  names, args, specs = [], [], []
  for name, value, fmt, spec in (
      ("x", x, as_rows, row_spec), ("dx", dx, as_rows, row_spec),
      ("ddx", ddx, as_rows, row_spec), ("scale", scale, as_vector, vec_spec),
      ("bias", bias, as_vector, vec_spec),
      ("dscale", dscale, as_vector, vec_spec),
      ("dbias", dbias, as_vector, vec_spec)):
    if value is not None:
      names.append(name)
      args.append(fmt(value))
      specs.append(spec)

  num_warps = config.num_warps
  if num_warps is None:
    num_warps = min(max(block_rows * n_p // 512, 1), 8)
  kernel = functools.partial(
      _layer_norm_jet_kernel, names=tuple(names), n=n, epsilon=config.epsilon)
  outs = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((rows_p, n_p), dtype)] * 3,
      grid=(rows_p // block_rows,),
      in_specs=specs,
      out_specs=[row_spec] * 3,
      interpret=target.interpret,
      compiler_params=lowering.compiler_params(
          target, num_warps=num_warps, dimension_semantics=("parallel",)),
      name="layer_norm_jet",
  )(*args)
  return tuple(o[:rows, :n].reshape(shape) for o in outs)


def _check_and_promote(x, scale, bias, dx, dscale, dbias, ddx):
  n = x.shape[-1:]
  for name, value, shape in (
      ("dx", dx, x.shape), ("ddx", ddx, x.shape), ("scale", scale, n),
      ("bias", bias, n), ("dscale", dscale, n), ("dbias", dbias, n)):
    if value is not None and value.shape != shape:
      raise ValueError(f"{name} must have shape {shape}, got {value.shape}")
  if dscale is not None and scale is None:
    raise ValueError("dscale given without scale")
  if dbias is not None and bias is None:
    raise ValueError("dbias given without bias")
  present = [a for a in (x, scale, bias, dx, dscale, dbias, ddx)
             if a is not None]
  dtype = jnp.result_type(*present)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(dtype, jnp.float32)
  return tuple(None if a is None else jnp.asarray(a, dtype)
               for a in (x, scale, bias, dx, dscale, dbias, ddx))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _layer_norm_jet_call(config, x, scale, bias, dx, dscale, dbias, ddx):
  if x.size == 0:
    return layer_norm_jet_reference(x, scale, bias, dx, dscale, dbias, ddx,
                                    epsilon=config.epsilon)
  return lowering.per_platform(
      lambda target: functools.partial(_layer_norm_jet_pallas, config, target),
      config.interpret, x, scale, bias, dx, dscale, dbias, ddx,
      name="layer_norm_jet",
      rows=((True, False, False, True, False, False, True), x.ndim - 1))


@_layer_norm_jet_call.defjvp
def _layer_norm_jet_call_jvp(config, primals, tangents):
  # Explicit rule: Pallas' automatic JVP breaks on zero tangents.
  ref = functools.partial(layer_norm_jet_reference, epsilon=config.epsilon)
  return jax.jvp(ref, primals, tangents)


@functools.partial(
    jax.jit,
    static_argnames=("epsilon", "interpret", "block_rows", "num_warps"))
def layer_norm_jet(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    dx: jax.Array | None,
    dscale: jax.Array | None,
    dbias: jax.Array | None,
    ddx: jax.Array | None,
    *,
    epsilon: float = 1e-6,
    interpret: Any = None,
    block_rows: int | None = None,
    num_warps: int | None = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fused second-order jet of layer norm over the last axis.

  See the module docstring for the maths.

  Args:
    x: inputs ``(..., n)``; leading dimensions are rows.
    scale: :math:`\\gamma`, shape ``(n,)``, or None (no scale).
    bias: :math:`\\beta`, shape ``(n,)``, or None (no bias).
    dx: first-order tangent of ``x`` or None for zero.
    dscale: first-order tangent of ``scale`` or None for zero.
    dbias: first-order tangent of ``bias`` or None for zero.
    ddx: second-order tangent of ``x`` or None for zero.
    epsilon: added to the variance (flax's default is ``1e-6``).
    interpret: None (default): Pallas' interpreter on CPU, compiled for the
      GPU or TPU lowered for; True/False: interpret/compile everywhere; a
      ``pallas.tpu.InterpretParams``: the TPU version, interpreted.
    block_rows: rows per tile, a power of two (None: about 4096 elements per
      tile; the TPU version rounds it up to Mosaic's sublanes, None: about
      65536 elements).
    num_warps: Triton warps per tile on GPU (None: from the tile size).

  Returns:
    ``(y, dy, ddy)`` with the shape of ``x`` in the inputs' common dtype.
  """
  if block_rows is not None and (block_rows < 1 or
                                 block_rows & (block_rows - 1)):
    raise ValueError(f"block_rows must be a power of two, got {block_rows}")
  args = _check_and_promote(x, scale, bias, dx, dscale, dbias, ddx)
  config = _Config(float(epsilon), block_rows,
                   lowering.check_interpret(interpret), num_warps)
  return _layer_norm_jet_call(config, *args)


def _layer_norm_plain(x, scale, bias, epsilon):
  """The textbook formula (two-pass variance), in the dtype of ``x``."""
  mean = jnp.mean(x, axis=-1, keepdims=True)
  xc = x - mean
  var = jnp.mean(xc * xc, axis=-1, keepdims=True)
  y = xc * lax.rsqrt(var + epsilon)
  if scale is not None:
    y = y * scale
  if bias is not None:
    y = y + bias
  return y


def layer_norm_jet_reference(
    x: jax.Array,
    scale: jax.Array | None,
    bias: jax.Array | None,
    dx: jax.Array | None,
    dscale: jax.Array | None,
    dbias: jax.Array | None,
    ddx: jax.Array | None,
    *,
    epsilon: float = 1e-6,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Reference: jvp-of-jvp of the plain layer-norm formula, in float32.

  The outer tangent repeats the inner one, ``(dx, dscale, dbias)``, and moves
  the inner tangents by ``(ddx, 0, 0)``. Independent of the kernel's algebra.
  """
  x, scale, bias, dx, dscale, dbias, ddx = _check_and_promote(
      x, scale, bias, dx, dscale, dbias, ddx)
  dtype = x.dtype

  def f32(a, like=None):  # None -> None, or zeros shaped like `like`.
    if a is None:
      return None if like is None else jnp.zeros_like(like)
    return a.astype(jnp.float32)

  primals = (f32(x), f32(scale), f32(bias))
  tangents = tuple(None if p is None else f32(t, p)
                   for p, t in zip(primals, (dx, dscale, dbias)))
  second = tuple(None if p is None else jnp.zeros_like(p) for p in primals)
  second = (f32(ddx, primals[0]),) + second[1:]
  plain = functools.partial(_layer_norm_plain, epsilon=epsilon)

  def first_order(p, t):
    return jax.jvp(plain, p, t)

  (y, dy), (_, ddy) = jax.jvp(first_order, (primals, tangents),
                              (tangents, second))
  return y.astype(dtype), dy.astype(dtype), ddy.astype(dtype)
