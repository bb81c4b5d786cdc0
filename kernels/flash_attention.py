r"""Flash attention's forward and backward, per platform, differentiable.

Softmax attention of queries ``q (B, T, H, D)``, keys ``k (B, S, H, D)`` and
values ``v (B, S, H, D_v)`` (``jax.nn.dot_product_attention``'s layout), scale
:math:`c`, optionally causal:

.. math::

  s = c\, q k^\top, \qquad \ell = \log \textstyle\sum_j e^{s_j}, \qquad
  p = e^{s - \ell}, \qquad o = p v

per batch row and head. Flash attention never writes ``s`` or ``p``: its
forward pass keeps the log-sum-exp ``ℓ`` (``(B, H, T)``, float32) and its
backward pass recomputes ``p`` from it,

.. math::

  \bar v = p^\top \bar o, \qquad
  \bar s = p \odot (\bar o v^\top - \delta), \quad
  \delta = \textstyle\sum_d o \odot \bar o, \qquad
  \bar q = c\, \bar s k, \qquad \bar k = c\, \bar s^\top q.

Three primitives, each lowered per platform when the program is lowered
(like :func:`.lowering.per_platform`, so a CPU host compiling for an H100 or
a TPU gets the accelerator's version):

* ``forward(q, k, v) -> (o, ℓ)``;
* ``backward(q, k, v, o, ℓ, ō) -> (q̄, k̄, v̄)``, linear in ``ō``;
* ``tangent(q, k, v, o, ℓ, q̇, k̇, v̇) -> ȯ``, the first-order forward
  derivative ``ȯ = E[(ṡ - E[ṡ]) v] + E[v̇]`` (``E`` the softmax average over
  the keys), linear in ``(q̇, k̇, v̇)``.

``tangent`` and ``backward`` are each other's transposes, so a function
whose jvp is ``tangent`` has ``backward`` as its vjp:
:func:`cdat_fast.nn.dot_product_attention` builds on that (values and
gradients through flash kernels, and a jvp). Every primitive also has a jvp
rule, the jvp of the pure-``jnp`` reference: exact, and it materialises the
``T × S`` matrices; it serves the rare uses (a Hessian-vector product through
attention, a jvp of a jvp along two directions), not training.

Versions, chosen per platform (``implementation=None``):

* CPU: the pure-``jnp`` reference (XLA), which materialises ``T × S``;
* CUDA: cuDNN's fused flash attention (``jax.nn.dot_product_attention``'s
  ``implementation="cudnn"``: float16 and bfloat16, equal head dimensions
  ≤ 128, a multiple of 8), else Pallas' GPU flash attention
  (``jax.experimental.pallas.ops.gpu.attention``: float32, sequence lengths
  that its blocks divide), else the reference; ``tangent`` runs
  :func:`~.attention_jet`'s flash-style kernel;
* TPU: Pallas' TPU flash attention
  (``jax.experimental.pallas.ops.tpu.flash_attention``; sequence lengths that
  are multiples of 128, equal head dimensions), else the reference;
  ``tangent`` runs :func:`~.attention_jet`.

``implementation="xla"`` takes the reference everywhere. The cuDNN and
Pallas versions reach into JAX's own kernels (``jax._src.cudnn`` and the
Pallas ops' forward and backward functions); where a JAX version lacks
them, the reference is used.
"""
from __future__ import annotations

import functools
import math
from typing import Any, NamedTuple

import jax
from jax import lax
from jax.interpreters import ad
from jax.interpreters import batching
from jax.interpreters import mlir
import jax.extend
import jax.numpy as jnp

from . import partitioning

__all__ = ["flash_attention_backward", "flash_attention_forward",
           "flash_attention_tangent", "flash_attention_reference"]

IMPLEMENTATIONS = (None, "xla")
_NEG = -1e30  # Masked logits: finite, so no inf - inf.


class Config(NamedTuple):
  """Static parameters of the primitives."""
  scale: float
  causal: bool
  implementation: str | None  # None: per platform; "xla": the reference


# ---------------------------------------------------------------------------
# The reference (pure jnp, float32 inside).


def _accumulation(q):
  """float32, or float64 for float64 inputs."""
  return jnp.promote_types(q.dtype, jnp.float32)


def _logits(q, k, config):
  acc = _accumulation(q)
  s = config.scale * jnp.einsum("bthd,bshd->bhts", q.astype(acc),
                                k.astype(acc))
  if config.causal:
    t, n = q.shape[1], k.shape[1]
    s = jnp.where(jnp.tril(jnp.ones((t, n), bool)), s, _NEG)
  return s


def _probabilities(q, k, lse, config):
  return jnp.exp(_logits(q, k, config) - lse[..., None])


def reference_forward(q, k, v, *, config: Config):
  """``(o, ℓ)`` by materialising the logits."""
  s = _logits(q, k, config)
  lse = jax.nn.logsumexp(s, axis=-1)
  p = jnp.exp(s - lse[..., None])
  o = jnp.einsum("bhts,bshd->bthd", p, v.astype(p.dtype))
  return o.astype(q.dtype), lse


def reference_backward(q, k, v, o, lse, do, *, config: Config):
  """``(q̄, k̄, v̄)`` from the saved log-sum-exp (the flash formulas)."""
  p = _probabilities(q, k, lse, config)
  acc = lambda a: a.astype(p.dtype)
  dv = jnp.einsum("bhts,bthd->bshd", p, acc(do))
  delta = jnp.einsum("bthd,bthd->bht", acc(o), acc(do))
  dp = jnp.einsum("bthd,bshd->bhts", acc(do), acc(v))
  ds = config.scale * p * (dp - delta[..., None])
  dq = jnp.einsum("bhts,bshd->bthd", ds, acc(k))
  dk = jnp.einsum("bhts,bthd->bshd", ds, acc(q))
  return dq.astype(q.dtype), dk.astype(k.dtype), dv.astype(v.dtype)


def reference_tangent(q, k, v, o, lse, dq, dk, dv, *, config: Config):
  """``ȯ = E[(ṡ - E[ṡ]) v] + E[v̇]`` from the saved log-sum-exp."""
  del o
  p = _probabilities(q, k, lse, config)
  f32 = lambda a: a.astype(p.dtype)
  ds = config.scale * (jnp.einsum("bthd,bshd->bhts", f32(dq), f32(k))
                       + jnp.einsum("bthd,bshd->bhts", f32(q), f32(dk)))
  dp = p * (ds - jnp.sum(p * ds, axis=-1, keepdims=True))
  do = (jnp.einsum("bhts,bshd->bthd", dp, f32(v))
        + jnp.einsum("bhts,bshd->bthd", p, f32(dv)))
  return do.astype(q.dtype)


def flash_attention_reference(q, k, v, *, scale: float | None = None,
                              causal: bool = False) -> jax.Array:
  """Softmax attention by the textbook formula, ``(B, T, H, D_v)``."""
  config = Config(_scale(q, scale), bool(causal), "xla")
  return reference_forward(q, k, v, config=config)[0]


# ---------------------------------------------------------------------------
# CUDA versions.


def _cudnn_module():
  try:
    from jax._src.cudnn import fused_attention_stablehlo as fa  # pylint: disable=g-import-not-at-top
    fa.check_cudnn_version()
  except Exception:  # pylint: disable=broad-except
    return None  # No cuDNN here, or a JAX without this module.
  needed = ("dot_product_attention", "_dot_product_attention_bwd_p_wrapper",
            "MaskType", "AttentionLayout")
  return fa if all(hasattr(fa, n) for n in needed) else None


def _cudnn_fits(q, k, v) -> bool:
  d = q.shape[-1]
  return (q.dtype in (jnp.bfloat16, jnp.float16) and d == v.shape[-1]
          and d <= 128 and d % 8 == 0)


def _cudnn_forward(fa, q, k, v, config):
  mask = fa.MaskType.CAUSAL if config.causal else fa.MaskType.NO_MASK
  o, stats = fa.dot_product_attention(q, k, v, scale=config.scale,
                                      mask_type=mask, return_residual=True)
  return o, stats.reshape(q.shape[0], q.shape[2], q.shape[1])


def _cudnn_backward(fa, q, k, v, o, lse, do, config):
  mask = fa.MaskType.CAUSAL if config.causal else fa.MaskType.NO_MASK
  unused = jnp.zeros(0, q.dtype)
  grads = fa._dot_product_attention_bwd_p_wrapper.bind(  # pylint: disable=protected-access
      q, k, v, unused, unused, unused, unused, unused, unused, unused, lse, o,
      do, scale=config.scale, seed=42, dropout_rate=0.0,
      variadic_args=(False, False), mask_type=mask,
      layout=fa.AttentionLayout.BTNH.value, sliding_window_length=None)
  return tuple(grads[:3])


def _pallas_gpu_module():
  try:
    from jax.experimental.pallas.ops.gpu import attention  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - depends on the jax build.
    return None
  needed = ("mha", "_mha_backward", "BlockSizes")
  return attention if all(hasattr(attention, n) for n in needed) else None


def _pallas_gpu_fits(q, k, v) -> bool:
  t, s, d = q.shape[1], k.shape[1], q.shape[-1]
  return (q.dtype in (jnp.float32, jnp.bfloat16, jnp.float16)
          and d == v.shape[-1] and d == 1 << (d - 1).bit_length()
          and t % min(128, t) == 0 and s % min(128, s) == 0
          and t % 32 == 0 and s % 32 == 0)


def _pallas_gpu_forward(mha, q, k, v, config):
  o, lse = mha.mha(q, k, v, None, sm_scale=config.scale, causal=config.causal,
                   return_residuals=True)
  return o, lse


def _pallas_gpu_backward(mha, q, k, v, o, lse, do, config):
  grads = mha._mha_backward(  # pylint: disable=protected-access
      config.scale, config.causal, mha.BlockSizes.get_default(), "triton",
      None, 2, None, False, False, False, (q, k, v, None, o, lse), do)
  return tuple(grads[:3])


def _cuda_choice(config, q, k, v):
  """``("cudnn", module)``, ``("pallas", module)`` or ``("xla", None)``."""
  if config.implementation != "xla":
    fa = _cudnn_module() if _cudnn_fits(q, k, v) else None
    if fa is not None:
      return "cudnn", fa
    mha = _pallas_gpu_module() if _pallas_gpu_fits(q, k, v) else None
    if mha is not None:
      return "pallas", mha
  return "xla", None


# ---------------------------------------------------------------------------
# TPU versions (Pallas' TPU flash attention works heads first).


def _pallas_tpu_module():
  try:
    from jax.experimental.pallas.ops.tpu import flash_attention as fa  # pylint: disable=g-import-not-at-top
  except ImportError:  # pragma: no cover - depends on the jax build.
    return None
  needed = ("_flash_attention_impl", "_flash_attention_bwd_dkv",
            "_flash_attention_bwd_dq", "DEFAULT_MASK_VALUE")
  return fa if all(hasattr(fa, n) for n in needed) else None


def _tpu_fits(q, k, v) -> bool:
  return (q.dtype in (jnp.float32, jnp.bfloat16)
          and q.shape[-1] == v.shape[-1] and q.shape[1] % 128 == 0
          and k.shape[1] % 128 == 0)


def _heads_first(*arrays):
  return tuple(jnp.swapaxes(a, 1, 2) for a in arrays)


def _pallas_tpu_forward(fa, q, k, v, config):
  qh, kh, vh = _heads_first(q, k, v)
  o, l, m = fa._flash_attention_impl(  # pylint: disable=protected-access
      qh, kh, vh, None, None, True, config.causal, config.scale, 1, 128, 128,
      128, False)
  return jnp.swapaxes(o, 1, 2), m + jnp.log(l)


def _pallas_tpu_backward(fa, q, k, v, o, lse, do, config):
  qh, kh, vh, doh = _heads_first(q, k, v, do)
  # p = exp(s - m) / l with m = ℓ and l = 1 is exactly p = exp(s - ℓ).
  ones = jnp.ones_like(lse)
  delta = jnp.sum(o.astype(jnp.float32) * do.astype(jnp.float32), axis=-1)
  delta = jnp.swapaxes(delta, 1, 2)
  blocks = dict(sm_scale=config.scale, causal=config.causal,
                mask_value=fa.DEFAULT_MASK_VALUE, debug=False)
  dk, dv = fa._flash_attention_bwd_dkv(  # pylint: disable=protected-access
      qh, kh, vh, None, None, ones, lse, doh, delta, block_q_major=128,
      block_q=128, block_k_major=128, block_k=128, **blocks)
  dq, _ = fa._flash_attention_bwd_dq(  # pylint: disable=protected-access
      qh, kh, vh, None, None, ones, lse, doh, delta, block_q_major=128,
      block_k_major=128, block_k=128, **blocks)
  return _heads_first(dq, dk, dv)


def _tpu_module(config, q, k, v):
  if config.implementation == "xla" or not _tpu_fits(q, k, v):
    return None
  return _pallas_tpu_module()


# ---------------------------------------------------------------------------
# Per-platform versions of the three operations.


def _jet_tangent(q, k, v, dq, dk, dv, config):
  """ȯ by the flash-style jet kernel (its second order left at zero)."""
  from .attention_jet import attention_jet  # pylint: disable=g-import-not-at-top
  _, do, _ = attention_jet(q, k, v, dq, dk, dv, None, None, None,
                           scale=config.scale, causal=config.causal,
                           layout="sequence_major")
  return do


def _forward_version(platform: str, config: Config):
  def forward(q, k, v):
    if platform == "cuda":
      kind, module = _cuda_choice(config, q, k, v)
      if kind == "cudnn":
        return list(_cudnn_forward(module, q, k, v, config))
      if kind == "pallas":
        return list(_pallas_gpu_forward(module, q, k, v, config))
    if platform == "tpu":
      module = _tpu_module(config, q, k, v)
      if module is not None:
        return list(_pallas_tpu_forward(module, q, k, v, config))
    return list(reference_forward(q, k, v, config=config))
  return forward


def _backward_version(platform: str, config: Config):
  def backward(q, k, v, o, lse, do):
    if platform == "cuda":
      kind, module = _cuda_choice(config, q, k, v)
      if kind == "cudnn":
        return list(_cudnn_backward(module, q, k, v, o, lse, do, config))
      if kind == "pallas":
        return list(_pallas_gpu_backward(module, q, k, v, o, lse, do, config))
    if platform == "tpu":
      module = _tpu_module(config, q, k, v)
      if module is not None:
        return list(_pallas_tpu_backward(module, q, k, v, o, lse, do, config))
    return list(reference_backward(q, k, v, o, lse, do, config=config))
  return backward


def _tangent_version(platform: str, config: Config):
  def tangent(q, k, v, o, lse, dq, dk, dv):
    if platform in ("cuda", "rocm", "tpu") and config.implementation != "xla":
      return [_jet_tangent(q, k, v, dq, dk, dv, config)]
    return [reference_tangent(q, k, v, o, lse, dq, dk, dv, config=config)]
  return tangent


# ---------------------------------------------------------------------------
# The primitives.

_REFERENCES = {"forward": reference_forward, "backward": reference_backward,
               "tangent": reference_tangent}
_VERSIONS = {"forward": _forward_version, "backward": _backward_version,
             "tangent": _tangent_version}


def _reference_outputs(name: str, config: Config, *args) -> list[jax.Array]:
  out = _REFERENCES[name](*args, config=config)
  return list(out) if isinstance(out, tuple) else [out]


def _pallas_version(platform: str, config: Config, q, k, v) -> bool:
  """Whether the version lowered is a Pallas kernel (XLA cannot partition
  it; cuDNN's and XLA's partition themselves)."""
  if platform == "cuda":
    return _cuda_choice(config, q, k, v)[0] == "pallas"
  return platform == "tpu" and _tpu_module(config, q, k, v) is not None


def _lowering(name: str, platform: str):
  """The lowering rule: the platform's version; under a device mesh, a
  Pallas version split by batch rows (:mod:`.partitioning`: every operand
  and result is ``(B, ...)``, and each batch row is independent)."""
  def rule(ctx, *args, config):
    fn = _VERSIONS[name](platform, config)
    if (partitioning.partitioned_context(ctx)
        and _pallas_version(platform, config, *ctx.avals_in[:3])):
      spec = partitioning.RowSpec(1, (True,) * len(args))
      return partitioning.lower(ctx, args, spec, fn, fn, platform)
    return mlir.lower_fun(fn, multiple_results=True)(ctx, *args)
  return rule


def _make_primitive(name: str):
  prim = jax.extend.core.Primitive(f"flash_attention_{name}")
  prim.multiple_results = True

  @prim.def_abstract_eval
  def _abstract(*avals, config):
    shapes = [jax.ShapeDtypeStruct(a.shape, a.dtype) for a in avals]
    outs = jax.eval_shape(functools.partial(_reference_outputs, name, config),
                          *shapes)
    return [jax.core.ShapedArray(o.shape, o.dtype) for o in outs]

  @prim.def_impl
  def _impl(*args, config):
    return jax.jit(functools.partial(prim.bind, config=config))(*args)

  for platform in ("cpu", "cuda", "rocm", "tpu"):
    mlir.register_lowering(prim, _lowering(name, platform), platform=platform)

  def _jvp(primals, tangents, *, config):
    tangents = tuple(ad.instantiate_zeros(t) for t in tangents)
    return jax.jvp(functools.partial(_reference_outputs, name, config),
                   tuple(primals), tangents)

  ad.primitive_jvps[prim] = _jvp

  def _batch(args, dims, *, config):
    size = next(a.shape[d] for a, d in zip(args, dims) if d is not None)
    merged = []
    for a, d in zip(args, dims):
      a = (jnp.broadcast_to(a, (size, *a.shape)) if d is None
           else jnp.moveaxis(a, d, 0))
      merged.append(a.reshape(size * a.shape[1], *a.shape[2:]))
    outs = prim.bind(*merged, config=config)
    return [o.reshape(size, -1, *o.shape[1:]) for o in outs], [0] * len(outs)

  batching.primitive_batchers[prim] = _batch
  try:  # cuDNN's custom partitioning needs the devices while lowering.
    from jax._src import dispatch  # pylint: disable=g-import-not-at-top
    dispatch.prim_requires_devices_during_lowering.add(prim)
  except (ImportError, AttributeError):  # pragma: no cover - jax internals.
    pass
  return prim


_forward_p = _make_primitive("forward")
_backward_p = _make_primitive("backward")
_tangent_p = _make_primitive("tangent")


def _zeros_if_zero(ct, aval_like):
  return (jnp.zeros(aval_like.shape, aval_like.dtype)
          if type(ct) is ad.Zero else ct)  # pylint: disable=unidiomatic-typecheck


def _tangent_transpose(cts, q, k, v, o, lse, dq, dk, dv, *, config):
  for name, x in (("q", q), ("k", k), ("v", v), ("o", o), ("lse", lse)):
    if ad.is_undefined_primal(x):
      raise NotImplementedError(
          f"flash_attention_tangent is linear in the tangents only, not {name}")
  (ct,) = cts
  ct = _zeros_if_zero(ct, o)
  grads = _backward_p.bind(q, k, v, o, lse, ct, config=config)
  return [None] * 5 + [g if ad.is_undefined_primal(x) else None
                       for g, x in zip(grads, (dq, dk, dv))]


def _backward_transpose(cts, q, k, v, o, lse, do, *, config):
  for name, x in (("q", q), ("k", k), ("v", v), ("o", o), ("lse", lse)):
    if ad.is_undefined_primal(x):
      raise NotImplementedError(
          f"flash_attention_backward is linear in ō only, not {name}")
  cts = [_zeros_if_zero(c, a) for c, a in zip(cts, (q, k, v))]
  (ct,) = _tangent_p.bind(q, k, v, o, lse, *cts, config=config)
  return [None] * 5 + [ct]


ad.primitive_transposes[_tangent_p] = _tangent_transpose
ad.primitive_transposes[_backward_p] = _backward_transpose


# ---------------------------------------------------------------------------
# Public functions.


def _scale(q, scale):
  return float(1.0 / math.sqrt(q.shape[-1]) if scale is None else scale)


def make_config(q, k, v, *, scale: float | None, causal: bool,
                implementation: str | None) -> Config:
  """Checks shapes and options; returns the primitives' static parameters."""
  for name, a in (("query", q), ("key", k), ("value", v)):
    if jnp.ndim(a) != 4:
      raise ValueError(f"flash attention: {name} must have shape (B, T, H, D),"
                       f" got {jnp.shape(a)}")
  if k.shape[:3] != v.shape[:3] or q.shape[0] != k.shape[0] or (
      q.shape[2] != k.shape[2]) or q.shape[3] != k.shape[3]:
    raise ValueError("flash attention: query (B, T, H, D), key (B, S, H, D)"
                     f" and value (B, S, H, D_v) disagree: {q.shape},"
                     f" {k.shape}, {v.shape}")
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError("flash attention: causal needs as many keys as queries,"
                     f" got {q.shape[1]} and {k.shape[1]}")
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(f"flash attention: implementation must be one of"
                     f" {IMPLEMENTATIONS}, got {implementation!r}")
  return Config(_scale(q, scale), bool(causal), implementation)


def flash_attention_forward(q, k, v, *, config: Config):
  """``(o, ℓ)``: the output and the log-sum-exp ``(B, H, T)``, float32."""
  return tuple(_forward_p.bind(q, k, v, config=config))


def flash_attention_backward(q, k, v, o, lse, do, *, config: Config):
  """``(q̄, k̄, v̄)`` from the forward's ``(o, ℓ)`` and the cotangent ``ō``."""
  return tuple(_backward_p.bind(q, k, v, o, lse, do, config=config))


def flash_attention_tangent(q, k, v, o, lse, dq, dk, dv, *, config: Config):
  """``ȯ``, the jvp of attention along ``(q̇, k̇, v̇)``."""
  return _tangent_p.bind(q, k, v, o, lse, dq, dk, dv, config=config)[0]
