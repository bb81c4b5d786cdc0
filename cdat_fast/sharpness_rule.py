r"""Exact-sharpness rule (Roulet et al., 2024, eq. 16, Fig. 15).

.. math::
  \eta_t = \frac{\sigma}{|\lambda_{\max}(\nabla^2 f(w_t))|}

with ``λ_max`` the eigenvalue of largest magnitude, found by power iteration
(or Lanczos) warm-started from the previous step's eigenvector, so a few
Hessian-vector products per step usually suffice. For adaptive bases
(``preconditioned=True``) ``λ_max`` is that of ``P^{-1/2} ∇²f P^{-1/2}`` with
``P = √ν + ε`` from the base's state (appendix B.1). The paper finds σ = 2 poor
and σ = 3 good. Policy at the edges: ``λ = 0`` or a non-finite ``λ`` gives
``η = 0`` (zero update).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks
from cdat_fast.curvature import preconditioner_from_state, sharpness
from cdat_fast.objective import bind_objective
from cdat_fast.tuned import apply_learning_rate, scalar_dtype, tuned


class SharpnessRuleState(NamedTuple):
  """State of :func:`scale_by_sharpness_rule`.

  Attributes:
    count: number of updates (int32).
    learning_rate: the ``η`` used at the last update.
    sharpness: ``λ_max`` at the last update.
    eigenvector: the warm start for the next eigen-solve.
  """
  count: jax.Array  # int32
  learning_rate: jax.Array  # η used at the last update
  sharpness: jax.Array  # λ_max at the last update
  eigenvector: Any  # warm start for the next eigen-solve


def scale_by_sharpness_rule(
    *,
    scale: jax.typing.ArrayLike = 2.0,
    method: str = "power",
    num_iters: int = 20,
    rtol: float = 1e-3,
    preconditioned: bool = False,
    eps: float = 1e-8,
    b2: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """Chainable ``η = σ / |λ_max|``.

  Args:
    scale: ``σ > 0``.
    method: ``"power"`` or ``"lanczos"``.
    num_iters: Hessian-vector products per step (warm-started).
    rtol: power iteration's relative stopping tolerance.
    preconditioned: use ``P^{-1/2} H P^{-1/2}`` with ``P`` from the base's
      RMSProp/Adam state (``base_state=`` is passed by the factory form).
    eps, b2: for the preconditioner (see
      :func:`cdat_fast.curvature.preconditioner_from_state`).
  """
  checks.check_range("scale", scale, low=0.0, low_inclusive=False)
  checks.check_choice("method", method, ("power", "lanczos"))
  checks.check_int("num_iters", num_iters, low=1)

  def init_fn(params):
    key = jax.random.PRNGKey(0)
    v = optax.tree.random_like(key, params)
    v = optax.tree.scale(1.0 / optax.tree.norm(v), v)
    return SharpnessRuleState(
        count=jnp.zeros([], jnp.int32),
        learning_rate=jnp.zeros([], scalar_dtype(params)),
        sharpness=jnp.zeros([], scalar_dtype(params)),
        eigenvector=v)

  def update_fn(updates, state, params=None, *, value_fn=None, base_state=None,
                **extra_args):
    extra_args.pop("grad", None)
    extra_args.pop("value", None)
    objective = bind_objective("sharpness_rule", value_fn, extra_args)
    preconditioner = None
    if preconditioned:
      if base_state is None:
        raise ValueError(
            "sharpness_rule(preconditioned=True) needs the base optimizer's"
            " state; use the factory form sharpness_rule(base, ...)")
      preconditioner = preconditioner_from_state(base_state, eps=eps, b2=b2)
    lam, vec = sharpness(objective, params, preconditioner=preconditioner,
                         method=method, num_iters=num_iters, rtol=rtol,
                         init=state.eigenvector)
    dtype = state.learning_rate.dtype
    lam = jnp.asarray(lam, dtype)
    size = jnp.abs(lam)
    ok = jnp.isfinite(size) & (size > 0)
    eta = jnp.where(ok, jnp.asarray(scale, dtype) / jnp.where(ok, size, 1.0),
                    jnp.zeros_like(size))
    new_updates, eta, _ = apply_learning_rate(updates, eta)
    vec_ok = jnp.isfinite(optax.tree.norm(vec))
    vec = jax.tree.map(lambda a, b: jnp.where(vec_ok, a, b), vec,
                       state.eigenvector)
    return new_updates, SharpnessRuleState(
        optax.safe_increment(state.count), eta, lam, vec)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def sharpness_rule(
    base: optax.GradientTransformation,
    *,
    scale: jax.typing.ArrayLike = 2.0,
    method: str = "power",
    num_iters: int = 20,
    rtol: float = 1e-3,
    preconditioned: bool = False,
    eps: float = 1e-8,
    b2: float | None = None,
) -> optax.GradientTransformationExtraArgs:
  """``η = σ / λ_max`` along ``base``'s update (paper eq. 16).

  References:
    Roulet et al., "Stepping on the Edge", NeurIPS 2024, eq. 16 and Fig. 15.
  """
  return tuned(
      base,
      scale_by_sharpness_rule(scale=scale, method=method, num_iters=num_iters,
                              rtol=rtol, preconditioned=preconditioned,
                              eps=eps, b2=b2),
      pass_base_state=preconditioned)
