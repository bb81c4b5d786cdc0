"""Hessian diagnostics (top-k, SLQ density, Hutchinson trace) against explicit
Hessians of tiny nets, in float64 numpy."""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from cdat_fast import diagnostics
from cdat_fast.curvature import hessian_operator, lanczos_tridiagonal
from problems import flat, jit_hessian, tiny_mlp


@pytest.fixture(scope="module")
def mlp():
  loss, params, _ = tiny_mlp(seed=1, sizes=(3, 5, 2))  # 32 parameters
  h = jit_hessian(loss, params)
  return loss, params, h


def _expected(eigs, which, k):
  if which == "largest":
    return np.sort(eigs)[::-1][:k]
  if which == "smallest":
    return np.sort(eigs)[:k]
  return eigs[np.argsort(-np.abs(eigs))][:k]


def _rows(tree, k):
  """The k vectors of a stacked pytree as a [k, n] float64 matrix."""
  return np.stack([flat(jax.tree.map(lambda x: x[i], tree)) for i in range(k)])


def _check_pairs(res, a, which, k, rtol):
  eigs = np.linalg.eigvalsh(a)
  scale = np.max(np.abs(eigs))
  np.testing.assert_allclose(res.eigenvalues, _expected(eigs, which, k),
                             atol=rtol * scale)
  vecs = _rows(res.eigenvectors, k)
  np.testing.assert_allclose(vecs @ vecs.T, np.eye(k), atol=1e-4)
  resid = a @ vecs.T - vecs.T * np.asarray(res.eigenvalues)[None, :]
  assert np.max(np.linalg.norm(resid, axis=0)) < 1e-3 * scale


@pytest.mark.parametrize("which", ["largest", "smallest", "magnitude"])
def test_top_eigenvalues_match_eigh(mlp, which):
  loss, params, h = mlp
  res = diagnostics.top_eigenvalues(loss, params, 4, key=jax.random.key(0),
                                    which=which)
  assert res.eigenvalues.shape == (4,)
  assert jax.tree.structure(res.eigenvectors) == jax.tree.structure(params)
  _check_pairs(res, h, which, 4, rtol=1e-4)


def test_top_eigenvalues_with_fewer_iterations_than_dimensions(mlp):
  loss, params, h = mlp
  # 20 of 32 Krylov steps: the top two Ritz values have converged.
  res = diagnostics.top_eigenvalues(loss, params, 2, key=jax.random.key(1),
                                    num_iters=20)
  _check_pairs(res, h, "largest", 2, rtol=1e-3)


def test_top_eigenvalues_preconditioned(mlp):
  loss, params, h = mlp
  p = jax.tree.map(lambda x: 0.5 + jnp.abs(x),
                   optax.tree.random_like(jax.random.key(7), params))
  d = 1.0 / np.sqrt(flat(p))
  a = d[:, None] * h * d[None, :]
  res = diagnostics.top_eigenvalues(loss, params, 3, key=jax.random.key(2),
                                    preconditioner=p)
  _check_pairs(res, a, "largest", 3, rtol=1e-4)


def test_top_eigenvalues_finds_repeated_eigenvalues():
  # A Krylov space from one vector holds one copy of 5.0; the restart on the
  # invariant space finds the other two (without it: zeros or 2.0).
  d = {"a": jnp.asarray([5.0, 1.0, 5.0]), "b": jnp.asarray([[2.0, 5.0],
                                                            [0.5, 3.0]])}
  f = lambda w: 0.5 * sum(jnp.sum(d[k] * w[k] ** 2) for k in w)
  w = jax.tree.map(jnp.zeros_like, d)
  res = diagnostics.top_eigenvalues(f, w, 4, key=jax.random.key(3))
  np.testing.assert_allclose(res.eigenvalues, [5.0, 5.0, 5.0, 3.0], rtol=1e-5)
  res = diagnostics.top_eigenvalues(f, w, 2, key=jax.random.key(3),
                                    which="smallest")
  np.testing.assert_allclose(res.eigenvalues, [0.5, 1.0], rtol=1e-5)


def test_lanczos_tridiagonal_is_an_orthonormal_decomposition(mlp):
  loss, params, h = mlp
  res = lanczos_tridiagonal(hessian_operator(loss, params),
                            optax.tree.random_like(jax.random.key(4), params),
                            10)
  v = _rows(res.basis, 11)
  np.testing.assert_allclose(v @ v.T, np.eye(11), atol=1e-5)
  np.testing.assert_allclose(v[:10] @ h @ v[:10].T, res.tridiagonal(),
                             atol=1e-5 * np.abs(h).max())


def test_jit_and_errors(mlp):
  loss, params, h = mlp
  res = jax.jit(lambda p, key: diagnostics.top_eigenvalues(
      loss, p, 2, key=key))(params, jax.random.key(5))
  _check_pairs(res, h, "largest", 2, rtol=1e-4)
  # sharpness's Lanczos shares the iteration, and jits too.
  from cdat_fast.curvature import sharpness
  lam = jax.jit(lambda p: sharpness(loss, p, method="lanczos").eigenvalue)(
      params)
  eigs = np.linalg.eigvalsh(h)
  np.testing.assert_allclose(lam, eigs[np.argmax(np.abs(eigs))], rtol=1e-4)
  with pytest.raises(ValueError, match="key"):
    diagnostics.top_eigenvalues(loss, params, 2)
  with pytest.raises(ValueError, match="which"):
    diagnostics.top_eigenvalues(loss, params, key=jax.random.key(0),
                                which="biggest")
  with pytest.raises(ValueError, match="k must"):
    diagnostics.top_eigenvalues(loss, params, 40, key=jax.random.key(0))
  with pytest.raises(ValueError, match="k must"):
    diagnostics.top_eigenvalues(loss, params, 0, key=jax.random.key(0))


# -- stochastic Lanczos quadrature --------------------------------------------


def _probes(key, params, n, distribution):
  keys = jax.random.split(key, n)
  return [flat(diagnostics.random_probe(k, params, distribution))
          for k in keys]


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_slq_is_gauss_quadrature_of_each_probe(mlp, distribution):
  # m nodes integrate polynomials of degree <= 2m - 1 exactly:
  # Σ_j τ_j θ_j^p = v̂ᵀ H^p v̂ for the probe's unit vector v̂.
  loss, params, h = mlp
  key, m = jax.random.key(6), 4
  dens = diagnostics.spectral_density(loss, params, key=key, num_probes=3,
                                      num_iters=m, distribution=distribution)
  assert dens.nodes.shape == dens.weights.shape == (3, m)
  scale = np.abs(np.linalg.eigvalsh(h)).max()
  for row, v in enumerate(_probes(key, params, 3, distribution)):
    v = v / np.linalg.norm(v)
    theta = np.asarray(dens.nodes[row], np.float64)
    tau = np.asarray(dens.weights[row], np.float64)
    hp_v = v.copy()
    for p in range(2 * m):
      np.testing.assert_allclose(tau @ theta ** p, v @ hp_v,
                                 atol=1e-4 * scale ** p)
      hp_v = h @ hp_v


def test_slq_full_krylov_support_mean_and_integral(mlp):
  loss, params, h = mlp
  n = h.shape[0]
  eigs = np.linalg.eigvalsh(h)
  num_probes = 40
  dens = jax.jit(lambda p, key: diagnostics.spectral_density(
      loss, p, key=key, num_probes=num_probes, num_iters=n))(
          params, jax.random.key(8))
  np.testing.assert_allclose(np.sum(dens.weights, axis=1), 1.0, rtol=1e-5)
  # m = n: every probe's nodes are the eigenvalues; the support is the
  # spectrum's and no node lies outside it.
  spread = eigs[-1] - eigs[0]
  lo, hi = dens.support()
  np.testing.assert_allclose([lo, hi], [eigs[0], eigs[-1]],
                             atol=1e-4 * spread)
  assert np.all(dens.nodes >= eigs[0] - 1e-4 * spread)
  assert np.all(dens.nodes <= eigs[-1] + 1e-4 * spread)
  # The mean is an average of Rademacher v̂ᵀHv̂ = vᵀHv/n: tr(H)/n within
  # 4 standard deviations, Var(vᵀHv) = 2(‖H‖_F² - Σ H_ii²).
  sd = np.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2))) / n
  assert abs(dens.moment(1) - np.trace(h) / n) < 4 * sd / np.sqrt(num_probes)
  # Smoothed on a grid, the density integrates to 1.
  sigma = 0.05 * spread
  grid = np.linspace(eigs[0] - 6 * sigma, eigs[-1] + 6 * sigma, 4001)
  values = np.asarray(dens.density(grid, sigma), np.float64)
  assert np.all(values >= 0)
  np.testing.assert_allclose(np.sum(values) * (grid[1] - grid[0]), 1.0,
                             rtol=1e-3)
  with pytest.raises(ValueError, match="sigma"):
    dens.density(grid, 0.0)


def test_slq_preconditioned_mean(mlp):
  loss, params, h = mlp
  n = h.shape[0]
  p = jax.tree.map(lambda x: 0.5 + jnp.abs(x),
                   optax.tree.random_like(jax.random.key(9), params))
  d = 1.0 / np.sqrt(flat(p))
  a = d[:, None] * h * d[None, :]
  key = jax.random.key(10)
  dens = diagnostics.spectral_density(loss, params, key=key, num_probes=4,
                                      num_iters=3, preconditioner=p)
  # The first moment is exactly the mean of the probes' v̂ᵀAv̂.
  quads = [v @ a @ v / (v @ v) for v in _probes(key, params, 4, "rademacher")]
  np.testing.assert_allclose(dens.moment(1), np.mean(quads),
                             atol=1e-5 * np.abs(a).max())


# -- Hutchinson ---------------------------------------------------------------


@pytest.mark.parametrize("distribution", ["rademacher", "normal"])
def test_hutchinson_samples_and_statistical_tolerance(mlp, distribution):
  loss, params, h = mlp
  key, num = jax.random.key(11), 200
  est = jax.jit(lambda p, key: diagnostics.hessian_trace(
      loss, p, key=key, num_probes=num, distribution=distribution))(
          params, key)
  # Every sample is the probe's vᵀHv.
  expected = [v @ h @ v for v in _probes(key, params, num, distribution)]
  np.testing.assert_allclose(est.samples, expected,
                             atol=1e-4 * np.abs(h).max())
  # Unbiased, of known variance: within 4 standard deviations of tr(H).
  var = 2 * np.sum(h ** 2)
  if distribution == "rademacher":
    var -= 2 * np.sum(np.diag(h) ** 2)
  sd = np.sqrt(var / num)
  assert abs(float(est.estimate) - np.trace(h)) < 4 * sd
  # The reported standard error estimates that standard deviation.
  assert 0.7 * sd < float(est.stderr) < 1.3 * sd


def test_hutchinson_is_exact_on_a_diagonal_hessian_with_rademacher_probes():
  d = {"a": jnp.asarray([3.0, -1.0, 0.5]), "b": jnp.asarray([[2.0, 4.0]])}
  f = lambda w: 0.5 * sum(jnp.sum(d[k] * w[k] ** 2) for k in w) + jnp.sum(
      w["a"])
  w = {"a": jnp.ones(3), "b": jnp.ones((1, 2))}
  est = diagnostics.hessian_trace(f, w, key=jax.random.key(0), num_probes=5)
  np.testing.assert_allclose(est.samples, np.full(5, 8.5), rtol=1e-6)
  assert float(est.stderr) == 0.0
  # Preconditioned: tr(P^{-1/2} D P^{-1/2}) = Σ d_i / p_i.
  p = {"a": jnp.asarray([1.0, 2.0, 4.0]), "b": jnp.asarray([[0.5, 8.0]])}
  est = diagnostics.hessian_trace(f, w, key=jax.random.key(0), num_probes=3,
                                  preconditioner=p)
  np.testing.assert_allclose(est.estimate, 3 - 0.5 + 0.125 + 4 + 0.5,
                             rtol=1e-6)


def test_stochastic_estimators_reject_bad_arguments(mlp):
  loss, params, _ = mlp
  key = jax.random.key(0)
  with pytest.raises(ValueError, match="num_probes"):
    diagnostics.hessian_trace(loss, params, key=key, num_probes=0)
  with pytest.raises(ValueError, match="distribution"):
    diagnostics.hessian_trace(loss, params, key=key, distribution="cauchy")
  with pytest.raises(ValueError, match="num_iters"):
    diagnostics.spectral_density(loss, params, key=key, num_iters=0)


# -- the harness: a fixed subset in chunks ------------------------------------

from cdat_fast.curvature import directional_derivatives, hvp  # noqa: E402
from cdat_fast.harness import spectrum as harness_spectrum  # noqa: E402


def _net(n=10, seed=0, mu=1e-3):
  """A tanh net, a batch-mean loss with weight decay (as the harness's)."""
  rng = np.random.RandomState(seed)
  params = {"w0": jnp.asarray(rng.randn(3, 4) / 2, jnp.float32),
            "b0": jnp.asarray(0.1 * rng.randn(4), jnp.float32),
            "w1": jnp.asarray(rng.randn(4, 2) / 2, jnp.float32)}
  x = rng.randn(n, 3).astype(np.float32)
  y = rng.randn(n, 2).astype(np.float32)

  def loss_fn(p, batch):
    out = jnp.tanh(batch["x"] @ p["w0"] + p["b0"]) @ p["w1"]
    penalty = 0.5 * mu * sum(jnp.sum(v ** 2) for v in jax.tree.leaves(p))
    return 0.5 * jnp.mean(jnp.sum((out - batch["y"]) ** 2, -1)) + penalty

  return loss_fn, params, x, y


@pytest.mark.parametrize("chunk", [4, 5, 16])  # a remainder, none, one chunk
def test_chunked_hvp_is_the_weighted_sum_and_the_whole_subsets(chunk):
  loss_fn, params, x, y = _net(n=10)
  chunks = harness_spectrum.make_chunks(x, y, chunk)
  assert chunks.size == 10
  fn = harness_spectrum.chunked_objective(loss_fn, chunks)
  whole = lambda p: loss_fn(p, {"x": x, "y": y})
  v = optax.tree.random_like(jax.random.key(0), params)
  # Σ_c (|B_c|/|S|) ∇²f(w; B_c) v, chunk by chunk.
  summed = jax.tree.map(jnp.zeros_like, params)
  for start in range(0, 10, chunk):
    batch = {"x": x[start:start + chunk], "y": y[start:start + chunk]}
    weight = len(batch["x"]) / 10
    summed = jax.tree.map(lambda s, h: s + weight * h, summed,
                          hvp(lambda p: loss_fn(p, batch), params, v))
  chunked = jax.jit(lambda p, v: hvp(fn, p, v))(params, v)
  np.testing.assert_allclose(flat(chunked), flat(summed), rtol=1e-5,
                             atol=1e-7)
  np.testing.assert_allclose(flat(chunked), flat(hvp(whole, params, v)),
                             rtol=1e-5, atol=1e-7)
  np.testing.assert_allclose(fn(params), whole(params), rtol=1e-6)
  np.testing.assert_allclose(directional_derivatives(fn, params, v)[2],
                             directional_derivatives(whole, params, v)[2],
                             rtol=1e-5)


def test_chunked_hvp_holds_one_chunk_not_the_subset():
  # Compiled temporary memory of the HVP: the chunked form's is a fraction
  # of the one-batch form's (activations of one chunk at a time).
  rng = np.random.RandomState(0)
  n, width = 2048, 256
  x = rng.randn(n, 32).astype(np.float32)
  y = rng.randn(n, 4).astype(np.float32)
  params = {"w0": jnp.zeros((32, width)), "w1": jnp.zeros((width, width)),
            "w2": jnp.zeros((width, 4))}

  def loss_fn(p, batch):
    h = jnp.tanh(jnp.tanh(batch["x"] @ p["w0"]) @ p["w1"])
    return jnp.mean((h @ p["w2"] - batch["y"]) ** 2)

  def temp_bytes(fn):
    compiled = jax.jit(lambda p, v: hvp(fn, p, v)).lower(params,
                                                         params).compile()
    analysis = compiled.memory_analysis()
    if analysis is None:
      pytest.skip("no memory analysis on this backend")
    return analysis.temp_size_in_bytes

  whole = temp_bytes(lambda p: loss_fn(p, {"x": x, "y": y}))
  chunked = temp_bytes(harness_spectrum.chunked_objective(
      loss_fn, harness_spectrum.make_chunks(x, y, 128)))
  activations = n * width * 4  # one [n, width] float32 activation
  # Observed on CPU: 16.8 MB and 1.3 MB.
  assert whole > 4 * activations and chunked < activations, (whole, chunked)


def test_evaluate_spectrum_on_chunks_matches_the_explicit_hessian():
  loss_fn, params, x, y = _net(n=12, seed=3)
  fn = harness_spectrum.chunked_objective(loss_fn,
                                      harness_spectrum.make_chunks(x, y, 5))
  h = jit_hessian(lambda p: loss_fn(p, {"x": x, "y": y}), params)
  n = h.shape[0]
  cfg = harness_spectrum.SpectrumConfig(every=1, top_k=3, iters=n,
                                    density_probes=2, trace_probes=100)
  out = jax.jit(lambda p: harness_spectrum.evaluate_spectrum(
      fn, p, cfg, jax.random.key(0)))(params)
  eigs = np.linalg.eigvalsh(h)
  scale = np.abs(eigs).max()
  np.testing.assert_allclose(out["top_eigenvalues"], eigs[::-1][:3],
                             atol=1e-4 * scale)
  sd = np.sqrt(2 * (np.sum(h ** 2) - np.sum(np.diag(h) ** 2)) / 100)
  assert abs(float(out["hessian_trace"]) - np.trace(h)) < 4 * sd
  assert out["density_nodes"].shape == out["density_weights"].shape == (2, n)
  np.testing.assert_allclose(np.sort(out["density_nodes"][0]), eigs,
                             atol=1e-4 * scale)
  # Counts of 0 leave the entries out.
  none = harness_spectrum.SpectrumConfig(top_k=0, density_probes=0,
                                     trace_probes=0)
  assert harness_spectrum.evaluate_spectrum(fn, params, none,
                                        jax.random.key(0)) == {}


def test_spectrum_config_and_chunks_reject_bad_values():
  with pytest.raises(ValueError, match="spectrum_chunk"):
    harness_spectrum.SpectrumConfig(chunk=0).validate()
  with pytest.raises(ValueError, match="spectrum_top_k"):
    harness_spectrum.SpectrumConfig(top_k=9, iters=8).validate()
  with pytest.raises(ValueError, match="spectrum_every"):
    harness_spectrum.SpectrumConfig(every=-1).validate()
  monitor = harness_spectrum.SpectrumMonitor(harness_spectrum.SpectrumConfig(every=3))
  assert [monitor.due(d, 2) for d in (2, 4, 6, 8)] == [True, True, True,
                                                      False]
