"""cdat_fast.estimators.secant: the secant curvature and its fallback."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from cdat_fast.estimators import secant_curvature
from problems import random_quadratic, step_fn

INF = float("inf")


def test_secant_formula_is_exact_on_a_quadratic():
  f, a, w_star = random_quadratic(1)
  rng = np.random.RandomState(0)
  w0, u = rng.randn(5), rng.randn(5)
  eta = 0.3
  w1 = w0 + eta * u
  g0 = a @ (w0 - w_star)
  kappa, ok = secant_curvature(
      f(jnp.asarray(w1, jnp.float32)), f(jnp.asarray(w0, jnp.float32)),
      jnp.float32(eta), jnp.float32(g0 @ u), jnp.float32(u @ u))
  assert bool(ok)
  np.testing.assert_allclose(kappa, u @ a @ u / (u @ u), rtol=1e-3)
  _, ok = secant_curvature(1.0, 1.0, 0.0, -1.0, 1.0)  # zero step
  assert not bool(ok)


def test_secant_estimates_the_previous_directions_curvature():
  f, a, w_star = random_quadratic(2)
  opt = cdat_fast.cdat(optax.sgd(1.0), scale=0.5,
                       curvature=cdat_fast.estimators.secant(ema=0.0))
  step, _ = step_fn(opt, f, value_fn=f)
  w = jnp.asarray(np.random.RandomState(1).randn(5), jnp.float32)
  state = opt.init(w)
  for t in range(4):
    g = np.asarray(jax.grad(f)(w), np.float64)
    w, state = step(w, state)
    kappa = float(optax.tree.get(state, "curvature"))
    if t == 0:  # the first step measures the exact curvature
      assert int(optax.tree.get(state, "num_refreshes")) == 1
    else:  # κ along u_{t-1}, from f(w_t) - f(w_{t-1})
      np.testing.assert_allclose(kappa, g_prev @ a @ g_prev / (g_prev @ g_prev),
                                 rtol=2e-3)
    g_prev = g
  assert int(optax.tree.get(state, "num_refreshes")) == 1


@pytest.mark.parametrize("dim", [1, 4])
def test_secant_equals_exact_on_an_isotropic_quadratic(dim):
  f = lambda w: 1.5 * jnp.sum((w - 0.5) ** 2)  # curvature 3 along any u
  w0 = jnp.linspace(-1.0, 2.0, dim)
  exact = cdat_fast.cdat(optax.sgd(1.0, momentum=0.5), scale=0.5)
  secant = cdat_fast.cdat(optax.sgd(1.0, momentum=0.5), scale=0.5,
                          curvature="secant")
  es, ss = exact.init(w0), secant.init(w0)
  we = ws = w0
  for _ in range(6):
    ue, es = exact.update(jax.grad(f)(we), es, we, value_fn=f)
    us, ss = secant.update(jax.grad(f)(ws), ss, ws, value_fn=f, value=f(ws))
    np.testing.assert_allclose(optax.tree.get(ss, "learning_rate"),
                               optax.tree.get(es, "learning_rate"), rtol=1e-3)
    we, ws = optax.apply_updates(we, ue), optax.apply_updates(ws, us)
  assert int(optax.tree.get(ss, "num_refreshes")) == 1


def test_secant_falls_back_to_exact_after_a_skipped_step():
  f, _, _ = random_quadratic(0)
  opt = cdat_fast.cdat(optax.sgd(1.0), scale=0.5, curvature="secant")
  w = jnp.ones(5)
  state = opt.init(w)
  g = jax.grad(f)(w)
  _, state = opt.update(g, state, w, value_fn=f)
  _, state = opt.update(g.at[0].set(jnp.nan), state, w, value_fn=f)
  assert int(optax.tree.get(state, "num_skipped")) == 1
  before = int(optax.tree.get(state, "num_refreshes"))
  _, state = opt.update(g, state, w, value_fn=f)  # η_{t-1} = 0: no secant
  assert int(optax.tree.get(state, "num_refreshes")) == before + 1
  assert float(optax.tree.get(state, "learning_rate")) > 0


def test_secant_every_must_be_one():
  with pytest.raises(ValueError, match="every"):
    cdat_fast.cdat(optax.sgd(1.0), curvature="secant", every=5)
