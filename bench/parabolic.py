r"""Bench-only curvature from parabolas fitted at the scale of the step.

Two published line-search models turned into CDAT curvature estimators, to
measure ``estimators.finite_difference()`` against (``bench_curvature.py``'s
``gen`` and ``pal`` variants). Not part of the library. Both return a
curvature ``d`` for CDAT's rule ``η = σ max(−gᵀu, 0)/(|d| + ε)`` and keep
its exact numerator ``gᵀu`` (the ``slope`` the rule hands over).

:func:`gen` follows GeN (Bu & Xu, "Gradient descent with generalized
Newton's method", ICLR 2025, and its reference code ``gen-optim``): every
``every = Φ`` steps it evaluates the loss at ``w − μu``, ``w``, ``w + μu``
with ``μ = η_{t−1}``, the step taken last, and fits ``f(w + xu) − f(w) ≈
½ a x² + b x`` (least squares; through three points the fit is exact, so
GeN's ``R² > 0.99`` test only rejects non-finite values). A fit is accepted
when ``a > 0`` and ``b < 0`` (GeN's positivity test); GeN's learning rate
``η* = −b/a`` is then clipped to ``[½, 2]×`` the held one and averaged into
it with weight ``0.1`` (GeN's ``smooth = 0.9``). As a curvature: the state
holds ``ρ``, GeN's learning rate with the exact slope, ``ρ* = −gᵀu/a``, and
the estimate is ``d = |gᵀu|/ρ``, so CDAT's rule steps ``σρ``: σ times GeN's
smoothed step. GeN's first learning rate is a user's choice; here the first
accepted fit sets ``ρ`` directly (``|a|`` if it had ``a ≤ 0``), measured at
``μ‖u‖ = 10⁻³ max(‖w‖, 1)`` since there is no previous step, and a refit
runs at every step until then. Cost: two forward passes per refit (``f(w)``
is the caller's ``value``; GeN's code evaluates it again, on the next
batch), under ``jax.lax.cond``: ``2/Φ`` of a forward pass per step.

:func:`pal` follows PAL (Mutschler & Zell, "Parabolic approximation line
search for DNNs", NeurIPS 2020): along the normalised direction ``û =
u/‖u‖`` it fits ``f(w + sû) ≈ f(w) + bs + as²`` from ``f(w)``, the exact
slope ``b = gᵀu/‖u‖`` and ``f`` at the measuring step ``s = μ`` (PAL's
recommended 0.1 to 1; 0.1 here), so ``uᵀHu ≈ 2a‖u‖²``. PAL's cases, as the
curvature that makes CDAT's step ``η‖u‖`` the length PAL steps (PAL's
update step adaptation ``α`` is CDAT's ``σ``, passed as ``scale``): ``a > 0,
b < 0``: ``σ(−b)/(2a)``, at most ``s_max`` (3.6, PAL's README); ``a ≤ 0, b <
0``: ``μ``; ``b ≥ 0``: no step (CDAT's numerator is 0). Cost: one forward
pass per step (``f(w)`` is the caller's ``value``) and the norm of ``u``.

Both measure secants over steps as long as CDAT's own, where
``finite_difference()`` balances truncation and rounding to measure the
local ``uᵀ∇²f(w)u``; the bench shows what that changes in training.
"""
from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from cdat_fast import treemath
from cdat_fast.estimators import interface
from cdat_fast.estimators.interface import CurvatureEstimator, Estimate
from cdat_fast.tuned import scalar_dtype


def _at(fn, params, direction, step, dtype):
  """``f(w + step·u)`` in ``dtype`` (the shift computed in ``w``'s dtype)."""
  moved = jax.tree.map(lambda w, u: w + step.astype(w.dtype) * u.astype(
      w.dtype), params, direction)
  return interface.scalar(fn(moved), dtype)


class GeNState(NamedTuple):
  count: jax.Array  # int32, updates so far
  rate: jax.Array  # ρ, GeN's held learning rate (0: none accepted yet)
  num_refreshes: jax.Array  # int32, updates that fitted a parabola


def gen(every: int = 4, smooth: float = 0.9,
        pilot: float = 1e-3) -> CurvatureEstimator:
  """GeN's parabola through ``w ∓ η_{t−1}u`` and ``w``, every ``every`` steps.

  Module doc. ``slope`` (``gᵀu``) must be given; ``value`` is used when
  given, else ``f(w)`` costs a forward pass more per refit.
  """
  def init(params):
    dtype = scalar_dtype(params)
    izero = jnp.zeros([], jnp.int32)
    return GeNState(izero, jnp.zeros([], dtype), izero)

  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    dtype = state.rate.dtype
    fn = objective.value()
    slope = interface.scalar(slope, dtype)

    def refit(rate):
      unorm = treemath.norm(direction).astype(dtype)
      first = pilot * jnp.maximum(treemath.norm(params).astype(dtype), 1.0)
      mu = jnp.where(learning_rate > 0, interface.scalar(learning_rate, dtype),
                     first / jnp.maximum(unorm, jnp.finfo(dtype).tiny))
      f0 = interface.scalar(fn(params) if value is None else value, dtype)
      fp = _at(fn, params, direction, mu, dtype)
      fm = _at(fn, params, direction, -mu, dtype)
      a = ((fp - f0) + (fm - f0)) / jnp.square(mu)
      b = (fp - fm) / (2 * mu)
      fitted = -slope / a
      ok = (a > 0) & (b < 0) & jnp.isfinite(fitted)
      smoothed = smooth * rate + (1 - smooth) * jnp.clip(fitted, rate / 2,
                                                         2 * rate)
      return jnp.where(rate > 0, jnp.where(ok, smoothed, rate),
                       -slope / jnp.abs(a))

    due = (state.rate <= 0) | (state.count % every == 0)
    rate = jax.lax.cond(due, refit, lambda r: r, state.rate)
    estimate = Estimate(interface.scalar(0 if value is None else value, dtype),
                        slope, jnp.abs(slope) / rate)
    return estimate, GeNState(state.count + 1, rate,
                              state.num_refreshes + due.astype(jnp.int32))

  return CurvatureEstimator(init, update)


def pal(measure: float = 0.1, max_step: float = 3.6,
        scale: float = 2.0) -> CurvatureEstimator:
  """PAL's parabola from ``f(w)``, the slope and ``f(w + μû)``; module doc.

  ``scale`` must be CDAT's ``σ`` for ``max_step`` and the ``a ≤ 0`` case to
  give PAL's step lengths. ``slope`` (``gᵀu``) must be given.
  """
  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    del learning_rate
    fn = objective.value()
    dtype = scalar_dtype(params)
    slope = interface.scalar(slope, dtype)
    f0 = interface.scalar(fn(params) if value is None else value, dtype)
    sq = interface.squared_norm(direction, dtype)
    unorm = jnp.sqrt(sq)
    mu = interface.scalar(measure, dtype)
    b = slope / unorm
    a = (_at(fn, params, direction, mu / unorm, dtype) - f0 - b * mu) / mu**2
    # d such that CDAT's step length σ|b|‖u‖²/d is PAL's.
    at_length = lambda s: scale * jnp.abs(b) * sq / s
    curvature = jnp.where(a > 0, jnp.maximum(2 * a * sq, at_length(max_step)),
                          at_length(mu))
    return Estimate(f0, slope, curvature), state

  return CurvatureEstimator(lambda params: (), update)
