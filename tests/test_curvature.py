"""Reference curvature against explicit Hessians of tiny problems."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import cdat_fast
from problems import explicit_hessian, flat, random_quadratic, tiny_mlp


@pytest.fixture(scope="module")
def mlp():
  return tiny_mlp(seed=1)


def test_directional_derivatives_match_explicit_hessian(mlp):
  loss, params, _ = mlp
  u = optax.tree.random_like(jax.random.PRNGKey(3), params)
  f, df, d2f = jax.jit(cdat_fast.directional_derivatives, static_argnums=0)(
      loss, params, u)
  h = explicit_hessian(loss, params)
  g = flat(jax.grad(loss)(params))
  uf = flat(u)
  np.testing.assert_allclose(f, float(loss(params)), rtol=1e-6)
  np.testing.assert_allclose(df, g @ uf, rtol=1e-4)
  np.testing.assert_allclose(d2f, uf @ h @ uf, rtol=1e-4)


def test_directional_curvature_matches_hvp(mlp):
  loss, params, _ = mlp
  u = optax.tree.random_like(jax.random.PRNGKey(4), params)
  _, _, d2f = cdat_fast.directional_derivatives(loss, params, u)
  hu = cdat_fast.hvp(loss, params, u)
  np.testing.assert_allclose(d2f, optax.tree.vdot(u, hu), rtol=1e-4)
  np.testing.assert_allclose(flat(hu), explicit_hessian(loss, params) @ flat(u),
                             rtol=1e-4, atol=1e-6)


def test_directional_derivatives_on_quadratic_closed_form():
  f, a, w_star = random_quadratic(0)
  w = jnp.zeros(5)
  u = jnp.arange(5.0) - 2.0
  value, slope, curv = cdat_fast.directional_derivatives(f, w, u)
  un = np.arange(5.0) - 2.0
  np.testing.assert_allclose(value, 0.5 * w_star @ a @ w_star, rtol=1e-5)
  np.testing.assert_allclose(slope, (a @ (-w_star)) @ un, rtol=1e-5)
  np.testing.assert_allclose(curv, un @ a @ un, rtol=1e-5)


def _top(eigs):
  return eigs[np.argmax(np.abs(eigs))]


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_sharpness_matches_eigvalsh(mlp, method):
  loss, params, _ = mlp
  h = explicit_hessian(loss, params)
  eigs, vecs = np.linalg.eigh(h)
  res = cdat_fast.sharpness(loss, params, method=method, rtol=1e-6)
  np.testing.assert_allclose(res.eigenvalue, _top(eigs), rtol=2e-3)
  v = flat(res.eigenvector)
  np.testing.assert_allclose(np.linalg.norm(v), 1.0, rtol=1e-4)
  # An eigenvector: the Rayleigh residual is small relative to λ.
  resid = np.linalg.norm(h @ v - res.eigenvalue * v) / abs(res.eigenvalue)
  assert resid < 0.1


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_sharpness_finds_negative_top_eigenvalue(method):
  f, a, _ = random_quadratic(2, dim=6, indefinite=True)
  a_neg = a - 12 * np.eye(6)
  a32 = jnp.asarray(a_neg, jnp.float32)
  g = lambda w: 0.5 * w @ (a32 @ w)
  res = cdat_fast.sharpness(g, jnp.zeros(6), method=method, rtol=1e-7,
                            num_iters=2000 if method == "power" else None)
  np.testing.assert_allclose(res.eigenvalue, _top(np.linalg.eigvalsh(a_neg)),
                             rtol=1e-3)


@pytest.mark.parametrize("method", ["power", "lanczos"])
def test_preconditioned_sharpness(mlp, method):
  loss, params, _ = mlp
  p = optax.tree.random_like(jax.random.PRNGKey(7), params)
  p = jax.tree.map(lambda x: 0.5 + jnp.abs(x), p)
  h = explicit_hessian(loss, params)
  d = 1.0 / np.sqrt(flat(p))
  eigs = np.linalg.eigvalsh(d[:, None] * h * d[None, :])
  res = cdat_fast.sharpness(loss, params, preconditioner=p, method=method,
                            rtol=1e-6)
  np.testing.assert_allclose(res.eigenvalue, _top(eigs), rtol=2e-3)


def test_preconditioner_from_adam_state(mlp):
  loss, params, _ = mlp
  opt = optax.adam(1.0, b2=0.99, eps=1e-3)
  state = opt.init(params)
  for _ in range(3):
    _, state = opt.update(jax.grad(loss)(params), state, params)
  nu = optax.tree.get(state, "nu")
  p = cdat_fast.preconditioner_from_state(state, eps=1e-3, b2=0.99)
  expected = jax.tree.map(lambda n: np.sqrt(n / (1 - 0.99 ** 3)) + 1e-3, nu)
  np.testing.assert_allclose(flat(p), flat(expected), rtol=1e-5)
  # An optimizer state is also accepted directly (no bias correction).
  h = explicit_hessian(loss, params)
  d = 1.0 / np.sqrt(flat(jax.tree.map(lambda n: np.sqrt(n) + 1e-8, nu)))
  top = _top(np.linalg.eigvalsh(d[:, None] * h * d[None, :]))
  res = cdat_fast.sharpness(loss, params, preconditioner=state,
                            method="lanczos")
  np.testing.assert_allclose(res.eigenvalue, top, rtol=2e-3)


def test_preconditioner_from_state_without_nu():
  with pytest.raises(ValueError, match="nu"):
    cdat_fast.preconditioner_from_state(optax.sgd(1.0).init(jnp.zeros(2)))


def test_sharpness_rejects_bad_arguments(mlp):
  loss, params, _ = mlp
  with pytest.raises(ValueError, match="method"):
    cdat_fast.sharpness(loss, params, method="arnoldi")
  with pytest.raises(ValueError, match="num_iters"):
    cdat_fast.sharpness(loss, params, num_iters=0)
