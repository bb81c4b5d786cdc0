r"""Amortised curvature: an inner estimator every ``k`` steps, held between.

The inner estimator (the exact curvature by default) runs only at refreshes,
under ``jax.lax.cond``, so the other steps skip it entirely; between
refreshes the curvature used is ``d_t = κ ‖u_t‖²`` with a held
``κ ≈ uᵀ∇²f u/‖u‖²``.

*Why safeguards.* Naively holding one measurement for ``k = 10`` steps
diverges at the edge of stability (GD on a ReLU MLP: NaN or overflow on
every seed tried): the direction alternates between sharp and flat, a
measurement taken on a flat one holds an ``η`` far beyond ``2/λ_max``, and
the sharp component grows by ``|1 − ηλ|`` at every held step. Held steps are
also gradient descent at a constant step, which sharpens the landscape until
``λ_max ≈ 2/η``, so even a safeguarded hold ends sharper, with smaller
steps, than exact CDAT. The safeguards, all on by default:

1. *Two measurements per refresh* (``refresh_steps=2``): a refresh measures
   ``κ`` on consecutive steps (each an exact CDAT step) and holds their
   harmonic mean ``m / Σ 1/κ_i``, so that the held step ``σ/κ`` is the mean
   of the steps the refresh took. At the edge the iterate oscillates with
   period 2, so a pair spans both phases.
2. *Bounded growth* (``max_growth=γ``, 2): no step, held or measured, uses a
   curvature below ``κ_held/γ``: ``η`` grows by at most ``γ`` per refresh.
3. *Secant guard* (``secant_guard=ρ``, 0.9): a held step uses
   ``max(κ_held, ρ κ̂)``, ``κ̂`` the secant curvature of the previous step
   (:func:`~cdat_fast.estimators.secant_curvature`, free in full batch).
4. *Early refresh* (``refresh_tol=τ``, 1): when the last step's loss change
   exceeds the quadratic model with the held curvature, ``κ̂ > (1+τ)κ_held``,
   refresh at once.

Safeguards 3 and 4 need ``f(w)``: pass ``value=`` (free from
``jax.value_and_grad``), otherwise it costs a forward pass every step; in
minibatch they read the loss change between two different batches.
``refresh_steps=1, max_growth=inf, secant_guard=0, refresh_tol=inf`` is the
naive scheme. *Cost*: ``refresh_steps/k`` of the inner estimator per step
plus early refreshes (``num_refreshes`` counts the steps that ran it), and a
refresh's jvp runs under the ``cond``, apart from the gradient's forward
pass, so it costs a forward pass more than the inner estimator alone.
Experimental: it lost to sub-batch curvature on every problem measured
(``docs/curvature.md``).
"""
from __future__ import annotations

import math
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cdat_fast import checks
from cdat_fast.estimators import interface
from cdat_fast.estimators.exact import exact
from cdat_fast.estimators.interface import CurvatureEstimator, Estimate
from cdat_fast.tuned import scalar_dtype
from cdat_fast.estimators.secant import (StepMemory, current_value,
                                         empty_memory, remembered_secant)

_NEVER = 2 ** 30  # ``since_refresh`` before the first measurement


class EveryState(NamedTuple):
  """State of :func:`every`."""
  curvature: jax.Array  # κ held between refreshes (per unit ‖u‖²)
  refresh_mean: jax.Array  # harmonic mean of the κ measured in this refresh
  pending: jax.Array  # int32, measurements still due in this refresh
  since_refresh: jax.Array  # int32, updates since the last refresh began
  num_refreshes: jax.Array  # int32, updates that ran the inner estimator
  memory: StepMemory  # the previous step, for safeguards 3 and 4
  inner: Any  # the inner estimator's state


def check_count(name: str, value: Any) -> None:
  """A Python int ≥ 1, or an integer scalar array (inject_hyperparams)."""
  if isinstance(value, (jax.Array, np.ndarray, np.integer)) and (
      np.shape(value) == () and jnp.issubdtype(value.dtype, jnp.integer)):
    checks.check_range(name, value, low=1.0)
  else:
    checks.check_int(name, value, low=1)


def check_arguments(k, refresh_steps, max_growth, secant_guard,
                    refresh_tol) -> None:
  """Raises ValueError naming the first bad argument of :func:`every`."""
  if k is not None:
    check_count("every", k)
  check_count("refresh_steps", refresh_steps)
  checks.check_range("max_growth", max_growth, low=1.0, allow_inf=True)
  checks.check_range("secant_guard", secant_guard, low=0.0)
  checks.check_range("refresh_tol", refresh_tol, low=0.0, allow_inf=True)


def _is_inf(x) -> bool:
  v = checks.concrete_float(x)
  return v is not None and math.isinf(v)


def _early_refresh(state, kappa_sec, usable, learning_rate, tol, dtype):
  """Safeguard 4: the loss change along the last step exceeds the held model.

  ``½η²‖u‖²(κ̂ − (1 + τ)κ) > rounding``.
  """
  excess = 0.5 * jnp.square(learning_rate) * state.memory.prev_sqnorm * (
      kappa_sec - (1 + jnp.asarray(tol, dtype)) * state.curvature)
  rounding = 8 * jnp.finfo(dtype).eps * jnp.abs(state.memory.prev_value)
  return usable & (excess > rounding)


def _secant_guard(kappa_held, kappa_sec, usable, rho, dtype):
  """Safeguard 3: a held step uses at least ``ρ`` times the last secant κ̂."""
  guarded = jnp.maximum(kappa_held, jnp.asarray(rho, dtype) * jnp.abs(kappa_sec))
  return jnp.where(usable, guarded, kappa_held)


def _growth_floor(state, k, gamma, dtype):
  """Safeguard 2: no κ below ``κ_held/γ`` (``k > 1``; the first refresh free)."""
  return jnp.where(k > 1, state.curvature / jnp.asarray(gamma, dtype), 0.0)


def _refresh_fields(state, measure_now, kappa_now, refresh_steps, dtype):
  """Safeguard 1: the held κ is the harmonic mean of a refresh's measurements.

  Kept as the running harmonic mean of the ``j`` measurements so far, so its
  step ``σ/κ`` is the mean of the steps they took (0 once one was 0, which the
  zero-denominator rule turns into ``η = 0``, as in exact CDAT).
  """
  m = jnp.asarray(refresh_steps, jnp.int32)
  starting = measure_now & (state.pending == 0)
  j = jnp.where(starting, 0, m - state.pending).astype(dtype)
  prev = state.refresh_mean
  both = (prev > 0) & (kappa_now > 0)
  combined = jnp.where(both, (j + 1) / (
      j / jnp.where(both, prev, 1) + 1 / jnp.where(both, kappa_now, 1)), 0.0)
  total = jnp.where(starting, kappa_now, combined)
  pending = jnp.where(measure_now, jnp.where(starting, m - 1, state.pending - 1),
                      state.pending)
  done = measure_now & (pending <= 0)
  return dict(
      curvature=jnp.where(done, total, state.curvature),
      refresh_mean=jnp.where(measure_now, total, state.refresh_mean),
      pending=jnp.maximum(pending, 0),
      since_refresh=jnp.where(
          starting, 1, jnp.minimum(state.since_refresh, _NEVER - 1) + 1),
      num_refreshes=state.num_refreshes + measure_now.astype(jnp.int32))


def every(
    k: int | jax.typing.ArrayLike,
    inner: CurvatureEstimator | None = None,
    *,
    refresh_steps: int = 2,
    max_growth: jax.typing.ArrayLike = 2.0,
    secant_guard: jax.typing.ArrayLike = 0.9,
    refresh_tol: jax.typing.ArrayLike = 1.0,
) -> CurvatureEstimator:
  """``inner``'s curvature every ``k`` steps, held between, with safeguards.

  Args:
    k: the refresh period, a Python int ≥ 1 or an integer scalar array (as
      ``optax.inject_hyperparams`` makes it; the period is then dynamic).
    inner: the estimator run at refreshes; :func:`exact` by default.
    refresh_steps: consecutive measurements per refresh (safeguard 1).
    max_growth: ``γ ≥ 1`` or ``inf`` (safeguard 2).
    secant_guard: ``ρ ≥ 0``, 0 for off (safeguard 3).
    refresh_tol: ``τ ≥ 0`` or ``inf`` for never (safeguard 4).

  Returns:
    A :class:`~cdat_fast.estimators.CurvatureEstimator` whose state is an
    :class:`EveryState`.
  """
  check_arguments(k, refresh_steps, max_growth, secant_guard, refresh_tol)
  inner = exact() if inner is None else inner
  early = not _is_inf(refresh_tol)
  guard = checks.concrete_float(secant_guard) != 0.0
  bounded = not _is_inf(max_growth)

  def init(params):
    dtype = scalar_dtype(params)
    zero, izero = jnp.zeros([], dtype), jnp.zeros([], jnp.int32)
    return EveryState(zero, zero, izero, jnp.full([], _NEVER, jnp.int32),
                      izero, empty_memory(dtype), inner.init(params))

  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    dtype = state.curvature.dtype
    value = (current_value(objective, params, value, dtype) if early or guard
             else jnp.zeros([], dtype))
    sqnorm = interface.squared_norm(direction, dtype)
    kappa_sec, usable = remembered_secant(state.memory, value, learning_rate)
    usable = usable & (state.since_refresh < _NEVER)
    period = jnp.asarray(k, jnp.int32)
    measure_now = (state.pending > 0) | (state.since_refresh >= period)
    if early:
      measure_now = measure_now | _early_refresh(
          state, kappa_sec, usable, learning_rate, refresh_tol, dtype)
    kappa_held = state.curvature
    if guard:
      kappa_held = _secant_guard(kappa_held, kappa_sec, usable, secant_guard,
                                 dtype)

    def held():
      s = (slope if slope is not None
           else interface.first_order_slope(objective, params, direction))
      return kappa_held * sqnorm, s

    raw, used_slope, inner_state = interface.measure_or_hold(
        measure_now, inner, state.inner, held, params, direction, objective,
        slope=slope, learning_rate=learning_rate, dtype=dtype)
    safe_sqnorm = jnp.where(sqnorm > 0, sqnorm, jnp.ones_like(sqnorm))
    kappa_now = jnp.where(measure_now & (sqnorm > 0), raw / safe_sqnorm,
                          kappa_held)
    if bounded:
      floor = _growth_floor(state, period, max_growth, dtype)
      kappa_now = jnp.maximum(kappa_now, floor)
      raw = jnp.maximum(raw, floor * sqnorm)
    new_state = EveryState(
        **_refresh_fields(state, measure_now, kappa_now, refresh_steps, dtype),
        memory=StepMemory(value, used_slope, sqnorm), inner=inner_state)
    return Estimate(value, used_slope, raw), new_state

  return CurvatureEstimator(init, update)
