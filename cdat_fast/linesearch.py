r"""Backtracking line search, the classical baseline (Roulet et al., 2024, eq. 1, app. C.3).

Accept the largest ``η = c₋^k η₀`` (k = 0, 1, ...) with

.. math::
  f(w + \eta u) \le (1 + \delta) f(w) + c\, \eta\, \nabla f(w)^\top u,

starting from ``η₀ = min(c₊ η_{t-1}, 1)`` (``c₊ = ∞`` starts at 1 every step).
``δ`` (``relative_decrease``) is the paper's addition that stops the search
from sticking at vanishing learning rates. The paper searches until the
criterion holds in full batch and for at most 30 trials in minibatch.

Policy at the edges: if no trial is accepted within ``max_steps`` the last
(smallest) trial step is taken, as Optax's line search does, and the step is
counted in ``num_failed``; if that step's value is not finite, or the value at
``w`` is not finite, no step is taken (zero update). After a step of size 0 the
next search starts from 1 again.
"""
from __future__ import annotations

import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks, treemath
from cdat_fast.objective import bind_objective
from cdat_fast.tuned import apply_learning_rate, scalar_dtype, tuned


class BacktrackingState(NamedTuple):
  """State of :func:`scale_by_backtracking_linesearch`.

  Attributes:
    count: number of updates (int32).
    learning_rate: the accepted ``η`` (0 if no step was taken).
    num_trials: objective evaluations at the last step (int32).
    num_failed: steps where no trial met the criterion (int32).
  """
  count: jax.Array  # int32
  learning_rate: jax.Array  # accepted η (0 if no step was taken)
  num_trials: jax.Array  # int32, objective evaluations at the last step
  num_failed: jax.Array  # int32, steps where no trial met the criterion


def scale_by_backtracking_linesearch(
    *,
    c: jax.typing.ArrayLike = 1e-4,
    relative_decrease: jax.typing.ArrayLike = 0.0,
    increase_factor: float = math.inf,
    decrease_factor: jax.typing.ArrayLike = 0.8,
    max_steps: int = 100,
) -> optax.GradientTransformationExtraArgs:
  """Chainable backtracking line search along the incoming direction ``u``.

  ``update(updates, state, params, *, value_fn, value=None, grad=None,
  **extra_args)``: ``value`` is ``f(w)`` and ``grad`` is ``∇f(w)``; either is
  computed from ``value_fn`` when missing (one forward-mode pass gives ``f(w)``
  and ``∇f(w)ᵀu`` together).

  Args:
    c: sufficient-decrease constant ``c ≥ 0`` (paper grid 0, 1e-4, 0.5).
    relative_decrease: ``δ ≥ 0`` (paper: 1e-3 with ``c = 0``).
    increase_factor: ``c₊ ≥ 1``; ``inf`` restarts from 1 every step.
    decrease_factor: ``c₋ ∈ (0, 1)`` (paper: 0.8, 0.9).
    max_steps: maximum number of trials per step (``≥ 1``).
  """
  checks.check_range("c", c, low=0.0)
  checks.check_range("relative_decrease", relative_decrease, low=0.0)
  checks.check_range("increase_factor", increase_factor, low=1.0, allow_inf=True)
  checks.check_range("decrease_factor", decrease_factor, low=0.0, high=1.0,
                     low_inclusive=False, high_inclusive=False)
  checks.check_int("max_steps", max_steps, low=1)
  restart_every_step = (checks.concrete_float(increase_factor) == math.inf)

  def init_fn(params):
    dtype = scalar_dtype(params)
    return BacktrackingState(
        count=jnp.zeros([], jnp.int32), learning_rate=jnp.ones([], dtype),
        num_trials=jnp.zeros([], jnp.int32), num_failed=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, value_fn=None, value=None,
                grad=None, **extra_args):
    if params is None:
      raise ValueError("backtracking_linesearch.update needs params")
    objective = bind_objective("backtracking_linesearch", value_fn, extra_args)
    dtype = state.learning_rate.dtype
    if grad is None:
      value0, slope = jax.jvp(objective, (params,), (updates,))
      value = value0 if value is None else value
    else:
      slope = treemath.vdot(grad, updates)
      value = objective(params) if value is None else value
    value = jnp.asarray(value, dtype)
    slope = jnp.asarray(slope, dtype)
    one = jnp.ones([], dtype)
    if restart_every_step:
      eta0 = one
    else:
      prev = state.learning_rate
      eta0 = jnp.where(
          prev > 0, jnp.minimum(jnp.asarray(increase_factor, dtype) * prev, one),
          one)
    shrink = jnp.asarray(decrease_factor, dtype)
    bound_const = (1 + jnp.asarray(relative_decrease, dtype)) * value
    c_ = jnp.asarray(c, dtype)

    def trial(eta):
      new_value = objective(optax.tree.add_scale(params, eta, updates))
      new_value = jnp.asarray(new_value, dtype)
      accepted = new_value <= bound_const + c_ * eta * slope
      return accepted, new_value

    def cond(carry):
      k, _, accepted, _ = carry
      return jnp.logical_and(k < max_steps, jnp.logical_not(accepted))

    def body(carry):
      k, eta, _, _ = carry
      eta = jnp.where(k > 0, eta * shrink, eta)
      accepted, new_value = trial(eta)
      return k + 1, eta, accepted, new_value

    init = (jnp.zeros([], jnp.int32), eta0, jnp.asarray(False),
            jnp.asarray(jnp.nan, dtype))
    num_trials, eta, accepted, new_value = jax.lax.while_loop(cond, body, init)
    usable = jnp.isfinite(value) & jnp.isfinite(new_value)
    eta = jnp.where(usable, eta, jnp.zeros_like(eta))
    new_updates, eta, _ = apply_learning_rate(updates, eta)
    return new_updates, BacktrackingState(
        count=optax.safe_increment(state.count),
        learning_rate=eta,
        num_trials=num_trials,
        num_failed=state.num_failed + (~accepted).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def backtracking_linesearch(
    base: optax.GradientTransformation,
    *,
    c: jax.typing.ArrayLike = 1e-4,
    relative_decrease: jax.typing.ArrayLike = 0.0,
    increase_factor: float = math.inf,
    decrease_factor: jax.typing.ArrayLike = 0.8,
    max_steps: int = 100,
) -> optax.GradientTransformationExtraArgs:
  """Backtracking line search along ``base``'s update (paper eq. 1, app. C.3).

  See :func:`scale_by_backtracking_linesearch` for the arguments. ``max_steps``
  defaults to 100 trials (``0.8^100 ≈ 2e-10``), i.e. "until satisfied" in full
  batch; the paper caps minibatch searches at 30.

  References:
    Roulet et al., "Stepping on the Edge", NeurIPS 2024, appendix C.3;
    Armijo, 1966.
  """
  return tuned(base, scale_by_backtracking_linesearch(
      c=c, relative_decrease=relative_decrease,
      increase_factor=increase_factor, decrease_factor=decrease_factor,
      max_steps=max_steps))
