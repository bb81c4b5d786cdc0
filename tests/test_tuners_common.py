"""One table of every tuner through the same generic checks.

Extra arguments accepted and routed, a jitted step compiles once, convergence
on a parabola and on Rosenbrock, the learning rate readable from the state,
and no NaN or Inf in the parameters on the edge cases.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast



def _gauss_newton_from_value_fn(opt):
  """Gauss–Newton CDAT fed ``model_fn = identity``, ``loss_fn = value_fn``.

  The Gauss–Newton form of ``ℓ ∘ id`` is the exact curvature, so this runs the
  Gauss–Newton code path through the generic checks below (which pass
  ``value_fn``); its own maths is tested in test_cdat_estimators.
  """
  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    return opt.update(updates, state, params, model_fn=lambda p: p,
                      loss_fn=value_fn, **extra_args)
  return optax.GradientTransformationExtraArgs(opt.init, update_fn)


# (name, factory, steps for Rosenbrock). σ < 2 for the convergence checks: at
# σ = 2 a quadratic's loss stays level by design (see test_cdat).
TUNERS = {
    "quadratic_greedy": lambda: cdat_fast.quadratic_greedy(optax.sgd(1.0)),
    "cdat_1.9": lambda: cdat_fast.cdat(optax.sgd(1.0), scale=1.9),
    "cdat_momentum_ema": lambda: cdat_fast.cdat(
        optax.sgd(1.0, momentum=0.9), scale=1.0, ema=0.9),
    "cdat_adam_ema": lambda: cdat_fast.cdat(optax.adam(1.0), scale=1.0,
                                            ema=0.9),
    "on_edge_ema": lambda: cdat_fast.on_edge(optax.adam(1.0), ema=0.99,
                                             eps=1e-8),
    "cdat_every3": lambda: cdat_fast.cdat(optax.sgd(1.0), scale=1.9, every=3),
    "cdat_secant": lambda: cdat_fast.cdat(optax.sgd(1.0), scale=1.9,
                                          curvature="secant"),
    "cdat_gauss_newton_every3": lambda: _gauss_newton_from_value_fn(
        cdat_fast.cdat(optax.sgd(1.0), scale=1.9, curvature="gauss_newton",
                       every=3)),
    "backtracking": lambda: cdat_fast.backtracking_linesearch(optax.sgd(1.0)),
    "backtracking_c+4": lambda: cdat_fast.backtracking_linesearch(
        optax.sgd(1.0), c=0.5, increase_factor=4.0, decrease_factor=0.9),
    "polyak": lambda: cdat_fast.polyak(optax.sgd(1.0), max_learning_rate=100.0),
    "hypergradient": lambda: cdat_fast.hypergradient(
        optax.sgd(1.0), learning_rate=1e-3, beta=0.1),
    "sharpness_rule": lambda: cdat_fast.sharpness_rule(optax.sgd(1.0),
                                                       scale=1.0),
}
NAMES = sorted(TUNERS)
# Hypergradient has no safeguard: on Rosenbrock its multiplicative growth of η
# overshoots into the steep walls unless β is tiny.
ROSENBROCK = {**TUNERS, "hypergradient": lambda: cdat_fast.hypergradient(
    optax.sgd(1.0), learning_rate=1e-4, beta=1e-3)}


def parabola(w, scale=1.0):
  return scale * (0.5 * w[0] ** 2 + 2.0 * w[1] ** 2 + 0.1 * w[0] * w[1])


def rosenbrock(w):
  return (1.0 - w[0]) ** 2 + 100.0 * (w[1] - w[0] ** 2) ** 2


def _runner(opt, f, steps):
  """A jitted scan of ``steps`` tuner steps, traced once."""
  traces = []

  @jax.jit
  def run(w):
    traces.append(1)

    def body(carry, _):
      w, state = carry
      value, g = jax.value_and_grad(f)(w)
      updates, state = opt.update(g, state, w, value_fn=f, value=value)
      return (optax.apply_updates(w, updates), state), value

    (w, state), values = jax.lax.scan(body, (w, opt.init(w)), None,
                                      length=steps)
    return w, state, values

  return run, traces


@pytest.mark.parametrize("name", NAMES)
def test_converges_on_parabola(name):
  run, _ = _runner(TUNERS[name](), parabola, 300)
  w, state, _ = run(jnp.asarray([3.0, -2.0]))
  assert float(parabola(w)) < 1e-4 * float(parabola(jnp.asarray([3.0, -2.0])))
  assert float(optax.tree.get(state, "learning_rate")) >= 0


@pytest.mark.parametrize("name", NAMES)
def test_makes_progress_on_rosenbrock(name):
  run, _ = _runner(ROSENBROCK[name](), rosenbrock, 2000)
  w0 = jnp.asarray([-1.2, 1.0])
  w, _, values = run(w0)
  assert np.all(np.isfinite(values))
  assert float(rosenbrock(w)) < 0.1 * float(rosenbrock(w0))


@pytest.mark.parametrize("name", NAMES)
def test_step_compiles_once_and_routes_extra_args(name):
  opt = TUNERS[name]()
  f = lambda w, scale: parabola(w, scale)
  traces = []

  @jax.jit
  def step(w, state, scale):
    traces.append(1)
    g = jax.grad(f)(w, scale)
    updates, state = opt.update(g, state, w, value_fn=f, scale=scale,
                                unrelated=1)
    return optax.apply_updates(w, updates), state

  w = jnp.asarray([1.0, 1.0])
  state = opt.init(w)
  dtypes = jax.tree.map(lambda x: x.dtype, state)
  for s in (1.0, 2.0, 3.0):
    w, state = step(w, state, jnp.asarray(s))
  assert len(traces) == 1
  assert jax.tree.map(lambda x: x.dtype, state) == dtypes
  assert np.all(np.isfinite(w))


@pytest.mark.parametrize("name", NAMES)
def test_edge_cases_never_write_nan(name):
  opt = TUNERS[name]()
  cases = {
      "zero_gradient": (lambda w: jnp.sum(w ** 2), jnp.zeros(2), None),
      "linear": (lambda w: jnp.sum(w), jnp.ones(2), None),
      "nan_gradient": (lambda w: jnp.sum(w ** 2), jnp.ones(2),
                       jnp.asarray([jnp.nan, 1.0])),
      "inf_gradient": (lambda w: jnp.sum(w ** 2), jnp.ones(2),
                       jnp.asarray([jnp.inf, 1.0])),
      "nan_loss": (lambda w: jnp.sum(w ** 2) * jnp.nan, jnp.ones(2), None),
      "concave": (lambda w: -jnp.sum(w ** 2), jnp.ones(2), None),
  }
  for case, (f, w, g) in cases.items():
    state = opt.init(w)
    for _ in range(2):
      grads = jax.grad(f)(w) if g is None else g
      updates, state = opt.update(grads, state, w, value_fn=f)
      new_w = optax.apply_updates(w, updates)
      assert np.all(np.isfinite(new_w)), (case, new_w)
      eta = optax.tree.get(state, "learning_rate")
      assert np.isfinite(eta) and eta >= 0, (case, eta)


@pytest.mark.parametrize("name", NAMES)
def test_inside_chain_and_learning_rate_readable(name):
  opt = optax.chain(optax.clip_by_global_norm(10.0), TUNERS[name]())
  w = jnp.asarray([1.0, -1.0])
  updates, state = opt.update(jax.grad(parabola)(w), opt.init(w), w,
                              value_fn=parabola)
  assert float(optax.tree.get(state, "learning_rate")) > 0
  # σ = 2 keeps a quadratic's loss level; every other tuner decreases it.
  assert float(parabola(optax.apply_updates(w, updates))) <= float(
      parabola(w)) * (1 + 1e-5)


# Hypergradient never evaluates value_fn when it has the gradient.
@pytest.mark.parametrize("name", [n for n in NAMES if n != "hypergradient"])
def test_a_vector_objective_is_an_error_that_names_it(name):
  # A vector loss would otherwise become a vector learning rate that scales
  # the update entry by entry.
  opt = TUNERS[name]()
  w = jnp.array([0.5, -1.0, 2.0])
  vector_loss = lambda w: (w - 1.0) ** 2
  with pytest.raises(ValueError, match="(value_fn|loss_fn) must return a"
                     " scalar loss, got an array of shape \\(3,\\)"):
    opt.update(jax.grad(lambda w: jnp.sum(vector_loss(w)))(w), opt.init(w), w,
               value_fn=vector_loss)
