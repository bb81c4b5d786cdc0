"""Small objectives shared by the tests, and a jitted training step.

Random quadratics, a tiny tanh MLP, a tiny net split into model and loss, a
ReLU MLP on the digits, explicit Hessians.
"""
from __future__ import annotations

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import optax


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


def jit_hessian(fn, params) -> np.ndarray:
  """Dense Hessian of ``fn`` at ``params`` (flattened, jitted), float64."""
  vec, unravel = jax.flatten_util.ravel_pytree(params)
  return np.asarray(jax.jit(jax.hessian(lambda v: fn(unravel(v))))(vec),
                    np.float64)


def step_fn(opt, loss, **update_kwargs):
  """A jitted step that passes value= and grad (as the training loop does)."""
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    value, grads = jax.value_and_grad(loss)(params)
    updates, state = opt.update(grads, state, params, value=value,
                                **update_kwargs)
    return optax.apply_updates(params, updates), state

  return step, traces


def tiny_net(seed=0, n=6, loss="squared"):
  """model(params, x) -> logits, a loss on logits, and data."""
  rng = np.random.RandomState(seed)
  params = {
      "w0": jnp.asarray(rng.randn(3, 4) / np.sqrt(3), jnp.float32),
      "b0": jnp.asarray(0.1 * rng.randn(4), jnp.float32),
      "w1": jnp.asarray(rng.randn(4, 3) / 2.0, jnp.float32),
  }
  x = jnp.asarray(rng.randn(n, 3), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 3, size=n))

  def model_fn(p, x=x):
    return jnp.tanh(x @ p["w0"] + p["b0"]) @ p["w1"]

  if loss == "squared":
    def loss_fn(z, labels=labels):
      return 0.5 * jnp.mean(jnp.sum((z - jax.nn.one_hot(labels, 3)) ** 2, -1))
  else:
    def loss_fn(z, labels=labels):
      return jnp.mean(
          optax.softmax_cross_entropy_with_integer_labels(z, labels))
  return params, model_fn, loss_fn, (x, labels)


def digits_mlp(n=256, width=32):
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  x = jnp.asarray(digits.data[:n] / 16.0, jnp.float32)
  y = jax.nn.one_hot(digits.target[:n], 10)

  def init(key):
    k0, k1 = jax.random.split(key)
    return {"w0": jax.random.normal(k0, (64, width)) / 8.0,
            "b0": jnp.zeros(width),
            "w1": jax.random.normal(k1, (width, 10)) / np.sqrt(width),
            "b1": jnp.zeros(10)}

  def loss(p):
    h = jax.nn.relu(x @ p["w0"] + p["b0"])
    return 0.5 * jnp.mean(jnp.sum((h @ p["w1"] + p["b1"] - y) ** 2, -1))

  return init, loss


def final_losses(opt, init, loss, seeds, steps):
  """Mean of the last 50 full-batch losses, one run per seed (vmapped)."""
  def run(params):
    def body(carry, _):
      p, s = carry
      value, g = jax.value_and_grad(loss)(p)
      u, s = opt.update(g, s, p, value_fn=loss, value=value)
      return (optax.apply_updates(p, u), s), value
    _, values = jax.lax.scan(body, (params, opt.init(params)), None,
                             length=steps)
    return jnp.mean(values[-50:])
  params = jax.vmap(init)(jax.random.split(jax.random.key(0), seeds))
  return np.asarray(jax.jit(jax.vmap(run))(params), np.float64)
