"""GeN against its maths: the parabola fit, closed forms on quadratics, safeguards."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from cdat_fast.gen import fit_parabola
from problems import random_quadratic


def _closed_form_etas(a, w_star, w0, eta0, steps, every, smooth=0.9, clip=2.0):
  """GeN on ½(w-w*)ᵀA(w-w*) with u = -g, in float64 numpy."""
  w, eta, etas = np.array(w0, np.float64), eta0, []
  for t in range(steps):
    g = a @ (w - w_star)
    if (t + 1) % every == 0:
      proposal = (g @ g) / (g @ a @ g)  # -gᵀu / uᵀAu, the line minimum
      eta = smooth * eta + (1 - smooth) * min(max(proposal, eta / clip),
                                              eta * clip)
    w = w - eta * g
    etas.append(eta)
  return np.array(etas), w


def _run(opt, f, w, steps, grad_fn=None, **kw):
  state = opt.init(w)
  grad_fn = jax.grad(f) if grad_fn is None else grad_fn

  @jax.jit
  def step(w, state):
    updates, state = opt.update(grad_fn(w), state, w, value_fn=f, **kw)
    return optax.apply_updates(w, updates), state

  etas = []
  for _ in range(steps):
    w, state = step(w, state)
    etas.append(float(optax.tree.get(state, "learning_rate")))
  return np.array(etas), w, state


def test_the_fit_is_exact_on_a_parabola_and_rejects_a_quartic():
  x = jnp.array([-2.0, -1.0, 0.0, 1.0, 2.0])
  fit = fit_parabola(x, 0.5 * 3.0 * x**2 - 0.7 * x)
  np.testing.assert_allclose([fit.curvature, fit.slope, fit.r2],
                             [3.0, 0.7, 1.0], rtol=1e-5)
  quartic = fit_parabola(x, x**4 - 0.5 * x)
  assert quartic.curvature > 0 and quartic.slope > 0 and quartic.r2 < 0.99
  # Three points: the two-parameter model through the origin interpolates.
  three = jnp.array([-1.0, 0.0, 1.0])
  assert float(fit_parabola(three, three**4 - 0.5 * three).r2) == 1.0
  # Constant data: R² is 1 for the exact (zero) fit, as scikit-learn's.
  assert float(fit_parabola(three, jnp.zeros(3)).r2) == 1.0


@pytest.mark.parametrize("every", [1, 4])
@pytest.mark.parametrize("seed", [0, 1])
def test_gd_on_a_quadratic_follows_the_closed_form(seed, every):
  with jax.enable_x64(True):
    f, a, w_star = random_quadratic(seed)
    a64, ws64 = jnp.asarray(a), jnp.asarray(w_star)
    f64 = lambda w: 0.5 * (w - ws64) @ (a64 @ (w - ws64))
    w0 = np.random.RandomState(seed + 5).randn(5)
    eta0 = 0.01 if seed == 0 else 1.0  # grows (clipped at 2η) / shrinks
    etas, w, state = _run(cdat_fast.gen(optax.sgd(1.0), eta0, every=every),
                          f64, jnp.asarray(w0), 40)
  want, w_want = _closed_form_etas(a, w_star, w0, eta0, 40, every)
  np.testing.assert_allclose(etas, want, rtol=1e-9)
  np.testing.assert_allclose(w, w_want, rtol=1e-8, atol=1e-12)
  tuner = state.tuner
  assert int(tuner.num_refreshes) == 40 // every
  assert int(tuner.num_rejected) == 0 and int(tuner.num_skipped) == 0


def test_the_fitted_curvature_and_slope_are_utHu_and_minus_gtu_for_adam():
  with jax.enable_x64(True):
    f, a, w_star = random_quadratic(3)
    a64, ws64 = jnp.asarray(a), jnp.asarray(w_star)
    f64 = lambda w: 0.5 * (w - ws64) @ (a64 @ (w - ws64))
    w = jnp.asarray(np.random.RandomState(2).randn(5))
    opt = cdat_fast.gen(optax.adam(1.0), 0.05, every=1)
    base = optax.adam(1.0)
    state, base_state = opt.init(w), base.init(w)
    for _ in range(3):
      g = jax.grad(f64)(w)
      u, base_state = base.update(g, base_state, w)
      eta = float(state.tuner.learning_rate)
      updates, state = opt.update(g, state, w, value_fn=f64)
      un, gn = np.asarray(u), np.asarray(g)
      np.testing.assert_allclose(state.tuner.curvature, un @ a @ un, rtol=1e-8)
      np.testing.assert_allclose(state.tuner.slope, -gn @ un, rtol=1e-8)
      proposal = (-gn @ un) / (un @ a @ un)
      new = 0.9 * eta + 0.1 * np.clip(proposal, eta / 2, 2 * eta)
      np.testing.assert_allclose(updates, new * un, rtol=1e-8)
      w = optax.apply_updates(w, updates)


def _probe_counter():
  calls = []

  def counted(f):
    def value_fn(w):
      jax.debug.callback(lambda: calls.append(1))
      return f(w)
    return value_fn

  return calls, counted


def test_the_objective_is_evaluated_only_every_phi_steps():
  f, _, _ = random_quadratic(0)
  calls, counted = _probe_counter()
  opt = cdat_fast.gen(optax.sgd(1.0), 0.05, every=4)
  etas, _, state = _run(opt, counted(f), jnp.ones(5), 12, jax.grad(f))
  jax.effects_barrier()
  assert len(calls) == 3 * 3  # 3 refreshes (steps 4, 8, 12) × 3 points
  changed = [i + 1 for i in range(12)
             if etas[i] != (np.float32(0.05) if i == 0 else etas[i - 1])]
  assert changed == [4, 8, 12]
  assert int(state.tuner.num_refreshes) == 3


def test_five_points_cost_five_passes():
  f, _, _ = random_quadratic(1)
  calls, counted = _probe_counter()
  opt = cdat_fast.gen(optax.sgd(1.0), 0.05, every=2,
                      factors=(-2, -1, 0, 1, 2))
  _run(opt, counted(f), jnp.ones(5), 4, jax.grad(f))
  jax.effects_barrier()
  assert len(calls) == 2 * 5


def test_a_bad_fit_is_rejected_and_eta_held():
  # Concave along u: a < 0.
  concave = lambda w: -jnp.sum(w**2) + jnp.sum(w)
  _, _, state = _run(cdat_fast.gen(optax.sgd(1.0), 0.1, every=1), concave,
                     jnp.zeros(3), 1)
  assert float(state.tuner.learning_rate) == pytest.approx(0.1)
  assert int(state.tuner.num_rejected) == 1
  # An ascent direction (u = +g): b < 0.
  f, _, _ = random_quadratic(2)
  ascent = optax.sgd(-1.0)
  _, _, state = _run(cdat_fast.gen(ascent, 0.1, every=1), f, jnp.ones(5), 1)
  assert int(state.tuner.num_rejected) == 1
  assert float(state.tuner.learning_rate) == pytest.approx(0.1)


def test_a_poor_r2_is_rejected_with_five_points():
  quartic = lambda w: jnp.sum(w**4) - 0.5 * jnp.sum(w)
  w = jnp.zeros(1)  # u = -g = 0.5: a > 0 and b > 0, R² ≈ 0.96
  opt = cdat_fast.gen(optax.sgd(1.0), 1.0, every=1, factors=(-2, -1, 0, 1, 2))
  state = opt.init(w)
  _, state = opt.update(jax.grad(quartic)(w), state, w, value_fn=quartic)
  tuner = state.tuner
  assert float(tuner.r2) < 0.99 and int(tuner.num_rejected) == 1
  assert tuner.curvature == 0 and float(tuner.learning_rate) == 1.0
  # The same points with min_r2=-inf keep the fit.
  loose = cdat_fast.gen(optax.sgd(1.0), 1.0, every=1, factors=(-2, -1, 0, 1, 2),
                        min_r2=-np.inf)
  _, state = loose.update(jax.grad(quartic)(w), loose.init(w), w,
                          value_fn=quartic)
  assert int(state.tuner.num_rejected) == 0
  assert float(state.tuner.learning_rate) != 1.0


def test_non_finite_probe_losses_halve_eta_and_stay_out_of_params():
  # Finite at w, Inf beyond |w| > 1: the probe at w ± ηu overflows.
  f = lambda w: jnp.where(jnp.max(jnp.abs(w)) > 1.0, jnp.inf, jnp.sum(w**2))
  w = jnp.full(3, 0.5)
  opt = cdat_fast.gen(optax.sgd(1.0), 1.0, every=1)
  updates, state = jax.jit(lambda w: opt.update(
      jax.grad(f)(w), opt.init(w), w, value_fn=f))(w)
  assert float(state.tuner.learning_rate) == 0.5
  assert int(state.tuner.num_rejected) == 1
  np.testing.assert_allclose(updates, -0.5 * jax.grad(f)(w))


def test_a_non_finite_direction_gives_a_zero_update_and_no_probe():
  f, _, _ = random_quadratic(0)
  calls, counted = _probe_counter()
  opt = cdat_fast.gen(optax.sgd(1.0), 0.1, every=1)
  w = jnp.ones(5)
  grads = jnp.full(5, jnp.nan)
  updates, state = jax.jit(lambda w, g: opt.update(
      g, opt.init(w), w, value_fn=counted(f)))(w, grads)
  jax.effects_barrier()
  np.testing.assert_array_equal(updates, np.zeros(5))
  assert int(state.tuner.num_skipped) == 1 and not calls
  assert float(state.tuner.learning_rate) == pytest.approx(0.1)


def test_the_batch_reaches_value_fn_and_the_chainable_form_matches():
  data = {"a": jnp.array([1.0, 4.0, 9.0])}
  f = lambda w, batch: 0.5 * jnp.sum(batch["a"] * (w - 1.0) ** 2)
  w = jnp.zeros(3)
  g = jax.grad(f)(w, data)
  chained = optax.chain(optax.sgd(1.0), cdat_fast.scale_by_gen(0.1, every=1))
  u1, _ = chained.update(g, chained.init(w), w, value_fn=f, batch=data)
  opt = cdat_fast.gen(optax.sgd(1.0), 0.1, every=1)
  u2, state = opt.update(g, opt.init(w), w, value_fn=f, batch=data)
  np.testing.assert_allclose(u1, u2)
  assert isinstance(state.tuner, cdat_fast.GeNState)


@pytest.mark.parametrize("kwargs, name", [
    (dict(learning_rate=0.0), "learning_rate"),
    (dict(learning_rate=0.1, every=0), "every"),
    (dict(learning_rate=0.1, every=2.0), "every"),
    (dict(learning_rate=0.1, smooth=1.0), "smooth"),
    (dict(learning_rate=0.1, clip=0.5), "clip"),
    (dict(learning_rate=0.1, min_r2=1.5), "min_r2"),
    (dict(learning_rate=0.1, factors=(-1, 1)), "factors"),
    (dict(learning_rate=0.1, factors=(0, 1, 1)), "factors"),
    (dict(learning_rate=0.1, factors=(-1, 0, 0, 1)), "factors"),
])
def test_bad_settings_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    cdat_fast.gen(optax.sgd(1.0), **kwargs)


def test_a_missing_objective_names_value_fn():
  opt = cdat_fast.gen(optax.sgd(1.0), 0.1)
  w = jnp.zeros(2)
  with pytest.raises(TypeError, match="value_fn"):
    opt.update(w, opt.init(w), w)
