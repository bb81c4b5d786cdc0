r"""The exact curvature: a jvp of a jvp, every step (CDAT's reference).

.. math::
  u^\top \nabla^2 f(w)\, u = \partial^2 f(w)[u, u]
    = \frac{d}{d\tau}\Big|_{\tau=0} \partial f(w + \tau u)[u],

computed by :func:`cdat_fast.curvature.directional_derivatives`: forward over
forward autodiff, which also gives ``f(w)`` and ``∂f(w)[u]``. *Cost*: for a
network of dense layers about 4 forward passes on top of a training step's 3
(``ẏ = ẋW + xU``, ``ÿ = ẍW + 2ẋU``: four more matmuls per layer), about 2x a
step in wall time (the paper's figure), and about 3x the objective's
activation memory. No state, no safeguard: the estimate is exact, and the
rule's edge-case policy handles the rest. This is how the paper computes
CDAT (Roulet et al., 2024, appendix C.3); every cheaper estimator is tested
against it. Measurements: ``docs/curvature.md``.
"""
from __future__ import annotations

from cdat_fast.curvature import directional_derivatives
from cdat_fast.estimators.interface import (CurvatureEstimator, forward_mode,
                                            stateless)


def exact() -> CurvatureEstimator:
  """The exact ``uᵀ∇²f(w)u`` by a jvp of a jvp of ``value_fn``.

  ``update`` needs ``value_fn`` (or ``model_fn`` and ``loss_fn``, composed).
  A layer without forward-mode autodiff (``jax.custom_vjp``, VJP-only flash
  attention) raises :class:`~cdat_fast.estimators.NoForwardModeError`, which
  names :func:`~cdat_fast.estimators.finite_difference`.

  Returns:
    A :class:`~cdat_fast.estimators.CurvatureEstimator` with
    ``optax.EmptyState`` as its state.
  """
  def measure(params, direction, objective):
    with forward_mode("estimators.exact()"):
      return directional_derivatives(objective.value(), params, direction)

  return stateless(measure)
