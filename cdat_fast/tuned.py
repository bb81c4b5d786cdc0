"""Combining a base optimizer's direction with a learning-rate tuner.

Every tuner in cdat-fast has two forms (as Optax's line search does):

* a chainable block ``scale_by_<tuner>(...)`` that receives the base
  optimizer's update ``u`` (computed with learning rate 1) as its ``updates``
  and the gradient through the ``grad=`` keyword, and returns ``η · u``;
* a factory ``<tuner>(base, ...)`` built by :func:`tuned`, which runs ``base``
  on the gradient and hands the result to the block, passing the raw gradient
  as ``grad``.

Both return ``optax.GradientTransformationExtraArgs``.
:func:`apply_learning_rate` is the shared guard that keeps NaN and Inf out of
the parameters.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import optax

PyTree = Any


class TunedState(NamedTuple):
  """State of ``tuned(base, tuner)``: the base optimizer's, then the tuner's."""
  base: Any
  tuner: Any


def tuned(
    base: optax.GradientTransformation,
    tuner: optax.GradientTransformationExtraArgs,
    *,
    pass_base_state: bool = False,
) -> optax.GradientTransformationExtraArgs:
  """Uses ``base``'s update (learning rate 1) as the direction that ``tuner`` scales.

  Args:
    base: any optax transformation producing the direction ``u`` from the
      gradient (``optax.sgd(1.0)``, ``optax.adam(1.0)``, a chain, ...). Extra
      keyword arguments given to ``update`` are passed to it too, if it takes
      them.
    tuner: a ``scale_by_*`` block.
    pass_base_state: also hand the base's new state to the tuner as
      ``base_state=`` (used by rules that precondition with it).
  """
  if not isinstance(base, optax.GradientTransformation):
    raise TypeError(
        "base must be an optax.GradientTransformation (e.g. optax.sgd(1.0)),"
        f" got {type(base).__name__}")
  base = optax.with_extra_args_support(base)

  def init_fn(params):
    return TunedState(base.init(params), tuner.init(params))

  def update_fn(updates, state, params=None, **extra_args):
    grad = extra_args.pop("grad", None)
    grad = updates if grad is None else grad
    direction, base_state = base.update(
        updates, state.base, params, grad=grad, **extra_args)
    if pass_base_state:
      extra_args["base_state"] = base_state
    scaled, tuner_state = tuner.update(
        direction, state.tuner, params, grad=grad, **extra_args)
    return scaled, TunedState(base_state, tuner_state)

  return optax.GradientTransformationExtraArgs(init_fn, update_fn)


def scalar_dtype(params: PyTree) -> jnp.dtype:
  """float32, or float64 when the parameters are float64 (x64 mode)."""
  leaves = jax.tree.leaves(params)
  dtypes = [jnp.asarray(x).dtype for x in leaves
            if jnp.issubdtype(jnp.asarray(x).dtype, jnp.floating)]
  return jnp.result_type(jnp.float32, *dtypes)


def tree_all_finite(tree: PyTree) -> jax.Array:
  leaves = jax.tree.leaves(tree)
  if not leaves:
    return jnp.asarray(True)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def apply_learning_rate(
    direction: PyTree, learning_rate: jax.Array,
    direction_finite: jax.Array | None = None,
) -> tuple[PyTree, jax.Array, jax.Array]:
  """``η · u`` with the guard every tuner uses.

  If ``η`` or any entry of ``u`` is not finite, the step is skipped: the
  updates are exactly zero and the learning rate reported is 0.

  Args:
    direction: ``u``.
    learning_rate: ``η``.
    direction_finite: whether every entry of ``u`` is finite, when the caller
      knows it already (e.g. ``gᵀu`` is finite for a finite ``g``, which
      implies it); otherwise a pass over ``u`` checks it.

  Returns:
    ``(updates, learning rate used, ok)`` where ``ok`` is False on a skip.
  """
  if direction_finite is None:
    direction_finite = tree_all_finite(direction)
  ok = jnp.logical_and(jnp.isfinite(learning_rate), direction_finite)
  eta = jnp.where(ok, learning_rate, jnp.zeros_like(learning_rate))
  updates = jax.tree.map(
      lambda u: jnp.where(ok, eta.astype(u.dtype) * u, jnp.zeros_like(u)),
      direction)
  return updates, eta, ok
