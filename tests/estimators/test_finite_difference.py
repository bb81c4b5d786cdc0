"""cdat_fast.estimators.finite_difference: curvature from loss values only.

References: closed forms on quadratics (where a central second difference is
exact up to rounding), float64 numpy, explicit Hessians, and the exact jvp
of a jvp. Tolerances follow the estimator's error model: rounding
``≤ 4ε_f max|f|/μ²``, truncation ``≈ μ²∂⁴f/12``, balanced by the automatic
step at about ``√ε_f`` times model constants.
"""
import importlib

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from cdat_fast import estimators, treemath
from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators.interface import Objective
from problems import flat, jit_hessian, random_quadratic, step_fn, tiny_mlp

fd_module = importlib.import_module("cdat_fast.estimators.finite_difference")
EPS32 = float(jnp.finfo(jnp.float32).eps)


def _update(est, fn, params, u, state=None, **kw):
  state = est.init(params) if state is None else state
  return jax.jit(lambda s, p, u: est.update(
      s, p, u, Objective("test", value_fn=fn), **kw))(state, params, u)


def _at_steps(fn, params, u, steps):
  """The curvature at fixed steps ``h`` (one compiled update, ``h`` traced)."""
  def curvature(p, u, h):
    est = estimators.finite_difference(step=h)
    return est.update(est.init(p), p, u,
                      Objective("test", value_fn=fn))[0].curvature
  at = jax.jit(curvature)
  return [float(at(params, u, jnp.float32(h))) for h in steps]


def _settled(est, fn, params, u, updates=3, **kw):
  """The last of a few updates at the same point, each from the step the
  previous one chose (one compiled update)."""
  step = jax.jit(lambda s, p, u: est.update(
      s, p, u, Objective("test", value_fn=fn), **kw))
  state = est.init(params)
  for _ in range(updates):
    estimate, state = step(state, params, u)
  return estimate, state


def _exact(fn, params, u):
  return float(jax.jit(lambda p, u: directional_derivatives(fn, p, u)[2])(
      params, u))


def _descent(fn, params):
  """``u = −∇f(w)``, jitted."""
  return jax.jit(lambda p: jax.tree.map(jnp.negative, jax.grad(fn)(p)))(
      params)


@pytest.mark.parametrize("seed", [0, 1])
def test_quadratic_closed_form(seed):
  # No truncation on a quadratic: the error is rounding alone, within
  # 4ε max|f|/μ² (the automatic step reports that bound in its estimate).
  f, a, w_star = random_quadratic(seed, indefinite=seed == 1)
  rng = np.random.RandomState(seed)
  w, u = rng.randn(5), rng.randn(5)
  w32, u32 = jnp.asarray(w, jnp.float32), jnp.asarray(u, jnp.float32)
  expect = u @ a @ u
  f64 = lambda v: 0.5 * (v - w_star) @ a @ (v - w_star)
  (value, slope, curv), state = _settled(
      estimators.finite_difference(upper=False), f, w32, u32)
  assert abs(float(curv) - expect) <= float(state.error) * abs(float(curv))
  # Seed 1's uᵀAu is 2e3 times smaller than f: the bound is large there.
  assert float(state.error) < (5e-3 if seed == 0 else 3.0)
  np.testing.assert_allclose(slope, (a @ (w - w_star)) @ u, rtol=1e-3)
  np.testing.assert_allclose(value, f64(w), rtol=1e-5)
  h = 1e-2
  mu = h * max(np.linalg.norm(w), 1.0) / np.linalg.norm(u)
  bound = 4 * EPS32 * max(abs(f64(w + s * mu * u)) for s in (-1, 0, 1))
  (_, _, fixed), _ = _update(estimators.finite_difference(step=h, upper=False),
                             f, w32, u32)
  assert abs(float(fixed) - expect) <= bound / mu ** 2


def test_negative_curvature_keeps_its_sign():
  f = lambda w: 0.5 * (w[0] ** 2 - 3.0 * w[1] ** 2) + w[0] * w[1]
  w, u = jnp.asarray([0.3, -0.2]), jnp.asarray([0.0, 1.0])
  (_, _, curv), _ = _settled(estimators.finite_difference(), f, w, u)
  np.testing.assert_allclose(curv, -3.0, rtol=1e-4)


def _logcosh_problem(dtype):
  rng = np.random.RandomState(3)
  x, y = rng.randn(32, 6), rng.randn(32)
  w, u = rng.randn(6), rng.randn(6)

  def f(w):
    r = jnp.asarray(x, dtype) @ w - jnp.asarray(y, dtype)
    return jnp.mean(jnp.logaddexp(r, -r))  # log(2 cosh r)

  r = x @ w - y
  curvature = np.mean((x @ u) ** 2 / np.cosh(r) ** 2)  # float64 numpy
  slope = np.mean(np.tanh(r) * (x @ u))
  return f, jnp.asarray(w, dtype), jnp.asarray(u, dtype), curvature, slope


def test_float64_numpy_closed_form_in_float32_and_float64():
  # log-cosh regression: uᵀHu = mean(sech²(r)(Xu)²) in float64 numpy.
  f, w, u, curvature, slope = _logcosh_problem(jnp.float32)
  (_, s32, c32), state = _settled(estimators.finite_difference(), f, w, u)
  err32 = abs(float(c32) - curvature) / curvature
  # Balanced truncation and rounding: about √ε32 = 3.5e-4 times constants.
  assert err32 < 3e-3
  assert err32 < 3 * float(state.error)  # the estimate is not optimistic
  # The central first difference at the same μ: truncation μ²∂³f/6.
  np.testing.assert_allclose(s32, slope, rtol=3e-3)
  with jax.enable_x64(True):
    f, w, u, curvature, _ = _logcosh_problem(jnp.float64)
    (_, _, c64), state = _settled(estimators.finite_difference(), f, w, u)
    assert state.length.dtype == jnp.float64
    # ε_f reads float64's epsilon: √ε64 = 1.5e-8.
    np.testing.assert_allclose(c64, curvature, rtol=1e-6)


def test_tiny_net_against_the_explicit_hessian():
  loss, params, _ = tiny_mlp(seed=4)
  u = _descent(loss, params)
  (_, slope, curv), state = _settled(estimators.finite_difference(), loss,
                                     params, u)
  uf = flat(u)
  expect = uf @ jit_hessian(loss, params) @ uf
  np.testing.assert_allclose(curv, expect, rtol=3e-3)
  np.testing.assert_allclose(slope, -(uf @ uf), rtol=1e-3)
  assert 0 < float(state.error) < 3e-3


def _gelu_mlp(seed=0, n=256):
  rng = np.random.RandomState(seed)
  sizes = (8, 32, 32, 4)
  params = {f"w{i}": jnp.asarray(rng.randn(a, b) / np.sqrt(a), jnp.float32)
            for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:]))}
  params.update({f"b{i}": jnp.zeros(b) for i, b in enumerate(sizes[1:])})
  x = jnp.asarray(rng.randn(n, 8), jnp.float32)
  labels = jnp.asarray(rng.randint(0, 4, n))

  def loss(p):
    dtype = p["w0"].dtype
    h = x.astype(dtype)
    for i in range(3):
      h = h @ p[f"w{i}"] + p[f"b{i}"]
      h = jax.nn.gelu(h) if i < 2 else h
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        h.astype(jnp.float32), labels))
  return loss, params


def _layer_norm(x):
  x32 = x.astype(jnp.float32)
  mean = jnp.mean(x32, -1, keepdims=True)
  var = jnp.mean(jnp.square(x32 - mean), -1, keepdims=True)
  return ((x32 - mean) * jax.lax.rsqrt(var + 1e-6)).astype(x.dtype)


def _tiny_transformer(seed=0, batch=16, length=16, width=16, vocab=11):
  """Embedding, causal self-attention, GELU MLP, both pre-LN, and a head."""
  rng = np.random.RandomState(seed)
  shapes = dict(embed=(vocab, width), pos=(length, width), q=(width, width),
                k=(width, width), v=(width, width), o=(width, width),
                fc=(width, 2 * width), proj=(2 * width, width),
                head=(width, vocab))
  params = {k: jnp.asarray(rng.randn(*s) / np.sqrt(s[0]), jnp.float32)
            for k, s in shapes.items()}
  tokens = jnp.asarray(rng.randint(0, vocab, (batch, length + 1)))
  mask = jnp.tril(jnp.ones((length, length), bool))

  def loss(p):
    h = p["embed"][tokens[:, :-1]] + p["pos"]
    y = _layer_norm(h)
    scores = (y @ p["q"]) @ (y @ p["k"]).swapaxes(-1, -2) / np.sqrt(width)
    scores = jnp.where(mask, scores.astype(jnp.float32), -1e9)
    attn = jax.nn.softmax(scores, -1).astype(h.dtype)
    h = h + (attn @ (y @ p["v"])) @ p["o"]
    h = h + jax.nn.gelu(_layer_norm(h) @ p["fc"]) @ p["proj"]
    logits = (_layer_norm(h) @ p["head"]).astype(jnp.float32)
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(
        logits, tokens[:, 1:]))
  return loss, params


@pytest.mark.parametrize("model", [_gelu_mlp, _tiny_transformer])
@pytest.mark.parametrize("dtype, rtol", [
    # float32: balanced error ~ √ε32 (3.5e-4) times model constants.
    (jnp.float32, 5e-3),
    # bfloat16 parameters and activations: the loss rounds to ~1e-4 of
    # itself (averaged over the examples), ε_f = 2⁻¹⁰ is assumed, and the
    # perturbed points are rounded to bfloat16: the balanced error is
    # √(ε_f) ≈ 3% times model constants (5-20% on the bench's models).
    (jnp.bfloat16, 0.2),
])
def test_against_the_exact_jvp_of_jvp(model, dtype, rtol):
  loss, params = model()
  params = jax.tree.map(lambda t: t.astype(dtype), params)
  u = _descent(loss, params)
  # Reference: the float32 model at the same (rounded) point, jvp of a jvp.
  as32 = lambda t: jax.tree.map(lambda x: x.astype(jnp.float32), t)
  expect = _exact(loss, as32(params), as32(u))
  (_, _, curv), state = _settled(estimators.finite_difference(), loss,
                                 params, u)
  err = abs(float(curv) - expect) / abs(expect)
  assert err < rtol
  if dtype == jnp.float32:  # the estimate is not optimistic
    assert err < 3 * float(state.error)
  assert state.length.dtype == jnp.float32


def test_the_chosen_step_beats_ten_times_longer_and_shorter():
  # A constant offset raises the rounding (4ε|f|/μ²) without changing the
  # curvature, and GELU layers bring a fourth derivative: both terms show.
  loss, params = _gelu_mlp(seed=1)
  f = lambda p: loss(p) + 30.0
  u = _descent(f, params)
  expect = _exact(f, params, u)
  (_, _, auto), state = _settled(estimators.finite_difference(), f, params,
                                 u)
  h = float(state.length) / max(float(treemath.norm(params)), 1.0)
  scales = (0.1, 1.0, 10.0)
  errs = {k: abs(c - expect) / abs(expect) for k, c in zip(
      scales, _at_steps(f, params, u, [h * k for k in scales]))}
  assert errs[1.0] < errs[0.1] and errs[1.0] < errs[10.0], errs
  assert abs(float(auto) - expect) / abs(expect) < min(errs[0.1], errs[10.0])


def test_slope_is_the_callers_or_the_central_difference():
  loss, params, _ = tiny_mlp(seed=2)
  u = _descent(loss, params)
  g = jax.tree.map(jnp.negative, u)
  (_, given, _), _ = _update(estimators.finite_difference(), loss, params, u,
                             slope=jnp.float32(-3.0))
  assert float(given) == -3.0
  (_, measured, _), _ = _settled(estimators.finite_difference(), loss,
                                 params, u)
  np.testing.assert_allclose(measured, -float(treemath.vdot(g, g)),
                             rtol=1e-3)


@pytest.mark.parametrize("kwargs, passes", [
    (dict(), 5), (dict(reuse_value=True), 4),
    (dict(step=1e-3), 3), (dict(step=1e-3, reuse_value=True), 2)])
def test_forward_passes_counted_at_run_time(kwargs, passes):
  loss, params, _ = tiny_mlp(seed=5)
  calls = []

  def counted(p):
    jax.debug.callback(lambda: calls.append(1))
    return loss(p)

  u = _descent(loss, params)
  est = estimators.finite_difference(**kwargs)
  value = jax.jit(loss)(params)
  _, state = _update(est, counted, params, u, value=value)
  first = len(calls)
  # The first update re-measures (4 passes each) from its pilot step.
  assert first == passes + 4 * int(state.num_retries)
  calls.clear()
  _, state2 = _update(est, counted, params, u, state, value=value)
  retries = int(state2.num_retries) - int(state.num_retries)
  assert retries == 0 and len(calls) == passes


def test_tolerance_keeps_accurate_measurements_off_balance():
  # From a step 8x shorter than the balanced one, rounding is ~64x
  # truncation (off balance, past 16) but still ~1% of the curvature: the
  # default tolerance (5%) keeps that measurement (5 passes) and carries a
  # longer step on; tolerance=0 repeats it at once at the balanced step.
  f = lambda w: jnp.sum(jnp.cosh(w))
  rng = np.random.RandomState(0)
  w = jnp.asarray(rng.randn(8), jnp.float32)
  u = jnp.asarray(rng.randn(8), jnp.float32)
  _, balanced = _settled(estimators.finite_difference(), f, w, u)
  short = fd_module.FiniteDifferenceState(
      balanced.length / 8, jnp.float32(0), jnp.int32(0))
  (_, _, kept), state = _update(estimators.finite_difference(upper=False),
                                f, w, u, short)
  assert int(state.num_retries) == 0
  assert 1e-3 < float(state.error) < 0.05
  assert float(state.length) > 4 * float(short.length)
  expect = _exact(f, w, u)
  assert abs(float(kept) - expect) <= 2 * float(state.error) * abs(expect)
  (_, _, repeated), again = _update(
      estimators.finite_difference(upper=False, tolerance=0.0), f, w, u, short)
  assert int(again.num_retries) >= 1
  assert float(again.error) < float(state.error)
  assert abs(float(repeated) - expect) < abs(float(kept) - expect)


@pytest.mark.parametrize("step", [None, 1e-3])
def test_upper_adds_the_estimated_error(step):
  # upper (the default) returns |D| + e·|D| with D's sign, e the state's
  # error (the rounding bound alone with a fixed step, which holds on a
  # quadratic); upper=False the difference D.
  f, a, _ = random_quadratic(2)
  rng = np.random.RandomState(2)
  w = jnp.asarray(rng.randn(5), jnp.float32)
  u = jnp.asarray(rng.randn(5), jnp.float32)
  (_, _, d), state = _update(estimators.finite_difference(step, upper=False),
                             f, w, u)
  (_, _, up), state_up = _update(estimators.finite_difference(step), f, w, u)
  error = float(state.error)
  assert 0 < error < 0.1 and float(state_up.error) == error
  np.testing.assert_allclose(float(up), float(d) * (1 + error), rtol=1e-6)
  expect = float(np.asarray(u, np.float64) @ a @ np.asarray(u, np.float64))
  assert abs(float(d) - expect) <= error * abs(float(d))


def test_upper_bounds_a_difference_drowned_in_rounding():
  # A step of 1e-6‖w‖ in float32: the second difference is rounding noise
  # of either sign, and CDAT reads its size. The upper estimate's size is
  # not below the truth for any seed; the raw difference's often is.
  f = lambda w: jnp.sum(jnp.cosh(w)) + 100.0
  raw_below = 0
  for seed in range(8):
    rng = np.random.RandomState(seed)
    w = jnp.asarray(rng.randn(16), jnp.float32)
    u = jnp.asarray(rng.randn(16), jnp.float32) * 1e-2
    expect = _exact(f, w, u)
    (_, _, d), state = _update(
        estimators.finite_difference(step=1e-6, upper=False), f, w, u)
    (_, _, up), _ = _update(estimators.finite_difference(step=1e-6), f, w, u)
    assert float(state.error) > 1.0
    assert abs(float(up)) >= expect
    raw_below += abs(float(d)) < expect
  assert raw_below >= 1


def test_reused_value_gives_the_same_curvature():
  loss, params, _ = tiny_mlp(seed=6)
  u = _descent(loss, params)
  (_, _, mine), _ = _settled(estimators.finite_difference(reuse_value=True),
                             loss, params, u, value=jax.jit(loss)(params))
  (_, _, ref), _ = _settled(estimators.finite_difference(), loss, params, u)
  np.testing.assert_allclose(mine, ref, rtol=1e-5)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_perturbed_points_are_symmetric(dtype):
  # w ± d with one d: the displacements are equal except where w − d
  # crosses into a coarser binade. Rounding w − μu apart, stochastically as
  # bfloat16 leaves are, would differ almost everywhere.
  rng = np.random.RandomState(0)
  w = {"a": jnp.asarray(rng.randn(64, 33), dtype),
       "n": jnp.arange(3)}  # a non-float leaf is left alone
  u = {"a": jnp.asarray(rng.randn(64, 33), jnp.float32), "n": jnp.zeros(3)}
  mu = jnp.float32(1e-3)
  plus, minus = fd_module.perturbed_pair(w, u, mu)
  as64 = lambda t: np.asarray(t, np.float64)
  up = as64(plus["a"]) - as64(w["a"])
  assert np.mean(up != as64(w["a"]) - as64(minus["a"])) < 0.01
  apart = as64(fd_module._shifted_leaf(w["a"], -u["a"], mu, 7))  # pylint: disable=protected-access
  if dtype == jnp.bfloat16:
    assert np.mean(up != as64(w["a"]) - apart) > 0.1
  np.testing.assert_array_equal(plus["n"], w["n"])
  assert plus["a"].dtype == dtype


def test_bfloat16_perturbation_is_unbiased():
  # μu = 1e-3 is an eighth of bfloat16's spacing at 1: rounding to nearest
  # would leave w unchanged; stochastic rounding moves 1/8 of the entries.
  w = jnp.ones((64, 64), jnp.bfloat16)
  u = jnp.ones((64, 64), jnp.float32)
  plus, _ = fd_module.perturbed_pair(w, u, jnp.float32(1e-3))
  moved = np.asarray(plus, np.float64) - 1.0
  assert set(np.unique(moved)) <= {0.0, 2.0 ** -7}
  np.testing.assert_allclose(moved.mean(), 1e-3, rtol=0.1)


def test_subbatch_of_finite_difference_inside_cdat():
  loss, params, (x, y) = tiny_mlp(seed=6, n=8)
  batch_loss = lambda p, batch: loss(p, batch=(batch["x"], batch["y"]))
  batch = {"x": x, "y": y}
  rows = (x[::4], y[::4])
  g = jax.jit(jax.grad(batch_loss))(params, batch)
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature=estimators.subbatch(
      1 / 4, inner=estimators.finite_difference()))
  _, state = jax.jit(lambda g, s, p, b: opt.update(
      g, s, p, value_fn=batch_loss, batch=b))(g, opt.init(params), params,
                                               batch)
  gf = flat(g)
  h_sub = jit_hessian(lambda p: loss(p, batch=rows), params)
  np.testing.assert_allclose(optax.tree.get(state, "numerator"), gf @ gf,
                             rtol=1e-5)  # the full batch's -gᵀu
  np.testing.assert_allclose(optax.tree.get(state, "denominator"),
                             abs(gf @ h_sub @ gf), rtol=3e-3)


def test_every_and_subbatch_of_finite_difference_train_under_jit():
  loss, params, (x, y) = tiny_mlp(seed=7, n=8)
  batch = {"x": x, "y": y}
  batch_loss = lambda p, batch: loss(p, batch=(batch["x"], batch["y"]))
  est = estimators.every(3, inner=estimators.subbatch(
      1 / 2, inner=estimators.finite_difference()))
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature=est)
  step, traces = step_fn(opt, lambda p: batch_loss(p, batch),
                         value_fn=batch_loss, batch=batch)
  state = opt.init(params)
  first = float(batch_loss(params, batch))
  for _ in range(9):
    params, state = step(params, state)
  assert len(traces) == 1
  assert int(optax.tree.get(state, "num_refreshes")) == 6  # 0-1, 3-4, 6-7
  assert float(optax.tree.get(state, "length")) > 0
  assert float(batch_loss(params, batch)) < first


def test_a_custom_vjp_layer_breaks_exact_but_not_finite_difference():
  @jax.custom_vjp
  def act(z):
    return jnp.tanh(z)

  act.defvjp(lambda z: (jnp.tanh(z), z),
             lambda z, g: (g / jnp.cosh(z) ** 2,))
  loss, params, (x, y) = tiny_mlp(seed=8)
  plain = lambda p: 0.5 * jnp.mean(jnp.sum(
      (jnp.tanh(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"] - y) ** 2, -1))
  custom = lambda p: 0.5 * jnp.mean(jnp.sum(
      (act(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"] - y) ** 2, -1))
  np.testing.assert_allclose(jax.jit(plain)(params), jax.jit(loss)(params),
                             rtol=1e-6)
  g = jax.jit(jax.grad(custom))(params)
  exact = cdat_fast.cdat(optax.sgd(1.0))
  with pytest.raises(estimators.NoForwardModeError, match="finite_difference"):
    jax.jit(lambda g, s, p: exact.update(g, s, p, value_fn=custom))(
        g, exact.init(params), params)
  opt = cdat_fast.cdat(optax.sgd(1.0),
                       curvature=estimators.finite_difference())
  _, state = jax.jit(lambda g, s, p: opt.update(g, s, p, value_fn=custom))(
      g, opt.init(params), params)
  u = jax.tree.map(jnp.negative, g)
  # The upper estimate: |D| plus its estimated error (under 5%).
  error = float(optax.tree.get(state, "error"))
  assert error < 0.05
  np.testing.assert_allclose(optax.tree.get(state, "denominator"),
                             _exact(plain, params, u), rtol=2 * error + 3e-3)


def test_non_finite_losses_skip_the_step_and_never_reach_the_parameters():
  # log(w) is finite at w but NaN at w - μu for the entry at 1e-6; the loss
  # itself is NaN on the bad batch: both steps are skipped, nothing is NaN.
  f = lambda w, shift: jnp.sum(jnp.log(w)) + jnp.sum((w - 2.0) ** 2) + shift
  opt = cdat_fast.cdat(optax.sgd(1.0),
                       curvature=estimators.finite_difference())
  w = jnp.asarray([1.0, 1.5, 1e-6])
  state = opt.init(w)

  @jax.jit
  def step(w, state, shift):
    g = jax.grad(f)(w, shift)
    u, state = opt.update(g, state, w, value_fn=f, shift=shift)
    return optax.apply_updates(w, u), state

  for shift in (0.0, jnp.nan):
    w_before = w
    w, state = step(w, state, jnp.float32(shift))
    np.testing.assert_array_equal(w, w_before)
  assert int(optax.tree.get(state, "num_skipped")) == 2
  assert all(np.all(np.isfinite(np.asarray(x)))
             for x in jax.tree.leaves(state))


@pytest.mark.parametrize("kwargs, name", [
    (dict(step=0.0), "step"), (dict(step=-1e-3), "step"),
    (dict(step=2.0), "step"), (dict(step=float("nan")), "step"),
    (dict(noise=0.0), "noise"), (dict(noise=1.0), "noise"),
    (dict(max_retries=-1), "max_retries"),
    (dict(max_retries=1.5), "max_retries"),
    (dict(tolerance=-0.1), "tolerance"),
    (dict(tolerance=float("nan")), "tolerance")])
def test_bad_arguments_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name) as e:
    estimators.finite_difference(**kwargs)
  assert repr(next(iter(kwargs.values()))) in str(e.value)
