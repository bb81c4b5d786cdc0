"""Small objectives shared by the tests: random quadratics and a tiny MLP."""
from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np


def random_quadratic(seed: int, dim: int = 5, *, indefinite: bool = False):
  """``f(w) = ½ (w - w*)ᵀ A (w - w*)`` with known ``A`` (float64 numpy) and ``w*``."""
  rng = np.random.RandomState(seed)
  q, _ = np.linalg.qr(rng.randn(dim, dim))
  eig = rng.uniform(0.5, 10.0, size=dim)
  if indefinite:
    eig[0] = -eig[0]
  a = (q * eig) @ q.T
  w_star = rng.randn(dim)
  a32, w32 = jnp.asarray(a, jnp.float32), jnp.asarray(w_star, jnp.float32)

  def f(w):
    r = w - w32
    return 0.5 * r @ (a32 @ r)

  return f, a, w_star


def tiny_mlp(seed: int = 0, sizes=(3, 4, 2), n: int = 6):
  """A tanh MLP with squared loss on random data, params as a dict pytree."""
  rng = np.random.RandomState(seed)
  params = {}
  for i, (m, k) in enumerate(zip(sizes[:-1], sizes[1:])):
    params[f"w{i}"] = jnp.asarray(rng.randn(m, k) / np.sqrt(m), jnp.float32)
    params[f"b{i}"] = jnp.asarray(0.1 * rng.randn(k), jnp.float32)
  x = jnp.asarray(rng.randn(n, sizes[0]), jnp.float32)
  y = jnp.asarray(rng.randn(n, sizes[-1]), jnp.float32)
  depth = len(sizes) - 1

  def loss(p, batch=None):
    xb, yb = (x, y) if batch is None else batch
    h = xb
    for i in range(depth):
      h = h @ p[f"w{i}"] + p[f"b{i}"]
      if i < depth - 1:
        h = jnp.tanh(h)
    return 0.5 * jnp.mean(jnp.sum((h - yb) ** 2, axis=-1))

  return loss, params, (x, y)


def explicit_hessian(fn, params) -> np.ndarray:
  """The dense Hessian of ``fn`` at ``params`` (flattened), as float64 numpy."""
  flat, unravel = jax.flatten_util.ravel_pytree(params)
  h = jax.hessian(lambda v: fn(unravel(v)))(flat)
  return np.asarray(h, np.float64)


def flat(tree) -> np.ndarray:
  return np.asarray(jax.flatten_util.ravel_pytree(tree)[0], np.float64)
