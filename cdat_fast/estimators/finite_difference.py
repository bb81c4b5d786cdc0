r"""Forward-only curvature: a central second difference of the loss along ``u``.

.. math::
  u^\top \nabla^2 f(w)\, u \approx D(\mu) =
    \frac{f(w + \mu u) - 2 f(w) + f(w - \mu u)}{\mu^2},
  \qquad
  \partial f(w)[u] \approx \frac{f(w + \mu u) - f(w - \mu u)}{2\mu}.

Loss values only, no tangent and no gradient: it needs only ``value_fn``
(or ``model_fn`` and ``loss_fn``, composed), so it runs through any layer
that has a VJP but no JVP (``jax.custom_vjp`` kernels, cuDNN or Pallas flash
attention), where :func:`~cdat_fast.estimators.exact` and
:func:`~cdat_fast.estimators.gauss_newton` cannot. It needs no slope either,
so on a sub-batch (:func:`~cdat_fast.estimators.subbatch`) whose slope
differs from the batch's it still measures the sub-batch's curvature. The
first difference is the slope returned when the caller gave none.

*Cost*: forward passes of the objective (of the sub-batch, under
``subbatch``), no tangents and no backward pass, so no activations are kept.
The automatic step (the default) evaluates ``f(w)`` and ``f`` at
``w ± μu`` and ``w ± 2μu``: 5 passes per update, 4 with
``reuse_value=True`` when the caller passes ``value=f(w)`` (full batch
only: ``subbatch`` and ``every`` never pass it on); a step re-measured at
once (below: an inaccurate step, as the first update's pilot, or after a
jump of the landscape) adds 4.
A fixed ``step=h`` evaluates ``f(w)``, ``f(w ± μu)``: 3 passes (2). On
every 16th row of the batch, 5 passes are 5/16 of a forward pass of the
batch in FLOPs. Memory: one forward pass at a time (``jax.lax.map`` over
the points), and two perturbed copies of the parameters.

*Error*. With ``f`` evaluated to a relative rounding error ``ε_f``,

.. math::
  D(\mu) - u^\top \nabla^2 f\, u
    = \underbrace{\tfrac{\mu^2}{12}\, \partial^4 f(w)[u, u, u, u]
        + O(\mu^4)}_{\text{truncation}}
    + \underbrace{O\big(4\, \varepsilon_f |f| / \mu^2\big)}_{\text{rounding}}.

*Choosing μ*. Truncation grows with the step, rounding shrinks with it.
``μ = η_{t−1}``, CDAT's own step, measures a secant over the step instead
of the curvature at ``w`` (76% off on ``bench_curvature.py``'s NanoLM at
initialisation). No fixed fraction of ``‖w‖`` suits every model either:
the length over which the curvature along ``u`` changes is set by the
activations. In float32 a GELU MLP's error was smallest with
``μ‖u‖ ≈ 1e-3 ‖w‖``, while a small ViT at initialisation, whose gradient
sits on a zero-initialised class token under a layer norm, was already
22% off at 1e-4 and needed 1e-5 (``bench/finite_difference_step.py``). So
both terms are estimated at each update, from the loss alone: rounding is
bounded by ``4ε_f max|f|/μ²``, and truncation is
``≈ |D(2μ) − D(μ)|/3``, since ``D(μ) ≈ D + cμ²`` and ``D(2μ) ≈ D + 4cμ²``.
Their sum is least where they are equal, at
``μ* = μ (rounding/truncation)^{1/4}``; the state keeps ``μ*‖u‖`` for the
next update. A measurement off balance by more than 16 (``μ`` off by 2)
whose estimated relative error also exceeds ``tolerance`` (5%) is
repeated at once at ``μ*`` (moving by at most 10x, ``max_retries`` times,
under ``jax.lax.while_loop``); one accurate enough is kept, and only its
step moves for the next update. Gill, Murray, Saunders & Wright
choose a finite-difference interval from the errors of a second difference
in the same way. The first update starts from ``μ‖u‖ = ε_f^{1/4}/64
max(‖w‖, 1)``; ``μ‖u‖`` stays within ``[10^{-3}, 64] ×`` that. The
state's ``error`` is the estimated relative error of ``D(μ)``. ``step=h``
fixes ``μ‖u‖ = h max(‖w‖, 1)`` instead, and estimates the rounding alone.

*The upper estimate*. By default (``upper=True``) the curvature returned is
``|D|`` plus its estimated error, with ``D``'s sign: an upper estimate of
``|uᵀ∇²f u|``, so that CDAT's ``η`` errs low where a measurement is
uncertain instead of running away on a difference drowned in rounding.
``upper=False`` returns ``D``.

*float32 and bfloat16*. ``ε_f`` (``noise``) defaults to the machine epsilon
of the parameters' lowest-precision float dtype, ``2^{-23}`` for float32
and ``2^{-7}`` for bfloat16. The loss should be returned in float32 (a
bfloat16 loss rounds the differences away); the differences are taken in
float32 as ``(f₊ − f₀) + (f₋ − f₀)``, each exact when the values are close.
A model that computes in bfloat16 from float32 parameters must pass its
loss's rounding, e.g. ``noise=1e-3`` (the bench measured 1e-5 to 4e-3):
the default would read float32's and choose steps far too short.
Low-precision parameters also round the perturbed points: bfloat16 leaves
are rounded stochastically (a fixed hash dither), so that ``d = μu`` on
average instead of the small entries of ``μu`` rounding to 0, and each
pair is built as ``w ± d`` with the same ``d``, so that the dither adds no
odd term ``gᵀ(d₊ − d₋)/μ²``. Even so, curvature from bfloat16 loss values is coarse: after a few
updates, 2% to 22% off on the bench's models, and no step size below 90%
on the ViT at initialisation, where the jvp of a jvp in bfloat16 is within
1% (10% on that ViT). *Piecewise-linear activations* (ReLU): the difference
sees the kinks crossed within ``±μu``, which the jvp of a jvp counts as
zero curvature; against :func:`~cdat_fast.estimators.exact` they leave
errors of a few percent (up to 9% on the bench's trained MLP) at every
step size. *Stochastic layers* (dropout) must draw the same randomness in
all evaluations (pass the same key).

References:
  Roulet et al., 2024 (appendix C.3: the cost of CDAT's curvature may be
  amortised by parabolic approximations). Mutschler & Zell, "Parabolic
  Approximation Line Search for DNNs", NeurIPS 2020 (PAL): fits a parabola
  to ``f(w)``, the slope and ``f`` at a measuring step of fixed length along
  the normalised direction (0.1 to 1), and jumps to its minimum; its
  curvature is a secant over that step, as is GeN's. Bu & Xu, "Gradient
  descent with generalized Newton's method", ICLR 2025 (GeN): fits
  ``½ uᵀHu η² − gᵀu η`` to the losses at ``w − η_{t−1}u``, ``w`` and
  ``w + η_{t−1}u`` (three forward passes, every few steps) and takes
  ``η = gᵀu/uᵀHu``. Both probe the loss at the scale of the step taken, to
  fit a line-search model; this estimator probes at the scale where the
  Taylor expansion holds, for the local ``uᵀ∇²f(w)u`` of CDAT's rule, and
  keeps the exact ``gᵀu`` of the numerator. Gill, Murray, Saunders &
  Wright, "Computing forward-difference intervals for numerical
  optimization", SIAM J. Sci. Stat. Comput., 1983 (the interval from the
  cancellation error of a second difference).
"""
from __future__ import annotations

import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cdat_fast import checks, treemath
from cdat_fast.estimators import interface
from cdat_fast.estimators.interface import CurvatureEstimator, Estimate
from cdat_fast.tuned import scalar_dtype

PyTree = Any

_PILOT = 1.0 / 64  # first update: μ‖u‖ = _PILOT ε_f^{1/4} max(‖w‖, 1)
_LONGEST = 1.0  # μ‖u‖ ≤ _LONGEST ε_f^{1/4} max(‖w‖, 1)
_SHORTEST = 1e-3  # μ‖u‖ ≥ _SHORTEST × the pilot
_OFF_BALANCE = 16.0  # rounding/truncation off by more: μ is off by > 2
_MOVE = 10.0  # the length changes by at most this factor per measurement
_EXPLAINED = 1.25  # the part of D(2μ) − D(μ) that rounding may explain, × r


class FiniteDifferenceState(NamedTuple):
  """State of :func:`finite_difference`."""
  length: jax.Array  # μ‖u‖ for the next update (0: none measured yet)
  error: jax.Array  # estimated relative error of the last curvature
  num_retries: jax.Array  # int32, measurements repeated at a corrected step


def default_noise(params: PyTree) -> float:
  """``ε_f`` for ``noise=None``, from the parameters' lowest float precision.

  Its machine epsilon (``2^{-23}`` for float32, ``2^{-52}`` for float64),
  but ``2^{-10}`` for 16-bit parameters: the loss of a bfloat16 model is
  accumulated in float32 over many examples, and rounds to far less than
  one bfloat16 epsilon (``2^{-7}``); ``bench/finite_difference_step.py``
  measured 1e-5 to 4e-3 of the loss.
  """
  dtypes = [jnp.asarray(x).dtype for x in jax.tree.leaves(params)
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  if not dtypes:
    return float(jnp.finfo(jnp.float32).eps)
  if min(jnp.finfo(d).bits for d in dtypes) <= 16:
    return 2.0 ** -10
  return max(float(jnp.finfo(d).eps) for d in dtypes)


def _dither(shape, seed: int) -> jax.Array:
  """16 pseudo-random low bits per entry, from a hash of (leaf, position).

  The "lowbias32" integer hash (C. Wellons, 2018) of the flat index: cheap,
  elementwise (so sharded leaves stay sharded) and the same at every call.
  """
  h = jnp.full(shape, np.uint32(seed * 0x9E3779B1 % 2 ** 32), jnp.uint32)
  stride = 1
  for d in reversed(range(len(shape))):
    h = h + jax.lax.broadcasted_iota(jnp.uint32, shape, d) * jnp.uint32(
        stride % 2 ** 32)
    stride *= shape[d]
  for shift, mult in ((16, 0x7FEB352D), (15, 0x846CA68B)):
    h = (h ^ (h >> shift)) * jnp.uint32(mult)
  return (h ^ (h >> 16)) >> 16


def _shifted_leaf(w: jax.Array, u: jax.Array, mu: jax.Array,
                  seed: int) -> jax.Array:
  """``w + μu`` in ``w``'s dtype: rounded stochastically for bfloat16."""
  if w.dtype != jnp.bfloat16:
    return (w + mu.astype(w.dtype) * u.astype(w.dtype)).astype(w.dtype)
  exact = w.astype(jnp.float32) + mu.astype(jnp.float32) * u.astype(
      jnp.float32)
  bits = jax.lax.bitcast_convert_type(exact, jnp.uint32)
  bits = (bits + _dither(w.shape, seed)) & jnp.uint32(0xFFFF0000)
  rounded = jax.lax.bitcast_convert_type(bits, jnp.float32)
  # Inf and NaN stay themselves (adding to their low bits could change them).
  return jnp.where(jnp.isfinite(exact), rounded, exact).astype(w.dtype)


def perturbed_pair(params: PyTree, direction: PyTree,
                   mu: jax.Array) -> tuple[PyTree, PyTree]:
  """``(w + d, w − d)`` with ``d ≈ μu``, the same ``d`` in both.

  ``d = round(w + μu) − w`` in each leaf's dtype (exact, Sterbenz, when the
  two are within a factor 2), and ``w − d`` is exact too unless it crosses
  into a coarser binade: the two displacements are equal, so the rounding
  of the perturbation (stochastic for bfloat16) adds no odd
  ``gᵀ(d₊ − d₋)/μ²`` term to the second difference.
  """
  leaves, treedef = jax.tree.flatten(params)
  dirs = jax.tree.leaves(direction)
  plus, minus = [], []
  for i, (w, u) in enumerate(zip(leaves, dirs)):
    w = jnp.asarray(w)
    if not jnp.issubdtype(w.dtype, jnp.floating):
      plus.append(w)
      minus.append(w)
      continue
    wp = _shifted_leaf(w, jnp.asarray(u), mu, i + 1)
    plus.append(wp)
    minus.append((w - (wp - w)).astype(w.dtype))
  return treedef.unflatten(plus), treedef.unflatten(minus)


def line_values(fn: Callable[[PyTree], jax.Array], params: PyTree,
                direction: PyTree, mu: jax.Array, points, dtype) -> jax.Array:
  """``f(w + s d(kμ))`` for each ``(k, s)`` of ``points``, in ``dtype``.

  ``d(kμ)`` is :func:`perturbed_pair`'s displacement, so ``s = ±1`` give
  its two points. One forward pass per point, run one after the other by
  ``jax.lax.map``: the objective is traced (and compiled) once, and one
  point's parameters and activations are live at a time.
  """
  def at(point):
    scale, sign = point[0], point[1]
    plus, _ = perturbed_pair(params, direction, scale * mu)
    here = jax.tree.map(
        lambda w, p: p if not jnp.issubdtype(p.dtype, jnp.floating) else (
            w + sign.astype(p.dtype) * (p - w)).astype(p.dtype),
        params, plus)
    return interface.scalar(fn(here), dtype)

  return jax.lax.map(at, jnp.asarray(points, dtype))


def second_difference(f0, fp, fm):
  """``f₊ − 2f₀ + f₋`` as ``(f₊ − f₀) + (f₋ − f₀)``.

  Each difference of two close values is exact in floating point
  (Sterbenz), so the sum rounds at the scale of the second difference, not
  at that of ``f``.
  """
  return (fp - f0) + (fm - f0)


class Measurement(NamedTuple):
  """One automatic measurement at ``length = μ‖u‖``."""
  length: jax.Array  # μ‖u‖ used
  curvature: jax.Array  # D(μ)
  slope: jax.Array  # (f₊ − f₋)/(2μ)
  error: jax.Array  # estimated relative error of D(μ)
  balance: jax.Array  # rounding/truncation estimate (1 at the best step)


def measure(fn, params, direction, f0, length, unorm, noise) -> Measurement:
  """``D(μ)`` and its estimated truncation and rounding, from ``D(2μ)``.

  Rounding ``≤ r = 4ε_f max|f|/μ²`` (``r/4`` for ``D(2μ)``); truncation
  ``≈ (D(2μ) − D(μ))/3``, since they are ``D + cμ²`` and ``D + 4cμ²`` to
  leading order, less the ``1.25 r`` of that difference that rounding may
  explain. Four forward passes.
  """
  mu = length / unorm
  fp, fm, fp2, fm2 = line_values(fn, params, direction, mu,
                                 ((1, 1), (1, -1), (2, 1), (2, -1)),
                                 f0.dtype)
  mu2 = jnp.square(mu)
  near = second_difference(f0, fp, fm)
  far = second_difference(f0, fp2, fm2)
  curvature = near / mu2
  scale = jnp.max(jnp.abs(jnp.stack([f0, fp, fm, fp2, fm2])))
  rounding = 4 * noise * scale / mu2
  change = jnp.abs(far / 4 - near) / mu2
  truncation = jnp.maximum(change - _EXPLAINED * rounding, 0.0) / 3
  tiny = jnp.finfo(f0.dtype).tiny
  error = jnp.maximum(truncation, rounding) / jnp.maximum(
      jnp.abs(curvature), tiny)
  # Neither (a constant loss): no reason to move.
  balance = jnp.where((truncation > 0) | (rounding > 0),
                      rounding / jnp.maximum(truncation, tiny), 1.0)
  return Measurement(length, curvature, (fp - fm) / (2 * mu), error, balance)


def next_length(m: Measurement, bounds) -> jax.Array:
  """The length at which truncation (``∝ μ²``) equals rounding (``∝ μ⁻²``).

  ``length × (rounding/truncation)^{1/4}``, moved by at most ``_MOVE`` and
  clamped to ``bounds`` (a zero truncation asks for a longer step).
  """
  factor = jnp.clip(jnp.sqrt(jnp.sqrt(m.balance)), 1 / _MOVE, _MOVE)
  factor = jnp.where(jnp.isfinite(factor), factor, 1.0)
  return jnp.clip(m.length * factor, bounds[0], bounds[1])


def _automatic(fn, params, direction, f0, state, unorm, wscale, noise,
               max_retries, tolerance):
  """Measures at the state's length, again while off balance and inaccurate.

  A do-while loop: the measurement (its four forward passes) is traced
  once, whatever ``max_retries``.
  """
  dtype = f0.dtype
  pilot = _PILOT * noise ** 0.25 * wscale
  bounds = (_SHORTEST * pilot, _LONGEST * noise ** 0.25 * wscale)
  length = jnp.where(state.length > 0, state.length, pilot).astype(dtype)

  def body(carry):
    runs, length, _, _ = carry
    m = measure(fn, params, direction, f0, length, unorm, noise)
    wanted = next_length(m, bounds)
    off = (m.balance > _OFF_BALANCE) | (m.balance < 1 / _OFF_BALANCE)
    again = ((runs < max_retries) & off & (m.error > tolerance)
             & (wanted != length))
    return runs + 1, wanted, m, again

  zero = jnp.zeros([], dtype)
  start = (jnp.zeros([], jnp.int32), length,
           Measurement(length, zero, zero, zero, zero), jnp.asarray(True))
  runs, wanted, m, _ = jax.lax.while_loop(lambda c: c[3], body, start)
  return m, wanted, runs - 1


def _check_arguments(step, noise, max_retries, tolerance) -> None:
  if step is not None:
    checks.check_range("step", step, low=0.0, high=1.0, low_inclusive=False)
  if noise is not None:
    checks.check_range("noise", noise, low=0.0, high=1.0, low_inclusive=False,
                       high_inclusive=False)
  checks.check_int("max_retries", max_retries, low=0)
  checks.check_range("tolerance", tolerance, low=0.0)


def finite_difference(
    step: float | None = None,
    *,
    noise: float | None = None,
    max_retries: int = 3,
    tolerance: float = 0.05,
    upper: bool = True,
    reuse_value: bool = False,
) -> CurvatureEstimator:
  """``uᵀ∇²f(w)u`` from loss values only (module doc): no forward mode.

  ``update`` needs ``value_fn`` (or ``model_fn`` and ``loss_fn``, composed);
  the slope it returns is the caller's ``gᵀu`` when given, else the central
  first difference ``(f(w + μu) − f(w − μu))/(2μ)``.

  Args:
    step: None (default): ``μ`` balances the estimated truncation and
      rounding errors at each update (module doc). ``h ∈ (0, 1]``: a fixed
      perturbation of length ``μ‖u‖ = h max(‖w‖, 1)`` (3 passes instead of
      5; the error estimate is the rounding's alone).
    noise: ``ε_f ∈ (0, 1)``, the relative rounding error of one evaluation
      of the loss. None: the machine epsilon of the parameters' lowest
      precision float dtype. Pass it for a model that computes in a lower
      precision than its parameters (e.g. ``1e-3`` for bfloat16 matmuls
      on float32 parameters).
    max_retries: how many times an update may re-measure at once at the
      balanced step when the one it used was off by more than 2x and its
      estimated relative error exceeds ``tolerance`` (the first update
      starts from a pilot step); 0 only carries the balanced step to the
      next update.
    tolerance: ``≥ 0``, the estimated relative error of the curvature above
      which a measurement off balance is repeated at once; 0 repeats every
      one off balance, a third of the updates on the bench's ReLU nets (4
      passes each), and its loss against exact CDAT's, geometric mean over
      all runs, was equal or higher in every regime of the bench
      (``bench/RESULTS.md``, "Forward-only curvature").
    upper: return ``|D| + e`` (``e`` the estimated absolute error) with
      ``D``'s sign (module doc); False: ``D`` itself. In training, the
      worst problem's loss against exact CDAT's was lower with it in every
      regime of the bench (``bench/RESULTS.md``).
    reuse_value: use the caller's ``value=f(w)`` instead of evaluating it
      (one forward pass fewer). Only where ``value`` is exactly
      ``value_fn(params)`` on the same batch: a difference ``δ`` enters the
      curvature as ``2δ/μ²``.

  Returns:
    A :class:`~cdat_fast.estimators.CurvatureEstimator` whose state is a
    :class:`FiniteDifferenceState`.

  Raises:
    ValueError: naming the argument out of range.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, cdat_fast
    >>> from cdat_fast import estimators
    >>> f = lambda w: jnp.sum(jnp.cosh(w))
    >>> opt = cdat_fast.cdat(optax.sgd(1.0),
    ...                      curvature=estimators.finite_difference())
    >>> w = jnp.ones(3)
    >>> u, state = opt.update(jax.grad(f)(w), opt.init(w), w, value_fn=f)
  """
  _check_arguments(step, noise, max_retries, tolerance)

  def init(params):
    zero = jnp.zeros([], scalar_dtype(params))
    return FiniteDifferenceState(zero, zero, jnp.zeros([], jnp.int32))

  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    del learning_rate
    dtype = state.length.dtype
    fn = objective.value()
    f0 = interface.scalar(
        value if reuse_value and value is not None else fn(params), dtype)
    eps = default_noise(params) if noise is None else float(noise)
    unorm = treemath.norm(direction).astype(dtype)
    unorm = jnp.where(unorm > 0, unorm, jnp.ones_like(unorm))
    wscale = jnp.maximum(treemath.norm(params).astype(dtype), 1.0)
    if step is None:
      m, length, tries = _automatic(fn, params, direction, f0, state, unorm,
                                    wscale, eps, max_retries, tolerance)
      curvature, measured_slope, error = m.curvature, m.slope, m.error
    else:
      length = jnp.asarray(step, dtype) * wscale
      mu = length / unorm
      fp, fm = line_values(fn, params, direction, mu, ((1, 1), (1, -1)),
                           dtype)
      curvature = second_difference(f0, fp, fm) / jnp.square(mu)
      measured_slope = (fp - fm) / (2 * mu)
      scale = jnp.max(jnp.abs(jnp.stack([f0, fp, fm])))
      error = (4 * eps * scale / jnp.square(mu)) / jnp.maximum(
          jnp.abs(curvature), jnp.finfo(dtype).tiny)
      tries = jnp.zeros([], jnp.int32)
    if upper:  # |D| + its estimated error (absolute), D's sign
      size = jnp.abs(curvature)
      bound = size + error * jnp.maximum(size, jnp.finfo(dtype).tiny)
      curvature = jnp.where(curvature < 0, -bound, bound)
    estimate = Estimate(f0, measured_slope if slope is None else slope,
                        curvature)
    return estimate, FiniteDifferenceState(length, error,
                                           state.num_retries + tries)

  return CurvatureEstimator(init, update)
