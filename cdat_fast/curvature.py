"""Reference curvature: directional derivatives, Hessian-vector products, sharpness.

These are the exact paths every cheaper estimator and fused kernel is tested
against.

* ``directional_derivatives(f, w, u)`` returns ``f(w)``, ``∂f(w)[u] = ∇f(w)ᵀu``
  and ``∂²f(w)[u, u] = uᵀ∇²f(w)u`` by forward-over-forward autodiff (a jvp of a
  jvp), the way the paper computes CDAT's denominator (Roulet et al., 2024,
  appendix C.3). Memory is about 3× the objective's, far below an HVP's.
* ``hvp(f, w, v) = ∇²f(w) v`` by forward-over-reverse autodiff.
* ``sharpness(f, w)`` is the eigenvalue of largest magnitude of ``∇²f(w)`` (or of
  the preconditioned ``P^{-1/2} ∇²f(w) P^{-1/2}``, appendix B.1 after Cohen et
  al., 2022) by power iteration (appendix C.4: up to 1000 iterations, stop at a
  relative change below 1e-3) or by Lanczos with full reorthogonalisation.

All functions work on arbitrary pytrees of parameters and keep their structure
(and sharding) throughout: nothing is flattened into one vector.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks, treemath

PyTree = Any


def directional_derivatives(
    fn: Callable[[PyTree], jax.Array], params: PyTree, direction: PyTree
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Value, first and second directional derivatives of ``fn`` along ``direction``.

  .. math::
    f(w),\quad \partial f(w)[u] = \nabla f(w)^\top u,\quad
    \partial^2 f(w)[u, u] = u^\top \nabla^2 f(w)\, u

  computed in one forward-over-forward pass: the jvp of ``w ↦ ∂f(w)[u]`` along
  ``u``. XLA shares the primal computation, so for a dense layer the cost is
  the forward matmul plus four more (``ẏ = ẋW + xU``, ``ÿ = ẍW + 2ẋU``).

  Args:
    fn: scalar function of the parameters.
    params: the point ``w``.
    direction: the direction ``u``, same structure as ``params`` (cast to the
      parameters' dtypes).

  Returns:
    ``(f(w), ∂f(w)[u], ∂²f(w)[u,u])`` as scalars.

  References:
    Roulet et al., Stepping on the Edge: Curvature Aware Learning Rate Tuners,
    NeurIPS 2024, appendix C.3.
  """
  direction = treemath.cast_like(direction, params)

  def value_and_slope(p):
    return jax.jvp(fn, (p,), (direction,))

  (value, slope), (_, curvature) = jax.jvp(
      value_and_slope, (params,), (direction,))
  return value, slope, curvature


def hvp(fn: Callable[[PyTree], jax.Array], params: PyTree, v: PyTree) -> PyTree:
  """Hessian-vector product ``∇²f(w) v`` by forward-over-reverse autodiff."""
  v = treemath.cast_like(v, params)
  return jax.jvp(jax.grad(fn), (params,), (v,))[1]


class SharpnessResult(NamedTuple):
  """Top eigenpair of the (preconditioned) Hessian.

  Attributes:
    eigenvalue: the eigenvalue largest in magnitude (a scalar).
    eigenvector: its eigenvector, of unit norm, structured like the
      parameters.
  """
  eigenvalue: jax.Array  # scalar, largest in magnitude
  eigenvector: PyTree  # unit norm, structured like the parameters


def preconditioner_from_state(
    opt_state: Any, *, eps: float = 1e-8, b2: float | None = None
) -> PyTree:
  r"""Diagonal preconditioner ``P = √ν̂ + ε`` from an RMSProp/Adam state.

  Finds the second-moment estimate ``nu`` in ``opt_state`` (any optax state
  containing exactly one ``nu`` field, e.g. ``optax.adam`` or ``optax.rmsprop``,
  possibly inside a chain or a tuner). With ``b2`` given and a ``count`` field
  beside ``nu`` (Adam), ``ν`` is bias-corrected, ``ν̂ = ν / (1 - b2^t)``, as in
  Adam's own update (Cohen et al., 2022, "Adaptive gradient methods at the
  edge of stability").
  """
  try:
    nu = optax.tree.get(opt_state, "nu")
  except KeyError as e:
    raise ValueError(
        "preconditioner: opt_state holds several second-moment fields 'nu'"
        f"; pass the one to use: {e}") from e
  if nu is None:
    raise ValueError(
        "preconditioner: opt_state holds no second-moment field 'nu' (is it"
        " an RMSProp/Adam state?)")
  if b2 is not None:
    try:
      count = optax.tree.get(opt_state, "count")
    except KeyError:
      count = None
    if count is not None:
      correction = 1.0 - jnp.asarray(b2, jnp.float32) ** jnp.maximum(count, 1)
      nu = jax.tree.map(lambda n: n / correction.astype(n.dtype), nu)
  return jax.tree.map(lambda n: jnp.sqrt(n) + eps, nu)


def _operator(fn, params, preconditioner):
  """``v ↦ P^{-1/2} ∇²f P^{-1/2} v`` (plain HVP when ``preconditioner`` is None)."""
  if preconditioner is None:
    return lambda v: hvp(fn, params, v)
  if jax.tree.structure(preconditioner) != jax.tree.structure(params):
    preconditioner = preconditioner_from_state(preconditioner)
  inv_sqrt = jax.tree.map(
      lambda p, w: jax.lax.rsqrt(jnp.asarray(p, jnp.asarray(w).dtype)),
      preconditioner, params)

  def op(v):
    return optax.tree.mul(inv_sqrt, hvp(fn, params, optax.tree.mul(inv_sqrt, v)))
  return op


def _normalize(v):
  norm = optax.tree.norm(v)
  safe = jnp.where(norm > 0, norm, 1.0)
  return optax.tree.scale(1.0 / safe, v), norm


def _power_iteration(op, v0, num_iters, rtol):
  v0, _ = _normalize(v0)

  def cond(carry):
    i, _, _, done = carry
    return jnp.logical_and(i < num_iters, jnp.logical_not(done))

  def body(carry):
    i, v, lam_prev, _ = carry
    w = op(v)
    lam = treemath.vdot(v, w).real
    w, norm = _normalize(w)
    converged = jnp.abs(lam - lam_prev) <= rtol * jnp.abs(lam)
    done = jnp.logical_or(converged, norm == 0)
    return i + 1, w, lam, done

  lam0 = jnp.asarray(jnp.inf, optax.tree.dtype(v0, "lowest"))
  _, v, lam, _ = jax.lax.while_loop(
      cond, body, (jnp.asarray(0), v0, lam0, jnp.asarray(False)))
  return SharpnessResult(lam, v)


def _lanczos(op, v0, num_iters):
  v0, _ = _normalize(v0)
  m = num_iters
  basis = jax.tree.map(lambda x: jnp.zeros((m + 1,) + x.shape, x.dtype), v0)
  basis = jax.tree.map(lambda b, x: b.at[0].set(x), basis, v0)
  dtype = optax.tree.dtype(v0, "lowest")
  alphas = jnp.zeros((m,), dtype)
  betas = jnp.zeros((m,), dtype)

  def row(b, j):
    return jax.tree.map(lambda x: x[j], b)

  def body(j, carry):
    basis, alphas, betas = carry
    v = row(basis, j)
    w = op(v)
    alpha = treemath.vdot(w, v).real
    # Full reorthogonalisation against all previous vectors (twice is enough).
    for _ in range(2):
      # Contract in place (no reshape), so sharded leaves stay sharded.
      coeffs = sum(
          jnp.tensordot(b, x, axes=x.ndim)
          for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w)))
      coeffs = jnp.where(jnp.arange(m + 1) <= j, coeffs, 0)
      w = jax.tree.map(
          lambda x, b: x - jnp.tensordot(coeffs.astype(b.dtype), b, axes=1),
          w, basis)
    w, beta = _normalize(w)
    basis = jax.tree.map(lambda b, x: b.at[j + 1].set(x), basis, w)
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta)

  basis, alphas, betas = jax.lax.fori_loop(0, m, body, (basis, alphas, betas))
  tridiag = (jnp.diag(alphas) + jnp.diag(betas[:-1], 1)
             + jnp.diag(betas[:-1], -1))
  theta, s = jnp.linalg.eigh(tridiag)
  i = jnp.argmax(jnp.abs(theta))
  vec = jax.tree.map(
      lambda b: jnp.tensordot(s[:, i].astype(b.dtype), b[:m], axes=1), basis)
  vec, _ = _normalize(vec)
  return SharpnessResult(theta[i], vec)


def sharpness(
    fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    *,
    preconditioner: Any = None,
    method: str = "power",
    num_iters: int | None = None,
    rtol: float = 1e-3,
    key: jax.Array | None = None,
    init: PyTree | None = None,
) -> SharpnessResult:
  r"""Top eigenvalue (largest magnitude) of the Hessian and its eigenvector.

  .. math::
    \lambda_{\max} = \operatorname{argmax}_{\lambda \in \mathrm{spec}(A)} |\lambda|,
    \qquad A = P^{-1/2}\, \nabla^2 f(w)\, P^{-1/2}

  with ``P = I`` unless ``preconditioner`` is given.

  Args:
    fn: scalar function of the parameters.
    params: the point ``w``.
    preconditioner: None; a pytree like ``params`` holding the diagonal of
      ``P`` (positive); or an RMSProp/Adam optax state, from which
      ``P = √ν + ε`` is built by :func:`preconditioner_from_state`.
    method: ``"power"`` (power iteration, as the paper, appendix C.4) or
      ``"lanczos"`` (Lanczos with full reorthogonalisation; memory grows with
      ``num_iters`` copies of the parameters).
    num_iters: maximum number of Hessian-vector products; defaults to 1000 for
      power iteration and ``min(64, dim)`` for Lanczos.
    rtol: power iteration stops once the eigenvalue's relative change is below
      this (unused by Lanczos, which always runs ``num_iters`` steps).
    key: PRNG key for the random start (default ``PRNGKey(0)``).
    init: a start vector (e.g. the previous eigenvector, to warm-start).

  Returns:
    ``SharpnessResult(eigenvalue, eigenvector)``.

  References:
    Roulet et al., Stepping on the Edge, NeurIPS 2024, appendices B.1, C.4.
  """
  checks.check_choice("method", method, ("power", "lanczos"))
  checks.check_range("rtol", rtol, low=0.0)
  dim = optax.tree.size(params)
  if num_iters is None:
    num_iters = 1000 if method == "power" else min(64, dim)
  checks.check_int("num_iters", num_iters, low=1)
  op = _operator(fn, params, preconditioner)
  if init is None:
    key = jax.random.PRNGKey(0) if key is None else key
    init = optax.tree.random_like(key, params)
  init = treemath.cast_like(init, params)
  if method == "power":
    return _power_iteration(op, init, num_iters, rtol)
  return _lanczos(op, init, min(num_iters, dim))
