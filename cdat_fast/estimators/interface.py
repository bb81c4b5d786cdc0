r"""What every curvature estimator implements, and what it is given.

CDAT's rule (:func:`cdat_fast.scale_by_cdat`) needs, at each step, the
curvature ``uᵀ∇²f(w)u`` along the base optimizer's update ``u``, and the
slope ``∂f(w)[u] = gᵀu`` when no gradient was given. A
:class:`CurvatureEstimator` provides them, as optax's
``GradientTransformation`` provides an update: a pair of pure functions,

* ``init(params) -> state``, a NamedTuple of arrays holding only what the
  estimator needs (``optax.EmptyState()`` when nothing);
* ``update(state, params, direction, objective, *, slope, value,
  learning_rate) -> (Estimate, state)``.

``objective`` is an :class:`Objective`: the ``value_fn`` (or ``model_fn``
and ``loss_fn``) and the extra keyword arguments that ``update`` received.
``slope`` is ``gᵀu`` when the caller gave a gradient, else None (the
estimate must then carry ``∂f(w)[u]``); ``value`` is ``f(w)`` when the
caller gave it, else None; ``learning_rate`` is ``η_{t-1}``, the step the
rule took at the previous update (0 before the first, and after a skipped
step). All scalars are in the state's float dtype.

The rule owns the edge-case policy: when any number of the estimate is not
finite the step is skipped and the estimator's new state is discarded, so an
estimator never needs to guard its state against NaN. Estimators compose:
:func:`~cdat_fast.estimators.every` and
:func:`~cdat_fast.estimators.subbatch` wrap an inner one.
"""
from __future__ import annotations

import contextlib
import dataclasses
import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
import optax

from cdat_fast import treemath
from cdat_fast.objective import (bind_objective, scalar_valued,
                                  value_fn_kwargs)

PyTree = Any


class NoForwardModeError(TypeError):
  """The objective has a layer without forward-mode autodiff (no jvp rule).

  Raised by the estimators that differentiate the objective with
  ``jax.jvp`` (:func:`~cdat_fast.estimators.exact`,
  :func:`~cdat_fast.estimators.gauss_newton`, and so ``every``, ``secant``
  and ``subbatch`` around them) in place of JAX's own error, which is
  chained as its ``__cause__``.
  """


def _lacks_forward_mode(error: Exception) -> bool:
  """Whether ``error`` is JAX's refusal to run a jvp through some layer.

  ``jax.jvp`` through a ``jax.custom_vjp`` function raises ``TypeError:
  can't apply forward-mode autodiff (jvp) to a custom_vjp function``; a
  primitive without a jvp rule (a jvp of a jvp through ``custom_vjp`` meets
  ``custom_lin``; cuDNN attention, ``dot_product_attention_fwd_wrapper``)
  raises ``NotImplementedError: Differentiation rule for '...' not
  implemented``.
  """
  text = str(error)
  if isinstance(error, NoForwardModeError):
    return False
  if isinstance(error, TypeError):
    return "forward-mode" in text
  return (isinstance(error, NotImplementedError)
          and "Differentiation rule for" in text)


def _message(who: str, advice: str, jax_said: str) -> str:
  return (
      f"{who}: the model has a layer without forward-mode autodiff (no jvp"
      " rule: a jax.custom_vjp function, or a kernel with only a VJP such"
      " as cuDNN or Pallas flash attention), which it cannot differentiate"
      " with jax.jvp. Use"
      " curvature=cdat_fast.estimators.finite_difference() (forward-only"
      " curvature, from loss values), or for attention pass"
      " attention_fn=cdat_fast.nn.dot_product_attention (flash attention"
      f" with a forward-mode rule).{advice} JAX said: {jax_said}")


def _stages_custom_lin(jaxpr) -> bool:
  """Whether ``jaxpr`` (or one nested in it) holds a ``custom_lin``."""
  return any(e.primitive.name == "custom_lin" for e in jaxpr.eqns) or any(
      _stages_custom_lin(sub) for sub in jax.extend.core.subjaxprs(jaxpr))


def checked_jvp(fn, primals, tangents, who: str, advice: str = ""):
  """``jax.jvp(fn, primals, tangents)``, refusing VJP-only layers at trace time.

  Under ``jax.jit``, a jvp through a ``jax.custom_vjp`` function is staged
  as a ``custom_lin`` that fails only when the caller's program is lowered
  (``TypeError: can't apply forward-mode autodiff (jvp) to a custom_vjp
  function``), out of reach of :func:`forward_mode`. So the jvp is traced
  once more, alone, and its program searched for one (trace time only: the
  computation itself is ``jax.jvp``'s).
  """
  with forward_mode(who, advice):
    probe = jax.make_jaxpr(lambda p, t: jax.jvp(fn, p, t))(primals, tangents)
    if _stages_custom_lin(probe.jaxpr):
      cause = TypeError("can't apply forward-mode autodiff (jvp) to a"
                        " custom_vjp function.")
      raise NoForwardModeError(_message(who, advice, str(cause))) from cause
    return jax.jvp(fn, primals, tangents)


@contextlib.contextmanager
def forward_mode(who: str, advice: str = ""):
  """Turns JAX's errors for a layer without a jvp rule into one of ours.

  Args:
    who: the estimator, as the user wrote it (e.g. ``"estimators.exact()"``).
    advice: a sentence to add (e.g. how to avoid the jvp altogether).

  Raises:
    NoForwardModeError: naming the forward-only alternatives, from JAX's
      ``TypeError`` or ``NotImplementedError``.
  """
  try:
    yield
  except (TypeError, NotImplementedError) as e:
    if not _lacks_forward_mode(e):
      raise
    jax_said = str(e).strip().splitlines()[0] if str(e).strip() else repr(e)
    raise NoForwardModeError(_message(who, advice, jax_said)) from e


class Estimate(NamedTuple):
  """One step's curvature estimate (scalars)."""
  value: jax.Array  # f(w) as the estimator saw it (0 if it needed none)
  slope: jax.Array  # ∂f(w)[u] = gᵀu
  curvature: jax.Array  # ≈ uᵀ∇²f(w)u (its absolute value is used)


class CurvatureEstimator(NamedTuple):
  """An estimator of ``uᵀ∇²f(w)u``: ``init`` and ``update`` (module doc)."""
  init: Callable[[PyTree], Any]
  update: Callable[..., tuple[Estimate, Any]]


@dataclasses.dataclass(frozen=True)
class Objective:
  """The objective as ``update`` received it, evaluated on demand.

  Attributes:
    who: the name used in error messages (e.g. ``"scale_by_cdat"``).
    value_fn: ``value_fn(params, **kwargs)``, the scalar objective, or None.
    model_fn: ``model_fn(params, **kwargs)``, parameters to outputs, or None.
    loss_fn: ``loss_fn(outputs, **kwargs)``, outputs to a scalar, or None.
    extra_args: the keyword arguments of ``update``; each function receives
      those its signature names (all, if it takes ``**kwargs``).
  """
  who: str
  value_fn: Callable[..., jax.Array] | None = None
  model_fn: Callable[..., PyTree] | None = None
  loss_fn: Callable[..., jax.Array] | None = None
  extra_args: dict[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def composed(self) -> bool:
    """True when ``f = loss_fn ∘ model_fn`` stands in for ``value_fn``."""
    return (self.value_fn is None and self.model_fn is not None
            and self.loss_fn is not None)

  def value(self) -> Callable[[PyTree], jax.Array]:
    """``params -> f(params)``: ``value_fn``, or ``loss_fn ∘ model_fn``."""
    if self.composed:
      model, loss = self.model_and_loss()
      return lambda p: loss(model(p))
    return bind_objective(self.who, self.value_fn, self.extra_args)

  def model_and_loss(self) -> tuple[Callable[[PyTree], PyTree],
                                    Callable[[PyTree], jax.Array]]:
    """``model(params)`` and ``loss(outputs)`` with their arguments bound."""
    for name, fn, what in (
        ("model_fn", self.model_fn, "parameters -> model outputs (e.g. logits)"),
        ("loss_fn", self.loss_fn, "model outputs -> scalar loss")):
      if fn is None:
        raise TypeError(
            f"{self.who}.update needs {name}=<function: {what}> (and any batch"
            " it needs as extra keyword arguments)")
      if not callable(fn):
        raise TypeError(f"{self.who}: {name} must be callable, got {type(fn)}")
    bind = lambda fn: functools.partial(
        fn, **value_fn_kwargs(fn, self.extra_args))
    return bind(self.model_fn), scalar_valued(self.who, "loss_fn",
                                              bind(self.loss_fn))

  def received(self, functions: tuple[str, ...]) -> dict[str, list[str]]:
    """For each extra argument, which of ``functions`` receive it."""
    out: dict[str, list[str]] = {}
    for name in functions:
      fn = getattr(self, name)
      if fn is not None:
        for key in value_fn_kwargs(fn, self.extra_args):
          out.setdefault(key, []).append(name)
    return out

  def with_args(self, extra_args: dict[str, Any]) -> Objective:
    """The same functions with other extra arguments."""
    return dataclasses.replace(self, extra_args=dict(extra_args))


def stateless(measure: Callable[[PyTree, PyTree, Objective],
                                tuple[jax.Array, jax.Array, jax.Array]]
              ) -> CurvatureEstimator:
  """An estimator without state from ``measure(params, u, objective)``.

  ``measure`` returns ``(f(w), ∂f(w)[u], curvature)``; a slope given by the
  caller replaces the measured one.
  """
  def init(params):
    del params
    return optax.EmptyState()

  def update(state, params, direction, objective, *, slope=None, value=None,
             learning_rate=None):
    del value, learning_rate
    f, measured_slope, curvature = measure(params, direction, objective)
    return Estimate(f, measured_slope if slope is None else slope,
                    curvature), state

  return CurvatureEstimator(init, update)


def scalar(x, dtype) -> jax.Array:
  """``x`` as a scalar array of ``dtype``."""
  return jnp.asarray(x).astype(dtype)


def squared_norm(tree: PyTree, dtype) -> jax.Array:
  """``‖u‖²`` accumulated in ``dtype``."""
  return sum((jnp.sum(jnp.square(jnp.asarray(x).astype(dtype)))
              for x in jax.tree.leaves(tree)), jnp.zeros([], dtype))


def first_order_slope(objective: Objective, params: PyTree,
                      direction: PyTree) -> jax.Array:
  """``∂f(w)[u]`` by one first-order jvp (a forward pass and its tangent)."""
  direction = treemath.cast_like(direction, params)
  return checked_jvp(objective.value(), (params,), (direction,),
                     f"{objective.who}'s slope gᵀu (no grad= given)",
                     " Or pass grad= to update, which gives gᵀu without a"
                     " jvp.")[1]


def measure_or_hold(measure_now, inner: CurvatureEstimator, inner_state,
                    held: Callable[[], tuple[jax.Array, jax.Array]],
                    params, direction, objective, *, slope, learning_rate,
                    dtype):
  """Runs ``inner`` under ``lax.cond(measure_now, ...)``, else ``held()``.

  Returns ``(|curvature|, slope, inner_state)``: on the measured branch
  those of ``inner`` (the inner state advanced), on the held branch
  ``held()``'s curvature and slope (the inner state unchanged). The inner
  estimator sees no ``value``: the caller's ``f(w)`` may belong to another
  batch than the one it measures on.
  """
  def measured():
    est, new_state = inner.update(
        inner_state, params, direction, objective, slope=slope, value=None,
        learning_rate=learning_rate)
    return (jnp.abs(scalar(est.curvature, dtype)), scalar(est.slope, dtype),
            new_state)

  def hold():
    curvature, s = held()
    return scalar(curvature, dtype), scalar(s, dtype), inner_state

  return jax.lax.cond(measure_now, measured, hold)
