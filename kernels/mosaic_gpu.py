"""Mosaic GPU versions of :func:`~.dense_jet` and :func:`~.activation_jet`.

JAX 0.11 deprecates Pallas' Triton backend; Mosaic GPU (``plgpu``) is the
GPU backend Pallas keeps. These are the two kernels' versions for it, both
built with ``plgpu.kernel`` (not ``pl.pallas_call``, whose Mosaic GPU path
JAX deprecates), when ``gpu_backend="mosaic_gpu"`` is asked for (the
kernels' argument, or the environment variable
``CDAT_FAST_GPU_BACKEND=mosaic_gpu`` read when a call is traced;
:func:`.lowering.gpu_backend`). They run on CUDA only (Hopper, sm_90: TMA,
and the matmuls are warpgroup MMAs); CPU keeps the interpreter of the
Triton version, ROCm the Triton version.

dense_jet
  Grid ``(rows / block_m, columns / block_n)`` named ``("m", "n")``,
  inputs and outputs in GMEM. The bias blocks are copied to SMEM by TMA
  while the contraction runs, and the outputs are written to SMEM blocks
  and copied out by TMA. Each program streams the contraction through
  shared memory with ``plgpu.emit_pipeline`` (TMA copies, ``stages`` blocks
  in flight) and accumulates ``y = x W``, ``ẏ = ẋ W + x Ẇ``, ``ÿ = ẍ W``
  and ``ẋ Ẇ`` in four (or fewer, for absent tangents) float32 WGMMA
  register accumulators; ``ÿ += 2 ẋ Ẇ`` and the biases are added in the
  epilogue, as in the reference. WGMMA rules: ``block_m`` a multiple of 64,
  ``block_n`` a multiple of 8 up to 256, the contraction block one 128-byte
  swizzle (64 bf16/f16 or 32 f32 elements). float32 operands are
  multiplied as TF32 (Mosaic GPU's WGMMA has no full-f32 mode), like
  Triton's default ``jnp.dot`` precision; ``precision=HIGHEST`` is refused.
  Tiles (:func:`dense_tiles`): accumulators within 128 registers per thread
  (``accumulators * block_m * block_n <= 128 * 128``), then as many
  pipeline stages (at most 4) as fit :data:`SMEM_BYTES` beside the output
  blocks. Sizes are zero-padded to the tiles, as in the Triton version.

activation_jet
  Grid ``rows / block_rows`` named ``("rows",)`` over the Triton version's
  ``(rows, 128)`` view (zero-padded to ``block_rows``, 64 by default),
  inputs and outputs in GMEM. Each program streams its ``block_rows`` rows
  through shared memory with ``plgpu.emit_pipeline``: ``(step_rows, 128)``
  blocks of every input copied in by TMA, two steps in flight, the Triton
  version's body (closed-form derivatives in float32 registers) run on the
  SMEM blocks, and the output blocks copied out by TMA while the next step
  computes. Tiles (:func:`activation_tiles`): ``step_rows = min(block_rows,
  16)`` (16 float32 values per thread and array in a warpgroup of 128
  threads), the blocks within half of :data:`SMEM_BYTES` so that two
  programs share an SM (96 KiB with ``ddx`` in float32, 48 KiB in
  bfloat16).

Under a device mesh both are partitioned by rows like every kernel
(:mod:`.partitioning`: XLA calls back with the per-device shapes and this
version is built for them).
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
from jax import lax
from jax.experimental import pallas as pl
import jax.numpy as jnp

try:
  from jax.experimental.pallas import mosaic_gpu as plgpu
except ImportError:  # pragma: no cover - depends on the jax build.
  plgpu = None

from .lowering import round_up as _round_up

# Hopper's shared memory per block (opt-in), less a little for barriers
# and Pallas' own scratch: H100 and H200 have 232448 bytes.
SMEM_BYTES = 232448 - 8192
_MAX_STAGES = 4
_SWIZZLE = 128  # bytes: the contraction block's row in shared memory
_ACC_ELEMENTS = 128 * 128  # f32 accumulator elements per warpgroup (128 regs)
_LHS = ("x", "dx", "ddx")
_RHS = ("w", "dw")
_LANES = 128  # activation_jet's rows: 128 elements
_STEP_ROWS = 16  # activation_jet: 16 float32 values a thread per array
_ACT_STAGES = 2


class Tiles(NamedTuple):
  """One dense_jet Mosaic GPU instance's tiles and pipeline depth."""
  block_m: int
  block_n: int
  block_k: int
  stages: int
  smem_bytes: int  # shared memory the pipeline and output blocks take


def accumulators(names) -> tuple[str, ...]:
  """The float32 accumulators the present inputs need."""
  acc = ["y"]
  if "dx" in names or "dw" in names:
    acc.append("dy")
  if "ddx" in names:
    acc.append("ddy")
  if "dx" in names and "dw" in names:
    acc.append("cross")
  return tuple(acc)


def outputs(names) -> tuple[str, ...]:
  """The outputs written (``ddy`` also when only the cross term exists)."""
  acc = accumulators(names)
  has_dy = "dy" in acc or "db" in names
  has_ddy = "ddy" in acc or "cross" in acc
  return ("y",) + (("dy",) if has_dy else ()) + (("ddy",) if has_ddy else ())


def dense_tiles(names, m_dim: int, n_dim: int, dtype,
                smem_bytes: int = SMEM_BYTES) -> Tiles:
  """Tiles for dense_jet: WGMMA shapes, registers, then shared memory."""
  itemsize = jnp.dtype(dtype).itemsize
  block_k = _SWIZZLE // itemsize
  n_acc = len(accumulators(names))
  block_m = 64  # One warpgroup, one WGMMA M group.
  block_n = 256
  while n_acc * block_m * block_n > _ACC_ELEMENTS and block_n > 64:
    block_n //= 2
  block_n = min(block_n, _round_up(n_dim, 64))
  n_lhs = sum(n in names for n in _LHS)
  n_rhs = sum(n in names for n in _RHS)
  per_stage = (n_lhs * block_m + n_rhs * block_n) * block_k * itemsize
  fixed = len(outputs(names)) * block_m * block_n * itemsize
  fixed += sum(n in names for n in ("b", "db")) * block_n * 4
  stages = min(_MAX_STAGES, (smem_bytes - fixed) // per_stage)
  if stages < 1:  # pragma: no cover - the tiles above always fit.
    raise ValueError(f"dense_jet tiles do not fit {smem_bytes} bytes")
  del m_dim
  return Tiles(block_m, block_n, block_k, stages, fixed + stages * per_stage)


def _k_major(dtype) -> bool:
  """Whether W goes in as W^T: TF32 WGMMA takes B only K-major ("Only f16
  WGMMA supports transposes"); 16-bit types take (K, N) blocks as they are."""
  return jnp.dtype(dtype).itemsize == 4


def _transforms(minor: int, dtype):
  bits = jnp.dtype(dtype).itemsize * 8
  swizzle = plgpu.find_swizzle(minor * bits)
  return (plgpu.TilingTransform((8, swizzle * 8 // bits)),
          plgpu.SwizzleTransform(swizzle))


def _dense_body(*refs, names, out_names, acc_names, tiles, k_steps):
  """One (block_m, block_n) tile: the contraction pipelined through SMEM.

  ``refs``: the inputs and outputs in GMEM (``plgpu.kernel``), then the
  scratch: the accumulators, one SMEM block per output, one SMEM block per
  bias and a barrier for the bias copies.
  """
  n_io = len(names) + len(out_names)
  r = dict(zip(names + out_names, refs[:n_io]))
  scratch = list(refs[n_io:])
  acc = {n: scratch.pop(0) for n in acc_names}
  out_smem = {n: scratch.pop(0) for n in out_names}
  biases = [n for n in ("b", "db") if n in names]
  bias_smem = {n: scratch.pop(0) for n in biases}
  barrier = scratch.pop(0) if biases else None
  mats = [n for n in names if n in _LHS + _RHS]
  bm, bn, bk = tiles.block_m, tiles.block_n, tiles.block_k
  i, j = lax.axis_index("m"), lax.axis_index("n")
  dtype = r["x"].dtype
  k_major = _k_major(dtype)
  for n in biases:  # Fetched while the contraction runs.
    plgpu.copy_gmem_to_smem(r[n].at[pl.ds(j * bn, bn)], bias_smem[n],
                            barrier.at[biases.index(n)])
  t = _transforms(bk, dtype)
  specs = [plgpu.BlockSpec((bm, bk), lambda k: (i, k), transforms=t)
           if n in _LHS else
           plgpu.BlockSpec((bn, bk), lambda k: (j, k), transforms=t)
           if k_major else
           plgpu.BlockSpec((bk, bn), lambda k: (k, j),
                           transforms=_transforms(bn, dtype))
           for n in mats]

  def step(_, *smem):
    s = dict(zip(mats, smem))
    if k_major:  # (block_n, block_k) blocks of W^T, read as W's.
      s = {n: plgpu.transpose_ref(a, (1, 0)) if n in _RHS else a
           for n, a in s.items()}
    plgpu.wgmma(acc["y"], s["x"], s["w"])
    if "dx" in s:
      plgpu.wgmma(acc["dy"], s["dx"], s["w"])
    if "dw" in s:
      plgpu.wgmma(acc["dy"], s["x"], s["dw"])
    if "ddx" in s:
      plgpu.wgmma(acc["ddy"], s["ddx"], s["w"])
    if "cross" in acc:
      plgpu.wgmma(acc["cross"], s["dx"], s["dw"])
    plgpu.wgmma_wait(0)  # The stage's SMEM is released after this step.

  plgpu.emit_pipeline(step, grid=(k_steps,), in_specs=specs,
                      max_concurrent_steps=tiles.stages)(
                          *[r[n] for n in mats])
  for n in biases:
    plgpu.barrier_wait(barrier.at[biases.index(n)])
  values = _dense_epilogue(bias_smem, acc, out_names)
  for o in out_names:
    out_smem[o][...] = values[o].astype(out_smem[o].dtype)
  plgpu.commit_smem()
  for o in out_names:
    plgpu.copy_smem_to_gmem(out_smem[o],
                            r[o].at[pl.ds(i * bm, bm), pl.ds(j * bn, bn)])
  plgpu.wait_smem_to_gmem(0)


def _bias(ref):
  b = plgpu.load(ref, (), layout=plgpu.Layout.WGMMA.reduce(0))
  return b.astype(jnp.float32)


def _dense_epilogue(r, acc, out_names):
  """{output: float32 value} from the accumulators and the bias blocks."""
  y = acc["y"][...]
  if "b" in r:
    y = y + lax.broadcast_in_dim(_bias(r["b"]), y.shape, [1])
  values = {"y": y}
  if "dy" in out_names:
    dy = acc["dy"][...] if "dy" in acc else jnp.zeros_like(y)
    if "db" in r:
      dy = dy + lax.broadcast_in_dim(_bias(r["db"]), y.shape, [1])
    values["dy"] = dy
  if "ddy" in out_names:
    ddy = acc["ddy"][...] if "ddy" in acc else None
    if "cross" in acc:
      cross = 2.0 * acc["cross"][...]
      ddy = cross if ddy is None else ddy + cross
    values["ddy"] = ddy
  return values


def _pad(a, shape):
  pads = [(0, t - s) for s, t in zip(a.shape, shape)]
  return jnp.pad(a, pads) if any(p for _, p in pads) else a


def dense_jet(x, w, b, dx, dw, db, ddx, *, precision=None):
  """dense_jet's Mosaic GPU version; ``dense_jet``'s flat arguments."""
  if precision is not None and lax.Precision(precision) == lax.Precision.HIGHEST:
    raise NotImplementedError("Mosaic GPU's WGMMA multiplies float32 as TF32;"
                              " precision=HIGHEST needs the Triton version")
  k_dim, n_dim = w.shape
  batch_shape = x.shape[:-1]
  m_dim = math.prod(batch_shape)
  dtype = x.dtype
  given = dict(x=x, w=w, b=b, dx=dx, dw=dw, db=db, ddx=ddx)
  names = tuple(n for n in ("x", "w", "dx", "dw", "ddx", "b", "db")
                if given[n] is not None)
  tiles = dense_tiles(names, m_dim, n_dim, dtype)
  mp = _round_up(m_dim, tiles.block_m)
  np_ = _round_up(n_dim, tiles.block_n)
  kp = _round_up(k_dim, tiles.block_k)
  args = []
  for n in names:
    a = given[n]
    if n in _LHS:
      args.append(_pad(a.reshape(m_dim, k_dim), (mp, kp)))
    elif n in _RHS:
      a = _pad(a, (kp, np_))
      args.append(a.T if _k_major(dtype) else a)
    else:
      args.append(_pad(a.astype(jnp.float32), (np_,)))
  out_names = outputs(names)
  acc_names = accumulators(names)
  n_bias = sum(n in names for n in ("b", "db"))
  bm, bn = tiles.block_m, tiles.block_n
  scratch = ([plgpu.ACC((bm, bn), jnp.float32) for _ in acc_names]
             + [plgpu.SMEM((bm, bn), dtype,
                           transforms=_transforms(bn, dtype))
                for _ in out_names]
             + [plgpu.SMEM((bn,), jnp.float32) for _ in range(n_bias)]
             + ([plgpu.Barrier(num_barriers=n_bias)] if n_bias else []))
  body = functools.partial(_dense_body, names=names, out_names=out_names,
                           acc_names=acc_names, tiles=tiles,
                           k_steps=kp // tiles.block_k)
  outs = plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((mp, np_), dtype) for _ in out_names],
      scratch_types=scratch,
      grid=(mp // bm, np_ // bn), grid_names=("m", "n"),
      kernel_name="dense_jet_mosaic_gpu",
  )(*args)
  out = {o: a[:m_dim, :n_dim].reshape(*batch_shape, n_dim)
         for o, a in zip(out_names, outs)}
  y = out["y"]
  return (y, out.get("dy", jnp.zeros_like(y)), out.get("ddy", jnp.zeros_like(y)))


class ActivationTiles(NamedTuple):
  """One activation_jet Mosaic GPU instance's pipeline."""
  step_rows: int  # rows of 128 per pipeline step (one TMA block per array)
  steps: int  # pipeline steps per program (``block_rows / step_rows``)
  stages: int  # steps in flight
  smem_bytes: int  # shared memory the pipeline's blocks take


def activation_tiles(block_rows: int, arrays: int, dtype,
                     smem_bytes: int = SMEM_BYTES) -> ActivationTiles:
  """Pipeline for activation_jet: ``block_rows`` rows per program.

  A step moves a ``(step_rows, 128)`` block of each of the ``arrays`` inputs
  and outputs; a warpgroup's 128 threads then hold ``step_rows`` float32
  values of each array, so ``step_rows`` is at most :data:`_STEP_ROWS`.
  ``stages`` steps are in flight, each array's ``stages`` blocks in SMEM:
  ``arrays * stages * step_rows * 128 * itemsize`` bytes, within half of
  ``smem_bytes`` so that two programs share an SM.
  """
  if block_rows < 1 or block_rows & (block_rows - 1):
    raise ValueError(f"block_rows must be a power of two, got {block_rows}")
  step_rows = min(block_rows, _STEP_ROWS)
  steps = block_rows // step_rows
  block_bytes = step_rows * _LANES * jnp.dtype(dtype).itemsize
  stages = min(_ACT_STAGES, steps,
               (smem_bytes // 2) // (arrays * block_bytes))
  if stages < 1:  # pragma: no cover - 16 rows always fit.
    raise ValueError(f"activation_jet blocks do not fit {smem_bytes} bytes")
  return ActivationTiles(step_rows, steps, stages,
                         arrays * stages * block_bytes)


def activation_jet(kernel, block_rows: int, x, dx, ddx, *, name: str):
  """activation_jet's Mosaic GPU version on the padded ``(rows, 128)`` views.

  ``kernel`` is the Triton version's body (the same refs, here SMEM blocks);
  ``x, dx, ddx`` are the tiled views (``ddx`` may be None), ``rows`` a
  multiple of ``block_rows``. Program ``i`` of the grid ``rows /
  block_rows`` pipelines its rows through SMEM (:func:`activation_tiles`).
  """
  rows, lanes = x.shape
  if rows % block_rows:
    raise ValueError(f"block_rows must divide the rows ({rows}), got"
                     f" {block_rows}")
  args = [x, dx] + ([ddx] if ddx is not None else [])
  tiles = activation_tiles(block_rows, len(args) + 3, x.dtype)

  def body(*refs):
    i = lax.axis_index("rows")
    spec = plgpu.BlockSpec((tiles.step_rows, lanes),
                           lambda s: (i * tiles.steps + s, 0))
    plgpu.emit_pipeline(
        lambda _, *blocks: kernel(*blocks), grid=(tiles.steps,),
        in_specs=[spec] * len(args), out_specs=[spec] * 3,
        max_concurrent_steps=tiles.stages)(*refs)

  return plgpu.kernel(
      body,
      out_type=[jax.ShapeDtypeStruct((rows, lanes), x.dtype)] * 3,
      grid=(rows // block_rows,), grid_names=("rows",),
      kernel_name=name,
  )(*args)
