"""Estimators of CDAT's curvature ``uᵀ∇²f(w)u``, one module each.

:func:`cdat_fast.scale_by_cdat` composes the rule with one of them
(``curvature=``), each with its own knobs (``every(k, refresh_steps=1)``,
``secant(ema=0.5)``); :func:`cdat_fast.cdat.make_estimator` builds them by
name (``"exact"``, ``"gauss_newton"``, ``"secant"``, ``"finite_difference"``,
on a sub-batch with ``fraction=``), as ``cdat(base, curvature=name,
every=k)`` does. Each module holds an estimator's maths, its
cost and its safeguards; what each keeps of exact CDAT's quality and what it
costs is measured in ``docs/curvature.md``.

=========================  ====================================================
:func:`exact`              a jvp of a jvp every step: the reference
:func:`subbatch`           an inner estimator on every ``m``-th row of the
                           batch; ``subbatch(1/16, inner=gauss_newton())`` is
                           the recommended fast mode
:func:`gauss_newton`       ``(Ju)ᵀ∇²ℓ(Ju)``: first-order forward mode through
                           the model
:func:`every`              an inner estimator every ``k`` steps, held between,
                           with safeguards (experimental)
:func:`secant`             from the loss change along the previous step
                           (experimental)
:func:`finite_difference`  a central second difference of the loss along
                           ``u``: forward passes only, for layers without
                           forward mode (``jax.custom_vjp``, flash attention)
=========================  ====================================================

The interface (:class:`CurvatureEstimator`, :class:`Estimate`,
:class:`Objective`, :class:`NoForwardModeError`) is in
:mod:`cdat_fast.estimators.interface`.
"""
from cdat_fast.estimators.every import EveryState, every
from cdat_fast.estimators.exact import exact
from cdat_fast.estimators.finite_difference import (FiniteDifferenceState,
                                                    finite_difference)
from cdat_fast.estimators.gauss_newton import (gauss_newton,
                                               gauss_newton_derivatives)
from cdat_fast.estimators.interface import (CurvatureEstimator, Estimate,
                                            NoForwardModeError, Objective)
from cdat_fast.estimators.secant import (SecantState, StepMemory, secant,
                                         secant_curvature)
from cdat_fast.estimators.subbatch import subbatch

__all__ = [
    "CurvatureEstimator", "Estimate", "EveryState", "FiniteDifferenceState",
    "NoForwardModeError", "Objective", "SecantState", "StepMemory", "every",
    "exact", "finite_difference", "gauss_newton", "gauss_newton_derivatives",
    "secant", "secant_curvature", "subbatch",
]
