"""Second-order forward pass (jet) of a dense layer as one fused Pallas kernel.

A dense layer :math:`y = x W + b` moved along the tangent
:math:`(\\dot x, \\dot W, \\dot b)` with second-order input tangent
:math:`\\ddot x` (the weights' second-order tangent is zero, as in
jvp-of-jvp along a fixed direction) has the jet

.. math::

  y = x W + b, \\qquad
  \\dot y = \\dot x W + x \\dot W + \\dot b, \\qquad
  \\ddot y = \\ddot x W + 2 \\dot x \\dot W.

XLA's jvp-of-jvp computes the same five matmuls as separate fusions that
re-read :math:`W` and :math:`\\dot W`. :func:`dense_jet` computes them in one
Pallas kernel, tiled over rows (tokens) and output columns, which reads each
block of :math:`x, \\dot x, \\ddot x, W, \\dot W` once per contraction step and
accumulates the three outputs in float32.

Sizes that do not divide the block sizes are zero-padded (the padding adds
nothing to the contraction and is sliced off the outputs); all block sizes are
powers of two, as the GPU (Triton) lowering requires. Leading batch dimensions
of ``x`` are flattened into rows.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from .lowering import compiler_params as _compiler_params
from .lowering import default_interpret as _default_interpret
from .lowering import next_power_of_2 as _next_power_of_2

__all__ = ["dense_jet", "dense_jet_reference"]


class _Config(NamedTuple):
  """Static configuration of one kernel instance (hashable)."""
  block_m: int
  block_n: int
  block_k: int
  interpret: bool
  num_warps: int | None
  num_stages: int | None
  precision: lax.PrecisionLike



def _round_up(n: int, m: int) -> int:
  return -(-n // m) * m




def _block(size: int, block: int, minimum: int = 16) -> int:
  """A power-of-two block no larger than needed for ``size``."""
  if block & (block - 1):
    raise ValueError(f"block sizes must be powers of two, got {block}")
  return min(block, max(minimum, _next_power_of_2(size)))


def _pad2(a: jax.Array, rows: int, cols: int) -> jax.Array:
  pr, pc = rows - a.shape[0], cols - a.shape[1]
  if pr == 0 and pc == 0:
    return a
  return jnp.pad(a, ((0, pr), (0, pc)))


def _dense_jet_kernel(*refs, names, out_names, block_k, num_k, precision):
  """Kernel body: one (block_m, block_n) tile of y, dy, ddy.

  ``refs`` are the input refs named by ``names`` (lhs blocks ``(block_m, K)``,
  rhs blocks ``(K, block_n)``, bias blocks ``(1, block_n)``) followed by the
  output refs named by ``out_names``.
  """
  r = dict(zip(names + out_names, refs))
  has = r.__contains__
  dot = functools.partial(
      jnp.dot, preferred_element_type=jnp.float32, precision=precision)
  bm, bn = r["y"].shape

  def body(k, acc):
    acc_y, acc_dy, acc_ddy = acc
    ks = pl.ds(pl.multiple_of(k * block_k, block_k), block_k)
    x = r["x"][:, ks]
    w = r["w"][ks, :]
    acc_y += dot(x, w)
    if has("dx"):
      dx = r["dx"][:, ks]
      acc_dy += dot(dx, w)
    if has("dw"):
      dw = r["dw"][ks, :]
      acc_dy += dot(x, dw)
    if has("ddx"):
      acc_ddy += dot(r["ddx"][:, ks], w)
    if has("dx") and has("dw"):
      acc_ddy += 2.0 * dot(dx, dw)
    return acc_y, acc_dy, acc_ddy

  zeros = jnp.zeros((bm, bn), jnp.float32)
  acc_y, acc_dy, acc_ddy = lax.fori_loop(0, num_k, body, (zeros, zeros, zeros))
  if has("b"):
    acc_y += r["b"][...].astype(jnp.float32)
  r["y"][...] = acc_y.astype(r["y"].dtype)
  if has("dy"):
    if has("db"):
      acc_dy += r["db"][...].astype(jnp.float32)
    r["dy"][...] = acc_dy.astype(r["dy"].dtype)
  if has("ddy"):
    r["ddy"][...] = acc_ddy.astype(r["ddy"].dtype)


def _dense_jet_pallas(config: _Config, x, w, b, dx, dw, db, ddx):
  """Flattens, pads, runs the kernel and un-pads. Inputs share one dtype."""
  k_dim, n_dim = w.shape
  batch_shape = x.shape[:-1]
  m_dim = math.prod(batch_shape)
  dtype = x.dtype
  if m_dim == 0 or k_dim == 0 or n_dim == 0:
    return dense_jet_reference(x, w, b, dx, dw, db, ddx,
                               precision=config.precision)

  bm = _block(m_dim, config.block_m)
  bn = _block(n_dim, config.block_n)
  bk = _block(k_dim, config.block_k)
  mp, np_, kp = _round_up(m_dim, bm), _round_up(n_dim, bn), _round_up(k_dim, bk)

  def lhs(a):  # (..., K) -> (mp, kp)
    return _pad2(a.reshape(m_dim, k_dim), mp, kp)

  def rhs(a):  # (K, N) -> (kp, np_)
    return _pad2(a, kp, np_)

  def vec(a):  # (N,) -> (1, np_)
    return _pad2(a.reshape(1, n_dim), 1, np_)

  lhs_spec = pl.BlockSpec((bm, kp), lambda i, j: (i, 0))
  rhs_spec = pl.BlockSpec((kp, bn), lambda i, j: (0, j))
  vec_spec = pl.BlockSpec((1, bn), lambda i, j: (0, j))
  out_spec = pl.BlockSpec((bm, bn), lambda i, j: (i, j))

  names, args, specs = ["x", "w"], [lhs(x), rhs(w)], [lhs_spec, rhs_spec]
  for name, value, fmt, spec in (
      ("dx", dx, lhs, lhs_spec), ("dw", dw, rhs, rhs_spec),
      ("ddx", ddx, lhs, lhs_spec), ("b", b, vec, vec_spec),
      ("db", db, vec, vec_spec)):
    if value is not None:
      names.append(name)
      args.append(fmt(value))
      specs.append(spec)

  has_dy = dx is not None or dw is not None or db is not None
  has_ddy = ddx is not None or (dx is not None and dw is not None)
  out_names = ["y"] + (["dy"] if has_dy else []) + (["ddy"] if has_ddy else [])
  out_shape = [jax.ShapeDtypeStruct((mp, np_), dtype) for _ in out_names]

  kernel = functools.partial(
      _dense_jet_kernel, names=tuple(names), out_names=tuple(out_names),
      block_k=bk, num_k=kp // bk, precision=config.precision)
  outs = pl.pallas_call(
      kernel,
      out_shape=out_shape,
      grid=(mp // bm, np_ // bn),
      in_specs=specs,
      out_specs=[out_spec] * len(out_names),
      interpret=config.interpret,
      compiler_params=_compiler_params(
          config.interpret, config.num_warps, config.num_stages),
      name="dense_jet",
  )(*args)

  out = dict(zip(out_names, outs))

  def unpad(a):
    return a[:m_dim, :n_dim].reshape(*batch_shape, n_dim)

  y = unpad(out["y"])
  dy = unpad(out["dy"]) if has_dy else jnp.zeros_like(y)
  ddy = unpad(out["ddy"]) if has_ddy else jnp.zeros_like(y)
  return y, dy, ddy


def _check_and_promote(x, w, b, dx, dw, db, ddx):
  """Validates shapes and casts every present input to one dtype."""
  if w.ndim != 2:
    raise ValueError(f"w must be (in_features, out_features), got {w.shape}")
  if x.shape[-1] != w.shape[0]:
    raise ValueError(
        f"x's last dimension {x.shape[-1]} does not match w's {w.shape[0]}")
  for name, value, shape in (
      ("dx", dx, x.shape), ("ddx", ddx, x.shape), ("dw", dw, w.shape),
      ("b", b, w.shape[1:]), ("db", db, w.shape[1:])):
    if value is not None and value.shape != shape:
      raise ValueError(f"{name} must have shape {shape}, got {value.shape}")
  present = [a for a in (x, w, b, dx, dw, db, ddx) if a is not None]
  dtype = jnp.result_type(*present)
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(dtype, jnp.float32)
  return tuple(None if a is None else jnp.asarray(a, dtype)
               for a in (x, w, b, dx, dw, db, ddx))


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _dense_jet_call(config, x, w, b, dx, dw, db, ddx):
  return _dense_jet_pallas(config, x, w, b, dx, dw, db, ddx)


@_dense_jet_call.defjvp
def _dense_jet_call_jvp(config, primals, tangents):
  # Pallas' automatic JVP breaks on zero tangents; the jet is polynomial in its
  # inputs, so differentiating the reference is exact.
  ref = functools.partial(dense_jet_reference, precision=config.precision)
  return jax.jvp(ref, primals, tangents)


@functools.partial(
    jax.jit,
    static_argnames=("interpret", "block_m", "block_n", "block_k", "num_warps",
                     "num_stages", "precision"))
def dense_jet(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    dx: jax.Array | None,
    dw: jax.Array | None,
    db: jax.Array | None,
    ddx: jax.Array | None,
    *,
    interpret: bool | None = None,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 32,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precision: lax.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fused second-order jet of ``y = x @ w + b``.

  .. math::

    y = x w + b, \\quad
    \\dot y = \\dot x w + x \\dot w + \\dot b, \\quad
    \\ddot y = \\ddot x w + 2 \\dot x \\dot w.

  Args:
    x: inputs, shape ``(..., K)``; leading dimensions are flattened into rows.
    w: kernel, shape ``(K, N)``.
    b: bias ``(N,)`` or None.
    dx: first-order tangent of ``x`` (same shape) or None for zero.
    dw: first-order tangent of ``w`` or None for zero.
    db: first-order tangent of ``b`` or None for zero.
    ddx: second-order tangent of ``x`` or None for zero.
    interpret: run the kernel in Pallas interpret mode; None means interpret
      on CPU and compile elsewhere.
    block_m: rows (tokens) per tile, a power of two.
    block_n: output columns per tile, a power of two.
    block_k: contraction step, a power of two.
    num_warps: Triton warps per tile on GPU (None: the lowering's default).
    num_stages: Triton software-pipelining stages on GPU (None: default).
    precision: matmul precision passed to every ``jnp.dot`` in the kernel.

  Returns:
    ``(y, dy, ddy)``, each of shape ``(..., N)`` in the common dtype of the
    inputs (accumulated in float32).
  """
  x, w, b, dx, dw, db, ddx = _check_and_promote(x, w, b, dx, dw, db, ddx)
  if interpret is None:
    interpret = _default_interpret()
  config = _Config(block_m, block_n, block_k, bool(interpret), num_warps,
                   num_stages, precision)
  return _dense_jet_call(config, x, w, b, dx, dw, db, ddx)


def dense_jet_reference(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    dx: jax.Array | None,
    dw: jax.Array | None,
    db: jax.Array | None,
    ddx: jax.Array | None,
    *,
    precision: lax.PrecisionLike = None,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pure-``jnp`` reference for :func:`dense_jet`: same arguments, f32 sums."""
  x, w, b, dx, dw, db, ddx = _check_and_promote(x, w, b, dx, dw, db, ddx)
  dtype = x.dtype

  def f32(a):
    return a.astype(jnp.float32)

  def mm(a, c):
    return jnp.matmul(f32(a), f32(c), precision=precision)

  zero = jnp.zeros(x.shape[:-1] + w.shape[1:], jnp.float32)
  y = mm(x, w) + (0.0 if b is None else f32(b))
  dy = zero
  if dx is not None:
    dy = dy + mm(dx, w)
  if dw is not None:
    dy = dy + mm(x, dw)
  if db is not None:
    dy = dy + f32(db)
  ddy = zero
  if ddx is not None:
    ddy = ddy + mm(ddx, w)
  if dx is not None and dw is not None:
    ddy = ddy + 2.0 * mm(dx, dw)
  return y.astype(dtype), dy.astype(dtype), ddy.astype(dtype)
