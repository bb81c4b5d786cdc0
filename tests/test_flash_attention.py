"""kernels/flash_attention.py: the flash primitives against float64 numpy.

Each primitive (forward with the log-sum-exp, backward, tangent) is checked
against attention computed in float64 numpy and its derivatives by central
differences, in both layouts' awkward sizes (``T != S``, odd head counts),
causal and not; then the transformations JAX needs from them: the
transposes that make reverse mode the flash backward, the jvp rules
(forward over reverse), and vmap.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cdat_fast.kernels import flash_attention as flash

CASES = [((2, 5, 3, 4), 7, 4, False), ((1, 6, 2, 8), 6, 3, True),
         ((3, 4, 1, 2), 4, 2, True)]


def _inputs(shape, s, d_v, seed=0, dtype=np.float64):
  rng = np.random.default_rng(seed)
  b, t, h, d = shape
  return (rng.normal(size=(b, t, h, d)).astype(dtype),
          rng.normal(size=(b, s, h, d)).astype(dtype),
          rng.normal(size=(b, s, h, d_v)).astype(dtype))


def _numpy_attention(q, k, v, causal, scale):
  s = scale * np.einsum("bthd,bshd->bhts", q, k)
  if causal:
    s = np.where(np.tril(np.ones(s.shape[-2:], bool)), s, -np.inf)
  m = s.max(-1, keepdims=True)
  lse = (m + np.log(np.exp(s - m).sum(-1, keepdims=True)))[..., 0]
  p = np.exp(s - lse[..., None])
  return np.einsum("bhts,bshd->bthd", p, v), lse


def _config(q, k, v, causal):
  return flash.make_config(q, k, v, scale=None, causal=causal,
                           implementation=None)


@pytest.mark.parametrize("shape,s,d_v,causal", CASES)
def test_forward_is_attention_and_its_log_sum_exp(shape, s, d_v, causal):
  q, k, v = _inputs(shape, s, d_v)
  with jax.enable_x64(True):
    config = _config(q, k, v, causal)
    o, lse = flash.flash_attention_forward(*map(jnp.asarray, (q, k, v)),
                                           config=config)
  o_np, lse_np = _numpy_attention(q, k, v, causal, config.scale)
  np.testing.assert_allclose(o, o_np, rtol=1e-10, atol=1e-12)
  np.testing.assert_allclose(lse, lse_np, rtol=1e-10)
  assert lse.shape == (shape[0], shape[2], shape[1])


def _numerical_vjp(q, k, v, do, causal, scale, eps=1e-6):
  """⟨ō, ∂o/∂x⟩ for every entry of q, k and v by central differences."""
  grads = []
  for i, x in enumerate((q, k, v)):
    g = np.zeros_like(x)
    for idx in np.ndindex(x.shape):
      args = [q, k, v]
      plus, minus = x.copy(), x.copy()
      plus[idx] += eps
      minus[idx] -= eps
      args[i] = plus
      f_plus = np.sum(_numpy_attention(*args, causal, scale)[0] * do)
      args[i] = minus
      f_minus = np.sum(_numpy_attention(*args, causal, scale)[0] * do)
      g[idx] = (f_plus - f_minus) / (2 * eps)
    grads.append(g)
  return grads


@pytest.mark.parametrize("shape,s,d_v,causal", CASES)
def test_backward_and_tangent_are_the_derivatives(shape, s, d_v, causal):
  q, k, v = _inputs(shape, s, d_v)
  do = np.random.default_rng(1).normal(size=q.shape[:3] + (d_v,))
  dq, dk, dv = _inputs(shape, s, d_v, seed=2)
  with jax.enable_x64(True):
    config = _config(q, k, v, causal)
    args = tuple(map(jnp.asarray, (q, k, v)))
    o, lse = flash.flash_attention_forward(*args, config=config)
    grads = flash.flash_attention_backward(*args, o, lse, jnp.asarray(do),
                                           config=config)
    tangent = flash.flash_attention_tangent(
        *args, o, lse, *map(jnp.asarray, (dq, dk, dv)), config=config)
  expected = _numerical_vjp(q, k, v, do, causal, config.scale)
  for got, want in zip(grads, expected):
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-8)
  # ⟨ō, ȯ⟩ = ⟨q̄, q̇⟩ + ⟨k̄, k̇⟩ + ⟨v̄, v̇⟩: the tangent is the backward's
  # transpose.
  lhs = np.sum(np.asarray(tangent) * do)
  rhs = sum(np.sum(g * t) for g, t in zip(expected, (dq, dk, dv)))
  np.testing.assert_allclose(lhs, rhs, rtol=1e-6)


def _attention(q, k, v, causal):
  config = _config(q, k, v, causal)

  @jax.custom_jvp
  def attention(q, k, v):
    return flash.flash_attention_forward(q, k, v, config=config)[0]

  @attention.defjvp
  def _(primals, tangents):
    o, lse = flash.flash_attention_forward(*primals, config=config)
    return o, flash.flash_attention_tangent(*primals, o, lse, *tangents,
                                            config=config)
  return attention


def _plain(q, k, v, causal):
  return flash.flash_attention_reference(q, k, v, causal=causal)


@pytest.mark.parametrize("causal", [False, True])
def test_reverse_mode_is_the_flash_backward_and_second_order_is_exact(causal):
  with jax.enable_x64(True):
    q, k, v = (jnp.asarray(a) for a in _inputs((2, 6, 2, 4), 6, 4, seed=3))
    f_flash = lambda *a: jnp.sum(jnp.sin(_attention(*a, causal)(*a)))
    f_plain = lambda *a: jnp.sum(jnp.sin(_plain(*a, causal)))
    argnums = (0, 1, 2)
    jaxpr = str(jax.make_jaxpr(jax.grad(f_flash, argnums))(q, k, v))
    assert "flash_attention_backward" in jaxpr
    assert "flash_attention_tangent" not in jaxpr
    for transform in (
        lambda f: jax.grad(f, argnums),
        lambda f: lambda *a: jax.jvp(f, a, (q, k, v))[1],
        # forward over reverse (a Hessian-vector product) and the reverse.
        lambda f: lambda *a: jax.jvp(jax.grad(f, argnums), a, (v, q, k))[1],
        lambda f: jax.grad(lambda *a: jax.jvp(f, a, (k, v, q))[1], argnums),
    ):
      got, want = transform(f_flash)(q, k, v), transform(f_plain)(q, k, v)
      for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(g, w, rtol=1e-9, atol=1e-11)


def test_vmap_batches_values_and_gradients():
  stacked = [jnp.asarray(np.stack([a, 2 * a, -a]), jnp.float32)
             for a in _inputs((2, 5, 2, 4), 5, 3)]
  f = lambda q, k, v: jnp.sum(_attention(q, k, v, True)(q, k, v) ** 2)
  value_and_grad = jax.value_and_grad(f, (0, 1, 2))
  batched = jax.vmap(value_and_grad)(*stacked)
  for i in range(3):
    single = value_and_grad(*(a[i] for a in stacked))
    for b, s in zip(jax.tree.leaves(batched), jax.tree.leaves(single)):
      np.testing.assert_allclose(b[i], s, rtol=1e-5, atol=1e-6)


def test_bad_input_names_the_argument():
  q, k, v = _inputs((1, 4, 2, 4), 4, 4, dtype=np.float32)
  with pytest.raises(ValueError, match="implementation"):
    flash.make_config(q, k, v, scale=None, causal=False,
                      implementation="cudnn9")
  with pytest.raises(ValueError, match="key"):
    flash.make_config(q, k[:, :, :1], v, scale=None, causal=False,
                      implementation=None)
  with pytest.raises(ValueError, match="causal"):
    flash.make_config(q, k[:, :3], v[:, :3], scale=None, causal=True,
                      implementation=None)
