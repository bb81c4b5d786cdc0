r"""GeN: the generalized Newton learning rate (Bu & Xu, ICLR 2025).

For the update ``u_t`` of any base optimizer (run with learning rate 1), GeN
sets the learning rate to the minimiser of the quadratic model of the loss
along ``u``,

.. math::
  \eta^\star = \frac{-g^\top u}{u^\top H u},

which is CDAT's rule with ``σ = 1`` (Roulet et al., 2024, eq. 3). Instead of
a second directional derivative it fits the model from forward passes only:
every ``Φ`` steps (``every``) it evaluates the objective at
``w + k·η_{t-1}·u`` for ``k`` in ``factors`` (default ``(-1, 0, 1)``: three
forward passes, at ``w - ηu``, ``w`` and ``w + ηu``), fits the parabola

.. math::
  L(w + x u) - L(w) \approx \tfrac12 a\, x^2 - b\, x

by least squares (no intercept: the point ``x = 0`` is the origin of the
fit), and computes the proposal ``b / a``. The fit is kept only when it is
good, ``R² > min_r2`` (0.99), ``a > 0`` and ``b > 0``; then

.. math::
  \eta \leftarrow s\,\eta + (1 - s)\,\mathrm{clip}(b/a,\ \eta/c,\ c\,\eta)

with ``s = smooth`` (0.9) and ``c = clip`` (2). Between refreshes, and after
a rejected fit, ``η`` is held. The step that refreshes uses the new ``η``.

On a quadratic the fit is exact: ``a = uᵀHu``, ``b = -gᵀu``, and ``b / a``
is the line minimum along ``u``.

Choices where the paper and its code (``gen-optim`` 0.1.1, ``lr_parabola``)
leave room or where this implementation departs from the code:

* The points sit at ``k·η_{t-1}`` for the given factors, as in the code;
  the fit is ``scipy.optimize.curve_fit``'s least squares of the same
  two-parameter model, solved here in closed form (2×2 normal equations, in
  units of ``η`` so that a small ``η`` loses no precision).
* ``R²`` is scikit-learn's ``r2_score`` of the fit on the points relative to
  ``L(w)``: ``1 - Σ(y-ŷ)² / Σ(y-ȳ)²`` (1 for a perfect fit of constant
  data, else 0 when ``Σ(y-ȳ)² = 0``). With the default three points the
  two-parameter model through the origin interpolates them, so ``R²`` is 1
  up to rounding and only the signs of ``a`` and ``b`` can reject a fit;
  the ``R²`` test bites with more points, e.g. ``factors=(-2, -1, 0, 1,
  2)``.
* The clip is applied to the proposal before smoothing, as in the code:
  one refresh moves ``η`` by a factor in ``[1 - (1-s)(1-1/c), 1 + (1-s)(c-1)]``,
  ``[0.95, 1.1]`` by default, so reaching a learning rate 100× from ``η₀``
  takes about 48 refreshes (≈ 190 steps at ``Φ = 4``): ``η₀`` matters in
  short runs.
* Refreshes happen at updates ``Φ-1, 2Φ-1, ...`` (counting from 0), as the
  code's ``(batch_idx + 1) % lazy_freq == 0``; before the first, ``η = η₀``
  (``learning_rate``, required: the code takes the base optimizer's).
* Non-finite losses at the probe points halve ``η`` (the code's exception
  path, where ``curve_fit`` refuses NaN or Inf), counted as rejected.
* The code calls the base optimizer's ``step()`` once to place the probe
  points and once more to take the step, so a stateful base (Adam, momentum)
  sees the refreshing step's gradient twice; here the base is updated once.
* The code's horizon factor ``scale`` (e.g. ``1 - t/T``) is not included:
  with a schedule, multiply the updates outside.
* The objective is what ``update`` receives as ``value_fn`` (with the extra
  keyword arguments it takes): the code evaluates the losses on a fresh
  minibatch, which is the caller's to pass (``batch=next_batch``).

Safeguards: a direction ``u`` with a NaN or Inf entry gives a zero update
(counted in ``num_skipped``) and skips the refresh; ``η`` stays finite and
positive; no probe loss reaches the parameters.

References:
  Bu & Xu, "Gradient descent with generalized Newton's method", ICLR 2025
  (arXiv:2407.02772).
"""
from __future__ import annotations

import math
from typing import Any, Sequence, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks
from cdat_fast.objective import bind_objective
from cdat_fast.tuned import (apply_learning_rate, scalar_dtype,
                             tree_all_finite, tuned)


class GeNState(NamedTuple):
  """State of :func:`scale_by_gen`. Scalars are float32 (float64 in x64 mode).

  Attributes:
    count: int32, the number of updates.
    learning_rate: ``η``, the learning rate of the last update (``η₀``
      before the first); it is held through a skipped step.
    curvature: ``a`` of the last fit, the estimate of ``uᵀHu`` (0 before
      the first fit).
    slope: ``b`` of the last fit, the estimate of ``-gᵀu``.
    r2: the last fit's ``R²``.
    num_refreshes: int32, fits attempted (every ``Φ`` steps).
    num_rejected: int32, fits not kept (bad ``R²``, ``a ≤ 0``, ``b ≤ 0``,
      or non-finite losses, which halve ``η``).
    num_skipped: int32, zero updates for a non-finite direction.
  """
  count: jax.Array
  learning_rate: jax.Array
  curvature: jax.Array
  slope: jax.Array
  r2: jax.Array
  num_refreshes: jax.Array
  num_rejected: jax.Array
  num_skipped: jax.Array


class ParabolaFit(NamedTuple):
  """A least-squares fit ``y ≈ ½ a x² - b x`` and its ``R²``."""
  curvature: jax.Array  # a
  slope: jax.Array  # b
  r2: jax.Array


def fit_parabola(x: jax.Array, y: jax.Array) -> ParabolaFit:
  """Least squares of ``y ≈ ½ a x² - b x`` (no intercept) and its ``R²``.

  Args:
    x: the points, at least two distinct nonzero values.
    y: the values there (relative to the value at ``x = 0``).

  Returns:
    ``a``, ``b`` and scikit-learn's ``R²``: ``1 - SS_res/SS_tot``; for
    ``SS_tot = 0``, 1 if the fit is exact and 0 otherwise.
  """
  p, q = 0.5 * x * x, -x
  spp, sqq, spq = jnp.sum(p * p), jnp.sum(q * q), jnp.sum(p * q)
  spy, sqy = jnp.sum(p * y), jnp.sum(q * y)
  det = spp * sqq - spq * spq
  safe = jnp.where(det != 0, det, jnp.ones_like(det))
  a = jnp.where(det != 0, (sqq * spy - spq * sqy) / safe, jnp.nan)
  b = jnp.where(det != 0, (spp * sqy - spq * spy) / safe, jnp.nan)
  residual = jnp.sum((y - (a * p + b * q)) ** 2)
  total = jnp.sum((y - jnp.mean(y)) ** 2)
  r2 = jnp.where(total > 0, 1.0 - residual / jnp.where(total > 0, total, 1.0),
                 jnp.where(residual == 0, 1.0, 0.0))
  return ParabolaFit(a, b, r2)


def _check_factors(factors: Sequence[float]) -> tuple[float, ...]:
  try:
    values = tuple(float(k) for k in factors)
  except (TypeError, ValueError):
    raise ValueError(f"factors must be a sequence of numbers, got {factors!r}")
  nonzero = {k for k in values if k != 0}
  if (values.count(0.0) != 1 or len(nonzero) < 2
      or not all(math.isfinite(k) for k in values)):
    raise ValueError(
        "factors must be finite, hold 0 exactly once and at least two other"
        f" distinct values (the probe points k·η·u), got {factors!r}")
  return values


def _check_settings(learning_rate, every, smooth, clip, min_r2) -> None:
  checks.check_range("learning_rate", learning_rate, low=0.0,
                     low_inclusive=False)
  if isinstance(every, bool) or not isinstance(every, int) or every < 1:
    raise ValueError(f"every must be a positive integer (Φ, the steps"
                     f" between refreshes), got {every!r}")
  checks.check_range("smooth", smooth, low=0.0, high=1.0,
                     high_inclusive=False)
  checks.check_range("clip", clip, low=1.0, allow_inf=True)
  checks.check_range("min_r2", min_r2, high=1.0, allow_inf=True)


def _probe_losses(objective, params, updates, eta, factors):
  """The objective at ``w + k·η·u`` for each factor ``k`` (one traced body)."""
  def at(k):
    point = jax.tree.map(lambda w, u: w + (k * eta).astype(w.dtype) * u,
                         params, updates)
    return jnp.asarray(objective(point)).astype(eta.dtype)
  return jax.lax.map(at, jnp.asarray(factors, eta.dtype))


def _refreshed(state: GeNState, losses, factors, *, smooth, clip, min_r2
               ) -> GeNState:
  """The state after a refresh whose probe returned ``losses``."""
  eta = state.learning_rate
  dtype = eta.dtype
  k = jnp.asarray(factors, dtype)
  y = losses - losses[factors.index(0.0)]
  fit = fit_parabola(k, y)  # in units of η: a = ã/η², b = b̃/η, b/a = η b̃/ã
  finite = jnp.all(jnp.isfinite(losses))
  good = (finite & jnp.isfinite(fit.r2) & (fit.curvature > 0)
          & (fit.slope > 0) & (fit.r2 > jnp.asarray(min_r2, dtype)))
  proposal = eta * fit.slope / jnp.where(good, fit.curvature, 1.0)
  c = jnp.asarray(clip, dtype)
  clipped = jnp.clip(proposal, eta / c, eta * c)
  s = jnp.asarray(smooth, dtype)
  new = jnp.where(good, s * eta + (1 - s) * clipped,
                  jnp.where(finite, eta, 0.5 * eta))
  keep = lambda v, old: jnp.where(good, v, old)
  return state._replace(
      learning_rate=new,
      curvature=keep(fit.curvature / (eta * eta), state.curvature),
      slope=keep(fit.slope / eta, state.slope),
      r2=jnp.where(finite, fit.r2, state.r2),
      num_refreshes=state.num_refreshes + 1,
      num_rejected=state.num_rejected + (~good).astype(jnp.int32))


def scale_by_gen(
    learning_rate: float,
    *,
    every: int = 4,
    factors: Sequence[float] = (-1.0, 0.0, 1.0),
    smooth: float = 0.9,
    clip: float = 2.0,
    min_r2: float = 0.99,
) -> optax.GradientTransformationExtraArgs:
  """Chainable GeN: scales the incoming direction ``u`` by GeN's ``η``.

  Place it after a base optimizer run with learning rate 1, e.g.
  ``optax.chain(optax.adam(1.0), scale_by_gen(1e-3))``, and call
  ``update(updates, state, params, value_fn=f, **extra_args)``; the extra
  keyword arguments that ``value_fn``'s signature takes are passed to it
  (``value_fn(params, batch=...)``). The module docstring has the recipe.

  Args:
    learning_rate: ``η₀ > 0``, the learning rate until the first refresh.
    every: ``Φ ≥ 1``, refresh every ``Φ`` updates (the authors: Φ ≥ 4).
    factors: the probe points ``w + k·η·u``; 0 once and at least two other
      distinct values. ``len(factors)`` forward passes per refresh.
    smooth: ``s ∈ [0, 1)``, ``η ← s·η + (1-s)·proposal``.
    clip: ``c ≥ 1`` or ``inf``, the proposal is clipped to ``[η/c, c·η]``.
    min_r2: a fit is kept only with ``R² > min_r2`` (≤ 1).

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a
    :class:`GeNState`.
  """
  _check_settings(learning_rate, every, smooth, clip, min_r2)
  factors = _check_factors(factors)

  def init_fn(params):
    dtype = scalar_dtype(params)
    zero, izero = jnp.zeros([], dtype), jnp.zeros([], jnp.int32)
    return GeNState(count=izero, learning_rate=jnp.asarray(learning_rate,
                                                            dtype),
                    curvature=zero, slope=zero, r2=zero, num_refreshes=izero,
                    num_rejected=izero, num_skipped=izero)

  def update_fn(updates, state, params=None, *, value_fn=None, **extra_args):
    if params is None:
      raise ValueError("scale_by_gen.update needs params (the current point)")
    for name in ("grad", "value"):  # what tuned() and training loops pass
      extra_args.pop(name, None)
    objective = bind_objective("gen", value_fn, extra_args)
    finite_u = tree_all_finite(updates)
    due = (state.count + 1) % every == 0

    def refresh(st):
      losses = _probe_losses(objective, params, updates, st.learning_rate,
                             factors)
      return _refreshed(st, losses, factors, smooth=smooth, clip=clip,
                        min_r2=min_r2)

    state = jax.lax.cond(due & finite_u, refresh, lambda st: st, state)
    new_updates, _, ok = apply_learning_rate(updates, state.learning_rate,
                                             finite_u)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count),
        num_skipped=state.num_skipped + (~ok).astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def gen(
    base: optax.GradientTransformation,
    learning_rate: float,
    *,
    every: int = 4,
    factors: Sequence[float] = (-1.0, 0.0, 1.0),
    smooth: float = 0.9,
    clip: float = 2.0,
    min_r2: float = 0.99,
) -> optax.GradientTransformationExtraArgs:
  """GeN on top of any base optimizer: ``w ← w + η u``, ``η`` fitted every Φ steps.

  ``η`` minimises a parabola fitted to ``len(factors)`` losses along ``u``
  (forward passes only), kept when the fit is good, smoothed and clipped
  (module docstring). It is CDAT's ``σ = 1`` with the curvature from a fit
  refreshed every ``Φ`` steps instead of a jvp of a jvp at every step.

  Args:
    base: the direction, an optax transformation with learning rate 1
      (``optax.sgd(1.0)``, ``optax.adam(1.0)``, a chain).
    learning_rate: ``η₀ > 0``, the learning rate until the first refresh
      (the base optimizer's usual learning rate).
    every: ``Φ ≥ 1``: refresh every ``Φ`` updates (default 4).
    factors: the probe points ``w + k·η·u`` (default ``(-1, 0, 1)``).
    smooth: ``s ∈ [0, 1)`` (default 0.9).
    clip: ``c ≥ 1`` (default 2).
    min_r2: the fit quality to keep a fit (default 0.99).

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, value_fn, **extra_args)`` returns ``η · u``; the learning
    rate is ``optax.tree.get(state, "learning_rate")``.

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import cdat_fast
    >>> f = lambda w: jnp.sum(jnp.array([1.0, 4.0]) * (w - 1.0) ** 2)
    >>> opt = cdat_fast.gen(optax.sgd(1.0), learning_rate=0.01, every=1)
    >>> w = jnp.zeros(2)
    >>> state = opt.init(w)
    >>> u, state = opt.update(jax.grad(f)(w), state, w, value_fn=f)
    >>> round(float(optax.tree.get(state, "learning_rate")), 6)  # clipped: 2η₀
    0.011

  References:
    Bu & Xu, "Gradient descent with generalized Newton's method", ICLR 2025.
  """
  return tuned(base, scale_by_gen(
      learning_rate, every=every, factors=factors, smooth=smooth, clip=clip,
      min_r2=min_r2))
