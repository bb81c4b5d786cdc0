"""CDAT with every curvature estimator: the shared policy.

One table of modes through the same checks: jit and dtypes, non-finite
input, zero directions, inject_hyperparams, chains, argument errors. Each
estimator's own maths is tested in ``tests/estimators/``.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from cdat_fast import estimators
from cdat_fast.cdat import make_estimator
from cdat_fast.estimators.interface import first_order_slope
from problems import flat, random_quadratic, step_fn, tiny_mlp, tiny_net

INF = float("inf")


# ----------------------------------------------------------------------------
# Shared policy: jit, dtypes, NaN, chain, inject_hyperparams, arguments

MODES = {
    "every3": dict(every=3),
    "every3_naive": dict(curvature=estimators.every(
        3, refresh_steps=1, max_growth=INF, secant_guard=0.0,
        refresh_tol=INF)),
    "secant": dict(curvature="secant"),
    "gauss_newton": dict(curvature="gauss_newton"),
    "gauss_newton_every3": dict(curvature="gauss_newton", every=3),
}


def _objective_kwargs(mode, loss_fn_of_params):
  if "gauss_newton" in mode:
    return dict(model_fn=lambda p: p, loss_fn=loss_fn_of_params)
  return dict(value_fn=loss_fn_of_params)


@pytest.mark.parametrize("mode", sorted(MODES))
def test_compiles_once_and_keeps_dtypes(mode):
  params, model_fn, loss_fn, _ = tiny_net(seed=7)
  params = jax.tree.map(lambda t: t.astype(jnp.bfloat16), params)
  lossb = lambda p: loss_fn(model_fn(
      jax.tree.map(lambda t: t.astype(jnp.float32), p)))
  opt = cdat_fast.cdat(optax.sgd(1.0), ema=0.5, **MODES[mode])
  step, traces = step_fn(opt, lossb, **_objective_kwargs(mode, lossb))
  state = opt.init(params)
  dtypes = jax.tree.map(lambda t: t.dtype, state)
  for _ in range(5):
    params, state = step(params, state)
  assert len(traces) == 1
  assert jax.tree.map(lambda t: t.dtype, state) == dtypes
  assert optax.tree.get(state, "learning_rate").dtype == jnp.float32
  # Only the estimators that hold a curvature between steps keep one.
  held = optax.tree.get(state, "curvature")
  assert (held is None) == (mode == "gauss_newton")
  if held is not None:
    assert held.dtype == jnp.float32
  assert all(t.dtype == jnp.bfloat16 for t in jax.tree.leaves(params))
  assert float(optax.tree.get(state, "learning_rate")) > 0


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("bad", ["nan_grad", "inf_grad", "nan_loss"])
def test_non_finite_input_skips_and_keeps_state_finite(mode, bad):
  f = lambda w: 0.5 * jnp.sum(jnp.asarray([1.0, 2.0, 3.0]) * w ** 2)
  opt = cdat_fast.cdat(optax.sgd(1.0), ema=0.9, **MODES[mode])
  kw = _objective_kwargs(mode, f)
  w = jnp.ones(3)
  state = opt.init(w)
  for _ in range(3):  # past the first refresh
    updates, state = opt.update(jax.grad(f)(w), state, w, value=f(w), **kw)
    w = optax.apply_updates(w, updates)
  before = state
  g, value, bad_kw = jax.grad(f)(w), f(w), kw
  if bad == "nan_grad":
    g = g.at[0].set(jnp.nan)
  elif bad == "inf_grad":
    g = g.at[1].set(jnp.inf)
  else:  # the objective returns NaN (the gradient given is finite)
    value = jnp.nan
    bad_kw = _objective_kwargs(mode, lambda w: f(w) * jnp.nan)
  updates, state = opt.update(g, state, w, value=value, **bad_kw)
  assert np.all(np.asarray(updates) == 0)
  assert int(optax.tree.get(state, "num_skipped")) == 1
  assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree.leaves(state))
  for name in ("numerator", "denominator", "curvature"):
    np.testing.assert_array_equal(optax.tree.get(state, name),
                                  optax.tree.get(before, name))
  # ... and training resumes.
  updates, state = opt.update(jax.grad(f)(w), state, w, value=f(w), **kw)
  assert float(optax.tree.get(state, "learning_rate")) > 0


@pytest.mark.parametrize("mode", sorted(MODES))
def test_zero_direction_and_linear_objective_are_safe(mode):
  for f, w in ((lambda w: jnp.sum(w ** 2), jnp.zeros(2)),
               (lambda w: jnp.sum(w), jnp.ones(2))):
    opt = cdat_fast.cdat(optax.sgd(1.0), **MODES[mode])
    kw = _objective_kwargs(mode, f)
    state = opt.init(w)
    for _ in range(4):
      updates, state = opt.update(jax.grad(f)(w), state, w, **kw)
      assert all(np.all(np.isfinite(l)) for l in jax.tree.leaves(state))
      assert np.all(np.isfinite(updates))
      w = optax.apply_updates(w, updates)


@pytest.mark.parametrize("mode", ["every3", "secant"])
def test_inject_hyperparams_traced_numbers(mode):
  loss, params, _ = tiny_mlp(seed=8)
  factory = optax.inject_hyperparams(cdat_fast.cdat, static_args=("every",))
  opt = factory(base=optax.sgd(1.0), scale=2.0, ema=0.9, **MODES[mode])
  step, traces = step_fn(opt, loss, value_fn=loss)
  state = opt.init(params)
  p1, s1 = step(params, state)
  s1.hyperparams["scale"] = jnp.asarray(1.0, jnp.float32)
  s1.hyperparams["ema"] = jnp.asarray(0.5, jnp.float32)
  p2, s2 = step(p1, s1)
  assert len(traces) == 1
  assert np.isfinite(float(optax.tree.get(s2.inner_state, "learning_rate")))


def test_inject_hyperparams_dynamic_every():
  # Without static_args, inject_hyperparams turns every=4 into a traced
  # integer: the refresh period is then a runtime value.
  f, _, _ = random_quadratic(5)
  def factory(base, scale, every):
    return cdat_fast.cdat(base, scale=scale, curvature=estimators.every(
        every, refresh_tol=INF))
  opt = optax.inject_hyperparams(factory)(
      base=optax.sgd(1.0), scale=0.5, every=4)
  step, traces = step_fn(opt, f, value_fn=f)
  w = jnp.ones(5)
  state = opt.init(w)
  for _ in range(8):
    w, state = step(w, state)
  assert int(optax.tree.get(state.inner_state, "num_refreshes")) == 4
  state.hyperparams["every"] = jnp.asarray(2)
  for _ in range(4):
    w, state = step(w, state)
  assert int(optax.tree.get(state.inner_state, "num_refreshes")) == 8
  assert len(traces) == 1


def test_inside_chain_with_value_and_grad():
  loss, params, _ = tiny_mlp(seed=9)
  g = jax.grad(loss)(params)
  for kw in MODES.values():
    gn = kw.get("curvature") == "gauss_newton"
    curvature = make_estimator(kw.get("curvature", "exact"), kw.get("every"))
    chain = optax.chain(optax.clip_by_global_norm(10.0), optax.adam(1.0),
                        cdat_fast.scale_by_cdat(curvature=curvature))
    obj = (dict(model_fn=lambda p: p, loss_fn=loss) if gn
           else dict(value_fn=loss))
    for extra in (dict(grad=g, value=loss(params)), {}):
      updates, state = chain.update(g, chain.init(params), params, **obj,
                                    **extra)
      assert float(optax.tree.get(state, "learning_rate")) > 0
      assert np.all(np.isfinite(flat(updates)))


@pytest.mark.parametrize("kwargs, name", [
    (dict(curvature="hutchinson"), "curvature"),
    (dict(every=0), "every"), (dict(every=2.5), "every"),
    (dict(every=True), "every"), (dict(every="10"), "every"),
])
def test_bad_arguments_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    cdat_fast.cdat(optax.sgd(1.0), **kwargs)
  with pytest.raises(ValueError, match=name):
    cdat_fast.on_edge(optax.sgd(1.0), **kwargs)
  with pytest.raises(ValueError, match=name):
    make_estimator(**kwargs)
  if "every" not in kwargs:
    with pytest.raises(ValueError, match=name):
      cdat_fast.scale_by_cdat(**kwargs)


@pytest.mark.parametrize("kwargs, name", [
    (dict(refresh_steps=0), "refresh_steps"),
    (dict(max_growth=0.5), "max_growth"),
    (dict(max_growth=float("nan")), "max_growth"),
    (dict(secant_guard=-0.5), "secant_guard"),
    (dict(secant_guard=INF), "secant_guard"),
    (dict(refresh_tol=-1.0), "refresh_tol"),
])
def test_bad_safeguards_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    estimators.every(3, **kwargs)


@pytest.mark.parametrize("ema", [1.0, -0.1])
def test_bad_secant_average_names_the_argument(ema):
  with pytest.raises(ValueError, match="ema"):
    estimators.secant(ema)
  with pytest.raises(ValueError, match="ema"):
    make_estimator("secant", ema=ema)


@pytest.mark.parametrize("who, kwargs, instead", [
    ("scale_by_cdat", dict(every=4),
     "curvature=estimators.every(4) (or cdat(..., every=4))"),
    ("scale_by_cdat", dict(refresh_steps=1),
     "curvature=estimators.every(k, refresh_steps=1)"),
    ("scale_by_cdat", dict(curvature_ema=0.5),
     "curvature=estimators.secant(ema=0.5)"),
    ("cdat", dict(max_growth=INF), "curvature=estimators.every(k, max_growth"),
    ("cdat", dict(secant_guard=0.0),
     "curvature=estimators.every(k, secant_guard=0.0)"),
    ("on_edge", dict(refresh_tol=INF),
     "curvature=estimators.every(k, refresh_tol"),
])
def test_removed_keywords_say_what_to_write_instead(who, kwargs, instead):
  build = getattr(cdat_fast, who)
  args = () if who == "scale_by_cdat" else (optax.sgd(1.0),)
  with pytest.raises(TypeError) as e:
    build(*args, **kwargs)
  (name,) = kwargs
  assert f"({name}=" in str(e.value)
  assert instead in str(e.value)


def test_make_estimator_builds_the_names_of_the_harness_and_bench():
  f, _, _ = random_quadratic(4, dim=4)
  x = jnp.arange(32.0).reshape(16, 2)
  value_fn = lambda w, batch: f(w) + 0.0 * jnp.sum(batch)
  w = jnp.ones(4)
  for curvature, kw in [
      ("exact", {}), ("finite_difference", dict(step=1e-2)),
      ("exact", dict(fraction=1 / 4)), ("exact", dict(every=3)),
      ("finite_difference", dict(fraction=1 / 4)),
      ("secant", dict(fraction=1 / 4)), ("secant", dict(ema=0.5)),
      (estimators.exact(), dict(fraction=1 / 2, every=2))]:
    opt = cdat_fast.cdat(optax.sgd(1.0), curvature=make_estimator(
        curvature, **kw))
    updates, state = opt.update(jax.grad(f)(w), opt.init(w), w,
                                value_fn=value_fn, batch=x)
    assert float(optax.tree.get(state, "learning_rate")) > 0, (curvature, kw)
  with pytest.raises(TypeError, match="options"):
    make_estimator(estimators.exact(), step=1e-3)
  with pytest.raises(ValueError, match="every"):
    make_estimator("secant", 3)


def test_missing_value_fn_is_named_in_every_mode():
  w = jnp.ones(2)
  for kw in (dict(every=3), dict(curvature="secant")):
    opt = cdat_fast.cdat(optax.sgd(1.0), **kw)
    with pytest.raises(TypeError, match="value_fn"):
      opt.update(w, opt.init(w), w)


def _constant_curvature(kappa):
  """An estimator that never looks at u: only the rule can catch a bad u."""
  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    del value, learning_rate
    if slope is None:
      slope = first_order_slope(objective, params, direction)
    return cdat_fast.estimators.Estimate(jnp.zeros([]), slope,
                                         jnp.float32(kappa)), state
  return cdat_fast.estimators.CurvatureEstimator(lambda p: (), update)


@pytest.mark.parametrize("bad", [jnp.inf, -jnp.inf, jnp.nan])
@pytest.mark.parametrize("g0", [1.0, 0.0])
def test_a_non_finite_direction_is_skipped_whatever_the_estimator(bad, g0):
  # The base writes a non-finite entry into u (where g is g0): the rule
  # must skip the step even though the estimator ignores u (gᵀu is then
  # ±Inf or NaN, whatever the sign).
  spoil = optax.stateless(lambda u, params: u.at[0].set(bad))
  opt = cdat_fast.cdat(optax.chain(optax.sgd(1.0), spoil),
                       curvature=_constant_curvature(2.0))
  w = jnp.ones(3)
  g = jnp.asarray([g0, 1.0, 2.0])
  updates, state = opt.update(g, opt.init(w), w, value_fn=lambda w: 0.0)
  assert np.all(np.asarray(updates) == 0)
  assert int(optax.tree.get(state, "num_skipped")) == 1
  assert float(optax.tree.get(state, "numerator")) == 0.0
  # Without a gradient the slope comes from the objective, and u is checked.
  updates, state = cdat_fast.scale_by_cdat(
      curvature=_constant_curvature(2.0)).update(
          jnp.asarray([bad, 1.0, 1.0]), opt.init(w).tuner, w,
          value_fn=lambda w: jnp.sum(w))
  assert np.all(np.asarray(updates) == 0)
