r"""Cheaper estimates of CDAT's curvature ``uᵀ∇²f(w)u`` than a jvp of a jvp.

:func:`cdat_fast.curvature.directional_derivatives` is the reference: the
exact second directional derivative by forward-over-forward autodiff, about
4 forward passes on top of a training step's 3 (see
``shared/notes/performance.md``). The estimators here trade exactness for
time; :func:`cdat_fast.cdat` selects them with ``curvature=`` and ``every=``.

* **Gauss–Newton** (:func:`gauss_newton_derivatives`): for
  ``f(w) = ℓ(m(w))`` with a model ``m`` (parameters to outputs) and a loss
  ``ℓ`` (outputs to a scalar),

  .. math::
    u^\top \nabla^2 f(w)\, u = (J u)^\top \nabla^2 \ell(z)\, (J u)
      + \nabla \ell(z)^\top \partial^2 m(w)[u, u], \qquad z = m(w),

  and the Gauss–Newton form keeps the first term only. ``J u`` is one
  first-order jvp of the model (about 2 forward passes, not 4); the remaining
  ``∂²ℓ(z)[Ju, Ju]`` is a jvp of a jvp of the loss alone, which is elementwise
  or small. It equals the exact curvature when the model is linear in the
  parameters, and it is never negative for a convex loss.

* **Secant** (:func:`secant_curvature`): the loss change along the previous
  step ``w_t = w_{t-1} + η u`` gives the average curvature along ``u``,

  .. math::
    \hat\kappa = \frac{2\,\big(f(w_t) - f(w_{t-1}) - \eta\, g_{t-1}^\top u\big)}
                      {\eta^2 \|u\|^2},

  exact on a quadratic (``κ̂ = uᵀAu/‖u‖²``) and free when the loss at every
  step is known (full batch). It describes the *previous* direction, and in
  the minibatch regime ``f(w_t)`` and ``f(w_{t-1})`` are two different
  batches, so the difference is dominated by batch-to-batch noise.

References:
  Roulet et al., "Stepping on the Edge: Curvature Aware Learning Rate
  Tuners", NeurIPS 2024 (eq. 8; the authors mention a Gauss–Newton variant).
  Martens, "New insights and perspectives on the natural gradient method",
  JMLR 2020 (the Gauss–Newton matrix ``JᵀHJ``).
"""
from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp

from cdat_fast.curvature import directional_derivatives

PyTree = Any


def gauss_newton_derivatives(
    model_fn: Callable[[PyTree], PyTree],
    loss_fn: Callable[[PyTree], jax.Array],
    params: PyTree,
    direction: PyTree,
) -> tuple[jax.Array, jax.Array, jax.Array]:
  r"""Value, slope and Gauss–Newton curvature of ``ℓ ∘ m`` along ``direction``.

  .. math::
    \ell(z), \quad \nabla\ell(z)^\top J u = \partial f(w)[u], \quad
    (Ju)^\top \nabla^2\ell(z)\, (Ju) = \partial^2 \ell(z)[Ju, Ju],
    \qquad z = m(w),\ Ju = \partial m(w)[u].

  ``z`` and ``Ju`` come from one first-order ``jax.jvp`` of ``model_fn``; the
  last two numbers from :func:`~cdat_fast.curvature.directional_derivatives`
  of ``loss_fn`` at ``z`` along ``Ju``. The model is never differentiated
  twice. The slope is exact (it is ``gᵀu``); only the curvature drops the
  term ``∇ℓ(z)ᵀ ∂²m(w)[u, u]``.

  Args:
    model_fn: parameters to outputs (any pytree, e.g. logits).
    loss_fn: outputs to a scalar loss.
    params: the point ``w``.
    direction: the direction ``u`` (cast to the parameters' dtypes).

  Returns:
    ``(ℓ(m(w)), ∂f(w)[u], (Ju)ᵀ∇²ℓ(z)(Ju))`` as scalars.
  """
  direction = jax.tree.map(
      lambda t, p: jnp.asarray(t, dtype=jnp.asarray(p).dtype),
      direction, params)
  outputs, jvp_out = jax.jvp(model_fn, (params,), (direction,))
  return directional_derivatives(loss_fn, outputs, jvp_out)


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
