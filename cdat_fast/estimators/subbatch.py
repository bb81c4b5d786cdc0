r"""Sub-batch curvature: an inner estimator on a fraction of the batch.

The curvature is measured on every ``m``-th example of the batch
(``fraction = 1/m``) while the numerator ``max(−gᵀu, 0)`` stays the full
batch's (the rule takes it from the gradient):

.. math::
  d_t = |u_t^\top \nabla^2 f_S(w_t)\, u_t| + \varepsilon, \qquad
  f_S = \text{the objective on the rows } S = \{0, m, 2m, \dots\}.

On the sub-batch this is exactly the inner estimator's curvature (CDAT's,
for :func:`~cdat_fast.estimators.exact`); its noise grows as the sub-batch
shrinks (``ema`` smooths it). *Cost*: the inner estimator's, times
``fraction``: 1/16 of the batch with the exact curvature costs about
``4/16`` of a forward pass on top of a step's 3, so ≈1.08x a step in FLOPs.

*Convention.* It slices the leading axis of every array leaf of the keyword
arguments that the objective receives (``value_fn``'s, or ``model_fn``'s
and ``loss_fn``'s, by their signatures; ``argnames`` restricts it to those
named). An argument it cannot slice (not an array, a scalar, or fewer rows
than ``1/fraction``) is an error that names it. Taking every ``m``-th row,
rather than the first rows, keeps the sub-batch spread over the devices of a
data-parallel mesh: when the batch is split over the devices in contiguous
blocks whose sizes are multiples of ``m``, each device selects its share
from its own rows (a local reshape and slice, no transfer), and the
curvature work is spread evenly instead of serialised on one device.
"""
from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cdat_fast import checks, treemath
from cdat_fast.estimators.exact import exact
from cdat_fast.estimators.interface import CurvatureEstimator, Objective

_FUNCTIONS = ("value_fn", "model_fn", "loss_fn")


def stride_for(fraction: float) -> int:
  """``m = 1/fraction``, checked to be an integer ≥ 1."""
  checks.check_range("fraction", fraction, low=0.0, high=1.0,
                     low_inclusive=False)
  m = round(1.0 / float(fraction))
  if not math.isclose(m * float(fraction), 1.0, rel_tol=1e-6):
    raise ValueError(
        f"fraction must be 1/m for an integer m (the sub-batch is every m-th"
        f" row), got {fraction!r}")
  return m


def every_mth_row(x: jax.Array, m: int) -> jax.Array:
  """Rows ``0, m, 2m, …`` of ``x``: ``⌊n/m⌋`` rows.

  A reshape to ``(n/m, m, …)`` and a slice when ``m`` divides ``n`` (local
  to each device when the rows are split in multiples of ``m``), a strided
  slice otherwise.
  """
  n = x.shape[0]
  if n % m == 0:
    return x.reshape(n // m, m, *x.shape[1:])[:, 0]
  return jax.lax.slice_in_dim(x, 0, (n // m - 1) * m + 1, stride=m)


def _slice_leaf(name: str, receivers: list[str], m: int):
  who = " and ".join(receivers)

  def slice_leaf(path, leaf):
    where = f"'{name}{jax.tree_util.keystr(path)}'"
    if not isinstance(leaf, (jax.Array, np.ndarray)) or np.ndim(leaf) == 0:
      raise ValueError(
          f"subbatch: cannot slice keyword argument {where} of {who}: it"
          f" has no leading (batch) axis ({type(leaf).__name__}"
          f"{'' if np.ndim(leaf) else ' of shape ()'}); pass argnames= to"
          " name the batch arguments")
    if leaf.shape[0] < m:
      raise ValueError(
          f"subbatch: keyword argument {where} of {who} has"
          f" {leaf.shape[0]} rows, fewer than 1/fraction = {m}")
    return every_mth_row(jnp.asarray(leaf), m)

  return slice_leaf


def sub_batch_args(objective: Objective, m: int,
                   argnames: Sequence[str] | None,
                   after: jax.Array | None = None) -> dict[str, Any]:
  """The objective's extra arguments with the batch ones cut to every m-th row.

  ``after``: a value the sliced rows are made to depend on, so that the
  sub-batch's pass cannot start before it exists, in the programs lowered
  for GPU and TPU (:func:`_made_to_wait`); the CPU lowering leaves the rows
  free (``jax.lax.platform_dependent``, decided when the program is lowered
  for a platform, not by the host's default backend).
  """
  received = objective.received(_FUNCTIONS)
  if not received:
    raise ValueError(
        "subbatch: the objective receives no keyword argument to slice; pass"
        " the batch to update as a keyword argument that value_fn (or"
        " model_fn and loss_fn) takes, e.g. value_fn(params, batch) with"
        " update(..., value_fn=value_fn, batch=batch)")
  if argnames is not None:
    missing = [a for a in argnames if a not in received]
    if missing:
      raise ValueError(
          f"subbatch: argnames {missing} are not keyword arguments that the"
          f" objective receives (it receives {sorted(received)})")
    received = {a: received[a] for a in argnames}
  args = dict(objective.extra_args)
  for name, receivers in received.items():
    args[name] = jax.tree_util.tree_map_with_path(
        _slice_leaf(name, receivers, m), args[name])
  if after is not None:
    rows = {name: args[name] for name in received}
    args.update(jax.lax.platform_dependent(
        rows, jnp.asarray(after), cpu=lambda rows, after: rows,
        default=_made_to_wait))
  return args


def _made_to_wait(rows: Any, after: jax.Array) -> Any:
  """``rows``, each made to depend on the scalar ``after`` (bit for bit).

  What accelerators compile: XLA on GPU and TPU would otherwise run the
  sub-batch's primal pass early and hold its residuals through the step's
  peak. A data dependence, not an optimisation barrier: XLA's sharding
  propagation does not carry the rows' sharding through a barrier (the v5e
  FSDP step then gathered activations). ``after > inf`` is False for every
  value, NaN included, so each row keeps its value. On CPU (see
  :func:`sub_batch_args`) the rows are left free: XLA:CPU runs independent
  work side by side on its threads, so the small sub-batch pass fills the
  cores the backward pass leaves idle, where the dependence would put it on
  the step's critical path, after ``gᵀu``.
  """
  late = after > jnp.inf
  return jax.tree.map(lambda a: jnp.where(late, jnp.zeros_like(a), a), rows)


def subbatch(
    fraction: float,
    inner: CurvatureEstimator | None = None,
    *,
    argnames: Sequence[str] | None = None,
) -> CurvatureEstimator:
  """``inner``'s curvature on every ``1/fraction``-th row of the batch.

  Args:
    fraction: ``1/m`` for an integer ``m ≥ 1`` (``1/16``: every 16th row).
    inner: the estimator run on the sub-batch; :func:`exact` by default
      (``gauss_newton()`` for the cheapest).
    argnames: the keyword arguments to slice; all that the objective
      receives by default.

  Returns:
    A :class:`~cdat_fast.estimators.CurvatureEstimator` with the inner
    estimator's state.

  Examples:
    >>> import jax, jax.numpy as jnp, optax, cdat_fast
    >>> loss = lambda w, batch: jnp.mean((batch["x"] @ w - batch["y"]) ** 2)
    >>> opt = cdat_fast.cdat(
    ...     optax.sgd(1.0), curvature=cdat_fast.estimators.subbatch(1 / 4))
    >>> batch = {"x": jnp.arange(24.0).reshape(8, 3) / 24, "y": jnp.ones(8)}
    >>> w = jnp.zeros(3)
    >>> g = jax.grad(loss)(w, batch)  # the full batch's gradient
    >>> u, state = opt.update(g, opt.init(w), w, value_fn=loss, batch=batch)
  """
  m = stride_for(fraction)
  inner = exact() if inner is None else inner
  if argnames is not None:
    if isinstance(argnames, str):
      argnames = (argnames,)
    argnames = tuple(argnames)

  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    del value  # the caller's f(w) is the full batch's
    # The sub-batch's primal pass does not depend on u, so XLA may run it
    # early, beside the full batch's backward pass, and hold its residuals
    # through the step's peak (+4% temporaries on the paper's NanoLM,
    # compile-time). Its rows are made to depend on a scalar of u (gᵀu when
    # given, else uᵀu), which keeps the whole sub-batch pass after u exists
    # on GPU and TPU; on CPU the early pass is what fills idle cores, and
    # the rows are left free (sub_batch_args).
    anchor = slope if slope is not None else treemath.vdot(direction,
                                                           direction)
    sub = objective.with_args(sub_batch_args(objective, m, argnames, anchor))
    return inner.update(state, params, direction, sub, slope=slope,
                        value=None, learning_rate=learning_rate)

  return CurvatureEstimator(inner.init, update)
