"""Second-order forward pass (jet) of softmax attention, flash-style, in Pallas.

Attention of one head, queries ``q (T, D)``, keys ``k (S, D)``, values
``v (S, D_v)``, scale :math:`c` (default :math:`1/\\sqrt{D}`), optional causal
mask:

.. math::

  s = c\\, q k^\\top, \\qquad p = \\mathrm{softmax}(s) \\text{ (rows)}, \\qquad
  o = p v.

Move ``(q, k, v)`` along first-order tangents ``(q̇, k̇, v̇)`` with
second-order tangents ``(q̈, k̈, v̈)`` (all three are activations, so all
three move at second order). Then

.. math::

  \\dot s = c(\\dot q k^\\top + q \\dot k^\\top), \\qquad
  \\ddot s = c(\\ddot q k^\\top + 2 \\dot q \\dot k^\\top + q \\ddot k^\\top),

and with :math:`E[z] = \\sum_j p_j z_j` over a row, :math:`a = E[\\dot s]`:

.. math::

  \\dot p_j = p_j(\\dot s_j - a), \\qquad
  \\ddot p_j = p_j\\big((\\dot s_j - a)^2 + \\ddot s_j - \\dot a\\big), \\qquad
  \\dot a = E[\\dot s^2] - a^2 + E[\\ddot s],

  \\dot o = E[(\\dot s - a) v] + E[\\dot v], \\qquad
  \\ddot o = E\\big[((\\dot s - a)^2 + \\ddot s - \\dot a) v\\big]
           + 2 E[(\\dot s - a) \\dot v] + E[\\ddot v].

Every expectation is a softmax-weighted sum over the keys, so the kernel
computes them online like flash attention: one pass over key blocks keeps
the running maximum :math:`m`, the normaliser :math:`l = \\sum e^{s_j - m}`,
three row sums (of :math:`\\dot s, \\dot s^2, \\ddot s`) and seven weighted
value sums (:math:`v, \\dot s v, \\dot s^2 v, \\ddot s v, \\dot v, \\dot s \\dot v,
\\ddot v`), all rescaled by :math:`e^{m_{old} - m_{new}}` when the maximum
moves, and expands the squares at the end. The outputs depend on
:math:`\\dot s` only through :math:`\\dot s - a`, so the sums take
:math:`\\dot s - K` with :math:`K` the row's mean of :math:`\\dot s` over the
first key block: a part of :math:`\\dot s` common to all keys (a key bias)
then cannot make the expanded squares cancel in float32.
No ``T × S`` matrix is written to
memory, whereas jvp-of-jvp through XLA materialises ``s, ṡ, s̈`` and the
probabilities and their two tangents. None exists upstream (flash attention
has no forward-mode rule).

Per key block: 6 matmuls for ``s, ṡ, s̈`` and 7 for the value sums, against 2
for attention itself.

Two versions (:mod:`.lowering` keeps the one for the platform lowered for):
for Triton and the interpreter, a query block loops over the key blocks of
the whole key/value sequence in the kernel, with tiles shrunk by dtype and
head dimension to fit a GPU's shared memory; for Mosaic TPU the key blocks
are a sequential grid axis, so keys and values stream through VMEM a block
at a time and the sums stay in VMEM scratch.
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
from .lowering import next_power_of_2 as _next_power_of_2
from .lowering import round_up as _round_up

__all__ = ["attention_jet", "attention_jet_reference"]

_NEG = -1e30  # Masked logits: finite, so no inf - inf.
NAMES = ("q", "k", "v", "dq", "dk", "dv", "ddq", "ddk", "ddv")
# Bytes of one key block (block_k × padded width × itemsize) that keep the
# compiled Triton kernel within an H100's shared memory with 64 queries per
# tile: its pipelined loads of the six key/value inputs take about 15 such
# blocks in float32 (measured: 64 keys of width 64 in float32 ask 240 KiB).
_KEY_TILE_BYTES = 8192


LAYOUTS = ("heads_first", "sequence_major")


class _Config(NamedTuple):
  scale: float
  causal: bool
  block_q: int
  block_k: int
  interpret: Any
  num_warps: int | None
  precision: lax.PrecisionLike
  layout: str = "heads_first"


def _dots(precision):
  """(a @ b.T, a @ b) in float32 with ``precision``."""
  def dot_t(a, b):
    return lax.dot_general(a, b, (((1,), (1,)), ((), ())),
                           precision=precision,
                           preferred_element_type=jnp.float32)

  def dot(a, b):
    return lax.dot_general(a, b, (((1,), (0,)), ((), ())),
                           precision=precision,
                           preferred_element_type=jnp.float32)
  return dot_t, dot


def _valid(rows, start, seq_k, causal):
  """Which (query, key) pairs of a key block starting at ``start`` count."""
  cols = start + lax.broadcasted_iota(jnp.int32, rows.shape, 1)
  valid = cols < seq_k
  if causal:
    valid = valid & (cols <= rows)
  return valid


def _shift(qs, k, dk, valid, scale, dot_t):
  """The per-row shift K of ṡ: its mean over the first key block.

  Every output depends on ṡ only through ṡ - a, so the sums accumulate
  ṡ - K: the mean of ṡ over the first key block's valid keys (every row has
  one: key 0). A part of ṡ common to all keys (q̇ against a key bias, say)
  would otherwise make E[ṡ²] - a² and the expanded (ṡ - a)² terms cancel
  catastrophically in float32.
  """
  q, dq, _ = qs
  ds0 = jnp.where(valid, dot_t(dq, k) + dot_t(q, dk), 0.0)
  return scale * jnp.sum(ds0, axis=1, keepdims=True) / jnp.maximum(
      jnp.sum(valid.astype(jnp.float32), axis=1, keepdims=True), 1.0)


def _init(block_q: int, d_v: int):
  """The online sums before any key: (m, l, s1, s2, s3, v0..v3, w0, w1, x0)."""
  col = jnp.zeros((block_q, 1), jnp.float32)
  mat = jnp.zeros((block_q, d_v), jnp.float32)
  return (jnp.full((block_q, 1), _NEG, jnp.float32), col, col, col, col,
          mat, mat, mat, mat, mat, mat, mat)


def _update(carry, qs, kvs, valid, shift, scale, dots):
  """The online sums after one more key block (``kvs``, float32)."""
  m, l, s1, s2, s3, v0, v1, v2, v3, w0, w1, x0 = carry
  q, dq, ddq = qs
  k, dk, ddk, v, dv, ddv = kvs
  dot_t, dot = dots
  s = scale * dot_t(q, k)
  ds = scale * (dot_t(dq, k) + dot_t(q, dk)) - shift
  dds = scale * (dot_t(ddq, k) + 2.0 * dot_t(dq, dk) + dot_t(q, ddk))
  s = jnp.where(valid, s, _NEG)
  ds = jnp.where(valid, ds, 0.0)
  dds = jnp.where(valid, dds, 0.0)
  m_new = jnp.maximum(m, jnp.max(s, axis=1, keepdims=True))
  alpha = jnp.exp(m - m_new)
  e = jnp.where(valid, jnp.exp(s - m_new), 0.0)
  e_ds = e * ds
  e_ds2 = e_ds * ds
  e_dds = e * dds
  return (
      m_new,
      alpha * l + jnp.sum(e, axis=1, keepdims=True),
      alpha * s1 + jnp.sum(e_ds, axis=1, keepdims=True),
      alpha * s2 + jnp.sum(e_ds2, axis=1, keepdims=True),
      alpha * s3 + jnp.sum(e_dds, axis=1, keepdims=True),
      alpha * v0 + dot(e, v),
      alpha * v1 + dot(e_ds, v),
      alpha * v2 + dot(e_ds2, v),
      alpha * v3 + dot(e_dds, v),
      alpha * w0 + dot(e, dv),
      alpha * w1 + dot(e_ds, dv),
      alpha * x0 + dot(e, ddv),
  )


def _store(out_refs, carry):
  """Expands the squares of the final sums and writes (o, do, ddo)."""
  _, l, s1, s2, s3, v0, v1, v2, v3, w0, w1, x0 = carry
  inv = 1.0 / jnp.where(l > 0, l, 1.0)  # l ≥ 1 on every real row.
  a = s1 * inv  # E[ṡ] - K; the shift cancels in every output below.
  da = s2 * inv - a * a + s3 * inv
  o = v0 * inv
  do = (v1 - a * v0 + w0) * inv
  ddo = (v2 - 2.0 * a * v1 + (a * a - da) * v0 + v3
         + 2.0 * (w1 - a * w0) + x0) * inv
  for ref, value in zip(out_refs, (o, do, ddo)):
    ref[...] = value.astype(ref.dtype)


def _attention_jet_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref,
                          ddq_ref, ddk_ref, ddv_ref, o_ref, do_ref, ddo_ref,
                          *, scale, causal, block_k, seq_k, precision,
                          q_axis=1):
  """Triton/interpreter body: one block of queries against all keys, online
  over key blocks looped here (the key/value refs hold the whole sequence).
  ``q_axis``: the grid axis of the query blocks."""
  block_q = q_ref.shape[0]
  f32 = jnp.float32
  qs = tuple(r[...].astype(f32) for r in (q_ref, dq_ref, ddq_ref))
  q_start = pl.program_id(q_axis) * block_q
  rows = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  dots = _dots(precision)
  first = pl.ds(0, block_k)
  shift = _shift(qs, k_ref[first, :].astype(f32), dk_ref[first, :].astype(f32),
                 _valid(rows, 0, seq_k, causal), scale, dots[0])
  kv_refs = (k_ref, dk_ref, ddk_ref, v_ref, dv_ref, ddv_ref)

  def body(j, carry):
    start = pl.multiple_of(j * block_k, block_k)
    ks = pl.ds(start, block_k)
    kvs = tuple(r[ks, :].astype(f32) for r in kv_refs)
    return _update(carry, qs, kvs, _valid(rows, start, seq_k, causal), shift,
                   scale, dots)

  num_blocks = pl.cdiv(seq_k, block_k)
  if causal:  # Key blocks past this query block's last row are all masked.
    num_blocks = jnp.minimum(num_blocks,
                             pl.cdiv(q_start + block_q, block_k))
  carry = lax.fori_loop(0, num_blocks, body,
                        _init(block_q, v_ref.shape[-1]))
  _store((o_ref, do_ref, ddo_ref), carry)


def _attention_jet_tpu_kernel(q_ref, k_ref, v_ref, dq_ref, dk_ref, dv_ref,
                              ddq_ref, ddk_ref, ddv_ref, o_ref, do_ref,
                              ddo_ref, shift_ref, *sum_refs, scale, causal,
                              seq_k, precision):
  """Mosaic TPU body: one key block (grid axis 2) of one query block.

  Keys and values stream through VMEM a block at a time (any sequence
  length fits); the shift and the online sums stay in VMEM scratch across
  the key blocks; the outputs are written after the last.
  """
  block_q, block_k = q_ref.shape[0], k_ref.shape[0]
  f32 = jnp.float32
  q_start = pl.program_id(1) * block_q
  j = pl.program_id(2)
  rows = q_start + lax.broadcasted_iota(jnp.int32, (block_q, block_k), 0)
  qs = tuple(r[...].astype(f32) for r in (q_ref, dq_ref, ddq_ref))
  kvs = tuple(r[...].astype(f32) for r in (k_ref, dk_ref, ddk_ref, v_ref,
                                           dv_ref, ddv_ref))
  valid = _valid(rows, j * block_k, seq_k, causal)
  dots = _dots(precision)

  @pl.when(j == 0)
  def _():
    shift_ref[...] = _shift(qs, kvs[0], kvs[1], valid, scale, dots[0])
    for ref, value in zip(sum_refs, _init(block_q, v_ref.shape[-1])):
      ref[...] = value

  def accumulate():
    carry = tuple(r[...] for r in sum_refs)
    for ref, value in zip(sum_refs, _update(carry, qs, kvs, valid,
                                            shift_ref[...], scale, dots)):
      ref[...] = value

  if causal:  # Key blocks past this query block's last row are all masked.
    pl.when(j * block_k < q_start + block_q)(accumulate)
  else:
    accumulate()

  @pl.when(j == pl.num_programs(2) - 1)
  def _():
    _store((o_ref, do_ref, ddo_ref), tuple(r[...] for r in sum_refs))


def _tiles(config: _Config, target, t, s, d, d_v, dtype):
  """(block_q, block_k, padded D, padded D_v) for ``target``.

  Triton's dot needs every dimension of a tile >= 16; interpret mode takes
  any size, so the CPU tests also run small tiles. Compiled for a GPU, the
  tiles shrink until Triton's shared memory fits (H100: 227 KiB per block):
  ``block_k × width × itemsize`` at most ``_KEY_TILE_BYTES`` for the
  default 64 queries, fewer queries where 16 keys are still more
  (``tests/accel`` compiles every dtype and head dimension for an H100).
  The TPU version rounds the blocks to Mosaic's sublanes instead (8 rows,
  16 in 16-bit types); its keys stream through VMEM a block at a time.
  """
  low = 1 if target.interpret is True else 16
  d_p = max(low, _next_power_of_2(d))
  dv_p = max(low, _next_power_of_2(d_v))
  if target.kind == lowering.TPU:
    sub = max(lowering.sublanes(dtype), low)
    return (min(_round_up(config.block_q, sub), _round_up(t, sub)),
            min(_round_up(config.block_k, sub), _round_up(s, sub)), d_p, dv_p)
  block_q = max(low, min(config.block_q, _next_power_of_2(t)))
  block_k = max(low, min(config.block_k, _next_power_of_2(s)))
  if target.interpret is False:
    width = max(d_p, dv_p) * jnp.dtype(dtype).itemsize
    while block_k > low and block_k * width > _KEY_TILE_BYTES:
      block_k //= 2
    while block_q > low and block_q * block_k * width > 64 * _KEY_TILE_BYTES:
      block_q //= 2
  return block_q, block_k, d_p, dv_p


def _specs(target, causal, block_q, block_k, s_p, d_p, dv_p):
  """BlockSpecs of (q, k, v) and of an output, for ``target``'s grid.

  Triton and the interpreter: grid (head, query block), the keys and
  values whole. TPU: grid (head, query block, key block), one key block at
  a time; causal blocks past the query block's last row repeat the last
  needed block, which Pallas then does not fetch again.
  """
  if target.kind != lowering.TPU:
    return (pl.BlockSpec((None, block_q, d_p), lambda h, i: (h, i, 0)),
            pl.BlockSpec((None, s_p, d_p), lambda h, i: (h, 0, 0)),
            pl.BlockSpec((None, s_p, dv_p), lambda h, i: (h, 0, 0)),
            pl.BlockSpec((None, block_q, dv_p), lambda h, i: (h, i, 0)))

  def key_block(i, j):
    if not causal:
      return j
    # lax.div: the operands are non-negative, so no floor-division rule
    # (whose Mosaic lowering asks which TPU it is lowering for).
    return jnp.minimum(j, lax.div(i * block_q + block_q - 1, block_k))

  return (pl.BlockSpec((None, block_q, d_p), lambda h, i, j: (h, i, 0)),
          pl.BlockSpec((None, block_k, d_p),
                       lambda h, i, j: (h, key_block(i, j), 0)),
          pl.BlockSpec((None, block_k, dv_p),
                       lambda h, i, j: (h, key_block(i, j), 0)),
          pl.BlockSpec((None, block_q, dv_p), lambda h, i, j: (h, i, 0)))


def _sequence_major_call(config: _Config, target, *args):
  """The Triton/interpreter kernel on ``(B, T, H, D)`` arrays read in place:
  grid (batch, head, query block), blocks ``(None, rows, None, D)``; no
  transposes. None where the tiles would need padding."""
  q, k, v = args[:3]
  b, t, h, d = q.shape
  s, d_v = k.shape[1], v.shape[-1]
  block_q, block_k, d_p, dv_p = _tiles(config, target, t, s, d, d_v, q.dtype)
  if t % block_q or s % block_k or d_p != d or dv_p != d_v:
    return None
  q_spec = pl.BlockSpec((None, block_q, None, d), lambda i, j, n: (i, n, j, 0))
  k_spec = pl.BlockSpec((None, s, None, d), lambda i, j, n: (i, 0, j, 0))
  v_spec = pl.BlockSpec((None, s, None, d_v), lambda i, j, n: (i, 0, j, 0))
  o_spec = pl.BlockSpec((None, block_q, None, d_v),
                        lambda i, j, n: (i, n, j, 0))
  num_warps = config.num_warps
  if num_warps is None:
    num_warps = 4 if block_q * max(d, d_v) <= 64 * 64 else 8
  kernel = functools.partial(
      _attention_jet_kernel, scale=config.scale, causal=config.causal,
      block_k=block_k, seq_k=s, precision=config.precision, q_axis=2)
  return tuple(pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((b, t, h, d_v), q.dtype)] * 3,
      grid=(b, h, t // block_q),
      in_specs=[q_spec, k_spec, v_spec] * 3,
      out_specs=[o_spec] * 3,
      interpret=target.interpret,
      compiler_params=lowering.compiler_params(target, num_warps=num_warps),
      name="attention_jet",
  )(*args))


def _attention_jet_pallas(config: _Config, target, *args):
  if config.layout == "sequence_major":
    if target.kind != lowering.TPU:
      outs = _sequence_major_call(config, target, *args)
      if outs is not None:
        return outs
    # Mosaic TPU's blocks need the last two dimensions whole or (8, 128)
    # aligned, which (rows, head) slices are not: heads first.
    outs = _attention_jet_pallas(config._replace(layout="heads_first"),
                                 target, *(jnp.swapaxes(a, 1, 2)
                                           for a in args))
    return tuple(jnp.swapaxes(o, 1, 2) for o in outs)
  q, k, v = args[:3]
  *lead, t, d = q.shape
  s, d_v = k.shape[-2], v.shape[-1]
  heads = math.prod(lead)
  block_q, block_k, d_p, dv_p = _tiles(config, target, t, s, d, d_v, q.dtype)
  t_p = _round_up(t, block_q)
  s_p = _round_up(s, block_k)
  sizes = {"q": (t_p, d_p), "k": (s_p, d_p), "v": (s_p, dv_p)}
  padded = []
  for name, a in zip(NAMES, args):
    length, width = sizes[name[-1]]
    a = a.reshape(heads, a.shape[-2], a.shape[-1])
    padded.append(jnp.pad(a, ((0, 0), (0, length - a.shape[1]),
                              (0, width - a.shape[2]))))
  q_spec, k_spec, v_spec, o_spec = _specs(target, config.causal, block_q,
                                          block_k, s_p, d_p, dv_p)
  static = dict(scale=config.scale, causal=config.causal, seq_k=s,
                precision=config.precision)
  if target.kind == lowering.TPU:
    kernel = functools.partial(_attention_jet_tpu_kernel, **static)
    grid = (heads, t_p // block_q, s_p // block_k)
    scratch = [lowering.tpu_vmem((block_q, 1), jnp.float32)] * 6 + [
        lowering.tpu_vmem((block_q, dv_p), jnp.float32)] * 7
    params = lowering.compiler_params(
        target, dimension_semantics=("parallel", "parallel", "arbitrary"))
  else:
    kernel = functools.partial(_attention_jet_kernel, block_k=block_k,
                               **static)
    grid, scratch = (heads, t_p // block_q), ()
    num_warps = config.num_warps
    if num_warps is None:
      num_warps = 4 if block_q * max(d_p, dv_p) <= 64 * 64 else 8
    params = lowering.compiler_params(target, num_warps=num_warps)
  outs = pl.pallas_call(
      kernel,
      out_shape=[jax.ShapeDtypeStruct((heads, t_p, dv_p), q.dtype)] * 3,
      grid=grid,
      in_specs=[q_spec, k_spec, v_spec] * 3,
      out_specs=[o_spec] * 3,
      scratch_shapes=scratch,
      interpret=target.interpret,
      compiler_params=params,
      name="attention_jet",
  )(*padded)
  return tuple(o[:, :t, :d_v].reshape(*lead, t, d_v) for o in outs)


def _heads_first_shape(shape, layout):
  """``shape`` as heads-first ``(..., T, D)`` (sequence-major ``(B, T, H, D)``
  reads as ``(B, H, T, D)``)."""
  if layout == "sequence_major":
    return (shape[0], shape[2], shape[1], shape[3])
  return tuple(shape)


def _check_and_promote(args, layout="heads_first"):
  q, k, v = args[:3]
  for name, a in zip(NAMES[:3], (q, k, v)):
    if a is None:
      raise ValueError(f"{name} is required")
    if layout == "sequence_major" and a.ndim != 4:
      raise ValueError(f"{name} must have shape (B, length, heads, features)"
                       f" with layout='sequence_major', got {a.shape}")
    if a.ndim < 2:
      raise ValueError(f"{name} must have shape (..., length, features),"
                       f" got {a.shape}")
  qs, ks, vs = (_heads_first_shape(a.shape, layout) for a in (q, k, v))
  if ks[:-2] != qs[:-2] or vs[:-2] != qs[:-2]:
    raise ValueError("q, k and v must share their batch and head dimensions,"
                     f" got {q.shape}, {k.shape}, {v.shape}")
  if ks[-1] != qs[-1]:
    raise ValueError(f"k must have q's feature size {qs[-1]}, got {k.shape}")
  if vs[-2] != ks[-2]:
    raise ValueError(f"v must have k's length {ks[-2]}, got {v.shape}")
  for name, a in zip(NAMES[3:], args[3:]):
    like = {"q": q, "k": k, "v": v}[name[-1]]
    if a is not None and a.shape != like.shape:
      raise ValueError(f"{name} must have shape {like.shape}, got {a.shape}")
  dtype = jnp.result_type(*[a for a in args if a is not None])
  if not jnp.issubdtype(dtype, jnp.floating):
    dtype = jnp.result_type(dtype, jnp.float32)
  out = []
  for name, a in zip(NAMES, args):
    like = {"q": q, "k": k, "v": v}[name[-1]]
    out.append(jnp.zeros(like.shape, dtype) if a is None
               else jnp.asarray(a, dtype))
  return tuple(out)


def _resolve(t, d, scale, causal, s):
  """The logit scale, after checking causality's ``s == t``."""
  if causal and s != t:
    raise ValueError("causal attention needs as many keys as queries, got"
                     f" {t} queries and {s} keys")
  return float(1.0 / math.sqrt(d) if scale is None else scale)


def _reference_of(config: _Config):
  return functools.partial(attention_jet_reference, scale=config.scale,
                           causal=config.causal, precision=config.precision,
                           layout=config.layout)


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _attention_jet_call(config, *args):
  if any(a.size == 0 for a in args[:3]):
    return _reference_of(config)(*args)
  # Rows: the independent (batch, head) slices; under a mesh the call is
  # split along the first of them (kernels/partitioning.py).
  batch_ndim = 1 if config.layout == "sequence_major" else args[0].ndim - 2
  return lowering.per_platform(
      lambda target: functools.partial(_attention_jet_pallas, config, target),
      config.interpret, *args, name="attention_jet",
      rows=((True,) * len(args), batch_ndim))


@_attention_jet_call.defjvp
def _attention_jet_call_jvp(config, primals, tangents):
  # Pallas' automatic JVP breaks on zero tangents; differentiate the
  # reference instead (the same function).
  return jax.jvp(_reference_of(config), primals, tangents)


@functools.partial(
    jax.jit, static_argnames=("scale", "causal", "interpret", "block_q",
                              "block_k", "num_warps", "precision", "layout"))
def attention_jet(
    q: jax.Array, k: jax.Array, v: jax.Array,
    dq: jax.Array | None, dk: jax.Array | None, dv: jax.Array | None,
    ddq: jax.Array | None, ddk: jax.Array | None, ddv: jax.Array | None,
    *,
    scale: float | None = None,
    causal: bool = False,
    interpret: Any = None,
    block_q: int = 64,
    block_k: int = 64,
    num_warps: int | None = None,
    precision: lax.PrecisionLike = None,
    layout: str = "heads_first",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Fused second-order jet of softmax attention (see the module docstring).

  Args:
    q: queries ``(..., T, D)``; leading dimensions (batch, heads) are
      flattened into independent heads. With ``layout="sequence_major"``,
      ``(B, T, H, D)`` (``jax.nn.dot_product_attention``'s layout), and
      likewise ``(B, S, H, D)`` for the keys and values.
    k: keys ``(..., S, D)``.
    v: values ``(..., S, D_v)``.
    dq, dk, dv: first-order tangents (same shapes) or None for zero.
    ddq, ddk, ddv: second-order tangents or None for zero.
    scale: the logit scale ``c``; None means ``1/√D``.
    causal: mask keys after the query's position (needs ``S == T``).
    interpret: Pallas interpret mode; None means interpret on CPU only.
    block_q: queries per tile, a power of two.
    block_k: keys per step of the online softmax, a power of two.
    num_warps: Triton warps per tile on GPU (None: 4 or 8 by tile size).
    precision: matmul precision inside the kernel.
    layout: ``"heads_first"`` or ``"sequence_major"``. The Triton version
      (and the interpreter) reads sequence-major blocks in place, with no
      transposed copies of the nine inputs, where the tiles need no
      padding; Mosaic TPU's block rule needs heads first, so the TPU
      version transposes.

  Returns:
    ``(o, do, ddo)`` shaped like ``q`` with ``v``'s feature size, in the
    inputs' common dtype (accumulated in float32).
  """
  if layout not in LAYOUTS:
    raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
  args = _check_and_promote((q, k, v, dq, dk, dv, ddq, ddk, ddv), layout)
  seq = 1 if layout == "sequence_major" else -2
  scale = _resolve(args[0].shape[seq], args[0].shape[-1], scale, causal,
                   args[1].shape[seq])
  for name, value in (("block_q", block_q), ("block_k", block_k)):
    if value < 1 or value & (value - 1):
      raise ValueError(f"{name} must be a power of two, got {value}")
  config = _Config(scale, bool(causal), block_q, block_k,
                   lowering.check_interpret(interpret), num_warps, precision,
                   layout)
  return _attention_jet_call(config, *args)


def attention_jet_reference(
    q: jax.Array, k: jax.Array, v: jax.Array,
    dq: jax.Array | None, dk: jax.Array | None, dv: jax.Array | None,
    ddq: jax.Array | None, ddk: jax.Array | None, ddv: jax.Array | None,
    *,
    scale: float | None = None,
    causal: bool = False,
    precision: lax.PrecisionLike = None,
    layout: str = "heads_first",
) -> tuple[jax.Array, jax.Array, jax.Array]:
  """Pure-``jnp`` reference for :func:`attention_jet`: the closed-form jet.

  Materialises the ``T × S`` logits and probabilities and their tangents, in
  float32, with the formulas of the module docstring.
  """
  args = _check_and_promote((q, k, v, dq, dk, dv, ddq, ddk, ddv), layout)
  if layout == "sequence_major":
    outs = attention_jet_reference(
        *(jnp.swapaxes(a, 1, 2) for a in args), scale=scale, causal=causal,
        precision=precision)
    return tuple(jnp.swapaxes(o, 1, 2) for o in outs)
  dtype = args[0].dtype
  q, k, v, dq, dk, dv, ddq, ddk, ddv = (a.astype(jnp.float32) for a in args)
  c = _resolve(q.shape[-2], q.shape[-1], scale, causal, k.shape[-2])

  def qk(a, b):
    return jnp.einsum("...td,...sd->...ts", a, b, precision=precision)

  def pv(p, b):
    return jnp.einsum("...ts,...sd->...td", p, b, precision=precision)

  s = c * qk(q, k)
  ds = c * (qk(dq, k) + qk(q, dk))
  dds = c * (qk(ddq, k) + 2.0 * qk(dq, dk) + qk(q, ddk))
  if causal:
    t = q.shape[-2]
    mask = jnp.tril(jnp.ones((t, t), bool))
    s = jnp.where(mask, s, -jnp.inf)
    ds = jnp.where(mask, ds, 0.0)
    dds = jnp.where(mask, dds, 0.0)
  p = jax.nn.softmax(s, axis=-1)

  def expect(z):
    return jnp.sum(p * z, axis=-1, keepdims=True)

  a = expect(ds)
  dp = p * (ds - a)
  da = expect((ds - a) ** 2) + expect(dds)  # Two-pass: no E[ṡ²] - a².
  ddp = p * ((ds - a) ** 2 + dds - da)
  o = pv(p, v)
  do = pv(dp, v) + pv(p, dv)
  ddo = pv(ddp, v) + 2.0 * pv(dp, dv) + pv(p, ddv)
  return o.astype(dtype), do.astype(dtype), ddo.astype(dtype)
