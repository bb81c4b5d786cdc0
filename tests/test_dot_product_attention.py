"""cdat_fast.nn.dot_product_attention: a stock model's attention_fn.

Values, gradients, jvps and Hessian-vector products equal
``jax.nn.dot_product_attention``'s; in stock ``flax.linen`` and ``flax.nnx``
models the curvature estimators' jvp of a jvp runs the fused
``attention_jet`` and equals the unfused one; anywhere else (a jvp of a jvp
along two directions, also through a jitted function traced first under the
promise) it stays exact; the calls that flash attention does not cover
(masks, biases, dropout, grouped heads) are ``jax.nn``'s and flax's.
"""
from __future__ import annotations

import functools

import flax.linen as fnn
from flax import nnx
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast import nn as jet_nn
from cdat_fast.curvature import directional_derivatives


def _normal(seed, shape, dtype=jnp.float32):
  return jax.random.normal(jax.random.key(seed), shape, dtype)


def _pallas_calls(fn, *args):
  """Names of the pallas_call kernels in fn's jaxpr (nested ones included)."""
  names = []

  def walk(jaxpr):
    for eqn in getattr(jaxpr, "jaxpr", jaxpr).eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(str(eqn.params.get("name")))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(getattr(sub, "jaxpr", sub), "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args))
  return names


@pytest.mark.parametrize("shape,causal", [((2, 6, 3, 4), True),
                                          ((5, 2, 8), False)])
def test_values_gradients_and_jvps_are_jax_nn(shape, causal):
  q, k, v = (_normal(i, shape) for i in range(3))
  ours = functools.partial(jet_nn.dot_product_attention, is_causal=causal)
  ref = functools.partial(jax.nn.dot_product_attention, is_causal=causal)
  loss = lambda fn: lambda *a: jnp.sum(jnp.tanh(fn(*a)))
  tangents = (k, v, q)
  for transform in (
      lambda f: f, lambda f: jax.grad(f, (0, 1, 2)),
      lambda f: lambda *a: jax.jvp(f, a, tangents)[1],
      lambda f: lambda *a: jax.jvp(jax.grad(f, (0, 1, 2)), a, tangents)[1]):
    got = jax.jit(transform(loss(ours)))(q, k, v)
    want = jax.jit(transform(loss(ref)))(q, k, v)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
      np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)


class LinenBlock(fnn.Module):
  """A stock pre-norm decoder block; only ``attention_fn`` varies."""
  attention_fn: object

  @fnn.compact
  def __call__(self, tokens):
    x = fnn.Embed(11, 16)(tokens)
    y = fnn.MultiHeadDotProductAttention(
        num_heads=2, attention_fn=self.attention_fn)(fnn.LayerNorm()(x))
    x = x + y
    x = x + fnn.Dense(16)(fnn.gelu(fnn.Dense(32)(fnn.LayerNorm()(x))))
    return fnn.Dense(11)(x)


def _cross_entropy(logits, tokens):
  logp = jax.nn.log_softmax(logits[:, :-1])
  return -jnp.mean(jnp.take_along_axis(logp, tokens[:, 1:, None], -1))


def _causal(fn):
  return functools.partial(fn, is_causal=True)


@pytest.fixture(scope="module")
def linen_problem():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)
  params = LinenBlock(_causal(jax.nn.dot_product_attention)).init(
      jax.random.key(1), tokens)
  loss = lambda fn: lambda p: _cross_entropy(LinenBlock(fn).apply(p, tokens),
                                             tokens)
  u = jax.tree.map(jnp.negative,
                   jax.grad(loss(_causal(jax.nn.dot_product_attention)))(params))
  return params, u, loss


def test_stock_linen_model_runs_the_fused_jet_under_the_curvature_estimators(
    linen_problem):
  params, u, loss = linen_problem
  ours, ref = (loss(_causal(fn)) for fn in (jet_nn.dot_product_attention,
                                           jax.nn.dot_product_attention))
  curvature = lambda f: jax.jit(lambda p, u: directional_derivatives(f, p, u))
  assert _pallas_calls(curvature(ours), params, u) == ["attention_jet"]
  assert _pallas_calls(curvature(ref), params, u) == []
  for got, want in zip(curvature(ours)(params, u), curvature(ref)(params, u)):
    np.testing.assert_allclose(got, want, rtol=1e-5)
  for got, want in zip(jax.tree.leaves(jax.jit(jax.grad(ours))(params)),
                       jax.tree.leaves(jax.jit(jax.grad(ref))(params))):
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


@functools.partial(jax.jit, static_argnums=0)
def _jvp_of_jvp(f, params, u, v):
  return jax.jvp(lambda p: jax.jvp(f, (p,), (u,))[1], (params,), (v,))[1]


def test_without_the_promise_a_stock_model_is_exact_and_unfused(linen_problem):
  params, u, loss = linen_problem
  ours = loss(_causal(jet_nn.dot_product_attention))
  assert _pallas_calls(functools.partial(_jvp_of_jvp, ours), params, u,
                       u) == []
  v = jax.tree.map(lambda a: jnp.roll(a, 1), u)
  want = _jvp_of_jvp(loss(_causal(jax.nn.dot_product_attention)), params, u,
                     v)
  np.testing.assert_allclose(_jvp_of_jvp(ours, params, u, v), want, rtol=1e-5)


def test_a_function_traced_under_the_promise_is_not_reused_without_it():
  """A jitted body traced first for CDAT's curvature (fused: it assumes one
  direction) must not serve a later jvp of a jvp along two directions."""
  q, k, v = (_normal(i, (1, 6, 2, 4)) for i in range(3))
  inner = jax.jit(lambda q, k, v: jet_nn.dot_product_attention(
      jnp.sin(q), k, v, is_causal=True))
  f = lambda w: jnp.sum(inner(*w) ** 2)
  ref = lambda w: jnp.sum(jax.nn.dot_product_attention(
      jnp.sin(w[0]), w[1], w[2], is_causal=True) ** 2)
  w = (q, k, v)
  u, t = (k, v, q), (v, q, k)
  curvature = jax.jit(directional_derivatives, static_argnums=0)
  np.testing.assert_allclose(curvature(f, w, u), curvature(ref, w, u),
                             rtol=1e-5)
  np.testing.assert_allclose(_jvp_of_jvp(f, w, u, t), _jvp_of_jvp(ref, w, u, t),
                             rtol=1e-5)


def test_cdat_nn_multi_head_attention_in_a_stock_model_is_fused():
  class Mixed(fnn.Module):
    @fnn.compact
    def __call__(self, x):
      x = fnn.Dense(8)(x)
      x = x + jet_nn.MultiHeadAttention(num_heads=2, causal=True)(x)
      return jnp.sum(fnn.Dense(1)(fnn.LayerNorm()(x)) ** 2)

  x = _normal(0, (2, 5, 3))
  params = Mixed().init(jax.random.key(0), x)
  f = lambda p: Mixed().apply(p, x)
  u = jax.tree.map(jnp.negative, jax.grad(f)(params))
  calls = _pallas_calls(lambda p, u: directional_derivatives(f, p, u), params,
                        u)
  assert sorted(calls) == ["attention_jet"] + ["dense_jet"] * 4


class NnxBlock(nnx.Module):
  """A stock nnx block; nnx passes its own keyword arguments (dropout, ...)."""

  def __init__(self, attention_fn, rngs):
    self.embed = nnx.Embed(11, 16, rngs=rngs)
    self.attention = nnx.MultiHeadAttention(
        num_heads=2, in_features=16, attention_fn=attention_fn, decode=False,
        rngs=rngs)
    self.head = nnx.Linear(16, 11, rngs=rngs)

  def __call__(self, tokens):
    x = self.embed(tokens)
    # nnx passes its own is_causal (default False) to attention_fn, so
    # causality goes in at the call, not bound to the function.
    return self.head(x + self.attention(x, is_causal=True))


def test_stock_nnx_model_takes_it_as_attention_fn():
  tokens = jax.random.randint(jax.random.key(0), (2, 8), 0, 11)
  def ref(q, k, v, **kwargs):  # jax.nn's takes none of nnx's extra arguments
    return jax.nn.dot_product_attention(q, k, v, is_causal=kwargs["is_causal"])

  models = {name: NnxBlock(fn, nnx.Rngs(0)) for name, fn in (
      ("ours", jet_nn.dot_product_attention), ("ref", ref))}
  results = {}
  for name, model in models.items():
    graphdef, params = nnx.split(model)
    f = lambda p: _cross_entropy(nnx.merge(graphdef, p)(tokens), tokens)
    u = jax.tree.map(jnp.negative, jax.grad(f)(params))
    results[name] = jax.jit(lambda p, u: (f(p), directional_derivatives(
        f, p, u)))(params, u)
    if name == "ours":
      assert _pallas_calls(lambda p, u: directional_derivatives(f, p, u),
                           params, u) == ["attention_jet"]
  for got, want in zip(jax.tree.leaves(results["ours"]),
                       jax.tree.leaves(results["ref"])):
    np.testing.assert_allclose(got, want, rtol=1e-5)


def test_masks_biases_dropout_and_grouped_heads_are_jax_nn_and_flax():
  q = _normal(0, (2, 5, 4, 8))
  k, v = _normal(1, (2, 5, 2, 8)), _normal(2, (2, 5, 2, 8))
  mask = jax.random.bernoulli(jax.random.key(3), 0.7, (2, 1, 5, 5)).at[
      ..., 0].set(True)
  bias = _normal(4, (2, 4, 5, 5))
  kv4 = (_normal(1, (2, 5, 4, 8)), _normal(2, (2, 5, 4, 8)))
  for args, kwargs in (((q, k, v), {}), ((q, *kv4), dict(mask=mask)),
                       ((q, *kv4), dict(bias=bias, is_causal=True))):
    np.testing.assert_allclose(
        jax.jit(functools.partial(jet_nn.dot_product_attention, **kwargs))(
            *args),
        jax.jit(functools.partial(jax.nn.dot_product_attention, **kwargs))(
            *args), rtol=1e-5, atol=1e-6)
  dropout = dict(dropout_rng=jax.random.key(5), dropout_rate=0.5)
  np.testing.assert_allclose(
      jax.jit(lambda *a: jet_nn.dot_product_attention(*a, **dropout))(q, *kv4),
      jax.jit(lambda *a: fnn.dot_product_attention(*a, **dropout))(q, *kv4),
      rtol=1e-5, atol=1e-6)


def test_bad_input_names_the_argument():
  x = _normal(0, (1, 4, 2, 8))
  with pytest.raises(ValueError, match="implementation"):
    jet_nn.dot_product_attention(x, x, x, implementation="triton")
  with pytest.raises(ValueError, match="dot_product_attention"):
    jet_nn.attention(x, x, x, num_heads=2)
