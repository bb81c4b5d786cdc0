r"""The secant curvature: from the loss change along the previous step.

The step ``w_t = w_{t-1} + η u`` (``u = u_{t-1}``, ``η = η_{t-1}``) gives the
average curvature along ``u``,

.. math::
  \hat\kappa = \frac{2\,\big(f(w_t) - f(w_{t-1}) - \eta\, g_{t-1}^\top u\big)}
                    {\eta^2 \|u\|^2},

exact on a quadratic (``κ̂ = uᵀAu/‖u‖²``), and the curvature used is
``d_t = κ_t ‖u_t‖²`` with ``κ_t = β_κ κ_{t-1} + (1 − β_κ)|κ̂|``. *Cost*: no
jvp at all after the first step when ``value=f(w)`` is passed (free from
``jax.value_and_grad``); a forward pass otherwise. *Safeguards*: the average
(``ema``, 0.9) is needed: the raw secant lags one step behind the direction,
which at the edge of stability alternates between sharp and flat
directions, and without averaging the feedback oscillates and diverges. The
first step, and any step whose secant is unusable (previous step skipped or
zero, non-finite values), measures with the ``fallback`` estimator (the
exact curvature) under ``jax.lax.cond``. *Minibatch*: ``f(w_t)`` and
``f(w_{t-1})`` are then losses on different batches, so ``κ̂`` mixes the
curvature with the batch-to-batch loss difference divided by ``η²‖u‖²``:
biased and very noisy. Experimental: in full batch it ended at several
times exact CDAT's loss (``docs/curvature.md``).
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp

from cdat_fast import checks
from cdat_fast.estimators import interface
from cdat_fast.estimators.exact import exact
from cdat_fast.estimators.interface import CurvatureEstimator, Estimate
from cdat_fast.tuned import scalar_dtype


class StepMemory(NamedTuple):
  """What the secant needs of the previous step."""
  prev_value: jax.Array  # f(w_{t-1})
  prev_slope: jax.Array  # g_{t-1}ᵀu_{t-1}
  prev_sqnorm: jax.Array  # ‖u_{t-1}‖²


class SecantState(NamedTuple):
  """State of :func:`secant`."""
  curvature: jax.Array  # κ, the average of |κ̂| (per unit ‖u‖²)
  num_refreshes: jax.Array  # int32, steps that ran the fallback estimator
  memory: StepMemory
  fallback: Any  # the fallback estimator's state


def secant_curvature(
    value: jax.Array,
    prev_value: jax.Array,
    learning_rate: jax.Array,
    prev_slope: jax.Array,
    prev_sqnorm: jax.Array,
) -> tuple[jax.Array, jax.Array]:
  r"""Curvature along the previous step from the loss change it caused.

  .. math::
    \hat\kappa = \frac{2\,(f_t - f_{t-1} - \eta\, s)}{\eta^2 \|u\|^2},
    \qquad s = g_{t-1}^\top u_{t-1},\ u = u_{t-1},\ \eta = \eta_{t-1},

  the Rayleigh quotient ``uᵀAu/‖u‖²`` exactly when ``f`` is the quadratic
  ``½ wᵀAw + bᵀw + c``.

  Args:
    value: ``f(w_t)``.
    prev_value: ``f(w_{t-1})``.
    learning_rate: ``η_{t-1}``, the step taken from ``w_{t-1}``.
    prev_slope: ``g_{t-1}ᵀ u_{t-1}``.
    prev_sqnorm: ``‖u_{t-1}‖²``.

  Returns:
    ``(κ̂, usable)``: ``usable`` is False when the step was zero (``η = 0`` or
    ``u = 0``) or any input or the result is not finite; ``κ̂`` is then 0.
  """
  step_sq = jnp.square(learning_rate) * prev_sqnorm
  usable = (step_sq > 0) & jnp.isfinite(step_sq) & jnp.isfinite(value) & (
      jnp.isfinite(prev_value) & jnp.isfinite(prev_slope))
  safe = jnp.where(usable, step_sq, jnp.ones_like(step_sq))
  kappa = 2.0 * (value - prev_value - learning_rate * prev_slope) / safe
  usable = usable & jnp.isfinite(kappa)
  return jnp.where(usable, kappa, jnp.zeros_like(kappa)), usable


def check_ema(ema) -> None:
  """Raises ValueError naming ``ema`` unless it is in [0, 1)."""
  checks.check_range("ema", ema, low=0.0, high=1.0,
                     high_inclusive=False)


def empty_memory(dtype) -> StepMemory:
  zero = jnp.zeros([], dtype)
  return StepMemory(zero, zero, zero)


def remembered_secant(memory: StepMemory, value, learning_rate):
  """:func:`secant_curvature` of the step from ``memory`` to ``value``."""
  return secant_curvature(value, memory.prev_value, learning_rate,
                          memory.prev_slope, memory.prev_sqnorm)


def current_value(objective, params, value, dtype) -> jax.Array:
  """``f(w)``: the caller's ``value``, or one forward pass of the objective."""
  if value is None:
    value = objective.value()(params)
  return interface.scalar(value, dtype)


def secant(ema: jax.typing.ArrayLike = 0.9,
           fallback: CurvatureEstimator | None = None) -> CurvatureEstimator:
  """The averaged secant curvature ``κ ‖u‖²`` (module doc).

  Args:
    ema: ``β_κ ∈ [0, 1)``, the averaging of the secant estimates.
    fallback: the estimator measuring the first step and any step whose
      secant is unusable; :func:`~cdat_fast.estimators.exact` by default.

  Returns:
    A :class:`~cdat_fast.estimators.CurvatureEstimator` whose state is a
    :class:`SecantState`.
  """
  check_ema(ema)
  fallback = exact() if fallback is None else fallback

  def init(params):
    dtype = scalar_dtype(params)
    return SecantState(jnp.zeros([], dtype), jnp.zeros([], jnp.int32),
                       empty_memory(dtype), fallback.init(params))

  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    dtype = state.curvature.dtype
    value = current_value(objective, params, value, dtype)
    sqnorm = interface.squared_norm(direction, dtype)
    kappa_sec, usable = remembered_secant(state.memory, value, learning_rate)
    measured_before = state.num_refreshes > 0
    usable = usable & measured_before
    b = jnp.asarray(ema, dtype)
    kappa_est = b * state.curvature + (1 - b) * jnp.abs(kappa_sec)
    measure_now = ~usable

    def held():
      s = (slope if slope is not None
           else interface.first_order_slope(objective, params, direction))
      return kappa_est * sqnorm, s

    raw, used_slope, fallback_state = interface.measure_or_hold(
        measure_now, fallback, state.fallback, held, params, direction,
        objective, slope=slope, learning_rate=learning_rate, dtype=dtype)
    safe_sqnorm = jnp.where(sqnorm > 0, sqnorm, jnp.ones_like(sqnorm))
    kappa_now = jnp.where(measure_now & (sqnorm > 0), raw / safe_sqnorm,
                          kappa_est)
    # A fallback measurement joins the average (or starts it).
    kappa = jnp.where(measure_now & measured_before,
                      b * state.curvature + (1 - b) * kappa_now, kappa_now)
    new_state = SecantState(
        curvature=kappa,
        num_refreshes=state.num_refreshes + measure_now.astype(jnp.int32),
        memory=StepMemory(value, used_slope, sqnorm), fallback=fallback_state)
    return Estimate(value, used_slope, raw), new_state

  return CurvatureEstimator(init, update)
