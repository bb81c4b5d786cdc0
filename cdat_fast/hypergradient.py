r"""Hypergradient descent on the learning rate (Baydin et al., 2018; Roulet et al., 2024, eq. 15).

.. math::
  \eta_{t+1} = \eta_t \Big(1 - \beta\,
     \frac{g_{t+1}^\top u_t}{\|g_{t+1}\|\,\|u_t\|}\Big)

where ``g_{t+1} = ∇f(w_t + η_t u_t)`` is the next step's gradient, so the rule
costs nothing beyond storing ``u_t``. The first step uses ``learning_rate``.
Policy at the edges: a zero norm gives a cosine of 0 (η unchanged); η is kept
non-negative; a non-finite gradient or direction skips the step (zero update)
and keeps η.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks, treemath
from cdat_fast.objective import bind_objective
from cdat_fast.tuned import apply_learning_rate, scalar_dtype, tuned


class HypergradientState(NamedTuple):
  """State of :func:`scale_by_hypergradient`.

  Attributes:
    count: number of updates (int32).
    learning_rate: the ``η_t`` used at the last update.
    previous_direction: ``u_{t-1}``, structured like the parameters.
  """
  count: jax.Array  # int32
  learning_rate: jax.Array  # η_t used at the last update
  previous_direction: Any  # u_{t-1}, structured like the parameters


def scale_by_hypergradient(
    *,
    learning_rate: jax.typing.ArrayLike,
    beta: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
  """Chainable hypergradient rule; needs the gradient as ``grad=``.

  If ``grad`` is missing it is computed from ``value_fn``.

  Args:
    learning_rate: ``η_0 > 0``.
    beta: hyper-learning-rate ``β ∈ [0, 1]`` (paper: 1e-3 ... 1).
  """
  checks.check_range("learning_rate", learning_rate, low=0.0,
                     low_inclusive=False)
  checks.check_range("beta", beta, low=0.0, high=1.0)

  def init_fn(params):
    return HypergradientState(
        count=jnp.zeros([], jnp.int32),
        learning_rate=jnp.asarray(learning_rate, scalar_dtype(params)),
        previous_direction=optax.tree.zeros_like(params))

  def update_fn(updates, state, params=None, *, value_fn=None, grad=None,
                **extra_args):
    extra_args.pop("value", None)
    if grad is None:
      grad = jax.grad(bind_objective("hypergradient", value_fn, extra_args))(
          params)
    dtype = state.learning_rate.dtype
    prev = state.previous_direction
    norms = optax.tree.norm(grad) * optax.tree.norm(prev)
    cosine = jnp.where(
        norms > 0, treemath.vdot(grad, prev) / jnp.where(norms > 0, norms, 1),
        0.0).astype(dtype)
    eta = jnp.where(state.count > 0,
                    state.learning_rate * (1 - jnp.asarray(beta, dtype) * cosine),
                    jnp.asarray(learning_rate, dtype))
    eta = jnp.maximum(eta, 0.0)
    new_updates, used, ok = apply_learning_rate(updates, eta)
    eta = jnp.where(ok, used, state.learning_rate)
    prev = jax.tree.map(lambda u, p: jnp.where(ok, u, p), updates, prev)
    return new_updates, HypergradientState(
        optax.safe_increment(state.count), eta, prev)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def hypergradient(
    base: optax.GradientTransformation,
    *,
    learning_rate: jax.typing.ArrayLike,
    beta: jax.typing.ArrayLike,
) -> optax.GradientTransformationExtraArgs:
  """Hypergradient descent on η along ``base``'s update (paper eq. 15).

  References:
    Baydin et al., "Online learning rate adaptation with hypergradient
    descent", ICLR 2018; Roulet et al., "Stepping on the Edge", NeurIPS 2024.
  """
  return tuned(base, scale_by_hypergradient(learning_rate=learning_rate,
                                            beta=beta))
