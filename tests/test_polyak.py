"""Polyak step sizes against eq. 14 step by step."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from problems import flat, tiny_mlp


@pytest.mark.parametrize("f_min, eta_max", [(0.0, 1.0), (0.0, 100.0),
                                            (0.05, 100.0)])
def test_polyak_matches_formula(f_min, eta_max):
  loss, params, _ = tiny_mlp(seed=2)
  opt = cdat_fast.polyak(optax.sgd(1.0), f_min=f_min,
                         max_learning_rate=eta_max)
  state = opt.init(params)
  for _ in range(4):
    value, g = jax.value_and_grad(loss)(params)
    gf = flat(g)
    eta = min(max(float(value) - f_min, 0.0) / (gf @ gf), eta_max)
    updates, state = opt.update(g, state, params, value_fn=loss)
    np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), eta,
                               rtol=1e-5)
    np.testing.assert_allclose(flat(updates), -eta * gf, rtol=1e-5, atol=1e-8)
    params = optax.apply_updates(params, updates)


def test_polyak_uses_given_value_and_is_safe_at_stationary_points():
  opt = cdat_fast.polyak(optax.sgd(1.0), max_learning_rate=100.0)
  w = jnp.zeros(2)
  u, state = opt.update(jnp.zeros(2), opt.init(w), w, value=jnp.asarray(1.0))
  assert float(optax.tree.get(state, "learning_rate")) == 0.0
  assert np.all(np.isfinite(u))
  u, state = opt.update(jnp.ones(2), opt.init(w), w, value=jnp.asarray(3.0))
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), 1.5)


def test_polyak_bad_arguments():
  with pytest.raises(ValueError, match="max_learning_rate"):
    cdat_fast.polyak(optax.sgd(1.0), max_learning_rate=0.0)
