"""Tests for cdat_fast/nn.py: the jet layers against plain flax.linen models.

Same parameters, loss, gradient, jvp-of-jvp (the CDAT quadratic form uᵀHu) and
forward-over-reverse HVP; the fused kernels must actually be on the
jvp-of-jvp path, and the exact fallback must take over when the two
directions differ.
"""

import flax.linen as nn
import jax
from jax.flatten_util import ravel_pytree
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast import nn as jet_nn

RTOL, ATOL = 2e-5, 2e-5


class MLP(nn.Module):
  """Dense-relu-LayerNorm-Dense-gelu-Dense-tanh-Dense from one layer set."""
  jet: bool
  features: tuple[int, ...] = (13, 11, 7, 3)

  @nn.compact
  def __call__(self, x):
    lib = jet_nn if self.jet else nn
    dense, norm = lib.Dense, lib.LayerNorm
    x = lib.relu(dense(self.features[0])(x))
    x = norm()(x)
    x = lib.gelu(dense(self.features[1])(x))
    x = lib.tanh(dense(self.features[2], use_bias=False)(x))
    return dense(self.features[3])(x)


def _tree_allclose(a, b, rtol=RTOL, atol=ATOL):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=rtol,
                               atol=atol)


def _normal(seed, shape, scale=1.0):
  # numpy: no per-shape compilation of JAX's PRNG, which dominates small tests.
  rng = np.random.default_rng(seed)
  return jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)


def _perturb(tree, seed, scale=1.0):
  leaves, treedef = jax.tree.flatten(tree)
  return treedef.unflatten([
      _normal((seed, i), l.shape, scale).astype(l.dtype)
      for i, l in enumerate(leaves)])


def _shift(tree, seed, scale=1.0):
  """Moves parameters off their initial values (zero biases, unit scales)."""
  return jax.tree.map(lambda a, d: a + d, tree, _perturb(tree, seed, scale))


def _jvp_of_jvp(f, params, u, v):
  """(f, D f[u], D f[v], D² f[u, v]) by forward-over-forward."""
  (f0, du), (dv, duv) = jax.jvp(lambda p: jax.jvp(f, (p,), (u,)),
                                (params,), (v,))
  return f0, du, dv, duv


def _quad(f):
  """(p, u) -> jvp-of-jvp along u twice: the CDAT call, one ``u`` object.

  Passing the same direction as two arguments of a jitted function would give
  two distinct tracers, and the layers would (correctly) take the exact
  fallback instead of the fused kernels.
  """
  return lambda p, u: _jvp_of_jvp(f, p, u, u)


def _jit_quad(f, params, u):
  return jax.jit(_quad(f))(params, u)


def _jit_jvp_of_jvp(f, params, u, v):
  return jax.jit(lambda p, u, v: _jvp_of_jvp(f, p, u, v))(params, u, v)


def _pallas_calls(fn, *args):
  """Names of the pallas_call kernels in fn's jaxpr (nested ones included)."""
  names = []

  def walk(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        names.append(str(eqn.params.get("name")))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None),
                                             "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(fn)(*args))
  return names


@pytest.fixture(scope="module")
def mlp_problem():
  x = _normal(0, (2, 9, 5))
  target = _normal(1, (2, 9, 3))
  params = jax.jit(MLP(jet=False).init)(jax.random.key(2), x)
  # Move off the initial zeros/ones of biases and LayerNorm parameters.
  params = _shift(params, 3, 0.3)

  def loss(model):
    return lambda p: jnp.mean((model.apply(p, x) - target) ** 2)

  return dict(params=params, plain=loss(MLP(jet=False)),
              jet=loss(MLP(jet=True)), u=_perturb(params, 4),
              v=_perturb(params, 5))


def test_dense_matches_flax():
  """Two stacked Dense layers: the second sees dx ≠ 0, so ddy has 2·dx·dW."""
  x = _normal(10, (2, 7, 19))

  def model(lib):
    return nn.Sequential([lib.Dense(53), lib.Dense(5, use_bias=False)])

  params = jax.jit(model(nn).init)(jax.random.key(11), x)
  # Same initialisers, names and shapes: the parameter trees coincide.
  _tree_allclose(jax.jit(model(jet_nn).init)(jax.random.key(11), x), params,
                 0, 0)
  params = _shift(params, 12)
  u = _perturb(params, 13)
  # A linear read-out: the curvature is the layers' own 2·dx·dW term.
  c = _normal(14, (2, 7, 5))
  f_flax = lambda p: jnp.sum(c * model(nn).apply(p, x))
  f_jet = lambda p: jnp.sum(c * model(jet_nn).apply(p, x))
  np.testing.assert_allclose(model(jet_nn).apply(params, x),
                             model(nn).apply(params, x), rtol=0, atol=0)
  _tree_allclose(jax.grad(f_jet)(params), jax.grad(f_flax)(params),
                 rtol=1e-6, atol=1e-6)
  # Eagerly (no jit): the fused path must work outside jit too.
  np.testing.assert_allclose(_jvp_of_jvp(f_jet, params, u, u),
                             _jvp_of_jvp(f_flax, params, u, u), rtol=1e-4)
  assert _pallas_calls(_quad(f_jet), params, u) == ["dense_jet"] * 2


def test_layer_norm_matches_flax():
  x = 1.0 + 2.0 * _normal(20, (3, 4, 53))
  flax_norm, jet_norm = nn.LayerNorm(), jet_nn.LayerNorm()
  params = flax_norm.init(jax.random.key(21), x)
  _tree_allclose(jet_norm.init(jax.random.key(21), x), params, 0, 0)
  params = _shift(params, 22)
  u = _perturb(params, 23)
  w = _normal(24, x.shape)
  f_flax = lambda p: jnp.sum(w * jnp.tanh(flax_norm.apply(p, x)))
  f_jet = lambda p: jnp.sum(w * jnp.tanh(jet_norm.apply(p, x)))
  np.testing.assert_allclose(jet_norm.apply(params, x),
                             flax_norm.apply(params, x), rtol=1e-6,
                             atol=1e-6)
  _tree_allclose(jax.grad(f_jet)(params), jax.grad(f_flax)(params),
                 rtol=1e-5, atol=1e-5)
  assert _pallas_calls(_quad(f_jet), params, u) == ["layer_norm_jet"]
  np.testing.assert_allclose(_jvp_of_jvp(f_jet, params, u, u),
                             _jvp_of_jvp(f_flax, params, u, u), rtol=1e-4,
                             atol=1e-4)


def test_mlp_loss_and_gradient_match_flax(mlp_problem):
  p = mlp_problem["params"]
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(f))(p)
  (f_jet, g_jet), (f_plain, g_plain) = map(
      value_and_grad, (mlp_problem["jet"], mlp_problem["plain"]))
  np.testing.assert_allclose(f_jet, f_plain, rtol=1e-6)
  _tree_allclose(g_jet, g_plain, rtol=1e-5, atol=1e-6)


def test_mlp_jvp_of_jvp_matches_flax_and_is_fused(mlp_problem):
  p, u = mlp_problem["params"], mlp_problem["u"]
  jet = _jit_quad(mlp_problem["jet"], p, u)
  plain = _jit_quad(mlp_problem["plain"], p, u)
  np.testing.assert_allclose(jet, plain, rtol=1e-4, atol=1e-6)
  assert abs(float(plain[3])) > 1e-3  # A non-trivial curvature to compare.
  # Every layer's second-order pass ran its fused kernel.
  names = _pallas_calls(_quad(mlp_problem["jet"]), p, u)
  assert sorted(names) == sorted(
      ["dense_jet"] * 4 + ["layer_norm_jet", "activation_jet_relu",
                           "activation_jet_gelu", "activation_jet_tanh"])


def test_first_layer_passes_its_zero_second_order_tangent_symbolically(
    mlp_problem):
  # The input has no tangent, so the first Dense layer's ddy (ddx W + 2 dx dW)
  # is zero: the relu after it gets no ddx operand (a materialised zero
  # array would be temporary memory of the activations' size), yet the
  # result is the exact one (test above). The second activation gets one.
  p, u = mlp_problem["params"], mlp_problem["u"]
  operands = {}

  def walk(jaxpr):
    jaxpr = getattr(jaxpr, "jaxpr", jaxpr)
    for eqn in jaxpr.eqns:
      if eqn.primitive.name == "pallas_call":
        operands.setdefault(str(eqn.params.get("name")), len(eqn.invars))
      for param in eqn.params.values():
        for sub in param if isinstance(param, (tuple, list)) else (param,):
          if hasattr(sub, "eqns") or hasattr(getattr(sub, "jaxpr", None),
                                             "eqns"):
            walk(sub)

  walk(jax.make_jaxpr(_quad(mlp_problem["jet"]))(p, u))
  assert operands["activation_jet_relu"] == 2  # x, dx
  assert operands["activation_jet_gelu"] == 3  # x, dx, ddx


def test_mlp_different_directions_take_exact_fallback(mlp_problem):
  p, u, v = mlp_problem["params"], mlp_problem["u"], mlp_problem["v"]
  jet = _jit_jvp_of_jvp(mlp_problem["jet"], p, u, v)
  plain = _jit_jvp_of_jvp(mlp_problem["plain"], p, u, v)
  np.testing.assert_allclose(jet, plain, rtol=1e-4, atol=1e-6)
  assert not _pallas_calls(
      lambda p, u, v: _jvp_of_jvp(mlp_problem["jet"], p, u, v), p, u, v)


def test_mlp_hvp_and_reverse_over_forward_match_flax(mlp_problem):
  p, u = mlp_problem["params"], mlp_problem["u"]
  f_jet, f_plain = mlp_problem["jet"], mlp_problem["plain"]
  # Forward-over-reverse Hessian-vector product.
  hvp = lambda f: jax.jit(lambda p, u: jax.jvp(jax.grad(f), (p,), (u,))[1])
  _tree_allclose(hvp(f_jet)(p, u), hvp(f_plain)(p, u), rtol=1e-4, atol=1e-5)
  # Reverse-over-forward: the gradient of the directional derivative.
  dir_grad = lambda f: jax.jit(
      jax.grad(lambda q, u: jax.jvp(f, (q,), (u,))[1]))
  _tree_allclose(dir_grad(f_jet)(p, u), dir_grad(f_plain)(p, u), rtol=1e-4,
                 atol=1e-5)


def test_mixed_precision_mlp_is_fused():
  """bf16 compute on float32 parameters: casts inside the op keep fusion."""
  x = _normal(50, (16, 24))

  def model(lib, dtype=jnp.bfloat16):
    return nn.Sequential([lib.Dense(32, dtype=dtype), lib.silu,
                          lib.Dense(8, dtype=dtype)])

  params = jax.jit(model(nn).init)(jax.random.key(51), x)
  u = _perturb(params, 52)
  f = lambda lib, dtype=jnp.bfloat16: lambda p: jnp.mean(
      jnp.square(model(lib, dtype).apply(p, x).astype(jnp.float32)))
  assert sorted(_pallas_calls(_quad(f(jet_nn)), params, u)) == [
      "activation_jet_silu", "dense_jet", "dense_jet"]
  # Both bf16 runs (fused kernels, flax) sit within bf16 error of float32.
  exact = _jit_quad(f(nn, jnp.float32), params, u)
  np.testing.assert_allclose(_jit_quad(f(jet_nn), params, u), exact,
                             rtol=5e-2)
  np.testing.assert_allclose(_jit_quad(f(nn), params, u), exact, rtol=5e-2)
  _tree_allclose(jax.jit(jax.grad(f(jet_nn)))(params),
                 jax.jit(jax.grad(f(nn)))(params), rtol=1e-6, atol=1e-6)


def test_unfused_layers_match_fused():
  """``fused=False`` keeps the plain XLA path and the same numbers."""
  x = _normal(30, (4, 5))
  model = lambda fused: nn.Sequential([
      jet_nn.Dense(6, fused=fused), jet_nn.jet_activation("silu", fused),
      jet_nn.LayerNorm(fused=fused), jet_nn.Dense(2, fused=fused)])
  params = jax.jit(model(True).init)(jax.random.key(31), x)
  u = _perturb(params, 32)
  f = lambda fused: lambda q: jnp.sum(model(fused).apply(q, x) ** 2)
  assert not _pallas_calls(_quad(f(False)), params, u)
  assert len(_pallas_calls(_quad(f(True)), params, u)) == 4
  np.testing.assert_allclose(_jit_quad(f(True), params, u),
                             _jit_quad(f(False), params, u),
                             rtol=1e-4, atol=1e-6)


def test_quadratic_form_matches_explicit_hessian():
  """uᵀHu by jvp-of-jvp equals uᵀ (∇²f) u with the dense Hessian."""
  x = _normal(40, (6, 3))
  target = _normal(41, (6, 2))

  def model(lib):
    return nn.Sequential([lib.Dense(4), lib.tanh, lib.LayerNorm(),
                          lib.Dense(2)])

  params = jax.jit(model(nn).init)(jax.random.key(42), x)
  params = _shift(params, 43, 0.3)
  flat, unravel = ravel_pytree(params)
  u_flat = _normal(44, flat.shape)
  f_plain = lambda w: jnp.mean((model(nn).apply(unravel(w), x) - target) ** 2)
  f_jet = lambda p: jnp.mean((model(jet_nn).apply(p, x) - target) ** 2)
  hessian = jax.jit(jax.hessian(f_plain))(flat)
  expected = u_flat @ hessian @ u_flat
  u = unravel(u_flat)
  assert len(_pallas_calls(_quad(f_jet), params, u)) == 4
  _, _, _, quad = _jit_quad(f_jet, params, u)
  np.testing.assert_allclose(quad, expected, rtol=1e-4)


def test_jet_activation_rejects_unknown_name():
  with pytest.raises(ValueError, match="name"):
    jet_nn.jet_activation("softplus")


class AttentionBlock(nn.Module):
  """Pre-LN causal self-attention: LayerNorm, q/k/v Dense, attention, Dense."""
  jet: bool
  num_heads: int = 2

  @nn.compact
  def __call__(self, x):
    y = jet_nn.LayerNorm(fused=self.jet)(x)
    q, k, v = (jet_nn.Dense(f, fused=self.jet, name=n)(y)
               for f, n in ((6, "query"), (6, "key"), (4, "value")))
    o = jet_nn.attention(q, k, v, num_heads=self.num_heads, causal=True,
                         fused=self.jet)
    return jet_nn.Dense(x.shape[-1], fused=self.jet, name="out")(o)


@pytest.fixture(scope="module")
def attention_problem():
  x = _normal(20, (2, 7, 5))
  target = _normal(21, (2, 7, 5))
  params = jax.jit(AttentionBlock(jet=False).init)(jax.random.key(22), x)
  params = _shift(params, 23, 0.3)

  def loss(model):
    return lambda p: jnp.mean((model.apply(p, x) - target) ** 2)

  return dict(params=params, plain=loss(AttentionBlock(jet=False)),
              jet=loss(AttentionBlock(jet=True)), u=_perturb(params, 24),
              x=x)


def test_attention_matches_flax_dot_product_attention():
  q, k, v = _normal(30, (2, 7, 6)), _normal(31, (2, 7, 6)), _normal(
      32, (2, 7, 4))
  split = lambda a: a.reshape(2, 7, 2, -1)
  mask = nn.make_causal_mask(jnp.zeros((2, 7)))
  expected = nn.dot_product_attention(split(q), split(k), split(v),
                                      mask=mask).reshape(2, 7, 4)
  out = jet_nn.attention(q, k, v, num_heads=2, causal=True)
  np.testing.assert_allclose(out, expected, rtol=1e-6, atol=1e-6)


def test_attention_block_jvp_of_jvp_is_fused_and_exact(attention_problem):
  p, u = attention_problem["params"], attention_problem["u"]
  value_and_grad = lambda f: jax.jit(jax.value_and_grad(f))(p)
  (f_jet, g_jet), (f_plain, g_plain) = map(
      value_and_grad, (attention_problem["jet"], attention_problem["plain"]))
  np.testing.assert_allclose(f_jet, f_plain, rtol=1e-6)
  _tree_allclose(g_jet, g_plain, rtol=1e-5, atol=1e-6)
  jet = _jit_quad(attention_problem["jet"], p, u)
  plain = _jit_quad(attention_problem["plain"], p, u)
  np.testing.assert_allclose(jet, plain, rtol=1e-4, atol=1e-6)
  assert abs(float(plain[3])) > 1e-3
  names = _pallas_calls(_quad(attention_problem["jet"]), p, u)
  assert sorted(names) == sorted(["layer_norm_jet", "attention_jet"] +
                                 ["dense_jet"] * 4)


def test_attention_quadratic_form_matches_explicit_hessian(attention_problem):
  """uᵀHu of the fused block against the dense Hessian of the flat params."""
  p, u = attention_problem["params"], attention_problem["u"]
  flat, unravel = ravel_pytree(p)
  hess = jax.jit(jax.hessian(lambda w: attention_problem["plain"](
      unravel(w))))(flat)
  u_flat = ravel_pytree(u)[0]
  expected = float(u_flat @ hess @ u_flat)
  got = float(_jit_quad(attention_problem["jet"], p, u)[3])
  np.testing.assert_allclose(got, expected, rtol=1e-3)


def test_attention_rejects_bad_heads():
  q = _normal(33, (1, 4, 6))
  with pytest.raises(ValueError, match="num_heads"):
    jet_nn.attention(q, q, q, num_heads=0)
  with pytest.raises(ValueError, match="not divisible by num_heads=4"):
    jet_nn.attention(q, q, q, num_heads=4)
  with pytest.raises(ValueError, match="causal needs as many keys"):
    jet_nn.attention(q, q[:, :3], q[:, :3], num_heads=2, causal=True)


class ResidualBlock(nn.Module):
  """x + attention(LN x), then + MLP(LN ·): the chain crosses two residuals."""
  jet: bool

  @nn.compact
  def __call__(self, x):
    add = jet_nn.add if self.jet else (lambda a, b: a + b)
    y = jet_nn.LayerNorm(fused=self.jet)(x)
    q, k, v = (jet_nn.Dense(6, fused=self.jet)(y) for _ in range(3))
    y = jet_nn.attention(q, k, v, num_heads=2, causal=True, fused=self.jet)
    x = add(x, jet_nn.Dense(x.shape[-1], fused=self.jet)(y))
    y = jet_nn.LayerNorm(fused=self.jet)(x)
    y = jet_nn.relu(jet_nn.Dense(8, fused=self.jet)(y))
    x = add(x, jet_nn.Dense(x.shape[-1], fused=self.jet)(y))
    return jet_nn.LayerNorm(fused=self.jet)(x)


def test_residual_add_keeps_the_chain_fused():
  x = _normal(40, (2, 5, 4))
  params = _shift(jax.jit(ResidualBlock(jet=False).init)(jax.random.key(41),
                                                          x), 42, 0.3)
  u = _perturb(params, 43)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply(p, x)))
  jet, plain = loss(ResidualBlock(jet=True)), loss(ResidualBlock(jet=False))
  np.testing.assert_allclose(_jit_quad(jet, params, u),
                             _jit_quad(plain, params, u), rtol=1e-4,
                             atol=1e-5)
  _tree_allclose(jax.jit(jax.grad(jet))(params),
                 jax.jit(jax.grad(plain))(params), rtol=1e-5, atol=1e-6)
  names = _pallas_calls(_quad(jet), params, u)
  # Every layer, the ones after each residual included, ran its kernel.
  assert sorted(names) == sorted(
      ["layer_norm_jet"] * 3 + ["dense_jet"] * 6 + ["attention_jet",
                                                    "activation_jet_relu"])


def test_add_matches_plus_under_every_transform():
  x, y = _normal(44, (3, 4)), _normal(45, (3, 4))
  f = lambda a, b: jnp.sum(jnp.tanh(jet_nn.add(a, b)) ** 2)
  g = lambda a, b: jnp.sum(jnp.tanh(a + b) ** 2)
  for transform in (jax.grad, lambda h: jax.hessian(h, argnums=(0, 1))):
    _tree_allclose(transform(f)(x, y), transform(g)(x, y))


def test_embed_matches_flax_and_keeps_the_chain_fused():
  tokens = jnp.asarray([[0, 3, 1], [2, 2, 4]])
  flax_embed, jet_embed = nn.Embed(5, 4), jet_nn.Embed(5, 4)
  params = jax.jit(flax_embed.init)(jax.random.key(50), tokens)
  _tree_allclose(jet_embed.init(jax.random.key(50), tokens), params, 0, 0)
  np.testing.assert_array_equal(jet_embed.apply(params, tokens),
                                flax_embed.apply(params, tokens))
  u = _perturb(params, 51)

  def loss(embed, norm):
    return lambda p: jnp.sum(jnp.sin(norm.apply(
        p["n"], embed.apply(p["e"], tokens))))

  norm_params = _shift(jet_nn.LayerNorm().init(jax.random.key(52),
                                               jnp.ones((4,))), 53, 0.3)
  p = {"e": params, "n": norm_params}
  u = {"e": u, "n": _perturb(norm_params, 54)}
  jet = loss(jet_embed, jet_nn.LayerNorm())
  np.testing.assert_allclose(_jit_quad(jet, p, u),
                             _jit_quad(loss(flax_embed, nn.LayerNorm()), p, u),
                             rtol=1e-5, atol=1e-6)
  # The layer norm after the lookup ran its kernel (after flax's Embed it
  # would take the exact fallback: distinct inner and outer tangents).
  assert _pallas_calls(_quad(jet), p, u) == ["layer_norm_jet"]
  assert not _pallas_calls(_quad(loss(flax_embed, jet_nn.LayerNorm())), p, u)
  _tree_allclose(jax.grad(jet)(p),
                 jax.grad(loss(flax_embed, nn.LayerNorm()))(p))
  with pytest.raises(ValueError, match="Embed: inputs must be integers"):
    jet_embed.apply(params, jnp.ones((2, 3)))


def test_multi_head_attention_matches_flax():
  """Same tree and initial values as flax's module, same values, jet exact."""
  xq, xkv = _normal(55, (2, 5, 6)), _normal(56, (2, 7, 3))
  kw = dict(num_heads=2, qkv_features=8, out_features=4)
  flax_mha = nn.MultiHeadDotProductAttention(**kw)
  jet_mha = jet_nn.MultiHeadAttention(**kw)
  params = flax_mha.init(jax.random.key(57), xq, xkv)
  _tree_allclose(jet_mha.init(jax.random.key(57), xq, xkv), params, 0, 0)
  params = _shift(params, 58, 0.3)
  np.testing.assert_allclose(jet_mha.apply(params, xq, xkv),
                             flax_mha.apply(params, xq, xkv), rtol=1e-5,
                             atol=1e-6)
  # Causal self-attention against flax's with make_causal_mask.
  mask = nn.make_causal_mask(jnp.ones(xq.shape[:2]))
  causal = jet_nn.MultiHeadAttention(causal=True, **kw)
  self_params = _shift(flax_mha.init(jax.random.key(59), xq), 60, 0.3)
  plain = lambda p: jnp.sum(jnp.tanh(flax_mha.apply(p, xq, xq, mask=mask)))
  jet = lambda p: jnp.sum(jnp.tanh(causal.apply(p, xq)))
  u = _perturb(self_params, 61)
  np.testing.assert_allclose(_jit_quad(jet, self_params, u),
                             _jit_quad(plain, self_params, u), rtol=1e-4,
                             atol=1e-5)
  assert sorted(_pallas_calls(_quad(jet), self_params, u)) == (
      ["attention_jet"] + ["dense_jet"] * 4)
  with pytest.raises(ValueError, match="qkv_features=7 must be divisible"):
    jet_nn.MultiHeadAttention(num_heads=2, qkv_features=7).init(
        jax.random.key(0), xq)



_FUSED_MODELS = {
    # name: (constructor kwargs, input maker, pallas_call names expected)
    "nanolm": (dict(vocab_size=11, num_layers=1, num_heads=2, head_size=8,
                    embed_size=8, block_size=8),
               lambda rng: jnp.asarray(rng.integers(0, 11, (2, 6))),
               # 4 projections + 2 MLP layers + head; ln_1, ln_2, ln_f
               ["dense_jet"] * 7 + ["layer_norm_jet"] * 3 +
               ["attention_jet", "activation_jet_relu"]),
    "vit": (dict(num_outputs=3, patch_size=4, hidden_dim=8, num_layers=1,
                 num_heads=2, mlp_dim=16),
            lambda rng: jnp.asarray(rng.standard_normal((2, 9, 9, 2)),
                                    jnp.float32),  # 9x9: VALID crops to 8x8
            # stem + 4 projections + 2 MLP layers + head
            ["dense_jet"] * 8 + ["layer_norm_jet"] * 3 +
            ["attention_jet", "activation_jet_gelu"]),
    "mixer": (dict(num_outputs=3, patch_size=4, hidden_dim=8, num_blocks=1,
                   tokens_mlp_dim=6, channels_mlp_dim=16),
              lambda rng: jnp.asarray(rng.standard_normal((2, 8, 12, 2)),
                                      jnp.float32),
              # stem + token MLP + channel MLP + head
              ["dense_jet"] * 6 + ["layer_norm_jet"] * 3 +
              ["activation_jet_gelu"] * 2),
}


@pytest.mark.parametrize("name", sorted(_FUSED_MODELS))
def test_fused_models_are_the_models_with_fused_cdat_curvature(name):
  """``fused=True``: same parameters from the same key, same value, gradient
  and CDAT quadratic form as the flax model, and every layer's jet runs its
  kernel: embeddings, stems, class tokens, transposes, slices and residual
  adds keep the chain."""
  from cdat_fast.harness import models  # pylint: disable=g-import-not-at-top
  kwargs, make_input, kernels_expected = _FUSED_MODELS[name]
  cls = models.get_model(name, 3).__class__
  rng = np.random.default_rng(0)
  x = make_input(rng)
  plain, fused = cls(**kwargs), cls(fused=True, **kwargs)
  params = models.init_params(plain, jax.random.key(0), x)
  np.testing.assert_array_equal(
      ravel_pytree(params)[0],
      ravel_pytree(models.init_params(fused, jax.random.key(0), x))[0])
  params = _shift(params, 1, 0.1)  # off the zero biases and unit scales
  u = _perturb(params, 2)
  loss = lambda m: lambda p: jnp.sum(jnp.sin(m.apply({"params": p}, x)))
  quad = lambda m: _quad(loss(m))
  _tree_allclose(jax.jit(quad(fused))(params, u),
                 jax.jit(quad(plain))(params, u), rtol=1e-5, atol=1e-5)
  # The stems differ in summation order (a matmul against a convolution).
  _tree_allclose(jax.jit(jax.grad(loss(fused)))(params),
                 jax.jit(jax.grad(loss(plain)))(params), rtol=1e-5,
                 atol=1e-5)
  assert sorted(_pallas_calls(quad(fused), params, u)) == sorted(
      kernels_expected)


def test_linear_matches_its_function_under_every_transform():
  x, y = _normal(70, (3, 4)), _normal(71, (4, 3))
  fn = lambda a, b: jnp.concatenate([a.T, 2.0 * b[:, :2]], axis=1)
  f = lambda a, b: jnp.sum(jnp.tanh(jet_nn.linear(fn)(a, b)) ** 2)
  g = lambda a, b: jnp.sum(jnp.tanh(fn(a, b)) ** 2)
  for transform in (jax.grad, lambda h: jax.hessian(h, argnums=(0, 1))):
    _tree_allclose(transform(f)(x, y), transform(g)(x, y))
  # The jet of a chain Dense -> linear -> Dense: both dense layers fused.
  net = nn.Sequential([jet_nn.Dense(5), jet_nn.linear(lambda a: a[:, ::-1]),
                       jet_nn.Dense(2)])
  params = _shift(net.init(jax.random.key(72), x), 73, 0.3)
  u = _perturb(params, 74)
  h = lambda p: jnp.sum(jnp.sin(net.apply(p, x)))
  plain = nn.Sequential([nn.Dense(5), lambda a: a[:, ::-1], nn.Dense(2)])
  np.testing.assert_allclose(
      _jit_quad(h, params, u),
      _jit_quad(lambda p: jnp.sum(jnp.sin(plain.apply(p, x))), params, u),
      rtol=1e-5, atol=1e-6)
  assert _pallas_calls(_quad(h), params, u) == ["dense_jet"] * 2
