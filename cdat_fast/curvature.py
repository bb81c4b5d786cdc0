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
* ``hessian_operator``, ``hessian_quadratic_form`` and ``lanczos_tridiagonal``
  are the pieces that :mod:`cdat_fast.diagnostics` (top-k eigenvalues,
  spectral density, trace) builds on.

All functions work on arbitrary pytrees of parameters and keep their structure
(and sharding) throughout: nothing is flattened into one vector.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks, repeated_direction, treemath

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
  It is traced under :func:`cdat_fast.repeated_direction.along_one_direction`,
  so the layers of :mod:`cdat_fast.nn` inside ``fn`` run their fused
  second-order kernels, also between stock layers.

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

  with repeated_direction.along_one_direction():
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


def _inverse_sqrt(preconditioner, params):
  """``P^{-1/2}`` as a pytree like ``params`` (from a pytree or a state)."""
  if jax.tree.structure(preconditioner) != jax.tree.structure(params):
    preconditioner = preconditioner_from_state(preconditioner)
  return jax.tree.map(
      lambda p, w: jax.lax.rsqrt(jnp.asarray(p, jnp.asarray(w).dtype)),
      preconditioner, params)


def hessian_operator(fn: Callable[[PyTree], jax.Array], params: PyTree, *,
                     preconditioner: Any = None) -> Callable[[PyTree], PyTree]:
  r"""The linear map ``v ↦ A v``, ``A = P^{-1/2} ∇²f(w) P^{-1/2}``.

  One Hessian-vector product (:func:`hvp`) per application; ``P = I`` (the
  plain Hessian) when ``preconditioner`` is None.

  Args:
    fn: scalar function of the parameters.
    params: the point ``w``.
    preconditioner: None, a pytree like ``params`` holding the diagonal of
      ``P`` (positive), or an RMSProp/Adam state (see :func:`sharpness`).

  Returns:
    A function of a pytree like ``params``.
  """
  if preconditioner is None:
    return lambda v: hvp(fn, params, v)
  inv_sqrt = _inverse_sqrt(preconditioner, params)

  def op(v):
    return optax.tree.mul(inv_sqrt, hvp(fn, params, optax.tree.mul(inv_sqrt, v)))
  return op


def hessian_quadratic_form(
    fn: Callable[[PyTree], jax.Array], params: PyTree, *,
    preconditioner: Any = None) -> Callable[[PyTree], jax.Array]:
  r"""The quadratic form ``v ↦ vᵀ A v``, ``A = P^{-1/2} ∇²f(w) P^{-1/2}``.

  Computed as :func:`directional_derivatives`' ``∂²f(w)[u, u]`` along
  ``u = P^{-1/2} v`` (forward over forward: no Hessian-vector product, about
  3× the memory of ``f``).

  Args:
    fn: scalar function of the parameters.
    params: the point ``w``.
    preconditioner: as for :func:`hessian_operator`.

  Returns:
    A function of a pytree like ``params`` returning a scalar.
  """
  if preconditioner is None:
    return lambda v: directional_derivatives(fn, params, v)[2]
  inv_sqrt = _inverse_sqrt(preconditioner, params)
  return lambda v: directional_derivatives(
      fn, params, optax.tree.mul(inv_sqrt, v))[2]


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


class LanczosResult(NamedTuple):
  r"""An ``m``-step Lanczos decomposition ``A V = V T + β_m v_{m+1} e_mᵀ``.

  Attributes:
    alphas: ``[m]``, the diagonal of the tridiagonal ``T``.
    betas: ``[m]``; ``betas[:-1]`` is the off-diagonal of ``T`` (0 where the
      Krylov space was invariant and the iteration restarted), ``betas[-1]``
      the norm of the last residual.
    basis: the orthonormal vectors ``v_1 .. v_{m+1}``: a pytree like the
      start vector whose leaves have a leading axis of ``m + 1``.
  """
  alphas: jax.Array
  betas: jax.Array
  basis: PyTree

  def tridiagonal(self) -> jax.Array:
    """The ``[m, m]`` symmetric tridiagonal ``T = Vᵀ A V``."""
    off = self.betas[:-1]
    return jnp.diag(self.alphas) + jnp.diag(off, 1) + jnp.diag(off, -1)

  def ritz_vectors(self, coefficients: jax.Array) -> PyTree:
    """``V s`` for each column ``s`` of ``coefficients`` ``[m, k]``.

    Returns a pytree like the start vector with leaves of leading axis ``k``.
    """
    m = self.alphas.shape[0]
    return jax.tree.map(
        lambda b: jnp.tensordot(coefficients.T.astype(b.dtype), b[:m], axes=1),
        self.basis)


def _orthogonalize(w, basis, j):
  """``w`` minus its projection on the basis rows ``0..j``, done twice."""
  rows = jax.tree.leaves(basis)[0].shape[0]
  for _ in range(2):  # full reorthogonalisation: twice is enough
    # Contract in place (no reshape), so sharded leaves stay sharded.
    coeffs = sum(
        jnp.tensordot(b, x, axes=x.ndim)
        for b, x in zip(jax.tree.leaves(basis), jax.tree.leaves(w)))
    coeffs = jnp.where(jnp.arange(rows) <= j, coeffs, 0)
    w = jax.tree.map(
        lambda x, b: x - jnp.tensordot(coeffs.astype(b.dtype), b, axes=1),
        w, basis)
  return w


def _hash_signs(like: PyTree, seed: jax.Array) -> PyTree:
  """±1 entries from an integer hash of (seed, leaf, position), like ``like``.

  A fixed Rademacher-like vector: every entry nonzero, no pattern a Hessian
  would share, and far cheaper to compile inside a loop than a PRNG draw
  (threefry). The hash is "lowbias32" (C. Wellons, 2018).
  """
  leaves, treedef = jax.tree.flatten(like)
  out = []
  for i, x in enumerate(leaves):
    shape = jnp.shape(x)
    h = jnp.full(shape, jnp.uint32(len(leaves)) * seed.astype(jnp.uint32)
                 + jnp.uint32(i), jnp.uint32)
    stride = 1
    for d in reversed(range(len(shape))):
      h = h + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(
          stride * 0x9E3779B1 % 2 ** 32)
      stride *= shape[d]
    for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
      h = (h ^ (h >> shift)) * jnp.uint32(mult)
    h = h ^ (h >> 16)
    out.append(jnp.where(h >> 31 == 1, 1, -1).astype(jnp.asarray(x).dtype))
  return jax.tree.unflatten(treedef, out)


def lanczos_tridiagonal(
    matvec: Callable[[PyTree], PyTree], init: PyTree, num_iters: int
) -> LanczosResult:
  r"""Lanczos iteration with full reorthogonalisation.

  From ``v_1 = init / ‖init‖``, ``m = num_iters`` steps build the orthonormal
  Krylov basis ``V`` of ``A`` (the symmetric map ``matvec``) and the
  tridiagonal ``T = Vᵀ A V``, whose eigenvalues (Ritz values) approximate
  the extreme eigenvalues of ``A`` (Lanczos, 1950; Golub & Van Loan,
  *Matrix Computations*, §10.1). Each new vector is orthogonalised against
  every previous one, twice, so no spurious copies of converged Ritz values
  appear. When the Krylov space is invariant (a residual below
  ``100 ε ‖A‖``), the iteration restarts from a fixed pseudo-random ±1
  vector made orthogonal to the basis, and records ``β = 0``: ``T`` becomes
  block diagonal and the later blocks find the rest of the spectrum
  (repeated eigenvalues too) instead of zeros. Memory: ``m + 1`` copies of
  the parameters.

  Args:
    matvec: ``v ↦ A v`` on pytrees like ``init`` (e.g.
      :func:`hessian_operator`).
    init: the start vector (nonzero).
    num_iters: ``m``, at most the dimension.

  Returns:
    A :class:`LanczosResult`.
  """
  checks.check_int("num_iters", num_iters, low=1)
  v0, _ = _normalize(init)
  m = num_iters
  basis = jax.tree.map(lambda x: jnp.zeros((m + 1,) + x.shape, x.dtype), v0)
  basis = jax.tree.map(lambda b, x: b.at[0].set(x), basis, v0)
  dtype = optax.tree.dtype(v0, "lowest")
  tiny = 100 * jnp.finfo(dtype).eps

  def restart(j, basis):
    return _normalize(_orthogonalize(_hash_signs(v0, j), basis, j))[0]

  def body(j, carry):
    basis, alphas, betas, scale = carry
    v = jax.tree.map(lambda b: b[j], basis)
    w = matvec(v)
    scale = jnp.maximum(scale, optax.tree.norm(w).astype(dtype))
    alpha = treemath.vdot(w, v).real
    w, beta = _normalize(_orthogonalize(w, basis, j))
    invariant = beta <= tiny * scale
    w = jax.lax.cond(invariant, restart, lambda j, basis: w, j, basis)
    beta = jnp.where(invariant, 0, beta)
    basis = jax.tree.map(lambda b, x: b.at[j + 1].set(x), basis, w)
    return basis, alphas.at[j].set(alpha), betas.at[j].set(beta), scale

  init_carry = (basis, jnp.zeros((m,), dtype), jnp.zeros((m,), dtype),
                jnp.zeros([], dtype))
  basis, alphas, betas, _ = jax.lax.fori_loop(0, m, body, init_carry)
  return LanczosResult(alphas, betas, basis)


def _lanczos(op, v0, num_iters):
  result = lanczos_tridiagonal(op, v0, num_iters)
  theta, s = jnp.linalg.eigh(result.tridiagonal())
  i = jnp.argmax(jnp.abs(theta))
  vec = jax.tree.map(lambda x: x[0], result.ritz_vectors(s[:, i][:, None]))
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
  op = hessian_operator(fn, params, preconditioner=preconditioner)
  if init is None:
    key = jax.random.PRNGKey(0) if key is None else key
    init = optax.tree.random_like(key, params)
  init = treemath.cast_like(init, params)
  if method == "power":
    return _power_iteration(op, init, num_iters, rtol)
  return _lanczos(op, init, min(num_iters, dim))
