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

Rows and columns that do not divide the tiles are zero-padded (sliced off
the outputs). The contraction is not padded to its block on GPU and CPU: the
kernel loops over whole blocks, then over power-of-two pieces of the rest,
so only a contraction that is not a multiple of 16 is padded (zeros add
nothing to it); the TPU version pads it to its block. Leading batch
dimensions of ``x`` are flattened into rows. Two versions are built and the
one for the platform lowered for is kept (:mod:`.lowering`): with
power-of-two blocks, the contraction looped inside the kernel (Triton on GPU,
and the interpreter on CPU), and for Mosaic TPU with blocks whose last two
dimensions are multiples of (8 or 16, 128) and the contraction as the
innermost, sequential grid axis accumulating into VMEM. With
``gpu_backend="mosaic_gpu"`` (or ``CDAT_FAST_GPU_BACKEND=mosaic_gpu``) CUDA
gets the Mosaic GPU version instead (:mod:`.mosaic_gpu`: warpgroup matmuls,
the contraction pipelined through shared memory).
"""

from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

from . import lowering
from . import mosaic_gpu
from .lowering import next_power_of_2 as _next_power_of_2
from .lowering import round_up as _round_up

__all__ = ["dense_jet", "dense_jet_reference"]

# The TPU version's (rows, columns, contraction) blocks: MXU-sized, about
# 7 MiB of VMEM in float32 with double buffering (v5e's default scoped
# VMEM is 16 MiB).
_TPU_BLOCKS = (256, 256, 512)
# Inputs tiled by rows and the contraction (the rest by contraction and
# columns, or by columns for the biases).
_LHS = ("x", "dx", "ddx")


class _Config(NamedTuple):
  """Static configuration of one kernel instance (hashable)."""
  block_m: int
  block_n: int
  block_k: int
  interpret: Any
  num_warps: int | None
  num_stages: int | None
  precision: lax.PrecisionLike
  gpu_backend: str = lowering.TRITON


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


def _accumulate(acc, load, has, dot):
  """Adds one contraction step's products to ``acc = (y, dy, ddy)``."""
  acc_y, acc_dy, acc_ddy = acc
  x = load("x")
  w = load("w")
  acc_y += dot(x, w)
  if has("dx"):
    dx = load("dx")
    acc_dy += dot(dx, w)
  if has("dw"):
    dw = load("dw")
    acc_dy += dot(x, dw)
  if has("ddx"):
    acc_ddy += dot(load("ddx"), w)
  if has("dx") and has("dw"):
    acc_ddy += 2.0 * dot(dx, dw)
  return acc_y, acc_dy, acc_ddy


def _store(r, acc):
  """Adds the biases to the float32 sums and writes the present outputs."""
  acc_y, acc_dy, acc_ddy = acc
  if "b" in r:
    acc_y += r["b"][...].astype(jnp.float32)
  r["y"][...] = acc_y.astype(r["y"].dtype)
  if "dy" in r:
    if "db" in r:
      acc_dy += r["db"][...].astype(jnp.float32)
    r["dy"][...] = acc_dy.astype(r["dy"].dtype)
  if "ddy" in r:
    r["ddy"][...] = acc_ddy.astype(r["ddy"].dtype)


def _dot(precision):
  return functools.partial(
      jnp.dot, preferred_element_type=jnp.float32, precision=precision)


def _k_chunks(k_dim: int, block_k: int) -> tuple[int, tuple[int, ...]]:
  """The contraction's split: ``(full, tail)`` with ``k_dim = full·block_k
  + sum(tail)``, ``tail`` powers of two in decreasing order.

  ``k_dim`` is a multiple of 16 here (:func:`_contraction`), so every tail
  piece is a power of two of at least 16, as Triton's ``dot`` needs: the
  contraction runs over the operands as they are, without padding them to
  ``block_k`` (a padded copy of ``x`` and ``W`` is temporary memory that
  XLA may keep live across the whole step).
  """
  full, rest = divmod(k_dim, block_k)
  tail = []
  while rest:
    piece = 1 << (rest.bit_length() - 1)
    tail.append(piece)
    rest -= piece
  return full, tuple(tail)


def _contraction(k_dim: int) -> int:
  """The contraction length the Triton/interpreter kernel runs over: ``k_dim``
  rounded up to 16 (padding only sizes that are not multiples of 16)."""
  return _round_up(k_dim, 16)


def _dense_jet_kernel(*refs, names, out_names, block_k, num_k, tail,
                      precision):
  """Triton/interpreter body: one (block_m, block_n) tile of y, dy, ddy.

  ``refs`` are the input refs named by ``names`` (lhs blocks ``(block_m, K)``,
  rhs blocks ``(K, block_n)``, bias blocks ``(1, block_n)``) followed by the
  output refs named by ``out_names``; the contraction is looped here:
  ``num_k`` steps of ``block_k``, then the static ``tail`` pieces
  (:func:`_k_chunks`).
  """
  r = dict(zip(names + out_names, refs))
  bm, bn = r["y"].shape
  dot = _dot(precision)

  def chunk(ks, acc):
    def load(name):
      return r[name][:, ks] if name in _LHS else r[name][ks, :]

    return _accumulate(acc, load, r.__contains__, dot)

  def body(k, acc):
    return chunk(pl.ds(pl.multiple_of(k * block_k, block_k), block_k), acc)

  zeros = jnp.zeros((bm, bn), jnp.float32)
  acc = lax.fori_loop(0, num_k, body, (zeros, zeros, zeros))
  start = num_k * block_k
  for piece in tail:
    acc = chunk(pl.ds(start, piece), acc)
    start += piece
  _store(r, acc)


def _dense_jet_tpu_kernel(*refs, names, out_names, precision):
  """Mosaic TPU body: one contraction step of a (block_m, block_n) tile.

  ``refs``: the input blocks (lhs ``(block_m, block_k)``, rhs
  ``(block_k, block_n)``, biases ``(1, block_n)``), the outputs, then one
  float32 VMEM accumulator per output. The contraction is grid axis 2.
  """
  count = len(names) + len(out_names)
  r = dict(zip(names + out_names, refs[:count]))
  acc_refs = dict(zip(out_names, refs[count:]))
  step = pl.program_id(2)

  @pl.when(step == 0)
  def _():
    for a in acc_refs.values():
      a[...] = jnp.zeros(a.shape, a.dtype)

  acc = tuple(acc_refs[o][...] if o in acc_refs else 0.0
              for o in ("y", "dy", "ddy"))
  acc = _accumulate(acc, lambda name: r[name][...], r.__contains__,
                    _dot(precision))
  for o, value in zip(("y", "dy", "ddy"), acc):
    if o in acc_refs:
      acc_refs[o][...] = value

  @pl.when(step == pl.num_programs(2) - 1)
  def _():
    _store(r, tuple(acc_refs[o][...] if o in acc_refs else None
                    for o in ("y", "dy", "ddy")))


def _blocks(config: _Config, target, m_dim, k_dim, n_dim, dtype):
  """(block_m, block_n, block_k) for ``target``."""
  if target.kind == lowering.TPU:
    bm, bn, bk = _TPU_BLOCKS
    return (min(bm, _round_up(m_dim, lowering.sublanes(dtype))),
            min(bn, _round_up(n_dim, 128)), min(bk, _round_up(k_dim, 128)))
  return (_block(m_dim, config.block_m), _block(n_dim, config.block_n),
          _block(k_dim, config.block_k))


def _specs(target, bm, bn, bk, kp):
  """BlockSpecs of lhs, rhs, bias and output blocks, and the grid's rank."""
  if target.kind == lowering.TPU:  # Grid (rows, columns, contraction).
    return (pl.BlockSpec((bm, bk), lambda i, j, k: (i, k)),
            pl.BlockSpec((bk, bn), lambda i, j, k: (k, j)),
            pl.BlockSpec((1, bn), lambda i, j, k: (0, j)),
            pl.BlockSpec((bm, bn), lambda i, j, k: (i, j)))
  return (pl.BlockSpec((bm, kp), lambda i, j: (i, 0)),
          pl.BlockSpec((kp, bn), lambda i, j: (0, j)),
          pl.BlockSpec((1, bn), lambda i, j: (0, j)),
          pl.BlockSpec((bm, bn), lambda i, j: (i, j)))


def _dense_jet_pallas(config: _Config, target, x, w, b, dx, dw, db, ddx):
  """Flattens, pads, runs the kernel for ``target`` and un-pads."""
  if target.kind == lowering.MOSAIC_GPU:
    return mosaic_gpu.dense_jet(x, w, b, dx, dw, db, ddx,
                                precision=config.precision)
  k_dim, n_dim = w.shape
  batch_shape = x.shape[:-1]
  m_dim = math.prod(batch_shape)
  dtype = x.dtype
  bm, bn, bk = _blocks(config, target, m_dim, k_dim, n_dim, dtype)
  mp, np_ = _round_up(m_dim, bm), _round_up(n_dim, bn)
  kp = (_round_up(k_dim, bk) if target.kind == lowering.TPU
        else _contraction(k_dim))
  lhs_spec, rhs_spec, vec_spec, out_spec = _specs(target, bm, bn, bk, kp)
  formats = {  # name -> (padded operand, its BlockSpec)
      "lhs": (lambda a: _pad2(a.reshape(m_dim, k_dim), mp, kp), lhs_spec),
      "rhs": (lambda a: _pad2(a, kp, np_), rhs_spec),
      "vec": (lambda a: _pad2(a.reshape(1, n_dim), 1, np_), vec_spec)}
  names, args, specs = [], [], []
  for name, value, kind in (
      ("x", x, "lhs"), ("w", w, "rhs"), ("dx", dx, "lhs"), ("dw", dw, "rhs"),
      ("ddx", ddx, "lhs"), ("b", b, "vec"), ("db", db, "vec")):
    if value is not None:
      fmt, spec = formats[kind]
      names.append(name)
      args.append(fmt(value))
      specs.append(spec)

  has_dy = dx is not None or dw is not None or db is not None
  has_ddy = ddx is not None or (dx is not None and dw is not None)
  out_names = ["y"] + (["dy"] if has_dy else []) + (["ddy"] if has_ddy else [])
  out_shape = [jax.ShapeDtypeStruct((mp, np_), dtype) for _ in out_names]
  static = dict(names=tuple(names), out_names=tuple(out_names),
                precision=config.precision)
  if target.kind == lowering.TPU:
    kernel = functools.partial(_dense_jet_tpu_kernel, **static)
    grid = (mp // bm, np_ // bn, kp // bk)
    scratch = [lowering.tpu_vmem((bm, bn), jnp.float32) for _ in out_names]
    params = lowering.compiler_params(
        target, dimension_semantics=("parallel", "parallel", "arbitrary"))
  else:
    num_k, tail = _k_chunks(kp, bk)
    kernel = functools.partial(_dense_jet_kernel, block_k=bk, num_k=num_k,
                               tail=tail, **static)
    grid, scratch = (mp // bm, np_ // bn), ()
    params = lowering.compiler_params(
        target, num_warps=config.num_warps, num_stages=config.num_stages)
  outs = pl.pallas_call(
      kernel, out_shape=out_shape, grid=grid, in_specs=specs,
      out_specs=[out_spec] * len(out_names), scratch_shapes=scratch,
      interpret=target.interpret, compiler_params=params, name="dense_jet",
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
  if x.size == 0 or w.size == 0:
    return dense_jet_reference(x, w, b, dx, dw, db, ddx,
                               precision=config.precision)
  return lowering.per_platform(
      lambda target: functools.partial(_dense_jet_pallas, config, target),
      config.interpret, x, w, b, dx, dw, db, ddx, name="dense_jet",
      rows=((True, False, False, True, False, False, True), x.ndim - 1),
      cuda=config.gpu_backend)


@_dense_jet_call.defjvp
def _dense_jet_call_jvp(config, primals, tangents):
  # Pallas' automatic JVP breaks on zero tangents; the jet is polynomial in its
  # inputs, so differentiating the reference is exact.
  ref = functools.partial(dense_jet_reference, precision=config.precision)
  return jax.jvp(ref, primals, tangents)


@functools.partial(
    jax.jit,
    static_argnames=("interpret", "block_m", "block_n", "block_k", "num_warps",
                     "num_stages", "precision", "gpu_backend"))
def dense_jet(
    x: jax.Array,
    w: jax.Array,
    b: jax.Array | None,
    dx: jax.Array | None,
    dw: jax.Array | None,
    db: jax.Array | None,
    ddx: jax.Array | None,
    *,
    interpret: Any = None,
    block_m: int = 64,
    block_n: int = 64,
    block_k: int = 32,
    num_warps: int | None = None,
    num_stages: int | None = None,
    precision: lax.PrecisionLike = None,
    gpu_backend: str | None = None,
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
    interpret: None (default): Pallas' interpreter on CPU, compiled for the
      GPU or TPU lowered for; True: the interpreter everywhere; False:
      compile everywhere; a ``pallas.tpu.InterpretParams``: the TPU version
      under the TPU interpreter (see :mod:`cdat_fast.kernels.lowering`).
    block_m: rows (tokens) per tile, a power of two (Triton and interpreter;
      the TPU version takes Mosaic-friendly tiles of its own).
    block_n: output columns per tile, a power of two (likewise).
    block_k: contraction step, a power of two (likewise).
    num_warps: Triton warps per tile on GPU (None: the lowering's default).
    num_stages: Triton software-pipelining stages on GPU (None: default).
    precision: matmul precision passed to every ``jnp.dot`` in the kernel.
    gpu_backend: the version built for CUDA: ``"triton"`` or
      ``"mosaic_gpu"`` (:mod:`.mosaic_gpu`; its own tiles); None:
      ``$CDAT_FAST_GPU_BACKEND``, else Triton (:func:`.lowering.gpu_backend`).

  Returns:
    ``(y, dy, ddy)``, each of shape ``(..., N)`` in the common dtype of the
    inputs (accumulated in float32).
  """
  x, w, b, dx, dw, db, ddx = _check_and_promote(x, w, b, dx, dw, db, ddx)
  config = _Config(block_m, block_n, block_k,
                   lowering.check_interpret(interpret), num_warps, num_stages,
                   precision, lowering.gpu_backend(gpu_backend))
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
