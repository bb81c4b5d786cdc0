"""The bench-only parabolic estimators (``bench/parabolic.py``) on closed forms.

The script is loaded by path: bench is not a package.
"""
import importlib.util
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

import cdat_fast
from cdat_fast.estimators import interface

_SCRIPT = pathlib.Path(__file__).resolve().parents[1] / "bench" / "parabolic.py"
_SPEC = importlib.util.spec_from_file_location("bench_parabolic", _SCRIPT)
parabolic = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(parabolic)

A = jnp.array([4.0, 1.0, 0.25])
W = jnp.array([1.0, -2.0, 3.0])


def f(w):
  """A quadratic: every parabola through it is exact."""
  return 0.5 * jnp.sum(A * w * w) + jnp.sum(w)


def _estimate(estimator, state, w, learning_rate):
  g = jax.grad(f)(w)
  u = -g
  objective = interface.Objective("test", value_fn=f)
  return estimator.update(state, w, u, objective, slope=jnp.vdot(g, u),
                          value=f(w), learning_rate=learning_rate), u


def test_gen_measures_the_quadratic_and_smooths_its_rate():
  est = parabolic.gen(every=4)
  # The first fit, at a short pilot step (float32 rounding: 0.2%).
  (estimate, state), u = _estimate(est, est.init(W), W, jnp.float32(0.0))
  np.testing.assert_allclose(estimate.curvature, jnp.sum(A * u * u),
                             rtol=1e-2)
  assert int(state.num_refreshes) == 1
  # Between refits the rate is held; the next refit (at step 4, exact on a
  # quadratic) moves it by 10% towards the fitted −gᵀu/uᵀAu.
  held, fit = float(state.rate), float(jnp.vdot(u, u) / jnp.sum(A * u * u))
  for _ in range(4):
    (estimate, state), _ = _estimate(est, state, W, jnp.float32(0.3))
  np.testing.assert_allclose(float(state.rate), 0.9 * held + 0.1 * fit,
                             rtol=1e-4)
  assert int(state.num_refreshes) == 2


def test_gen_rejects_a_concave_fit():
  est = parabolic.gen(every=1)
  state = est.init(W)._replace(rate=jnp.float32(0.5))
  g = jax.grad(f)(W)
  neg = interface.Objective("test", value_fn=lambda w: -f(w))
  estimate, state = est.update(state, W, -g, neg, slope=jnp.vdot(g, -g),
                               value=-f(W), learning_rate=jnp.float32(0.1))
  assert float(state.rate) == 0.5


def test_pal_measures_the_quadratic_within_its_step_bound():
  est = parabolic.pal(measure=0.1, max_step=100.0, scale=2.0)
  (estimate, _), u = _estimate(est, (), W, None)
  np.testing.assert_allclose(estimate.curvature, jnp.sum(A * u * u),
                             rtol=1e-3)
  # A short max_step caps CDAT's step length η‖u‖ at max_step.
  est = parabolic.pal(measure=0.1, max_step=0.01, scale=2.0)
  (estimate, _), u = _estimate(est, (), W, None)
  eta = 2.0 * jnp.sum(u * u) / estimate.curvature
  np.testing.assert_allclose(eta * jnp.linalg.norm(u), 0.01, rtol=1e-4)


def test_both_train_inside_cdat():
  # σ = 1: a held GeN rate at σ = 2 may exceed 2/λ_max on a quadratic.
  for est in (parabolic.gen(), parabolic.pal(scale=1.0)):
    opt = cdat_fast.cdat(optax.sgd(1.0), scale=1.0, curvature=est)
    w, state = W, opt.init(W)
    for _ in range(20):
      v, g = jax.value_and_grad(f)(w)
      u, state = opt.update(g, state, w, value=v, value_fn=f)
      w = optax.apply_updates(w, u)
    assert f(w) < f(W)
