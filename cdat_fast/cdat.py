r"""CDAT: the Curvature Dynamics Aware Tuning rule (Roulet et al., 2024, eq. 8).

For the update ``u_t`` of any base optimizer (run with learning rate 1),

.. math::
  \eta_t = \sigma\, \frac{\tilde n_t}{\tilde d_t}, \qquad
  n_t = \max(-g_t^\top u_t,\, 0), \qquad
  d_t = |u_t^\top \nabla^2 f(w_t)\, u_t| + \varepsilon,

with ``ñ_t = β ñ_{t-1} + (1-β) n_t`` and likewise ``d̃_t`` (both start at 0, so
the bias cancels in the ratio; ``β = 0`` is no averaging). ``σ = 1`` is the
quadratically greedy rule (eq. 3): on a quadratic it lands on the minimum along
``u``. ``σ = 2`` is the "on edge" rule (eq. 7): on a quadratic
``f(w + η u) = f(w)``, which places the step at the edge of stability.

The curvature ``uᵀ∇²f u`` comes from a curvature estimator
(:mod:`cdat_fast.estimators`): by default the exact second directional
derivative, a jvp of a jvp; cheaper ones trade exactness for time
(``docs/curvature.md`` measures what each keeps).

Policy at the edges (never NaN or Inf in the updates, the averages or any
other state):

* ascent direction (``gᵀu ≥ 0``): ``n = 0``, so ``η = 0``;
* negative curvature: its absolute value is used;
* non-finite loss, numerator or curvature (NaN/Inf anywhere upstream): the
  step is skipped: zero update, and the averages and the estimator's state
  keep their previous values;
* zero averaged denominator (a zero direction, or zero curvature with
  ``eps = 0``) or an overflowing ratio: ``η = 0``.

Skipped and zero-denominator steps are counted in ``num_skipped``.

References:
  Roulet, Agarwala, Grill, Swirszcz, Blondel, Pedregosa, "Stepping on the
  Edge: Curvature Aware Learning Rate Tuners", NeurIPS 2024.
"""
from __future__ import annotations

import functools
import inspect
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks, estimators, treemath
from cdat_fast.estimators.every import check_count
from cdat_fast.estimators.interface import CurvatureEstimator, Objective
from cdat_fast.tuned import apply_learning_rate, scalar_dtype, tuned

CURVATURES = ("exact", "gauss_newton", "secant", "finite_difference")

# Leaves of u at least this large (1 MiB in float32) are materialised once
# (scale_by_cdat). Smaller leaves save little and cost a kernel each when
# materialised apart; on a v5e, Mixer's 784x96 token weights through the
# barrier took its CDAT step from 159 to 212 MiB of temporaries.
_MATERIALISE_ELEMENTS = 1 << 18


def _materialise_large(u: jax.Array) -> jax.Array:
  if jnp.size(u) < _MATERIALISE_ELEMENTS:
    return u
  return jax.lax.optimization_barrier(u)


class CDATState(NamedTuple):
  """State of :func:`scale_by_cdat`. Scalars are float32 (float64 in x64 mode).

  Attributes:
    count: int32, the number of updates.
    learning_rate: ``η`` used at the last update.
    numerator: ``ñ``, the averaged ``max(-gᵀu, 0)``.
    denominator: ``d̃``, the averaged ``|uᵀHu| + ε``.
    num_skipped: int32, steps with ``η`` forced to 0 (module doc).
    estimator: the curvature estimator's state (``optax.EmptyState()`` for
      the exact curvature).
  """
  count: jax.Array  # int32, number of updates
  learning_rate: jax.Array  # η used at the last update
  numerator: jax.Array  # ñ, averaged max(-gᵀu, 0)
  denominator: jax.Array  # d̃, averaged |uᵀHu| + ε
  num_skipped: jax.Array  # int32, steps with η forced to 0 (see module doc)
  estimator: Any  # the curvature estimator's state


# The keywords that scale_by_cdat and cdat no longer take: each belongs to an
# estimator, given as ``curvature=``.
_REMOVED = {
    "every": "estimators.every({v})",
    "refresh_steps": "estimators.every(k, refresh_steps={v})",
    "max_growth": "estimators.every(k, max_growth={v})",
    "secant_guard": "estimators.every(k, secant_guard={v})",
    "refresh_tol": "estimators.every(k, refresh_tol={v})",
    "curvature_ema": "estimators.secant(ema={v})",
}


def _named(curvature: str, fraction, options: dict) -> CurvatureEstimator:
  """The estimator ``curvature`` names, on a sub-batch if ``fraction``."""
  if curvature == "secant":
    fallback = None if fraction is None else estimators.subbatch(fraction)
    return estimators.secant(**options, fallback=fallback)
  inner = getattr(estimators, curvature)(**options)
  return inner if fraction is None else estimators.subbatch(fraction, inner)


def make_estimator(
    curvature: str | CurvatureEstimator = "exact",
    every: int | jax.typing.ArrayLike | None = None,
    *,
    fraction: float | None = None,
    **options: Any,
) -> CurvatureEstimator:
  """The one factory of curvature estimators by name.

  ``cdat(..., curvature=name, every=k)``, the training harness
  (``--curvature``, ``--every``, ``--curvature-batch``) and the benchmarks
  build their estimators here.

  Args:
    curvature: ``"exact"`` (:func:`~cdat_fast.estimators.exact`),
      ``"gauss_newton"``, ``"secant"``, ``"finite_difference"``, or an
      estimator object.
    every: ``k ≥ 1`` (a Python int, or an integer scalar array under
      ``optax.inject_hyperparams``): measure only every ``k`` steps,
      :func:`~cdat_fast.estimators.every` with its default safeguards
      (``estimators.every(k, inner, ...)`` sets them). ``None`` or 1: every
      step. Not with ``"secant"``, already free every step.
    fraction: ``1/m``: measure on every ``m``-th row of the batch
      (:func:`~cdat_fast.estimators.subbatch`); for ``"secant"``, its
      fallback measures there.
    **options: passed to the named estimator's constructor, e.g.
      ``make_estimator("finite_difference", fraction=1/16, step=1e-3)`` or
      ``make_estimator("secant", ema=0.5)``; not with an estimator object.

  Returns:
    A :class:`~cdat_fast.estimators.CurvatureEstimator`.

  Raises:
    ValueError: naming ``curvature``, ``every`` or ``fraction`` when bad.
    TypeError: an option the named estimator does not take.
  """
  if isinstance(curvature, CurvatureEstimator):
    if options:
      raise TypeError(
          f"make_estimator: options {sorted(options)} need a curvature name;"
          " give them to the estimator's constructor instead")
  else:
    checks.check_choice("curvature", curvature, CURVATURES)
  if every is not None:
    check_count("every", every)
  every_step = every is None or (isinstance(every, int) and every == 1)
  if curvature == "secant" and not every_step:
    raise ValueError(
        "every must be 1 (or None) with curvature='secant': the secant"
        f" estimate is already free every step, got every={every!r}")
  if isinstance(curvature, CurvatureEstimator):
    inner = (curvature if fraction is None
             else estimators.subbatch(fraction, curvature))
  else:
    inner = _named(curvature, fraction, options)
  return inner if every_step else estimators.every(every, inner)


def _reject_removed(fn):
  """``fn`` raising a TypeError that names a removed keyword and its place.

  The keywords of ``_REMOVED`` that ``fn`` does not take belong to an
  estimator; the error says which one to give as ``curvature=``.
  """
  removed = [name for name in _REMOVED
             if name not in inspect.signature(fn).parameters]

  @functools.wraps(fn)
  def wrapper(*args, **kwargs):
    for name in removed:
      if name in kwargs:
        value = repr(kwargs[name])
        shorthand = f" (or cdat(..., every={value}))" if name == "every" else ""
        raise TypeError(
            f"{fn.__name__}({name}={value}): give curvature="
            f"{_REMOVED[name].format(v=value)}{shorthand}; {name} belongs to"
            " the curvature estimator (cdat_fast.estimators)")
    return fn(*args, **kwargs)

  return wrapper


@_reject_removed
def scale_by_cdat(
    *,
    scale: jax.typing.ArrayLike = 2.0,
    ema: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 0.0,
    curvature: str | CurvatureEstimator = "exact",
) -> optax.GradientTransformationExtraArgs:
  r"""Chainable CDAT: scales the incoming direction ``u`` by ``η = σ ñ / d̃``.

  Place it after a base optimizer run with learning rate 1, e.g.
  ``optax.chain(optax.adam(1.0), scale_by_cdat(scale=2.0, ema=0.9))``, and
  call ``update(updates, state, params, value_fn=f, grad=g, **extra_args)``.
  The gradient ``g`` gives the numerator ``max(-gᵀu, 0)``; without it the
  numerator uses ``∂f(w)[u]`` from the curvature estimator (equal to
  ``gᵀu`` when ``value_fn`` is the objective that produced ``g``). Extra
  keyword arguments are passed to ``value_fn`` when its signature takes them
  (``value_fn(params, batch=...)``). ``value=f(w)`` is used by the estimators
  that read the loss (secant, the safeguards of ``every``; computed from the
  objective if missing); ``model_fn=`` and ``loss_fn=`` replace ``value_fn``
  for the Gauss–Newton curvature.

  Args:
    scale: ``σ > 0``; 1 is quadratically greedy, 2 is on edge.
    ema: ``β ∈ [0, 1)``, averaging of numerator and denominator.
    eps: ``ε ≥ 0`` added to the absolute curvature.
    curvature: a :class:`~cdat_fast.estimators.CurvatureEstimator` (its
      knobs with it: ``estimators.every(4, refresh_steps=1)``,
      ``estimators.secant(ema=0.5)``), or a name for
      :func:`make_estimator`: ``"exact"`` (default), ``"gauss_newton"``,
      ``"secant"`` or ``"finite_difference"``.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a
    :class:`CDATState`.
  """
  checks.check_range("scale", scale, low=0.0, low_inclusive=False)
  checks.check_range("ema", ema, low=0.0, high=1.0, high_inclusive=False)
  checks.check_range("eps", eps, low=0.0)
  estimator = make_estimator(curvature)

  def init_fn(params):
    dtype = scalar_dtype(params)
    zero, izero = jnp.zeros([], dtype), jnp.zeros([], jnp.int32)
    return CDATState(count=izero, learning_rate=zero, numerator=zero,
                     denominator=zero, num_skipped=izero,
                     estimator=estimator.init(params))

  def update_fn(updates, state, params=None, *, value_fn=None, grad=None,
                value=None, model_fn=None, loss_fn=None, **extra_args):
    if params is None:
      raise ValueError("scale_by_cdat.update needs params (the current point)")
    dtype = state.learning_rate.dtype
    objective = Objective("scale_by_cdat", value_fn, model_fn, loss_fn,
                          extra_args)
    slope = (None if grad is None
             else treemath.vdot(grad, updates).astype(dtype))
    # Each large leaf of u materialised once, after gᵀu: otherwise XLA
    # recomputes a cheap u (SGD's -g) from g in the final update, which keeps
    # g live beside u through the curvature's jet. Small leaves are left to
    # XLA's fusion (_MATERIALISE_ELEMENTS).
    updates = jax.tree.map(_materialise_large, updates)
    estimate, estimator_state = estimator.update(
        state.estimator, params, updates, objective, slope=slope, value=value,
        learning_rate=state.learning_rate)
    n = jnp.maximum(-jnp.asarray(estimate.slope).astype(dtype), 0.0)
    d = (jnp.abs(jnp.asarray(estimate.curvature).astype(dtype))
         + jnp.asarray(eps, dtype))
    finite = (jnp.isfinite(jnp.asarray(estimate.slope)) & jnp.isfinite(d)
              & jnp.isfinite(jnp.asarray(estimate.value)))
    beta = jnp.asarray(ema, dtype)
    keep = lambda new, old: jnp.where(finite, new, old)
    numerator = keep(beta * state.numerator + (1 - beta) * n, state.numerator)
    denominator = keep(beta * state.denominator + (1 - beta) * d,
                       state.denominator)
    positive = denominator > 0
    safe_den = jnp.where(positive, denominator, jnp.ones_like(denominator))
    eta = jnp.where(finite & positive,
                    jnp.asarray(scale, dtype) * numerator / safe_den,
                    jnp.zeros_like(numerator))
    # A finite gᵀu (with g finite) implies a finite u: a NaN or Inf entry of
    # u makes its term, and so the sum, NaN or ±Inf. That saves a pass over u.
    new_updates, eta, ok = apply_learning_rate(
        updates, eta, None if slope is None else jnp.isfinite(slope))
    skipped = ~(finite & positive & ok)
    return new_updates, CDATState(
        count=optax.safe_increment(state.count), learning_rate=eta,
        numerator=numerator, denominator=denominator,
        num_skipped=state.num_skipped + skipped.astype(jnp.int32),
        estimator=jax.tree.map(keep, estimator_state, state.estimator))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


@_reject_removed
def cdat(
    base: optax.GradientTransformation,
    *,
    scale: jax.typing.ArrayLike = 2.0,
    ema: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 0.0,
    curvature: str | CurvatureEstimator = "exact",
    every: int | jax.typing.ArrayLike | None = None,
) -> optax.GradientTransformationExtraArgs:
  r"""CDAT on top of any base optimizer: ``w ← w + η_t u_t``, ``η_t = σ ñ_t / d̃_t``.

  .. math::
    \eta_t = \sigma\, \frac{\max(-g_t^\top u_t, 0)}{|u_t^\top \nabla^2 f(w_t) u_t| + \varepsilon}

  (with optional averaging of numerator and denominator, see
  :func:`scale_by_cdat`).

  **Curvature.** The default measures ``uᵀ∇²f u`` exactly at every step by
  a jvp of a jvp (about 4 forward passes on top of the step's 3, ≈2x a
  step). ``curvature=`` takes an estimator from :mod:`cdat_fast.estimators`
  or a name:

  * ``estimators.subbatch(1/16, inner=estimators.gauss_newton())``: the
    Gauss–Newton curvature on every 16th row of the batch, the numerator on
    all of it; the recommended fast mode (``docs/curvature.md`` has the
    figures behind it: within exact CDAT's final loss on four problems).
    ``update`` then takes ``model_fn=`` and ``loss_fn=`` and the batch as a
    keyword argument. With only ``value_fn``, ``estimators.subbatch(1/4)``
    (the exact curvature on every 4th row) is the safe choice; smaller
    fractions of small batches are noisy.
  * ``"gauss_newton"``: ``(Ju)ᵀ∇²ℓ(z)(Ju)``, first-order forward mode
    through the model; ``update`` then takes ``model_fn=`` (parameters to
    outputs) and ``loss_fn=`` (outputs to a scalar) instead of ``value_fn``.
  * ``"secant"`` (experimental): from the loss change along the previous
    step; pass ``value=`` (free from ``jax.value_and_grad``).
  * ``"finite_difference"`` (experimental): loss values alone, through
    layers without forward mode (:mod:`cdat_fast.estimators.finite_difference`).
  * ``every=k`` (experimental): the curvature (exact, Gauss–Newton or any
    estimator given) only every ``k`` steps, under ``jax.lax.cond``, held
    between with the default safeguards of :mod:`cdat_fast.estimators.every`;
    a shorthand for ``curvature=estimators.every(k, inner)``, which sets the
    safeguards (``refresh_steps``, ``max_growth``, ``secant_guard``,
    ``refresh_tol``). The secant's averaging is
    ``curvature=estimators.secant(ema=...)``.

  Args:
    base: the direction, an optax transformation with learning rate 1:
      ``optax.sgd(1.0)``, ``optax.sgd(1.0, momentum=0.9)``,
      ``optax.rmsprop(1.0)``, ``optax.adam(1.0)``, or a chain.
    scale: ``σ > 0``; 1 is quadratically greedy, 2 is on edge (the paper's
      recommendation, with 1.9375–2.0625 as good variants).
    ema: ``β ∈ [0, 1)``; the paper uses 0.9 or 0.99 with Adam and in minibatch.
    eps: ``ε ≥ 0`` added to the absolute curvature.
    curvature: an estimator, or ``"exact"`` (default), ``"gauss_newton"``,
      ``"secant"``, ``"finite_difference"`` (:func:`make_estimator`).
    every: measure the curvature every ``every`` steps (a Python int ≥ 1;
      ``None``, the default, means 1), with the default safeguards. With
      ``optax.inject_hyperparams`` an explicit ``every`` becomes a traced
      integer, which works (the period is then dynamic) but always compiles
      the ``cond``; list it in ``static_args`` to keep it static.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, value_fn, **extra_args)`` returns ``η_t · u_t``. The learning
    rate used is ``optax.tree.get(state, "learning_rate")``; also
    ``numerator``, ``denominator`` and ``num_skipped``, and what the
    estimator keeps (``curvature`` and ``num_refreshes`` for ``every`` and
    ``secant``).

  Examples:
    >>> import jax, jax.numpy as jnp, optax
    >>> import cdat_fast
    >>> f = lambda w: jnp.sum((w - 1.0) ** 2)
    >>> opt = cdat_fast.cdat(optax.sgd(1.0), scale=1.0)
    >>> w = jnp.zeros(3)
    >>> state = opt.init(w)
    >>> u, state = opt.update(jax.grad(f)(w), state, w, value_fn=f)
    >>> optax.apply_updates(w, u)
    Array([1., 1., 1.], dtype=float32)

    Gauss–Newton curvature of a linear model with squared loss (exact here):

    >>> x = jnp.array([[1.0, 2.0], [3.0, 4.0]]); y = jnp.array([1.0, 0.0])
    >>> model_fn = lambda w: x @ w
    >>> loss_fn = lambda z: 0.5 * jnp.sum((z - y) ** 2)
    >>> opt = cdat_fast.cdat(optax.sgd(1.0), curvature="gauss_newton")
    >>> w = jnp.zeros(2)
    >>> g = jax.grad(lambda w: loss_fn(model_fn(w)))(w)
    >>> u, state = opt.update(g, opt.init(w), w, model_fn=model_fn,
    ...                       loss_fn=loss_fn)

  References:
    Roulet et al., "Stepping on the Edge: Curvature Aware Learning Rate
    Tuners", NeurIPS 2024, eq. 8.
  """
  return tuned(base, scale_by_cdat(
      scale=scale, ema=ema, eps=eps,
      curvature=make_estimator(curvature, every)))


def quadratic_greedy(base: optax.GradientTransformation,
                     **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """CDAT with ``σ = 1``: the quadratically greedy rule (paper eq. 3)."""
  if "scale" in kwargs:
    raise TypeError("quadratic_greedy fixes scale=1; use cdat(base, scale=...)")
  return cdat(base, scale=1.0, **kwargs)


def on_edge(base: optax.GradientTransformation,
            **kwargs: Any) -> optax.GradientTransformationExtraArgs:
  """CDAT with ``σ = 2``: the on-edge rule (paper eq. 7)."""
  if "scale" in kwargs:
    raise TypeError("on_edge fixes scale=2; use cdat(base, scale=...)")
  return cdat(base, scale=2.0, **kwargs)
