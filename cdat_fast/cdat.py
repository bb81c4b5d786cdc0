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

Policy at the edges (never NaN or Inf in the updates or the averages):

* ascent direction (``gᵀu ≥ 0``): ``n = 0``, so ``η = 0``;
* negative curvature: its absolute value is used;
* non-finite loss, numerator or denominator (NaN/Inf anywhere upstream):
  the step is skipped: zero update, the averages keep their previous values;
* zero averaged denominator (a zero direction, or zero curvature with
  ``eps = 0``) or an overflowing ratio: ``η = 0``;

Skipped and zero-denominator steps are counted in ``num_skipped``.

References:
  Roulet, Agarwala, Grill, Swirszcz, Blondel, Pedregosa, "Stepping on the
  Edge: Curvature Aware Learning Rate Tuners", NeurIPS 2024.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

from cdat_fast import checks
from cdat_fast.curvature import directional_derivatives
from cdat_fast.objective import bind_objective
from cdat_fast.tuned import apply_learning_rate, scalar_dtype, tuned


class CDATState(NamedTuple):
  """State of :func:`scale_by_cdat`. Scalars are float32 (float64 in x64 mode)."""
  count: jax.Array  # int32, number of updates
  learning_rate: jax.Array  # η used at the last update
  numerator: jax.Array  # ñ, averaged max(-gᵀu, 0)
  denominator: jax.Array  # d̃, averaged |uᵀHu| + ε
  num_skipped: jax.Array  # int32, steps with η forced to 0 (see module doc)


def _check_hyperparams(scale, ema, eps):
  checks.check_range("scale", scale, low=0.0, low_inclusive=False)
  checks.check_range("ema", ema, low=0.0, high=1.0, high_inclusive=False)
  checks.check_range("eps", eps, low=0.0)


def scale_by_cdat(
    *,
    scale: jax.typing.ArrayLike = 2.0,
    ema: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformationExtraArgs:
  r"""Chainable CDAT: scales the incoming direction ``u`` by ``η = σ ñ / d̃``.

  Place it after a base optimizer run with learning rate 1, e.g.
  ``optax.chain(optax.adam(1.0), scale_by_cdat(scale=2.0, ema=0.9))``, and call
  ``update(updates, state, params, value_fn=f, grad=g, **extra_args)``. The
  gradient ``g`` is used for the numerator ``max(-gᵀu, 0)``; if it is not given
  the numerator uses ``∂f(w)[u]`` from the same forward pass that gives the
  curvature (equal to ``gᵀu`` when ``value_fn`` is the objective that produced
  ``g``). Extra keyword arguments are passed to ``value_fn`` when its signature
  takes them (``value_fn(params, batch=...)``).

  Args:
    scale: ``σ > 0``; 1 is quadratically greedy, 2 is on edge.
    ema: ``β ∈ [0, 1)``, averaging of numerator and denominator.
    eps: ``ε ≥ 0`` added to the absolute curvature.

  Returns:
    An ``optax.GradientTransformationExtraArgs``; its state is a
    :class:`CDATState`.
  """
  _check_hyperparams(scale, ema, eps)

  def init_fn(params):
    dtype = scalar_dtype(params)
    zero = jnp.zeros([], dtype)
    return CDATState(
        count=jnp.zeros([], jnp.int32), learning_rate=zero, numerator=zero,
        denominator=zero, num_skipped=jnp.zeros([], jnp.int32))

  def update_fn(updates, state, params=None, *, value_fn=None, grad=None,
                value=None, **extra_args):
    del value
    if params is None:
      raise ValueError("scale_by_cdat.update needs params (the current point)")
    objective = bind_objective("scale_by_cdat", value_fn, extra_args)
    dtype = state.learning_rate.dtype
    loss, slope, curvature = directional_derivatives(objective, params, updates)
    if grad is not None:
      slope = optax.tree.vdot(grad, updates)
    n = jnp.maximum(-slope.astype(dtype), 0.0)
    d = jnp.abs(curvature.astype(dtype)) + jnp.asarray(eps, dtype)
    finite = jnp.isfinite(n) & jnp.isfinite(d) & jnp.isfinite(loss)
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
    return new_updates, CDATState(
        count=optax.safe_increment(state.count),
        learning_rate=eta,
        numerator=numerator,
        denominator=denominator,
        num_skipped=state.num_skipped + skipped.astype(jnp.int32))

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def cdat(
    base: optax.GradientTransformation,
    *,
    scale: jax.typing.ArrayLike = 2.0,
    ema: jax.typing.ArrayLike = 0.0,
    eps: jax.typing.ArrayLike = 0.0,
) -> optax.GradientTransformationExtraArgs:
  r"""CDAT on top of any base optimizer: ``w ← w + η_t u_t``, ``η_t = σ ñ_t / d̃_t``.

  .. math::
    \eta_t = \sigma\, \frac{\max(-g_t^\top u_t, 0)}{|u_t^\top \nabla^2 f(w_t) u_t| + \varepsilon}

  (with optional averaging of numerator and denominator, see
  :func:`scale_by_cdat`).

  Args:
    base: the direction, an optax transformation with learning rate 1:
      ``optax.sgd(1.0)``, ``optax.sgd(1.0, momentum=0.9)``,
      ``optax.rmsprop(1.0)``, ``optax.adam(1.0)``, or a chain.
    scale: ``σ > 0``; 1 is quadratically greedy, 2 is on edge (the paper's
      recommendation, with 1.9375–2.0625 as good variants).
    ema: ``β ∈ [0, 1)``; the paper uses 0.9 or 0.99 with Adam and in minibatch.
    eps: ``ε ≥ 0`` added to the absolute curvature.

  Returns:
    An ``optax.GradientTransformationExtraArgs`` whose ``update(grads, state,
    params, *, value_fn, **extra_args)`` returns ``η_t · u_t``. The learning
    rate used is ``optax.tree.get(state, "learning_rate")``; also
    ``numerator``, ``denominator`` and ``num_skipped``.

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

  References:
    Roulet et al., "Stepping on the Edge: Curvature Aware Learning Rate
    Tuners", NeurIPS 2024, eq. 8.
  """
  return tuned(base, scale_by_cdat(scale=scale, ema=ema, eps=eps))


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
