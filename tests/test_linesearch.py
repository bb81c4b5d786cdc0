"""Backtracking line search: the criterion, the grid, the start and the failure policy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from problems import tiny_mlp


def _criterion(loss, params, u, g, eta, c, delta):
  lhs = float(loss(optax.tree.add_scale(params, eta, u)))
  return lhs <= (1 + delta) * float(loss(params)) + c * eta * float(
      optax.tree.vdot(g, u))


@pytest.mark.parametrize("c, delta, shrink", [
    (1e-4, 0.0, 0.8), (0.5, 0.0, 0.9), (0.0, 1e-3, 0.8)])
def test_accepted_step_meets_criterion_and_next_larger_does_not(c, delta,
                                                                 shrink):
  loss, params, _ = tiny_mlp(seed=0, sizes=(3, 8, 2))
  # Scale the loss so that a unit step is too long and the search backtracks.
  f = lambda p: 50.0 * loss(p)
  opt = cdat_fast.backtracking_linesearch(
      optax.sgd(1.0), c=c, relative_decrease=delta, decrease_factor=shrink)
  state = opt.init(params)
  for _ in range(3):
    g = jax.grad(f)(params)
    u = jax.tree.map(lambda x: -x, g)
    updates, state = opt.update(g, state, params, value_fn=f)
    eta = float(optax.tree.get(state, "learning_rate"))
    trials = int(optax.tree.get(state, "num_trials"))
    assert trials > 1 and 0 < eta < 1
    np.testing.assert_allclose(eta, shrink ** (trials - 1), rtol=1e-5)
    assert _criterion(f, params, u, g, eta, c, delta)
    assert not _criterion(f, params, u, g, eta / shrink, c, delta)
    params = optax.apply_updates(params, updates)


def test_finite_increase_factor_starts_from_previous_step():
  f = lambda w: 20.0 * jnp.sum(w ** 2)  # every step from 1 backtracks
  opt = cdat_fast.backtracking_linesearch(optax.sgd(1.0), increase_factor=4.0,
                                          decrease_factor=0.5)
  w = jnp.ones(3)
  state = opt.init(w)
  etas = []
  for _ in range(3):
    u, state = opt.update(jax.grad(f)(w), state, w, value_fn=f)
    etas.append(float(optax.tree.get(state, "learning_rate")))
    trials = int(optax.tree.get(state, "num_trials"))
    if len(etas) > 1:
      start = min(4 * etas[-2], 1.0)
      np.testing.assert_allclose(etas[-1], start * 0.5 ** (trials - 1),
                                 rtol=1e-6)
    w = optax.apply_updates(w, u)
  # Criterion f(w - ηg) ≤ f(w) - c η ‖g‖² holds iff η ≤ (1 - c)/20 here.
  assert all(e <= (1 - 1e-4) / 20 for e in etas)


def test_failure_takes_last_trial_and_counts():
  f = lambda w: jnp.sum(w ** 2)
  opt = cdat_fast.backtracking_linesearch(optax.sgd(-1.0), max_steps=3)
  w = jnp.ones(2)  # sgd(-1) is an ascent direction: never accepted
  u, state = opt.update(jax.grad(f)(w), opt.init(w), w, value_fn=f)
  assert int(optax.tree.get(state, "num_failed")) == 1
  assert int(optax.tree.get(state, "num_trials")) == 3
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), 0.8 ** 2)


def test_non_finite_value_takes_no_step():
  f = lambda w: jnp.sum(w ** 2) + jnp.where(w[0] > 0.5, jnp.nan, 0.0)
  opt = cdat_fast.backtracking_linesearch(optax.sgd(1.0), max_steps=2)
  w = jnp.asarray([1.0, 1.0])
  u, state = opt.update(jnp.asarray([1.0, 1.0]), opt.init(w), w, value_fn=f)
  assert all(np.all(x == 0) for x in jax.tree.leaves(u))
  assert float(optax.tree.get(state, "learning_rate")) == 0.0


def test_value_and_grad_from_value_fn_when_missing():
  loss, params, _ = tiny_mlp(seed=1)
  f = lambda p: 50.0 * loss(p)
  g = jax.grad(f)(params)
  chained = optax.chain(optax.sgd(1.0),
                        cdat_fast.scale_by_backtracking_linesearch())
  a, _ = chained.update(g, chained.init(params), params, value_fn=f)
  b, _ = chained.update(g, chained.init(params), params, value_fn=f, grad=g,
                        value=f(params))
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-6)


@pytest.mark.parametrize("kwargs, name", [
    (dict(c=-1.0), "c"), (dict(decrease_factor=1.0), "decrease_factor"),
    (dict(increase_factor=0.5), "increase_factor"),
    (dict(relative_decrease=-1e-3), "relative_decrease"),
    (dict(max_steps=0), "max_steps")])
def test_bad_hyperparameters(kwargs, name):
  with pytest.raises(ValueError, match=name):
    cdat_fast.backtracking_linesearch(optax.sgd(1.0), **kwargs)


@pytest.mark.parametrize("c", [0.0, 1e-4, 0.5])
def test_relative_decrease_sets_the_accepted_step(c):
  # f(w) = 20‖w‖² + 40000 at w = (1, 1) along u = -∇f: every term of the
  # criterion f(w + ηu) ≤ (1 + δ) f(w) + c η ∇fᵀu is known in closed form,
  # and δ f(w) = 40 is large enough that δ, 2δ and 0 accept different trials
  # η = 0.9^k (margins of 7 or more against float32 rounding of about 0.004).
  delta, shrink = 1e-3, 0.9
  f = lambda w: 20.0 * jnp.sum(w ** 2) + 40000.0
  w = jnp.ones(2)

  def first_accepted(d):  # float64, from the criterion as written
    value, slope = 40040.0, -3200.0  # f(w), ∇f(w)ᵀu = -‖∇f(w)‖²
    for k in range(100):
      eta = shrink ** k
      if 40.0 * (1 - 40 * eta) ** 2 + 40000.0 <= (1 + d) * value + (
          c * eta * slope):
        return k
    raise AssertionError("no trial accepted")

  k = first_accepted(delta)
  assert k != first_accepted(2 * delta) and k != first_accepted(0.0)
  opt = cdat_fast.backtracking_linesearch(
      optax.sgd(1.0), c=c, relative_decrease=delta, decrease_factor=shrink)
  _, state = opt.update(jax.grad(f)(w), opt.init(w), w, value_fn=f)
  assert int(optax.tree.get(state, "num_trials")) == k + 1
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"),
                             shrink ** k, rtol=1e-6)
