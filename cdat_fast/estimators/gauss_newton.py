r"""The Gauss–Newton curvature: first-order forward mode through the model.

For ``f(w) = ℓ(m(w))`` with a model ``m`` (parameters to outputs) and a loss
``ℓ`` (outputs to a scalar),

.. math::
  u^\top \nabla^2 f(w)\, u = (J u)^\top \nabla^2 \ell(z)\, (J u)
    + \nabla \ell(z)^\top \partial^2 m(w)[u, u], \qquad z = m(w),

and the Gauss–Newton form keeps the first term only. ``J u`` is one
first-order jvp of the model; ``∂²ℓ(z)[Ju, Ju]`` is a jvp of a jvp of the
loss alone, which is elementwise or small. *Cost*: about 2 forward passes on
top of a step's 3 instead of the exact curvature's 4 (≈1.67x a step in
FLOPs for deep dense nets). *Accuracy*: exact for a model linear in its
parameters; otherwise it drops ``∇ℓ(z)ᵀ∂²m(w)[u, u]``, and it is never
negative for a convex loss. A regulariser on the parameters (weight decay)
enters only if it is part of the outputs: return ``(logits, params)`` from
``model_fn`` and add ``μ/2‖params‖²`` in ``loss_fn``. Measurements:
``docs/curvature.md``.

References:
  Martens, "New insights and perspectives on the natural gradient method",
  JMLR 2020 (the Gauss–Newton matrix ``JᵀHJ``); Roulet et al., 2024 (the
  authors mention a Gauss–Newton variant of CDAT).
"""
from __future__ import annotations

from typing import Any, Callable

import jax

from cdat_fast import treemath
from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators.interface import (CurvatureEstimator, checked_jvp,
                                            forward_mode, stateless)

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
  direction = treemath.cast_like(direction, params)
  outputs, jvp_out = checked_jvp(model_fn, (params,), (direction,),
                                 "estimators.gauss_newton()")
  return directional_derivatives(loss_fn, outputs, jvp_out)


def gauss_newton() -> CurvatureEstimator:
  """The Gauss–Newton ``(Ju)ᵀ∇²ℓ(z)(Ju)`` of ``loss_fn ∘ model_fn``.

  ``update`` needs ``model_fn=`` (parameters to outputs) and ``loss_fn=``
  (outputs to a scalar) instead of ``value_fn``; extra keyword arguments are
  routed to each by its signature, e.g. ``model_fn(params, batch)`` and
  ``loss_fn(logits, batch)``. A layer without forward-mode autodiff raises
  :class:`~cdat_fast.estimators.NoForwardModeError`, which names
  :func:`~cdat_fast.estimators.finite_difference`.

  Returns:
    A :class:`~cdat_fast.estimators.CurvatureEstimator` with
    ``optax.EmptyState`` as its state.
  """
  def measure(params, direction, objective):
    model, loss = objective.model_and_loss()
    with forward_mode("estimators.gauss_newton()"):
      return gauss_newton_derivatives(model, loss, params, direction)

  return stateless(measure)
