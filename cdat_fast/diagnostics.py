r"""Hessian spectrum diagnostics: top-k eigenpairs, spectral density, trace.

The quantities that PyHessian (Yao et al., 2020), matfree and the
edge-of-stability code (Cohen et al., 2021) report, next to
:func:`cdat_fast.curvature.sharpness`, for the operator

.. math::
  A = P^{-1/2}\, \nabla^2 f(w)\, P^{-1/2}

(``P = I`` unless a ``preconditioner`` is given; with an RMSProp/Adam state,
``P = √ν + ε`` as for the sharpness), of dimension ``n``:

* :func:`top_eigenvalues`: the ``k`` largest (or smallest, or largest in
  magnitude) eigenvalues and their eigenvectors, as the Ritz pairs of a Lanczos
  decomposition with full reorthogonalisation
  (:func:`cdat_fast.curvature.lanczos_tridiagonal`).
* :func:`spectral_density`: the eigenvalue density
  ``φ(t) = (1/n) Σ_i δ(t - λ_i)`` by stochastic Lanczos quadrature
  (Golub & Meurant, 1994, 2010; Ubaru, Chen & Saad, 2017; Ghorbani, Krishnan &
  Xiao, 2019): for a probe ``v`` of unit norm, ``m`` Lanczos steps from ``v``
  give ``T = S Θ Sᵀ``, and the ``m``-node Gauss quadrature of the measure
  ``Σ_i (vᵀq_i)² δ(t - λ_i)`` has nodes ``θ_j`` and weights ``τ_j = S_{1j}²``:
  ``Σ_j τ_j g(θ_j) = vᵀ g(A) v`` exactly for every polynomial ``g`` of degree at
  most ``2m - 1``. Averaging over random probes (``E[v vᵀ] = I/n``) estimates
  ``φ``; its mean is an estimate of ``tr(A)/n``.
* :func:`hessian_trace`: ``tr(A)`` by Hutchinson's estimator
  ``(1/N) Σ_l v_lᵀ A v_l`` with ``E[v vᵀ] = I`` (Hutchinson, 1989; Avron &
  Toledo, 2011): unbiased, of variance ``2(‖A‖_F² - Σ_i A_ii²)/N`` for
  Rademacher probes (exact for a diagonal ``A``) and ``2‖A‖_F²/N`` for Gaussian
  ones. Each sample is one forward-over-forward second directional derivative
  (:func:`cdat_fast.curvature.hessian_quadratic_form`), not an HVP.

Everything takes a scalar ``fn`` of a parameter pytree and keeps the pytree's
structure; random keys are explicit arguments; the functions are traceable
(``jax.jit`` them with ``fn`` closed over; ``k``, ``num_iters`` and
``num_probes`` are static). To evaluate on more data than fits in one batch,
pass an ``fn`` that sums chunks, as :mod:`cdat_fast.harness.spectrum` does.

References:
  C. Lanczos, An iteration method for the solution of the eigenvalue problem
  of linear differential and integral operators, J. Res. NBS 45, 1950.
  G. H. Golub and G. Meurant, Matrices, Moments and Quadrature with
  Applications, Princeton University Press, 2010.
  S. Ubaru, J. Chen and Y. Saad, Fast estimation of tr(f(A)) via stochastic
  Lanczos quadrature, SIAM J. Matrix Anal. Appl. 38(4), 2017.
  B. Ghorbani, S. Krishnan and Y. Xiao, An investigation into neural net
  optimization via Hessian eigenvalue density, ICML 2019.
  M. F. Hutchinson, A stochastic estimator of the trace of the influence
  matrix for Laplacian smoothing splines, Commun. Stat. Simul. Comput. 18(3),
  1989.
  H. Avron and S. Toledo, Randomized algorithms for estimating the trace of an
  implicit symmetric positive semi-definite matrix, J. ACM 58(2), 2011.
  Z. Yao, A. Gholami, K. Keutzer and M. Mahoney, PyHessian: Neural networks
  through the lens of the Hessian, IEEE BigData 2020.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks, treemath
from cdat_fast.curvature import (hessian_operator, hessian_quadratic_form,
                                 lanczos_tridiagonal)

PyTree = Any

DISTRIBUTIONS = ("rademacher", "normal")
WHICH = ("largest", "smallest", "magnitude")


class TopEigenvalues(NamedTuple):
  """The ``k`` selected eigenpairs, in order.

  Attributes:
    eigenvalues: ``[k]``: descending for ``"largest"``, ascending for
      ``"smallest"``, by descending magnitude for ``"magnitude"``.
    eigenvectors: unit-norm eigenvectors, orthogonal to each other: a pytree
      like the parameters whose leaves have a leading axis of ``k``
      (``jax.tree.map(lambda x: x[i], eigenvectors)`` is the ``i``-th).
  """
  eigenvalues: jax.Array
  eigenvectors: PyTree


class SpectralDensity(NamedTuple):
  r"""Stochastic Lanczos quadrature of the eigenvalue density.

  The estimate is the discrete measure
  ``φ̂ = (1/N) Σ_l Σ_j τ_lj δ(t - θ_lj)`` over ``N`` probes; each row of
  ``weights`` sums to 1, so ``φ̂`` has unit mass like ``φ``.

  Attributes:
    nodes: ``[N, m]`` Ritz values ``θ_lj`` (ascending in each row).
    weights: ``[N, m]`` quadrature weights ``τ_lj ≥ 0``.
  """
  nodes: jax.Array
  weights: jax.Array

  def moment(self, p: int) -> jax.Array:
    """``∫ tᵖ dφ̂``; for ``p ≤ 2m - 1`` an unbiased estimate of ``tr(Aᵖ)/n``."""
    return jnp.mean(jnp.sum(self.weights * self.nodes ** p, axis=-1))

  def density(self, grid: jax.typing.ArrayLike, sigma: float) -> jax.Array:
    """``φ̂`` smoothed by a Gaussian of standard deviation ``sigma``, on a grid.

    As PyHessian's ``density_generate``: integrates to 1 (up to the mass
    outside the grid) for a grid much finer than ``sigma``.
    """
    checks.check_range("sigma", sigma, low=0.0, low_inclusive=False)
    t = jnp.asarray(grid)[..., None, None]
    kernel = jnp.exp(-0.5 * ((t - self.nodes) / sigma) ** 2) / (
        sigma * jnp.sqrt(2 * jnp.pi))
    return jnp.mean(jnp.sum(self.weights * kernel, axis=-1), axis=-1)

  def support(self, tol: float = 1e-6) -> tuple[jax.Array, jax.Array]:
    """Smallest and largest node of weight above ``tol``.

    Ritz values lie in ``[λ_min, λ_max]`` (Cauchy interlacing) and the extreme
    ones converge to the extreme eigenvalues first.
    """
    heavy = self.weights > tol
    lo = jnp.min(jnp.where(heavy, self.nodes, jnp.inf))
    hi = jnp.max(jnp.where(heavy, self.nodes, -jnp.inf))
    return lo, hi


class TraceEstimate(NamedTuple):
  """Hutchinson's estimate of ``tr(A)``.

  Attributes:
    estimate: the mean of the samples.
    stderr: its standard error, ``std(samples) / √N`` (0 when N = 1).
    samples: ``[N]``, the ``vᵀ A v`` of each probe.
  """
  estimate: jax.Array
  stderr: jax.Array
  samples: jax.Array


def random_probe(key: jax.Array, like: PyTree,
                 distribution: str = "rademacher") -> PyTree:
  """A random pytree like ``like`` with ``E[v vᵀ] = I``.

  Args:
    key: PRNG key.
    like: the pytree whose structure, shapes and dtypes the probe has.
    distribution: ``"rademacher"`` (independent ±1) or ``"normal"``
      (standard Gaussian).

  Returns:
    The probe.
  """
  checks.check_choice("distribution", distribution, DISTRIBUTIONS)
  leaves, treedef = jax.tree.flatten(like)
  keys = jax.random.split(key, max(len(leaves), 1))
  sample = (jax.random.rademacher if distribution == "rademacher"
            else jax.random.normal)
  out = [sample(k, jnp.shape(x), jnp.asarray(x).dtype)
         for k, x in zip(keys, leaves)]
  return jax.tree.unflatten(treedef, out)


def _start(key, init, params):
  if init is None:
    if key is None:
      raise ValueError("pass key= (the random start vector) or init=")
    init = optax.tree.random_like(key, params)
  return treemath.cast_like(init, params)


def top_eigenvalues(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    k: int = 1,
    *,
    key: jax.Array | None = None,
    init: PyTree | None = None,
    which: str = "largest",
    preconditioner: Any = None,
    num_iters: int | None = None,
) -> TopEigenvalues:
  r"""The top ``k`` eigenpairs of the (preconditioned) Hessian, by Lanczos.

  ``m = num_iters`` Lanczos steps with full reorthogonalisation from a random
  (or given) start give ``T = Vᵀ A V = S Θ Sᵀ``; the ``k`` selected Ritz
  values ``θ`` and Ritz vectors ``V s`` are returned. The extreme Ritz values
  converge first: with ``m`` a few times ``k`` the top of the spectrum is
  accurate to float rounding when it is separated; with ``m = n`` they are the
  eigenvalues. A restart on an invariant Krylov space (see
  :func:`cdat_fast.curvature.lanczos_tridiagonal`) finds repeated
  eigenvalues as often as they occur.

  Args:
    fn: scalar function of the parameters.
    params: the point ``w``.
    k: the number of eigenpairs, ``1 ≤ k ≤ m``.
    key: PRNG key of the start vector; needed unless ``init`` is given.
    init: a start vector (e.g. the previous top eigenvector).
    which: ``"largest"`` (algebraically: PyHessian's and the
      edge-of-stability code's top eigenvalues of a nearly convex loss),
      ``"smallest"`` (the most negative curvature) or ``"magnitude"``.
    preconditioner: None; a pytree like ``params`` holding the diagonal of
      ``P``; or an RMSProp/Adam state (as :func:`cdat_fast.sharpness`).
    num_iters: ``m``, the number of Hessian-vector products; default
      ``min(n, max(64, 3k))``. Memory: ``m + 1`` copies of the parameters.

  Returns:
    :class:`TopEigenvalues`.

  Raises:
    ValueError: for a bad ``k``, ``which`` or ``num_iters``, or neither
      ``key`` nor ``init``.
  """
  checks.check_choice("which", which, WHICH)
  dim = optax.tree.size(params)
  checks.check_int("k", k, low=1)
  if num_iters is None:
    num_iters = min(dim, max(64, 3 * k))
  checks.check_int("num_iters", num_iters, low=1)
  num_iters = min(num_iters, dim)
  if k > num_iters:
    raise ValueError(f"k must be at most num_iters and the dimension "
                     f"(min {num_iters}), got {k}")
  v0 = _start(key, init, params)
  op = hessian_operator(fn, params, preconditioner=preconditioner)
  result = lanczos_tridiagonal(op, v0, num_iters)
  theta, s = jnp.linalg.eigh(result.tridiagonal())  # ascending
  if which == "largest":
    order = jnp.arange(num_iters - 1, num_iters - 1 - k, -1)
  elif which == "smallest":
    order = jnp.arange(k)
  else:
    order = jnp.argsort(-jnp.abs(theta))[:k]
  # V s has unit norm: V is orthonormal and s a unit eigenvector of T.
  vectors = result.ritz_vectors(s[:, order])
  return TopEigenvalues(theta[order], vectors)


def spectral_density(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    key: jax.Array,
    num_probes: int = 8,
    num_iters: int = 64,
    distribution: str = "rademacher",
    preconditioner: Any = None,
) -> SpectralDensity:
  r"""The Hessian's eigenvalue density by stochastic Lanczos quadrature.

  For each of ``N = num_probes`` probes ``v`` (:func:`random_probe`,
  normalised to unit norm; probe ``l`` is ``random_probe(jax.random.split(key,
  N)[l], params, distribution)``), ``m = num_iters`` Lanczos steps from ``v``
  give the tridiagonal ``T = S Θ Sᵀ``; the nodes are ``θ`` and the weights
  the squared first components ``S_{1j}²`` (Ubaru, Chen & Saad, 2017, eq.
  2.5; Ghorbani et al., 2019, section 2). Probes run one after another
  (``jax.lax.map``), so memory is that of one ``m``-step Lanczos run:
  ``m + 1`` copies of the parameters.

  Args:
    fn: scalar function of the parameters.
    params: the point ``w``.
    key: PRNG key of the probes.
    num_probes: ``N ≥ 1``.
    num_iters: ``m``, Lanczos steps per probe (capped at the dimension).
    distribution: ``"rademacher"`` or ``"normal"`` probes.
    preconditioner: as for :func:`top_eigenvalues`.

  Returns:
    :class:`SpectralDensity` (``[N, m]`` nodes and weights).
  """
  checks.check_int("num_probes", num_probes, low=1)
  checks.check_int("num_iters", num_iters, low=1)
  checks.check_choice("distribution", distribution, DISTRIBUTIONS)
  num_iters = min(num_iters, optax.tree.size(params))
  op = hessian_operator(fn, params, preconditioner=preconditioner)

  def one_probe(probe_key):
    v = random_probe(probe_key, params, distribution)
    result = lanczos_tridiagonal(op, v, num_iters)
    theta, s = jnp.linalg.eigh(result.tridiagonal())
    return theta, s[0] ** 2

  nodes, weights = jax.lax.map(one_probe, jax.random.split(key, num_probes))
  return SpectralDensity(nodes, weights)


def hessian_trace(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    key: jax.Array,
    num_probes: int = 64,
    distribution: str = "rademacher",
    preconditioner: Any = None,
) -> TraceEstimate:
  r"""Hutchinson's estimate of ``tr(P^{-1/2} ∇²f(w) P^{-1/2})``.

  .. math::
    \widehat{\mathrm{tr}}(A) = \frac1N \sum_{l=1}^N v_l^\top A v_l,
    \qquad \mathbb{E}[v v^\top] = I

  Unbiased; the variance of one sample is ``2(‖A‖_F² - Σ_i A_ii²)`` for
  Rademacher probes (so the estimate is exact for a diagonal ``A``) and
  ``2‖A‖_F²`` for Gaussian ones (Hutchinson, 1989; Avron & Toledo, 2011).
  Each sample is one second directional derivative
  (:func:`cdat_fast.curvature.hessian_quadratic_form`); probes run one after
  another (``jax.lax.map``); probe ``l`` is ``random_probe(jax.random.split(
  key, N)[l], params, distribution)``.

  Args:
    fn: scalar function of the parameters.
    params: the point ``w``.
    key: PRNG key of the probes.
    num_probes: ``N ≥ 1``.
    distribution: ``"rademacher"`` or ``"normal"``.
    preconditioner: as for :func:`top_eigenvalues`.

  Returns:
    :class:`TraceEstimate`.
  """
  checks.check_int("num_probes", num_probes, low=1)
  checks.check_choice("distribution", distribution, DISTRIBUTIONS)
  quad = hessian_quadratic_form(fn, params, preconditioner=preconditioner)
  samples = jax.lax.map(
      lambda k: quad(random_probe(k, params, distribution)),
      jax.random.split(key, num_probes))
  samples = jnp.asarray(samples, jnp.promote_types(samples.dtype, jnp.float32))
  stderr = (jnp.std(samples, ddof=1) / jnp.sqrt(num_probes) if num_probes > 1
            else jnp.zeros([], samples.dtype))
  return TraceEstimate(jnp.mean(samples), stderr, samples)
