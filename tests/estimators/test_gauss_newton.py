"""cdat_fast.estimators.gauss_newton: against the explicit JᵀHJ form."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators import gauss_newton_derivatives
from problems import digits_mlp, flat, jit_hessian, step_fn, tiny_net

INF = float("inf")


def test_gauss_newton_equals_exact_on_a_linear_model_with_squared_loss():
  rng = np.random.RandomState(0)
  x = jnp.asarray(rng.randn(7, 4), jnp.float32)
  y = jnp.asarray(rng.randn(7, 2), jnp.float32)
  model_fn = lambda p: x @ p["w"] + p["b"]
  loss_fn = lambda z: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, -1))
  loss = lambda p: loss_fn(model_fn(p))
  params = {"w": jnp.asarray(rng.randn(4, 2), jnp.float32),
            "b": jnp.zeros(2)}
  gn = cdat_fast.cdat(optax.adam(1.0), curvature="gauss_newton")
  ex = cdat_fast.cdat(optax.adam(1.0))
  gs, es = gn.init(params), ex.init(params)
  pg = pe = params
  for _ in range(3):
    ug, gs = gn.update(jax.grad(loss)(pg), gs, pg, model_fn=model_fn,
                       loss_fn=loss_fn)
    ue, es = ex.update(jax.grad(loss)(pe), es, pe, value_fn=loss)
    np.testing.assert_allclose(optax.tree.get(gs, "denominator"),
                               optax.tree.get(es, "denominator"), rtol=1e-5)
    np.testing.assert_allclose(flat(ug), flat(ue), rtol=1e-5, atol=1e-7)
    pg, pe = optax.apply_updates(pg, ug), optax.apply_updates(pe, ue)


@pytest.mark.parametrize("loss_name", ["squared", "cross_entropy"])
def test_gauss_newton_equals_the_explicit_matrix_form(loss_name):
  params, model_fn, loss_fn, _ = tiny_net(seed=3, loss=loss_name)
  flat_p, unravel = jax.flatten_util.ravel_pytree(params)
  z = model_fn(params)
  jac = np.asarray(jax.jit(jax.jacobian(
      lambda v: model_fn(unravel(v)).ravel()))(flat_p), np.float64)
  h_loss = jit_hessian(lambda zz: loss_fn(zz.reshape(z.shape)), z.ravel())
  gn_matrix = jac.T @ h_loss @ jac
  loss = lambda p: loss_fn(model_fn(p))
  u = jax.tree.map(lambda x: -x, jax.grad(loss)(params))
  value, slope, curv = gauss_newton_derivatives(model_fn, loss_fn, params, u)
  uf = flat(u)
  np.testing.assert_allclose(curv, uf @ gn_matrix @ uf, rtol=1e-4)
  np.testing.assert_allclose(slope, -(uf @ uf), rtol=1e-5)
  np.testing.assert_allclose(value, loss(params), rtol=1e-6)
  # ... and it differs from the exact curvature of the nonlinear net.
  _, _, exact = directional_derivatives(loss, params, u)
  assert not np.isclose(curv, exact, rtol=1e-3)
  # Through cdat: η = σ (-gᵀu) / uᵀGu.
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature="gauss_newton")
  _, state = opt.update(jax.grad(loss)(params), opt.init(params), params,
                        model_fn=model_fn, loss_fn=loss_fn)
  np.testing.assert_allclose(optax.tree.get(state, "learning_rate"),
                             2.0 * (uf @ uf) / (uf @ gn_matrix @ uf),
                             rtol=1e-4)


def test_gauss_newton_routes_extra_args_and_includes_weight_decay():
  params, _, _, (x, labels) = tiny_net(seed=4)

  def model_fn(p, batch):
    logits = jnp.tanh(batch[0] @ p["w0"] + p["b0"]) @ p["w1"]
    return logits, p  # the parameters too, for the weight decay

  def loss_fn(out, batch):
    logits, p = out
    onehot = jax.nn.one_hot(batch[1], 3)
    return (0.5 * jnp.mean(jnp.sum((logits - onehot) ** 2, -1))
            + 0.5 * 0.1 * optax.tree.norm(p, squared=True))

  half = (x[:3], labels[:3])
  loss = lambda p: loss_fn(model_fn(p, half), half)
  g = jax.grad(loss)(params)
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature="gauss_newton")
  _, state = opt.update(g, opt.init(params), params, model_fn=model_fn,
                        loss_fn=loss_fn, batch=half, unrelated=1)
  u = jax.tree.map(lambda t: -t, g)
  _, _, gn_no_decay = gauss_newton_derivatives(
      lambda p: model_fn(p, half)[0],
      lambda z: 0.5 * jnp.mean(jnp.sum((z - jax.nn.one_hot(half[1], 3)) ** 2,
                                       -1)), params, u)
  # The identity branch of the outputs adds exactly μ‖u‖².
  np.testing.assert_allclose(
      optax.tree.get(state, "denominator"),
      gn_no_decay + 0.1 * optax.tree.norm(u, squared=True), rtol=1e-5)


@pytest.mark.parametrize("missing", ["model_fn", "loss_fn"])
def test_gauss_newton_names_the_missing_argument(missing):
  params, model_fn, loss_fn, _ = tiny_net()
  kw = {"model_fn": model_fn, "loss_fn": loss_fn}
  del kw[missing]
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature="gauss_newton")
  loss = lambda p: loss_fn(model_fn(p))
  with pytest.raises(TypeError, match=missing):
    opt.update(jax.grad(loss)(params), opt.init(params), params,
               value_fn=loss, **kw)


def test_exact_and_secant_accept_model_and_loss_instead_of_value_fn():
  params, model_fn, loss_fn, _ = tiny_net(seed=5)
  loss = lambda p: loss_fn(model_fn(p))
  g = jax.grad(loss)(params)
  for kw in ({}, dict(curvature="secant"), dict(every=3)):
    opt = cdat_fast.cdat(optax.sgd(1.0), **kw)
    ref, _ = opt.update(g, opt.init(params), params, value_fn=loss)
    mine, _ = opt.update(g, opt.init(params), params, model_fn=model_fn,
                         loss_fn=loss_fn)
    np.testing.assert_allclose(flat(mine), flat(ref), rtol=1e-6)


def test_gauss_newton_every_k_trains_the_digits_mlp():
  init, _ = digits_mlp(n=64, width=16)
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top
  digits = load_digits()
  x = jnp.asarray(digits.data[:64] / 16.0, jnp.float32)
  y = jax.nn.one_hot(digits.target[:64], 10)
  model_fn = lambda p: jax.nn.relu(x @ p["w0"] + p["b0"]) @ p["w1"] + p["b1"]
  loss_fn = lambda z: 0.5 * jnp.mean(jnp.sum((z - y) ** 2, -1))
  loss = lambda p: loss_fn(model_fn(p))
  opt = cdat_fast.cdat(optax.sgd(1.0), curvature="gauss_newton", every=5)
  step, traces = step_fn(opt, loss, model_fn=model_fn, loss_fn=loss_fn)
  params = init(jax.random.key(1))
  state = opt.init(params)
  first = float(loss(params))
  for _ in range(40):
    params, state = step(params, state)
  assert len(traces) == 1
  assert float(loss(params)) < 0.5 * first
  assert int(optax.tree.get(state, "num_refreshes")) < 40
