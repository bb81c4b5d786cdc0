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
``f(w + η u) = f(w)``, which places the step at the edge of stability. The
curvature ``uᵀ∇²f u`` is the second directional derivative, computed by a jvp
of a jvp (:func:`cdat_fast.curvature.directional_derivatives`).

Cheaper curvature (``cdat(..., curvature=, every=)``, see :func:`cdat`):
``"gauss_newton"`` (first-order forward mode through the model only),
``"secant"`` (from the loss change along the previous step) and ``every=k``
(the jvp only every ``k`` steps, with safeguards). The exact jvp of a jvp
every step stays the default and the reference.

Policy at the edges (never NaN or Inf in the updates, the averages or any
other state):

* ascent direction (``gᵀu ≥ 0``): ``n = 0``, so ``η = 0``;
* negative curvature: its absolute value is used;
* non-finite loss, numerator or denominator (NaN/Inf anywhere upstream):
  the step is skipped: zero update, the averages and the curvature estimates
  keep their previous values;
* zero averaged denominator (a zero direction, or zero curvature with
  ``eps = 0``) or an overflowing ratio: ``η = 0``;

Skipped and zero-denominator steps are counted in ``num_skipped``.

References:
  Roulet, Agarwala, Grill, Swirszcz, Blondel, Pedregosa, "Stepping on the
  Edge: Curvature Aware Learning Rate Tuners", NeurIPS 2024.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax

from cdat_fast import checks, treemath
from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators import gauss_newton_derivatives, secant_curvature
from cdat_fast.objective import bind_objective, value_fn_kwargs
from cdat_fast.tuned import apply_learning_rate, scalar_dtype, tuned

CURVATURES = ("exact", "secant", "gauss_newton")
_NEVER = 2 ** 30  # ``since_refresh`` before the first measurement


class CDATState(NamedTuple):
  """State of :func:`scale_by_cdat`. Scalars are float32 (float64 in x64 mode).

  The fields after ``num_skipped`` belong to the cheaper estimators
  (``every > 1``, ``curvature="secant"``); with the exact curvature measured
  every step only ``num_refreshes`` moves.
  """
  count: jax.Array  # int32, number of updates
  learning_rate: jax.Array  # η used at the last update
  numerator: jax.Array  # ñ, averaged max(-gᵀu, 0)
  denominator: jax.Array  # d̃, averaged |uᵀHu| + ε
  num_skipped: jax.Array  # int32, steps with η forced to 0 (see module doc)
  curvature: jax.Array  # κ ≈ |uᵀHu| / ‖u‖², held (every > 1) or secant average
  # Harmonic mean of the κ measured so far in the current refresh (the name
  # is older than the harmonic mean: kept so that checkpoints still load).
  curvature_sum: jax.Array
  pending: jax.Array  # int32, measurements still due in the current refresh
  since_refresh: jax.Array  # int32, updates since the last refresh began
  num_refreshes: jax.Array  # int32, updates that ran the curvature jvp
  prev_value: jax.Array  # f(w) at the last update (secant estimates)
  prev_slope: jax.Array  # gᵀu at the last update
  prev_sqnorm: jax.Array  # ‖u‖² at the last update


def _check_hyperparams(scale, ema, eps):
  checks.check_range("scale", scale, low=0.0, low_inclusive=False)
  checks.check_range("ema", ema, low=0.0, high=1.0, high_inclusive=False)
  checks.check_range("eps", eps, low=0.0)


def _check_count(name, value):
  """A Python int ≥ 1, or an integer scalar array (inject_hyperparams)."""
  if isinstance(value, (jax.Array, np.ndarray, np.integer)) and (
      np.shape(value) == () and jnp.issubdtype(value.dtype, jnp.integer)):
    checks.check_range(name, value, low=1.0)
  else:
    checks.check_int(name, value, low=1)


def _check_estimator(curvature, every, refresh_steps, max_growth, secant_guard,
                     refresh_tol, curvature_ema):
  checks.check_choice("curvature", curvature, CURVATURES)
  if every is not None:
    _check_count("every", every)
  _check_count("refresh_steps", refresh_steps)
  if curvature == "secant" and checks.concrete_float(
      1 if every is None else every) not in (None, 1.0):
    raise ValueError(
        "every must be 1 (or None) with curvature='secant': the secant"
        f" estimate is already free every step, got every={every!r}")
  checks.check_range("max_growth", max_growth, low=1.0, allow_inf=True)
  checks.check_range("secant_guard", secant_guard, low=0.0)
  checks.check_range("refresh_tol", refresh_tol, low=0.0, allow_inf=True)
  checks.check_range("curvature_ema", curvature_ema, low=0.0, high=1.0,
                     high_inclusive=False)


def _is_inf(x) -> bool:
  v = checks.concrete_float(x)
  return v is not None and math.isinf(v)


def _bind_model_and_loss(who, model_fn, loss_fn, extra_args):
  """``model(params)`` and ``loss(outputs)`` with their extra args bound."""
  for name, fn, what in (
      ("model_fn", model_fn, "parameters -> model outputs (e.g. logits)"),
      ("loss_fn", loss_fn, "model outputs -> scalar loss")):
    if fn is None:
      raise TypeError(
          f"{who}.update needs {name}=<function: {what}> (and any batch it"
          " needs as extra keyword arguments)")
    if not callable(fn):
      raise TypeError(f"{who}: {name} must be callable, got {type(fn)}")
  model = functools.partial(model_fn, **value_fn_kwargs(model_fn, extra_args))
  loss = functools.partial(loss_fn, **value_fn_kwargs(loss_fn, extra_args))
  return model, loss


def _objective_and_measure(
    curvature: str, params, direction, value_fn, model_fn, loss_fn,
    extra_args,
) -> tuple[Callable[[Any], jax.Array], Callable[[], tuple]]:
  """The objective ``f`` and a thunk measuring ``(f(w), ∂f[u], curvature)``.

  ``"gauss_newton"`` needs ``model_fn`` and ``loss_fn``; the other modes need
  ``value_fn``, or ``model_fn`` and ``loss_fn`` (``f = loss ∘ model``).
  """
  who = ("scale_by_cdat" if curvature == "exact"
         else f"scale_by_cdat(curvature={curvature!r})")
  if curvature == "gauss_newton" or (
      value_fn is None and model_fn is not None and loss_fn is not None):
    model, loss = _bind_model_and_loss(who, model_fn, loss_fn, extra_args)
    objective = lambda p: loss(model(p))
    if curvature == "gauss_newton":
      return objective, lambda: gauss_newton_derivatives(
          model, loss, params, direction)
  else:
    objective = bind_objective(who, value_fn, extra_args)
  return objective, lambda: directional_derivatives(
      objective, params, direction)


def scale_by_cdat(
    *,
    scale: jax.typing.ArrayLike = 2.0,
    ema: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 0.0,
    curvature: str = "exact",
    every: int | None = None,
    refresh_steps: int = 2,
    max_growth: jax.typing.ArrayLike = 2.0,
    secant_guard: jax.typing.ArrayLike = 0.9,
    refresh_tol: jax.typing.ArrayLike = 1.0,
    curvature_ema: jax.typing.ArrayLike = 0.9,
) -> optax.GradientTransformationExtraArgs:
  r"""Chainable CDAT: scales the incoming direction ``u`` by ``η = σ ñ / d̃``.

  Place it after a base optimizer run with learning rate 1, e.g.
  ``optax.chain(optax.adam(1.0), scale_by_cdat(scale=2.0, ema=0.9))``, and call
  ``update(updates, state, params, value_fn=f, grad=g, **extra_args)``. The
  gradient ``g`` is used for the numerator ``max(-gᵀu, 0)``; if it is not given
  the numerator uses ``∂f(w)[u]`` from the same forward pass that gives the
  curvature (equal to ``gᵀu`` when ``value_fn`` is the objective that produced
  ``g``). Extra keyword arguments are passed to ``value_fn`` when its signature
  takes them (``value_fn(params, batch=...)``). ``value=f(w)`` is used by the
  secant estimates (computed from the objective if missing); ``model_fn=``
  and ``loss_fn=`` replace ``value_fn`` for the Gauss–Newton curvature.

  The arguments after ``eps`` select a cheaper curvature; :func:`cdat`
  describes them, their safeguards and their cost.

  Args:
    scale: ``σ > 0``; 1 is quadratically greedy, 2 is on edge.
    ema: ``β ∈ [0, 1)``, averaging of numerator and denominator.
    eps: ``ε ≥ 0`` added to the absolute curvature.
    curvature: ``"exact"`` (default), ``"gauss_newton"`` or ``"secant"``.
    every: measure the curvature every ``every`` updates; ``None`` or 1 is
      every update.
    refresh_steps: consecutive updates measured, and averaged, per refresh.
    max_growth: ``γ ≥ 1``: no step's curvature below the held one over ``γ``
      (``inf``: no bound).
    secant_guard: ``ρ ≥ 0``: a held step uses at least ``ρ`` times the
      previous step's secant curvature (0: off).
    refresh_tol: ``τ ≥ 0``: refresh early when the last step's secant
      curvature exceeds ``(1 + τ)`` times the held one (``inf``: never).
    curvature_ema: ``β_κ ∈ [0, 1)``, averaging of the secant estimates.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a
    :class:`CDATState`.
  """
  _check_hyperparams(scale, ema, eps)
  _check_estimator(curvature, every, refresh_steps, max_growth, secant_guard,
                   refresh_tol, curvature_ema)
  every_step = curvature != "secant" and (
      every is None or (isinstance(every, int) and every == 1))

  def init_fn(params):
    dtype = scalar_dtype(params)
    zero = jnp.zeros([], dtype)
    izero = jnp.zeros([], jnp.int32)
    return CDATState(
        count=izero, learning_rate=zero, numerator=zero, denominator=zero,
        num_skipped=izero, curvature=zero, curvature_sum=zero, pending=izero,
        since_refresh=jnp.full([], _NEVER, jnp.int32), num_refreshes=izero,
        prev_value=zero, prev_slope=zero, prev_sqnorm=zero)

  def finish(updates, state, n, d, finite, **fields):
    """EMA of n and d, η = σ ñ / d̃ and the guarded step (all modes)."""
    dtype = state.learning_rate.dtype
    beta = jnp.asarray(ema, dtype)
    numerator = jnp.where(
        finite, beta * state.numerator + (1 - beta) * n, state.numerator)
    denominator = jnp.where(
        finite, beta * state.denominator + (1 - beta) * d, state.denominator)
    positive = denominator > 0
    safe_den = jnp.where(positive, denominator, jnp.ones_like(denominator))
    eta = jnp.where(finite & positive,
                    jnp.asarray(scale, dtype) * numerator / safe_den,
                    jnp.zeros_like(numerator))
    new_updates, eta, ok = apply_learning_rate(updates, eta)
    skipped = ~(finite & positive & ok)
    return new_updates, state._replace(
        count=optax.safe_increment(state.count),
        learning_rate=eta,
        numerator=numerator,
        denominator=denominator,
        num_skipped=state.num_skipped + skipped.astype(jnp.int32),
        **fields)

  def every_step_update(updates, state, params, grad, measure):
    """The curvature measured at every update: exact CDAT (or Gauss–Newton)."""
    dtype = state.learning_rate.dtype
    loss, slope, curv = measure()
    if grad is not None:
      slope = treemath.vdot(grad, updates)
    n = jnp.maximum(-slope.astype(dtype), 0.0)
    d = jnp.abs(curv.astype(dtype)) + jnp.asarray(eps, dtype)
    finite = jnp.isfinite(n) & jnp.isfinite(d) & jnp.isfinite(loss)
    return finish(updates, state, n, d, finite,
                  num_refreshes=state.num_refreshes + 1)

  def estimating_update(updates, state, params, grad, value, objective,
                        measure):
    """Held (every > 1) or secant curvature; the jvp only under a cond."""
    dtype = state.learning_rate.dtype
    secant = curvature == "secant"
    early = not secant and not _is_inf(refresh_tol)
    guard = not secant and checks.concrete_float(secant_guard) != 0.0
    # f(w): given, or one forward pass; only the secant estimates use it.
    if value is None and (secant or early or guard):
      value = objective(params)
    value_ok = jnp.asarray(True) if value is None else jnp.isfinite(value)
    value = jnp.zeros([], dtype) if value is None else jnp.where(
        value_ok, jnp.asarray(value).astype(dtype), jnp.zeros([], dtype))
    sqnorm = sum(jnp.sum(jnp.square(jnp.asarray(x).astype(dtype)))
                 for x in jax.tree.leaves(updates))
    safe_sqnorm = jnp.where(sqnorm > 0, sqnorm, jnp.ones_like(sqnorm))
    measured_before = state.since_refresh < _NEVER
    kappa_sec, usable = secant_curvature(
        value, state.prev_value, state.learning_rate, state.prev_slope,
        state.prev_sqnorm)
    usable = usable & (state.count > 0) & measured_before

    if secant:
      b = jnp.asarray(curvature_ema, dtype)
      kappa_est = b * state.curvature + (1 - b) * jnp.abs(kappa_sec)
      measure_now = ~usable
    else:
      kappa_est = state.curvature
      every_ = jnp.asarray(1 if every is None else every, jnp.int32)
      measure_now = (state.pending > 0) | (state.since_refresh >= every_)
      if early:
        # Safeguard 4 (early refresh): the loss change along the last step
        # exceeds the quadratic model with the held κ:
        # ½η²‖u‖²(κ̂ − (1 + τ)κ) > rounding.
        excess = 0.5 * jnp.square(state.learning_rate) * state.prev_sqnorm * (
            kappa_sec - (1 + jnp.asarray(refresh_tol, dtype)) * kappa_est)
        rounding = 8 * jnp.finfo(dtype).eps * jnp.abs(state.prev_value)
        measure_now = measure_now | (usable & (excess > rounding))
      if guard:
        # Safeguard 3 (secant guard): a held step uses no less than ρ times
        # the curvature the loss showed along the previous step.
        kappa_est = jnp.where(
            usable, jnp.maximum(
                kappa_est, jnp.asarray(secant_guard, dtype) * jnp.abs(
                    kappa_sec)), kappa_est)

    def first_order_slope():
      direction = treemath.cast_like(updates, params)
      return jax.jvp(objective, (params,), (direction,))[1]

    def measured():
      _, s, c = measure()
      return jnp.abs(c.astype(dtype)), s.astype(dtype)

    def held():
      s = (jnp.zeros([], dtype) if grad is not None
           else first_order_slope().astype(dtype))
      return kappa_est * sqnorm, s

    raw, slope = jax.lax.cond(measure_now, measured, held)
    if grad is not None:
      slope = treemath.vdot(grad, updates).astype(dtype)
    kappa_now = jnp.where(measure_now & (sqnorm > 0), raw / safe_sqnorm,
                          kappa_est)
    if not secant and not _is_inf(max_growth):
      # Safeguard 2 (bounded growth): no κ below κ_held / γ, so η ≤ γ η_held,
      # measured steps included (every > 1 only; the first refresh is free).
      floor = jnp.where(every_ > 1,
                        state.curvature / jnp.asarray(max_growth, dtype), 0.0)
      kappa_now = jnp.maximum(kappa_now, floor)
      raw = jnp.maximum(raw, floor * sqnorm)
    n = jnp.maximum(-slope, 0.0)
    d = raw + jnp.asarray(eps, dtype)
    finite = jnp.isfinite(n) & jnp.isfinite(d) & value_ok

    if secant:
      # A fallback measurement joins the average (or starts it).
      kappa = jnp.where(
          measure_now & measured_before,
          jnp.asarray(curvature_ema, dtype) * state.curvature
          + (1 - jnp.asarray(curvature_ema, dtype)) * kappa_now, kappa_now)
      fields = dict(
          curvature=kappa, curvature_sum=state.curvature_sum,
          pending=state.pending,
          since_refresh=jnp.where(
              measure_now, 1, jnp.minimum(state.since_refresh, _NEVER - 1) + 1))
    else:
      m = jnp.asarray(refresh_steps, jnp.int32)
      starting = measure_now & (state.pending == 0)
      # The held κ is the harmonic mean of the refresh's measurements, so its
      # step σ/κ is the mean of the steps they took; kept as the running
      # harmonic mean of the j measurements so far (0 once one was 0, which
      # the zero-denominator rule turns into η = 0, as in exact CDAT).
      j = jnp.where(starting, 0, m - state.pending).astype(dtype)
      prev = state.curvature_sum
      both = (prev > 0) & (kappa_now > 0)
      combined = jnp.where(both, (j + 1) / (
          j / jnp.where(both, prev, 1) + 1 / jnp.where(both, kappa_now, 1)),
                           0.0)
      total = jnp.where(starting, kappa_now, combined)
      pending = jnp.where(measure_now,
                          jnp.where(starting, m - 1, state.pending - 1),
                          state.pending)
      done = measure_now & (pending <= 0)
      fields = dict(
          curvature=jnp.where(done, total, state.curvature),
          curvature_sum=jnp.where(measure_now, total, state.curvature_sum),
          pending=jnp.maximum(pending, 0),
          since_refresh=jnp.where(
              starting, 1, jnp.minimum(state.since_refresh, _NEVER - 1) + 1))
    # A skipped step leaves every estimate as it was (and retries a refresh).
    fields = {k: jnp.where(finite, v, getattr(state, k))
              for k, v in fields.items()}
    return finish(
        updates, state, n, d, finite, **fields,
        num_refreshes=state.num_refreshes + measure_now.astype(jnp.int32),
        prev_value=jnp.where(value_ok, value, state.prev_value),
        prev_slope=jnp.where(jnp.isfinite(slope), slope, 0.0),
        prev_sqnorm=jnp.where(jnp.isfinite(sqnorm), sqnorm, 0.0))

  def update_fn(updates, state, params=None, *, value_fn=None, grad=None,
                value=None, model_fn=None, loss_fn=None, **extra_args):
    if params is None:
      raise ValueError("scale_by_cdat.update needs params (the current point)")
    objective, measure = _objective_and_measure(
        curvature, params, updates, value_fn, model_fn, loss_fn, extra_args)
    if every_step:
      return every_step_update(updates, state, params, grad, measure)
    return estimating_update(updates, state, params, grad, value, objective,
                             measure)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cdat(
    base: optax.GradientTransformation,
    *,
    scale: jax.typing.ArrayLike = 2.0,
    ema: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 0.0,
    curvature: str = "exact",
    every: int | None = None,
    refresh_steps: int = 2,
    max_growth: jax.typing.ArrayLike = 2.0,
    secant_guard: jax.typing.ArrayLike = 0.9,
    refresh_tol: jax.typing.ArrayLike = 1.0,
    curvature_ema: jax.typing.ArrayLike = 0.9,
) -> optax.GradientTransformationExtraArgs:
  r"""CDAT on top of any base optimizer: ``w ← w + η_t u_t``, ``η_t = σ ñ_t / d̃_t``.

  .. math::
    \eta_t = \sigma\, \frac{\max(-g_t^\top u_t, 0)}{|u_t^\top \nabla^2 f(w_t) u_t| + \varepsilon}

  (with optional averaging of numerator and denominator, see
  :func:`scale_by_cdat`).

  **Cheaper curvature.** The default measures ``uᵀ∇²f u`` exactly at every
  step by a jvp of a jvp (about 4 forward passes on top of the step's 3).
  Alternatives, all keeping the edge-case policy of the module docstring:

  * *Sub-batch*: nothing to set. ``value_fn`` only has to be the objective
    whose curvature is wanted, so closing it over part of the batch measures
    the curvature there, at a fraction of the cost, while ``grad`` (the
    numerator ``-gᵀu``) stays the full batch's:

    .. code-block:: python

      sub = {k: v[: len(v) // 4] for k, v in batch.items()}
      value, grad = jax.value_and_grad(loss)(params, batch)
      updates, state = opt.update(grad, state, params, grad=grad,
                                  value_fn=lambda p: loss(p, sub))

    On the sub-batch this is exactly CDAT's curvature; its noise grows as the
    sub-batch shrinks (``ema`` smooths it).

  * ``curvature="gauss_newton"``: for ``f(w) = ℓ(m(w))``, the form
    ``(Ju)ᵀ∇²ℓ(z)(Ju)`` with ``z = m(w)``, ``Ju = ∂m(w)[u]``: one first-order
    jvp of the model (no second-order forward mode through it) and a jvp of a
    jvp of the loss at ``z`` (:func:`cdat_fast.estimators.gauss_newton_derivatives`).
    ``update`` then takes ``model_fn=`` (parameters to outputs) and
    ``loss_fn=`` (outputs to a scalar) instead of ``value_fn``; extra keyword
    arguments are routed to each by its signature, e.g.
    ``model_fn(params, batch)`` and ``loss_fn(logits, batch)``. Exact for a
    model linear in its parameters; otherwise it drops
    ``∇ℓ(z)ᵀ∂²m(w)[u, u]``. A regulariser on the parameters (weight decay)
    enters only if it is part of the outputs: return ``(logits, params)``
    from ``model_fn`` and add ``μ/2‖params‖²`` in ``loss_fn``.

  * ``curvature="secant"``: no jvp after the first step. The loss change
    along the previous step ``w_t = w_{t-1} + η u`` gives
    ``κ̂ = 2(f(w_t) − f(w_{t-1}) − η gᵀu)/(η²‖u‖²)`` (the curvature along
    ``u_{t-1}``; exact on a quadratic); the curvature used is
    ``d_t = κ_t ‖u_t‖²`` with ``κ_t = β_κ κ_{t-1} + (1-β_κ)|κ̂|``,
    ``β_κ = curvature_ema`` (0.9 by default). The average is needed: the
    raw secant lags one step behind the direction, which at the edge of
    stability alternates between sharp and flat directions, and without
    averaging the feedback oscillates and diverges. It needs ``f(w_t)``:
    pass ``value=`` (free from ``jax.value_and_grad``), otherwise it costs a
    forward pass. The first step, and any step whose secant is unusable
    (previous step skipped or zero, non-finite values), measures the exact
    curvature (under ``jax.lax.cond``). *Minibatch*: ``f(w_t)`` and
    ``f(w_{t-1})`` are then losses on different batches, so ``κ̂`` mixes the
    curvature with the batch-to-batch loss difference divided by
    ``η²‖u‖²``: biased and very noisy. Use the exact (or sub-batch,
    Gauss–Newton) curvature there, or a large ``curvature_ema``, and evaluate
    ``value`` on a fixed batch if you must.

  * ``every=k``: the jvp (exact, or Gauss–Newton) runs only at refreshes,
    under ``jax.lax.cond``, so the other steps skip it entirely; between
    refreshes ``d_t = κ ‖u_t‖²`` with a held ``κ``. Naively holding one
    measurement of ``κ = uᵀ∇²f u/‖u‖²`` for ``k = 10`` steps diverges at the
    edge of stability (GD on a ReLU MLP: NaN or overflow on every seed
    tried): the direction alternates between sharp and flat, a measurement
    taken on a flat one holds an ``η`` far beyond ``2/λ_max``, and the sharp
    component grows by ``|1 - ηλ|`` at every held step. Safeguards, all on
    by default:

    1. *Two measurements per refresh* (``refresh_steps=2``): a refresh
       measures ``κ`` on two consecutive steps (each an exact CDAT step) and
       holds their harmonic mean, ``m / Σ 1/κ_i``, so that the held step
       ``σ/κ`` is the mean of the steps exact CDAT took at the refresh (for
       the gradient direction; the arithmetic mean of ``κ`` holds a smaller
       one, by Jensen's inequality). At the edge of stability the iterate
       oscillates across the sharp valley with period 2, so the pair spans
       both phases; and if the first step of a refresh jumps from a flat
       direction, the second measurement sees the sharp one it excited.
    2. *Bounded growth* (``max_growth=γ``, 2): no step, held or measured,
       uses a curvature below ``κ_held/γ``: ``η`` grows by at most ``γ``
       per refresh. (Held steps damp the sharp directions, so the next
       measurement can see a deceptively flat direction.)
    3. *Secant guard* (``secant_guard=ρ``, 0.9): a held step uses
       ``max(κ_held, ρ κ̂)``, ``κ̂`` the secant curvature of the previous
       step (free, as above). It stops the slow blow-ups of a held ``κ``
       that is a few tens of percent too small (on a small NanoLM, one
       run: final loss 21.6x exact's without it, 0.90x with it). It is
       conservative: on a digits MLP the final loss was 1.17x exact's with
       it and 1.04x without (geometric mean over 16 seeds).
    4. *Early refresh* (``refresh_tol=τ``, 1): if the loss change of the
       last step exceeds the quadratic model with the held curvature by
       ``κ̂ > (1 + τ) κ_held``, refresh at once (a sudden change of the
       landscape). Smaller ``τ`` (e.g. 0: "the loss rose", at ``σ = 2``)
       refreshes mostly at the oscillation's sharp phase and biases ``κ``
       upward: measured slower.

    Safeguards 3 and 4 need ``f(w)``: pass ``value=`` (free from
    ``jax.value_and_grad``), otherwise it costs a forward pass every step.
    ``refresh_steps=1, max_growth=inf, secant_guard=0, refresh_tol=inf`` is
    the naive scheme. The cost is ``refresh_steps/k`` of a jvp of a jvp per
    step plus early refreshes (``num_refreshes`` in the state counts them).

    What it keeps (``bench/RESULTS.md``, three small full-batch models,
    six initialisations each, GD direction, CPU): with these defaults
    ``every=10`` took 1.13–1.36× the time of a plain step (exact CDAT:
    1.85–3.08×) and ended at 1.05× exact CDAT's final loss (geometric mean
    of 18 runs; up to 1.54×); with ``curvature="gauss_newton"`` refreshes
    1.10–1.23× the time and 1.09× the loss (up to 1.89×). A refresh's jvp
    runs under the ``cond``, apart from the gradient's forward pass, so it
    costs a forward pass more than in exact CDAT. Held steps are gradient
    descent at a constant step, which sharpens until ``λ_max ≈ 2/η``; the
    held runs on a digits MLP end sharper with smaller steps (``λ_max``
    4.0–5.2, ``η`` 0.43–0.55, against exact CDAT's 3.2–3.4 and 0.67–0.71;
    with the arithmetic mean of safeguard 1, used before, 5.3–5.9 and
    0.35–0.40 and 1.24× the loss), whereas exact CDAT changes ``η`` at
    every step with the oscillation. Sub-batch curvature every step did as
    well where the batch allows it (1/16 of the batch: 0.94× at 1.04–1.19×
    the time).

    *Minibatch*: safeguards 3 and 4 then read the loss change between two
    different batches, and the early refresh also fires on batch noise.
    Measured on the same models with minibatches of 1/8 of the data and
    ``ema=0.9`` (``bench/every_minibatch.py``): the defaults ended at 1.21×
    exact CDAT's loss (geometric mean of 9 runs, max 2.29×) with 28% of the
    steps running the jvp instead of 20%; without safeguards 3 and 4, runs
    ended up to 72× above exact's. Sub-batch curvature (1/4 of each
    minibatch) matched exact CDAT there (1.00×).

  Args:
    base: the direction, an optax transformation with learning rate 1:
      ``optax.sgd(1.0)``, ``optax.sgd(1.0, momentum=0.9)``,
      ``optax.rmsprop(1.0)``, ``optax.adam(1.0)``, or a chain.
    scale: ``σ > 0``; 1 is quadratically greedy, 2 is on edge (the paper's
      recommendation, with 1.9375–2.0625 as good variants).
    ema: ``β ∈ [0, 1)``; the paper uses 0.9 or 0.99 with Adam and in minibatch.
    eps: ``ε ≥ 0`` added to the absolute curvature.
    curvature: ``"exact"`` (default, jvp of jvp), ``"gauss_newton"`` or
      ``"secant"``.
    every: measure the curvature every ``every`` steps (a Python int ≥ 1;
      ``None``, the default, means 1). With ``optax.inject_hyperparams`` an
      explicit ``every`` becomes a traced integer, which works (the period
      is then dynamic) but always compiles the ``cond``; list it in
      ``static_args`` to keep it static.
    refresh_steps: measurements per refresh, averaged (``every > 1``; a
      Python int ≥ 1), see safeguard 1.
    max_growth: ``γ ≥ 1`` or ``inf``, see safeguard 2.
    secant_guard: ``ρ ≥ 0``, see safeguard 3.
    refresh_tol: ``τ ≥ 0`` or ``inf``, see safeguard 4.
    curvature_ema: ``β_κ ∈ [0, 1)``, averaging of the secant estimates.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, value_fn, **extra_args)`` returns ``η_t · u_t``. The learning
    rate used is ``optax.tree.get(state, "learning_rate")``; also
    ``numerator``, ``denominator``, ``num_skipped``, ``curvature`` (the held
    or secant ``κ``) and ``num_refreshes`` (steps that ran the jvp).

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
      scale=scale, ema=ema, eps=eps, curvature=curvature, every=every,
      refresh_steps=refresh_steps, max_growth=max_growth,
      secant_guard=secant_guard, refresh_tol=refresh_tol,
      curvature_ema=curvature_ema))


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
