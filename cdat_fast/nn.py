"""Flax layers whose jvp-of-jvp runs through the fused jet kernels.

CDAT needs :math:`u^\\top H u` for :math:`f(w) = \\ell(\\text{model}(w, x))`,
computed as the second-order term of jvp-of-jvp along the update direction
:math:`u`::

  jax.jvp(lambda p: jax.jvp(f, (p,), (u,))[1], (params,), (u,))

Here :class:`Dense`, :class:`LayerNorm`, :class:`Embed`,
:class:`MultiHeadAttention`, the activations (:func:`relu`, :func:`gelu`,
:func:`tanh`, :func:`silu`, :func:`jet_activation`), :func:`attention` and
:func:`add` are drop-in replacements for their ``flax.linen`` counterparts
(same arguments that matter, same parameter trees, same values and
gradients) whose second-order forward pass goes through
:func:`~cdat_fast.kernels.dense_jet`,
:func:`~cdat_fast.kernels.activation_jet`,
:func:`~cdat_fast.kernels.layer_norm_jet` and
:func:`~cdat_fast.kernels.attention_jet`.

How it is wired. Each layer is an op :math:`y = g(a_1, \\dots, a_k)` (for
``Dense``: ``(x, kernel, bias)``) with two levels of ``jax.custom_jvp``:

1. ``op(*args)`` evaluates the plain flax formula. Its JVP rule returns
   ``pair(args, dargs)``.
2. ``pair(args, dargs) = (y, dy)`` evaluates ``jax.jvp`` of the plain formula,
   so the first-order pass and reverse mode are exactly flax's: reverse mode
   linearises ``op``'s rule, and partial evaluation inlines ``pair``'s plain
   body, which is linear in ``dargs`` and transposes like flax's.
   ``pair``'s own JVP rule is where the second order happens. When the outer
   tangents repeat the inner ones (the same objects: ``ẋ is dx``,
   ``ẇ is dw``, ...; zeros match zeros) and the parameters' second-order
   tangents are zero, which is what jvp-of-jvp along one direction ``u``
   produces, it calls the fused kernel once for ``(y, dy, ddy)`` and returns
   ``dy`` itself as the outer tangent of ``y``, so the next fused layer sees
   the same repetition. Otherwise it falls back to ``jax.jvp`` of the plain
   first-order pass, exact in every case.

So the fused path is taken in chains of these layers (an MLP, pre-norm
stacks of Dense / LayerNorm / activation / attention, with residual
connections written with :func:`add` and reshapes, transposes, slices or
concatenations with :func:`linear`; ``NanoLM``, ``ViT`` and ``MLPMixer`` of
:mod:`cdat_fast.harness.models` with ``fused=True`` end to end) when both jvps get
the same ``u`` object. A plain ``jnp`` op between two layers (``x + y`` for
a residual, a reshape, dropout) produces distinct tracers for the inner and
outer tangents, and the next layer takes the exact XLA fallback instead; so
does
passing one direction as two separate arguments of a jitted function (they
become two tracers). Values, gradients, ``jax.jvp``, ``jax.jvp(jax.grad(f))``,
``jax.grad`` of a jvp and ``jax.vmap`` all work; the fused path needs float
inputs (what flax layers take).

Examples:
  >>> import jax, jax.numpy as jnp
  >>> from cdat_fast import nn as jet_nn
  >>> model = jet_nn.Dense(3)
  >>> x = jnp.ones((2, 4))
  >>> params = model.init(jax.random.key(0), x)
  >>> f = lambda p: jnp.sum(model.apply(p, x) ** 2)
  >>> u = jax.tree.map(jnp.ones_like, params)
  >>> (f0, df), (_, uhu) = jax.jvp(
  ...     lambda p: jax.jvp(f, (p,), (u,)), (params,), (u,))
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, Sequence

import flax.linen as fnn
from flax.linen import dtypes as flax_dtypes
import jax
from jax import lax
from jax.custom_derivatives import SymbolicZero
import jax.numpy as jnp

from cdat_fast import kernels, repeated_direction
from cdat_fast.kernels import flash_attention as flash

__all__ = [
    "Dense",
    "Embed",
    "LayerNorm",
    "MultiHeadAttention",
    "add",
    "attention",
    "dot_product_attention",
    "gelu",
    "jet_activation",
    "linear",
    "relu",
    "silu",
    "tanh",
]

Array = jax.Array
Initializer = Callable[..., Array]


# ---------------------------------------------------------------------------
# The two-level custom_jvp op.
# ---------------------------------------------------------------------------


def _nonzero(t: Any) -> bool:
  """Whether a tangent slot holds a (possibly) non-zero array."""
  return t is not None and not isinstance(t, SymbolicZero)


def _jvp_present(fn: Callable[..., Any], primals: Sequence[Any],
                 tangents: Sequence[Any]):
  """``jax.jvp(fn, primals, tangents)`` differentiating only non-zero slots.

  ``primals`` may hold None (an absent argument, e.g. no bias); ``tangents``
  may hold None or ``SymbolicZero`` for zero tangents.
  """
  idx = [i for i, t in enumerate(tangents) if _nonzero(t)]
  if not idx:
    out = fn(*primals)
    return out, jax.tree.map(jnp.zeros_like, out)

  def restricted(*values):
    full = list(primals)
    for i, v in zip(idx, values):
      full[i] = v
    return fn(*full)

  return jax.jvp(restricted, tuple(primals[i] for i in idx),
                 tuple(tangents[i] for i in idx))


def _repeats_inner_direction(args, dargs, targs, tdargs,
                             num_activations: int = 1) -> bool:
  """Whether the outer tangents repeat the inner ones (jvp-of-jvp along u).

  Requires, for every present argument: outer tangent ``is`` inner tangent
  (or both zero), and for every argument after the first ``num_activations``
  (the parameters) a zero second-order tangent. Identity, not equality, so
  the test is free at trace time and never wrong. Under
  :func:`cdat_fast.repeated_direction.along_one_direction` (the curvature
  estimators' jvp of a jvp) the tangents are equal as values by
  construction, so distinct tracers pass too: that is what lets a layer
  between stock flax layers take its kernel.
  """
  promised = repeated_direction.active()
  for i, (a, d, t, td) in enumerate(zip(args, dargs, targs, tdargs)):
    if a is None:
      continue
    if d is None:
      if _nonzero(t):
        return False
    elif not _nonzero(t) or (t is not d and not promised):
      return False
    elif i >= num_activations and _nonzero(td):
      return False
  return True


def _jet_op(plain_fn: Callable[..., Array],
            fused_fn: Callable[..., tuple[Array, Array, Array]] | None,
            num_activations: int | None = 1,
            first_order: Callable[..., tuple[Array, Array]] | None = None):
  """Wraps ``plain_fn(*args)`` so that jvp-of-jvp goes through ``fused_fn``.

  Args:
    plain_fn: the layer's formula, ``plain_fn(*args) -> y``; args may be None.
    fused_fn: ``fused_fn(args, dargs, ddx) -> (y, dy, ddy)`` for the repeated-
      direction case (``dargs`` entries and ``ddx`` may be None for zero;
      ``ddy`` may be None when it is zero), or None to always use the exact
      XLA fallback. With ``num_activations > 1``
      ``ddx`` is the tuple of the first ``num_activations`` arguments'
      second-order tangents.
    num_activations: how many leading arguments are activations, whose
      second-order tangents may be non-zero (the rest are parameters);
      None: all of them (``ddx`` is then always a tuple).
    first_order: ``first_order(args, dargs) -> (y, dy)``, the value and the
      jvp (``dargs`` entries None for zero), differentiable; default
      ``jax.jvp`` of ``plain_fn``. Reverse mode transposes its ``dy``.

  Returns:
    A ``jax.custom_jvp`` function with the signature of ``plain_fn``.
  """
  if first_order is None:
    def first_order(args, dargs):
      return _jvp_present(plain_fn, args, dargs)

  pair = jax.custom_jvp(first_order)

  def pair_jvp(primals, tangents):
    (args, dargs), (targs, tdargs) = primals, tangents
    n_act = len(args) if num_activations is None else num_activations
    if (fused_fn is not None and _repeats_inner_direction(
        args, dargs, targs, tdargs, n_act)):
      dd = tuple(t if _nonzero(t) else None for t in tdargs[:n_act])
      ddx = dd[0] if num_activations == 1 else dd
      dtype = jax.eval_shape(plain_fn, *args).dtype
      y, dy, ddy = fused_fn(args, dargs, ddx)
      y, dy = y.astype(dtype), dy.astype(dtype)
      # None: a second-order tangent known to be zero (a linear op of the
      # parameters, e.g. an embedding lookup), passed on symbolically.
      ddy = (SymbolicZero(jax.typeof(dy).to_tangent_aval()) if ddy is None
             else ddy.astype(dtype))
      return (y, dy), (dy, ddy)
    n = len(args)
    return _jvp_present(lambda *a: first_order(a[:n], a[n:]),
                        tuple(args) + tuple(dargs),
                        tuple(targs) + tuple(tdargs))

  pair.defjvp(pair_jvp, symbolic_zeros=True)

  op = jax.custom_jvp(plain_fn)

  def op_jvp(primals, tangents):
    dargs = tuple(t if _nonzero(t) else None for t in tangents)
    return pair(tuple(primals), dargs)

  op.defjvp(op_jvp, symbolic_zeros=True)
  return op


# ---------------------------------------------------------------------------
# Dense.
# ---------------------------------------------------------------------------


def _as_matrix(x, kernel, bias):
  """An N-d kernel ``(*in, *out)`` with ``prod(in) == x.shape[-1]`` as a matrix.

  The layouts of ``flax.linen.DenseGeneral`` in multi-head attention
  (``(E, H, D)`` projections in, ``(H, D, E)`` out) act on merged heads as
  ``(E, H·D)`` and ``(H·D, E)`` matrices; the bias is flattened to match.
  """
  if kernel is not None and kernel.ndim != 2:
    kernel = kernel.reshape(x.shape[-1], -1)
  if bias is not None and bias.ndim != 1:
    bias = bias.reshape(-1)
  return kernel, bias


@functools.lru_cache(maxsize=None)
def _dense_op(precision, dtype, fused: bool):
  """The op ``x @ kernel + bias`` with flax's dtype promotion and contraction.

  The promotion happens inside the op, so the op sees the parameters
  themselves (and their tangents), whatever ``dtype`` is. So does the
  flattening of N-d kernels (:func:`_as_matrix`): a reshape outside the op
  would give the inner and outer tangents distinct tracers and break the
  repeated-direction chain.
  """

  def dense(x, kernel, bias):
    x, kernel, bias = flax_dtypes.promote_dtype(x, kernel, bias, dtype=dtype)
    kernel, bias = _as_matrix(x, kernel, bias)
    y = lax.dot_general(
        x, kernel, (((x.ndim - 1,), (0,)), ((), ())), precision=precision)
    if bias is not None:
      y += jnp.reshape(bias, (1,) * (y.ndim - 1) + (-1,))
    return y

  def dense_fused(args, dargs, ddx):
    target = flax_dtypes.canonicalize_dtype(*args, dtype=dtype)
    x, kernel, bias, dx, dkernel, dbias, ddx = (
        None if a is None else a.astype(target) for a in (*args, *dargs, ddx))
    kernel, bias = _as_matrix(x, kernel, bias)
    dkernel, dbias = _as_matrix(x, dkernel, dbias)
    y, dy, ddy = kernels.dense_jet(x, kernel, bias, dx, dkernel, dbias, ddx,
                                   precision=precision)
    if ddx is None and (dx is None or dkernel is None):
      ddy = None  # Known zero (e.g. the first layer's): passed on symbolically.
    return y, dy, ddy

  return _jet_op(dense, dense_fused if fused else None)


class Dense(fnn.Module):
  """Drop-in for ``flax.linen.Dense`` with a fused second-order forward pass.

  .. math:: y = x W + b

  Parameters ``{"kernel": (in, features), "bias": (features,)}`` as in flax.
  Values and gradients are flax's; jvp-of-jvp along one direction runs
  :func:`~cdat_fast.kernels.dense_jet` (see the module docstring).

  Attributes:
    features: number of output features.
    use_bias: whether to add a bias.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    precision: ``lax.dot_general`` precision (also used inside the kernel).
    kernel_init: initializer of the kernel.
    bias_init: initializer of the bias.
    fused: route jvp-of-jvp through the fused kernel (False: plain XLA).
  """
  features: int
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = fnn.initializers.lecun_normal()
  bias_init: Initializer = fnn.initializers.zeros_init()
  fused: bool = True

  @fnn.compact
  def __call__(self, inputs: Array) -> Array:
    kernel = self.param("kernel", self.kernel_init,
                        (jnp.shape(inputs)[-1], self.features),
                        self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (self.features,),
                        self.param_dtype)
    op = _dense_op(self.precision, self.dtype, self.fused)
    return op(inputs, kernel, bias)


class _HeadsDense(Dense):
  """``flax.linen.DenseGeneral``'s multi-head projections on merged heads.

  Kernel ``(*in_shape, *features)`` and bias ``features`` (here a tuple),
  initialised flat and reshaped as DenseGeneral does (same values from the
  same key); applied to inputs whose last axis is ``prod(in_shape)`` (the
  heads merged), with outputs of ``prod(features)`` merged features.
  """
  in_shape: tuple[int, ...] = ()

  @fnn.compact
  def __call__(self, inputs: Array) -> Array:
    n_in, n_out = math.prod(self.in_shape), math.prod(self.features)
    if jnp.shape(inputs)[-1] != n_in:
      raise ValueError(f"{self.name}: inputs have {jnp.shape(inputs)[-1]}"
                       f" features, expected {n_in} {self.in_shape}")

    def flat(init, flat_shape):
      return lambda key, shape, dtype: jnp.reshape(
          init(key, flat_shape, dtype), shape)

    kernel = self.param("kernel", flat(self.kernel_init, (n_in, n_out)),
                        self.in_shape + self.features, self.param_dtype)
    bias = None
    if self.use_bias:
      bias = self.param("bias", flat(self.bias_init, (n_out,)),
                        self.features, self.param_dtype)
    return _dense_op(self.precision, self.dtype, self.fused)(inputs, kernel,
                                                            bias)


# ---------------------------------------------------------------------------
# Embed.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _embed_op(dtype, fused: bool):
  """The lookup ``table[indices]`` as an op of ``(indices, table)``."""

  def embed(indices, table):
    (table,) = flax_dtypes.promote_dtype(table, dtype=dtype, inexact=False)
    if table.shape[0] == 1:
      return jnp.broadcast_to(table[0], indices.shape + table.shape[1:])
    return jnp.take(table, indices, axis=0)

  def embed_fused(args, dargs, ddx):
    del ddx  # Integer indices: no tangent.
    (indices, table), (_, dtable) = args, dargs
    y = embed(indices, table)
    # Linear in the table: the second-order tangent is zero (symbolic).
    return y, jnp.zeros_like(y) if dtable is None else embed(indices,
                                                               dtable), None

  return _jet_op(embed, embed_fused if fused else None)


class Embed(fnn.Module):
  """Drop-in for ``flax.linen.Embed`` that keeps the fused jet chain going.

  .. math:: y = E_{i,:}

  The lookup is linear in the table, so its jet along ``u`` is
  ``(E[i], U[i], 0)``; what this layer adds over flax's is that the outer
  tangent of its output *is* the inner one and the second-order tangent is a
  symbolic zero, so the layers after an embedding (a :func:`add` of token
  and position embeddings, then :class:`LayerNorm`) take their fused
  kernels. Parameters ``{"embedding": (num_embeddings, features)}``, values
  and gradients as flax's.

  Attributes:
    num_embeddings: number of rows of the table.
    features: embedding size.
    dtype: output dtype (default: the table's).
    param_dtype: dtype of the table.
    embedding_init: initializer of the table (flax's default).
    fused: keep the fused chain (False: plain XLA).
  """
  num_embeddings: int
  features: int
  dtype: Any = None
  param_dtype: Any = jnp.float32
  embedding_init: Initializer = fnn.linear.default_embed_init
  fused: bool = True

  @fnn.compact
  def __call__(self, inputs: Array) -> Array:
    if not jnp.issubdtype(jnp.result_type(inputs), jnp.integer):
      raise ValueError(f"Embed: inputs must be integers, got dtype"
                       f" {jnp.result_type(inputs)}")
    table = self.param("embedding", self.embedding_init,
                       (self.num_embeddings, self.features), self.param_dtype)
    return _embed_op(self.dtype, self.fused)(inputs, table)


# ---------------------------------------------------------------------------
# LayerNorm.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _layer_norm_op(epsilon: float, dtype, use_fast_variance: bool,
                   fused: bool):
  """flax's layer norm over the last axis, as one op of (x, scale, bias)."""

  def layer_norm(x, scale, bias):
    # Mirrors flax.linen.normalization._compute_stats and _normalize.
    stat_dtype = jnp.promote_types(
        jnp.result_type(x) if dtype is None else dtype, jnp.float32)
    xs = x.astype(stat_dtype)
    mu = xs.mean(-1)
    if use_fast_variance:
      var = jnp.maximum(0.0, lax.square(xs).mean(-1) - lax.square(mu))
    else:
      var = lax.square(xs - mu[..., None]).mean(-1)
    y = x - mu[..., None]
    mul = lax.rsqrt(var[..., None] + epsilon)
    feature_shape = (1,) * (x.ndim - 1) + (x.shape[-1],)
    dtype_args = [x]
    if scale is not None:
      mul *= scale.reshape(feature_shape)
      dtype_args.append(scale)
    y *= mul
    if bias is not None:
      y += bias.reshape(feature_shape)
      dtype_args.append(bias)
    return jnp.asarray(y, flax_dtypes.canonicalize_dtype(*dtype_args,
                                                         dtype=dtype))

  def layer_norm_fused(args, dargs, ddx):
    return kernels.layer_norm_jet(*args, *dargs, ddx, epsilon=epsilon)

  return _jet_op(layer_norm, layer_norm_fused if fused else None)


class LayerNorm(fnn.Module):
  """Drop-in for ``flax.linen.LayerNorm`` (last axis) with a fused jet.

  .. math:: y = \\frac{x - \\mu}{\\sqrt{\\sigma^2 + \\epsilon}} \\gamma + \\beta

  Parameters ``{"scale": (n,), "bias": (n,)}`` as in flax; statistics in
  float32 (flax's ``force_float32_reductions=True``) over the last axis only
  (flax's default ``reduction_axes=feature_axes=-1``). jvp-of-jvp along one
  direction runs :func:`~cdat_fast.kernels.layer_norm_jet`, whose variance is
  two-pass; flax's fast variance ``E[x²] - E[x]²`` differs from it only by
  rounding.

  Attributes:
    epsilon: added to the variance.
    dtype: output dtype (default: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    use_bias: whether to add :math:`\\beta`.
    use_scale: whether to multiply by :math:`\\gamma`.
    bias_init: initializer of the bias.
    scale_init: initializer of the scale.
    use_fast_variance: flax's variance formula for the plain path.
    fused: route jvp-of-jvp through the fused kernel (False: plain XLA).
  """
  epsilon: float = 1e-6
  dtype: Any = None
  param_dtype: Any = jnp.float32
  use_bias: bool = True
  use_scale: bool = True
  bias_init: Initializer = fnn.initializers.zeros
  scale_init: Initializer = fnn.initializers.ones
  use_fast_variance: bool = True
  fused: bool = True

  @fnn.compact
  def __call__(self, x: Array) -> Array:
    n = jnp.shape(x)[-1]
    scale = None
    bias = None
    if self.use_scale:
      scale = self.param("scale", self.scale_init, (n,), self.param_dtype)
    if self.use_bias:
      bias = self.param("bias", self.bias_init, (n,), self.param_dtype)
    op = _layer_norm_op(float(self.epsilon), self.dtype,
                        self.use_fast_variance, self.fused)
    return op(x, scale, bias)


# ---------------------------------------------------------------------------
# Activations.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def jet_activation(name: str, fused: bool = True) -> Callable[[Array], Array]:
  """An elementwise activation whose jvp-of-jvp runs ``activation_jet``.

  Args:
    name: ``"relu"``, ``"gelu"`` (tanh approximation, flax's ``nn.gelu``
      default), ``"tanh"`` or ``"silu"``.
    fused: route jvp-of-jvp through the fused kernel (False: plain XLA).

  Returns:
    ``f(x)`` with the values and derivatives of ``kernels.ACTIVATIONS[name]``.
  """
  if name not in kernels.ACTIVATIONS:
    raise ValueError(
        f"name must be one of {sorted(kernels.ACTIVATIONS)}, got {name!r}")
  plain = kernels.ACTIVATIONS[name]

  def activation(x):
    return plain(x)

  activation.__name__ = name

  def activation_fused(args, dargs, ddx):
    (x,), (dx,) = args, dargs
    if dx is None:  # Zero first-order tangent: only ddx moves y.
      dx = jnp.zeros_like(x)
    return kernels.activation_jet(x, dx, ddx, activation=name)

  op = _jet_op(activation, activation_fused if fused else None)

  @functools.wraps(activation)
  def f(x: Array) -> Array:
    return op(x)

  return f


relu = jet_activation("relu")
gelu = jet_activation("gelu")
tanh = jet_activation("tanh")
silu = jet_activation("silu")


# ---------------------------------------------------------------------------
# Attention.
# ---------------------------------------------------------------------------


def _split_heads(x: Array, num_heads: int) -> Array:
  """``(..., T, H·D) -> (..., T, H, D)``."""
  *lead, t, width = x.shape
  if width % num_heads:
    raise ValueError(f"attention: feature size {width} is not divisible by"
                     f" num_heads={num_heads}")
  return x.reshape(*lead, t, num_heads, width // num_heads)


def _as_batch_heads(a: Array, num_heads: int | None) -> Array:
  """``(..., T, H, D)``, or merged ``(..., T, H·D)`` with ``num_heads``, as
  ``(B, T, H, D)`` with the leading dimensions in ``B``."""
  if num_heads is not None:
    a = _split_heads(a, num_heads)
  return a.reshape(-1, *a.shape[-3:])


@functools.lru_cache(maxsize=None)
def _attention_op(config: flash.Config, num_heads: int | None, fused: bool):
  """Softmax attention as one op of ``(q, k, v)``.

  Values, jvps and gradients through the flash primitives of
  :mod:`cdat_fast.kernels.flash_attention` (the log-sum-exp kept, a flash
  backward), the jvp-of-jvp along one direction through
  :func:`~cdat_fast.kernels.attention_jet`. ``num_heads=None``: inputs
  ``(..., T, H, D)``; else merged heads ``(..., T, H·D)``. Every reshape and
  cast is inside the op, so the tangents of its inputs are the callers'.
  """

  def batch_heads(args):
    dtype = jnp.result_type(*[a for a in args if a is not None])
    return tuple(None if a is None else _as_batch_heads(a, num_heads).astype(
        dtype) for a in args)

  def like(o, q):  # (B, T, H, D_v) back to q's leading dimensions
    if num_heads is None:
      return o.reshape(*q.shape[:-3], *o.shape[-3:])
    return o.reshape(*q.shape[:-1], -1)

  def plain(q, k, v):
    return like(flash.flash_attention_forward(*batch_heads((q, k, v)),
                                              config=config)[0], q)

  def first_order(args, dargs):
    q, k, v = batch_heads(args)
    o, lse = flash.flash_attention_forward(q, k, v, config=config)
    if all(d is None for d in dargs):
      return like(o, args[0]), like(jnp.zeros_like(o), args[0])
    dq, dk, dv = (jnp.zeros_like(a) if d is None else d.astype(a.dtype)
                  for a, d in zip((q, k, v), batch_heads(dargs)))
    do = flash.flash_attention_tangent(q, k, v, o, lse, dq, dk, dv,
                                       config=config)
    return like(o, args[0]), like(do, args[0])

  def attention_fused(args, dargs, ddargs):
    outs = kernels.attention_jet(
        *batch_heads((*args, *dargs, *ddargs)), scale=config.scale,
        causal=config.causal, layout="sequence_major")
    return tuple(like(o, args[0]) for o in outs)

  return _jet_op(plain, attention_fused if fused else None,
                 num_activations=3, first_order=first_order)


def _attention_config(q, k, v, num_heads, *, scale, causal,
                      implementation) -> flash.Config:
  shapes = [jax.eval_shape(functools.partial(_as_batch_heads,
                                             num_heads=num_heads), a)
            for a in (q, k, v)]
  return flash.make_config(*shapes, scale=scale, causal=causal,
                           implementation=implementation)


def attention(query: Array, key: Array, value: Array, *, num_heads: int,
              causal: bool = False, fused: bool = True) -> Array:
  """Multi-head softmax attention whose jvp-of-jvp runs ``attention_jet``.

  .. math:: o_h = \\mathrm{softmax}\\big(q_h k_h^\\top / \\sqrt{D}\\big)\\, v_h

  per head ``h``. The inputs and the output keep the heads merged in the
  last axis, ``(..., T, H·D)``, so the projections around it can be
  :class:`Dense` layers with no reshape in between (a reshape would break
  the repeated-direction chain of the module docstring); the head split is
  inside the op. Values and gradients are ``flax.linen.dot_product_attention``'s
  (with ``make_causal_mask``-style masking when ``causal``); the second-order
  forward pass is :func:`~cdat_fast.kernels.attention_jet`, where all three
  inputs carry second-order tangents.

  Args:
    query: ``(..., T, H·D)``.
    key: ``(..., S, H·D)``.
    value: ``(..., S, H·D_v)``.
    num_heads: ``H``; must divide the feature sizes.
    causal: mask keys after each query's position (``S == T``).
    fused: route jvp-of-jvp through the fused kernel (False: plain XLA).

  Returns:
    ``(..., T, H·D_v)``.
  """
  if not isinstance(num_heads, int) or num_heads < 1:
    raise ValueError(f"attention: num_heads must be a positive int, got"
                     f" {num_heads!r}")
  if causal and query.shape[-2] != key.shape[-2]:
    raise ValueError("attention: causal needs as many keys as queries, got"
                     f" {query.shape[-2]} and {key.shape[-2]}")
  if jnp.ndim(query) == 4 and query.shape[-2] == num_heads:
    raise ValueError(
        f"attention: query {query.shape} looks like flax's (B, T, H, D)"
        " layout, but attention takes merged heads (..., T, H·D); as a flax"
        " attention_fn use cdat_fast.nn.dot_product_attention (if these"
        " really are merged heads with T == num_heads, fold the leading"
        " axes into one)")
  config = _attention_config(query, key, value, num_heads, scale=None,
                             causal=causal, implementation=None)
  return _attention_op(config, num_heads, bool(fused))(query, key, value)


def _flash_applies(query, key, value, bias, mask, extras) -> bool:
  """Whether the flash op computes this call (else the plain XLA one)."""
  if bias is not None or mask is not None or any(
      x is not None for x in extras):
    return False
  return (jnp.ndim(query) >= 3 and jnp.ndim(key) == jnp.ndim(query)
          and jnp.ndim(value) == jnp.ndim(query)
          and key.shape[-2] == query.shape[-2])


def dot_product_attention(
    query: Array, key: Array, value: Array, bias: Array | None = None,
    mask: Array | None = None, *, scale: float | None = None,
    is_causal: bool = False, query_seq_lengths: Array | None = None,
    key_value_seq_lengths: Array | None = None,
    local_window_size: int | tuple[int, int] | None = None,
    implementation: str | None = None, broadcast_dropout: bool = True,
    dropout_rng: Array | None = None, dropout_rate: float = 0.0,
    deterministic: bool = False, dtype: Any = None, precision: Any = None,
    module: Any = None, fused: bool = True) -> Array:
  """``jax.nn.dot_product_attention`` with flash values and gradients and a
  fused jet: an ``attention_fn`` for stock flax models.

  .. math::
    o = \\mathrm{softmax}\\big(c\\, q k^\\top + \\text{bias}\\big)\\, v,
    \\qquad c = 1/\\sqrt{D}

  per batch row and head, in ``jax.nn.dot_product_attention``'s layout:
  ``query (..., T, H, D)``, ``key (..., S, H, D)``, ``value (..., S, H, D_v)``.
  Its keyword arguments are those of ``jax.nn.dot_product_attention`` and
  those ``flax.linen.MultiHeadDotProductAttention`` and
  ``flax.nnx.MultiHeadAttention`` pass to an ``attention_fn``, so a stock
  model takes it unchanged::

    flax.linen.MultiHeadDotProductAttention(
        num_heads=8, attention_fn=functools.partial(
            cdat_fast.nn.dot_product_attention, is_causal=True))

  (``flax.nnx.MultiHeadAttention`` passes its own ``is_causal`` to the
  ``attention_fn``: give it ``attention_fn=dot_product_attention`` and call
  the module with ``is_causal=True``.)

  Without ``bias``, ``mask``, sequence lengths, a local window or active
  dropout (causality given as ``is_causal``), it is one op whose

  * values and gradients run flash attention
    (:mod:`cdat_fast.kernels.flash_attention`: a forward pass that keeps the
    log-sum-exp and a flash backward; cuDNN on GPUs in float16/bfloat16,
    Pallas elsewhere on GPUs and TPUs, XLA on CPUs), and so take
    ``O(T)`` memory per head where XLA's attention takes ``O(T·S)``;
  * jvp is the flash tangent (first-order forward mode: Gauss–Newton
    curvature through the model);
  * jvp of a jvp along one direction, as CDAT's curvature estimators take
    it (:func:`cdat_fast.curvature.directional_derivatives`), runs
    :func:`~cdat_fast.kernels.attention_jet`, also between stock layers
    (:mod:`cdat_fast.repeated_direction`);
  * other second-order uses (a Hessian-vector product through attention)
    are exact through XLA, materialising ``T × S``.

  Otherwise it is ``jax.nn.dot_product_attention``'s XLA computation (or
  flax's, for dropout), exact for every transformation and not fused.

  Args:
    query: ``(..., T, H, D)``.
    key: ``(..., S, H, D)``.
    value: ``(..., S, H, D_v)``.
    bias: added to the logits, broadcastable to ``(..., H, T, S)``.
    mask: boolean, broadcastable to ``(..., H, T, S)``; False masks out.
    scale: the logit scale ``c``; None: ``1/√D``.
    is_causal: mask keys after each query's position.
    query_seq_lengths: as ``jax.nn.dot_product_attention``.
    key_value_seq_lengths: as ``jax.nn.dot_product_attention``.
    local_window_size: as ``jax.nn.dot_product_attention``.
    implementation: None: the fastest kernel of the platform lowered for;
      ``"cudnn"``: the same (cuDNN where it applies); ``"xla"``: XLA's
      attention on every platform (still one op, with the fused jet).
    broadcast_dropout: as ``flax.linen.dot_product_attention``.
    dropout_rng: as ``flax.linen.dot_product_attention``.
    dropout_rate: as ``flax.linen.dot_product_attention``.
    deterministic: as ``flax.linen.dot_product_attention``.
    dtype: the computation dtype (default: the inputs' common dtype).
    precision: matmul precision of the XLA computation.
    module: flax's ``sow_weights`` module: records the attention weights,
      so it takes the plain XLA computation.
    fused: route jvp-of-jvp through ``attention_jet`` (False: XLA).

  Returns:
    ``(..., T, H, D_v)``.
  """
  if implementation not in (None, "xla", "cudnn"):
    raise ValueError("dot_product_attention: implementation must be None,"
                     f" 'xla' or 'cudnn', got {implementation!r}")
  if dtype is not None:
    query, key, value = (jnp.asarray(a, dtype) for a in (query, key, value))
  dropout = dropout_rate > 0.0 and not deterministic
  extras = (query_seq_lengths, key_value_seq_lengths, local_window_size,
            module, True if dropout else None)
  if not _flash_applies(query, key, value, bias, mask, extras):
    if dropout or module is not None:
      if is_causal:
        causal = jnp.tril(jnp.ones((query.shape[-3], key.shape[-3]), bool))
        mask = causal if mask is None else jnp.logical_and(mask, causal)
      if scale is not None:  # flax scales by 1/√D itself
        query = query * (scale * math.sqrt(query.shape[-1]))
      return fnn.dot_product_attention(
          query, key, value, bias=bias, mask=mask,
          broadcast_dropout=broadcast_dropout, dropout_rng=dropout_rng,
          dropout_rate=dropout_rate, deterministic=deterministic,
          precision=precision, module=module)
    return jax.nn.dot_product_attention(
        query, key, value, bias=bias, mask=mask, scale=scale,
        is_causal=is_causal, query_seq_lengths=query_seq_lengths,
        key_value_seq_lengths=key_value_seq_lengths,
        local_window_size=local_window_size, implementation="xla")
  config = _attention_config(
      query, key, value, None, scale=scale, causal=is_causal,
      implementation="xla" if implementation == "xla" else None)
  return _attention_op(config, None, bool(fused))(query, key, value)


class MultiHeadAttention(fnn.Module):
  """Drop-in for ``flax.linen.MultiHeadDotProductAttention`` (fused jet).

  .. math::
    o = \\big[\\mathrm{softmax}(q_h k_h^\\top / \\sqrt{D})\\, v_h\\big]_h W_o
    + b_o, \\quad q = x_q W_q + b_q,\\ k = x_{kv} W_k + b_k,\\
    v = x_{kv} W_v + b_v.

  Same parameter tree and initial values as flax's module (``query``,
  ``key``, ``value`` kernels ``(E, H, D)``, ``out`` kernel ``(H, D, E_out)``,
  biases to match) and the same values and gradients; the heads stay merged
  between the projections and :func:`attention`, so the whole layer's
  jvp-of-jvp runs four :func:`~cdat_fast.kernels.dense_jet` calls and one
  :func:`~cdat_fast.kernels.attention_jet`. Masks are limited to
  ``causal`` (flax's ``make_causal_mask``); no dropout, no decoding cache.

  Attributes:
    num_heads: ``H``.
    qkv_features: total query/key/value width ``H·D`` (default: the input
      width).
    out_features: output width (default: the query input width).
    causal: mask keys after each query's position.
    use_bias: biases on the four projections.
    dtype: computation dtype (default: inferred from inputs and params).
    param_dtype: dtype of the parameters.
    precision: ``lax.dot_general`` precision of the projections.
    kernel_init: initializer of the projection kernels.
    bias_init: initializer of the biases.
    fused: route jvp-of-jvp through the fused kernels (False: plain XLA).
  """
  num_heads: int
  qkv_features: int | None = None
  out_features: int | None = None
  causal: bool = False
  use_bias: bool = True
  dtype: Any = None
  param_dtype: Any = jnp.float32
  precision: Any = None
  kernel_init: Initializer = fnn.initializers.lecun_normal()
  bias_init: Initializer = fnn.initializers.zeros_init()
  fused: bool = True

  @fnn.compact
  def __call__(self, inputs_q: Array, inputs_kv: Array | None = None) -> Array:
    if inputs_kv is None:
      inputs_kv = inputs_q
    qkv = self.qkv_features or jnp.shape(inputs_q)[-1]
    out = self.out_features or jnp.shape(inputs_q)[-1]
    if qkv % self.num_heads:
      raise ValueError(f"MultiHeadAttention: qkv_features={qkv} must be"
                       f" divisible by num_heads={self.num_heads}")
    heads = (self.num_heads, qkv // self.num_heads)
    proj = functools.partial(
        _HeadsDense, use_bias=self.use_bias, dtype=self.dtype,
        param_dtype=self.param_dtype, precision=self.precision,
        kernel_init=self.kernel_init, bias_init=self.bias_init,
        fused=self.fused)
    q = proj(in_shape=(jnp.shape(inputs_q)[-1],), features=heads,
             name="query")(inputs_q)
    k, v = (proj(in_shape=(jnp.shape(inputs_kv)[-1],), features=heads,
                 name=name)(inputs_kv) for name in ("key", "value"))
    o = attention(q, k, v, num_heads=self.num_heads, causal=self.causal,
                  fused=self.fused)
    return proj(in_shape=heads, features=(out,), name="out")(o)


# ---------------------------------------------------------------------------
# Linear maps: residual adds, reshapes, transposes, slices, concatenation.
# ---------------------------------------------------------------------------


def _linear_fused(fn):
  def fused(args, dargs, ddargs):
    y = fn(*args)

    def image(tangents):  # fn of the tangents, zeros for absent ones
      if all(t is None for t in tangents):
        return None
      return fn(*(jnp.zeros_like(a) if t is None else t
                  for a, t in zip(args, tangents)))

    dy = image(dargs)
    return y, jnp.zeros_like(y) if dy is None else dy, image(ddargs)
  return fused


def linear(fn: Callable[..., Array]) -> Callable[..., Array]:
  """Wraps a linear map of arrays so that it keeps the fused jet chain going.

  ``fn(*arrays)`` must be jointly linear in its arguments (a reshape, a
  transpose, a slice, a mean, a concatenation, a sum; constants and options
  closed over). Its jet along ``u`` is then ``(fn(x), fn(ẋ), fn(ẍ))``; what
  the wrapper adds over calling ``fn`` is that the outer tangent of its
  output *is* the inner one, so the layer after it still takes its fused
  kernel (see the module docstring: a plain ``jnp`` op between two layers
  sends the next one to the exact fallback). Values and derivatives are
  ``fn``'s. Linearity is the caller's promise: a non-linear ``fn`` gets a
  wrong second-order term.

  Examples:
    >>> import jax.numpy as jnp
    >>> from cdat_fast import nn as jet_nn
    >>> swap = jet_nn.linear(lambda x: jnp.swapaxes(x, 1, 2))
    >>> swap(jnp.ones((2, 3, 4))).shape
    (2, 4, 3)

  Args:
    fn: the linear map, positional float-array arguments only.

  Returns:
    A function with ``fn``'s signature and values.
  """
  op = _jet_op(fn, _linear_fused(fn), num_activations=None)

  @functools.wraps(fn)
  def f(*args: Array) -> Array:
    return op(*args)

  return f


def _add_plain(x, y):
  return x + y


_add_op = linear(_add_plain)


def add(x: Array, y: Array) -> Array:
  """``x + y`` that keeps the fused jvp-of-jvp chain going (residuals).

  :func:`linear` of ``x + y`` (broadcasting as ``+`` does): the sum's jet is
  the sum of the jets, and the layer after a residual connection still takes
  its fused kernel. Values and derivatives are those of ``x + y``.
  """
  return _add_op(x, y)
