"""CDAT's own maths: closed forms on quadratics, base directions, EMA, edge cases."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from problems import explicit_hessian, flat, random_quadratic, tiny_mlp


def _one_step(opt, f, w, grads=None, **kw):
  state = opt.init(w)
  grads = jax.grad(f)(w) if grads is None else grads
  updates, state = opt.update(grads, state, w, value_fn=f, **kw)
  return optax.apply_updates(w, updates), updates, state


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_quadratic_greedy_lands_on_line_minimum(seed):
  f, a, w_star = random_quadratic(seed)
  w0 = np.random.RandomState(seed + 10).randn(5)
  w1, updates, state = _one_step(cdat_fast.quadratic_greedy(optax.sgd(1.0)), f,
                                 jnp.asarray(w0, jnp.float32))
  g = a @ (w0 - w_star)
  eta = (g @ g) / (g @ a @ g)  # exact line minimum along -g, float64
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), eta,
                             rtol=1e-4)
  np.testing.assert_allclose(w1, w0 - eta * g, rtol=1e-4, atol=1e-5)
  # Derivative along the direction vanishes at the new point.
  assert abs((a @ (np.asarray(w1) - w_star)) @ g) < 1e-3 * (g @ g)


@pytest.mark.parametrize("seed", [0, 3])
def test_on_edge_keeps_the_loss_level(seed):
  f, a, w_star = random_quadratic(seed)
  w0 = jnp.asarray(np.random.RandomState(seed).randn(5), jnp.float32)
  w1, _, state = _one_step(cdat_fast.on_edge(optax.sgd(1.0)), f, w0)
  np.testing.assert_allclose(f(w1), f(w0), rtol=1e-4)
  assert not np.allclose(w1, w0)
  # σ = 2 is exactly twice the greedy step.
  _, _, greedy = _one_step(cdat_fast.quadratic_greedy(optax.sgd(1.0)), f, w0)
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"),
                             2 * optax.tree.get(greedy, "learning_rate"),
                             rtol=1e-5)


@pytest.mark.parametrize("base", [
    optax.sgd(1.0, momentum=0.9), optax.adam(1.0), optax.rmsprop(1.0),
    optax.chain(optax.clip_by_global_norm(1.0), optax.sgd(1.0)),
], ids=["momentum", "adam", "rmsprop", "chain"])
def test_cdat_uses_the_base_direction(base):
  loss, params, _ = tiny_mlp(seed=2)
  opt = cdat_fast.cdat(base, scale=1.5, eps=1e-3)
  state = opt.init(params)
  base_state = base.init(params)
  h = explicit_hessian(loss, params)
  for _ in range(3):
    grads = jax.grad(loss)(params)
    u, base_state = base.update(grads, base_state, params)
    uf, gf = flat(u), flat(grads)
    eta = 1.5 * max(-gf @ uf, 0) / (abs(uf @ h @ uf) + 1e-3)
    updates, state = opt.update(grads, state, params, value_fn=loss)
    np.testing.assert_allclose(flat(updates), eta * uf, rtol=2e-4, atol=1e-7)
    np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), eta,
                               rtol=2e-4)
    params = optax.apply_updates(params, updates)
    h = explicit_hessian(loss, params)


def test_ema_of_numerator_and_denominator():
  loss, params, _ = tiny_mlp(seed=3)
  beta = 0.9
  opt = cdat_fast.cdat(optax.sgd(1.0), scale=2.0, ema=beta)
  state = opt.init(params)
  num = den = 0.0
  for _ in range(4):
    g = jax.grad(loss)(params)
    gf = flat(g)
    d = abs(gf @ explicit_hessian(loss, params) @ gf)
    num = beta * num + (1 - beta) * (gf @ gf)
    den = beta * den + (1 - beta) * d
    updates, state = opt.update(g, state, params, value_fn=loss)
    np.testing.assert_allclose(optax.tree.get(state, "numerator"), num,
                               rtol=1e-4)
    np.testing.assert_allclose(optax.tree.get(state, "denominator"), den,
                               rtol=1e-4)
    np.testing.assert_allclose(optax.tree.get(state, "learning_rate"),
                               2.0 * num / den, rtol=2e-4)
    params = optax.apply_updates(params, updates)


def test_ascent_direction_gives_zero_learning_rate():
  f, _, _ = random_quadratic(0)
  w0 = jnp.ones(5)
  # sgd(-1.0) moves along +g: an ascent direction.
  w1, updates, state = _one_step(cdat_fast.cdat(optax.sgd(-1.0)), f, w0)
  assert float(optax.tree.get(state, "learning_rate")) == 0.0
  np.testing.assert_array_equal(w1, w0)
  assert int(optax.tree.get(state, "num_skipped")) == 0


def test_negative_curvature_uses_absolute_value():
  f, a, w_star = random_quadratic(4, indefinite=True)
  neg = lambda w: -f(w) + 0.0 * jnp.sum(w)  # concave: uᵀHu < 0 everywhere
  w0 = np.random.RandomState(5).randn(5)
  _, _, state = _one_step(cdat_fast.cdat(optax.sgd(1.0), scale=1.0), neg,
                          jnp.asarray(w0, jnp.float32))
  g = -(a @ (w0 - w_star))
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"),
                             (g @ g) / abs(g @ (-a) @ g), rtol=1e-4)


def test_zero_direction_and_zero_denominator_are_safe():
  f = lambda w: jnp.sum(w ** 2)
  w0 = jnp.zeros(3)  # gradient 0: direction 0, numerator 0, curvature 0
  w1, updates, state = _one_step(cdat_fast.cdat(optax.sgd(1.0)), f, w0)
  assert np.all(np.isfinite(updates))
  np.testing.assert_array_equal(w1, w0)
  assert int(optax.tree.get(state, "num_skipped")) == 1
  # Linear objective: positive numerator, zero curvature, eps = 0.
  lin = lambda w: jnp.sum(w)
  w1, updates, state = _one_step(cdat_fast.cdat(optax.sgd(1.0)), lin, w0)
  assert np.all(np.isfinite(updates)) and np.all(updates == 0)
  assert int(optax.tree.get(state, "num_skipped")) == 1
  # With eps > 0 the same step is finite and nonzero.
  _, updates, state = _one_step(cdat_fast.cdat(optax.sgd(1.0), eps=1.0), lin,
                                w0)
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"), 2 * 3.0)


@pytest.mark.parametrize("bad", [jnp.nan, jnp.inf])
def test_non_finite_gradient_skips_step_and_keeps_ema(bad):
  loss, params, _ = tiny_mlp(seed=0)
  opt = cdat_fast.cdat(optax.sgd(1.0), ema=0.9)
  state = opt.init(params)
  g = jax.grad(loss)(params)
  _, state = opt.update(g, state, params, value_fn=loss)
  before = state
  g_bad = jax.tree.map(lambda x: x.at[..., 0].set(bad), g)
  updates, state = opt.update(g_bad, state, params, value_fn=loss)
  assert all(np.all(u == 0) for u in jax.tree.leaves(updates))
  assert int(optax.tree.get(state, "num_skipped")) == 1
  assert float(optax.tree.get(state, "learning_rate")) == 0.0
  np.testing.assert_array_equal(optax.tree.get(state, "numerator"),
                                optax.tree.get(before, "numerator"))
  np.testing.assert_array_equal(optax.tree.get(state, "denominator"),
                                optax.tree.get(before, "denominator"))


def test_non_finite_loss_skips_step():
  f = lambda w: jnp.sum(w ** 2) + jnp.log(w[0])  # NaN for w[0] < 0
  w0 = jnp.asarray([-1.0, 2.0])
  grads = jnp.asarray([1.0, 1.0])
  w1, updates, state = _one_step(cdat_fast.cdat(optax.sgd(1.0)), f, w0,
                                 grads=grads)
  np.testing.assert_array_equal(w1, w0)
  assert int(optax.tree.get(state, "num_skipped")) == 1


@pytest.mark.parametrize("kwargs, name", [
    (dict(scale=0.0), "scale"), (dict(scale=-1.0), "scale"),
    (dict(ema=1.0), "ema"), (dict(ema=-0.1), "ema"), (dict(eps=-1e-3), "eps"),
    (dict(scale=float("nan")), "scale"),
])
def test_bad_hyperparameters_name_the_argument(kwargs, name):
  with pytest.raises(ValueError, match=name):
    cdat_fast.cdat(optax.sgd(1.0), **kwargs)
  with pytest.raises(ValueError, match=name):
    cdat_fast.scale_by_cdat(**{"scale": 2.0, **kwargs})


def test_missing_value_fn_is_named():
  opt = cdat_fast.cdat(optax.sgd(1.0))
  w = jnp.ones(2)
  with pytest.raises(TypeError, match="value_fn"):
    opt.update(w, opt.init(w), w)


def test_bad_base_is_named():
  with pytest.raises(TypeError, match="base"):
    cdat_fast.cdat(0.1)


def test_presets_fix_the_scale():
  with pytest.raises(TypeError, match="scale"):
    cdat_fast.on_edge(optax.sgd(1.0), scale=3.0)


def test_chainable_form_with_and_without_grad():
  loss, params, _ = tiny_mlp(seed=4)
  g = jax.grad(loss)(params)
  reference, _ = cdat_fast.cdat(optax.adam(1.0), ema=0.5).update(
      g, cdat_fast.cdat(optax.adam(1.0), ema=0.5).init(params), params,
      value_fn=loss)
  chained = optax.chain(optax.adam(1.0), cdat_fast.scale_by_cdat(ema=0.5))
  for kw in (dict(grad=g), {}):
    updates, _ = chained.update(g, chained.init(params), params, value_fn=loss,
                                **kw)
    np.testing.assert_allclose(flat(updates), flat(reference), rtol=1e-5)


def test_extra_args_are_routed_to_value_fn():
  loss, params, (x, y) = tiny_mlp(seed=5)
  opt = cdat_fast.cdat(optax.sgd(1.0))
  half = (x[:3], y[:3])
  g = jax.grad(loss)(params, batch=half)
  u_batch, s1 = opt.update(g, opt.init(params), params, value_fn=loss,
                           batch=half, unused_by_value_fn=1.0)
  sub = lambda p: loss(p, batch=half)
  u_closed, s2 = opt.update(g, opt.init(params), params, value_fn=sub)
  np.testing.assert_allclose(flat(u_batch), flat(u_closed), rtol=1e-6)
  u_full, _ = opt.update(g, opt.init(params), params, value_fn=loss)
  assert not np.allclose(flat(u_full), flat(u_batch))


def test_inject_hyperparams_and_jit_compile_once():
  loss, params, _ = tiny_mlp(seed=6)
  opt = optax.inject_hyperparams(cdat_fast.cdat)(
      base=optax.sgd(1.0), scale=2.0, ema=0.0, eps=0.0)
  state = opt.init(params)
  traces = []

  @jax.jit
  def step(params, state):
    traces.append(1)
    g = jax.grad(loss)(params)
    u, state = opt.update(g, state, params, value_fn=loss)
    return optax.apply_updates(params, u), state

  p1, s1 = step(params, state)
  s1.hyperparams["scale"] = jnp.array(1.0, dtype=jnp.float32)
  p2, s2 = step(p1, s1)
  assert len(traces) == 1
  g = flat(jax.grad(loss)(p1))
  eta = (g @ g) / (g @ explicit_hessian(loss, p1) @ g)
  np.testing.assert_allclose(optax.tree.get(s2.inner_state, "learning_rate"),
                             eta, rtol=1e-4)


def test_state_dtypes_are_float32_with_bf16_params():
  loss, params, _ = tiny_mlp(seed=7)
  params = jax.tree.map(lambda x: x.astype(jnp.bfloat16), params)
  lossb = lambda p: loss(jax.tree.map(lambda x: x.astype(jnp.float32), p))
  opt = cdat_fast.cdat(optax.sgd(1.0), ema=0.9)
  state = opt.init(params)
  u, new_state = jax.jit(lambda p, s: opt.update(
      jax.grad(lossb)(p), s, p, value_fn=lossb))(params, state)
  assert jax.tree.map(lambda x: x.dtype, new_state) == jax.tree.map(
      lambda x: x.dtype, state)
  assert optax.tree.get(state, "learning_rate").dtype == jnp.float32
  assert all(x.dtype == jnp.bfloat16 for x in jax.tree.leaves(u))
  assert float(optax.tree.get(new_state, "learning_rate")) > 0
