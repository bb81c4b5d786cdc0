"""Exact-sharpness rule: η = σ / λ_max."""
import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdat_fast
from problems import explicit_hessian, flat, random_quadratic, tiny_mlp


def test_sharpness_rule_on_quadratic():
  f, a, _ = random_quadratic(1)
  opt = cdat_fast.sharpness_rule(optax.sgd(1.0), scale=3.0, num_iters=200,
                                 rtol=1e-7)
  w = jnp.ones(5)
  u, state = opt.update(jax.grad(f)(w), opt.init(w), w, value_fn=f)
  lam = np.linalg.eigvalsh(a).max()
  np.testing.assert_allclose(optax.tree.get(state, "sharpness"), lam, rtol=1e-3)
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), 3.0 / lam,
                             rtol=1e-3)


def test_preconditioned_sharpness_rule_uses_base_state():
  loss, params, _ = tiny_mlp(seed=4)
  base = optax.rmsprop(1.0)
  opt = cdat_fast.sharpness_rule(base, preconditioned=True, method="lanczos",
                                 num_iters=40)
  g = jax.grad(loss)(params)
  _, state = opt.update(g, opt.init(params), params, value_fn=loss)
  _, base_state = base.update(g, base.init(params), params)
  d = 1.0 / np.sqrt(flat(jax.tree.map(lambda n: np.sqrt(n) + 1e-8,
                                      optax.tree.get(base_state, "nu"))))
  h = explicit_hessian(loss, params)
  eigs = np.linalg.eigvalsh(d[:, None] * h * d[None, :])
  top = eigs[np.argmax(np.abs(eigs))]
  np.testing.assert_allclose(optax.tree.get(state, "sharpness"), top, rtol=5e-3)
