r"""Polyak step size (Polyak, 1964; Roulet et al., 2024, eq. 14).

.. math::
  \eta_t = \min\Big(\frac{f(w_t) - f^\star}{\|\nabla f(w_t)\|^2},\ \eta_{\max}\Big)

applied to the base optimizer's update ``u_t``. Policy at the edges: a
negative gap (``f < f*``) gives 0; a zero gradient gives 0; non-finite values
skip the step (zero update).
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks, treemath
from cdat_fast.objective import bind_objective
from cdat_fast.tuned import apply_learning_rate, scalar_dtype, tuned


class PolyakState(NamedTuple):
  """State of :func:`scale_by_polyak`.

  Attributes:
    count: number of updates (int32).
    learning_rate: the ``η`` used at the last update.
  """
  count: jax.Array  # int32
  learning_rate: jax.Array  # η used at the last update


def scale_by_polyak(
    *,
    f_min: jax.typing.ArrayLike = 0.0,
    max_learning_rate: jax.typing.ArrayLike = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Chainable Polyak step: scales ``u`` by ``min((f - f*) / ‖g‖², η_max)``.

  ``update(updates, state, params, *, value_fn=None, value=None, grad=None,
  **extra_args)`` needs ``f(w)`` and ``∇f(w)``: given as ``value`` and
  ``grad``, or computed from ``value_fn``.

  Args:
    f_min: the optimal value ``f*`` (0 for the paper's losses).
    max_learning_rate: ``η_max > 0`` (paper: 1 or 100).
  """
  checks.check_range("max_learning_rate", max_learning_rate, low=0.0,
                     low_inclusive=False, allow_inf=True)
  checks.check_range("f_min", f_min)

  def init_fn(params):
    return PolyakState(jnp.zeros([], jnp.int32),
                       jnp.zeros([], scalar_dtype(params)))

  def update_fn(updates, state, params=None, *, value_fn=None, value=None,
                grad=None, **extra_args):
    dtype = state.learning_rate.dtype
    if value is None or grad is None:
      objective = bind_objective("polyak", value_fn, extra_args)
      v, g = jax.value_and_grad(objective)(params)
      value = v if value is None else value
      grad = g if grad is None else grad
    gap = jnp.asarray(value, dtype) - jnp.asarray(f_min, dtype)
    sq_norm = jnp.asarray(treemath.vdot(grad, grad), dtype)
    safe = jnp.where(sq_norm > 0, sq_norm, jnp.ones_like(sq_norm))
    eta = jnp.where(sq_norm > 0, jnp.maximum(gap, 0.0) / safe,
                    jnp.zeros_like(gap))
    eta = jnp.minimum(eta, jnp.asarray(max_learning_rate, dtype))
    new_updates, eta, _ = apply_learning_rate(updates, eta)
    return new_updates, PolyakState(optax.safe_increment(state.count), eta)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def polyak(
    base: optax.GradientTransformation,
    *,
    f_min: jax.typing.ArrayLike = 0.0,
    max_learning_rate: jax.typing.ArrayLike = 1.0,
) -> optax.GradientTransformationExtraArgs:
  """Polyak step sizes along ``base``'s update (paper eq. 14).

  References:
    Polyak, "Some methods of speeding up the convergence of iteration
    methods", 1964; Roulet et al., "Stepping on the Edge", NeurIPS 2024.
  """
  return tuned(base, scale_by_polyak(f_min=f_min,
                                     max_learning_rate=max_learning_rate))
