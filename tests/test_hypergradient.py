"""Hypergradient descent against eq. 15 step by step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from problems import flat, tiny_mlp


@pytest.mark.parametrize("beta, base", [(0.1, "sgd"), (1.0, "momentum")])
def test_hypergradient_matches_formula(beta, base):
  loss, params, _ = tiny_mlp(seed=3)
  base_opt = (optax.sgd(1.0) if base == "sgd"
              else optax.sgd(1.0, momentum=0.9))
  opt = cdat_fast.hypergradient(base_opt, learning_rate=0.3, beta=beta)
  state = opt.init(params)
  ref_base_state = base_opt.init(params)
  eta, prev_u = 0.3, None
  for t in range(5):
    g = jax.grad(loss)(params)
    u, ref_base_state = base_opt.update(g, ref_base_state, params)
    gf, uf = flat(g), flat(u)
    if prev_u is not None:
      cos = (gf @ prev_u) / (np.linalg.norm(gf) * np.linalg.norm(prev_u))
      eta = eta * (1 - beta * cos)
    updates, state = opt.update(g, state, params)
    np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), eta,
                               rtol=1e-5)
    np.testing.assert_allclose(flat(updates), eta * uf, rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, updates)
    prev_u = uf
  assert eta != 0.3  # the rule moved η


def test_hypergradient_skips_non_finite_gradient_and_keeps_eta():
  opt = cdat_fast.hypergradient(optax.sgd(1.0), learning_rate=0.5, beta=0.1)
  w = jnp.ones(2)
  state = opt.init(w)
  _, state = opt.update(jnp.ones(2), state, w)
  u, state = opt.update(jnp.asarray([jnp.nan, 1.0]), state, w)
  assert np.all(u == 0)
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), 0.5)


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=0.0, beta=0.1), "learning_rate"),
    (dict(learning_rate=0.1, beta=1.5), "beta")])
def test_hypergradient_bad_arguments(kwargs, name):
  with pytest.raises(ValueError, match=name):
    cdat_fast.hypergradient(optax.sgd(1.0), **kwargs)
