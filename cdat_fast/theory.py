"""The paper's simplified dynamical models of sharpness and learning rate.

Float64 numpy simulations of the scalar models of Roulet et al. (2024),
sections 2.3 and 3.2 and appendix A, followed literally. Notation:
:math:`\\lambda_t` is the sharpness (largest Hessian eigenvalue), :math:`x_t`
the projection of the iterate on its eigenvector, :math:`p_t = x_t^2`,
:math:`y_t = \\eta_t \\lambda_t - 2` the normalised centred sharpness
(:math:`y = 0` is the edge of stability), :math:`a` the sharpening rate along
the gradient and :math:`b` the strength of the non-linear feedback
(Damian et al., 2022).

* :func:`eos_model`, eq. 4 with a constant :math:`\\eta` or the model of a
  classical tuner, eq. 6, :math:`\\eta_t = 2(1-\\epsilon)/\\lambda_t`;
* :func:`cdat_model`, eq. 10: CDAT's rule on a Hessian with two eigenvalues
  :math:`\\lambda_t` (dynamic) and :math:`\\nu` (fixed).

The analogues of the paper's Figs. 4, 9, 10 and 11 are drawn from these
models by :func:`cdat_fast.harness.theory_figures.theory_figures`
(``cdat-fast theory``); this module holds the maths only.

Divergent settings are simulated as they are: values may overflow to
``inf`` or ``nan`` without warnings.

References:
  Roulet et al., `Stepping on the Edge: Curvature Aware Learning Rate Tuners
  <https://arxiv.org/abs/2407.06183>`_, NeurIPS 2024.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np

TUNERS = (None, "below_edge")


class EOSTrajectory(NamedTuple):
  """Trajectory of :func:`eos_model`, every array indexed by t = 0..steps-1.

  Attributes:
    eta: learning rates :math:`\\eta_t`.
    lam: sharpness :math:`\\lambda_t`.
    y: :math:`y_t = \\eta_t \\lambda_t - 2`.
    x: projections :math:`x_t` (so :math:`p_t = x_t^2`).
  """

  eta: np.ndarray
  lam: np.ndarray
  y: np.ndarray
  x: np.ndarray


class CDATTrajectory(NamedTuple):
  """Trajectory of :func:`cdat_model`, every array indexed by t = 0..steps-1.

  Attributes:
    eta: learning rates :math:`\\eta_t`.
    lam: sharpness :math:`\\lambda_t`.
    y: :math:`y_t = \\eta_t \\lambda_t - 2`.
    p: squared projection on the top eigenvector, :math:`p_t`.
    g: squared projection on the eigenvector of :math:`\\nu`, :math:`g_t`.
  """

  eta: np.ndarray
  lam: np.ndarray
  y: np.ndarray
  p: np.ndarray
  g: np.ndarray


def _real(owner: str, name: str, value) -> float:
  try:
    v = float(value)
  except (TypeError, ValueError):
    raise ValueError(
        f"{owner}: {name} must be a real number, got {value!r}.") from None
  if not math.isfinite(v):
    raise ValueError(f"{owner}: {name} must be finite, got {value!r}.")
  return v


def _positive(owner: str, name: str, value) -> float:
  v = _real(owner, name, value)
  if v <= 0:
    raise ValueError(f"{owner}: {name} must be > 0, got {value!r}.")
  return v


def _nonnegative(owner: str, name: str, value) -> float:
  v = _real(owner, name, value)
  if v < 0:
    raise ValueError(f"{owner}: {name} must be >= 0, got {value!r}.")
  return v


def _steps(owner: str, steps) -> int:
  if isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) \
      or steps < 1:
    raise ValueError(
        f"{owner}: steps must be a positive integer, got {steps!r}.")
  return int(steps)


def eos_model(
    *,
    a: float,
    b: float,
    eta0: float | None,
    lam0: float,
    x0: float,
    steps: int,
    tuner: str | None = None,
    eps: float = 0.05,
) -> EOSTrajectory:
  """Simulates the edge-of-stability model, eq. 4, with or without a tuner.

  .. math::
    x_{t+1} = (1 - \\eta_t \\lambda_t)\\, x_t, \\qquad
    \\lambda_{t+1} = \\lambda_t + \\eta_t (a - b x_t^2),

  with :math:`\\eta_t = \\eta_0` for all t (``tuner=None``, Damian et al.'s
  model), or, modelling classical tuners that equilibrate just below the edge
  (``tuner="below_edge"``, eq. 6),

  .. math::
    \\eta_t = \\frac{2(1 - \\epsilon)}{\\lambda_t} \\quad (t \\ge 1),

  i.e. :math:`y_t = -2\\epsilon` (:math:`\\epsilon = 0.05` gives Fig. 4's
  :math:`\\eta = 1.9/\\lambda`). With the tuner, ``eta0`` is the first learning
  rate; ``None`` means :math:`2(1-\\epsilon)/\\lambda_0`.

  Args:
    a: sharpening rate :math:`a = -\\nabla\\lambda^\\top\\nabla f`.
    b: feedback strength :math:`b = \\|\\nabla\\lambda\\|^2 \\ge 0`.
    eta0: (first) learning rate :math:`\\eta_0 > 0`; required when
      ``tuner`` is None.
    lam0: initial sharpness :math:`\\lambda_0 > 0`.
    x0: initial projection :math:`x_0`.
    steps: number of iterates returned (t = 0..steps-1).
    tuner: ``None`` (constant learning rate) or ``"below_edge"`` (eq. 6).
    eps: :math:`\\epsilon \\in [0, 1)` of eq. 6.

  Returns:
    An :class:`EOSTrajectory` of float64 arrays of length ``steps``.

  Raises:
    ValueError: naming the argument, for an invalid value.

  Examples:
    >>> traj = eos_model(a=1.0, b=0.5, eta0=1.0, lam0=1.9, x0=1.0, steps=50,
    ...                  tuner="below_edge")
    >>> bool(traj.lam[-1] > traj.lam[0] and traj.eta[-1] < traj.eta[0])
    True
  """
  owner = "eos_model"
  if tuner not in TUNERS:
    raise ValueError(
        f"{owner}: tuner must be None or 'below_edge', got {tuner!r}.")
  a = _real(owner, "a", a)
  b = _nonnegative(owner, "b", b)
  lam = _positive(owner, "lam0", lam0)
  x = _real(owner, "x0", x0)
  steps = _steps(owner, steps)
  eps = _real(owner, "eps", eps)
  if not 0.0 <= eps < 1.0:
    raise ValueError(f"{owner}: eps must be in [0, 1), got {eps!r}.")
  if tuner is None:
    if eta0 is None:
      raise ValueError(f"{owner}: eta0 is required with a constant "
                       "learning rate (tuner=None).")
    eta = _positive(owner, "eta0", eta0)
  else:
    eta = (2.0 * (1.0 - eps) / lam if eta0 is None
           else _positive(owner, "eta0", eta0))

  out = np.empty((4, steps), dtype=np.float64)
  with np.errstate(all="ignore"):
    eta, lam, x = np.float64(eta), np.float64(lam), np.float64(x)
    for t in range(steps):
      out[:, t] = eta, lam, eta * lam - 2.0, x
      x, lam = (1.0 - eta * lam) * x, lam + eta * (a - b * x * x)
      if tuner == "below_edge":
        eta = 2.0 * (1.0 - eps) / lam
  return EOSTrajectory(*out)


def cdat_model(
    scale: float,
    *,
    a: float,
    b: float,
    nu: float,
    lam0: float,
    eta0: float,
    p0: float,
    g0: float,
    steps: int,
) -> CDATTrajectory:
  """Simulates the model of CDAT's dynamics, eq. 10 with eq. 5.

  Near a stationary point with Hessian :math:`\\lambda_t v v^\\top + \\nu
  v_\\perp v_\\perp^\\top`, gradient descent with CDAT's learning rate
  (eq. 9, scale :math:`\\sigma`) gives

  .. math::
    \\eta_{t+1} = \\sigma\\,
      \\frac{\\lambda_t^2 p_t + \\nu^2 g_t}{\\lambda_t^3 p_t + \\nu^3 g_t},
    \\quad g_{t+1} = (1 - \\eta_t \\nu)^2 g_t,
    \\quad p_{t+1} = (1 + y_t)^2 p_t,
    \\quad \\lambda_{t+1} = \\lambda_t + \\eta_t (a - b p_t),

  with :math:`y_t = \\eta_t \\lambda_t - 2` and :math:`\\eta_0` given. The
  learning rate of step t+1 is computed from the state at t, as eq. 10 is
  written; the :math:`\\lambda` update is eq. 4's, which together with this
  :math:`\\eta_{t+1}` gives eq. 5's :math:`y_{t+1}`.

  Args:
    scale: CDAT's scale :math:`\\sigma > 0` (2 is "on edge").
    a: sharpening rate.
    b: feedback strength, :math:`\\ge 0`.
    nu: the fixed small eigenvalue :math:`\\nu \\ge 0`.
    lam0: initial sharpness :math:`\\lambda_0 > 0`.
    eta0: initial learning rate :math:`\\eta_0 > 0`.
    p0: initial :math:`p_0 \\ge 0`.
    g0: initial :math:`g_0 \\ge 0` (with :math:`p_0 + g_0 > 0`).
    steps: number of iterates returned (t = 0..steps-1).

  Returns:
    A :class:`CDATTrajectory` of float64 arrays of length ``steps``.

  Raises:
    ValueError: naming the argument, for an invalid value.

  Examples:
    >>> traj = cdat_model(2.0, a=5e-2, b=1e-1, nu=0.1, lam0=18.0, eta0=0.05,
    ...                   p0=4.0, g0=4.0, steps=300)
    >>> bool(abs(traj.y[-1]) < 0.01)
    True
  """
  owner = "cdat_model"
  sigma = _positive(owner, "scale", scale)
  a = _real(owner, "a", a)
  b = _nonnegative(owner, "b", b)
  nu = _nonnegative(owner, "nu", nu)
  lam = _positive(owner, "lam0", lam0)
  eta = _positive(owner, "eta0", eta0)
  p = _nonnegative(owner, "p0", p0)
  g = _nonnegative(owner, "g0", g0)
  if p + g <= 0:
    raise ValueError(f"{owner}: p0 + g0 must be > 0, got p0={p0!r}, "
                     f"g0={g0!r}.")
  steps = _steps(owner, steps)

  out = np.empty((5, steps), dtype=np.float64)
  with np.errstate(all="ignore"):
    eta, lam, p, g = map(np.float64, (eta, lam, p, g))
    for t in range(steps):
      y = eta * lam - 2.0
      out[:, t] = eta, lam, y, p, g
      eta_next = sigma * (lam**2 * p + nu**2 * g) / (lam**3 * p + nu**3 * g)
      g = (1.0 - eta * nu) ** 2 * g
      lam = lam + eta * (a - b * p)
      p = (1.0 + y) ** 2 * p
      eta = eta_next
  return CDATTrajectory(*out)
