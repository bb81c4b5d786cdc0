"""cdat_fast.estimators.exact: the jvp of a jvp, against closed forms."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdat_fast import estimators
from cdat_fast.estimators.interface import Objective
from problems import explicit_hessian, flat, random_quadratic, tiny_mlp


def _estimate(est, fn, params, u, **kw):
  state = est.init(params)
  return est.update(state, params, u, Objective("test", value_fn=fn),
                    learning_rate=jnp.float32(0.0), **kw)


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_form_of_a_quadratic_is_exact(seed):
  f, a, w_star = random_quadratic(seed, indefinite=seed == 1)
  rng = np.random.RandomState(seed)
  w, u = rng.randn(5), rng.randn(5)
  est, state = _estimate(estimators.exact(), f, jnp.asarray(w, jnp.float32),
                         jnp.asarray(u, jnp.float32))
  assert state == optax.EmptyState()
  np.testing.assert_allclose(est.curvature, u @ a @ u, rtol=1e-4)  # signed
  np.testing.assert_allclose(est.slope, (a @ (w - w_star)) @ u, rtol=1e-4)
  np.testing.assert_allclose(est.value, f(jnp.asarray(w, jnp.float32)),
                             rtol=1e-6)


def test_tiny_net_against_the_explicit_hessian():
  loss, params, _ = tiny_mlp(seed=4)
  u = jax.tree.map(lambda t: -t, jax.grad(loss)(params))
  est, _ = _estimate(estimators.exact(), loss, params, u)
  uf = flat(u)
  np.testing.assert_allclose(est.curvature,
                             uf @ explicit_hessian(loss, params) @ uf,
                             rtol=1e-4)


def test_a_given_slope_is_passed_through():
  f, _, _ = random_quadratic(2)
  est, _ = _estimate(estimators.exact(), f, jnp.ones(5), jnp.ones(5),
                     slope=jnp.float32(-3.0))
  assert float(est.slope) == -3.0


def test_model_and_loss_compose_when_there_is_no_value_fn():
  f, a, _ = random_quadratic(3)
  obj = Objective("test", model_fn=lambda w: 2.0 * w,
                  loss_fn=lambda z: f(z / 2.0))
  u = jnp.arange(5.0)
  est, _ = estimators.exact().update(optax.EmptyState(), jnp.ones(5), u, obj,
                                     learning_rate=jnp.float32(0.0))
  np.testing.assert_allclose(est.curvature, np.arange(5.0) @ a @ np.arange(
      5.0), rtol=1e-4)
